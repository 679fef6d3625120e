"""Per-(run, source, group) state: pathway windows, histograms, router health.

Runs on the processing thread; exporters read it under ``State.lock``.

Legend: W window slots, L layers, E experts, S pathway symbols, C characters.

Memory bound (documented in docs/collector.md): per group a window of
W x (2·L·(E+1) + 4·L·E + 4·L + 24) bytes (+ 2·C per slot with the `string`
unit), at most max_groups (+ memorization buckets, same cap) groups per
(run, source), three sources per run, max_runs runs.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import numpy as np

from grokwatch.collector import kernels
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.memorization import MemorizationTracker
from grokwatch.collector.phases import PhaseTracker
from grokwatch.wire import Eval, Heartbeat, Hello, Routing

CROSS_GROUP = "_cross"  # METRICS.md §1 cross-group baseline
OTHER_GROUP = "other"  # label values beyond max_groups
MIN_MAX_COSINE = 0.05  # METRICS.md §2: below this, consistency is undefined

# Classic-histogram upper bounds (Prometheus `le`), per distribution.
HISTOGRAM_BOUNDS = {
    "distance": (0.0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    "distance_normalized": tuple(round(0.05 * i, 2) for i in range(1, 21)),
    "consistency": (-1.0, -0.5, 0.0) + tuple(round(0.1 * i, 1) for i in range(1, 11)),
    "adjacent_cosine": tuple(round(-0.9 + 0.1 * i, 1) for i in range(20)),
    "probe_loss": tuple(float(0.001 * 2**i) for i in range(15)),
}


class Rejected(Exception):
    """A message that passed the wire checks but not the collector's own."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = np.asarray(bounds, np.float64)
        self.counts = np.zeros(len(bounds) + 1, np.float64)  # last slot: +Inf
        self.sum = 0.0

    def observe(self, values) -> None:
        values = np.asarray(values, np.float64)
        if values.size:
            self.sum += kernels.histogram_observe(self.bounds, self.counts, values)

    @property
    def count(self) -> float:
        return float(self.counts.sum())


class Series:
    """What one (run, source, group) exports cumulatively (sums and counts)."""

    def __init__(self, num_layers: int):
        self.hist = {name: Histogram(bounds) for name, bounds in HISTOGRAM_BOUNDS.items()}
        self.layer_distance_sum_L = np.zeros(num_layers)
        self.layer_distance_count_L = np.zeros(num_layers)
        self.samples_total = 0
        self.consistency_undefined_total = 0
        self.latest_step = 0


class Window:
    """The last W pathways of a group and their router-health inputs (a ring)."""

    def __init__(self, slots: int, num_layers: int, num_experts: int, with_chars: bool):
        self.slots = slots
        sym_cap = num_layers * (num_experts + 1)
        self.sym_WS = np.zeros((slots, sym_cap), np.int16)
        self.len_W = np.zeros(slots, np.int32)
        self.starts_WL1 = np.zeros((slots, num_layers + 1), np.int32)
        self.fingerprint_W = np.zeros(slots, np.uint64)
        self.chars_WC = np.zeros((slots, char_capacity(num_layers, num_experts)), np.int16) if with_chars else None
        self.chars_len_W = np.zeros(slots, np.int32)
        self.topk_WLE = np.zeros((slots, num_layers, num_experts), np.uint32)
        self.tokens_W = np.zeros(slots, np.int64)
        self.entropy_WL = np.zeros((slots, num_layers), np.float32)
        self.filled = 0
        self.next = 0

    def insert(self, sym, length, starts, chars, chars_len, topk_LE, tokens, entropy_L) -> None:
        s = self.next
        self.sym_WS[s, :length] = sym[:length]
        self.len_W[s] = length
        self.starts_WL1[s] = starts
        self.fingerprint_W[s] = kernels.fingerprint(sym, length)
        if self.chars_WC is not None:
            self.chars_WC[s, :chars_len] = chars[:chars_len]
            self.chars_len_W[s] = chars_len
        self.topk_WLE[s] = topk_LE
        self.tokens_W[s] = tokens
        self.entropy_WL[s] = entropy_L
        self.next = (s + 1) % self.slots
        self.filled = min(self.filled + 1, self.slots)

    def health(self, top_k: int) -> Optional[dict]:
        """METRICS.md §3 per layer over the window's tokens."""
        n = self.filled
        if n == 0:
            return None
        tokens = float(self.tokens_W[:n].sum())
        load_LE = self.topk_WLE[:n].sum(axis=0, dtype=np.float64)
        share_LE = load_LE / (top_k * tokens)
        mean_L = share_LE.mean(axis=1)
        safe = np.where(mean_L > 0, mean_L, 1.0)
        return dict(
            imbalance_L=np.where(mean_L > 0, share_LE.max(axis=1) / safe, 0.0),
            cv_L=np.where(mean_L > 0, share_LE.std(axis=1) / safe, 0.0),
            dead_L=(load_LE == 0).sum(axis=1),
            entropy_L=(self.entropy_WL[:n].astype(np.float64) * self.tokens_W[:n, None]).sum(axis=0) / tokens,
            distinct=int(np.unique(self.fingerprint_W[:n]).size),
        )


