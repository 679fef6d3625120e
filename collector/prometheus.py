"""Prometheus view: a prometheus-client custom collector on its own registry,
served over HTTP (optionally TLS). Families are built fresh on every scrape
from ``view.build_view`` — the same snapshot the OpenTelemetry view reads.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import threading
import time
from typing import Callable, Optional, cast
from urllib.parse import parse_qs

import numpy as np
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.exposition import ThreadingWSGIServer, _bake_output, _SilentHandler

from grokwatch.collector.state import State
from grokwatch.collector.view import HistogramValue, Sample, SummaryValue, build_view, scalar

log = logging.getLogger(__name__)


def _le(bound: float) -> str:
    return repr(float(bound))


SCRAPE_LOCK_WAIT_S = 2.0  # a scrape waits this long for the state; then it answers with the previous view


class PrometheusCollector:
    """``collect()`` renders one snapshot of the state. The kernels hold only their stream's lock (a busy
    stream is read from its previous reading: view.py); should the state lock itself stay held past
    ``SCRAPE_LOCK_WAIT_S`` (a snapshot waiting for the kernels in flight, a new group's allocation), the
    scrape answers with the last view it rendered, counted in ``grokwatch_collector_scrapes_stale_total``,
    well inside Prometheus' 10 s."""

    def __init__(self, state: State, queue_stats: Optional[Callable[[], tuple]] = None):
        self.state = state
        self.queue_stats = queue_stats
        self.stale_scrapes = 0
        self._last: list = []

    def describe(self):
        return []  # families vary with the data; nothing to pre-register

    def families(self) -> list:
        if self.state.lock.acquire(timeout=SCRAPE_LOCK_WAIT_S):
            try:
                self._last = build_view(self.state, self.queue_stats, self.stale_scrapes)
            finally:
                self.state.lock.release()
            return self._last
        self.stale_scrapes += 1
        log.warning("/metrics: the state stayed locked for %.1f s (a long message?): answered with the previous "
                    "view (%d so far)", SCRAPE_LOCK_WAIT_S, self.stale_scrapes)
        out = []
        for fam in self._last:
            if fam.name == "grokwatch_collector_scrapes_stale_total":
                fam = dataclasses.replace(fam, samples=[Sample((), self.stale_scrapes)])
            out.append(fam)
        return out

    def collect(self):
        for fam in self.families():
            name = fam.name
            labels = list(fam.labels)
            if fam.kind == "counter":
                out = CounterMetricFamily(name.removesuffix("_total"), fam.help, labels=labels)
                for values, v in fam.samples:
                    out.add_metric(list(values), scalar(v))
            elif fam.kind == "gauge":
                out = GaugeMetricFamily(name, fam.help, labels=labels)
                for values, v in fam.samples:
                    out.add_metric(list(values), scalar(v))
            elif fam.kind == "histogram":
                out = HistogramMetricFamily(name, fam.help, labels=labels)
                for values, hist in fam.samples:
                    assert isinstance(hist, HistogramValue)
                    bounds, total = hist.bounds, hist.sum
                    cum = np.cumsum(hist.counts)
                    buckets = [(_le(b), float(c)) for b, c in zip(bounds, cum[:-1])] + [("+Inf", float(cum[-1]))]
                    # A histogram with negative buckets has no _sum or _count (OpenMetrics: its sum is no
                    # counter); view.py exports its sum as the gauge <name>_sum_signed.
                    out.add_metric(list(values), buckets, None if bounds[0] < 0 else float(total))
            else:  # summary: count and sum, no quantiles (aggregatable)
                out = SummaryMetricFamily(name, fam.help, labels=labels)
                for values, summary in fam.samples:
                    assert isinstance(summary, SummaryValue)
                    out.add_metric(list(values), count_value=int(summary.count), sum_value=summary.sum)
            yield out


def make_registry(state: State, queue_stats=None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(state, queue_stats))
    return registry


MAX_CONNECTIONS = 64  # /metrics connections served at once; more are closed at once (and logged)
CLIENT_TIMEOUT_S = 10.0  # a client that sends nothing (or takes longer for its TLS handshake) is dropped
BACKLOG = 128


class _Handler(_SilentHandler):
    timeout = CLIENT_TIMEOUT_S  # StreamRequestHandler: the socket's timeout, so a half-open client cannot pin a thread


class MetricsServer(ThreadingWSGIServer):
    """prometheus-client's threading WSGI server with bounds: a connection cap, a per-client timeout (TLS
    handshakes happen in the client's thread, under it, not in the accept loop) and a listen backlog."""

    request_queue_size = BACKLOG
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning("/metrics: %d connections open, the cap; closed one from %s (%d so far)",
                            MAX_CONNECTIONS, client_address[0], self.refused)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            cast(socket.socket, request).settimeout(CLIENT_TIMEOUT_S)  # a TCP server: requests are sockets
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


COALESCE_S = 0.5  # a scrape that waited for another's render takes it, if that render began at most this before


class CoalescedMetrics:
    """/metrics with concurrent scrapes coalesced: one render at a time, and a scrape that arrived while
    another's render was under way takes that render's bytes (if it began at most ``COALESCE_S`` before the
    scrape arrived) instead of rendering again. Fifty scrapers cost about what one does: the state's lock
    is taken once per render, not once per scrape (issue 29: 50 concurrent scrapers held it so often that
    ingest lagged 27.5 s at 20 msg/s). A scrape that arrives with no render under way renders afresh: what
    it shows is never older than the scrape."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic):
        self.registry = registry
        self.clock = clock
        self.renders = 0
        self._lock = threading.Lock()
        self._last: Optional[tuple] = None  # (key, began, ended, (status, headers, body))

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico":
            return make_wsgi_app(self.registry)(environ, start_response)
        arrived = self.clock()
        params = parse_qs(environ.get("QUERY_STRING", ""))
        key = (environ.get("HTTP_ACCEPT"), environ.get("HTTP_ACCEPT_ENCODING"), tuple(params.get("name[]", ())))
        with self._lock:
            last = self._last
            if last is not None and last[0] == key and last[2] >= arrived and last[1] >= arrived - COALESCE_S:
                status, headers, body = last[3]
            else:
                began = self.clock()
                status, headers, body = _bake_output(self.registry, key[0], key[1], params, False)
                self.renders += 1
                self._last = (key, began, self.clock(), (status, headers, body))
        start_response(status, headers)
        return [body]


def with_probes(app, not_ready: Callable[[], Optional[str]]):
    """The /metrics WSGI app plus the pod's probes: ``/healthz`` 200 while the server answers (liveness),
    ``/readyz`` 200 only while ``not_ready()`` is None (started, ingest running, persisters writing), else
    503 with what is not working."""

    def probes(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            problem = None if path == "/healthz" else not_ready()
            ok = problem is None
            body = b"ok\n" if ok else (str(problem) + "\n").encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return probes


def serve(registry: CollectorRegistry, addr: str, port: int, certfile: Optional[str] = None,
          keyfile: Optional[str] = None, ready: Callable[[], Optional[str]] = lambda: None):
    """Start the /metrics server (with /healthz and /readyz); returns (server, thread, bound port)."""
    import socket
    from wsgiref.simple_server import make_server

    server_class = type("MetricsServer6", (MetricsServer,), {"address_family": socket.AF_INET6}) if ":" in addr \
        else MetricsServer
    server = make_server(addr, port, with_probes(CoalescedMetrics(registry), ready), server_class,
                         handler_class=_Handler)
    if certfile and keyfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, name="grokwatch-metrics", daemon=True)
    thread.start()
    bound = server.server_address[1]
    log.info("serving /metrics on %s:%d%s", addr, bound, " (TLS)" if certfile else "")
    return server, thread, bound
