"""The capture: the hooks that run on the training thread inside the model's forward, and the one
object that owns their state.

Two hooks stay on the model: its forward pre-hook asks the Monitor whether to summarize this
forward (``on_forward_start`` returns the batch's context, or None) and its forward hook hands the
finished context back (``on_forward_done``). The per-layer hooks (router forward hook, experts
forward pre-hook) are armed only for summarized forwards and keep device tensors for the reduction
(gather.py). Under torch.compile each hook is handed to the compiler as an opaque twin. Every hook
catches its own errors (``Faults``): none reaches the training loop.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from grokwatch.agent.counts import ExpertCounts
from grokwatch.agent.discover import MoELayer, MoEShape
from grokwatch.agent.gather import attach_indices, freed_weight, gather_layer, is_compiling, usable_weight
from grokwatch.agent.layout import BatchContext

log = logging.getLogger("grokwatch.agent")

# A router's balancing bias (aux-loss-free load balancing): DeepSeek-V3 in transformers, Megatron-Core.
BIAS_NAMES = ("e_score_correction_bias", "expert_bias")

# A batch's (sample ids, groups) as plain lists under this key (integrations.TaggingCollator): the model's
# pre-hook takes them out of the forward's kwargs and tags the forward with them.
BATCH_TAGS = "grokwatch_tags"

# Under torch.compile the agent's hooks are made opaque to the compiler: what it compiles calls them as
# they are, on every call (a traced hook would have its decisions baked into the graph and its side
# effects replayed). Only then: an opaque call costs more than a plain one in eager mode.
_opaque = getattr(getattr(torch, "compiler", None), "disable", None) or (lambda fn: fn)


def is_compiled_module(module: nn.Module) -> bool:
    """A torch.compile wrapper (``torch.compile(m)``) or a module compiled in place (``m.compile()``)."""
    return isinstance(getattr(module, "_orig_mod", None), nn.Module) or \
        getattr(module, "_compiled_call_impl", None) is not None


class Faults:
    """Errors inside the agent's hooks and calls: caught, counted, logged once; at ``max_errors`` the
    agent disables itself (``on_disable``) and training goes on. ``disabled`` is also set in a forked
    child (a DataLoader worker never touches the parent's socket)."""

    def __init__(self, max_errors: int, on_error: Callable[[int], None], on_disable: Callable[[], None]):
        self.max_errors = max_errors
        self.count = 0
        self.disabled = False
        self._on_error = on_error
        self._on_disable = on_disable
        self._logged = False

    def error(self, exc: BaseException) -> None:
        self.count += 1
        self._on_error(self.count)
        if not self._logged:
            self._logged = True
            log.warning("grokwatch: error inside a hook (counted; training goes on): %r", exc, exc_info=exc)
        if self.count >= self.max_errors and not self.disabled:
            log.warning("grokwatch: %d hook errors; monitor disabled", self.count)
            self.disabled = True
            self._on_disable()

    def guard(self, fn: Callable) -> Callable:
        """``fn`` as a hook: does nothing once disabled, returns None, never raises."""
        def hook(*args, **kwargs):
            if self.disabled:
                return None
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # never into the training loop
                self.error(exc)
            return None
        return hook


class Capture:
    """Owns the hooks on the model and its routers and what they share: the handles, the summarized
    forward's context, the sampling / compiled / armed flags, each router's place in the forward, and
    the router weights the cosines use. ``on_forward_start(module, args, kwargs, tags)`` decides
    whether a training forward is summarized (its context, or None); ``on_forward_done(ctx)`` takes a
    finished one."""

    def __init__(self, model: nn.Module, shape: MoEShape, faults: Faults, *,
                 router_weights: Sequence[Optional[torch.Tensor]], keep_armed: bool, counts: ExpertCounts,
                 on_forward_start: Callable[[nn.Module, tuple, dict, Any], Optional[BatchContext]],
                 on_forward_done: Callable[[BatchContext], None]):
        self.model = model
        self.shape = shape
        self.layers: list[MoELayer] = shape.layers
        self.faults = faults
        self.router_weights: list[Optional[torch.Tensor]] = list(router_weights)
        # When every training forward is summarized, arming and disarming each time costs more than the
        # hooks' slow call path on the odd unsampled forward (docs/benchmarks.md): they stay armed.
        # All-token expert counts (counts.py) need the router hooks on every training forward: armed for good.
        self.counts = counts
        self.keep_armed = keep_armed or counts.enabled
        self.compiled = False  # seen under torch.compile: the armed hooks are part of the compiled code
        self.active = True  # False while paused or after close (compiled code keeps calling captured hooks)
        self._on_forward_start = on_forward_start
        self._on_forward_done = on_forward_done
        self._handles: list[Any] = []
        self._layer_handles: list[Any] = []
        self._armed_experts: list[bool] = []  # which layers' experts hooks the armed set holds
        self._ctx: Optional[BatchContext] = None
        self._sampling = False  # self._ctx is not None, as a plain flag torch.compile can guard on
        self._probing = False
        # Layers whose router returns no index tensor take the decision from the experts module's
        # forward pre-hook; learned on the first sampled forward, so others carry one hook, not two.
        self.needs_experts_hook = [layer.experts is not None for layer in self.layers]
        # The all-token counts of such a layer: the experts' pre-hook's ids, else (learned) the top-k of its
        # scores, held until the forward's end in case the ids come (``_count_leftovers``).
        self._ids_not_in_experts = [False] * len(self.layers)
        self._count_later: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        # A router weight whose memory is freed before the reduction at the end of the forward (FSDP's
        # unsharded copy given to record(); DeepSpeed ZeRO-3 empties the parameter itself after the layer):
        # found on a summarized forward, then the hook or record() keeps a copy of that layer's weight.
        self._copy_weight = [False] * shape.num_layers
        # Each discovered router's place in the forward (the layer index it ships under). Discovery lists
        # routers in module order; a model may call them in another (JetMoE: attention routers, then the
        # MLP's, registered the other way round): learned from the first summarized forward.
        self._position = list(range(shape.num_layers))
        self._order_learned = any(layer.router is None for layer in self.layers)  # record(): the user's order
        self._on_compile_guarded = faults.guard(self.on_compile)
        self._record_twin = self._opaque_twin(self._record)
        self._layer_hooks = [(self._router_hook(i), self._compile_aware(faults.guard(self._experts_hook(i)),
                                                                         only_when_sampling=True))
                             for i in range(len(self.layers))]

    # ------------------------------------------------------------------ installing, arming

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    @property
    def armed(self) -> bool:
        return bool(self._layer_handles)

    def install(self) -> None:
        """Two hooks stay on the model. The per-layer hooks are armed only for
        the forwards we summarize: a module with hooks takes torch's slow call
        path, which on unsampled steps would be pure cost. With ``keep_armed``
        they stay armed."""
        pre = self._compile_aware(self.faults.guard(self._forward_start))
        post = self._compile_aware(self.faults.guard(self._forward_end), only_when_sampling=True)
        self._handles.append(self.model.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(post, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.disarm()
        self.set_ctx(None)

    def arm(self) -> None:
        if self._layer_handles:
            return
        h = self._layer_handles
        self._armed_experts = list(self.needs_experts_hook)
        for i, layer in enumerate(self.layers):
            if layer.router is not None:
                # First among the router's hooks: before one that releases its parameters (ZeRO-3's post-hook).
                h.append(layer.router.register_forward_hook(self._layer_hooks[i][0], prepend=True))
            if layer.experts is not None and self.needs_experts_hook[i]:
                h.append(layer.experts.register_forward_pre_hook(self._layer_hooks[i][1]))

    def disarm(self) -> None:
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles.clear()

    def on_compile(self) -> None:
        """Compiled code does not see hooks added or removed after it was traced (dynamo skips hook
        guards by default): the layer hooks are armed now and stay armed."""
        if not self.compiled:
            self.compiled = self.keep_armed = True
            log.info("grokwatch: the model is compiled with torch.compile; the router hooks stay armed")
            self.counts.turn_off("under torch.compile the unsampled forwards run compiled code without the "
                                 "router hooks, so the counts would cover the summarized forwards only")
        self.arm()

    # ------------------------------------------------------------------ the summarized forward

    @property
    def ctx(self) -> Optional[BatchContext]:
        return self._ctx

    def set_ctx(self, ctx: Optional[BatchContext]) -> None:
        self._ctx = ctx
        self._sampling = ctx is not None

    @contextlib.contextmanager
    def probing(self) -> Iterator[None]:
        """The probe's forwards: the model's pre-hook leaves the context the probe sets (``run``) alone,
        the layer hooks are armed throughout, then disarmed unless they stay armed."""
        self._probing = True
        self.arm()
        try:
            yield
        finally:
            if not self.keep_armed:
                self.disarm()
            self._probing = False

    def run(self, ctx: BatchContext, forward: Callable[[], Any]) -> Any:
        """``forward()`` summarized into ``ctx`` (deferred: the caller finalizes it). Returns what it
        returned, or None if a hook error dropped the context."""
        self.set_ctx(ctx)
        try:
            out = forward()
            if self._ctx is not ctx:
                return None
            self._finish(ctx)
            return out
        finally:
            self.set_ctx(None)

    def _forward_start(self, module, args, kwargs) -> None:
        tags = kwargs.pop(BATCH_TAGS, None)  # in place: the model never sees it
        if self._probing:
            return  # the probe has built its own context
        self.set_ctx(None)
        self.counts.end()  # a forward that raised before its end hook
        self._count_later = [None] * len(self.layers)
        if not self.active:
            return  # paused or closed: compiled code may still call a hook it captured
        if self._layer_handles and not self.keep_armed:
            self.disarm()  # a forward that raised before its end hook
        if not (torch.is_grad_enabled() and module.training):
            return  # the user's own eval forwards are not ours to summarize (nor to count)
        if self.counts.enabled:
            self.counts.begin()
            self.arm()
        ctx = self._on_forward_start(module, args, kwargs, tags)
        if ctx is not None:
            self.set_ctx(ctx)
            self.arm()

    def _forward_end(self, module, args, kwargs, output) -> None:
        if self.counts.active:
            self._count_leftovers()
            # the model's own load-balancing loss of this forward (transformers: output_router_logits=True)
            aux = output.get("aux_loss") if isinstance(output, dict) else getattr(output, "aux_loss", None)
            if isinstance(aux, torch.Tensor) and aux.numel() == 1:
                self.counts.add_aux_loss(aux)
        self.counts.end()  # an activation-checkpoint recompute in backward is not counted again
        ctx = self._ctx
        if ctx is not None and not ctx.deferred:
            if not self.keep_armed or (self._armed_experts != self.needs_experts_hook and not self.compiled):
                self.disarm()  # before a checkpointed backward recomputes the routers
            self.set_ctx(None)
            self._finish(ctx)
            self._on_forward_done(ctx)
        elif ctx is None and self._layer_handles and self._armed_experts != self.needs_experts_hook \
                and not self.compiled:
            self.disarm()  # a counted forward taught which experts hooks are needed: the next arms those only

    def _count_leftovers(self) -> None:
        """Routers without ids whose experts' pre-hook gave none either (Llama 4): counted by the top-k of
        their scores, and from now on at once."""
        for index, scores in enumerate(self._count_later):
            if scores is not None:
                self._count_later[index] = None
                self._ids_not_in_experts[index] = True
                self.counts.add_top_k(self._position[index], scores)

    def _finish(self, ctx: BatchContext) -> None:
        """What a forward teaches the capture itself, and what the summaries need of the capture, put into the
        context before it is handed on (the summaries never call back): the layers' order, router weights
        freed by the forward's end, the counts due and the balancing biases of a training forward."""
        if ctx.layers_done == self.shape.num_layers:
            self.learn_order(ctx)
        ctx.bypassed = ctx.layers_done == 0 and self.armed
        self.learn_freed_weights()
        if ctx.source == "train" and self.counts.pending:
            ctx.counts = self.counts
            ctx.biases = self.balance_biases()

    # ------------------------------------------------------------------ torch.compile

    def _compile_aware(self, hook: Callable, only_when_sampling: bool = False) -> Callable:
        """``hook`` as it is in eager mode. While torch.compile traces it, the compiler is handed its
        opaque twin to call instead (``_opaque_twin``; an opaque call costs more, so eager mode keeps
        the plain one). ``only_when_sampling``: a hook with nothing to do on unsampled forwards reads
        the ``_sampling`` flag while traced, so that the compiler guards on it and unsampled forwards
        run code without the call (and without its graph break)."""
        twin = self._opaque_twin(hook)

        def aware(*args, **kwargs):
            if is_compiling():
                if only_when_sampling and self.compiled and not self._sampling:
                    return None
                return twin(*args, **kwargs)
            return hook(*args, **kwargs)
        return aware

    def _opaque_twin(self, hook: Callable) -> Callable:
        """What compiled code calls in place of ``hook``: opaque to the compiler, so that the agent's
        Python runs as it is, on every call (traced, its decisions would be baked into the graph and
        its side effects replayed); its first call switches the capture to compiled mode, before the
        compiler traces what follows (the layers whose hooks it must see)."""
        def twin(*args, **kwargs):
            if not self.compiled:
                self._on_compile_guarded()
            return hook(*args, **kwargs)
        return _opaque(twin)

    # ------------------------------------------------------------------ the layer hooks

    def _router_hook(self, index: int):
        """Runs once per MoE layer in every summarized forward, so it carries
        its own guard (one Python frame less than ``Faults.guard``) and learns once
        where the router's output holds its int64 [T, K] indices."""
        layer = self.layers[index]
        where: list[Optional[int]] = [None]  # the indices' position in the output; -1: none
        tracked = layer.weight_EH is not None  # discovery found its [E, H] weight (else no cosines)
        position = self._position  # changed in place, once, by learn_order
        faults = self.faults
        counts = self.counts

        def hook(module, args, output):
            if is_compiling():  # see _compile_aware (inlined: this runs once per layer in every forward)
                if self.compiled and not self._sampling:
                    return None  # traced: a guard on the flag; unsampled forwards compile to no call here
                return twin(module, args, output)
            ctx = self._ctx
            if (ctx is None and not counts.active) or faults.disabled:
                return None  # not sampled nor counted, or an activation-checkpoint recompute in backward
            try:
                outputs = output if isinstance(output, (tuple, list)) else (output,)
                at = where[0]
                if at is None:
                    at = where[0] = next((i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)
                                          and t.dtype == torch.int64 and t.dim() == 2), -1)
                    if at >= 0:
                        self.needs_experts_hook[index] = False
                if counts.active:
                    if at >= 0:
                        counts.add(position[index], outputs[at])
                    else:  # the experts' pre-hook may give the ids; else the top-k of the scores (at forward end)
                        scores = outputs[layer.logits_index]
                        if self.needs_experts_hook[index] and not self._ids_not_in_experts[index]:
                            self._count_later[index] = scores.detach()
                        else:
                            counts.add_top_k(position[index], scores)
                if ctx is None:
                    return None
                # Without indices: the experts pre-hook, which runs next, supplies them (else top-k of p).
                weight = self.router_weights[index]
                current = layer.weight_now() if tracked else None
                if isinstance(current, torch.Tensor) and (current is not weight or self._copy_weight[index]):
                    # Parameters swapped in for the forward (FSDP unshards, then frees them when it
                    # reshards after the layer), or emptied after it (ZeRO-3): this forward's copy, if any.
                    weight = current.detach().clone() if usable_weight(current) else None
                gather_layer(ctx, position[index], outputs[layer.logits_index], outputs[at] if at >= 0 else None,
                             weight, self.shape.distribution, detect_probs=self.shape.detect_probs)
            except Exception as exc:  # never into the training loop
                faults.error(exc)  # the monitor's on_error drops the context
            return None
        twin = self._opaque_twin(hook)
        return hook

    def _experts_hook(self, index: int):
        """``experts(hidden[T,H], top_k_index[T,K], top_k_weights[T,K])``: the exact decision, for
        routers that do not return it (DeepSeek-V3 before transformers 5.13 selects with a bias)."""
        counts = self.counts

        def hook(module, args):
            ids = args[1] if len(args) >= 2 and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.int64 \
                else None
            if ids is None:
                return
            if counts.active and self._count_later[index] is not None:
                self._count_later[index] = None
                counts.add(self._position[index], ids)
            ctx = self._ctx
            if ctx is None or not ctx.pending:
                return
            gathered = ctx.pending[-1]
            if gathered.layer == self._position[index] and gathered.idx_MSK is None:
                attach_indices(ctx, gathered, ids)
        return hook

    def record(self, layer: int, *, logits: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
               topk: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
               router_weight: Optional[torch.Tensor] = None) -> None:
        """``Monitor.record``: a router's output given by hand."""
        if is_compiling():  # called from a router that torch.compile traces: see _compile_aware
            return self._record_twin(layer, logits=logits, probs=probs, topk=topk, router_weight=router_weight)
        return self._record(layer, logits=logits, probs=probs, topk=topk, router_weight=router_weight)

    def _record(self, layer: int, *, logits: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
                topk: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
                router_weight: Optional[torch.Tensor] = None) -> None:
        ctx = self._ctx
        if (ctx is None and not self.counts.active) or self.faults.disabled:
            return
        try:
            if self.counts.active:
                self._count_recorded(layer, logits, probs, topk)
            if ctx is None:
                return
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
                self.router_weights[layer] = router_weight
            if logits is not None:
                dist, x = self.shape.distribution, logits.reshape(-1, E)
            elif probs is not None:
                dist, x = "probs", probs.reshape(-1, E)
            else:
                assert topk is not None and ids is not None
                if topk[1] is None:
                    raise ValueError("record(topk=(ids, weights)) alone needs the weights (else pass logits=)")
                weights = topk[1].reshape(ids.shape).float()
                dense = torch.zeros(ids.shape[0], E, dtype=torch.float32, device=weights.device)
                dense = dense.scatter_(1, ids, weights)
                dist, x = "probs", dense / dense.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            gather_layer(ctx, layer, x, ids, self.router_weights[layer], dist, seq_len)
        except Exception as exc:
            self.faults.error(exc)

    def _count_recorded(self, layer: int, logits: Optional[torch.Tensor], probs: Optional[torch.Tensor],
                        topk: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]) -> None:
        """record()'s decision for the all-token counts: the ids given, else the top-k of the scores."""
        if topk is not None:
            self.counts.add(layer, topk[0], topk[1])
            return
        scores = logits if logits is not None else probs
        if scores is not None:
            self.counts.add_top_k(layer, scores)

    # ------------------------------------------------------------------ what a complete forward teaches

    def has_cosines(self) -> bool:
        """Every layer has a router weight (record() may supply them after attach())."""
        return self.shape.num_layers > 1 and all(w is not None for w in self.router_weights)

    def learn_order(self, ctx: BatchContext) -> None:
        """The first complete summarized forward called the routers in this order: from now on (this
        forward included) each ships under its place in the forward, so that layer l and l+1 are
        adjacent in the network (the cosines) whatever the order the model registered them in."""
        if self._order_learned:
            return
        self._order_learned = True
        called = [g.layer for g in ctx.pending]
        if called == sorted(called) or len(set(called)) != len(called):
            return
        index_at = {place: index for index, place in enumerate(self._position)}
        for place, gathered in enumerate(ctx.pending):
            self._position[index_at[gathered.layer]] = place
            gathered.layer = place
        self.counts.reorder(called)  # the counts so far, under the places the routers had until now
        log.info("grokwatch: the model calls its routers in another order than it registers them; layers "
                 "ship in forward order: %s", [self.layers[index_at[layer]].name for layer in called])

    def learn_freed_weights(self) -> None:
        """A router weight whose memory was freed by the end of the forward (FSDP resharded the copy given
        to record(); ZeRO-3 emptied the parameter): this message has no cosines; from the next on, the
        router hook or record() keeps a copy of it (E x H) on summarized forwards."""
        if all(self._copy_weight):
            return
        freed = [layer for layer, weight in enumerate(self.router_weights)
                 if not self._copy_weight[layer] and freed_weight(weight)]
        for layer in freed:
            self._copy_weight[layer] = True
        if freed:
            log.info("grokwatch: the router weights of layers %s were freed before the reduction (FSDP "
                     "resharding, ZeRO-3?): the agent keeps a copy of them on summarized forwards", freed)

    def renew_meta_weights(self) -> None:
        """Attached on the meta device: ``to_empty()`` made new parameters; the routers' current ones."""
        for i, layer in enumerate(self.layers):
            weight = self.router_weights[i]
            if isinstance(weight, torch.Tensor) and weight.is_meta and layer.router is not None:
                current = layer.weight_now()
                self.router_weights[i] = current if isinstance(current, torch.Tensor) and current.dim() == 2 else None

    def balance_biases(self) -> list[Optional[torch.Tensor]]:
        """Each layer's balancing bias [E] where its router keeps one (aux-loss-free routing: DeepSeek-V3's
        ``e_score_correction_bias``, Megatron-Core's ``expert_bias``), in forward order; read each time (a
        buffer is a new tensor after ``model.to``)."""
        out: list[Optional[torch.Tensor]] = [None] * len(self.layers)
        for index, layer in enumerate(self.layers):
            router = layer.router
            for name in BIAS_NAMES:
                bias = getattr(router, name, None) if router is not None else None
                if isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.numel() == self.shape.num_experts:
                    out[self._position[index]] = bias
                    break
        return out

    def router_device(self) -> Optional[torch.device]:
        """Where the routers run now: their first weight's device, read from the router (``model.to`` moves
        it in place; ``to_empty`` from the meta device puts a new parameter there). None: no weight known."""
        weight = self.layers[0].weight_now() if self.layers else None
        if not isinstance(weight, torch.Tensor):
            weight = self.router_weights[0] if self.router_weights else None
        return weight.device if isinstance(weight, torch.Tensor) else None
