"""Who sends: one record per sender (an agent instance), its sequence numbers, and the agents' own
counters from their heartbeats, summed per (run, rank) over the senders a run has had.

Sequence numbers make the collector's accounting exact: a gap is lost messages, a repeat a duplicate; a
message dropped (and counted) before it was applied is marked, so that the sender's next message does
not count it again as lost.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from grokwatch.wire import AGENT_DROP_REASONS, Heartbeat

# Live senders: a run has at most its world size (the largest its hellos declared, capped by max_world_size)
# — a new sender past it retires the run's longest-quiet one (a restarted agent replaces its dead self). All
# runs together have at most MAX_SENDERS, a backstop. A retired sender is kept, dormant, with its counters and
# sequence number: should it speak again it is revived, not counted twice nor as a gap. Past MAX_DORMANT the
# oldest dormant sender's counters fold into its (run, rank) total.
MAX_SENDERS = 1 << 16
MAX_DORMANT = 1 << 16
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
        self.retired: dict[tuple[str, int], Counters] = {}  # counters of dormant senders folded away
        self.dormant: collections.OrderedDict[str, Sender] = collections.OrderedDict()  # retired, oldest first
        # Live senders by recency (the quietest first), in all and per run: retiring one is O(1).
        self.order: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.by_run: dict[str, collections.OrderedDict[str, None]] = {}
        self.accounted: dict[str, set[int]] = {}  # sender -> sequence numbers dropped and counted already

    def __setstate__(self, attrs: dict) -> None:
        """A snapshot from before the dormant table: the live senders counted per run."""
        self.__dict__.update(attrs)
        if "dormant" not in attrs:
            self.dormant = collections.OrderedDict()
        if "order" not in attrs:
            self.order, self.by_run = collections.OrderedDict(), {}
            for sender, info in sorted(self.records.items(), key=lambda kv: kv[1].seen):
                self.order[sender] = None
                self.by_run.setdefault(info.run, collections.OrderedDict())[sender] = None

    def __getitem__(self, sender: str) -> Sender:
        return self.records[sender]

    def get(self, sender: str) -> Optional[Sender]:
        return self.records.get(sender)

    def values(self) -> Iterator[Sender]:
        return iter(list(self.records.values()))

    def __len__(self) -> int:
        return len(self.records)

    def sequence(self, sender: str, run: str, rank: int, seq: int, now: float, max_jump: int,
                 run_limit: int = MAX_SENDERS) -> int:
        """Admit ``seq`` from ``sender``; returns the messages lost before it (its gap, less the ones dropped
        and counted already). Raises SequenceError: ``duplicate`` (not beyond the last), ``sequence_jump``
        (more than ``max_jump`` ahead: a forged number would make the sender's later messages duplicates;
        the last stays, so its real next message is accepted). ``run_limit``: the live senders ``run`` may
        have (its world size)."""
        info = self.records.get(sender)
        if info is None:
            info = self.dormant.pop(sender, None)  # retired, and back: its history holds
            while len(self.by_run.get(run, ())) >= max(1, run_limit):
                self._retire(next(iter(self.by_run[run])))
            if len(self.records) >= MAX_SENDERS:
                self._retire(next(iter(self.order)))
            if info is None:
                info = Sender(run=run, rank=rank, seen=now)
                # An unknown sender's first number is its baseline (issue 29): a collector without its history
                # (no state dir, a rescheduled pod, an upgrade) cannot tell a gap from the messages it never
                # knew of, and an agent past max_jump messages would otherwise be rejected as sequence_jump.
                info.last_seq = seq - 1
            self.records[sender] = info
            self.order[sender] = None
            self.by_run.setdefault(info.run, collections.OrderedDict())[sender] = None
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
        self.order.move_to_end(sender)
        self.by_run[info.run].move_to_end(sender)
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
        """Counters per (run, rank): folded, dormant and live senders, each once, so a restarted agent never
        makes a total go backwards. A sender without a heartbeat yet adds no series."""
        out: dict[tuple[str, int], Counters] = {}
        for key, counters in self.retired.items():
            out.setdefault(key, Counters()).add(counters)
        for info in (*self.dormant.values(), *self.records.values()):
            if info.beats:
                out.setdefault((info.run, info.rank), Counters()).add(info.counters)
        return out

    def hellos(self) -> dict[str, dict]:
        """Per run, the latest hello of its live senders (agent_version, distribution, ...)."""
        return self._latest(lambda hello: hello)

    def wandb_runs(self) -> dict[str, str]:
        """Per run, the training's own W&B run ("entity/project/id") as the latest live sender that names one
        says (usually rank 0 alone: the other ranks log to no W&B run)."""
        return self._latest(lambda hello: hello.get("wandb_run"))

    def _latest(self, read: Callable[[dict], Any]) -> dict[str, Any]:
        """Per run, ``read(hello)`` of its most recently seen live sender whose hello gives one (not None)."""
        out: dict[str, tuple[float, Any]] = {}
        for info in self.records.values():
            value = read(info.hello) if info.hello is not None else None
            if value is not None and (info.run not in out or info.seen >= out[info.run][0]):
                out[info.run] = (info.seen, value)
        return {run: value for run, (_, value) in out.items()}

    def forget_run(self, run: str) -> None:
        """An expired run: its senders and their counters go (its series end)."""
        for sender in [s for s, info in self.records.items() if info.run == run]:
            del self.records[sender]
            self.order.pop(sender, None)
        for sender in [s for s, info in self.dormant.items() if info.run == run]:
            del self.dormant[sender]
        for key in [k for k in self.retired if k[0] == run]:
            del self.retired[key]
        self.by_run.pop(run, None)

    def _retire(self, sender: str) -> None:
        """A live sender goes dormant (the quietest of its run, or of all)."""
        info = self.records.pop(sender)
        self.order.pop(sender, None)
        recent = self.by_run.get(info.run)
        if recent is not None:
            recent.pop(sender, None)
            if not recent:
                del self.by_run[info.run]
        self.dormant[sender] = info
        while len(self.dormant) > MAX_DORMANT:
            _, old = self.dormant.popitem(last=False)
            if old.beats:
                self.retired.setdefault((old.run, old.rank), Counters()).add(old.counters)
