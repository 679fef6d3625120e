"""The collector's pipeline, one way: bytes -> decode -> admission -> kernels -> finish, and nothing
else changes the state (collector/state.py).

- **Admission** (collector/admission.py, under ``State.lock``): sequence numbers, checks, group labels; a
  routing message becomes a ``KernelJob``, any other message is applied whole.
- **Kernels** (``Stream.process``, the Numba kernels, holding only the stream's own lock): here on the
  calling thread (``handle``, the replay, a collector without workers), or on the kernel worker of the
  message's stream (``KernelWorkers``).
- **Finish** (under ``State.lock``): the message's points into the phase trackers and the journal, the
  counters.

A write-ahead replay (``replay``) is a mode of the same path: each record is judged at its arrival time,
and journal lines the journal already holds are not written again — both passed in, nothing swapped.

Kernel workers: the processing thread decodes and admits each message; a routing message then goes to the
kernel worker of its stream, which runs the kernels holding only that stream's lock (they release the GIL)
and finishes the message under ``State.lock`` again. So scrapes and snapshots never wait behind the
kernels, the next message is decoded while the kernels of this one run, and streams of different runs use
more than one core.

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
import logging
import threading
import time
import zlib
from typing import Callable, Container, Iterable, Optional

from grokwatch.collector import evidence, wal
from grokwatch.collector.admission import Journaling, KernelJob, admit
from grokwatch.collector.reasons import Rejected
from grokwatch.collector.state import State
from grokwatch.wire import Limits, WireError, decode, peek_sequence

MIN_MAX_COSINE = 0.05  # METRICS.md §2: below this, consistency is undefined

log = logging.getLogger(__name__)


def apply(state: State, data: bytes, limits: Limits, wal_index: int = -1,
          dispatch: Optional[Callable[[KernelJob], None]] = None, *, now: Optional[float] = None,
          journaled: Container[int] = ()) -> bool:
    """Decode and apply one received message; every failure is counted, none escapes. Received and
    admitted in one step under the lock (a snapshot never holds one without the other). A routing
    message's kernels then run through ``dispatch`` (a kernel worker), or here. ``now``: when the message
    is judged to have arrived (the state's clock unless given); ``journaled``: write-ahead records whose
    journal lines exist already. Returns whether the message went to ``dispatch``."""
    job = None
    with state.admitting():
        state.received_total += 1
        if wal_index >= 0:
            state.wal_applied[0] = max(state.wal_applied[0], wal_index)
            state.wal_held.discard(wal_index)
        try:
            job = admit(state, decode(data, limits), state.clock() if now is None else now,
                        Journaling(state.journal, wal_index, journaled))
        except WireError as exc:
            state.count_rejected(exc.reason, peek_sequence(data, limits))
        except Rejected as exc:
            state.count_rejected(exc.reason)
        except Exception:  # a bug of ours must not stop the collector
            log.exception("internal error while processing a message")
            state.count_rejected("internal")
    if job is None:
        return False
    if dispatch is None:
        run(state, job)
        return False
    dispatch(job)
    return True


def handle(state: State, msg) -> None:
    """Apply one decoded message, kernels included, on this thread (tests, benchmarks, the warm-up).
    Raises ``Rejected`` for a message that is valid on its own but not here (shape mismatch, stale,
    duplicate); nothing is counted as received."""
    with state.admitting():
        job = admit(state, msg, state.clock(), Journaling(state.journal))
    if job is not None:
        run(state, job)


def run(state: State, job: KernelJob) -> None:
    """The kernels of an admitted routing message, then ``finish``; on any thread. Never raises: a
    failure is counted as ``internal`` and the job is settled all the same."""
    try:
        with job.stream.lock:  # the kernels hold only their stream (lock order: State.lock, then a stream's)
            job.stats = job.stream.process(job.msg, job.targets_N2, state.config.pathway_tau,
                                           job.comparisons or state.config.comparisons_per_sample, MIN_MAX_COSINE)
            job.transfers = job.stream.transfers(job.msg, job.targets_N2)
    except Exception:
        log.exception("internal error in the kernels of a routing message")
    finish(state, job)


def finish(state: State, job: KernelJob) -> None:
    """After the kernels: the message's points into the phase trackers and the journal, under the lock."""
    with state.lock:
        try:
            if job.stats is None:
                state.count_rejected("internal")
            else:
                state.samples_total += job.msg.num_samples
                for record in evidence.routing_points(state.config, job.msg, job.stream, job.targets_N2,
                                                      job.stats):
                    record["comparisons"] = job.comparisons  # m of this point's pairs (fewer: noisier)
                    job.journaling.write(record)
                for group, transfer in job.transfers:  # METRICS.md §6 (collector/transfer.py)
                    job.journaling.write(dict(kind="transfer", run=job.msg.run, source=job.msg.source,
                                              group=group, step=job.msg.step, t=job.msg.wall_time, **transfer))
        except Exception:
            log.exception("internal error while finishing a routing message")
            state.count_rejected("internal")
        finally:
            state.processing_seconds_sum += time.perf_counter() - job.started
            state.processing_seconds_count += 1
            state.settle()


def replay(state: State, records: Iterable[tuple[int, int, float, bytes]], limits: Limits,
           journaled: Container[int] = ()) -> tuple[int, int]:
    """The write-ahead records (wal.read) the state does not hold yet — messages applied after its
    snapshot, and those still queued at a kill — through the same path, each judged (stale, idle runs)
    at its arrival time; journal lines of the records in ``journaled`` are not written again. Returns
    (records replayed, the last record index seen; -1: none)."""
    applied_m, applied_d = state.wal_applied
    held = set(state.wal_held)
    replayed, last = 0, max(applied_m, applied_d)
    for kind, index, t, payload in records:
        last = max(last, index)
        if kind == wal.MESSAGE and (index > applied_m or index in held):
            apply(state, payload, limits, index, now=t, journaled=journaled)
            replayed += 1
        elif kind == wal.DROP and index > applied_d:
            drop = wal.parse_drop(payload)
            if drop is None:  # intact but not a drop this collector writes (a crafted file)
                log.error("write-ahead log: drop record %d is malformed; not replayed", index)
                state.count_persist_error("wal_read")
                continue
            reason, sequence = drop
            state.count_drop(reason, sequence, index)
            replayed += 1
    return replayed, last


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
            run(self.state, job)  # never raises: failures are counted as internal
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
