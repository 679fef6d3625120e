"""Everything the collector knows: senders and sequence numbers, counters,
eval scores, and one ``Stream`` (stream.py) per (run, source).

Runs on the processing thread; exporters and snapshots read under ``State.lock``.
A routing message is applied in three steps (collector/pipeline.py runs the middle one on a kernel
worker): ``admit`` (under the lock: sequence, checks, groups) -> ``Stream.process``, the Numba kernels
(under the stream's own lock only) -> ``finish`` (under the lock: phases, journal, counters).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

from grokwatch.collector import evidence, wal
from grokwatch.collector.all_tokens import AllTokens
from grokwatch.collector.budget import MemoryBudget
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.labels import CROSS_GROUP
from grokwatch.collector.persist import snapshot_bytes
from grokwatch.collector.reasons import Rejected
from grokwatch.collector.runs import Runs
from grokwatch.collector.senders import Counters, Senders, SequenceError
from grokwatch.collector.stream import Stream
from grokwatch.wire import FRESH_PREFIX, Eval, Heartbeat, Hello, Loss, Routing, WireError, decode, peek_sequence

OTHER_GROUP = "other"  # label values beyond max_groups
MIN_MAX_COSINE = 0.05  # METRICS.md §2: below this, consistency is undefined
EXPIRY_SWEEP_S = 60.0  # how often idle runs are looked for

log = logging.getLogger(__name__)


@dataclass
class KernelJob:
    """A routing message admitted and waiting for its stream's kernels (``State.run``)."""

    msg: Routing
    stream: Stream
    targets_N2: np.ndarray
    wal_index: int
    started: float  # perf_counter at admission: processing time runs to the end of ``finish``
    comparisons: int = 0  # m for this message: the configured one, fewer when the collector is behind (ingest.py)
    stats: Optional[tuple] = None  # Stream.process's result
    transfers: list = field(default_factory=list)  # Stream.transfers's (group, record) pairs


