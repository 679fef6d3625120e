"""Print a ground-truth run's Table 1 (as markdown) from a collector's state directory.

    python research/groundtruth_summary.py out/demo/state [--source probe] [--metrics distance distance_vs_cross ...]

Per group: the step training accuracy first reached 99 %, the step held-out
accuracy first exceeded 50 %, the phase detector's memorized and onset steps,
then the correlations of each metric with held-out accuracy after memorization,
beside its correlation with routing entropy and the step, and the partial
correlation controlling for entropy (the same numbers as `grokwatch report`).
"""

from __future__ import annotations

import argparse
import math
import sys

from grokwatch.collector.analysis import METRICS, correlation_table, first_crossing, load, memorized_step
from grokwatch.collector.persist import read_journal


def fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir")
    parser.add_argument("--source", default="probe")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS))
    args = parser.parse_args()
    series, evals = load(read_journal(args.state_dir))
    print("| group | memorized (train ≥ 99 %) | held-out > 50 % "
          "| phase changes in the journal: memorized / generalizing |")
    print("|---|---|---|---|")
    groups = sorted((k, gs) for k, gs in series.items() if k[1] == args.source and not k[2].startswith(("_", "mem@")))
    for (run, _, group), gs in groups:
        ev = evals.get((run, group))
        memo = memorized_step(None, ev)
        det_memo = next((s for s, p in gs.phases if p != "memorizing"), None)
        onset = next((s for s, p in gs.phases if p == "generalizing"), None)
        cross = first_crossing(ev) if ev is not None else None
        print(f"| {group} | {memo} | {cross} | {det_memo} / {onset} |")
    print()
    print("| group | metric | n | Pearson (acc) | Spearman (acc) | r with entropy | r with step "
          "| partial r (acc ∣ entropy) |")
    print("|---|---|---|---|---|---|---|---|")
    for (run, _, group), gs in groups:
        ev = evals.get((run, group))
        if ev is None:
            continue
        table = correlation_table(gs, ev, memorized_step(gs, ev))
        for key in args.metrics:
            r = table[key]
            print(f"| {group} | {key} | {r['n']} | {fmt(r['pearson'])} | {fmt(r['spearman'])} | {fmt(r['vs_entropy'])} "
                  f"| {fmt(r['vs_step'])} | {fmt(r['partial_entropy'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
