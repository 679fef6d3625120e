"""The group labels that are not a user's data group, in one place: the journal, the exporters, the report and
the state all tell them apart by these names."""

from __future__ import annotations

from grokwatch.wire import FRESH_PREFIX

CROSS_GROUP = "_cross"  # METRICS.md §1 cross-group baseline
BUCKET_PREFIX = "mem@"  # the probe's memorization buckets (METRICS.md §4): diagnostics, no phase of their own
__all__ = ["BUCKET_PREFIX", "CROSS_GROUP", "FRESH_PREFIX"]
