"""What a snapshot must hold before the collector uses it: every field's type, and every array's dtype,
shape and value range that the Numba kernels index by (issue 34: a window index out of range, from one
flipped byte on disk, passed the scratch render at start and then killed the process with SIGSEGV at the
next routing message; labels set to null made every message ``internal``).

``validate_state(data, config)`` raises ``SnapshotError`` naming the first field that is wrong; the caller
sets the file aside and starts fresh (collector/service.py ``_resume``). It checks what the kernels and the
views assume, not everything a snapshot could say: a counter that is a valid number but wrong is still
believed.
"""

from __future__ import annotations

import collections
from typing import Any, NoReturn

import numpy as np

from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.persist import SnapshotError

_MAX_INT = 1 << 63


def _fail(where: str, what: str) -> NoReturn:
    raise SnapshotError(f"{where}: {what}")


def _count(where: str, value: Any, lo: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= int(value) < _MAX_INT:
        _fail(where, f"not a count (got {type(value).__name__} {value!r:.40})")


def _number(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or value != value:
        _fail(where, f"not a number (got {type(value).__name__})")


def _str(where: str, value: Any) -> None:
    if not isinstance(value, str):
        _fail(where, f"not a string (got {type(value).__name__})")


def _dict(where: str, value: Any) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"not a table (got {type(value).__name__})")
    return value


def _counts_by_name(where: str, value: Any) -> None:
    for k, v in _dict(where, value).items():
        _str(f"{where} key", k)
        _count(f"{where}[{k!r}]", v)


def validate_state(data: dict, config: CollectorConfig) -> None:
    """Raise SnapshotError unless ``data`` (persist.load_snapshot_bytes) is safe to restore and run on."""
    from grokwatch.collector.runs import Runs
    from grokwatch.collector.senders import Senders
    from grokwatch.collector.stream import Stream

    for name in ("received_total", "lost_total", "samples_total", "processing_seconds_count", "disconnects_total"):
        if name in data:
            _count(name, data[name])
    if "processing_seconds_sum" in data:
        _number("processing_seconds_sum", data["processing_seconds_sum"])
    for name in ("rejected_total", "persist_errors", "handshake_failures", "loop_errors"):
        if name in data:
            _counts_by_name(name, data[name])
    if "wal_applied" in data:
        w = data["wal_applied"]
        if not isinstance(w, list) or len(w) != 2:
            _fail("wal_applied", "not a pair")
        for i, v in enumerate(w):
            _count(f"wal_applied[{i}]", v, lo=-1)
    held = data.get("wal_held", set())
    if not isinstance(held, set):
        _fail("wal_held", "not a set")
    for v in held:
        _count("wal_held", v)
    if "rng" in data and not isinstance(data["rng"], np.random.Generator):
        _fail("rng", "not a generator")
    for run, step in _dict("train_step", data.get("train_step", {})).items():
        _str("train_step key", run)
        _count(f"train_step[{run!r}]", step)
    for key, value in _dict("evals", data.get("evals", {})).items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            _fail("evals", "a key that is not (run, group)")
        if not (isinstance(value, tuple) and len(value) == 2):
            _fail(f"evals[{key!r}]", "not (step, score)")
        _count(f"evals[{key!r}] step", value[0])
        _number(f"evals[{key!r}] score", value[1])
    for run, counts in _dict("all_tokens", data.get("all_tokens", {})).items():
        _all_tokens(f"all_tokens[{run!r}]", run, counts, config.max_groups)
    runs = data.get("runs")
    if runs is not None and not isinstance(runs, Runs):
        _fail("runs", "not the run table")
    senders = data.get("senders")
    if senders is not None:
        _senders(senders, Senders)
    streams = _dict("streams", data.get("streams", {}))
    for key, stream in streams.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
            _fail("streams", "a key that is not (run, source)")
        if not isinstance(stream, Stream):
            _fail(f"streams[{key!r}]", "not a stream")
        where = f"streams[{key!r}]"
        if (stream.run, stream.source) != key:
            _fail(where, "its run and source are not its key")
        _stream(where, stream, config)
        if runs is not None and key[0] in runs.shapes:
            if tuple(runs.shapes[key[0]]) != (stream.num_layers, stream.num_experts, stream.top_k):
                _fail(where, "its shape is not its run's")


def _all_tokens(where: str, run: Any, counts: Any, max_groups: int) -> None:
    from grokwatch.collector.all_tokens import AllTokens

    _str(f"{where} key", run)
    if not isinstance(counts, AllTokens):
        _fail(where, "not the run's all-token counts")
    shape = counts.shape
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(isinstance(d, int) and d >= 1 for d in shape)):
        _fail(f"{where}.shape", "not (layers, experts)")
    for name in ("total_LE", "open_LE", "closed_LE"):
        _array(f"{where}.{name}", getattr(counts, name, None), shape, np.uint64)
    for name in ("forwards_total", "late_total", "closed_ranks"):
        _count(f"{where}.{name}", getattr(counts, name, None))
    for name in ("open_step", "closed_step"):
        _count(f"{where}.{name}", getattr(counts, name, None), lo=-1)
    if not isinstance(counts.open_ranks, set) or not all(isinstance(r, int) for r in counts.open_ranks):
        _fail(f"{where}.open_ranks", "not a set of ranks")
    for name in ("open_rank_max_L", "closed_rank_max_L"):
        _array(f"{where}.{name}", getattr(counts, name, None), (shape[0],), np.float64)
    _number(f"{where}.open_aux_sum", counts.open_aux_sum)
    _count(f"{where}.open_aux_n", counts.open_aux_n)
    _count(f"{where}.open_bias_rank", counts.open_bias_rank, lo=-1)
    if counts.closed_aux is not None:
        _number(f"{where}.closed_aux", counts.closed_aux)
    for name in ("open_bias_LE", "closed_bias_LE"):
        if getattr(counts, name) is not None:
            _array(f"{where}.{name}", getattr(counts, name), shape, np.float32)
    if counts.bias_drift_L is not None:
        _array(f"{where}.bias_drift_L", counts.bias_drift_L, (shape[0],), np.float64)
    for name in ("open_dropped_L", "closed_dropped_L"):
        if getattr(counts, name, None) is not None:
            _array(f"{where}.{name}", getattr(counts, name), (shape[0],), np.uint64)
    for name in ("open_groups", "closed_groups"):
        groups = _dict(f"{where}.{name}", getattr(counts, name, None))
        if len(groups) > max_groups + 1:
            _fail(f"{where}.{name}", f"more than max_groups + 1 ({max_groups + 1}) groups")
        for group, group_LE in groups.items():
            _str(f"{where}.{name} key", group)
            _array(f"{where}.{name}[{group!r}]", group_LE, shape, np.uint64)


