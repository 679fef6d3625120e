"""Shared helpers for integration tests: a collector on loopback, scraping."""

from __future__ import annotations

import time
import urllib.request

import zmq
from prometheus_client.parser import text_string_to_metric_families

from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.service import Collector


def start_collector(tmp_path, **kw) -> Collector:
    kw.setdefault("listen", ("tcp://127.0.0.1:0",))
    kw.setdefault("metrics_port", 0)
    kw.setdefault("metrics_addr", "127.0.0.1")
    kw.setdefault("state_dir", str(tmp_path / "state"))
    kw.setdefault("snapshot_interval_s", 3600.0)
    otel_readers = kw.pop("otel_readers", [])
    return Collector(CollectorConfig(**kw), otel_readers=otel_readers).start()


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


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
