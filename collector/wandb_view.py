"""Weights & Biases view: each run's pathway metrics, phases, eval scores and router health as a W&B run,
step-aligned, beside collector/tensorboard.py (the same series and tags: collector/scalars.py).

- **Step-aligned**: every row carries ``grokwatch/step`` (the training step) and every key is defined on it
  (``define_metric("*", step_metric="grokwatch/step")``), so W&B draws the series against the training step,
  not the wall clock or its own row counter. Each interval logs one row per (run, step) with the points that
  moved since the previous interval.
- **Which W&B run**: ``wandb_run_id`` (default ``grokwatch-{run}``; ``{run}`` and ``{host}`` are substituted)
  with ``resume="allow"``, so a restarted collector appends to the same W&B run, and a training job whose own
  W&B run has that id is joined (``wandb_run_id = "{run}"`` when the job names its W&B run after its grokwatch
  run). One collector a W&B run: on a multi-node DaemonSet give each node its own id (``{run}-{host}``) or set
  ``wandb_dir`` on one collector only. An own run records the training's W&B run, where the agent's hello
  names one (agent/sender.py ``training_wandb_run``), as ``training_wandb_run`` in its config.
- **Joining the training's own run**: ``wandb_run_id = "{training}"`` writes into the W&B run the training
  process logs to, as its agent's hello names it (its id; nothing is written for a run until a hello names one;
  a later hello naming another run — a restarted training — is followed), if it is in ``wandb_project`` (and
  ``wandb_entity``, where set): a hello is a sender's claim, and the collector writes with its own W&B
  credentials only where its operator said (another project: logged, not joined). Online it joins as a
  non-primary writer of W&B's shared mode (the training's own ``wandb.init`` should be the primary: W&B's
  "track all processes to a single run"); offline it writes an offline run with that id, which ``wandb sync``
  appends to the training's. Its keys are under ``grokwatch/`` and only they are defined on
  ``grokwatch/step``: the training's own keys, name, config and step are untouched.
- **Alerts** (``run.alert``, once each): a group's memorization and its onset of generalization as the phase
  detector dates them (INFO), and a layer's router collapse — its lowest group's entropy ratio under
  ``wandb_collapse_ratio`` of the ceiling its router type allows (WARN; again only after it recovered).
- ``wandb_mode``: ``online`` streams (needs ``WANDB_API_KEY``), ``offline`` writes ``<wandb_dir>/wandb/`` for a
  later ``wandb sync``; ``auto`` is online when ``WANDB_API_KEY`` is set.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Callable, Optional

from grokwatch.collector import scalars
from grokwatch.collector.config import JOIN_TRAINING, CollectorConfig, ConfigError
from grokwatch.collector.labels import BUCKET_PREFIX
from grokwatch.collector.periodic import Periodic
from grokwatch.collector.state import State
from grokwatch.collector.view import ViewMemo, build_view, scalar

log = logging.getLogger("grokwatch.collector")

STEP = "grokwatch/step"
JOINED_PREFIX = "grokwatch/"  # a joined training run's keys: apart from the training's own


def run_id(template: str, run: str) -> str:
    """The W&B run id for a grokwatch run: the template with {run} and {host}, in W&B's id alphabet."""
    raw = template.format(run=run, host=socket.gethostname())
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in raw)[:128] or "_"


def mode(configured: str) -> str:
    if configured == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return configured


