"""The agent's configuration: ``attach()``'s options, validated before anything is hooked."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from grokwatch.wire import DEFAULT_LIMITS

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5557"
DEFAULT_EVERY_N_STEPS = 10  # summarizing costs a handful of small ops per router call; every step for tiny runs
DEFAULT_SAMPLES_PER_STEP = 8
DEFAULT_DOCS_PER_SAMPLE = 4  # packed rows: documents kept per row (only when position_ids are passed)

# attach(reduction_layout=...): where the experts go in the batched reduction (reduce.Strategy); None: the
# device's best (experts last on CUDA, in the middle on CPU). Compiled, they are always last.
MAX_COUNT_GROUPS = DEFAULT_LIMITS.max_count_groups  # what a collector accepts (wire/limits.py)
REDUCTION_LAYOUTS = {None: None, "experts_last": -1, "experts_middle": -2}


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    endpoint: str = DEFAULT_ENDPOINT
    run: str = "default"
    every_n_steps: int = DEFAULT_EVERY_N_STEPS
    max_samples_per_step: int = DEFAULT_SAMPLES_PER_STEP
    max_docs_per_sample: int = DEFAULT_DOCS_PER_SAMPLE
    probe_every_n_steps: int = 0  # 0: no probe
    probe_size: int = 0
    max_hook_errors: int = 10
    queue_size: int = 64
    sndhwm: int = 256  # messages libzmq queues while the collector is away, then counted drops
    heartbeat_interval_s: float = 5.0
    close_timeout_s: float = 2.0
    compile_reduction: Optional[bool] = None  # None: on CUDA (compiled.compile_by_default)
    # The batched reduction's transient memory at the end of a summarized forward (estimated); beyond it
    # the layers are reduced in several batches.
    reduction_memory_mb: float = 256.0
    reduction_layout: Optional[str] = None  # REDUCTION_LAYOUTS
    reduction_layers_per_batch: Optional[int] = None  # None: as many as reduction_memory_mb allows
    # The router z-loss (mean logsumexp(logits)² per sample and layer) in the same reduction; False leaves it
    # out (docs/benchmarks.md has its cost).
    router_zloss: bool = True
    # All-token expert counts (agent/counts.py): tokens per expert over every training forward, shipped with
    # each training message; False leaves the router hooks armed on summarized forwards only.
    expert_counts: bool = True
    # ... split by row group too, for the first this many groups that tag() names (0: totals only). Each costs
    # [L, E] int64 in the staging buffer and, where its rows routed tokens, on the wire.
    expert_count_groups: int = 8
    # ZeroMQ CURVE (grokwatch keygen): the collector's public .key file and this agent's .key_secret file;
    # both or neither. Default from GROKWATCH_CURVE_SERVER_KEY / GROKWATCH_CURVE_SECRET_KEY.
    curve_server_key: Optional[str] = None
    curve_secret_key: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or not self.endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"endpoint: {self.endpoint!r} is not a tcp://, ipc:// or inproc:// endpoint")
        if self.endpoint.startswith("tcp://"):
            port = self.endpoint.rpartition(":")[2]
            if not (port.isdigit() and 1 <= int(port) <= 65535):
                raise ValueError(f"endpoint: {self.endpoint!r} needs a port from 1 to 65535 (tcp://host:port)")
        if not self.run or len(self.run) > 200:
            raise ValueError("run: a non-empty name of at most 200 characters")
        for key in ("every_n_steps", "max_samples_per_step", "max_docs_per_sample", "max_hook_errors", "queue_size",
                    "sndhwm"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")
        groups = self.expert_count_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or not 0 <= groups <= MAX_COUNT_GROUPS:
            raise ValueError(f"expert_count_groups: an integer 0..{MAX_COUNT_GROUPS}, got {groups!r}")
        if self.probe_every_n_steps < 0 or self.probe_size < 0:
            raise ValueError("probe_every_n_steps and probe_size: must not be negative")
        if bool(self.probe_every_n_steps) != bool(self.probe_size):
            raise ValueError("probe_every_n_steps and probe_size: set both (or neither)")
        if self.heartbeat_interval_s <= 0 or self.close_timeout_s < 0:
            raise ValueError("heartbeat_interval_s must be positive and close_timeout_s not negative")
        try:
            budget = float(self.reduction_memory_mb)
        except (TypeError, ValueError):
            budget = math.nan
        if not budget > 0:  # also NaN
            raise ValueError(f"reduction_memory_mb: a positive number, got {self.reduction_memory_mb!r}")
        if bool(self.curve_server_key) != bool(self.curve_secret_key):
            raise ValueError("curve_server_key and curve_secret_key: set both or neither")
        if self.curve_server_key:
            self.curve_keys()  # fails fast on a missing or foreign key file
        if self.reduction_layout not in REDUCTION_LAYOUTS:
            raise ValueError(f"reduction_layout: one of {sorted(k for k in REDUCTION_LAYOUTS if k)} or None, "
                             f"got {self.reduction_layout!r}")
        layers = self.reduction_layers_per_batch
        if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
            raise ValueError(f"reduction_layers_per_batch: a positive integer or None, got {layers!r}")
        if self.compile_reduction not in (None, True, False):
            raise ValueError(f"compile_reduction: True, False or None (on CUDA), got {self.compile_reduction!r}")

    @property
    def sample_slots(self) -> int:
        """N: the sample slots of one summarized forward, max_samples_per_step rows x max_docs_per_sample."""
        return self.max_samples_per_step * self.max_docs_per_sample

    def curve_keys(self) -> Optional[tuple[bytes, bytes, bytes]]:
        """(server public, own public, own secret) from the key files, or None without CURVE."""
        if not self.curve_server_key:
            return None
        from grokwatch.keys import KeyError_, load_public, load_secret

        try:
            server = load_public(self.curve_server_key)
            public, secret = load_secret(str(self.curve_secret_key))
        except KeyError_ as exc:
            raise ValueError(f"curve keys: {exc}") from None
        return server, public, secret