def char_capacity(num_layers: int, num_experts: int) -> int:
    digits = len(str(max(num_experts - 1, 0)))
    return num_layers * num_experts * (digits + 1) + num_layers


class Group:
    def __init__(self, window: Window, series: Series):
        self.window = window
        self.series = series


class Stream:
    """One (run, source): its groups, cross-group baseline, scratch buffers."""

    def __init__(self, run: str, source: str, num_layers: int, num_experts: int, top_k: int,
                 config: CollectorConfig, rng: np.random.Generator):
        self.run, self.source = run, source
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.groups: dict[str, Group] = {}
        self.phases: dict[str, PhaseTracker] = {}
        self.cross = Series(num_layers)
        self.memorization = MemorizationTracker(
            delta=config.memorization_delta, consecutive=config.memorization_consecutive,
            epsilon=config.memorization_epsilon, max_samples=config.max_probe_samples,
            bucket_steps=config.memorization_bucket_steps) if source != "train" else None
        self.latest_step = 0
        self._init_scratch(config)
        self.rng = rng

    def _init_scratch(self, config: CollectorConfig) -> None:
        L, E, m = self.num_layers, self.num_experts, config.comparisons_per_sample
        self.sym_S = np.zeros(L * (E + 1), np.int16)
        self.starts_L1 = np.zeros(L + 1, np.int32)
        self.chars_C = np.zeros(char_capacity(L, E), np.int16)
        longest = self.chars_C.shape[0] if config.distance_unit == "string" else self.sym_S.shape[0]
        words = (longest + 63) // 64
        self.alphabet = 128 if config.distance_unit == "string" else E + 1
        self.peq_AW = np.zeros((self.alphabet, words), np.uint64)
        self.pv_W = np.zeros(words, np.uint64)
        self.mv_W = np.zeros(words, np.uint64)
        self.dist_P = np.zeros(m, np.int64)
        self.norm_P = np.zeros(m, np.float64)
        self.layer_PL = np.zeros((m, L), np.int64)

    def __getstate__(self):
        d = self.__dict__.copy()
        for k in ("sym_S", "starts_L1", "chars_C", "peq_AW", "pv_W", "mv_W", "dist_P", "norm_P", "layer_PL"):
            d.pop(k, None)
        return d

    def restore_scratch(self, config: CollectorConfig) -> None:
        self._init_scratch(config)


