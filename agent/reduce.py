"""On-device reductions of router outputs — runs on the training thread.

Two stages, so that the cost per MoE layer is at most two gathers and not a
dozen kernel launches: a router hook only keeps the router's outputs, or
gathers their sampled rows (``gather_layer``); at the end of the forward one
batched reduction over all layers (``reduce_all``; its math and writes are
``summarize``, which compiled.py compiles on CUDA) writes one preallocated
flat buffer (``Staging.device_buf``). That buffer is copied to pinned host
memory once per forward with ``non_blocking=True``, after which a CUDA event
is recorded. Nothing here synchronizes the device with the host: the sender
thread waits on the event, never the training thread.

Legend: B batch rows, S sequence positions, T = B*S tokens, E experts,
K top-k, H hidden size, M sampled rows, D documents per row (packing),
N = M*D sample slots, L MoE layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:
    from grokwatch.agent.staging import Staging

_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)

_LOG_FLOOR = 1e-30
_LOG_FLOOR_LOG = math.log(_LOG_FLOOR)


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
    slot_MS: torch.Tensor  # long, device: each token's slot m*D + d (0 with weight 0 where it has none)
    valid_MS: torch.Tensor  # float32, device: 1 where the token counts (the row sum of weights_MSD)
    packed: bool  # documents split where position_ids restart (else each row is one slot, m*D)
    sample_ids: list[str]  # N host-side ids ("" for unused slots)
    groups: list[str]
    staging: "Staging"
    layers_done: int = 0
    pending: list = field(default_factory=list)  # Gathered per layer, reduced together by reduce_all
    deferred: bool = False  # the probe finalizes itself after adding losses
    rows_prefix: bool = False  # the sampled rows are 0..M-1: a slice (a view) replaces the gathers
    extra: dict = field(default_factory=dict)  # derived device tensors; shared by contexts of one cached layout


def token_mask(attention_mask, seq_len: int) -> Optional[torch.Tensor]:
    """Which tokens count, [B, S], from what the model was given as ``attention_mask``: a [B, S] mask as
    it is; a [B, S, S] or [B, heads, S, S] one (bool or int: nonzero allows; float: additive, a finite
    entry allows, -inf or the dtype's minimum masks) by whether some query may attend to the token (a
    padded position is attended by none; packed documents' block masks keep every token); a dict of
    masks per attention kind (GPT-OSS and other models with sliding-window layers take one): its
    ``full_attention`` mask. None where there is no usable mask: then every position counts."""
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() < 2:
        return None
    if attention_mask.dim() == 2:
        return attention_mask
    if attention_mask.is_floating_point():
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    else:
        allowed = attention_mask != 0
    valid_BS = allowed.flatten(1, -2).any(dim=1)
    return valid_BS if valid_BS.shape[-1] == seq_len else None


def build_context(*, source: str, step: int, attention_mask_BS: Optional[torch.Tensor],
                  position_ids_BS: Optional[torch.Tensor], num_rows: int, seq_len: int, rows: list[int],
                  max_rows: int, docs_per_row: int, device: torch.device, sample_ids: list[str],
                  groups: list[str], staging: "Staging") -> BatchContext:
    """Slots: M rows x D documents. Rows beyond ``rows`` are padding with zero
    weight; documents of a packed row are split where position_ids restart.
    ``attention_mask_BS``: [B, S], or what ``token_mask`` reduces to it."""
    attention_mask_BS = token_mask(attention_mask_BS, seq_len)
    D = docs_per_row
    key = (tuple(rows), max_rows, seq_len, D)
    plain = attention_mask_BS is None and position_ids_BS is None
    cached = staging.layouts.get(key) if plain else None
    prefix = len(rows) == max_rows and list(rows) == list(range(max_rows))
    if cached is None:
        cached = _layout(attention_mask_BS, position_ids_BS, rows, max_rows, seq_len, D, device)
        if plain:
            if len(staging.layouts) >= 32:
                staging.layouts.clear()
            staging.layouts[key] = cached
    rows_M, weights_MSD, tokens_MD, slot_MS, valid_MS, extra = cached
    return BatchContext(source=source, step=step, num_rows=num_rows, seq_len=seq_len, rows_M=rows_M,
                        weights_MSD=weights_MSD, tokens_MD=tokens_MD, slot_MS=slot_MS, valid_MS=valid_MS,
                        packed=D > 1 and position_ids_BS is not None,
                        sample_ids=sample_ids, groups=groups, staging=staging, rows_prefix=prefix, extra=extra)


def _layout(attention_mask_BS, position_ids_BS, rows, max_rows, seq_len, D, device) -> tuple:
    """Device tensors mapping the sampled rows' tokens to slots (no host sync)."""
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
        # A document starts at a real token where the positions restart, and at a row's first real
        # token (left padding: transformers numbers padding 1, then the first real token 0).
        real_MS = mask_MS > 0
        first_MS = real_MS & (real_MS.cumsum(dim=1) == 1)
        starts_MS = ((pos_MS == 0) & real_MS) | first_MS
        doc_MS = (starts_MS.cumsum(dim=1) - 1).clamp_min(0)  # document index of each token (padding: 0)
        onehot_MSD = (doc_MS[..., None] == torch.arange(D, device=device)).to(torch.float32)
        # Documents beyond D in a row are left out (their one-hot is all zero).
    else:
        onehot_MSD = torch.zeros(max_rows, seq_len, D, dtype=torch.float32, device=device)
        onehot_MSD[..., 0] = 1.0
    weights_MSD = onehot_MSD * mask_MS[..., None]
    tokens_MD = weights_MSD.sum(dim=1)
    slot_MS, valid_MS = _slots(weights_MSD)
    return rows_M, weights_MSD, tokens_MD, slot_MS, valid_MS, {}


def _slots(weights_MSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 0/1 weights as an index: token (m, s) counts in slot m*D + d."""
    M, _, D = weights_MSD.shape
    valid_MS = weights_MSD.sum(dim=-1)
    slot_MS = torch.arange(M, device=weights_MSD.device)[:, None] * D + weights_MSD.argmax(dim=-1)
    return slot_MS, valid_MS


def routing_distribution(logits: torch.Tensor, distribution: str, detect_probs: bool = False, dim: int = -1):
    """METRICS.md Notation p(t) over the expert dimension ``dim``, and log p(t)
    for the entropy, floored so that an expert with p = 0 (masked out, or
    underflow) adds p log p = 0 and never NaN: softmax of the logits, or
    sigmoid scores over their sum, or (``probs``) a distribution given as is.
    transformers 5.0-5.5 routers return probabilities in the logits slot; with
    ``detect_probs`` an input already on the simplex is used as is — decided
    on the device (torch.where: no host sync, never a second softmax; per
    layer when the input stacks layers [G, ...])."""
    x = logits.float()
    if distribution == "softmax":
        log_dist = torch.log_softmax(x, dim=dim)
        dist = log_dist.exp()
        log_dist = log_dist.clamp_min(_LOG_FLOOR_LOG)
    else:
        if distribution == "sigmoid":
            s = torch.sigmoid(x)
            dist = s / s.sum(dim=dim, keepdim=True)
        else:  # "probs": given as is, scaled to sum to 1 (a user's record(probs=...) may not)
            dist = x / x.sum(dim=dim, keepdim=True).clamp_min(_LOG_FLOOR)
        log_dist = dist.clamp_min(_LOG_FLOOR).log()
    if detect_probs:
        on_simplex = _on_simplex(x, dim)
        dist = torch.where(on_simplex, x, dist)
        log_dist = torch.where(on_simplex, x.clamp_min(_LOG_FLOOR).log(), log_dist)
    return dist, log_dist


def _on_simplex(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Whether the input already is a distribution (per layer when it stacks layers [G, ...]), on the device."""
    lead = x.shape[0] if x.dim() == 4 else 1
    off_BX = (x.sum(dim=dim) - 1).abs().reshape(lead, -1)
    on_simplex = (x.reshape(lead, -1).amin(dim=1) >= 0) & (off_BX.amax(dim=1) < 1e-4)
    return on_simplex.reshape((lead,) + (1,) * (x.dim() - 1)) if x.dim() == 4 else on_simplex[0]


def router_zloss(x: torch.Tensor, log_p: torch.Tensor, distribution: str, detect_probs: bool,
                 dim: int) -> torch.Tensor:
    """Per token, logsumexp(logits)² (the router z-loss of ST-MoE, before its mean over tokens), keepdim
    over ``dim``, from what the distribution already computed: log p_e = x_e − logsumexp(x), exact at
    the top expert (never floored), so logsumexp(x) = max x − max log p — two max reductions, no second
    exp pass. -1 where it is undefined: scores that are not softmax logits (sigmoid, probabilities, a
    transformers router that returns probabilities in the logits slot) or ``distribution`` "off"
    (attach(router_zloss=False)). The sender leaves a negative mean out of the message."""
    if distribution != "softmax":
        return torch.full_like(log_p.narrow(dim, 0, 1), -1.0)
    z = (x.amax(dim=dim, keepdim=True).float() - log_p.amax(dim=dim, keepdim=True)).square()
    if detect_probs:
        z = torch.where(_on_simplex(x, dim), torch.full_like(z, -1.0), z)
    return z


def routed_positions(ctx: BatchContext, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot weights for a layer that routes ``seq_len`` positions per row other
    than the input's (e.g. only the last position): every routed position of a
    sampled row counts, all in the row's first slot."""
    cached = ctx.extra.get(("positions", seq_len))
    if cached is None:
        valid_M = (ctx.tokens_MD.sum(dim=1) > 0).to(torch.float32)
        w_MSD = torch.zeros(valid_M.shape[0], seq_len, ctx.tokens_MD.shape[1], dtype=torch.float32,
                            device=valid_M.device)
        w_MSD[:, :, 0] = valid_M[:, None]
        cached = ctx.extra[("positions", seq_len)] = (w_MSD, w_MSD.sum(dim=1)) + _slots(w_MSD)
    return cached


@dataclass
class Gathered:
    """One MoE layer's router output, awaiting reduce_all: the sampled rows
    [M, S, E] and [M, S, K], or (``raw``) the router's own tensors when the
    sampled rows are the first M, sliced when stacked (``_stacked``)."""

    layer: int
    logits_MSE: torch.Tensor  # the router's dtype
    idx_MSK: Optional[torch.Tensor]  # the routing decision; None: top-k of the distribution
    weight_EH: Optional[torch.Tensor]
    distribution: str
    detect_probs: bool
    seq_len: Optional[int]  # routed positions per row, when they differ from the input's
    raw: bool = False


def gather_layer(ctx: BatchContext, layer: int, logits_TE: torch.Tensor, topk_idx_TK: Optional[torch.Tensor],
                 weight_EH: Optional[torch.Tensor], distribution: str, seq_len: Optional[int] = None,
                 detect_probs: bool = False) -> None:
    """The per-layer part, called from inside the forward. When the sampled rows
    are 0..M-1 it only keeps references (sliced, only if rows are left out, and
    stacked at the end by ``_stacked``: a few calls whatever the depth); else it
    gathers the rows now, so that only M rows of each layer stay alive.
    ``seq_len``: routed positions per row when they differ from the input's."""
    S = ctx.seq_len if seq_len is None else seq_len
    seq = None if S == ctx.seq_len else S
    if ctx.rows_prefix:
        ctx.pending.append(Gathered(layer, logits_TE, topk_idx_TK, weight_EH, distribution, detect_probs, seq, True))
    else:
        E = logits_TE.shape[-1]
        logits_MSE = logits_TE.detach().reshape(ctx.num_rows, S, E).index_select(0, ctx.rows_M)
        idx_MSK = None
        if topk_idx_TK is not None:
            idx_MSK = topk_idx_TK.detach().reshape(ctx.num_rows, S, -1).index_select(0, ctx.rows_M)
        ctx.pending.append(Gathered(layer, logits_MSE, idx_MSK, weight_EH, distribution, detect_probs, seq))
    ctx.layers_done += 1


def attach_indices(ctx: BatchContext, gathered: Gathered, topk_idx_TK: torch.Tensor) -> None:
    """The routing decision of a layer whose router returned none, as gather_layer would have kept it."""
    if gathered.raw:
        gathered.idx_MSK = topk_idx_TK
    else:
        S = ctx.seq_len if gathered.seq_len is None else gathered.seq_len
        gathered.idx_MSK = topk_idx_TK.detach().reshape(ctx.num_rows, S, -1).index_select(0, ctx.rows_M)


def expert_dim(device: torch.device) -> int:
    """Where the experts go in the batched reduction. CPU: [G, M, E, S] —
    torch 2.13's CPU (log_)softmax over a short last dim is ~6x slower than
    over the middle one, and the sums over tokens then run along contiguous
    memory. CUDA: [G, M, S, E], as the router wrote it."""
    return -2 if device.type == "cpu" else -1


# The batched reduction's transient memory, in float32 copies of its [G, M, S, E] logits (stack
# included), measured on CPU (peak RSS, docs/benchmarks.md "Reduction memory"): op by op the
# distribution, its log, p log p and the features live at once; compiled, the kernels fuse them.
TRANSIENT_COPIES_OP_BY_OP = 5
TRANSIENT_COPIES_COMPILED = 2


@torch.inference_mode()
def reduce_all(ctx: BatchContext, top_k: int, dim: Optional[int] = None,
               summarize_fn: Optional[Callable] = None, max_bytes: Optional[float] = None, zloss: bool = True) -> bool:
    """Per sampled slot and layer: mean routing distribution, top-k counts,
    mean entropy ratio; then the cosine between adjacent layers' routing
    embeddings. Layers of the same shape are reduced in one batch (in a
    transformers model: all of them, cosines included). ``dim``: the expert
    dimension of the batched layout (default: ``expert_dim`` of the device).
    ``summarize_fn``: ``summarize`` compiled (compiled.py; experts last
    whatever the device), else ``summarize`` runs op by op. ``max_bytes``:
    the most transient memory one batch may take (estimated, see
    TRANSIENT_COPIES_*); more layers are reduced in several batches. It runs
    at the end of the forward, when the saved activations are at their peak.
    Returns whether the cosines were computed (they need every layer's router
    weight). It runs from the model's forward hook, hence inside the user's
    autocast region if there is one (HF Trainer's bf16=True): autocast is
    switched off here, so that the token means and cosines are float32 matmuls."""
    device_type = ctx.staging.device.type
    if _autocast_enabled(device_type):  # inside the user's autocast: matmuls would run in bf16/fp16
        with torch.autocast(device_type, enabled=False):
            return _reduce_all(ctx, top_k, dim, summarize_fn, max_bytes, zloss)
    return _reduce_all(ctx, top_k, dim, summarize_fn, max_bytes, zloss)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast (meta): nothing to switch off
        return False


def _reduce_all(ctx: BatchContext, top_k: int, dim: Optional[int], summarize_fn: Optional[Callable],
                max_bytes: Optional[float], zloss: bool = True) -> bool:
    views = ctx.staging.views
    if summarize_fn is not None:
        dim = -1
    dim = expert_dim(ctx.staging.device) if dim is None else dim
    batches: dict[tuple, list[Gathered]] = {}
    for g in ctx.pending:
        key = (g.raw, g.seq_len, tuple(g.logits_MSE.shape), g.logits_MSE.dtype, g.distribution, g.detect_probs,
               None if g.idx_MSK is None else tuple(g.idx_MSK.shape))
        batches.setdefault(key, []).append(g)
    copies = TRANSIENT_COPIES_OP_BY_OP if summarize_fn is None else TRANSIENT_COPIES_COMPILED
    groups = [chunk for group in batches.values() for chunk in _within(ctx, group, max_bytes, copies)]
    weights_LEH = _cosine_weights(groups[0]) if len(groups) == 1 else None
    for group in groups:
        _reduce_batch(ctx, group, top_k, views, dim, summarize_fn or summarize, weights_LEH, zloss)
    with_cosines = weights_LEH is not None or _cosines(ctx, views)
    ctx.pending = []
    return with_cosines


def _within(ctx: BatchContext, group: list[Gathered], max_bytes: Optional[float], copies: int) -> list[list[Gathered]]:
    """``group`` in runs of as many layers as ``max_bytes`` of transient memory allows (at least one)."""
    if max_bytes is None:
        return [group]
    first = group[0]
    S = ctx.seq_len if first.seq_len is None else first.seq_len
    per_layer = copies * 4 * ctx.rows_M.shape[0] * S * first.logits_MSE.shape[-1]
    n = max(1, int(max_bytes // per_layer))
    return [group[i:i + n] for i in range(0, len(group), n)]


def _cosine_weights(group: list[Gathered]) -> Optional[torch.Tensor]:
    """The router weights [L, E, H] stacked, when the layers (in order) are consecutive and every weight is
    usable and of one shape: then one batched call computes the cosines (in a single group's summary, or
    in ``_cosines``). Else None."""
    weights = [g.weight_EH for g in group]
    layers = [g.layer for g in group]
    if (len(group) < 2 or layers != list(range(layers[0], layers[0] + len(layers)))
            or not all(usable_weight(w) for w in weights) or len({tuple(w.shape) for w in weights}) != 1):
        return None
    return torch.stack(weights)  # inference_mode: no autograd record, no detach needed


def _stacked(ctx: BatchContext, group: list[Gathered], attr: str, tokens_last: bool = False) -> torch.Tensor:
    """The group's ``attr`` tensors (logits or indices), sampled rows only, stacked:
    [G, M, S, X] (``tokens_last``: [G, M, X, S]). Raw router outputs [B*S, X]
    are sliced only when some rows are not sampled, and stacked flat: a few
    calls whatever the depth, where a call costs host time on the step."""
    first = group[0]
    M = ctx.rows_M.shape[0]
    S = ctx.seq_len if first.seq_len is None else first.seq_len
    tensors = [getattr(g, attr) for g in group]
    if first.raw and all(t.dim() == 2 for t in tensors):
        n = M * S
        if tensors[0].shape[0] != n:
            tensors = [t[:n] for t in tensors]
        if tokens_last:
            return torch.stack([t.view(M, S, -1).transpose(-1, -2) for t in tensors])
        return torch.stack(tensors).view(len(group), M, S, -1)
    if first.raw:  # [B, S, X]
        tensors = [t.reshape(ctx.num_rows, S, -1)[:M] for t in tensors]
    return torch.stack([t.transpose(-1, -2) for t in tensors] if tokens_last else tensors)


def _token_weights(ctx: BatchContext, seq_len: Optional[int]) -> tuple:
    """(weights that average over each slot's tokens, slot_MS, valid_MS, tokens_MD, packed), cached per
    layout: [M, S] (1 / the row's real tokens, or 0) when each row is one slot, else [M, S, D]."""
    key = ("weights", seq_len)
    cached = ctx.extra.get(key)
    if cached is None:
        if seq_len is None:
            w_MSD, tokens_MD, slot_MS, valid_MS = ctx.weights_MSD, ctx.tokens_MD, ctx.slot_MS, ctx.valid_MS
        else:
            w_MSD, tokens_MD, slot_MS, valid_MS = routed_positions(ctx, seq_len)
        packed = bool(w_MSD.shape[2] > 1 and ctx.packed)
        inv_MD = 1.0 / tokens_MD.clamp_min(1.0)
        avg = w_MSD * inv_MD[:, None, :] if packed else valid_MS * inv_MD[:, :1]
        cached = ctx.extra[key] = (avg, slot_MS, valid_MS, tokens_MD, packed)
    return cached


def summarize(x: torch.Tensor, idx_GMSK: Optional[torch.Tensor], avg: torch.Tensor, weight_GMX: torch.Tensor,
              base: Optional[torch.Tensor], weights_GEH: Optional[torch.Tensor], out: Optional[tuple], *, dim: int,
              distribution: str, detect_probs: bool, packed: bool, top_k: int,
              num_slots: int, zloss: bool = True) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """The batched reduction's math on device tensors (the function torch.compile compiles, see
    compiled.py): per layer and slot the token average of [p | sum p log p | z] (``mean_GXF``, F = E + 2;
    z = logsumexp(logits)², the router z-loss, -1 where undefined),
    the top-k counts (``counts``, float) and, given the layers' router weights, the adjacent cosines
    (``cos``, [G-1, X]; else None). ``x``: the logits [G, M, S, E] (``dim`` -2: [G, M, E, S]);
    ``idx_GMSK``: the routing decision (None: top-k of p); ``avg``: the token weights of
    ``_token_weights``; ``weight_GMX``: each choice's weight, 0 or 1; ``base``: packed rows' flat
    (layer, slot, expert 0) index. ``out``: the staging views (mean, entropy, counts, cosines or None)
    to write the results into (``write_summaries``; compiled, the writes fuse into the kernels), then
    nothing is returned; None: they are returned."""
    G, M = x.shape[0], x.shape[1]
    E = x.shape[dim]
    N = num_slots
    tokens_last = dim == -2
    p, log_p = routing_distribution(x, distribution, detect_probs, dim=dim)
    # [p | p log p | z] (F = E + 2), averaged over each slot's tokens in one product and sum.
    z = router_zloss(x, log_p, distribution if zloss else "off", detect_probs, dim)  # "off": -1, left out
    feats = torch.cat([p, (p * log_p).sum(dim=dim, keepdim=True), z], dim=dim)
    # Per slot: X = N slots when packed rows split into documents, else M rows (one slot each).
    if packed:  # one matmul over the tokens of each slot
        if tokens_last:
            mean_GXF = torch.matmul(feats, avg).transpose(-1, -2).reshape(G, N, E + 2)  # [G,M,F,S] @ [M,S,D]
        else:
            mean_GXF = torch.matmul(avg.transpose(-1, -2), feats).reshape(G, N, E + 2)  # [M,D,S] @ [G,M,S,F]
    elif tokens_last:
        mean_GXF = (feats * avg[:, None, :]).sum(dim=-1)
    else:
        mean_GXF = (feats * avg[:, :, None]).sum(dim=-2)
    # Top-k counts: each token's weight (0 or 1) added at its slot and experts in one scatter (no host sync).
    if idx_GMSK is None:  # no decision exposed: the top-k of the distribution itself
        idx_GMSK = p.topk(top_k, dim=dim).indices
        idx_GMSK = idx_GMSK.transpose(-1, -2) if tokens_last else idx_GMSK
    if packed:  # a row's tokens fall in several slots
        counts = torch.zeros(G * N * E, dtype=torch.float32, device=p.device)
        counts = counts.index_add_(0, (base + idx_GMSK).reshape(-1), weight_GMX.reshape(-1)).view(G, N, E)
    else:  # one slot per row: scatter along the experts
        counts = torch.zeros(G, M, E, dtype=torch.float32, device=p.device)
        counts = counts.scatter_add_(2, idx_GMSK.reshape(G, M, -1), weight_GMX)
    cos = None if weights_GEH is None else cosine_rows(mean_GXF[..., :E], weights_GEH,
                                                       out=None if out is None else out[4])
    if out is None:
        return mean_GXF, counts, cos
    write_summaries(out, mean_GXF, counts, cos)
    return None


def write_summaries(out: tuple, mean_GXF: torch.Tensor, counts: torch.Tensor, cos: Optional[torch.Tensor]) -> None:
    """Into the staging views ``out`` = (mean, entropy, counts, z-loss, cosines or None): the means, the
    mean entropy / log E, the counts (float to int32), the mean z-loss and the cosines."""
    mean, ent, cnt, zloss, cos_out = out
    E = mean_GXF.shape[-1] - 2
    mean.copy_(mean_GXF[..., :E])
    zloss.copy_(mean_GXF[..., E + 1])
    if _is_compiling():  # the compiler takes no out= into a strided view; op by op, out= saves a copy
        ent.copy_(mean_GXF[..., E] * (-1.0 / math.log(E)))
    else:
        torch.mul(mean_GXF[..., E], -1.0 / math.log(E), out=ent)
    cnt.copy_(counts)
    if cos is not None and cos is not cos_out:  # op by op, cosine_rows summed into cos_out itself
        cos_out.copy_(cos)


def _reduce_batch(ctx: BatchContext, group: list[Gathered], top_k: int, views: dict, dim: int,
                  summarize_fn: Callable, weights_GEH: Optional[torch.Tensor], zloss: bool = True) -> None:
    first = group[0]
    E = first.logits_MSE.shape[-1]
    G = len(group)
    avg, slot_MS, valid_MS, tokens_MD, packed = _token_weights(ctx, first.seq_len)
    M, S = slot_MS.shape
    D = tokens_MD.shape[1]
    N = M * D
    x = _stacked(ctx, group, "logits_MSE", tokens_last=dim == -2)
    idx_GMSK = _stacked(ctx, group, "idx_MSK") if first.idx_MSK is not None else None
    K = top_k if idx_GMSK is None else idx_GMSK.shape[-1]
    cached = ctx.extra.get(("counts", G, S, E, K))
    if cached is None:  # each token's weight per choice; packed: the flat (layer, slot, expert 0) index too
        weight_GMX = valid_MS[None, :, :, None].expand(G, M, S, K).reshape(G, M, S * K)
        base = None
        if packed:
            offsets_G = torch.arange(G, device=slot_MS.device) * N
            base = ((offsets_G[:, None, None] + slot_MS) * E)[..., None]
        cached = ctx.extra[("counts", G, S, E, K)] = (base, weight_GMX)
    base, weight_GMX = cached
    # Writes: slices of the staging views when the layers are consecutive (a transformers model).
    layers = [g.layer for g in group]
    lo = layers[0]
    kwargs = dict(dim=dim, distribution=first.distribution, detect_probs=first.detect_probs, packed=packed,
                  top_k=top_k, num_slots=N, zloss=zloss)
    if layers == list(range(lo, lo + G)):  # written by summarize (compiled: inside its kernels)
        cos_out = None if weights_GEH is None else ctx.staging.targets(slice(lo + 1, lo + G), D, packed,
                                                                       ("cosine_LN",))[0]
        out = ctx.staging.targets(slice(lo, lo + G), D, packed) + (cos_out,)
        summarize_fn(x, idx_GMSK, avg, weight_GMX, base, weights_GEH, out, **kwargs)
    else:
        mean_GXF, counts, _ = summarize_fn(x, idx_GMSK, avg, weight_GMX, base, None, None, **kwargs)
        for i, layer in enumerate(layers):
            write_summaries(ctx.staging.targets(layer, D, packed) + (None,), mean_GXF[i], counts[i], None)
    if 0 in layers:
        views["tokens_N"].copy_(tokens_MD.reshape(N))


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a DTensor (sharded: gathering it would be a collective)


def usable_weight(w: Optional[torch.Tensor]) -> bool:
    """A router weight the cosines can use now: a plain 2-d tensor whose memory is there."""
    return type(w) in _PLAIN and w.dim() == 2 and w.untyped_storage().nbytes() > 0


def freed_weight(w: Optional[torch.Tensor]) -> bool:
    """A plain tensor whose memory is gone: FSDP resharded the unsharded copy after the layer ran, or
    ZeRO-3 emptied the parameter in place."""
    return type(w) in _PLAIN and w.untyped_storage().nbytes() == 0


def cosine_rows(means_LXE: torch.Tensor, weights_LEH: torch.Tensor,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """METRICS.md §2 for consecutive layers: row l of the result is cos(emb(l), emb(l+1)) per slot,
    emb = mean p @ router weight. Op by op, ``out`` (if given) receives the sum itself (one copy
    less); compiled, the caller copies (the compiler takes no out= into a strided view)."""
    emb_LXH = torch.bmm(means_LXE, weights_LEH.float())
    emb_LXH = emb_LXH / torch.linalg.vector_norm(emb_LXH, dim=-1, keepdim=True).clamp_min(1e-12)
    if out is not None and not _is_compiling():
        return torch.sum(emb_LXH[:-1] * emb_LXH[1:], dim=-1, out=out)
    return (emb_LXH[:-1] * emb_LXH[1:]).sum(dim=-1)


def _cosines(ctx: BatchContext, views: dict) -> bool:
    """The cosines when the layers were reduced in several batches (else ``summarize`` computed them):
    cos(emb(l-1), emb(l)) into row l of cosine_LN, from the means in staging, in one batched call.
    Needs every layer's router weight, all of one shape (else False: none; routing embeddings of
    different widths, from record() of unlike routers, have no cosine)."""
    gathered = sorted(ctx.pending, key=lambda g: g.layer)
    weights_LEH = _cosine_weights(gathered)  # None unless consecutive, usable and of one shape
    if weights_LEH is None:
        return False
    lo, hi = gathered[0].layer, gathered[-1].layer + 1
    cosine_rows(views["mean_LNE"][lo:hi], weights_LEH, out=views["cosine_LN"][lo + 1:hi])
    return True
