"""Round 3 (issue 28): the data's invariants, the exact metrics against METRICS.md's plain reference, and
the pre-registered analysis on synthetic panels whose answer is known — a metric that tracks each domain's
own accuracy is shown; a global change that moves every domain alike, and a random-label control that moves
like the rules, are not."""

import math

import groundtruth_round3 as ana
import numpy as np
import pytest
import torch

from grokwatch.collector import reference as ref
from grokwatch.demo import probe_metrics as pm
from grokwatch.demo.moddocs import EQUATION, RULES, make_moddocs

# ---------------------------------------------------------------- data


def test_moddocs_domains_share_operand_tokens_and_differ_only_in_the_op_token():
    data = make_moddocs(seed=3)
    ids, dom = data.train.ids_NW, data.train.domain_N
    ops = ids[:, 1::EQUATION]
    for di in range(len(data.domains)):
        assert set(ops[dom == di].flatten().tolist()) == {data.p + di}  # one op token per domain
    operands = torch.cat([ids[:, 0::EQUATION], ids[:, 2::EQUATION]], 1)
    for di in range(len(data.domains)):  # every domain uses the same operand tokens 0..p-1
        assert set(operands[dom == di].flatten().tolist()) == set(range(data.p))
    assert set(ids[:, 3::EQUATION].flatten().tolist()) == {data.eq_token}
    assert set(ids[:, 5::EQUATION].flatten().tolist()) == {data.sep_token}
    assert data.vocab_size == data.p + len(data.domains) + 2


def test_moddocs_rules_answers_held_out_pairs_disjoint_and_swap_clean():
    data = make_moddocs(seed=1)
    p = data.p

    def pairs(docs, di):
        rows = docs.ids_NW[docs.domain_N == di].reshape(-1, EQUATION)
        return rows
    for di, name in enumerate(data.domains):
        tr, ho = pairs(data.train, di), pairs(data.heldout, di)
        tr_set = {(a, b) for a, b in tr[:, [0, 2]].tolist()}
        ho_set = {(a, b) for a, b in ho[:, [0, 2]].tolist()}
        assert len(tr_set) == len(tr) == data.train.ids_NW[data.train.domain_N == di].shape[0] * data.equations
        assert not tr_set & ho_set and len(tr_set) == 480
        if name in RULES:
            rule, commutative = RULES[name]
            for a, _, b, _, c, _ in torch.cat([tr, ho]).tolist():
                assert c == rule(a, b, p)
            clean = data.heldout.clean_NQ[data.heldout.domain_N == di].flatten().tolist()
            for (a, _, b, *_), ok in zip(ho.tolist(), clean):
                assert ok == (not (commutative and (b, a) in tr_set))
        else:
            assert data.heldout.clean_NQ[data.heldout.domain_N == di].all()


def test_noise_answers_are_redrawn_at_every_showing_and_nothing_else_moves():
    data = make_moddocs(seed=0)
    gen = torch.Generator().manual_seed(0)
    a = data.redraw_noise(data.train.ids_NW, data.train.domain_N, gen)
    b = data.redraw_noise(data.train.ids_NW, data.train.domain_N, gen)
    noise = data.train.domain_N == data.domains.index("noise")
    pos = data.answer_positions()
    assert torch.equal(a[~noise], data.train.ids_NW[~noise])
    other = torch.ones(a.shape[1], dtype=torch.bool)
    other[pos] = False
    assert torch.equal(a[noise][:, other], data.train.ids_NW[noise][:, other])
    assert (a[noise][:, pos] != b[noise][:, pos]).float().mean() > 0.9  # fresh draws (1/31 agree by chance)


def test_the_null_run_names_more_random_tables_and_bad_names_are_refused():
    data = make_moddocs(("rand", "rand2", "rand3"), seed=0)
    t = [data.train.ids_NW[data.train.domain_N == i][:, 4].tolist() for i in range(3)]
    assert t[0] != t[1] != t[2]
    with pytest.raises(ValueError, match="not one of"):
        make_moddocs(("add", "div"))
    with pytest.raises(ValueError, match="each name once"):
        make_moddocs(("add", "add"))

