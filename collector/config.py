"""Collector configuration: one typed dataclass, validated at start-up.

Precedence: command-line flag > ``GROKWATCH_*`` environment variable > TOML
file (``--config``) > default. Every key, its variable and its default are
declared here and nowhere else. Example file::

    listen = ["tcp://0.0.0.0:5557"]
    metrics_port = 9464
    state_dir = "/var/lib/grokwatch"
    pathway_tau = 0.7
    distance_unit = "expert"
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib  # pyright: ignore[reportMissingImports]  (installed on 3.10 only)

from grokwatch.wire import DEFAULT_MAX_MESSAGE_BYTES

DEFAULT_LISTEN = ("tcp://127.0.0.1:5557",)
DEFAULT_METRICS_PORT = 9464
DEFAULT_TAU = 0.7  # METRICS.md §1; the paper's threshold
DEFAULT_COMPARISONS = 16  # m: pairs per arriving sample; raise for less noise, costs linear CPU
DEFAULT_WINDOW = 256  # samples kept per (run, source, group) for pairs and router health
# phase_distance -> (the point's distance key, the baseline key it is divided by, or None)
PHASE_DISTANCES = {
    "normalized": ("distance_normalized", None),
    "raw": ("distance", None),
    "vs_cross": ("distance", "cross_distance"),
    "normalized_vs_cross": ("distance_normalized", "cross_distance_normalized"),
}
# phase_distance = "auto": the first signal once the group's points carry a cross-group baseline
# (two or more groups), the second until then (a single-group run never has one).
PHASE_DISTANCE_AUTO = ("normalized_vs_cross", "normalized")
PHASE_DISTANCE_CHOICES = (*PHASE_DISTANCES, "auto")
DEFAULT_MAX_GROUPS = 32  # METRICS.md §4: label values beyond this go to "other"
DEFAULT_QUEUE = 10_000  # messages between the receive and the processing thread
DEFAULT_QUEUE_MAX_BYTES = 256 * 1024 * 1024  # ... and their bytes at most


class ConfigError(ValueError):
    """A bad setting; the message names the key as the user writes it."""


JOIN_TRAINING = "{training}"  # wandb_run_id: write into the training's own W&B run (collector/wandb_view.py)


@dataclass(frozen=True, kw_only=True)
class CollectorConfig:
    listen: tuple[str, ...] = DEFAULT_LISTEN
    metrics_addr: str = "0.0.0.0"
    metrics_port: int = DEFAULT_METRICS_PORT
    tls_certfile: Optional[str] = None
    tls_keyfile: Optional[str] = None
    # ZeroMQ CURVE (grokwatch keygen): the collector's .key_secret file and a directory of the public .key
    # files of the agents it admits; set both, or neither (then listen on 127.0.0.1 or ipc:// only).
    curve_secret_key: Optional[str] = None
    curve_allowed_clients: Optional[str] = None
    state_dir: Optional[str] = None
    snapshot_interval_s: float = 30.0
    # TensorBoard event files per run under this directory (collector/tensorboard.py; the tensorboard extra)
    tensorboard_dir: Optional[str] = None
    tensorboard_interval_s: float = 30.0
    # Weights & Biases runs, one a grokwatch run, written under this directory (collector/wandb_view.py; the
    # wandb extra). Mode auto: online when WANDB_API_KEY is set, else offline (wandb sync later).
    wandb_dir: Optional[str] = None
    wandb_project: str = "grokwatch"
    wandb_entity: Optional[str] = None  # None: the API key's default entity
    wandb_mode: str = "auto"
    # {run}, {host}: the collector's own W&B run; "{run}" joins a training run whose W&B id is its run name;
    # "{training}" joins the W&B run the training process itself logs to, as its agent's hello names it
    wandb_run_id: str = "grokwatch-{run}"
    wandb_interval_s: float = 30.0
    wandb_collapse_ratio: float = 0.3  # a W&B alert when a layer's entropy falls under this share of its ceiling
    journal_max_bytes: int = 64 * 1024 * 1024  # one rotation kept: at most twice this on disk
    # The write-ahead log (collector/wal.py) between snapshots; past this size a snapshot is taken early.
    wal_max_bytes: int = 256 * 1024 * 1024
    queue_capacity: int = DEFAULT_QUEUE
    # ... and in bytes, whichever is reached first (a flood of 8 MiB messages must not take gigabytes).
    queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Threads that run the routing kernels (collector/pipeline.py): a stream's messages on one of them, in
    # order; streams of different runs and sources in parallel. 0: on the processing thread.
    kernel_workers: int = 2
    # Threads computing the pairs of one routing message (collector/pairs.py: the same result, sooner where a
    # core is idle); 1: the kernel alone (the default: on two cores shared with the senders it did not pay,
    # docs/benchmarks.md); 0: the cores this process may use, at most 4.
    pair_threads: int = 1
    max_message_age_s: float = 3600.0  # older messages (queued before a restart) are rejected as stale
    pathway_tau: float = DEFAULT_TAU
    distance_unit: str = "expert"  # or "string": the paper's text form
    comparisons_per_sample: int = DEFAULT_COMPARISONS
    window_samples: int = DEFAULT_WINDOW
    max_groups: int = DEFAULT_MAX_GROUPS
    load_rank_k: int = 3  # the top and bottom K experts by load share exported per layer (labels rank 1..K; 0: none)
    # Cardinality (docs/collector.md, "Series per collector"): the per-group router-health families (window
    # figures per layer) only for the groups matching these fnmatch patterns ("*": all; none: the run's
    # all-token figures remain, per layer).
    router_health_groups: tuple[str, ...] = ("*",)
    load_percentiles: bool = True  # grokwatch_expert_load_share_percentile: 5 series a layer and group
    # grokwatch_expert_load_share{run,layer,expert} from the all-token counts (a layer x expert heatmap): at most
    # this many series a run (0: off); a model with more layers x experts exports its first layers that fit.
    expert_load_share_max_series: int = 0
    max_runs: int = 16
    # The pathway state's arrays (every stream's window rings and histograms) may take at most this much;
    # a message that needs more (a new run, source or group) is rejected as memory_budget. The process
    # needs about twice this (a snapshot is a copy) plus queue_max_bytes and ~250 MB of Python and Numba:
    # checked at start-up against the container's memory limit (docs/collector.md, "Memory bound").
    max_memory_mb: int = 512
    # A model's layers x experts beyond this are rejected as shape_too_large: the kernels' cost per sample
    # grows with its square (16,384 admits DeepSeek-V3's 58 x 256; one 8 MiB message then takes ~3 s).
    max_layer_experts: int = 16384
    # A run that sent nothing for this long is forgotten (its series end), so that finished jobs free their
    # slot in max_runs; 0: never.
    run_idle_expiry_s: float = 24 * 3600.0
    # A hello of another shape under a known run is a new incarnation (a restarted job with a new model)
    # once no message of the old shape has come for this long; before, it is shape_mismatch.
    run_reshape_quiet_s: float = 60.0
    # A sender's sequence number may jump at most this far (beyond it the message is rejected as
    # sequence_jump: one forged seq of 2^63 would otherwise make all its later messages duplicates).
    max_sequence_jump: int = 1_000_000
    memorization_delta: float = 0.05  # METRICS.md §4 δ
    memorization_consecutive: int = 3  # METRICS.md §4 M
    memorization_epsilon: Mapping[str, float] = field(default_factory=dict)  # per group; else q0.25
    memorization_bucket_steps: int = 1000  # probe groups: samples memorized in the same bucket
    max_probe_samples: int = 100_000
    # METRICS.md §5 phase detector (docs/collector.md, "Phases"). No phase is claimed without loss evidence
    # (the probe's per-sample losses, or a training loss the agent forwards): "low" is the group's ε of
    # memorization_epsilon where configured, else phase_loss_low_ratio of its first loss level. The
    # distance must fall significantly (a Mann–Kendall test at phase_alpha per evaluation, corrected for
    # autocorrelation; false-onset rate on null series: bench/phase_null.py) and by phase_distance_rel_tol
    # at least. Window and patience: the setting scored on the ground-truth runs (docs/groundtruth.md).
    # Consistency is ignored (inf): there it only added false onsets.
    phase_window: int = 12
    phase_patience: int = 4
    phase_loss_abs_tol: float = 0.05
    phase_loss_rel_tol: float = 0.05
    phase_loss_low_ratio: float = 0.1
    # ... and at most ln 2 × this (issue 27): a loss averaged over a sample's answers can sit under a tenth of
    # its first level while a fifth of them are wrong; a mean token loss ≤ w·ln 2 leaves at most a share w
    # of tokens whose loss reaches ln 2 (Markov) — every other token has p > 1/2, so its argmax is right.
    phase_loss_max_wrong: float = 0.2
    phase_alpha: float = 0.001
    phase_distance_rel_tol: float = 0.03
    phase_consistency_abs_tol: float = math.inf
    # Which distance the detector watches (PHASE_DISTANCES): "normalized" (÷ longest pathway), "raw",
    # either ÷ the cross-group baseline (a global routing change moves both and cancels), or "auto":
    # normalized ÷ baseline where groups are tagged, normalized where there is one group.
    phase_distance: str = "auto"
    seed: int = 0
    # Ingest against strangers (docs/reliability.md): a ZeroMQ handshake not done in this time is dropped;
    # connections past this many are closed as they come (the descriptors left serve /metrics and the state).
    handshake_timeout_s: float = 10.0
    max_ingest_connections: int = 8192
    # A hello's world_size is believed up to this: the senders of a run are bounded by its world size.
    max_world_size: int = 65536


    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("listen: at least one endpoint is needed")
        if self.wandb_mode not in ("auto", "online", "offline"):
            raise ConfigError(f"wandb_mode: auto, online or offline, got {self.wandb_mode!r}")
        if self.wandb_run_id != JOIN_TRAINING:
            try:
                self.wandb_run_id.format(run="r", host="h")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"wandb_run_id: a template with {{run}} and {{host}} only, or {JOIN_TRAINING} alone "
                                  f"({exc!r})") from None
        if not isinstance(self.router_health_groups, tuple) or not all(
                isinstance(p, str) and p for p in self.router_health_groups):
            raise ConfigError("router_health_groups: a list of group-name patterns (fnmatch), e.g. [\"*\"] or []")
        for ep in self.listen:
            if not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ConfigError(f"listen: {ep!r} is not a tcp://, ipc:// or inproc:// endpoint")
        if bool(self.tls_certfile) != bool(self.tls_keyfile):
            raise ConfigError("tls_certfile and tls_keyfile: set both or neither")
        if bool(self.curve_secret_key) != bool(self.curve_allowed_clients):
            raise ConfigError("curve_secret_key and curve_allowed_clients: set both or neither")
        if self.curve_allowed_clients and not os.path.isdir(self.curve_allowed_clients):
            raise ConfigError(f"curve_allowed_clients: {self.curve_allowed_clients} is not a directory of .key files")
        if self.curve_secret_key:
            from grokwatch.keys import KeyError_, load_secret

            try:
                load_secret(self.curve_secret_key)
            except KeyError_ as exc:
                raise ConfigError(f"curve_secret_key: {exc}") from None
        if self.distance_unit not in ("expert", "string"):
            raise ConfigError(f"distance_unit: {self.distance_unit!r} must be 'expert' or 'string'")
        if self.phase_distance not in PHASE_DISTANCE_CHOICES:
            raise ConfigError(f"phase_distance: {self.phase_distance!r} must be one of "
                              f"{', '.join(PHASE_DISTANCE_CHOICES)}")
        for key, bounds in BOUNDS.items():
            check_bound(key, getattr(self, key), bounds)
        for group, eps in dict(self.memorization_epsilon).items():
            check_bound(f"memorization_epsilon.{group}", eps, (0.0, 1e6, "[]"))


# Every numeric key's range (lo, hi, which ends are closed; int keys are whole numbers): refused outside it,
# in one line naming the key, by --check-config and at start alike. NaN is outside every range, infinity
# outside all but the phase detector's tolerances' (inf: "ignore this evidence"). The upper ends keep each allocation, timer
# and loop the key drives finite (a snapshot interval of 1e12 s killed the snapshot thread; a comparison
# count of 1e12 made every message "internal").
_YEAR_S = 365 * 24 * 3600.0
BOUNDS: dict[str, tuple] = {
    "metrics_port": (0, 65535, "[]"),
    "snapshot_interval_s": (0.1, 86_400.0, "[]"),
    "tensorboard_interval_s": (0.1, 86_400.0, "[]"),
    "wandb_interval_s": (0.1, 86_400.0, "[]"),
    "wandb_collapse_ratio": (0.0, 1.0, "[]"),
    "journal_max_bytes": (256, 1 << 40, "[]"),
    "wal_max_bytes": (4096, 1 << 40, "[]"),
    "queue_capacity": (1, 10_000_000, "[]"),
    "queue_max_bytes": (1, 1 << 38, "[]"),
    "max_message_bytes": (256, 1 << 29, "[]"),  # twice it is libzmq's frame cap; the log's record limit is 2^30
    "kernel_workers": (0, 64, "[]"),
    "pair_threads": (0, 64, "[]"),
    "max_message_age_s": (0.0, 10 * _YEAR_S, "(]"),
    "pathway_tau": (0.0, 1.0, "(]"),
    "comparisons_per_sample": (1, 1024, "[]"),
    "window_samples": (2, 1 << 20, "[]"),
    "max_groups": (1, 4096, "[]"),
    "load_rank_k": (0, 1024, "[]"),
    "expert_load_share_max_series": (0, 1 << 20, "[]"),
    "max_runs": (1, 4096, "[]"),
    "max_memory_mb": (1, 1 << 20, "[]"),
    "max_layer_experts": (1, 1 << 20, "[]"),
    "run_idle_expiry_s": (0.0, 10 * _YEAR_S, "[]"),
    "run_reshape_quiet_s": (0.0, 10 * _YEAR_S, "[]"),
    "max_sequence_jump": (1, 1 << 62, "[]"),
    "memorization_delta": (0.0, 1e6, "(]"),
    "memorization_consecutive": (1, 100_000, "[]"),
    "memorization_bucket_steps": (1, 1 << 40, "[]"),
    "max_probe_samples": (1, 100_000_000, "[]"),
    "phase_window": (1, 100_000, "[]"),
    "phase_patience": (1, 100_000, "[]"),
    "phase_loss_abs_tol": (0.0, math.inf, "[]"),
    "phase_loss_rel_tol": (0.0, math.inf, "[]"),
    "phase_loss_low_ratio": (0.0, 1.0, "(]"),
    "phase_loss_max_wrong": (0.0, 1.0, "(]"),
    "phase_alpha": (0.0, 0.5, "()"),
    "phase_distance_rel_tol": (0.0, math.inf, "[]"),
    "phase_consistency_abs_tol": (0.0, math.inf, "[]"),
    "seed": (0, (1 << 63) - 1, "[]"),
    "handshake_timeout_s": (0.1, 3600.0, "[]"),
    "max_ingest_connections": (1, 1_000_000, "[]"),
    "max_world_size": (1, 1 << 20, "[]"),
}


def check_bound(key: str, value: Any, bounds: tuple) -> None:
    lo, hi, ends = bounds
    whole = isinstance(lo, int) and isinstance(hi, int)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: a number is needed, got {value!r}")
    inside = (lo <= value if ends[0] == "[" else lo < value) and (value <= hi if ends[1] == "]" else value < hi)
    if not inside or (whole and value != int(value)) or (value != value):  # NaN compares false: refused
        what = "a whole number" if whole else "a finite number" if math.isfinite(hi) else "a number"
        raise ConfigError(f"{key}: {what} in {ends[0]}{lo}, {hi}{ends[1]}, got {value!r}")


_ENV_PREFIX = "GROKWATCH_"
_TUPLE_KEYS = {"listen", "router_health_groups"}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _coerce(key: str, value: Any, target: Any) -> Any:
    """Convert a file or environment value to the type of the field's default."""
    try:
        if key in _TUPLE_KEYS:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(value)
        if key == "memorization_epsilon":
            if isinstance(value, str):
                value = dict(kv.split("=", 1) for kv in value.split(",") if kv)
            return {str(k): float(v) for k, v in dict(value).items()}
        if isinstance(target, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if isinstance(target, int):
            number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else float(str(value))
            if number != int(number):  # 3.5 is no count (int() would quietly make it 3)
                raise ValueError("not a whole number")
            return int(number)
        if isinstance(target, float):
            return float(value)
        return None if value in (None, "") else str(value)
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int(inf)
        raise ConfigError(f"{key}: cannot read {value!r} ({exc})") from None


def otlp_requested(environ: Mapping[str, str]) -> bool:
    """OpenTelemetry export is asked for (the exporter's own variables)."""
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))


