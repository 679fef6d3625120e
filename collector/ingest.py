"""ZeroMQ ingest: the collector's PULL socket (the stable side binds; agents
connect with PUSH). The receive thread only receives, size-checks and enqueues;
the processing thread decodes, validates and applies. Both count what they drop.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import resource
import socket
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from grokwatch.collector import pipeline
from grokwatch.collector.admission import KernelJob
from grokwatch.collector.config import DEFAULT_QUEUE_MAX_BYTES
from grokwatch.collector.pipeline import KernelWorkers, stream_key
from grokwatch.collector.state import State
from grokwatch.wire import Limits, peek_route, peek_sequence

log = logging.getLogger(__name__)

POLL_MS = 100  # how often the threads look at the stop flag
# Graceful degradation (issue 33): with more than DEGRADE_FROM of the queue's capacity waiting (held-back
# messages included), a routing message's pairs per sample are lowered linearly, to 1 at DEGRADE_TO, so that
# the kernels catch up instead of the queue dropping messages; every message is still applied.
DEGRADE_FROM, DEGRADE_TO = 0.01, 0.10
RESERVED_DESCRIPTORS = 256  # kept from ingest connections: /metrics, the state directory, libzmq's own
LOOP_ERROR_LOG_EVERY = 1000  # an unexpected error in a loop is logged the first time, then every this many


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit (a collector holds one per
    agent connection; the usual soft default of 1,024 is exhausted by ~1,000 stalled strangers). Returns
    the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # e.g. above fs.nr_open
            log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, exc)
    return soft


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[Optional[socket.socket]]:
    """libzmq's socket on descriptor ``fd``, borrowed (never closed: detached after), or None where ``fd`` is
    no longer a socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        yield None
        return
    try:
        yield sock
    finally:
        sock.detach()


def _connection_identity(fd: int) -> Optional[tuple]:
    """(local address, peer address) of the connection on descriptor ``fd``, or None where ``fd`` is no
    longer a connected socket."""
    with _borrowed(fd) as sock:
        try:
            return (sock.getsockname(), sock.getpeername()) if sock is not None else None
        except OSError:
            return None


