"""METRICS.md §5 phase detector: synthetic trajectories with known phases, and the negative controls
every detector change must pass (no loss evidence, a loss that is flat but not low, stationary noise,
a global drift that moves the group and the baseline alike)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from grokwatch.collector.phases import (
    PhaseConfig,
    PhaseTracker,
    ar1_variance_factor,
    lag1_autocorrelation,
    mann_kendall,
    theil_sen_slope,
)

STEPS = range(0, 3001, 25)


def ar1(rng, n, rho):
    e = rng.normal(size=n)
    out = np.empty(n)
    out[0] = e[0]
    for i in range(1, n):
        out[i] = rho * out[i - 1] + math.sqrt(1 - rho * rho) * e[i]
    return out


def memorizing_loss(s, memorize_at=400):
    return 4.0 * max(0.0, 1 - s / memorize_at) + 0.01


def falling(s, start=1200, end=1800, top=0.6, bottom=0.2):
    return top - (top - bottom) * min(1.0, max(0.0, (s - start) / (end - start)))


def run(tracker, steps, loss, distance, consistency=None):
    """Feed one group's points; returns the phase seen after each."""
    seen = []
    for i, s in enumerate(steps):
        tracker.add(s, loss(s) if loss else None, distance(i, s), consistency(s) if consistency else None)
        seen.append(tracker.phase)
    tracker.add(10**9, None, None, None)  # close the last point
    return seen


def changes(seen):
    return [p for i, p in enumerate(seen) if i == 0 or seen[i - 1] != p]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detector_walks_through_the_phases_at_the_right_steps(seed):
    noise = 0.01 * np.random.default_rng(seed).normal(size=len(STEPS))
    tracker = PhaseTracker(PhaseConfig())
    seen = run(tracker, STEPS, memorizing_loss, lambda i, s: falling(s) * (1 + noise[i]))
    assert changes(seen) == ["unknown", "memorizing", "memorized", "generalizing", "stable"]
    assert 400 <= tracker.memorized_step <= 400 + 12 * 25  # within one window of the truth
    assert 1200 <= tracker.onset_step <= 1200 + 12 * 25
    ev = tracker.evidence["generalizing"]
    assert ev["step"] == tracker.onset_step and ev["p_fall"] <= PhaseConfig().alpha
    assert ev["distance_slope_low"] <= ev["distance_slope"] <= ev["distance_slope_high"]
    assert ev["distance_slope"] < 0 and ev["distance_change"] <= -PhaseConfig().distance_rel_tol
    assert ev["loss"] <= ev["epsilon"]
    assert tracker.evidence["memorized"]["step"] == tracker.memorized_step


def test_a_noise_free_fall_is_found_too():
    tracker = PhaseTracker(PhaseConfig())
    run(tracker, STEPS, memorizing_loss, lambda i, s: falling(s))
    assert tracker.onset_step is not None and 1200 <= tracker.onset_step <= 1500


# ----------------------------------------------------------------- negative controls


def test_without_loss_evidence_the_phase_is_unknown_and_nothing_is_dated():
    """Random-token training with no probe and no loss given: the distance may fall, nothing is claimed
    (the old detector took a missing loss as flat and dated memorized after one window)."""
    tracker = PhaseTracker(PhaseConfig())
    seen = run(tracker, STEPS, None, lambda i, s: falling(s))
    assert set(seen) == {"unknown"}
    assert tracker.memorized_step is None and tracker.onset_step is None and not tracker.evidence


def test_a_flat_loss_that_never_got_low_is_not_memorized():
    """Random tokens with the probe: the loss stays near log V. Flat alone is not memorized."""
    tracker = PhaseTracker(PhaseConfig())
    seen = run(tracker, STEPS, lambda s: 5.5 - 0.1 * min(s, 300) / 300, lambda i, s: falling(s))
    assert set(seen) == {"unknown", "memorizing"}
    assert tracker.memorized_step is None and tracker.onset_step is None


def test_a_configured_epsilon_decides_what_low_is():
    flat_at_one = lambda s: 4.0 * max(0.0, 1 - s / 400) + 1.0  # noqa: E731 - falls to 1.0 nats, 25 % of start
    for epsilon, memorized in ((None, False), (1.2, True), (0.9, False)):
        tracker = PhaseTracker(PhaseConfig(), epsilon=epsilon)
        run(tracker, STEPS, flat_at_one, lambda i, s: 0.5)
        assert (tracker.memorized_step is not None) == memorized, epsilon


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.8])
def test_stationary_noise_gives_no_onset(rho):
    """A memorized group whose distance only wanders (5 % noise, autocorrelated as a window of samples
    makes it): 40 series, no onset (the old fixed 3 % fall fired on most)."""
    rng = np.random.default_rng(int(rho * 10))
    onsets = 0
    for _ in range(40):
        noise = ar1(rng, len(STEPS), rho)
        tracker = PhaseTracker(PhaseConfig())
        run(tracker, STEPS, memorizing_loss, lambda i, s: 0.5 * (1 + 0.05 * noise[i]))
        assert tracker.memorized_step is not None  # the claim was reachable
        onsets += tracker.onset_step is not None
    assert onsets == 0


