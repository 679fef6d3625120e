"""The ``GROKWATCH_*`` environment variables every part reads, and a warning for the ones none reads.

A misspelt variable (``GROKWATCH_METRIC_PORT``) would otherwise be ignored without a word and the
setting left at its default; the CLI and ``attach()`` log one warning for each, with the nearest known
name.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Mapping, Optional

PREFIX = "GROKWATCH_"
# Read outside the collector's config: the agent's attach() and the CLI.
OTHER_VARIABLES = ("GROKWATCH_ENDPOINT", "GROKWATCH_RUN", "GROKWATCH_CURVE_SERVER_KEY", "GROKWATCH_CURVE_SECRET_KEY",
                   "GROKWATCH_LOG_LEVEL", "GROKWATCH_LOG_FORMAT", "GROKWATCH_KERNEL_CACHE")


def known_variables() -> tuple[str, ...]:
    from grokwatch.collector.config import CollectorConfig

    return tuple(PREFIX + f.name.upper() for f in dataclasses.fields(CollectorConfig)) + OTHER_VARIABLES


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
