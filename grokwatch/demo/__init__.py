"""``grokwatch demo`` — the main job.

A small MoE transformer (grokwatch.demo.model) trains full-batch on several
modular-arithmetic groups (grokwatch.demo.data) under the agent; a collector
runs in its own process on loopback and serves /metrics while it trains; at
the end the collector snapshots and a report is written from its journal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

from grokwatch.demo.train import BenchConfig, train

# Run N of docs/groundtruth.md (the first that groks cleanly), shortened to 3,000 steps, with the
# random-label group "rand" as a fourth group (the negative control). With it, generalization comes
# later: by step 3,000 add's held-out accuracy is 0.15 (seed 0) and no group crosses 50 %, so the
# detector rightly dates no onset; docs/groundtruth.md has the longer runs.
DEMO_CONFIG = BenchConfig()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.started = total, width, time.monotonic()

    def update(self, step: int, info: str = "") -> None:
        done = step / max(self.total, 1)
        bar = "#" * int(done * self.width)
        elapsed = time.monotonic() - self.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        sys.stderr.write(f"\r[{bar:<{self.width}}] {step}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s {info}"[:160])
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_metrics(port: int, proc: subprocess.Popen, log_path: str, timeout_s: float = 60.0) -> None:
    """Until *our* collector says it listens (its log line) and its /metrics answers. A /metrics on the
    port alone proves nothing: another process may hold it (a second demo, a real collector)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as fh:
                last = (fh.read().strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"the collector exited with code {proc.returncode}: {last}")
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            ready = "grokwatch collector: listening on" in fh.read()
        if ready:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
                return
            except OSError:
                pass
        time.sleep(0.2)
    raise RuntimeError("the collector did not come up in time")


def parse_overrides(pairs: list[str]) -> dict:
    """``FIELD=VALUE`` strings to BenchConfig keywords, typed by the field's default."""
    out = {}
    fields = BenchConfig.__dataclass_fields__
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}")
        default = getattr(DEMO_CONFIG, name)
        if isinstance(default, tuple):
            out[name] = tuple(value.split(","))
        elif isinstance(default, bool) or default is None:
            out[name] = float(value)
        else:
            out[name] = type(default)(value)
    return out


def run_demo(args: argparse.Namespace) -> int:
    cfg = DEMO_CONFIG if args.steps is None else replace(DEMO_CONFIG, steps=args.steps)
    try:
        cfg = replace(cfg, **parse_overrides(getattr(args, "set", [])))
    except ValueError as exc:
        print(f"grokwatch demo: {exc}", file=sys.stderr)
        return 2
    path = main_job(replace(cfg, seed=args.seed), args.out, args.metrics_port)
    print(f"report: {path}")
    return 0


def main_job(cfg: BenchConfig, out: str, metrics_port: int = 0, run: str = "demo") -> str:
    """Collector process + training with the agent + report. Returns the report's path."""
    out = os.path.abspath(out)
    state_dir = os.path.join(out, "state")
    shutil.rmtree(state_dir, ignore_errors=True)
    os.makedirs(state_dir, exist_ok=True)
    port = metrics_port or _free_port()
    if not _port_free(port):
        free = _free_port()
        print(f"port {port} is in use (another collector or demo?): /metrics goes on port {free} instead", flush=True)
        port = free
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    log_path = os.path.join(out, "collector.log")
    log = open(log_path, "w")
    collector = subprocess.Popen(
        [sys.executable, "-m", "grokwatch.cli", "collector", "--listen", endpoint, "--metrics-port", str(port),
         "--metrics-addr", "127.0.0.1", "--state-dir", state_dir],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "GROKWATCH_SNAPSHOT_INTERVAL_S": "10"})
    try:
        _wait_metrics(port, collector, log_path)
        print(f"collector: {endpoint}; /metrics at http://127.0.0.1:{port}/metrics while it trains", flush=True)
        bar = Progress(cfg.steps)

        def on_eval(step, record):
            accs = " ".join(f"{g}={record[g]:.2f}" for g in cfg.groups)
            bar.update(step, f"held-out {accs}")

        train(cfg, endpoint=endpoint, run=run, on_eval=on_eval,
              log_path=os.path.join(out, "accuracy.jsonl"))
        bar.close()
        time.sleep(1.0)  # the sender's last messages and heartbeat
    finally:
        if collector.poll() is None:
            collector.send_signal(signal.SIGTERM)  # snapshot, flush the journal, exit
            try:
                collector.wait(30)
            except subprocess.TimeoutExpired:
                collector.kill()
        log.close()
    from grokwatch.collector.report import build_report

    return build_report(state_dir, os.path.join(out, "report"))
