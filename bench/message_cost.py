"""One routing message's cost in the collector, split into the kernel, the finish (points, phases, journal)
and the rest (decode, admission): OLMoE shape, peaked routing, 64 samples a message, windows full.

    python bench/message_cost.py [--messages 600] [--concentration 0.05] [--samples 64] [--comparisons 16]

The rated load's messages: ``--samples 8 --per-step 64`` (and ``--concentration 5 --comparisons 1`` for its near-uniform
row, where the collector sits at m = 1).

Comparing two checkouts: run it from each in alternation (ABBA), e.g.
    for i in 1 2 3; do (cd ../before && PYTHONPATH=. python bench/message_cost.py); \
        python bench/message_cost.py; python bench/message_cost.py; \
        (cd ../before && PYTHONPATH=. python bench/message_cost.py); done
and compare the per-pair ratios (this machine's speed drifts by ±15 % over minutes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _synthetic import fresh, routing_message  # noqa: E402

from grokwatch.collector import kernels, pipeline, warmup  # noqa: E402
from grokwatch.collector import stream as stream_module  # noqa: E402
from grokwatch.collector.config import CollectorConfig  # noqa: E402
from grokwatch.collector.persist import Journal  # noqa: E402
from grokwatch.collector.state import State  # noqa: E402
from grokwatch.wire import decode, encode  # noqa: E402


def _timed(fn, total: list):
    """``fn``, adding the seconds each call takes to ``total[0]``."""

    def timed(*a):
        t = time.perf_counter()
        try:
            return fn(*a)
        finally:
            total[0] += time.perf_counter() - t

    return timed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--concentration", type=float, default=0.05)
    parser.add_argument("--samples", type=int, default=64, help="samples a message")
    parser.add_argument("--comparisons", type=int, default=16, help="m, pairs per sample")
    parser.add_argument("--per-step", type=int, default=1,
                        help="messages a training step (the rated load: 64 ranks, so 64; 1: each closes a step)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pool = [encode(routing_message(rng, n=args.samples, concentration=args.concentration, seq=i + 1, step=i))
            for i in range(40)]
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(tmp, 64 * 1024 * 1024)
        state = State(CollectorConfig(distance_unit="expert", comparisons_per_sample=args.comparisons),
                      journal=journal)
        warmup.warm_up()
        for data in pool[:8]:  # full windows first
            pipeline.handle(state, decode(data))
        in_kernel, in_finish = [0.0], [0.0]
        stream_module.kernels.process_samples = _timed(kernels.process_samples, in_kernel)
        pipeline.finish = _timed(pipeline.finish, in_finish)
        seq, samples, started = 1000, 0, time.perf_counter()
        for n in range(args.messages):
            msg = fresh(pool[n % len(pool)], seq)
            object.__setattr__(msg, "step", 1000 + n // args.per_step)
            seq += 1
            pipeline.handle(state, msg)
            samples += msg.num_samples
        elapsed = time.perf_counter() - started
        journal.close()
    print(f"{samples / elapsed:.0f} samples/s; per message: kernel {in_kernel[0] / args.messages * 1e3:.3f} ms, "
          f"finish {in_finish[0] / args.messages * 1e3:.3f} ms, total {elapsed / args.messages * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
