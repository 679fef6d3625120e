"""The runs a collector follows: each run's shape and layers, the world size its hellos declared, and
when it was last heard (a run holds a slot of ``max_runs`` until ``run_idle_expiry_s`` of silence).
The state (state.py) asks here whether a message's run, rank and shape are admitted.
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Sequence

from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.reasons import Rejected

log = logging.getLogger("grokwatch.collector.state")

Shape = tuple[int, int, int]  # (layers, experts, top-k)


def layer_identity(names: Sequence[str]) -> tuple:
    """Which layers a sender routes, from their module names: the numbers in each name (layer indices),
    as a multiset. Wrappers (DDP's ``module.``, ``_orig_mod.``, FSDP's) add no number, so they leave it
    unchanged; two pipeline stages (``layers.0``… and ``layers.12``…) differ."""
    return tuple(sorted(tuple(int(d) for d in re.findall(r"\d+", name)) for name in names))


class Runs:
    def __init__(self) -> None:
        self.shapes: dict[str, Shape] = {}
        self.layer_ids: dict[str, tuple] = {}  # run -> layer_identity of its first hello that named its layers
        self.world_sizes: dict[str, int] = {}  # run -> the largest world size its hellos declared
        self.seen: dict[str, float] = {}  # run -> clock of its latest message (run_idle_expiry_s)
        self.shape_seen: dict[str, float] = {}  # run -> clock of its latest message of the run's shape

    def heard(self, run: str, now: float) -> None:
        self.seen[run] = now

    def known(self, run: str, rank: int) -> None:
        """Heartbeats, evals and losses come after their run's hello (the agent sends it first, and again
        before each heartbeat): an unknown run adds no series, and a rank must be below the world size
        the run's hellos declared (every (run, rank) is a series)."""
        if run not in self.shapes:
            raise Rejected("unknown_run")
        self.check_rank(run, rank)

    def check_rank(self, run: str, rank: int) -> None:
        if rank >= self.world_sizes.get(run, 1 << 20):  # declared sizes are capped by max_world_size
            raise Rejected("bad_rank")

    def declare_world(self, run: str, world_size: int) -> None:
        self.world_sizes[run] = max(self.world_sizes.get(run, 0), world_size)

    def idle(self, now: float, ttl: float) -> list[str]:
        """The runs silent for ``ttl`` seconds, forgotten here (the caller drops their series)."""
        if not ttl:
            return []
        gone = [run for run, seen in self.seen.items() if now - seen > ttl]
        for run in gone:
            log.info("run %r sent nothing for %.0f s: forgotten (run_idle_expiry_s)", run, now - self.seen[run])
            for table in (self.shapes, self.layer_ids, self.world_sizes, self.seen, self.shape_seen):
                table.pop(run, None)
        return gone

    def check_shape(self, run: str, shape: Shape, config: CollectorConfig, now: float, hello: bool = False) -> bool:
        """Admits ``run`` with ``shape``; True when the hello makes a new incarnation of the run (the caller
        starts its pathway state over). Raises ``Rejected``."""
        if shape[0] * shape[1] > config.max_layer_experts:
            raise Rejected("shape_too_large")
        if run not in self.shapes and len(self.shapes) >= config.max_runs:
            raise Rejected("too_many_runs")
        known = self.shapes.setdefault(run, shape)
        if known == shape:
            self.shape_seen[run] = now
            return False
        # Another shape under a known run name: a new incarnation of the run (a job restarted with another
        # model) once nothing of the old shape has come for run_reshape_quiet_s; until then, and for any
        # message but a hello, it is refused. (Without CURVE a stranger can still claim a quiet run.)
        quiet = now - self.shape_seen.get(run, float("-inf"))
        if not hello or quiet < config.run_reshape_quiet_s:
            raise Rejected("shape_mismatch")
        log.warning("run %r: a hello with shape %s after %.0f s without %s: a new incarnation of the run, its "
                    "pathway state starts over", run, shape, quiet, known)
        self.layer_ids.pop(run, None)
        self.shapes[run] = shape
        self.shape_seen[run] = now
        return True

    def same_layers(self, run: str, names: Optional[Sequence[str]]) -> bool:
        """Whether a hello's layer names are the run's (the first hello that named them sets them)."""
        if names is None:  # an agent that does not name its layers (older, or manual mode)
            return True
        identity = layer_identity(names)
        return self.layer_ids.setdefault(run, identity) == identity