def _shut(fd: int) -> None:
    """End the connection on ``fd`` (libzmq sees the end and closes it: a disconnect event follows)."""
    with _borrowed(fd) as sock:
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Ingest:
    def __init__(self, state: State, endpoints: Sequence[str], *, queue_capacity: int, max_message_bytes: int,
                 queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES, context: zmq.Context | None = None,
                 curve_secret_key: Optional[str] = None, curve_allowed_clients: Optional[str] = None,
                 wal=None, kernel_workers: int = 0, handshake_timeout_s: float = 10.0,
                 max_connections: int = 8192):
        self.state = state
        # collector/pipeline.py: routing kernels on worker threads; 0: on the processing thread
        self.workers = KernelWorkers(state, kernel_workers) if kernel_workers > 0 else None
        if self.workers is not None:
            self.workers.on_room = lambda: self._room.set()
        self.wal = wal  # collector/wal.py: every message appended before it is queued or dropped
        self.limits = Limits(max_message_bytes=max_message_bytes)
        # (wal index, bytes, wire.peek_route of them)
        self.queue: "queue.Queue[tuple[int, bytes, Optional[tuple[str, str, Optional[str]]]]]" = queue.Queue(
            maxsize=queue_capacity)
        self.capacity = queue_capacity
        self.capacity_bytes = queue_max_bytes  # bounded in bytes too: messages of up to max_message_bytes each
        self.queued_bytes = 0
        self._bytes_lock = threading.Lock()
        # Fair shares (issue 34): bytes queued per sender; past half the byte bound, a sender holding more
        # than its share (the bound / the senders with bytes queued) has its next message dropped as
        # queue_full, so that one sender's flood cannot take the whole queue from the others.
        self._sender_bytes: dict[Optional[str], int] = {}
        # Messages held back, unadmitted, because their stream's kernels hold their backlog (pipeline.py):
        # per sender, in order (a sender's messages are admitted in the order it sent them).
        self._parked: "collections.OrderedDict[Optional[str], collections.deque]" = collections.OrderedDict()
        self._room = threading.Event()  # a stream fell below its cap: the parked may go
        self._parked_count = 0
        self.auth = None
        if curve_secret_key:
            # CURVE: an own context (one ZAP handler per context), the allow-list checked by pyzmq's
            # authenticator thread; clients whose key is not in it never get a message through.
            from zmq.auth.thread import ThreadAuthenticator

            from grokwatch.keys import load_secret

            self.ctx = zmq.Context()
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            if not curve_allowed_clients:  # config.py refuses one without the other
                raise ValueError("curve_secret_key needs curve_allowed_clients")
            self.auth.configure_curve(domain="*", location=curve_allowed_clients)
        else:
            self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PULL)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_secret_key:
            public, secret = load_secret(curve_secret_key)
            self.sock.curve_secretkey = secret
            self.sock.curve_publickey = public
            self.sock.curve_server = True
            self.sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 0)
        # Handshakes refused (a stranger's key, or no CURVE at all) are counted, not silent; so are ended
        # connections (an agent that exited, or one libzmq dropped for a frame over MAXMSGSIZE). Accepted
        # connections are tracked by descriptor, so that those past the cap are closed as they come.
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        # A connection that has not finished its ZMTP greeting (and CURVE handshake) in this time is dropped
        # by libzmq (a stranger that sends a few bytes and stalls holds a descriptor no longer).
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(handshake_timeout_s * 1000)))
        limit = raise_descriptor_limit()
        self.max_connections = max(1, min(max_connections, limit - RESERVED_DESCRIPTORS))
        if self.max_connections < max_connections:
            log.warning("ingest connections capped at %d (descriptor limit %d, %d kept for /metrics and the "
                        "state), under max_ingest_connections %d", self.max_connections, limit,
                        RESERVED_DESCRIPTORS, max_connections)
        self._connections: dict[int, Optional[tuple]] = {}  # descriptor -> its identity when accepted
        self._refused: set[int] = set()  # descriptors shut for the cap: their disconnect is not an agent's
        self._handshake_failed = False  # the last event was a handshake failed with no detail
        self._cap_logged = 0
        # Frames up to twice max_message_bytes are received and counted as too_large. Beyond, libzmq drops
        # the connection (and what is in flight on it) before we see the frame: a disconnect, and the
        # sender's next message counts the gap in its sequence numbers as lost.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
        self.sock.setsockopt(zmq.RCVHWM, 10_000)
        self.endpoints = []
        for ep in endpoints:
            self.sock.bind(ep)
            self.endpoints.append(self.sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._receiving = True  # cleared first at stop; the processing thread stops after the drain
        self._stop = threading.Event()
        self._abandon = threading.Event()  # stop now, even with messages queued
        self._threads: list[threading.Thread] = []

    def working(self) -> Optional[str]:
        """None while both threads run; else what is not working (for /readyz)."""
        for t in self._threads:
            if not t.is_alive():
                return f"ingest thread {t.name} ended"
        return None if self._threads else "ingest not started"

    def queue_stats(self) -> tuple[int, int, int, int]:
        return self.queue.qsize(), self.capacity, self.queued_bytes, self.capacity_bytes

    def start(self) -> None:
        if self.workers is not None:
            self.workers.start()
        for target, name in ((self._receive_loop, "grokwatch-receive"), (self._process_loop, "grokwatch-process")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, drain_timeout_s: float = 2.0) -> None:
        """Stop receiving, take what libzmq already holds for us, process what is
        queued (bounded wait), close the socket. What is still in flight on the
        network when the socket closes is lost; the agents' sequence numbers
        show it as lost at the next start."""
        self._receiving = False
        deadline = time.monotonic() + drain_timeout_s
        if self._threads:
            self._threads[0].join(max(0.0, deadline - time.monotonic()))
            if not self._threads[0].is_alive():
                self._drain_socket(deadline)
        self._stop.set()
        for t in self._threads[1:]:
            t.join(max(0.0, deadline - time.monotonic()))
        # Past the deadline what is still queued stays in the write-ahead log (replayed at the next start);
        # the message being admitted now is finished, with what the kernel workers hold, so that the final
        # snapshot holds every admitted message whole.
        self._abandon.set()
        for t in self._threads[1:]:
            t.join()
        if self.workers is not None:
            self.workers.stop()
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
            self.ctx.term()

    def _drain_socket(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                self._accept(self.sock.recv(zmq.NOBLOCK, copy=True))
            except zmq.ZMQError:
                return

    def _accept(self, data: bytes) -> None:
        """On the receive thread (the only producer): log, then queue or drop. A drop is counted here once
        (received and rejected), a queued message when the processing thread applies it."""
        t = time.time()
        reason = None
        route = None
        if len(data) > self.limits.max_message_bytes:
            reason = "too_large"
        else:
            route = peek_route(data, self.limits)
            sender = route[0] if route else None
            size = len(data)
            with self._bytes_lock:
                room = self.queued_bytes + size <= self.capacity_bytes and not self.queue.full()
                if room and self.queued_bytes > self.capacity_bytes // 2:
                    active = len(self._sender_bytes) + (sender not in self._sender_bytes)
                    room = self._sender_bytes.get(sender, 0) + size <= self.capacity_bytes // active
                if room:
                    self.queued_bytes += size
                    self._sender_bytes[sender] = self._sender_bytes.get(sender, 0) + size
            if not room:
                reason = "queue_full"
        if reason is not None:
            sequence = peek_sequence(data, self.limits)
            index = self.wal.drop(t, reason, sequence) if self.wal else -1
            self.state.count_drop(reason, sequence, index)
            return
        index = self.wal.message(t, data) if self.wal else -1
        self.queue.put_nowait((index, data, route))  # cannot fail: one producer, and there was room
        if self._parked:
            self._room.set()  # the processing thread may be waiting on held-back messages: a new one came

    def _monitor_events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again: none left
                return
            kind, value = event["event"], event["value"]  # a descriptor, except an errno for NO_DETAIL
            if kind == zmq.EVENT_ACCEPTED:
                self._accepted(value)
            elif kind == zmq.EVENT_DISCONNECTED:
                # libzmq's one I/O thread signals a failed handshake and then, at once, its disconnect: the
                # failure is judged here, where the descriptor tells a connection we shut for the cap.
                failed, self._handshake_failed = self._handshake_failed, False
                if value in self._refused:
                    self._refused.discard(value)
                else:
                    self._connections.pop(value, None)
                    self.state.count_disconnect()
                    if failed:  # the greeting or handshake timed out (handshake_timeout_s), or the peer left in it
                        self.state.count_handshake_failure("incomplete")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.state.count_handshake_failure("auth")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self.state.count_handshake_failure("protocol")
            else:  # no detail
                self._handshake_failed = True
            self.state.ingest_connections = len(self._connections)

    def _accepted(self, fd: int) -> None:
        """A new connection: tracked, or — past the cap — shut at once and counted (``connection_cap``)."""
        if len(self._connections) >= self.max_connections:
            # Events can be missed (the monitor's queue is bounded): forget connections whose descriptor no
            # longer holds the connection accepted on it before refusing anyone.
            for other, identity in list(self._connections.items()):
                if identity is None or _connection_identity(other) != identity:
                    del self._connections[other]
        if len(self._connections) >= self.max_connections:
            self._refused.add(fd)
            _shut(fd)
            self.state.count_handshake_failure("connection_cap")
            self._cap_logged += 1
            if self._cap_logged == 1 or self._cap_logged % 1000 == 0:
                log.warning("ingest: %d connections open, the cap (max_ingest_connections); closed a new one "
                            "(%d so far)", self.max_connections, self._cap_logged)
            return
        self._refused.discard(fd)
        self._connections[fd] = _connection_identity(fd)

    def _loop_error(self, where: str, exc: BaseException) -> None:
        n = self.state.count_loop_error(where)
        if n == 1 or n % LOOP_ERROR_LOG_EVERY == 0:
            log.error("%s thread: unexpected %s: %s; counted in grokwatch_collector_loop_errors_total, the thread "
                      "goes on (%d so far)", where, type(exc).__name__, exc, n, exc_info=n == 1)

    def _receive_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while self._receiving:
            try:
                ready = dict(poller.poll(POLL_MS))
                if not ready:
                    continue
                if self._monitor in ready:
                    self._monitor_events()
                if self.sock not in ready:
                    continue
                while True:
                    self._accept(self.sock.recv(zmq.NOBLOCK, copy=True))
            except zmq.Again:
                continue
            except zmq.ZMQError as exc:
                if not self._receiving or exc.errno == zmq.ETERM:
                    return
                self._loop_error("receive", exc)
            except Exception as exc:  # a bug must not end ingest while /readyz says ready
                self._loop_error("receive", exc)

    def _process_loop(self) -> None:
        while not (self._stop.is_set() and self.queue.empty() and not self._parked) and not self._abandon.is_set():
            item = self._next()
            if item is None:
                continue
            index, data, route = item
            self.state.comparisons_now = self._comparisons()
            try:
                self.process(data, index, route)
            except Exception as exc:  # pipeline.apply counts its own failures; this is a bug, survived
                self._release(len(data), route)
                self._loop_error("process", exc)

    def _comparisons(self) -> int:
        """Pairs per sample for the next message: m while the queue is short; fewer, down to 1, as it fills."""
        m = self.state.config.comparisons_per_sample
        waiting = self.queue.qsize() + self._parked_count
        fill = max(waiting / self.capacity, self.queued_bytes / self.capacity_bytes)
        if fill <= DEGRADE_FROM:
            return m
        share = 1.0 - (fill - DEGRADE_FROM) / (DEGRADE_TO - DEGRADE_FROM)
        return max(1, min(m, round(m * share)))

    def _stream_of(self, route) -> Optional[tuple[str, str]]:
        return stream_key(route[1], route[2]) if route is not None and route[2] is not None else None

    def _next(self):
        """The next message to admit: a held-back sender's first whose stream has room now, else the queue's
        next — unless its sender is held back (it joins the line) or its stream is full (it starts one)."""
        workers = self.workers
        if workers is not None:
            for sender, line in self._parked.items():
                key = self._stream_of(line[0][2])
                if key is None or workers.has_room(key):
                    item = line.popleft()
                    self._parked_count -= 1
                    if not line:
                        del self._parked[sender]
                    return item
        self._room.clear()
        try:
            # With messages held back, wait for room or a new message (both set _room), not on the queue
            # alone: a stream's room must be used at once, or its worker idles.
            item = self.queue.get_nowait() if self._parked else self.queue.get(timeout=POLL_MS / 1000)
        except queue.Empty:
            if self._parked:
                self._room.wait(POLL_MS / 1000)
            return None
        if workers is None:
            return item
        route = item[2]
        sender = route[0] if route is not None else None
        key = self._stream_of(route)
        if sender in self._parked or (key is not None and not workers.has_room(key)):
            self._parked.setdefault(sender, collections.deque()).append(item)
            self._parked_count += 1
            self.state.hold_wal(item[0])  # applied out of order: a snapshot must not count it as applied
            return None
        return item

    def _release(self, size: int, route=None) -> None:
        sender = route[0] if route is not None else None
        with self._bytes_lock:
            self.queued_bytes -= size
            left = self._sender_bytes.get(sender, 0) - size
            if left > 0:
                self._sender_bytes[sender] = left
            else:
                self._sender_bytes.pop(sender, None)

    def process(self, data: bytes, wal_index: int = -1, route=None) -> None:
        """Decode and apply one message (pipeline.apply: every failure counted, none escapes). Its bytes stay
        counted in ``queued_bytes`` until it is done, kernels included."""
        size = len(data)
        dispatch: Optional[Callable[[KernelJob], None]] = None
        if self.workers is not None:
            workers = self.workers

            def to_workers(job: KernelJob) -> None:
                workers.dispatch(job, lambda: self._release(size, route))

            dispatch = to_workers
        if not pipeline.apply(self.state, data, self.limits, wal_index, dispatch):
            self._release(size, route)
