"""Phase evidence, after the kernels: each routing message's points (points.py) into the groups'
phase trackers (phases.py), the user's training losses into the train source's, and the journal
records of both. Which source carries a group's phase (one event, one report: METRICS.md §5).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.labels import BUCKET_PREFIX, CROSS_GROUP
from grokwatch.collector.phases import DATED_STEPS, EVIDENCE_KEYS, PhaseConfig, PhaseTracker
from grokwatch.collector.points import JournalPoint, points_of
from grokwatch.collector.stream import Stream
from grokwatch.wire import FRESH_PREFIX, Loss, Routing

# METRICS.md §5 "one event, one report": the source that carries a data group's phase is the first of these
# with loss evidence for it (the probe measures per-sample loss; the train source has the user's loss).
CARRIER_ORDER = ("probe", "train", "replay")


def tracker(config: CollectorConfig, label: str) -> PhaseTracker:
    return PhaseTracker(PhaseConfig.of(config), config.phase_distance, epsilon=config.memorization_epsilon.get(label))


def routing_points(config: CollectorConfig, msg: Routing, stream: Stream, targets_N2: np.ndarray,
                   sums: tuple) -> Iterator[dict]:
    """The journal records of one message's points, one per group it reached, each observed by the
    group's tracker on the way (a bucket's too: it has no phase)."""
    gs = np.unique(targets_N2[targets_N2 >= 0])
    for g, point in zip(gs.tolist(), points_of(gs, *sums)):
        label = stream.labels[g]
        record: dict = dict(JournalPoint(kind="point", run=msg.run, source=msg.source, group=label, step=msg.step,
                                         t=msg.wall_time, **point))
        if not label.startswith((BUCKET_PREFIX, FRESH_PREFIX)):  # buckets, fresh documents: no phase, no event
            phases = stream.phases.get(label)
            if phases is None:
                phases = stream.phases[label] = tracker(config, label)
            changed = phases.observe(msg.step, point)
            # The detector dates a transition back to its first agreeing evaluation; the journal carries
            # those steps (the gauges' values), and the evidence where the phase changed, so that the
            # report marks the same steps and prints why (JournalPoint's phase keys).
            record.update({k: getattr(phases, k) for k in DATED_STEPS.values() if getattr(phases, k) is not None})
            record.update(phase=phases.phase, phase_signal=phases.signal)
            if changed in EVIDENCE_KEYS:
                record[EVIDENCE_KEYS[changed]] = phases.evidence[changed]
        yield record


def train_losses(config: CollectorConfig, msg: Loss, stream: Stream) -> tuple[list[dict], bool]:
    """The user's training loss per group: loss evidence for the train source's phases. A group that
    has no routing summaries yet gets a tracker (no window) while the stream has room for it. Returns
    the journal records and whether every group was kept."""
    records = []
    for group, loss in msg.losses.items():
        phases = stream.phases.get(group)
        if phases is None:
            if group.startswith(BUCKET_PREFIX) or group == CROSS_GROUP or len(stream.phases) >= config.max_groups:
                continue
            phases = stream.phases[group] = tracker(config, group)
        phases.add_loss(msg.step, loss)
        records.append(dict(kind="loss", run=msg.run, source="train", group=group, step=msg.step, loss=loss,
                            t=msg.wall_time))
    return records, len(records) == len(msg.losses)


def carriers(streams: dict[tuple[str, str], Stream]) -> dict[tuple[str, str], str]:
    """(run, group) -> the source whose tracker carries that group's phase (CARRIER_ORDER)."""
    out: dict[tuple[str, str], str] = {}
    for source in CARRIER_ORDER:
        for (run, src), stream in streams.items():
            if src != source:
                continue
            for group, phases in stream.phases.items():
                if phases.has_loss_evidence:
                    out.setdefault((run, group), source)
    return out
