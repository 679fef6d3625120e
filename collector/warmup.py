"""Compiling (or loading from Numba's on-disk cache) the hot-path kernels before the first message, by
running tiny messages of each source through a throwaway state in both distance units, on both paths of
the kernel (alone, and with a message's pairs planned: collector/pairs.py). Its own module: it drives the
whole pipeline (collector/pipeline.py), which the kernels must not import.
"""

from __future__ import annotations

import time

import numpy as np

from grokwatch.collector import pairs, pipeline
from grokwatch.collector.config import CollectorConfig
from grokwatch.collector.edit_distance import levenshtein
from grokwatch.collector.state import State
from grokwatch.wire import FRESH_PREFIX, Routing, decode, encode


def warm_up() -> None:
    rng = np.random.default_rng(0)
    threshold = pairs.MIN_PARALLEL_WORK
    for unit in ("expert", "string"):
        for plan_all in (False, True):
            pairs.MIN_PARALLEL_WORK = 0 if plan_all else threshold
            try:
                _messages(State(CollectorConfig(distance_unit=unit, pair_threads=2)), rng)
            finally:
                pairs.MIN_PARALLEL_WORK = threshold
    sym = np.zeros(4, np.int16)
    levenshtein(sym, 4, sym, 4, 5)


def _messages(state: State, rng: np.random.Generator) -> None:
    """Train and probe messages, and a probe round with fresh documents (the transfer kernels, collector/
    transfer.py: compiled here, not in the middle of a run's first round)."""
    for seq, source, groups in ((1, "train", ("x", "y", "x", "y")), (2, "probe", ("x", "y", "x", "y")),
                                (3, "train", ("x", "y", "x", "y")),
                                (4, "probe", ("x", "x", FRESH_PREFIX + "x", FRESH_PREFIX + "x"))):
        n = len(groups)
        probs = rng.dirichlet(np.ones(4), size=(n, 3)).astype(np.float32)
        counts = np.zeros((n, 3, 4), np.uint32)
        counts[..., 0] = 2
        # through the wire, as every real message comes: decoded arrays are read-only, which Numba compiles
        # as types of their own (a message built here would warm up kernels no real message uses)
        pipeline.handle(state, wire_roundtrip(Routing(run="warm-up", rank=0, sender="warm-up", seq=seq, wall_time=time.time(),
                             source=source, step=seq, top_k=1, sample_ids=tuple(f"{seq}-{i}" for i in range(n)),
                             groups=groups, token_counts_N=np.full(n, 2, np.uint32),
                             mean_probs_NLE=probs, topk_counts_NLE=counts,
                             entropy_NL=np.full((n, 3), 0.5, np.float32),
                             adj_cosine_NJ=np.full((n, 2), 0.5, np.float32),
                             loss_N=np.ones(n, np.float32) if source == "probe" else None)))


def wire_roundtrip(message):
    return decode(encode(message))
