"""The ``GROKWATCH_*`` environment variables every part reads, and a warning for the ones none reads.

A misspelt variable (``GROKWATCH_METRIC_PORT``) would otherwise be ignored without a word and the
setting left at its default; the CLI and ``attach()`` log one warning for each, with the nearest known
name.
"""

from __future__ import annotations

import difflib
import logging
from typing import Mapping, Optional

PREFIX = "GROKWATCH_"
# Read outside the collector's config: the agent's attach() and the CLI.
OTHER_VARIABLES = ("GROKWATCH_ENDPOINT", "GROKWATCH_RUN", "GROKWATCH_CURVE_SERVER_KEY", "GROKWATCH_CURVE_SECRET_KEY",
                   "GROKWATCH_LOG_LEVEL", "GROKWATCH_LOG_FORMAT", "GROKWATCH_KERNEL_CACHE")


# The collector's configuration keys (``GROKWATCH_<KEY>``), listed here so that the agent, which reads this
# module in attach(), never imports the collector; tests/unit/test_cli.py holds it equal to CollectorConfig.
COLLECTOR_KEYS = ("LISTEN", "METRICS_ADDR", "METRICS_PORT", "TLS_CERTFILE", "TLS_KEYFILE", "CURVE_SECRET_KEY",
                  "CURVE_ALLOWED_CLIENTS", "STATE_DIR", "SNAPSHOT_INTERVAL_S", "TENSORBOARD_DIR",
                  "TENSORBOARD_INTERVAL_S", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE",
                  "WANDB_RUN_ID", "WANDB_INTERVAL_S", "WANDB_COLLAPSE_RATIO", "JOURNAL_MAX_BYTES", "WAL_MAX_BYTES",
                  "QUEUE_CAPACITY", "QUEUE_MAX_BYTES", "MAX_MESSAGE_BYTES", "KERNEL_WORKERS", "PAIR_THREADS",
                  "MAX_MESSAGE_AGE_S", "PATHWAY_TAU", "DISTANCE_UNIT", "COMPARISONS_PER_SAMPLE", "WINDOW_SAMPLES",
                  "MAX_GROUPS", "LOAD_RANK_K", "ROUTER_HEALTH_GROUPS", "LOAD_PERCENTILES",
                  "EXPERT_LOAD_SHARE_MAX_SERIES", "MAX_RUNS", "MAX_MEMORY_MB", "MAX_LAYER_EXPERTS",
                  "RUN_IDLE_EXPIRY_S", "RUN_RESHAPE_QUIET_S", "MAX_SEQUENCE_JUMP", "MEMORIZATION_DELTA",
                  "MEMORIZATION_CONSECUTIVE", "MEMORIZATION_EPSILON", "MEMORIZATION_BUCKET_STEPS",
                  "MAX_PROBE_SAMPLES", "PHASE_WINDOW", "PHASE_PATIENCE", "PHASE_LOSS_ABS_TOL", "PHASE_LOSS_REL_TOL",
                  "PHASE_LOSS_LOW_RATIO", "PHASE_LOSS_MAX_WRONG", "PHASE_ALPHA", "PHASE_DISTANCE_REL_TOL",
                  "PHASE_CONSISTENCY_ABS_TOL", "PHASE_DISTANCE", "SEED", "HANDSHAKE_TIMEOUT_S",
                  "MAX_INGEST_CONNECTIONS", "MAX_WORLD_SIZE")


def known_variables() -> tuple[str, ...]:
    return tuple(PREFIX + key for key in COLLECTOR_KEYS) + OTHER_VARIABLES


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, Optional[str]]]:
    """(name, nearest known name or None) for each GROKWATCH_* variable that nothing reads."""
    known = known_variables()
    out = []
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in known:
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            out.append((name, near[0] if near else None))
    return out


def warn_unknown(environ: Mapping[str, str], logger: Optional[logging.Logger] = None) -> list[str]:
    """Log one warning per unknown GROKWATCH_* variable; returns the messages."""
    logger = logger or logging.getLogger("grokwatch")
    messages = []
    for name, near in unknown_variables(environ):
        hint = f"; did you mean {near}?" if near else ""
        messages.append(f"{name} is not a grokwatch setting and is ignored{hint}")
        logger.warning(messages[-1])
    return messages
