"""Plain-Python references of METRICS.md §1–3, written for clarity, not speed.

The Numba kernels in ``kernels.py`` must agree with these exactly (integers)
or to 1e-6 relative (floats); the tests compare them on random and edge cases.
"""

from __future__ import annotations

import math
from typing import Sequence


def layer_list(mean_weights: Sequence[float], tau: float) -> list[int]:
    """METRICS.md §1 e_l(i): experts by weight descending (ties: lower index
    first), shortest prefix whose cumulative weight reaches tau (the crossing
    expert included). If rounding keeps the total below tau, all experts."""
    order = sorted(range(len(mean_weights)), key=lambda k: (-float(mean_weights[k]), k))
    chosen, total = [], 0.0
    for k in order:
        chosen.append(k)
        total += float(mean_weights[k])
        if total >= tau:
            break
    return chosen


def pathway_layers(mean_weights_LE, tau: float) -> list[list[int]]:
    return [layer_list(row, tau) for row in mean_weights_LE]


def pathway_symbols(layers: list[list[int]], num_experts: int) -> list[int]:
    """The `expert` unit: e_1 ⊕ [SEP] ⊕ e_2 ⊕ … ⊕ e_L, SEP = num_experts."""
    out: list[int] = []
    for i, experts in enumerate(layers):
        if i:
            out.append(num_experts)
        out.extend(experts)
    return out


def pathway_string(layers: list[list[int]]) -> str:
    """The paper's text form: experts joined by ',', layers by '-' (e.g. '3,1,5-12,9')."""
    return "-".join(",".join(str(k) for k in experts) for experts in layers)


def levenshtein(a: Sequence, b: Sequence) -> int:
    """Unit-cost edit distance by the textbook dynamic programme."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def normalized_distance(d: int, len_a: int, len_b: int) -> float:
    """D / max(|s_i|, |s_j|) in [0, 1] (ours)."""
    longest = max(len_a, len_b)
    return d / longest if longest else 0.0


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """METRICS.md §6: Jensen–Shannon divergence in nats, ½KL(p‖m) + ½KL(q‖m) with m = (p + q)/2; each
    distribution renormalized first, 0·log 0 = 0."""
    sp, sq = sum(p), sum(q)
    p = [x / sp for x in p]
    q = [x / sq for x in q]
    total = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log(a / m)
        if b > 0:
            total += 0.5 * b * math.log(b / m)
    return total


def consistency(cosines: Sequence[float], min_max_cosine: float = 0.05):
    """METRICS.md §2: returns (1 - C_i, raw mean cosine). 1 - C_i is None where
    it is undefined: fewer than 2 adjacent pairs (L < 3) or max cosine <= 0.05."""
    raw = sum(cosines) / len(cosines)
    top = max(cosines)
    if len(cosines) < 2 or top <= min_max_cosine:
        return None, raw
    c_score = 1.0 - sum(c / (top + 1e-8) for c in cosines) / len(cosines)
    return 1.0 - c_score, raw


def all_token_load(expert_tokens_LE, top_k: int):
    """The load figures of METRICS.md §3 over every routed token (the all-token counts): per layer, the
    tokens per expert c_k of the interval; share c_k / Σc (= c_k ÷ (K × tokens)), imbalance max/mean (as
    OLMo-core and Megatron-Core's logging compute it from tokens per expert), CV, dead = experts with c_k = 0."""
    out = []
    for row in expert_tokens_LE:
        load = [int(c) for c in row]
        total = sum(load)
        share = [c / total if total else 0.0 for c in load]
        mean = sum(share) / len(share)
        var = sum((f - mean) ** 2 for f in share) / len(share)
        out.append(dict(load_share=share, imbalance=max(share) / mean if mean > 0 else 0.0,
                        cv=math.sqrt(var) / mean if mean > 0 else 0.0, dead=sum(1 for c in load if c == 0),
                        tokens=total // top_k))
    return out


def router_health(topk_counts_NLE, token_counts_N, entropy_NL, top_k: int):
    """METRICS.md §3 per layer over the window's samples: load share f, max/mean
    imbalance, coefficient of variation, dead experts, token-weighted entropy."""
    num_samples = len(token_counts_N)
    num_layers = len(topk_counts_NLE[0])
    num_experts = len(topk_counts_NLE[0][0])
    tokens = sum(int(t) for t in token_counts_N)
    out = []
    for layer in range(num_layers):
        load = [sum(int(topk_counts_NLE[i][layer][k]) for i in range(num_samples)) for k in range(num_experts)]
        share = [c / (top_k * tokens) for c in load]
        mean = sum(share) / num_experts
        var = sum((f - mean) ** 2 for f in share) / num_experts
        entropy = sum(float(entropy_NL[i][layer]) * int(token_counts_N[i]) for i in range(num_samples)) / tokens
        out.append(dict(
            load_share=share,
            imbalance=max(share) / mean if mean > 0 else 0.0,
            cv=math.sqrt(var) / mean if mean > 0 else 0.0,
            dead=sum(1 for c in load if c == 0),
            entropy=entropy,
        ))
    return out
