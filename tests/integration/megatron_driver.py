"""Run by test_worked_examples.py in a subprocess whose path has megatron-core (Makefile: frameworks).

examples/megatron_moe.py's hook on Megatron-Core 0.16.1's own TopKRouter (its routing: score
function, top-k, output layout), in a small model that runs [S, B, H] as Megatron does. One line is
not Megatron's: ``gating``, whose 0.16.1 body moves the weight to the current CUDA device and calls
Transformer Engine's GEMM, is the same product by ``F.linear``. One training step, 2 of 3 rows sampled
by their tags; the message must equal a float64 reference (METRICS.md §1-3, top-k weights) from
what each router returned, captured by an independent hook. Exit 0 and "ok" on success.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
from driver_common import check_against, init_one_gloo_rank, received_routing
from megatron_moe import attach_megatron
from reference import summaries
from sink import Sink
from torch import nn

from grokwatch.wire import Hello

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
    """The row's tokens, sequence-first: t = s * B + row; its distribution: the top-k weights / their sum;
    its counts: the routing map's."""
    tokens = [s * B + row for s in range(S)]
    p_LTE = [probs_TE[tokens] / probs_TE[tokens].sum(-1, keepdims=True) for probs_TE, _ in tap]
    counts_LE = [map_TE[tokens].sum(0) for _, map_TE in tap]
    return summaries(p_LTE, counts_LE, weights, E)


def main(argv: list[str]) -> int:
    """``capacity``: routers with Megatron-Core's token dropping (moe_expert_capacity_factor 0.5: about half the
    picks are dropped after the choice); the dropped picks must be shipped as such, not counted for an expert."""
    capacity = "capacity" in argv
    init_one_gloo_rank()
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    world = dist.group.WORLD
    groups = ProcessGroupCollection(tp=world, cp=world, tp_cp=world, tp_dp_cp=world)
    config = TransformerConfig(num_layers=L, hidden_size=H, num_attention_heads=2, num_moe_experts=E,
                               moe_router_topk=K, use_cpu_initialization=True,
                               moe_expert_capacity_factor=0.5 if capacity else None)
    model = SequenceFirst([make_router(config, groups) for _ in range(L)])
    tap = []
    for router in model.routers:
        router.register_forward_hook(
            lambda m, a, out: tap.append((out[0].detach().double().numpy(), out[1].detach().numpy())))

    for i, router in enumerate(model.routers):  # as TransformerLayer does: here, the second of two stages
        router.set_layer_number(L + 1 + i)
    sink = Sink()
    mon = attach_megatron(model, list(model.routers), sink.endpoint, "mcore",
                          every_n_steps=1, max_samples_per_step=2)
    weights = [router.weight.detach().double().numpy().copy() for router in model.routers]
    tokens = torch.randint(0, V, (B, S))
    mon.step(0)
    mon.tag(sample_ids=["a", "b", "c"], groups=["x", "y", "x"])
    loss = nn.functional.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    stats = mon.stats()
    mon.close()

    [message] = received_routing(sink, 1) or [None]
    dist.destroy_process_group()

    assert stats["hook_errors"] == 0 and not stats["disabled"], stats
    assert message is not None, f"no routing message received; {stats}"
    assert len(tap) == L and all(probs.shape == (S * B, E) for probs, _ in tap)
    assert all(((probs > 0) == routing_map).all() for probs, routing_map in tap)  # zero outside the top-k
    assert message.num_samples == 2 and message.top_k == K
    [hello] = [m for m in sink.messages if isinstance(m, Hello)]
    assert hello.layer_names == tuple(f"decoder.layers.{L + i}.mlp.router" for i in range(L)), hello.layer_names
    if not capacity:
        check_against(message, {"a": 0, "b": 1, "c": 2}, S, lambda row: reference(tap, weights, row))
    else:  # a dropped token has no weights: a sample's mean is over its routed tokens (and on the simplex)
        for i, sample in enumerate(message.sample_ids):
            row = {"a": 0, "b": 1, "c": 2}[sample]
            for layer, (probs_TE, _) in enumerate(tap):
                p_SE = probs_TE[[s * B + row for s in range(S)]]
                routed = p_SE[p_SE.sum(axis=1) > 0]
                want = (routed / routed.sum(axis=1, keepdims=True)).mean(axis=0) if len(routed) else np.full(E, 1 / E)
                np.testing.assert_allclose(message.mean_probs_NLE[i, layer], want, atol=1e-5)
    # the all-token counts are Megatron-Core's own tokens per expert (router.py: routing_map.sum(dim=0), what
    # it adds into local_tokens_per_expert), over all B x S tokens, not the two sampled rows
    megatron_LE = np.stack([routing_map.sum(axis=0) for _, routing_map in tap])
    assert message.counted_forwards == 1, message.counted_forwards
    assert (message.expert_tokens_LE == megatron_LE).all(), (message.expert_tokens_LE, megatron_LE)
    # the picks Megatron's router dropped (apply_router_token_dropping): every token's K picks minus those kept
    dropped_L = S * B * K - megatron_LE.sum(axis=1)
    assert (message.dropped_picks_L == dropped_L).all(), (message.dropped_picks_L, dropped_L)
    assert (dropped_L > 0).all() if capacity else (dropped_L == 0).all(), dropped_L
    # ... and what /metrics then shows is the imbalance of Megatron's own counts (max / mean tokens per expert)
    from grokwatch.collector import pipeline
    from grokwatch.collector.config import CollectorConfig
    from grokwatch.collector.state import State
    from grokwatch.collector.view import build_view

    state = State(CollectorConfig(window_samples=8, comparisons_per_sample=2), journal=lambda record: None)
    pipeline.handle(state, hello)
    pipeline.handle(state, message)
    [imbalance] = [f for f in build_view(state) if f.name == "grokwatch_router_all_tokens_load_imbalance_ratio"]
    shown = {int(s.labels[1]): float(s.value) for s in imbalance.samples}
    want = megatron_LE.max(axis=1) / megatron_LE.mean(axis=1)
    assert shown == {layer: float(want[layer]) for layer in range(L)}, (shown, want)
    [fraction] = [f for f in build_view(state) if f.name == "grokwatch_router_all_tokens_dropped_pick_fraction"]
    shown = {int(s.labels[1]): float(s.value) for s in fraction.samples}
    assert shown == {layer: float(dropped_L[layer] / (S * B * K)) for layer in range(L)}, (shown, dropped_L)
    print("ok", list(message.sample_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
