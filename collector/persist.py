"""Snapshots and the journal in the collector's state directory.

- ``snapshot.pkl``: the whole state, written atomically (temp file, fsync,
  rename) every ``snapshot_interval_s`` and at shutdown; read back at start so
  that no exported counter goes backwards across a restart. It is the
  collector's own file: pickle is safe here because nothing else writes it.
- ``journal.jsonl``: append-only JSON lines of the points the collector
  exported, one per (run, source, group, routing message), plus eval scores —
  the input of ``grokwatch report``. Bounded: past ``journal_max_bytes`` it is
  rotated to ``journal.1.jsonl`` (one generation kept).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import threading
from typing import Iterator, Optional

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "snapshot.pkl"
JOURNAL_NAME = "journal.jsonl"
SNAPSHOT_VERSION = 1


def write_snapshot(state_dir: str, data: dict) -> str:
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, SNAPSHOT_NAME)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        pickle.dump({"version": SNAPSHOT_VERSION, "state": data}, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def read_snapshot(state_dir: str) -> Optional[dict]:
    path = os.path.join(state_dir, SNAPSHOT_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as fh:
            blob = pickle.load(fh)
    except Exception as exc:  # a torn or foreign file: start fresh, say so
        log.warning("ignoring unreadable snapshot %s: %s", path, exc)
        return None
    if not isinstance(blob, dict) or blob.get("version") != SNAPSHOT_VERSION:
        log.warning("ignoring snapshot %s of another version", path)
        return None
    return blob["state"]


class Journal:
    """Append-only JSON lines, rotated at a size bound. Thread-safe."""

    def __init__(self, state_dir: str, max_bytes: int):
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, JOURNAL_NAME)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")
        self._size = self._fh.tell()

    def __call__(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            if self._size + len(line) > self.max_bytes:
                self._rotate()
            self._fh.write(line)
            self._size += len(line)

    def _rotate(self) -> None:
        self._fh.close()
        os.replace(self.path, self.path.replace(".jsonl", ".1.jsonl"))
        self._fh = open(self.path, "a", encoding="utf-8")
        self._size = 0

    def flush(self) -> None:
        with self._lock:
            self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


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
