"""Prometheus view: a prometheus-client custom collector on its own registry,
served over HTTP (optionally TLS). Families are built fresh on every scrape
from ``view.build_view`` — the same snapshot the OpenTelemetry view reads.
"""

from __future__ import annotations

import collections
import logging
import selectors
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
from grokwatch.collector.view import HistogramValue, SummaryValue, ViewMemo, build_view, scalar

log = logging.getLogger(__name__)


def _le(bound: float) -> str:
    return repr(float(bound))


SCRAPE_LOCK_WAIT_S = 2.0  # a scrape waits this long for the state; then it answers with the previous view


class PrometheusCollector:
    """``collect()`` renders one view of the state (view.build_view: the state's lock held for a copy, each
    stream read under its own). Should the state's lock stay held past ``SCRAPE_LOCK_WAIT_S`` (a snapshot
    serializing a large state), the scrape answers with the state's families of the last view, counted in
    ``grokwatch_collector_scrapes_stale_total``, well inside Prometheus' 10 s."""

    def __init__(self, state: State, queue_stats: Optional[Callable[[], tuple]] = None):
        self.state = state
        self.queue_stats = queue_stats
        self.memo = ViewMemo()

    def describe(self):
        return []  # families vary with the data; nothing to pre-register

    def families(self) -> list:
        stale = self.memo.stale_views
        fams = build_view(self.state, self.queue_stats, self.memo, lock_wait_s=SCRAPE_LOCK_WAIT_S)
        if self.memo.stale_views > stale:
            log.warning("/metrics: the state stayed locked for %.1f s (a long message, a snapshot?): answered "
                        "with the previous view (%d so far)", SCRAPE_LOCK_WAIT_S, self.memo.stale_views)
        return fams

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
                    # A signed histogram has no _sum or _count (OpenMetrics: its sum is no counter); view.py
                    # exports its sum as the gauge <name>_sum_signed.
                    out.add_metric(list(values), buckets, None if fam.signed else float(total))
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
MAX_REQUESTS_PER_S = 100  # requests served per second at most (all clients together); more wait their turn (a
# probe behind MAX_CONNECTIONS waiting requests: 0.64 s, inside the kubelet's 1 s)


