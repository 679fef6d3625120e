"""The step-aligned series that the TensorBoard and W&B views write, read from ``view.build_view``'s families
under one tag scheme:

- ``<source>/<group>/<metric>`` (``…/layer<l>`` for per-layer router health) for the group gauges (GAUGES), at
  the training step the group last reported; ``<source>/<group>/phase`` as the phase's index in
  ``phases.PHASES`` (0 unknown, 1 memorizing, 2 memorized, 3 generalizing, 4 stable);
- ``eval/<group>``: the user's held-out scores at their own step;
- ``router/layer<l>/<figure>``: the run's all-token figures (imbalance, CV, dead experts; a balancing bias's
  spread and drift) and ``router/aux_loss`` at the step that ends their interval; ``router/<group>/layer<l>/
  <figure>`` the same per row group (imbalance, CV, dead experts);
- ``<source>/<group>/<histogram>``: each pathway histogram's *new* samples since the previous read (the
  cumulative counts' difference; ``HistogramDeltas``), with their mean as ``…/<histogram>_mean``.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

from grokwatch.collector.labels import CROSS_GROUP
from grokwatch.collector.phases import PHASES
from grokwatch.collector.view import GROUP_LABELS, LAYER_LABELS, Family, HistogramValue, scalar

PREFIX = "grokwatch_"
GAUGES = ("routing_entropy_ratio", "expert_load_imbalance_ratio", "expert_load_cv", "dead_experts",
          "distinct_pathways", "memorized_samples", "pathway_samples_total", "router_zloss",
          "expert_load_diversity", "expert_load_share_std")
ALL_TOKENS = {"router_all_tokens_load_imbalance_ratio": "load_imbalance", "router_all_tokens_load_cv": "load_cv",
              "router_all_tokens_dead_experts": "dead_experts", "router_balance_bias_std": "balance_bias_std",
              "router_balance_bias_drift": "balance_bias_drift",
              "router_all_tokens_dropped_pick_fraction": "dropped_pick_fraction"}
GROUP_ALL_TOKENS = {"router_all_tokens_group_load_imbalance_ratio": "load_imbalance",
                    "router_all_tokens_group_load_cv": "load_cv", "router_all_tokens_group_dead_experts": "dead_experts"}


class Point(NamedTuple):
    run: str
    tag: str
    value: float
    step: int


def families(view: list[Family]) -> dict[str, Family]:
    return {f.name.removeprefix(PREFIX): f for f in view}


def group_steps(fams: dict[str, Family]) -> dict[tuple, int]:
    """(run, source, group) -> the training step the group last reported (the cross-group baseline: its
    stream's latest)."""
    steps = {values: int(scalar(v)) for values, v in fams["group_latest_step"].samples}
    for (run, source, _), step in list(steps.items()):
        key = (run, source, CROSS_GROUP)
        steps[key] = max(steps.get(key, step), step)
    return steps


def points(fams: dict[str, Family], steps: dict[tuple, int]) -> Iterator[Point]:
    """Every scalar of the view with its step (the histograms are ``HistogramDeltas``'s)."""
    for name in GAUGES:
        fam = fams[name]
        for values, v in fam.samples:
            step = steps.get(values[:3])
            if step is not None:
                run, source, group = values[:3]
                tag = f"{source}/{group}/{name}" + (f"/layer{values[3]}" if fam.labels == LAYER_LABELS else "")
                yield Point(run, tag, scalar(v), step)
    for values, v in fams["group_phase"].samples:
        step = steps.get(values[:3])
        if scalar(v) == 1 and step is not None:
            run, source, group, phase = values
            yield Point(run, f"{source}/{group}/phase", float(PHASES.index(phase)), step)
    eval_steps = {values: int(scalar(v)) for values, v in fams["eval_step"].samples}
    for (run, group), score in fams["eval_score"].samples:
        if (run, group) in eval_steps:
            yield Point(run, f"eval/{group}", scalar(score), eval_steps[(run, group)])
    interval = {values[0]: int(scalar(v)) for values, v in fams["router_all_tokens_interval_step"].samples}
    for name, figure in ALL_TOKENS.items():
        for (run, layer), v in fams[name].samples:
            if run in interval:
                yield Point(run, f"router/layer{layer}/{figure}", scalar(v), interval[run])
    for name, figure in GROUP_ALL_TOKENS.items():
        for (run, group, layer), v in fams[name].samples:
            if run in interval:
                yield Point(run, f"router/{group}/layer{layer}/{figure}", scalar(v), interval[run])
    for (run,), v in fams["router_aux_loss"].samples:
        if run in interval:
            yield Point(run, "router/aux_loss", scalar(v), interval[run])


class Written:
    """The step each (run, tag) of a view was last written at: a point goes out once, when its step moved, and
    only a finite value (both views, TensorBoard and W&B, keep one)."""

    def __init__(self):
        self._step: dict[tuple[str, str], int] = {}

    def due(self, run: str, tag: str, step: int, value: float = 0.0) -> bool:
        """Whether to write this point now (and, if so, it counts as written)."""
        if not math.isfinite(value) or self._step.get((run, tag), -1) >= step:
            return False
        self._step[(run, tag)] = step
        return True


class HistogramDelta(NamedTuple):
    run: str
    tag: str
    bounds: np.ndarray
    counts: np.ndarray  # the new samples per bucket (the last: overflow)
    mean: float
    step: int


class HistogramDeltas:
    """The pathway histograms' new samples since the previous ``read`` of each (run, source, group)."""

    def __init__(self):
        self._last: dict[tuple, tuple[np.ndarray, float]] = {}  # (run, tag) -> (cumulative counts, sum)

    def read(self, fams: dict[str, Family], steps: dict[tuple, int]) -> Iterator[HistogramDelta]:
        for name, fam in fams.items():
            if fam.kind != "histogram" or fam.labels != GROUP_LABELS:
                continue
            for values, hist in fam.samples:
                assert isinstance(hist, HistogramValue)
                step = steps.get(values)
                if step is None:
                    continue
                run, source, group = values
                tag = f"{source}/{group}/{name}"
                counts = np.asarray(hist.counts, dtype=np.int64)
                prev_counts, prev_sum = self._last.get((run, tag), (np.zeros_like(counts), 0.0))
                self._last[(run, tag)] = (counts, float(hist.sum))
                if len(counts) != len(prev_counts):
                    continue
                delta = counts - prev_counts
                if delta.sum() <= 0 or (delta < 0).any():  # nothing new, or the state was reset
                    continue
                yield HistogramDelta(run, tag, np.asarray(hist.bounds), delta,
                                     (float(hist.sum) - prev_sum) / float(delta.sum()), step)
