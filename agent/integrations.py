"""Framework integrations. Hugging Face Trainer, in one line:

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GrokwatchCallback(endpoint="tcp://127.0.0.1:5557", run="olmoe-a")])
"""

from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback

from grokwatch.agent.monitor import Monitor, attach


# What the Trainer adds to every evaluation's metrics about itself, not the model ("eval_runtime", ...).
_BOOKKEEPING = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time",
                "jit_compilation_time")


def eval_scores(metrics: dict, eval_metric: Optional[str] = None) -> dict[str, float]:
    """An ``on_evaluate`` metrics dict as eval scores {group: score} (the wire's ``eval``).

    ``eval_metric`` names the score to forward: ``eval_<metric>`` goes out as group ``all`` (the
    group of untagged samples) and ``eval_<name>_<metric>`` as group ``<name>``: the Trainer's keys
    for an ``eval_dataset`` dict, one dataset per data group. Without it, every numeric metric but
    the Trainer's timings and ``epoch`` goes out under its name without ``eval_``."""
    scores = {}
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "epoch":
            continue
        name = key.removeprefix("eval_")
        if eval_metric is None:
            if not name.endswith(_BOOKKEEPING):
                scores[name] = float(value)
        elif name == eval_metric:
            scores["all"] = float(value)
        elif name.endswith("_" + eval_metric) and key.startswith("eval_"):
            scores[name[:-len(eval_metric) - 1]] = float(value)
    return scores


class GrokwatchCallback(TrainerCallback):
    """Attaches at train begin, follows ``state.global_step``, closes at the end.
    ``eval_metric`` (e.g. ``"accuracy"``, a key your ``compute_metrics`` returns): the held-out
    score forwarded per data group from each evaluation (``eval_scores``). Extra keyword
    arguments go to ``attach``."""

    def __init__(self, endpoint: Optional[str] = None, run: Optional[str] = None, *,
                 eval_metric: Optional[str] = None, **attach_kwargs):
        self.endpoint, self.run, self.attach_kwargs = endpoint, run, attach_kwargs
        self.eval_metric = eval_metric
        self.monitor: Optional[Monitor] = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.monitor is None and model is not None:
            self.monitor = attach(model, self.endpoint, self.run or args.run_name or "trainer", **self.attach_kwargs)
            self.monitor.step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.step(state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.monitor is not None and metrics:
            scores = eval_scores(metrics, self.eval_metric)
            if scores:
                self.monitor.log_eval(state.global_step, scores)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
