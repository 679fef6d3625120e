"""A summarized forward's layout: which batch rows are sampled, and which of their tokens count
in which sample slot — built once per forward by the model's pre-hook, on the device, without a
host sync. The router hooks (gather.py) and the batched reduction (reduce.py) read it.

Shapes: docs/shapes.md (B batch rows, S sequence positions, M sampled rows, D documents per row,
N = M·D sample slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

from grokwatch.agent.staging import indices_on

if TYPE_CHECKING:
    from grokwatch.agent.counts import ExpertCounts
    from grokwatch.agent.staging import Staging


class SlotWeights(NamedTuple):
    """Token -> slot weights of one routed length: 0/1 per (row, position, document), the real tokens
    per slot, each token's slot m·D + d (0 with weight 0 where it has none) and whether it counts."""

    weights_MSD: torch.Tensor  # float32
    tokens_MD: torch.Tensor  # float32
    slot_MS: torch.Tensor  # long
    valid_MS: torch.Tensor  # float32


class TokenWeights(NamedTuple):
    """What averages a layer's token features per slot: ``avg`` is [M, S] (1 / the row's real tokens,
    or 0) when each row is one slot, else [M, S, D] (``packed``)."""

    avg: torch.Tensor
    slot_MS: torch.Tensor
    valid_MS: torch.Tensor
    tokens_MD: torch.Tensor
    packed: bool


@dataclass
class Derived:
    """Device tensors derived from a layout, made on the first forward that needs them and kept with
    the layout (the contexts of one cached layout share them)."""

    positions: dict[int, SlotWeights] = field(default_factory=dict)  # by routed length (routed_positions)
    weights: dict[Optional[int], TokenWeights] = field(default_factory=dict)  # by routed length (token_weights)
    # By (layers, S, E, K) of a batch: (packed rows' flat (layer, slot, expert 0) index, each choice's weight).
    counts: dict[tuple[int, int, int, int], tuple[Optional[torch.Tensor], torch.Tensor]] = \
        field(default_factory=dict)


class Layout(NamedTuple):
    rows_M: torch.Tensor  # long, device: sampled batch rows (padding slots repeat row 0)
    slots: SlotWeights
    derived: Derived


@dataclass
class Gathered:
    """One MoE layer's router output, awaiting reduce_all: the sampled rows
    [M, S, E] and [M, S, K], or (``raw``) the router's own tensors when the
    sampled rows are the first M, sliced when stacked (reduce.py ``_stacked``); made by gather.py."""

    layer: int
    logits_MSE: torch.Tensor  # the router's dtype
    idx_MSK: Optional[torch.Tensor]  # the routing decision; None: top-k of the distribution
    weight_EH: Optional[torch.Tensor]
    distribution: str
    detect_probs: bool
    seq_len: Optional[int]  # routed positions per row, when they differ from the input's
    raw: bool = False


@dataclass
class BatchContext:
    """What the top-level pre-hook learned about the batch of one forward."""

    source: str
    step: int
    num_rows: int  # B
    seq_len: int  # S
    rows_M: torch.Tensor  # long, device: sampled batch rows (padding slots repeat row 0)
    slots: SlotWeights  # the input's positions
    packed: bool  # documents split where position_ids restart (else each row is one slot, m*D)
    sample_ids: list[str]  # N host-side ids ("" for unused slots)
    groups: list[str]
    staging: "Staging"
    derived: Derived
    layers_done: int = 0
    pending: list[Gathered] = field(default_factory=list)  # per layer, reduced together by reduce_all
    deferred: bool = False  # the probe finalizes itself after adding losses
    rows_prefix: bool = False  # the sampled rows are 0..M-1: a slice (a view) replaces the gathers
    # Handed on by the capture with a finished training forward (Capture._finish), for the summaries: the
    # all-token counts to drain into this message (None: none due), the routers' balancing biases, and
    # whether armed hooks were bypassed (compiled code traced without them).
    counts: Optional["ExpertCounts"] = None
    biases: Optional[list] = None
    bypassed: bool = False


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


# Layouts of unmasked, unpacked batches kept per device (a training run has a few shapes).
MAX_CACHED_LAYOUTS = 32


