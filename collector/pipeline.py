"""Kernel workers: the Numba kernels of routing messages off the processing thread, fair between streams.

The processing thread decodes and admits each message under ``State.lock`` (sequence numbers, checks,
group labels: collector/state.py); a routing message then goes to the kernel worker of its stream,
which runs the kernels holding only that stream's lock (they release the GIL) and finishes the message
under ``State.lock`` again. So scrapes and snapshots never wait behind the kernels, the next message is
decoded while the kernels of this one run, and streams of different runs use more than one core.

One worker per stream, chosen by the stream's key: a stream's messages run in arrival order. Fairness
(issue 34: one run's messages at the largest allowed shape left another run on the same worker with 248 of
5,112 samples processed): a worker shares its time between its streams (start-time fair queueing: the
next job is of the stream that has used the least kernel time, a stream back from idle starting no lower
than the others), and a stream holds admitted, unfinished jobs worth at most ``BACKLOG_S`` of kernel time
(by the recent cost of its jobs). The processing thread never waits for a worker: a message whose stream
is full is held back with the rest of its sender's messages (ingest.py ``Ingest``: a sender's messages
stay in order), and the others go on. So a message of a stream that has used less time waits, at worst,
for the job its worker is running now; and a shutdown, for the running jobs and about ``BACKLOG_S`` of
queued kernel time per stream (and one job of a stream whose cost is not yet known).
"""

from __future__ import annotations

import collections
import threading
import time
import zlib
from typing import Callable

from grokwatch.collector.state import KernelJob, State

# A stream may hold admitted, unfinished jobs (queued or running) worth at most BACKLOG_S of kernel time, by
# the recent cost of its jobs (one job while none has finished yet), and never more than MAX_JOBS_PER_STREAM:
# a cheap stream keeps its worker busy, a costly one cannot queue minutes of work. Its further messages wait
# unadmitted (ingest.py), so that a stop has at most about BACKLOG_S plus the running jobs to finish.
BACKLOG_S = 1.0
MAX_JOBS_PER_STREAM = 64


StreamKey = tuple[str, str]  # (run, source)


def stream_key(run: str, source: str) -> StreamKey:
    return run, source


class _Worker:
    """One thread and its streams' queues, served in turn."""

    def __init__(self, state: State, name: str):
        self.state = state
        self.cond = threading.Condition()
        self.queues: dict[StreamKey, collections.deque] = {}
        self.used: dict[StreamKey, float] = {}  # kernel seconds each busy stream has used (its virtual time)
        self.now = 0.0  # the virtual time: the used time of the stream picked last
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def put(self, key: StreamKey, item) -> None:
        with self.cond:
            if key not in self.queues:
                self.queues[key] = collections.deque()
                self.used[key] = max(self.used.get(key, 0.0), self.now)  # level with the others, no credit
            self.queues[key].append(item)
            self.cond.notify()

    def _next(self):
        """(stream key, job) of the busy stream that has used the least time; None once stopping with
        nothing left."""
        with self.cond:
            while not self.queues:
                if self.stopping:
                    return None
                self.cond.wait()
            key = min(self.queues, key=self.used.__getitem__)
            self.now = self.used[key]
            jobs = self.queues[key]
            item = jobs.popleft()
            if not jobs:
                del self.queues[key]
            return key, item

    def _loop(self) -> None:
        while True:
            picked = self._next()
            if picked is None:
                return
            key, (job, done) = picked
            started = time.perf_counter()
            self.state.run(job)  # never raises: failures are counted as internal
            took = time.perf_counter() - started
            with self.cond:
                # Kept while idle: a stream whose backlog is one job goes idle after each, and must come
                # back with the time it used, not level with the rest (max(used, now) in put).
                self.used[key] = self.used.get(key, self.now) + took
                if len(self.used) > 4096:  # forget streams the virtual time has passed: they come back at it
                    self.used = {k: v for k, v in self.used.items() if k in self.queues or v > self.now}
            done(took)


class KernelWorkers:
    def __init__(self, state: State, workers: int):
        self.state = state
        self.workers = [_Worker(state, f"grokwatch-kernels-{i}") for i in range(max(1, workers))]
        self._lock = threading.Lock()
        self.pending: dict[StreamKey, int] = {}  # stream key -> jobs admitted and unfinished
        self.cost: dict[StreamKey, float] = {}  # stream key -> recent kernel seconds per job (moving average)
        self.on_room: Callable[[], None] = lambda: None  # a stream fell below its cap (Ingest wakes up)

    @property
    def threads(self) -> list[threading.Thread]:
        return [w.thread for w in self.workers]

    def start(self) -> "KernelWorkers":
        for w in self.workers:
            w.thread.start()
        return self

    def has_room(self, key: StreamKey) -> bool:
        """Whether a message of stream ``key`` may be admitted now (its backlog under BACKLOG_S)."""
        with self._lock:
            return self._room_for(key)

    def _room_for(self, key: StreamKey) -> bool:
        pending = self.pending.get(key, 0)
        if pending == 0:
            return True
        cost = self.cost.get(key)
        return cost is not None and pending < MAX_JOBS_PER_STREAM and pending * cost < BACKLOG_S

    def _worker(self, key: StreamKey) -> _Worker:
        return self.workers[zlib.crc32("\0".join(key).encode()) % len(self.workers)]

    def dispatch(self, job: KernelJob, done: Callable[[], None] = lambda: None) -> None:
        """On the processing thread: queue the job for its stream's worker (never waits); ``done`` is called
        on the worker once the job is finished."""
        key = stream_key(job.stream.run, job.stream.source)
        with self._lock:
            self.pending[key] = self.pending.get(key, 0) + 1

        def finished(took: float) -> None:
            with self._lock:
                left = self.pending[key] = self.pending[key] - 1
                if not left:
                    del self.pending[key]
                old = self.cost.get(key)
                self.cost[key] = took if old is None else 0.8 * old + 0.2 * took
                room = self._room_for(key)
            done()
            if room:
                self.on_room()

        self._worker(key).put(key, (job, finished))

    def stop(self) -> None:
        """Finish every job queued (they are admitted: their sequence numbers are counted, and the next
        snapshot waits for them; about BACKLOG_S of kernel time per stream), then end the workers."""
        for w in self.workers:
            with w.cond:
                w.stopping = True
                w.cond.notify_all()
        for w in self.workers:
            w.thread.join()
