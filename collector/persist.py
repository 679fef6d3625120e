"""Snapshots and the journal in the collector's state directory.

- ``snapshot.msgpack``: the whole state, serialized quiesced (a consistent
  copy) and written atomically (temp file, fsync, rename; the temp file is
  removed when a write fails) every ``snapshot_interval_s`` and at shutdown;
  read back at start so that no exported counter goes backwards across a clean
  restart. The format is data only (msgpack; numeric arrays, and the
  collector's own classes by name): a crafted file cannot run code. A file that
  cannot be read, or is not this collector's, is moved aside
  (``snapshot.msgpack.bad-<time>``), logged in one line and counted
  (``grokwatch_collector_persist_errors_total{what="snapshot_read"}``).
- ``journal.jsonl``: append-only JSON lines of the points the collector
  exported, one per (run, source, group, routing message), plus eval scores —
  the input of ``grokwatch report``. Bounded: past ``journal_max_bytes`` it is
  rotated to ``journal.1.jsonl`` (one generation kept).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from typing import Callable, Iterator, Optional, cast

import msgpack
import numpy as np

from grokwatch.collector.wal import _write_whole

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "snapshot.msgpack"
OLD_SNAPSHOT_NAME = "snapshot.pkl"  # an early development format (a pickle): refused, never read
MAGIC = b"GROKWATCH-SNAPSHOT\n"
JOURNAL_NAME = "journal.jsonl"
# The snapshot's schema version. The collector's classes are stored by their attributes, so adding, renaming
# or removing a persisted attribute changes the format: bump this and add the step from the old version to
# MIGRATIONS (as _from_2 gives older streams their newer arrays, empty), before schema.py validates. Only the
# settings a stream takes from the configuration are completed later (Stream.restore_scratch).
SNAPSHOT_VERSION = 4


PERSIST_ERRORS = ("snapshot_write", "snapshot_read", "journal_write", "wal_write", "wal_read")  # grokwatch_collector_persist_errors_total{what}

class SnapshotError(Exception):
    """A snapshot that is not this collector's, or cannot be read."""


# The snapshot format: msgpack, data only. Plain values are msgpack's own; everything else is an ext type
# whose payload is msgpack again: tuples, sets, deques, numeric numpy arrays and scalars, the generator's
# bit state, and the collector's own classes by name (their attributes). Reading builds nothing but these:
# no code is named by the file, so a crafted one can at worst be refused.
_TUPLE, _SET, _FROZENSET, _DEQUE, _NDARRAY, _NPSCALAR, _OBJECT, _GENERATOR, _ODICT = range(1, 10)
_DTYPES = frozenset(np.dtype(t).str for t in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                              "uint64", "float16", "float32", "float64"))


def _classes() -> dict:
    from grokwatch.collector.all_tokens import AllTokens
    from grokwatch.collector.memorization import MemorizationTracker, SampleHistory
    from grokwatch.collector.phases import PhaseConfig, PhaseTracker
    from grokwatch.collector.runs import Runs
    from grokwatch.collector.senders import Counters, Sender, Senders
    from grokwatch.collector.stream import Stream

    return {cls.__name__: cls for cls in (Stream, PhaseTracker, PhaseConfig, MemorizationTracker, SampleHistory,
                                          Senders, Sender, Counters, Runs, AllTokens)}


def _pack(obj) -> bytes:
    return cast(bytes, msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True))


def _default(obj):
    t = type(obj)
    if t is tuple:
        return msgpack.ExtType(_TUPLE, _pack(list(obj)))
    if t is set or t is frozenset:
        return msgpack.ExtType(_SET if t is set else _FROZENSET, _pack(sorted(obj, key=repr)))
    if t is collections.deque:
        return msgpack.ExtType(_DEQUE, _pack([obj.maxlen, list(obj)]))
    if t is collections.OrderedDict:
        return msgpack.ExtType(_ODICT, _pack([[k, v] for k, v in obj.items()]))
    if t is np.ndarray:
        if obj.dtype.str not in _DTYPES:
            raise TypeError(f"no snapshot of a {obj.dtype} array")
        return msgpack.ExtType(_NDARRAY, _pack([obj.dtype.str, list(obj.shape), np.ascontiguousarray(obj).tobytes()]))
    if isinstance(obj, np.generic):
        return msgpack.ExtType(_NPSCALAR, _pack([obj.dtype.str, obj.tobytes()]))
    if t is np.random.Generator:
        state = obj.bit_generator.state
        return msgpack.ExtType(_GENERATOR, _pack([state["bit_generator"], str(state["state"]["state"]),
                                                 str(state["state"]["inc"]), state["has_uint32"], state["uinteger"]]))
    if _known_class(t.__name__) is t:
        if "__getstate__" in t.__dict__:  # its own (Stream leaves out its scratch arrays and lock)
            attrs = obj.__getstate__()
        elif hasattr(t, "__slots__"):
            attrs = {k: getattr(obj, k) for k in t.__slots__ if hasattr(obj, k)}
        else:
            attrs = dict(obj.__dict__)
        return msgpack.ExtType(_OBJECT, _pack([t.__name__, attrs]))
    raise TypeError(f"no snapshot of a {t.__module__}.{t.__qualname__}")


