"""One snapshot of the collector's state as metric families — the single
source of truth that both exporters (Prometheus, OpenTelemetry) render.

The families are declared once (``SPECS``: name, kind, help, labels), their samples are typed
(``Sample`` with a number, a ``HistogramValue`` or a ``SummaryValue``); names, kinds and label sets
are frozen by tests/unit/test_metric_names.py: dashboards and alerts depend on them.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple, Optional, Union

import numpy as np

from grokwatch._version import __version__
from grokwatch.collector.labels import CROSS_GROUP
from grokwatch.collector.persist import PERSIST_ERRORS
from grokwatch.collector.phases import PHASES
from grokwatch.collector.reasons import COLLECTOR_REASONS
from grokwatch.collector.state import State
from grokwatch.wire import REASONS as WIRE_REASONS

HANDSHAKE_REASONS = ("auth", "protocol", "incomplete", "connection_cap")  # ingest.py's socket monitor
LOOP_THREADS = ("receive", "process", "snapshot")  # threads that count and survive an unexpected exception

ALL_REASONS = tuple(WIRE_REASONS) + COLLECTOR_REASONS  # every value of ..._messages_rejected_total{reason}

GROUP_LABELS = ("run", "source", "group")
LAYER_LABELS = ("run", "source", "group", "layer")
LOAD_PERCENTILES = (0, 25, 50, 75, 100)  # min, p25, median, p75, max of a layer's expert load shares
STREAM_WAIT_S = 0.5  # how long a scrape waits for a stream its kernels hold


def load_share_stats(share_E: np.ndarray, k: int) -> dict:
    """One layer's expert load shares (sum 1) -> the statistics MoE frameworks log beside imbalance and CV
    (docs/collector.md, "Router health"): percentiles (linear interpolation), population std, the top and
    bottom K experts by share (ties to the lower index), and the expert-diversity score exp(H) / E with
    H the entropy of the shares in nats (1 = uniform load, 1/E = one expert takes all)."""
    share_E = np.asarray(share_E, dtype=np.float64)
    E = share_E.size
    k = min(int(k), E)
    total = share_E.sum()
    p = share_E / total if total > 0 else np.full(E, 1.0 / E)
    nz = p[p > 0]
    order = np.arange(E)
    top = np.lexsort((order, -share_E))[:k]
    bottom = np.lexsort((order, share_E))[:k]
    return dict(percentiles=np.percentile(share_E, LOAD_PERCENTILES), std=float(share_E.std()),
                top=[(int(e), float(share_E[e])) for e in top], bottom=[(int(e), float(share_E[e])) for e in bottom],
                diversity=float(np.exp(-(nz * np.log(nz)).sum()) / E))

HISTOGRAMS = {
    # name suffix -> (state histogram key, help)
    "pathway_distance": ("distance", "Pathway edit distance of sample pairs of the group (METRICS.md §1)"),
    "pathway_distance_normalized": ("distance_normalized", "Pathway edit distance over the longer pathway's length"),
    "pathway_consistency": ("consistency", "Per-sample pathway consistency 1 - C_i, higher is smoother (METRICS.md §2)"),
    "pathway_adjacent_cosine": ("adjacent_cosine", "Per-sample mean cosine of adjacent-layer routing embeddings"),
    "probe_loss": ("probe_loss", "Per-sample mean NLL measured by the probe"),
}


# Histograms whose values can be negative (METRICS.md §2): OpenMetrics allows them no _sum (nor _count),
# so their running sum is a gauge of its own, <name>_sum_signed, and their count the +Inf bucket.
SIGNED_HISTOGRAMS = ("pathway_consistency", "pathway_adjacent_cosine")
SIGNED_SUM = "_sum_signed"


Kind = Literal["counter", "gauge", "histogram", "summary"]


class HistogramValue(NamedTuple):
    """One series of a histogram: upper bounds (``le``, +Inf left out), the count in each bucket (not
    cumulative; +Inf last, so one more than the bounds) and the sum of the values observed."""

    bounds: np.ndarray
    counts: np.ndarray
    sum: float


class SummaryValue(NamedTuple):
    """One series of a summary without quantiles: how many values were observed and their sum."""

    count: float
    sum: float


Value = Union[int, float, np.number, HistogramValue, SummaryValue]


def scalar(value: Value) -> float:
    """A counter's or gauge's value as a float."""
    if isinstance(value, (HistogramValue, SummaryValue)):
        raise TypeError(f"a number, not {type(value).__name__}")
    return float(value)


class Sample(NamedTuple):
    labels: tuple[str, ...]  # in the order of the family's label names
    value: Value


@dataclass(frozen=True)
class Spec:
    name: str  # without the "grokwatch_" prefix
    kind: Kind
    help: str
    labels: tuple[str, ...]
    signed: bool = False  # a histogram whose values can be negative: no _sum, its sum the gauge <name>_sum_signed


@dataclass
class Family:
    name: str  # the exported name
    kind: Kind
    help: str
    labels: tuple[str, ...]
    samples: list[Sample] = field(default_factory=list)
    signed: bool = False  # Spec.signed: every exporter reads it here

    def add(self, values: tuple, value: Value) -> None:
        self.samples.append(Sample(tuple(str(v) for v in values), value))


def _specs() -> tuple[Spec, ...]:
    specs: list[Spec] = []

    def fam(name: str, kind: Kind, help_: str, labels: tuple[str, ...], signed: bool = False) -> None:
        specs.append(Spec(name, kind, help_, labels, signed))

    for suffix, (_, help_) in HISTOGRAMS.items():
        fam(suffix, "histogram", help_, GROUP_LABELS, signed=suffix in SIGNED_HISTOGRAMS)
    for suffix in SIGNED_HISTOGRAMS:
        fam(suffix + SIGNED_SUM, "gauge", f"Sum of the values observed by grokwatch_{suffix} (it can fall: their mean "
            "over a range is delta() of this over delta() of its +Inf bucket)", GROUP_LABELS)
    fam("pathway_layer_distance", "summary", "Layer-wise pathway edit distance (sum and count per layer)",
        LAYER_LABELS)
    fam("pathway_samples_total", "counter", "Samples whose pathways entered the group's window", GROUP_LABELS)
    fam("pathway_consistency_undefined_total", "counter",
        "Samples without a defined consistency (L < 3 or max adjacent cosine <= 0.05)", GROUP_LABELS)
    fam("expert_load_imbalance_ratio", "gauge", "Max over mean expert load share over the window", LAYER_LABELS)
    fam("expert_load_cv", "gauge", "Coefficient of variation of the expert load shares over the window",
        LAYER_LABELS)
    fam("dead_experts", "gauge", "Experts no token put in its top-k over the window", LAYER_LABELS)
    fam("routing_entropy_ratio", "gauge", "Mean per-token routing entropy over log E, over the window",
        LAYER_LABELS)
    fam("router_zloss", "gauge", "Mean router z-loss, logsumexp(router logits) squared, over the group's window "
        "(only from agents whose routers give softmax logits)", LAYER_LABELS)
    fam("expert_load_share_percentile", "gauge", "Percentiles of the layer's expert load shares over the window "
        "(0 = min, 50 = median, 100 = max)", LAYER_LABELS + ("percentile",))
    fam("expert_load_share_std", "gauge", "Standard deviation of the layer's expert load shares over the window",
        LAYER_LABELS)
    fam("expert_load_diversity", "gauge", "exp(entropy of the expert load shares) / E over the window: 1 uniform, "
        "1/E one expert", LAYER_LABELS)
    fam("expert_load_rank_expert", "gauge", "The expert index at each rank by load share (end top: rank 1 the "
        "most loaded; end bottom: rank 1 the least)", LAYER_LABELS + ("end", "rank"))
    fam("expert_load_rank_share", "gauge", "The load share of the expert at each rank (as expert_load_rank_expert)",
        LAYER_LABELS + ("end", "rank"))
    fam("distinct_pathways", "gauge", "Distinct pathways in the group's window (exact)", GROUP_LABELS)
    fam("pathway_comparisons_effective", "gauge", "Pairs per sample of the stream's latest routing message: "
        "comparisons_per_sample, or fewer while the collector is behind (a noisier, still unbiased estimate)",
        ("run", "source"))
    fam("memorized_samples", "gauge", "Probe samples memorized (METRICS.md §4)", GROUP_LABELS)
    fam("group_latest_step", "gauge", "Latest training step seen for the group", GROUP_LABELS)
    fam("group_phase", "gauge", "1 for the group's current phase, 0 for the others (METRICS.md §5)",
        GROUP_LABELS + ("phase",))
    fam("group_memorized_step", "gauge", "Step at which the group was detected memorized (its loss low and flat), "
        "from the source that carries its phase only", GROUP_LABELS)
    fam("group_onset_step", "gauge", "Step at which the group began generalizing (grokking onset), from the source "
        "that carries its phase only", GROUP_LABELS)
    fam("group_transfer", "gauge", "Train-fresh routing discrepancy E of the group's latest closed probe round "
        "(METRICS.md §6; experimental: docs/groundtruth.md)", GROUP_LABELS)
    fam("group_transfer_z", "gauge", "E's z-score against its permutation null, same round", GROUP_LABELS)
    fam("group_transfer_js", "gauge", "Train-fresh discrepancy E on the samples' mean routing (Jensen-Shannon, nats, "
        "mean over layers), same round (METRICS.md §6; experimental)", GROUP_LABELS)
    fam("group_transfer_js_z", "gauge", "E_js's z-score against its permutation null, same round", GROUP_LABELS)
    fam("group_fresh_loss_gap", "gauge", "Mean loss of the group's fresh documents minus its training samples', same "
        "round (the label-free baseline)", GROUP_LABELS)
    fam("router_all_tokens_load_imbalance_ratio", "gauge", "Max over mean tokens per expert over every routed "
        "token of the run's latest closed interval, all ranks summed (the framework's own figure)", ("run", "layer"))
    fam("router_all_tokens_rank_load_imbalance_max", "gauge", "The largest of the ranks' own max over mean tokens "
        "per expert in the same interval (OLMo-core's load imbalance, reduced across ranks by max)",
        ("run", "layer"))
    fam("router_all_tokens_load_cv", "gauge", "Coefficient of variation of the tokens per expert, same interval",
        ("run", "layer"))
    fam("router_all_tokens_dead_experts", "gauge", "Experts no token picked in the same interval", ("run", "layer"))
    fam("router_all_tokens_dropped_pick_fraction", "gauge", "Top-k picks that went to no expert (tokens a capacity "
        "factor dropped after the choice) over all picks, same interval, all ranks", ("run", "layer"))
    fam("router_all_tokens_group_load_imbalance_ratio", "gauge", "Max over mean tokens per expert of the tokens "
        "of the group's rows, same interval, all ranks (where the agents tag rows; router_health_groups)",
        ("run", "group", "layer"))
    fam("router_all_tokens_group_load_cv", "gauge", "Coefficient of variation of the group's tokens per expert, "
        "same interval", ("run", "group", "layer"))
    fam("router_all_tokens_group_dead_experts", "gauge", "Experts none of the group's tokens picked in the same "
        "interval", ("run", "group", "layer"))
    fam("expert_load_share", "gauge", "Share of the layer's routed tokens each expert took in the run's latest "
        "closed interval, all ranks (all-token counts; opt-in: expert_load_share_max_series)",
        ("run", "layer", "expert"))
    fam("router_aux_loss", "gauge", "The model's own load-balancing (aux) loss, mean over the latest interval's "
        "forwards and ranks (where the model computes one: transformers' output_router_logits)", ("run",))
    fam("router_balance_bias_std", "gauge", "Spread over experts of an aux-loss-free router's balancing bias "
        "(DeepSeek-V3's e_score_correction_bias, Megatron's expert_bias) at the latest interval", ("run", "layer"))
    fam("router_balance_bias_drift", "gauge", "RMS over experts of the balancing bias's change over the latest "
        "interval (how hard the bias is still correcting the load)", ("run", "layer"))
    fam("router_all_tokens_interval_step", "gauge", "The training step that ends the interval of the all-token "
        "figures", ("run",))
    fam("router_all_tokens_interval_ranks", "gauge", "Ranks whose counts the interval sums", ("run",))
    fam("router_routed_tokens_total", "counter", "Tokens the run's routers routed in its training forwards, all "
        "ranks (from the all-token counts)", ("run",))
    fam("router_counted_forwards_total", "counter", "Training forwards the all-token counts cover, all ranks",
        ("run",))
    fam("run_info", "gauge", "1, labelled with the run's shape and its agents' router type and version (the latest "
        "hello): what an alert or a dashboard needs to judge the figures", ("run", "distribution", "layers",
                                                                            "experts", "top_k", "agent_version"))
    fam("routing_entropy_ceiling", "gauge", "The highest routing entropy ratio the run's distribution allows: "
        "log K / log E where the agents ship top-k weights (distribution topk), else 1; alerts judge "
        "grokwatch_routing_entropy_ratio against it", ("run",))
    fam("train_step", "gauge", "Latest training step seen from the run's train source", ("run",))
    fam("build_info", "gauge", "1, labelled with the collector's version (an alert or a dashboard can tell which "
        "collector build answers)", ("version",))
    fam("eval_score", "gauge", "The user's own held-out score per group (ground truth, not a metric input)",
        ("run", "group"))
    fam("eval_step", "gauge", "Step of the latest eval score per group", ("run", "group"))
    fam("collector_messages_received_total", "counter", "Messages received", ())
    fam("collector_messages_rejected_total", "counter", "Messages rejected, by reason", ("reason",))
    fam("collector_messages_lost_total", "counter", "Messages lost in transit (sequence gaps)", ())
    fam("collector_samples_processed_total", "counter", "Routing samples processed", ())
    fam("collector_queue_size", "gauge", "Messages waiting for the processing thread", ())
    fam("collector_queue_capacity", "gauge", "Capacity of the processing queue", ())
    fam("collector_queue_bytes", "gauge", "Bytes of the messages waiting for the processing thread", ())
    fam("collector_queue_capacity_bytes", "gauge", "Capacity of the processing queue in bytes", ())
    fam("collector_processing_seconds", "summary", "Processing time per message", ())
    fam("collector_ingest_lag_seconds", "gauge", "Receive time minus send time of the latest message", ())
    fam("collector_handshake_failures_total", "counter",
        "ZeroMQ connections refused at their handshake: auth (a CURVE key not in the allow-list), protocol, "
        "incomplete (timed out, or left mid-handshake), connection_cap (over max_ingest_connections)",
        ("reason",))
    fam("collector_ingest_connections", "gauge", "Ingest connections open (accepted, not yet ended)", ())
    fam("collector_reduced_precision_messages_total", "counter",
        "Routing messages whose pairs were reduced below comparisons_per_sample because ingest was behind "
        "(every message is still applied: router health, counts, pathways)", ())
    fam("collector_loop_errors_total", "counter",
        "Unexpected exceptions the collector's threads survived, by thread (a bug: please report it)", ("thread",))
    fam("collector_disconnects_total", "counter", "Ingest connections that ended: agents that exited, and those "
        "libzmq dropped for a frame over twice max_message_bytes (what was in flight on them is lost, and "
        "counted as lost at the sender's next message)", ())
    fam("collector_scrapes_stale_total", "counter",
        "Scrapes answered from the previous view because the state stayed locked (a long message) for the "
        "scrape's wait", ())
    fam("collector_stream_reads_stale_total", "counter",
        "Streams a scrape rendered from their previous reading because their kernels held them (a long "
        "message) for STREAM_WAIT_S", ())
    fam("collector_persist_errors_total", "counter", "Snapshot and journal reads and writes that failed, by what",
        ("what",))
    fam("agent_messages_sent_total", "counter", "Messages the agents sent (from heartbeats)", ("run", "rank"))
    fam("agent_messages_dropped_total", "counter", "Messages the agents dropped, by reason (from heartbeats)",
        ("run", "rank", "reason"))
    fam("agent_hook_errors_total", "counter", "Errors caught inside the agents' hooks", ("run", "rank"))

    return tuple(specs)


SPECS = _specs()  # every family the collector exports, in exposition order


# Families an exporter owns (its own accounting, the ingest queue it is given): rendered fresh on every
# call, never from the state, so that a view answered from the previous reading still counts right.
EXPORTER_FAMILIES = frozenset({"collector_scrapes_stale_total", "collector_stream_reads_stale_total",
                               "collector_queue_size", "collector_queue_capacity", "collector_queue_bytes",
                               "collector_queue_capacity_bytes"})


class ViewMemo:
    """What one exporter keeps between its views (the view only reads the state): each stream's series
    from its last reading — the answer while its kernels hold it past ``STREAM_WAIT_S`` — and the whole
    state's, while the state's lock stays held past the exporter's wait; how often each was used."""

    def __init__(self) -> None:
        self.streams: dict[tuple[str, str], dict[str, list]] = {}
        self.state_families: Optional[dict[str, Family]] = None
        self.stale_stream_reads = 0
        self.stale_views = 0


