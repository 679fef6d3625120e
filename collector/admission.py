"""Admission: what a decoded message does to the state before any kernel runs, under ``State.lock``.

The first stage of the collector's pipeline (collector/pipeline.py): sequence numbers and loss, staleness,
the run's shape and layers, group labels (up to ``max_groups``), memorization; a hello, eval, heartbeat or
loss message is applied whole here, a routing message comes back as the ``KernelJob`` for its stream's
kernels. Nothing here reads a clock: ``now`` is passed in (the wall clock live, a record's arrival time
in a write-ahead replay).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Optional

import numpy as np

from grokwatch.collector import evidence
from grokwatch.collector.all_tokens import AllTokens
from grokwatch.collector.reasons import Rejected
from grokwatch.collector.senders import SequenceError
from grokwatch.collector.state import OTHER_GROUP, State, drop_keys_of
from grokwatch.collector.stream import Stream
from grokwatch.wire import FRESH_PREFIX, Eval, Heartbeat, Hello, Loss, Routing

EXPIRY_SWEEP_S = 60.0  # how often idle runs are looked for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Journaling:
    """Where one message's journal lines go: the state's journal, each line tagged with the write-ahead
    record it came from (``"w"``); in a replay after a kill, the lines of records the journal already
    holds (``journaled``: wal.journaled_records) are not written again."""

    sink: Callable[[dict], None]
    wal_index: int = -1
    journaled: Container[int] = ()

    def write(self, record: dict) -> None:
        if self.wal_index >= 0:
            if self.wal_index in self.journaled:
                return
            record["w"] = self.wal_index
        self.sink(record)


@dataclass
class KernelJob:
    """A routing message admitted and waiting for its stream's kernels (collector/pipeline.py)."""

    msg: Routing
    stream: Stream
    targets_N2: np.ndarray
    journaling: Journaling
    started: float  # perf_counter at admission: processing time runs to the end of ``finish``
    comparisons: int = 0  # m for this message: the configured one, fewer when the collector is behind (ingest.py)
    stats: Optional[tuple] = None  # Stream.process's result
    transfers: list = field(default_factory=list)  # Stream.transfers's (group, record) pairs


def admit(state: State, msg: Any, now: float, journaling: Journaling) -> Optional[KernelJob]:
    """Everything of one decoded message up to the kernels; the caller holds ``state.lock``. A routing
    message comes back as the job for its kernels, counted in ``state.in_flight``; any other is applied
    whole. Raises ``Rejected`` for a message that is valid on its own but not here (shape mismatch,
    stale, duplicate)."""
    started = time.perf_counter()
    job = None
    if now >= state.next_sweep:  # before admitting anything: an expired run frees its slot
        state.next_sweep = now + EXPIRY_SWEEP_S
        _expire_runs(state, now)
    _sequence(state, msg, now)  # first, so a stale message is not also counted as lost
    if now - msg.wall_time > state.config.max_message_age_s:
        raise Rejected("stale")
    if isinstance(msg, Hello):
        _hello(state, msg, now)
    elif isinstance(msg, Routing):
        job = _routing(state, msg, now, journaling, started)
    elif isinstance(msg, Eval):
        _eval(state, msg, journaling)
    elif isinstance(msg, Heartbeat):
        state.runs.known(msg.run, msg.rank)
        state.senders.heartbeat(msg)
    elif isinstance(msg, Loss):
        _train_losses(state, msg, journaling)
    state.runs.heard(msg.run, now)
    state.last_message_lag_s = max(0.0, now - msg.wall_time)
    if job is None:
        state.processing_seconds_sum += time.perf_counter() - started
        state.processing_seconds_count += 1
    else:
        state.in_flight += 1
    return job


def _sequence(state: State, msg, now: float) -> None:
    try:
        state.lost_total += state.senders.sequence(msg.sender, msg.run, msg.rank, msg.seq, now,
                                                   state.config.max_sequence_jump,
                                                   state.runs.world_sizes.get(msg.run, state.config.max_world_size))
    except SequenceError as exc:
        raise Rejected(exc.reason) from None


def _expire_runs(state: State, now: float) -> None:
    """Forget runs idle for ``run_idle_expiry_s``: their slot in ``max_runs`` and their series."""
    for run in state.runs.idle(now, state.config.run_idle_expiry_s):
        state.train_step.pop(run, None)
        state.all_tokens.pop(run, None)
        for by_run in (state.streams, state.evals):
            drop_keys_of(by_run, run)
        state.senders.forget_run(run)
        state.world_capped.discard(run)


def _check_shape(state: State, run: str, shape: tuple[int, int, int], now: float, hello: bool = False) -> None:
    if state.runs.check_shape(run, shape, state.config, now, hello=hello):
        drop_keys_of(state.streams, run)  # a new incarnation: its pathway state starts over