def _unpack(data: bytes):
    return msgpack.unpackb(data, ext_hook=_ext, strict_map_key=False, raw=False, use_list=True)


def _ext(code: int, data: bytes):
    v = _unpack(data)
    if code == _TUPLE:
        return tuple(v)
    if code == _SET:
        return set(v)
    if code == _FROZENSET:
        return frozenset(v)
    if code == _DEQUE:
        maxlen, items = v
        return collections.deque(items, maxlen=maxlen)
    if code == _ODICT:
        return collections.OrderedDict((k, x) for k, x in v)
    if code == _NDARRAY:
        dtype, shape, raw = v
        if dtype not in _DTYPES:
            raise SnapshotError(f"holds an array of dtype {dtype!r}")
        return np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape).copy()
    if code == _NPSCALAR:
        dtype, raw = v
        if dtype not in _DTYPES:
            raise SnapshotError(f"holds a scalar of dtype {dtype!r}")
        return np.frombuffer(raw, dtype=np.dtype(dtype))[0]
    if code == _GENERATOR:
        name, state, inc, has_uint32, uinteger = v
        if name != "PCG64":
            raise SnapshotError(f"holds a {name!r} generator")
        bits = np.random.PCG64()
        bits.state = {"bit_generator": name, "state": {"state": int(state), "inc": int(inc)},
                      "has_uint32": has_uint32, "uinteger": uinteger}
        return np.random.Generator(bits)
    if code == _OBJECT:
        name, attrs = v
        cls = _known_class(name) if isinstance(name, str) else None
        if cls is None or not isinstance(attrs, dict):
            raise SnapshotError(f"holds a {name!r}, which no snapshot of this collector holds")
        obj = cls.__new__(cls)
        if "__setstate__" in cls.__dict__:
            obj.__setstate__(attrs)
        elif hasattr(cls, "__slots__"):
            for k, x in attrs.items():
                if k in cls.__slots__:
                    object.__setattr__(obj, k, x)
        else:
            obj.__dict__.update(attrs)
        return obj
    raise SnapshotError(f"holds an unknown type (ext {code})")


_CLASSES: dict = {}


def _known_class(name: str):
    """The collector's own class of that name a snapshot may hold, or None (imported on first use)."""
    if not _CLASSES:
        _CLASSES.update(_classes())
    return _CLASSES.get(name)


def snapshot_bytes(data: dict) -> bytes:
    """Serialize a State.snapshot() (call it quiesced: a consistent copy)."""
    return MAGIC + _pack({"version": SNAPSHOT_VERSION, "state": data})


def load_snapshot_bytes(blob: bytes) -> dict:
    """The state dict of ``snapshot_bytes``; SnapshotError for anything else."""
    if not blob.startswith(MAGIC):
        raise SnapshotError("not a snapshot of this collector (no grokwatch header)")
    try:
        data = _unpack(blob[len(MAGIC):])
    except SnapshotError:
        raise
    except Exception as exc:  # torn, truncated, foreign
        raise SnapshotError(f"unreadable ({type(exc).__name__}: {exc})"[:300]) from None
    version = data.get("version") if isinstance(data, dict) else None
    if version not in MIGRATIONS and version != SNAPSHOT_VERSION or not isinstance(data.get("state"), dict):
        raise SnapshotError(f"not a snapshot of this collector's version ({version!r}; reads "
                            f"{sorted(MIGRATIONS) + [SNAPSHOT_VERSION]})")
    state = data["state"]
    while version != SNAPSHOT_VERSION:
        state, version = MIGRATIONS[version](state), version + 1
    return state


def _from_2(state: dict) -> dict:
    """Version 2 -> 3: the run tables, kept by name beside the streams before runs.py, become its Runs; a
    stream from before the sample keys and steps or the z-loss ring gets them, empty."""
    for stream in (state.get("streams") or {}).values():
        if hasattr(stream, "_group_shapes") and isinstance(getattr(stream, "win_filled_G", None), np.ndarray) \
                and any(name not in stream.__dict__ for name in stream._group_shapes()):
            stream._allocate(len(stream.win_filled_G))
    if "runs" not in state:
        from grokwatch.collector.runs import Runs

        runs = Runs()
        for table, key in ((runs.shapes, "shapes"), (runs.layer_ids, "layer_ids"),
                           (runs.world_sizes, "world_sizes"), (runs.seen, "run_seen"),
                           (runs.shape_seen, "shape_seen")):
            table.update(state.pop(key, None) or {})
        state["runs"] = runs
    return state