class _StreamCopy(NamedTuple):
    """A stream's figures that change under the state's lock (admission, finish), copied under it."""

    phases: dict  # group -> (phase, memorized step, onset step)
    memorized: Optional[dict]  # group -> memorized samples (None: the stream tracks no memorization)
    comparisons: int


def build_view(state: State, queue_stats: Optional[Callable[[], tuple]] = None, memo: Optional[ViewMemo] = None,
               lock_wait_s: Optional[float] = None) -> list[Family]:
    """All families. The state's lock is held only to copy what admission and finish change (counters,
    runs, phase trackers); each stream's series are then read under the stream's own lock (its kernels
    write them without the state's). ``memo``: the exporter's (``ViewMemo``); ``lock_wait_s``: how long to
    wait for the state's lock (None: as long as it takes) before answering with the memo's last reading."""
    memo = memo if memo is not None else ViewMemo()
    F = {spec.name: Family("grokwatch_" + spec.name, spec.kind, spec.help, spec.labels, signed=spec.signed)
         for spec in SPECS}
    streams = _copy_state(F, state, lock_wait_s)
    if streams is None:
        memo.stale_views += 1
        if memo.state_families is not None:
            F.update(memo.state_families)
    else:
        for (run, source), stream, copy in streams:
            _read_stream(F, state.config, stream, run, source, copy, memo)
        if len(memo.streams) > len(streams):  # streams gone (an expired run): their readings too
            kept = {key for key, _, _ in streams}
            memo.streams = {key: reading for key, reading in memo.streams.items() if key in kept}
        memo.state_families = {name: fam for name, fam in F.items() if name not in EXPORTER_FAMILIES}
    size, capacity, size_bytes, capacity_bytes = (tuple(queue_stats()) + (0, 0))[:4] if queue_stats else (0, 0, 0, 0)
    F["collector_scrapes_stale_total"].add((), memo.stale_views)
    F["collector_stream_reads_stale_total"].add((), memo.stale_stream_reads)
    F["collector_queue_size"].add((), size)
    F["collector_queue_capacity"].add((), capacity)
    F["collector_queue_bytes"].add((), size_bytes)
    F["collector_queue_capacity_bytes"].add((), capacity_bytes)
    return list(F.values())