# ---------------------------------------------------------------- exact metrics


def _g(rng, N=12, L=3, E=6, alpha=0.5):
    g = rng.dirichlet(np.full(E, alpha), size=(N, L))
    g[0, 0] = [0.25, 0.25, 0.25, 0.25, 0, 0][:E]  # ties: lower index first
    return g


def test_pathways_and_distances_equal_the_plain_reference():
    rng = np.random.default_rng(0)
    g = _g(rng)
    lists = pm.layer_lists(g, 0.7)
    for n in range(g.shape[0]):
        assert lists[n] == ref.pathway_layers(g[n], 0.7)
    paths, per_layer = pm.pathway_strings(lists)
    D = pm.distance_matrix(paths)
    Dn = pm.normalized_matrix(paths)
    syms = [ref.pathway_symbols(s, g.shape[2]) for s in lists]
    for i in range(len(syms)):
        for j in range(len(syms)):
            d = ref.levenshtein(syms[i], syms[j])
            assert D[i, j] == d
            assert Dn[i, j] == pytest.approx(ref.normalized_distance(d, len(syms[i]), len(syms[j])))
        for layer in range(g.shape[1]):
            assert pm.distance_matrix(per_layer[layer])[i, 0] == ref.levenshtein(lists[i][layer], lists[0][layer])


def test_within_group_mean_excludes_self_pairs_exactly():
    """Samples pairwise exactly 4 apart average exactly 4 (issue 27's self-pair case)."""
    D = np.full((16, 16), 4.0)
    np.fill_diagonal(D, 0.0)
    assert pm.mean_offdiag(D, np.arange(16)) == 4.0


def test_js_matrix_and_entropy_against_plain_formulas():
    rng = np.random.default_rng(1)
    g = _g(rng, N=5)
    J = pm.js_matrix(g)

    def H(p):
        return -sum(x * math.log(x) for x in p if x > 0)
    for i in range(5):
        for j in range(5):
            want = np.mean([H((g[i, k] + g[j, k]) / 2) - (H(g[i, k]) + H(g[j, k])) / 2 for k in range(g.shape[1])])
            assert J[i, j] == pytest.approx(max(want, 0.0), abs=1e-12)
    assert pm.entropy_ratio(g)[2, 1] == pytest.approx(H(g[2, 1]) / math.log(g.shape[2]))


def test_consistency_against_the_collector_reference():
    rng = np.random.default_rng(2)
    g, W = _g(rng, N=6, L=4, E=5), rng.normal(size=(4, 5, 7))
    raw, smooth = pm.consistency(g, W)
    for n in range(6):
        e = [g[n, k] @ W[k] for k in range(4)]
        cos = [float(e[k] @ e[k + 1] / np.linalg.norm(e[k]) / np.linalg.norm(e[k + 1])) for k in range(3)]
        smooth_ref, raw_ref = ref.consistency(cos)
        assert raw[n] == pytest.approx(raw_ref)
        if smooth_ref is None:
            assert math.isnan(smooth[n])
        else:
            assert smooth[n] == pytest.approx(smooth_ref)


def test_transfer_metric_is_null_where_fresh_documents_route_like_training_ones_and_large_where_not():
    rng = np.random.default_rng(3)
    same = rng.dirichlet(np.full(8, 0.3), size=(80, 3))
    z_same = []
    for seed in range(5):
        D = pm.js_matrix(same)
        e, z = pm.discrepancy_z(D, np.arange(40), np.arange(40, 80), np.random.default_rng(seed))
        z_same.append(z)
    assert max(abs(z) for z in z_same) < 3.5
    apart = same.copy()
    apart[40:, :, 0] += 2.0  # fresh documents lean on expert 0
    apart /= apart.sum(-1, keepdims=True)
    D = pm.js_matrix(apart)
    e, z = pm.discrepancy_z(D, np.arange(40), np.arange(40, 80), np.random.default_rng(0))
    assert e > 0 and z > 10


