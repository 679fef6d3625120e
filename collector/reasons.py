"""The collector's own rejections, beyond the wire contract's (``wire.REASONS``): each is a value of
grokwatch_collector_messages_rejected_total{reason} (docs/collector.md lists what each means)."""

from __future__ import annotations

COLLECTOR_REASONS = ("queue_full", "stale", "duplicate", "shape_mismatch", "too_many_runs", "too_many_groups",
                     "internal", "no_routing", "unknown_run", "bad_rank", "sequence_jump", "shape_too_large",
                     "memory_budget")


class Rejected(Exception):
    """A message that passed the wire checks but not the collector's own. ``reason``: COLLECTOR_REASONS."""

    def __init__(self, reason: str):
        assert reason in COLLECTOR_REASONS, reason
        super().__init__(reason)
        self.reason = reason