def _points(steps, within, cross, loss=memorizing_loss):
    """Journal-like points of one group: distances from two functions of (index, step)."""
    for i, s in enumerate(steps):
        d, c = within(i, s), cross(i, s)
        yield s, dict(loss=loss(s), distance=10 * d, distance_normalized=d,
                      cross_distance=None if c is None else 10 * c, cross_distance_normalized=c, consistency=0.3)


def test_a_global_drift_that_moves_the_baseline_alike_gives_no_onset():
    """Routing entropy changes for every group: the within-group and cross-group distances fall
    together (each with its own noise). Watching the ratio ("auto" with a baseline), no onset; the
    normalized distance alone would call it generalizing."""
    rng = np.random.default_rng(7)
    onsets = dict(auto=0, normalized=0)
    for _ in range(20):
        a, b = ar1(rng, len(STEPS), 0.5), ar1(rng, len(STEPS), 0.5)
        for kind in onsets:
            tracker = PhaseTracker(PhaseConfig(), kind)
            for s, point in _points(STEPS, lambda i, s: falling(s) * (1 + 0.02 * a[i]),
                                    lambda i, s: falling(s) * (1 + 0.02 * b[i])):
                tracker.observe(s, point)
            tracker.observe(10**9, {})
            onsets[kind] += tracker.onset_step is not None
    assert onsets["auto"] == 0
    assert onsets["normalized"] >= 5  # the drift itself is real (and found); only the baseline says it is global


def test_a_group_that_leaves_the_baseline_is_generalizing_and_the_evidence_says_so():
    rng = np.random.default_rng(3)
    noise = ar1(rng, len(STEPS), 0.3)
    tracker = PhaseTracker(PhaseConfig(), "auto")
    for s, point in _points(STEPS, lambda i, s: falling(s) * (1 + 0.01 * noise[i]), lambda i, s: 0.6):
        tracker.observe(s, point)
    assert tracker.signal == "normalized_vs_cross"
    assert 1200 <= tracker.onset_step <= 1200 + 12 * 25
    ev = tracker.evidence["generalizing"]
    assert ev["signal"] == "normalized_vs_cross" and ev["baseline_change"] == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------- the statistics


def test_mann_kendall_matches_its_textbook_values():
    x = np.arange(10.0)
    y = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10.0])
    t = mann_kendall(x, -y, 0.01)
    # S = -45, Var = 10*9*25/18 = 125, z = (S + 1) / sqrt(Var)
    assert t.z == pytest.approx(-44 / math.sqrt(125))
    assert t.slope == pytest.approx(-1.0) and t.slope_low <= -1.0 <= t.slope_high
    assert t.p_fall < 1e-4 and t.p_rise > 0.999
    flat = mann_kendall(x, np.ones(10), 0.01)
    assert flat.z == 0 and flat.p_fall == 0.5


def test_autocorrelation_widens_the_test_and_is_estimated_from_differences():
    assert ar1_variance_factor(12, 0.0) == 1.0
    assert 1.0 < ar1_variance_factor(12, 0.5) < ar1_variance_factor(12, 0.8)
    rng = np.random.default_rng(0)
    white, corr = rng.normal(size=400), ar1(rng, 400, 0.8)
    assert lag1_autocorrelation(white) < 0.2
    assert 0.65 < lag1_autocorrelation(corr) < 0.95
    ramp = np.concatenate([np.zeros(50), -0.02 * np.arange(50.0)]) + 0.01 * rng.normal(size=100)
    assert lag1_autocorrelation(ramp) < 0.3  # a trend's kink is not correlated noise
    assert lag1_autocorrelation(np.ones(100)) == 0.0  # no noise at all


def test_theil_sen_ignores_an_outlier():
    x = np.arange(10.0)
    y = 2 * x
    y[3] = 100
    assert theil_sen_slope(x, y) == pytest.approx(2.0)


# ----------------------------------------------------------------- plumbing