class State:
    """Everything the collector knows. ``handle`` is called on the processing
    thread; exporters and snapshots read under ``lock``."""

    def __init__(self, config: CollectorConfig, journal: Optional[Callable[[dict], None]] = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.lock = threading.RLock()
        self.journal = journal or (lambda record: None)
        self.clock = clock
        self.rng = np.random.default_rng(config.seed)
        self.streams: dict[tuple[str, str], Stream] = {}
        self.shapes: dict[str, tuple[int, int, int]] = {}
        self.senders: dict[str, dict] = {}
        self.agent_counters: dict[tuple[str, int], dict] = {}  # retired senders folded in
        self.received_total = 0
        self.rejected_total: dict[str, int] = {}
        self.lost_total = 0
        self.samples_total = 0
        self.processing_seconds_sum = 0.0
        self.processing_seconds_count = 0
        self.last_message_lag_s = 0.0
        self.train_step: dict[str, int] = {}
        self.evals: dict[tuple[str, str], tuple[int, float]] = {}

    # ------------------------------------------------------------- counters

    def count_rejected(self, reason: str) -> None:
        with self.lock:
            self.rejected_total[reason] = self.rejected_total.get(reason, 0) + 1

    def count_received(self) -> None:
        with self.lock:
            self.received_total += 1

    # ------------------------------------------------------------- messages

    def handle(self, msg) -> None:
        """Apply one decoded message. Raises ``Rejected`` for a message that is
        valid on its own but not here (shape mismatch, stale, duplicate)."""
        started = time.perf_counter()
        with self.lock:
            now = self.clock()
            self._sequence(msg)  # first, so a stale message is not also counted as lost
            if now - msg.wall_time > self.config.max_message_age_s:
                raise Rejected("stale")
            if isinstance(msg, Hello):
                self._hello(msg)
            elif isinstance(msg, Routing):
                self._routing(msg)
            elif isinstance(msg, Eval):
                self._eval(msg)
            elif isinstance(msg, Heartbeat):
                self._heartbeat(msg)
            self.last_message_lag_s = max(0.0, now - msg.wall_time)
            self.processing_seconds_sum += time.perf_counter() - started
            self.processing_seconds_count += 1

    def _sequence(self, msg) -> None:
        info = self.senders.get(msg.sender)
        if info is None:
            if len(self.senders) >= 4096:
                self._retire_oldest_sender()
            info = self.senders[msg.sender] = dict(run=msg.run, rank=msg.rank, last_seq=-1, hello=None,
                                                   sent=0, dropped={}, hook_errors=0, disabled=False,
                                                   seen=self.clock())
        if msg.seq <= info["last_seq"]:
            raise Rejected("duplicate")
        self.lost_total += msg.seq - info["last_seq"] - 1
        info["last_seq"] = msg.seq
        info["seen"] = self.clock()

    def _retire_oldest_sender(self) -> None:
        oldest = min(self.senders, key=lambda s: self.senders[s]["seen"])
        info = self.senders.pop(oldest)
        acc = self.agent_counters.setdefault((info["run"], info["rank"]), dict(sent=0, dropped={}, hook_errors=0))
        acc["sent"] += info["sent"]
        acc["hook_errors"] += info["hook_errors"]
        for reason, n in info["dropped"].items():
            acc["dropped"][reason] = acc["dropped"].get(reason, 0) + n

    def _check_shape(self, run: str, shape: tuple[int, int, int]) -> None:
        known = self.shapes.get(run)
        if known is None:
            if len(self.shapes) >= self.config.max_runs:
                raise Rejected("too_many_runs")
            self.shapes[run] = shape
        elif known != shape:
            raise Rejected("shape_mismatch")

    def _hello(self, msg: Hello) -> None:
        self._check_shape(msg.run, (msg.num_layers, msg.num_experts, msg.top_k))
        self.senders[msg.sender]["hello"] = dict(host=msg.host, world_size=msg.world_size,
                                                 agent_version=msg.agent_version, distribution=msg.distribution,
                                                 has_cosines=msg.has_cosines)

    def _heartbeat(self, msg: Heartbeat) -> None:
        info = self.senders[msg.sender]
        info.update(sent=msg.messages_sent, dropped=dict(msg.messages_dropped), hook_errors=msg.hook_errors,
                    disabled=msg.disabled)

    def _eval(self, msg: Eval) -> None:
        for group, score in msg.scores.items():
            self.evals[(msg.run, group)] = (msg.step, score)
        self.journal(dict(kind="eval", run=msg.run, step=msg.step, scores=dict(msg.scores), t=msg.wall_time))

    def group_label(self, stream: Stream, label: str) -> str:
        """The label a sample is counted under; admits (creates) new groups up to the cap."""
        if label in stream.groups:
            return label
        if label == CROSS_GROUP or (label != OTHER_GROUP and len(stream.groups) >= self.config.max_groups):
            label = OTHER_GROUP
        self._group(stream, label)
        return label

    def _group(self, stream: Stream, label: str) -> Group:
        group = stream.groups.get(label)
        if group is None:
            window = Window(self.config.window_samples, stream.num_layers, stream.num_experts,
                            self.config.distance_unit == "string")
            group = stream.groups[label] = Group(window, Series(stream.num_layers))
        return group

    def _stream(self, msg: Routing) -> Stream:
        L, E = msg.mean_probs_NLE.shape[1:]
        self._check_shape(msg.run, (L, E, msg.top_k))
        key = (msg.run, msg.source)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = Stream(msg.run, msg.source, L, E, msg.top_k, self.config,
                                                np.random.default_rng(self.rng.integers(2**63)))
        return stream

    def _routing(self, msg: Routing) -> None:
        stream = self._stream(msg)
        if msg.source == "train":
            self.train_step[msg.run] = max(self.train_step.get(msg.run, 0), msg.step)
        stream.latest_step = max(stream.latest_step, msg.step)
        labels = [self.group_label(stream, g) for g in msg.groups]
        memorized = [None] * msg.num_samples
        if stream.memorization is not None and msg.loss_N is not None:
            memorized = stream.memorization.observe(msg.step, msg.sample_ids, labels, msg.loss_N)
        stats: dict[str, dict] = {}
        for i in range(msg.num_samples):
            targets = [labels[i]]
            if memorized[i] is not None:
                bucket = self.group_label(stream, stream.memorization.bucket_label(memorized[i]))
                if bucket not in targets:
                    targets.append(bucket)
            self._sample(stream, msg, i, targets, stats)
            self.samples_total += 1
        for label, st in stats.items():
            point = _finish_stats(st)
            tracker = stream.phases.get(label)
            if tracker is None:
                tracker = stream.phases[label] = PhaseTracker(self.config.phase_config())
            tracker.add(msg.step, point["loss"], point["distance_normalized"], point["consistency"])
            self.journal(dict(kind="point", run=msg.run, source=msg.source, group=label, step=msg.step,
                              t=msg.wall_time, phase=tracker.phase, **point))

    def _sample(self, stream: Stream, msg: Routing, i: int, targets: list[str], stats: dict) -> None:
        config = self.config
        length = kernels.build_pathway(msg.mean_probs_NLE[i], config.pathway_tau, stream.sym_S, stream.starts_L1)
        chars_len = 0
        if config.distance_unit == "string":
            chars_len = kernels.pathway_chars(stream.sym_S, length, stream.num_experts, stream.chars_C)
        cosine = None if msg.adj_cosine_NL1 is None else msg.adj_cosine_NL1[i].astype(np.float64)
        loss = None if msg.loss_N is None else float(msg.loss_N[i])
        tokens = int(msg.token_counts_N[i])
        entropy = float(msg.entropy_NL[i].mean())
        for label in targets:
            group = self._group(stream, label)
            st = stats.setdefault(label, _new_stats())
            self._compare(stream, group.window, group.series, length, chars_len, st, "")
            if label == targets[0]:  # the memorization bucket is a second view, not a second sample
                self._compare_cross(stream, label, length, chars_len, st)
            series = group.series
            series.samples_total += 1
            series.latest_step = max(series.latest_step, msg.step)
            if cosine is not None and cosine.size:
                raw = float(cosine.mean())
                series.hist["adjacent_cosine"].observe([raw])
                st["cos_sum"] += raw
                st["cos_n"] += 1
                top = float(cosine.max())
                if cosine.size >= 2 and top > MIN_MAX_COSINE:
                    smooth = float((cosine / (top + 1e-8)).mean())  # 1 - C_i
                    series.hist["consistency"].observe([smooth])
                    st["cons_sum"] += smooth
                    st["cons_n"] += 1
                else:
                    series.consistency_undefined_total += 1
            if loss is not None:
                series.hist["probe_loss"].observe([loss])
                st["loss_sum"] += loss
                st["loss_n"] += 1
            st["entropy_sum"] += entropy * tokens
            st["tokens"] += tokens
            if st["entropy_L"] is None:
                st["entropy_L"] = np.zeros(stream.num_layers)
                st["load_LE"] = np.zeros((stream.num_layers, stream.num_experts))
            st["entropy_L"] += msg.entropy_NL[i] * tokens
            st["load_LE"] += msg.topk_counts_NLE[i]
            st["n"] += 1
            group.window.insert(stream.sym_S, length, stream.starts_L1, stream.chars_C, chars_len,
                                msg.topk_counts_NLE[i], tokens, msg.entropy_NL[i])

    def _distances(self, stream: Stream, window: Window, picks: np.ndarray, length: int, chars_len: int):
        p = picks.shape[0]
        if self.config.distance_unit == "string":
            kernels.compare_to_window(stream.chars_C, chars_len, window.chars_WC, window.chars_len_W, picks,
                                      stream.alphabet, stream.peq_AW, stream.pv_W, stream.mv_W,
                                      stream.dist_P[:p], stream.norm_P[:p])
        else:
            kernels.compare_to_window(stream.sym_S, length, window.sym_WS, window.len_W, picks, stream.alphabet,
                                      stream.peq_AW, stream.pv_W, stream.mv_W, stream.dist_P[:p],
                                      stream.norm_P[:p])
        kernels.layer_distances(stream.sym_S, stream.starts_L1, window.sym_WS, window.starts_WL1, picks,
                                stream.num_experts + 1, stream.layer_PL[:p])
        return stream.dist_P[:p], stream.norm_P[:p], stream.layer_PL[:p]

    def _observe(self, series: Series, dist, norm, layer, st: dict, prefix: str) -> None:
        series.hist["distance"].observe(dist)
        series.hist["distance_normalized"].observe(norm)
        series.layer_distance_sum_L += layer.sum(axis=0)
        series.layer_distance_count_L += layer.shape[0]
        st[prefix + "dist_sum"] += float(dist.sum())
        st[prefix + "norm_sum"] += float(norm.sum())
        st[prefix + "dist_n"] += int(dist.shape[0])

    def _compare(self, stream, window, series, length, chars_len, st, prefix) -> None:
        filled = window.filled
        if filled == 0:
            return
        m = self.config.comparisons_per_sample
        picks = (np.arange(filled, dtype=np.int64) if filled <= m
                 else stream.rng.integers(0, filled, m, dtype=np.int64))
        dist, norm, layer = self._distances(stream, window, picks, length, chars_len)
        self._observe(series, dist, norm, layer, st, prefix)

    def _compare_cross(self, stream: Stream, label: str, length: int, chars_len: int, st: dict) -> None:
        """METRICS.md §1 cross-group baseline: m pairs drawn uniformly over the
        other groups' windows (memorization buckets excluded)."""
        others = [g for name, g in stream.groups.items()
                  if name != label and not name.startswith("mem@") and g.window.filled]
        if not others:
            return
        sizes = np.array([g.window.filled for g in others])
        draws = stream.rng.integers(0, sizes.sum(), self.config.comparisons_per_sample)
        owner = np.searchsorted(np.cumsum(sizes), draws, side="right")
        offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        for j in np.unique(owner):
            picks = (draws[owner == j] - offsets[j]).astype(np.int64)
            dist, norm, layer = self._distances(stream, others[j].window, picks, length, chars_len)
            self._observe(stream.cross, dist, norm, layer, st, "x_")

    # ------------------------------------------------------------- export view

    def agent_totals(self) -> dict[tuple[str, int], dict]:
        """Agents' counters per (run, rank): retired senders plus the live ones,
        so a restarted agent never makes a total go backwards."""
        out = {k: dict(sent=v["sent"], dropped=dict(v["dropped"]), hook_errors=v["hook_errors"])
               for k, v in self.agent_counters.items()}
        for info in self.senders.values():
            acc = out.setdefault((info["run"], info["rank"]), dict(sent=0, dropped={}, hook_errors=0))
            acc["sent"] += info["sent"]
            acc["hook_errors"] += info["hook_errors"]
            for reason, n in info["dropped"].items():
                acc["dropped"][reason] = acc["dropped"].get(reason, 0) + n
        return out

    # ------------------------------------------------------------- snapshot

    SNAPSHOT_FIELDS = ("streams", "shapes", "senders", "agent_counters", "received_total", "rejected_total",
                       "lost_total", "samples_total", "processing_seconds_sum", "processing_seconds_count",
                       "train_step", "evals", "rng")

    def snapshot(self) -> dict:
        with self.lock:
            return {name: getattr(self, name) for name in self.SNAPSHOT_FIELDS}

    def restore(self, data: dict) -> None:
        with self.lock:
            for name in self.SNAPSHOT_FIELDS:
                if name in data:
                    setattr(self, name, data[name])
            for stream in self.streams.values():
                stream.restore_scratch(self.config)


def _new_stats() -> dict:
    keys = ("n", "tokens", "entropy_sum", "dist_sum", "norm_sum", "dist_n", "x_dist_sum", "x_norm_sum", "x_dist_n",
            "cons_sum", "cons_n", "cos_sum", "cos_n", "loss_sum", "loss_n")
    return dict(dict.fromkeys(keys, 0), entropy_L=None, load_LE=None)


def _finish_stats(st: dict) -> dict:
    def mean(key, n):
        return st[key] / st[n] if st[n] else None

    return dict(
        samples=st["n"],
        distance=mean("dist_sum", "dist_n"),
        distance_normalized=mean("norm_sum", "dist_n"),
        cross_distance=mean("x_dist_sum", "x_dist_n"),
        cross_distance_normalized=mean("x_norm_sum", "x_dist_n"),
        consistency=mean("cons_sum", "cons_n"),
        adjacent_cosine=mean("cos_sum", "cos_n"),
        entropy=mean("entropy_sum", "tokens"),
        loss=mean("loss_sum", "loss_n"),
        # Router health of this message's samples, per layer (for reports).
        entropy_layers=(st["entropy_L"] / st["tokens"]).round(6).tolist() if st["tokens"] else None,
        imbalance_layers=_imbalance(st["load_LE"]),
    )


def _imbalance(load_LE) -> Optional[list]:
    if load_LE is None:
        return None
    mean_L = load_LE.mean(axis=1)
    return np.where(mean_L > 0, load_LE.max(axis=1) / np.where(mean_L > 0, mean_L, 1), 0.0).round(6).tolist()
