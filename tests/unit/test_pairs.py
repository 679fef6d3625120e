"""Issue 33: the pairs of one message computed ahead on several threads (collector/pairs.py) give exactly the
one-thread kernel's result — every histogram, sum, window slot and journal figure — with no pair the kernel
had to compute itself."""

from __future__ import annotations

import time

import numpy as np
import pytest
from wire_factories import make_routing

from grokwatch.collector import pipeline
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.state import State
from grokwatch.wire import FRESH_PREFIX


def _feed(threads: int, unit: str, source: str, window: int, m: int, concentration: float):
    records: list = []
    state = State(CollectorConfig(comparisons_per_sample=m, window_samples=window, distance_unit=unit,
                                  pair_threads=threads), journal=records.append, clock=time.time)
    rng = np.random.default_rng(5)
    groups = ("math", "code", "prose", FRESH_PREFIX + "math")
    seq = 0
    for step in range(12):
        for _part in range(3):  # several messages a step: a probe round spread over messages
            seq += 1
            n = int(rng.integers(1, 24))
            ids = [f"s{int(rng.integers(0, 40))}" for _ in range(n)]  # repeats: a sample against its own copy
            msg = make_routing(rng=rng, seq=seq, n=n, num_layers=4, num_experts=12, step=step, source=source,
                               groups=tuple(groups[int(rng.integers(0, 4 if source == "probe" else 3))]
                                            for _ in range(n - 1)) + (("late" if step >= 6 else "math"),), sample_ids=ids, loss=source == "probe",
                               concentration=concentration)
            pipeline.handle(state, msg)
    return state, records


def _arrays(stream) -> dict:
    names = [k for k, v in vars(stream).items() if isinstance(v, np.ndarray) and not k.endswith(("_Y", "_Lp", "_C",
                                                                                                 "_AQ", "_Q", "_LAQ"))]
    return {k: getattr(stream, k).copy() for k in names}


@pytest.mark.parametrize("unit", ["expert", "string"])
@pytest.mark.parametrize("source", ["train", "probe"])
def test_pairs_on_several_threads_give_the_one_thread_result_bit_for_bit(unit, source, monkeypatch):
    from grokwatch.collector import pairs

    monkeypatch.setattr(pairs, "MIN_PARALLEL_WORK", 0)  # plan every message (the tiny shape would not)
    monkeypatch.setattr(pairs, "MIN_PARALLEL_PAIRS", 0)  # and split every plan
    # a fifth group comes late: the arrays then hold spare group slots (which a plan must not touch);
    # window 16: full within the first steps, so inserts overwrite slots that later samples of the same
    # message are compared with (the plan must hand them the new pathway, not the old one)
    one, one_records = _feed(1, unit, source, window=16, m=8, concentration=0.3)
    three, three_records = _feed(3, unit, source, window=16, m=8, concentration=0.3)
    for key, a in one.streams.items():
        b = three.streams[key]
        assert a.pair_threads == 1 and b.pair_threads == 3
        assert b.pairs_missed == 0  # every pair the kernel took was the planned one
        assert a.planned_messages == 0 and b.planned_messages == 36
        want, got = _arrays(a), _arrays(b)
        assert want.keys() == got.keys()
        for name in want:
            assert np.array_equal(want[name], got[name]), name
    strip = [{k: v for k, v in r.items() if k != "t"} for r in one_records]
    assert strip == [{k: v for k, v in r.items() if k != "t"} for r in three_records]
    assert any(r.get("kind") == "point" for r in one_records)


def test_a_plan_leaves_the_windows_as_it_found_them():
    from grokwatch.collector import kernels, pairs
    from grokwatch.collector.stream import BOUNDS_RU, NB_R

    state, _ = _feed(1, "expert", "train", window=16, m=8, concentration=0.3)
    stream = state.streams[("run-a", "train")]
    before = _arrays(stream)
    rng = np.random.default_rng(9)
    msg = make_routing(rng=rng, n=20, num_layers=4, num_experts=12, groups=("math", "code") * 10,
                       sample_ids=[f"s{i}" for i in range(20)])
    G, m = len(stream.labels), 8
    targets = np.full((20, 2), -1, np.int64)
    targets[:, 0] = [stream.index[g] for g in msg.groups]
    samples = kernels.Samples(msg.mean_probs_NLE, msg.topk_counts_NLE, msg.token_counts_N, msg.entropy_NL,
                              msg.adj_cosine_NJ, True, np.zeros(20, np.float32), False, 99, targets,
                              rng.random((20, 2, m)), rng.random((20, m)), kernels.sample_keys(msg.sample_ids), False)
    windows, scratch = stream.windows(), stream.scratch()
    plan = pairs.new_plan(3 * 20 * m, 4)
    paths = pairs.new_pathways(20, 4, 12, 1)
    n = pairs.plan_pairs(samples, windows, scratch, kernels.Params(0.7, False, 0.05, BOUNDS_RU, NB_R, 8), plan,
                         paths)
    assert n == 20 * 2 * m  # full windows: m within and m cross pairs per sample
    assert (plan.ref_P[:n] < 0).any()  # some pairs are with a sample of this very message
    after = _arrays(stream)
    for name in before:
        assert np.array_equal(before[name], after[name]), name


def test_short_pathways_are_not_planned_and_long_ones_are():
    """Planning costs about what the pairs of an 8-sample message at moderate routing do: below that the
    kernel runs alone (bench/pair_threads.py)."""
    import dataclasses

    results = {}
    L, E = 16, 64
    for case in ("one expert a layer", "near-uniform"):
        state = State(CollectorConfig(comparisons_per_sample=16, window_samples=64, pair_threads=2))
        rng = np.random.default_rng(1)
        for seq in range(1, 30):
            msg = make_routing(rng=rng, seq=seq, n=8, num_layers=L, num_experts=E, top_k=8, step=seq,
                               groups=("a", "b") * 4, sample_ids=[f"{seq}-{i}" for i in range(8)])
            if case == "near-uniform":
                probs = rng.dirichlet(np.full(E, 5.0), size=(8, L))  # ~40 experts a layer reach tau
            else:
                probs = np.full((8, L, E), 0.1 / (E - 1))
                probs[:, :, 0] = 0.9  # one expert reaches tau: 16 symbols and 15 separators
            pipeline.handle(state, dataclasses.replace(msg, mean_probs_NLE=probs.astype(np.float32)))
        stream = state.streams[("run-a", "train")]
        results[case] = stream.planned_messages
        assert stream.pairs_missed == 0
    assert results["one expert a layer"] == 0 and results["near-uniform"] >= 26  # all but the first few
