"""Calibrate the METRICS.md §5 phase detector on ground-truth runs (leave one run out).

    python research/calibrate_phases.py out/gt0/state out/gt1/state [--source probe]

Each state directory is a collector's journal from a run that logged held-out
accuracy (`grokwatch demo`). The journal's points are replayed, in order,
through `PhaseTracker` for every setting of a grid and every distance signal
(`phase_distance`). For a group whose held-out accuracy crosses 50 %, the error
is |detected onset − crossing step| ÷ the run's length (missing onset: 1); a
group that never crosses scores 1 if an onset is detected. Per signal
(`--signals`, "auto" included): for each run, the setting chosen on all the
other runs (smallest sum of their groups' errors; with two runs, the other
run's smallest worst error) scored on it, then the shipped defaults on all
runs, then out-of-sample totals. `--false-onset-cost C` makes an onset in a
group that never crosses cost C instead of 1 when choosing.

    python research/calibrate_phases.py RUN... --score "normalized_vs_cross window=12 patience=4"

scores given settings (a signal — one of `phase_distance`'s, "auto" included —
then PhaseConfig fields; the rest default) and the defaults on every run,
without the grid: e.g. on runs that memorize and never generalize, where any
onset is an error. The last columns count, over all runs, the crossings found
within 10 % of the run, the crossings missed and the onsets in groups that
never cross.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict

from grokwatch.collector.analysis import first_crossing, load
from grokwatch.collector.config import PHASE_DISTANCE_CHOICES, PHASE_DISTANCES, CollectorConfig
from grokwatch.collector.persist import read_journal
from grokwatch.collector.phases import PhaseConfig, PhaseTracker

GRID = dict(window=(6, 8, 12, 16), patience=(2, 3, 4), distance_rel_tol=(0.01, 0.02, 0.03, 0.05, 0.08),
            consistency_abs_tol=(0.02, 0.05, 1e9), loss_rel_tol=(0.05, 0.10, 0.20))


def read_run(state_dir: str, source: str):
    records = list(read_journal(state_dir))
    points = defaultdict(list)  # group -> journal points in order
    for r in records:
        if r.get("kind") == "point" and r["source"] == source and not r["group"].startswith(("_", "mem@")):
            points[r["group"]].append(r)
    _, evals = load(records)
    crossings, last = {}, 0
    for (run, group), ev in evals.items():
        crossings[group] = first_crossing(ev)
        last = max(last, float(ev.steps[-1]))
    return dict(name=state_dir, points=points, crossings=crossings, length=last)


def onsets(run: dict, cfg: PhaseConfig, signal: str) -> dict:
    out = {}
    for group, pts in run["points"].items():
        tracker = PhaseTracker(cfg, signal)
        for p in pts:
            tracker.observe(p["step"], p)
        tracker.add(pts[-1]["step"] + 1, None, None, None)  # close the last point
        out[group] = tracker.onset_step
    return out


def errors(run: dict, found: dict, false_onset_cost: float = 1.0) -> dict:
    errs = {}
    for group, onset in found.items():
        cross = run["crossings"].get(group)
        if cross is None:
            errs[group] = 0.0 if onset is None else false_onset_cost
        else:
            errs[group] = 1.0 if onset is None else abs(onset - cross) / run["length"]
    return errs


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dirs", nargs="+")
    parser.add_argument("--source", default="probe")
    parser.add_argument("--signals", nargs="+", default=list(PHASE_DISTANCES), choices=PHASE_DISTANCE_CHOICES,
                        help="distance signals to search (default: every fixed one)")
    parser.add_argument("--false-onset-cost", type=float, default=1.0,
                        help="error of an onset in a group that never crosses, when choosing (a miss costs 1)")
    parser.add_argument("--score", action="append", default=[], metavar="SIGNAL FIELD=VALUE ...",
                        help="score this setting on every run instead of searching the grid (repeatable)")
    args = parser.parse_args()
    runs = [read_run(d, args.source) for d in args.state_dirs]
    base = PhaseConfig.of(CollectorConfig())
    if args.score:
        return score(runs, base, args.score)
    settings = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    for run in runs:
        print(f"{run['name']}: held-out > 50 % at " + ", ".join(f"{g} {c}" for g, c in sorted(run["crossings"].items()))
              + f"; length {run['length']:.0f}")
    print()
    print("| signal | setting | chosen on | scored on | onsets (group: detected / crossing) | worst error |")
    print("|---|---|---|---|---|---|")
    totals = {}
    for signal in args.signals:
        table = {}
        for s in settings:
            cfg = PhaseConfig(**{**base.__dict__, **s})
            table[tuple(s.items())] = [errors(run, onsets(run, cfg, signal), args.false_onset_cost) for run in runs]
        # Leave one run out: choose on every other run, score on the one left out. On one run the
        # choice minimizes its worst error; on several, the sum of all their groups' errors.
        held = totals[signal] = dict(near=0, missed=0, crossing=0, spurious=0, never=0)
        for i, run in enumerate(runs):
            others = [j for j in range(len(runs)) if j != i] or [i]

            def cost(k):
                errs = [e for j in others for e in table[k][j].values()]
                return (max(errs), sum(errs)) if len(others) == 1 else (sum(errs), max(errs))

            best = min(table, key=cost)
            cfg = PhaseConfig(**{**base.__dict__, **dict(best)})
            found = onsets(run, cfg, signal)
            _count(held, run, found, table[best][i])
            detail = ", ".join(f"{g}: {found[g]} / {run['crossings'].get(g)}" for g in sorted(found))
            chosen_on = "all other runs" if len(others) > 1 else runs[others[0]]["name"]
            print(f"| {signal} | {dict(best)} | {chosen_on} | {run['name']} | {detail} "
                  f"| {max(table[best][i].values()):.2f} |")
        for run in runs:
            found = onsets(run, base, signal)
            errs = errors(run, found)
            detail = ", ".join(f"{g}: {found[g]} / {run['crossings'].get(g)}" for g in sorted(found))
            print(f"| {signal} | defaults | – | {run['name']} | {detail} | {max(errs.values()):.2f} |")
    print()
    print("Out of sample (each run scored with the setting chosen without it):")
    for signal, t in totals.items():
        print(f"  {signal}: crossings within 10 % {t['near']} / {t['crossing']}, missed {t['missed']} / "
              f"{t['crossing']}, onsets in groups that never cross {t['spurious']} / {t['never']}")
    return 0


def _count(acc: dict, run: dict, found: dict, errs: dict) -> None:
    for g, onset in found.items():
        if run["crossings"].get(g) is None:
            acc["never"] += 1
            acc["spurious"] += onset is not None
        else:
            acc["crossing"] += 1
            acc["missed"] += onset is None
            acc["near"] += onset is not None and errs[g] <= 0.10


def score(runs: list, base: PhaseConfig, specs: list[str]) -> int:
    settings = [(CollectorConfig().phase_distance, {}, "defaults")]  # base = the defaults' PhaseConfig
    for spec in specs:
        signal, *fields = spec.split()
        if signal not in PHASE_DISTANCE_CHOICES:
            print(f"--score: {signal!r} is not one of {', '.join(PHASE_DISTANCE_CHOICES)}", file=sys.stderr)
            return 2
        values = {k: float(v) if k.endswith("tol") else int(v) for k, v in (f.split("=", 1) for f in fields)}
        settings.append((signal, values, " ".join(fields)))
    print("| signal | setting | " + " | ".join(run["name"] for run in runs)
          + " | crossings within 10 % | crossings missed | spurious onsets |")
    print("|---|---|" + "---|" * (len(runs) + 3))
    for signal, values, label in settings:
        cfg = PhaseConfig(**{**base.__dict__, **values})
        cells = []
        t = dict(near=0, missed=0, crossing=0, spurious=0, never=0)
        for run in runs:
            found = onsets(run, cfg, signal)
            errs = errors(run, found)
            cells.append(", ".join(f"{g} {found[g]}" for g in sorted(found)) + f" (worst {max(errs.values()):.2f})")
            _count(t, run, found, errs)
        print(f"| {signal} | {label} | " + " | ".join(cells) + f" | {t['near']} / {t['crossing']} "
              f"| {t['missed']} / {t['crossing']} | {t['spurious']} / {t['never']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
