"""METRICS.md §1-3 in float64 NumPy: what the agent must ship, computed independently of it (the
integration tests, and the worked-example drivers in their subprocesses)."""

from __future__ import annotations

import numpy as np


def summaries(p_LTE, counts_LE, weights_LEH, num_experts: int):
    """From one sample's per-layer distributions over its tokens, its top-k counts and the router weights:
    mean distribution, counts, mean entropy ratio per layer, and the cosines of the routing embeddings
    (mean @ W) between adjacent layers."""
    means = [p.mean(0) for p in p_LTE]
    ents = [(-(p * np.log(np.clip(p, 1e-30, None))).sum(-1) / np.log(num_experts)).mean() for p in p_LTE]
    embs = [m @ w for m, w in zip(means, weights_LEH)]
    cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(embs, embs[1:])]
    return np.stack(means), np.stack(counts_LE), np.array(ents), np.array(cos)