def _from_3(state: dict) -> dict:
    """Version 3 -> 4: a run's all-token counts get their (empty) per-group sums and no dropped picks; the
    view's stale-read count is its exporter's now, not the state's."""
    for counts in (state.get("all_tokens") or {}).values():
        if not isinstance(getattr(counts, "__dict__", None), dict):
            continue  # not the class: schema.py refuses it
        for name, empty in (("open_groups", dict), ("closed_groups", dict), ("open_dropped_L", lambda: None),
                            ("closed_dropped_L", lambda: None)):
            if name not in counts.__dict__:
                setattr(counts, name, empty())
    state.pop("stale_stream_reads", None)
    return state


MIGRATIONS = {2: _from_2, 3: _from_3}  # version -> the step to the next


def write_snapshot(state_dir: str, data) -> str:
    """``data``: snapshot_bytes(...) (or a State.snapshot() dict, serialized here). Atomic; on any failure
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
    readable snapshot of this collector (the caller moves it aside: ``set_aside``), and for the pickle
    of an older version, which is not read (a pickle can name code)."""
    path = os.path.join(state_dir, SNAPSHOT_NAME)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(state_dir, OLD_SNAPSHOT_NAME)):
            raise SnapshotError(f"{OLD_SNAPSHOT_NAME} is an older version's pickle, not read (a pickle can run "
                                "code); counters start over once")
        return None
    with open(path, "rb") as fh:
        return load_snapshot_bytes(fh.read())


def set_aside(state_dir: str) -> str:
    """Move a bad snapshot (or an older version's pickle) out of the way, kept for a post-mortem; returns
    its new path."""
    path = os.path.join(state_dir, SNAPSHOT_NAME)
    if not os.path.exists(path) and os.path.exists(os.path.join(state_dir, OLD_SNAPSHOT_NAME)):
        path = os.path.join(state_dir, OLD_SNAPSHOT_NAME)
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
    """Append-only JSON lines, rotated at a size bound. Thread-safe. Each line is one unbuffered append,
    written whole or cut back (collector/wal.py's ``_write_whole``): a disk that fills mid-line leaves no torn
    line, and a SIGKILL loses no line already written. A journal that could not open its file (no
    descriptors, no inodes) counts each line it could not write and opens again once a second has passed."""

    def __init__(self, state_dir: str, max_bytes: int, on_error: Callable[[str], None] = lambda what: None,
                 clock: Callable[[], float] = time.monotonic):
        os.makedirs(state_dir, exist_ok=True)
        self.path = os.path.join(state_dir, JOURNAL_NAME)
        self.max_bytes = max_bytes
        self.on_error = on_error
        self.clock = clock
        self.failing = 0  # writes failed in a row (0: writing)
        self._lock = threading.Lock()
        self._fd: Optional[int] = None
        self._retry_at = 0.0
        self._size = 0
        self._open()  # at start-up an OSError is raised: the collector cannot start without its state dir

    @property
    def healthy(self) -> bool:
        return self.failing == 0

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and not self._ends_with_newline():
                size = _write_whole(fd, b"\n", size)  # a line torn by a kill: end it, so that the next stays whole
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, size

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) == b"\n"

    def __call__(self, record: dict) -> None:
        """Never raises: a write that fails (a full disk) is counted (``journal_write``) and logged once per
        outage; the message it belongs to is still processed and counted as processed."""
        try:
            line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        except (TypeError, ValueError) as exc:
            self._failed(exc)
            return
        failure, recovered = None, 0
        with self._lock:
            try:
                if self._fd is not None and self._size + len(line) > self.max_bytes:
                    self._rotate()
                if self._fd is None:
                    if self.clock() < self._retry_at:
                        raise OSError("the journal has no open file (it could not open one)")
                    self._open()
                assert self._fd is not None
                self._size = _write_whole(self._fd, line, self._size)
                recovered, self.failing = self.failing, 0
            except OSError as exc:
                failure = exc
                self.failing += 1
                if self._fd is None:
                    self._retry_at = self.clock() + 1.0
        if failure is not None:
            self._failed(failure)
        elif recovered:
            log.warning("journal %s: writing again after %d failed writes", self.path, recovered)

    def _failed(self, exc: Exception) -> None:
        """Count and log a failed write, never under this journal's lock: the counter takes the state's lock,
        which a message being journaled holds while it waits for this one (lock order: State, then Journal)."""
        self.on_error("journal_write")
        if self.failing <= 1:
            log.warning("journal %s: write failed (%s); counted in "
                        "grokwatch_collector_persist_errors_total{what=\"journal_write\"}, logged once until it "
                        "writes again", self.path, exc)

    def _rotate(self) -> None:
        """The current file becomes ``journal.1.jsonl`` and a new one is opened; should the open fail, the
        journal writes nothing (counted) until it can open one."""
        assert self._fd is not None
        os.replace(self.path, self.path.replace(".jsonl", ".1.jsonl"))
        os.close(self._fd)
        self._fd = None
        self._open()

    def flush(self) -> None:
        """Every line is written when it is appended: nothing is buffered here."""

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


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
