"""Helpers of the agent-capture tests (tests/integration/test_agent_*.py): a tap on the routers' outputs,
the reference summaries, one training step, reading one routing message back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from reference import summaries
from tiny_models import VOCAB

import grokwatch.agent as gw
from grokwatch.agent.discover import discover
from grokwatch.wire import Routing


class RouterTap:
    """Independent capture of each router's own outputs (logits, indices), and of its weight as that forward
    used it (``weights``: the optimizer step that follows changes the parameter in place)."""

    def __init__(self, model):
        self.calls = []
        self.weights = []
        self.handles = [layer.router.register_forward_hook(self._hook(layer)) for layer in discover(model).layers]

    def _hook(self, layer):
        def hook(module, args, output):
            if torch.is_grad_enabled() or not module.training:
                self.calls.append((output[0].detach().double().cpu(), output[2].detach().cpu()))
                self.weights.append(layer.weight_now().detach().double().cpu().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def reference_summaries(logits_list, indices_list, mask_BS, rows, weights, distribution, top_k, num_experts):
    """METRICS.md Notation, §1-3 per sample, in float64 numpy (tests/reference.py), from the routers' own
    logits and indices: softmax, or for sigmoid routers the sigmoid scores over their sum."""
    B, S = mask_BS.shape
    weights = [w.double().numpy() for w in weights]
    out = []
    for r in rows:
        m = mask_BS[r].astype(bool)
        p_LTE, counts_LE = [], []
        for logits, idx in zip(logits_list, indices_list):
            x = logits.reshape(B, S, -1)[r][m].numpy()
            if distribution == "sigmoid":
                s = 1 / (1 + np.exp(-x))
                p_LTE.append(s / s.sum(-1, keepdims=True))
            else:
                e = np.exp(x - x.max(-1, keepdims=True))
                p_LTE.append(e / e.sum(-1, keepdims=True))
            counts_LE.append(np.bincount(idx.reshape(B, S, -1)[r][m].numpy().ravel(), minlength=num_experts))
        mean, counts, entropy, cosine = summaries(p_LTE, counts_LE, weights, num_experts)
        out.append(dict(tokens=int(m.sum()), mean=mean, counts=counts, entropy=entropy, cosine=cosine))
    return out


def check_against_reference(msg: Routing, ref: list[dict]):
    assert msg.num_samples == len(ref)
    for i, r in enumerate(ref):
        assert msg.token_counts_N[i] == r["tokens"]
        np.testing.assert_allclose(msg.mean_probs_NLE[i], r["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(msg.topk_counts_NLE[i], r["counts"])
        np.testing.assert_allclose(msg.entropy_NL[i], r["entropy"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(msg.adj_cosine_NJ[i], r["cosine"], rtol=1e-4, atol=1e-5)


def close_and_read_one(mon, tap, sink) -> Routing:
    """Close the monitor and the tap, then the one routing message the sink receives."""
    mon.close()
    tap.remove()
    [msg] = sink.wait_routing()
    return msg


def run_one_step(model, mon, input_ids, attention_mask=None, position_ids=None, ids=None, groups=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if ids is not None:
        mon.tag(ids, groups)
    kwargs = dict(input_ids=input_ids, labels=input_ids)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model(**kwargs)
    out.loss.backward()
    opt.step()
    opt.zero_grad()


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


def _train_and_collect(model, forward, sink, run, every, steps=7, pause_at=(), attach_to=None, **options):
    mon = gw.attach(model if attach_to is None else attach_to, sink.endpoint, run, every_n_steps=every,
                    max_samples_per_step=2, **options)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (2, 8), generator=gen)
        if step in pause_at:
            mon.pause()
        elif pause_at:
            mon.resume()
        mon.step(step)
        forward(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    stats = mon.stats()
    mon.close()
    forward(input_ids=ids, labels=ids)  # after close: compiled code may still call captured hooks
    return stats


def train_batches(model, loader) -> None:
    """SGD on each batch of a loader, called as model(**batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


class OneRouter(torch.nn.Module):
    """One manual-mode router whose scores mix the hidden state by ``activation`` (softmax or sigmoid)."""

    def __init__(self, activation):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.router = torch.nn.Linear(8, 4, bias=False)
        self.activation = activation
        self.mon = None

    def forward(self, input_ids):
        h = self.emb(input_ids)
        logits = self.router(h)
        self.mon.record(0, logits=logits)
        return (h * self.activation(logits).sum(-1, keepdim=True)).sum()


def _one_routing_message(sink, activation, run, **options):
    torch.manual_seed(0)
    model = OneRouter(activation)
    model.mon = gw.attach(model, sink.endpoint, run, num_layers=1, num_experts=4, top_k=2, every_n_steps=1, **options)
    model.mon.step(0)
    model(torch.randint(0, 16, (2, 5))).backward()
    model.mon.close()
    (msg,) = sink.wait_routing(1)
    return msg
