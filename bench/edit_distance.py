"""The edit-distance kernel against rapidfuzz on the same pairs.

    python bench/edit_distance.py

Pathways of the OLMoE shape (L=16, E=64, tau=0.7) in the `expert` unit, one
pattern against m=16 window pathways — the collector's access pattern — for
peaked and near-uniform routing. Reports pairs/s for the Numba bit-parallel
kernel (match masks built once per pattern), rapidfuzz's
Levenshtein.distance in a loop, and rapidfuzz.process.cdist (1 worker).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from grokwatch.collector import kernels


def pathways(rng, n, concentration, L=16, E=64, tau=0.7):
    out = []
    sym = np.empty(L * (E + 1), np.int16)
    starts = np.empty(L + 1, np.int32)
    for _ in range(n):
        probs = rng.dirichlet(np.full(E, concentration), size=L).astype(np.float32)
        length = kernels.build_pathway(probs, tau, sym, starts)
        out.append(sym[:length].copy())
    return out


def best_of(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    rng = np.random.default_rng(0)
    m, patterns = 16, 200
    print(f"{'routing':<22} {'symbols':>7} {'numba pairs/s':>14} {'rapidfuzz loop':>15} {'rapidfuzz cdist':>16} "
          f"{'numba / best rf':>16}")
    for label, conc in (("peaked (paper-like)", 0.05), ("moderate", 0.3), ("near-uniform", 5.0)):
        paths = pathways(rng, patterns + m, conc)
        window = np.zeros((m, max(len(p) for p in paths)), np.int16)
        lens = np.zeros(m, np.int64)
        for j, p in enumerate(paths[patterns:]):
            window[j, : len(p)] = p
            lens[j] = len(p)
        picks = np.arange(m, dtype=np.int64)
        words = (window.shape[1] + 63) // 64 + 1
        peq = np.zeros((65, words), np.uint64)
        pv, mv = np.zeros(words, np.uint64), np.zeros(words, np.uint64)
        d, nd = np.zeros(m, np.int64), np.zeros(m)
        lists = [p.tolist() for p in paths]
        wl = lists[patterns:]

        def numba_run():
            for a in paths[:patterns]:
                kernels.compare_to_window(a, len(a), window, lens, picks, 65, peq, pv, mv, d, nd)

        def rf_loop():
            for a in lists[:patterns]:
                for b in wl:
                    Levenshtein.distance(a, b)

        def rf_cdist():
            cdist(lists[:patterns], wl, scorer=Levenshtein.distance, dtype=np.int32, workers=1)

        # Same answers first.
        kernels.compare_to_window(paths[0], len(paths[0]), window, lens, picks, 65, peq, pv, mv, d, nd)
        assert d.tolist() == [Levenshtein.distance(lists[0], b) for b in wl]
        pairs = patterns * m
        t_nb, t_loop, t_cd = best_of(numba_run), best_of(rf_loop), best_of(rf_cdist)
        print(f"{label:<22} {np.mean([len(p) for p in paths]):>7.0f} {pairs / t_nb:>14,.0f} {pairs / t_loop:>15,.0f} "
              f"{pairs / t_cd:>16,.0f} {min(t_loop, t_cd) / t_nb:>15.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
