"""Replay saved checkpoints through collectors with different settings and
print Table-1 rows for each: which collector setting (tau, unit) makes the
pathway metrics track held-out accuracy beyond routing entropy?

    python -m grokwatch.demo.train --steps 4000 --save-every 250 --checkpoint-dir ck --log acc.jsonl
    python research/replay_sweep.py --checkpoints ck --accuracy acc.jsonl --tau 0.3 0.5 0.7 0.9

Uses the paper's offline protocol (grokwatch replay -> collector journal ->
correlate) with a fixed set of training samples per group.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import tempfile

from grokwatch.agent.replay import replay
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.report import correlate
from grokwatch.collector.service import Collector
from grokwatch.demo.train import BenchConfig, build, write_samples


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", required=True, help="directory of step-*.pt files")
    parser.add_argument("--accuracy", required=True, help="the training run's --log (JSON lines)")
    parser.add_argument("--tau", type=float, nargs="+", default=[0.7])
    parser.add_argument("--unit", default="expert", choices=["expert", "string"])
    parser.add_argument("--per-group", type=int, default=64)
    args = parser.parse_args()
    ckpts = sorted(glob.glob(os.path.join(args.checkpoints, "step-*.pt")))
    acc = {}
    with open(args.accuracy) as fh:
        for line in fh:
            r = json.loads(line)
            acc[r["step"]] = r
    work = tempfile.mkdtemp(prefix="grokwatch-sweep-")
    data, *_ = build(BenchConfig())
    samples = os.path.join(work, "samples.jsonl")
    write_samples(data, samples, args.per_group)
    groups = list(data.groups)
    scores = os.path.join(work, "scores.csv")
    with open(scores, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *groups])
        for p in ckpts:
            step = int(os.path.basename(p)[5:11])
            if step in acc:
                w.writerow([step, *(acc[step][g] for g in groups)])
    from grokwatch.agent.replay import load_samples

    sample_set = load_samples(samples)
    print(f"{'tau':>4} {'group':<6} {'metric':<20} {'n':>3} {'spearman':>9} {'r(entropy)':>10} {'partial':>8}")
    for tau in args.tau:
        state_dir = os.path.join(work, f"tau-{tau}")
        c = Collector(CollectorConfig(listen=("tcp://127.0.0.1:0",), metrics_port=0, metrics_addr="127.0.0.1",
                                      state_dir=state_dir, pathway_tau=tau, distance_unit=args.unit,
                                      comparisons_per_sample=64, window_samples=args.per_group * 2),
                      otel_exporters=[]).start()
        try:
            replay(ckpts, sample_set, c.endpoints[0], "sweep", batch_size=64)
            import time

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and c.state.samples_total < len(ckpts) * len(sample_set):
                time.sleep(0.1)
        finally:
            c.stop()
        for row in correlate(state_dir, scores, "replay"):
            if row["metric"] in ("distance", "distance_normalized", "consistency", "adjacent_cosine"):
                print(f"{tau:>4} {row['group']:<6} {row['metric']:<20} {row['n']:>3} {row['spearman']:>+9.2f} "
                      f"{row['vs_entropy']:>+10.2f} {row['partial_entropy']:>+8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
