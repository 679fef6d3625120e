"""On-device reductions of router outputs — runs on the training thread.

Two stages, so that the cost per MoE layer is two gathers and not a dozen
kernel launches: a router hook only gathers the sampled rows of the logits
and the top-k indices (``gather_layer``); at the end of the forward one
batched reduction over all layers (``reduce_all``) writes one preallocated
flat float32 buffer (``Staging.device``). That buffer is copied to pinned
host memory once per forward with ``non_blocking=True``, after which a CUDA
event is recorded. Nothing here synchronizes the device with the host: the
sender thread waits on the event, never the training thread.

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
    pending: list = field(default_factory=list)  # Gathered per layer, reduced together by reduce_all
    deferred: bool = False  # the probe finalizes itself after adding losses
    rows_prefix: bool = False  # the sampled rows are 0..M-1: a slice (a view) replaces the gathers
    extra: dict = field(default_factory=dict)


def build_context(*, source: str, step: int, attention_mask_BS: Optional[torch.Tensor],
                  position_ids_BS: Optional[torch.Tensor], num_rows: int, seq_len: int, rows: list[int],
                  max_rows: int, docs_per_row: int, device: torch.device, sample_ids: list[str],
                  groups: list[str], staging: "Staging") -> BatchContext:
    """Slots: M rows x D documents. Rows beyond ``rows`` are padding with zero
    weight; documents of a packed row are split where position_ids restart."""
    D = docs_per_row
    key = (tuple(rows), max_rows, seq_len, D)
    plain = attention_mask_BS is None and position_ids_BS is None
    cached = staging.layouts.get(key) if plain else None
    prefix = len(rows) == max_rows and list(rows) == list(range(max_rows))
    if cached is not None:  # the usual pretraining batch: same rows, no mask, no packing
        rows_M, weights_MSD, tokens_MD = cached
        return BatchContext(source=source, step=step, num_rows=num_rows, seq_len=seq_len, rows_M=rows_M,
                            weights_MSD=weights_MSD, tokens_MD=tokens_MD, sample_ids=sample_ids, groups=groups,
                            staging=staging, rows_prefix=prefix)
    padded = list(rows) + [0] * (max_rows - len(rows))
    rows_M = torch.tensor(padded, dtype=torch.long)
    if device.type == "cuda":  # a copy from pageable memory would block the host
        rows_M = rows_M.pin_memory().to(device, non_blocking=True)
    else:
        rows_M = rows_M.to(device)
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
    if plain:
        if len(staging.layouts) >= 32:
            staging.layouts.clear()
        staging.layouts[key] = (rows_M, weights_MSD, tokens_MD)
    return BatchContext(source=source, step=step, num_rows=num_rows, seq_len=seq_len, rows_M=rows_M,
                        weights_MSD=weights_MSD, tokens_MD=tokens_MD, sample_ids=sample_ids, groups=groups,
                        staging=staging, rows_prefix=prefix)


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
        self.layouts: dict[tuple, tuple] = {}  # build_context's device tensors for unmasked batches

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: flat[o:o + n].view(self.shapes[name]) for name, (o, n) in self.offsets.items()}

    def take(self) -> Optional[int]:
        return self.free.pop() if self.free else None  # list.pop is atomic under the GIL

    def give_back(self, index: int) -> None:
        self.free.append(index)


def routing_distribution(logits_MSE: torch.Tensor, distribution: str, detect_probs: bool = False,
                         with_log: bool = True):
    """METRICS.md Notation p(t), and log p(t) for the entropy: softmax of the
    logits, or sigmoid scores over their sum, or (``probs``) a distribution
    given as is. transformers 5.0-5.5 routers return probabilities in the
    logits slot; with ``detect_probs`` an input already on the simplex is used
    as is — decided on the device (torch.where: no host sync, never a second
    softmax). Later versions return logits and skip the check (fewer ops).
    ``with_log=False``: log p is not computed (returned as None)."""
    x = logits_MSE.float()
    if distribution == "probs":
        return x, x.clamp_min(_LOG_FLOOR).log() if with_log else None
    if distribution == "sigmoid":
        s = torch.sigmoid(x)
        dist = s / s.sum(dim=-1, keepdim=True)
        log_dist = dist.clamp_min(_LOG_FLOOR).log() if with_log else None
    elif not with_log and not (x.device.type == "cpu" and x.shape[-1] < 32):
        dist, log_dist = torch.softmax(x, dim=-1), None  # one launch where log p is not needed
    elif x.device.type == "cpu" and x.shape[-1] < 32:
        # CPU quirk, measured (torch 2.13): log_softmax over a short last dim costs ~120 us at
        # [8, 128, 8]; over the middle dim of the transposed copy ~20 us. Same values.
        log_dist = torch.log_softmax(x.transpose(-1, -2).contiguous(), dim=-2).transpose(-1, -2)
        dist = log_dist.exp()
    else:
        log_dist = torch.log_softmax(x, dim=-1)
        dist = log_dist.exp()
    if not with_log:
        log_dist = None
    if detect_probs:  # per layer when x stacks layers [G, M, S, E]
        lead = x.shape[0] if x.dim() == 4 else 1
        off_BX = (x.sum(dim=-1) - 1).abs().reshape(lead, -1)
        on_simplex = (x.reshape(lead, -1).amin(dim=1) >= 0) & (off_BX.amax(dim=1) < 1e-4)
        on_simplex = on_simplex.reshape((lead,) + (1,) * (x.dim() - 1)) if x.dim() == 4 else on_simplex[0]
        dist = torch.where(on_simplex, x, dist)
        if log_dist is not None:
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


@dataclass
class Gathered:
    """One MoE layer's router output for the sampled rows, awaiting reduce_all."""

    layer: int
    logits_MSE: torch.Tensor  # the router's dtype
    idx_MSK: Optional[torch.Tensor]  # the routing decision; None: top-k of the distribution
    weight_EH: Optional[torch.Tensor]
    distribution: str
    detect_probs: bool
    seq_len: Optional[int]  # routed positions per row, when they differ from the input's


