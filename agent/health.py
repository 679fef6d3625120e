"""Router health for the training framework's own logs (issue 32): the figures of METRICS.md §3 over the
training source's routing messages the agent shipped since the last read, under one key scheme, so that a
Trainer's ``report_to`` backends, Lightning's logger or an accelerate tracker show them next to loss and step
with no collector at all.

The figures come from what the agent already ships, added up on the sender thread as each message is built;
nothing more runs on the training thread than the read. The load figures (imbalance, CV, dead experts) are
over **every routed token** of every training forward (the all-token counts, agent/counts.py) — what the
framework itself would compute for the same steps; with ``attach(expert_counts=False)`` or under
torch.compile they fall back to the sampled rows' estimates. The entropy is always the sampled rows'
(docs/agent.md says which figure is which). Per layer, the load share of expert e is its top-k picks ÷
(K × tokens).

Keys (at most ``4·min(L, MAX_LAYERS) + 7``):

* ``moe/<layer>/load_imbalance`` — max ÷ mean of the layer's expert load shares (Megatron's and OLMo-core's
  imbalance over the same tokens); ``moe/<layer>/load_cv`` — their std ÷ mean; ``moe/<layer>/dead_experts``
  — experts no sampled token picked; ``moe/<layer>/routing_entropy`` — mean per-token entropy ÷ log E.
  Per layer only while the model has at most MAX_LAYERS MoE layers.
* ``moe/load_imbalance_max``, ``moe/load_imbalance_mean``, ``moe/load_cv_max``, ``moe/dead_experts``
  (summed over layers), ``moe/routing_entropy_min``, ``moe/routing_entropy_mean``, ``moe/sampled_tokens``,
  ``moe/routed_tokens`` (the tokens the load figures are over: all of them, or the sampled ones).
"""

from __future__ import annotations

import math
import threading
from typing import Optional

import numpy as np

PREFIX = "moe/"
MAX_LAYERS = 64  # per-layer keys up to this many MoE layers (DeepSeek-V3 has 58); beyond, the summary only
PER_LAYER = ("load_imbalance", "load_cv", "dead_experts", "routing_entropy")
SUMMARY = ("load_imbalance_max", "load_imbalance_mean", "load_cv_max", "dead_experts", "routing_entropy_min",
           "routing_entropy_mean", "sampled_tokens", "routed_tokens")


def keys(num_layers: int) -> list[str]:
    """Every key ``RouterHealth.read`` may return for a model of ``num_layers`` MoE layers."""
    per = [f"{PREFIX}{layer}/{name}" for layer in range(num_layers) for name in PER_LAYER] \
        if num_layers <= MAX_LAYERS else []
    return per + [PREFIX + name for name in SUMMARY]


class RouterHealth:
    """Added to on the sender thread (``add``), read and reset on the training thread (``read``). Off until
    the first read: an agent no integration reads pays nothing for it."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.shape = (num_layers, num_experts, top_k)
        self.enabled = False
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        L, E, _ = self.shape
        self._load_LE = np.zeros((L, E))
        self._all_LE = np.zeros((L, E))
        self._all = False  # all-token counts came since the last read
        self._entropy_L = np.zeros(L)
        self._tokens = 0.0

    def add(self, topk_counts_NLE: np.ndarray, token_counts_N: np.ndarray, entropy_NL: np.ndarray,
            expert_tokens_LE: Optional[np.ndarray] = None) -> None:
        """One routing message's sampled rows (the wire's arrays: top-k picks per expert, real tokens,
        mean per-token entropy ÷ log E) and its all-token counts, if any."""
        if not self.enabled:
            return
        tokens_N = token_counts_N.astype(np.float64)
        load_LE = topk_counts_NLE.sum(axis=0, dtype=np.float64)
        entropy_L = tokens_N @ entropy_NL.astype(np.float64)
        with self._lock:
            self._load_LE += load_LE
            self._entropy_L += entropy_L
            self._tokens += float(tokens_N.sum())
            if expert_tokens_LE is not None:
                self._all_LE += expert_tokens_LE
                self._all = True

    def read(self) -> dict[str, float]:
        """The figures since the last read (and reset); {} when no routing message was shipped since."""
        self.enabled = True
        with self._lock:
            load_LE, entropy_L, tokens = self._load_LE, self._entropy_L, self._tokens
            if self._all:
                load_LE = self._all_LE
            self._reset()
        if tokens <= 0:
            return {}
        L, E, K = self.shape
        routed = float(load_LE.sum(axis=1).max()) / K  # the tokens of the load figures (every layer routes them)
        share_LE = load_LE / max(K * routed, 1.0)
        mean_L = share_LE.mean(axis=1)
        safe = np.where(mean_L > 0, mean_L, 1.0)
        imbalance_L = np.where(mean_L > 0, share_LE.max(axis=1) / safe, 0.0)
        cv_L = np.where(mean_L > 0, share_LE.std(axis=1) / safe, 0.0)
        dead_L = (load_LE == 0).sum(axis=1)
        ent_L = entropy_L / tokens
        out: dict[str, float] = {}
        if L <= MAX_LAYERS:
            for layer in range(L):
                out[f"{PREFIX}{layer}/load_imbalance"] = float(imbalance_L[layer])
                out[f"{PREFIX}{layer}/load_cv"] = float(cv_L[layer])
                out[f"{PREFIX}{layer}/dead_experts"] = float(dead_L[layer])
                out[f"{PREFIX}{layer}/routing_entropy"] = float(ent_L[layer])
        out.update({PREFIX + "load_imbalance_max": float(imbalance_L.max()),
                    PREFIX + "load_imbalance_mean": float(imbalance_L.mean()),
                    PREFIX + "load_cv_max": float(cv_L.max()), PREFIX + "dead_experts": float(dead_L.sum()),
                    PREFIX + "routing_entropy_min": float(ent_L.min()),
                    PREFIX + "routing_entropy_mean": float(ent_L.mean()), PREFIX + "sampled_tokens": tokens,
                    PREFIX + "routed_tokens": routed})
        return {k: v for k, v in out.items() if math.isfinite(v)}
