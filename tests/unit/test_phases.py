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
    assert 400 <= tracker.memorized_step <= 400 + 8 * 25
    assert 1200 <= tracker.onset_step <= 1200 + 8 * 25


def test_no_structuring_means_no_onset():
    tracker = PhaseTracker(PhaseConfig())
    for step, loss, _ in trajectory(range(0, 3001, 25)):
        tracker.add(step, loss, 0.6, 0.3)
    assert tracker.phase == "memorized" and tracker.onset_step is None


def test_rising_consistency_alone_is_structuring():
    tracker = PhaseTracker(PhaseConfig())
    for step in range(0, 3001, 25):
        tracker.add(step, 0.01, 0.5, 0.2 + 0.5 * min(1, max(0, (step - 1000) / 800)))
    assert tracker.onset_step is not None and 1000 <= tracker.onset_step <= 1250


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
    with pytest.raises(ConfigError, match="phase_distance"):
        load_config(environ={"GROKWATCH_PHASE_DISTANCE": "cosine"})