def test_checkpoint_metrics_fields_and_cross_group_baseline():
    rng = np.random.default_rng(4)
    N = 40
    g = rng.dirichlet(np.full(8, 0.4), size=(N, 4))
    domain = np.repeat(np.arange(2), 20)
    fresh = np.tile(np.r_[np.zeros(10, bool), np.ones(10, bool)], 2)
    m = pm.checkpoint_metrics(g, rng.random(N), domain, fresh, ["a", "b"], permutations=20)
    paths, _ = pm.pathway_strings(pm.layer_lists(g, 0.7))
    Dn = pm.normalized_matrix(paths)
    tr_a, tr_b = np.flatnonzero((domain == 0) & ~fresh), np.flatnonzero((domain == 1) & ~fresh)
    assert m["a"]["cross_norm"] == pytest.approx(Dn[np.ix_(tr_a, tr_b)].mean())
    assert m["a"]["R"] == pytest.approx(m["a"]["within_norm"] / m["a"]["cross_norm"])
    assert m["a"]["length"] == pytest.approx(np.mean([len(paths[i]) for i in tr_a]))
    assert {"within_l0", "within_l3", "E_path", "E_path_z", "E_js", "E_js_z", "H_gbar", "H_tok"} <= set(m["a"])

# ---------------------------------------------------------------- the pre-registered analysis


STEPS = np.arange(0, 10001, 100, dtype=np.float64)
DOMAINS = ["add", "sub", "mul", "sq", "rand", "noise"]


def _sigmoid(t, at, width=600.0):
    return 1 / (1 + np.exp(-(t - at) / width))


def _run(seed, metric_of, crossings=(3000, 4500, 6000, None), name="syn"):
    """A synthetic run: every domain memorizes by step 800; rule domains' held-out accuracy rises at
    ``crossings``; ``metric_of(domain, acc, rng)`` gives the metric under test (named R here)."""
    rng = np.random.default_rng(seed)
    series = {}
    for i, d in enumerate(DOMAINS):
        c = crossings[i] if i < 4 else None
        acc = 0.03 + 0.95 * _sigmoid(STEPS, c) if c is not None else np.full(len(STEPS), 0.03)
        acc = acc + rng.normal(0, 0.01, len(STEPS))
        train = np.where(STEPS >= 800, 1.0, STEPS / 800) if d != "noise" else np.full(len(STEPS), 0.03)
        s = {"acc_test": acc, "acc_train": train, "R": metric_of(d, acc, rng)}
        for key in ("within", "within_norm", "cross", "cross_norm", "consistency", "adj_cosine", "E_path",
                    "E_js", "within_js", "gap", "H_tok", "H_gbar", "length", "loss_train"):
            s[key] = 1.0 + rng.normal(0, 0.01, len(STEPS))
        s["loss_train"] = np.where(STEPS >= 800, 0.05, 3.0) + rng.normal(0, 0.005, len(STEPS))
        series[d] = s
    return ana.Run(f"{name}{seed}", STEPS, DOMAINS, series)


def _global(t):
    return 1.0 - 0.15 * t / STEPS[-1]


def _score(runs, metric="R"):
    rng = np.random.default_rng(0)
    r1, r2, r3 = ana.t1(runs, metric, rng), ana.t2(runs, metric), ana.t3(runs, metric)
    return ana.verdict(metric, runs, r1, r2, r3), r1, r2, r3


def test_a_metric_that_tracks_each_domains_own_accuracy_is_shown():
    runs = [_run(s, lambda d, acc, rng: _global(STEPS) - 0.1 * (acc - 0.03) * (d in ana.RULES)
                 + rng.normal(0, 0.005, len(STEPS))) for s in range(3)]
    v, r1, r2, r3 = _score(runs)
    assert v == "shown", (r1, r2, r3)
    assert r1.beta == pytest.approx(-0.1, rel=0.2) and r1.p < ana.ALPHA


