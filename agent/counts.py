"""All-token expert counts (METRICS.md §3, "all tokens"): per MoE layer, the tokens routed to each expert
over *every* routed token of every training forward — not only the sampled rows — accumulated on the
routers' device with no host sync and shipped with the next training message (``Routing.expert_tokens_LE``).

These are the counts a training framework keeps itself (Megatron-Core's ``routing_map.sum(dim=0)`` into
``local_tokens_per_expert``, OLMo-core's batch size per expert): every top-k pick of every token, padding
included where the router routes it, micro-batches of one step added up. An activation-checkpoint
recompute in backward is not a forward of the model (the model's forward hook has run): not counted twice.

Cost on the training thread: the router hooks stay armed on every training forward (with counting off they
are armed only on summarized ones); a hook keeps a reference to its router's ids, and at the forward's end
every layer's go into the counts by one ``index_add_`` (with a stack and two small ops that map a pick outside
0..E-1 — a dropped token's -1 or E — to a column of its own, never an out-of-range write on the device). docs/benchmarks.md "All-token counts" has the paired figures.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional, Sequence

import torch

from grokwatch.agent.staging import indices_on

log = logging.getLogger("grokwatch.agent")

MAX_ROW_PATTERNS = 32  # rows -> group slots tensors kept per device (a run has a few batch patterns)


class Drained(NamedTuple):
    """What ``drain_into`` put into the staging buffer: the forwards its counts cover (0: none), those that
    gave an aux loss, those whose rows were tagged (their counts also split by group), and the groups'
    names in slot order."""

    forwards: int
    aux_forwards: int
    group_forwards: int
    group_names: tuple[str, ...]


class ExpertCounts:
    """``begin``/``end`` bracket a training forward (the model's pre- and post-hook); ``add(layer, ids)``
    from a router's hook inside one; ``drain_into(view)`` at a summarized training forward copies the
    counts into the staging buffer (device to device) and starts the next interval."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, enabled: bool = True, max_groups: int = 0):
        self.shape = (num_layers, num_experts)
        self.top_k = top_k
        self.enabled = enabled
        # Per row group (``tag_rows``): the first ``max_groups`` groups' names get a slot each, in order of
        # appearance; rows of later groups are counted in the totals only (logged once).
        self.max_groups = max_groups
        self.group_names: list[str] = []
        self._group_slot: dict[str, int] = {}
        self._row_slots: Optional[torch.Tensor] = None  # this forward's slot per row [B] (max_groups: none)
        self._row_cache: dict[tuple, torch.Tensor] = {}
        self._groups_GLE: Optional[torch.Tensor] = None  # int64 [max_groups + 1, L, E + 2]; last: untallied
        self.group_forwards = 0  # training forwards since the last drain whose rows were tagged
        self._logged_groups = False
        self.active = False  # inside a training forward
        self.forwards = 0  # training forwards begun since the last drain
        # int64 [L, E + 2]: column 1 + e expert e's picks; columns 0 and E + 1 picks of no expert (ids below 0,
        # and E or above: clamped to -1..E, shifted by one — no remainder, which costs int64 divisions)
        self._tokens_LE: Optional[torch.Tensor] = None
        self._ones: Optional[torch.Tensor] = None
        self._pending: list[tuple[int, torch.Tensor]] = []  # this forward's (layer, ids), until its end
        self._offsets: dict[tuple, torch.Tensor] = {}  # per layer order: each layer's row offset in the flat counts
        self._aux_sum: Optional[torch.Tensor] = None  # the model's aux loss summed over the interval (device)
        self.aux_forwards = 0  # forwards that gave one
        self._logged_off = False

    def turn_off(self, why: str) -> None:
        """Counts that would be partial are not shipped at all (under torch.compile, unsampled forwards run
        compiled code without the hooks)."""
        if self.enabled:
            self.enabled = False
            self.active = False
            self._tokens_LE = None
            self._pending = []
            log.info("grokwatch: all-token expert counts are off: %s", why)

    def begin(self) -> None:
        if self.enabled:
            self._flush()  # a forward that raised before its end
            self._row_slots = None
            self.active = True
            self.forwards += 1

    def end(self) -> None:
        self.active = False
        self._flush()
        self._row_slots = None

    def tag_rows(self, groups: Optional[Sequence[str]], num_rows: int, device: torch.device) -> None:
        """This forward's row groups (one per batch row, as ``tag`` gave them), to split its counts by group:
        each token counts for the group of its row. The routers see the batch's tokens row-major ([B, S] or
        [B·S]), as the sampled rows' gathers read them (gather.py). Rows of a group past ``max_groups`` go to
        the totals only."""
        if not self.active or self.max_groups <= 0 or groups is None or len(groups) != num_rows or num_rows < 1:
            return
        slots = []
        for group in groups:
            slot = self._group_slot.get(group)
            if slot is None:
                if len(self.group_names) < self.max_groups:
                    slot = self._group_slot[group] = len(self.group_names)
                    self.group_names.append(group)
                else:
                    slot = self.max_groups
                    if not self._logged_groups:
                        self._logged_groups = True
                        log.warning("grokwatch: more than %d row groups (expert_count_groups): the tokens of "
                                    "later ones, e.g. %r, are in the all-token totals only (logged once)",
                                    self.max_groups, group)
            slots.append(slot)
        key = (tuple(slots), device)
        row_slots = self._row_cache.get(key)
        if row_slots is None:
            row_slots = indices_on(slots, device)
            if len(self._row_cache) >= MAX_ROW_PATTERNS:
                self._row_cache.clear()
            self._row_cache[key] = row_slots
        self._row_slots = row_slots
        self.group_forwards += 1

    def add_aux_loss(self, aux: torch.Tensor) -> None:
        """The load-balancing loss the model computed in this forward (one device add, no sync)."""
        value = aux.detach().reshape(()).float()
        if self._aux_sum is None or self._aux_sum.device != value.device:
            self._aux_sum = torch.zeros((), dtype=torch.float32, device=value.device)
        self._aux_sum.add_(value)
        self.aux_forwards += 1

    def add(self, layer: int, ids: torch.Tensor, weights: Optional[torch.Tensor] = None) -> None:
        """The top-k expert ids of every token the router ``layer`` routed in this forward (any shape): kept
        until the forward's end, when every layer's go into the counts at once (``_flush``). ``weights`` (the
        picks' routing weights, ids' shape; record()'s topk): a pick of weight 0 was dropped after the choice
        (a capacity factor: Megatron-Core zeroes the dropped picks' probs) and counts for no expert."""
        if weights is not None:
            ids = torch.where(weights.reshape(ids.shape) != 0, ids, -1)
        self._pending.append((layer, ids))

    def add_top_k(self, layer: int, scores: torch.Tensor) -> None:
        """A router that gives no ids (or record() given only scores): the top-k of its scores over the experts'
        (last) dimension, as it selects them."""
        self.add(layer, scores.detach().topk(self.top_k, dim=-1).indices)

    def _flush(self) -> None:
        """One forward's ids into the counts: the layers stacked, each offset into its own row of the flat
        counts, by one ``index_add_`` (four ops a forward, not three a router call). Picks outside 0..E-1 (-1,
        or E and up: dropped tokens) go to a column of no expert (clamped to -1..E, shifted by one): never an
        out-of-range write. A forward with tagged rows adds its picks once more, offset by its row's group slot."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        L, E = self.shape
        device = pending[0][1].device
        acc = self._tokens_LE
        if acc is None or acc.device != device:
            acc = self._tokens_LE = torch.zeros(L, E + 2, dtype=torch.int64, device=device)
        flat_acc = acc.view(-1)
        row_slots = self._group_rows(pending, device)
        sizes = {ids.numel() for _, ids in pending}
        if len(sizes) == 1 and all(ids.device == device for _, ids in pending):
            layers = tuple(layer for layer, _ in pending)
            offsets = self._offsets.get(layers)
            if offsets is None or offsets.device != device:
                offsets = self._offsets[layers] = torch.tensor(layers, dtype=torch.int64, device=device)[:, None] * (E + 2) + 1
            ids = torch.stack([ids.reshape(-1) for _, ids in pending]) if len(pending) > 1 \
                else pending[0][1].reshape(1, -1)
            picks = ids.clamp(-1, E).add_(offsets)
            flat = picks.reshape(-1)
            flat_acc.index_add_(0, flat, self._ones_for(flat))
            if row_slots is not None:
                self._add_by_group(picks.view(len(pending), row_slots.shape[0], -1), row_slots)
            return
        for layer, ids in pending:  # layers that routed different token counts (or devices): one at a time
            flat = ids.reshape(-1).to(device).clamp(-1, E).add_(layer * (E + 2) + 1)
            flat_acc.index_add_(0, flat, self._ones_for(flat))
            if row_slots is not None:
                self._add_by_group(flat.view(1, row_slots.shape[0], -1), row_slots)

    def _group_rows(self, pending: list, device: torch.device) -> Optional[torch.Tensor]:
        """This forward's row slots where every pending layer's ids split evenly into its rows; else None, the
        forward then left out of the group counts (counted off ``group_forwards``, logged once)."""
        row_slots = self._row_slots
        if row_slots is None:
            return None
        rows = row_slots.shape[0]
        if any(ids.numel() % rows for _, ids in pending):
            self._row_slots = None
            self.group_forwards -= 1
            if not self._logged_groups:
                self._logged_groups = True
                log.warning("grokwatch: a router routed a token count that is not a multiple of the batch's %d rows "
                            "(packed or dropped tokens?): that forward is in the all-token totals only, not in "
                            "the per-group counts (logged once)", rows)
            return None
        return row_slots if row_slots.device == device else row_slots.to(device, non_blocking=True)

    def _add_by_group(self, picks: torch.Tensor, row_slots: torch.Tensor) -> None:
        """``picks`` [layers, B, picks per row]: flat [L, E + 2] indices; each row's go to its group's counts."""
        L, E = self.shape
        acc = self._groups_GLE
        if acc is None or acc.device != picks.device:
            acc = self._groups_GLE = torch.zeros(self.max_groups + 1, L, E + 2, dtype=torch.int64, device=picks.device)
        flat = (picks + (row_slots * (L * (E + 2)))[None, :, None]).reshape(-1)
        acc.view(-1).index_add_(0, flat, self._ones_for(flat))

    def _ones_for(self, flat: torch.Tensor) -> torch.Tensor:
        n = flat.shape[0]
        ones = self._ones
        if ones is None or ones.shape[0] < n or ones.device != flat.device:
            ones = self._ones = torch.ones(max(n, 1024), dtype=torch.int64, device=flat.device)
        return ones[:n]

    def reorder(self, called: list[int]) -> None:
        """The routers' places changed (Capture.learn_order): the row a router counted into at place
        ``called[p]`` is now place ``p``'s."""
        self._flush()
        if self._tokens_LE is not None:
            self._tokens_LE = self._tokens_LE[torch.tensor(called, device=self._tokens_LE.device)]
        if self._groups_GLE is not None:
            self._groups_GLE = self._groups_GLE[:, torch.tensor(called, device=self._groups_GLE.device)]

    @property
    def pending(self) -> bool:
        return self.enabled and self.forwards > 0

    def drain_into(self, view_LE1: torch.Tensor, aux_view: Optional[torch.Tensor] = None,
                   groups_view: Optional[torch.Tensor] = None) -> Drained:
        """Copy the interval's counts into ``view_LE1`` (int64 [L, E + 1], on the staging device; zeros when
        no router was called), the aux-loss sum into ``aux_view`` ([1] float32) and the per-group counts into
        ``groups_view`` (int64 [max_groups, L, E + 1]), and start the next interval. On the training thread,
        no host sync (device copies and fills)."""
        self._flush()
        aux_forwards, self.aux_forwards = self.aux_forwards, 0
        if aux_view is not None and self._aux_sum is not None and aux_forwards:
            aux_view.copy_(self._aux_sum.reshape(1), non_blocking=True)
            self._aux_sum.zero_()
        forwards, self.forwards = self.forwards, 0
        group_forwards, self.group_forwards = self.group_forwards, 0
        acc = self._tokens_LE
        if acc is None:
            view_LE1.zero_()
        else:
            _into_staging(acc, view_LE1)
            acc.zero_()
        groups = self._groups_GLE
        if groups_view is None or groups is None or not group_forwards:
            group_forwards = 0
        else:
            _into_staging(groups[: self.max_groups], groups_view)
        if groups is not None:
            groups.zero_()
        if not self.enabled:
            return Drained(0, 0, 0, ())
        return Drained(forwards, aux_forwards, group_forwards, tuple(self.group_names) if group_forwards else ())


def _into_staging(acc: torch.Tensor, view: torch.Tensor) -> None:
    """[..., E + 2] counts (column 1 + e: expert e; columns 0 and E + 1: no expert) into the staging layout
    [..., E + 1] (column e: expert e; column E: no expert), by device ops."""
    E = acc.shape[-1] - 2
    view[..., :E].copy_(acc[..., 1:E + 1], non_blocking=True)
    torch.add(acc[..., 0], acc[..., E + 1], out=view[..., E])
