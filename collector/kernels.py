"""Numba kernels of the collector's hot path. Plain arrays in, plain arrays out.

Each kernel names the METRICS.md definition it implements; ``reference.py``
holds the plain-Python version the tests compare against.

Shapes (docs/shapes.md): L layers, E experts, Y pathway symbols, A alphabet, Q 64-bit words,
G groups, W window slots, P picks, R histograms, U bucket bounds (Up: with +Inf), V statistics.
Pathway symbols (the `expert` unit) are int16: expert ids 0..E-1 and SEP = E.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from grokwatch.collector.edit_distance import (  # noqa: F401  (kernels.levenshtein & co., as before)
    build_peq,
    compare_to_window,
    levenshtein,
    levenshtein_peq,
)


def sample_keys(sample_ids) -> np.ndarray:
    """Each sample id as a 64-bit key (BLAKE2b; the same in every process), for ``Samples.id_N``."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(str(s).encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little") for s in sample_ids], dtype=np.uint64)


SELECT_FIRST = 8  # build_pathway: experts found by selection before it sorts (0: sort at once)
# A stream whose pathways average more than this many symbols a layer sorts at once: selection pays only for
# short layer lists (peaked routing), and costs ~1.5x the sort for long ones (collector/stream.py).
SELECT_MAX_LAYER_SYMBOLS = 5.0


@njit(cache=True, nogil=True)
def build_pathway(mean_probs_LE, tau, sym_Y, starts_Lp, select_first=SELECT_FIRST):
    """METRICS.md §1 layer lists e_l and pathway s = e_1 ⊕ SEP ⊕ … ⊕ e_L.

    Writes the symbols into ``sym_Y`` (capacity L*(E+1)) and the start of each
    layer's list into ``starts_Lp`` (starts_Lp[L] = S + 1, as if a SEP
    followed the last layer). Returns S. Ties keep the lower expert index first
    (stable sort); cumulative weights are summed in float64 like the reference.
    """
    num_layers, num_experts = mean_probs_LE.shape
    sep = num_experts
    n = 0
    for layer in range(num_layers):
        if layer > 0:
            sym_Y[n] = sep
            n += 1
        starts_Lp[layer] = n
        # The first experts by selection (the largest not yet taken, the lower index on ties: the stable sort's
        # order), as long as a pathway's layer list is short; the rest of a long one by the sort.
        total = 0.0
        taken = 0
        done = False
        row = mean_probs_LE[layer]
        prev, prev_v = -1, np.inf
        while taken < select_first and taken < num_experts:
            # the largest (value, -index) below the previous pick's
            best = -1
            best_v = 0.0
            for k in range(num_experts):
                v = np.float64(row[k])
                if (v < prev_v or (v == prev_v and k > prev)) and (best < 0 or v > best_v):
                    best, best_v = k, v
            prev, prev_v = best, best_v
            sym_Y[n] = best
            n += 1
            taken += 1
            total += best_v
            if total >= tau:
                done = True
                break
        if not done and taken < num_experts:
            order_E = np.argsort(-row.astype(np.float64), kind="mergesort")
            for r in range(taken, num_experts):
                k = order_E[r]
                sym_Y[n] = k
                n += 1
                total += np.float64(row[k])
                if total >= tau:
                    break
    starts_Lp[num_layers] = n + 1
    return n


@njit(cache=True, nogil=True)
def pathway_chars(sym_Y, length, sep, out_C):
    """The paper's string form of a pathway as ASCII codes: ',' between experts
    of a layer, '-' between layers. Returns the number of characters."""
    n = 0
    first_in_layer = True
    for i in range(length):
        s = sym_Y[i]
        if s == sep:
            out_C[n] = 45  # '-'
            n += 1
            first_in_layer = True
            continue
        if not first_in_layer:
            out_C[n] = 44  # ','
            n += 1
        first_in_layer = False
        if s == 0:
            out_C[n] = 48
            n += 1
            continue
        digits = 0
        v = s
        while v > 0:
            digits += 1
            v //= 10
        v = s
        for d in range(digits - 1, -1, -1):
            out_C[n + d] = 48 + v % 10
            v //= 10
        n += digits
    return n


