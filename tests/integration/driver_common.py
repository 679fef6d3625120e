"""What the worked-example drivers (torchtitan_driver.py, megatron_driver.py) share: one gloo rank, the
messages a Sink (tests/sink.py) received, and the comparison of a routing message with a float64
reference."""

from __future__ import annotations

import os
import socket

import numpy as np
from sink import Sink

from grokwatch.wire import Routing


def init_one_gloo_rank() -> None:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1)


def received_routing(sink: Sink, count: int, timeout_s: float = 10.0) -> list[Routing]:
    """The routing messages ``sink`` receives until ``count`` (or ``timeout_s``); then it is closed."""
    sink.drain(timeout_s, until=lambda ms: sum(isinstance(m, Routing) for m in ms) >= count)
    sink.close()
    return sink.routing()


def check_against(message: Routing, rows: dict[str, int], tokens: int, reference) -> None:
    """Each sample of ``message`` (row ``rows[id]`` of the batch, ``tokens`` real tokens) against
    ``reference(row) -> (mean [L, E], counts [L, E], entropy [L], cosines [L-1])``."""
    for n, sample in enumerate(message.sample_ids):
        mean, counts, ent, cos = reference(rows[sample])
        assert message.token_counts_N[n] == tokens
        np.testing.assert_allclose(message.mean_probs_NLE[n], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(message.topk_counts_NLE[n], counts)
        np.testing.assert_allclose(message.entropy_NL[n], ent, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(message.adj_cosine_NL1[n], cos, rtol=1e-4, atol=1e-5)


def summaries(p_LTE, counts_LE, weights_LEH, num_experts: int):
    """METRICS.md §1-3 in float64 from one sample's per-layer distributions over its tokens, its top-k
    counts and the router weights: mean distribution, counts, mean entropy ratio per layer, and the
    cosines of the routing embeddings (mean @ W) between adjacent layers."""
    means = [p.mean(0) for p in p_LTE]
    ents = [(-(p * np.log(np.clip(p, 1e-30, None))).sum(-1) / np.log(num_experts)).mean() for p in p_LTE]
    embs = [m @ w for m, w in zip(means, weights_LEH)]
    cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(embs, embs[1:])]
    return np.stack(means), np.stack(counts_LE), np.array(ents), np.array(cos)
