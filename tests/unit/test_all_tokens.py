"""Issue 31 part 1, the collector's side: a run's all-token counts summed over its ranks per interval
(collector/all_tokens.py), exported as the framework's figures (equal to reference.all_token_load over the
same counts), kept exact in a snapshot, and validated when one is read back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from wire_factories import make_hello, make_routing

from grokwatch.collector import pipeline, reference
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.persist import SnapshotError, load_snapshot_bytes
from grokwatch.collector.schema import validate_state
from grokwatch.collector.service import snapshot_blob
from grokwatch.collector.state import State
from grokwatch.collector.view import build_view

L, E, K = 3, 4, 2


def _msg(rank: int, seq: int, step: int, counts, forwards: int = 5, sender: str | None = None):
    m = make_routing(rank=rank, sender=sender or f"s{rank}", seq=seq, step=step, n=2, num_layers=L, num_experts=E,
                     top_k=K)
    return dataclasses.replace(m, expert_tokens_LE=np.asarray(counts, np.uint64), counted_forwards=forwards)


def _state(world: int) -> State:
    state = State(CollectorConfig(window_samples=8, comparisons_per_sample=2), journal=lambda r: None)
    for rank in range(world):
        pipeline.handle(state, make_hello(rank=rank, sender=f"s{rank}", seq=0, world_size=world, num_layers=L, num_experts=E,
                                top_k=K))
    return state


def _series(state: State) -> dict:
    return {(f.name, s.labels): s.value for f in build_view(state) for s in f.samples
            if f.name.startswith("grokwatch_router_")}


def test_an_interval_sums_its_ranks_and_closes_when_all_have_reported():
    rng = np.random.default_rng(0)
    state = _state(world=2)
    a, b = rng.integers(0, 50, (L, E)), rng.integers(0, 50, (L, E))
    a[1, 2] = b[1, 2] = 0  # dead in both ranks: dead in the sum
    b[0, 0] = 0  # dead in one rank only: alive in the sum
    pipeline.handle(state, _msg(0, 1, 10, a))
    assert ("grokwatch_router_all_tokens_interval_step", ("run-a",)) not in _series(state)  # rank 1 still due
    pipeline.handle(state, _msg(1, 1, 10, b))
    got = _series(state)
    want = reference.all_token_load(a + b, K)
    for layer, w in enumerate(want):
        assert got[("grokwatch_router_all_tokens_load_imbalance_ratio", ("run-a", str(layer)))] == \
            pytest.approx(w["imbalance"], rel=1e-12)
        assert got[("grokwatch_router_all_tokens_load_cv", ("run-a", str(layer)))] == pytest.approx(w["cv"], rel=1e-12)
        assert got[("grokwatch_router_all_tokens_dead_experts", ("run-a", str(layer)))] == w["dead"]
    assert got[("grokwatch_router_all_tokens_dead_experts", ("run-a", "1"))] == 1
    for layer in range(L):  # OLMo-core's figure: the worst rank's own imbalance
        worst = max(reference.all_token_load(x, K)[layer]["imbalance"] for x in (a, b))
        assert got[("grokwatch_router_all_tokens_rank_load_imbalance_max", ("run-a", str(layer)))] == \
            pytest.approx(worst, rel=1e-12)
    assert got[("grokwatch_router_all_tokens_interval_step", ("run-a",))] == 10
    assert got[("grokwatch_router_all_tokens_interval_ranks", ("run-a",))] == 2
    assert got[("grokwatch_router_counted_forwards_total", ("run-a",))] == 10
    assert got[("grokwatch_router_routed_tokens_total", ("run-a",))] == int((a + b).sum(axis=1).max()) // K


def test_a_rank_that_lost_its_message_closes_at_the_next_step_and_a_late_one_goes_to_the_counters_only():
    state = _state(world=2)
    one = np.full((L, E), 3)
    pipeline.handle(state, _msg(0, 1, 10, one))  # rank 1's step-10 message never comes
    pipeline.handle(state, _msg(0, 2, 20, 2 * one))  # a later step closes step 10 with one rank
    got = _series(state)
    assert got[("grokwatch_router_all_tokens_interval_step", ("run-a",))] == 10
    assert got[("grokwatch_router_all_tokens_interval_ranks", ("run-a",))] == 1
    pipeline.handle(state, _msg(1, 1, 10, 5 * one))  # rank 1's step 10, after step 20 opened: late
    counts = state.all_tokens["run-a"]
    assert counts.late_total == 1 and counts.open_step == 20 and counts.open_ranks == {0}
    assert (counts.total_LE == 8 * one).all()  # every message in the totals, once
    pipeline.handle(state, _msg(1, 2, 20, one))
    assert counts.closed_step == 20 and (counts.closed_LE == 3 * one).all()


def test_the_counts_survive_a_snapshot_exactly_and_a_damaged_one_is_refused():
    state = _state(world=1)
    big = np.full((L, E), 2**60, np.uint64)  # beyond float64's exact integers
    pipeline.handle(state, _msg(0, 1, 10, big))
    pipeline.handle(state, _msg(0, 2, 20, np.ones((L, E), np.uint64)))
    data = load_snapshot_bytes(snapshot_blob(state))
    validate_state(data, state.config)
    restored = State(state.config, journal=lambda r: None)
    restored.restore(data)
    assert (restored.all_tokens["run-a"].total_LE == big + 1).all()
    assert _series(restored) == _series(state)
    data["all_tokens"]["run-a"].closed_LE = np.zeros((L, E + 1), np.uint64)
    with pytest.raises(SnapshotError, match="closed_LE"):
        validate_state(data, state.config)


def test_messages_without_counts_make_no_all_token_series():
    state = _state(world=1)
    pipeline.handle(state, make_routing(n=2, num_layers=L, num_experts=E, top_k=K, sender="s0", seq=1))
    assert state.all_tokens == {} and not any("all_tokens" in name for name, _ in _series(state))


def test_the_aux_loss_is_the_mean_of_the_ranks_and_the_bias_the_lowest_ranks():
    state = _state(world=3)
    one = np.ones((L, E))
    bias = np.arange(L * E, dtype=np.float32).reshape(L, E) / 100
    for rank, aux, b in ((2, 3.0, bias + 1), (0, 1.0, bias), (1, None, None)):  # rank 1's model computes none
        pipeline.handle(state, dataclasses.replace(_msg(rank, 1, 10, one), aux_loss=aux, balance_bias_LE=b))
    got = _series(state)
    assert got[("grokwatch_router_aux_loss", ("run-a",))] == 2.0
    assert got[("grokwatch_router_balance_bias_std", ("run-a", "0"))] == pytest.approx(float(bias[0].std()), rel=1e-6)
    assert not any(name == "grokwatch_router_balance_bias_drift" for name, _ in got)  # one interval: no change yet
    for rank in range(3):
        pipeline.handle(state, dataclasses.replace(_msg(rank, 2, 20, one), aux_loss=0.5, balance_bias_LE=bias * 2))
    got = _series(state)
    assert got[("grokwatch_router_aux_loss", ("run-a",))] == 0.5
    drift = np.sqrt(((bias * 2 - bias).astype(np.float64) ** 2).mean(axis=1))
    for layer in range(L):
        assert got[("grokwatch_router_balance_bias_drift", ("run-a", str(layer)))] == pytest.approx(drift[layer],
                                                                                                  rel=1e-6)
    data = load_snapshot_bytes(snapshot_blob(state))
    validate_state(data, state.config)
    data["all_tokens"]["run-a"].closed_bias_LE = np.zeros((L, E), np.float64)
    with pytest.raises(SnapshotError, match="closed_bias_LE"):
        validate_state(data, state.config)


def test_aux_loss_without_counts_is_refused_on_the_wire():
    from grokwatch.wire import WireError, decode, encode

    with pytest.raises(WireError, match="expert_tokens only"):
        decode(encode(dataclasses.replace(make_routing(n=2, num_layers=L, num_experts=E, top_k=K), aux_loss=1.0)))


def _grouped(rank: int, seq: int, step: int, groups: dict, forwards: int = 5, extra=None):
    """A message whose counts are its groups' plus ``extra`` (untagged forwards' tokens)."""
    total = sum(np.asarray(c, np.uint64) for c in groups.values()) + (0 if extra is None else extra)
    m = _msg(rank, seq, step, total, forwards)
    return dataclasses.replace(m, group_token_names=tuple(groups), group_forwards=forwards - (extra is not None),
                               group_tokens_GLE=np.stack([np.asarray(c, np.uint64) for c in groups.values()]))


def _group_series(state: State) -> dict:
    return {(f.name.removeprefix("grokwatch_router_all_tokens_group_"), s.labels[1], s.labels[2]): s.value
            for f in build_view(state) for s in f.samples if f.name.startswith("grokwatch_router_all_tokens_group_")}


def test_counts_split_by_row_group_give_each_groups_figures_summed_over_the_ranks_of_the_interval():
    """Issue 31 part 1, per group where rows are tagged: each group's imbalance, CV and dead experts over the
    interval's summed ranks are the reference's (METRICS.md §3 over all tokens) of that group's counts — and
    only the groups' own: an untagged forward's tokens move the run's figures, never a group's. They close
    with the run's interval (not before every rank has reported)."""
    rng = np.random.default_rng(3)
    state = _state(world=2)
    a = {g: rng.integers(0, 30, (L, E)) for g in ("math", "code")}
    b = {"math": rng.integers(0, 30, (L, E)), "chem": rng.integers(0, 30, (L, E))}
    a["code"][2, 1] = 0  # code never picks expert 1 of layer 2: dead for code alone
    untagged = np.zeros((L, E), np.uint64)
    untagged[0, 3] = 10_000  # a skewed untagged forward: the run's layer 0, no group's
    pipeline.handle(state, _grouped(0, 1, 10, a, extra=untagged))
    assert _group_series(state) == {}  # rank 1 of step 10 still due
    pipeline.handle(state, _grouped(1, 1, 10, b))
    got = _group_series(state)
    want = {"math": a["math"] + b["math"], "code": a["code"], "chem": b["chem"]}
    for group, counts in want.items():
        for layer, ref in enumerate(reference.all_token_load(counts, K)):
            assert got[("load_imbalance_ratio", group, str(layer))] == pytest.approx(ref["imbalance"], rel=1e-12)
            assert got[("load_cv", group, str(layer))] == pytest.approx(ref["cv"], rel=1e-12, abs=1e-15)
            assert got[("dead_experts", group, str(layer))] == ref["dead"]
    assert got[("dead_experts", "code", "2")] >= 1
    run = _series(state)
    run_ref = reference.all_token_load(sum(want.values()) + untagged, K)
    assert run[("grokwatch_router_all_tokens_load_imbalance_ratio", ("run-a", "0"))] == \
        pytest.approx(run_ref[0]["imbalance"], rel=1e-12)
    assert max(got[("load_imbalance_ratio", g, "0")] for g in want) < run_ref[0]["imbalance"] / 2


