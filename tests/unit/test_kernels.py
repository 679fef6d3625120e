"""Numba kernels against the plain-Python reference of METRICS.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from grokwatch.collector import kernels, reference


def seqs(alphabet, max_size):
    return st.lists(st.integers(0, alphabet - 1), max_size=max_size)


@given(a=seqs(6, 150), b=seqs(6, 150))
def test_bit_parallel_levenshtein_equals_the_dynamic_programme(a, b):
    a_arr, b_arr = np.array(a, np.int16), np.array(b, np.int16)
    assert kernels.levenshtein(a_arr, len(a), b_arr, len(b), 6) == reference.levenshtein(a, b)


@pytest.mark.parametrize("m,n", [(63, 64), (64, 64), (65, 64), (128, 129), (129, 1), (1, 200), (0, 5), (5, 0)])
def test_levenshtein_at_word_boundaries(m, n):
    rng = np.random.default_rng(m * 1000 + n)
    for alphabet in (2, 40):
        a = rng.integers(0, alphabet, m).astype(np.int16)
        b = rng.integers(0, alphabet, n).astype(np.int16)
        assert kernels.levenshtein(a, m, b, n, alphabet) == reference.levenshtein(list(a), list(b))


def test_levenshtein_matches_rapidfuzz_on_long_integer_pathways():
    rapidfuzz = pytest.importorskip("rapidfuzz")
    rng = np.random.default_rng(7)
    for _ in range(50):
        a = rng.integers(0, 65, rng.integers(200, 800)).astype(np.int16)
        b = rng.integers(0, 65, rng.integers(200, 800)).astype(np.int16)
        expected = rapidfuzz.distance.Levenshtein.distance(a.tolist(), b.tolist())
        assert kernels.levenshtein(a, len(a), b, len(b), 65) == expected


def probs_strategy():
    return st.tuples(st.integers(1, 6), st.integers(2, 12), st.integers(0, 2**31), st.sampled_from([0.05, 1.0, 20.0]))


def random_probs(num_layers, num_experts, seed, conc):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(num_experts, conc), size=num_layers).astype(np.float32)
    if seed % 3 == 0:  # exact ties, resolved by the lower index
        p = np.round(p * 4) / 4
        p = (p / np.maximum(p.sum(axis=1, keepdims=True), 1e-9)).astype(np.float32)
    return p


@given(shape=probs_strategy(), tau=st.sampled_from([0.1, 0.5, 0.7, 0.9, 1.0]))
def test_pathway_construction_equals_reference(shape, tau):
    num_layers, num_experts, seed, conc = shape
    p = random_probs(num_layers, num_experts, seed, conc)
    sym = np.empty(num_layers * (num_experts + 1), np.int16)
    starts = np.empty(num_layers + 1, np.int32)
    n = kernels.build_pathway(p, tau, sym, starts)
    layers = reference.pathway_layers(p, tau)
    assert sym[:n].tolist() == reference.pathway_symbols(layers, num_experts)
    for layer, experts in enumerate(layers):
        assert sym[starts[layer]:starts[layer + 1] - 1].tolist() == experts
    chars = np.empty(num_layers * num_experts * 4 + num_layers, np.int16)
    c = kernels.pathway_chars(sym, n, num_experts, chars)
    assert "".join(map(chr, chars[:c])) == reference.pathway_string(layers)


def test_pathway_string_form_is_the_papers():
    p = np.zeros((2, 16), np.float32)
    p[0, [3, 1, 5]] = [0.5, 0.3, 0.2]
    p[1, [12, 9]] = [0.6, 0.4]
    layers = reference.pathway_layers(p, 0.7)
    assert layers == [[3, 1], [12, 9]]
    sym = np.empty(34, np.int16)
    starts = np.empty(3, np.int32)
    n = kernels.build_pathway(p, 0.7, sym, starts)
    chars = np.empty(64, np.int16)
    c = kernels.pathway_chars(sym, n, 16, chars)
    assert "".join(map(chr, chars[:c])) == "3,1-12,9"
    assert reference.pathway_string(reference.pathway_layers(p, 0.95)) == "3,1,5-12,9"


@given(seed=st.integers(0, 2**31), picks=st.integers(1, 8))
def test_window_distances_equal_reference(seed, picks):
    rng = np.random.default_rng(seed)
    num_layers, num_experts, slots = int(rng.integers(1, 5)), int(rng.integers(2, 20)), 10
    cap = num_layers * (num_experts + 1)
    win = np.zeros((slots, cap), np.int16)
    win_len = np.zeros(slots, np.int32)
    win_starts = np.zeros((slots, num_layers + 1), np.int32)
    win_layers = []
    for s in range(slots):
        p = random_probs(num_layers, num_experts, int(rng.integers(0, 2**31)), 0.5)
        win_len[s] = kernels.build_pathway(p, 0.7, win[s], win_starts[s])
        win_layers.append(reference.pathway_layers(p, 0.7))
    p = random_probs(num_layers, num_experts, seed, 0.5)
    a = np.empty(cap, np.int16)
    a_starts = np.empty(num_layers + 1, np.int32)
    a_len = kernels.build_pathway(p, 0.7, a, a_starts)
    a_layers = reference.pathway_layers(p, 0.7)
    pick = rng.choice(slots, picks, replace=False).astype(np.int64)
    words = (cap + 63) // 64
    d = np.empty(picks, np.int64)
    nd = np.empty(picks, np.float64)
    kernels.compare_to_window(a, a_len, win, win_len, pick, num_experts + 1, np.empty((num_experts + 1, words), np.uint64),
                              np.empty(words, np.uint64), np.empty(words, np.uint64), d, nd)
    for i, slot in enumerate(pick):
        sa = reference.pathway_symbols(a_layers, num_experts)
        sb = reference.pathway_symbols(win_layers[slot], num_experts)
        assert d[i] == reference.levenshtein(sa, sb)
        assert nd[i] == pytest.approx(reference.normalized_distance(d[i], len(sa), len(sb)), rel=1e-6)


@given(values=st.lists(st.floats(-10, 10, allow_nan=False), max_size=50))
def test_histogram_buckets_are_le_cumulative_like_prometheus(values):
    bounds = np.array([-1.0, 0.0, 0.5, 1.0, 5.0])
    counts = np.zeros(len(bounds) + 1)
    for v in values:
        kernels._observe(bounds, len(bounds), counts, v)
    cumulative = np.cumsum(counts)
    for i, b in enumerate(bounds):
        assert cumulative[i] == sum(1 for v in values if v <= b)
    assert cumulative[-1] == len(values)


def test_fingerprint_separates_pathways_and_is_stable():
    a = np.array([1, 2, 8, 3], np.int16)
    b = np.array([1, 2, 8, 4], np.int16)
    assert kernels.fingerprint(a, 4) != kernels.fingerprint(b, 4)
    assert kernels.fingerprint(a, 4) == kernels.fingerprint(a.copy(), 4)
    h = 0xCBF29CE484222325  # FNV-1a, written out: the same in every process (unlike hash())
    for s in a.tolist():
        h = ((h ^ s) * 0x100000001B3) % 2**64
    assert int(kernels.fingerprint(a, 4)) == h


def test_pathways_by_selection_equal_pathways_by_the_stable_sort_ties_included():
    """build_pathway finds a layer's first experts by selection (peaked routing) or sorts at once (long
    lists): the same pathway either way, ties to the lower expert index as the stable sort orders them."""
    rng = np.random.default_rng(12)
    for case in range(400):
        E = int(rng.integers(2, 40))
        conc = (0.05, 0.3, 5.0)[case % 3]
        p = rng.dirichlet(np.full(E, conc), size=3).astype(np.float32)
        if case % 4 == 0:  # ties: values repeated across experts
            p = np.round(p * 8) / 8 + 1e-3
            p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
        out = []
        for select in (0, 1, 3, kernels.SELECT_FIRST, 64):
            sym = np.zeros(3 * (E + 1), np.int16)
            starts = np.zeros(4, np.int32)
            n = kernels.build_pathway(p, 0.7, sym, starts, select)
            out.append((n, sym[:n].tolist(), starts.tolist()))
        assert all(o == out[0] for o in out), case
        assert out[0][1] == reference.pathway_symbols(reference.pathway_layers(p, 0.7), E)
