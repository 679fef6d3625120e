"""A message's journal points (collector/points.py ``points_of``) against a plain per-group reference of the
same means: every key equal — the per-layer figures computed for all of a message's groups at once must give
each group exactly (bit for bit, as the journal's JSON shows) what one group's computation gave."""

from __future__ import annotations

import json

import numpy as np

from grokwatch.collector import kernels
from grokwatch.collector.points import points_of


def _reference(stats_V, entropy_L, load_LE, layer_sum_L, layer_n_L) -> dict:
    st = dict(zip(kernels.STAT_KEYS, (float(v) for v in stats_V)))

    def mean(key, n):
        return st[key] / st[n] if st[n] else None

    imbalance = []
    for row in load_LE:
        m = sum(float(v) for v in row) / len(row)
        imbalance.append(float(np.round(max(row) / m, 6)) if m > 0 else 0.0)
    return dict(
        samples=int(st["n"]), distance=mean("dist_sum", "dist_n"), distance_normalized=mean("norm_sum", "dist_n"),
        cross_distance=mean("x_dist_sum", "x_dist_n"), cross_distance_normalized=mean("x_norm_sum", "x_dist_n"),
        consistency=mean("cons_sum", "cons_n"), adjacent_cosine=mean("cos_sum", "cos_n"),
        entropy=mean("entropy_sum", "tokens"), pathway_length=mean("length_sum", "n"),
        mean_routing_entropy=mean("hbar_sum", "n"), loss=mean("loss_sum", "loss_n"),
        entropy_layers=[float(np.round(e / st["tokens"], 6)) for e in entropy_L] if st["tokens"] else None,
        imbalance_layers=imbalance,
        distance_layers=None if not any(layer_n_L) else [
            round(float(s) / float(n), 6) if n else None for s, n in zip(layer_sum_L, layer_n_L)])


def test_a_messages_points_equal_the_plain_per_group_reference():
    rng = np.random.default_rng(7)
    G, L, E, V = 6, 5, 8, len(kernels.STAT_KEYS)
    stats_GV = rng.uniform(0.1, 40, (G, V)).round(3)
    stats_GV[1, :] = 0.0  # a group the message did not reach with anything: no tokens, no pairs
    stats_GV[2, kernels.STAT_KEYS.index("loss_n")] = 0.0  # no loss
    entropy_GL = rng.uniform(0, 30, (G, L))
    load_GLE = rng.integers(0, 60, (G, L, E)).astype(np.float64)
    load_GLE[3, 2] = 0.0  # a layer no token reached
    layer_sum_GL = rng.uniform(0, 50, (G, L))
    layer_n_GL = rng.integers(0, 4, (G, L)).astype(np.float64)
    layer_n_GL[4] = 0.0  # no within-group pairs at all: no per-layer distances
    gs = [0, 2, 3, 4, 5]
    got = points_of(gs, stats_GV, entropy_GL, load_GLE, layer_sum_GL, layer_n_GL)
    for g, point in zip(gs, got):
        want = _reference(stats_GV[g], entropy_GL[g], load_GLE[g], layer_sum_GL[g], layer_n_GL[g])
        assert json.dumps(point, sort_keys=True) == json.dumps(want, sort_keys=True), g
    assert got[3]["distance_layers"] is None and got[2]["imbalance_layers"][2] == 0.0
    assert points_of([1], stats_GV, entropy_GL, load_GLE, layer_sum_GL, layer_n_GL)[0]["entropy_layers"] is None
