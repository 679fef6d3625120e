"""Worked example: grokwatch on OLMo-core's MoE, through a forward hook on each ``MoERouter``.

OLMo-core 3.0: ``MoERouter.forward(x_BSD)`` returns ``(expert_weights_BSK, expert_indices_BSK,
batch_size_per_expert_E, aux_loss)`` — the top-k weights and ids of every token, rows first, and the
router's own tokens per expert, which it also adds into ``router.batch_size_per_expert`` for its
``compute_metrics()`` ("load imbalance" = max / mean of it). The full distribution is not returned, so the
agent's distribution kind is ``topk`` (METRICS.md's sparse top-k weights divided by their sum), and the
hook hands over the ids and weights as they are (no copy, no host sync).

    routers = [block.feed_forward_moe.router for block in model.blocks.values()]  # forward order
    mon = attach_olmo_core(model, routers, endpoint="tcp://127.0.0.1:5557", run="olmo-a")

tests/integration/test_worked_examples.py runs this hook on OLMo-core's own MoELinearRouter on CPU and
checks that the agent's all-token counts are the router's ``batch_size_per_expert`` and that /metrics
shows the load imbalance its ``compute_metrics()`` logs, step by step.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

import grokwatch.agent as gw


def attach_olmo_core(model: nn.Module, routers: Sequence[nn.Module], endpoint: str | None = None,
                     run: str | None = None, **options) -> gw.Monitor:
    """Attach in manual mode and hook each OLMo-core ``MoERouter`` in ``routers`` (forward order).
    ``options`` go to ``gw.attach`` (every_n_steps, max_samples_per_step, ...)."""
    first = routers[0]
    mon = gw.attach(model, endpoint, run, num_layers=len(routers), num_experts=first.num_experts,
                    top_k=first.top_k, distribution="topk", **options)
    for i, router in enumerate(routers):
        weight = getattr(router, "weight", None)  # MoELinearRouter: [E * D], viewed [E, D] for its logits
        weight_ED = weight.view(router.num_experts, -1) if weight is not None else None

        def hook(router, args, output, i=i, weight_ED=weight_ED):
            weights_BSK, ids_BSK = output[0], output[1]
            mon.record(i, topk=(ids_BSK, weights_BSK), router_weight=weight_ED)
        router.register_forward_hook(hook)
    return mon
