"""Kernel workers: the Numba kernels of routing messages off the processing thread.

The processing thread decodes and admits each message under ``State.lock`` (sequence numbers, checks,
group labels: collector/state.py); a routing message then goes to the kernel worker of its stream,
which runs the kernels holding only that stream's lock (they release the GIL) and finishes the message
under ``State.lock`` again. So scrapes and snapshots never wait behind the kernels, the next message is
decoded while the kernels of this one run, and streams of different runs use more than one core.

One worker per stream at a time, chosen by the stream's key: a stream's messages run in arrival
order. Each worker's queue is bounded; when it is full the processing thread waits (the ingest queue,
bounded in messages and bytes, takes the backlog; a message's bytes count against that bound until its
kernels are done).
"""

from __future__ import annotations

import queue
import threading
import zlib
from typing import Callable

from grokwatch.collector.state import KernelJob, State

JOBS_PER_WORKER = 16  # admitted messages waiting for one worker's kernels (a few MB at most)
_STOP = object()


class KernelWorkers:
    def __init__(self, state: State, workers: int):
        self.state = state
        self.queues: list[queue.Queue] = [queue.Queue(maxsize=JOBS_PER_WORKER) for _ in range(max(1, workers))]
        self.threads: list[threading.Thread] = []

    def start(self) -> "KernelWorkers":
        for i, q in enumerate(self.queues):
            t = threading.Thread(target=self._loop, args=(q,), name=f"grokwatch-kernels-{i}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def dispatch(self, job: KernelJob, done: Callable[[], None] = lambda: None) -> None:
        """On the processing thread: queue the job for its stream's worker (waits while that queue is full);
        ``done`` is called on the worker once the job is finished."""
        key = f"{job.stream.run}\0{job.stream.source}".encode()
        self.queues[zlib.crc32(key) % len(self.queues)].put((job, done))

    def stop(self) -> None:
        """Finish every job queued (they are admitted: their sequence numbers are counted, and the next
        snapshot waits for them; at most JOBS_PER_WORKER messages each), then end the workers."""
        for q in self.queues:
            q.put(_STOP)
        for t in self.threads:
            t.join()

    def _loop(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is _STOP:
                return
            job, done = item
            self.state.run(job)  # never raises: failures are counted as internal
            done()
