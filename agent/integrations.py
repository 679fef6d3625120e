"""Framework integrations. Hugging Face Trainer, in one line:

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GrokwatchCallback(endpoint="tcp://127.0.0.1:5557", run="olmoe-a")])
"""

from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback

from grokwatch.agent.monitor import Monitor, attach


class GrokwatchCallback(TrainerCallback):
    """Attaches at train begin, follows ``state.global_step``, closes at the end.
    Extra keyword arguments go to ``attach``."""

    def __init__(self, endpoint: Optional[str] = None, run: Optional[str] = None, **attach_kwargs):
        self.endpoint, self.run, self.attach_kwargs = endpoint, run, attach_kwargs
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
            scores = {k.removeprefix("eval_"): v for k, v in metrics.items()
                      if isinstance(v, (int, float)) and k not in ("epoch",)}
            self.monitor.log_eval(state.global_step, scores)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
