"""ZeroMQ ingest: the collector's PULL socket (the stable side binds; agents
connect with PUSH). The receive thread only receives, size-checks and enqueues;
the processing thread decodes, validates and applies. Both count what they drop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from grokwatch.collector.pipeline import KernelWorkers
from grokwatch.collector.state import KernelJob, State
from grokwatch.wire import Limits, peek_sequence

log = logging.getLogger(__name__)

POLL_MS = 100  # how often the threads look at the stop flag


class Ingest:
    def __init__(self, state: State, endpoints: Sequence[str], *, queue_capacity: int, max_message_bytes: int,
                 queue_max_bytes: int = 256 * 1024 * 1024, context: zmq.Context | None = None,
                 curve_secret_key: Optional[str] = None, curve_allowed_clients: Optional[str] = None,
                 wal=None, kernel_workers: int = 0):
        self.state = state
        # collector/pipeline.py: routing kernels on worker threads; 0: on the processing thread
        self.workers = KernelWorkers(state, kernel_workers) if kernel_workers > 0 else None
        self.wal = wal  # collector/wal.py: every message appended before it is queued or dropped
        self.limits = Limits(max_message_bytes=max_message_bytes)
        self.queue: "queue.Queue[tuple[int, bytes]]" = queue.Queue(maxsize=queue_capacity)  # (wal index, bytes)
        self.capacity = queue_capacity
        self.capacity_bytes = queue_max_bytes  # bounded in bytes too: messages of up to max_message_bytes each
        self.queued_bytes = 0
        self._bytes_lock = threading.Lock()
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
        # connections (an agent that exited, or one libzmq dropped for a frame over MAXMSGSIZE).
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_DISCONNECTED)
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
        if len(data) > self.limits.max_message_bytes:
            reason = "too_large"
        else:
            with self._bytes_lock:
                room = self.queued_bytes + len(data) <= self.capacity_bytes and not self.queue.full()
                if room:
                    self.queued_bytes += len(data)
            if not room:
                reason = "queue_full"
        if reason is not None:
            sequence = peek_sequence(data, self.limits)
            index = self.wal.drop(t, reason, sequence) if self.wal else -1
            self.state.count_drop(reason, sequence, index)
            return
        index = self.wal.message(t, data) if self.wal else -1
        self.queue.put_nowait((index, data))  # cannot fail: one producer, and there was room

    def _monitor_events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.ZMQError:  # zmq.Again: none left
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self.state.count_disconnect()
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.state.count_handshake_failure("auth")
            else:
                self.state.count_handshake_failure("protocol")

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
                log.warning("receive error: %s", exc)

    def _process_loop(self) -> None:
        while not (self._stop.is_set() and self.queue.empty()) and not self._abandon.is_set():
            try:
                index, data = self.queue.get(timeout=POLL_MS / 1000)
            except queue.Empty:
                continue
            self.process(data, index)

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self.queued_bytes -= size

    def process(self, data: bytes, wal_index: int = -1) -> None:
        """Decode and apply one message (State.apply: every failure counted, none escapes). Its bytes stay
        counted in ``queued_bytes`` until it is done, kernels included."""
        size = len(data)
        dispatch: Optional[Callable[[KernelJob], None]] = None
        if self.workers is not None:
            workers = self.workers

            def to_workers(job: KernelJob) -> None:
                workers.dispatch(job, lambda: self._release(size))

            dispatch = to_workers
        if not self.state.apply(data, self.limits, wal_index, dispatch):
            self._release(size)
