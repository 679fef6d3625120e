"""Collector state against the METRICS.md reference, message by message."""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
import pytest
from wire_factories import make_eval, make_heartbeat, make_hello, make_routing

from grokwatch.collector import pipeline, reference
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.evidence import CROSS_GROUP
from grokwatch.collector.reasons import Rejected
from grokwatch.collector.state import State
from grokwatch.wire import Limits, encode


def new_state(**kw):
    kw.setdefault("comparisons_per_sample", 64)
    kw.setdefault("window_samples", 64)
    records = []
    state = State(CollectorConfig(**kw), journal=records.append, clock=time.time)
    return state, records


def pathways(msgs, tau=0.7, unit="expert"):
    out = []
    for m in msgs:
        E = m.mean_probs_NLE.shape[2]
        for i in range(m.num_samples):
            layers = reference.pathway_layers(m.mean_probs_NLE[i], tau)
            out.append((reference.pathway_symbols(layers, E) if unit == "expert" else reference.pathway_string(layers),
                        layers))
    return out


@pytest.mark.parametrize("unit", ["expert", "string"])
def test_group_distance_sums_equal_all_pairs_reference_when_window_holds_everything(unit):
    state, records = new_state(distance_unit=unit)
    rng = np.random.default_rng(3)
    msgs = [make_routing(rng=rng, seq=s + 1, n=4, num_layers=3, num_experts=12, top_k=2, step=s * 10,
                         concentration=0.3) for s in range(5)]
    for m in msgs:
        pipeline.handle(state, m)
    series = state.streams[("run-a", "train")].groups["math"].series
    paths = pathways(msgs, unit=unit)
    # Each message re-sends sample-0..3 (the same samples, seen again): a sample is never compared with a
    # copy of itself (METRICS.md §1, distinct ids), so the pairs are those of distinct ids.
    ids = [sid for m in msgs for sid in m.sample_ids]
    pairs = [(i, j) for i, j in itertools.combinations(range(len(paths)), 2) if ids[i] != ids[j]]
    assert len(pairs) == 190 - 4 * 10
    dists = [reference.levenshtein(paths[i][0], paths[j][0]) for i, j in pairs]
    norms = [reference.normalized_distance(d, len(paths[i][0]), len(paths[j][0])) for d, (i, j) in zip(dists, pairs)]
    h = series.hist["distance"]
    assert h.count == len(pairs)
    assert h.sum == sum(dists)
    assert series.hist["distance_normalized"].sum == pytest.approx(sum(norms), rel=1e-9)
    for layer in range(3):
        expected = sum(reference.levenshtein(paths[i][1][layer], paths[j][1][layer]) for i, j in pairs)
        assert series.layer_distance_sum_L[layer] == expected
        assert series.layer_distance_count_L[layer] == len(pairs)
    # The journal point of the last message: the mean over that message's comparisons.
    last = [r for r in records if r["kind"] == "point"][-1]
    new = range(16, 20)
    exp = [reference.levenshtein(paths[i][0], paths[j][0]) for i in new for j in range(i) if ids[i] != ids[j]]
    assert last["distance"] == pytest.approx(np.mean(exp))
    assert last["step"] == 40 and last["samples"] == 4


def test_consistency_and_cosine_follow_the_definition_and_undefined_cases_are_counted():
    state, records = new_state()
    msg = make_routing(n=6, num_layers=4, num_experts=8)
    cos = np.array(msg.adj_cosine_NJ, np.float64)
    pipeline.handle(state, msg)
    series = state.streams[("run-a", "train")].groups["math"].series
    expected = [reference.consistency(list(c)) for c in cos]
    defined = [e[0] for e in expected if e[0] is not None]
    assert series.hist["consistency"].count == len(defined)
    assert series.hist["consistency"].sum == pytest.approx(sum(defined), rel=1e-6)
    assert series.consistency_undefined_total == len(expected) - len(defined)
    assert series.hist["adjacent_cosine"].sum == pytest.approx(sum(e[1] for e in expected), rel=1e-6)


def test_two_moe_layers_export_only_the_raw_cosine():
    state, _ = new_state()
    pipeline.handle(state, make_routing(n=5, num_layers=2))
    series = state.streams[("run-a", "train")].groups["math"].series
    assert series.hist["consistency"].count == 0
    assert series.consistency_undefined_total == 5
    assert series.hist["adjacent_cosine"].count == 5


def test_router_health_equals_reference_over_the_window():
    state, _ = new_state(window_samples=8)
    rng = np.random.default_rng(5)
    msgs = [make_routing(rng=rng, seq=s + 1, n=3, num_layers=3, num_experts=6, top_k=2) for s in range(4)]
    for m in msgs:
        pipeline.handle(state, m)
    window = state.streams[("run-a", "train")].groups["math"].window
    health = window.health(2)
    # The window keeps the last 8 of 12 samples.
    counts = np.concatenate([m.topk_counts_NLE for m in msgs])[-8:]
    tokens = np.concatenate([m.token_counts_N for m in msgs])[-8:]
    entropy = np.concatenate([m.entropy_NL for m in msgs])[-8:]
    ref = reference.router_health(counts, tokens, entropy, 2)
    for layer, r in enumerate(ref):
        assert health["imbalance_L"][layer] == pytest.approx(r["imbalance"], rel=1e-9)
        assert health["cv_L"][layer] == pytest.approx(r["cv"], rel=1e-9)
        assert health["dead_L"][layer] == r["dead"]
        assert health["entropy_L"][layer] == pytest.approx(r["entropy"], rel=1e-6)
    paths = {tuple(p[0]) for p in pathways(msgs)[-8:]}
    assert health["distinct"] == len(paths)


def test_cross_group_baseline_compares_with_other_groups_only():
    state, _ = new_state(comparisons_per_sample=16)
    rng = np.random.default_rng(9)
    a = make_routing(rng=rng, seq=1, n=4, groups=("math",) * 4, sample_ids=[f"m{i}" for i in range(4)])
    b = make_routing(rng=rng, seq=2, n=3, groups=("code",) * 3, sample_ids=[f"c{i}" for i in range(3)])
    pipeline.handle(state, a)
    pipeline.handle(state, b)
    stream = state.streams[("run-a", "train")]
    cross = stream.cross.hist["distance"]
    assert cross.count == 3 * 16  # every code sample drew 16 pairs from math's window
    pa, pb = pathways([a]), pathways([b])
    all_cross = [reference.levenshtein(x[0], y[0]) for x in pa for y in pb]
    assert min(all_cross) * cross.count <= cross.sum <= max(all_cross) * cross.count
    assert CROSS_GROUP not in stream.groups


