"""The pathway state of one (run, source): every group's window ring and
cumulative series, held in arrays so that one Numba call
(``kernels.process_samples``) handles a whole routing message.

Shapes (docs/shapes.md): G groups (grows), W window slots, Y pathway symbols (L·(E+1)),
C characters of the string form, L layers, E experts, R histograms, U bucket bounds.

Memory per (run, source) of G groups: ``Stream.bytes_for(G)``, exact (what ``max_memory_mb``
bounds) — about G·W·(2·Y + 4·(L+1) + 4·L·E + 8·L + 34) bytes (+ G·W·2·C with the `string` unit), e.g. OLMoE
(L=16, E=64), W=256, G=32: 52.5 MB (+ 64·L·E·4 + 512 bytes per group in probe and replay streams: the round's
ḡ rows, transfer.RoundRouting); see docs/collector.md.
"""

from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from grokwatch.collector import kernels, pairs
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.labels import BUCKET_PREFIX
from grokwatch.collector.memorization import MemorizationTracker
from grokwatch.collector.phases import PhaseTracker
from grokwatch.collector.transfer import RoundLosses, RoundRouting, round_transfer
from grokwatch.wire import FRESH_PREFIX

# Classic-histogram upper bounds (Prometheus `le`), per distribution; rows of hist_GRUp.
HISTOGRAM_BOUNDS = {
    "distance": (0.0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    "distance_normalized": tuple(round(0.05 * i, 2) for i in range(1, 21)),
    "consistency": (-1.0, -0.5, 0.0) + tuple(round(0.1 * i, 1) for i in range(1, 11)),
    "adjacent_cosine": tuple(round(-0.9 + 0.1 * i, 1) + 0.0 for i in range(20)),
    "probe_loss": tuple(float(0.001 * 2**i) for i in range(15)),
}
HIST_NAMES = tuple(HISTOGRAM_BOUNDS)  # order = kernels.H_DIST, H_NORM, H_CONS, H_COS, H_LOSS
assert HIST_NAMES == ("distance", "distance_normalized", "consistency", "adjacent_cosine", "probe_loss")
_BMAX = max(len(b) for b in HISTOGRAM_BOUNDS.values())
BOUNDS_RU = np.full((len(HIST_NAMES), _BMAX), np.inf)
NB_R = np.zeros(len(HIST_NAMES), np.int64)
for _h, _b in enumerate(HISTOGRAM_BOUNDS.values()):
    BOUNDS_RU[_h, : len(_b)] = _b
    NB_R[_h] = len(_b)


def char_capacity(num_layers: int, num_experts: int) -> int:
    digits = len(str(max(num_experts - 1, 0)))
    return num_layers * num_experts * (digits + 1) + num_layers


class HistogramView:
    """Read access to one group's histogram (bounds, bucket counts with +Inf last, sum)."""

    def __init__(self, bounds, counts, total):
        self.bounds, self.counts, self.sum = bounds, counts, float(total)

    @property
    def count(self) -> float:
        return float(self.counts.sum())


class SeriesView:
    def __init__(self, hist_RUp, hist_sum_R, layer_sum_L, layer_count_L, samples=0, undefined=0, latest_step=0):
        self.hist = {name: HistogramView(BOUNDS_RU[h, : NB_R[h]], hist_RUp[h, : NB_R[h] + 1], hist_sum_R[h])
                     for h, name in enumerate(HIST_NAMES)}
        self.layer_distance_sum_L = layer_sum_L
        self.layer_distance_count_L = layer_count_L
        self.samples_total = int(samples)
        self.consistency_undefined_total = int(undefined)
        self.latest_step = int(latest_step)


class WindowView:
    def __init__(self, stream: "Stream", g: int):
        self.stream, self.g = stream, g
        self.filled = int(stream.win_filled_G[g])
        self.len_W = stream.win_len_GW[g]
        self.sym_WY = stream.win_sym_GWY[g]

    def health(self, top_k: int) -> Optional[dict]:
        """METRICS.md §3 per layer over the window's tokens."""
        s, g, n = self.stream, self.g, self.filled
        if n == 0:
            return None
        tokens = float(s.tokens_GW[g, :n].sum())
        load_LE = s.topk_GWLE[g, :n].sum(axis=0, dtype=np.float64)
        share_LE = load_LE / (top_k * tokens)
        mean_L = share_LE.mean(axis=1)
        safe = np.where(mean_L > 0, mean_L, 1.0)
        return dict(
            imbalance_L=np.where(mean_L > 0, share_LE.max(axis=1) / safe, 0.0),
            cv_L=np.where(mean_L > 0, share_LE.std(axis=1) / safe, 0.0),
            dead_L=(load_LE == 0).sum(axis=1),
            entropy_L=(s.entropy_GWL[g, :n].astype(np.float64) * s.tokens_GW[g, :n, None]).sum(axis=0) / tokens,
            distinct=int(np.unique(s.win_fp_GW[g, :n]).size),
            share_LE=share_LE,  # each layer's load shares (sum 1): the parity statistics of view.py
            zloss_L=self._zloss_L(),
        )

    def _zloss_L(self) -> Optional[np.ndarray]:
        """Mean router z-loss per layer over the group's last W samples that carried one; None without."""
        s, g = self.stream, self.g
        filled = int(s.zloss_filled_G[g]) if g < len(s.zloss_filled_G) else 0
        return s.zloss_GWL[g, :filled].astype(np.float64).mean(axis=0) if filled else None


class GroupView:
    def __init__(self, stream: "Stream", g: int):
        self.window = WindowView(stream, g)
        self.series = SeriesView(stream.hist_GRUp[g], stream.hist_sum_GR[g], stream.layer_sum_GL[g],
                                 stream.layer_count_GL[g], stream.samples_G[g], stream.undefined_G[g],
                                 stream.latest_step_G[g])


_SCRATCH = ("sym_Y", "starts_Lp", "chars_C", "peq_AQ", "pv_Q", "mv_Q", "lpeq_LAQ", "lpv_Q", "lmv_Q", "x_layer_sum_L",
            "x_layer_n_L")
# Sources whose pairs are taken within one step only (METRICS.md §1: one probe round, one replayed checkpoint).
SAME_ROUND_SOURCES = ("probe", "replay")


class Stream:
    """One (run, source): its groups, cross-group baseline, phases, memorization."""

    # The group arrays (``_group_shapes``: one slot per group, allocated together in ``_allocate``).
    zloss_GWL: np.ndarray
    zloss_filled_G: np.ndarray
    zloss_next_G: np.ndarray
    win_sym_GWY: np.ndarray
    win_len_GW: np.ndarray
    win_starts_GWLp: np.ndarray
    win_fp_GW: np.ndarray
    win_id_GW: np.ndarray
    win_step_GW: np.ndarray
    win_chars_GWC: np.ndarray
    win_chars_len_GW: np.ndarray
    win_filled_G: np.ndarray
    win_next_G: np.ndarray
    topk_GWLE: np.ndarray
    tokens_GW: np.ndarray
    entropy_GWL: np.ndarray
    hist_GRUp: np.ndarray
    hist_sum_GR: np.ndarray
    layer_sum_GL: np.ndarray
    layer_count_GL: np.ndarray
    samples_G: np.ndarray
    undefined_G: np.ndarray
    latest_step_G: np.ndarray
    eligible_G: np.ndarray

    def __init__(self, run: str, source: str, num_layers: int, num_experts: int, top_k: int,
                 config: CollectorConfig, rng: np.random.Generator):
        self.run, self.source = run, source
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.window_slots = config.window_samples
        self.max_slots = config.max_groups + 1  # the labels a stream admits: max_groups, then "other"
        self.use_chars = config.distance_unit == "string"
        self.labels: list[str] = []
        self.index: dict[str, int] = {}
        self.phases: dict[str, PhaseTracker] = {}
        self.memorization = MemorizationTracker(
            delta=config.memorization_delta, consecutive=config.memorization_consecutive,
            epsilon=config.memorization_epsilon, max_samples=config.max_probe_samples,
            bucket_steps=config.memorization_bucket_steps) if source != "train" else None
        self.latest_step = 0
        self.comparisons = config.comparisons_per_sample  # m of its latest routing message (state.py, view.py)
        self.rng = rng
        self.lock = threading.Lock()  # held while the kernels write the arrays (pipeline.run)
        L = num_layers
        nh, nb1 = BOUNDS_RU.shape[0], BOUNDS_RU.shape[1] + 1
        self.xhist_RUp = np.zeros((nh, nb1))
        self.xhist_sum_R = np.zeros(nh)
        self.xlayer_sum_L = np.zeros(L)
        self.xlayer_count_L = np.zeros(L)
        self._allocate(0)
        self._init_scratch(config)
        self._init_transient()

    # ------------------------------------------------------------ storage

    @property
    def nbytes(self) -> int:
        """The bytes of this stream's group arrays now, with the round buffers they reserve (what
        ``max_memory_mb`` bounds)."""
        arrays = sum(getattr(self, name).nbytes for name in self._group_shapes())
        return arrays + len(self.win_filled_G) * self._round_bytes()

    def bytes_for(self, groups: int) -> int:
        """The bytes of the group arrays at ``groups`` slots, with their round buffers."""
        return groups * (self._round_bytes() + sum(int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                                                   for shape, dtype in self._group_shapes().values()))

    def _round_bytes(self) -> int:
        """Per group: the ḡ rows of one probe round (transfer.RoundRouting), in same-round sources only."""
        if self.source not in SAME_ROUND_SOURCES:
            return 0
        return RoundRouting.nbytes_per_label(self.num_layers, self.num_experts)

    def slots_for(self, g: int) -> int:
        """The slots the arrays hold once group index ``g`` exists (doubling, never past the cap)."""
        have = len(self.win_filled_G)
        if g < have:
            return have
        return max(g + 1, min(max(4, 2 * have), self.max_slots))

    def _group_shapes(self) -> dict:
        W, L, E = self.window_slots, self.num_layers, self.num_experts
        Y = L * (E + 1)
        C = char_capacity(L, E) if self.use_chars else 1
        nh, nb1 = BOUNDS_RU.shape[0], BOUNDS_RU.shape[1] + 1
        return dict(
            win_sym_GWY=((W, Y), np.int16), win_len_GW=((W,), np.int64), win_starts_GWLp=((W, L + 1), np.int32),
            win_fp_GW=((W,), np.uint64), win_id_GW=((W,), np.uint64), win_step_GW=((W,), np.int64),
            win_chars_GWC=((W, C), np.int16), win_chars_len_GW=((W,), np.int64),
            win_filled_G=((), np.int64), win_next_G=((), np.int64), topk_GWLE=((W, L, E), np.uint32),
            tokens_GW=((W,), np.int64), entropy_GWL=((W, L), np.float32), hist_GRUp=((nh, nb1), np.float64),
            hist_sum_GR=((nh,), np.float64), layer_sum_GL=((L,), np.float64), layer_count_GL=((L,), np.float64),
            samples_G=((), np.int64), undefined_G=((), np.int64), latest_step_G=((), np.int64),
            eligible_G=((), np.bool_), zloss_GWL=((W, L), np.float32), zloss_filled_G=((), np.int64),
            zloss_next_G=((), np.int64))

    def _allocate(self, groups: int) -> None:
        for name, (shape, dtype) in self._group_shapes().items():
            new = np.zeros((groups,) + shape, dtype)
            old = getattr(self, name, None)
            if old is not None and len(old):
                new[: len(old)] = old
            setattr(self, name, new)

    def _init_scratch(self, config: CollectorConfig) -> None:
        L, E = self.num_layers, self.num_experts
        # threads computing one message's pairs (collector/pairs.py); 0: the cores this process may use, at most 4
        self.pair_threads = config.pair_threads or min(4, pairs.available_cores())
        self.pairs_missed = 0  # planned pairs the kernel had to compute itself (0 unless pairs.py is wrong)
        self.planned_messages = 0
        self.mean_length = 0.0  # the pathways' recent mean length (symbols; the first message is not planned)
        self.sym_Y = np.zeros(L * (E + 1), np.int16)
        self.starts_Lp = np.zeros(L + 1, np.int32)
        self.chars_C = np.zeros(char_capacity(L, E), np.int16)
        longest = self.chars_C.shape[0] if self.use_chars else self.sym_Y.shape[0]
        words = (longest + 63) // 64
        self.peq_AQ = np.zeros((128 if self.use_chars else E + 1, words), np.uint64)
        self.pv_Q = np.zeros(words, np.uint64)
        self.mv_Q = np.zeros(words, np.uint64)
        layer_words = (E + 63) // 64
        self.lpeq_LAQ = np.zeros((L, E + 1, layer_words), np.uint64)
        self.lpv_Q = np.zeros(layer_words, np.uint64)
        self.lmv_Q = np.zeros(layer_words, np.uint64)
        self.x_layer_sum_L = np.zeros(L)  # the cross pairs' per-layer sums of one message (not journaled)
        self.x_layer_n_L = np.zeros(L)
        self.no_plan = pairs.empty_plan(L)  # the unplanned messages' (read-only to the kernel but for missed)
        self.sample_keys_N = np.zeros(0, np.uint64)  # the last processed message's keys, for transfers()

    def __getstate__(self):
        d = self.__dict__.copy()
        for k in _SCRATCH + ("lock", "round_losses", "round_routing", "transfer_open",
                             "transfer_closed", "pair_threads", "pairs_missed", "mean_length",
                             "planned_messages", "no_plan", "sample_keys_N"):
            d.pop(k, None)
        return d

    def _init_transient(self) -> None:
        """What a snapshot does not hold (``__getstate__`` leaves it out): the lock, the current probe
        round's losses and routing, the transfer rounds."""
        self.lock = threading.Lock()
        self.round_losses = RoundLosses()  # the current round's only
        self.round_routing = RoundRouting(self.num_layers, self.num_experts)
        self.transfer_open: dict = {}  # label -> (step, record) of the round in progress
        self.transfer_closed: dict = {}  # label -> the latest closed round's record (exported)

    def restore_scratch(self, config: CollectorConfig) -> None:
        """After a snapshot is read and migrated to this schema (persist.MIGRATIONS) and validated
        (schema.py), State.restore: the settings an older stream lacks (its label cap, its m) from the
        configuration, then the scratch and transient state. The rest of the code reads every attribute as
        it is."""
        self.__dict__.setdefault("max_slots", config.max_groups + 1)
        self.__dict__.setdefault("comparisons", config.comparisons_per_sample)
        self._init_scratch(config)
        self._init_transient()

    def add_group(self, label: str) -> int:
        g = len(self.labels)
        self.labels.append(label)
        self.index[label] = g
        if g >= len(self.win_filled_G):
            self._allocate(self.slots_for(g))
        # memorization buckets and fresh documents: not in the cross-group baseline
        self.eligible_G[g] = not label.startswith((BUCKET_PREFIX, FRESH_PREFIX))
        return g

    # ------------------------------------------------------------ views

    @property
    def groups(self) -> dict[str, GroupView]:
        return {label: GroupView(self, g) for label, g in self.index.items()}

    @property
    def cross(self) -> SeriesView:
        return SeriesView(self.xhist_RUp, self.xhist_sum_R, self.xlayer_sum_L, self.xlayer_count_L)

    # ------------------------------------------------------------ the hot path

    def process(self, msg, targets_N2: np.ndarray, tau: float, m: int, min_max_cosine: float):
        """Apply one routing message (kernels.process_samples). Returns the per-group statistics of this
        message: kernels.Sums (stats_GV, entropy_GL, load_GLE, layer-wise distance sums and counts)."""
        G, L, E = len(self.labels), self.num_layers, self.num_experts
        n = msg.num_samples
        sums = kernels.Sums(np.zeros((G, len(kernels.STAT_KEYS))), np.zeros((G, L)), np.zeros((G, L, E)),
                            np.zeros((G, L)), np.zeros((G, L)))
        u = self.rng.random((n, 2, m))
        ux = self.rng.random((n, m))
        has_cos = msg.adj_cosine_NJ is not None
        has_loss = msg.loss_N is not None
        cos = msg.adj_cosine_NJ if has_cos else np.zeros((n, max(L - 1, 0)), np.float32)
        loss = msg.loss_N if has_loss else np.zeros(n, np.float32)
        self.sample_keys_N = kernels.sample_keys(msg.sample_ids)
        samples = kernels.Samples(msg.mean_probs_NLE, msg.topk_counts_NLE, msg.token_counts_N, msg.entropy_NL, cos,
                                  has_cos, loss, has_loss, msg.step, targets_N2, u, ux,
                                  self.sample_keys_N, self.source in SAME_ROUND_SOURCES)
        windows, scratch = self.windows(), self.scratch()
        short = self.mean_length <= kernels.SELECT_MAX_LAYER_SYMBOLS * L  # (0 at first: select)
        params = kernels.Params(tau, self.use_chars, min_max_cosine, BOUNDS_RU, NB_R,
                                kernels.SELECT_FIRST if short else 0)
        threads = self.pair_threads
        if pairs.worth_planning(threads, n, m, self.mean_length):
            plan = pairs.new_plan(3 * n * m, L)
            paths = pairs.new_pathways(n, L, E, self.chars_C.shape[0] if self.use_chars else 1)
            pairs.plan_pairs(samples, windows, scratch, params, plan, paths)
            pairs.compute(plan, paths, windows, self.use_chars, E, threads)
            self.planned_messages += 1
        else:
            plan = self.no_plan
            plan.missed[0] = plan.cursor[0] = 0
        kernels.process_samples(
            samples, windows,
            kernels.Series(self.hist_GRUp, self.hist_sum_GR, self.layer_sum_GL, self.layer_count_GL, self.samples_G,
                           self.undefined_G, self.latest_step_G),
            kernels.Distances(self.xhist_RUp, self.xhist_sum_R, self.xlayer_sum_L, self.xlayer_count_L),
            sums, scratch, params, plan)
        self.pairs_missed += int(plan.missed[0])
        # the pathways' recent mean length, which decides whether the next message is planned
        self.mean_length = 0.5 * self.mean_length + 0.5 * float(sums.stats_GV[:, kernels.S_LEN].sum()) / max(
            float(sums.stats_GV[:, kernels.S_N].sum()), 1.0)
        if msg.zloss_NL is not None:
            self._add_zloss(msg.zloss_NL, targets_N2)
        return sums

    def windows(self) -> "kernels.Windows":
        """The kernels' view of every group's window ring (the groups that exist)."""
        G = len(self.labels)
        return kernels.Windows(self.win_sym_GWY, self.win_len_GW, self.win_starts_GWLp, self.win_fp_GW,
                               self.win_chars_GWC, self.win_chars_len_GW, self.win_filled_G[:G], self.win_next_G,
                               self.topk_GWLE, self.tokens_GW, self.entropy_GWL, self.eligible_G[:G], self.win_id_GW,
                               self.win_step_GW)

    def scratch(self) -> "kernels.Scratch":
        return kernels.Scratch(self.sym_Y, self.starts_Lp, self.chars_C, self.peq_AQ, self.pv_Q, self.mv_Q,
                               self.lpeq_LAQ, self.lpv_Q, self.lmv_Q, self.x_layer_sum_L, self.x_layer_n_L)

    def transfers(self, msg, targets_N2: np.ndarray) -> list[tuple[str, dict]]:
        """After ``process`` of the same message (under the same lock: pipeline.run; it hashed the sample ids): the
        transfer record of every group this probe or replay message touched that has fresh documents (collector/transfer.py), as (group, record)."""
        if self.source not in SAME_ROUND_SOURCES:
            return []
        labels = [self.labels[g] for g in targets_N2[:, 0]]
        if msg.loss_N is not None:
            for label, loss in zip(labels, msg.loss_N.tolist()):
                self.round_losses.add(label, msg.step, loss)
        for label, key, g_LE in zip(labels, self.sample_keys_N.tolist(), msg.mean_probs_NLE):  # process()'s keys
            self.round_routing.add(label, msg.step, key, g_LE)
        out = []
        for label in sorted({lb[len(FRESH_PREFIX):] if lb.startswith(FRESH_PREFIX) else lb for lb in labels}):
            if label.startswith(BUCKET_PREFIX):
                continue
            record = round_transfer(self, label, msg.step, self.rng)
            if record is not None:
                out.append((label, record))
                self._close_rounds(label, msg.step, record)
        return out

    def _close_rounds(self, label: str, step: int, record: dict) -> None:
        """The exported transfer is the latest *closed* round's (a later step has begun): a round in progress
        holds only part of its samples."""
        held = self.transfer_open.get(label)
        if held is not None and held[0] < step:
            self.transfer_closed[label] = held[1]
        if held is None or held[0] <= step:
            self.transfer_open[label] = (step, record)

    def _add_zloss(self, zloss_NL: np.ndarray, targets_N2: np.ndarray) -> None:
        """The samples' router z-loss into each target group's own ring of the last W samples that had one
        (outside the kernel: an optional field)."""
        W = self.window_slots
        for g in np.unique(targets_N2[targets_N2 >= 0]):
            rows = np.flatnonzero((targets_N2 == g).any(axis=1))[-W:]
            slots = (self.zloss_next_G[g] + np.arange(len(rows))) % W
            self.zloss_GWL[g, slots] = zloss_NL[rows]
            self.zloss_next_G[g] = (self.zloss_next_G[g] + len(rows)) % W
            self.zloss_filled_G[g] = min(W, self.zloss_filled_G[g] + len(rows))
