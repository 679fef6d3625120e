"""Who sends: one record per sender (an agent instance), its sequence numbers, and the agents' own
counters from their heartbeats, summed per (run, rank) over the senders a run has had.

Sequence numbers make the collector's accounting exact: a gap is lost messages, a repeat a duplicate; a
message dropped (and counted) before it was applied is marked, so that the sender's next message does
not count it again as lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from grokwatch.wire import AGENT_DROP_REASONS, Heartbeat

MAX_SENDERS = 4096  # beyond, the longest-quiet sender is retired (its counters kept under its run and rank)
MAX_ACCOUNTED_SENDERS = 4096  # senders with dropped-and-counted messages not yet passed by a later one
MAX_ACCOUNTED_PER_SENDER = 65536


class SequenceError(Exception):
    """A message whose sequence number is refused: ``duplicate`` or ``sequence_jump``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Counters:
    """An agent's cumulative counters (its heartbeats'): messages sent, dropped by reason, hook errors."""

    sent: int = 0
    dropped: dict = field(default_factory=dict)
    hook_errors: int = 0

    def add(self, other: "Counters") -> None:
        self.sent += other.sent
        self.hook_errors += other.hook_errors
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n


@dataclass
class Sender:
    """One sender id: which run and rank it speaks for, how far its sequence numbers went, what its hello
    declared, and its counters (never backwards: the larger value of any heartbeat stays)."""

    run: str
    rank: int
    seen: float  # the clock of its latest accepted message
    last_seq: int = -1
    hello: Optional[dict] = None  # host, world_size, agent_version, distribution, has_cosines
    counters: Counters = field(default_factory=Counters)
    disabled: bool = False
    beats: bool = False  # a heartbeat came: only then do its counters make series
    other_layers: bool = False  # its hello named other layers than the run's (pipeline stages): refused


class Senders:
    """The sender table. Called under the state's lock."""

    def __init__(self) -> None:
        self.records: dict[str, Sender] = {}
        self.retired: dict[tuple[str, int], Counters] = {}  # counters of senders retired or forgotten
        self.accounted: dict[str, set[int]] = {}  # sender -> sequence numbers dropped and counted already

    def __getitem__(self, sender: str) -> Sender:
        return self.records[sender]

    def get(self, sender: str) -> Optional[Sender]:
        return self.records.get(sender)

    def values(self) -> Iterator[Sender]:
        return iter(list(self.records.values()))

    def __len__(self) -> int:
        return len(self.records)

    def sequence(self, sender: str, run: str, rank: int, seq: int, now: float, max_jump: int) -> int:
        """Admit ``seq`` from ``sender``; returns the messages lost before it (its gap, less the ones dropped
        and counted already). Raises SequenceError: ``duplicate`` (not beyond the last), ``sequence_jump``
        (more than ``max_jump`` ahead: a forged number would make the sender's later messages duplicates;
        the last stays, so its real next message is accepted)."""
        info = self.records.get(sender)
        if info is None:
            if len(self.records) >= MAX_SENDERS:
                self._retire_oldest()
            info = self.records[sender] = Sender(run=run, rank=rank, seen=now)
            # An unknown sender's first number is its baseline (issue 29): a collector without its history (no
            # state dir, a rescheduled pod, an upgrade) cannot tell a gap from the messages it never knew of,
            # and an agent past max_jump messages would otherwise be rejected as sequence_jump for ever.
            info.last_seq = seq - 1
        if seq <= info.last_seq:
            raise SequenceError("duplicate")
        gap = seq - info.last_seq - 1
        if gap > max_jump:
            raise SequenceError("sequence_jump")
        marks = self.accounted.get(sender)
        if marks:
            counted = {s for s in marks if s <= seq}
            gap -= sum(1 for s in counted if s > info.last_seq and s != seq)
            marks -= counted
            if not marks:
                del self.accounted[sender]
        info.last_seq = seq
        info.seen = now
        return gap

    def mark_dropped(self, sender: str, seq: int) -> None:
        """A message of ``sender`` dropped before it was applied, and counted under its reason."""
        info = self.records.get(sender)
        if info is not None and seq <= info.last_seq:
            return
        marks = self.accounted.get(sender)
        if marks is None:
            if len(self.accounted) >= MAX_ACCOUNTED_SENDERS:
                self.accounted.pop(next(iter(self.accounted)))
            marks = self.accounted[sender] = set()
        if len(marks) < MAX_ACCOUNTED_PER_SENDER:
            marks.add(seq)

    def heartbeat(self, msg: Heartbeat) -> None:
        """The agent's cumulative counters. Never backwards per sender (a heartbeat that says less than an
        earlier one is stale or forged: the larger value stays); reasons outside the agent's own list are
        one "other" (bounded labels)."""
        info = self.records[msg.sender]
        dropped: dict[str, int] = {}
        for reason, n in msg.messages_dropped.items():
            key = reason if reason in AGENT_DROP_REASONS else "other"
            dropped[key] = dropped.get(key, 0) + n
        old = info.counters
        info.beats = True
        info.disabled = msg.disabled
        info.counters = Counters(
            sent=max(old.sent, msg.messages_sent), hook_errors=max(old.hook_errors, msg.hook_errors),
            dropped={r: max(old.dropped.get(r, 0), dropped.get(r, 0)) for r in old.dropped.keys() | dropped.keys()})

    def totals(self) -> dict[tuple[str, int], Counters]:
        """Counters per (run, rank): retired senders plus the live ones, so a restarted agent never makes
        a total go backwards. A sender without a heartbeat yet adds no series."""
        out: dict[tuple[str, int], Counters] = {}
        for key, counters in self.retired.items():
            out.setdefault(key, Counters()).add(counters)
        for info in self.records.values():
            if info.beats:
                out.setdefault((info.run, info.rank), Counters()).add(info.counters)
        return out

    def forget_run(self, run: str) -> None:
        """An expired run: its senders and their counters go (its series end)."""
        for sender in [s for s, info in self.records.items() if info.run == run]:
            del self.records[sender]
        for key in [k for k in self.retired if k[0] == run]:
            del self.retired[key]

    def _retire_oldest(self) -> None:
        oldest = min(self.records, key=lambda s: self.records[s].seen)
        info = self.records.pop(oldest)
        if info.beats:
            self.retired.setdefault((info.run, info.rank), Counters()).add(info.counters)