class Pacer:
    """Spaces events at least ``1 / rate`` s apart: ``wait()`` sleeps (the interpreter's lock released) until
    this caller's turn. A client in a tight loop then costs the process ``rate`` requests a second at most."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, sleep=time.sleep):
        self.interval, self.clock, self.sleep = 1.0 / rate, clock, sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> float:
        with self._lock:
            now = self.clock()
            turn = max(now, self._next)
            self._next = turn + self.interval
        if turn > now:
            self.sleep(turn - now)
        return turn - now


class _Handler(_SilentHandler):
    timeout = CLIENT_TIMEOUT_S  # StreamRequestHandler: the socket's timeout, so a half-open client cannot pin a thread

    def parse_request(self):
        ok = super().parse_request()
        request_read = getattr(self.server, "request_read", None)
        if request_read is not None:
            request_read(self.connection)
        return ok


MAX_WAITING = 8192  # accepted connections that have sent nothing yet; past it the longest waiting is closed
WAIT_TIMEOUT_S = 5.0  # a connection that sends nothing this long after it is accepted is closed
REQUEST_DEADLINE_S = 10.0  # reading one request's line and headers takes at most this (a drip-feeding client)


class MetricsServer(ThreadingWSGIServer):
    """prometheus-client's threading WSGI server with bounds, so that thousands of idle or slow clients cannot
    keep a scrape out (issue 34: 3,015 idle connections filled the 64 threads, and 5 of 23 real scrapes
    failed or took over a second). An accepted connection waits in a room that costs no thread (one selector
    thread watches them all) until it sends its first bytes; only then does it get one of ``MAX_CONNECTIONS``
    worker threads. The room holds ``MAX_WAITING`` (the longest waiting is closed to make room) for
    ``WAIT_TIMEOUT_S`` each; a worker reads the request under ``CLIENT_TIMEOUT_S`` per read and
    ``REQUEST_DEADLINE_S`` in all (the selector thread ends a client that drips its headers), and serves at
    most ``MAX_REQUESTS_PER_S`` requests a second (``Pacer``). TLS handshakes happen in the worker."""

    request_queue_size = BACKLOG
    daemon_threads = True

    def __init__(self, *args, **kwargs):
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.pacer = Pacer(MAX_REQUESTS_PER_S)
        self.refused = 0  # connections closed unserved: waited too long, or no room
        self._waiting: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()  # fd -> (sock, addr, t)
        self._ready: "collections.deque[tuple]" = collections.deque()  # (sock, addr, t): sent bytes, no worker yet
        self._reading: dict[int, tuple] = {}  # fd -> (sock, deadline): workers reading a request
        self._closing = False
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopped = threading.Event()
        super().__init__(*args, **kwargs)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """The room's loop, on the server's thread: it accepts too (every pending connection at each turn),
        so no other thread is woken per connection."""
        self.socket.setblocking(False)
        self._selector.register(self.socket, selectors.EVENT_READ)
        try:
            while not self._closing:
                try:
                    self._room_turn()
                except Exception:  # never let the room die: scrapes would stop
                    log.exception("/metrics: waiting room error")
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._closing = True
        self._wake()
        self._stopped.wait(10)

    def _accept_all(self, now: float) -> None:
        """Every pending connection into the room."""
        while True:
            try:
                sock, addr = self.get_request()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. no descriptor left: try at the next turn
                log.warning("/metrics: accept failed: %s", exc)
                return
            if len(self._waiting) >= MAX_WAITING:
                _, (old, _, _) = self._waiting.popitem(last=False)
                self._selector.unregister(old)
                self._close(old, "the waiting room was full: the longest waiting")
            try:
                self._selector.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):
                self._close(sock, "could not be watched")
                continue
            self._waiting[sock.fileno()] = (sock, addr, now)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (it is awake already) or closed
            pass

    def _close(self, sock, why: str) -> None:
        self.refused += 1
        if self.refused == 1 or self.refused % 1000 == 0:
            log.warning("/metrics: closed a connection unserved (%s; %d so far)", why, self.refused)
        try:
            self.shutdown_request(sock)
        except OSError:
            pass

    def _room_turn(self) -> None:
        timeout = 0.05 if self._ready else 0.5
        events = self._selector.select(timeout)
        now = time.monotonic()
        for key, _ in events:
            if key.fileobj is self.socket:
                self._accept_all(now)
                continue
            if key.fileobj is self._wake_r:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
                continue
            entry = self._waiting.pop(key.fd, None)
            self._selector.unregister(key.fileobj)
            if entry is not None:
                self._ready.append(entry)
        while self._waiting:
            fd, (sock, _, t) = next(iter(self._waiting.items()))
            if now - t < WAIT_TIMEOUT_S:
                break
            del self._waiting[fd]
            self._selector.unregister(sock)
            self._close(sock, f"sent nothing in {WAIT_TIMEOUT_S:.0f} s")
        while self._ready and now - self._ready[0][2] >= WAIT_TIMEOUT_S:
            self._close(self._ready.popleft()[0], "no worker free in time")
        while self._ready and self._slots.acquire(blocking=False):
            sock, addr, _ = self._ready.popleft()
            try:
                super().process_request(sock, addr)  # a worker thread: process_request_thread
            except BaseException:
                self._slots.release()
                self._close(sock, "no thread")
        for fd, (sock, deadline) in list(self._reading.items()):
            if now > deadline:
                self._reading.pop(fd, None)
                try:
                    sock.shutdown(socket.SHUT_RD)  # the worker's read returns: its request ends
                except OSError:
                    pass

    def process_request_thread(self, request, client_address):
        fd = cast(socket.socket, request).fileno()
        try:
            cast(socket.socket, request).settimeout(CLIENT_TIMEOUT_S)  # a TCP server: requests are sockets
            self._reading[fd] = (request, time.monotonic() + REQUEST_DEADLINE_S)
            self.pacer.wait()  # under the worker cap: at most MAX_CONNECTIONS wait, sleeping
            super().process_request_thread(request, client_address)
        finally:
            self._reading.pop(fd, None)
            self._slots.release()
            self._wake()  # a worker is free: the room may hand out the next ready connection

    def request_read(self, request) -> None:
        """The handler has the whole request: no deadline while the response is written."""
        try:
            self._reading.pop(request.fileno(), None)
        except OSError:
            pass

    def server_close(self):
        self.shutdown()
        super().server_close()
        for sock in [s for s, _, _ in self._waiting.values()] + [s for s, _, _ in self._ready]:
            try:
                sock.close()
            except OSError:
                pass
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


COALESCE_S = 0.5  # a scrape that waited for another's render takes it, if that render began at most this before
RENDER_DUTY = 0.1  # renders take at most this share of the time: after one of d s, the next waits 9 d
RENDER_HOLD_MAX_S = 5.0  # ... but never more than this: a scrape never reads bytes older than this plus a render


class CoalescedMetrics:
    """/metrics with concurrent scrapes coalesced: one render at a time, and a scrape that arrived while
    another's render was under way takes that render's bytes (if it began at most ``COALESCE_S`` before the
    scrape arrived) instead of rendering again. Fifty scrapers cost about what one does: the state's lock
    is taken once per render, not once per scrape (issue 29: 50 concurrent scrapers held it so often that
    ingest lagged 27.5 s at 20 msg/s). And renders take at most ``RENDER_DUTY`` of the time: after a render
    of d seconds, scrapes within the next d (1 − duty) / duty seconds are answered with its bytes (for a
    small state, d is a few milliseconds: a lone scrape that follows a change is fresh). So a client that
    scrapes in a tight loop cannot keep the state's lock, nor the interpreter, busy. The hold is capped at
    ``RENDER_HOLD_MAX_S``: where a render takes over half a second (a large state on a loaded machine), a
    scrape storm may take more than the duty's share, but no scrape is answered with bytes older than that
    (a 1 s render had held 9 s; since the view holds the state's lock only for its copy, ingest goes on)."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.monotonic):
        self.registry = registry
        self.clock = clock
        self.renders = 0
        self._lock = threading.Lock()
        self._last: Optional[tuple] = None  # (key, began, ended, (status, headers, body))
        self._next_render = 0.0

    def __call__(self, environ, start_response):
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("PATH_INFO") == "/favicon.ico":
            return make_wsgi_app(self.registry)(environ, start_response)
        arrived = self.clock()
        params = parse_qs(environ.get("QUERY_STRING", ""))
        key = (environ.get("HTTP_ACCEPT"), environ.get("HTTP_ACCEPT_ENCODING"), tuple(params.get("name[]", ())))
        with self._lock:
            last = self._last
            shared = last is not None and last[0] == key and (
                (last[2] >= arrived and last[1] >= arrived - COALESCE_S) or self.clock() < self._next_render)
            if last is not None and shared:
                status, headers, body = last[3]
            else:
                began = self.clock()
                status, headers, body = _bake_output(self.registry, key[0], key[1], params, False)
                self.renders += 1
                ended = self.clock()
                self._last = (key, began, ended, (status, headers, body))
                self._next_render = ended + min((ended - began) * (1 - RENDER_DUTY) / RENDER_DUTY, RENDER_HOLD_MAX_S)
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
    metrics_app = CoalescedMetrics(registry)
    server = make_server(addr, port, with_probes(metrics_app, ready), server_class, handler_class=_Handler)
    server.metrics_app = metrics_app  # type: ignore[attr-defined]  (its render count, for tests and benchmarks)
    if certfile and keyfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, name="grokwatch-metrics", daemon=True)
    thread.start()
    bound = server.server_address[1]
    log.info("serving /metrics on %s:%d%s", addr, bound, " (TLS)" if certfile else "")
    return server, thread, bound
