"""The pairs of one routing message on several cores (issue 33), with the reference semantics unchanged.

``kernels.process_samples`` compares each sample with window slots as the samples before it in the same
message left the windows (METRICS.md §1), so its edit distances cannot simply run side by side. They can
once the pairs are known in advance, and which pairs a sample gets depends only on the windows' *metadata*
(ids, steps, fill, ring position) and the message's uniform draws, never on a distance. So a message runs in
three passes:

1. ``plan_pairs`` (one thread, cheap): every sample's pathway, and every pair the kernel will take, in the
   kernel's order — (sample, group, slot) and which pathway that slot will hold at that moment: the one from
   before the message, or that of an earlier sample of the same message (``ref`` −1 − k). The windows'
   metadata are advanced as the kernel would and put back afterwards.
2. ``compute_pairs`` over ranges of the plan, on as many threads as there are cores to spare (Numba, no
   GIL): each pair's distance, its normalization length, and its per-layer distances.
3. ``kernels.process_samples`` with the plan: where the pair it is about to compute is the next one planned
   (same sample, group and slot), it takes the precomputed figures, else it computes as before (counted in
   ``Plan.missed``, which the tests require to stay 0). Observations, sums and inserts keep their order:
   the result is bit-identical to the one-thread kernel.

Legend (docs/shapes.md): N samples, P planned pairs, L layers, Y pathway symbols, C characters, G groups,
W window slots.
"""

from __future__ import annotations

import os
import threading
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from grokwatch.collector.edit_distance import build_peq, levenshtein_peq
from grokwatch.collector.kernels import (
    CROSS,
    WITHIN_FIRST,
    WITHIN_SECOND,
    _latest_before,
    _other_slots,
    _within_picks,
    build_pathway,
    pathway_chars,
)

# Below this many planned pairs a range runs on one thread (a helper's hand-off costs ~50 µs).
MIN_PARALLEL_PAIRS = 64
# A message is planned only when its pairs are worth it: pass 1 and the hand-off cost about what the pairs of
# an 8-sample message at moderate routing do (bench/pair_threads.py: 3 pairs a sample and a draw, times the
# pathways' mean length in symbols). Below this the kernel alone is faster (docs/benchmarks.md).
MIN_PARALLEL_WORK = 120_000


def worth_planning(threads: int, samples: int, m: int, mean_length: float) -> bool:
    return threads > 1 and samples * 3 * m * mean_length >= MIN_PARALLEL_WORK

# The message's pathways (pass 1 writes them; pass 2 reads a message sample's as the "b" of a pair).
Pathways = namedtuple("Pathways", ["sym_NY", "len_N", "starts_NLp", "chars_NC", "chars_len_N"])
# The plan: pair p is sample i_P[p] against slot slot_P[p] of group g_P[p], whose pathway then is the
# window's from before the message (ref_P[p] = 0) or message sample k's (ref_P[p] = -1 - k); pass 2 fills
# d_P (the distance), longest_P (its normalization length) and ld_PL (per-layer distances). cursor[0]: the
# next pair pass 3 expects; count[0]: pairs planned; missed[0]: pairs pass 3 had to compute itself.
Plan = namedtuple("Plan", ["i_P", "g_P", "slot_P", "ref_P", "kind_P", "d_P", "longest_P", "ld_PL", "cursor",
                           "count", "missed"])
# kind_P: which of the kernel's loops takes the pair (kernels.WITHIN_FIRST, CROSS, WITHIN_SECOND)


def empty_plan(num_layers: int) -> Plan:
    """A plan with no pairs: pass 3 computes every pair itself (small messages, one core)."""
    z = np.zeros(0, np.int64)
    return Plan(z, z, z, z, z, z, z, np.zeros((0, num_layers), np.int64), np.zeros(1, np.int64),
                np.zeros(1, np.int64), np.zeros(1, np.int64))


def new_plan(capacity: int, num_layers: int) -> Plan:
    return Plan(np.empty(capacity, np.int64), np.empty(capacity, np.int64), np.empty(capacity, np.int64),
                np.empty(capacity, np.int64), np.empty(capacity, np.int64), np.empty(capacity, np.int64),
                np.empty(capacity, np.int64),
                np.empty((capacity, num_layers), np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64),
                np.zeros(1, np.int64))


def new_pathways(n: int, num_layers: int, num_experts: int, chars: int) -> Pathways:
    return Pathways(np.empty((n, num_layers * (num_experts + 1)), np.int16), np.zeros(n, np.int64),
                    np.empty((n, num_layers + 1), np.int32), np.empty((n, max(chars, 1)), np.int16),
                    np.zeros(n, np.int64))


@njit(cache=True, nogil=True, inline="always")
def _record(plan, n, i, g, slot, owner_GW, kind):
    plan.kind_P[n] = kind
    plan.i_P[n] = i
    plan.g_P[n] = g
    plan.slot_P[n] = slot
    k = owner_GW[g, slot]
    plan.ref_P[n] = -1 - k if k >= 0 else 0
    return n + 1


