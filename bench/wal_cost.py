"""The write-ahead log's cost beside the work it protects, paired in one run.

    python bench/wal_cost.py [--rounds 5] [--messages 200]

OLMoE-shape routing messages (L=16, E=64, K=8, 64 samples, as bench/collector_throughput.py), peaked
routing. In alternating rounds (A B A B …): A applies each message as the processing thread does
(pipeline.apply: decode + handle, journal on disk); B appends it to a WriteAheadLog on the same disk first
(what the receive thread adds per message). Prints the median per-message times and the ratio B / A.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _synthetic import routing_message  # noqa: E402

from grokwatch.collector import pipeline, warmup  # noqa: E402
from grokwatch.collector.config import CollectorConfig  # noqa: E402
from grokwatch.collector.persist import Journal  # noqa: E402
from grokwatch.collector.state import State  # noqa: E402
from grokwatch.collector.wal import WriteAheadLog  # noqa: E402
from grokwatch.wire import Limits, encode  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=200)
    args = parser.parse_args()
    warmup.warm_up()
    rng = np.random.default_rng(0)
    limits = Limits()
    times = {"A": [], "B": []}
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        state = State(CollectorConfig(comparisons_per_sample=16), journal=Journal(tmp, 1 << 30))
        wal = WriteAheadLog(tmp, 0, 1 << 40)
        seq = 1
        for r in range(2 * args.rounds):
            arm = "AB"[r % 2]
            msgs = [encode(routing_message(rng, concentration=0.05, seq=seq + i, step=seq + i)) for i in range(args.messages)]
            seq += args.messages
            size = len(msgs[0])
            started = time.perf_counter()
            for data in msgs:
                if arm == "B":
                    wal.message(time.time(), data)
                pipeline.apply(state, data, limits)
            times[arm].append((time.perf_counter() - started) / args.messages)
        wal.close()
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"message {size / 1024:.0f} KiB; per message: apply {a * 1e6:.0f} us, log + apply {b * 1e6:.0f} us, "
          f"ratio {b / a:.3f} (medians of {args.rounds} rounds each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
