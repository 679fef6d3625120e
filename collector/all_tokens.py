"""A run's all-token expert counts (the agents' ``Routing.expert_tokens_LE``, agent/counts.py), summed over its
ranks: the load figures its training framework logs, over every routed token, per layer.

Each training message carries the counts of the sender's forwards since its previous one, ending at the
message's step. The ranks of a data-parallel run summarize the same steps, so the messages of one step make
one **interval**: it closes when every rank of the run's world size has reported that step, or when a later
step arrives (a rank that lost its message). The exported gauges are the latest closed interval's; the
counters (tokens, forwards) add every message as it comes. A message of a step older than the open interval
(a rank far behind) goes into the counters only, counted as late.

Figures (METRICS.md §3 over all tokens; reference.all_token_load): per layer, with c_k the interval's
tokens of expert k, imbalance = max c / mean c (OLMo-core's and Megatron-Core's tokens-per-expert ratio),
CV = std c / mean c, dead = experts with c_k = 0.

With the counts come what the routers computed themselves: the model's **aux loss** (each rank's mean over
its forwards; the interval's figure is the mean over its ranks), and for aux-loss-free routers the
**balancing bias** b (per layer, [E]; replicated across data-parallel ranks: the lowest rank's of the
interval): its spread std_k b and its **drift**, the RMS over experts of b's change since the previous
closed interval.

With the counts come the picks of no expert (``Routing.dropped_picks_L``: tokens a capacity factor dropped after
the choice, ids outside 0..E-1): the **dropped fraction** per layer is dropped ÷ (counted + dropped) — Megatron-
Core's 1 − routing_map.sum() ÷ (tokens × K) where its router drops (moe_expert_capacity_factor).

Where the agents tag their rows with groups, the counts come split by the group of each token's row too
(``Routing.group_tokens_GLE``): summed over the ranks in the same interval, closed with it, the same figures
per (group, layer) — which experts each data group loads, over all its tokens.

Where the ranks' loads differ, two imbalances answer two questions: the summed counts' (the global load: what
Megatron-Core's all-reduced tokens per expert give) and the largest of the ranks' own (OLMo-core's "load
imbalance", reduced across ranks by max: the worst local load, what makes a straggler). Both are exported.
"""

from __future__ import annotations

import numpy as np


