"""The grokking benchmark's model: a compact hand-written MoE transformer.

Why hand-written (issue 4, research notes): a tiny transformers MoE class
costs about 1.1-1.5 s per full-batch step on this CPU, and grokking needs
thousands of full-batch steps. This model computes only what the task needs
— one attention layer whose single query is the '=' position, then
``num_moe_layers`` residual MoE blocks at that position — and runs every
routed expert as one batched matmul masked by the router, so a full-batch
step over ~6k equations takes tens of milliseconds. It is instrumented
through the agent's public ``record()`` API, exactly as a user's own model.

Legend: B equations, S=4 positions [a, op, b, =], H hidden, F expert FFN,
E routed experts, K top-k, P residues (outputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from grokwatch.agent.monitor import Monitor


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int
    num_outputs: int
    hidden: int = 128
    heads: int = 4
    num_moe_layers: int = 3
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 128
    shared_expert_hidden: int = 256  # 0: no shared expert
    seq_len: int = 4
    norm: bool = True  # RMSNorm before each MoE block and the unembedding (stability at high lr x wd)
    # False: only the '=' position is computed past attention (one routed token per equation).
    # True: causal attention for all four positions and every position through the MoE blocks, so a
    # sample's routing is a mean over its four tokens (docs/groundtruth.md, "routed tokens").
    route_all_positions: bool = False
    # Router logits are multiplied by this before the softmax: > 1 gives peaked routing from the start
    # (issue 17: the paper's OLMoE pathways are peaked; an unscaled router here stays near uniform).
    router_scale: float = 1.0
    # True: each expert runs only on the tokens routed to it (sort by expert, one matmul each), a
    # K/E share of the dense cost; the same function as the dense masked form (tests/unit/test_demo_model.py).
    sparse_experts: bool = False


class MoEBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, F, E = cfg.hidden, cfg.expert_hidden, cfg.num_experts
        self.top_k = cfg.top_k
        self.router_scale = cfg.router_scale
        self.sparse = cfg.sparse_experts
        self.router = nn.Linear(H, E, bias=False)
        self.num_experts, self.expert_hidden = E, F
        # All experts side by side: [H, E*F] in, [E*F, H] out.
        self.w_in_HX = nn.Parameter(torch.randn(H, E * F) / math.sqrt(H))
        self.w_out_XH = nn.Parameter(torch.randn(E * F, H) / math.sqrt(F))
        self.shared = (nn.Sequential(nn.Linear(H, cfg.shared_expert_hidden), nn.ReLU(),
                                     nn.Linear(cfg.shared_expert_hidden, H))
                       if cfg.shared_expert_hidden else None)

    def forward(self, x_BH: torch.Tensor):
        logits_BE = self.router(x_BH)
        if self.router_scale != 1.0:
            logits_BE = logits_BE * self.router_scale
        probs_BE = torch.softmax(logits_BE, dim=-1)
        top_w_BK, top_i_BK = probs_BE.topk(self.top_k, dim=-1)
        top_w_BK = top_w_BK / top_w_BK.sum(-1, keepdim=True)
        if self.sparse:
            y_BH = self._sparse_experts(x_BH, top_w_BK, top_i_BK)
        else:
            gate_BE = torch.zeros_like(probs_BE).scatter(1, top_i_BK, top_w_BK)
            # Every expert on every token, masked by the gate: two dense matmuls beat a gather when
            # K/E is large (tiny experts, thousands of tokens). X = E*F.
            B = x_BH.shape[0]
            h_BEF = torch.relu(x_BH @ self.w_in_HX).view(B, self.num_experts, self.expert_hidden)
            y_BH = (h_BEF * gate_BE[:, :, None]).view(B, -1) @ self.w_out_XH
        if self.shared is not None:
            y_BH = y_BH + self.shared(x_BH)
        return y_BH, logits_BE, probs_BE, top_i_BK

    def _sparse_experts(self, x_BH, top_w_BK, top_i_BK):
        """Token-expert pairs sorted by expert; expert e's rows go through its own slice of the
        weights; the weighted outputs are added back to their tokens. R = B·K routed pairs."""
        B, K = top_i_BK.shape
        F_ = self.expert_hidden
        expert_R = top_i_BK.reshape(-1)
        order_R = torch.argsort(expert_R, stable=True)
        token_R = torch.arange(B, device=x_BH.device).repeat_interleave(K)[order_R]
        weight_R = top_w_BK.reshape(-1)[order_R]
        counts = torch.bincount(expert_R, minlength=self.num_experts).tolist()
        x_RH = x_BH[token_R]
        # One split each (its backward is one concatenation; a slice per expert would zero-fill the
        # whole weight's gradient once per expert).
        w_in = self.w_in_HX.split(F_, dim=1)
        w_out = self.w_out_XH.split(F_, dim=0)
        outs = [torch.relu(x_nH @ w_in[e]) @ w_out[e]
                for e, x_nH in enumerate(x_RH.split(counts)) if counts[e]]
        y_RH = torch.cat(outs) * weight_R[:, None]
        return x_BH.new_zeros(x_BH.shape).index_add(0, token_R, y_RH)


class GrokMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        self.embed = nn.Embedding(cfg.vocab_size, H)
        self.pos = nn.Parameter(torch.randn(cfg.seq_len, H) / math.sqrt(H))
        self.q = nn.Linear(H, H, bias=False)
        self.k = nn.Linear(H, H, bias=False)
        self.v = nn.Linear(H, H, bias=False)
        self.o = nn.Linear(H, H, bias=False)
        self.blocks = nn.ModuleList(MoEBlock(cfg) for _ in range(cfg.num_moe_layers))
        make_norm = (lambda: nn.RMSNorm(H)) if cfg.norm else nn.Identity
        self.norms = nn.ModuleList(make_norm() for _ in range(cfg.num_moe_layers + 1))
        self.unembed = nn.Linear(H, cfg.num_outputs, bias=False)
        self.monitor: Optional[Monitor] = None  # set to a grokwatch Monitor to record routing
        self.aux_loss: Optional[torch.Tensor] = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids`` [B, 4] or [B, 5] (the answer, if present, is not read), or [B, 5m]: m equations
        a row (k-equation samples). Returns logits [B·m, P], one row per equation. Attention stays within
        an equation; a row's m equations share only the routing summary (one sample, 4m routed tokens)."""
        B, W = input_ids.shape
        m = 1
        if W > 5:
            if W % 5 or not self.cfg.route_all_positions:
                raise ValueError(f"input width {W}: several equations a row need width 5m and route_all_positions")
            m = W // 5
            input_ids = input_ids.reshape(B * m, 5)
        input_ids = input_ids[:, : self.cfg.seq_len]
        heads, H = self.cfg.heads, self.cfg.hidden
        d = H // heads
        x_BSH = self.embed(input_ids) + self.pos[: input_ids.shape[1]]
        if self.cfg.route_all_positions:
            return self._forward_all_positions(x_BSH, B)
        S = input_ids.shape[1]
        q_BHd = self.q(x_BSH[:, -1]).view(B, heads, d)  # only the '=' query matters
        k_BSHd = self.k(x_BSH).view(B, S, heads, d)
        v_BSHd = self.v(x_BSH).view(B, S, heads, d)
        # Four keys per query: elementwise products beat batched tiny matmuls here.
        att_BSh = torch.softmax((q_BHd[:, None] * k_BSHd).sum(-1) / math.sqrt(d), dim=1)
        x_BH = x_BSH[:, -1] + self.o((att_BSh[..., None] * v_BSHd).sum(1).reshape(B, H))
        aux = x_BH.new_zeros(())
        for i, block in enumerate(cast(list[MoEBlock], self.blocks)):
            y_BH, logits_BE, probs_BE, top_i_BK = block(self.norms[i](x_BH))
            if self.monitor is not None:
                # One routed position per equation: [B, 1, E].
                self.monitor.record(i, logits=logits_BE[:, None], topk=(top_i_BK[:, None], None),
                                    router_weight=block.router.weight)
            E = probs_BE.shape[-1]
            load_E = torch.zeros(E, device=x_BH.device).scatter_add_(
                0, top_i_BK.reshape(-1), torch.ones(top_i_BK.numel(), device=x_BH.device)) / top_i_BK.numel()
            aux = aux + E * (load_E * probs_BE.mean(0)).sum()  # Switch-style balance loss
            x_BH = x_BH + y_BH
        self.aux_loss = aux / len(self.blocks)
        return self.unembed(self.norms[-1](x_BH))


    def _forward_all_positions(self, x_BSH: torch.Tensor, rows: int) -> torch.Tensor:
        """``x_BSH``: B = rows·m equations; each of ``rows`` samples is recorded as m·S routed tokens."""
        B, S, H = x_BSH.shape
        heads = self.cfg.heads
        d = H // heads
        q, k, v = (lin(x_BSH).view(B, S, heads, d) for lin in (self.q, self.k, self.v))
        scores_BQKh = torch.einsum("bqhd,bkhd->bqkh", q, k) / math.sqrt(d)
        causal_QK = torch.ones(S, S, dtype=torch.bool, device=x_BSH.device).tril()
        att_BQKh = torch.softmax(scores_BQKh.masked_fill(~causal_QK[None, :, :, None], float("-inf")), dim=2)
        x_TH = (x_BSH + self.o(torch.einsum("bqkh,bkhd->bqhd", att_BQKh, v).reshape(B, S, H))).reshape(B * S, H)
        aux = x_TH.new_zeros(())
        for i, block in enumerate(cast(list[MoEBlock], self.blocks)):
            y_TH, logits_TE, probs_TE, top_i_TK = block(self.norms[i](x_TH))
            if self.monitor is not None:  # m·S routed positions per sample: [rows, m·S, E]
                self.monitor.record(i, logits=logits_TE.view(rows, -1, logits_TE.shape[-1]),
                                    topk=(top_i_TK.view(rows, -1, top_i_TK.shape[-1]), None),
                                    router_weight=block.router.weight)
            E = probs_TE.shape[-1]
            load_E = torch.zeros(E, device=x_TH.device).scatter_add_(
                0, top_i_TK.reshape(-1), torch.ones(top_i_TK.numel(), device=x_TH.device)) / top_i_TK.numel()
            aux = aux + E * (load_E * probs_TE.mean(0)).sum()
            x_TH = x_TH + y_TH
        self.aux_loss = aux / len(self.blocks)
        return self.unembed(self.norms[-1](x_TH.view(B, S, H)[:, -1]))


def answers(input_ids_BW: torch.Tensor) -> torch.Tensor:
    """The answer token of every equation of [B, 5m] rows, [B·m] (the model's output rows)."""
    return input_ids_BW.reshape(-1, 5)[:, 4]


def answer_loss(model, input_ids_BW, attention_mask=None):
    """Per-sample NLL of the answer tokens, the mean over a sample's equations (the probe's loss)."""
    logits = model(input_ids_BW)
    nll = nn.functional.cross_entropy(logits.float(), answers(input_ids_BW), reduction="none")
    return nll.view(input_ids_BW.shape[0], -1).mean(1)


def from_config(config: dict):
    """Checkpoint factory for ``grokwatch replay``: (model, probe loss, attach() keywords)."""
    cfg = ModelConfig(**config)
    return GrokMoE(cfg), answer_loss, dict(num_layers=cfg.num_moe_layers, num_experts=cfg.num_experts,
                                           top_k=cfg.top_k)
