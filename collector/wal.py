"""The write-ahead log: every message the receive thread takes, appended before it is queued or
dropped, so that a collector killed with SIGKILL resumes exactly (no counter backwards, nothing twice).

Files ``wal.<generation>.bin`` in the state directory. A record is

    kind u8 (1: message, 2: drop) | index u64 | t f64 (receive time) | length u32 | payload

``index`` counts records across generations. A message record's payload is the message's bytes; a drop
record's is JSON ``[reason, sender or null, seq or null]`` (queue full, too large: dropped before
they are applied). Appends are one ``os.write`` each: the page cache keeps them across a SIGKILL (not
across a power loss: no fsync per message). The state records the index of the last message and the last
drop it applied (``State.wal_applied``); a snapshot carries them, so that at start-up the records after
them are replayed — messages still queued at the kill included — and the generations a snapshot covers
are removed. A record torn by the kill ends the replay of its file.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from typing import Callable, Iterator, Optional

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<BQdI")
JOURNAL_TAIL_BYTES = 4 * 1024 * 1024  # spans thousands of records: many more than are ever in flight
MESSAGE, DROP = 1, 2
PREFIX, SUFFIX = "wal.", ".bin"


def _path(state_dir: str, gen: int) -> str:
    return os.path.join(state_dir, f"{PREFIX}{gen}{SUFFIX}")


def _generations(state_dir: str) -> list[int]:
    out = []
    for name in os.listdir(state_dir):
        if name.startswith(PREFIX) and name.endswith(SUFFIX):
            middle = name[len(PREFIX):-len(SUFFIX)]
            if middle.isdigit():
                out.append(int(middle))
    return sorted(out)


def read(state_dir: str) -> Iterator[tuple[int, int, float, bytes]]:
    """(kind, index, t, payload) of every whole record, oldest first."""
    for gen in _generations(state_dir):
        path = _path(state_dir, gen)
        with open(path, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos + _HEADER.size <= len(data):
            kind, index, t, length = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            if kind not in (MESSAGE, DROP) or end > len(data):
                log.info("write-ahead log %s: a torn record at byte %d (the kill); the rest is not replayed", path, pos)
                break
            yield kind, index, t, data[pos + _HEADER.size:end]
            pos = end


class WriteAheadLog:
    """Appended by the receive thread; rotated and trimmed by snapshots. Thread-safe. Never raises on a
    write: a failure is counted (``wal_write``) and the message goes on without its record."""

    def __init__(self, state_dir: str, next_index: int, max_bytes: int,
                 on_error: Callable[[str], None] = lambda what: None, on_full: Callable[[], None] = lambda: None):
        self.state_dir = state_dir
        self.max_bytes = max_bytes
        self.on_error, self.on_full = on_error, on_full
        self._lock = threading.Lock()
        self.next_index = next_index
        gens = _generations(state_dir)
        self.generation = (gens[-1] + 1) if gens else 0
        self._max_index: dict[int, tuple[int, int]] = {}  # generation -> (last message index, last drop index)
        self._replayed = gens  # generations from before this start: removed once a snapshot holds their replay
        self._fd: Optional[int] = None
        self._size = 0
        self._logged_error = False
        self._open()

    def _open(self) -> None:
        self._fd = os.open(_path(self.state_dir, self.generation), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._max_index[self.generation] = (-1, -1)

    def _append(self, kind: int, t: float, payload: bytes) -> int:
        failure = None
        with self._lock:
            index = self.next_index
            self.next_index += 1
            try:
                if self._fd is None:
                    raise OSError("the write-ahead log is closed")
                os.write(self._fd, _HEADER.pack(kind, index, t, len(payload)) + payload)
                self._size += _HEADER.size + len(payload)
                m, d = self._max_index[self.generation]
                self._max_index[self.generation] = (index, d) if kind == MESSAGE else (m, index)
            except OSError as exc:
                failure = exc
            full = self._size > self.max_bytes
        # Counted outside this log's lock: the counter takes the state's lock, which a snapshot holds while
        # it rotates this log (lock order: State, then WriteAheadLog).
        if failure is not None:
            self.on_error("wal_write")
            if not self._logged_error:
                self._logged_error = True
                log.warning("write-ahead log: write failed (%s); counted in grokwatch_collector_persist_errors_total"
                            "{what=\"wal_write\"}, logged once: a SIGKILL now loses what the snapshot lacks", failure)
        if full:
            self.on_full()
        return index

    def message(self, t: float, data: bytes) -> int:
        return self._append(MESSAGE, t, data)

    def drop(self, t: float, reason: str, sequence: Optional[tuple[str, int]]) -> int:
        sender, seq = sequence if sequence is not None else (None, None)
        return self._append(DROP, t, json.dumps([reason, sender, seq]).encode())

    def rotate(self) -> None:
        """A new generation for what follows (called under the state lock, just before a snapshot)."""
        with self._lock:
            if self._size == 0 or self._fd is None:
                return
            os.close(self._fd)
            self.generation += 1
            self._open()

    def _remove(self, gen: int) -> bool:
        try:
            os.remove(_path(self.state_dir, gen))
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    def trim(self, applied_message: int, applied_drop: int) -> None:
        """Remove the generations whose every record a written snapshot has applied."""
        failed = 0
        with self._lock:
            for gen, (m, d) in list(self._max_index.items()):
                if gen != self.generation and m <= applied_message and d <= applied_drop:
                    if self._remove(gen):
                        del self._max_index[gen]
                    else:
                        failed += 1
        self._count_removals_failed(failed)

    def discard_replayed(self) -> None:
        """Remove the generations found at start (their records are in the snapshot just written)."""
        with self._lock:
            self._replayed = [gen for gen in self._replayed if not self._remove(gen)]
            failed = len(self._replayed)  # those kept are those that could not be removed
        self._count_removals_failed(failed)

    def _count_removals_failed(self, failed: int) -> None:
        for _ in range(failed):  # outside the lock, as in _append
            self.on_error("wal_write")

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class JournaledRecords:
    """Which write-ahead records have their journal lines written already (``w in journaled``): those
    whose index is in the journal's tail, and every one before the tail's first (kernel workers finish
    messages a few records out of order, far fewer than the tail holds)."""

    def __init__(self, floor: int = -1, seen: frozenset = frozenset()):
        self.floor, self.seen = floor, seen

    def __contains__(self, index: int) -> bool:
        return index < self.floor or index in self.seen


def journaled_records(journal_path: str) -> JournaledRecords:
    """Read the journal's last ``JOURNAL_TAIL_BYTES`` for the ``w`` of its lines."""
    try:
        with open(journal_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            start = max(0, size - JOURNAL_TAIL_BYTES)
            fh.seek(start)
            tail = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return JournaledRecords()
    seen = set()
    for line in tail:
        try:
            w = json.loads(line).get("w")
        except (ValueError, AttributeError):
            continue
        if isinstance(w, int):
            seen.add(w)
    return JournaledRecords(min(seen) if seen and start > 0 else -1, frozenset(seen))
    for line in reversed(tail):
        try:
            w = json.loads(line).get("w")
        except (ValueError, AttributeError):
            continue
        if isinstance(w, int):
            return w
    return -1
