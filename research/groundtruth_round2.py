"""Ground truth round 2 (issue 17): the analysis docs/groundtruth.md fixed before the runs.

    python research/groundtruth_round2.py docs/groundtruth/v3-*-journal.jsonl.gz [--source probe]

Per journal (a collector state directory or a compressed journal) and group, on one source's points
after the group's training accuracy first reaches 99 %:

1. Table 1 with the confounders: each metric's Spearman and Pearson with the group's held-out accuracy,
   its Pearson with routing entropy and with the step, and the partial correlation with held-out
   accuracy controlling for entropy (collector/analysis.py, the report's numbers).
2. Specificity: the metric's |Spearman| with its own group's held-out accuracy beside the largest
   |Spearman| with another arithmetic group's held-out accuracy over the same evaluation steps.
3. The shipped phase detector replayed (research/rescore_phases.py): found within 10 % of the run,
   missed, or a false onset in a group that never crosses 50 % (``rand`` never can).
4. The verdict rule per configuration (journals named ``<config>-seed<N>``): a metric shows the signal
   when in at least 2 of 3 seeds a generalizing group has |Spearman| >= 0.9, a partial correlation
   beyond entropy of |r| >= 0.3 with the same sign, own - other >= 0.1, and the detector dates no
   onset in ``rand``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rescore_phases import _records, replay, verdict  # noqa: E402

from grokwatch.collector.analysis import (  # noqa: E402
    METRICS,
    aligned,
    correlation_table,
    first_crossing,
    load,
    memorized_step,
    spearman,
)

RANDOM_GROUP = "rand"
STRONG, PARTIAL, MARGIN = 0.9, 0.3, 0.1
ANALYSED = tuple(m for m in METRICS if m not in ("adjacent_cosine", "loss"))


def fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"


def journal_name(path: str) -> str:
    if path.endswith(".gz"):
        return os.path.basename(path).removesuffix("-journal.jsonl.gz")
    return os.path.basename(os.path.dirname(os.path.abspath(path)))


def specificity(series, evals, run: str, group: str, metric: str, since) -> tuple[float, float]:
    """(|Spearman| with the group's own held-out accuracy, the largest with another arithmetic group's)."""
    own_ev = evals[(run, group)]
    keep = own_ev.steps >= (since if since is not None else -math.inf)
    steps = own_ev.steps[keep]
    x = aligned(series, steps, metric)

    def rho(ev):
        y = np.interp(steps, ev.steps, ev.heldout)
        ok = ~np.isnan(x) & ~np.isnan(y)
        return abs(spearman(x[ok], y[ok])) if ok.sum() >= 3 else math.nan

    others = [rho(ev) for (r, g), ev in evals.items() if r == run and g not in (group, RANDOM_GROUP)]
    others = [v for v in others if not math.isnan(v)]
    return rho(own_ev), (max(others) if others else math.nan)


def analyse(path: str, source: str) -> dict:
    records = list(_records(path))
    series, evals = load(records)
    length = max(float(ev.steps[-1]) for ev in evals.values())
    detector = replay(records, source)
    out = {}
    for (run, src, group), gs in sorted(series.items()):
        if src != source or group.startswith(("_", "mem@")) or (run, group) not in evals:
            continue
        ev = evals[(run, group)]
        since = memorized_step(gs, ev)
        table = correlation_table(gs, ev, since)
        cross = first_crossing(ev)
        tracker = detector.get(group, (None, None))[1]
        onset = tracker.onset_step if tracker is not None else None
        rows = {}
        for metric in ANALYSED:
            own, other = specificity(gs, evals, run, group, metric, since)
            rows[metric] = dict(table[metric], own=own, other=other)
        out[group] = dict(memorized=since, crossing=cross, onset=onset,
                          detector=verdict(onset, cross, length), rows=rows,
                          entropy=float(np.nanmean(gs.values["entropy"])) if "entropy" in gs.values else math.nan)
    return out


def strong(row) -> bool:
    rho, part = row["spearman"], row["partial_entropy"]
    if any(math.isnan(v) for v in (rho, part)):
        return False
    return (abs(rho) >= STRONG and abs(part) >= PARTIAL and np.sign(rho) == np.sign(part)
            and not math.isnan(row["own"]) and (math.isnan(row["other"]) or row["own"] - row["other"] >= MARGIN))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("journals", nargs="+")
    parser.add_argument("--source", default="probe")
    args = parser.parse_args(argv)
    results = {journal_name(p): analyse(p, args.source) for p in args.journals}

    print("### Table 1 with confounders and specificity (source: %s)\n" % args.source)
    print("| run | group | memorized | held-out > 50 % | metric | Spearman | Pearson | vs entropy | vs step "
          "| partial (entropy) | own | other | strong |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    step = lambda s: "–" if s is None else f"{s:,.0f}"  # noqa: E731
    for name, groups in results.items():
        for group, g in groups.items():
            for metric, row in g["rows"].items():
                print(f"| {name} | {group} | {step(g['memorized'])} | {step(g['crossing'])} | {metric} "
                      f"| {fmt(row['spearman'])} | {fmt(row['pearson'])} | {fmt(row['vs_entropy'])} "
                      f"| {fmt(row['vs_step'])} | {fmt(row['partial_entropy'])} | {fmt(row['own'])} "
                      f"| {fmt(row['other'])} | {'yes' if strong(row) and g['crossing'] is not None else ''} |")

    print("\n### Phase detector (shipped defaults, replayed)\n")
    print("| run | group | mean entropy | held-out > 50 % | onset | verdict |")
    print("|---|---|---|---|---|---|")
    totals = defaultdict(int)
    for name, groups in results.items():
        for group, g in groups.items():
            print(f"| {name} | {group} | {g['entropy']:.2f} | {step(g['crossing'])} | {step(g['onset'])} "
                  f"| {g['detector']} |")
            totals[g["detector"]] += 1
            totals["crossings" if g["crossing"] is not None else "never"] += 1
    print(f"\nCrossings within 10 %: {totals['within 10 %']} / {totals['crossings']}; missed "
          f"{totals['missed']}; false onsets {totals['false']} / {totals['never']} never-crossing groups.")

    print("\n### Verdict per configuration\n")
    configs = defaultdict(dict)
    for name, groups in results.items():
        m = re.match(r"(.*)-seed(\d+)$", name)
        configs[m.group(1) if m else name][m.group(2) if m else "0"] = groups
    for config, seeds in sorted(configs.items()):
        for metric in ANALYSED:
            hits = [s for s, groups in seeds.items()
                    if any(g["crossing"] is not None and strong(g["rows"][metric]) for grp, g in groups.items()
                           if grp != RANDOM_GROUP)
                    and groups.get(RANDOM_GROUP, {}).get("onset") is None]
            print(f"- {config}, {metric}: strong and specific in {len(hits)} of {len(seeds)} seeds"
                  f"{' (' + ', '.join(sorted(hits)) + ')' if hits else ''} — "
                  f"{'SHOWN' if len(hits) >= 2 and len(seeds) >= 3 else 'not shown'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
