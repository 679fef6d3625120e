"""Run by test_worked_examples.py in a subprocess whose path has torchtitan (Makefile: frameworks).

examples/torchtitan_moe.py's hooks on a stack of torchtitan's own MoE layers (sigmoid routers with a
nonzero selection-only expert bias, as DeepSeek-V3 trains): one training step, 2 of 3 rows sampled by
their tags; the message a PULL socket receives must equal a float64 reference (METRICS.md §1-3)
computed from what each router returned, captured by an independent hook. ``--fsdp``: each layer and
the stack under FSDP2 (``fully_shard``, one gloo rank), as torchtitan trains; the gate weight the hook
passes is freed when its layer reshards, so the first message has no cosines and the next has those
of the full weights. ``--compile``: each MoE layer compiled in place before the hooks are added
(torchtitan's way; aot_eager), so record() runs from traced code. Exit 0 and "ok" on success.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from grokwatch.wire import Hello
from driver_common import check_against, init_one_gloo_rank, received_routing
from reference import summaries
from sink import Sink
from torch import nn
from torchtitan_moe import attach_torchtitan, build_stack

B, L, E, K = 3, 12, 8, 2


def reference(tap, weights, row):
    """The row's distribution: scores / their sum; its counts: the router's own ids."""
    p_LTE = [scores_BLE[row] / scores_BLE[row].sum(-1, keepdims=True) for scores_BLE, _ in tap]
    counts_LE = [np.bincount(ids_BLK[row].ravel(), minlength=E) for _, ids_BLK in tap]
    return summaries(p_LTE, counts_LE, weights, E)


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    init_one_gloo_rank()
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.moes:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def main(fsdp: bool) -> int:
    torch.manual_seed(0)
    model = build_stack(num_layers=3, num_experts=E, top_k=K, score_func="sigmoid")
    for layer in model.moes:
        layer.expert_bias_E.copy_(torch.randn(E) * 0.5)  # selection differs from top-k of the scores
    if fsdp:
        shard(model)
    if "--compile" in sys.argv:
        for layer in model.moes:
            layer.compile(backend="aot_eager")
    tap = []
    for layer in model.moes:
        layer.router.register_forward_hook(
            lambda m, a, out: tap.append((out[2].detach().double().numpy(), out[1].detach().numpy())))

    sink = Sink()
    mon = attach_torchtitan(model, list(model.moes), sink.endpoint, "titan",
                            every_n_steps=1, max_samples_per_step=2)
    weights = [layer.router.gate.weight for layer in model.moes]
    weights = [(w.full_tensor() if fsdp else w).detach().double().numpy().copy() for w in weights]
    tokens = torch.randint(0, 64, (B, L))
    steps = 2 if fsdp else 1
    for step in range(steps):  # no optimizer: the weights stay those of the reference
        tap.clear()
        mon.step(step)
        mon.tag(sample_ids=["a", "b", "c"], groups=["x", "y", "x"])
        loss = nn.functional.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    stats = mon.stats()
    mon.close()

    messages = received_routing(sink, steps)
    if fsdp:
        torch.distributed.destroy_process_group()

    assert stats["hook_errors"] == 0 and not stats["disabled"], stats
    assert len(messages) == steps, f"{len(messages)} routing messages received; {stats}"
    if fsdp:
        assert messages[0].adj_cosine_NJ is None  # the weights were freed before the reduction
    message = messages[-1]
    assert len(tap) == 3
    chosen = [np.sort(np.argsort(-(s + b.numpy()), -1)[..., :K], -1) for (s, _), b in
              zip(tap, (layer.expert_bias_E.double() for layer in model.moes))]
    assert all((np.sort(ids, -1) == c).all() for (_, ids), c in zip(tap, chosen))  # the bias selects
    assert any((np.sort(ids, -1) != np.sort(np.argsort(-s, -1)[..., :K], -1)).any() for s, ids in tap)
    assert message.num_samples == 2 and message.top_k == K
    [hello] = [m for m in sink.messages if isinstance(m, Hello)]
    assert hello.layer_names == tuple(f"moes.{i}" for i in range(len(model.moes))), hello.layer_names
    rows = {"a": 0, "b": 1, "c": 2}
    assert list(message.groups) == [["x", "y", "x"][rows[i]] for i in message.sample_ids]
    check_against(message, rows, L, lambda row: reference(tap, weights, row))
    print("ok", list(message.sample_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main(fsdp="--fsdp" in sys.argv))
