"""A journal point: what one routing message adds to one group's series — written by the state
(``point_of``, then a journal line with the record's keys), read back by the phase detector (live)
and by the analysis (``grokwatch report``, replays of a journal). The one place its keys are named.
"""

from __future__ import annotations

from typing import Literal, Optional, TypedDict

import numpy as np

from grokwatch.collector import kernels


class Point(TypedDict):
    """Means over the message's samples of the group (None: none of them had the quantity)."""

    samples: int
    distance: Optional[float]  # within-group pathway edit distance (METRICS.md §1)
    distance_normalized: Optional[float]
    cross_distance: Optional[float]  # to the other groups' windows (the cross-group baseline)
    cross_distance_normalized: Optional[float]
    consistency: Optional[float]  # METRICS.md §2
    adjacent_cosine: Optional[float]
    entropy: Optional[float]  # routing entropy ratio, token-weighted (per token: not what sets the length)
    # METRICS.md §6's confounders: the mean pathway length in symbols, and H(ḡ) ÷ log E (the entropy of each
    # sample's mean routing, mean over layers), which sets it
    pathway_length: Optional[float]
    mean_routing_entropy: Optional[float]
    loss: Optional[float]  # the probe's per-sample loss
    entropy_layers: Optional[list[float]]  # per layer, token-weighted (router health, for reports)
    imbalance_layers: list[float]  # max over mean expert load, per layer
    distance_layers: Optional[list[Optional[float]]]  # within-group layer-wise distance per layer (paper Fig. 5)


# The per-step quantities the analysis averages (weighted by samples) from a point.
SERIES_KEYS = ("distance", "distance_normalized", "consistency", "adjacent_cosine", "loss", "cross_distance",
               "cross_distance_normalized", "entropy", "pathway_length", "mean_routing_entropy")


class _Where(TypedDict):
    kind: Literal["point"]
    run: str
    source: str
    group: str
    step: int
    t: float  # the message's wall time


class _Phase(TypedDict, total=False):
    phase: str
    phase_signal: str
    memorized_step: int  # phases.DATED_STEPS
    onset_step: int
    memorized_evidence: dict  # phases.EVIDENCE_KEYS, on the point where the phase changed
    onset_evidence: dict


class JournalPoint(Point, _Where, _Phase):
    """A point as a journal line: where it belongs, its means, and the phase detector's state after it
    (the phase keys only where the group has a phase)."""


def point_of(stats_V: np.ndarray, entropy_L: np.ndarray, load_LE: np.ndarray,
             layer_sum_L: Optional[np.ndarray] = None, layer_n_L: Optional[np.ndarray] = None) -> Point:
    """One group's point from the kernel's sums (``kernels.STAT_KEYS`` columns) over a message."""
    st: dict[str, float] = dict(zip(kernels.STAT_KEYS, stats_V))

    def mean(key: str, n: str) -> Optional[float]:
        return float(st[key] / st[n]) if st[n] else None

    tokens = st["tokens"]
    mean_L = load_LE.mean(axis=1)
    return Point(
        samples=int(st["n"]),
        distance=mean("dist_sum", "dist_n"),
        distance_normalized=mean("norm_sum", "dist_n"),
        cross_distance=mean("x_dist_sum", "x_dist_n"),
        cross_distance_normalized=mean("x_norm_sum", "x_dist_n"),
        consistency=mean("cons_sum", "cons_n"),
        adjacent_cosine=mean("cos_sum", "cos_n"),
        entropy=mean("entropy_sum", "tokens"),
        pathway_length=mean("length_sum", "n"),
        mean_routing_entropy=mean("hbar_sum", "n"),
        loss=mean("loss_sum", "loss_n"),
        entropy_layers=(entropy_L / tokens).round(6).tolist() if tokens else None,
        imbalance_layers=np.where(mean_L > 0, load_LE.max(axis=1) / np.where(mean_L > 0, mean_L, 1),
                                  0.0).round(6).tolist(),
        distance_layers=None if layer_sum_L is None or layer_n_L is None or not layer_n_L.any() else [
            round(float(s / n), 6) if n else None for s, n in zip(layer_sum_L, layer_n_L)],
    )