class WandbView:
    def __init__(self, state: State, config: CollectorConfig, queue_stats: Optional[Callable[[], tuple]] = None):
        try:
            import wandb
        except ImportError:
            raise ConfigError("wandb_dir needs wandb: pip install 'grokwatch[wandb]'") from None
        self._wandb = wandb
        self.state = state
        self.config = config
        self.queue_stats = queue_stats
        self.memo = ViewMemo()  # this view's stale-read fallbacks (view.py)
        self.runs: dict[str, Any] = {}  # grokwatch run -> its wandb Run
        self.joining = config.wandb_run_id == JOIN_TRAINING  # write into the training's own W&B run
        self._linked: dict[str, Optional[str]] = {}  # run -> the training's W&B run (joined, or named in the config)
        self._waiting: set[str] = set()  # joining runs no hello has named a W&B run for yet (logged once)
        self._refused: set[tuple[str, str]] = set()  # (run, W&B run) a hello named outside the project (logged once)
        self._written = scalars.Written()
        self._deltas = scalars.HistogramDeltas()
        self._alerted: set[tuple] = set()
        self.points = 0
        self.alerts = 0
        self._closed = False
        os.makedirs(str(config.wandb_dir), exist_ok=True)
        # a write that fails (W&B away, a full disk) is logged by Periodic and retried the next interval
        self._periodic = Periodic("grokwatch-wandb", config.wandb_interval_s, self._write, final=self._write)

    def start(self) -> "WandbView":
        self._periodic.start()
        return self

    def _run(self, run: str, training: Optional[str]):
        """The W&B run grokwatch run ``run`` is written to; None while it waits for the training's (joining, and no
        hello has named it yet). ``training``: the training's own W&B run as the hellos name it."""
        if run in self.runs:
            r = self.runs[run]
            if training and self._linked.get(run) != training:
                if not self.joining:
                    r.config.update({"training_wandb_run": training}, allow_val_change=True)
                    self._linked[run] = training
                    return r
                # the training started another W&B run (a restart under the same grokwatch run): follow it
                log.info("run %r: the training's W&B run is now %s (was %s)", run, training, self._linked.get(run))
                del self.runs[run]
                r.finish()
            else:
                return r
        wandb, c = self._wandb, self.config
        shape = self.state.runs.shapes.get(run)
        about = dict(grokwatch_run=run, layers=shape[0] if shape else None, experts=shape[1] if shape else None,
                     top_k=shape[2] if shape else None)
        settings = dict(silent=True, console="off", x_disable_stats=True)
        if self.joining:
            if not training:
                if run not in self._waiting:
                    self._waiting.add(run)
                    log.info("run %r: no hello has named the training's W&B run yet (wandb_run_id = %s): its W&B "
                             "writes wait", run, JOIN_TRAINING)
                return None
            entity, project, wid = training.split("/")
            if project != c.wandb_project or entity and c.wandb_entity and entity != c.wandb_entity:
                # a hello is a claim (signed only under CURVE): the collector writes with its own W&B key into
                # the project (and entity) its operator configured, never into one a sender names
                if (run, training) not in self._refused:
                    self._refused.add((run, training))
                    log.warning("run %r: its hello names the W&B run %s, outside wandb_project %r%s: not joined",
                                run, training, c.wandb_project,
                                f" / wandb_entity {c.wandb_entity!r}" if c.wandb_entity else "")
                return None
            m = mode(c.wandb_mode)
            if m == "online":  # a second writer of a live run: W&B's shared mode, not its primary
                settings.update(mode="shared", x_primary=False, x_label="grokwatch")
            # the entity is the operator's too (unset: the API key's default), never the hello's
            r = wandb.init(project=c.wandb_project, entity=c.wandb_entity or None, dir=c.wandb_dir, mode=m,
                           id=wid, resume="allow", reinit="create_new", settings=wandb.Settings(**settings))
            r.config.update({k if k.startswith("grokwatch_") else f"grokwatch_{k}": v for k, v in about.items()},
                            allow_val_change=True)
            log.info("run %r: writing into the training's W&B run %s (%s, keys under %s)", run, training, m,
                     JOINED_PREFIX)
            self._linked[run] = training
            r.define_metric(STEP)
            r.define_metric(JOINED_PREFIX + "*", step_metric=STEP)
        else:
            r = wandb.init(project=c.wandb_project, entity=c.wandb_entity or None, dir=c.wandb_dir,
                           mode=mode(c.wandb_mode), id=run_id(c.wandb_run_id, run), name=run, resume="allow",
                           reinit="create_new", job_type="grokwatch",
                           config=dict(about, training_wandb_run=training), settings=wandb.Settings(**settings))
            self._linked[run] = training
            r.define_metric(STEP)
            r.define_metric("*", step_metric=STEP)
        self.runs[run] = r
        return r

    def write_once(self) -> int:
        """Log what moved since the last call, raise the alerts due; returns the number of points logged."""
        fams = scalars.families(build_view(self.state, self.queue_stats, self.memo))
        with self.state.lock:
            training = self.state.senders.wandb_runs()
        targets: dict[str, Any] = {}  # run -> its W&B run (None: waiting), opened when it first has a point

        def target(run: str):
            if run not in targets:
                targets[run] = self._run(run, training.get(run))
            return targets[run]

        steps = scalars.group_steps(fams)
        rows: dict[tuple[str, int], dict[str, float]] = {}
        for point in scalars.points(fams, steps):
            if target(point.run) is not None:  # a run waiting for its W&B run keeps its points due
                self._add(rows, point.run, point.tag, point.value, point.step)
        for h in self._deltas.read(fams, steps):
            if target(h.run) is not None:
                self._add(rows, h.run, f"{h.tag}_mean", h.mean, h.step)
        prefix = JOINED_PREFIX if self.joining else ""
        before = self.points
        for (run, step), row in sorted(rows.items()):
            targets[run].log({STEP: step, **{prefix + tag: v for tag, v in row.items()}})
            self.points += len(row)
        self._alerts(fams, target)
        return self.points - before

    def _add(self, rows: dict, run: str, tag: str, value: float, step: int) -> None:
        if self._written.due(run, tag, step, value):
            rows.setdefault((run, step), {})[tag] = value

    def _alerts(self, fams: dict, target: Callable[[str], Any]) -> None:
        """The alerts due, each raised once in its run's W&B run (a run still waiting for one raises them later)."""
        AlertLevel = getattr(self._wandb, "AlertLevel")  # noqa: B009 (the stubs do not list it)
        for fam_name, event, title in (("group_memorized_step", "memorized", "memorized its data"),
                                       ("group_onset_step", "onset", "began generalizing")):
            for (run, source, group), v in fams[fam_name].samples:
                step = int(scalar(v))
                key = (run, group, event)
                if key in self._alerted or target(run) is None:
                    continue
                self._alerted.add(key)
                self._alert(run, f"grokwatch: {group} {title}", f"Group {group} of run {run} {title} at step {step} "
                            f"(the phase detector, {source} source; experimental: docs/groundtruth.md).",
                            AlertLevel.INFO)
        ceiling = {values[0]: scalar(v) for values, v in fams["routing_entropy_ceiling"].samples}
        lowest: dict[tuple[str, str], float] = {}
        for (run, source, group, layer), v in fams["routing_entropy_ratio"].samples:
            if source == "train" and not group.startswith(BUCKET_PREFIX):
                lowest[(run, layer)] = min(lowest.get((run, layer), 1.0), scalar(v))
        for (run, layer), entropy in sorted(lowest.items()):
            top = ceiling.get(run)
            if not top or target(run) is None:
                continue
            key = (run, layer, "collapse")
            if entropy / top < self.config.wandb_collapse_ratio:
                if key not in self._alerted:
                    self._alerted.add(key)
                    self._alert(run, f"grokwatch: router collapse in layer {layer}",
                                f"Layer {layer} of run {run} routes at {entropy / top:.0%} of the entropy its router "
                                "type allows (docs/runbook.md#grokwatchroutingcollapse).", AlertLevel.WARN)
            else:
                self._alerted.discard(key)  # recovered: a new collapse alerts again

    def _alert(self, run: str, title: str, text: str, level) -> None:
        self.runs[run].alert(title=title, text=text, level=level, wait_duration=0)
        self.alerts += 1

    def _write(self) -> None:
        self.write_once()

    def shutdown(self, deadline_s: float = 10.0) -> None:
        """Once: the last write, then every W&B run finished; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._periodic.shutdown(deadline_s)
        for r in self.runs.values():
            try:
                r.finish()
            except Exception:
                log.exception("finishing a W&B run failed")
