"""What follows a summarized forward, on the training thread: the batched reduction (reduce.py)
into the staging buffer, one non-blocking copy into pinned host memory and one CUDA event, then
the hand-over to the sender thread. Owns the device the summaries are made on, with the staging
buffers, the layouts cached there and the reduction's strategy; follows the model to another device.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

import grokwatch.agent.compiled as compiled_module
from grokwatch.agent.config import REDUCTION_LAYOUTS, AgentConfig
from grokwatch.agent.counts import Drained
from grokwatch.agent.discover import MoEShape
from grokwatch.agent.layout import BatchContext, Layout, build_context
from grokwatch.agent.reduce import Strategy, reduce_all
from grokwatch.agent.sender import Pending, Sender
from grokwatch.agent.staging import Staging

log = logging.getLogger("grokwatch.agent")


def staging_on(config: AgentConfig, shape: MoEShape, device: torch.device) -> Staging:
    return Staging(num_layers=shape.num_layers, slots=config.sample_slots, num_experts=shape.num_experts,
                   device=device, count_groups=config.expert_count_groups if config.expert_counts else 0)


def reduction_for(config: AgentConfig, device: torch.device) -> Optional[compiled_module.CompiledReduction]:
    """``attach(compile_reduction=...)``; None: the device's default (compiled on CUDA)."""
    compile_reduction = config.compile_reduction
    if compile_reduction is None:
        compile_reduction = compiled_module.compile_by_default(device)
    return compiled_module.CompiledReduction() if compile_reduction else None


