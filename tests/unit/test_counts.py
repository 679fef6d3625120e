"""agent/counts.py against a plain count: every pick of a forward in its layer's expert column, picks outside
0..E-1 (a dropped token's -1, or E and above) and record()'s picks of weight 0 in the column of no expert, per
row group where the rows are tagged — on the stacked path (every layer the same token count) and the
per-layer one (they differ)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grokwatch.agent.counts import ExpertCounts

L, E, K = 3, 5, 2


def _plain(layers: dict[int, np.ndarray], rows_group=None, names=()):
    """[L, E + 1] totals (column E: no expert) and, per group name, the same of its rows' picks."""
    total = np.zeros((L, E + 1), np.int64)
    groups = {name: np.zeros((L, E + 1), np.int64) for name in names}
    for layer, ids in layers.items():
        for row, row_ids in enumerate(ids.reshape(len(rows_group) if rows_group else 1, -1)):
            for i in row_ids.tolist():
                column = i if 0 <= i < E else E
                total[layer, column] += 1
                if rows_group and rows_group[row] in groups:
                    groups[rows_group[row]][layer, column] += 1
    return total, groups


@pytest.mark.parametrize("tokens", [[6, 6, 6], [6, 4, 8]], ids=["stacked", "per-layer"])
def test_the_counts_are_a_plain_count_with_out_of_range_picks_in_the_column_of_no_expert(tokens):
    rows = 2
    counts = ExpertCounts(L, E, K, True, max_groups=1)
    rng = np.random.default_rng(0)
    views = torch.zeros(L, E + 1, dtype=torch.int64), torch.zeros(1, L, E + 1, dtype=torch.int64)
    want_total, want_group = np.zeros((L, E + 1), np.int64), np.zeros((L, E + 1), np.int64)
    for forward in range(3):
        counts.begin()
        tagged = forward != 1  # the second forward untagged: totals only
        groups = ["math", "code"]  # one slot: code is past the cap
        if tagged:
            counts.tag_rows(groups, rows, torch.device("cpu"))
        layers = {}
        for layer, t in enumerate(tokens):
            ids = rng.integers(-2, E + 3, (rows * t, K))  # -2..E+2: some outside 0..E-1 each way
            layers[layer] = ids
            counts.add(layer, torch.as_tensor(ids))
        counts.end()
        total, by_group = _plain(layers, groups if tagged else None, ("math",))
        want_total += total
        want_group += by_group["math"]
    drained = counts.drain_into(views[0], None, views[1])
    assert drained.forwards == 3 and drained.group_forwards == 2 and drained.group_names == ("math",)
    np.testing.assert_array_equal(views[0].numpy(), want_total)
    np.testing.assert_array_equal(views[1][0].numpy(), want_group)
    counts.begin()
    counts.end()
    assert counts.drain_into(views[0], None, views[1]).group_forwards == 0
    assert not views[0].numpy().any()  # the next interval starts from zero


def test_record_picks_of_weight_zero_count_for_no_expert():
    counts = ExpertCounts(L, E, K, True)
    ids = torch.tensor([[0, 1], [2, 3], [4, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.0, 0.0], [0.9, 0.0]])  # token 1 dropped, token 2's second pick
    view = torch.zeros(L, E + 1, dtype=torch.int64)
    counts.begin()
    counts.add(0, ids, weights)
    counts.end()
    counts.drain_into(view)
    assert view[0].tolist() == [1, 1, 0, 0, 1, 3]
