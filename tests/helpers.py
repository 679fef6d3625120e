"""Shared helpers for integration tests: a collector on loopback, scraping, a real Prometheus."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import zmq
from _proc import free_port  # noqa: F401 (the tests' free_port, one with the benchmarks')
from prometheus_client.parser import text_string_to_metric_families

from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.service import Collector
from grokwatch.wire import encode


def start_collector(tmp_path, **kw) -> Collector:
    kw.setdefault("listen", ("tcp://127.0.0.1:0",))
    kw.setdefault("metrics_port", 0)
    kw.setdefault("metrics_addr", "127.0.0.1")
    kw.setdefault("state_dir", str(tmp_path / "state"))
    kw.setdefault("snapshot_interval_s", 3600.0)
    otel_exporters = kw.pop("otel_exporters", [])
    return Collector(CollectorConfig(**kw), otel_exporters=otel_exporters).start()


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def scrape_after(port: int, ready) -> dict:
    """A scrape that shows a change the test just made: /metrics answers a scrape that follows a render within
    9x that render's time (at most 5 s) with its bytes (collector/prometheus.py, RENDER_DUTY; a collector's first
    render is cold and slow), so scrape until ``ready(scrape)`` holds (at most 10 s)."""
    return wait_until(lambda: (lambda s: s if ready(s) else None)(scrape(port)))


def scrape(port: int) -> dict:
    """{sample name: {frozenset(labels.items()): value}}"""
    out: dict = {}
    for fam in text_string_to_metric_families(scrape_text(port)):
        for s in fam.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples[name][frozenset({k: str(v) for k, v in labels.items()}.items())]


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval_s)
    raise AssertionError("condition not met in time")


class Pusher:
    """A PUSH socket that closes with linger 0 (no test can hang on it)."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, data: bytes) -> None:
        self.sock.send(data, copy=True)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def send_all(collector, messages, raw=()):
    st = collector.state

    def done():
        return st.processing_seconds_count + sum(st.rejected_total.values())

    before = done()
    pusher = Pusher(collector.endpoints[0])
    try:
        for m in messages:
            pusher.send(encode(m))
        for data in raw:
            pusher.send(data)
        wait_until(lambda: done() >= before + len(messages) + len(raw))
    finally:
        pusher.close()


def prometheus_tool(name: str) -> str:
    """The path of ``prometheus`` or ``promtool`` (Debian's package); the test is skipped without it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make prometheus)")
    return path


@contextlib.contextmanager
def prometheus(config: Path, tsdb: Path) -> Iterator[int]:
    """A real Prometheus (Debian's package) with ``config`` on a free loopback port: yields the port."""
    binary = prometheus_tool("prometheus")
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def prom_api(port: int, path: str, **params):
    """``/api/v1/<path>``'s data; the call must succeed (raises OSError while Prometheus starts)."""
    url = f"http://127.0.0.1:{port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", (path, params, body)
    return body["data"]


def prom_query(port: int, promql: str) -> list:
    """An instant query's result vector."""
    return prom_api(port, "query", query=promql)["result"]
