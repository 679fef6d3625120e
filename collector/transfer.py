"""METRICS.md §6, live: the train–fresh routing discrepancy E and the fresh-loss gap, per group and round.

The agent's probe routes, in each round, the group's training samples and a few **fresh** documents of the
group that training has not seen (``Monitor.probe_fresh``), the latter under the label ``fresh@<group>``
(``wire.FRESH_PREFIX``: no phase, no cross-group baseline, no memorization). After each probe or replay
message, for every group it touched, the round so far (the window slots of that step) gives

* E = 2·D(train, fresh) − D(train, train) − D(fresh, fresh), every pair of distinct samples of the round, on
  normalized pathway distances (the ``expert`` unit whatever ``distance_unit`` is);
* the same E on the samples' mean routing distributions ḡ (Jensen–Shannon divergence in nats, averaged over
  layers; ``transfer_js``), from the round's ḡ rows (``RoundRouting``: the first ROUND_SAMPLES distinct
  sample ids of each label and round);
* each one's z-score against the permutation null (train/fresh labels shuffled among the round's samples);
* the fresh-loss gap: mean loss of the fresh documents − mean loss of the group's training samples, same
  round — the label-free baseline every routing metric must beat.

Each message of a round re-computes the round so far; the journal's last ``transfer`` record of a (group,
step) holds the whole round. Legend: S the round's samples, Y pathway symbols.
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import numpy as np
from numba import njit

from grokwatch.collector.edit_distance import build_peq, levenshtein_peq
from grokwatch.wire import FRESH_PREFIX

PERMUTATIONS = 200
MIN_SAMPLES = 2  # of each kind in the round
ROUND_SAMPLES = 64  # ḡ rows kept per label and round (RoundRouting): the first distinct ids


@njit(cache=True, nogil=True)
def normalized_matrix(sym_SY, len_S, alphabet):
    """D / max(|a|, |b|) for every pair of the S pathways (symmetric, zero diagonal)."""
    S = sym_SY.shape[0]
    words = (sym_SY.shape[1] + 63) // 64
    peq_AQ = np.zeros((alphabet, max(words, 1)), np.uint64)
    pv_Q = np.zeros(max(words, 1), np.uint64)
    mv_Q = np.zeros(max(words, 1), np.uint64)
    out = np.zeros((S, S))
    for i in range(S):
        if len_S[i] == 0:
            continue
        build_peq(sym_SY[i], len_S[i], alphabet, peq_AQ)
        for j in range(i + 1, S):
            longest = max(len_S[i], len_S[j])
            if longest == 0:
                continue
            d = levenshtein_peq(peq_AQ, len_S[i], sym_SY[j], len_S[j], pv_Q, mv_Q) if len_S[j] else len_S[i]
            out[i, j] = out[j, i] = d / longest
    return out


@njit(cache=True, nogil=True)
def js_matrix(g_SLE):
    """Jensen–Shannon divergence (nats) between the S samples' ḡ, averaged over layers (symmetric, zero
    diagonal). Each row is renormalized (float32 rows on the simplex up to rounding); 0·log 0 = 0."""
    S, L, E = g_SLE.shape
    P = np.empty((S, L, E))
    H = np.zeros((S, L))
    for i in range(S):
        for layer in range(L):
            total = 0.0
            for e in range(E):
                v = max(float(g_SLE[i, layer, e]), 0.0)
                P[i, layer, e] = v
                total += v
            for e in range(E):
                p = P[i, layer, e] / total if total > 0 else 1.0 / E
                P[i, layer, e] = p
                if p > 0:
                    H[i, layer] -= p * math.log(p)
    out = np.zeros((S, S))
    for i in range(S):
        for j in range(i + 1, S):
            acc = 0.0
            for layer in range(L):
                hm = 0.0
                for e in range(E):
                    m = 0.5 * (P[i, layer, e] + P[j, layer, e])
                    if m > 0:
                        hm -= m * math.log(m)
                acc += hm - 0.5 * (H[i, layer] + H[j, layer])
            out[i, j] = out[j, i] = max(acc / L, 0.0)
    return out


def _mean_offdiag(D: np.ndarray, idx: np.ndarray) -> float:
    n = len(idx)
    sub = D[np.ix_(idx, idx)]
    return float(sub.sum() / (n * (n - 1)))


def discrepancy(D: np.ndarray, train: np.ndarray, fresh: np.ndarray) -> float:
    """E = 2·D(train, fresh) − D(train, train) − D(fresh, fresh) over distinct pairs (zero diagonal)."""
    return (2 * float(D[np.ix_(train, fresh)].mean()) - _mean_offdiag(D, train) - _mean_offdiag(D, fresh))


def discrepancy_z(D: np.ndarray, n_train: int, rng: np.random.Generator, permutations: int = PERMUTATIONS):
    """E of the first ``n_train`` rows against the rest, and its permutation z-score."""
    S = D.shape[0]
    idx = np.arange(S)
    e = discrepancy(D, idx[:n_train], idx[n_train:])
    null = np.empty(permutations)
    for k in range(permutations):
        perm = rng.permutation(S)
        null[k] = discrepancy(D, perm[:n_train], perm[n_train:])
    sd = float(null.std(ddof=1))
    return e, ((e - float(null.mean())) / sd if sd > 0 else math.nan)


class RoundLosses:
    """Each label's loss sum and count in its current round (the probe's per-sample losses)."""

    def __init__(self):
        self.rounds: dict[str, tuple[int, float, int]] = {}  # label -> (step, sum, n)

    def add(self, label: str, step: int, loss: float) -> None:
        held = self.rounds.get(label)
        if held is None or held[0] != step:
            if held is not None and step < held[0]:
                return  # a late message of a closed round
            held = (step, 0.0, 0)
        if math.isfinite(loss):
            held = (step, held[1] + float(loss), held[2] + 1)
        self.rounds[label] = held

    def mean(self, label: str, step: int) -> Optional[float]:
        held = self.rounds.get(label)
        return held[1] / held[2] if held is not None and held[0] == step and held[2] else None


class RoundRouting:
    """Each label's ḡ rows in its current round: the first ROUND_SAMPLES distinct sample ids (bounded:
    ``nbytes_per_label``; a round's later rows and repeated ids are not kept)."""

    def __init__(self, num_layers: int, num_experts: int):
        self.shape = (ROUND_SAMPLES, num_layers, num_experts)
        self.rounds: dict[str, tuple[int, np.ndarray, list[int]]] = {}  # label -> (step, rows, sample keys)

    @staticmethod
    def nbytes_per_label(num_layers: int, num_experts: int) -> int:
        return ROUND_SAMPLES * num_layers * num_experts * 4 + ROUND_SAMPLES * 8

    def add(self, label: str, step: int, key: int, g_LE: np.ndarray) -> None:
        held = self.rounds.get(label)
        if held is not None and step < held[0]:
            return  # a late message of a closed round
        if held is None or held[0] != step:
            rows = held[1] if held is not None else np.zeros(self.shape, np.float32)
            held = (step, rows, [])
            self.rounds[label] = held
        _, rows, keys = held
        if len(keys) < ROUND_SAMPLES and key not in keys:
            rows[len(keys)] = g_LE
            keys.append(key)

    def rows(self, label: str, step: int) -> np.ndarray:
        held = self.rounds.get(label)
        if held is None or held[0] != step:
            return np.zeros((0,) + self.shape[1:], np.float32)
        return held[1][: len(held[2])]