@torch.no_grad()
def gather_layer(ctx: BatchContext, layer: int, logits_TE: torch.Tensor, topk_idx_TK: Optional[torch.Tensor],
                 weight_EH: Optional[torch.Tensor], distribution: str, seq_len: Optional[int] = None,
                 detect_probs: bool = False) -> None:
    """The per-layer part: the sampled rows' logits and indices (two gathers).
    ``seq_len``: routed positions per row when they differ from the input's."""
    S = ctx.seq_len if seq_len is None else seq_len
    E = logits_TE.shape[-1]
    M = ctx.rows_M.shape[0]
    logits_BSE = logits_TE.detach().reshape(ctx.num_rows, S, E)
    # A view holds nothing beyond what autograd keeps until backward; reduce_all runs before it.
    logits_MSE = logits_BSE[:M] if ctx.rows_prefix else logits_BSE.index_select(0, ctx.rows_M)
    idx_MSK = None
    if topk_idx_TK is not None:
        idx_BSK = topk_idx_TK.detach().reshape(ctx.num_rows, S, -1)
        idx_MSK = idx_BSK[:M] if ctx.rows_prefix else idx_BSK.index_select(0, ctx.rows_M)
    ctx.pending.append(Gathered(layer, logits_MSE, idx_MSK, weight_EH, distribution, detect_probs,
                                None if S == ctx.seq_len else S))
    ctx.layers_done += 1


@torch.no_grad()
def reduce_all(ctx: BatchContext, top_k: int) -> None:
    """Per sampled slot and layer: mean routing distribution, top-k counts,
    mean entropy ratio; then the cosine between adjacent layers' routing
    embeddings. Layers of the same shape are reduced in one batch (in a
    transformers model: all of them)."""
    views = ctx.staging.views
    batches: dict[tuple, list[Gathered]] = {}
    for g in ctx.pending:
        key = (g.seq_len, tuple(g.logits_MSE.shape), g.logits_MSE.dtype, g.distribution, g.detect_probs,
               None if g.idx_MSK is None else tuple(g.idx_MSK.shape))
        batches.setdefault(key, []).append(g)
    for group in batches.values():
        _reduce_batch(ctx, group, top_k, views)
    _cosines(ctx, views)
    ctx.pending = []


