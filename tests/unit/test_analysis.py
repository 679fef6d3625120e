"""Table 1's statistics from journal records (collector/analysis.py)."""

from __future__ import annotations

import numpy as np
import pytest

from grokwatch.collector.analysis import METRICS, correlation_table, load, spearman


def journal(steps, distance, cross, entropy, accuracy):
    records = []
    for s, d, c, e, a in zip(steps, distance, cross, entropy, accuracy):
        records.append(dict(kind="point", run="r", source="probe", group="add", step=int(s), samples=4,
                            distance=float(d), cross_distance=float(c), entropy=float(e), loss=0.01))
        records.append(dict(kind="eval", run="r", step=int(s), scores={"add": float(a), "add/train": 1.0}))
    return records


def test_the_gap_to_the_cross_group_baseline_separates_a_group_signal_from_a_global_one():
    """Entropy falls and drags every distance down (cross-group too); only the
    within-group distance also falls with this group's accuracy."""
    rng = np.random.default_rng(0)
    steps = np.arange(0, 2000, 25)
    entropy = np.linspace(1.0, 0.8, len(steps))
    accuracy = 1 / (1 + np.exp(-(steps - 1200) / 100.0))
    cross = 10 * entropy + rng.normal(0, 0.01, len(steps))
    distance = cross - 2 * accuracy + rng.normal(0, 0.01, len(steps))
    series, evals = load(journal(steps, distance, cross, entropy, accuracy))
    gs = series[("r", "probe", "add")]
    np.testing.assert_allclose(gs.values["distance_vs_cross"], distance / cross)
    table = correlation_table(gs, evals[("r", "add")], since=0)
    assert set(table) == set(METRICS)
    gap = table["distance_vs_cross"]
    assert gap["n"] == len(steps)
    assert gap["spearman"] == pytest.approx(spearman(distance / cross, accuracy))
    assert gap["spearman"] < -0.95
    assert gap["partial_entropy"] < -0.5  # beyond entropy
    # The raw distance correlates with accuracy too, but mostly through entropy (the step).
    assert table["distance"]["vs_entropy"] > 0.5


def test_phase_changes_are_placed_at_the_step_the_detector_dates_them_to():
    """The detector decides `patience` points after a transition and dates it back; the journal carries
    the dated steps (what the onset gauge exports) and the report must mark those, not the decision's."""
    from grokwatch.collector.analysis import memorized_step

    def point(step, phase, **dated):
        return dict(kind="point", run="r", source="probe", group="add", step=step, loss=0.1, phase=phase, **dated)

    records = [point(0, "memorizing"), point(100, "memorized", memorized_step=50),
               point(200, "memorized", memorized_step=50),
               point(300, "generalizing", memorized_step=50, onset_step=225),
               point(400, "generalizing", memorized_step=50, onset_step=225)]
    gs = load(records)[0][("r", "probe", "add")]
    assert gs.phases == [(0, "memorizing"), (50, "memorized"), (225, "generalizing")]
    assert memorized_step(gs, None) == 50
    old = [{k: v for k, v in r.items() if not k.endswith("_step")} for r in records]  # journals before the field
    assert load(old)[0][("r", "probe", "add")].phases == [(0, "memorizing"), (100, "memorized"), (300, "generalizing")]


def test_a_group_with_no_evidence_is_not_memorized_from_its_first_point():
    """`unknown` (no loss evidence) and `memorizing` are not memorized: without training accuracy, the
    analysis starts where the detector dated memorization, or nowhere (it once started at the first point)."""
    from grokwatch.collector.analysis import memorized_step

    def point(step, phase, **dated):
        return dict(kind="point", run="r", source="probe", group="sub", step=step, loss=0.1, phase=phase, **dated)

    gs = load([point(0, "unknown"), point(25, "memorizing"), point(50, "memorizing")])[0][("r", "probe", "sub")]
    assert memorized_step(gs, None) is None
    gs = load([point(0, "unknown"), point(25, "memorizing"), point(75, "memorized", memorized_step=60)])[0][
        ("r", "probe", "sub")]
    assert memorized_step(gs, None) == 60
