"""Everything the collector knows: senders and sequence numbers, counters,
eval scores, and one ``Stream`` (stream.py) per (run, source).

The data of the collector's pipeline (collector/pipeline.py), which alone changes it: admission
(collector/admission.py) and the end of a routing message under ``State.lock``, its kernels under the
stream's own lock. Exporters copy what they show under the lock (collector/view.py); snapshots take
``snapshot()`` quiesced (``quiesce``: no message half applied).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np

from grokwatch.collector import evidence
from grokwatch.collector.all_tokens import AllTokens
from grokwatch.collector.budget import MemoryBudget
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.labels import CROSS_GROUP
from grokwatch.collector.runs import Runs
from grokwatch.collector.senders import Counters, Senders
from grokwatch.collector.stream import Stream

OTHER_GROUP = "other"  # label values beyond max_groups

log = logging.getLogger(__name__)


class State:
    """Everything the collector knows; changed by the pipeline (collector/pipeline.py) under ``lock``."""

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
        self.world_capped: set[str] = set()  # runs whose declared world size was over max_world_size (logged)
        # Write-ahead log positions (collector/wal.py): the index of the last message and of the last drop
        # record applied here; -1: none. A snapshot carries them, the replay at start-up resumes after them.
        self.wal_applied = [-1, -1]
        # Message records held back by ingest (their stream's kernels full: collector/pipeline.py) and so
        # applied after later ones: not applied, whatever wal_applied says; the replay applies them.
        self.wal_held: set[int] = set()
        self.next_sweep = 0.0  # when admission looks for idle runs next (admission.py)
        # Routing messages admitted whose kernels have not finished (collector/pipeline.py). A snapshot
        # waits for none (``quiesce``), and admits nothing new meanwhile, so it holds each message whole.
        self.in_flight = 0
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

    @contextlib.contextmanager
    def admitting(self) -> Iterator["State"]:
        """``with state.admitting():`` the lock held once no snapshot is waiting to quiesce (a message is
        admitted between snapshots, never while one waits for the messages in flight)."""
        with self.lock:
            self._settled.wait_for(lambda: not self._quiescing)
            yield self

    def settle(self) -> None:
        """A routing message admitted earlier is finished (the caller holds the lock)."""
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

    @property
    def shapes(self) -> dict[str, tuple[int, int, int]]:
        return self.runs.shapes

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

    def agent_totals(self) -> dict[tuple[str, int], Counters]:
        """Agents' counters per (run, rank), retired senders included (senders.py)."""
        return self.senders.totals()

    # ------------------------------------------------------------- snapshot

    SNAPSHOT_FIELDS = ("streams", "runs", "senders", "received_total",
                       "rejected_total", "lost_total", "samples_total", "processing_seconds_sum",
                       "processing_seconds_count", "train_step", "evals", "rng", "persist_errors", "handshake_failures", "wal_applied",
                       "disconnects_total", "loop_errors", "wal_held", "reduced_messages_total",
                       "all_tokens")

    def snapshot(self) -> dict:
        """The fields, by reference: serialize them quiesced (``with state.quiesce(): persist.snapshot_bytes(state.snapshot())``, service.py) or they may tear."""
        with self.lock:
            return {name: getattr(self, name) for name in self.SNAPSHOT_FIELDS}

    def restore(self, data: dict) -> None:
        with self.lock:
            for name in self.SNAPSHOT_FIELDS:
                if name in data:
                    setattr(self, name, data[name])
            for stream in self.streams.values():
                stream.restore_scratch(self.config)


def drop_keys_of(table: dict[Any, Any], run: str) -> None:
    """Remove the entries keyed (run, ...) of ``run``."""
    for key in [k for k in table if k[0] == run]:
        del table[key]
