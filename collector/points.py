"""A journal point: what one routing message adds to one group's series — written by the state
(``points_of``, then a journal line with the record's keys), read back by the phase detector (live)
and by the analysis (``grokwatch report``, replays of a journal). The one place its keys are named.
"""

from __future__ import annotations

import functools
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


def _mean(st: dict[str, float], key: str, n: str) -> Optional[float]:
    return st[key] / st[n] if st[n] else None


def points_of(gs, stats_GV: np.ndarray, entropy_GL: np.ndarray, load_GLE: np.ndarray,
              layer_sum_GL: np.ndarray, layer_n_GL: np.ndarray) -> list[Point]:
    """The points of groups ``gs`` from the kernel's sums over one message (``kernels.Sums``: the
    ``kernels.STAT_KEYS`` columns per group): the per-layer figures of all of them computed at once (a message
    reaches several groups; per group, these few small array operations were most of a point's cost)."""
    gs = np.asarray(gs, np.int64)
    tokens_g = stats_GV[gs, kernels.S_TOKENS]
    load = load_GLE[gs]
    mean_gL = load.mean(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):  # the quotients of a zero count are not used
        entropy_gL = (entropy_GL[gs] / tokens_g[:, None]).round(6).tolist()
        imbalance_gL = np.where(mean_gL > 0, load.max(axis=2) / np.where(mean_gL > 0, mean_gL, 1),
                                0.0).round(6).tolist()
        ratio_gL = (layer_sum_GL[gs] / layer_n_GL[gs]).tolist()
        counted_gL = (layer_n_GL[gs] != 0).tolist()
    out: list[Point] = []
    for j, g in enumerate(gs.tolist()):
        st: dict[str, float] = dict(zip(kernels.STAT_KEYS, stats_GV[g].tolist()))
        mean = functools.partial(_mean, st)
        counted = counted_gL[j]
        out.append(Point(
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
            entropy_layers=entropy_gL[j] if st["tokens"] else None,
            imbalance_layers=imbalance_gL[j],
            distance_layers=None if not any(counted) else [
                round(r, 6) if c else None for r, c in zip(ratio_gL[j], counted)],
        ))
    return out
