"""METRICS.md §4: per-sample probe loss histories, t*, memorization groups.

Runs on the processing thread, for the probe source only.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional

import numpy as np

from grokwatch.collector.labels import BUCKET_PREFIX

MAX_HISTORY = 256  # probes kept per sample; t* older than this many probes is clamped
# What a history costs, at most (tests/unit/test_state.py measures them with tracemalloc): a sample's record,
# its id and table entry, and each observation (a step and a loss in two lists). ``max_memory_mb`` counts them.
SAMPLE_BYTES = 512
OBS_BYTES = 44


class SampleHistory:
    __slots__ = ("group", "steps", "losses", "memorized_step")

    def __init__(self, group: str):
        self.group = group
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.memorized_step: Optional[int] = None

    def add(self, step: int, loss: float) -> int:
        """Record one probe; returns the change in this history's length."""
        before = len(self.steps)
        if self.steps and step <= self.steps[-1]:
            if step == self.steps[-1]:
                self.losses[-1] = loss  # the same probe again (another rank): keep the latest
                return 0
            # An older step after a newer one: a new run phase (replay from a checkpoint). Restart.
            self.steps.clear()
            self.losses.clear()
        self.steps.append(step)
        self.losses.append(loss)
        if len(self.steps) > MAX_HISTORY:
            del self.steps[0], self.losses[0]
        return len(self.steps) - before


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
        self.observations = 0  # probes held over all samples (nbytes)
        self.evicted = 0  # samples forgotten to keep the collector within max_memory_mb

    def __setstate__(self, attrs: dict) -> None:
        """A snapshot from before the histories were counted: count them."""
        self.__dict__.update(attrs)
        if "observations" not in attrs:
            self.observations = sum(len(h.steps) for h in self.samples.values())
            self.evicted = 0

    @property
    def nbytes(self) -> int:
        """What these histories take, at most (``max_memory_mb`` counts it)."""
        return len(self.samples) * SAMPLE_BYTES + self.observations * OBS_BYTES

    def shrink(self, excess: int) -> int:
        """Forget the least recently probed samples until ``excess`` bytes are freed (or none is left);
        returns the bytes freed."""
        freed = 0
        while freed < excess and self.samples:
            _, hist = self.samples.popitem(last=False)
            self.observations -= len(hist.steps)
            freed += SAMPLE_BYTES + len(hist.steps) * OBS_BYTES
            self.evicted += 1
        return freed

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
                    _, old = self.samples.popitem(last=False)
                    self.observations -= len(old.steps)
            else:
                self.samples.move_to_end(sid)
            hist.group = group
            self.observations += hist.add(step, float(loss))
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
        return f"{BUCKET_PREFIX}{start}"

    def memorized_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for hist in self.samples.values():
            if hist.memorized_step is not None:
                counts[hist.group] = counts.get(hist.group, 0) + 1
        return counts