def _copy_state(F: dict, state: State, lock_wait_s: Optional[float]) -> Optional[list]:
    """Under the state's lock: every family that does not come from a stream's kernels, and each stream's
    ``_StreamCopy``. Returns [((run, source), stream, copy)], or None where the lock stayed held."""
    if not state.lock.acquire(timeout=-1 if lock_wait_s is None else lock_wait_s):
        return None
    try:
        carriers = state.phase_carriers()
        streams = []
        for key, stream in sorted(state.streams.items()):
            phases = {}
            for name, tracker in stream.phases.items():
                carried = carriers.get((key[0], name)) == key[1]  # one event, one report: the carrier's dates
                phases[name] = (tracker.phase, tracker.memorized_step if carried else None,
                                tracker.onset_step if carried else None)
            memorized = stream.memorization.memorized_counts() if stream.memorization is not None else None
            streams.append((key, stream, _StreamCopy(phases, memorized, stream.comparisons)))
        for run, hello in sorted(state.senders.hellos().items()):
            shape = state.runs.shapes.get(run)
            if shape is None:
                continue
            L, E, K = shape
            dist = str(hello.get("distribution", "softmax"))
            F["run_info"].add((run, dist, L, E, K, hello.get("agent_version", "")), 1)
            F["routing_entropy_ceiling"].add((run,), entropy_ceiling(dist, E, K))
        for run, counts in sorted(state.all_tokens.items()):
            _all_token_families(F, run, counts, state.runs.shapes.get(run), state.config)
        for run, step in sorted(state.train_step.items()):
            F["train_step"].add((run,), step)
        F["build_info"].add((__version__,), 1)
        for (run, group), (step, score) in sorted(state.evals.items()):
            F["eval_score"].add((run, group), score)
            F["eval_step"].add((run, group), step)
        F["collector_messages_received_total"].add((), state.received_total)
        for reason in ALL_REASONS:
            F["collector_messages_rejected_total"].add((reason,), state.rejected_total.get(reason, 0))
        F["collector_messages_lost_total"].add((), state.lost_total)
        F["collector_samples_processed_total"].add((), state.samples_total)
        F["collector_processing_seconds"].add((), SummaryValue(float(state.processing_seconds_count),
                                                               state.processing_seconds_sum))
        F["collector_ingest_lag_seconds"].add((), state.last_message_lag_s)
        F["collector_disconnects_total"].add((), state.disconnects_total)
        for why in HANDSHAKE_REASONS:
            F["collector_handshake_failures_total"].add((why,), state.handshake_failures.get(why, 0))
        F["collector_ingest_connections"].add((), state.ingest_connections)
        F["collector_reduced_precision_messages_total"].add((), state.reduced_messages_total)
        for thread in LOOP_THREADS:
            F["collector_loop_errors_total"].add((thread,), state.loop_errors.get(thread, 0))
        for what in PERSIST_ERRORS:
            F["collector_persist_errors_total"].add((what,), state.persist_errors.get(what, 0))
        for (run, rank), totals in sorted(state.agent_totals().items()):
            F["agent_messages_sent_total"].add((run, rank), totals.sent)
            F["agent_hook_errors_total"].add((run, rank), totals.hook_errors)
            for reason, n in sorted(totals.dropped.items()):
                F["agent_messages_dropped_total"].add((run, rank, reason), n)
        return streams
    finally:
        state.lock.release()


