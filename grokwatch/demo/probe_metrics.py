"""Exact pathway metrics at one checkpoint (round 3, issue 28): every pair, one time point, distinct ids.

The live collector *estimates* these from a stream; here the benchmark computes them exactly on fixed probe
sets at each probe step, so the ground-truth question (does the metric carry the signal?) is not mixed with
the estimator's (does the stream estimate it?). Definitions are METRICS.md §1, §2 and §6:

* pathway: per layer the experts ranked by ḡ (ties: lower index first), the shortest prefix reaching τ;
  layers joined by a separator symbol; distance = Levenshtein over symbols (the ``expert`` unit);
* normalized distance: D / max(|sᵢ|, |sⱼ|);
* within: mean over distinct pairs of a domain's training documents; cross: mean over pairs of a domain's
  training documents with other domains' training documents; R = within ÷ cross (normalized);
* E = 2·D(train, fresh) − D(train, train) − D(fresh, fresh) on normalized pathway distances and on the
  Jensen–Shannon divergence of ḡ (mean over layers), with a permutation z-score (train/fresh labels
  shuffled within the domain);
* H(ḡ): entropy of the sample-mean routing ÷ log E (mean over layers); per-token entropy likewise;
* consistency: 1 − Cᵢ (L ≥ 3) and the raw adjacent cosine of eₗ = Σₖ ḡₗₖ Wₗ[k].

Legend: N documents, L layers, E experts, H hidden.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from rapidfuzz.distance import Levenshtein
from rapidfuzz.process import cdist

SEP = "|"


def layer_lists(g_NLE: np.ndarray, tau: float) -> list[list[list[int]]]:
    """Each sample's per-layer expert lists (METRICS.md §1), ranked by weight, lower index first on ties."""
    N, L, E = g_NLE.shape
    order = np.argsort(-g_NLE, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(g_NLE, order, axis=-1), axis=-1)
    # the expert that crosses τ is included: count of prefixes strictly below τ, plus one
    keep = np.minimum((cum < tau).sum(-1) + 1, E)
    return [[order[n, k, : keep[n, k]].tolist() for k in range(L)] for n in range(N)]


def pathway_strings(lists: list[list[list[int]]]) -> tuple[list[str], list[list[str]]]:
    """Whole pathways and per-layer lists as strings of one character per symbol (expert k -> chr(65 + k)),
    so that character Levenshtein is the expert-unit distance."""
    layers = [["".join(chr(65 + k) for k in lst) for lst in sample] for sample in lists]
    return [SEP.join(s) for s in layers], [list(col) for col in zip(*layers)]


def distance_matrix(strings: list[str]) -> np.ndarray:
    return cdist(strings, strings, scorer=Levenshtein.distance, dtype=np.int32, workers=1).astype(np.float64)


def normalized_matrix(strings: list[str]) -> np.ndarray:
    D = distance_matrix(strings)
    n = np.array([len(s) for s in strings], dtype=np.float64)
    return D / np.maximum(np.maximum(n[:, None], n[None, :]), 1.0)


def js_matrix(g_NLE: np.ndarray) -> np.ndarray:
    """Jensen–Shannon divergence (nats) between samples' ḡ, averaged over layers: [N, N]."""
    N, L, E = g_NLE.shape
    out = np.zeros((N, N))
    for layer in range(L):
        P = np.clip(g_NLE[:, layer], 0.0, None)
        P = P / P.sum(-1, keepdims=True)
        h = -(np.where(P > 0, P * np.log(np.where(P > 0, P, 1.0)), 0.0)).sum(-1)
        M = 0.5 * (P[:, None, :] + P[None, :, :])
        hm = -(np.where(M > 0, M * np.log(np.where(M > 0, M, 1.0)), 0.0)).sum(-1)
        out += hm - 0.5 * (h[:, None] + h[None, :])
    return np.maximum(out / L, 0.0)


def mean_offdiag(D: np.ndarray, idx: np.ndarray) -> float:
    """Mean of D over ordered pairs of distinct members of idx."""
    sub = D[np.ix_(idx, idx)]
    n = len(idx)
    return float((sub.sum() - np.trace(sub)) / (n * (n - 1))) if n > 1 else math.nan


