"""The Monitor (``attach()`` returns it, attach.py): its life (install, steps, close), the public
calls, and which training forwards are summarized (what follows one: summaries.py).

Threads: every hook (capture.py) runs on the training thread and only enqueues device work
(gather.py, reduce.py); encoding and sending happen on the sender thread (sender.py). After ``attach()``
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

from grokwatch.agent.capture import Capture, Faults, is_compiled_module
from grokwatch.agent.config import AgentConfig
from grokwatch.agent.counts import ExpertCounts
from grokwatch.agent.discover import MoEShape
from grokwatch.agent.layout import BatchContext, token_mask
from grokwatch.agent.sampling import Sampler
from grokwatch.agent.sender import Sender
from grokwatch.agent.staging import Staging
from grokwatch.agent.status import Identity
from grokwatch.agent.summaries import Summaries, staging_on

log = logging.getLogger("grokwatch.agent")

# Optimizer steps with no training forward of the attached model seen, before one warning: its forward is
# called around the module hooks (model.forward(...)), or the wrong module was attached. Other models'
# optimizers in the same process count too, hence not at the first.
STEPS_BEFORE_UNSEEN_WARNING = 20


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _first_tensor(args, kwargs, name, position):
    value = kwargs.get(name)
    if value is None and len(args) > position:
        value = args[position]
    return value if isinstance(value, torch.Tensor) else None


def _parameter_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _fork_handler(ref: "weakref.ref[Monitor]"):
    """What a forked child runs for the monitor behind ``ref``, if it still exists."""
    def after_in_child() -> None:
        mon = ref()
        if mon is not None:
            mon._after_fork()
    return after_in_child


class Monitor:
    """Returned by ``attach``. Public: tag, step, log_loss, log_eval, record, run_probe, pause, resume, close,
    stats; ``capture`` is its hooks' state (capture.py)."""

    def __init__(self, model: nn.Module, config: AgentConfig, shape: MoEShape,
                 router_weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 probe_fn: Optional[Callable] = None, layer_names: Optional[Sequence[str]] = None):
        self.model = model
        self.config = config
        self.shape = shape
        self._ranks_known = _distributed()  # else learned once it is (_learn_ranks)
        self.identity = Identity()  # rank and world size: one owner, read by the sampler and the sender
        if self._ranks_known:
            self.identity = Identity(torch.distributed.get_rank(), torch.distributed.get_world_size())
        self.sampler = Sampler(every_n_steps=config.every_n_steps, max_samples_per_step=config.max_samples_per_step,
                               identity=self.identity)
        self.faults = Faults(config.max_hook_errors, on_error=self._on_fault, on_disable=self._disable)
        self.capture = Capture(model, shape, self.faults,
                               router_weights=(list(router_weights) if router_weights is not None
                                               else [layer.weight_EH for layer in shape.layers]),
                               keep_armed=config.every_n_steps == 1,
                               counts=ExpertCounts(shape.num_layers, shape.num_experts, shape.top_k,
                                                   config.expert_counts, config.expert_count_groups),
                               on_forward_start=self._on_forward_start,
                               on_forward_done=self._forward_done)
        device = _parameter_device(model)
        staging = staging_on(config, shape, device)
        self.sender = Sender(endpoint=config.endpoint, run=config.run,
                             num_layers=shape.num_layers, num_experts=shape.num_experts, top_k=shape.top_k,
                             distribution="sigmoid" if shape.distribution == "sigmoid" else
                             ("topk" if shape.distribution == "topk" else "softmax"),
                             identity=self.identity, faults=self.faults, has_cosines=self.capture.has_cosines,
                             staging=staging, queue_size=config.queue_size,
                             sndhwm=config.sndhwm, heartbeat_interval_s=config.heartbeat_interval_s,
                             layer_names=layer_names, curve=config.curve_keys())
        self.summaries = Summaries(config, shape, self.sender, staging, device)
        self._step = 0
        self._manual_step = False
        self._forward_since_step = False  # a training forward ran since the last counted optimizer step
        self._seen_forward = False  # one ever ran (else, after some optimizer steps, a warning)
        self._steps_unseen = 0
        self._non_finite_scores = 0  # log_eval() scores left out of their message
        self._unattributed_losses = 0  # step(loss=a scalar) over rows of several groups: not sent
        from grokwatch.agent.probe import Probe

        self.probe = Probe(self, config.probe_size, probe_fn) if config.probe_size else None
        self._install()
        if any(is_compiled_module(m) for m in model.modules()):
            self.capture.on_compile()  # compiled before attach: arm now, so that the first trace includes the hooks

    @property
    def disabled(self) -> bool:
        return self.faults.disabled

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self.faults.disabled = value

    def _forward_done(self, ctx: BatchContext) -> None:
        self.summaries.finalize(ctx)

    def _on_fault(self, count: int) -> None:
        self.capture.set_ctx(None)  # the count is the faults' own (the sender's heartbeats read it there)

    @property
    def rank(self) -> int:
        return self.identity.rank

    @property
    def world_size(self) -> int:
        return self.identity.world_size

    # ------------------------------------------------------------------ life

    def _install(self) -> None:
        self.capture.install()
        self._step_handle = torch_optimizer.register_optimizer_step_post_hook(
            self.faults.guard(self._on_optimizer_step))
        if hasattr(os, "register_at_fork"):
            # Through a weak reference: a fork handler cannot be unregistered, and a bound method would keep a
            # closed monitor, and its model, alive for the life of the process (issue 29).
            os.register_at_fork(after_in_child=_fork_handler(weakref.ref(self)))
        self._pid = os.getpid()
        _open_monitors.add(self)

    def _learn_ranks(self) -> None:
        """torch.distributed was initialized after attach() (checked on summarized forwards until it is, or
        until the first optimizer step): from now on this rank sends under its rank, and its untagged ids
        carry it (else every rank would ship rank 0 and the same ids for different samples)."""
        self._ranks_known = True
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if (rank, world) != (self.rank, self.world_size):
            self.identity.rank, self.identity.world_size = rank, world
            self.sender.introduce()
            log.info("grokwatch: torch.distributed was initialized after attach(); this agent is rank %d of %d",
                     rank, world)

    def _after_fork(self) -> None:
        self.disabled = True  # a forked DataLoader worker never touches the parent's socket

    def _disable(self) -> None:
        self.capture.remove()  # the faults say disabled (the sender's heartbeats read it there)
        self._step_handle.remove()

    # ------------------------------------------------------------------ which forwards are summarized

    @property
    def staging(self) -> Staging:
        return self.summaries.staging

    @property
    def device(self) -> torch.device:
        return self.summaries.device

    @device.setter
    def device(self, device: torch.device) -> None:
        self.summaries.device = device

    def _model_device(self) -> torch.device:
        return self.capture.router_device() or _parameter_device(self.model)

    def _on_forward_start(self, module, args, kwargs, tags) -> Optional[BatchContext]:
        """A training forward begins (Capture's pre-hook): its context if it is summarized, else None."""
        if tags is not None:
            self.sampler.tag(*tags)
        if self.capture.counts.active:  # the all-token counts split by this forward's row groups
            ref = _first_tensor(args, kwargs, "input_ids", 0)
            ref = ref if ref is not None else kwargs.get("inputs_embeds")
            if isinstance(ref, torch.Tensor) and ref.dim() >= 2:
                self.capture.counts.tag_rows(self.sampler.forward_groups(), int(ref.shape[0]), ref.device)
        self._forward_since_step = self._seen_forward = True
        step = self._step
        if not self.sampler.has_budget(step):
            return None  # not a summarized step, or its samples are taken (gradient accumulation)
        input_ids = _first_tensor(args, kwargs, "input_ids", 0)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None or ref.dim() < 2 or (ref.device != self.device and ref.device == self._model_device()
                                            and not self._follow(ref.device)):
            self.sampler.drop_tag()
            return None
        num_rows, seq_len = int(ref.shape[0]), int(ref.shape[1])
        if not self._ranks_known and _distributed():
            self._learn_ranks()
        rows, ids, groups = self.sampler.choose(step, num_rows)
        mask_BS = token_mask(kwargs.get("attention_mask"), seq_len)  # a 3-d/4-d mask: which tokens count
        if self.probe is not None and input_ids is not None:
            self.probe.remember(input_ids, mask_BS, rows, ids, groups)
        return self.summaries.context("train", step, rows, ids, groups, num_rows, seq_len, mask_BS,
                                      kwargs.get("position_ids"), self.sampler.chosen_docs)

    def _follow(self, device: torch.device) -> bool:
        """The inputs moved to another device than at attach(): the summaries' buffers follow (Summaries.follow),
        then the routers' weights are read anew (a model attached on the meta device has new ones)."""
        if not self.summaries.follow(device):
            return False
        self.capture.renew_meta_weights()
        return True

    def _on_optimizer_step(self, optimizer, args, kwargs) -> None:
        """Counts training steps: the first optimizer step after a training forward of the model (several
        optimizers, e.g. experts and the rest at their own learning rates, are one step; another model's
        optimizer is none). While paused the forwards are not seen: every optimizer step counts."""
        if self._seen_forward:
            # A process group starts before training does: stop looking for one (a check is not free, and
            # would run every step).
            self._ranks_known = True
        elif self.capture.active:
            self._steps_unseen += 1
            if self._steps_unseen == STEPS_BEFORE_UNSEEN_WARNING:
                log.warning("grokwatch: %d optimizer steps and no training forward of the attached %s: nothing is "
                            "summarized. Is its forward called directly (model.forward(...) skips module hooks), "
                            "or is another module the one that trains?", self._steps_unseen, type(self.model).__name__)
        if self._manual_step or (self.capture.active and not self._forward_since_step):
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
            self.faults.error(exc)

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
            self.faults.error(exc)

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
            self.faults.error(exc)

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
            self.faults.error(exc)

    def record(self, layer: int, *, logits: Optional[torch.Tensor] = None, probs: Optional[torch.Tensor] = None,
               topk: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None,
               router_weight: Optional[torch.Tensor] = None) -> None:
        """For models we do not auto-detect: call from the router's forward with
        the router's output for MoE layer ``layer`` (0-based, forward order).
        ``logits`` [T,E] (or [B,S,E]), or ``probs`` [T,E], or ``topk=(ids [T,K],
        weights [T,K])`` alone; ``router_weight`` [E,H] enables cosines."""
        self.capture.record(layer, logits=logits, probs=probs, topk=topk, router_weight=router_weight)

    def probe_fresh(self, samples) -> None:
        """Fresh documents for the transfer metric (METRICS.md §6): ``(id, group, token_ids)`` triples of a
        small slice of each group that training has not seen (held back, or a first showing). Each probe round
        routes them after the group's training samples; the collector journals, per group and round, the
        train–fresh routing discrepancy E with its permutation z-score and the fresh-loss gap. Needs the probe
        (``probe_every_n_steps``); without it, a warning and nothing else."""
        try:
            if self.probe is None:
                log.warning("grokwatch: probe_fresh() needs the probe (attach(probe_every_n_steps=...)); ignored")
                return
            self.probe.set_fresh(samples)
        except Exception as exc:
            self.faults.error(exc)

    def run_probe(self, step: Optional[int] = None) -> None:
        if self.probe is not None and not self.disabled:
            self.probe.run(self._step if step is None else int(step))

    def router_health(self) -> dict[str, float]:
        """Router health of the training steps shipped since the last call, for the framework's own logs
        (agent/health.py: ``moe/<layer>/load_imbalance``, ``moe/load_imbalance_max``, ...); {} when none was
        shipped since, or on any error (never raises)."""
        try:
            return self.sender.health.read()
        except Exception as exc:
            self.faults.error(exc)
            return {}

    def stats(self) -> dict:
        reduction = self.summaries.reduction
        return dict(step=self._step, sent=self.sender.sent, dropped=dict(self.sender.dropped),
                    hook_errors=self.faults.count, disabled=self.disabled,
                    mismatched_tags=self.sampler.mismatched_tags, non_finite_scores=self._non_finite_scores,
                    unattributed_losses=self._unattributed_losses,
                    reduction="op by op" if reduction is None else reduction.state,
                    reduction_compile_s=None if reduction is None else reduction.compile_seconds,
                    reduction_batches=self.summaries.last_batches)

    def pause(self) -> None:
        """Remove the model hooks (the step count goes on); ``resume()`` puts them back."""
        self.capture.active = False
        self.capture.remove()

    def resume(self) -> None:
        if not self.capture.installed and not self.disabled:
            self.capture.install()
        self.capture.active = True

    def close(self) -> None:
        """Remove the hooks and flush with a bounded wait. Never raises. Also run at interpreter exit for a
        monitor left open (a script that ends, or dies of an exception, without close()): what is queued
        still goes out, with the last heartbeat. In a forked child it only removes the hooks: the socket
        and its I/O thread belong to the parent."""
        _open_monitors.discard(self)
        try:
            self.capture.active = False
            self.capture.remove()
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