def test_group_labels_are_capped_into_other():
    state, _ = new_state(max_groups=2)
    pipeline.handle(state, make_routing(n=4, groups=("a", "b", "c", "d")))
    assert set(state.streams[("run-a", "train")].groups) == {"a", "b", "other"}


def test_sequence_gaps_count_as_lost_and_replays_as_duplicates():
    state, _ = new_state()
    pipeline.handle(state, make_hello(seq=0))
    pipeline.handle(state, make_routing(seq=1))
    pipeline.handle(state, make_routing(seq=4))
    assert state.lost_total == 2
    with pytest.raises(Rejected) as info:
        pipeline.handle(state, make_routing(seq=4))
    assert info.value.reason == "duplicate"


def test_shape_mismatch_against_the_runs_hello_is_rejected():
    state, _ = new_state()
    pipeline.handle(state, make_hello(num_layers=4, num_experts=8, top_k=2))
    with pytest.raises(Rejected) as info:
        pipeline.handle(state, make_routing(num_layers=3, seq=1))
    assert info.value.reason == "shape_mismatch"


def test_pipeline_stages_under_one_run_are_told_apart_by_their_layers_and_the_second_is_refused():
    """Two pipeline stages with as many MoE layers each have the same shape: mixed under one run, their
    pathways would compare layers 0-3 with layers 4-7. The hello's layer names tell them apart: the
    stage that says hello second is refused, hello and summaries, as shape_mismatch. The same layers
    behind a wrapper (DDP's module.), an agent that names no layers, and another run are accepted, and
    the run's layers survive a snapshot."""
    stage0 = [f"model.layers.{i}.mlp.gate" for i in range(4)]
    stage1 = [f"model.layers.{i}.mlp.gate" for i in range(4, 8)]
    state, _ = new_state()
    pipeline.handle(state, make_hello(sender="pp0", layer_names=stage0))
    pipeline.handle(state, make_routing(sender="pp0", seq=1, n=2))
    with pytest.raises(Rejected) as info:
        pipeline.handle(state, make_hello(sender="pp1", layer_names=stage1))
    assert info.value.reason == "shape_mismatch"
    with pytest.raises(Rejected) as info:
        pipeline.handle(state, make_routing(sender="pp1", seq=1, n=2))
    assert info.value.reason == "shape_mismatch"
    pipeline.handle(state, make_hello(sender="ddp", layer_names=[f"module.{name}" for name in stage0]))
    pipeline.handle(state, make_routing(sender="ddp", seq=1, n=2))
    pipeline.handle(state, make_hello(sender="old"))
    pipeline.handle(state, make_routing(sender="old", seq=1, n=2))
    pipeline.handle(state, make_hello(run="run-b", sender="pp1b", layer_names=stage1))
    pipeline.handle(state, make_routing(run="run-b", sender="pp1b", seq=1, n=2))
    assert state.samples_total == 8
    restored, _ = new_state()
    restored.restore(state.snapshot())
    with pytest.raises(Rejected):
        pipeline.handle(restored, make_hello(sender="pp1-again", layer_names=stage1))
    # A version-2 snapshot from before the run tables were one object (runs.py) names them one by one: the
    # migration to version 3 (persist.MIGRATIONS) makes them the Runs.
    from grokwatch.collector.persist import MAGIC, _pack, load_snapshot_bytes

    old = {k: v for k, v in state.snapshot().items() if k != "runs"}
    old.update(shapes=dict(state.runs.shapes), layer_ids=dict(state.runs.layer_ids),
               world_sizes=dict(state.runs.world_sizes), run_seen=dict(state.runs.seen),
               shape_seen=dict(state.runs.shape_seen))
    from_old, _ = new_state()
    from_old.restore(load_snapshot_bytes(MAGIC + _pack({"version": 2, "state": old})))
    assert from_old.shapes == state.shapes and from_old.runs.layer_ids == state.runs.layer_ids
    with pytest.raises(Rejected):
        pipeline.handle(from_old, make_hello(sender="pp1-again", layer_names=stage1))


def test_stale_messages_are_rejected():
    state = State(CollectorConfig(max_message_age_s=10), clock=lambda: time.time() + 11)
    with pytest.raises(Rejected) as info:
        pipeline.handle(state, make_routing())
    assert info.value.reason == "stale"


def test_heartbeats_of_a_restarted_agent_never_make_totals_go_backwards():
    state, _ = new_state()
    pipeline.handle(state, make_hello(sender="old", seq=0))
    pipeline.handle(state, make_heartbeat(sender="old", seq=1, messages_sent=10, messages_dropped={"queue_full": 3}))
    pipeline.handle(state, make_hello(sender="new", seq=0))
    pipeline.handle(state, make_heartbeat(sender="new", seq=1, messages_sent=2, messages_dropped={"queue_full": 1}))
    totals = state.agent_totals()[("run-a", 0)]
    assert totals.sent == 12 and totals.dropped == {"queue_full": 4}


def test_eval_groups_are_capped_per_run_and_the_excess_counted():
    """Each eval group is a Prometheus series: a run naming more than max_groups (a metric name per
    step, say) keeps the first ones, still updated, and every message that named more is rejected."""
    state, records = new_state(max_groups=2, max_runs=1)
    pipeline.handle(state, make_hello(seq=0))
    pipeline.handle(state, make_eval(seq=1, step=10, scores={"math": 0.5, "code": 0.25}))
    with pytest.raises(Rejected) as info:
        pipeline.handle(state, make_eval(seq=2, step=20, scores={"math": 0.75, "bio": 0.1}))
    assert info.value.reason == "too_many_groups"
    assert state.evals == {("run-a", "math"): (20, 0.75), ("run-a", "code"): (10, 0.25)}
    assert records[-1]["scores"] == {"math": 0.75}
    with pytest.raises(Rejected) as info:
        pipeline.handle(state, make_eval(run="run-b", sender="s1", seq=1, step=1, scores={"all": 1.0}))  # no hello: no series
    assert info.value.reason == "unknown_run"
    with pytest.raises(Rejected) as info:
        pipeline.handle(state, make_hello(run="run-b", sender="s1", seq=2))  # runs are capped
    assert info.value.reason == "too_many_runs"