def config_sources(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                   environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """Where each key's effective value comes from, by load_config's precedence: "flag", "env <VARIABLE>",
    "file <path>" or "default" (the file is read again: call after load_config has accepted it)."""
    environ = os.environ if environ is None else environ
    in_file: set = set()
    if path:
        with open(path, "rb") as fh:
            in_file = set(tomllib.load(fh))
    out = {}
    for f in dataclasses.fields(CollectorConfig):
        variable = _ENV_PREFIX + f.name.upper()
        out[f.name] = ("flag" if (overrides or {}).get(f.name) is not None else f"env {variable}"
                       if variable in environ else f"file {path}" if f.name in in_file else "default")
    return out


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                environ: Optional[Mapping[str, str]] = None) -> CollectorConfig:
    """Build the config from a TOML file, GROKWATCH_* variables and overrides."""
    environ = os.environ if environ is None else environ
    defaults = {f.name: _field_default(f) for f in dataclasses.fields(CollectorConfig)}
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
        unknown = sorted(set(data) - set(defaults))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown key in {path}")
        values.update(data)
    for key in defaults:
        env = environ.get(_ENV_PREFIX + key.upper())
        if env is not None:
            values[key] = env
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    typed = {k: _coerce(k, v, defaults[k]) for k, v in values.items()}
    return CollectorConfig(**typed)
