"""What a router hook keeps of one MoE layer's output inside the forward: references to the
router's tensors when the sampled rows are the batch's first M, else their sampled rows gathered
now (so that only M rows of each layer stay alive until the batched reduction, reduce.py).
Also which router weights the cosines can use.

Shapes: docs/shapes.md (T = B·S tokens, E experts, K top-k, H hidden size, M sampled rows).
"""

from __future__ import annotations

from typing import Optional

import torch

from grokwatch.agent.layout import BatchContext, Gathered

is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)


def gather_layer(ctx: BatchContext, layer: int, logits_TE: torch.Tensor, topk_idx_TK: Optional[torch.Tensor],
                 weight_EH: Optional[torch.Tensor], distribution: str, seq_len: Optional[int] = None,
                 detect_probs: bool = False) -> None:
    """The per-layer part, called from inside the forward. When the sampled rows
    are 0..M-1 it only keeps references (sliced, only if rows are left out, and
    stacked by the reduction: a few calls whatever the depth); else it
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


_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not a DTensor (sharded: gathering it would be a collective)


def usable_weight(w: Optional[torch.Tensor]) -> bool:
    """A router weight the cosines can use now: a plain 2-d tensor whose memory is there."""
    return type(w) in _PLAIN and w is not None and w.dim() == 2 and w.untyped_storage().nbytes() > 0


def freed_weight(w: Optional[torch.Tensor]) -> bool:
    """A plain tensor whose memory is gone: FSDP resharded the unsharded copy after the layer ran, or
    ZeRO-3 emptied the parameter in place."""
    return type(w) in _PLAIN and w is not None and w.untyped_storage().nbytes() == 0
