"""Where summaries wait between the device and the sender thread.

One flat device buffer, which the reduction (reduce.py) writes through named views, and a small pool
of pinned host buffers it is copied into, one per message in flight: the training thread takes a
free one (``take``), copies into it with ``non_blocking=True``; the sender thread reads it once the
copy's CUDA event has completed and gives it back (``give_back``). No pool entry free: the
forward's summaries are dropped and counted (``staging_busy``), never waited for.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def indices_on(values: list[int], device: torch.device) -> torch.Tensor:
    """Host integers as an int64 tensor on ``device`` without a host sync: on CUDA through pinned memory,
    copied non-blocking (a copy from pageable memory would block the host)."""
    out = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return out.pin_memory().to(device, non_blocking=True)
    return out.to(device)


class Staging:
    """One flat device buffer with named views, and a small pool of pinned host
    buffers of the same size (one per in-flight message).

    Storage is sample-major, the wire's order ([N, L, E]): the sender makes a
    message with one row selection per array. The reduction writes through
    layer-major views of it (``views``: [L, N, E]). Counts and token counts are
    int32, the rest float32; the buffers are int32, so that copying them moves
    bits (a float copy of small integers' bit patterns, denormals, could flush)."""

    FIELDS = {  # name: (storage shape from (L, N, E), dtype)
        # int64 counts stored as int32 pairs (first: 8-byte aligned); column E counts picks of no expert
        "expert_tokens_LE": (lambda L, N, E, G: (L, 2 * (E + 1)), torch.int32),
        # the same split by row group (agent/counts.py), int64 as int32 pairs too (even-sized: still aligned)
        "group_tokens_GLE": (lambda L, N, E, G: (G, L, 2 * (E + 1)), torch.int32),
        "mean_probs_NLE": (lambda L, N, E, G: (N, L, E), torch.float32),
        "topk_counts_NLE": (lambda L, N, E, G: (N, L, E), torch.int32),
        "entropy_NL": (lambda L, N, E, G: (N, L), torch.float32),
        "zloss_NL": (lambda L, N, E, G: (N, L), torch.float32),  # mean logsumexp(logits)² per slot; < 0: undefined
        "adj_cosine_NL": (lambda L, N, E, G: (N, L), torch.float32),  # column l: cos(layer l-1, layer l); column 0 unused
        "tokens_N": (lambda L, N, E, G: (N,), torch.int32),
        "loss_N": (lambda L, N, E, G: (N,), torch.float32),
        "aux_loss": (lambda L, N, E, G: (1,), torch.float32),  # the model's aux loss summed over the interval
        "balance_bias_LE": (lambda L, N, E, G: (L, E), torch.float32),  # the routers' balancing biases, if any
    }

    def __init__(self, *, num_layers: int, slots: int, num_experts: int, device: torch.device, pool_size: int = 4,
                 count_groups: int = 0):
        self.shapes = {name: shape(num_layers, slots, num_experts, count_groups)
                       for name, (shape, _) in self.FIELDS.items()}
        self.offsets = {}
        total = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = (total, math.prod(shape))
            total += math.prod(shape)
        self.size = total
        self.device = device
        self.device_buf = torch.zeros(total, dtype=torch.int32, device=device)
        stored = self.split(self.device_buf)
        self.views = {  # what the reduction writes: layer-major views of the same memory
            "mean_probs_LNE": stored["mean_probs_NLE"].transpose(0, 1),
            "topk_counts_LNE": stored["topk_counts_NLE"].transpose(0, 1),
            "entropy_LN": stored["entropy_NL"].t(),
            "zloss_LN": stored["zloss_NL"].t(),
            "adj_cosine_LN": stored["adj_cosine_NL"].t(),  # row l: cos(layer l-1, layer l)
            "tokens_N": stored["tokens_N"],
            "loss_N": stored["loss_N"],
            "expert_tokens_LE": stored["expert_tokens_LE"].view(torch.int64),  # [L, E + 1] (agent/counts.py)
            "aux_loss": stored["aux_loss"],
            "balance_bias_LE": stored["balance_bias_LE"],
            "group_tokens_GLE": stored["group_tokens_GLE"].view(torch.int64),  # [G, L, E + 1]
        }
        pin = device.type == "cuda"
        self.pool = [torch.zeros(total, dtype=torch.int32, pin_memory=pin) for _ in range(pool_size)]
        self.free = list(range(pool_size))
        self.cached_views: dict[tuple, tuple] = {}  # slices of ``views`` the reduction writes, made once

    def targets(self, layers, docs_per_row: int, packed: bool,
                names: tuple = ("mean_probs_LNE", "entropy_LN", "topk_counts_LNE", "zloss_LN")) -> tuple:
        """Views of ``names`` for ``layers`` (a slice or one index), made once: every slot when packed
        rows split into documents, else each row's slot m*D (the other D-1 keep zero tokens, never read)."""
        key = ((layers.start, layers.stop) if isinstance(layers, slice) else layers, docs_per_row, packed, names)
        cached = self.cached_views.get(key)
        if cached is None:
            D = 1 if packed else docs_per_row  # the slot dimension is N, followed by E in *_LNE
            cached = self.cached_views[key] = tuple(
                self.views[name][layers][..., ::D, :] if name.endswith("E") else self.views[name][layers][..., ::D]
                for name in names)
        return cached

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The fields of one buffer in storage order, each in its own dtype (views, no copy)."""
        return {name: flat[o:o + n].view(self.FIELDS[name][1]).view(self.shapes[name])
                for name, (o, n) in self.offsets.items()}

    def take(self) -> Optional[int]:
        return self.free.pop() if self.free else None  # list.pop is atomic under the GIL

    def give_back(self, index: int) -> None:
        self.free.append(index)
