"""An accelerate tracker (issue 32): ``Accelerator(log_with=[GrokwatchTracker(monitor), "wandb"])`` turns what the
training loop already logs into grokwatch's evidence —

    accelerator.log({"loss": loss.item(), "eval/math": acc_math, "eval/code": acc_code}, step=step)

sends ``loss`` as the training loss at ``step`` (the phases' loss evidence) and each ``eval/<group>`` as that
data group's held-out score (ground truth; ``Monitor.log_eval``). Router health goes the other way, into
the trackers listed after it: each log that carries the loss also gets the router health of the steps shipped
since the previous one (agent/health.py ``moe/...`` keys, added to the logged dict, which accelerate hands to its
trackers in ``log_with``'s order — so list this tracker first; ``router_health=False`` turns it off). Elsewhere:
``accelerator.log({**metrics, **monitor.router_health()}, step=step)``.
"""

from __future__ import annotations

import math
from typing import Optional

from accelerate.tracking import GeneralTracker

from grokwatch.agent.monitor import Monitor

EVAL_PREFIX = "eval/"


class GrokwatchTracker(GeneralTracker):
    name = "grokwatch"
    requires_logging_directory = False
    main_process_only = False  # every rank has its own monitor (and its own loss)

    def __init__(self, monitor: Monitor, loss_key: str = "loss", eval_prefix: str = EVAL_PREFIX,
                 router_health: bool = True):
        super().__init__()
        self.monitor, self.loss_key, self.eval_prefix = monitor, loss_key, eval_prefix
        self.router_health = router_health
        if router_health:
            monitor.router_health()  # the first read turns the sums on (agent/health.py)

    @property
    def tracker(self) -> Monitor:
        return self.monitor

    def store_init_configuration(self, values: dict) -> None:
        pass  # hyperparameters are the other trackers' business

    def log(self, values: dict, step: Optional[int] = None, **kwargs) -> None:
        """Never raises (the monitor's calls do not): a value that is not a finite number is left out."""
        if step is None:
            return  # evidence needs a step
        loss = values.get(self.loss_key)
        if hasattr(loss, "detach"):  # a tensor: read on the sender thread (no device sync here), non-finite dropped
            self.monitor.log_loss(int(step), loss)
        elif isinstance(loss, (int, float)) and _finite(loss):
            self.monitor.log_loss(int(step), float(loss))
        scores = {k[len(self.eval_prefix):]: float(v) for k, v in values.items()
                  if isinstance(k, str) and k.startswith(self.eval_prefix) and len(k) > len(self.eval_prefix)
                  and _finite(v)}  # scores come after an evaluation, outside the step: a tensor is read here
        if scores:
            self.monitor.log_eval(int(step), scores)
        if self.router_health and loss is not None and isinstance(values, dict):
            values.update(self.monitor.router_health())  # for the trackers after this one

    def finish(self) -> None:
        pass  # the monitor is the user's to close (it may outlive the trackers)


def _finite(value) -> bool:
    """A finite number (a one-element tensor or NumPy scalar read); anything else, or a read that fails, is not."""
    try:
        if hasattr(value, "item"):
            value = value.item()
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except Exception:
        return False