def _senders(senders: Any, cls: type) -> None:
    from grokwatch.collector.senders import Sender

    if not isinstance(senders, cls):
        _fail("senders", "not the sender table")
    for sender, info in _dict("senders.records", getattr(senders, "records", None)).items():
        _str("senders.records key", sender)
        if not isinstance(info, Sender):
            _fail(f"senders.records[{sender!r}]", "not a sender")
        _str(f"senders.records[{sender!r}].run", info.run)
        _count(f"senders.records[{sender!r}].rank", info.rank)
        _count(f"senders.records[{sender!r}].last_seq", info.last_seq, lo=-1)
    for name in ("dormant", "order"):
        table = getattr(senders, name, None)
        if table is not None and not isinstance(table, collections.OrderedDict):
            _fail(f"senders.{name}", "not an ordered table")


def _array(where: str, a: Any, shape: tuple, dtype) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        _fail(where, f"not an array (got {type(a).__name__})")
    if a.dtype != np.dtype(dtype):
        _fail(where, f"dtype {a.dtype}, not {np.dtype(dtype)}")
    if a.shape != shape:
        _fail(where, f"shape {a.shape}, not {shape}")
    return a


def _within(where: str, a: np.ndarray, lo, hi) -> None:
    """Every value in [lo, hi]."""
    if a.size and (a.min() < lo or a.max() > hi):
        _fail(where, f"values outside [{lo}, {hi}] (from {a.min()} to {a.max()})")