def test_a_second_hello_moves_the_senders_counters_to_its_rank():
    """An agent attached before torch.distributed was initialized says hello as rank 0 of 1, then again
    as its real rank: its counters must not stay under rank 0, beside the real rank 0's."""
    state, _ = new_state()
    pipeline.handle(state, make_hello(sender="late", seq=0, rank=0, world_size=1))
    pipeline.handle(state, make_hello(sender="late", seq=1, rank=1, world_size=2))
    pipeline.handle(state, make_heartbeat(sender="late", rank=1, seq=2, messages_sent=7, messages_dropped={}))
    assert set(state.agent_totals()) == {("run-a", 1)}
    assert state.senders["late"].hello["world_size"] == 2


def test_eval_scores_are_kept_and_journaled():
    state, records = new_state()
    pipeline.handle(state, make_hello(seq=0))
    pipeline.handle(state, make_eval(step=30, scores={"math": 0.5, "code": 0.25}))
    assert state.evals[("run-a", "math")] == (30, 0.5)
    record = dict(records[-1])
    record.pop("t")
    assert record == dict(kind="eval", run="run-a", step=30, scores={"math": 0.5, "code": 0.25})


# ----------------------------------------------------------------- phases: evidence, carriers, buckets


def _memorizing(step):
    return 4.0 * max(0.0, 1 - step / 200) + 0.01


def _feed(state, source, steps, loss_in_points=False, losses=None, groups=("math", "code"), seq0=1):
    """Routing of two groups every 10 steps (peaked, so that the points are not all alike), and, for the
    train source, the user's loss per group as Loss messages."""
    from wire_factories import make_loss

    rng = np.random.default_rng(0)
    seq = seq0
    for step in steps:
        n = 2 * len(groups)
        msg = make_routing(rng=rng, seq=seq, n=n, step=step, source=source, groups=groups * 2,
                           sample_ids=[f"{source}{i}" for i in range(n)], concentration=0.3)
        if loss_in_points:
            msg = dataclasses.replace(msg, loss_N=np.full(n, _memorizing(step), np.float32))
        pipeline.handle(state, msg)
        seq += 1
        if losses:
            pipeline.handle(state, make_loss(seq=seq, step=step, losses={g: losses(step) for g in groups}))
            seq += 1
    return seq


def test_without_loss_evidence_every_group_is_unknown_and_nothing_is_dated(tmp_path):
    from grokwatch.collector.view import build_view

    state, records = new_state()
    _feed(state, "train", range(0, 400, 10))
    fams = {f.name: f for f in build_view(state)}
    phases = {(v[2], v[3]): x for v, x in fams["grokwatch_group_phase"].samples}
    assert phases[("math", "unknown")] == 1 and phases[("code", "unknown")] == 1
    assert not fams["grokwatch_group_memorized_step"].samples and not fams["grokwatch_group_onset_step"].samples
    assert {r["phase"] for r in records if r.get("kind") == "point" and "phase" in r} == {"unknown"}


def test_the_users_training_loss_is_evidence_and_is_journaled(tmp_path):
    from grokwatch.collector.view import build_view

    state, records = new_state()
    _feed(state, "train", range(0, 600, 10), losses=_memorizing)
    fams = {f.name: f for f in build_view(state)}
    dated = {v[2]: x for v, x in fams["grokwatch_group_memorized_step"].samples}
    assert set(dated) == {"math", "code"} and all(150 <= s <= 400 for s in dated.values())
    loss_records = [r for r in records if r.get("kind") == "loss"]
    assert len(loss_records) == 2 * 60 and loss_records[0]["source"] == "train"
    evidence = [r for r in records if "memorized_evidence" in r]
    assert len(evidence) == 2 and all(r["memorized_evidence"]["loss"] <= r["memorized_evidence"]["epsilon"]
                                      for r in evidence)


def test_a_loss_before_any_routing_of_its_run_is_rejected_with_its_reason():
    from wire_factories import make_loss

    state, _ = new_state()
    with pytest.raises(Rejected) as err:
        pipeline.handle(state, make_loss(seq=1))
    assert err.value.reason == "unknown_run"  # no hello yet
    pipeline.handle(state, make_hello(seq=2))
    with pytest.raises(Rejected) as err:
        pipeline.handle(state, make_loss(seq=3))
    assert err.value.reason == "no_routing"  # a hello, no train summaries yet


def test_one_source_carries_each_groups_phase_and_buckets_have_none():
    """The probe's per-sample losses and the user's training loss both date the same group: only the
    probe's dates are exported (one event, one report); the probe's mem@ buckets get no phase."""
    from grokwatch.collector.view import build_view

    state, _ = new_state(memorization_bucket_steps=100)
    seq = _feed(state, "train", range(0, 600, 10), losses=_memorizing)
    _feed(state, "probe", range(0, 600, 10), loss_in_points=True, seq0=seq)
    fams = {f.name: f for f in build_view(state)}
    dated = {(v[1], v[2]) for v, _ in fams["grokwatch_group_memorized_step"].samples}
    assert dated == {("probe", "math"), ("probe", "code")}
    assert state.streams[("run-a", "train")].phases["math"].memorized_step is not None  # computed, not exported
    buckets = [g for g in state.streams[("run-a", "probe")].labels if g.startswith("mem@")]
    assert buckets and not any(b in state.streams[("run-a", "probe")].phases for b in buckets)
    assert not any(v[2].startswith("mem@") for v, _ in fams["grokwatch_group_phase"].samples)


# ----------------------------------------------------------------- strangers within a run


def test_a_forged_heartbeat_cannot_make_an_agents_counters_go_backwards_or_add_reasons():
    state, _ = new_state()
    pipeline.handle(state, make_hello(seq=0))
    pipeline.handle(state, make_heartbeat(seq=1, messages_sent=5000, messages_dropped={"queue_full": 7}))
    pipeline.handle(state, make_heartbeat(seq=2, messages_sent=0, messages_dropped={"queue_full": 0, "x" * 50: 9, "y": 1}))
    totals = state.agent_totals()[("run-a", 0)]
    assert totals.sent == 5000
    assert totals.dropped == {"queue_full": 7, "other": 10}


def test_a_forged_sequence_jump_is_rejected_and_the_senders_next_message_still_counts():
    state, _ = new_state()
    pipeline.handle(state, make_hello(seq=0))
    with pytest.raises(Rejected) as err:
        pipeline.handle(state, make_routing(seq=2**63 - 1))
    assert err.value.reason == "sequence_jump"
    pipeline.handle(state, make_routing(seq=1))  # not a duplicate
    assert state.lost_total == 0 and state.samples_total == 3