def _with_z(e: float, z: float) -> tuple[float, Optional[float]]:
    return round(e, 6), None if not math.isfinite(z) else round(z, 4)


def round_transfer(stream, label: str, step: int, rng: np.random.Generator) -> Optional[dict]:
    """The transfer record of ``label`` at ``step`` from ``stream``'s windows (under its lock), or None
    while the round has fewer than MIN_SAMPLES training or fresh samples."""
    g, f = stream.index.get(label), stream.index.get(FRESH_PREFIX + label)
    if g is None or f is None:
        return None
    rows = []
    for h in (g, f):
        filled = int(stream.win_filled_G[h])
        slots = np.flatnonzero(stream.win_step_GW[h, :filled] == step)
        rows.append((h, slots))
    (_, tr), (_, fr) = rows
    if len(tr) < MIN_SAMPLES or len(fr) < MIN_SAMPLES:
        return None
    sym = np.concatenate([stream.win_sym_GWY[g, tr], stream.win_sym_GWY[f, fr]])
    lengths = np.concatenate([stream.win_len_GW[g, tr], stream.win_len_GW[f, fr]]).astype(np.int64)
    D = normalized_matrix(sym, lengths, stream.num_experts + 1)
    e, z = discrepancy_z(D, len(tr), rng)
    record: dict[str, Optional[float]] = {}
    record["transfer"], record["transfer_z"] = _with_z(e, z)
    routing = getattr(stream, "round_routing", None)
    g_tr = routing.rows(label, step) if routing is not None else None
    g_fr = routing.rows(FRESH_PREFIX + label, step) if routing is not None else None
    if g_tr is not None and g_fr is not None and len(g_tr) >= MIN_SAMPLES and len(g_fr) >= MIN_SAMPLES:
        # its own permutations (seeded by the round), so the stream's pair draws stay as they were
        own = np.random.default_rng([step & 0xFFFFFFFF, zlib.crc32(label.encode())])
        e_js, z_js = discrepancy_z(js_matrix(np.concatenate([g_tr, g_fr])), len(g_tr), own)
        record["transfer_js"], record["transfer_js_z"] = _with_z(e_js, z_js)
    else:
        record["transfer_js"] = record["transfer_js_z"] = None
    losses = getattr(stream, "round_losses", None)
    train_loss = losses.mean(label, step) if losses is not None else None
    fresh_loss = losses.mean(FRESH_PREFIX + label, step) if losses is not None else None
    return dict(record, transfer_train=int(len(tr)), transfer_fresh=int(len(fr)),
                train_loss=None if train_loss is None else round(train_loss, 6),
                fresh_loss=None if fresh_loss is None else round(fresh_loss, 6),
                fresh_loss_gap=None if train_loss is None or fresh_loss is None else round(fresh_loss - train_loss, 6))
