"""Valid wire messages for tests, built the way an agent would build them."""

from __future__ import annotations

import time

import numpy as np

from grokwatch.wire import Eval, Heartbeat, Hello, Routing


def make_hello(*, run="run-a", rank=0, sender="s0", seq=0, num_layers=4, num_experts=8, top_k=2,
               distribution="softmax", has_cosines=True, world_size=1, layer_names=None, wandb_run=None) -> Hello:
    return Hello(run=run, rank=rank, sender=sender, seq=seq, wall_time=time.time(),
                 world_size=world_size, host="localhost", agent_version="0.1.0",
                 num_layers=num_layers, num_experts=num_experts, top_k=top_k,
                 distribution=distribution, has_cosines=has_cosines, layer_names=layer_names, wandb_run=wandb_run)


def routing_arrays(rng: np.random.Generator, n: int, num_layers: int, num_experts: int, top_k: int,
                   concentration: float = 1.0, max_tokens: int = 40):
    """Per-sample token-level routing reduced exactly as METRICS.md says."""
    tokens_N = rng.integers(1, max_tokens + 1, size=n)
    mean_probs_NLE = np.zeros((n, num_layers, num_experts), np.float64)
    topk_counts_NLE = np.zeros((n, num_layers, num_experts), np.uint32)
    entropy_NL = np.zeros((n, num_layers), np.float64)
    for i, t in enumerate(tokens_N):
        p_TLE = rng.dirichlet(np.full(num_experts, concentration), size=(t, num_layers))
        mean_probs_NLE[i] = p_TLE.mean(axis=0)
        top_TLK = np.argsort(-p_TLE, axis=2, kind="stable")[..., :top_k]
        for layer in range(num_layers):
            topk_counts_NLE[i, layer] = np.bincount(top_TLK[:, layer].ravel(), minlength=num_experts)
        h_TL = -(p_TLE * np.log(np.clip(p_TLE, 1e-30, None))).sum(axis=2)
        entropy_NL[i] = h_TL.mean(axis=0) / np.log(num_experts)
    return (tokens_N.astype(np.uint32), mean_probs_NLE.astype(np.float32), topk_counts_NLE,
            np.clip(entropy_NL, 0, 1).astype(np.float32))


def make_routing(*, rng=None, n=3, num_layers=4, num_experts=8, top_k=2, run="run-a", rank=0,
                 sender="s0", seq=1, step=10, source="train", groups=None, sample_ids=None,
                 cosines=True, loss=False, concentration=1.0) -> Routing:
    rng = rng if rng is not None else np.random.default_rng(0)
    tokens, probs, counts, entropy = routing_arrays(rng, n, num_layers, num_experts, top_k, concentration)
    return Routing(
        run=run, rank=rank, sender=sender, seq=seq, wall_time=time.time(), source=source,
        step=step, top_k=top_k,
        sample_ids=tuple(sample_ids or (f"sample-{i}" for i in range(n))),
        groups=tuple(groups or ("math",) * n),
        token_counts_N=tokens, mean_probs_NLE=probs, topk_counts_NLE=counts, entropy_NL=entropy,
        adj_cosine_NJ=rng.uniform(-1, 1, (n, num_layers - 1)).astype(np.float32) if cosines else None,
        loss_N=rng.uniform(0, 5, n).astype(np.float32) if loss else None,
    )


def make_eval(**kw) -> Eval:
    base = dict(run="run-a", rank=0, sender="s0", seq=2, wall_time=time.time(), step=10, scores={"math": 0.4})
    base.update(kw)
    return Eval(**base)


def make_heartbeat(**kw) -> Heartbeat:
    base = dict(run="run-a", rank=0, sender="s0", seq=3, wall_time=time.time(), messages_sent=5,
                messages_dropped={"queue_full": 2}, hook_errors=0)
    base.update(kw)
    return Heartbeat(**base)


def make_loss(**kw):
    from grokwatch.wire import Loss

    base = dict(run="run-a", rank=0, sender="s0", seq=4, wall_time=time.time(), step=10, losses={"math": 0.4})
    base.update(kw)
    return Loss(**base)