def test_ranks_beyond_the_world_size_add_no_series():
    state, _ = new_state()
    pipeline.handle(state, make_hello(seq=0, world_size=2))
    for kind in (make_heartbeat, make_routing, make_eval):
        with pytest.raises(Rejected) as err:
            pipeline.handle(state, kind(rank=5, sender=f"r5-{kind.__name__}", seq=1))
        assert err.value.reason == "bad_rank"
    assert set(state.agent_totals()) <= {("run-a", 0)}


def test_idle_runs_expire_and_free_their_slot():
    now = [1000.0]
    state = State(CollectorConfig(max_runs=1, run_idle_expiry_s=600), clock=lambda: now[0])
    hello = lambda **kw: dataclasses.replace(make_hello(**kw), wall_time=now[0])  # noqa: E731
    pipeline.handle(state, hello(run="old", sender="a", seq=0))
    now[0] += 300
    with pytest.raises(Rejected) as err:
        pipeline.handle(state, hello(run="new", sender="b", seq=0))
    assert err.value.reason == "too_many_runs"
    now[0] += 700  # "old" idle for 1,000 s > 600: the next message's sweep forgets it first
    pipeline.handle(state, hello(run="other", sender="c", seq=0))
    assert set(state.shapes) == {"other"} and not any(i.run == "old" for i in state.senders.values())


def test_group_slots_stop_at_max_groups_plus_other():
    state, _ = new_state(max_groups=32)
    for i in range(40):
        pipeline.handle(state, make_routing(seq=i + 1, n=1, groups=(f"g{i}",), sample_ids=(f"s{i}",)))
    stream = state.streams[("run-a", "train")]
    assert len(stream.labels) == 33 and stream.labels[-1] == "other"
    assert len(stream.win_filled_G) == 33  # not 64


def test_a_model_over_max_layer_experts_is_rejected_before_it_costs_anything():
    """The kernels' cost per sample grows with the square of L·E: a shape beyond the bound is refused at its
    hello and its routing, with its own reason, and takes no run slot."""
    state, _ = new_state(max_layer_experts=31, max_runs=1)
    with pytest.raises(Rejected, match="shape_too_large"):
        pipeline.handle(state, make_hello(num_layers=4, num_experts=8))
    with pytest.raises(Rejected, match="shape_too_large"):
        pipeline.handle(state, make_routing(seq=1, num_layers=4, num_experts=8))
    assert not state.streams and not state.shapes
    pipeline.handle(state, make_hello(run="small", sender="s1", num_layers=2, num_experts=8))  # 16 <= 31: the slot is free


def test_the_pathway_state_stays_within_max_memory_mb_and_the_excess_is_counted():
    state, _ = new_state(window_samples=16, max_memory_mb=1)  # OLMoE's shape: ~100 KB a group slot
    stream_bytes = []
    for i in range(12):
        try:
            pipeline.apply(state, encode(make_routing(seq=i + 1, n=1, num_layers=16, num_experts=64, top_k=8,
                                            groups=(f"g{i}",), sample_ids=(f"s{i}",))), Limits())
        finally:
            stream_bytes.append(state.memory_bytes())
    assert max(stream_bytes) <= 1024 * 1024
    assert state.rejected_total.get("memory_budget", 0) > 0
    admitted = len(state.streams[("run-a", "train")].labels)
    assert admitted == 8  # eight slots fit; doubling to sixteen would not
    assert admitted + state.rejected_total["memory_budget"] == 12 and state.samples_total == admitted
    assert state.received_total == 12  # every message counted once, under its reason


def test_the_collector_refuses_a_configuration_whose_worst_case_exceeds_the_container_limit(tmp_path):
    from grokwatch.collector.config import ConfigError
    from grokwatch.collector.service import check_memory, memory_limit_mb, worst_case_memory_mb

    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")
    assert memory_limit_mb((str(v2), str(v1))) is None
    v2.write_text(str(1024 * 2**20))
    assert memory_limit_mb((str(v2),)) == 1024
    v1.write_text(str(2**63 - 4096))  # cgroup v1's "no limit"
    assert memory_limit_mb((str(tmp_path / "absent"), str(v1))) is None
    config = CollectorConfig(max_memory_mb=512)
    assert worst_case_memory_mb(config) == 256 + 1024 + 256
    with pytest.raises(ConfigError, match="max_memory_mb 512.*1024 MiB"):
        check_memory(config, 1024)
    check_memory(config, 2048)
    check_memory(config, None)


def test_a_first_hello_of_another_shape_locks_out_the_real_run_only_while_it_keeps_talking():
    """A stranger's hello with another shape, sent first, made the real agent shape_mismatch for ever (and
    after every restart). Now a hello of another shape takes the run over only once nothing of the old
    shape has come for run_reshape_quiet_s: a live run keeps its shape; a quiet one (the stranger gone, or
    a job restarted with a new model) is a new incarnation, and its pathway state starts over."""
    now = [1000.0]
    state = State(CollectorConfig(run_reshape_quiet_s=60), journal=lambda r: None, clock=lambda: now[0])

    def at(t, msg):
        now[0] = t
        msg = dataclasses.replace(msg, wall_time=t)
        pipeline.handle(state, msg)

    at(1000, make_hello(sender="stranger", num_layers=3))  # the stranger says hello first
    with pytest.raises(Rejected, match="shape_mismatch"):
        at(1010, make_hello(sender="real", num_layers=4))  # the real job: refused while the stranger talks
    at(1030, make_hello(sender="stranger", seq=1, num_layers=3))
    with pytest.raises(Rejected, match="shape_mismatch"):
        at(1080, make_routing(sender="real", seq=1, num_layers=4))  # only a hello may take a run over
    at(1100, make_hello(sender="real", seq=2, num_layers=4))  # 70 s of silence of the old shape: taken over
    at(1101, make_routing(sender="real", seq=3, num_layers=4, n=2))
    assert state.shapes["run-a"] == (4, 8, 2) and state.samples_total == 2
    with pytest.raises(Rejected, match="shape_mismatch"):
        at(1120, make_hello(sender="stranger", seq=2, num_layers=3))  # the live run keeps its shape
    at(1121, make_routing(sender="real", seq=4, num_layers=4, n=2))
    # A job restarted with a new model: new senders, quiet old ones, accepted after the quiet time.
    with pytest.raises(Rejected, match="shape_mismatch"):
        at(1150, make_hello(sender="restarted", num_layers=6))
    at(1190, make_hello(sender="restarted", seq=1, num_layers=6))
    at(1191, make_routing(sender="restarted", seq=2, num_layers=6, n=3))
    assert state.shapes["run-a"] == (6, 8, 2)
    assert int(state.streams[("run-a", "train")].samples_G.sum()) == 3  # the old model's windows are gone
    assert state.samples_total == 7  # the counter goes on