@njit(cache=True, nogil=True)
def plan_pairs(samples, win, scratch, params, plan, paths):
    """Pass 1: the message's pathways into ``paths`` and its pairs, in ``kernels.process_samples``'s order,
    into ``plan`` (returns their number). The windows' metadata are advanced sample by sample as the kernel
    advances them, then restored: on return ``win`` is as it was."""
    mean_probs_NLE, targets_N2, u_N2P, ux_NP = samples.mean_probs_NLE, samples.targets_N2, samples.u_N2P, \
        samples.ux_NP
    id_N, step, same_round = samples.id_N, samples.step, samples.same_round
    filled_G, next_G, id_GW, step_GW = win.filled_G, win.next_G, win.id_GW, win.step_GW
    sym_Y, starts_Lp, chars_C = scratch.sym_Y, scratch.starts_Lp, scratch.chars_C
    tau, use_chars = params.tau, params.use_chars
    N, L, E = mean_probs_NLE.shape
    m = u_N2P.shape[2]
    G, W = filled_G.shape[0], id_GW.shape[1]  # the groups that exist (the arrays may hold spare slots)
    saved_filled = filled_G.copy()
    saved_next = next_G.copy()
    w_g = np.empty(2 * N, np.int64)  # the slots written, to put their metadata back
    w_s = np.empty(2 * N, np.int64)
    w_id = np.empty(2 * N, np.uint64)
    w_step = np.empty(2 * N, np.int64)
    nw = 0
    owner_GW = np.full((G, W), -1, np.int64)  # the message sample a slot holds now (-1: the window's own)
    picks = np.empty(m, np.int64)
    xpicks = np.empty(m, np.int64)
    xowner = np.full(m, -1, np.int64)
    elig_W = np.empty(W, np.int64)
    xslot_X = np.empty(max(1, G * W), np.int64)
    xgroup_X = np.empty(max(1, G * W), np.int64)
    n = 0
    for i in range(N):
        a_len = build_pathway(mean_probs_NLE[i], tau, sym_Y, starts_Lp, params.select_first)
        for j in range(a_len):
            paths.sym_NY[i, j] = sym_Y[j]
        paths.len_N[i] = a_len
        for j in range(L + 1):
            paths.starts_NLp[i, j] = starts_Lp[j]
        if use_chars:
            c_len = pathway_chars(sym_Y, a_len, E, chars_C)
            for j in range(c_len):
                paths.chars_NC[i, j] = chars_C[j]
            paths.chars_len_N[i] = c_len
        sid = id_N[i]
        for t in range(2):
            g = targets_N2[i, t]
            if g < 0:
                continue
            filled = filled_G[g]
            if filled > 0:  # kernels.process_samples: within-group pairs
                npk = _within_picks(u_N2P[i, t], g, filled, picks, elig_W, win, sid, step, same_round)
                for p in range(npk):
                    n = _record(plan, n, i, g, picks[p], owner_GW, WITHIN_FIRST if t == 0 else WITHIN_SECOND)
            if t == 0:  # kernels._cross_pairs's draws, in its order (group by group)
                total = _other_slots(win, g, sid, step, same_round, xslot_X, xgroup_X)
                if total == 0 and same_round:
                    prev = _latest_before(win, g, step)
                    if prev >= 0:
                        total = _other_slots(win, g, sid, prev, same_round, xslot_X, xgroup_X)
                if total > 0:
                    for p in range(m):
                        r = min(np.int64(ux_NP[i, p] * total), total - 1)
                        xowner[p] = xgroup_X[r]
                        xpicks[p] = xslot_X[r]
                    for h in range(G):
                        for p in range(m):
                            if xowner[p] == h:
                                n = _record(plan, n, i, h, xpicks[p], owner_GW, CROSS)
            # kernels._insert's metadata
            s = next_G[g]
            w_g[nw] = g
            w_s[nw] = s
            w_id[nw] = id_GW[g, s]
            w_step[nw] = step_GW[g, s]
            nw += 1
            owner_GW[g, s] = i
            id_GW[g, s] = sid
            step_GW[g, s] = step
            next_G[g] = (s + 1) % W
            if filled_G[g] < W:
                filled_G[g] += 1
    for k in range(nw - 1, -1, -1):
        id_GW[w_g[k], w_s[k]] = w_id[k]
        step_GW[w_g[k], w_s[k]] = w_step[k]
    for g in range(G):
        filled_G[g] = saved_filled[g]
        next_G[g] = saved_next[g]
    plan.count[0] = n
    plan.cursor[0] = 0
    plan.missed[0] = 0
    return n


