"""TensorBoard view: what the collector exports, as TensorBoard scalars and histograms, per run.

One event-file directory a run (``<dir>/<run>``), written by tensorboardX (no torch). The series and their
tags are collector/scalars.py's (shared with the W&B view); the x axis is the training step. Each interval
writes every scalar whose step moved, and each pathway histogram's new samples as a TensorBoard histogram over
its buckets (the overflow bucket drawn one bucket-width past the last bound) beside their mean
``…/<metric>_mean``. A histogram's sum of squares is not kept by the collector, so the one TensorBoard stores
is the buckets' midpoints squared (TensorBoard draws the buckets, not it). The run's layer x expert load
matrix (all-token counts) is an image, ``router/expert_load``.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional

import numpy as np

from grokwatch.collector import scalars
from grokwatch.collector.config import ConfigError
from grokwatch.collector.periodic import Periodic
from grokwatch.collector.state import State
from grokwatch.collector.view import ViewMemo, build_view


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
        self.memo = ViewMemo()  # this view's stale-read fallbacks (view.py)
        self.writers: dict = {}
        self._written = scalars.Written()
        self._deltas = scalars.HistogramDeltas()
        self.points = 0  # scalars and histograms written
        # a write that fails (a full disk, a bad series) is logged by Periodic and retried the next interval
        self._periodic = Periodic("grokwatch-tensorboard", interval_s, self._write, final=self._write)
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
        if step is None or value is None or not self._written.due(run, tag, int(step), float(value)):
            return
        self._writer(run).add_scalar(tag, float(value), int(step))
        self.points += 1

    def write_once(self) -> int:
        """Write what moved since the last call; returns the number of points written."""
        fams = scalars.families(build_view(self.state, self.queue_stats, self.memo))
        steps = scalars.group_steps(fams)
        before = self.points
        for point in scalars.points(fams, steps):
            self._scalar(point.run, point.tag, point.value, point.step)
        for h in self._deltas.read(fams, steps):
            raw = raw_histogram(h.bounds, h.counts)
            if raw is not None and self._written.due(h.run, h.tag, h.step):
                self._writer(h.run).add_histogram_raw(h.tag, global_step=h.step, **raw)
                self.points += 1
                self._scalar(h.run, f"{h.tag}_mean", h.mean, h.step)
        self._load_matrices()
        for writer in self.writers.values():
            writer.flush()
        return self.points - before

    def _load_matrices(self) -> None:
        """Each run's layer x expert load (the all-token counts' shares of the latest closed interval) as an
        image ``router/expert_load`` (rows: layers, columns: experts; each layer scaled to its busiest expert:
        white), at the step that ends the interval."""
        with self.state.lock:
            mats = {run: (counts.closed_step, counts.figures()) for run, counts in self.state.all_tokens.items()}
        for run, (step, figures) in sorted(mats.items()):
            if figures is None or not self._written.due(run, "router/expert_load", step):
                continue
            share = figures["share_LE"]
            top = share.max(axis=1, keepdims=True)
            image = np.where(top > 0, share / np.where(top > 0, top, 1.0), 0.0).astype(np.float32)
            self._writer(run).add_image("router/expert_load", image, global_step=step, dataformats="HW")
            self.points += 1

    def _write(self) -> None:
        self.write_once()

    def shutdown(self, deadline_s: float = 10.0) -> None:
        """Once: the last write, then every writer closed; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._periodic.shutdown(deadline_s)
        for writer in self.writers.values():
            writer.close()
