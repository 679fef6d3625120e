"""Numba kernels of the collector's hot path. Plain arrays in, plain arrays out.

Each kernel names the METRICS.md definition it implements; ``reference.py``
holds the plain-Python version the tests compare against.

Legend: L layers, E experts, S symbols of a pathway, W 64-bit words, B buckets.
Pathway symbols (the `expert` unit) are int16: expert ids 0..E-1 and SEP = E.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_ONE = np.uint64(1)
_ZERO = np.uint64(0)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_WORD = 64


@njit(cache=True, nogil=True)
def build_pathway(probs_LE, tau, sym_S, starts_L1):
    """METRICS.md §1 layer lists e_l and pathway s = e_1 ⊕ SEP ⊕ … ⊕ e_L.

    Writes the symbols into ``sym_S`` (capacity L*(E+1)) and the start of each
    layer's list into ``starts_L1`` (starts_L1[L] = S + 1, as if a SEP
    followed the last layer). Returns S. Ties keep the lower expert index first
    (stable sort); cumulative weights are summed in float64 like the reference.
    """
    num_layers, num_experts = probs_LE.shape
    sep = num_experts
    n = 0
    for layer in range(num_layers):
        if layer > 0:
            sym_S[n] = sep
            n += 1
        starts_L1[layer] = n
        order_E = np.argsort(-probs_LE[layer].astype(np.float64), kind="mergesort")
        total = 0.0
        for r in range(num_experts):
            k = order_E[r]
            sym_S[n] = k
            n += 1
            total += np.float64(probs_LE[layer, k])
            if total >= tau:
                break
    starts_L1[num_layers] = n + 1
    return n


@njit(cache=True, nogil=True)
def pathway_chars(sym_S, length, sep, out_C):
    """The paper's string form of a pathway as ASCII codes: ',' between experts
    of a layer, '-' between layers. Returns the number of characters."""
    n = 0
    first_in_layer = True
    for i in range(length):
        s = sym_S[i]
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
def build_peq(a, length, alphabet, peq_AW):
    """Match masks of pattern ``a`` for the bit-parallel edit distance:
    bit i of peq_AW[c, i // 64] is set iff a[i] == c. Returns the words used."""
    words = (length + _WORD - 1) // _WORD
    for c in range(alphabet):
        for w in range(words):
            peq_AW[c, w] = _ZERO
    for i in range(length):
        peq_AW[a[i], i // _WORD] |= _ONE << np.uint64(i % _WORD)
    return words


@njit(cache=True, nogil=True)
def levenshtein_peq(peq_AW, m, b, n, pv_W, mv_W):
    """METRICS.md §1 Levenshtein (unit costs) of pattern (given as ``peq_AW``,
    length m) against ``b[:n]``: Myers' bit-vector algorithm in Hyyrö's
    multi-word form, O(ceil(m/64) * n). Rows below m in the last word are
    computed but never read, since carries only flow downwards."""
    if m == 0:
        return n
    if n == 0:
        return m
    words = (m + _WORD - 1) // _WORD
    for w in range(words):
        pv_W[w] = _ALL
        mv_W[w] = _ZERO
    last_bit = np.uint64((m - 1) % _WORD)
    last = words - 1
    score = m
    for j in range(n):
        c = b[j]
        hp = _ONE  # horizontal delta carried into each word: +1 at row 0 of the DP
        hn = _ZERO
        ph = _ZERO
        mh = _ZERO
        for w in range(words):
            eq = peq_AW[c, w]
            pv = pv_W[w]
            mv = mv_W[w]
            xv = eq | mv
            eq |= hn
            xh = (((eq & pv) + pv) ^ pv) | eq
            ph = mv | (~(xh | pv))
            mh = pv & xh
            hp_out = ph >> np.uint64(63)
            hn_out = mh >> np.uint64(63)
            if w == last:
                score += np.int64((ph >> last_bit) & _ONE) - np.int64((mh >> last_bit) & _ONE)
            ph = (ph << _ONE) | hp
            mh = (mh << _ONE) | hn
            pv_W[w] = mh | (~(xv | ph))
            mv_W[w] = ph & xv
            hp = hp_out
            hn = hn_out
    return score


@njit(cache=True, nogil=True)
def levenshtein(a, m, b, n, alphabet):
    """One-off edit distance of a[:m] and b[:n] (allocates its scratch)."""
    words = max(1, (m + _WORD - 1) // _WORD)
    peq = np.empty((alphabet, words), np.uint64)
    build_peq(a, m, alphabet, peq)
    pv = np.empty(words, np.uint64)
    mv = np.empty(words, np.uint64)
    return levenshtein_peq(peq, m, b, n, pv, mv)


@njit(cache=True, nogil=True)
def compare_to_window(a_S, a_len, win_sym_NS, win_len_N, picks_P, alphabet, peq_AW, pv_W, mv_W,
                      out_dist_P, out_norm_P):
    """Distances of one new pathway to the window pathways ``picks_P``:
    D (METRICS.md §1, in whatever unit the symbols are) and D / max length.
    ``peq_AW`` needs ceil(S/64) words for the longest pattern."""
    build_peq(a_S, a_len, alphabet, peq_AW)
    for p in range(picks_P.shape[0]):
        slot = picks_P[p]
        b_len = win_len_N[slot]
        d = levenshtein_peq(peq_AW, a_len, win_sym_NS[slot], b_len, pv_W, mv_W)
        out_dist_P[p] = d
        longest = max(a_len, b_len)
        out_norm_P[p] = d / longest if longest > 0 else 0.0
    return 0


@njit(cache=True, nogil=True)
def fingerprint(sym_S, length):
    """64-bit FNV-1a of a pathway (deterministic across processes, unlike hash())."""
    h = np.uint64(0xCBF29CE484222325)
    prime = np.uint64(0x100000001B3)
    for i in range(length):
        h ^= np.uint64(sym_S[i] & 0xFFFF)
        h *= prime
    return h


# Per-group statistics a message accumulates for the journal (columns of stats_GK).
STAT_KEYS = ("n", "tokens", "entropy_sum", "dist_sum", "norm_sum", "dist_n", "x_dist_sum", "x_norm_sum", "x_dist_n",
             "cons_sum", "cons_n", "cos_sum", "cos_n", "loss_sum", "loss_n")
(S_N, S_TOKENS, S_ENT, S_DIST, S_NORM, S_DN, S_XDIST, S_XNORM, S_XDN, S_CONS, S_CONSN, S_COS, S_COSN, S_LOSS,
 S_LOSSN) = range(len(STAT_KEYS))
# Histogram rows of hist_GHB1 (bounds in bounds_HB, padded with +inf).
H_DIST, H_NORM, H_CONS, H_COS, H_LOSS = range(5)


@njit(cache=True, nogil=True)
def _observe(bounds_B, nb, counts_B1, value):
    lo = 0
    hi = nb
    while lo < hi:
        mid = (lo + hi) // 2
        if bounds_B[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    counts_B1[lo] += 1


@njit(cache=True, nogil=True)
def _pairs(a_len, a_starts, a_chars_len, use_chars, g, picks_P, win_sym_GWS, win_len_GW, win_starts_GWL1,
           win_chars_GWC, win_chars_len_GW, peq_AW, pv_W, mv_W, lpeq_LAW, lpv_W, lmv_W, bounds_HB, nb_H, hist_HB1,
           hist_sum_H, layer_sum_L, layer_count_L, stats_K, prefix):
    """Distances of one pathway to the window slots ``picks_P`` of group g,
    observed into one series (a group's or the cross-group baseline's).
    ``peq_AW`` holds the match masks of the whole pathway, ``lpeq_LAW`` those
    of each layer's list (both built once per sample)."""
    num_layers = a_starts.shape[0] - 1
    for p in range(picks_P.shape[0]):
        slot = picks_P[p]
        if use_chars:
            b_len = win_chars_len_GW[g, slot]
            d = levenshtein_peq(peq_AW, a_chars_len, win_chars_GWC[g, slot], b_len, pv_W, mv_W)
            longest = max(a_chars_len, b_len)
        else:
            b_len = win_len_GW[g, slot]
            d = levenshtein_peq(peq_AW, a_len, win_sym_GWS[g, slot], b_len, pv_W, mv_W)
            longest = max(a_len, b_len)
        norm = d / longest if longest > 0 else 0.0
        _observe(bounds_HB[H_DIST], nb_H[H_DIST], hist_HB1[H_DIST], d)
        hist_sum_H[H_DIST] += d
        _observe(bounds_HB[H_NORM], nb_H[H_NORM], hist_HB1[H_NORM], norm)
        hist_sum_H[H_NORM] += norm
        stats_K[prefix + 0] += d
        stats_K[prefix + 1] += norm
        stats_K[prefix + 2] += 1
        for layer in range(num_layers):
            a_n = a_starts[layer + 1] - 1 - a_starts[layer]
            b0 = win_starts_GWL1[g, slot, layer]
            b_n = win_starts_GWL1[g, slot, layer + 1] - 1 - b0
            layer_sum_L[layer] += levenshtein_peq(lpeq_LAW[layer], a_n, win_sym_GWS[g, slot, b0:b0 + b_n], b_n,
                                                  lpv_W, lmv_W)
            layer_count_L[layer] += 1


@njit(cache=True, nogil=True)
def process_samples(probs_NLE, counts_NLE, tokens_N, entropy_NL, cos_NL1, has_cos, loss_N, has_loss, targets_N2,
                    u_N2M, ux_NM, tau, use_chars, eligible_G,
                    win_sym_GWS, win_len_GW, win_starts_GWL1, win_fp_GW, win_chars_GWC, win_chars_len_GW,
                    win_filled_G, win_next_G, topk_GWLE, tokens_GW, entropy_GWL,
                    hist_GHB1, hist_sum_GH, layer_sum_GL, layer_count_GL, samples_G, undefined_G, latest_step_G, step,
                    xhist_HB1, xhist_sum_H, xlayer_sum_L, xlayer_count_L,
                    bounds_HB, nb_H, min_max_cosine, stats_GK, stats_ent_GL, stats_load_GLE,
                    sym_S, starts_L1, chars_C, peq_AW, pv_W, mv_W, lpeq_LAW, lpv_W, lmv_W):
    """METRICS.md §1-3 for every sample of one routing message, in one call.

    For each sample: build its pathway (§1), compare it with m window samples
    of its target groups (targets_N2[i, 1] = -1 when there is no second one,
    e.g. a memorization bucket) and with m samples drawn over the other
    eligible groups' windows (cross-group baseline, primary group only),
    observe distances, layer-wise distances, consistency and cosine (§2) and
    probe loss, then insert the pathway and its router-health inputs (§3)
    into each target group's ring. Random draws come in as uniforms (numpy's
    generator, seeded), so the kernel itself is deterministic.
    """
    N, L, E = probs_NLE.shape
    W = win_sym_GWS.shape[1]
    m = u_N2M.shape[2]
    G = win_filled_G.shape[0]
    alphabet_sym = E + 1
    alphabet = 128 if use_chars else alphabet_sym
    picks = np.empty(m, np.int64)
    xpicks = np.empty(m, np.int64)
    xowner = np.full(m, -1, np.int64)
    for i in range(N):
        a_len = build_pathway(probs_NLE[i], tau, sym_S, starts_L1)
        c_len = pathway_chars(sym_S, a_len, E, chars_C) if use_chars else 0
        if use_chars:
            build_peq(chars_C, c_len, alphabet, peq_AW)
        else:
            build_peq(sym_S, a_len, alphabet, peq_AW)
        for l in range(L):
            a0 = starts_L1[l]
            build_peq(sym_S[a0:starts_L1[l + 1] - 1], starts_L1[l + 1] - 1 - a0, alphabet_sym, lpeq_LAW[l])
        cos_raw = 0.0
        cons = 0.0
        cons_ok = False
        if has_cos and L > 1:
            top = -2.0
            for l in range(L - 1):
                c = np.float64(cos_NL1[i, l])
                cos_raw += c
                if c > top:
                    top = c
            cos_raw /= L - 1
            if L - 1 >= 2 and top > min_max_cosine:
                for l in range(L - 1):
                    cons += np.float64(cos_NL1[i, l]) / (top + 1e-8)
                cons /= L - 1
                cons_ok = True
        fp = fingerprint(sym_S, a_len)
        ent_mean = 0.0
        for l in range(L):
            ent_mean += np.float64(entropy_NL[i, l])
        ent_mean /= L
        tok = np.int64(tokens_N[i])
        for t in range(2):
            g = targets_N2[i, t]
            if g < 0:
                continue
            filled = win_filled_G[g]
            # --- within-group pairs
            if filled > 0:
                if filled <= m:
                    npk = filled
                    for p in range(npk):
                        picks[p] = p
                else:
                    npk = m
                    for p in range(m):
                        picks[p] = min(np.int64(u_N2M[i, t, p] * filled), filled - 1)
                _pairs(a_len, starts_L1, c_len, use_chars, g, picks[:npk], win_sym_GWS, win_len_GW, win_starts_GWL1,
                       win_chars_GWC, win_chars_len_GW, peq_AW, pv_W, mv_W, lpeq_LAW, lpv_W, lmv_W, bounds_HB, nb_H,
                       hist_GHB1[g], hist_sum_GH[g], layer_sum_GL[g], layer_count_GL[g], stats_GK[g], S_DIST)
            # --- cross-group baseline (primary target only)
            if t == 0:
                total = 0
                for h in range(G):
                    if h != g and eligible_G[h]:
                        total += win_filled_G[h]
                if total > 0:
                    for p in range(m):
                        r = min(np.int64(ux_NM[i, p] * total), total - 1)
                        for h in range(G):
                            if h == g or not eligible_G[h]:
                                continue
                            if r < win_filled_G[h]:
                                xowner[p] = h
                                xpicks[p] = r
                                break
                            r -= win_filled_G[h]
                    for h in range(G):
                        cnt = 0
                        for p in range(m):
                            if xowner[p] == h:
                                picks[cnt] = xpicks[p]
                                cnt += 1
                        if cnt:
                            _pairs(a_len, starts_L1, c_len, use_chars, h, picks[:cnt], win_sym_GWS, win_len_GW,
                                   win_starts_GWL1, win_chars_GWC, win_chars_len_GW, peq_AW, pv_W, mv_W, lpeq_LAW,
                                   lpv_W, lmv_W, bounds_HB, nb_H, xhist_HB1, xhist_sum_H, xlayer_sum_L,
                                   xlayer_count_L, stats_GK[g], S_XDIST)
                    for p in range(m):
                        xowner[p] = -1
            # --- per-sample series
            samples_G[g] += 1
            if step > latest_step_G[g]:
                latest_step_G[g] = step
            st = stats_GK[g]
            if has_cos and L > 1:
                _observe(bounds_HB[H_COS], nb_H[H_COS], hist_GHB1[g, H_COS], cos_raw)
                hist_sum_GH[g, H_COS] += cos_raw
                st[S_COS] += cos_raw
                st[S_COSN] += 1
                if cons_ok:
                    _observe(bounds_HB[H_CONS], nb_H[H_CONS], hist_GHB1[g, H_CONS], cons)
                    hist_sum_GH[g, H_CONS] += cons
                    st[S_CONS] += cons
                    st[S_CONSN] += 1
                else:
                    undefined_G[g] += 1
            if has_loss:
                lv = np.float64(loss_N[i])
                _observe(bounds_HB[H_LOSS], nb_H[H_LOSS], hist_GHB1[g, H_LOSS], lv)
                hist_sum_GH[g, H_LOSS] += lv
                st[S_LOSS] += lv
                st[S_LOSSN] += 1
            st[S_ENT] += ent_mean * tok
            st[S_TOKENS] += tok
            st[S_N] += 1
            for l in range(L):
                stats_ent_GL[g, l] += np.float64(entropy_NL[i, l]) * tok
                for k in range(E):
                    stats_load_GLE[g, l, k] += counts_NLE[i, l, k]
            # --- insert into the ring
            s = win_next_G[g]
            for j in range(a_len):
                win_sym_GWS[g, s, j] = sym_S[j]
            win_len_GW[g, s] = a_len
            for l in range(L + 1):
                win_starts_GWL1[g, s, l] = starts_L1[l]
            win_fp_GW[g, s] = fp
            if use_chars:
                for j in range(c_len):
                    win_chars_GWC[g, s, j] = chars_C[j]
                win_chars_len_GW[g, s] = c_len
            for l in range(L):
                for k in range(E):
                    topk_GWLE[g, s, l, k] = counts_NLE[i, l, k]
                entropy_GWL[g, s, l] = entropy_NL[i, l]
            tokens_GW[g, s] = tok
            win_next_G[g] = (s + 1) % W
            if win_filled_G[g] < W:
                win_filled_G[g] += 1
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


def warm_up() -> None:
    """Compile (or load from the on-disk cache) the hot-path kernels before the
    first message: one tiny message through a throwaway state, both units."""
    import time

    import numpy as np_

    from grokwatch.collector.config import CollectorConfig
    from grokwatch.collector.state import State
    from grokwatch.wire import Routing

    rng = np_.random.default_rng(0)
    for unit in ("expert", "string"):
        state = State(CollectorConfig(distance_unit=unit))
        for seq, source in ((1, "train"), (2, "probe")):
            probs = rng.dirichlet(np_.ones(4), size=(3, 3)).astype(np_.float32)
            counts = np_.zeros((3, 3, 4), np_.uint32)
            counts[..., 0] = 2
            state.handle(Routing(run="warm-up", rank=0, sender="warm-up", seq=seq, wall_time=time.time(),
                                 source=source, step=seq, top_k=1, sample_ids=("a", "b", "c"),
                                 groups=("x", "y", "x"), token_counts_N=np_.full(3, 2, np_.uint32),
                                 mean_probs_NLE=probs, topk_counts_NLE=counts,
                                 entropy_NL=np_.full((3, 3), 0.5, np_.float32),
                                 adj_cosine_NL1=np_.full((3, 2), 0.5, np_.float32),
                                 loss_N=np_.ones(3, np_.float32) if source == "probe" else None))
    sym = np_.zeros(4, np_.int16)
    levenshtein(sym, 4, sym, 4, 5)