@pytest.mark.parametrize("tol, onset", [(0.02, True), (float("inf"), False)])
def test_rising_consistency_is_structuring_unless_it_is_ignored(tol, onset):
    tracker = PhaseTracker(PhaseConfig(consistency_abs_tol=tol))
    run(tracker, STEPS, memorizing_loss, lambda i, s: 0.5,
        consistency=lambda s: 0.2 + 0.5 * min(1, max(0, (s - 1000) / 800)))
    if onset:
        assert tracker.onset_step is not None and 1000 <= tracker.onset_step <= 1400
    else:  # the shipped default: consistency only added false onsets on the ground-truth runs
        assert tracker.onset_step is None and tracker.phase == "memorized"


def test_points_and_losses_of_one_step_are_merged():
    tracker = PhaseTracker(PhaseConfig(window=3))
    tracker.add(10, 1.0, 0.5, None)
    tracker.add(10, 3.0, 0.7, None)
    tracker.add_loss(10, 2.0)  # a third loss point of step 10 (another rank's)
    tracker.add(20, 1.0, 0.5, None)
    assert tracker.points[0]["distance"] == pytest.approx(0.6)
    assert list(tracker.losses[0]) == [10, pytest.approx(2.0), 3]


def test_a_training_loss_given_apart_from_the_points_is_the_same_evidence():
    """The train source's loss comes in Loss messages, not with the points."""
    noise = 0.01 * np.random.default_rng(0).normal(size=len(STEPS))
    tracker = PhaseTracker(PhaseConfig())
    for i, s in enumerate(STEPS):
        tracker.add(s, None, falling(s) * (1 + noise[i]), None)
        tracker.add_loss(s, memorizing_loss(s))
    assert 400 <= tracker.memorized_step <= 700 and 1200 <= tracker.onset_step <= 1500


def test_a_tracker_from_an_older_snapshot_restores_without_evidence():
    tracker = PhaseTracker(PhaseConfig())
    run(tracker, range(0, 500, 25), memorizing_loss, lambda i, s: 0.5)
    state = dict(tracker.__dict__)
    for name in ("losses", "loss_reference", "_first_losses", "evidence", "epsilon", "history", "last"):
        state.pop(name)
    old = PhaseTracker.__new__(PhaseTracker)
    old.__setstate__(state)
    clone = pickle.loads(pickle.dumps(old))
    assert clone.evidence == {} and not clone.has_loss_evidence
    clone.add(1000, 0.01, 0.5, None)  # and it goes on


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
    with pytest.raises(ValueError, match="cosine"):
        PhaseTracker(PhaseConfig(), "cosine")


def test_the_shipped_defaults_are_the_trackers_defaults():
    from grokwatch.collector.config import CollectorConfig

    assert PhaseConfig.of(CollectorConfig()) == PhaseConfig()
    assert CollectorConfig().phase_distance == "auto"


def test_bad_phase_settings_are_config_errors_and_inf_reads_from_toml(tmp_path):
    from grokwatch.collector.config import ConfigError, load_config

    for value in ("-0.1", "nan"):
        with pytest.raises(ConfigError, match="phase_distance_rel_tol"):
            load_config(environ={"GROKWATCH_PHASE_DISTANCE_REL_TOL": value})
    for value in ("0", "0.5", "nan"):
        with pytest.raises(ConfigError, match="phase_alpha"):
            load_config(environ={"GROKWATCH_PHASE_ALPHA": value})
    with pytest.raises(ConfigError, match="phase_loss_low_ratio"):
        load_config(environ={"GROKWATCH_PHASE_LOSS_LOW_RATIO": "1.5"})
    path = tmp_path / "c.toml"
    path.write_text("phase_consistency_abs_tol = 0.02\nphase_loss_rel_tol = inf\n")
    cfg = load_config(str(path), environ={})
    assert cfg.phase_consistency_abs_tol == 0.02 and cfg.phase_loss_rel_tol == float("inf")


def test_auto_watches_the_normalized_distance_until_a_baseline_appears_then_restarts_its_window():
    tracker = PhaseTracker(PhaseConfig(), "auto")
    for s, point in _points(STEPS, lambda i, s: falling(s, 1000, 1800, 0.6, 0.3),
                            lambda i, s: None if s < 2000 else 0.6):  # one group until 2,000
        tracker.observe(s, point)
        if s < 2000:
            assert tracker.signal == "normalized"
        if s == 2025:  # the ratio's window started afresh at 2,000 (its first point is closed now)
            assert [p["step"] for p in tracker.points] == [2000]
    # Single group: the fall itself is the evidence (no baseline to discount a global change).
    assert tracker.onset_step is not None and 1000 <= tracker.onset_step <= 1300
    assert tracker.signal == "normalized_vs_cross"


