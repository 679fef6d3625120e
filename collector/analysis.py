"""From a collector's journal to per-group series and Table-1-style correlations.

Shared by ``grokwatch report`` and ``grokwatch correlate``. The metrics are
correlated with held-out accuracy *and* with their confounders (routing
entropy, the step), plus the partial correlation with accuracy controlling for
entropy (METRICS.md §2, "Confounders to report beside both metrics").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Optional, cast

import numpy as np

from grokwatch.collector.config import PHASE_DISTANCES
from grokwatch.collector.phases import DATED_STEPS, EVIDENCE_KEYS
from grokwatch.collector.points import SERIES_KEYS, JournalPoint

MEMORIZED_OR_LATER = ("memorized", "generalizing", "stable")
METRICS = ("distance", "distance_vs_cross", "distance_normalized", "normalized_vs_cross", "consistency",
           "adjacent_cosine", "loss", "transfer", "transfer_js", "fresh_loss_gap",
           "pathway_length", "mean_routing_entropy", "entropy")
# METRICS.md §6's per-round records (kind "transfer", collector/transfer.py): the last of a (group, step) wins
TRANSFER_KEYS = ("transfer", "transfer_z", "transfer_js", "transfer_js_z", "fresh_loss_gap")
# The confounders (METRICS.md §6), scored like the metrics: a metric is evidence only where it says more
# than these (and the step) do.
CONFOUNDERS = ("pathway_length", "mean_routing_entropy", "entropy")
METRIC_TITLES = {
    "distance": "pathway distance",
    # METRICS.md §1: a group generalizing moves its within-group distance away from the
    # cross-group baseline; a global routing change (entropy) moves both. 1 = no group structure.
    "distance_vs_cross": "distance ÷ cross-group baseline",
    "normalized_vs_cross": "normalized distance ÷ cross-group baseline",
    "distance_normalized": "normalized distance",
    "consistency": "consistency (1 - C)",
    "adjacent_cosine": "adjacent cosine",
    "loss": "training-sample loss (probe)",
    "transfer": "train-fresh discrepancy E",
    "transfer_js": "train-fresh discrepancy E on mean routing (JS)",
    "fresh_loss_gap": "fresh-loss gap (baseline)",
    "pathway_length": "pathway length (confounder)",
    "mean_routing_entropy": "H(mean routing) (confounder)",
    "entropy": "per-token entropy (confounder)",
}
DERIVED = {"distance_vs_cross": PHASE_DISTANCES["vs_cross"],  # a / b, per step
           "normalized_vs_cross": PHASE_DISTANCES["normalized_vs_cross"]}
assert set(SERIES_KEYS) >= {k for k in METRICS if k not in DERIVED and k not in TRANSFER_KEYS}  # a point carries the rest


@dataclass
class GroupSeries:
    """One (run, source, group): per-step means of the journal points."""

    run: str
    source: str
    group: str
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    values: dict = field(default_factory=dict)  # key -> array aligned with steps (nan = missing)
    entropy_layers: Optional[np.ndarray] = None  # [steps, L]
    imbalance_layers: Optional[np.ndarray] = None
    phases: list = field(default_factory=list)  # (step, phase) at each change, at the detector's dated step
    phase_signal: Optional[str] = None  # the distance the detector watched last (phase_distance)
    evidence: dict = field(default_factory=dict)  # phase -> the evidence that dated it (journal)


@dataclass
class EvalSeries:
    steps: np.ndarray
    heldout: np.ndarray
    train: Optional[np.ndarray]


def load(records: Iterable[dict]):
    """-> ({(run, source, group): GroupSeries}, {(run, group): EvalSeries})"""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    layers: dict = defaultdict(lambda: defaultdict(dict))
    phase_seq: dict = defaultdict(list)
    phase_signal: dict = {}
    evidence: dict = defaultdict(dict)
    evals: dict = defaultdict(dict)
    transfers: dict = defaultdict(dict)  # key -> step -> record
    for r in records:
        if r.get("kind") == "transfer":
            transfers[(r["run"], r["source"], r["group"])][r["step"]] = r
            continue
        if r.get("kind") == "eval":
            for name, score in r.get("scores", {}).items():
                evals[(r["run"], name)][r["step"]] = score
            continue
        if r.get("kind") == "loss":  # the user's training loss (the train source's evidence)
            acc[(r["run"], r["source"], r["group"])][r["step"]]["loss"].append((r["loss"], 1))
            continue
        if r.get("kind") != "point":
            continue
        p = cast(JournalPoint, r)
        key = (p["run"], p["source"], p["group"])
        step = p["step"]
        w = p.get("samples", 1) or 1
        for k in SERIES_KEYS:
            if p.get(k) is not None:
                acc[key][step][k].append((p[k], w))
        for k in ("entropy_layers", "imbalance_layers"):
            if p.get(k) is not None:
                layers[key][k].setdefault(step, []).append(p[k])
        phase = p.get("phase")
        if phase and (not phase_seq[key] or phase_seq[key][-1][1] != phase):
            # The step the detector dates the transition to (newer journals carry it), else this record's.
            dated = p.get(DATED_STEPS[phase]) if phase in DATED_STEPS else None
            phase_seq[key].append((dated if dated is not None else step, phase))
        signal = p.get("phase_signal")
        if signal:
            phase_signal[key] = signal
        for changed, name in EVIDENCE_KEYS.items():
            found = p.get(name)
            if found:
                evidence[key][changed] = found
    series = {}
    for key, by_step in acc.items():
        steps = np.array(sorted(by_step), dtype=np.float64)
        values = {}
        for k in SERIES_KEYS:
            col = []
            for s in sorted(by_step):
                vals = by_step[s].get(k)
                col.append(sum(v * w for v, w in vals) / sum(w for _, w in vals) if vals else math.nan)
            values[k] = np.array(col)
        for k, (a, b) in DERIVED.items():
            with np.errstate(divide="ignore", invalid="ignore"):
                values[k] = np.where(values[b] > 0, values[a] / values[b], math.nan)
        for k in TRANSFER_KEYS:
            by = transfers.get(key, {})
            values[k] = np.array([math.nan if by.get(s, {}).get(k) is None else float(by[s][k])
                                  for s in sorted(by_step)])
        gs = GroupSeries(*key, steps=steps, values=values, phases=phase_seq[key], phase_signal=phase_signal.get(key),
                         evidence=dict(evidence.get(key, {})))
        for k in ("entropy_layers", "imbalance_layers"):
            per_step = layers[key].get(k)
            if per_step:
                rows = [np.mean(per_step[s], axis=0) if s in per_step else None for s in sorted(by_step)]
                width = max(len(r) for r in rows if r is not None)
                setattr(gs, k, np.array([r if r is not None else np.full(width, np.nan) for r in rows]))
        series[key] = gs
    eval_series = {}
    for (run, name), by_step in evals.items():
        if name.endswith("/train"):
            continue
        steps = np.array(sorted(by_step), dtype=np.float64)
        train = evals.get((run, name + "/train"))
        eval_series[(run, name)] = EvalSeries(
            steps, np.array([by_step[s] for s in sorted(by_step)]),
            np.array([train.get(s, math.nan) for s in sorted(by_step)]) if train else None)
    return series, eval_series


# --------------------------------------------------------------- statistics


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _ranks(x) -> np.ndarray:
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    # average ties
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y)) if len(x) >= 3 else math.nan


def partial(x, y, z) -> float:
    """Pearson partial correlation of x and y controlling for z."""
    rxy, rxz, ryz = pearson(x, y), pearson(x, z), pearson(y, z)
    if any(math.isnan(v) for v in (rxy, rxz, ryz)) or rxz**2 >= 1 or ryz**2 >= 1:
        return math.nan
    return (rxy - rxz * ryz) / math.sqrt((1 - rxz**2) * (1 - ryz**2))


def aligned(series: GroupSeries, eval_steps: np.ndarray, key: str, max_gap: Optional[float] = None):
    """The metric at each eval step: its latest point at or before the step
    (within ``max_gap`` steps). Returns an array with nan where missing."""
    steps = series.steps
    vals = series.values[key]
    ok = ~np.isnan(vals)
    steps, vals = steps[ok], vals[ok]
    out = np.full(len(eval_steps), math.nan)
    if len(steps) == 0:
        return out
    if max_gap is None:
        max_gap = 2 * float(np.median(np.diff(steps))) if len(steps) > 1 else math.inf
    idx = np.searchsorted(steps, eval_steps, side="right") - 1
    for i, j in enumerate(idx):
        if j >= 0 and eval_steps[i] - steps[j] <= max_gap:
            out[i] = vals[j]
    return out


def memorized_step(series: Optional[GroupSeries], ev: Optional[EvalSeries], threshold: float = 0.99):
    """The group memorized: training accuracy first >= threshold (when logged),
    else the phase detector's memorized step, else None."""
    if ev is not None and ev.train is not None:
        hit = np.nonzero(ev.train >= threshold)[0]
        if hit.size:
            return float(ev.steps[hit[0]])
    if series is not None:
        for step, phase in series.phases:
            if phase in MEMORIZED_OR_LATER:  # not "unknown" (no evidence) nor "memorizing"
                return float(step)
    return None


