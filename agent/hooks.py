"""The Monitor's hooks: what runs on the training thread inside the model's forward.

Two hooks stay on the model (its forward pre-hook picks the rows to summarize and builds the
batch's context; its forward hook hands the finished context to ``Monitor.finalize``); the
per-layer hooks (router forward hook, experts forward pre-hook) are armed only for summarized
forwards and keep device tensors for the reduction (reduce.py). Under torch.compile each hook is
handed to the compiler as an opaque twin. Every hook catches its own errors: none reaches the
training loop.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import nn

from grokwatch.agent.reduce import (
    BatchContext,
    _is_compiling,
    attach_indices,
    build_context,
    gather_layer,
    token_mask,
    usable_weight,
)

log = logging.getLogger("grokwatch.agent")

# A batch's (sample ids, groups) as plain lists under this key (integrations.TaggingCollator): the model's
# pre-hook takes them out of the forward's kwargs and tags the forward with them.
BATCH_TAGS = "grokwatch_tags"

# Under torch.compile the agent's hooks are made opaque to the compiler: what it compiles calls them as
# they are, on every call (a traced hook would have its decisions baked into the graph and its side
# effects replayed). Only then: an opaque function costs ~0.7 us a call more in eager mode.
_opaque = getattr(getattr(torch, "compiler", None), "disable", None) or (lambda fn: fn)


def _is_compiled_module(module: nn.Module) -> bool:
    """A torch.compile wrapper (``torch.compile(m)``) or a module compiled in place (``m.compile()``)."""
    return isinstance(getattr(module, "_orig_mod", None), nn.Module) or \
        getattr(module, "_compiled_call_impl", None) is not None


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _first_tensor(args, kwargs, name, position):
    value = kwargs.get(name)
    if value is None and len(args) > position:
        value = args[position]
    return value if isinstance(value, torch.Tensor) else None


class ForwardHooks:
    """The hook half of ``Monitor`` (a mixin: the router hook runs once per MoE layer in every
    summarized forward, so it reads the monitor's state directly). Uses the Monitor's ``model``,
    ``config``, ``shape``, ``layers``, ``sampler``, ``staging``, ``sender``, ``probe``, ``device``,
    router-weight state, ``finalize`` and ``_follow_device``."""

    def _install_model_hooks(self) -> None:
        """Two hooks stay on the model. The per-layer hooks are armed only for
        the forwards we summarize: a module with hooks takes torch's slow call
        path, which on unsampled steps would be pure cost. At
        ``every_n_steps=1`` they stay armed (``_keep_armed``)."""
        h = self._handles
        pre = self._compile_aware(self._guard(self._on_forward_start))
        post = self._compile_aware(self._guard(self._on_forward_end), only_when_sampling=True)
        h.append(self.model.register_forward_pre_hook(pre, with_kwargs=True))
        h.append(self.model.register_forward_hook(post, with_kwargs=True))

    def _set_ctx(self, ctx: Optional[BatchContext]) -> None:
        self._ctx = ctx
        self._sampling = ctx is not None

    def _compile_aware(self, hook: Callable, only_when_sampling: bool = False) -> Callable:
        """``hook`` as it is in eager mode. While torch.compile traces it, the compiler is handed its
        opaque twin to call instead (``_opaque_twin``; an opaque call costs ~0.7 us more, so eager
        mode keeps the plain one). ``only_when_sampling``: a hook with nothing to do on unsampled
        forwards reads the ``_sampling`` flag while traced, so that the compiler guards on it and
        unsampled forwards run code without the call (and without its graph break)."""
        twin = self._opaque_twin(hook)

        def aware(*args, **kwargs):
            if _is_compiling():
                if only_when_sampling and self._compiled and not self._sampling:
                    return None
                return twin(*args, **kwargs)
            return hook(*args, **kwargs)
        return aware

    def _opaque_twin(self, hook: Callable) -> Callable:
        """What compiled code calls in place of ``hook``: opaque to the compiler, so that the agent's
        Python runs as it is, on every call (traced, its decisions would be baked into the graph and
        its side effects replayed); its first call switches the monitor to compiled mode, before the
        compiler traces what follows (the layers whose hooks it must see)."""
        def twin(*args, **kwargs):
            if not self._compiled:
                self._on_compile_guarded()
            return hook(*args, **kwargs)
        return _opaque(twin)

    def _on_compile(self) -> None:
        """Compiled code does not see hooks added or removed after it was traced (dynamo skips hook
        guards by default): the layer hooks are armed now and stay armed."""
        if not self._compiled:
            self._compiled = self._keep_armed = True
            log.info("grokwatch: the model is compiled with torch.compile; the router hooks stay armed")
        self._arm_layers()

    def _arm_layers(self) -> None:
        if self._layer_handles:
            return
        h = self._layer_handles
        self._armed_experts = list(self._needs_experts_hook)
        for i, layer in enumerate(self.layers):
            if layer.router is not None:
                # First among the router's hooks: before one that releases its parameters (ZeRO-3's post-hook).
                h.append(layer.router.register_forward_hook(self._layer_hooks[i][0], prepend=True))
            if layer.experts is not None and self._needs_experts_hook[i]:
                h.append(layer.experts.register_forward_pre_hook(self._layer_hooks[i][1]))

    def _disarm_layers(self) -> None:
        for handle in self._layer_handles:
            handle.remove()
        self._layer_handles.clear()

    def _remove_model_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._disarm_layers()
        self._set_ctx(None)

    def _guard(self, fn: Callable) -> Callable:
        def hook(*args, **kwargs):
            if self.disabled:  # also set in a forked child (register_at_fork)
                return None
            try:
                fn(*args, **kwargs)
            except Exception as exc:  # never into the training loop
                self._hook_error(exc)
            return None
        return hook

    def _hook_error(self, exc: BaseException) -> None:
        self._hook_errors += 1
        self.sender.hook_errors = self._hook_errors
        self._set_ctx(None)
        if not self._logged_error:
            self._logged_error = True
            log.warning("grokwatch: error inside a hook (counted; training goes on): %r", exc, exc_info=exc)
        if self._hook_errors >= self.config.max_hook_errors:
            log.warning("grokwatch: %d hook errors; monitor disabled", self._hook_errors)
            self._disable()

    def _on_forward_start(self, module, args, kwargs) -> None:
        tags = kwargs.pop(BATCH_TAGS, None)  # in place: the model never sees it
        if self._probe_active:
            return  # the probe has built its own context
        self._set_ctx(None)
        if not self._active:
            return  # paused or closed: compiled code may still call a hook it captured
        if self._layer_handles and not self._keep_armed:
            self._disarm_layers()  # a forward that raised before its end hook
        if not (torch.is_grad_enabled() and module.training):
            return  # the user's own eval forwards are not ours to summarize
        if tags is not None:
            self.sampler.tag(*tags)
        self._forward_since_step = self._seen_forward = True
        step = self._step
        if not self.sampler.has_budget(step):
            return  # not a summarized step, or its samples are taken (gradient accumulation)
        input_ids = _first_tensor(args, kwargs, "input_ids", 0)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None or ref.dim() < 2 or (ref.device != self.device and ref.device == self._model_device()
                                            and not self._follow_device(ref.device)):
            self.sampler.drop_tag()
            return
        num_rows, seq_len = int(ref.shape[0]), int(ref.shape[1])
        if not self._ranks_known and _distributed():
            self._learn_ranks()
        rows, ids, groups = self.sampler.choose(step, num_rows)
        mask_BS = token_mask(kwargs.get("attention_mask"), seq_len)  # a 3-d/4-d mask: which tokens count
        self._set_ctx(self._context("train", step, rows, ids, groups, num_rows, seq_len, mask_BS,
                                    kwargs.get("position_ids"), self.sampler.chosen_docs))
        self._arm_layers()
        if self.probe is not None and input_ids is not None:
            self.probe.remember(input_ids, mask_BS, rows, ids, groups)

    def _context(self, source, step, rows, ids, groups, num_rows, seq_len, attention_mask, position_ids,
                 docs=None):
        """``docs``: (ids or None, groups) of each row's documents, in order, when the tag named them: a
        packed row's document d goes out under its own name (else "<row id>#d" and the row's group)."""
        D = self.config.max_docs_per_sample
        slot_ids = [""] * self.slots
        slot_groups = ["all"] * self.slots
        packed = position_ids is not None and D > 1
        doc_ids, doc_groups = docs if packed and docs is not None else (None, None)
        for m, r in enumerate(rows):
            for d in range(D if packed else 1):
                named = doc_groups is not None and d < len(doc_groups[r])
                slot_ids[m * D + d] = (doc_ids[r][d] if named and doc_ids is not None
                                       else f"{ids[r]}#{d}" if packed and d else str(ids[r]))
                slot_groups[m * D + d] = doc_groups[r][d] if named else str(groups[r])
        return build_context(source=source, step=step, attention_mask_BS=attention_mask,
                             position_ids_BS=position_ids if packed else None, num_rows=num_rows,
                             seq_len=seq_len, rows=rows, max_rows=self.config.max_samples_per_step,
                             docs_per_row=D, device=self.device, sample_ids=slot_ids, groups=slot_groups,
                             staging=self.staging)

    def _router_hook(self, index: int):
        """Runs once per MoE layer in every summarized forward, so it carries
        its own guard (one Python frame less than ``_guard``) and learns once
        where the router's output holds its int64 [T, K] indices."""
        layer = self.layers[index]
        where: list[Optional[int]] = [None]  # the indices' position in the output; -1: none
        tracked = layer.weight_EH is not None  # discovery found its [E, H] weight (else no cosines)
        position = self._position  # changed in place, once, by _learn_order

        def hook(module, args, output):
            if _is_compiling():  # see _compile_aware (inlined: this runs once per layer in every forward)
                if self._compiled and not self._sampling:
                    return None  # traced: a guard on the flag; unsampled forwards compile to no call here
                return twin(module, args, output)
            ctx = self._ctx
            if ctx is None or self.disabled:
                return None  # not sampled, or an activation-checkpoint recompute in backward
            try:
                outputs = output if isinstance(output, (tuple, list)) else (output,)
                at = where[0]
                if at is None:
                    at = where[0] = next((i for i, t in enumerate(outputs) if isinstance(t, torch.Tensor)
                                          and t.dtype == torch.int64 and t.dim() == 2), -1)
                    if at >= 0:
                        self._needs_experts_hook[index] = False
                # Without indices: the experts pre-hook, which runs next, supplies them (else top-k of p).
                weight = self._router_weights[index]
                current = layer.weight_now() if tracked else None
                if isinstance(current, torch.Tensor) and (current is not weight or self._copy_weight[index]):
                    # Parameters swapped in for the forward (FSDP unshards, then frees them when it
                    # reshards after the layer), or emptied after it (ZeRO-3): this forward's copy, if any.
                    weight = current.detach().clone() if usable_weight(current) else None
                gather_layer(ctx, position[index], outputs[layer.logits_index], outputs[at] if at >= 0 else None,
                             weight, self.shape.distribution, detect_probs=self.shape.detect_probs)
            except Exception as exc:  # never into the training loop
                self._hook_error(exc)
            return None
        twin = self._opaque_twin(hook)
        return hook

    def _experts_hook(self, index: int):
        """``experts(hidden[T,H], top_k_index[T,K], top_k_weights[T,K])``: the exact decision, for
        routers that do not return it (DeepSeek-V3 before transformers 5.13 selects with a bias)."""
        def hook(module, args):
            ctx = self._ctx
            if ctx is None or len(args) < 2 or not isinstance(args[1], torch.Tensor) or not ctx.pending:
                return
            gathered = ctx.pending[-1]
            if gathered.layer == self._position[index] and gathered.idx_MSK is None and args[1].dtype == torch.int64:
                attach_indices(ctx, gathered, args[1])
        return hook

    def _on_forward_end(self, module, args, kwargs, output) -> None:
        ctx = self._ctx
        if ctx is not None and not ctx.deferred:
            if not self._keep_armed or (self._armed_experts != self._needs_experts_hook and not self._compiled):
                self._disarm_layers()  # before a checkpointed backward recomputes the routers
            self.finalize(ctx)
