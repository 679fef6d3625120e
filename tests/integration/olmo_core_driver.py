"""Run by test_worked_examples.py in a subprocess whose path has OLMo-core (Makefile: frameworks).

examples/olmo_core_moe.py's hook on OLMo-core 3.0's own MoELinearRouter (softmax scores, top-k, its
load-balancing loss), in a small model of L residual layers, three training steps with every step
summarized. After each step the message's all-token counts must be the routers' own
``batch_size_per_expert``, and /metrics (a collector State) must show, per layer, the "load imbalance" its
``compute_metrics()`` logs (max / mean tokens per expert). One import is not OLMo-core's: ``cached_path``
(for checkpoints and remote files, which pulls in cloud SDKs) is a stub. Exit 0 and "ok" on success.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import torch
from torch import nn

B, S, D, E, K, L, V = 3, 5, 16, 8, 2, 3, 32


def stub_cached_path() -> None:
    pkg = types.ModuleType("cached_path")
    pkg.__path__ = []  # type: ignore[attr-defined]
    pkg.cached_path = lambda *a, **k: None  # type: ignore[attr-defined]
    schemes = types.ModuleType("cached_path.schemes")

    class SchemeClient:
        recoverable_errors = ()

    schemes.SchemeClient = schemes.S3Client = SchemeClient  # type: ignore[attr-defined]
    schemes.add_scheme_client = lambda *a, **k: None  # type: ignore[attr-defined]
    sys.modules.update({"cached_path": pkg, "cached_path.schemes": schemes})


class Model(nn.Module):
    def __init__(self, routers):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.routers = nn.ModuleList(routers)
        self.experts_LED = nn.Parameter(torch.randn(L, E, D) * 0.1)
        self.head = nn.Linear(D, V)

    def forward(self, ids_BS):
        h = self.embed(ids_BS)
        aux = 0.0
        for layer, router in enumerate(self.routers):
            weights_BSK, ids_BSK, _, lb = router(h)
            mixed = (weights_BSK[..., None] * self.experts_LED[layer][ids_BSK]).sum(-2)
            h = h + mixed
            aux = aux + (lb if lb is not None else 0.0)
        return self.head(h), aux


def main() -> int:
    stub_cached_path()
    from olmo_core.nn.moe.router import MoELinearRouter
    from olmo_core_moe import attach_olmo_core
    from sink import Sink

    from grokwatch.collector import pipeline
    from grokwatch.collector.config import CollectorConfig
    from grokwatch.collector.state import State
    from grokwatch.collector.view import build_view
    from grokwatch.wire import Hello

    torch.manual_seed(0)
    routers = [MoELinearRouter(d_model=D, num_experts=E, top_k=K, lb_loss_weight=0.01) for _ in range(L)]
    for r in routers:
        r.reset_parameters()
    model = Model(routers)
    sink = Sink()
    mon = attach_olmo_core(model, routers, sink.endpoint, "olmo", every_n_steps=1, max_samples_per_step=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    own_counts, own_imbalance = [], []
    for step in range(3):
        mon.step(step)
        ids = torch.randint(0, V, (B, S))
        logits, aux = model(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + aux
        loss.backward()
        opt.step()
        opt.zero_grad()
        own_counts.append(np.stack([r.batch_size_per_expert.numpy().copy() for r in routers]))
        own_imbalance.append([float(r.compute_metrics(reset=True)["load imbalance"][0]) for r in routers])
    stats = mon.stats()
    mon.close()
    sink.drain(until=lambda ms: len(sink.routing("train")) >= 3)
    messages = sink.routing("train")
    [hello] = [m for m in sink.messages if isinstance(m, Hello)]
    sink.close()
    assert stats["hook_errors"] == 0 and not stats["disabled"], stats
    assert [m.step for m in messages] == [0, 1, 2], [m.step for m in messages]
    state = State(CollectorConfig(window_samples=8, comparisons_per_sample=2), journal=lambda record: None)
    pipeline.handle(state, hello)
    for msg, counts, imbalance in zip(messages, own_counts, own_imbalance):
        assert msg.counted_forwards == 1 and msg.num_samples == 2
        assert (msg.expert_tokens_LE == counts).all(), (msg.expert_tokens_LE, counts)
        pipeline.handle(state, msg)
        view = {f.name: f for f in build_view(state)}
        for name in ("grokwatch_router_all_tokens_load_imbalance_ratio",  # the summed counts' (one rank: the same)
                     "grokwatch_router_all_tokens_rank_load_imbalance_max"):  # the worst rank's: OLMo-core's own
            shown = [float(s.value) for s in sorted(view[name].samples, key=lambda s: int(s.labels[1]))]
            assert np.allclose(shown, imbalance, rtol=1e-6), (name, shown, imbalance)
    print("ok", [round(x, 4) for x in own_imbalance[-1]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