def mean_between(D: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float(D[np.ix_(a, b)].mean()) if len(a) and len(b) else math.nan


def discrepancy(D: np.ndarray, train: np.ndarray, fresh: np.ndarray) -> float:
    """E = 2·D(train, fresh) − D(train, train) − D(fresh, fresh) (METRICS.md §6)."""
    return 2 * mean_between(D, train, fresh) - mean_offdiag(D, train) - mean_offdiag(D, fresh)


def discrepancy_z(D: np.ndarray, train: np.ndarray, fresh: np.ndarray, rng: np.random.Generator,
                  permutations: int = 200) -> tuple[float, float]:
    """E and its z-score against the permutation null (train/fresh labels shuffled among their union)."""
    e = discrepancy(D, train, fresh)
    both = np.concatenate([train, fresh])
    null = np.empty(permutations)
    for i in range(permutations):
        perm = rng.permutation(both)
        null[i] = discrepancy(D, perm[: len(train)], perm[len(train):])
    sd = float(null.std(ddof=1))
    return e, (e - float(null.mean())) / sd if sd > 0 else math.nan


def entropy_ratio(P: np.ndarray) -> np.ndarray:
    """H(p) / log E along the last axis."""
    E = P.shape[-1]
    safe = np.where(P > 0, P, 1.0)
    return -(np.where(P > 0, P * np.log(safe), 0.0)).sum(-1) / math.log(E)


def consistency(g_NLE: np.ndarray, W_LEH: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: raw adjacent cosine (mean over layer pairs) and 1 − Cᵢ (NaN where L < 3 or the largest
    adjacent cosine is ≤ 0.05: METRICS.md §2)."""
    N, L, _ = g_NLE.shape
    if W_LEH is None or L < 2:
        nan = np.full(N, math.nan)
        return nan, nan
    e_NLH = np.einsum("nle,leh->nlh", g_NLE, W_LEH)
    a, b = e_NLH[:, :-1], e_NLH[:, 1:]
    adj_cosine_NJ = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    raw = adj_cosine_NJ.mean(-1)
    mx = adj_cosine_NJ.max(-1)
    smooth = np.where((L >= 3) & (mx > 0.05), (adj_cosine_NJ / (mx[:, None] + 1e-8)).mean(-1), math.nan)
    return raw, smooth


def checkpoint_metrics(g_NLE: np.ndarray, p_tok_mean_entropy_N: np.ndarray, domain_N: np.ndarray,
                       fresh_N: np.ndarray, domains: list[str], *, tau: float = 0.7,
                       router_W_LEH: Optional[np.ndarray] = None, seed: int = 0,
                       permutations: int = 200) -> dict[str, dict[str, float]]:
    """Per domain, every metric at one checkpoint. ``fresh_N`` marks fresh (never trained) documents; the
    others are the domain's training documents. ``p_tok_mean_entropy_N``: each sample's per-token routing
    entropy ÷ log E, averaged over its tokens and the layers."""
    N, L, E = g_NLE.shape
    rng = np.random.default_rng(seed)
    lists = layer_lists(g_NLE, tau)
    paths, per_layer = pathway_strings(lists)
    D = distance_matrix(paths)
    lengths = np.array([len(s) for s in paths], dtype=np.float64)
    Dn = D / np.maximum(np.maximum(lengths[:, None], lengths[None, :]), 1.0)
    DL = [distance_matrix(col) for col in per_layer]
    JS = js_matrix(g_NLE)
    h_gbar = entropy_ratio(g_NLE).mean(-1)
    raw_cos, smooth = consistency(g_NLE, router_W_LEH)
    train_all = np.flatnonzero(~fresh_N)
    out: dict[str, dict[str, float]] = {}
    for di, name in enumerate(domains):
        tr = np.flatnonzero((domain_N == di) & ~fresh_N)
        fr = np.flatnonzero((domain_N == di) & fresh_N)
        others = np.setdiff1d(train_all, tr)
        m: dict[str, float] = {}
        m["within"] = mean_offdiag(D, tr)
        m["within_norm"] = mean_offdiag(Dn, tr)
        m["cross"] = mean_between(D, tr, others)
        m["cross_norm"] = mean_between(Dn, tr, others)
        m["R"] = m["within_norm"] / m["cross_norm"] if m["cross_norm"] > 0 else math.nan
        for layer in range(L):
            m[f"within_l{layer}"] = mean_offdiag(DL[layer], tr)
        m["E_path"], m["E_path_z"] = discrepancy_z(Dn, tr, fr, rng, permutations)
        m["E_js"], m["E_js_z"] = discrepancy_z(JS, tr, fr, rng, permutations)
        m["within_js"] = mean_offdiag(JS, tr)
        m["length"] = float(lengths[tr].mean())
        m["H_gbar"] = float(h_gbar[tr].mean())
        m["H_tok"] = float(p_tok_mean_entropy_N[tr].mean())
        m["adj_cosine"] = float(np.nanmean(raw_cos[tr])) if np.isfinite(raw_cos[tr]).any() else math.nan
        m["consistency"] = float(np.nanmean(smooth[tr])) if np.isfinite(smooth[tr]).any() else math.nan
        out[name] = m
    return out
