"""What one view of a filled state costs: its wall time, and how long it holds the state's lock.

    python bench/view_cost.py [--groups 32] [--views 40]

OLMoE shape (L=16, E=64, K=8), train and probe streams of ``--groups`` groups each with full windows
(256 samples), then ``--views`` calls of view.build_view (the families /metrics, OTLP, TensorBoard and
W&B render from), timed alone; then as many again while a thread keeps asking for the state's lock (1 ms
apart): the longest wait it saw is the longest the state's lock was held by a view — what every
admission and snapshot waited for (issue 30: the whole render ran under it). Runs on any commit that has
view.build_view (bench/ab_trees.py --same-script).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _synthetic import routing_message  # noqa: E402

from grokwatch.collector.config import CollectorConfig  # noqa: E402
from grokwatch.collector.state import State  # noqa: E402
from grokwatch.collector.view import build_view  # noqa: E402


def handler(state: State):
    if hasattr(state, "handle"):  # before the pipeline (issue 30)
        return state.handle
    from grokwatch.collector import pipeline

    return lambda msg: pipeline.handle(state, msg)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--views", type=int, default=40)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    state = State(CollectorConfig(window_samples=256, comparisons_per_sample=2, max_groups=args.groups,
                                  max_memory_mb=4096))
    handle = handler(state)
    groups = tuple(f"g{i}" for i in range(args.groups))
    seq = 0
    for source in ("train", "probe"):
        for _ in range(256 * args.groups // 64):
            seq += 1
            msg = routing_message(rng, concentration=0.05, seq=seq, step=seq)
            n = msg.num_samples
            handle(dataclasses.replace(msg, source=source, groups=tuple(groups[(seq * n + i) % len(groups)]
                                                                          for i in range(n)),
                                       sample_ids=tuple(f"{source}{seq}-{i}" for i in range(n)),
                                       wall_time=time.time()))
    build_view(state)  # warm
    longest, stop = [0.0], threading.Event()

    def prober() -> None:
        while not stop.is_set():
            asked = time.perf_counter()
            with state.lock:
                longest[0] = max(longest[0], time.perf_counter() - asked)
            time.sleep(0.001)

    times = []
    for _ in range(args.views):  # alone: what a view costs
        started = time.perf_counter()
        fams = build_view(state)
        times.append(time.perf_counter() - started)
    probe = threading.Thread(target=prober)
    probe.start()
    for _ in range(args.views):  # with a thread asking for the lock: how long a view holds it
        build_view(state)
    stop.set()
    probe.join()
    series = sum(len(f.samples) for f in fams)
    print(f"series {series} view_ms_median {1e3 * statistics.median(times):.1f} "
          f"lock_wait_ms_max {1e3 * longest[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
