"""The batched reduction of a summarized forward's router outputs — runs on the training thread.

Two stages, so that the cost per MoE layer is at most two gathers and not a
dozen kernel launches: a router hook only keeps the router's outputs, or
gathers their sampled rows (gather.py); at the end of the forward one
batched reduction over all layers (``reduce_all``; its math and writes are
``summarize``, which compiled.py compiles on CUDA) writes one preallocated
flat buffer (``Staging.device_buf``). That buffer is copied to pinned host
memory once per forward with ``non_blocking=True``, after which a CUDA event
is recorded. Nothing here synchronizes the device with the host: the sender
thread waits on the event, never the training thread.

Shapes: docs/shapes.md (here L is the layers of one batch, X the per-slot axis: N slots when
packed rows split into documents, else M rows, and F = E + 2 features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from grokwatch.agent.gather import is_compiling, usable_weight
from grokwatch.agent.layout import BatchContext, Gathered, token_weights

_LOG_FLOOR = 1e-30
_LOG_FLOOR_LOG = math.log(_LOG_FLOOR)


@dataclass(frozen=True)
class Strategy:
    """How the batched reduction lays out and cuts its work (``attach(reduction_layout=...,
    reduction_layers_per_batch=...)``); the defaults are the device's best. The results are the same
    whichever is chosen (the capture tests run each against the reference)."""

    experts_dim: Optional[int] = None  # -1: [L, M, S, E]; -2: [L, M, E, S]; None: the device's (expert_dim)
    layers_per_batch: Optional[int] = None  # None: as many as the transient memory budget allows

    def dim_on(self, device: torch.device, compiled: bool) -> int:
        if compiled:
            return -1  # what compiled.py compiles
        return expert_dim(device) if self.experts_dim is None else self.experts_dim


@dataclass(frozen=True)
class Reduced:
    with_cosines: bool  # the cosines need every layer's usable router weight
    batches: tuple[int, ...]  # layers per batch, in the order reduced


def routing_distribution(logits: torch.Tensor, distribution: str, detect_probs: bool = False, dim: int = -1):
    """METRICS.md Notation p(t) over the expert dimension ``dim``, and log p(t)
    for the entropy, floored so that an expert with p = 0 (masked out, or
    underflow) adds p log p = 0 and never NaN: softmax of the logits, or
    sigmoid scores over their sum, or (``probs``) a distribution given as is.
    transformers 5.0-5.5 routers return probabilities in the logits slot; with
    ``detect_probs`` an input already on the simplex is used as is — decided
    on the device (torch.where: no host sync, never a second softmax; per
    layer when the input stacks layers [L, ...])."""
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
    """Whether the input already is a distribution (per layer when it stacks layers [L, ...]), on the device."""
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


def expert_dim(device: torch.device) -> int:
    """Where the experts go in the batched reduction. CPU: [L, M, E, S] —
    torch 2.13's CPU (log_)softmax over a short last dim is ~6x slower than
    over the middle one, and the sums over tokens then run along contiguous
    memory. CUDA: [L, M, S, E], as the router wrote it."""
    return -2 if device.type == "cpu" else -1


# The batched reduction's transient memory, in float32 copies of its [L, M, S, E] logits (stack
# included), measured on CPU (peak RSS, docs/benchmarks.md "Reduction memory"): op by op the
# distribution, its log, p log p and the features live at once; compiled, the kernels fuse them.
TRANSIENT_COPIES_OP_BY_OP = 5
TRANSIENT_COPIES_COMPILED = 2


@torch.inference_mode()
def reduce_all(ctx: BatchContext, top_k: int, strategy: Strategy = Strategy(),
               summarize_fn: Optional[Callable] = None, max_bytes: Optional[float] = None,
               zloss: bool = True) -> Reduced:
    """Per sampled slot and layer: mean routing distribution, top-k counts,
    mean entropy ratio; then the cosine between adjacent layers' routing
    embeddings. Layers of the same shape are reduced in one batch (in a
    transformers model: all of them, cosines included). ``strategy``: the
    experts' dimension and the most layers per batch. ``summarize_fn``:
    ``summarize`` compiled (compiled.py; experts last whatever the device),
    else ``summarize`` runs op by op. ``max_bytes``: the most transient memory
    one batch may take (estimated, see TRANSIENT_COPIES_*); more layers are
    reduced in several batches. It runs at the end of the forward, when the
    saved activations are at their peak. It runs from the model's forward
    hook, hence inside the user's autocast region if there is one (HF
    Trainer's bf16=True): autocast is switched off here, so that the token
    means and cosines are float32 matmuls."""
    device_type = ctx.staging.device.type
    if _autocast_enabled(device_type):  # inside the user's autocast: matmuls would run in bf16/fp16
        with torch.autocast(device_type, enabled=False):
            return _reduce_all(ctx, top_k, strategy, summarize_fn, max_bytes, zloss)
    return _reduce_all(ctx, top_k, strategy, summarize_fn, max_bytes, zloss)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast (meta): nothing to switch off
        return False


def _reduce_all(ctx: BatchContext, top_k: int, strategy: Strategy, summarize_fn: Optional[Callable],
                max_bytes: Optional[float], zloss: bool) -> Reduced:
    views = ctx.staging.views
    dim = strategy.dim_on(ctx.staging.device, compiled=summarize_fn is not None)
    alike: dict[tuple, list[Gathered]] = {}
    for g in ctx.pending:
        key = (g.raw, g.seq_len, tuple(g.logits_MSE.shape), g.logits_MSE.dtype, g.distribution, g.detect_probs,
               None if g.idx_MSK is None else tuple(g.idx_MSK.shape))
        alike.setdefault(key, []).append(g)
    copies = TRANSIENT_COPIES_OP_BY_OP if summarize_fn is None else TRANSIENT_COPIES_COMPILED
    batches = [chunk for group in alike.values()
               for chunk in _within(ctx, group, max_bytes, copies, strategy.layers_per_batch)]
    weights_LEH = _cosine_weights(batches[0]) if len(batches) == 1 else None
    for batch in batches:
        _reduce_batch(ctx, batch, top_k, views, dim, summarize_fn or summarize, weights_LEH, zloss)
    with_cosines = weights_LEH is not None or _cosines(ctx, views)
    ctx.pending = []
    return Reduced(with_cosines, tuple(len(batch) for batch in batches))


def _within(ctx: BatchContext, group: list[Gathered], max_bytes: Optional[float], copies: int,
            most: Optional[int]) -> list[list[Gathered]]:
    """``group`` in runs of as many layers as ``max_bytes`` of transient memory allows (at least one),
    and at most ``most``."""
    n = len(group)
    if max_bytes is not None:
        first = group[0]
        S = ctx.seq_len if first.seq_len is None else first.seq_len
        per_layer = copies * 4 * ctx.rows_M.shape[0] * S * first.logits_MSE.shape[-1]
        n = max(1, int(max_bytes // per_layer))
    if most is not None:
        n = min(n, most)
    return [group[i:i + n] for i in range(0, len(group), n)]


def _cosine_weights(group: list[Gathered]) -> Optional[torch.Tensor]:
    """The router weights [L, E, H] stacked, when the layers (in order) are consecutive and every weight is
    usable and of one shape: then one batched call computes the cosines (in a single group's summary, or
    in ``_cosines``). Else None."""
    weights = [w for w in (g.weight_EH for g in group) if w is not None and usable_weight(w)]
    layers = [g.layer for g in group]
    if (len(group) < 2 or layers != list(range(layers[0], layers[0] + len(layers)))
            or len(weights) != len(group) or len({tuple(w.shape) for w in weights}) != 1):
        return None
    return torch.stack(weights)  # inference_mode: no autograd record, no detach needed


def _stacked(ctx: BatchContext, group: list[Gathered], attr: str, tokens_last: bool = False) -> torch.Tensor:
    """The group's ``attr`` tensors (logits or indices), sampled rows only, stacked:
    [L, M, S, X] (``tokens_last``: [L, M, X, S]). Raw router outputs [B*S, X]
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