class State:
    """Everything the collector knows. ``apply``/``handle`` are called on the processing
    thread; exporters and snapshots read under ``lock``."""

    def __init__(self, config: CollectorConfig, journal: Optional[Callable[[dict], None]] = None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.lock = threading.RLock()
        self.journal = journal or (lambda record: None)
        self.clock = clock
        self.rng = np.random.default_rng(config.seed)
        self.streams: dict[tuple[str, str], Stream] = {}
        self.runs = Runs()  # each run's shape, layers, world size and when it was last heard (runs.py)
        self.senders = Senders()  # sender id -> its sequence numbers, hello and counters (senders.py)
        self.received_total = 0
        self.rejected_total: dict[str, int] = {}
        self.lost_total = 0
        self.samples_total = 0
        self.processing_seconds_sum = 0.0
        self.processing_seconds_count = 0
        self.last_message_lag_s = 0.0
        self.train_step: dict[str, int] = {}
        self.evals: dict[tuple[str, str], tuple[int, float]] = {}
        self.all_tokens: dict[str, AllTokens] = {}  # run -> its all-token expert counts (all_tokens.py)
        self.persist_errors: dict[str, int] = {}  # persist.PERSIST_ERRORS -> count
        self.disconnects_total = 0  # ingest connections that ended (ingest.py's socket monitor)
        self.handshake_failures: dict[str, int] = {}  # ZeroMQ connections refused: ingest.HANDSHAKE_REASONS
        self.loop_errors: dict[str, int] = {}  # unexpected exceptions survived, by thread (ingest.py, service.py)
        self.ingest_connections = 0  # open ingest connections (ingest.py's socket monitor; set by its thread)
        # Pairs per sample for the next routing message: the configured m, or fewer while ingest is behind
        # (set by the processing thread before it applies a message: ingest.py ``_comparisons``).
        self.comparisons_now = config.comparisons_per_sample
        self.reduced_messages_total = 0  # routing messages whose pairs were reduced (a noisier estimate)
        self._world_capped: set[str] = set()  # runs whose declared world size was over max_world_size (logged)
        # Write-ahead log positions (collector/wal.py): the index of the last message and of the last drop
        # record applied here; -1: none. A snapshot carries them, the replay at start-up resumes after them.
        self.wal_applied = [-1, -1]
        # Message records held back by ingest (their stream's kernels full: collector/pipeline.py) and so
        # applied after later ones: not applied, whatever wal_applied says; the replay applies them.
        self.wal_held: set[int] = set()
        self._wal_index = -1  # the record being applied now (journal lines carry it as "w")
        self.journal_replayed = wal.JournaledRecords()  # during a replay: the records journaled already
        self._next_sweep = 0.0
        # Routing messages admitted whose kernels have not finished (collector/pipeline.py). A snapshot
        # waits for none (``quiesce``), and admits nothing new meanwhile, so it holds each message whole.
        self.in_flight = 0
        self.stale_stream_reads = 0  # view.py: streams rendered from their previous reading
        self.budget = MemoryBudget(config.max_memory_mb)
        self._quiescing = 0
        self._settled = threading.Condition(self.lock)

    # ------------------------------------------------------------- counters

    def count_rejected(self, reason: str, sequence: Optional[tuple[str, int]] = None) -> None:
        """One rejection under ``reason``; ``sequence`` (wire.peek_sequence of the dropped bytes) keeps the
        next message of that sender from counting the same message again as lost."""
        with self.lock:
            self.rejected_total[reason] = self.rejected_total.get(reason, 0) + 1
            if sequence is not None:
                self.senders.mark_dropped(*sequence)

    def count_handshake_failure(self, why: str) -> None:
        with self.lock:
            self.handshake_failures[why] = self.handshake_failures.get(why, 0) + 1

    def hold_wal(self, index: int) -> None:
        """A message record ingest holds back: applied later than records after it."""
        if index >= 0:
            with self.lock:
                self.wal_held.add(index)

    def count_loop_error(self, where: str) -> int:
        with self.lock:
            n = self.loop_errors[where] = self.loop_errors.get(where, 0) + 1
        return n

    def count_disconnect(self) -> None:
        with self.lock:
            self.disconnects_total += 1

    def count_persist_error(self, what: str) -> None:
        with self.lock:
            self.persist_errors[what] = self.persist_errors.get(what, 0) + 1

    def count_drop(self, reason: str, sequence: Optional[tuple[str, int]], wal_index: int = -1) -> None:
        """A message dropped at receive (too large, queue full): received, rejected, its seq accounted,
        its write-ahead record applied — one step, under the lock, so a snapshot holds all or none."""
        with self.lock:
            self.received_total += 1
            self.count_rejected(reason, sequence)
            if wal_index >= 0:
                self.wal_applied[1] = wal_index

    def apply(self, data: bytes, limits, wal_index: int = -1,
              dispatch: Optional[Callable[[KernelJob], None]] = None) -> bool:
        """Decode and apply one received message; every failure is counted, none escapes. Received and
        admitted in one step under the lock (a snapshot never holds one without the other). A routing
        message's kernels then run through ``dispatch`` (a kernel worker, collector/pipeline.py), or here.
        Returns whether the message went to ``dispatch``."""
        job = None
        with self.lock:
            self._settled.wait_for(lambda: not self._quiescing)
            self.received_total += 1
            self._wal_index = wal_index
            if wal_index >= 0:
                self.wal_applied[0] = max(self.wal_applied[0], wal_index)
                self.wal_held.discard(wal_index)
            try:
                job = self.admit(decode(data, limits))
            except WireError as exc:
                self.count_rejected(exc.reason, peek_sequence(data, limits))
            except Rejected as exc:
                self.count_rejected(exc.reason)
            except Exception:  # a bug of ours must not stop the collector
                log.exception("internal error while processing a message")
                self.count_rejected("internal")
            finally:
                self._wal_index = -1
        if job is None:
            return False
        if dispatch is None:
            self.run(job)
            return False
        dispatch(job)
        return True

    def run(self, job: KernelJob) -> None:
        """The kernels of an admitted routing message, then ``finish``; on any thread. Never raises: a
        failure is counted as ``internal`` and the job is settled all the same."""
        try:
            with job.stream.lock:  # the kernels hold only their stream (lock order: State.lock, then a stream's)
                job.stats = job.stream.process(job.msg, job.targets_N2, self.config.pathway_tau,
                                               job.comparisons or self.config.comparisons_per_sample, MIN_MAX_COSINE)
                job.transfers = job.stream.transfers(job.msg, job.targets_N2)
        except Exception:
            log.exception("internal error in the kernels of a routing message")
        self.finish(job)

    def _settle(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._settled.notify_all()

    @contextlib.contextmanager
    def quiesce(self) -> Iterator["State"]:
        """``with state.quiesce():`` the lock held, no routing message half applied, none admitted."""
        with self.lock:
            self._quiescing += 1
            try:
                self._settled.wait_for(lambda: not self.in_flight)
                yield self
            finally:
                self._quiescing -= 1
                if not self._quiescing:
                    self._settled.notify_all()

    def _journal(self, record: dict) -> None:
        if self._wal_index >= 0:
            if self._wal_index in self.journal_replayed:
                return  # replayed after a kill: this record was journaled before it
            record["w"] = self._wal_index
        self.journal(record)

    # ------------------------------------------------------------- messages

    def handle(self, msg) -> None:
        """Apply one decoded message, kernels included, on this thread. Raises ``Rejected`` for a message
        that is valid on its own but not here (shape mismatch, stale, duplicate)."""
        job = self.admit(msg)
        if job is not None:
            self.run(job)

    def admit(self, msg) -> Optional[KernelJob]:
        """Everything of one decoded message up to the kernels, under the lock: a routing message comes back
        as the job to ``run``, counted in ``in_flight``; any other is applied whole. Raises ``Rejected``."""
        started = time.perf_counter()
        job = None
        with self.lock:
            now = self.clock()
            if now >= self._next_sweep:  # before admitting anything: an expired run frees its slot
                self._next_sweep = now + EXPIRY_SWEEP_S
                self._expire_runs(now)
            self._sequence(msg, now)  # first, so a stale message is not also counted as lost
            if now - msg.wall_time > self.config.max_message_age_s:
                raise Rejected("stale")
            if isinstance(msg, Hello):
                self._hello(msg)
            elif isinstance(msg, Routing):
                job = self._routing(msg, started)
            elif isinstance(msg, Eval):
                self._eval(msg)
            elif isinstance(msg, Heartbeat):
                self._heartbeat(msg)
            elif isinstance(msg, Loss):
                self._train_losses(msg)
            self.runs.heard(msg.run, now)
            self.last_message_lag_s = max(0.0, now - msg.wall_time)
            if job is None:
                self.processing_seconds_sum += time.perf_counter() - started
                self.processing_seconds_count += 1
            else:
                self.in_flight += 1
        return job

    def _sequence(self, msg, now: float) -> None:
        try:
            self.lost_total += self.senders.sequence(msg.sender, msg.run, msg.rank, msg.seq, now,
                                                     self.config.max_sequence_jump,
                                                     self.runs.world_sizes.get(msg.run, self.config.max_world_size))
        except SequenceError as exc:
            raise Rejected(exc.reason) from None

    @property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        return self.runs.shapes

    def _expire_runs(self, now: float) -> None:
        """Forget runs idle for ``run_idle_expiry_s``: their slot in ``max_runs`` and their series."""
        for run in self.runs.idle(now, self.config.run_idle_expiry_s):
            self.train_step.pop(run, None)
            self.all_tokens.pop(run, None)
            for by_run in (self.streams, self.evals):
                _drop_keys_of(by_run, run)
            self.senders.forget_run(run)
            self._world_capped.discard(run)

    def _check_shape(self, run: str, shape: tuple[int, int, int], hello: bool = False) -> None:
        if self.runs.check_shape(run, shape, self.config, self.clock(), hello=hello):
            _drop_keys_of(self.streams, run)  # a new incarnation: its pathway state starts over

    def _hello(self, msg: Hello) -> None:
        self._check_shape(msg.run, (msg.num_layers, msg.num_experts, msg.top_k), hello=True)
        # A hello declares who the sender is: an agent attached before torch.distributed was initialized
        # says hello again as its real rank, and its counters go under that rank from then on.
        info = self.senders[msg.sender]
        info.rank = msg.rank
        if msg.world_size > self.config.max_world_size and msg.run not in self._world_capped:
            self._world_capped.add(msg.run)
            log.warning("run %r: a hello declares world_size %d, over max_world_size %d: believed up to %d (ranks "
                        "beyond are rejected as bad_rank)", msg.run, msg.world_size, self.config.max_world_size,
                        self.config.max_world_size)
        self.runs.declare_world(msg.run, min(msg.world_size, self.config.max_world_size))
        info.hello = dict(host=msg.host, world_size=msg.world_size, agent_version=msg.agent_version,
                          distribution=msg.distribution, has_cosines=msg.has_cosines)
        info.other_layers = False
        if not self.runs.same_layers(msg.run, msg.layer_names):
            # Same shape, other layers: pipeline stages under one run name. Mixed, their pathways would
            # compare different layers with each other; refused (with all this sender's summaries).
            info.other_layers = True
            log.warning("run %r: rank %d on %s routes other layers than the run's first sender (%s, ...): "
                        "pipeline stages? its summaries are rejected as shape_mismatch; give each stage its "
                        "own run, e.g. run=f'{name}/pp{stage}'", msg.run, msg.rank, msg.host,
                        ", ".join((msg.layer_names or ())[:2]))
            raise Rejected("shape_mismatch")

    def _heartbeat(self, msg: Heartbeat) -> None:
        self.runs.known(msg.run, msg.rank)
        self.senders.heartbeat(msg)

    def _eval(self, msg: Eval) -> None:
        """Scores for at most ``max_groups`` groups per run (each one is a Prometheus series): the known
        ones and new ones while there is room; the rest of the message is dropped and counted."""
        self.runs.known(msg.run, msg.rank)
        known = {group for run, group in self.evals if run == msg.run}  # eval messages are rare
        kept = {}
        for group, score in msg.scores.items():
            if group in known or len(known) < self.config.max_groups:
                known.add(group)
                kept[group] = score
                self.evals[(msg.run, group)] = (msg.step, score)
        if kept:
            self._journal(dict(kind="eval", run=msg.run, step=msg.step, scores=kept, t=msg.wall_time))
        if len(kept) < len(msg.scores):
            raise Rejected("too_many_groups")

    def _train_losses(self, msg: Loss) -> None:
        self.runs.known(msg.run, msg.rank)
        stream = self.streams.get((msg.run, "train"))
        if stream is None:
            raise Rejected("no_routing")  # the run's first train summaries come before its first loss
        records, all_kept = evidence.train_losses(self.config, msg, stream)
        for record in records:
            self._journal(record)
        if not all_kept:
            raise Rejected("too_many_groups")

    def phase_carriers(self) -> dict[tuple[str, str], str]:
        """(run, group) -> the source whose tracker carries that group's phase (evidence.CARRIER_ORDER)."""
        return evidence.carriers(self.streams)

    def group_label(self, stream: Stream, label: str) -> str:
        """The label a sample is counted under; admits (creates) new groups up to the cap."""
        if label in stream.index:
            return label
        if label == CROSS_GROUP or (label != OTHER_GROUP and len(stream.labels) >= self.config.max_groups):
            label = OTHER_GROUP
        if label not in stream.index:
            self.budget.check(self.streams.values(), stream, stream.slots_for(len(stream.labels)))
            with stream.lock:  # a new group may reallocate the arrays: not while its kernels write them
                stream.add_group(label)
        return label

    def memory_bytes(self) -> int:
        """The bytes of every stream's group arrays and probe histories: what ``max_memory_mb`` bounds."""
        return self.budget.used(self.streams.values())

    def _stream(self, msg: Routing) -> Stream:
        L, E = msg.mean_probs_NLE.shape[1:]
        self._check_shape(msg.run, (L, E, msg.top_k))
        key = (msg.run, msg.source)
        stream = self.streams.get(key)
        if stream is None:
            stream = self.streams[key] = Stream(msg.run, msg.source, L, E, msg.top_k, self.config,
                                                np.random.default_rng(self.rng.integers(2**63)))
        return stream

    def _routing(self, msg: Routing, started: float) -> KernelJob:
        if self.senders[msg.sender].other_layers:
            raise Rejected("shape_mismatch")
        self.runs.check_rank(msg.run, msg.rank)
        stream = self._stream(msg)
        if msg.source == "train":
            self.train_step[msg.run] = max(self.train_step.get(msg.run, 0), msg.step)
        if msg.expert_tokens_LE is not None:
            self._all_tokens(msg)
        stream.latest_step = max(stream.latest_step, msg.step)
        labels = [self.group_label(stream, g) for g in msg.groups]
        memorized: list[Optional[int]] = [None] * msg.num_samples
        if stream.memorization is not None and msg.loss_N is not None:
            trained = [i for i, label in enumerate(labels) if not label.startswith(FRESH_PREFIX)]  # fresh: never
            if trained:
                seen = stream.memorization.observe(msg.step, [msg.sample_ids[i] for i in trained],
                                                   [labels[i] for i in trained], msg.loss_N[trained])
                for i, m in zip(trained, seen):
                    memorized[i] = m
                self.budget.fit(self.streams.values())  # the histories grew: within max_memory_mb
        targets = np.full((msg.num_samples, 2), -1, np.int64)
        for i, label in enumerate(labels):
            targets[i, 0] = stream.index[label]
            step = memorized[i]
            if step is not None and stream.memorization is not None:
                bucket = self.group_label(stream, stream.memorization.bucket_label(step))
                if bucket != label:
                    targets[i, 1] = stream.index[bucket]
        m = min(self.comparisons_now, self.config.comparisons_per_sample)
        if m < self.config.comparisons_per_sample:
            self.reduced_messages_total += 1
        stream.comparisons = m
        return KernelJob(msg, stream, targets, self._wal_index, started, comparisons=m)

    def _all_tokens(self, msg: Routing) -> None:
        tokens_LE = msg.expert_tokens_LE
        assert tokens_LE is not None
        counts = self.all_tokens.get(msg.run)
        if counts is None or counts.shape != tokens_LE.shape:
            counts = self.all_tokens[msg.run] = AllTokens(*tokens_LE.shape)
        # a run whose hello was never heard closes an interval at its next step only
        world = self.runs.world_sizes.get(msg.run, self.config.max_world_size)
        counts.add(msg.step, msg.rank, tokens_LE, msg.counted_forwards, world, msg.aux_loss, msg.balance_bias_LE)

    def finish(self, job: KernelJob) -> None:
        """After the kernels: the message's points into the phase trackers and the journal, under the lock."""
        with self.lock:
            self._wal_index = job.wal_index
            try:
                if job.stats is None:
                    self.count_rejected("internal")
                else:
                    self.samples_total += job.msg.num_samples
                    for record in evidence.routing_points(self.config, job.msg, job.stream, job.targets_N2,
                                                          job.stats):
                        record["comparisons"] = job.comparisons  # m of this point's pairs (fewer: noisier)
                        self._journal(record)
                    for group, transfer in job.transfers:  # METRICS.md §6 (collector/transfer.py)
                        self._journal(dict(kind="transfer", run=job.msg.run, source=job.msg.source, group=group,
                                           step=job.msg.step, t=job.msg.wall_time, **transfer))
            except Exception:
                log.exception("internal error while finishing a routing message")
                self.count_rejected("internal")
            finally:
                self._wal_index = -1
                self.processing_seconds_sum += time.perf_counter() - job.started
                self.processing_seconds_count += 1
                self._settle()

    # ------------------------------------------------------------- export view

    def agent_totals(self) -> dict[tuple[str, int], Counters]:
        """Agents' counters per (run, rank), retired senders included (senders.py)."""
        return self.senders.totals()

    # ------------------------------------------------------------- snapshot

    SNAPSHOT_FIELDS = ("streams", "runs", "senders", "received_total",
                       "rejected_total", "lost_total", "samples_total", "processing_seconds_sum",
                       "processing_seconds_count", "train_step", "evals", "rng", "persist_errors", "handshake_failures", "wal_applied",
                       "stale_stream_reads", "disconnects_total", "loop_errors", "wal_held", "reduced_messages_total",
                       "all_tokens")

    def snapshot(self) -> dict:
        """The fields, by reference: serialize them quiesced (``snapshot_blob``) or they may tear."""
        with self.lock:
            return {name: getattr(self, name) for name in self.SNAPSHOT_FIELDS}

    def snapshot_blob(self) -> bytes:
        """A consistent, serialized copy of the state (persist.snapshot_bytes, taken quiesced)."""
        with self.quiesce():
            return snapshot_bytes(self.snapshot())

    def restore(self, data: dict) -> None:
        with self.lock:
            for name in self.SNAPSHOT_FIELDS:
                if name in data:
                    setattr(self, name, data[name])
            for stream in self.streams.values():
                stream.restore_scratch(self.config)


def _drop_keys_of(table: dict[Any, Any], run: str) -> None:
    """Remove the entries keyed (run, ...) of ``run``."""
    for key in [k for k in table if k[0] == run]:
        del table[key]
