"""On-device reductions of router outputs — runs on the training thread.

Nothing here synchronizes the device with the host: every op is a device op
on the sampled rows only, writing into one preallocated flat float32 buffer
(``Staging.device``) that is copied to pinned host memory once per forward
with ``non_blocking=True``, after which a CUDA event is recorded. The sender
thread waits on the event, never the training thread.

Legend: B batch rows, S sequence positions, T = B*S tokens, E experts,
K top-k, H hidden size, M sampled rows, D documents per row (packing),
N = M*D sample slots, L MoE layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

_LOG_FLOOR = 1e-30


@dataclass
class BatchContext:
    """What the top-level pre-hook learned about the batch of one forward."""

    source: str
    step: int
    num_rows: int  # B
    seq_len: int  # S
    rows_M: torch.Tensor  # long, device: sampled batch rows (padding slots repeat row 0)
    weights_MSD: torch.Tensor  # float32, device: token -> slot weights (mask x document one-hot)
    tokens_MD: torch.Tensor  # float32, device: real tokens per slot
    sample_ids: list[str]  # N host-side ids ("" for unused slots)
    groups: list[str]
    staging: "Staging"
    layers_done: int = 0
    emb_prev_NH: Optional[torch.Tensor] = None
    deferred: bool = False  # the probe finalizes itself after adding losses
    extra: dict = field(default_factory=dict)


def build_context(*, source: str, step: int, attention_mask_BS: Optional[torch.Tensor],
                  position_ids_BS: Optional[torch.Tensor], num_rows: int, seq_len: int, rows: list[int],
                  max_rows: int, docs_per_row: int, device: torch.device, sample_ids: list[str],
                  groups: list[str], staging: "Staging") -> BatchContext:
    """Slots: M rows x D documents. Rows beyond ``rows`` are padding with zero
    weight; documents of a packed row are split where position_ids restart."""
    D = docs_per_row
    padded = list(rows) + [0] * (max_rows - len(rows))
    rows_M = torch.tensor(padded, dtype=torch.long, device=device)
    valid_M = torch.zeros(max_rows, dtype=torch.float32, device=device)
    valid_M[: len(rows)] = 1.0
    if attention_mask_BS is not None:
        mask_MS = attention_mask_BS.index_select(0, rows_M).to(torch.float32)
    else:
        mask_MS = torch.ones(max_rows, seq_len, dtype=torch.float32, device=device)
    mask_MS = mask_MS * valid_M[:, None]
    if D > 1 and position_ids_BS is not None:
        pos_MS = position_ids_BS.index_select(0, rows_M)
        starts_MS = (pos_MS == 0).to(torch.long)
        starts_MS[:, 0] = 1
        doc_MS = starts_MS.cumsum(dim=1) - 1  # document index of each token
        onehot_MSD = (doc_MS[..., None] == torch.arange(D, device=device)).to(torch.float32)
        # Documents beyond D in a row are left out (their one-hot is all zero).
    else:
        onehot_MSD = torch.zeros(max_rows, seq_len, D, dtype=torch.float32, device=device)
        onehot_MSD[..., 0] = 1.0
    weights_MSD = onehot_MSD * mask_MS[..., None]
    tokens_MD = weights_MSD.sum(dim=1)
    return BatchContext(source=source, step=step, num_rows=num_rows, seq_len=seq_len, rows_M=rows_M,
                        weights_MSD=weights_MSD, tokens_MD=tokens_MD, sample_ids=sample_ids, groups=groups,
                        staging=staging)


class Staging:
    """One flat device buffer with named views, and a small pool of pinned host
    buffers of the same size (one per in-flight message)."""

    def __init__(self, *, num_layers: int, slots: int, num_experts: int, device: torch.device, pool_size: int = 4):
        L, N, E = num_layers, slots, num_experts
        self.shapes = {
            "mean_LNE": (L, N, E),
            "counts_LNE": (L, N, E),
            "entropy_LN": (L, N),
            "cosine_LN": (L, N),  # row l holds cos(layer l-1, layer l); row 0 unused
            "tokens_N": (N,),
            "loss_N": (N,),
        }
        self.offsets = {}
        total = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = (total, math.prod(shape))
            total += math.prod(shape)
        self.size = total
        self.device = device
        self.device_buf = torch.zeros(total, dtype=torch.float32, device=device)
        self.views = self.split(self.device_buf)
        pin = device.type == "cuda"
        self.pool = [torch.zeros(total, dtype=torch.float32, pin_memory=pin) for _ in range(pool_size)]
        self.free = list(range(pool_size))

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: flat[o:o + n].view(self.shapes[name]) for name, (o, n) in self.offsets.items()}

    def take(self) -> Optional[int]:
        return self.free.pop() if self.free else None  # list.pop is atomic under the GIL

    def give_back(self, index: int) -> None:
        self.free.append(index)


def routing_distribution(logits_MSE: torch.Tensor, distribution: str, detect_probs: bool = False):
    """METRICS.md Notation p(t), and log p(t) for the entropy: softmax of the
    logits, or sigmoid scores over their sum, or (``probs``) a distribution
    given as is. transformers 5.0-5.5 routers return probabilities in the
    logits slot; with ``detect_probs`` an input already on the simplex is used
    as is — decided on the device (torch.where: no host sync, never a second
    softmax). Later versions return logits and skip the check (fewer ops)."""
    x = logits_MSE.float()
    if distribution == "probs":
        return x, x.clamp_min(_LOG_FLOOR).log()
    if distribution == "sigmoid":
        s = torch.sigmoid(x)
        dist = s / s.sum(dim=-1, keepdim=True)
        log_dist = dist.clamp_min(_LOG_FLOOR).log()
    elif x.device.type == "cpu" and x.shape[-1] < 32:
        # CPU quirk, measured (torch 2.13): log_softmax over a short last dim costs ~120 us at
        # [8, 128, 8]; over the middle dim of the transposed copy ~20 us. Same values.
        log_dist = torch.log_softmax(x.transpose(-1, -2).contiguous(), dim=-2).transpose(-1, -2)
        dist = log_dist.exp()
    else:
        log_dist = torch.log_softmax(x, dim=-1)
        dist = log_dist.exp()
    if detect_probs:
        on_simplex = (x.amin() >= 0) & ((x.sum(dim=-1) - 1).abs().amax() < 1e-4)
        dist = torch.where(on_simplex, x, dist)
        log_dist = torch.where(on_simplex, x.clamp_min(_LOG_FLOOR).log(), log_dist)
    return dist, log_dist


def routed_positions(ctx: BatchContext, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot weights for a layer that routes ``seq_len`` positions per row other
    than the input's (e.g. only the last position): every routed position of a
    sampled row counts, all in the row's first slot."""
    cached = ctx.extra.get(seq_len)
    if cached is None:
        valid_M = (ctx.tokens_MD.sum(dim=1) > 0).to(torch.float32)
        w_MSD = torch.zeros(valid_M.shape[0], seq_len, ctx.tokens_MD.shape[1], device=valid_M.device)
        w_MSD[:, :, 0] = valid_M[:, None]
        cached = ctx.extra[seq_len] = (w_MSD, w_MSD.sum(dim=1))
    return cached


