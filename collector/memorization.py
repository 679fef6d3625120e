"""METRICS.md §4: per-sample probe loss histories, t*, memorization groups.

Runs on the processing thread, for the probe source only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import numpy as np

MAX_HISTORY = 256  # probes kept per sample; t* older than this many probes is clamped


class SampleHistory:
    __slots__ = ("group", "steps", "losses", "memorized_step")

    def __init__(self, group: str):
        self.group = group
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.memorized_step: Optional[int] = None

    def add(self, step: int, loss: float) -> None:
        if self.steps and step <= self.steps[-1]:
            if step == self.steps[-1]:
                self.losses[-1] = loss  # the same probe again (another rank): keep the latest
                return
            # An older step after a newer one: a new run phase (replay from a checkpoint). Restart.
            self.steps.clear()
            self.losses.clear()
        self.steps.append(step)
        self.losses.append(loss)
        if len(self.steps) > MAX_HISTORY:
            del self.steps[0], self.losses[0]


def memorized_since(steps: list[int], losses: list[float], epsilon: float, delta: float,
                    consecutive: int) -> Optional[int]:
    """The earliest probe step t* from which every probe has loss <= epsilon and
    stays within delta of the latest loss; None unless at least ``consecutive``
    probes satisfy it (METRICS.md §4)."""
    if not losses:
        return None
    latest = losses[-1]
    first = None
    for j in range(len(losses) - 1, -1, -1):
        if losses[j] <= epsilon and abs(losses[j] - latest) <= delta:
            first = j
        else:
            break
    if first is None or len(losses) - first < consecutive:
        return None
    return steps[first]


class MemorizationTracker:
    """Probe-source state of one run: sample histories, bounded by count (LRU)."""

    def __init__(self, *, delta: float, consecutive: int, epsilon: Mapping[str, float], max_samples: int,
                 bucket_steps: int):
        self.delta = delta
        self.consecutive = consecutive
        self.epsilon = dict(epsilon)
        self.max_samples = max_samples
        self.bucket_steps = bucket_steps
        self.samples: "OrderedDict[str, SampleHistory]" = OrderedDict()

    def group_epsilon(self, group: str) -> float:
        """Configured ε, else (ours) the 0.25 quantile of the group's latest probe losses."""
        if group in self.epsilon:
            return self.epsilon[group]
        latest = [h.losses[-1] for h in self.samples.values() if h.group == group and h.losses]
        return float(np.quantile(latest, 0.25)) if latest else 0.0

    def observe(self, step: int, sample_ids, groups, losses) -> list[Optional[int]]:
        """Record one probe message; returns each sample's t* (None: not memorized)."""
        for sid, group, loss in zip(sample_ids, groups, losses):
            hist = self.samples.get(sid)
            if hist is None:
                hist = self.samples[sid] = SampleHistory(group)
                if len(self.samples) > self.max_samples:
                    self.samples.popitem(last=False)
            else:
                self.samples.move_to_end(sid)
            hist.group = group
            hist.add(step, float(loss))
        eps = {g: self.group_epsilon(g) for g in set(groups)}
        out = []
        for sid, group in zip(sample_ids, groups):
            hist = self.samples.get(sid)
            if hist is None:
                out.append(None)
                continue
            hist.memorized_step = memorized_since(hist.steps, hist.losses, eps[group], self.delta, self.consecutive)
            out.append(hist.memorized_step)
        return out

    def bucket_label(self, memorized_step: int) -> str:
        """The probe-source group of a memorized sample: the bucket of its t*."""
        start = (memorized_step // self.bucket_steps) * self.bucket_steps
        return f"mem@{start}"

    def memorized_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for hist in self.samples.values():
            if hist.memorized_step is not None:
                counts[hist.group] = counts.get(hist.group, 0) + 1
        return counts