def _hello(state: State, msg: Hello, now: float) -> None:
    config = state.config
    _check_shape(state, msg.run, (msg.num_layers, msg.num_experts, msg.top_k), now, hello=True)
    # A hello declares who the sender is: an agent attached before torch.distributed was initialized
    # says hello again as its real rank, and its counters go under that rank from then on.
    info = state.senders[msg.sender]
    info.rank = msg.rank
    if msg.world_size > config.max_world_size and msg.run not in state.world_capped:
        state.world_capped.add(msg.run)
        log.warning("run %r: a hello declares world_size %d, over max_world_size %d: believed up to %d (ranks "
                    "beyond are rejected as bad_rank)", msg.run, msg.world_size, config.max_world_size,
                    config.max_world_size)
    state.runs.declare_world(msg.run, min(msg.world_size, config.max_world_size))
    info.hello = dict(host=msg.host, world_size=msg.world_size, agent_version=msg.agent_version,
                      distribution=msg.distribution, has_cosines=msg.has_cosines)
    if msg.wandb_run is not None:  # the training process's own W&B run (wandb_view.py may join it)
        info.hello["wandb_run"] = msg.wandb_run
    info.other_layers = False
    if not state.runs.same_layers(msg.run, msg.layer_names):
        # Same shape, other layers: pipeline stages under one run name. Mixed, their pathways would
        # compare different layers with each other; refused (with all this sender's summaries).
        info.other_layers = True
        log.warning("run %r: rank %d on %s routes other layers than the run's first sender (%s, ...): "
                    "pipeline stages? its summaries are rejected as shape_mismatch; give each stage its "
                    "own run, e.g. run=f'{name}/pp{stage}'", msg.run, msg.rank, msg.host,
                    ", ".join((msg.layer_names or ())[:2]))
        raise Rejected("shape_mismatch")


def _eval(state: State, msg: Eval, journaling: Journaling) -> None:
    """Scores for at most ``max_groups`` groups per run (each one is a Prometheus series): the known
    ones and new ones while there is room; the rest of the message is dropped and counted."""
    state.runs.known(msg.run, msg.rank)
    known = {group for run, group in state.evals if run == msg.run}  # eval messages are rare
    kept = {}
    for group, score in msg.scores.items():
        if group in known or len(known) < state.config.max_groups:
            known.add(group)
            kept[group] = score
            state.evals[(msg.run, group)] = (msg.step, score)
    if kept:
        journaling.write(dict(kind="eval", run=msg.run, step=msg.step, scores=kept, t=msg.wall_time))
    if len(kept) < len(msg.scores):
        raise Rejected("too_many_groups")


def _train_losses(state: State, msg: Loss, journaling: Journaling) -> None:
    state.runs.known(msg.run, msg.rank)
    stream = state.streams.get((msg.run, "train"))
    if stream is None:
        raise Rejected("no_routing")  # the run's first train summaries come before its first loss
    records, all_kept = evidence.train_losses(state.config, msg, stream)
    for record in records:
        journaling.write(record)
    if not all_kept:
        raise Rejected("too_many_groups")


def _stream(state: State, msg: Routing, now: float) -> Stream:
    L, E = msg.mean_probs_NLE.shape[1:]
    _check_shape(state, msg.run, (L, E, msg.top_k), now)
    key = (msg.run, msg.source)
    stream = state.streams.get(key)
    if stream is None:
        stream = state.streams[key] = Stream(msg.run, msg.source, L, E, msg.top_k, state.config,
                                             np.random.default_rng(state.rng.integers(2**63)))
    return stream


def _all_tokens(state: State, msg: Routing) -> None:
    tokens_LE = msg.expert_tokens_LE
    assert tokens_LE is not None
    counts = state.all_tokens.get(msg.run)
    if counts is None or counts.shape != tokens_LE.shape:
        counts = state.all_tokens[msg.run] = AllTokens(*tokens_LE.shape)
    # a run whose hello was never heard closes an interval at its next step only
    world = state.runs.world_sizes.get(msg.run, state.config.max_world_size)
    groups = None
    if msg.group_tokens_GLE is not None:  # split by row group: at most max_groups names a run, the rest "other"
        known = set(counts.open_groups) | set(counts.closed_groups)
        groups = {}
        for name, group_LE in zip(msg.group_token_names, msg.group_tokens_GLE):
            if name not in known and (name == OTHER_GROUP or len(known) >= state.config.max_groups):
                name = OTHER_GROUP
            known.add(name)
            groups[name] = groups[name] + group_LE if name in groups else group_LE
    counts.add(msg.step, msg.rank, tokens_LE, msg.counted_forwards, world, msg.aux_loss, msg.balance_bias_LE, groups,
               msg.dropped_picks_L)


def _routing(state: State, msg: Routing, now: float, journaling: Journaling, started: float) -> KernelJob:
    if state.senders[msg.sender].other_layers:
        raise Rejected("shape_mismatch")
    state.runs.check_rank(msg.run, msg.rank)
    stream = _stream(state, msg, now)
    if msg.source == "train":
        state.train_step[msg.run] = max(state.train_step.get(msg.run, 0), msg.step)
    if msg.expert_tokens_LE is not None:
        _all_tokens(state, msg)
    stream.latest_step = max(stream.latest_step, msg.step)
    labels = [state.group_label(stream, g) for g in msg.groups]
    memorized: list[Optional[int]] = [None] * msg.num_samples
    if stream.memorization is not None and msg.loss_N is not None:
        trained = [i for i, label in enumerate(labels) if not label.startswith(FRESH_PREFIX)]  # fresh: never
        if trained:
            seen = stream.memorization.observe(msg.step, [msg.sample_ids[i] for i in trained],
                                               [labels[i] for i in trained], msg.loss_N[trained])
            for i, m in zip(trained, seen):
                memorized[i] = m
            state.budget.fit(state.streams.values())  # the histories grew: within max_memory_mb
    targets = np.full((msg.num_samples, 2), -1, np.int64)
    for i, label in enumerate(labels):
        targets[i, 0] = stream.index[label]
        step = memorized[i]
        if step is not None and stream.memorization is not None:
            bucket = state.group_label(stream, stream.memorization.bucket_label(step))
            if bucket != label:
                targets[i, 1] = stream.index[bucket]
    configured = state.config.comparisons_per_sample
    m = min(state.comparisons_now, configured)
    if m < configured:
        state.reduced_messages_total += 1
    stream.comparisons = m
    return KernelJob(msg, stream, targets, journaling, started, comparisons=m)
