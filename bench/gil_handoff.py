"""What a sender-thread message costs the training thread through the GIL alone.

    python bench/gil_handoff.py [--loops 40] [--layers 16] [--experts 64] [--samples 8]

The agent's sender is a Python thread: whatever it does with the GIL held
(building and encoding a message), the training thread cannot run Python
meanwhile, and it then has to be woken. Here the "training thread" runs a
loop of small torch ops (each releases and retakes the GIL, as a forward's
launches do) on CPU 0, and a second thread on CPU 1 — no CPU shared, so only
the GIL is — encodes one real-size ``routing`` message every 2 ms (as the
sender does once a sampled step). Windows of the loop alone and with the
thread alternate (the machine drifts); printed: the loop's extra time per
message, next to the same for a thread that only wakes (no work). Linux only
(per-thread CPU affinity); needs 2 CPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from wire_factories import make_routing  # noqa: E402

from grokwatch.wire import encode  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loops", type=int, default=40, help="alternating windows per kind")
    parser.add_argument("--ops", type=int, default=3000, help="torch ops in one window of the training loop")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("needs 2 CPUs")
        return 1
    torch.set_num_threads(1)
    message = make_routing(rng=np.random.default_rng(0), n=args.samples, num_layers=args.layers,
                           num_experts=args.experts, top_k=min(8, args.experts))
    t = time.perf_counter()
    for _ in range(200):
        encode(message)
    encode_us = (time.perf_counter() - t) / 200 * 1e6
    x = torch.zeros(1)

    def training_loop() -> float:
        t = time.perf_counter()
        for _ in range(args.ops):
            x.add_(1)
        return time.perf_counter() - t

    active, done, wakes = threading.Event(), threading.Event(), [0]

    def other_thread(work: bool) -> None:
        os.sched_setaffinity(threading.get_native_id(), {cpus[1]})
        while not done.is_set():
            if not active.wait(0.01):
                continue
            if work:
                encode(message)
            wakes[0] += 1
            time.sleep(0.002)

    os.sched_setaffinity(threading.get_native_id(), {cpus[0]})
    print(f"message {len(encode(message))} bytes ({args.samples} samples x {args.layers} layers x {args.experts} "
          f"experts), encode {encode_us:.1f} us warm; training loop on CPU {cpus[0]}, the thread on CPU {cpus[1]}")
    for kind in ("encode a message", "wake only", "encode a message", "wake only"):
        done.clear()
        thread = threading.Thread(target=other_thread, args=(kind != "wake only",), daemon=True)
        thread.start()
        alone, shared, n = [], [], 0
        for _ in range(args.loops):
            active.clear()
            time.sleep(0.005)
            alone.append(training_loop())
            active.set()
            time.sleep(0.003)
            before = wakes[0]
            shared.append(training_loop())
            n += wakes[0] - before
        active.clear()
        done.set()
        thread.join()
        extra = statistics.median([b - a for a, b in zip(alone, shared)])
        per_loop = n / args.loops
        print(f"{kind:<17} loop {statistics.median(alone) * 1e3:6.2f} ms alone, {statistics.median(shared) * 1e3:6.2f} "
              f"ms shared; {per_loop:4.1f} per loop; extra {extra * 1e6:6.0f} us a loop = "
              f"{extra / max(per_loop, 1e-9) * 1e6:5.0f} us each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