def summarize(x: torch.Tensor, idx_LMSK: Optional[torch.Tensor], avg: torch.Tensor, weight_LMX: torch.Tensor,
              base: Optional[torch.Tensor], weights_LEH: Optional[torch.Tensor], out: Optional[tuple], *, dim: int,
              distribution: str, detect_probs: bool, packed: bool, top_k: int,
              num_slots: int, zloss: bool = True) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """The batched reduction's math on device tensors (the function torch.compile compiles, see
    compiled.py): per layer and slot the token average of [p | sum p log p | z] (``mean_LXF``, F = E + 2;
    z = logsumexp(logits)², the router z-loss, -1 where undefined),
    the top-k counts (``counts``, float) and, given the layers' router weights, the adjacent cosines
    (``cos``, [L-1, X]; else None). ``x``: the logits [L, M, S, E] (``dim`` -2: [L, M, E, S]);
    ``idx_LMSK``: the routing decision (None: top-k of p); ``avg``: the token weights of
    ``layout.token_weights``; ``weight_LMX``: each choice's weight, 0 or 1; ``base``: packed rows' flat
    (layer, slot, expert 0) index. ``out``: the staging views (mean, entropy, counts, cosines or None)
    to write the results into (``write_summaries``; compiled, the writes fuse into the kernels), then
    nothing is returned; None: they are returned."""
    L, M = x.shape[0], x.shape[1]
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
            mean_LXF = torch.matmul(feats, avg).transpose(-1, -2).reshape(L, N, E + 2)  # [L,M,F,S] @ [M,S,D]
        else:
            mean_LXF = torch.matmul(avg.transpose(-1, -2), feats).reshape(L, N, E + 2)  # [M,D,S] @ [L,M,S,F]
    elif tokens_last:
        mean_LXF = (feats * avg[:, None, :]).sum(dim=-1)
    else:
        mean_LXF = (feats * avg[:, :, None]).sum(dim=-2)
    if distribution == "probs":
        mean_LXF = _over_routed_tokens(mean_LXF, E)
    # Top-k counts: each token's weight (0 or 1) added at its slot and experts in one scatter (no host sync).
    if idx_LMSK is None:  # no decision exposed: the top-k of the distribution itself
        idx_LMSK = p.topk(top_k, dim=dim).indices
        idx_LMSK = idx_LMSK.transpose(-1, -2) if tokens_last else idx_LMSK
    if packed:  # a row's tokens fall in several slots
        assert base is not None
        counts = torch.zeros(L * N * E, dtype=torch.float32, device=p.device)
        counts = counts.index_add_(0, (base + idx_LMSK).reshape(-1), weight_LMX.reshape(-1)).view(L, N, E)
    else:  # one slot per row: scatter along the experts
        counts = torch.zeros(L, M, E, dtype=torch.float32, device=p.device)
        counts = counts.scatter_add_(2, idx_LMSK.reshape(L, M, -1), weight_LMX)
    cos = None if weights_LEH is None else cosine_rows(mean_LXF[..., :E], weights_LEH,
                                                       out=None if out is None else out[4])
    if out is None:
        return mean_LXF, counts, cos
    write_summaries(out, mean_LXF, counts, cos)
    return None


