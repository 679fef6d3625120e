"""Snapshots and the journal in the collector's state directory.

- ``snapshot.pkl``: the whole state, pickled under the state lock (a consistent
  copy) and written atomically (temp file, fsync, rename; the temp file is
  removed when a write fails) every ``snapshot_interval_s`` and at shutdown;
  read back at start so that no exported counter goes backwards across a clean
  restart. It is read with an allow-list of the classes the collector itself
  pickles (``SnapshotUnpickler``): a crafted file cannot run code. A file that
  cannot be read, or is not this collector's, is moved aside
  (``snapshot.pkl.bad-<time>``), logged in one line and counted
  (``grokwatch_collector_persist_errors_total{what="snapshot_read"}``).
- ``journal.jsonl``: append-only JSON lines of the points the collector
  exported, one per (run, source, group, routing message), plus eval scores —
  the input of ``grokwatch report``. Bounded: past ``journal_max_bytes`` it is
  rotated to ``journal.1.jsonl`` (one generation kept).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import threading
import time
from typing import Callable, Iterator, Optional

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "snapshot.pkl"
JOURNAL_NAME = "journal.jsonl"
SNAPSHOT_VERSION = 1


PERSIST_ERRORS = ("snapshot_write", "snapshot_read", "journal_write", "wal_write")  # grokwatch_collector_persist_errors_total{what}

# Every class a snapshot of State holds (collector/state.py SNAPSHOT_FIELDS), and nothing else.
_SNAPSHOT_CLASSES = {
    ("collections", "OrderedDict"), ("collections", "deque"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"),
    ("grokwatch.collector.memorization", "MemorizationTracker"),
    ("grokwatch.collector.memorization", "SampleHistory"),
    ("grokwatch.collector.phases", "PhaseConfig"), ("grokwatch.collector.phases", "PhaseTracker"),
    ("grokwatch.collector.stream", "Stream"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"), ("builtins", "bytearray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy.random._pcg64", "PCG64"), ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"), ("numpy.random.bit_generator", "SeedSequence"),
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
}


class SnapshotError(Exception):
    """A snapshot that is not this collector's, or cannot be read."""


class SnapshotUnpickler(pickle.Unpickler):
    """Loads only the classes the collector pickles: a crafted snapshot cannot reach os.system & co."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _SNAPSHOT_CLASSES:
            raise SnapshotError(f"holds {module}.{name}, which no snapshot of this collector holds")
        return super().find_class(module, name)


def snapshot_bytes(data: dict) -> bytes:
    """Pickle a State.snapshot() (call it under the state lock: a consistent copy)."""
    return pickle.dumps({"version": SNAPSHOT_VERSION, "state": data}, protocol=pickle.HIGHEST_PROTOCOL)


def write_snapshot(state_dir: str, data) -> str:
    """``data``: snapshot_bytes(...) (or a State.snapshot() dict, pickled here). Atomic; on any failure
    the temp file is removed and the exception raised (the caller counts it)."""
    blob = data if isinstance(data, bytes) else snapshot_bytes(data)
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, SNAPSHOT_NAME)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)  # a full disk must not keep a half-written temp file holding its space
        except OSError:
            pass
        raise
    return path


def read_snapshot(state_dir: str) -> Optional[dict]:
    """The saved state, or None when there is none. Raises SnapshotError for a file that is not a
    readable snapshot of this collector (the caller moves it aside: ``set_aside``)."""
    path = os.path.join(state_dir, SNAPSHOT_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as fh:
            blob = SnapshotUnpickler(io.BytesIO(fh.read())).load()
    except SnapshotError:
        raise
    except Exception as exc:  # torn, truncated, foreign
        raise SnapshotError(f"unreadable ({type(exc).__name__}: {exc})"[:300]) from None
    if not isinstance(blob, dict) or blob.get("version") != SNAPSHOT_VERSION or not isinstance(blob.get("state"), dict):
        raise SnapshotError("not a snapshot of this collector's version")
    return blob["state"]


def set_aside(state_dir: str) -> str:
    """Move a bad snapshot out of the way (kept for a post-mortem); returns its new path."""
    path = os.path.join(state_dir, SNAPSHOT_NAME)
    dest = f"{path}.bad-{int(time.time())}"
    os.replace(path, dest)
    return dest


def check_writable(state_dir: str) -> None:
    """Fail at start-up, in one line, on a state directory the collector cannot write."""
    try:
        os.makedirs(state_dir, exist_ok=True)
        probe = os.path.join(state_dir, ".write-check")
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
    except OSError as exc:
        raise OSError(f"state_dir {state_dir}: not writable ({exc.strerror or exc})") from None


class Journal:
    """Append-only JSON lines, rotated at a size bound. Thread-safe."""

    def __init__(self, state_dir: str, max_bytes: int, on_error: Callable[[str], None] = lambda what: None):
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, JOURNAL_NAME)
        self.max_bytes = max_bytes
        self.on_error = on_error
        self._logged_error = False
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")
        self._size = self._fh.tell()
        if self._size and not self._ends_with_newline():
            self._fh.write("\n")  # a line torn by a kill: end it, so that the next line stays whole
            self._size += 1

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def __call__(self, record: dict) -> None:
        """Never raises: a write that fails (a full disk) is counted (``journal_write``) and logged once;
        the message it belongs to is still processed and counted as processed."""
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            try:
                if self._size + len(line) > self.max_bytes:
                    self._rotate()
                self._fh.write(line)
                self._size += len(line)
            except (OSError, ValueError) as exc:  # ValueError: the file was closed by a failed rotation
                self.on_error("journal_write")
                if not self._logged_error:
                    self._logged_error = True
                    log.warning("journal %s: write failed (%s); counted in "
                                "grokwatch_collector_persist_errors_total{what=\"journal_write\"}, logged once",
                                self.path, exc)

    def _rotate(self) -> None:
        self._fh.close()
        os.replace(self.path, self.path.replace(".jsonl", ".1.jsonl"))
        self._fh = open(self.path, "a", encoding="utf-8")
        self._size = 0

    def flush(self) -> None:
        with self._lock:
            try:
                self._fh.flush()
            except (OSError, ValueError):
                self.on_error("journal_write")

    def close(self) -> None:
        with self._lock:
            try:
                self._fh.close()  # flushes: on a full disk this is where the last lines fail
            except (OSError, ValueError):
                self.on_error("journal_write")


def read_journal(state_dir: str) -> Iterator[dict]:
    """Every record, oldest first (the rotated file, then the current one)."""
    for name in (JOURNAL_NAME.replace(".jsonl", ".1.jsonl"), JOURNAL_NAME):
        path = os.path.join(state_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a crash mid-write