@torch.no_grad()
def reduce_layer(ctx: BatchContext, layer: int, logits_TE: torch.Tensor, topk_idx_TK: Optional[torch.Tensor],
                 weight_EH: Optional[torch.Tensor], distribution: str, top_k: int, seq_len: Optional[int] = None,
                 detect_probs: bool = False) -> None:
    """Per sampled slot: mean routing distribution, top-k counts, mean entropy
    ratio, and the cosine with the previous layer's routing embedding.
    ``seq_len``: routed positions per row when they differ from the input's."""
    views = ctx.staging.views
    E = logits_TE.shape[-1]
    if seq_len is None or seq_len == ctx.seq_len:
        S, w_MSD, tokens_MD = ctx.seq_len, ctx.weights_MSD, ctx.tokens_MD
    else:
        S = seq_len
        w_MSD, tokens_MD = routed_positions(ctx, seq_len)
    logits_MSE = logits_TE.detach().reshape(ctx.num_rows, S, E).index_select(0, ctx.rows_M)
    p_MSE, logp_MSE = routing_distribution(logits_MSE, distribution, detect_probs)
    ent_MS1 = (p_MSE * logp_MSE).sum(dim=-1, keepdim=True) * (-1.0 / math.log(E))
    if topk_idx_TK is not None:
        idx_MSK = topk_idx_TK.detach().reshape(ctx.num_rows, S, -1).index_select(0, ctx.rows_M)
    else:  # no decision exposed: the top-k of the distribution itself
        idx_MSK = p_MSE.topk(top_k, dim=-1).indices
    # One batched reduction over the tokens of each slot for [p | hits | entropy]: F = 2E + 1.
    feats_MSF = torch.cat([p_MSE, torch.zeros_like(p_MSE), ent_MS1], dim=-1)
    feats_MSF[..., E:2 * E].scatter_(2, idx_MSK, 1.0)
    sums_MDF = torch.einsum("msd,msf->mdf", w_MSD, feats_MSF)
    N = sums_MDF.shape[0] * sums_MDF.shape[1]
    sums_NF = sums_MDF.reshape(N, 2 * E + 1)
    denom_N1 = tokens_MD.reshape(N, 1).clamp_min(1.0)
    mean_NE = sums_NF[:, :E] / denom_N1
    views["mean_LNE"][layer].copy_(mean_NE)
    views["counts_LNE"][layer].copy_(sums_NF[:, E:2 * E])
    views["entropy_LN"][layer].copy_(sums_NF[:, 2 * E] / denom_N1[:, 0])
    if weight_EH is not None:
        emb_NH = mean_NE @ weight_EH.detach().float()  # METRICS.md §2 routing embedding
        if ctx.emb_prev_NH is not None and layer > 0:
            views["cosine_LN"][layer].copy_(torch.nn.functional.cosine_similarity(ctx.emb_prev_NH, emb_NH, dim=-1,
                                                                                  eps=1e-12))
        ctx.emb_prev_NH = emb_NH
    if layer == 0:
        views["tokens_N"].copy_(tokens_MD.reshape(N))
    ctx.layers_done += 1
