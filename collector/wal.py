"""The write-ahead log: every message the receive thread takes, appended before it is queued or
dropped, so that a collector killed with SIGKILL resumes exactly (no counter backwards, nothing twice).

Files ``wal.<generation>.bin`` in the state directory, each opening with ``FILE_MAGIC``. A record is

    sync u32 | kind u8 (1: message, 2: drop) | index u64 | t f64 (receive time) | length u32 | crc32 u32 | payload

the CRC-32 covering kind, index, t, length and the payload. ``index`` counts records across
generations. A message record's payload is the message's bytes; a drop record's is JSON ``[reason,
sender or null, seq or null]`` (queue full, too large: dropped before they are applied). An append is
written whole or not at all: a short write (a disk that fills mid-record) is continued, and a write that
fails part-way is truncated back to the record's start; either way a failure is counted
(``persist_errors_total{what="wal_write"}``) and the message goes on without its record. The page cache
keeps appends across a SIGKILL (not across a power loss: no fsync per message).

The state records the index of the last message and the last drop it applied (``State.wal_applied``); a
snapshot carries them, so that at start-up the records after them are replayed — messages still queued
at the kill included — and the generations a snapshot covers are removed. Reading survives bit rot: a
record whose frame or checksum is wrong is skipped up to the next whole record (counted,
``what="wal_read"``), and what follows it is replayed; a file that is not a write-ahead log of this
version is moved aside (``.bad-<time>``), never a crash loop.

Rotation opens the new generation before closing the old one (a descriptor number freed in between could
be taken by an accepted connection, and the next record written to it); a log that could not open a file
(no descriptors, no inodes, a full disk) writes nothing, counts each message it could not log, and opens
again at the next append once a second has passed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
import time
import zlib
from typing import Callable, Iterator, Optional

log = logging.getLogger(__name__)

FILE_MAGIC = b"GROKWATCH-WAL-2\n"
_SYNC = 0x52_4C_57_47  # b"GWLR" little-endian: where a record starts
_SYNC_BYTES = struct.pack("<I", _SYNC)
_HEADER = struct.Struct("<IBQdII")  # sync, kind, index, t, length, crc32
_CRC_FROM = 4  # the checksum covers the header after the sync word, up to the crc itself, then the payload
_CRC_TO = _HEADER.size - 4
MAX_RECORD_BYTES = 1 << 30  # no message is near this (config.py caps max_message_bytes): a longer length is rot
MAX_INDEX = 1 << 62  # record indices count messages: a larger one is rot or a crafted file
REOPEN_AFTER_S = 1.0  # a log that could not open its file tries again at the next append this long after
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


def encode_record(kind: int, index: int, t: float, payload: bytes) -> bytes:
    head = _HEADER.pack(_SYNC, kind, index, t, len(payload), 0)
    crc = zlib.crc32(payload, zlib.crc32(head[_CRC_FROM:_CRC_TO]))
    return head[:_CRC_TO] + struct.pack("<I", crc) + payload


def _record_at(data: bytes, pos: int) -> Optional[tuple[int, int, float, bytes, int]]:
    """(kind, index, t, payload, end) of a whole, intact record at ``pos``, or None."""
    if pos + _HEADER.size > len(data):
        return None
    sync, kind, index, t, length, crc = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    if (sync != _SYNC or kind not in (MESSAGE, DROP) or length > MAX_RECORD_BYTES or end > len(data)
            or index > MAX_INDEX or not math.isfinite(t)):
        return None
    payload = data[pos + _HEADER.size:end]
    if zlib.crc32(payload, zlib.crc32(data[pos + _CRC_FROM:pos + _CRC_TO])) != crc:
        return None
    return kind, index, t, payload, end


def _set_aside(path: str) -> str:
    dest = f"{path}.bad-{int(time.time())}"
    os.replace(path, dest)
    return dest


def read(state_dir: str, on_bad: Callable[[str], None] = lambda what: None) -> Iterator[tuple[int, int, float, bytes]]:
    """(kind, index, t, payload) of every intact record, oldest first. A damaged stretch (a flipped bit, a
    record torn by a failing disk) is skipped up to the next intact record and reported once to ``on_bad``
    (``"wal_read"``), with one log line; a file that is not a write-ahead log of this version is moved aside
    and reported the same way."""
    for gen in _generations(state_dir):
        path = _path(state_dir, gen)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            log.error("write-ahead log %s: unreadable (%s); not replayed", path, exc)
            on_bad("wal_read")
            continue
        if not data.startswith(FILE_MAGIC):
            if FILE_MAGIC.startswith(data):  # empty, or its header torn by a kill: nothing was logged in it
                continue
            try:
                where = _set_aside(path)
            except OSError as exc:
                where = f"(could not be moved: {exc})"
            log.error("write-ahead log %s: not a write-ahead log of this version; not replayed, moved to %s",
                      path, where)
            on_bad("wal_read")
            continue
        pos = len(FILE_MAGIC)
        while pos < len(data):
            found = _record_at(data, pos)
            if found is not None:
                kind, index, t, payload, pos = found
                yield kind, index, t, payload
                continue
            start, pos = pos, data.find(_SYNC_BYTES, pos + 1)  # resynchronise on the next intact record
            while pos != -1 and _record_at(data, pos) is None:
                pos = data.find(_SYNC_BYTES, pos + 1)
            pos = len(data) if pos == -1 else pos
            log.error("write-ahead log %s: %d damaged bytes at %d skipped; the records after them are replayed",
                      path, pos - start, start)
            on_bad("wal_read")


class WriteAheadLog:
    """Appended by the receive thread; rotated and trimmed by snapshots. Thread-safe. Never raises on a
    write: a failure is counted (``wal_write``) and the message goes on without its record."""

    def __init__(self, state_dir: str, next_index: int, max_bytes: int,
                 on_error: Callable[[str], None] = lambda what: None, on_full: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.monotonic, on_recovered: Callable[[], None] = lambda: None):
        self.state_dir = state_dir
        self.max_bytes = max_bytes
        self.on_error, self.on_full = on_error, on_full
        self.on_recovered = on_recovered  # writing again after failures: a snapshot should hold what was not logged
        self.clock = clock
        self._lock = threading.Lock()
        self.next_index = next_index
        gens = _generations(state_dir)
        self.generation = gens[-1] if gens else -1  # the next file opened is generation + 1
        self._max_index: dict[int, tuple[int, int]] = {}  # generation -> (last message index, last drop index)
        self._replayed = gens  # generations from before this start: removed once a snapshot holds their replay
        self._fd: Optional[int] = None
        self._size = 0
        self._retry_at = 0.0
        self.failing = 0  # writes failed in a row (0: writing); /readyz and the log line read it
        try:
            self._fd, self._size = self._open_next()
        except OSError as exc:
            self.failing, self._retry_at = 1, self.clock() + REOPEN_AFTER_S
            self._failed(exc)

    @property
    def healthy(self) -> bool:
        return self.failing == 0

    def _open_next(self) -> tuple[int, int]:
        """Open generation + 1 with its header written; the generation counter moves only on success."""
        gen = self.generation + 1
        path = _path(self.state_dir, gen)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                _write_whole(fd, FILE_MAGIC, 0)
                size = len(FILE_MAGIC)
        except BaseException:
            os.close(fd)
            try:
                os.remove(path)
            except OSError:
                pass
            raise
        self.generation = gen
        self._max_index[gen] = (-1, -1)
        return fd, size

    def _append(self, kind: int, t: float, payload: bytes) -> int:
        failure, recovered = None, 0
        with self._lock:
            index = self.next_index
            self.next_index += 1
            try:
                if self._fd is None:
                    if self.clock() < self._retry_at:
                        raise OSError("the write-ahead log has no open file (it could not open one)")
                    self._fd, self._size = self._open_next()
                record = encode_record(kind, index, t, payload)
                self._size = _write_whole(self._fd, record, self._size)
                m, d = self._max_index[self.generation]
                self._max_index[self.generation] = (index, d) if kind == MESSAGE else (m, index)
                recovered, self.failing = self.failing, 0
            except Exception as exc:  # OSError above all; an index or time that does not pack must not escape
                failure = exc
                self.failing += 1
                if self._fd is None:
                    self._retry_at = self.clock() + REOPEN_AFTER_S
            full = self._size > self.max_bytes
        # Counted outside this log's lock: the counter takes the state's lock, which a snapshot holds while
        # it rotates this log (lock order: State, then WriteAheadLog).
        if failure is not None:
            self._failed(failure)
        elif recovered:
            log.warning("write-ahead log: writing again after %d failed writes", recovered)
            self.on_recovered()
        if full:
            self.on_full()
        return index

    def _failed(self, exc: BaseException) -> None:
        self.on_error("wal_write")
        if self.failing <= 1:
            log.warning("write-ahead log: write failed (%s); counted in grokwatch_collector_persist_errors_total"
                        "{what=\"wal_write\"}, logged once until it writes again: a SIGKILL now loses what the "
                        "snapshot lacks", exc)

    def message(self, t: float, data: bytes) -> int:
        return self._append(MESSAGE, t, data)

    def drop(self, t: float, reason: str, sequence: Optional[tuple[str, int]]) -> int:
        sender, seq = sequence if sequence is not None else (None, None)
        return self._append(DROP, t, json.dumps([reason, sender, seq]).encode())

    def rotate(self) -> None:
        """A new generation for what follows (called under the state lock, just before a snapshot). The new
        file is opened before the old one is closed; when it cannot be, the old one stays in use (counted)."""
        failure = None
        with self._lock:
            if self._fd is not None and self._size <= len(FILE_MAGIC):
                return  # nothing in this generation yet
            old = self._fd
            try:
                self._fd, self._size = self._open_next()
            except OSError as exc:
                failure = exc
                self.failing += 1
            else:
                if old is not None:
                    os.close(old)
        if failure is not None:
            self._failed(failure)

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
            self._replayed = [gen for gen in self._replayed if gen != self.generation and not self._remove(gen)]
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


def _write_whole(fd: int, data: bytes, size: int) -> int:
    """Append all of ``data`` to a file of ``size`` bytes and return the new size; on a failure part-way,
    cut the file back to ``size`` (no torn record left behind; should that fail too, the reader skips it)
    and raise."""
    view, done = memoryview(data), 0
    try:
        while done < len(data):
            n = os.write(fd, view[done:])
            if n <= 0:
                raise OSError(28, "the write made no progress")
            done += n
    except OSError:
        if done:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
        raise
    return size + done


DROP_REASONS = ("too_large", "queue_full")  # the reasons ingest drops a message for at receive (ingest.py)


def parse_drop(payload: bytes) -> Optional[tuple[str, Optional[tuple[str, int]]]]:
    """(reason, (sender, seq) or None) of a write-ahead drop record, or None where it is not one."""
    try:
        reason, sender, seq = json.loads(payload)
    except (ValueError, TypeError):
        return None
    if reason not in DROP_REASONS:
        return None
    if sender is None and seq is None:
        return reason, None
    if isinstance(sender, str) and isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63:
        return reason, (sender, seq)
    return None


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