def _load_figures(counts_LE: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer, imbalance, CV and dead experts of the tokens per expert (METRICS.md §3 over all tokens)."""
    imbalance_L, cv_L = _imbalance_cv_L(counts_LE)
    return dict(imbalance_L=imbalance_L, cv_L=cv_L, dead_L=(counts_LE == 0).sum(axis=1))


def _imbalance_cv_L(counts_LE: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, max / mean and std / mean of the tokens per expert (0 for a layer with none)."""
    c = counts_LE.astype(np.float64)
    mean_L = c.mean(axis=1)
    safe = np.where(mean_L > 0, mean_L, 1.0)
    return np.where(mean_L > 0, c.max(axis=1) / safe, 0.0), np.where(mean_L > 0, c.std(axis=1) / safe, 0.0)


class AllTokens:
    """One run's counts. ``add`` under the state's lock at admission (an [L, E] add); read by the view."""

    def __init__(self, num_layers: int, num_experts: int):
        self.shape = (num_layers, num_experts)
        self.total_LE = np.zeros((num_layers, num_experts), np.uint64)  # every message's, since the run began
        self.forwards_total = 0
        self.late_total = 0  # messages of a step before the open interval: in the totals only
        self.open_step = -1
        self.open_LE = np.zeros((num_layers, num_experts), np.uint64)
        self.open_ranks: set[int] = set()
        self.closed_step = -1  # the exported interval: its last step and ranks (-1: none yet)
        self.closed_LE = np.zeros((num_layers, num_experts), np.uint64)
        self.closed_ranks = 0
        self.open_rank_max_L = np.zeros(num_layers)  # the largest of the ranks' own imbalances (OLMo-core's)
        self.closed_rank_max_L = np.zeros(num_layers)
        self.open_aux_sum, self.open_aux_n = 0.0, 0  # the ranks' mean aux losses, summed
        self.closed_aux: float | None = None
        self.open_bias_LE: np.ndarray | None = None  # float32 [L, E], the lowest rank's of the open interval
        self.open_bias_rank = -1
        self.closed_bias_LE: np.ndarray | None = None
        self.bias_drift_L: np.ndarray | None = None  # RMS change between the last two closed intervals' biases
        self.open_groups: dict[str, np.ndarray] = {}  # group -> uint64 [L, E], the open interval's
        self.closed_groups: dict[str, np.ndarray] = {}
        # uint64 [L]: the picks of no expert (dropped) where the messages carry them; None: none did
        self.open_dropped_L: np.ndarray | None = None
        self.closed_dropped_L: np.ndarray | None = None

    def add(self, step: int, rank: int, counts_LE: np.ndarray, forwards: int, world_size: int,
            aux_loss: float | None = None, bias_LE: np.ndarray | None = None,
            groups: dict[str, np.ndarray] | None = None, dropped_L: np.ndarray | None = None) -> None:
        """One message's counts (``groups``: split by row group, the caller's labels, at most its cap;
        ``dropped_L``: its picks of no expert per layer)."""
        self.total_LE += counts_LE
        self.forwards_total += forwards
        if step < self.open_step:
            self.late_total += 1
            return
        if step > self.open_step:
            if self.open_ranks:
                self._close()
            self.open_step = step
        self.open_LE += counts_LE
        if dropped_L is not None:
            if self.open_dropped_L is None:
                self.open_dropped_L = np.zeros(self.shape[0], np.uint64)
            self.open_dropped_L += dropped_L
        for group, group_LE in (groups or {}).items():
            if group in self.open_groups:
                self.open_groups[group] += group_LE
            else:
                self.open_groups[group] = np.array(group_LE, np.uint64)
        np.maximum(self.open_rank_max_L, _imbalance_cv_L(counts_LE)[0], out=self.open_rank_max_L)
        self.open_ranks.add(rank)
        if aux_loss is not None:
            self.open_aux_sum += float(aux_loss)
            self.open_aux_n += 1
        if bias_LE is not None and bias_LE.shape == self.shape and (self.open_bias_LE is None
                                                                   or rank < self.open_bias_rank):
            self.open_bias_LE, self.open_bias_rank = np.array(bias_LE, np.float32), rank
        if len(self.open_ranks) >= world_size:
            self._close()

    def _close(self) -> None:
        self.closed_step, self.closed_LE = self.open_step, self.open_LE.copy()
        self.closed_ranks = len(self.open_ranks)
        self.open_LE[:] = 0
        self.closed_rank_max_L = self.open_rank_max_L.copy()
        self.open_rank_max_L[:] = 0
        self.open_ranks = set()
        self.closed_aux = self.open_aux_sum / self.open_aux_n if self.open_aux_n else None
        self.open_aux_sum, self.open_aux_n = 0.0, 0
        if self.open_bias_LE is not None:
            previous = self.closed_bias_LE
            self.bias_drift_L = None if previous is None else np.sqrt(
                ((self.open_bias_LE.astype(np.float64) - previous) ** 2).mean(axis=1))
            self.closed_bias_LE = self.open_bias_LE
        self.open_bias_LE, self.open_bias_rank = None, -1
        self.closed_groups, self.open_groups = self.open_groups, {}
        self.closed_dropped_L, self.open_dropped_L = self.open_dropped_L, None

    def routed_tokens(self, top_k: int) -> int:
        """Tokens routed since the run began: each layer routes every token, K picks each (the busiest layer's
        picks ÷ K: a layer's picks outside 0..E-1 are not in its counts)."""
        return int(self.total_LE.sum(axis=1).max()) // max(top_k, 1) if self.total_LE.size else 0

    def dropped_fraction_L(self) -> np.ndarray | None:
        """Per layer, the closed interval's dropped picks over all its picks (counted + dropped); None where
        its messages carried no dropped picks (an agent before them)."""
        if self.closed_dropped_L is None:
            return None
        dropped = self.closed_dropped_L.astype(np.float64)
        picks = dropped + self.closed_LE.astype(np.float64).sum(axis=1)
        return np.where(picks > 0, dropped / np.where(picks > 0, picks, 1.0), 0.0)

    def group_figures(self) -> dict[str, dict[str, np.ndarray]]:
        """The closed interval's per-layer imbalance, CV and dead experts of each group whose rows routed
        tokens in it."""
        return {group: _load_figures(counts_LE) for group, counts_LE in sorted(self.closed_groups.items())}

    def figures(self) -> dict[str, np.ndarray] | None:
        """The closed interval's per-layer figures, or None before one closed."""
        if self.closed_step < 0:
            return None
        c = self.closed_LE.astype(np.float64)
        total_L1 = c.sum(axis=1, keepdims=True)
        return dict(_load_figures(self.closed_LE), share_LE=c / np.where(total_L1 > 0, total_L1, 1.0))
