"""One stream's routing messages with the pairs on one thread against several (``pair_threads``, issue 33):
paired A/B in one process, the same messages to both, alternating in blocks (ABBA), per routing regime.

    python bench/pair_threads.py [--threads 2] [--messages 1200] [--samples 8] [--concentrations 0.05,0.3,5]

Two ``State``s, one with ``pair_threads=1`` (the kernel alone) and one with ``--threads``; OLMoE shape (L 16,
E 64), 4 groups, windows full before timing, 16 pairs per sample, no journal. Each block is 20 messages
through ``pipeline.handle`` (decode excluded); per regime: the median per-message time of each arm, the ratio of
medians, the median of the per-block ratios, and samples/s — one stream's ceiling, the figure that sets the
pairs per sample the collector can keep under load (docs/benchmarks.md, "The collector at its rated load").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _synthetic import fresh, routing_message  # noqa: E402

from grokwatch.collector import pipeline, warmup  # noqa: E402
from grokwatch.collector.config import CollectorConfig  # noqa: E402
from grokwatch.collector.state import State  # noqa: E402
from grokwatch.wire import encode  # noqa: E402

BLOCK = 20


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--messages", type=int, default=1200)
    parser.add_argument("--samples", type=int, default=8, help="samples a message (the rated load's: 8)")
    parser.add_argument("--concentrations", default="0.05,0.3,5")
    args = parser.parse_args()
    warmup.warm_up()
    print(f"pair_threads 1 against {args.threads}; {args.samples} samples a message, {args.messages} messages an arm, "
          f"blocks of {BLOCK} (ABBA)")
    print(f"{'routing':>8} {'1 thread ms':>12} {f'{args.threads} threads ms':>13} {'ratio':>7} {'block ratio':>12} "
          f"{'samples/s (1)':>14} {f'samples/s ({args.threads})':>14}")
    for conc in (float(c) for c in args.concentrations.split(",")):
        rng = np.random.default_rng(0)
        pool = [encode(routing_message(rng, n=args.samples, concentration=conc, seq=i + 1, step=i))
                for i in range(64)]
        arms = {t: State(CollectorConfig(comparisons_per_sample=16, window_samples=256, pair_threads=t))
                for t in (1, args.threads)}
        seq = 1
        for _ in range(4 * 256 // args.samples + 8):  # every group's window full
            for state in arms.values():
                pipeline.handle(state, fresh(pool[seq % len(pool)], seq))
            seq += 1
        per = {t: [] for t in arms}
        for b in range(args.messages // BLOCK):
            order = (1, args.threads) if b % 4 in (0, 3) else (args.threads, 1)
            msgs = [fresh(pool[(seq + k) % len(pool)], seq + k) for k in range(BLOCK)]
            seq += BLOCK
            for t in order:
                state = arms[t]
                clones = [fresh(encode(m), m.seq) for m in msgs]
                started = time.perf_counter()
                for m in clones:
                    pipeline.handle(state, m)
                per[t].append((time.perf_counter() - started) / BLOCK)
        a, b_ = statistics.median(per[1]), statistics.median(per[args.threads])
        ratios = [y / x for x, y in zip(per[1], per[args.threads])]
        missed = sum(s.pairs_missed for s in arms[args.threads].streams.values())
        assert missed == 0, missed
        print(f"{conc:>8} {a * 1e3:>12.3f} {b_ * 1e3:>13.3f} {b_ / a:>7.3f} {statistics.median(ratios):>12.3f} "
              f"{args.samples / a:>14.0f} {args.samples / b_:>14.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