@pytest.mark.parametrize("seed", [0, 1])
def test_ranks_sending_a_step_out_of_order_give_the_phases_of_the_steps_in_order(seed):
    """Eight ranks each send every step; their messages interleave over the last few steps. Before, a late
    step was taken for a rewind and the series started over (the window never filled: no phase past
    memorizing). Now the late points merge into their step, as if they had come in order."""
    rng = np.random.default_rng(seed)
    noise = 0.01 * rng.normal(size=len(STEPS))
    events = [(s + rng.uniform(0, 3) * 25, i, s) for i, s in enumerate(STEPS) for _ in range(8)]
    shuffled = PhaseTracker(PhaseConfig())
    for _, i, s in sorted(events):
        shuffled.add(s, memorizing_loss(s), falling(s) * (1 + noise[i]), None)
    shuffled.add(10**9, None, None, None)
    ordered = PhaseTracker(PhaseConfig())
    run(ordered, STEPS, memorizing_loss, lambda i, s: falling(s) * (1 + noise[i]))
    assert shuffled.phase == ordered.phase == "stable"
    assert abs(shuffled.memorized_step - ordered.memorized_step) <= 2 * 25
    assert abs(shuffled.onset_step - ordered.onset_step) <= 2 * 25
    assert [p["step"] for p in shuffled.points] == sorted(p["step"] for p in shuffled.points)


def test_a_rewind_past_the_late_steps_starts_the_series_over():
    tracker = PhaseTracker(PhaseConfig(window=3))
    for s in range(100, 400, 10):
        tracker.add(s, 1.0, 0.5, None)
    tracker.add(380, 1.0, 0.9, None)  # late: merged into step 380
    assert tracker.points[-1]["step"] == 380 and tracker.points[-1]["n"] == 2
    tracker.add(120, 1.0, 0.5, None)  # resumed from a checkpoint at step 120
    tracker.add(130, 1.0, 0.5, None)
    assert [p["step"] for p in tracker.points] == [120]
    assert [entry[0] for entry in tracker.losses] == [120, 130]


@pytest.mark.parametrize("rho", [0.0, 0.8])
def test_ranks_out_of_order_on_stationary_noise_give_no_onset(rho):
    """The negative control of the merge above: eight ranks interleaving their steps over a distance that
    only wanders. The merged series must not look like a fall: no onset, while memorized stays reachable."""
    rng = np.random.default_rng(100 + int(rho * 10))
    onsets = 0
    for _ in range(20):
        noise = ar1(rng, len(STEPS), rho)
        events = [(s + rng.uniform(0, 3) * 25, i, s) for i, s in enumerate(STEPS) for _ in range(8)]
        tracker = PhaseTracker(PhaseConfig())
        for _, i, s in sorted(events):
            tracker.add(s, memorizing_loss(s), 0.5 * (1 + 0.05 * noise[i] + 0.01 * rng.normal()), None)
        tracker.add(10**9, None, None, None)
        assert tracker.memorized_step is not None
        onsets += tracker.onset_step is not None
    assert onsets == 0


def _k_answer_loss(right_per_sample: float, k: int = 8, wrong_loss: float = 1.5, right_loss: float = 0.01):
    """A sample's loss as the probe measures it: the mean over its k answers' NLL (wrong answers at
    ``wrong_loss``: p = 0.22 < 1/2, so argmax is wrong)."""
    return lambda s: (4.08 * max(0.0, 1 - s / 400) + (right_per_sample * right_loss
                                                    + (k - right_per_sample) * wrong_loss) / k)


def test_a_loss_averaged_over_8_answers_with_a_fifth_wrong_is_not_memorized():
    """The k-equation negative control (issue 27): 6.5 of 8 answers right averages to 0.31 nats, under a
    tenth of the first level (0.41) — the old threshold called it memorized. The Markov bound (mean ≤
    0.2·ln 2) does not; every answer right does."""
    for right, memorized in ((6.5, False), (6.0, False), (8.0, True)):
        tracker = PhaseTracker(PhaseConfig())
        run(tracker, STEPS, _k_answer_loss(right), lambda i, s: 0.5)
        assert (tracker.memorized_step is not None) == memorized, right
    old = PhaseTracker(PhaseConfig(loss_max_wrong=1.0))  # without the bound: the old rule fires
    run(old, STEPS, _k_answer_loss(6.5), lambda i, s: 0.5)
    assert old.memorized_step is not None
