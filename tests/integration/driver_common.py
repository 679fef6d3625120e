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
        np.testing.assert_allclose(message.adj_cosine_NJ[n], cos, rtol=1e-4, atol=1e-5)
