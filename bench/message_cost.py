"""One routing message's cost in the collector, split into the kernel and the rest (decode, admission,
phases, journal): OLMoE shape, peaked routing, 64 samples a message, windows full.

    python bench/message_cost.py [--messages 600] [--concentration 0.05]

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--concentration", type=float, default=0.05)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    pool = [encode(routing_message(rng, concentration=args.concentration, seq=i + 1, step=i)) for i in range(40)]
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(tmp, 64 * 1024 * 1024)
        state = State(CollectorConfig(distance_unit="expert", comparisons_per_sample=16), journal=journal)
        warmup.warm_up()
        for data in pool[:8]:  # full windows first
            pipeline.handle(state, decode(data))
        in_kernel = [0.0]
        kernel = kernels.process_samples

        def timed(*a):
            t = time.perf_counter()
            try:
                return kernel(*a)
            finally:
                in_kernel[0] += time.perf_counter() - t

        stream_module.kernels.process_samples = timed
        seq, samples, started = 1000, 0, time.perf_counter()
        for n in range(args.messages):
            msg = fresh(pool[n % len(pool)], seq)
            seq += 1
            pipeline.handle(state, msg)
            samples += msg.num_samples
        elapsed = time.perf_counter() - started
        journal.close()
    print(f"{samples / elapsed:.0f} samples/s; per message: kernel {in_kernel[0] / args.messages * 1e3:.2f} ms, "
          f"total {elapsed / args.messages * 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