@njit(cache=True, nogil=True)
def compute_pairs(plan, lo, hi, paths, win, use_chars, num_experts):
    """Pass 2: pairs ``lo`` to ``hi`` of the plan — each one's distance (``d_P``), normalization length
    (``longest_P``) and per-layer distances (``ld_PL``), as ``kernels._pairs`` computes them. Threads may
    run disjoint ranges of one plan at once (each has its own bit-parallel rows)."""
    L = paths.starts_NLp.shape[1] - 1
    alphabet_sym = num_experts + 1
    alphabet = 128 if use_chars else alphabet_sym
    longest_pattern = max(paths.chars_NC.shape[1], win.chars_GWC.shape[2]) if use_chars else paths.sym_NY.shape[1]
    words = max(1, (longest_pattern + 63) // 64)
    peq_AQ = np.zeros((alphabet, words), np.uint64)
    pv_Q = np.zeros(words, np.uint64)
    mv_Q = np.zeros(words, np.uint64)
    layer_words = max(1, (num_experts + 63) // 64)
    lpeq_LAQ = np.zeros((max(L, 1), alphabet_sym, layer_words), np.uint64)
    lpv_Q = np.zeros(layer_words, np.uint64)
    lmv_Q = np.zeros(layer_words, np.uint64)
    sym_NY, len_N, starts_NLp, chars_NC, chars_len_N = paths.sym_NY, paths.len_N, paths.starts_NLp, \
        paths.chars_NC, paths.chars_len_N
    sym_GWY, len_GW, starts_GWLp, chars_GWC, chars_len_GW = win.sym_GWY, win.len_GW, win.starts_GWLp, \
        win.chars_GWC, win.chars_len_GW
    i_P, g_P, slot_P, ref_P, d_P, longest_P, ld_PL = plan.i_P, plan.g_P, plan.slot_P, plan.ref_P, plan.d_P, \
        plan.longest_P, plan.ld_PL
    cur = -1
    a_len = 0
    c_len = 0
    for p in range(lo, hi):
        i = i_P[p]
        a_starts = starts_NLp[i]
        if i != cur:
            a_len = len_N[i]
            if use_chars:
                c_len = chars_len_N[i]
                build_peq(chars_NC[i], c_len, alphabet, peq_AQ)
            else:
                build_peq(sym_NY[i], a_len, alphabet, peq_AQ)
            for layer in range(L):
                a0 = a_starts[layer]
                build_peq(sym_NY[i, a0:a_starts[layer + 1] - 1], a_starts[layer + 1] - 1 - a0, alphabet_sym,
                          lpeq_LAQ[layer])
            cur = i
        g, slot, ref = g_P[p], slot_P[p], ref_P[p]
        if ref < 0:
            k = -1 - ref
            b_sym, b_len, b_starts = sym_NY[k], len_N[k], starts_NLp[k]
            b_chars, b_clen = chars_NC[k], chars_len_N[k]
        else:
            b_sym, b_len, b_starts = sym_GWY[g, slot], len_GW[g, slot], starts_GWLp[g, slot]
            b_chars, b_clen = chars_GWC[g, slot], chars_len_GW[g, slot]
        if use_chars:
            d_P[p] = levenshtein_peq(peq_AQ, c_len, b_chars, b_clen, pv_Q, mv_Q)
            longest_P[p] = max(c_len, b_clen)
        else:
            d_P[p] = levenshtein_peq(peq_AQ, a_len, b_sym, b_len, pv_Q, mv_Q)
            longest_P[p] = max(a_len, b_len)
        for layer in range(L):
            a_n = a_starts[layer + 1] - 1 - a_starts[layer]
            b0 = b_starts[layer]
            b_n = b_starts[layer + 1] - 1 - b0
            ld_PL[p, layer] = levenshtein_peq(lpeq_LAQ[layer], a_n, b_sym[b0:b0 + b_n], b_n, lpv_Q, lmv_Q)
    return 0


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """One process-wide helper pool per thread count (threads − 1 helpers: the caller computes a share)."""
    with _pool_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = _pools[threads] = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="grokwatch-pairs")
        return pool


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def compute(plan: Plan, paths: Pathways, win, use_chars: bool, num_experts: int, threads: int) -> None:
    """Pass 2 over the whole plan, split into ``threads`` ranges (the caller's thread takes the first)."""
    count = int(plan.count[0])
    if threads <= 1 or count < MIN_PARALLEL_PAIRS:
        compute_pairs(plan, 0, count, paths, win, use_chars, num_experts)
        return
    bounds = [count * k // threads for k in range(threads + 1)]
    pool = _pool(threads)
    futures = [pool.submit(compute_pairs, plan, bounds[k], bounds[k + 1], paths, win, use_chars, num_experts)
               for k in range(1, threads)]
    compute_pairs(plan, bounds[0], bounds[1], paths, win, use_chars, num_experts)
    for f in futures:
        f.result()
