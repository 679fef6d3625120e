"""Worked example: grokwatch on Megatron-Core's MoE, through a forward hook on each ``TopKRouter``.

Megatron-Core 0.16: ``TopKRouter.forward(hidden_SBH)`` returns ``(probs_TE, routing_map_TE)``,
T = S x B flattened **sequence-first** (token t is position t // B of row t % B: Megatron runs
[S, B, H]), ``probs_TE`` the top-k weights scattered into E columns (zero elsewhere; after any token
dropping), ``routing_map_TE`` the same choice as booleans. The full distribution is not exposed, so
the agent's distribution kind is ``topk``: METRICS.md's sparse top-k weights divided by their sum.
The hook puts the rows first ([B, S, E]) before handing them over; the top-k ids come from ``probs``
on the device (``routing_map.nonzero()`` would sync with the host).

    routers = [layer.mlp.router for layer in model.decoder.layers]  # the MoE layers, forward order
    mon = attach_megatron(model, routers, endpoint="tcp://127.0.0.1:5557", run="mcore-a")

With sequence or context parallelism each rank's router sees its own slice of the sequence: each rank
then summarizes the positions it routed (``record()`` takes S' positions per row).
tests/integration/test_worked_examples.py runs this hook on Megatron-Core's own TopKRouter on CPU.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

import grokwatch.agent as gw


def attach_megatron(model: nn.Module, routers: Sequence[nn.Module], endpoint: str | None = None,
                    run: str | None = None, **options) -> gw.Monitor:
    """Attach in manual mode and hook each Megatron-Core ``TopKRouter`` in ``routers`` (forward order).
    ``options`` go to ``gw.attach`` (every_n_steps, max_samples_per_step, ...)."""
    first = routers[0]
    # Under pipeline parallelism every stage's modules are numbered from 0, but the layer numbers that
    # Megatron gives the routers (1-based) are global: named by them, the stages of one run are told
    # apart by the collector (which refuses a second set of layers under one run name).
    numbers = [getattr(router, "layer_number", None) for router in routers]
    names = [f"decoder.layers.{n - 1}.mlp.router" for n in numbers] if None not in numbers else None
    mon = gw.attach(model, endpoint, run, num_layers=len(routers), num_experts=first.config.num_moe_experts,
                    top_k=first.topk, distribution="topk", layer_names=names, **options)
    for i, router in enumerate(routers):
        def hook(router, args, output, i=i):
            probs_TE, _routing_map_TE = output
            S, B = args[0].shape[:2]  # the router's input is [S, B, H]
            probs_BSE = probs_TE.view(S, B, -1).transpose(0, 1)
            ids_BSK = probs_BSE.topk(router.topk, dim=-1).indices
            mon.record(i, probs=probs_BSE, topk=(ids_BSK, probs_BSE.gather(-1, ids_BSK)),
                       router_weight=router.weight)
        router.register_forward_hook(hook)
    return mon
