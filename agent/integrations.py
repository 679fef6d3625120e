"""Framework integrations. Hugging Face Trainer, in one line:

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[GrokwatchCallback(endpoint="tcp://127.0.0.1:5557", run="olmoe-a")])

Each of the Trainer's logs then also carries the router health of the steps since the last one
(``moe/<layer>/load_imbalance``, ... : agent/health.py), so every ``report_to`` backend shows it.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Callable, Optional

from transformers import TrainerCallback

from grokwatch.agent.attach import attach
from grokwatch.agent.capture import BATCH_TAGS
from grokwatch.agent.monitor import Monitor

log = logging.getLogger("grokwatch.agent")


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


def _value(x):
    """A tensor's or NumPy scalar's value (so that an id reads 7, not "tensor(7)")."""
    return x.tolist() if hasattr(x, "tolist") else x


def _rows(batch) -> Optional[int]:
    """The batch's rows: those of its input ids (or embeddings, or else its first array)."""
    arrays = [batch.get("input_ids"), batch.get("inputs_embeds"), *batch.values()]
    x = next((a for a in arrays if hasattr(a, "shape") and len(a.shape) >= 1), None)
    return int(x.shape[0]) if x is not None else None


class TaggingCollator:
    """A Trainer's data collator that also names the batch's rows: it takes each example's
    ``id_key`` and ``group_key`` out before the wrapped collator sees them, and puts them in the
    batch as plain lists under ``grokwatch_tags``. The Trainer hands them to the model's forward
    untouched (no device copy, no host sync); the agent's pre-hook takes them out of the forward's
    arguments and tags the forward (``Monitor.tag``). Strings, ints or anything ``str()`` reads;
    either key may be absent (groups alone: untagged ids; ids alone: group ``all``). When the wrapped
    collator packs the examples into one row (``DataCollatorWithFlattening``), they name that row's
    documents, in order.

    The Trainer drops example keys that the model's forward does not name before any collator
    runs, unless ``TrainingArguments(remove_unused_columns=False)``."""

    def __init__(self, collate_fn: Optional[Callable] = None, *, id_key: str = "sample_id", group_key: str = "group"):
        if collate_fn is None:
            from transformers import default_data_collator as collate_fn
        self.collate_fn, self.id_key, self.group_key = collate_fn, id_key, group_key

    def __call__(self, features):
        keys = (self.id_key, self.group_key)
        if not features or not all(isinstance(f, dict) for f in features) or not any(k in features[0] for k in keys):
            return self.collate_fn(features)
        # A key only some examples carry names none of them (never a KeyError in the user's DataLoader).
        ids = [_value(f[self.id_key]) for f in features] if all(self.id_key in f for f in features) else None
        groups = [_value(f[self.group_key]) for f in features] if all(self.group_key in f for f in features) else None
        batch = self.collate_fn([{k: v for k, v in f.items() if k not in keys} for f in features])
        if (ids is not None or groups is not None) and isinstance(batch, MutableMapping):
            rows = _rows(batch)
            if rows == len(features):
                batch[BATCH_TAGS] = (ids, groups)
            elif rows == 1:  # one packed row (DataCollatorWithFlattening): the examples are its documents
                batch[BATCH_TAGS] = ([ids] if ids is not None else None, [groups] if groups is not None else None)
        return batch


def _first_among_callbacks(callback) -> bool:
    """Move ``callback`` ahead of the Trainer's reporting callbacks (W&B, TensorBoard, ...): they are
    called in order with one ``logs`` dict, so only what a callback before them adds reaches them. The
    Trainer puts the user's callbacks last and hands a callback no reference to itself: the handler is
    the caller of this event (``CallbackHandler.call_event``). Returns whether it moved."""
    import sys

    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    frame = sys._getframe(2)  # _first_among_callbacks <- on_train_begin <- call_event
    handler = frame.f_locals.get("self") if frame is not None else None
    if not isinstance(handler, CallbackHandler) or callback not in handler.callbacks:
        return False
    handler.callbacks.remove(callback)
    at = next((i + 1 for i, c in enumerate(handler.callbacks) if isinstance(c, DefaultFlowCallback)), 0)
    handler.callbacks.insert(at, callback)
    return True


class GrokwatchCallback(TrainerCallback):
    """Attaches at train begin, follows ``state.global_step``, closes at the end.
    ``eval_metric`` (e.g. ``"accuracy"``, a key your ``compute_metrics`` returns): the held-out
    score forwarded per data group from each evaluation (``eval_scores``). ``log_router_health``
    (default on): each of the Trainer's logs carries the router health since the last one (agent/health.py),
    for every ``report_to`` backend. Extra keyword arguments go to ``attach``."""

    def __init__(self, endpoint: Optional[str] = None, run: Optional[str] = None, *,
                 eval_metric: Optional[str] = None, log_router_health: bool = True, **attach_kwargs):
        self.endpoint, self.run, self.attach_kwargs = endpoint, run, attach_kwargs
        self.eval_metric = eval_metric
        self.log_router_health = log_router_health
        self.monitor: Optional[Monitor] = None
        self._collators = 0

    def collator(self, collate_fn: Optional[Callable] = None, *, id_key: str = "sample_id",
                 group_key: str = "group") -> TaggingCollator:
        """``Trainer(data_collator=callback.collator(your_collator), ...)``: rows named by each example's
        ``sample_id`` and ``group`` (see ``TaggingCollator``; needs ``remove_unused_columns=False``)."""
        self._collators += 1
        return TaggingCollator(collate_fn, id_key=id_key, group_key=group_key)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._collators and getattr(args, "remove_unused_columns", False):
            log.warning("grokwatch: TrainingArguments(remove_unused_columns=True) drops the examples' sample id "
                        "and group before the collator sees them: samples go out untagged. Set it to False.")
        if self.monitor is None and model is not None:
            self.monitor = attach(model, self.endpoint, self.run or args.run_name or "trainer", **self.attach_kwargs)
            self.monitor.step(state.global_step)
        if self.log_router_health:
            if self.monitor is not None:
                self.monitor.router_health()  # the first read turns the sums on (agent/health.py)
            try:
                if not _first_among_callbacks(self):
                    log.warning("grokwatch: could not run before the Trainer's reporting callbacks; router health "
                                "reaches only those after GrokwatchCallback")
            except Exception as exc:  # never into the training loop
                log.warning("grokwatch: router health in the Trainer's logs is off (%s)", exc)
                self.log_router_health = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.step(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The training loss the Trainer logs (every ``logging_steps``, already a number): the loss
        evidence of the train source's phases (one group per run unless rows are tagged with one group)."""
        if self.monitor is not None and logs and "loss" in logs and "eval_loss" not in logs:
            self.monitor.log_loss(state.global_step, logs["loss"])
            if self.log_router_health:
                logs.update(self.monitor.router_health())

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.monitor is not None and metrics:
            scores = eval_scores(metrics, self.eval_metric)
            if scores:
                self.monitor.log_eval(state.global_step, scores)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
