"""Collector RSS over a long synthetic run (memory bounded by configuration).

    python bench/collector_soak.py [--minutes 10] [--rate 1000]

A real collector process on loopback receives OLMoE-shape routing messages
(64 samples each, 4 groups, peaked routing) at ``rate`` samples/s with new
sample ids and steps throughout; its RSS (VmRSS) is read every 10 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import zmq

sys.path.insert(0, os.path.dirname(__file__))
from _proc import rss_mb  # noqa: E402
from _synthetic import routing_message  # noqa: E402

from grokwatch.wire import encode  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="samples per second")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    state_dir = tempfile.mkdtemp(prefix="grokwatch-soak-")
    proc = subprocess.Popen([sys.executable, "-m", "grokwatch.cli", "collector", "--listen", endpoint,
                             "--metrics-port", "0", "--metrics-addr", "127.0.0.1", "--state-dir", state_dir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    rng = np.random.default_rng(0)
    time.sleep(3)
    per_msg = 64
    interval = per_msg / args.rate
    started = time.monotonic()
    next_sample = started
    seq, step = 1, 0
    print(f"{'minute':>7} {'RSS MB':>8} {'samples sent':>13}", flush=True)
    sent = 0
    try:
        while time.monotonic() - started < args.minutes * 60:
            now = time.monotonic()
            if now >= next_sample:
                print(f"{(now - started) / 60:>7.2f} {rss_mb(proc.pid):>8.1f} {sent:>13}", flush=True)
                next_sample += 10
            msg = routing_message(rng, n=per_msg, seq=seq, step=step)
            object.__setattr__(msg, "sample_ids", tuple(f"{step}-{i}" for i in range(per_msg)))
            sock.send(encode(msg))
            seq += 1
            step += 1
            sent += per_msg
            time.sleep(max(0.0, interval - (time.monotonic() - now)))
        print(f"{args.minutes:>7.2f} {rss_mb(proc.pid):>8.1f} {sent:>13}", flush=True)
    finally:
        sock.close(0)
        ctx.term()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
