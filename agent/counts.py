"""All-token expert counts (METRICS.md §3, "all tokens"): per MoE layer, the tokens routed to each expert
over *every* routed token of every training forward — not only the sampled rows — accumulated on the
routers' device with no host sync and shipped with the next training message (``Routing.expert_tokens_LE``).

These are the counts a training framework keeps itself (Megatron-Core's ``routing_map.sum(dim=0)`` into
``local_tokens_per_expert``, OLMo-core's batch size per expert): every top-k pick of every token, padding
included where the router routes it, micro-batches of one step added up. An activation-checkpoint
recompute in backward is not a forward of the model (the model's forward hook has run): not counted twice.

Cost on the training thread: the router hooks stay armed on every training forward (with counting off they
are armed only on summarized ones), and each router's indices go into one ``index_add_`` (two small ops
before it map a pick outside 0..E-1 — a dropped token's -1 or E — to a column of its own, never an
out-of-range write on the device). docs/benchmarks.md "All-token counts" has the paired figures.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger("grokwatch.agent")


class ExpertCounts:
    """``begin``/``end`` bracket a training forward (the model's pre- and post-hook); ``add(layer, ids)``
    from a router's hook inside one; ``drain_into(view)`` at a summarized training forward copies the
    counts into the staging buffer (device to device) and starts the next interval."""

    def __init__(self, num_layers: int, num_experts: int, enabled: bool = True):
        self.shape = (num_layers, num_experts)
        self.enabled = enabled
        self.active = False  # inside a training forward
        self.forwards = 0  # training forwards begun since the last drain
        self._tokens_LE: Optional[torch.Tensor] = None  # int64 [L, E + 1]; column E: picks of no expert
        self._ones: Optional[torch.Tensor] = None
        self._logged_off = False

    def turn_off(self, why: str) -> None:
        """Counts that would be partial are not shipped at all (under torch.compile, unsampled forwards run
        compiled code without the hooks)."""
        if self.enabled:
            self.enabled = False
            self.active = False
            self._tokens_LE = None
            log.info("grokwatch: all-token expert counts are off: %s", why)

    def begin(self) -> None:
        if self.enabled:
            self.active = True
            self.forwards += 1

    def end(self) -> None:
        self.active = False

    def add(self, layer: int, ids: torch.Tensor) -> None:
        """The top-k expert ids of every token the router ``layer`` routed in this forward (any shape)."""
        flat = ids.reshape(-1)
        acc = self._tokens_LE
        if acc is None or acc.device != flat.device:
            L, E = self.shape
            acc = self._tokens_LE = torch.zeros(L, E + 1, dtype=torch.int64, device=flat.device)
        ones = self._ones
        n = flat.shape[0]
        if ones is None or ones.shape[0] < n or ones.device != flat.device:
            ones = self._ones = torch.ones(max(n, 1024), dtype=torch.int64, device=flat.device)
        E = self.shape[1]
        # -1 and anything from E up go to column E (clamp, then -1 -> E): no device-side index error
        acc[layer].index_add_(0, flat.clamp(-1, E).remainder_(E + 1), ones[:n])

    def reorder(self, called: list[int]) -> None:
        """The routers' places changed (Capture.learn_order): the row a router counted into at place
        ``called[p]`` is now place ``p``'s."""
        if self._tokens_LE is not None:
            self._tokens_LE = self._tokens_LE[torch.tensor(called, device=self._tokens_LE.device)]

    @property
    def pending(self) -> bool:
        return self.enabled and self.forwards > 0

    def drain_into(self, view_LE1: torch.Tensor) -> int:
        """Copy the interval's counts into ``view_LE1`` (int64 [L, E + 1], on the staging device; zeros when
        no router was called) and start the next interval; returns the forwards counted (0: nothing to
        ship). On the training thread, no host sync (a device copy and a fill)."""
        forwards, self.forwards = self.forwards, 0
        acc = self._tokens_LE
        if acc is None:
            view_LE1.zero_()
        else:
            view_LE1.copy_(acc, non_blocking=True)
            acc.zero_()
        return forwards if self.enabled else 0
