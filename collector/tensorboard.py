"""TensorBoard view: what the collector exports, as TensorBoard scalars and histograms, per run.

One event-file directory a run (``<dir>/<run>``), written by tensorboardX (no torch). Tags are
``<source>/<group>/<metric>`` (``…/layer<l>`` for per-layer router health); the x axis is the training
step the group last reported. Each interval writes, for every series whose step moved:

- the router-health and group gauges of ``view.build_view`` (entropy ratio, imbalance, CV, dead experts,
  distinct pathways, memorized samples), the eval scores (``eval/<group>``) at their own step, and the
  phase as its index in ``phases.PHASES`` (``…/phase``: 0 unknown, 1 memorizing, 2 memorized,
  3 generalizing, 4 stable);
- each pathway histogram's *new* samples since the last write (the cumulative counts' difference), as a
  TensorBoard histogram over its buckets (the overflow bucket drawn one bucket-width past the last bound)
  and as a scalar ``…/<metric>_mean``. A histogram's sum of squares is not kept by the collector, so the
  one TensorBoard stores is the buckets' midpoints squared (TensorBoard draws the buckets, not it).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Callable, Optional

import numpy as np

from grokwatch.collector.config import ConfigError
from grokwatch.collector.labels import CROSS_GROUP
from grokwatch.collector.periodic import Periodic
from grokwatch.collector.phases import PHASES
from grokwatch.collector.state import State
from grokwatch.collector.view import GROUP_LABELS, LAYER_LABELS, HistogramValue, build_view, scalar

log = logging.getLogger("grokwatch.collector")

PREFIX = "grokwatch_"
GAUGES = ("routing_entropy_ratio", "expert_load_imbalance_ratio", "expert_load_cv", "dead_experts",
          "distinct_pathways", "memorized_samples", "pathway_samples_total", "router_zloss",
          "expert_load_diversity", "expert_load_share_std")


def _path_safe(run: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", run) or "_"


def raw_histogram(bounds, counts) -> Optional[dict]:
    """tensorboardX add_histogram_raw arguments for bucket ``counts`` over upper ``bounds`` (+ overflow)."""
    bounds = [float(b) for b in bounds]
    counts = np.asarray(counts, dtype=np.float64)
    total = float(counts.sum())
    if total <= 0:
        return None
    width = bounds[-1] - bounds[-2] if len(bounds) > 1 else 1.0
    limits = bounds + [bounds[-1] + width]
    lowers = [bounds[0] - width] + bounds
    mids = np.array([(lo + hi) / 2 for lo, hi in zip(lowers, limits)])
    nonzero = np.nonzero(counts)[0]
    return dict(min=lowers[nonzero[0]], max=limits[nonzero[-1]], num=int(total), sum=float((mids * counts).sum()),
                sum_squares=float((mids**2 * counts).sum()), bucket_limits=limits, bucket_counts=counts.tolist())


class TensorBoardView:
    def __init__(self, state: State, logdir: str, interval_s: float = 30.0,
                 queue_stats: Optional[Callable[[], tuple]] = None):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError("tensorboard_dir needs tensorboardX: pip install 'grokwatch[tensorboard]'") from None
        self._writer_class = SummaryWriter
        self.state = state
        self.logdir = logdir
        self.interval_s = interval_s
        self.queue_stats = queue_stats
        self.writers: dict = {}
        self._last_step: dict = {}  # (run, tag) -> step written
        self._last_hist: dict = {}  # (run, tag) -> (cumulative counts, sum)
        self.points = 0  # scalars and histograms written
        self._periodic = Periodic("grokwatch-tensorboard", interval_s, self._round, final=self._last_round)
        self._closed = False
        os.makedirs(logdir, exist_ok=True)

    def start(self) -> "TensorBoardView":
        self._periodic.start()
        return self

    def _writer(self, run: str):
        if run not in self.writers:
            self.writers[run] = self._writer_class(os.path.join(self.logdir, _path_safe(run)), flush_secs=3600)
        return self.writers[run]

    def _scalar(self, run: str, tag: str, value, step) -> None:
        if step is None or value is None or not math.isfinite(float(value)):
            return
        step = int(step)
        if self._last_step.get((run, tag), -1) >= step:
            return
        self._last_step[(run, tag)] = step
        self._writer(run).add_scalar(tag, float(value), step)
        self.points += 1

    def write_once(self) -> int:
        """Write what moved since the last call; returns the number of points written."""
        fams = {f.name.removeprefix(PREFIX): f for f in build_view(self.state, self.queue_stats)}
        steps = {values: scalar(v) for values, v in fams["group_latest_step"].samples}
        for (run, source, _), step in list(steps.items()):  # the cross-group baseline: its stream's latest step
            key = (run, source, CROSS_GROUP)
            steps[key] = max(steps.get(key, step), step)
        before = self.points
        for name in GAUGES:
            fam = fams[name]
            for values, v in fam.samples:
                run, source, group = values[:3]
                tag = f"{source}/{group}/{name}" + (f"/layer{values[3]}" if fam.labels == LAYER_LABELS else "")
                self._scalar(run, tag, v, steps.get(values[:3]))
        for values, v in fams["group_phase"].samples:
            if scalar(v) == 1:
                run, source, group, phase = values
                self._scalar(run, f"{source}/{group}/phase", PHASES.index(phase), steps.get(values[:3]))
        eval_steps = {values: scalar(v) for values, v in fams["eval_step"].samples}
        for (run, group), score in fams["eval_score"].samples:
            self._scalar(run, f"eval/{group}", score, eval_steps.get((run, group)))
        for name, fam in fams.items():
            if fam.kind == "histogram" and fam.labels == GROUP_LABELS:
                for values, hist in fam.samples:
                    assert isinstance(hist, HistogramValue)
                    self._histogram(name, values, hist.bounds, hist.counts, hist.sum, steps.get(values))
        for writer in self.writers.values():
            writer.flush()
        return self.points - before

    def _histogram(self, name, values, bounds, counts, total, step) -> None:
        run, source, group = values
        tag = f"{source}/{group}/{name}"
        if step is None:
            return
        counts = np.asarray(counts, dtype=np.int64)
        prev_counts, prev_sum = self._last_hist.get((run, tag), (np.zeros_like(counts), 0.0))
        self._last_hist[(run, tag)] = (counts, float(total))
        if len(counts) != len(prev_counts):
            return
        delta = counts - prev_counts
        if delta.sum() <= 0 or (delta < 0).any():  # nothing new, or the state was reset
            return
        raw = raw_histogram(bounds, delta)
        if raw is not None and self._last_step.get((run, tag), -1) < int(step):
            self._last_step[(run, tag)] = int(step)
            self._writer(run).add_histogram_raw(tag, global_step=int(step), **raw)
            self.points += 1
            self._scalar(run, f"{tag}_mean", (float(total) - prev_sum) / float(delta.sum()), step)

    def _round(self) -> None:
        try:
            self.write_once()
        except Exception:  # a full disk or a bad series must not stop the collector
            log.exception("TensorBoard write failed; the next interval retries")

    def _last_round(self) -> None:
        try:
            self.write_once()
        except Exception:
            log.exception("final TensorBoard write failed")

    def shutdown(self, deadline_s: float = 10.0) -> None:
        """Once: the last write, then every writer closed; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._periodic.shutdown(deadline_s)
        for writer in self.writers.values():
            writer.close()
