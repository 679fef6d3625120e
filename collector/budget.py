"""``max_memory_mb``: the bound on the bytes of every stream's group arrays and probe loss histories. The
arrays are checked exactly before a new run, source or group makes them grow (``memory_budget``); the
histories, a cache of what the probe saw, make room by forgetting their least recently probed samples."""

from __future__ import annotations

import logging
from typing import Iterable

from grokwatch.collector.reasons import Rejected
from grokwatch.collector.stream import Stream

log = logging.getLogger("grokwatch.collector.state")


class MemoryBudget:
    def __init__(self, max_memory_mb: int):
        self.max_memory_mb = max_memory_mb
        self._told: set[str] = set()  # runs told once that the budget is reached

    @staticmethod
    def used(streams: Iterable[Stream]) -> int:
        """The bytes of these streams' group arrays and probe histories."""
        return sum(stream.nbytes + (stream.memorization.nbytes if stream.memorization else 0) for stream in streams)

    @property
    def limit(self) -> int:
        return self.max_memory_mb * 1024 * 1024

    def fit(self, streams: Iterable[Stream], need: int = 0) -> int:
        """Forget probe history samples (the least recently probed first, stream by stream) until the streams
        and ``need`` more bytes fit; returns the bytes used then."""
        streams = list(streams)
        used = self.used(streams)
        for stream in streams:
            if used + need <= self.limit:
                break
            if stream.memorization is not None:
                used -= stream.memorization.shrink(used + need - self.limit)
        return used

    def check(self, streams: Iterable[Stream], stream: Stream, slots: int) -> None:
        """Whether ``stream`` may grow to ``slots`` group slots (probe histories make room first); raises
        ``Rejected("memory_budget")``."""
        grow = stream.bytes_for(slots) - stream.nbytes
        if grow <= 0:
            return
        used = self.fit(streams, grow)
        if used + grow > self.limit:
            if stream.run not in self._told:
                self._told.add(stream.run)
                log.warning("run %r, source %r: a new group needs %.1f MiB more, over max_memory_mb (%d MiB, "
                            "%.1f used): its messages are rejected as memory_budget until room is made (fewer "
                            "runs, a larger max_memory_mb, a smaller window_samples or max_groups)", stream.run,
                            stream.source, grow / 2**20, self.max_memory_mb, used / 2**20)
            raise Rejected("memory_budget")
