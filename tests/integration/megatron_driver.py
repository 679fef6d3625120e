"""Run by test_worked_examples.py in a subprocess whose path has megatron-core (Makefile: frameworks).

examples/megatron_moe.py's hook on Megatron-Core 0.16.1's own TopKRouter (its routing: score
function, top-k, output layout), in a small model that runs [S, B, H] as Megatron does. One line is
not Megatron's: ``gating``, whose 0.16.1 body moves the weight to the current CUDA device and calls
Transformer Engine's GEMM, is the same product by ``F.linear``. One training step, 2 of 3 rows sampled
by their tags; the message must equal a float64 reference (METRICS.md §1-3, top-k weights) from
what each router returned, captured by an independent hook. Exit 0 and "ok" on success.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import zmq
from megatron_moe import attach_megatron
from torch import nn

from grokwatch.wire import Routing, decode

B, S, H, E, K, L, V = 3, 5, 16, 8, 2, 3, 32


def make_router(config, groups):
    from megatron.core.transformer.moe.router import TopKRouter

    class CPUGatingTopKRouter(TopKRouter):
        def gating(self, input):
            return nn.functional.linear(input, self.weight.to(input.dtype))

    return CPUGatingTopKRouter(config, pg_collection=groups)


class SequenceFirst(nn.Module):
    """Embedding, L residual layers mixing E expert vectors by the router's top-k weights, LM head."""

    def __init__(self, routers):
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.routers = nn.ModuleList(routers)
        self.experts_LEH = nn.Parameter(torch.randn(L, E, H) * 0.1)
        self.head = nn.Linear(H, V)

    def forward(self, input_ids_BS):
        h_SBH = self.embed(input_ids_BS).transpose(0, 1)
        for layer, router in enumerate(self.routers):
            probs_TE, _ = router(h_SBH)
            h_SBH = h_SBH + probs_TE.view(S, B, E) @ self.experts_LEH[layer]
        return self.head(h_SBH.transpose(0, 1))


def reference(tap, weights, row):
    """Per layer: mean of the row's normalized top-k weights, counts of its routing map, mean entropy
    ratio; cosines of the routing embeddings mean @ W between adjacent layers."""
    means, counts, ents, embs = [], [], [], []
    for (probs_TE, map_TE), w_EH in zip(tap, weights):
        tokens = [s * B + row for s in range(S)]  # sequence-first
        p = probs_TE[tokens] / probs_TE[tokens].sum(-1, keepdims=True)
        means.append(p.mean(0))
        counts.append(map_TE[tokens].sum(0))
        ents.append((-(p * np.log(np.clip(p, 1e-30, None))).sum(-1) / math.log(E)).mean())
        embs.append(p.mean(0) @ w_EH)
    cos = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(embs, embs[1:])]
    return np.stack(means), np.stack(counts), np.array(ents), np.array(cos)


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    world = dist.group.WORLD
    groups = ProcessGroupCollection(tp=world, cp=world, tp_cp=world, tp_dp_cp=world)
    config = TransformerConfig(num_layers=L, hidden_size=H, num_attention_heads=2, num_moe_experts=E,
                               moe_router_topk=K, use_cpu_initialization=True)
    model = SequenceFirst([make_router(config, groups) for _ in range(L)])
    tap = []
    for router in model.routers:
        router.register_forward_hook(
            lambda m, a, out: tap.append((out[0].detach().double().numpy(), out[1].detach().numpy())))

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind("tcp://127.0.0.1:0")
    mon = attach_megatron(model, list(model.routers), pull.getsockopt_string(zmq.LAST_ENDPOINT), "mcore",
                          every_n_steps=1, max_samples_per_step=2)
    weights = [router.weight.detach().double().numpy().copy() for router in model.routers]
    tokens = torch.randint(0, V, (B, S))
    mon.step(0)
    mon.tag(sample_ids=["a", "b", "c"], groups=["x", "y", "x"])
    loss = nn.functional.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    stats = mon.stats()
    mon.close()

    message = None
    deadline = time.monotonic() + 10
    while message is None and time.monotonic() < deadline:
        if pull.poll(100):
            decoded = decode(pull.recv())
            message = decoded if isinstance(decoded, Routing) else None
    pull.close(0)
    ctx.term()
    dist.destroy_process_group()

    assert stats["hook_errors"] == 0 and not stats["disabled"], stats
    assert message is not None, f"no routing message received; {stats}"
    assert len(tap) == L and all(probs.shape == (S * B, E) for probs, _ in tap)
    assert all(((probs > 0) == routing_map).all() for probs, routing_map in tap)  # zero outside the top-k
    assert message.num_samples == 2 and message.top_k == K
    rows = {"a": 0, "b": 1, "c": 2}
    for n, sample in enumerate(message.sample_ids):
        mean, counts, ent, cos = reference(tap, weights, rows[sample])
        assert message.token_counts_N[n] == S
        np.testing.assert_allclose(message.mean_probs_NLE[n], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(message.topk_counts_NLE[n], counts)
        np.testing.assert_allclose(message.entropy_NL[n], ent, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(message.adj_cosine_NL1[n], cos, rtol=1e-4, atol=1e-5)
    print("ok", list(message.sample_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