@njit(cache=True, nogil=True)
def fingerprint(sym_Y, length):
    """64-bit FNV-1a of a pathway (deterministic across processes, unlike hash())."""
    h = np.uint64(0xCBF29CE484222325)
    prime = np.uint64(0x100000001B3)
    for i in range(length):
        h ^= np.uint64(sym_Y[i] & 0xFFFF)
        h *= prime
    return h


# Per-group statistics a message accumulates for the journal (columns of stats_GV).
# length_sum: pathway symbols (METRICS.md §6's |s|); hbar_sum: H(ḡ) ÷ log E, the entropy of the sample-mean
# routing (mean over layers), the confounder that sets the pathway's length.
STAT_KEYS = ("n", "tokens", "entropy_sum", "dist_sum", "norm_sum", "dist_n", "x_dist_sum", "x_norm_sum", "x_dist_n",
             "cons_sum", "cons_n", "cos_sum", "cos_n", "loss_sum", "loss_n", "length_sum", "hbar_sum")
(S_N, S_TOKENS, S_ENT, S_DIST, S_NORM, S_DN, S_XDIST, S_XNORM, S_XDN, S_CONS, S_CONSN, S_COS, S_COSN, S_LOSS,
 S_LOSSN, S_LEN, S_HBAR) = range(len(STAT_KEYS))
# Histogram rows of hist_GRUp (bounds in bounds_RU, padded with +inf).
H_DIST, H_NORM, H_CONS, H_COS, H_LOSS = range(5)