def _stream(where: str, s: Any, config: CollectorConfig) -> None:
    from grokwatch.collector.memorization import MemorizationTracker
    from grokwatch.collector.phases import PhaseTracker
    from grokwatch.collector.stream import BOUNDS_RU, char_capacity

    for name in ("num_layers", "num_experts", "top_k", "window_slots", "latest_step"):
        _count(f"{where}.{name}", getattr(s, name, None))
    L, E, W = s.num_layers, s.num_experts, s.window_slots
    # (a stream keeps the window and distance unit it was made with: a changed setting applies to new ones)
    if not (1 <= L and 1 <= E and L * E <= 1 << 20 and 1 <= s.top_k <= E and 2 <= W <= 1 << 20):
        _fail(where, f"shape L {L}, E {E}, K {s.top_k}, W {W} out of range")
    if not isinstance(getattr(s, "use_chars", None), bool):
        _fail(f"{where}.use_chars", "not a flag")
    labels, index = getattr(s, "labels", None), getattr(s, "index", None)
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        _fail(f"{where}.labels", "not a list of names")
    if not isinstance(index, dict) or index != {label: g for g, label in enumerate(labels)}:
        _fail(f"{where}.index", "does not number its labels")
    shapes = s._group_shapes()
    filled_G = getattr(s, "win_filled_G", None)
    if not isinstance(filled_G, np.ndarray) or filled_G.ndim != 1:
        _fail(f"{where}.win_filled_G", "not a vector")
    G = len(filled_G)
    if G < len(labels):
        _fail(where, f"{G} group slots for {len(labels)} groups")
    arrays = {name: _array(f"{where}.{name}", getattr(s, name, None), (G,) + shape, dtype)
              for name, (shape, dtype) in shapes.items()}
    Y = L * (E + 1)
    C = char_capacity(L, E)
    _within(f"{where}.win_filled_G", arrays["win_filled_G"], 0, W)
    _within(f"{where}.win_next_G", arrays["win_next_G"], 0, W - 1)
    _within(f"{where}.zloss_filled_G", arrays["zloss_filled_G"], 0, W)
    _within(f"{where}.zloss_next_G", arrays["zloss_next_G"], 0, W - 1)
    _within(f"{where}.win_sym_GWY", arrays["win_sym_GWY"], 0, E)  # expert ids 0..E-1, SEP = E
    _within(f"{where}.win_len_GW", arrays["win_len_GW"], 0, Y)
    _within(f"{where}.win_chars_GWC", arrays["win_chars_GWC"], 0, 127)
    _within(f"{where}.win_chars_len_GW", arrays["win_chars_len_GW"], 0, C if s.use_chars else 1)
    _within(f"{where}.tokens_GW", arrays["tokens_GW"], 0, _MAX_INT - 1)
    for g in range(G):
        n = int(arrays["win_filled_G"][g])
        starts = arrays["win_starts_GWLp"][g, :n].astype(np.int64)
        lengths = arrays["win_len_GW"][g, :n]
        # build_pathway's layout: layer l's symbols from starts[l], a separator after each, starts[L] = S + 1
        if n and (np.any(starts[:, 0] != 0) or np.any(np.diff(starts, axis=1) < 1)
                  or np.any(starts[:, L] != lengths + 1)):
            _fail(f"{where}.win_starts_GWLp[{g}]", "layer starts that are not a pathway's")
    nh, nb1 = BOUNDS_RU.shape[0], BOUNDS_RU.shape[1] + 1
    for name, shape in (("xhist_RUp", (nh, nb1)), ("xhist_sum_R", (nh,)), ("xlayer_sum_L", (L,)),
                        ("xlayer_count_L", (L,))):
        _array(f"{where}.{name}", getattr(s, name, None), shape, np.float64)
    phases = _dict(f"{where}.phases", getattr(s, "phases", None))
    for label, tracker in phases.items():
        if not isinstance(label, str) or not isinstance(tracker, PhaseTracker):
            _fail(f"{where}.phases", "an entry that is not a group's phase tracker")
    memo = getattr(s, "memorization", None)
    if memo is not None and not isinstance(memo, MemorizationTracker):
        _fail(f"{where}.memorization", "not a memorization tracker")
    if (memo is None) != (s.source == "train"):
        _fail(f"{where}.memorization", "present for the train source, or missing for another")
    if not isinstance(getattr(s, "rng", None), np.random.Generator):
        _fail(f"{where}.rng", "not a generator")