def correlation_table(series: GroupSeries, ev: EvalSeries, since: Optional[float]) -> dict:
    """Table 1 of the paper for one group, with confounders, over eval points after ``since``."""
    keep = ev.steps >= (since if since is not None else -math.inf)
    steps, accuracy = ev.steps[keep], ev.heldout[keep]
    entropy = aligned(series, steps, "entropy")
    hbar = aligned(series, steps, "mean_routing_entropy")
    length = aligned(series, steps, "pathway_length")
    rows = {}
    for key in METRICS:
        x = aligned(series, steps, key)
        ok = ~np.isnan(x) & ~np.isnan(accuracy)
        okz = ok & ~np.isnan(entropy)
        okh = ok & ~np.isnan(hbar)
        okl = ok & ~np.isnan(length)
        rows[key] = dict(
            n=int(ok.sum()),
            pearson=pearson(x[ok], accuracy[ok]),
            spearman=spearman(x[ok], accuracy[ok]),
            vs_entropy=pearson(x[okz], entropy[okz]),
            vs_mean_entropy=pearson(x[okh], hbar[okh]),
            vs_length=pearson(x[okl], length[okl]),
            vs_step=pearson(x[ok], steps[ok]),
            partial_entropy=partial(x[okz], accuracy[okz], entropy[okz]),
            # controlling for H(ḡ), what sets the pathway's length (METRICS.md §6)
            partial_mean_entropy=partial(x[okh], accuracy[okh], hbar[okh]),
            # controlling for the step: what the metric says beyond "both trend"
            partial_step=partial(x[ok], accuracy[ok], steps[ok]),
        )
    return rows


def first_crossing(ev: EvalSeries, level: float = 0.5) -> Optional[float]:
    hit = np.nonzero(ev.heldout > level)[0]
    return float(ev.steps[hit[0]]) if hit.size else None