def test_the_collectors_rejection_reasons_are_declared_exported_and_documented():
    """Like the wire's REASONS: a reason raised is declared, every declared one is a series from the start
    (alerts need it at 0), and docs/collector.md says what each means."""
    from pathlib import Path

    from grokwatch.collector.reasons import COLLECTOR_REASONS
    from grokwatch.collector.view import build_view

    with pytest.raises(AssertionError):
        Rejected("made_up")
    state, _ = new_state()
    [family] = [f for f in build_view(state) if f.name == "grokwatch_collector_messages_rejected_total"]
    exported = {values[0] for values, _ in family.samples}
    assert set(COLLECTOR_REASONS) <= exported
    docs = (Path(__file__).parents[2] / "docs" / "collector.md").read_text()
    assert [r for r in COLLECTOR_REASONS if f"`{r}`" not in docs] == []


def _peaked(sample_experts, num_layers, num_experts):
    """mean_probs [N, L, E] whose pathway is, at every layer, the one expert given per sample."""
    p = np.full((len(sample_experts), num_layers, num_experts), 0.0, np.float32)
    for i, k in enumerate(sample_experts):
        p[i, :, k] = 1.0
    return p


def test_probe_pairs_exclude_self_pairs_and_other_rounds_so_pathways_4_apart_average_exactly_4():
    """Issue 27's case: 16 probe samples whose pathways are pairwise exactly 4 edits apart, re-probed for
    12 rounds. The old estimator compared each with its own earlier copies (distance 0) and other rounds'
    samples: 3.79. Pairs of distinct ids within one round give exactly 4."""
    state, records = new_state(comparisons_per_sample=16, window_samples=256)
    L, E = 4, 16
    for rnd in range(12):
        for half in range(2):  # a round spans two messages
            ids = list(range(8 * half, 8 * half + 8))
            msg = make_routing(seq=2 * rnd + half + 1, n=8, num_layers=L, num_experts=E, step=100 * (rnd + 1),
                               source="probe", sample_ids=[f"doc-{i}" for i in ids], groups=("math",) * 8,
                               loss=True)
            msg = dataclasses.replace(msg, mean_probs_NLE=_peaked(ids, L, E))
            pipeline.handle(state, msg)
    series = state.streams[("run-a", "probe")].groups["math"].series
    h = series.hist["distance"]
    assert h.count == 12 * (16 * 15 // 2)  # every pair of a round once (≤ m eligible: all of them)
    assert h.sum / h.count == 4.0
    points = [r for r in records if r["kind"] == "point" and r["group"] == "math"]
    assert all(p["distance"] == 4.0 for p in points if p["distance"] is not None)
    # the first message of each round has no earlier sample of its round for its first sample only
    assert points[0]["distance"] == 4.0


def test_train_pairs_exclude_the_same_sample_seen_again_but_compare_across_steps():
    state, _ = new_state(comparisons_per_sample=64, window_samples=64)
    L, E = 3, 8
    for step in range(3):  # samples a, b each step, identical pathways for the same id
        msg = make_routing(seq=step + 1, n=2, num_layers=L, num_experts=E, step=step, sample_ids=["a", "b"],
                           groups=("math",) * 2)
        pipeline.handle(state, dataclasses.replace(msg, mean_probs_NLE=_peaked([0, 1], L, E)))
    h = state.streams[("run-a", "train")].groups["math"].series.hist["distance"]
    # a-b pairs only (within and across steps): 1 + 2·2 + 2·2... every (a, b) pair once = 3·3 = 9, each 3 edits
    assert h.count == 9 and h.sum == 9 * 3


def test_cross_group_probe_pairs_stay_within_the_round_or_the_last_one():
    state, _ = new_state(comparisons_per_sample=8)
    L, E = 3, 8
    for rnd, k in ((1, 0), (2, 1)):
        for seq_off, group, ids in ((0, "math", ["m0", "m1"]), (1, "code", ["c0", "c1"])):
            msg = make_routing(seq=2 * rnd + seq_off, n=2, num_layers=L, num_experts=E, step=rnd, source="probe",
                               sample_ids=ids, groups=(group,) * 2, loss=True)
            # round 1: every sample on expert 0; round 2: math on expert 1, code on expert 1
            pipeline.handle(state, dataclasses.replace(msg, mean_probs_NLE=_peaked([k, k], L, E)))
    cross = state.streams[("run-a", "probe")].cross.hist["distance"]
    # code's samples draw from math's same-round slots only: identical pathways, distance 0. Math, first in
    # round 2, finds no code sample of its round: its baseline takes code's latest round (1), 3 edits away.
    assert cross.count == 2 * 2 * 8 + 2 * 8 and cross.sum == 2 * 8 * 3


def test_points_journal_pathway_length_mean_routing_entropy_and_layer_distances():
    state, records = new_state(comparisons_per_sample=64, window_samples=64)
    rng = np.random.default_rng(11)
    msgs = [make_routing(rng=rng, seq=s + 1, n=5, num_layers=3, num_experts=6, step=s, concentration=0.5,
                         sample_ids=[f"s{s}-{i}" for i in range(5)]) for s in range(2)]
    for m in msgs:
        pipeline.handle(state, m)
    last = [r for r in records if r["kind"] == "point"][-1]
    paths = pathways(msgs)
    new, old = range(5, 10), range(5)
    assert last["pathway_length"] == pytest.approx(np.mean([len(paths[i][0]) for i in new]))
    g = msgs[1].mean_probs_NLE.astype(np.float64)
    hbar = [np.mean([-(row[row > 0] * np.log(row[row > 0])).sum() / np.log(6) for row in g[i]]) for i in range(5)]
    assert last["mean_routing_entropy"] == pytest.approx(np.mean(hbar), rel=1e-6)
    for layer in range(3):
        exp = [reference.levenshtein(paths[i][1][layer], paths[j][1][layer]) for i in new for j in list(old) + [
            k for k in new if k < i]]
        assert last["distance_layers"][layer] == pytest.approx(np.mean(exp))


def _round(state, seq, step, groups_ids, probs, losses):
    msg = make_routing(seq=seq, n=len(groups_ids), num_layers=probs.shape[1], num_experts=probs.shape[2], step=step,
                       source="probe", sample_ids=[sid for _, sid in groups_ids],
                       groups=tuple(g for g, _ in groups_ids), loss=True)
    pipeline.handle(state, dataclasses.replace(msg, mean_probs_NLE=probs.astype(np.float32),
                                     loss_N=np.asarray(losses, np.float32)))


def test_transfer_metric_and_fresh_loss_gap_equal_the_all_pairs_reference_per_round():
    """METRICS.md §6 live: per group and probe round, E = 2·D(train, fresh) − D(train, train) − D(fresh,
    fresh) over distinct pairs of the round (normalized pathway distances), its permutation z, and the
    fresh-loss gap, from the training samples and the fresh@ documents of the round."""
    from grokwatch.collector.transfer import discrepancy
    from grokwatch.wire import FRESH_PREFIX

    state, records = new_state(comparisons_per_sample=16, window_samples=256)
    rng = np.random.default_rng(2)
    L, E = 3, 8
    for rnd in range(3):
        train = rng.dirichlet(np.full(E, 0.3), size=(6, L))
        fresh = rng.dirichlet(np.full(E, 0.3), size=(5, L))
        tl, fl = rng.uniform(0, 1, 6), rng.uniform(2, 3, 5)
        step = 100 * (rnd + 1)
        _round(state, 2 * rnd + 1, step, [("math", f"t{i}") for i in range(6)], train, tl)
        _round(state, 2 * rnd + 2, step, [(FRESH_PREFIX + "math", f"f{i}") for i in range(5)], fresh, fl)
        paths = [reference.pathway_symbols(reference.pathway_layers(p, 0.7), E) for p in np.concatenate([train, fresh])]
        D = np.array([[reference.normalized_distance(reference.levenshtein(a, b), len(a), len(b)) for b in paths]
                      for a in paths])
        want = discrepancy(D, np.arange(6), np.arange(6, 11))
        got = [r for r in records if r["kind"] == "transfer" and r["step"] == step][-1]
        assert got["group"] == "math" and got["transfer_train"] == 6 and got["transfer_fresh"] == 5
        assert got["transfer"] == pytest.approx(want, abs=1e-6)
        g = np.concatenate([train, fresh]).astype(np.float32).astype(np.float64)
        JS = np.array([[np.mean([reference.js_divergence(a[layer], b[layer]) for layer in range(L)]) for b in g]
                       for a in g])
        assert got["transfer_js"] == pytest.approx(discrepancy(JS, np.arange(6), np.arange(6, 11)), abs=1e-6)
        assert got["transfer_js_z"] is not None
        assert got["fresh_loss_gap"] == pytest.approx(fl.mean() - tl.mean(), abs=1e-5)
        assert got["transfer_z"] is not None
    stream = state.streams[("run-a", "probe")]
    assert not stream.eligible_G[stream.index[FRESH_PREFIX + "math"]]  # not in the cross-group baseline
    assert FRESH_PREFIX + "math" not in stream.phases  # no phase of its own
    assert all(not str(r.get("group", "")).startswith("mem@" + FRESH_PREFIX) for r in records)


def test_transfer_js_takes_each_sample_id_once_per_round_and_no_other_round():
    """A sample re-sent in its round (a probe retried) is one row; rows of an earlier round never enter a
    later round's E_js; a round with fewer than two fresh documents has none."""
    from grokwatch.collector.transfer import discrepancy
    from grokwatch.wire import FRESH_PREFIX

    state, records = new_state(comparisons_per_sample=8, window_samples=256)
    rng = np.random.default_rng(4)
    L, E = 2, 6
    old = rng.dirichlet(np.full(E, 0.3), size=(4, L))
    _round(state, 1, 10, [("math", f"t{i}") for i in range(4)], old, np.zeros(4))
    _round(state, 2, 10, [(FRESH_PREFIX + "math", f"f{i}") for i in range(2)], old[:2], np.zeros(2))
    train = rng.dirichlet(np.full(E, 0.3), size=(3, L))
    fresh = rng.dirichlet(np.full(E, 0.3), size=(3, L))
    _round(state, 3, 20, [("math", f"t{i}") for i in range(3)], train, np.zeros(3))
    _round(state, 4, 20, [("math", "t0")], rng.dirichlet(np.full(E, 0.3), size=(1, L)), np.zeros(1))  # again
    _round(state, 5, 20, [(FRESH_PREFIX + "math", "f0")], fresh[:1], np.zeros(1))
    assert [r for r in records if r["kind"] == "transfer" and r["step"] == 20] == []  # one fresh: no record
    _round(state, 6, 20, [(FRESH_PREFIX + "math", f"f{i}") for i in (1, 2)], fresh[1:], np.zeros(2))
    got = [r for r in records if r["kind"] == "transfer" and r["step"] == 20][-1]
    g = np.concatenate([train, fresh]).astype(np.float32).astype(np.float64)
    JS = np.array([[np.mean([reference.js_divergence(a[k], b[k]) for k in range(L)]) for b in g] for a in g])
    assert got["transfer_js"] == pytest.approx(discrepancy(JS, np.arange(3), np.arange(3, 6)), abs=1e-6)


def test_transfer_z_is_null_when_fresh_documents_route_like_training_ones_and_large_when_not():
    from grokwatch.wire import FRESH_PREFIX

    L, E = 4, 16
    zs = {}
    for case in ("alike", "apart"):
        state, records = new_state(comparisons_per_sample=16, window_samples=256)
        rng = np.random.default_rng(7)
        experts = rng.integers(0, 8, size=40)  # training documents use experts 0..7
        fresh = rng.integers(0, 8, size=40) if case == "alike" else rng.integers(8, 16, size=40)
        _round(state, 1, 100, [("math", f"t{i}") for i in range(40)], _peaked(experts, L, E), np.zeros(40))
        _round(state, 2, 100, [(FRESH_PREFIX + "math", f"f{i}") for i in range(40)], _peaked(fresh, L, E),
               np.zeros(40))
        last = [r for r in records if r["kind"] == "transfer"][-1]
        zs[case] = last["transfer_z"], last["transfer_js_z"]
    assert abs(zs["alike"][0]) < 3.5 and zs["apart"][0] > 10
    assert abs(zs["alike"][1]) < 3.5 and zs["apart"][1] > 10  # the same on mean routing


def test_an_unknown_senders_first_number_is_its_baseline_so_a_long_running_agent_survives_a_lost_state():
    """Issue 29: an agent past max_sequence_jump messages meeting a collector without its history was
    rejected as sequence_jump for ever. Its first number is now the baseline: nothing lost, then gaps count."""
    state, _ = new_state(max_sequence_jump=1000)
    for seq in (2_000_000, 2_000_001, 2_000_003):
        pipeline.handle(state, make_routing(seq=seq, n=2, sample_ids=[f"s{seq}-0", f"s{seq}-1"]))
    assert state.rejected_total.get("sequence_jump", 0) == 0
    assert state.lost_total == 1 and state.samples_total == 6
    with pytest.raises(Rejected, match="sequence_jump"):  # a forged jump from a known sender is still refused
        pipeline.handle(state, make_routing(seq=2_000_003 + 10_000, n=1))


def _hello_and_beat(state, sender, rank, run="run-a", world=8, sent=10, seq0=0):
    pipeline.handle(state, make_hello(run=run, rank=rank, sender=sender, seq=seq0, world_size=world))
    pipeline.handle(state, make_heartbeat(run=run, rank=rank, sender=sender, seq=seq0 + 1, messages_sent=sent,
                                messages_dropped={}))


def test_more_than_4096_live_senders_lose_nothing_and_count_each_once():
    """Issue 29: past 4,096 senders live ranks were retired and came back as new: lost_total said 9,000 of
    18,000 where nothing was lost, and the agents' sent counters summed to 18,000 instead of 13,500."""
    state, _ = new_state()
    world = 4500
    for rank in range(world):
        _hello_and_beat(state, f"s{rank}", rank, world=world, sent=2)
    for rank in range(world):  # every sender speaks again, its counter up by one
        pipeline.handle(state, make_heartbeat(rank=rank, sender=f"s{rank}", seq=2, messages_sent=3, messages_dropped={}))
    assert state.lost_total == 0 and not state.rejected_total
    assert sum(c.sent for c in state.agent_totals().values()) == 3 * world


def test_a_run_has_at_most_its_world_size_of_live_senders_and_a_retired_one_comes_back_whole():
    state, _ = new_state()
    for i in range(4):  # world 2: four senders (restarted agents) for ranks 0 and 1
        _hello_and_beat(state, f"s{i}", i % 2, world=2, sent=10 * (i + 1))
    assert len(state.senders) == 2 and len(state.senders.dormant) == 2
    # s0, retired, speaks again with its next number: revived, nothing lost, its counter not doubled
    pipeline.handle(state, make_heartbeat(rank=0, sender="s0", seq=2, messages_sent=11, messages_dropped={}))
    assert state.lost_total == 0 and len(state.senders) == 2
    totals = state.agent_totals()
    assert totals[("run-a", 0)].sent == 11 + 30 and totals[("run-a", 1)].sent == 20 + 40
    with pytest.raises(Rejected, match="duplicate"):  # its history held: a replay is still a duplicate
        pipeline.handle(state, make_heartbeat(rank=1, sender="s1", seq=1, messages_sent=20, messages_dropped={}))


def test_the_dormant_table_is_bounded_and_folds_its_oldest_into_the_rank_totals(monkeypatch):
    from grokwatch.collector import senders as senders_module

    monkeypatch.setattr(senders_module, "MAX_DORMANT", 3)
    state, _ = new_state()
    for i in range(10):
        _hello_and_beat(state, f"s{i}", 0, world=1, sent=1)
    assert len(state.senders) == 1 and len(state.senders.dormant) == 3
    assert state.agent_totals()[("run-a", 0)].sent == 10  # nothing lost in the folding, nothing twice


def test_a_hellos_world_size_is_believed_up_to_max_world_size():
    """Issue 29: one hello with world_size 2^20 and 10,000 forged heartbeats made 50,000 agent series."""
    state, _ = new_state(max_world_size=64)
    pipeline.handle(state, make_hello(world_size=1 << 20))
    for rank in (63, 64, 5000):
        try:
            pipeline.handle(state, make_heartbeat(rank=rank, sender=f"f{rank}", seq=1, messages_dropped={}))
        except Rejected as exc:
            assert exc.reason == "bad_rank" and rank >= 64
        else:
            assert rank < 64
    assert {rank for _, rank in state.agent_totals()} == {63}


def test_senders_from_an_older_snapshot_restore_their_recency_tables():
    from grokwatch.collector.persist import _pack, _unpack
    from grokwatch.collector.senders import Sender, Senders

    old = Senders()
    old.records = {"a": Sender(run="r", rank=0, seen=2.0), "b": Sender(run="r", rank=1, seen=1.0)}
    attrs = {"records": old.records, "retired": {}, "accounted": {}}  # what a snapshot of 0fec6778 held
    restored = Senders.__new__(Senders)
    restored.__setstate__(_unpack(_pack(attrs)))
    assert list(restored.order) == ["b", "a"] and list(restored.by_run["r"]) == ["b", "a"]
    assert not restored.dormant


def test_probe_histories_cost_no_more_than_they_are_counted_for():
    """The estimate max_memory_mb charges for (memorization.SAMPLE_BYTES, OBS_BYTES) bounds what the
    histories really take (tracemalloc), for new samples and for long histories."""
    import tracemalloc

    from grokwatch.collector.memorization import MemorizationTracker

    rng = np.random.default_rng(0)
    ids = [f"probe-sample-{i:06d}" for i in range(1000)]
    tracker = MemorizationTracker(delta=0.05, consecutive=3, epsilon={"math": 0.1}, max_samples=10**6,
                                  bucket_steps=1000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for step in range(1, 301):  # past MAX_HISTORY: the histories roll
            for j in range(0, len(ids), 300):
                tracker.observe(step, ids[j:j + 300], ["math"] * 300, rng.random(300))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert tracker.observations == 256 * len(ids)
    held = grown + 80 * len(ids)  # the ids themselves (~70 B), made before tracemalloc looked
    assert held <= tracker.nbytes < 1.5 * held  # an upper bound, and not a wild one


def test_probe_histories_stay_within_max_memory_mb_by_forgetting_the_oldest_samples():
    """Issue 29: one probe stream at the caps held ~1.1 GiB of histories outside the bound."""
    state, _ = new_state(max_memory_mb=2, comparisons_per_sample=4, window_samples=8)
    rng = np.random.default_rng(3)
    for seq in range(1, 301):
        pipeline.handle(state, make_routing(rng=rng, seq=seq, n=32, step=seq, source="probe", loss=True, num_layers=2,
                                  num_experts=4, groups=("math",) * 32,
                                  sample_ids=[f"p{seq}-{i}" for i in range(32)]))
        assert state.memory_bytes() <= 2 * 2**20
    stream = state.streams[("run-a", "probe")]
    assert stream.memorization.evicted > 0 and not state.rejected_total
    assert state.samples_total == 300 * 32


def test_fewer_comparisons_per_sample_keep_the_point_estimate_unbiased():
    """Issue 33: under overload the collector lowers m instead of dropping messages. Each sample's m pairs
    are drawn uniformly from its eligible window slots, so the point (the mean over the message's pairs)
    estimates the same mean at any m: over 300 seeds at m = 2 it agrees with the all-pairs reference."""
    rng = np.random.default_rng(21)
    shape = dict(num_layers=3, num_experts=12, top_k=2, concentration=0.3)
    warm = make_routing(rng=rng, seq=1, n=10, step=1, sample_ids=[f"w{i}" for i in range(10)], **shape)
    test = make_routing(rng=rng, seq=2, n=4, step=2, sample_ids=[f"t{i}" for i in range(4)], **shape)
    paths = [p for p, _ in pathways([warm, test])]
    expected = np.mean([np.mean([reference.levenshtein(paths[10 + i], paths[j]) for j in range(10 + i)])
                        for i in range(4)])
    got = []
    for seed in range(300):
        state, records = new_state(seed=seed, comparisons_per_sample=16, window_samples=64)
        pipeline.handle(state, warm)
        state.comparisons_now = 2  # what ingest sets while it is behind
        pipeline.handle(state, test)
        point = [r for r in records if r["kind"] == "point"][-1]
        assert point["comparisons"] == 2 and point["samples"] == 4
        got.append(point["distance"])
    assert state.reduced_messages_total == 1
    se = np.std(got) / np.sqrt(len(got))
    assert abs(np.mean(got) - expected) < 4 * se + 1e-9, (np.mean(got), expected, se)
    assert np.std(got) > 0  # a noisier estimate, not the same one


@pytest.mark.slow
def test_a_collector_behind_lowers_its_comparisons_and_applies_every_message(tmp_path):
    """Issue 33: at moderate routing the rated load dropped 10 % of messages as queue_full. Now a backlog
    lowers the pairs per sample (down to 1) before anything is dropped: every message applied, counted as
    reduced, journaled with its m, and exported."""
    from helpers import Pusher, scrape, start_collector, value, wait_until

    from grokwatch.collector.persist import read_journal
    from grokwatch.wire import encode

    c = start_collector(tmp_path, kernel_workers=0, comparisons_per_sample=64, window_samples=256)
    rng = np.random.default_rng(0)
    n = 600
    msgs = [encode(make_routing(rng=rng, seq=s, n=8, step=s, num_layers=16, num_experts=64, top_k=8,
                                concentration=0.3, sample_ids=[f"s{s}-{i}" for i in range(8)]))
            for s in range(1, n + 1)]
    p = Pusher(c.endpoints[0])
    try:
        p.send(encode(make_hello(seq=0, num_layers=16, num_experts=64, top_k=8)))
        for m in msgs:
            p.send(m)
        wait_until(lambda: c.state.samples_total == 8 * n, timeout_s=120)
        s = scrape(c.metrics_port)
        assert sum(s["grokwatch_collector_messages_rejected_total"].values()) == 0
        reduced = value(s, "grokwatch_collector_reduced_precision_messages_total")
        assert 0 < reduced <= n
        assert value(s, "grokwatch_pathway_comparisons_effective", run="run-a", source="train") == 64  # caught up
    finally:
        p.close()
        c.stop()
    ms = [r["comparisons"] for r in read_journal(str(tmp_path / "state")) if r.get("kind") == "point"]
    assert min(ms) < 64 and max(ms) == 64


def test_a_restored_stream_has_exactly_the_attributes_of_a_fresh_one():
    """Issue 30: snapshots store the collector's classes by their attributes. A restored stream must hold the
    same attributes as one built fresh — whatever is left out of the snapshot (lock, rounds, scratch) is
    rebuilt in one place (Stream.restore_scratch) — so that no code needs to ask whether an attribute exists."""
    from grokwatch.collector.persist import load_snapshot_bytes
    from grokwatch.collector.service import snapshot_blob

    state, _ = new_state()
    _feed(state, "train", range(0, 30, 10))
    _feed(state, "probe", range(0, 30, 10), loss_in_points=True, seq0=100)
    restored, _ = new_state()
    restored.restore(load_snapshot_bytes(snapshot_blob(state)))
    for key, stream in state.streams.items():
        assert set(restored.streams[key].__dict__) == set(stream.__dict__), key


def test_a_version_2_stream_without_the_newer_arrays_is_migrated_and_runs():
    """A version-2 snapshot's stream from before the sample keys and the z-loss ring: the migration gives it
    them empty (persist.MIGRATIONS), the snapshot validates, and the next message is applied."""
    from grokwatch.collector.persist import MAGIC, _pack, load_snapshot_bytes
    from grokwatch.collector.schema import validate_state

    state, _ = new_state()
    seq = _feed(state, "train", range(0, 30, 10))
    data = state.snapshot()
    for stream in data["streams"].values():
        for name in ("win_id_GW", "win_step_GW", "zloss_GWL", "zloss_filled_G", "zloss_next_G"):
            delattr(stream, name)
        del stream.max_slots
    blob = MAGIC + _pack({"version": 2, "state": data})
    old = load_snapshot_bytes(blob)
    validate_state(old, state.config)
    restored, _ = new_state()
    restored.restore(old)
    before = restored.samples_total
    _feed(restored, "train", [40], seq0=seq)
    assert restored.samples_total == before + 4
    stream = restored.streams[("run-a", "train")]
    assert stream.max_slots == restored.config.max_groups + 1 and stream.zloss_GWL.shape[0] == len(stream.win_filled_G)
