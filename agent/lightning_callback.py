"""PyTorch Lightning, in one line:

    trainer = L.Trainer(..., callbacks=[GrokwatchLightningCallback(endpoint="tcp://127.0.0.1:5557",
                                                                   run="olmoe-a")])

Every ``log_every_n_steps`` the router health of the steps since (``moe/<layer>/load_imbalance``, ... :
agent/health.py) goes to the Trainer's loggers through ``pl_module.log_dict``.

Lightning calls ``training_step`` itself, not the LightningModule's forward, so the agent's hooks go
on the model that ``training_step`` calls: the outermost transformers ``PreTrainedModel`` inside the
LightningModule, or the submodule named by ``model_attr``.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from grokwatch.agent.attach import attach
from grokwatch.agent.monitor import Monitor


def monitored_module(pl_module: nn.Module, model_attr: Optional[str] = None) -> nn.Module:
    """The module whose forward gets the batch: ``model_attr`` (dotted) if given, else the outermost
    transformers model inside ``pl_module``, else ``pl_module`` itself (its forward, if
    ``training_step`` calls ``self(...)``)."""
    if model_attr:
        return operator.attrgetter(model_attr)(pl_module)
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return pl_module
    return next((m for _, m in pl_module.named_modules() if isinstance(m, PreTrainedModel)), pl_module)


class GrokwatchLightningCallback(Callback):
    """Attaches at fit start, follows ``trainer.global_step``, closes at fit end (or on an exception).
    ``eval_scores`` maps a data group to the logged metric that is its held-out score
    (``{"math": "val/math_acc"}``): sent after each validation, sanity checks excepted. Name rows
    with ``TaggingCollator`` as the DataLoaders' ``collate_fn`` (``training_step`` must call
    ``model(**batch)``). ``log_router_health`` (default on): router health into the Trainer's loggers.
    Extra keyword arguments go to ``attach``."""

    def __init__(self, endpoint: Optional[str] = None, run: Optional[str] = None, *,
                 model_attr: Optional[str] = None, eval_scores: Optional[dict[str, str]] = None,
                 log_router_health: bool = True, **attach_kwargs):
        self.endpoint, self.run, self.model_attr = endpoint, run, model_attr
        self.log_router_health = log_router_health
        self.eval_scores = dict(eval_scores or {})
        self.attach_kwargs = attach_kwargs
        self.monitor: Optional[Monitor] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.monitor is None:
            model = monitored_module(pl_module, self.model_attr)
            self.monitor = attach(model, self.endpoint, self.run or type(pl_module).__name__, **self.attach_kwargs)
            self.monitor.step(trainer.global_step)
            if self.log_router_health:
                self.monitor.router_health()  # the first read turns the sums on (agent/health.py)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is not None:
            # The step's loss (what training_step returned) is the phases' loss evidence: detached by the
            # agent and read on its sender thread, on the sampled steps only.
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.monitor.step(trainer.global_step, loss=loss if isinstance(loss, torch.Tensor) else None)
            every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
            if self.log_router_health and trainer.global_step % every == 0:
                health = self.monitor.router_health()
                if health:
                    pl_module.log_dict(health, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.monitor is None or trainer.sanity_checking or not self.eval_scores:
            return
        metrics = trainer.callback_metrics
        scores = {group: metrics[key] for group, key in self.eval_scores.items() if key in metrics}
        if scores:
            self.monitor.log_eval(trainer.global_step, scores)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