def test_group_figures_follow_the_allow_list_and_the_group_cap():
    """router_health_groups gates the per-group all-token families as it gates the window's; past max_groups a
    run's new groups are summed as "other" (a bounded number of series whatever the agents send)."""
    state = State(CollectorConfig(window_samples=8, comparisons_per_sample=2, max_groups=2,
                                  router_health_groups=("math", "other")), journal=lambda r: None)
    pipeline.handle(state, make_hello(world_size=1, num_layers=L, num_experts=E, top_k=K))
    ones = np.ones((L, E), np.uint64)
    pipeline.handle(state, _grouped(0, 1, 10, {"math": ones, "code": ones, "chem": ones, "bio": 2 * ones}))
    groups = {g for _, g, _ in _group_series(state)}
    assert groups == {"math", "other"}  # code: admitted but not allowed; chem and bio: past the cap
    counts = state.all_tokens["run-a"].closed_groups
    assert set(counts) == {"math", "code", "other"} and (counts["other"] == 3).all()


def test_a_committed_version_3_snapshot_restores_and_goes_on():
    """Issue 30 part 3: a snapshot written by the previous format (tests/golden/snapshot-v3.bin: written by
    d9722d1 — two ranks, six steps of all-token counts, before the per-group counts and with the state's old
    stale-read counter) loads through persist.MIGRATIONS, validates, restores, renders and takes new
    messages."""
    from pathlib import Path

    from grokwatch.collector.persist import load_snapshot_bytes

    blob = (Path(__file__).parent.parent / "golden" / "snapshot-v3.bin").read_bytes()
    config = CollectorConfig(window_samples=8, comparisons_per_sample=2, seed=3)
    data = load_snapshot_bytes(blob)
    validate_state(data, config)
    assert "stale_stream_reads" not in data and data["all_tokens"]["run-a"].closed_groups == {}
    state = State(config, journal=lambda r: None)
    state.restore(data)
    before = _series(state)
    assert before[("grokwatch_router_all_tokens_interval_step", ("run-a",))] == 60
    assert state.samples_total == 24
    ones = np.ones((L, E), np.uint64)
    for rank in range(2):
        pipeline.handle(state, _grouped(rank, 7, 70, {"math": ones}, forwards=5))
    assert state.samples_total == 28
    assert _group_series(state)[("dead_experts", "math", "0")] == 0


