"""METRICS.md §5 phase detector on synthetic trajectories with known phases."""

from __future__ import annotations

import numpy as np
import pytest

from grokwatch.collector.phases import PhaseConfig, PhaseTracker, theil_sen_slope


def trajectory(steps, memorize_at=400, onset_at=1200, settle_at=1800, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    for s in steps:
        loss = 4.0 * max(0.0, 1 - s / memorize_at) + 0.01
        if s < onset_at:
            dist = 0.6
        elif s < settle_at:
            dist = 0.6 - 0.4 * (s - onset_at) / (settle_at - onset_at)
        else:
            dist = 0.2
        yield s, loss + noise * rng.normal(), dist * (1 + noise * rng.normal())


@pytest.mark.parametrize("noise", [0.0, 0.005])
def test_detector_walks_through_the_phases_at_the_right_steps(noise):
    tracker = PhaseTracker(PhaseConfig())
    seen = []
    for step, loss, dist in trajectory(range(0, 3001, 25), noise=noise):
        tracker.add(step, loss, dist, None)
        seen.append(tracker.phase)
    tracker.add(10**9, None, None, None)  # close the last point
    order = [p for i, p in enumerate(seen) if i == 0 or seen[i - 1] != p]
    assert order == ["memorizing", "memorized", "generalizing", "stable"]
    assert 400 <= tracker.memorized_step <= 400 + 12 * 25  # within one window of the truth
    assert 1200 <= tracker.onset_step <= 1200 + 12 * 25


def test_no_structuring_means_no_onset():
    tracker = PhaseTracker(PhaseConfig())
    for step, loss, _ in trajectory(range(0, 3001, 25)):
        tracker.add(step, loss, 0.6, 0.3)
    assert tracker.phase == "memorized" and tracker.onset_step is None


@pytest.mark.parametrize("tol, onset", [(0.02, True), (float("inf"), False)])
def test_rising_consistency_is_structuring_unless_it_is_ignored(tol, onset):
    tracker = PhaseTracker(PhaseConfig(consistency_abs_tol=tol))
    for step in range(0, 3001, 25):
        tracker.add(step, 0.01, 0.5, 0.2 + 0.5 * min(1, max(0, (step - 1000) / 800)))
    if onset:
        assert tracker.onset_step is not None and 1000 <= tracker.onset_step <= 1400
    else:  # the shipped default: consistency only added false onsets on the ground-truth runs
        assert tracker.onset_step is None and tracker.phase == "memorized"


def test_points_of_one_step_are_merged():
    tracker = PhaseTracker(PhaseConfig(window=3))
    tracker.add(10, 1.0, 0.5, None)
    tracker.add(10, 3.0, 0.7, None)
    tracker.add(20, 1.0, 0.5, None)
    assert tracker.points[0]["loss"] == 2.0 and tracker.points[0]["distance"] == pytest.approx(0.6)


def test_theil_sen_ignores_an_outlier():
    x = np.arange(10.0)
    y = 2 * x
    y[3] = 100
    assert theil_sen_slope(x, y) == pytest.approx(2.0)


def test_the_distance_signal_is_chosen_by_config_and_a_bad_choice_is_a_config_error():
    from grokwatch.collector.config import ConfigError, load_config
    from grokwatch.collector.phases import distance_signal

    point = dict(distance=6.0, distance_normalized=0.5, cross_distance=8.0)
    assert distance_signal(point, "normalized") == 0.5
    assert distance_signal(point, "raw") == 6.0
    assert distance_signal(point, "vs_cross") == 0.75
    assert distance_signal(dict(point, cross_distance=None), "vs_cross") is None  # no baseline yet
    assert load_config(environ={"GROKWATCH_PHASE_DISTANCE": "vs_cross"}).phase_distance == "vs_cross"
    assert load_config(environ={"GROKWATCH_PHASE_DISTANCE": "auto"}).phase_distance == "auto"
    with pytest.raises(ConfigError, match="phase_distance"):
        load_config(environ={"GROKWATCH_PHASE_DISTANCE": "cosine"})


def test_the_shipped_defaults_are_the_trackers_defaults():
    from grokwatch.collector.config import CollectorConfig

    assert CollectorConfig().phase_config() == PhaseConfig()
    assert CollectorConfig().phase_distance == "auto"


def test_bad_phase_tolerances_are_config_errors_and_inf_reads_from_toml(tmp_path):
    from grokwatch.collector.config import ConfigError, load_config

    for value in ("-0.1", "nan"):
        with pytest.raises(ConfigError, match="phase_distance_rel_tol"):
            load_config(environ={"GROKWATCH_PHASE_DISTANCE_REL_TOL": value})
    path = tmp_path / "c.toml"
    path.write_text("phase_consistency_abs_tol = 0.02\nphase_loss_rel_tol = inf\n")
    cfg = load_config(str(path), environ={})
    assert cfg.phase_consistency_abs_tol == 0.02 and cfg.phase_loss_rel_tol == float("inf")


def _points(steps, within, cross):
    """Journal-like points of one group: flat loss (memorized), distances from two functions of the step."""
    for s in steps:
        d, c = within(s), cross(s)
        yield s, dict(loss=0.01, distance=10 * d, distance_normalized=d, cross_distance=None if c is None else 10 * c,
                      cross_distance_normalized=c, consistency=0.3)


def _fall(s, start=1000, end=1800, top=0.6, bottom=0.3):
    return top - (top - bottom) * min(1.0, max(0.0, (s - start) / (end - start)))


def test_auto_ignores_a_global_routing_change_that_moves_the_cross_group_baseline_too():
    steps = range(0, 3001, 25)
    for kind, onset in (("auto", None), ("normalized", True)):
        tracker = PhaseTracker(PhaseConfig(), kind)
        for s, point in _points(steps, _fall, _fall):  # within and cross fall together: entropy, not a group
            tracker.observe(s, point)
        assert (tracker.onset_step is None) == (onset is None), kind
    tracker = PhaseTracker(PhaseConfig(), "auto")
    for s, point in _points(steps, _fall, lambda s: 0.6):  # this group leaves the baseline: it structures
        tracker.observe(s, point)
    assert tracker.signal == "normalized_vs_cross"
    assert 1000 <= tracker.onset_step <= 1000 + 12 * 25


def test_auto_watches_the_normalized_distance_until_a_baseline_appears_then_restarts_its_window():
    tracker = PhaseTracker(PhaseConfig(), "auto")
    steps = range(0, 3001, 25)
    for s, point in _points(steps, _fall, lambda s: None if s < 2000 else 0.6):  # one group until 2,000
        tracker.observe(s, point)
        if s < 2000:
            assert tracker.signal == "normalized"
        if s == 2025:  # the ratio's window started afresh at 2,000 (its first point is closed now)
            assert [p["step"] for p in tracker.points] == [2000]
    # Single group: the fall itself is the evidence (no baseline to discount a global change).
    assert tracker.onset_step is not None and 1000 <= tracker.onset_step <= 1300
    assert tracker.signal == "normalized_vs_cross"
    with pytest.raises(ValueError, match="cosine"):
        PhaseTracker(PhaseConfig(), "cosine")