def _over_routed_tokens(mean_LXF: torch.Tensor, E: int) -> torch.Tensor:
    """A given distribution (record(probs=) or record(topk=(ids, weights))) may be all zero for a token the
    framework dropped after the choice (Megatron-Core's capacity factor zeroes a dropped token's probs): such
    a token has no distribution. The means are then over the slot's routed tokens — the token average
    divided by the share of its tokens that had one (the mean of p's sums: 1 for a routed token, 0 for a
    dropped one); a slot none of whose tokens was routed in a layer gets the uniform distribution (entropy
    ratio 1) — never a row off the simplex, which the collector would refuse with the whole message."""
    routed = mean_LXF[..., :E].sum(dim=-1, keepdim=True)
    uniform = torch.cat([torch.full_like(mean_LXF[..., :E], 1.0 / E), torch.full_like(routed, -math.log(E)),
                         torch.full_like(routed, -1.0)], dim=-1)
    return torch.where(routed > 1e-6, mean_LXF / routed.clamp_min(1e-6), uniform)


def write_summaries(out: tuple, mean_LXF: torch.Tensor, counts: torch.Tensor, cos: Optional[torch.Tensor]) -> None:
    """Into the staging views ``out`` = (mean, entropy, counts, z-loss, cosines or None): the means, the
    mean entropy / log E, the counts (float to int32), the mean z-loss and the cosines."""
    mean, ent, cnt, zloss, cos_out = out
    E = mean_LXF.shape[-1] - 2
    mean.copy_(mean_LXF[..., :E])
    zloss.copy_(mean_LXF[..., E + 1])
    if is_compiling():  # the compiler takes no out= into a strided view; op by op, out= saves a copy
        ent.copy_(mean_LXF[..., E] * (-1.0 / math.log(E)))
    else:
        torch.mul(mean_LXF[..., E], -1.0 / math.log(E), out=ent)
    cnt.copy_(counts)
    if cos is not None and cos is not cos_out:  # op by op, cosine_rows summed into cos_out itself
        cos_out.copy_(cos)