@njit(cache=True, nogil=True)
def _observe(bounds_U, nb, counts_Up, value):
    lo = 0
    hi = nb
    while lo < hi:
        mid = (lo + hi) // 2
        if bounds_U[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    counts_Up[lo] += 1


# The arguments of process_samples, grouped by what they hold (Numba takes named tuples of arrays).
# One routing message's samples and the draws for them (read only).
# id_N: each sample's id hashed (``sample_key``): a sample is never compared with a copy of itself; same_round:
# the probe and replay sources compare only samples of the same step (one probe round, one checkpoint).
Samples = namedtuple("Samples", ["mean_probs_NLE", "topk_counts_NLE", "tokens_N", "entropy_NL", "adj_cosine_NJ", "has_cos",
                                 "loss_N", "has_loss", "step", "targets_N2", "u_N2P", "ux_NP", "id_N", "same_round"])
# Every group's window ring: its last W pathways and their router-health inputs (the new ones go in).
Windows = namedtuple("Windows", ["sym_GWY", "len_GW", "starts_GWLp", "fp_GW", "chars_GWC", "chars_len_GW", "filled_G",
                                 "next_G", "topk_GWLE", "tokens_GW", "entropy_GWL", "eligible_G", "id_GW", "step_GW"])
# Every group's cumulative series.
Series = namedtuple("Series", ["hist_GRUp", "hist_sum_GR", "layer_sum_GL", "layer_count_GL", "samples_G",
                               "undefined_G", "latest_step_G"])
# One series of distances: a group's, or the cross-group baseline's.
Distances = namedtuple("Distances", ["hist_RUp", "hist_sum_R", "layer_sum_L", "layer_count_L"])
# What this message adds per group, for the journal (``STAT_KEYS`` columns; entropy and load per layer; the
# within-group layer-wise distances' sum and count per layer).
Sums = namedtuple("Sums", ["stats_GV", "ent_GL", "load_GLE", "layer_sum_GL", "layer_n_GL"])
# Per-sample working memory: the pathway, its string form, and the bit-parallel rows.
Scratch = namedtuple("Scratch", ["sym_Y", "starts_Lp", "chars_C", "peq_AQ", "pv_Q", "mv_Q", "lpeq_LAQ", "lpv_Q",
                                 "lmv_Q", "x_layer_sum_L", "x_layer_n_L"])
# The configuration: METRICS.md §1's tau, the distance unit, §2's cosine floor, the histograms' bounds.
Params = namedtuple("Params", ["tau", "use_chars", "min_max_cosine", "bounds_RU", "nb_R", "select_first"])


@njit(cache=True, nogil=True, inline="always")
def _pairs(i, a_len, c_len, g, picks_P, win, scratch, params, into, stats_V, prefix, msg_layer_sum_L,
           msg_layer_n_L, plan):
    """Distances of sample i's pathway (in ``scratch``) to the window slots ``picks_P`` of group g,
    observed ``into`` one series (a group's or the cross-group baseline's). ``peq_AQ`` holds
    the match masks of the whole pathway, ``lpeq_LAQ`` those of each layer's list (both built
    once per sample). A pair that is the next one of ``plan`` (collector/pairs.py) takes its
    precomputed figures; any other is computed here (and counted in ``plan.missed`` when a plan
    was made)."""
    # The hot loop reads locals: fields read from the named tuples inside it are not hoisted out of it
    # by Numba (docs/benchmarks.md, "Collector throughput").
    sym_GWY, len_GW, starts_GWLp, chars_GWC, chars_len_GW = win.sym_GWY, win.len_GW, win.starts_GWLp, \
        win.chars_GWC, win.chars_len_GW
    a_starts, peq_AQ, pv_Q, mv_Q = scratch.starts_Lp, scratch.peq_AQ, scratch.pv_Q, scratch.mv_Q
    lpeq_LAQ, lpv_Q, lmv_Q = scratch.lpeq_LAQ, scratch.lpv_Q, scratch.lmv_Q
    use_chars, bounds_RU, nb_R = params.use_chars, params.bounds_RU, params.nb_R
    hist_RUp, hist_sum_R, layer_sum_L, layer_count_L = into.hist_RUp, into.hist_sum_R, into.layer_sum_L, \
        into.layer_count_L
    num_layers = a_starts.shape[0] - 1
    cursor_1, planned_1 = plan.cursor, plan.count[0]
    p_i, p_g, p_slot, p_d, p_longest, p_ld = plan.i_P, plan.g_P, plan.slot_P, plan.d_P, plan.longest_P, plan.ld_PL
    for p in range(picks_P.shape[0]):
        slot = picks_P[p]
        c = cursor_1[0]
        hit = c < planned_1 and p_i[c] == i and p_g[c] == g and p_slot[c] == slot
        if hit:
            d = p_d[c]
            longest = p_longest[c]
            cursor_1[0] = c + 1
        else:
            if planned_1 > 0:
                plan.missed[0] += 1
            if use_chars:
                b_len = chars_len_GW[g, slot]
                d = levenshtein_peq(peq_AQ, c_len, chars_GWC[g, slot], b_len, pv_Q, mv_Q)
                longest = max(c_len, b_len)
            else:
                b_len = len_GW[g, slot]
                d = levenshtein_peq(peq_AQ, a_len, sym_GWY[g, slot], b_len, pv_Q, mv_Q)
                longest = max(a_len, b_len)
        norm = d / longest if longest > 0 else 0.0
        _observe(bounds_RU[H_DIST], nb_R[H_DIST], hist_RUp[H_DIST], d)
        hist_sum_R[H_DIST] += d
        _observe(bounds_RU[H_NORM], nb_R[H_NORM], hist_RUp[H_NORM], norm)
        hist_sum_R[H_NORM] += norm
        stats_V[prefix + 0] += d
        stats_V[prefix + 1] += norm
        stats_V[prefix + 2] += 1
        for layer in range(num_layers):
            if hit:
                ld = p_ld[c, layer]
            else:
                a_n = a_starts[layer + 1] - 1 - a_starts[layer]
                b0 = starts_GWLp[g, slot, layer]
                b_n = starts_GWLp[g, slot, layer + 1] - 1 - b0
                ld = levenshtein_peq(lpeq_LAQ[layer], a_n, sym_GWY[g, slot, b0:b0 + b_n], b_n, lpv_Q, lmv_Q)
            layer_sum_L[layer] += ld
            layer_count_L[layer] += 1
            msg_layer_sum_L[layer] += ld
            msg_layer_n_L[layer] += 1


# The loops of process_samples a planned pair belongs to (collector/pairs.py, Plan.kind_P).
WITHIN_FIRST, CROSS, WITHIN_SECOND = 0, 1, 2


@njit(cache=True, nogil=True, inline="always")
def _planned(plan, i, kind, picks):
    """The slots of sample i's next planned pairs of ``kind`` (from the plan's cursor on) into ``picks``;
    returns their number (the cursor moves as ``_pairs`` takes them)."""
    c = plan.cursor[0]
    count = plan.count[0]
    i_P, kind_P, slot_P = plan.i_P, plan.kind_P, plan.slot_P
    n = 0
    while c + n < count and i_P[c + n] == i and kind_P[c + n] == kind and n < picks.shape[0]:
        picks[n] = slot_P[c + n]
        n += 1
    return n


@njit(cache=True, nogil=True, inline="always")
def _planned_cross(i, a_len, c_len, win, scratch, params, baseline, st, picks, msg_layer_sum_L, msg_layer_n_L,
                   plan):
    """Sample i's planned cross-group pairs, group by group as ``_cross_pairs`` takes them."""
    count = plan.count[0]
    while True:
        c = plan.cursor[0]
        if c >= count or plan.i_P[c] != i or plan.kind_P[c] != CROSS:
            return
        h = plan.g_P[c]
        cnt = 0
        while c + cnt < count and plan.i_P[c + cnt] == i and plan.kind_P[c + cnt] == CROSS and \
                plan.g_P[c + cnt] == h and cnt < picks.shape[0]:
            picks[cnt] = plan.slot_P[c + cnt]
            cnt += 1
        _pairs(i, a_len, c_len, h, picks[:cnt], win, scratch, params, baseline, st, S_XDIST, msg_layer_sum_L,
               msg_layer_n_L, plan)


@njit(cache=True, nogil=True, inline="always")
def _cosines(cos_J, defined, min_max_cosine):
    """METRICS.md §2 of one sample: the mean adjacent-layer cosine and the consistency (whether defined)."""
    J = cos_J.shape[0]
    cos_raw = 0.0
    cons = 0.0
    cons_ok = False
    if defined:
        top = -2.0
        for l in range(J):
            c = np.float64(cos_J[l])
            cos_raw += c
            if c > top:
                top = c
        cos_raw /= J
        if J >= 2 and top > min_max_cosine:
            for l in range(J):
                cons += np.float64(cos_J[l]) / (top + 1e-8)
            cons /= J
            cons_ok = True
    return cos_raw, cons, cons_ok


@njit(cache=True, nogil=True, inline="always")
def _latest_before(win, g, step):
    """The latest step before ``step`` held by the other eligible groups' windows (-1: none)."""
    filled_G, eligible_G, step_GW = win.filled_G, win.eligible_G, win.step_GW
    best = -1
    for h in range(filled_G.shape[0]):
        if h != g and eligible_G[h]:
            for slot in range(filled_G[h]):
                s = step_GW[h, slot]
                if s < step and s > best:
                    best = s
    return best


@njit(cache=True, nogil=True, inline="always")
def _eligible(id_W, step_W, filled, sid, step, same_round, out_W):
    """METRICS.md §1: a pair is two distinct samples (never a copy of the same id), of one probe round
    (the same step) for the probe and replay sources. Writes the eligible slots of one group's window
    into ``out_W`` and returns their number. (Arrays, not the named tuple: a field read inside a loop is
    not hoisted by Numba and costs more than the comparison.)"""
    e = 0
    if same_round:
        for slot in range(filled):
            if id_W[slot] != sid and step_W[slot] == step:
                out_W[e] = slot
                e += 1
    else:
        for slot in range(filled):
            if id_W[slot] != sid:
                out_W[e] = slot
                e += 1
    return e


@njit(cache=True, nogil=True, inline="always")
def _within_picks(u_P, g, filled, picks, elig_W, win, sid, step, same_round):
    """The window slots one sample is compared with: all the eligible ones (``_eligible``) while at most m,
    else m drawn uniformly among them."""
    m = u_P.shape[0]
    e = _eligible(win.id_GW[g], win.step_GW[g], filled, sid, step, same_round, elig_W)
    if e <= m:
        for p in range(e):
            picks[p] = elig_W[p]
        return e
    for p in range(m):
        picks[p] = elig_W[min(np.int64(u_P[p] * e), e - 1)]
    return m


@njit(cache=True, nogil=True, inline="always")
def _other_slots(win, g, sid, step, same_round, xslot_X, xgroup_X):
    """The eligible slots (``_eligible``) of every other eligible group, as (group, slot) pairs into
    ``xgroup_X``/``xslot_X``; returns their number."""
    filled_G, eligible_G, id_GW, step_GW = win.filled_G, win.eligible_G, win.id_GW, win.step_GW
    total = 0
    for h in range(filled_G.shape[0]):
        if h != g and eligible_G[h]:
            e = _eligible(id_GW[h], step_GW[h], filled_G[h], sid, step, same_round, xslot_X[total:])
            for j in range(total, total + e):
                xgroup_X[j] = h
            total += e
    return total


@njit(cache=True, nogil=True, inline="always")
def _cross_pairs(i, a_len, c_len, g, ux_P, win, scratch, params, baseline, st, picks, xpicks, xowner, xslot_X,
                 xgroup_X, sid, step, same_round, msg_layer_sum_L, msg_layer_n_L, plan):
    """The cross-group baseline of a sample of group g: m slots drawn over the other eligible groups'
    windows (all their eligible slots alike, ``_eligible``), compared group by group."""
    filled_G = win.filled_G
    G = filled_G.shape[0]
    m = ux_P.shape[0]
    total = _other_slots(win, g, sid, step, same_round, xslot_X, xgroup_X)
    if total == 0 and same_round:
        # The first group of a probe round finds no other group's sample of its round yet: its baseline
        # compares with the other groups' latest earlier round (else it would never have one).
        prev = _latest_before(win, g, step)
        if prev >= 0:
            total = _other_slots(win, g, sid, prev, same_round, xslot_X, xgroup_X)
    if total == 0:
        return
    for p in range(m):
        r = min(np.int64(ux_P[p] * total), total - 1)
        xowner[p] = xgroup_X[r]
        xpicks[p] = xslot_X[r]
    for h in range(G):
        cnt = 0
        for p in range(m):
            if xowner[p] == h:
                picks[cnt] = xpicks[p]
                cnt += 1
        if cnt:
            _pairs(i, a_len, c_len, h, picks[:cnt], win, scratch, params, baseline, st, S_XDIST, msg_layer_sum_L,
                   msg_layer_n_L, plan)
    for p in range(m):
        xowner[p] = -1


@njit(cache=True, nogil=True, inline="always")
def _insert(win, g, i, samples, scratch, a_len, c_len, fp, tok, use_chars, sid, step):
    """Sample i's pathway and router-health inputs into group g's ring (its oldest slot once full)."""
    topk_counts_NLE, entropy_NL = samples.topk_counts_NLE, samples.entropy_NL
    sym_Y, starts_Lp, chars_C = scratch.sym_Y, scratch.starts_Lp, scratch.chars_C
    sym_GWY, topk_GWLE, entropy_GWL = win.sym_GWY, win.topk_GWLE, win.entropy_GWL
    L, E = topk_counts_NLE.shape[1], topk_counts_NLE.shape[2]
    W = sym_GWY.shape[1]
    s = win.next_G[g]
    for j in range(a_len):
        sym_GWY[g, s, j] = sym_Y[j]
    win.len_GW[g, s] = a_len
    for l in range(L + 1):
        win.starts_GWLp[g, s, l] = starts_Lp[l]
    win.fp_GW[g, s] = fp
    win.id_GW[g, s] = sid
    win.step_GW[g, s] = step
    if use_chars:
        for j in range(c_len):
            win.chars_GWC[g, s, j] = chars_C[j]
        win.chars_len_GW[g, s] = c_len
    for l in range(L):
        for k in range(E):
            topk_GWLE[g, s, l, k] = topk_counts_NLE[i, l, k]
        entropy_GWL[g, s, l] = entropy_NL[i, l]
    win.tokens_GW[g, s] = tok
    win.next_G[g] = (s + 1) % W
    if win.filled_G[g] < W:
        win.filled_G[g] += 1


@njit(cache=True, nogil=True)
def process_samples(samples, win, series, baseline, sums, scratch, params, plan):
    """METRICS.md §1-3 for every sample of one routing message, in one call.

    For each sample: build its pathway (§1), compare it with m window samples
    of its target groups (targets_N2[i, 1] = -1 when there is no second one,
    e.g. a memorization bucket) and with m samples drawn over the other
    eligible groups' windows (cross-group baseline, primary group only),
    observe distances, layer-wise distances, consistency and cosine (§2) and
    probe loss, then insert the pathway and its router-health inputs (§3)
    into each target group's ring. Random draws come in as uniforms (numpy's
    generator, seeded), so the kernel itself is deterministic. ``plan``: the pairs' figures computed ahead,
    on several threads (collector/pairs.py; ``pairs.empty_plan``: none).
    """
    mean_probs_NLE, topk_counts_NLE, entropy_NL, adj_cosine_NJ = samples.mean_probs_NLE, samples.topk_counts_NLE, samples.entropy_NL, \
        samples.adj_cosine_NJ
    targets_N2, u_N2P, ux_NP = samples.targets_N2, samples.u_N2P, samples.ux_NP
    has_cos, has_loss, step = samples.has_cos, samples.has_loss, samples.step
    sym_Y, starts_Lp, chars_C = scratch.sym_Y, scratch.starts_Lp, scratch.chars_C
    tau, use_chars, min_max_cosine = params.tau, params.use_chars, params.min_max_cosine
    bounds_RU, nb_R = params.bounds_RU, params.nb_R
    # Locals, not fields read inside the loops (see _pairs).
    filled_G = win.filled_G
    hist_GRUp, hist_sum_GR = series.hist_GRUp, series.hist_sum_GR
    samples_G, undefined_G, latest_step_G = series.samples_G, series.undefined_G, series.latest_step_G
    layer_sum_GL, layer_count_GL = series.layer_sum_GL, series.layer_count_GL
    stats_GV, ent_GL, load_GLE = sums.stats_GV, sums.ent_GL, sums.load_GLE
    msg_layer_sum_GL, msg_layer_n_GL = sums.layer_sum_GL, sums.layer_n_GL
    id_N, same_round = samples.id_N, samples.same_round
    tokens_N, loss_N = samples.tokens_N, samples.loss_N
    peq_AQ, lpeq_LAQ = scratch.peq_AQ, scratch.lpeq_LAQ
    N, L, E = mean_probs_NLE.shape
    m = u_N2P.shape[2]
    alphabet_sym = E + 1
    alphabet = 128 if use_chars else alphabet_sym
    picks = np.empty(m, np.int64)
    xpicks = np.empty(m, np.int64)
    xowner = np.full(m, -1, np.int64)
    W = win.sym_GWY.shape[1]
    elig_W = np.empty(W, np.int64)
    xslot_X = np.empty(max(1, filled_G.shape[0] * W), np.int64)
    xgroup_X = np.empty(max(1, filled_G.shape[0] * W), np.int64)
    log_E = np.log(np.float64(E))
    planned = plan.count[0] > 0  # the pairs' slots and figures come from the plan: no window scans here
    for i in range(N):
        a_len = build_pathway(mean_probs_NLE[i], tau, sym_Y, starts_Lp, params.select_first)
        c_len = pathway_chars(sym_Y, a_len, E, chars_C) if use_chars else 0
        if not planned:  # the match masks for computing the pairs here (a plan brings them computed)
            if use_chars:
                build_peq(chars_C, c_len, alphabet, peq_AQ)
            else:
                build_peq(sym_Y, a_len, alphabet, peq_AQ)
            for l in range(L):
                a0 = starts_Lp[l]
                build_peq(sym_Y[a0:starts_Lp[l + 1] - 1], starts_Lp[l + 1] - 1 - a0, alphabet_sym, lpeq_LAQ[l])
        cos_raw, cons, cons_ok = _cosines(adj_cosine_NJ[i], has_cos and L > 1, min_max_cosine)
        fp = fingerprint(sym_Y, a_len)
        ent_mean = 0.0
        for l in range(L):
            ent_mean += np.float64(entropy_NL[i, l])
        ent_mean /= L
        tok = np.int64(tokens_N[i])
        sid = id_N[i]
        # H(ḡ) ÷ log E, mean over layers (METRICS.md §6)
        hbar = 0.0
        for l in range(L):
            for k in range(E):
                pk = np.float64(mean_probs_NLE[i, l, k])
                if pk > 0.0:
                    hbar -= pk * np.log(pk)
        hbar = hbar / (L * log_E) if E > 1 else 0.0
        for t in range(2):
            g = targets_N2[i, t]
            if g < 0:
                continue
            st = stats_GV[g]
            filled = filled_G[g]
            # --- within-group pairs
            if filled > 0:
                if planned:
                    npk = _planned(plan, i, WITHIN_FIRST if t == 0 else WITHIN_SECOND, picks)
                else:
                    npk = _within_picks(u_N2P[i, t], g, filled, picks, elig_W, win, sid, step, same_round)
                if npk:
                    own = Distances(hist_GRUp[g], hist_sum_GR[g], layer_sum_GL[g], layer_count_GL[g])
                    _pairs(i, a_len, c_len, g, picks[:npk], win, scratch, params, own, st, S_DIST,
                           msg_layer_sum_GL[g], msg_layer_n_GL[g], plan)
            # --- cross-group baseline (primary target only; its layer-wise distances are not journaled)
            if t == 0 and planned:
                _planned_cross(i, a_len, c_len, win, scratch, params, baseline, st, picks, scratch.x_layer_sum_L,
                               scratch.x_layer_n_L, plan)
            elif t == 0:
                _cross_pairs(i, a_len, c_len, g, ux_NP[i], win, scratch, params, baseline, st, picks, xpicks, xowner,
                             xslot_X, xgroup_X, sid, step, same_round, scratch.x_layer_sum_L, scratch.x_layer_n_L,
                             plan)
            # --- per-sample series
            samples_G[g] += 1
            if step > latest_step_G[g]:
                latest_step_G[g] = step
            if has_cos and L > 1:
                _observe(bounds_RU[H_COS], nb_R[H_COS], hist_GRUp[g, H_COS], cos_raw)
                hist_sum_GR[g, H_COS] += cos_raw
                st[S_COS] += cos_raw
                st[S_COSN] += 1
                if cons_ok:
                    _observe(bounds_RU[H_CONS], nb_R[H_CONS], hist_GRUp[g, H_CONS], cons)
                    hist_sum_GR[g, H_CONS] += cons
                    st[S_CONS] += cons
                    st[S_CONSN] += 1
                else:
                    undefined_G[g] += 1
            if has_loss:
                lv = np.float64(loss_N[i])
                _observe(bounds_RU[H_LOSS], nb_R[H_LOSS], hist_GRUp[g, H_LOSS], lv)
                hist_sum_GR[g, H_LOSS] += lv
                st[S_LOSS] += lv
                st[S_LOSSN] += 1
            st[S_ENT] += ent_mean * tok
            st[S_TOKENS] += tok
            st[S_N] += 1
            st[S_LEN] += a_len
            st[S_HBAR] += hbar
            for l in range(L):
                ent_GL[g, l] += np.float64(entropy_NL[i, l]) * tok
                for k in range(E):
                    load_GLE[g, l, k] += topk_counts_NLE[i, l, k]
            _insert(win, g, i, samples, scratch, a_len, c_len, fp, tok, use_chars, sid, step)
    return 0


def seed_cache(environ=None) -> int:
    """Copy a prebuilt kernel cache (``GROKWATCH_KERNEL_CACHE``, written when the image was built) into
    Numba's cache directory (``NUMBA_CACHE_DIR``, writable) when that one is empty, so a fresh pod loads
    the kernels instead of compiling them. Returns the number of files copied (0: nothing to do)."""
    import os
    import shutil

    environ = os.environ if environ is None else environ
    prebuilt, target = environ.get("GROKWATCH_KERNEL_CACHE"), environ.get("NUMBA_CACHE_DIR")
    if not prebuilt or not target or not os.path.isdir(prebuilt):
        return 0
    if any(files for _, _, files in os.walk(target)):  # a cache in use (importing the kernels makes empty dirs)
        return 0
    shutil.copytree(prebuilt, target, dirs_exist_ok=True)
    return sum(len(files) for _, _, files in os.walk(target))
