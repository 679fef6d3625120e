"""Collector throughput on one core: routing samples per second, decode included.

    python bench/collector_throughput.py [--seconds 20]

OLMoE shape (L=16, E=64, K=8), tau=0.7, m=16 comparisons per sample (plus the
cross-group baseline's m), 4 groups, 64 samples per message, journal on disk.
Each message goes through decode -> pipeline.handle exactly as in the service.
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

from grokwatch.collector import pipeline, warmup  # noqa: E402
from grokwatch.collector.config import CollectorConfig  # noqa: E402
from grokwatch.collector.persist import Journal  # noqa: E402
from grokwatch.collector.state import State  # noqa: E402
from grokwatch.wire import decode, encode  # noqa: E402


def measure(concentration: float, unit: str, seconds: float) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    pool = [encode(routing_message(rng, concentration=concentration, seq=i + 1, step=i)) for i in range(40)]
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(tmp, 64 * 1024 * 1024)
        state = State(CollectorConfig(distance_unit=unit, comparisons_per_sample=16), journal=journal)
        warmup.warm_up()
        # Fill the windows first: the steady state compares against full windows.
        for data in pool[:8]:
            pipeline.handle(state, decode(data))
        samples, started = 0, time.perf_counter()
        seq = 1000
        while time.perf_counter() - started < seconds:
            for data in pool:
                msg = fresh(data, seq)
                seq += 1
                pipeline.handle(state, msg)
                samples += msg.num_samples
        elapsed = time.perf_counter() - started
        journal.close()
        path_len = float(np.mean(state.streams[("bench", "train")].groups["math"].window.len_W))
    return samples / elapsed, path_len


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    print(f"{'routing':<26} {'unit':<7} {'symbols/pathway':>15} {'samples/s':>10}")
    for label, conc in (("peaked (paper-like)", 0.05), ("moderate", 0.3), ("near-uniform (worst)", 5.0)):
        for unit in ("expert", "string"):
            rate, length = measure(conc, unit, args.seconds)
            print(f"{label:<26} {unit:<7} {length:>15.0f} {rate:>10.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
