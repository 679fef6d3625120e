"""Synthetic routing summaries of the OLMoE-1B-7B shape for collector benchmarks."""

from __future__ import annotations

import time

import numpy as np

from grokwatch.wire import Routing, decode

OLMOE = dict(num_layers=16, num_experts=64, top_k=8)


def routing_message(rng, *, n=64, num_layers=16, num_experts=64, top_k=8, concentration=0.05, seq=1, step=0,
                    groups=("math", "code", "chem", "common"), tokens=512) -> Routing:
    """Mean routing weights drawn per sample and layer from a Dirichlet; ``concentration``
    sets how peaked they are (0.05: about 6-10 experts reach tau=0.7, like the paper's
    OLMoE pathways; 5.0: near-uniform, the worst case, about 40 experts per layer)."""
    probs = rng.dirichlet(np.full(num_experts, concentration), size=(n, num_layers)).astype(np.float32)
    probs /= probs.sum(axis=2, keepdims=True)
    counts = np.zeros((n, num_layers, num_experts), np.uint32)
    top = np.argsort(-probs, axis=2)[..., :top_k]
    np.put_along_axis(counts, top, tokens, axis=2)
    return Routing(run="bench", rank=0, sender="bench", seq=seq, wall_time=time.time(), source="train", step=step,
                   top_k=top_k, sample_ids=tuple(f"s{seq}-{i}" for i in range(n)),
                   groups=tuple(groups[i % len(groups)] for i in range(n)),
                   token_counts_N=np.full(n, tokens, np.uint32), mean_probs_NLE=probs, topk_counts_NLE=counts,
                   entropy_NL=rng.uniform(0.5, 0.9, (n, num_layers)).astype(np.float32),
                   adj_cosine_NJ=rng.uniform(0.1, 0.9, (n, num_layers - 1)).astype(np.float32))


def fresh(data: bytes, seq: int) -> Routing:
    """An encoded message decoded as the sender "bench"'s message ``seq``: the same payload under fresh
    sequence numbers and sample ids (a sample is never compared with its own earlier copy, METRICS.md §1),
    so that a benchmark can apply one pool of messages over and over."""
    msg = decode(data)
    assert isinstance(msg, Routing)
    object.__setattr__(msg, "seq", seq)
    object.__setattr__(msg, "sender", "bench")
    object.__setattr__(msg, "sample_ids", tuple(f"{seq}-{i}" for i in range(len(msg.sample_ids))))
    return msg