def _reduce_batch(ctx: BatchContext, group: list[Gathered], top_k: int, views: dict, dim: int,
                  summarize_fn: Callable, weights_LEH: Optional[torch.Tensor], zloss: bool = True) -> None:
    first = group[0]
    E = first.logits_MSE.shape[-1]
    L = len(group)
    avg, slot_MS, valid_MS, tokens_MD, packed = token_weights(ctx, first.seq_len)
    M, S = slot_MS.shape
    D = tokens_MD.shape[1]
    N = M * D
    x = _stacked(ctx, group, "logits_MSE", tokens_last=dim == -2)
    idx_LMSK = _stacked(ctx, group, "idx_MSK") if first.idx_MSK is not None else None
    K = top_k if idx_LMSK is None else idx_LMSK.shape[-1]
    cached = ctx.derived.counts.get((L, S, E, K))
    if cached is None:  # each token's weight per choice; packed: the flat (layer, slot, expert 0) index too
        weight_LMX = valid_MS[None, :, :, None].expand(L, M, S, K).reshape(L, M, S * K)
        base = None
        if packed:
            offsets_L = torch.arange(L, device=slot_MS.device) * N
            base = ((offsets_L[:, None, None] + slot_MS) * E)[..., None]
        cached = ctx.derived.counts[(L, S, E, K)] = (base, weight_LMX)
    base, weight_LMX = cached
    # Writes: slices of the staging views when the layers are consecutive (a transformers model).
    layers = [g.layer for g in group]
    lo = layers[0]
    kwargs = dict(dim=dim, distribution=first.distribution, detect_probs=first.detect_probs, packed=packed,
                  top_k=top_k, num_slots=N, zloss=zloss)
    if layers == list(range(lo, lo + L)):  # written by summarize (compiled: inside its kernels)
        cos_out = None if weights_LEH is None else ctx.staging.targets(slice(lo + 1, lo + L), D, packed,
                                                                       ("adj_cosine_LN",))[0]
        out = ctx.staging.targets(slice(lo, lo + L), D, packed) + (cos_out,)
        summarize_fn(x, idx_LMSK, avg, weight_LMX, base, weights_LEH, out, **kwargs)
    else:
        mean_LXF, counts, _ = summarize_fn(x, idx_LMSK, avg, weight_LMX, base, None, None, **kwargs)
        for i, layer in enumerate(layers):
            write_summaries(ctx.staging.targets(layer, D, packed) + (None,), mean_LXF[i], counts[i], None)
    if 0 in layers:
        views["tokens_N"].copy_(tokens_MD.reshape(N))


def cosine_rows(means_LXE: torch.Tensor, weights_LEH: torch.Tensor,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """METRICS.md §2 for consecutive layers: row l of the result is cos(emb(l), emb(l+1)) per slot,
    emb = mean p @ router weight. Op by op, ``out`` (if given) receives the sum itself (one copy
    less); compiled, the caller copies (the compiler takes no out= into a strided view)."""
    emb_LXH = torch.bmm(means_LXE, weights_LEH.float())
    emb_LXH = emb_LXH / torch.linalg.vector_norm(emb_LXH, dim=-1, keepdim=True).clamp_min(1e-12)
    if out is not None and not is_compiling():
        return torch.sum(emb_LXH[:-1] * emb_LXH[1:], dim=-1, out=out)
    return (emb_LXH[:-1] * emb_LXH[1:]).sum(dim=-1)


def _cosines(ctx: BatchContext, views: dict) -> bool:
    """The cosines when the layers were reduced in several batches (else ``summarize`` computed them):
    cos(emb(l-1), emb(l)) into row l of adj_cosine_LN, from the means in staging, in one batched call.
    Needs every layer's router weight, all of one shape (else False: none; routing embeddings of
    different widths, from record() of unlike routers, have no cosine)."""
    gathered = sorted(ctx.pending, key=lambda g: g.layer)
    weights_LEH = _cosine_weights(gathered)  # None unless consecutive, usable and of one shape
    if weights_LEH is None:
        return False
    lo, hi = gathered[0].layer, gathered[-1].layer + 1
    cosine_rows(views["mean_probs_LNE"][lo:hi], weights_LEH, out=views["adj_cosine_LN"][lo + 1:hi])
    return True