def test_the_tensorboard_and_wandb_series_carry_each_groups_figures_at_the_intervals_step():
    from grokwatch.collector import scalars

    state = _state(world=1)
    rng = np.random.default_rng(9)
    pipeline.handle(state, _grouped(0, 1, 30, {"math": rng.integers(1, 9, (L, E)), "code": rng.integers(1, 9, (L, E))}))
    fams = scalars.families(build_view(state))
    got = {p.tag: (p.value, p.step) for p in scalars.points(fams, scalars.group_steps(fams)) if p.run == "run-a"}
    view = _group_series(state)
    for group in ("math", "code"):
        for layer in range(L):
            assert got[f"router/{group}/layer{layer}/load_imbalance"] == \
                (view[("load_imbalance_ratio", group, str(layer))], 30)
            assert got[f"router/{group}/layer{layer}/dead_experts"][0] == view[("dead_experts", group, str(layer))]


def test_the_dropped_fraction_is_the_intervals_dropped_picks_over_all_its_picks():
    """Issue 31 part 2: per layer, dropped ÷ (counted + dropped) over the interval's ranks; no series for an agent
    that ships no dropped picks; a snapshot keeps them."""
    state = _state(world=2)
    a, b = np.full((L, E), 10, np.uint64), np.full((L, E), 5, np.uint64)
    pipeline.handle(state, dataclasses.replace(_msg(0, 1, 10, a), dropped_picks_L=np.array([0, 20, 40], np.uint64)))
    pipeline.handle(state, dataclasses.replace(_msg(1, 1, 10, b), dropped_picks_L=np.array([0, 10, 20], np.uint64)))
    got = {s.labels[1]: s.value for f in build_view(state) if f.name == "grokwatch_router_all_tokens_dropped_pick_fraction"
           for s in f.samples}
    picks = (10 + 5) * E
    assert got == {"0": 0.0, "1": 30 / (picks + 30), "2": 60 / (picks + 60)}
    restored = State(state.config, journal=lambda r: None)
    data = load_snapshot_bytes(snapshot_blob(state))
    validate_state(data, state.config)
    restored.restore(data)
    assert _series(restored) == _series(state)
    old = _state(world=1)
    pipeline.handle(old, _msg(0, 1, 10, a))  # an agent before dropped picks
    assert not [s for f in build_view(old) if f.name == "grokwatch_router_all_tokens_dropped_pick_fraction"
                for s in f.samples]