def build_context(*, source: str, step: int, attention_mask_BS: Optional[torch.Tensor],
                  position_ids_BS: Optional[torch.Tensor], num_rows: int, seq_len: int, rows: list[int],
                  max_rows: int, docs_per_row: int, device: torch.device, sample_ids: list[str],
                  groups: list[str], staging: "Staging", cache: dict[tuple, Layout]) -> BatchContext:
    """Slots: M rows x D documents. Rows beyond ``rows`` are padding with zero
    weight; documents of a packed row are split where position_ids restart.
    ``attention_mask_BS``: [B, S], or what ``token_mask`` reduces to it. ``cache``: the layouts of
    unmasked, unpacked batches on this device, by rows and shape."""
    attention_mask_BS = token_mask(attention_mask_BS, seq_len)
    D = docs_per_row
    key = (tuple(rows), max_rows, seq_len, D)
    plain = attention_mask_BS is None and position_ids_BS is None
    cached = cache.get(key) if plain else None
    prefix = len(rows) == max_rows and list(rows) == list(range(max_rows))
    if cached is None:
        cached = _layout(attention_mask_BS, position_ids_BS, rows, max_rows, seq_len, D, device)
        if plain:
            if len(cache) >= MAX_CACHED_LAYOUTS:
                cache.clear()
            cache[key] = cached
    return BatchContext(source=source, step=step, num_rows=num_rows, seq_len=seq_len, rows_M=cached.rows_M,
                        slots=cached.slots, packed=D > 1 and position_ids_BS is not None,
                        sample_ids=sample_ids, groups=groups, staging=staging, derived=cached.derived,
                        rows_prefix=prefix)


def _layout(attention_mask_BS, position_ids_BS, rows, max_rows, seq_len, D, device) -> Layout:
    """Device tensors mapping the sampled rows' tokens to slots (no host sync)."""
    rows_M = indices_on(list(rows) + [0] * (max_rows - len(rows)), device)
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
    return Layout(rows_M, _slot_weights(onehot_MSD * mask_MS[..., None]), Derived())


def _slot_weights(weights_MSD: torch.Tensor) -> SlotWeights:
    """The 0/1 weights, with the real tokens per slot and as an index: token (m, s) counts in slot m·D + d."""
    M, _, D = weights_MSD.shape
    valid_MS = weights_MSD.sum(dim=-1)
    slot_MS = torch.arange(M, device=weights_MSD.device)[:, None] * D + weights_MSD.argmax(dim=-1)
    return SlotWeights(weights_MSD, weights_MSD.sum(dim=1), slot_MS, valid_MS)


def routed_positions(ctx: BatchContext, seq_len: int) -> SlotWeights:
    """Slot weights for a layer that routes ``seq_len`` positions per row other
    than the input's (e.g. only the last position): every routed position of a
    sampled row counts, all in the row's first slot."""
    cached = ctx.derived.positions.get(seq_len)
    if cached is None:
        tokens_MD = ctx.slots.tokens_MD
        valid_M = (tokens_MD.sum(dim=1) > 0).to(torch.float32)
        w_MSD = torch.zeros(valid_M.shape[0], seq_len, tokens_MD.shape[1], dtype=torch.float32,
                            device=valid_M.device)
        w_MSD[:, :, 0] = valid_M[:, None]
        cached = ctx.derived.positions[seq_len] = _slot_weights(w_MSD)
    return cached


def token_weights(ctx: BatchContext, seq_len: Optional[int]) -> TokenWeights:
    """The weights that average a layer's token features per slot, for its routed length (None: the input's)."""
    cached = ctx.derived.weights.get(seq_len)
    if cached is None:
        slots = ctx.slots if seq_len is None else routed_positions(ctx, seq_len)
        w_MSD, tokens_MD = slots.weights_MSD, slots.tokens_MD
        packed = bool(w_MSD.shape[2] > 1 and ctx.packed)
        inv_MD = 1.0 / tokens_MD.clamp_min(1.0)
        avg = w_MSD * inv_MD[:, None, :] if packed else slots.valid_MS * inv_MD[:, :1]
        cached = ctx.derived.weights[seq_len] = TokenWeights(avg, slots.slot_MS, slots.valid_MS, tokens_MD, packed)
    return cached
