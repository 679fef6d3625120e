"""Worked example: grokwatch on torchtitan's MoE, whose router transformers' discovery does not know.

torchtitan 0.3.0's ``TokenChoiceTopKRouter.forward(x_BLD, expert_bias_E)`` returns
``(topk_scores_BLK, topk_expert_ids_BLK, scores_BLE)``: ``scores_BLE`` is the full
post-activation score (sigmoid or softmax, per ``score_func``) over all experts,
``topk_expert_ids_BLK`` the experts the layer really uses (chosen with the load-balancing
``expert_bias_E``, which only selects: the scores carry no bias). A forward hook on each
router hands both to ``mon.record``: ``probs=`` is scaled per token to sum to 1 on the
device (for sigmoid routers that is METRICS.md's routing distribution), ``topk=`` gives
the counts the exact decision, and the gate's weight [E, D] gives the adjacent-layer cosines.

    moe_layers = [block.moe for block in model.layers.values() if block.moe_enabled]  # forward order
    mon = attach_torchtitan(model, moe_layers, endpoint="tcp://127.0.0.1:5557", run="titan-a")
    ... train as usual: mon.step(step) each step (or let the optimizer hook count), mon.close() at the end

Run as a script, it trains a small stack of torchtitan's own MoE layers on CPU for a few
steps and streams to ``--endpoint`` (tests/integration/test_worked_examples.py runs it).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from torch import nn

import grokwatch.agent as gw


def attach_torchtitan(model: nn.Module, moe_layers: Sequence[nn.Module], endpoint: str | None = None,
                      run: str | None = None, **options) -> gw.Monitor:
    """Attach in manual mode and hook the router of each torchtitan ``MoE`` in ``moe_layers``
    (forward order). ``options`` go to ``gw.attach`` (every_n_steps, max_samples_per_step, ...)."""
    first = moe_layers[0].router
    # Named by their module paths: torchtitan keeps a layer's global index in its name under pipeline
    # parallelism (layers is a ModuleDict), so the collector tells the stages of one run apart.
    paths = {id(module): name for name, module in model.named_modules()}
    names = [paths.get(id(moe)) for moe in moe_layers]
    mon = gw.attach(model, endpoint, run, num_layers=len(moe_layers), num_experts=first.num_experts,
                    top_k=first.top_k, layer_names=None if None in names else names, **options)
    for i, moe in enumerate(moe_layers):
        def hook(router, args, output, i=i):
            topk_scores_BLK, topk_expert_ids_BLK, scores_BLE = output
            mon.record(i, probs=scores_BLE, topk=(topk_expert_ids_BLK, topk_scores_BLK),
                       router_weight=router.gate.weight)
        moe.router.register_forward_hook(hook)
    return mon


def build_stack(num_layers: int = 3, dim: int = 32, num_experts: int = 8, top_k: int = 2, vocab: int = 64,
                score_func: str = "sigmoid") -> nn.Module:
    """Token embedding, ``num_layers`` residual torchtitan ``MoE`` layers (its router, grouped experts
    and local token dispatcher), an LM head: torchtitan's own MoE classes without its attention,
    whose flex-attention backward does not run on CPU."""
    from functools import partial

    from torchtitan.models.common.config_utils import (make_moe_config, make_routed_experts_config,
                                                       make_router_config)

    normal = partial(nn.init.normal_, std=0.02)

    def moe():
        return make_moe_config(
            num_experts=num_experts,
            router=make_router_config(dim=dim, num_experts=num_experts, gate_param_init={"weight": normal},
                                      top_k=top_k, score_func=score_func, route_norm=True),
            routed_experts=make_routed_experts_config(
                dim=dim, hidden_dim=2 * dim, num_experts=num_experts, top_k=top_k, comm_backend="standard",
                param_init={name: normal for name in ("w1_EFD", "w2_EDF", "w3_EFD")}),
        ).build()

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.moes = nn.ModuleList(moe() for _ in range(num_layers))
            self.head = nn.Linear(dim, vocab)
            for layer in self.moes:
                layer.init_states()  # torchtitan builds its parameters uninitialized

        def forward(self, tokens_BL):
            h_BLD = self.embed(tokens_BL)
            for layer in self.moes:
                h_BLD = h_BLD + layer(h_BLD)
            return self.head(h_BLD)

    return Stack()


def main() -> int:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5557")
    parser.add_argument("--run", default="torchtitan-example")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_stack()
    mon = attach_torchtitan(model, list(model.moes), args.endpoint, args.run, every_n_steps=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        tokens = torch.randint(0, 64, (4, 16))
        mon.step(step)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(mon.stats())
    mon.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
