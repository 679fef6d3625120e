"""How long a fresh collector takes to say ready (/readyz 200), with and without the image's prebuilt
kernel cache (deploy/Dockerfile compiles the kernels at build time; the collector seeds Numba's empty
cache directory from it, GROKWATCH_KERNEL_CACHE).

    python bench/fast_start.py [--repeats 3]

Builds the prebuilt cache once (as the image build does), then alternates: a cold start (an empty
cache, nothing to seed from: the kernels compile) and a seeded start (an empty cache, seeded from the
prebuilt one: the kernels load). Prints each time and the medians (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from _proc import free_port


def time_to_ready(env: dict) -> float:
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "grokwatch.cli", "collector", "--listen",
                             f"tcp://127.0.0.1:{free_port()}", "--metrics-port", str(port), "--metrics-addr",
                             "127.0.0.1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the collector exited")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                    return time.monotonic() - started
            except OSError:
                time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="grokwatch-fast-start-")
    base = {k: v for k, v in os.environ.items() if not k.startswith("GROKWATCH_")}
    prebuilt = os.path.join(work, "prebuilt")
    subprocess.run([sys.executable, "-c", "from grokwatch.collector import warmup; warmup.warm_up()"],
                   env=dict(base, NUMBA_CACHE_DIR=prebuilt), check=True)
    times: dict = {"cold": [], "seeded": []}
    try:
        for i in range(args.repeats):
            for kind in ("cold", "seeded"):
                cache = os.path.join(work, f"{kind}-{i}")
                env = dict(base, NUMBA_CACHE_DIR=cache)
                if kind == "seeded":
                    env["GROKWATCH_KERNEL_CACHE"] = prebuilt
                times[kind].append(time_to_ready(env))
                print(f"{kind:>6} start {i + 1}: ready after {times[kind][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"median: cold {statistics.median(times['cold']):.2f} s, seeded {statistics.median(times['seeded']):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
