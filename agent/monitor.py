"""``attach()`` and the Monitor: its life (install, steps, close), the public calls, and what
follows a summarized forward (``finalize``: reduce, one copy to pinned memory, hand-over).

Threads: every hook (hooks.py) runs on the training thread and only enqueues device work
(reduce.py); encoding and sending happen on the sender thread (sender.py). After ``attach()``
returns, nothing here raises into the training loop: hook errors are caught, counted and logged
once, and after ``max_hook_errors`` the monitor removes its hooks and training goes on.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import weakref
from typing import Any, Callable, Optional, Sequence

import torch
import torch.optim.optimizer as torch_optimizer
from torch import nn

import grokwatch.agent.compiled as compiled_module
from grokwatch.agent.config import (  # noqa: F401
    DEFAULT_DOCS_PER_SAMPLE,
    DEFAULT_ENDPOINT,
    DEFAULT_EVERY_N_STEPS,
    DEFAULT_SAMPLES_PER_STEP,
    AgentConfig,
)
from grokwatch.agent.discover import MoELayer, MoEShape, discover
from grokwatch.agent.hooks import ForwardHooks, _distributed, _is_compiled_module, _is_compiling
from grokwatch.agent.reduce import BatchContext, freed_weight, gather_layer, reduce_all, usable_weight
from grokwatch.agent.sampling import Sampler
from grokwatch.agent.sender import Pending, Sender
from grokwatch.agent.staging import Staging

log = logging.getLogger("grokwatch.agent")

# Optimizer steps with no training forward of the attached model seen, before one warning: its forward is
# called around the module hooks (model.forward(...)), or the wrong module was attached. Other models'
# optimizers in the same process count too, hence not at the first.
STEPS_BEFORE_UNSEEN_WARNING = 20


def _parameter_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class Monitor(ForwardHooks):
    """Returned by ``attach``. Public: tag, step, log_loss, log_eval, record, run_probe, pause, resume, close,
    stats."""

    def __init__(self, model: nn.Module, config: AgentConfig, shape: MoEShape,
                 router_weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 probe_fn: Optional[Callable] = None, layer_names: Optional[Sequence[str]] = None):
        self.model = model
        self.config = config
        self.shape = shape
        self.layers: list[MoELayer] = shape.layers
        self._router_weights = (list(router_weights) if router_weights is not None
                                else [layer.weight_EH for layer in self.layers])
        self.has_cosines = shape.num_layers > 1 and all(w is not None for w in self._router_weights)
        self.device = _parameter_device(model)
        self._ranks_known = _distributed()  # else learned once it is (_learn_ranks)
        rank, world = 0, 1
        if self._ranks_known:
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.sampler = Sampler(every_n_steps=config.every_n_steps, max_samples_per_step=config.max_samples_per_step,
                               rank=rank, world_size=world)
        self.slots = config.max_samples_per_step * config.max_docs_per_sample
        self._reduction_max_bytes = float(config.reduction_memory_mb) * 2**20
        self._reduction = self._reduction_for(self.device)
        self.staging = self._staging_on(self.device)
        self.sender = Sender(endpoint=config.endpoint, run=config.run, rank=rank, world_size=world,
                             num_layers=shape.num_layers, num_experts=shape.num_experts, top_k=shape.top_k,
                             distribution="sigmoid" if shape.distribution == "sigmoid" else
                             ("topk" if shape.distribution == "topk" else "softmax"),
                             has_cosines=self.has_cosines, staging=self.staging, queue_size=config.queue_size,
                             sndhwm=config.sndhwm, heartbeat_interval_s=config.heartbeat_interval_s,
                             layer_names=layer_names, curve=config.curve_keys())
        self._handles: list[Any] = []
        self._layer_handles: list[Any] = []
        self._armed_experts: list[bool] = []  # which layers' experts hooks the armed set holds
        # When every training forward is summarized, arming and disarming each time costs more than the
        # hooks' slow call path on the odd unsampled forward (docs/benchmarks.md): they stay armed.
        self._keep_armed = config.every_n_steps == 1
        self._compiled = False  # seen under torch.compile: the armed hooks are part of the compiled code
        self._active = True  # False while paused or after close (compiled code keeps calling captured hooks)
        self._logged_bypass = False
        self._logged_incomplete = False
        self._ctx: Optional[BatchContext] = None
        self._sampling = False  # self._ctx is not None, as a plain flag torch.compile can guard on
        self._step = 0
        self._manual_step = False
        self._forward_since_step = False  # a training forward ran since the last counted optimizer step
        self._seen_forward = False  # one ever ran (else, after some optimizer steps, a warning)
        self._steps_unseen = 0
        self._hook_errors = 0
        self._non_finite_scores = 0  # log_eval() scores left out of their message
        self._unattributed_losses = 0  # step(loss=a scalar) over rows of several groups: not sent
        self._logged_error = False
        self.disabled = False
        self._probe_active = False
        # Layers whose router returns no index tensor take the decision from the experts module's
        # forward pre-hook; learned on the first sampled forward, so others carry one hook, not two.
        self._needs_experts_hook = [layer.experts is not None for layer in self.layers]
        # A router weight whose memory is freed before the reduction at the end of the forward (FSDP's
        # unsharded copy given to record(); DeepSpeed ZeRO-3 empties the parameter itself after the layer):
        # found on a summarized forward, then the hook or record() keeps a copy of that layer's weight.
        self._copy_weight = [False] * shape.num_layers
        # Each discovered router's place in the forward (the layer index it ships under). Discovery lists
        # routers in module order; a model may call them in another (JetMoE: attention routers, then the
        # MLP's, registered the other way round): learned from the first summarized forward.
        self._position = list(range(shape.num_layers))
        self._order_learned = any(layer.router is None for layer in self.layers)  # record(): the user's order
        self._on_compile_guarded = self._guard(self._on_compile)
        self._record_twin = self._opaque_twin(self._record)
        self._layer_hooks = [(self._router_hook(i), self._compile_aware(self._guard(self._experts_hook(i)),
                                                                          only_when_sampling=True))
                             for i in range(len(self.layers))]
        from grokwatch.agent.probe import Probe

        self.probe = Probe(self, config.probe_size, probe_fn) if config.probe_size else None
        self._install()
        if any(_is_compiled_module(m) for m in model.modules()):
            self._on_compile()  # compiled before attach: arm now, so that the first trace includes the hooks

    @property
    def rank(self) -> int:
        return self.sampler.rank  # the sampler numbers untagged ids with it; the sender's copy is its thread's

    @property
    def world_size(self) -> int:
        return self.sampler.world_size

    # ------------------------------------------------------------------ life

    def _install(self) -> None:
        self._install_model_hooks()
        self._step_handle = torch_optimizer.register_optimizer_step_post_hook(self._guard(self._on_optimizer_step))
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork)
        self._pid = os.getpid()
        _open_monitors.add(self)

    def _learn_ranks(self) -> None:
        """torch.distributed was initialized after attach() (checked on summarized forwards until it is, or
        until the first optimizer step): from now on this rank sends under its rank, and its untagged ids
        carry it (else every rank would ship rank 0 and the same ids for different samples)."""
        self._ranks_known = True
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if (rank, world) != (self.rank, self.world_size):
            self.sampler.rank, self.sampler.world_size = rank, world
            self.sender.introduce(rank, world)
            log.info("grokwatch: torch.distributed was initialized after attach(); this agent is rank %d of %d",
                     rank, world)

    def _after_fork(self) -> None:
        self.disabled = True  # a forked DataLoader worker never touches the parent's socket

    def _disable(self) -> None:
        self.disabled = True
        self.sender.disabled = True
        self._remove_model_hooks()
        self._step_handle.remove()

    # ------------------------------------------------------------------ device, then the forward's end

    def _model_device(self) -> torch.device:
        """Where the routers run now: their first weight's device, read from the router (``model.to`` moves
        it in place; ``to_empty`` from the meta device puts a new parameter there)."""
        weight = self.layers[0].weight_now() if self.layers else None
        if not isinstance(weight, torch.Tensor):
            weight = self._router_weights[0] if self._router_weights else None
        return weight.device if isinstance(weight, torch.Tensor) else _parameter_device(self.model)

    def _staging_on(self, device: torch.device) -> Staging:
        return Staging(num_layers=self.shape.num_layers, slots=self.slots, num_experts=self.shape.num_experts,
                       device=device)

    def _reduction_for(self, device: torch.device) -> Optional[compiled_module.CompiledReduction]:
        """``attach(compile_reduction=...)``; None: the device's default (compiled on CUDA)."""
        compile_reduction = self.config.compile_reduction
        if compile_reduction is None:
            compile_reduction = compiled_module.compile_by_default(device)
        return compiled_module.CompiledReduction() if compile_reduction else None

    def _follow_device(self, device: torch.device) -> bool:
        """The model and its inputs are on another device than at attach() (attach(model), then model.cuda();
        inputs that only the model's forward moves, as accelerate's device hooks do, are not followed):
        the staging buffers move there, once no message is in flight (else this forward is not
        summarized), so that the reduction never copies across devices on the training thread (a host
        sync). The reduction's default (compiled on CUDA) follows too."""
        staging = self.staging
        if len(staging.free) < len(staging.pool):
            self.sender.count_drop("staging_busy")
            return False
        new = self._staging_on(device)
        self.sender.use_staging(new)
        self.staging, previous, self.device = new, self.device, device
        for i, layer in enumerate(self.layers):  # attached on the meta device: to_empty() made new parameters
            weight = self._router_weights[i]
            if isinstance(weight, torch.Tensor) and weight.is_meta and layer.router is not None:
                current = layer.weight_now()
                self._router_weights[i] = current if isinstance(current, torch.Tensor) and current.dim() == 2 else None
        if self.config.compile_reduction is None:  # else the user's choice stands, with its state
            self._reduction = self._reduction_for(device)
        log.info("grokwatch: the model's inputs are on %s, not on %s as at attach(): the agent follows",
                 device, previous)
        return True

    def finalize(self, ctx: BatchContext, with_loss: bool = False) -> None:
        """One non-blocking copy into pinned host memory, one event; hand over."""
        self._set_ctx(None)
        if not self._order_learned and ctx.layers_done == self.shape.num_layers:
            self._learn_order(ctx)
        if ctx.layers_done != self.shape.num_layers or len({g.layer for g in ctx.pending}) != ctx.layers_done:
            # A layer missing (or one recorded twice in place of another): its staged rows would be stale.
            self.sender.count_drop("incomplete")
            bypassed = ctx.layers_done == 0 and bool(self._layer_handles)
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
                            if self.layers and self.layers[0].router is None else "")
            return
        index = self.staging.take()
        if index is None:
            self.sender.count_drop("staging_busy")
            return
        try:
            with_cosines = reduce_all(ctx, self.shape.top_k, summarize_fn=self._reduction,
                                      max_bytes=self._reduction_max_bytes, zloss=self.config.router_zloss)
        except BaseException:
            self.staging.give_back(index)
            raise
        if not with_cosines:
            self._learn_freed_weights()
        host = self.staging.pool[index]
        host.copy_(self.staging.device_buf, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        # Per message: record() may supply router weights after attach(), and a weight may be unusable
        # in one forward (sharded, freed): then this message has no cosines, never stale ones.
        self.has_cosines = self.shape.num_layers > 1 and all(w is not None for w in self._router_weights)
        self.sender.has_cosines = self.has_cosines
        self.sender.submit(Pending(source=ctx.source, step=ctx.step, sample_ids=ctx.sample_ids, groups=ctx.groups,
                                   host_index=index, event=event, with_cosines=with_cosines,
                                   with_loss=with_loss))

    def _learn_order(self, ctx: BatchContext) -> None:
        """The first complete summarized forward called the routers in this order: from now on (this
        forward included) each ships under its place in the forward, so that layer l and l+1 are
        adjacent in the network (the cosines) whatever the order the model registered them in."""
        self._order_learned = True
        called = [g.layer for g in ctx.pending]
        if called == sorted(called) or len(set(called)) != len(called):
            return
        index_at = {place: index for index, place in enumerate(self._position)}
        for place, gathered in enumerate(ctx.pending):
            self._position[index_at[gathered.layer]] = place
            gathered.layer = place
        log.info("grokwatch: the model calls its routers in another order than it registers them; layers "
                 "ship in forward order: %s", [self.layers[index_at[layer]].name for layer in called])

    def _learn_freed_weights(self) -> None:
        """A router weight whose memory was freed by the end of the forward (FSDP resharded the copy given
        to record(); ZeRO-3 emptied the parameter): this message has no cosines; from the next on, the
        router hook or record() keeps a copy of it (E x H) on summarized forwards."""
        freed = [layer for layer, weight in enumerate(self._router_weights)
                 if not self._copy_weight[layer] and freed_weight(weight)]
        for layer in freed:
            self._copy_weight[layer] = True
        if freed:
            log.info("grokwatch: the router weights of layers %s were freed before the reduction (FSDP "
                     "resharding, ZeRO-3?): the agent keeps a copy of them on summarized forwards", freed)

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Counts training steps: the first optimizer step after a training forward of the model (several
        optimizers, e.g. experts and the rest at their own learning rates, are one step; another model's
        optimizer is none). While paused the forwards are not seen: every optimizer step counts."""
        if self._seen_forward:
            # A process group starts before training does: stop looking for one (a check is not free, and
            # would run every step).
            self._ranks_known = True
        elif self._active:
            self._steps_unseen += 1
            if self._steps_unseen == STEPS_BEFORE_UNSEEN_WARNING:
                log.warning("grokwatch: %d optimizer steps and no training forward of the attached %s: nothing is "
                            "summarized. Is its forward called directly (model.forward(...) skips module hooks), "
                            "or is another module the one that trains?", self._steps_unseen, type(self.model).__name__)
        if self._manual_step or (self._active and not self._forward_since_step):
            return
        self._forward_since_step = False
        self._step += 1
        self._maybe_probe()

    def _maybe_probe(self) -> None:
        if self.probe is not None and self._step % self.config.probe_every_n_steps == 0:
            self.probe.run(self._step)

    # ------------------------------------------------------------------ public

    def tag(self, sample_ids: Optional[Sequence] = None, groups: Optional[Sequence] = None) -> None:
        """Name the rows of the next forward (stable ids let the same sample be
        followed over time; groups are data domains; either may be left out).
        Never raises."""
        try:
            self.sampler.tag(sample_ids, groups)
        except Exception as exc:
            self._hook_error(exc)

    def step(self, global_step: int, loss=None) -> None:
        """Set the training step (else the optimizer's step hook counts). ``loss``, optional: the latest
        training step's loss — the evidence the collector needs before it calls a group memorized
        (METRICS.md §5; without it, and without the probe, phases stay ``unknown``). Sent on the sampled
        steps (``every_n_steps``), like the routing summaries; see ``log_loss`` for its forms."""
        if self.disabled:
            return
        try:
            changed = int(global_step) != self._step
            self._manual_step = True
            self._step = int(global_step)
            if changed:
                self._maybe_probe()
            if loss is not None and self._step % self.config.every_n_steps == 0:
                self.log_loss(self._step, loss)
        except Exception as exc:
            self._hook_error(exc)

    def log_loss(self, step: int, loss) -> None:
        """Send a training loss at ``step`` now (the HF callback's logged loss goes here). ``loss``: a number
        or 0-d tensor (the batch mean: it names a group only when the latest tagged rows are of one group,
        or untagged: ``all``), a 1-d tensor of per-row losses aligned with the rows of the latest ``tag()``
        (averaged per group), or {group: number or 0-d tensor}. Tensors are detached here and read on the
        sender thread: no device sync in training. Never raises."""
        if self.disabled:
            return
        try:
            groups = self.sampler.row_groups
            if isinstance(loss, dict):
                payload: Any = {str(g): (v.detach() if isinstance(v, torch.Tensor) else float(v))
                                for g, v in loss.items()}
            elif isinstance(loss, torch.Tensor) and loss.dim() == 1 and loss.numel() > 1:
                if groups is None or len(groups) != loss.numel():
                    self._unattributed(f"{loss.numel()} per-row losses for {len(groups or [])} tagged rows")
                    return
                payload = ("rows", loss.detach(), list(groups))
            else:
                names = set(groups) if groups is not None else {"all"}
                if len(names) != 1:
                    self._unattributed("one loss for rows of several groups")
                    return
                payload = {names.pop(): loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else float(loss)}
            if payload:
                self.sender.submit_loss(int(step), payload)
        except Exception as exc:
            self._hook_error(exc)

    def _unattributed(self, what: str) -> None:
        self._unattributed_losses += 1
        if self._unattributed_losses == 1:
            log.warning("grokwatch: step(loss=...)/log_loss(): %s, so it is not any group's loss evidence and is "
                        "not sent (counted in stats()['unattributed_losses'], logged once). Pass per-row losses "
                        "(reduction='none') or {group: loss}.", what)

    def log_eval(self, step: int, scores: dict) -> None:
        """Forward the user's own held-out scores (ground truth for reports)."""
        if self.disabled:
            return
        try:
            given = {str(k): float(v) for k, v in scores.items()}
            kept = {k: v for k, v in given.items() if math.isfinite(v)}
            if len(kept) < len(given):  # the wire refuses a message with any: send the others (a diverged loss)
                if not self._non_finite_scores:
                    log.warning("grokwatch: log_eval(step=%s): %s not finite, sent without (counted in stats()"
                                "['non_finite_scores'], logged once)", step, sorted(given.keys() - kept.keys()))
                self._non_finite_scores += len(given) - len(kept)
            if kept:
                self.sender.submit_eval(int(step), kept)
        except Exception as exc:
            self._hook_error(exc)

    def record(self, layer: int, *, logits: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
               topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
               router_weight: Optional[torch.Tensor] = None) -> None:
        """For models we do not auto-detect: call from the router's forward with
        the router's output for MoE layer ``layer`` (0-based, forward order).
        ``logits`` [T,E] (or [B,S,E]), or ``probs`` [T,E], or ``topk=(ids [T,K],
        weights [T,K])`` alone; ``router_weight`` [E,H] enables cosines."""
        if _is_compiling():  # called from a router that torch.compile traces: see _compile_aware
            return self._record_twin(layer, logits=logits, probs=probs, topk=topk, router_weight=router_weight)
        return self._record(layer, logits=logits, probs=probs, topk=topk, router_weight=router_weight)

    def _record(self, layer: int, *, logits: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
                topk: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                router_weight: Optional[torch.Tensor] = None) -> None:
        ctx = self._ctx
        if ctx is None or self.disabled:
            return
        try:
            E = self.shape.num_experts
            given = next((t for t in (logits, probs, topk[0] if topk is not None else None) if t is not None), None)
            if given is None:
                raise ValueError("record() needs logits=, probs= or topk=")
            # [B, S', ...] with S' other than the input's length: only S' positions per row are routed.
            seq_len = int(given.shape[1]) if given.dim() == 3 else None
            ids = topk[0].reshape(-1, topk[0].shape[-1]) if topk is not None else None
            if router_weight is not None:
                if self._copy_weight[layer] and usable_weight(router_weight):
                    router_weight = router_weight.detach().clone()
                self._router_weights[layer] = router_weight
            if logits is not None:
                dist, x = self.shape.distribution, logits.reshape(-1, E)
            elif probs is not None:
                dist, x = "probs", probs.reshape(-1, E)
            else:
                weights = topk[1].reshape(ids.shape).float()
                dense = torch.zeros(ids.shape[0], E, dtype=torch.float32, device=weights.device)
                dense = dense.scatter_(1, ids, weights)
                dist, x = "probs", dense / dense.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            gather_layer(ctx, layer, x, ids, self._router_weights[layer], dist, seq_len)
        except Exception as exc:
            self._hook_error(exc)

    def run_probe(self, step: Optional[int] = None) -> None:
        if self.probe is not None and not self.disabled:
            self.probe.run(self._step if step is None else int(step))

    def stats(self) -> dict:
        return dict(step=self._step, sent=self.sender.sent, dropped=dict(self.sender.dropped),
                    hook_errors=self._hook_errors, disabled=self.disabled,
                    mismatched_tags=self.sampler.mismatched_tags, non_finite_scores=self._non_finite_scores,
                    unattributed_losses=self._unattributed_losses,
                    reduction="op by op" if self._reduction is None else self._reduction.state,
                    reduction_compile_s=None if self._reduction is None else self._reduction.compile_seconds)

    def pause(self) -> None:
        """Remove the model hooks (the step count goes on); ``resume()`` puts them back."""
        self._active = False
        self._remove_model_hooks()

    def resume(self) -> None:
        if not self._handles and not self.disabled:
            self._install_model_hooks()
        self._active = True

    def close(self) -> None:
        """Remove the hooks and flush with a bounded wait. Never raises. Also run at interpreter exit for a
        monitor left open (a script that ends, or dies of an exception, without close()): what is queued
        still goes out, with the last heartbeat. In a forked child it only removes the hooks: the socket
        and its I/O thread belong to the parent."""
        _open_monitors.discard(self)
        try:
            self._active = False
            self._remove_model_hooks()
            self._step_handle.remove()
            if os.getpid() == self._pid:
                self.sender.close(self.config.close_timeout_s)
        except Exception as exc:
            log.warning("grokwatch: error while closing: %r", exc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_open_monitors: "weakref.WeakSet[Monitor]" = weakref.WeakSet()


@atexit.register
def _close_open_monitors() -> None:
    for mon in list(_open_monitors):
        mon.close()


def attach(model: nn.Module, endpoint: Optional[str] = None, run: Optional[str] = None, *,
           every_n_steps: int = DEFAULT_EVERY_N_STEPS, max_samples_per_step: int = DEFAULT_SAMPLES_PER_STEP,
           probe_every_n_steps: int = 0, probe_size: int = 0, num_layers: Optional[int] = None,
           num_experts: Optional[int] = None, top_k: Optional[int] = None, distribution: str = "softmax",
           router_weights: Optional[Sequence[torch.Tensor]] = None, probe_fn: Optional[Callable] = None,
           layer_names: Optional[Sequence[str]] = None, **options) -> Monitor:
    """Hook the MoE routers of ``model`` and stream pathway summaries to a collector.

        import grokwatch.agent as gw
        mon = gw.attach(model, endpoint="tcp://127.0.0.1:5557", run="olmoe-a")
        for step, batch in enumerate(loader):
            mon.tag(sample_ids=batch["ids"], groups=batch["domain"])   # optional
            loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
        mon.close()

    transformers 5.x MoE models are found automatically. For any other model
    pass ``num_layers``, ``num_experts``, ``top_k`` and call ``mon.record()``
    from the router's forward. Fails fast (ValueError) on a bad configuration
    or a model without MoE layers; afterwards never raises into training.
    The probe (``probe_every_n_steps``, ``probe_size``) re-runs seen samples;
    ``probe_fn(model, input_ids, attention_mask) -> per-sample loss`` replaces
    the default causal-LM loss for other tasks.
    Endpoint and run default to GROKWATCH_ENDPOINT and GROKWATCH_RUN.
    The hello names the MoE layers (their module names; in manual mode
    ``layer_names`` if given, with global layer numbers under pipeline
    parallelism): a collector refuses a second set of layers under one run.
    """
    try:  # a misspelt GROKWATCH_* variable is one warning, never an error
        from grokwatch.envvars import warn_unknown

        warn_unknown(os.environ, log)
    except Exception:
        pass
    config = AgentConfig(
        endpoint=endpoint or os.environ.get("GROKWATCH_ENDPOINT", DEFAULT_ENDPOINT),
        run=run or os.environ.get("GROKWATCH_RUN", "default"),
        **{key: options.pop(key, None) or os.environ.get(f"GROKWATCH_{key.upper()}") or None
           for key in ("curve_server_key", "curve_secret_key")},
        every_n_steps=every_n_steps, max_samples_per_step=max_samples_per_step,
        probe_every_n_steps=probe_every_n_steps, probe_size=probe_size, **options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
    if num_layers is not None:
        if not (num_experts and top_k) or num_layers < 1 or num_experts < 2 or not 1 <= top_k <= num_experts:
            raise ValueError("manual mode: num_layers >= 1, num_experts >= 2 and 1 <= top_k <= num_experts")
        if distribution not in ("softmax", "sigmoid", "topk"):
            raise ValueError(f"distribution: {distribution!r} must be softmax, sigmoid or topk")
        layers = [MoELayer(f"manual.{i}", None, None, 0, None) for i in range(num_layers)]
        shape = MoEShape(num_layers, num_experts, top_k, distribution, layers)
        weights = list(router_weights) if router_weights is not None else [None] * num_layers
        if len(weights) != num_layers:
            raise ValueError(f"router_weights: {len(weights)} given for {num_layers} layers")
        if layer_names is not None:
            layer_names = [str(name) for name in layer_names]
            if len(layer_names) != num_layers or len(set(layer_names)) != num_layers:
                raise ValueError(f"layer_names: {num_layers} distinct names needed, got {layer_names!r:.200}")
        return Monitor(model, config, shape, router_weights=weights, probe_fn=probe_fn, layer_names=layer_names)
    if layer_names is not None:
        raise ValueError("layer_names is for manual mode (num_layers=...); found layers are named by their modules")
    shape = discover(model)
    return Monitor(model, config, shape, probe_fn=probe_fn, layer_names=[layer.name for layer in shape.layers])
