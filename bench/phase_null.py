"""False-onset rate of the METRICS.md §5 phase detector on null series (nothing generalizes).

    python bench/phase_null.py [--series 1000] [--points 240 600] [--alpha 0.001]

Each null series is one memorized group (its loss falls to 0.01 in the first few hundred steps,
so ``memorized`` is reachable) whose watched distance has no trend: stationary noise around 0.5
(relative sd 5 %), white or AR(1) with lag-1 correlation rho (a window of samples makes
consecutive points alike), one point every 25 steps (the demo's probe cadence). The "global
drift" rows move the within-group and the cross-group distance alike (a 40 % fall over the middle
third, each with its own AR(1) noise) and the detector watches their ratio (phase_distance
"auto"), as in a tagged run. A series with any onset is a false onset. Prints one row per setting
and the largest rate; docs/collector.md ("Phases") keeps the table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace

import numpy as np

from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.phases import PhaseConfig, PhaseTracker

STEP = 25


def ar1(rng, n: int, rho: float) -> np.ndarray:
    e = rng.normal(size=n)
    out = np.empty(n)
    out[0] = e[0]
    scale = math.sqrt(1 - rho * rho)
    for i in range(1, n):
        out[i] = rho * out[i - 1] + scale * e[i]
    return out


def null_series(rng, n: int, rho: float, drift: bool, sd: float = 0.05):
    steps = np.arange(n) * STEP
    loss = 4.0 * np.exp(-steps / 100.0) + 0.01
    if not drift:
        d = 0.5 * (1 + sd * ar1(rng, n, rho))
        return [(int(s), dict(loss=float(l), distance_normalized=float(v))) for s, l, v in zip(steps, loss, d)]
    level = 0.5 * (1 - 0.4 * np.clip((steps - steps[-1] / 3) / (steps[-1] / 3), 0, 1))
    within = level * (1 + sd * ar1(rng, n, rho))
    cross = level * (1 + sd * ar1(rng, n, rho))
    return [(int(s), dict(loss=float(l), distance_normalized=float(w), cross_distance_normalized=float(c)))
            for s, l, w, c in zip(steps, loss, within, cross)]


def false_onset_rate(cfg, n_series: int, n_points: int, rho: float, drift: bool, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    onsets, memorized = 0, 0
    for _ in range(n_series):
        tracker = PhaseTracker(cfg, "auto")
        for step, point in null_series(rng, n_points, rho, drift):
            tracker.observe(step, point)
        tracker.observe(10**12, {})  # close the last point
        onsets += tracker.onset_step is not None
        memorized += tracker.memorized_step is not None
    return onsets / n_series, memorized / n_series


def power(cfg, n_series: int, rho: float, sd: float, seed: int, fall: float = 0.4,
          group_specific: bool = False) -> tuple[float, float]:
    """Share of series whose onset is found, and the median delay after the fall starts: a memorized group
    whose distance falls by ``fall`` over 1,000 steps from step 2,000 (240 points, one per 25 steps).
    ``group_specific``: the group's within distance falls while a cross-group baseline with its own noise
    stays flat, and the detector watches their ratio (phase_distance "auto", a tagged run)."""
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(n_series):
        steps = np.arange(240) * STEP
        loss = 4.0 * np.exp(-steps / 100.0) + 0.01
        d = 0.5 * (1 - fall * np.clip((steps - 2000) / 1000, 0, 1)) * (1 + sd * ar1(rng, 240, rho))
        cross = 0.5 * (1 + sd * ar1(rng, 240, rho)) if group_specific else None
        tracker = PhaseTracker(cfg, "auto")
        for i, (s, l, v) in enumerate(zip(steps, loss, d)):
            point = dict(loss=float(l), distance_normalized=float(v))
            if cross is not None:
                point["cross_distance_normalized"] = float(cross[i])
            tracker.observe(int(s), point)
        tracker.observe(10**12, {})
        if tracker.onset_step is not None:
            found.append(tracker.onset_step - 2000)
    return len(found) / n_series, float(np.median(found)) if found else math.nan


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--points", type=int, nargs="+", default=[240, 600])
    parser.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9])
    parser.add_argument("--alpha", type=float, default=None, help="override phase_alpha")
    parser.add_argument("--power", action="store_true", help="measure the power on a real fall instead")
    parser.add_argument("--falls", type=float, nargs="+", default=None,
                        help="with --power: group-specific falls (e.g. 0.01 0.02 0.03 0.05 0.1) watched against a "
                             "flat cross-group baseline: the power curve (docs/collector.md)")
    parser.add_argument("--sd", type=float, nargs="+", default=[0.01, 0.03], help="with --power: noise sd")
    args = parser.parse_args(argv)
    cfg = PhaseConfig.of(CollectorConfig())
    if args.alpha is not None:
        cfg = replace(cfg, alpha=args.alpha)
    if args.power and args.falls:
        print(f"# {args.series} series per row: a group-specific fall over 1,000 steps (the within distance falls, "
              f"the cross-group baseline stays flat, each with its own noise; the ratio watched); detector {cfg}")
        print("| fall | noise sd | lag-1 rho | onsets found | median delay (steps) |")
        print("|---|---|---|---|---|")
        for fall in args.falls:
            for sd in args.sd:
                for rho in args.rho:
                    share, delay = power(cfg, args.series, rho, sd, seed=int(1e4 * fall + 1000 * sd + 10 * rho),
                                         fall=fall, group_specific=True)
                    print(f"| {fall:.0%} | {sd:.0%} | {rho} | {share:.0%} | {delay:.0f} |", flush=True)
        return 0
    if args.power:
        print(f"# {args.series} series per row: a 40 % fall over 1,000 steps; detector {cfg}")
        print("| noise sd | lag-1 rho | onsets found | median delay (steps) |")
        print("|---|---|---|---|")
        for sd in args.sd:
            for rho in args.rho:
                share, delay = power(cfg, args.series, rho, sd, seed=int(1000 * sd + 10 * rho))
                print(f"| {sd:.0%} | {rho} | {share:.0%} | {delay:.0f} |", flush=True)
        return 0
    print(f"# {args.series} null series per row; detector {cfg}")
    print("| null | points | lag-1 rho | false onsets | memorized (reachable) |")
    print("|---|---|---|---|---|")
    worst, started = 0.0, time.perf_counter()
    for drift in (False, True):
        for n in args.points:
            for rho in args.rho:
                rate, mem = false_onset_rate(cfg, args.series, n, rho, drift, seed=hash((drift, n, rho)) % 2**32)
                worst = max(worst, rate)
                name = "global drift (ratio)" if drift else "stationary"
                print(f"| {name} | {n} | {rho} | {rate:.2%} ({round(rate * args.series)}/{args.series}) | {mem:.0%} |",
                      flush=True)
    print(f"# largest false-onset rate {worst:.2%} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