def test_a_global_change_that_moves_every_domain_alike_is_not_shown_and_is_bounded_away():
    """The negative control: a trend shared by every domain (the step counter) correlates with each rule
    domain's accuracy, yet the step effects absorb it; with crossings in every seed, β's interval excludes
    the minimum effect: absent."""
    runs = [_run(s, lambda d, acc, rng: _global(STEPS) + rng.normal(0, 0.005, len(STEPS))) for s in range(3)]
    v, r1, *_ = _score(runs)
    assert v == "absent", r1
    assert abs(r1.beta) < r1.mei
    for run in runs:  # the paper's protocol would have called it (|Spearman| ≥ 0.9 with accuracy)
        d = "add"
        assert abs(np.corrcoef(run.get(d, "R")[30:], run.get(d, "acc_test")[30:])[0, 1]) > 0.5


def test_a_random_label_group_that_moves_like_the_rules_fails_specificity():
    def metric(d, acc, rng):
        fall = -0.1 * (acc - 0.03) if d in ana.RULES else 0.0
        if d == "rand":  # memorized only, yet its routing falls like a rule's, at step 4,000
            fall = -0.1 * 0.95 * _sigmoid(STEPS, 4000)
        return _global(STEPS) + fall + rng.normal(0, 0.005, len(STEPS))
    runs = [_run(s, metric) for s in range(3)]
    v, r1, r2, r3 = _score(runs)
    assert r3.count(True) < 2 and v != "shown", (r3, v)


def test_without_crossings_nothing_is_shown_or_declared_absent():
    runs = [_run(s, lambda d, acc, rng: _global(STEPS) + rng.normal(0, 0.005, len(STEPS)),
                 crossings=(None, None, None, None)) for s in range(3)]
    v, *_ = _score(runs)
    assert v == "inconclusive"


def test_step_counter_baseline_and_hinge_break():
    x = np.arange(0, 5000, 100.0)
    y = 1.0 - 0.0001 * x - 0.2 * _sigmoid(x, 2000, 200)  # a level shift at 2,000 on a drift
    assert ana.level_break(x, y) == 2000
    runs = [_run(0, lambda d, acc, rng: acc)]  # crossings 3,000, 4,500, 6,000: leave-one-out medians
    assert ana.step_counter_error(runs) == pytest.approx(2250 / 10000, abs=0.02)


def test_the_shipped_detector_runs_over_probe_points_and_the_gate_reads_a_pilot():
    runs = [_run(0, lambda d, acc, rng: _global(STEPS) + rng.normal(0, 0.005, len(STEPS)))]
    for d in DOMAINS:
        for key in ("within", "within_norm", "cross", "cross_norm"):
            runs[0].series[d][key] = runs[0].series[d]["R"] if key.startswith("within") else np.ones(len(STEPS))
    det = ana.t4(runs, [])
    assert det["crossings"] == 3 and det["false_onsets"] == []  # a global fall is no onset
    g = ana.gate(runs[0], budget_steps=10000, memorize_by=1500)
    assert g["pass"] and g["memorized"]["add"] == 600  # training accuracy 0.75 of its ramp to 1 at 800


@pytest.mark.slow
def test_the_gpu_groundtruth_script_runs_in_miniature_on_the_cpu(tmp_path):
    """research/gpu_groundtruth.sh as a task with a device would run it, in miniature (MINI=1: the CPU, a few
    steps): three seeds and the null run side by side, their logs, then the analysis over them."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, MINI="1", OUT=str(tmp_path), PY=sys.executable, STEPS="20", PROBE="10")
    done = subprocess.run(["bash", "research/gpu_groundtruth.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for name in ("seed0", "seed1", "seed2", "null"):
        lines = (tmp_path / f"r3-gpu-{name}.jsonl").read_text().splitlines()
        assert len(lines) == 1 + 3  # the config, then probe steps 0, 10, 20
        assert f"{name}: exit 0 after 3 probe steps" in done.stdout
    assert (tmp_path / "r3-gpu-analysis.json").exists() and "| metric |" in done.stdout
