"""FROZEN COPY of collector/phases.py before the evidence rules (kept only so research/rescore_phases.py can
score old against new on the same journals; never imported by the collector).

METRICS.md §5: per-group phase detector (ours; the paper gives metrics, not a detector).

Input: one point per (group, step) — the group's mean loss and pathway
metrics at that step (from the probe source, where per-sample loss exists).
Over a sliding window of the latest ``window`` points it fits robust
(Theil–Sen) slopes and reads them as the change over the window:

  memorizing   -> memorized    loss no longer clearly falling
  memorized    -> generalizing distance clearly falling and/or consistency clearly rising
  generalizing -> stable       nothing moving

Each transition needs ``patience`` consecutive windows agreeing (hysteresis).
Defaults are calibrated on the grokking benchmark (docs/groundtruth.md).

Which distance it watches is ``phase_distance``; with "auto" a tracker starts on
the normalized distance and moves, once, to the normalized distance ÷ the
cross-group baseline as soon as its points carry one (its window restarts
there: the two are different quantities).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from grokwatch.collector.config import PHASE_DISTANCE_AUTO, PHASE_DISTANCES  # noqa: E402

PHASES = ("memorizing", "memorized", "generalizing", "stable")
# Phase -> the tracker attribute (and journal key) holding the step that transition is dated to.
DATED_STEPS = {"memorized": "memorized_step", "generalizing": "onset_step"}


@dataclass(frozen=True, kw_only=True)
class PhaseConfig:
    """Defaults are the shipped ones (CollectorConfig.phase_*; a test keeps the two equal)."""

    window: int = 12  # points in the sliding window
    patience: int = 4  # consecutive windows before a transition
    loss_abs_tol: float = 0.05  # nats over the window: smaller falls count as flat
    loss_rel_tol: float = 0.05  # ... or this fraction of the window's median loss, whichever is larger
    distance_rel_tol: float = 0.03  # relative fall of the watched distance over the window
    consistency_abs_tol: float = math.inf  # rise of 1 - C over the window (inf: consistency ignored)


def distance_signal(point: dict, kind: str) -> Optional[float]:
    """The distance the detector watches, from one exported point (CollectorConfig.phase_distance)."""
    key, baseline = PHASE_DISTANCES[kind]
    d = point.get(key)
    if baseline is None:
        return d
    c = point.get(baseline)
    return d / c if d is not None and c else None


def theil_sen_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Median of pairwise slopes (robust to outliers)."""
    n = len(x)
    if n < 2:
        return 0.0
    i, j = np.triu_indices(n, k=1)
    dx = x[j] - x[i]
    ok = dx != 0
    if not ok.any():
        return 0.0
    return float(np.median((y[j] - y[i])[ok] / dx[ok]))


class PhaseTracker:
    """The phase of one group; fed one point per step, in step order."""

    def __init__(self, config: PhaseConfig, distance: str = "normalized"):
        self.config = config
        self._auto = distance == "auto"
        self.signal = PHASE_DISTANCE_AUTO[1] if self._auto else distance  # the distance watched now
        if self.signal not in PHASE_DISTANCES:
            raise ValueError(f"phase distance {distance!r}: not one of {', '.join(PHASE_DISTANCES)} or auto")
        self.points: deque = deque(maxlen=config.window)
        self.phase = "memorizing"
        self.memorized_step: Optional[int] = None
        self.onset_step: Optional[int] = None
        self._streak = 0
        self._pending: Optional[dict] = None

    def observe(self, step: int, point: dict) -> None:
        """One exported point (state.py's, or a journal's) of this group."""
        if self._auto and self.signal != PHASE_DISTANCE_AUTO[0]:
            if distance_signal(point, PHASE_DISTANCE_AUTO[0]) is not None:
                self.signal = PHASE_DISTANCE_AUTO[0]
                self.points.clear()
                self._streak, self._pending = 0, None
        self.add(step, point.get("loss"), distance_signal(point, self.signal), point.get("consistency"))

    def add(self, step: int, loss: Optional[float], distance: Optional[float], consistency: Optional[float]) -> None:
        """Points of the same step are merged (a probe pass may span several messages)."""
        p = self._pending
        if p is not None and p["step"] == step:
            p["n"] += 1
            for key, value in (("loss", loss), ("distance", distance), ("consistency", consistency)):
                if value is not None:
                    p[key] = value if p[key] is None else p[key] + (value - p[key]) / p["n"]
            return
        if p is not None:
            self._close(p)
        self._pending = dict(step=step, loss=loss, distance=distance, consistency=consistency, n=1)

    def _close(self, point: dict) -> None:
        if self.points and point["step"] < self.points[-1]["step"]:
            self.points.clear()  # steps went back (a new run phase): start over
        self.points.append(point)
        if len(self.points) < self.config.window:
            return
        self._advance(self._trends())

    def _series(self, key):
        pts = [(p["step"], p[key]) for p in self.points if p[key] is not None]
        if len(pts) < max(3, self.config.window // 2):
            return None
        x, y = np.array(pts, dtype=np.float64).T
        return x, y

    def _trends(self) -> dict:
        c = self.config
        out = dict(loss_falling=False, loss_flat=True, structuring=False, moving=False)
        span = self.points[-1]["step"] - self.points[0]["step"]
        loss = self._series("loss")
        if loss is not None:
            change = theil_sen_slope(*loss) * span
            tol = max(c.loss_abs_tol, c.loss_rel_tol * float(np.median(loss[1])))
            out["loss_falling"] = change < -tol
            out["loss_flat"] = abs(change) <= tol
        dist = self._series("distance")
        if dist is not None:
            change = theil_sen_slope(*dist) * span / max(float(np.median(dist[1])), 1e-9)
            out["structuring"] |= change < -c.distance_rel_tol
            out["moving"] |= abs(change) > c.distance_rel_tol
        cons = self._series("consistency")
        if cons is not None:
            change = theil_sen_slope(*cons) * span
            out["structuring"] |= change > c.consistency_abs_tol
            out["moving"] |= abs(change) > c.consistency_abs_tol
        return out

    def _advance(self, t: dict) -> None:
        if self.phase == "memorizing":
            want = not t["loss_falling"]
        elif self.phase == "memorized":
            want = t["loss_flat"] and t["structuring"]
        elif self.phase == "generalizing":
            want = not t["moving"]
        else:
            want = False
        self._streak = self._streak + 1 if want else 0
        if self._streak < self.config.patience:
            return
        self._streak = 0
        # The transition happened where the first agreeing window ended.
        at = self.points[-self.config.patience]["step"]
        if self.phase == "memorizing":
            self.phase, self.memorized_step = "memorized", at
        elif self.phase == "memorized":
            self.phase, self.onset_step = "generalizing", at
        elif self.phase == "generalizing":
            self.phase = "stable"
