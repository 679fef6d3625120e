"""Issue 31 part 3: the series one collector exports are computable before deploying (collector/cardinality.py)
and bounded by configuration — checked against the real exposition of fully populated states, at a small shape
(family by family, and tight) and at two production shapes (OLMoE-1B-7B: 16 layers x 64 experts; DeepSeek-V3:
58 x 256), with 32 groups and two sources."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
from prometheus_client.exposition import generate_latest
from wire_factories import make_eval, make_heartbeat, make_hello, make_routing

from grokwatch.collector import pipeline
from grokwatch.collector.cardinality import Load, series_bound, startup_line
from grokwatch.collector.config import CollectorConfig, ConfigError
from grokwatch.collector.prometheus import make_registry
from grokwatch.collector.state import State
from grokwatch.collector.view import ROUTER_HEALTH


def populated(config: CollectorConfig, L: int, E: int, reps: int = 2) -> State:
    """Every family a stream can fill: more groups than max_groups (so "other" too), train (with all-token
    counts) and probe (with losses), eval scores, a heartbeat with a drop."""
    state = State(config, journal=lambda r: None)
    pipeline.handle(state, make_hello(num_layers=L, num_experts=E, top_k=2, world_size=1))
    rng = np.random.default_rng(0)
    groups = tuple(f"g{i}" for i in range(config.max_groups + 3))
    seq = 1
    for source in ("train", "probe"):
        for rep in range(reps):
            m = make_routing(rng=rng, seq=seq, step=10 * (rep + 1), n=len(groups), num_layers=L, num_experts=E,
                             top_k=2, groups=groups, source=source, loss=source == "probe",
                             sample_ids=[f"{source}{rep}-{i}" for i in range(len(groups))])
            if source == "train":
                tokens_LE = np.arange(L * E, dtype=np.uint64).reshape(L, E)
                m = dataclasses.replace(m, expert_tokens_LE=tokens_LE, counted_forwards=1,
                                        dropped_picks_L=np.ones(L, np.uint64),  # and picks of no expert
                                        group_token_names=groups, group_forwards=1,  # split by row group too
                                        group_tokens_GLE=np.stack([tokens_LE // len(groups)] * len(groups)))
            pipeline.handle(state, m)
            seq += 1
    pipeline.handle(state, make_heartbeat(seq=seq, messages_dropped={"queue_full": 1}))
    pipeline.handle(state, make_eval(seq=seq + 1, step=20, scores={g: 0.5 for g in groups[: config.max_groups]}))
    return state


def exported(state: State) -> dict[str, int]:
    """Series per family in the text exposition (a histogram's _bucket, _sum, _count lines under its name)."""
    specs = set(series_bound(state.config, Load(1, 2)))
    count: collections.Counter = collections.Counter()
    for line in generate_latest(make_registry(state)).decode().splitlines():
        if line.startswith("#") or not line:
            continue
        name = line.split("{")[0].split(" ")[0][len("grokwatch_"):]
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name[: -len(suffix)] in specs:
                name = name[: -len(suffix)]
                break
        count[name] += 1
    return dict(count)


def config(**kw) -> CollectorConfig:
    return CollectorConfig(window_samples=8, comparisons_per_sample=2, max_memory_mb=4096, **kw)


def test_the_bound_holds_family_by_family_and_is_tight():
    cfg = config(max_groups=4, expert_load_share_max_series=64)
    got = exported(populated(cfg, 3, 4))
    bound = series_bound(cfg, Load(layers=3, experts=4, sources=2))
    assert set(got) <= set(bound)
    for name, n in got.items():
        assert n <= bound[name], name
    # what the bound counts and this state cannot fill: the optional families of dated phases, transfers,
    # z-loss, the agents' other drop reasons
    assert sum(got.values()) >= 0.9 * bound["total"]
    assert got["expert_load_share"] == 3 * 4 == bound["expert_load_share"]


@pytest.mark.parametrize("L, E", [(16, 64), (58, 256)], ids=["olmoe", "dsv3"])
def test_production_shapes_stay_under_their_bound_and_the_allow_list_bounds_them(L, E):
    full = config(max_groups=32)
    lean = config(max_groups=32, router_health_groups=())
    load = Load(layers=L, experts=E, sources=2)
    got = exported(populated(full, L, E, reps=1))
    assert sum(got.values()) <= series_bound(full, load)["total"]
    got = exported(populated(lean, L, E, reps=1))
    bound = series_bound(lean, load)
    assert sum(got.values()) <= bound["total"]
    assert not set(got) & ROUTER_HEALTH  # no per-group router health at all
    assert got["router_all_tokens_load_imbalance_ratio"] == L  # the run's all-token figures remain
    # the documented figures (docs/collector.md, "Series per collector")
    assert series_bound(full, load)["total"] == {16: 36_942, 58: 113_634}[L]
    assert bound["total"] == {16: 10_014, 58: 16_020}[L]


def test_router_health_goes_to_the_allowed_groups_only():
    cfg = config(max_groups=4, router_health_groups=("g1", "g3*"))
    state = populated(cfg, 2, 4, reps=1)
    groups = {s.labels["group"] for f in make_registry(state).collect() if f.name == "grokwatch_expert_load_cv"
              for s in f.samples}
    assert groups == {"g1", "g3"}
    assert {s.labels["group"] for f in make_registry(state).collect() if f.name == "grokwatch_distinct_pathways"
            for s in f.samples} >= {"g0", "g1", "g2", "g3"}  # the pathway families stay for every group
    with pytest.raises(ConfigError, match="router_health_groups"):
        CollectorConfig(router_health_groups=("",))


def test_the_heatmap_family_is_opt_in_whole_layers_within_its_cap_and_equal_to_the_counts():
    L, E = 3, 4
    state = populated(config(max_groups=2, expert_load_share_max_series=9), L, E, reps=1)  # 2 whole layers of 4
    share = {(s.labels["layer"], s.labels["expert"]): s.value for f in make_registry(state).collect()
             if f.name == "grokwatch_expert_load_share" for s in f.samples}
    counts = np.arange(L * E, dtype=np.float64).reshape(L, E)
    assert share == {(str(l), str(e)): counts[l, e] / counts[l].sum() for l in range(2) for e in range(E)}
    off = populated(config(max_groups=2), L, E, reps=1)
    assert "expert_load_share" not in exported(off)


def test_the_start_up_line_states_the_bound():
    line = startup_line(CollectorConfig())
    per_run = series_bound(CollectorConfig(), Load(layers=16, experts=64, sources=3))["total"]
    assert f"{per_run:,} a run at OLMoE's 16 layers" in line and "router health for all groups" in line