class Summaries:
    """The summaries of the forwards Capture hands over: built into ``staging`` on ``device`` by the
    reduction (compiled or op by op, laid out by the ``Strategy``), then submitted to the sender."""

    def __init__(self, config: AgentConfig, shape: MoEShape, sender: Sender, staging: Staging,
                 device: torch.device):
        self.config = config
        self.shape = shape
        self.sender = sender
        self.staging = staging
        self.device = device
        self._layouts: dict[tuple, Layout] = {}  # build_context's, on this device
        self._strategy = Strategy(experts_dim=REDUCTION_LAYOUTS[config.reduction_layout],
                                  layers_per_batch=config.reduction_layers_per_batch)
        self._max_bytes = float(config.reduction_memory_mb) * 2**20
        self.reduction = reduction_for(config, device)
        self.last_batches: tuple[int, ...] = ()  # layers per batch in the latest reduction
        self._logged_bypass = False
        self._logged_incomplete = False

    def follow(self, device: torch.device) -> bool:
        """The model and its inputs are on another device than at attach() (attach(model), then model.cuda();
        inputs that only the model's forward moves, as accelerate's device hooks do, are not followed):
        the staging buffers move there, once no message is in flight (else this forward is not
        summarized), so that the reduction never copies across devices on the training thread (a host
        sync). The reduction's default (compiled on CUDA) follows too."""
        staging = self.staging
        if len(staging.free) < len(staging.pool):
            self.sender.count_drop("staging_busy")
            return False
        new = staging_on(self.config, self.shape, device)
        self.sender.use_staging(new)
        self.staging, previous, self.device = new, self.device, device
        self._layouts = {}
        if self.config.compile_reduction is None:  # else the user's choice stands, with its state
            self.reduction = reduction_for(self.config, device)
        log.info("grokwatch: the model's inputs are on %s, not on %s as at attach(): the agent follows",
                 device, previous)
        return True

    def context(self, source: str, step: int, rows: list[int], ids: Sequence, groups: Sequence, num_rows: int,
                seq_len: int, attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                docs=None) -> BatchContext:
        """The context of a summarized forward over ``num_rows`` x ``seq_len`` whose ``rows`` are sampled
        with these ids and groups. ``docs``: (ids or None, groups) of each row's documents, in order,
        when the tag named them: a packed row's document d goes out under its own name (else "<row
        id>#d" and the row's group)."""
        D = self.config.max_docs_per_sample
        slot_ids = [""] * self.config.sample_slots
        slot_groups = ["all"] * self.config.sample_slots
        packed = position_ids is not None and D > 1
        doc_ids, doc_groups = docs if packed and docs is not None else (None, None)
        for m, r in enumerate(rows):
            for d in range(D if packed else 1):
                named = doc_groups is not None and d < len(doc_groups[r])
                slot_ids[m * D + d] = (doc_ids[r][d] if named and doc_ids is not None
                                       else f"{ids[r]}#{d}" if packed and d else str(ids[r]))
                slot_groups[m * D + d] = doc_groups[r][d] if named and doc_groups is not None else str(groups[r])
        return build_context(source=source, step=step, attention_mask_BS=attention_mask,
                             position_ids_BS=position_ids if packed else None, num_rows=num_rows,
                             seq_len=seq_len, rows=rows, max_rows=self.config.max_samples_per_step,
                             docs_per_row=D, device=self.device, sample_ids=slot_ids, groups=slot_groups,
                             staging=self.staging, cache=self._layouts)

    def finalize(self, ctx: BatchContext, losses_B: Optional[torch.Tensor] = None) -> None:
        """One non-blocking copy into pinned host memory, one event; hand over. ``losses_B``: the probe's
        per-sample losses of the context's rows (their first document slot each)."""
        with_loss = losses_B is not None
        if losses_B is not None:
            D = self.config.max_docs_per_sample
            loss_MD = torch.zeros(self.config.max_samples_per_step, D, dtype=torch.float32, device=losses_B.device)
            loss_MD[: losses_B.shape[0], 0] = losses_B
            self.staging.views["loss_N"].copy_(loss_MD.reshape(-1))
        if ctx.layers_done != self.shape.num_layers or len({g.layer for g in ctx.pending}) != ctx.layers_done:
            # A layer missing (or one recorded twice in place of another): its staged rows would be stale.
            self.sender.count_drop("incomplete")
            bypassed = ctx.bypassed
            if bypassed and not self._logged_bypass:
                self._logged_bypass = True
                log.warning("grokwatch: armed router hooks did not run in a summarized forward (counted as "
                            "'incomplete'): compiled code traced without them? Attach before the first compiled "
                            "forward; two compiled instances of one model class share code unless "
                            "torch._dynamo.config.skip_nnmodule_hook_guards = False.")
            elif not bypassed and not self._logged_incomplete:
                self._logged_incomplete = True
                seen = sorted(g.layer for g in ctx.pending)
                log.warning("grokwatch: a summarized forward recorded MoE layers %s of 0..%d (counted as 'incomplete', "
                            "logged once): every layer must be recorded once per forward%s", seen,
                            self.shape.num_layers - 1, " (mon.record(layer, ...) from each router)"
                            if self.shape.layers and self.shape.layers[0].router is None else "")
            return
        index = self.staging.take()
        if index is None:
            self.sender.count_drop("staging_busy")
            return
        try:
            reduced = reduce_all(ctx, self.shape.top_k, self._strategy, summarize_fn=self.reduction,
                                 max_bytes=self._max_bytes, zloss=self.config.router_zloss)
        except BaseException:
            self.staging.give_back(index)
            raise
        self.last_batches = reduced.batches
        with_cosines = reduced.with_cosines
        # a training message carries the all-token counts of every training forward since the last one, the
        # model's mean aux loss over them, and the routers' balancing biases as they are now
        drained, with_bias = Drained(0, 0, 0, ()), False
        if ctx.counts is not None:  # handed on by the capture (Capture._finish)
            drained = ctx.counts.drain_into(self.staging.views["expert_tokens_LE"], self.staging.views["aux_loss"],
                                            self.staging.views["group_tokens_GLE"])
            with_bias = self._copy_biases(ctx.biases)
        host = self.staging.pool[index]
        host.copy_(self.staging.device_buf, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.sender.submit(Pending(source=ctx.source, step=ctx.step, sample_ids=ctx.sample_ids, groups=ctx.groups,
                                   host_index=index, event=event, with_cosines=with_cosines,
                                   with_loss=with_loss, counted_forwards=drained.forwards,
                                   aux_forwards=drained.aux_forwards, with_bias=with_bias,
                                   group_forwards=drained.group_forwards, group_names=drained.group_names))

    def _copy_biases(self, biases: Optional[list]) -> bool:
        """The routers' balancing biases into the staging buffer (device copies); False where no router
        keeps one (or only some do: a partial matrix would read as drift)."""
        if not biases or any(b is None for b in biases):
            return False
        view = self.staging.views["balance_bias_LE"]
        for layer, bias in enumerate(biases):
            assert bias is not None
            view[layer].copy_(bias.detach(), non_blocking=True)
        return True