def _reduce_batch(ctx: BatchContext, group: list[Gathered], top_k: int, views: dict) -> None:
    first = group[0]
    E = first.logits_MSE.shape[-1]
    if first.seq_len is None:
        w_MSD, tokens_MD = ctx.weights_MSD, ctx.tokens_MD
    else:
        w_MSD, tokens_MD = routed_positions(ctx, first.seq_len)
    logits_GMSE = torch.stack([g.logits_MSE for g in group]) if len(group) > 1 else first.logits_MSE[None]
    p_GMSE, _ = routing_distribution(logits_GMSE, first.distribution, first.detect_probs, with_log=False)
    # entr(p) = -p log p with entr(0) = 0: an expert a router masks out (p = 0) adds nothing, not NaN.
    ent_GMS1 = torch.special.entr(p_GMSE).sum(dim=-1, keepdim=True) * (1.0 / math.log(E))
    if first.idx_MSK is not None:
        idx_GMSK = torch.stack([g.idx_MSK for g in group]) if len(group) > 1 else first.idx_MSK[None]
    else:  # no decision exposed: the top-k of the distribution itself
        idx_GMSK = p_GMSE.topk(top_k, dim=-1).indices
    # One batched reduction over the tokens of each slot for [p | hits | entropy]: F = 2E + 1.
    feats_GMSF = torch.cat([p_GMSE, torch.zeros_like(p_GMSE), ent_GMS1], dim=-1)
    feats_GMSF[..., E:2 * E].scatter_(3, idx_GMSK, 1.0)
    sums_GMDF = torch.einsum("msd,gmsf->gmdf", w_MSD, feats_GMSF)
    G, N = len(group), sums_GMDF.shape[1] * sums_GMDF.shape[2]
    sums_GNF = sums_GMDF.reshape(G, N, 2 * E + 1)
    denom_1N1 = tokens_MD.reshape(1, N, 1).clamp_min(1.0)
    layers = [g.layer for g in group]
    lo = layers[0]
    if layers == list(range(lo, lo + G)):  # the usual case: consecutive layers, slice writes
        views["mean_LNE"][lo:lo + G].copy_(sums_GNF[..., :E] / denom_1N1)
        views["counts_LNE"][lo:lo + G].copy_(sums_GNF[..., E:2 * E])
        views["entropy_LN"][lo:lo + G].copy_(sums_GNF[..., 2 * E] / denom_1N1[..., 0])
    else:
        for i, layer in enumerate(layers):
            views["mean_LNE"][layer].copy_(sums_GNF[i, :, :E] / denom_1N1[0])
            views["counts_LNE"][layer].copy_(sums_GNF[i, :, E:2 * E])
            views["entropy_LN"][layer].copy_(sums_GNF[i, :, 2 * E] / denom_1N1[0, :, 0])
    if 0 in layers:
        views["tokens_N"].copy_(tokens_MD.reshape(N))


def _cosines(ctx: BatchContext, views: dict) -> None:
    """METRICS.md §2: cos(emb(l-1), emb(l)) with emb = mean p @ router weight,
    row l of cosine_LN; needs every layer's router weight."""
    gathered = sorted(ctx.pending, key=lambda g: g.layer)
    if len(gathered) < 2 or any(g.weight_EH is None for g in gathered):
        return
    layers = [g.layer for g in gathered]
    mean_LNE = views["mean_LNE"]
    weights = [g.weight_EH.detach() for g in gathered]
    if len({tuple(w.shape) for w in weights}) == 1 and layers == list(range(layers[0], layers[0] + len(layers))):
        lo, hi = layers[0], layers[-1] + 1
        emb_LNH = torch.bmm(mean_LNE[lo:hi], torch.stack(weights).float())
        views["cosine_LN"][lo + 1:hi].copy_(
            torch.nn.functional.cosine_similarity(emb_LNH[:-1], emb_LNH[1:], dim=-1, eps=1e-12))
        return
    prev = None
    for layer, w in zip(layers, weights):
        emb_NH = mean_LNE[layer] @ w.float()
        if prev is not None:
            views["cosine_LN"][layer].copy_(torch.nn.functional.cosine_similarity(prev, emb_NH, dim=-1, eps=1e-12))
        prev = emb_NH
