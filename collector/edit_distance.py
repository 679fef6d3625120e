"""METRICS.md §1's edit distance, bit-parallel: Myers' algorithm in Hyyrö's multi-word form, over
pathway symbols or their string form's characters. Numba kernels; ``reference.py`` holds the plain
version the tests compare against.

Shapes (docs/shapes.md): A alphabet, Q 64-bit words, Y pathway symbols, W window slots, P picks.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_ONE = np.uint64(1)
_ZERO = np.uint64(0)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_WORD = 64


@njit(cache=True, nogil=True)
def build_peq(a, length, alphabet, peq_AQ):
    """Match masks of pattern ``a`` for the bit-parallel edit distance:
    bit i of peq_AQ[c, i // 64] is set iff a[i] == c. Returns the words used."""
    words = (length + _WORD - 1) // _WORD
    for c in range(alphabet):
        for w in range(words):
            peq_AQ[c, w] = _ZERO
    for i in range(length):
        peq_AQ[a[i], i // _WORD] |= _ONE << np.uint64(i % _WORD)
    return words


@njit(cache=True, nogil=True)
def levenshtein_peq(peq_AQ, m, b, n, pv_Q, mv_Q):
    """METRICS.md §1 Levenshtein (unit costs) of pattern (given as ``peq_AQ``,
    length m) against ``b[:n]``: Myers' bit-vector algorithm in Hyyrö's
    multi-word form, O(ceil(m/64) * n). Rows below m in the last word are
    computed but never read, since carries only flow downwards."""
    if m == 0:
        return n
    if n == 0:
        return m
    words = (m + _WORD - 1) // _WORD
    for w in range(words):
        pv_Q[w] = _ALL
        mv_Q[w] = _ZERO
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
            eq = peq_AQ[c, w]
            pv = pv_Q[w]
            mv = mv_Q[w]
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
            pv_Q[w] = mh | (~(xv | ph))
            mv_Q[w] = ph & xv
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
def compare_to_window(a_Y, a_len, win_sym_WY, win_len_W, picks_P, alphabet, peq_AQ, pv_Q, mv_Q,
                      out_dist_P, out_norm_P):
    """Distances of one new pathway to the window pathways ``picks_P``:
    D (METRICS.md §1, in whatever unit the symbols are) and D / max length.
    ``peq_AQ`` needs ceil(S/64) words for the longest pattern."""
    build_peq(a_Y, a_len, alphabet, peq_AQ)
    for p in range(picks_P.shape[0]):
        slot = picks_P[p]
        b_len = win_len_W[slot]
        d = levenshtein_peq(peq_AQ, a_len, win_sym_WY[slot], b_len, pv_Q, mv_Q)
        out_dist_P[p] = d
        longest = max(a_len, b_len)
        out_norm_P[p] = d / longest if longest > 0 else 0.0
    return 0
