"""METRICS.md §5: per-group phase detector (ours; the paper gives metrics, not a detector).

Two inputs per group, on the training-step axis:

* **loss evidence**: the probe's per-sample losses (a point's mean over the group's samples) or a
  training loss the user hands the agent (``mon.step(step, loss=...)``, a ``Loss`` message);
* **pathway points**: the group's watched distance (and consistency) from each routing message.

Each closed pathway point, once the window holds ``window`` of them, is one evaluation:

  unknown      -> memorizing    there is loss evidence (3 loss points or more); without it, no claim
  memorizing   -> memorized     the loss is low (ε: per group if configured, else ``loss_low_ratio`` of
                                the group's first loss level and at most ``loss_max_wrong`` × ln 2, so
                                that a loss averaged over many answers cannot hide wrong ones) and flat
                                over the window
  memorized    -> generalizing  the loss is still low and the watched distance falls *significantly*:
                                a one-sided Mann–Kendall test at ``alpha``, its variance corrected for
                                autocorrelation (Hamed & Rao 1998), and a Theil–Sen fall of at least
                                ``distance_rel_tol`` of the window's median (an effect-size floor)
  generalizing -> stable        no significant trend either way

Each transition needs ``patience`` consecutive evaluations agreeing; it is dated to the first of
them, and that evaluation's numbers are kept (``evidence``) for the journal and the report.

Which distance it watches is ``phase_distance``; with "auto" a tracker starts on the normalized
distance and moves, once, to the normalized distance ÷ the cross-group baseline as soon as its
points carry one (its window restarts there: the two are different quantities). Watching the ratio
is what discounts a global routing change: it moves the baseline as much as the group.

The false-onset rate of the defaults on null series is measured by ``bench/phase_null.py``
(docs/collector.md, "Phases").
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Mapping, Optional

import numpy as np

from grokwatch.collector.config import PHASE_DISTANCE_AUTO, PHASE_DISTANCES, CollectorConfig

PHASES = ("unknown", "memorizing", "memorized", "generalizing", "stable")
# Phase -> the tracker attribute (and journal key) holding the step that transition is dated to.
DATED_STEPS = {"memorized": "memorized_step", "generalizing": "onset_step"}
# Phase -> the journal key of the evidence that dated it (on the point where the phase changed).
EVIDENCE_KEYS = {"memorized": "memorized_evidence", "generalizing": "onset_evidence"}
MIN_LOSS_POINTS = 3  # loss points before a loss level counts as evidence
# Lag-1 correlation assumed before there is history to estimate it: the ground-truth journals' distances
# show 0 to 0.6 (docs/collector.md, "Phases").
PRIOR_RHO = 0.6
# The ranks of one job send a step's summaries a little out of order (each from its own sender thread): a
# step among the last LATE_STEPS seen is merged into, not taken for a rewind that starts the series over.
LATE_STEPS = 8
HISTORY_WINDOWS = 8  # the watched distance's history kept to estimate its autocorrelation, in windows
_NORMAL = NormalDist()


@dataclass(frozen=True, kw_only=True)
class PhaseConfig:
    """Defaults are the shipped ones (CollectorConfig.phase_*; a test keeps the two equal)."""

    window: int = 12  # pathway points in the sliding window (and loss points kept)
    patience: int = 4  # consecutive evaluations before a transition
    loss_abs_tol: float = 0.05  # nats over the window: smaller changes count as flat
    loss_rel_tol: float = 0.05  # ... or this fraction of the window's median loss, whichever is larger
    loss_low_ratio: float = 0.1  # "low" without a configured ε: at most this fraction of the first loss level
    loss_max_wrong: float = 0.2  # ... and at most ln 2 × this (Markov: at most this share of tokens unlearned)
    alpha: float = 0.001  # one-sided false-alarm rate of one evaluation's trend test (bench/phase_null.py)
    distance_rel_tol: float = 0.03  # effect-size floor: relative fall of the watched distance over the window
    consistency_abs_tol: float = math.inf  # rise of 1 - C over the window (inf: consistency ignored)

    @classmethod
    def of(cls, config: CollectorConfig) -> "PhaseConfig":
        """The detector's settings from the collector's ``phase_*`` keys."""
        return cls(window=config.phase_window, patience=config.phase_patience, loss_abs_tol=config.phase_loss_abs_tol,
                   loss_rel_tol=config.phase_loss_rel_tol, loss_low_ratio=config.phase_loss_low_ratio,
                   loss_max_wrong=config.phase_loss_max_wrong, alpha=config.phase_alpha,
                   distance_rel_tol=config.phase_distance_rel_tol,
                   consistency_abs_tol=config.phase_consistency_abs_tol)


def distance_signal(point: Mapping[str, Any], kind: str) -> Optional[float]:
    """The distance the detector watches, from one exported point (CollectorConfig.phase_distance)."""
    key, baseline = PHASE_DISTANCES[kind]
    d = point.get(key)
    if baseline is None:
        return d
    c = point.get(baseline)
    return d / c if d is not None and c else None


def baseline_of(point: Mapping[str, Any], kind: str) -> Optional[float]:
    """The cross-group baseline behind a ÷-baseline signal (evidence only)."""
    key, baseline = PHASE_DISTANCES[kind]
    return point.get(baseline or ("cross_" + key))


def theil_sen_slope(x: np.ndarray, y: np.ndarray) -> float:
    """Median of pairwise slopes (robust to outliers)."""
    slopes = _pairwise_slopes(x, y)
    return float(np.median(slopes)) if slopes.size else 0.0


def _pairwise_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    ok = dx != 0
    return (y[j] - y[i])[ok] / dx[ok]


@dataclass(frozen=True)
class Trend:
    """A Mann–Kendall test with a Theil–Sen slope and its interval, over one window."""

    n: int
    slope: float  # Theil–Sen, per step
    slope_low: float  # Sen's interval at confidence 1 - 2 alpha
    slope_high: float
    z: float  # Mann–Kendall z (negative: falling)
    p_fall: float  # one-sided p-values
    p_rise: float
    autocorr_factor: float  # n/n* of Hamed & Rao for rho (>= 1: only ever widens the test)
    rho: float = 0.0  # the history's lag-1 correlation used


def lag1_autocorrelation(y: np.ndarray, width: int = 15) -> float:
    """The lag-1 autocorrelation rho of y's noise, from its first differences: for AR(1) noise their
    own lag-1 autocorrelation is -(1 - rho) / 2. A trend adds a level to the differences (a ramp) that
    changes at its kinks, so the differences' local mean over ``width`` points is taken out first
    (negligible bias: that mean's variance is ~2 sd² / width² against the differences' 2 sd² (1 - rho)).
    Clipped to [0, 0.99]: only positive correlation makes a trend test too eager."""
    d = np.diff(y)
    if len(d) < width + 8 or not np.median(np.abs(d - np.median(d))) > 0:
        return 0.0  # too short, or no noise at all (a noise-free ramp is a trend, not correlated noise)
    local = np.convolve(d, np.ones(width) / width, mode="valid")  # mean of d[i : i + width]
    half = width // 2
    r = d[half:half + len(local)] - local
    denom = float(r @ r)
    if denom <= 0:
        return 0.0
    return min(max(1.0 + 2.0 * float(r[:-1] @ r[1:]) / denom, 0.0), 0.99)


def ar1_variance_factor(n: int, rho: float) -> float:
    """Hamed & Rao's n/n* for an AR(1) series of lag-1 correlation rho: the ranks' autocorrelation at lag
    k is (6/pi) asin(rho^k / 2) for Gaussian noise."""
    if rho <= 0 or n < 3:
        return 1.0
    k = np.arange(1, n - 2)
    rank_acf = 6 / math.pi * np.arcsin(rho ** k / 2)
    return 1.0 + 2.0 / (n * (n - 1) * (n - 2)) * float(((n - k) * (n - k - 1) * (n - k - 2) * rank_acf).sum())


def mann_kendall(x: np.ndarray, y: np.ndarray, alpha: float, rho: float = 0.0) -> Trend:
    """Mann–Kendall trend test on y in the order of x, with the tie correction and the Hamed & Rao
    (1998) variance correction for autocorrelation, for AR(1) noise of lag-1 correlation ``rho``
    (estimated on the series' longer history: a window of 12 points cannot estimate its own)."""
    n = len(y)
    sign_NN = np.sign(y[None, :] - y[:, None])  # [i, j] = sign(y_j - y_i)
    s = float(np.triu(sign_NN, 1).sum())
    _, ties = np.unique(y, return_counts=True)
    var = (n * (n - 1) * (2 * n + 5) - float((ties * (ties - 1) * (2 * ties + 5)).sum())) / 18.0
    slopes = np.sort(_pairwise_slopes(x, y))
    slope = float(np.median(slopes)) if slopes.size else 0.0
    factor = ar1_variance_factor(n, rho)
    var *= factor
    z = 0.0 if s == 0 or var <= 0 else (s - math.copysign(1.0, s)) / math.sqrt(var)
    p_fall = _NORMAL.cdf(z)
    # Sen's interval: the ranks of the sorted slopes around the median that the variance allows.
    low = high = slope
    if slopes.size and var > 0:
        c = _NORMAL.inv_cdf(1 - alpha) * math.sqrt(var)
        lo_i = int(math.floor((slopes.size - c) / 2))
        hi_i = int(math.ceil((slopes.size + c) / 2))
        low = float(slopes[max(lo_i, 0)])
        high = float(slopes[min(hi_i, slopes.size - 1)])
    return Trend(n=n, slope=slope, slope_low=low, slope_high=high, z=z, p_fall=p_fall, p_rise=1.0 - p_fall,
                 autocorr_factor=factor, rho=rho)


def _r(x: Optional[float], digits: int = 6) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(f"{x:.{digits}g}")


class PhaseTracker:
    """The phase of one group; fed its loss evidence and one pathway point per step, in step order."""

    def __init__(self, config: PhaseConfig, distance: str = "normalized", epsilon: Optional[float] = None):
        self.config = config
        self.epsilon = epsilon  # a configured per-group ε (METRICS.md §4), else None
        self._auto = distance == "auto"
        self.signal = PHASE_DISTANCE_AUTO[1] if self._auto else distance  # the distance watched now
        if self.signal not in PHASE_DISTANCES:
            raise ValueError(f"phase distance {distance!r}: not one of {', '.join(PHASE_DISTANCES)} or auto")
        self.points: deque = deque(maxlen=config.window)
        self.history: deque = deque(maxlen=HISTORY_WINDOWS * config.window)  # watched distances: noise estimate
        self.losses: deque = deque(maxlen=config.window)  # [step, mean loss, n]
        self.loss_reference: Optional[float] = None  # the group's first loss level (median of its first points)
        self._first_losses: list[float] = []
        self.phase = "unknown"
        self.memorized_step: Optional[int] = None
        self.onset_step: Optional[int] = None
        self.evidence: dict[str, dict] = {}  # phase -> what dated it
        self.last: Optional[dict] = None  # the latest evaluation's numbers
        self._streak = 0
        self._candidate: Optional[dict] = None  # the evidence of the first agreeing evaluation
        self._pending: Optional[dict] = None
        self._changed: Optional[str] = None

    def __setstate__(self, state: dict) -> None:
        """A tracker from an older snapshot: what it lacks starts empty (no evidence yet)."""
        self.__dict__.update(state)
        for name, value in (("epsilon", None), ("losses", deque(maxlen=self.config.window)),
                            ("loss_reference", None), ("_first_losses", []), ("evidence", {}), ("last", None),
                            ("_candidate", None), ("_changed", None),
                            ("history", deque(maxlen=HISTORY_WINDOWS * self.config.window))):
            self.__dict__.setdefault(name, value)
        if self.memorized_step is None and self.phase == "memorizing" and not self.losses:
            self.phase = "unknown"

    @property
    def has_loss_evidence(self) -> bool:
        return self.loss_reference is not None or (self.epsilon is not None and len(self.losses) > 0)

    # ------------------------------------------------------------------ input

    def observe(self, step: int, point: Mapping[str, Any]) -> Optional[str]:
        """One exported point (state.py's, or a journal's) of this group. Returns the phase it moved to,
        if this call moved it."""
        self._changed = None
        if self._auto and self.signal != PHASE_DISTANCE_AUTO[0]:
            if distance_signal(point, PHASE_DISTANCE_AUTO[0]) is not None:
                self.signal = PHASE_DISTANCE_AUTO[0]
                self.points.clear()
                self.history.clear()
                self._streak, self._candidate, self._pending = 0, None, None
        self.add(step, point.get("loss"), distance_signal(point, self.signal), point.get("consistency"),
                 baseline_of(point, self.signal))
        return self._changed

    def add_loss(self, step: int, loss: Optional[float]) -> None:
        """Loss evidence of the group at a step (points of one step are averaged)."""
        if loss is None or not math.isfinite(loss):
            return
        late = self._late(self.losses, step, lambda entry: entry[0])
        if late is not None:  # this step's loss from another rank: merged into its entry
            late[2] += 1
            late[1] += (loss - late[1]) / late[2]
        elif self.losses and step < self.losses[-1][0] and step >= self.losses[
                max(0, len(self.losses) - LATE_STEPS)][0]:
            return  # late, and between two kept steps that other ranks reported: no entry of its own
        else:
            if self.losses and step < self.losses[-1][0]:
                self.losses.clear()  # steps went back further (a new run phase): start over
            self.losses.append([step, float(loss), 1])
            if self.loss_reference is None:
                self._first_losses.append(float(loss))
                if len(self._first_losses) >= MIN_LOSS_POINTS:
                    self.loss_reference = float(np.median(self._first_losses))
        if self.phase == "unknown" and self.has_loss_evidence:
            self.phase = "memorizing"

    def add(self, step: int, loss: Optional[float], distance: Optional[float], consistency: Optional[float],
            baseline: Optional[float] = None) -> None:
        """Points of the same step are merged (a probe pass may span several messages)."""
        self.add_loss(step, loss)
        p = self._pending
        if p is None or p["step"] != step:
            # The ranks of a job send the same step a little out of order: a step already closed takes
            # the late points into its own (a rewind, to a step older than the last LATE_STEPS, starts over).
            p = self._late(self.points, step, lambda point: point["step"])
        if p is not None:
            p["n"] += 1
            for key, value in (("distance", distance), ("consistency", consistency), ("baseline", baseline)):
                if value is not None:
                    p[key] = value if p[key] is None else p[key] + (value - p[key]) / p["n"]
            return
        if self._pending is not None:
            if step < self._pending["step"] and self.points and step >= self.points[
                    max(0, len(self.points) - LATE_STEPS)]["step"]:
                return  # late, and between two closed steps: no point of its own
            self._close(self._pending)
        self._pending = dict(step=step, distance=distance, consistency=consistency, baseline=baseline, n=1)

    @staticmethod
    def _late(entries: deque, step: int, step_of) -> Any:
        """The entry of ``step`` among the last LATE_STEPS of ``entries``, if there is one."""
        for i in range(len(entries) - 1, max(-1, len(entries) - 1 - LATE_STEPS), -1):
            if step_of(entries[i]) == step:
                return entries[i]
        return None

    # ------------------------------------------------------------------ evaluation

    def _close(self, point: dict) -> None:
        if self.points and point["step"] < self.points[-1]["step"]:
            self.points.clear()  # steps went back (a new run phase): start over
            self.history.clear()
        self.points.append(point)
        if point["distance"] is not None:
            self.history.append(point["distance"])
        if len(self.points) < self.config.window:
            return
        self._advance(self._evaluate())

    def _series(self, key):
        pts = [(p["step"], p[key]) for p in self.points if p[key] is not None]
        if len(pts) < max(3, self.config.window // 2):
            return None
        x, y = np.array(pts, dtype=np.float64).T
        return x, y

    def noise_rho(self) -> float:
        """The watched distance's noise correlation, from its history *before* the window (a trend in the
        window is not noise); with less than two windows of it, the prior ``PRIOR_RHO``."""
        before = list(self.history)[:-self.config.window]
        if len(before) < 2 * self.config.window:
            return PRIOR_RHO
        return lag1_autocorrelation(np.array(before, dtype=np.float64))

    def loss_state(self) -> Optional[dict]:
        """The loss evidence now: level, threshold, change over the kept points; None without evidence."""
        if not self.has_loss_evidence or len(self.losses) < (1 if self.epsilon is not None else MIN_LOSS_POINTS):
            return None
        c = self.config
        x, y = np.array([(s, v) for s, v, _ in self.losses], dtype=np.float64).T
        level = float(np.median(y))
        if self.epsilon is not None:
            eps = self.epsilon
        else:  # has_loss_evidence without an epsilon: the reference level exists
            assert self.loss_reference is not None
            eps = min(c.loss_low_ratio * self.loss_reference, math.log(2.0) * c.loss_max_wrong)
        change = theil_sen_slope(x, y) * float(x[-1] - x[0]) if len(x) > 1 else 0.0
        tol = max(c.loss_abs_tol, c.loss_rel_tol * level)
        return dict(loss=_r(level), epsilon=_r(eps), loss_change=_r(change), loss_tolerance=_r(tol),
                    loss_points=len(x), low=level <= eps, flat=abs(change) <= tol)

    def _evaluate(self) -> dict:
        c = self.config
        out: dict = dict(step=int(self.points[-1]["step"]), signal=self.signal, structuring=False, moving=False)
        loss = self.loss_state()
        out["loss_low"] = bool(loss and loss["low"])
        out["loss_flat"] = bool(loss and loss["flat"])
        if loss:
            out.update({k: v for k, v in loss.items() if k not in ("low", "flat")})
        span = float(self.points[-1]["step"] - self.points[0]["step"])
        dist = self._series("distance")
        if dist is not None and span > 0:
            t = mann_kendall(*dist, c.alpha, self.noise_rho())
            median = max(float(np.median(dist[1])), 1e-12)
            rel = t.slope * span / median
            out.update(distance_slope=_r(t.slope), distance_slope_low=_r(t.slope_low),
                       distance_slope_high=_r(t.slope_high), distance_change=_r(rel), p_fall=_r(t.p_fall, 4),
                       p_rise=_r(t.p_rise, 4), autocorr_factor=_r(t.autocorr_factor, 4), noise_rho=_r(t.rho, 3),
                       distance_points=t.n)
            out["structuring"] |= t.p_fall <= c.alpha and rel <= -c.distance_rel_tol
            out["moving"] |= min(t.p_fall, t.p_rise) <= c.alpha and abs(rel) > c.distance_rel_tol
            base = self._series("baseline")
            if base is not None:
                out["baseline_change"] = _r(theil_sen_slope(*base) * span / max(float(np.median(base[1])), 1e-12))
        cons = self._series("consistency")
        if cons is not None and span > 0 and math.isfinite(c.consistency_abs_tol):
            t = mann_kendall(*cons, c.alpha)
            change = t.slope * span
            out["consistency_change"] = _r(change)
            out["structuring"] |= t.p_rise <= c.alpha and change > c.consistency_abs_tol
            out["moving"] |= min(t.p_fall, t.p_rise) <= c.alpha and abs(change) > c.consistency_abs_tol
        self.last = out
        return out

    def _advance(self, t: dict) -> None:
        if self.phase == "memorizing":
            want = t["loss_low"] and t["loss_flat"]
        elif self.phase == "memorized":
            want = t["loss_low"] and t["structuring"]
        elif self.phase == "generalizing":
            want = not t["moving"]
        else:  # unknown (no loss evidence: no claim) or stable
            want = False
        if not want:
            self._streak, self._candidate = 0, None
            return
        self._streak += 1
        if self._streak == 1:
            self._candidate = t
        if self._streak < self.config.patience:
            return
        # The transition happened where the first agreeing evaluation's window ended.
        first = self._candidate if self._candidate is not None else t
        at, evidence = first["step"], dict(first, confirmed_step=t["step"])
        self._streak, self._candidate = 0, None
        if self.phase == "memorizing":
            self.phase, self.memorized_step = "memorized", at
        elif self.phase == "memorized":
            self.phase, self.onset_step = "generalizing", at
        else:
            self.phase = "stable"
        for key in ("structuring", "moving", "loss_low", "loss_flat"):
            evidence.pop(key, None)
        self.evidence[self.phase] = evidence
        self._changed = self.phase
