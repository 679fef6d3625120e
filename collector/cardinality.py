"""How many series one collector's /metrics can hold, computed before deploying (docs/collector.md, "Series
per collector"): from the exported families (view.SPECS) and a run's shape, the configuration's caps and how
many runs, sources, groups and ranks it serves. An upper bound: every group of every stream at its cap, every
optional family on.

A family's series are the product of its labels' value counts: run (``runs``), source (``sources``: train,
probe, replay), group (the stream's admitted labels — at most ``max_groups`` plus ``other`` — and ``_cross``
for the pathway families), layer (L), percentile (5 where ``load_percentiles``), end × rank (2 ×
``load_rank_k``), phase (5), expert (E, capped by ``expert_load_share_max_series``), rank (the agents' ranks),
reason and thread (their fixed lists); a histogram adds its buckets, +Inf, _sum and _count, a summary _sum
and _count. The per-group router-health families count only the groups ``router_health_groups`` admits
(``health_groups``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.persist import PERSIST_ERRORS
from grokwatch.collector.phases import PHASES
from grokwatch.collector.stream import HIST_NAMES, NB_R
from grokwatch.collector.view import (
    ALL_REASONS,
    HANDSHAKE_REASONS,
    HISTOGRAMS,
    LOAD_PERCENTILES,
    LOOP_THREADS,
    ROUTER_HEALTH,
    SPECS,
)
from grokwatch.wire import AGENT_DROP_REASONS

# Families with a _cross series beside the groups' (the cross-group baseline).
WITH_CROSS = frozenset(HISTOGRAMS) | {"pathway_layer_distance"} | {s + "_sum_signed" for s in HISTOGRAMS}


@dataclass(frozen=True)
class Load:
    """What one collector serves: runs of this shape, their sources, groups per stream (at most max_groups + 1),
    of which ``health_groups`` pass router_health_groups (None: all), and agent ranks per run."""

    layers: int
    experts: int
    runs: int = 1
    sources: int = 2
    groups: int | None = None  # None: the config's max_groups + 1 ("other")
    health_groups: int | None = None
    ranks: int = 1


def series_bound(config: CollectorConfig, load: Load) -> dict[str, int]:
    """Series per family (exposition lines with a value), and "total"."""
    L, E = load.layers, load.experts
    groups = config.max_groups + 1 if load.groups is None else load.groups
    health = groups if load.health_groups is None else load.health_groups
    if config.router_health_groups == ():
        health = 0
    share_layers = min(L, config.expert_load_share_max_series // E) if E else 0
    dims = {"run": load.runs, "source": load.sources, "layer": L,
            "percentile": len(LOAD_PERCENTILES) if config.load_percentiles else 0,
            "end": 2, "rank": config.load_rank_k, "phase": len(PHASES), "version": 1,
            "reason": len(ALL_REASONS), "thread": len(LOOP_THREADS), "what": len(PERSIST_ERRORS)}
    out: dict[str, int] = {}
    buckets = dict(zip(HIST_NAMES, NB_R.tolist()))
    for spec in SPECS:
        n = 1
        for label in spec.labels:
            if label == "group":
                n *= (health if spec.name in ROUTER_HEALTH else groups) + (1 if spec.name in WITH_CROSS else 0)
            elif label == "rank" and spec.name.startswith("agent_"):
                n *= load.ranks
            elif label == "reason" and spec.name == "agent_messages_dropped_total":
                n *= len(AGENT_DROP_REASONS) + 1  # + "other"
            elif label == "reason" and spec.name == "collector_handshake_failures_total":
                n *= len(HANDSHAKE_REASONS)
            elif label == "expert":
                n *= E
            elif label in ("distribution", "experts", "top_k", "agent_version", "layers"):
                n *= 1  # run_info: one series a run
            else:
                n *= dims[label]
        if spec.name == "expert_load_share":
            n = load.runs * share_layers * E
        if spec.kind == "histogram":  # the bounds and +Inf, then _sum and _count (a signed one: its _sum_signed gauge)
            n *= buckets[HISTOGRAMS[spec.name][0]] + (1 if spec.signed else 3)
        elif spec.kind == "summary":
            n *= 2
        out[spec.name] = n
    out["total"] = sum(out.values())
    return out


def startup_line(config: CollectorConfig) -> str:
    """The bound before any shape is known: affine in the layers L (and the opt-in heatmap's cap), per run."""
    no_share = dataclasses.replace(config, expert_load_share_max_series=0)
    a = series_bound(no_share, Load(layers=0, experts=2, runs=1, sources=3))["total"]
    b = series_bound(no_share, Load(layers=1, experts=2, runs=1, sources=3))["total"] - a
    olmoe = series_bound(config, Load(layers=16, experts=64, runs=1, sources=3))["total"]
    heat = f" + min(L x E, {config.expert_load_share_max_series})" if config.expert_load_share_max_series else ""
    return (f"series bound: at most {a:,} + {b:,} x L{heat} per run (L MoE layers; {config.max_groups} groups, 3 "
            f"sources, router health for {'all groups' if config.router_health_groups == ('*',) else list(config.router_health_groups) or 'no group'}), "
            f"{config.max_runs} runs at most: {olmoe:,} a run at OLMoE's 16 layers (docs/collector.md, \"Series per collector\")")
