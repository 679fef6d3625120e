"""Router health at parity with what MoE frameworks log (issue 21): each statistic equals a plain
reference computed from the counts that were sent, read back from /metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import scrape, send_all, start_collector, value
from wire_factories import make_hello, make_routing


def reference_quantile(xs, q):
    """Linear interpolation between order statistics (numpy's and torch.quantile's default)."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def reference(messages, layer):
    E = messages[0].topk_counts_NLE.shape[2]
    load = [0.0] * E
    tokens = 0.0
    for m in messages:
        for i in range(m.num_samples):
            tokens += float(m.token_counts_N[i])
            for e in range(E):
                load[e] += float(m.topk_counts_NLE[i, layer, e])
    share = [x / (messages[0].top_k * tokens) for x in load]
    mean = sum(share) / E
    std = math.sqrt(sum((x - mean) ** 2 for x in share) / E)
    entropy = -sum(x * math.log(x) for x in share if x > 0)
    by_top = sorted(range(E), key=lambda e: (-share[e], e))
    by_bottom = sorted(range(E), key=lambda e: (share[e], e))
    return dict(share=share, std=std, diversity=math.exp(entropy) / E, top=by_top, bottom=by_bottom)


@pytest.mark.parametrize("concentration", [0.05, 1.0])
def test_load_share_quantiles_std_ranks_and_diversity_equal_the_reference(tmp_path, concentration):
    rng = np.random.default_rng(11)
    c = start_collector(tmp_path, load_rank_k=3)
    try:
        msgs = [make_routing(rng=rng, seq=i + 1, n=5, step=10 * i, num_experts=8, concentration=concentration)
                for i in range(4)]
        send_all(c, [make_hello()] + msgs)
        s = scrape(c.metrics_port)
    finally:
        c.stop()
    key = dict(run="run-a", source="train", group="math")
    for layer in range(4):
        ref = reference(msgs, layer)
        lk = dict(key, layer=str(layer))
        for pct in (0, 25, 50, 75, 100):
            assert value(s, "grokwatch_expert_load_share_percentile", **lk, percentile=str(pct)) == pytest.approx(
                reference_quantile(ref["share"], pct / 100), abs=1e-12)
        assert value(s, "grokwatch_expert_load_share_std", **lk) == pytest.approx(ref["std"], abs=1e-12)
        assert value(s, "grokwatch_expert_load_diversity", **lk) == pytest.approx(ref["diversity"], rel=1e-12)
        for end in ("top", "bottom"):
            for rank in (1, 2, 3):
                expert = ref[end][rank - 1]
                assert value(s, "grokwatch_expert_load_rank_expert", **lk, end=end, rank=str(rank)) == expert
                assert value(s, "grokwatch_expert_load_rank_share", **lk, end=end, rank=str(rank)) == pytest.approx(
                    ref["share"][expert], abs=1e-12)
        # The CV already exported is the same spread over the mean share.
        assert value(s, "grokwatch_expert_load_cv", **lk) == pytest.approx(ref["std"] / (1 / 8), rel=1e-9)


def test_a_collapsed_layer_shows_at_the_bottom_and_in_the_diversity():
    from grokwatch.collector.view import load_share_stats

    uniform = load_share_stats(np.full(8, 1 / 8), 2)
    assert uniform["diversity"] == pytest.approx(1.0) and uniform["std"] == 0
    assert [e for e, _ in uniform["top"]] == [0, 1] and [e for e, _ in uniform["bottom"]] == [0, 1]  # ties: index
    collapsed = load_share_stats(np.array([0.0, 0.0, 1.0, 0, 0, 0, 0, 0]), 2)
    assert collapsed["diversity"] == pytest.approx(1 / 8)
    assert collapsed["top"][0] == (2, 1.0) and collapsed["bottom"][0] == (0, 0.0)
    assert list(collapsed["percentiles"]) == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert len(load_share_stats(np.full(2, 0.5), 5)["top"]) == 2  # K is capped at E


def test_router_zloss_is_the_mean_over_the_groups_window_of_what_was_sent(tmp_path):
    import dataclasses

    rng = np.random.default_rng(2)
    c = start_collector(tmp_path, window_samples=8)
    try:
        msgs = []
        for i in range(4):  # 4 messages of 3 samples: the window of 8 holds the last 8 samples
            m = make_routing(rng=rng, seq=i + 1, n=3, step=10 * i, num_layers=4)
            msgs.append(dataclasses.replace(m, zloss_NL=rng.uniform(0, 9, (3, 4)).astype(np.float32)))
        send_all(c, [make_hello()] + msgs)
        s = scrape(c.metrics_port)
        # A message without a z-loss (an agent whose router has no logits) leaves the window as it is.
        send_all(c, [make_routing(rng=rng, seq=9, n=3, step=50, num_layers=4)])
        after = scrape(c.metrics_port)
    finally:
        c.stop()
    last8 = np.concatenate([m.zloss_NL for m in msgs]).astype(np.float64)[-8:]
    for layer in range(4):
        lk = dict(run="run-a", source="train", group="math", layer=str(layer))
        assert value(s, "grokwatch_router_zloss", **lk) == pytest.approx(last8[:, layer].mean(), rel=1e-6)
        assert value(after, "grokwatch_router_zloss", **lk) == pytest.approx(last8[:, layer].mean(), rel=1e-6)


def test_no_zloss_gauge_without_a_zloss():
    from grokwatch.collector import pipeline
    from grokwatch.collector.config import CollectorConfig
    from grokwatch.collector.state import State
    from grokwatch.collector.view import build_view

    state = State(CollectorConfig())
    pipeline.handle(state, make_hello())
    pipeline.handle(state, make_routing(seq=1))
    (fam,) = [f for f in build_view(state) if f.name == "grokwatch_router_zloss"]
    assert fam.samples == []