# The per-layer figures exported per group only for the groups router_health_groups admits.
ROUTER_HEALTH = frozenset({"expert_load_imbalance_ratio", "expert_load_cv", "dead_experts", "routing_entropy_ratio",
                           "router_all_tokens_group_load_imbalance_ratio", "router_all_tokens_group_load_cv",
                           "router_all_tokens_group_dead_experts", "router_zloss", "expert_load_share_percentile", "expert_load_share_std",
                           "expert_load_diversity", "expert_load_rank_expert", "expert_load_rank_share"})


def router_health_for(config, group: str) -> bool:
    """Whether the group's window router health is exported (``router_health_groups``)."""
    patterns = config.router_health_groups
    return patterns == ("*",) or any(fnmatch.fnmatchcase(group, p) for p in patterns)


def entropy_ceiling(distribution: str, num_experts: int, top_k: int) -> float:
    """The largest mean per-token entropy ÷ log E a distribution can have: top-k weights spread over K experts
    at most (log K / log E: 0.375 for 8 of 256); a softmax or sigmoid over all E, 1."""
    if distribution == "topk" and num_experts > 1:
        return math.log(max(top_k, 1)) / math.log(num_experts)
    return 1.0


def _all_token_families(F: dict, run: str, counts, shape, config) -> None:
    F["router_routed_tokens_total"].add((run,), counts.routed_tokens(shape[2] if shape else 1))
    F["router_counted_forwards_total"].add((run,), counts.forwards_total)
    figures = counts.figures()
    if figures is None:
        return
    F["router_all_tokens_interval_step"].add((run,), counts.closed_step)
    F["router_all_tokens_interval_ranks"].add((run,), counts.closed_ranks)
    for layer in range(counts.shape[0]):
        F["router_all_tokens_load_imbalance_ratio"].add((run, layer), float(figures["imbalance_L"][layer]))
        F["router_all_tokens_rank_load_imbalance_max"].add((run, layer), float(counts.closed_rank_max_L[layer]))
        F["router_all_tokens_load_cv"].add((run, layer), float(figures["cv_L"][layer]))
        F["router_all_tokens_dead_experts"].add((run, layer), int(figures["dead_L"][layer]))
    dropped_L = counts.dropped_fraction_L()
    if dropped_L is not None:
        for layer, fraction in enumerate(dropped_L.tolist()):
            F["router_all_tokens_dropped_pick_fraction"].add((run, layer), fraction)
    for group, by_group in counts.group_figures().items():
        if not router_health_for(config, group):
            continue
        for layer in range(counts.shape[0]):
            key = (run, group, layer)
            F["router_all_tokens_group_load_imbalance_ratio"].add(key, float(by_group["imbalance_L"][layer]))
            F["router_all_tokens_group_load_cv"].add(key, float(by_group["cv_L"][layer]))
            F["router_all_tokens_group_dead_experts"].add(key, int(by_group["dead_L"][layer]))
    if counts.closed_aux is not None:
        F["router_aux_loss"].add((run,), counts.closed_aux)
    if counts.closed_bias_LE is not None:
        for layer, std in enumerate(counts.closed_bias_LE.astype(np.float64).std(axis=1).tolist()):
            F["router_balance_bias_std"].add((run, layer), std)
    if counts.bias_drift_L is not None:
        for layer, drift in enumerate(counts.bias_drift_L.tolist()):
            F["router_balance_bias_drift"].add((run, layer), drift)
    L, E = counts.shape
    for layer in range(min(L, config.expert_load_share_max_series // E)):  # whole layers within the cap
        for expert, share in enumerate(figures["share_LE"][layer].tolist()):
            F["expert_load_share"].add((run, layer, expert), share)


def _read_stream(F: dict, config, stream, run: str, source: str, copy: _StreamCopy, memo: ViewMemo) -> None:
    """One stream's series, read under its own lock: its kernels write them without the state's lock. A
    stream whose kernels keep it past ``STREAM_WAIT_S`` (a huge message) is rendered from the exporter's
    previous reading of it, counted, so that a view never waits on the kernels."""
    key = (run, source)
    if stream.lock.acquire(timeout=STREAM_WAIT_S):
        try:
            start = {name: len(f.samples) for name, f in F.items()}
            _stream_families(F, config, stream, run, source, copy)
            memo.streams[key] = {name: f.samples[start[name]:] for name, f in F.items()
                                 if len(f.samples) > start[name]}
        finally:
            stream.lock.release()
        return
    memo.stale_stream_reads += 1
    for name, samples in memo.streams.get(key, {}).items():
        F[name].samples.extend(samples)


def _stream_families(F: dict, config, stream, run: str, source: str, copy: _StreamCopy) -> None:
    """One stream's series into the families ``F`` (the caller holds the stream's lock; ``copy`` is what
    was read of it under the state's)."""
    F["pathway_comparisons_effective"].add((run, source), copy.comparisons)
    series_items = [(name, g.series, g.window) for name, g in sorted(stream.groups.items())]
    series_items.append((CROSS_GROUP, stream.cross, None))
    for name, series, window in series_items:
        key = (run, source, name)
        for suffix, (hkey, _) in HISTOGRAMS.items():
            h = series.hist[hkey]
            F[suffix].add(key, HistogramValue(h.bounds.copy(), h.counts.copy(), h.sum))
            if suffix in SIGNED_HISTOGRAMS:
                F[suffix + SIGNED_SUM].add(key, h.sum)
        for layer in range(stream.num_layers):
            F["pathway_layer_distance"].add(key + (layer,), SummaryValue(float(series.layer_distance_count_L[layer]),
                                                                         float(series.layer_distance_sum_L[layer])))
        if window is None:
            continue
        F["pathway_samples_total"].add(key, series.samples_total)
        F["pathway_consistency_undefined_total"].add(key, series.consistency_undefined_total)
        F["group_latest_step"].add(key, series.latest_step)
        phase_now = copy.phases.get(name)
        if phase_now is not None:
            current, memorized_step, onset_step = phase_now
            for phase in PHASES:
                F["group_phase"].add(key + (phase,), int(current == phase))
            if memorized_step is not None:
                F["group_memorized_step"].add(key, memorized_step)
            if onset_step is not None:
                F["group_onset_step"].add(key, onset_step)
        closed = stream.transfer_closed.get(name)
        if closed is not None:
            for fam_name, field_name in (("group_transfer", "transfer"), ("group_transfer_z", "transfer_z"),
                                         ("group_transfer_js", "transfer_js"),
                                         ("group_transfer_js_z", "transfer_js_z"),
                                         ("group_fresh_loss_gap", "fresh_loss_gap")):
                if closed.get(field_name) is not None:
                    F[fam_name].add(key, float(closed[field_name]))
        if copy.memorized is not None:
            F["memorized_samples"].add(key, copy.memorized.get(name, 0))
        health = window.health(stream.top_k)
        if health is None:
            continue
        F["distinct_pathways"].add(key, health["distinct"])
        if not router_health_for(config, name):
            continue
        for layer in range(stream.num_layers):
            lk = key + (layer,)
            F["expert_load_imbalance_ratio"].add(lk, float(health["imbalance_L"][layer]))
            F["expert_load_cv"].add(lk, float(health["cv_L"][layer]))
            F["dead_experts"].add(lk, int(health["dead_L"][layer]))
            F["routing_entropy_ratio"].add(lk, float(health["entropy_L"][layer]))
            if health["zloss_L"] is not None:
                F["router_zloss"].add(lk, float(health["zloss_L"][layer]))
            stats = load_share_stats(health["share_LE"][layer], config.load_rank_k)
            if config.load_percentiles:
                for q, v in zip(LOAD_PERCENTILES, stats["percentiles"]):
                    F["expert_load_share_percentile"].add(lk + (q,), float(v))
            F["expert_load_share_std"].add(lk, stats["std"])
            F["expert_load_diversity"].add(lk, stats["diversity"])
            for end in ("top", "bottom"):
                for rank, (expert, share) in enumerate(stats[end], start=1):
                    F["expert_load_rank_expert"].add(lk + (end, rank), expert)
                    F["expert_load_rank_share"].add(lk + (end, rank), share)
