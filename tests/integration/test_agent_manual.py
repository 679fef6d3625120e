"""The agent on routers it records by hand or discovers from unusual shapes: hand-written MoEs, routers
without indices, unlike or freed router weights, router z-loss, the layer names of the hello."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from capture import (
    RouterTap,
    _one_routing_message,
    check_against_reference,
    reference_summaries,
    run_one_step,
)
from tiny_models import VOCAB, tiny_model

import grokwatch.agent as gw
from grokwatch.agent.discover import discover
from grokwatch.wire import Hello


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_manual_record_for_a_hand_written_moe(compiled, sink):
    """Layer 1 routes only the last position of each row (a different shape
    from layers 0 and 2, so it is reduced in a batch of its own). Compiled
    (torchtitan's way), record() runs inside traced code: it must hand the
    compiler an opaque call, not be traced."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)

    class TinyMoE(torch.nn.Module):
        def __init__(self, layers=3, experts=4, hidden=8):
            super().__init__()
            self.emb = torch.nn.Embedding(16, hidden)
            self.routers = torch.nn.ModuleList(torch.nn.Linear(hidden, experts, bias=False) for _ in range(layers))
            self.mon = None
            self.seen = []

        def forward(self, input_ids):
            h = self.emb(input_ids)
            for i, router in enumerate(self.routers):
                logits = router(h[:, -1:] if i == 1 else h)
                self.seen.append(logits.detach().double())
                if self.mon is not None:
                    self.mon.record(i, logits=logits, router_weight=router.weight)
                h = h + torch.softmax(logits, -1).sum(-1, keepdim=True) * h
            return h.sum()

    model = TinyMoE()
    mon = gw.attach(model, sink.endpoint, "manual", num_layers=3, num_experts=4, top_k=1, every_n_steps=2)
    model.mon = mon
    forward = torch.compile(model, backend="eager") if compiled else model
    for step in range(3):
        mon.step(step)
        model.seen.clear()
        forward(torch.randint(0, 16, (2, 5))).backward()
    mon.close()
    torch._dynamo.reset()
    assert [m.step for m in sink.wait_routing(2)] == [0, 2]
    msg = sink.routing()[-1]
    assert msg.mean_probs_NLE.shape == (2, 3, 4)
    assert msg.topk_counts_NLE.sum(axis=2).tolist() == [[5, 1, 5], [5, 1, 5]]
    means = torch.stack([torch.softmax(x, -1).mean(dim=1) for x in model.seen], dim=1)  # [N, L, E]
    np.testing.assert_allclose(msg.mean_probs_NLE, means.numpy(), rtol=1e-5, atol=1e-6)
    emb = torch.stack([means[:, i] @ r.weight.detach().double() for i, r in enumerate(model.routers)], dim=1)
    cos = torch.nn.functional.cosine_similarity(emb[:, :-1], emb[:, 1:], dim=-1)
    np.testing.assert_allclose(msg.adj_cosine_NJ, cos.numpy(), rtol=1e-4, atol=1e-5)
    # The router z-loss: the mean over each sample's tokens of logsumexp(logits)² (ST-MoE), per layer.
    zloss = torch.stack([torch.logsumexp(x, -1).square().mean(dim=1) for x in model.seen], dim=1)  # [N, L]
    np.testing.assert_allclose(msg.zloss_NL, zloss.numpy(), rtol=1e-5, atol=1e-6)


def test_no_router_zloss_is_sent_for_scores_that_are_not_softmax_logits(sink):
    """Sigmoid scores (DeepSeek-V3's router) have no logsumexp: the message carries no z-loss, not a wrong one."""
    msg = _one_routing_message(sink, torch.sigmoid, "sigmoid", distribution="sigmoid")
    assert msg.zloss_NL is None and msg.mean_probs_NLE.shape == (2, 1, 4)


def test_a_process_whose_default_dtype_is_bfloat16_gets_float32_summaries(sink):
    """Some training scripts set torch.set_default_dtype(torch.bfloat16) to build their model. The agent's
    own buffers name their dtype: record(topk=...) must not fail on a bf16 scratch tensor, and the token
    weights of a layer that routes only some positions must stay float32."""
    torch.manual_seed(0)

    class TwoRouters(torch.nn.Module):  # float32, built before the default changes
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.routers = torch.nn.ModuleList(torch.nn.Linear(8, 4, bias=False) for _ in range(2))
            self.mon, self.seen = None, []

        def forward(self, input_ids):
            h = self.emb(input_ids)
            top = torch.softmax(self.routers[0](h), -1).topk(2, dim=-1)  # layer 0: ids and weights only
            self.mon.record(0, topk=(top.indices, top.values))
            last = self.routers[1](h[:, -1:])  # layer 1: only the last position of each row
            self.mon.record(1, logits=last)
            self.seen = [top, torch.softmax(last.detach().double(), -1)]
            return (top.values.sum() + last.sum()).float()

    model = TwoRouters()
    mon = model.mon = gw.attach(model, sink.endpoint, "bf16-default", num_layers=2, num_experts=4, top_k=2,
                                every_n_steps=1)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        model(torch.randint(0, 16, (2, 5))).backward()
    finally:
        torch.set_default_dtype(previous)
    stats = mon.stats()
    mon.close()
    assert stats["hook_errors"] == 0, stats
    [msg] = sink.wait_routing()
    assert msg.topk_counts_NLE[:, 0].sum(axis=1).tolist() == [10, 10]
    top, last = model.seen
    dense = torch.zeros(2, 5, 4, dtype=torch.float64).scatter_(2, top.indices, top.values.detach().double())
    expected0 = (dense / dense.sum(-1, keepdim=True)).mean(dim=1)
    np.testing.assert_allclose(msg.mean_probs_NLE[:, 0], expected0.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(msg.mean_probs_NLE[:, 1], last[:, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_a_recorded_router_weight_freed_before_the_reduction_is_copied_from_then_on(sink, caplog):
    """FSDP frees a layer's unsharded weights when it reshards after the layer ran, before the reduction at
    the end of the forward. The first such message carries no cosines (and no error), never stale ones;
    from then on record() keeps a copy of the freed layer's weight, and the cosines are those of the
    weights of that forward."""
    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.routers = torch.nn.ModuleList(torch.nn.Linear(4, 3, bias=False) for _ in range(2))
            self.seen = []

        def forward(self, x_BSH):
            for i, router in enumerate(self.routers):
                weight = router.weight.detach().clone()  # what unsharding makes, each forward
                logits = router(x_BSH)
                self.seen.append((logits.detach().double(), weight.double().clone()))
                self.mon.record(i, logits=logits, router_weight=weight)
                if i == 0:
                    weight.untyped_storage().resize_(0)  # what resharding does to the unsharded copy
            return x_BSH.sum()

    model = TwoLayers()
    mon = model.mon = gw.attach(model, sink.endpoint, "freed", num_layers=2, num_experts=3, top_k=1,
                                every_n_steps=1)
    with caplog.at_level("INFO", logger="grokwatch"):
        for step in range(3):
            mon.step(step)
            with torch.no_grad():
                model.routers[0].weight.add_(0.5)  # the weights move between steps
            model(torch.randn(1, 3, 4, requires_grad=True))
    stats = mon.stats()
    mon.close()
    first, *later = sink.wait_routing(3)
    assert stats["hook_errors"] == 0
    assert first.adj_cosine_NJ is None
    assert sum("freed before the reduction" in r.getMessage() for r in caplog.records) == 1
    for step, msg in enumerate(later, start=1):
        (l0, w0), (l1, w1) = model.seen[2 * step:2 * step + 2]
        emb = [torch.softmax(logits, -1).mean(dim=(0, 1)) @ w for logits, w in ((l0, w0), (l1, w1))]
        expected = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0).item()
        np.testing.assert_allclose(msg.adj_cosine_NJ[0, 0], expected, rtol=1e-4, atol=1e-5)


def test_the_hello_names_the_moe_layers_so_pipeline_stages_can_be_told_apart(sink):
    """Found layers are named by their modules; in manual mode by ``layer_names`` (Megatron's pipeline
    stages number their layers locally, so the caller gives the global numbers), else not at all.
    layer_names in auto mode, or not one distinct name per layer, is refused at attach()."""
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "named", every_n_steps=1)
    mon.close()
    names = [f"model.layers.{i}.mlp.gate" for i in range(model.config.num_hidden_layers)]
    stage = ["decoder.layers.4.mlp.router", "decoder.layers.5.mlp.router"]
    manual = gw.attach(model, sink.endpoint, "named-manual", num_layers=2, num_experts=8, top_k=2, layer_names=stage)
    manual.close()
    anonymous = gw.attach(model, sink.endpoint, "anonymous", num_layers=2, num_experts=8, top_k=2)
    anonymous.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Hello)]) >= 3)
    hellos = {m.run: m.layer_names for m in sink.messages if isinstance(m, Hello)}
    assert hellos == {"named": tuple(names), "named-manual": tuple(stage), "anonymous": None}
    with pytest.raises(ValueError, match="manual mode"):
        gw.attach(model, sink.endpoint, "x", layer_names=names)
    for bad in (stage[:1], [stage[0], stage[0]]):
        with pytest.raises(ValueError, match="layer_names"):
            gw.attach(model, sink.endpoint, "x", num_layers=2, num_experts=8, top_k=2, layer_names=bad)


def test_record_of_unlike_routers_ships_without_cosines_and_a_layer_twice_is_incomplete(sink, caplog):
    """record() from routers of different widths (router weights [E, 4] and [E, 5]): routing embeddings of
    different widths have no cosine, so the summaries ship without them (this raised in the hook on every
    summarized forward, and the summaries were lost). A layer recorded twice in place of another is
    'incomplete': the missing layer's staged rows would be another forward's."""
    class Unlike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.r0 = torch.nn.Linear(4, 3, bias=False)
            self.widen = torch.nn.Linear(4, 5)
            self.r1 = torch.nn.Linear(5, 3, bias=False)
            self.twice = False
            self.seen = []

        def forward(self, x_BSH):
            first = self.r0(x_BSH)
            self.mon.record(0, logits=first, router_weight=self.r0.weight)
            y_BSH = self.widen(x_BSH)
            second = self.r1(y_BSH)
            self.mon.record(0 if self.twice else 1, logits=second, router_weight=self.r1.weight)
            self.seen.append((first.detach().double(), second.detach().double()))
            return y_BSH.sum()

    model = Unlike()
    mon = model.mon = gw.attach(model, sink.endpoint, "unlike", num_layers=2, num_experts=3, top_k=1,
                                every_n_steps=1)
    for step, twice in enumerate((False, True)):
        model.twice = twice
        mon.step(step)
        model(torch.randn(1, 4, 4, requires_grad=True)).backward()
    stats = mon.stats()
    mon.close()
    [msg] = sink.wait_routing()
    assert stats["hook_errors"] == 0 and stats["dropped"] == {"incomplete": 1}
    assert sum("recorded MoE layers [0, 0] of 0..1" in r.message for r in caplog.records) == 1
    assert msg.step == 0 and msg.adj_cosine_NJ is None
    first, second = model.seen[0]
    expected = torch.stack([torch.softmax(first, -1).mean(dim=(0, 1)), torch.softmax(second, -1).mean(dim=(0, 1))])
    np.testing.assert_allclose(msg.mean_probs_NLE[0], expected.numpy(), rtol=1e-5, atol=1e-6)


def test_router_weights_emptied_after_their_layer_are_copied_from_then_on(sink, caplog):
    """DeepSpeed ZeRO-3 gathers a layer's parameters for its forward and empties them after it (the same
    parameter objects, their data swapped), before the agent's reduction at the end of the forward. The
    first message then has no cosines; from then on the router hook keeps a copy, and the cosines are
    those of the weights. Simulated here with the same in-place data swap (DeepSpeed is not installed)."""
    model = tiny_model("olmoe")
    shape = discover(model)
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, "emptied", every_n_steps=1, max_samples_per_step=2)
    full = {}

    def empty_after(module, args, output):
        full[module] = module.weight.data
        module.weight.data = torch.empty(0, dtype=module.weight.dtype)

    def gather_again(module, args, kwargs, output):
        for router, data in full.items():
            router.weight.data = data

    handles = [layer.router.register_forward_hook(empty_after) for layer in shape.layers]
    handles.append(model.register_forward_hook(gather_again, with_kwargs=True))  # after the agent's end hook
    weights = [layer.weight_EH.detach().double().clone() for layer in shape.layers]
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with caplog.at_level("INFO", logger="grokwatch"):
        for step in range(2):
            mon.step(step)
            model(input_ids=input_ids, labels=input_ids).loss.backward()  # no optimizer: the weights stay
    stats = mon.stats()
    mon.close()
    tap.remove()
    for handle in handles:
        handle.remove()
    first, second = sink.wait_routing(2)
    assert stats["hook_errors"] == 0 and first.adj_cosine_NJ is None
    assert sum("were freed before the reduction" in r.getMessage() for r in caplog.records) == 1
    L = shape.num_layers
    calls = tap.calls[L:2 * L]
    ref = reference_summaries([c[0] for c in calls], [c[1] for c in calls], np.ones((2, 9)), [0, 1], weights,
                              "softmax", 2, 8)
    check_against_reference(second, ref)


def test_a_router_without_indices_takes_the_decision_from_the_experts_module(sink):
    """DeepSeek-V3 before transformers 5.13: the gate returns scores only and selects with a bias that
    the scores do not show; the experts module's input holds the decision. Counts must be the decision,
    not the top-k of the distribution, and a router that does return indices needs no second hook."""
    from types import SimpleNamespace

    H, E, K = 16, 8, 2

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, E))

        def forward(self, hidden_TH, top_k_index_TK, top_k_weights_TK):
            return hidden_TH * (self.scale[top_k_index_TK] * top_k_weights_TK).sum(-1, keepdim=True)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(H, E, bias=False)
            self.experts = Experts()
            self.register_buffer("selection_bias", torch.tensor([4.0] + [0.0] * (E - 1)))

        def forward(self, x_BSH):
            h_TH = x_BSH.reshape(-1, H)
            scores_TE = self.gate(h_TH).sigmoid()
            idx_TK = (scores_TE + self.selection_bias).topk(K, dim=-1).indices
            return x_BSH + self.experts(h_TH, idx_TK, scores_TE.gather(-1, idx_TK)).view_as(x_BSH)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_experts=E, num_experts_per_tok=K, model_type="deepseek_v3")
            self.embed = torch.nn.Embedding(VOCAB, H)
            self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

        def forward(self, input_ids):
            x = self.embed(input_ids)
            for block in self.blocks:
                x = block(x)
            return x

    torch.manual_seed(0)
    model = Model()
    decisions = []
    taps = [b.experts.register_forward_pre_hook(lambda m, a: decisions.append(a[1].detach().clone()))
            for b in model.blocks]
    mon = gw.attach(model, sink.endpoint, "no-indices", every_n_steps=1, max_samples_per_step=2)
    ids = torch.randint(0, VOCAB, (2, 6))
    for step in range(2):
        mon.step(step)
        model(ids).sum().backward()
    mon.close()
    for t in taps:
        t.remove()
    msgs = sink.wait_routing(2)
    assert len(msgs) == 2
    for n, msg in enumerate(msgs):
        for row in range(2):
            for layer in range(3):
                expected = np.bincount(decisions[3 * n + layer].reshape(2, 6, K)[row].numpy().ravel(), minlength=E)
                np.testing.assert_array_equal(msg.topk_counts_NLE[row, layer], expected)
        assert (msg.topk_counts_NLE[:, :, 0] == 6).all()  # the bias always selects expert 0
    assert mon.capture.needs_experts_hook == [True, True, True]

    # A router that returns its indices (every transformers 5.24 family): the experts hook is dropped.
    olmoe = tiny_model("olmoe")
    mon = gw.attach(olmoe, sink.endpoint, "with-indices", every_n_steps=1)
    run_one_step(olmoe, mon, torch.randint(0, VOCAB, (2, 8)))
    assert not any(mon.capture.needs_experts_hook)
    run_one_step(olmoe, mon, torch.randint(0, VOCAB, (2, 8)))
    assert not any(layer.experts._forward_pre_hooks for layer in discover(olmoe).layers)  # kept armed: routers only
    mon.close()


def test_router_zloss_false_leaves_it_out(sink):
    msg = _one_routing_message(sink, lambda x: torch.softmax(x, -1), "no-zloss", router_zloss=False)
    assert msg.zloss_NL is None and msg.mean_probs_NLE.shape == (2, 1, 4)


def test_record_of_dropped_picks_means_over_routed_tokens_and_ships_them_as_dropped(sink):
    """A framework that drops picks after the choice (Megatron-Core's capacity factor zeroes their weights)
    records picks of weight 0. Before, a dropped token's all-zero row entered the sample's mean: rows summed to
    0.8 and the collector refused every message (probability_sum). Now a sample's means are over its routed
    tokens (a sample none of whose tokens was routed in a layer: uniform), the zero-weight picks count for no
    expert and are shipped as dropped picks."""
    torch.manual_seed(0)
    B, S, E, K = 3, 4, 4, 2

    class Dropping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 8)
            self.router = torch.nn.Linear(8, E, bias=False)
            self.mon = None
            self.seen = []

        def forward(self, input_ids):
            h = self.emb(input_ids)
            p = torch.softmax(self.router(h), -1)
            w, ids = p.topk(K, dim=-1)
            keep = torch.ones(B, S, K)
            keep[0, :2] = 0  # row 0: its first two tokens dropped entirely
            keep[1, :, 1] = 0  # row 1: every token's second pick dropped
            keep[2] = 0  # row 2: every token dropped
            w = w * keep
            self.seen.append((w.detach().double(), ids))
            self.mon.record(0, topk=(ids, w), router_weight=self.router.weight)
            return (h * w.sum(-1, keepdim=True)).sum()

    model = Dropping()
    mon = gw.attach(model, sink.endpoint, "dropping", num_layers=1, num_experts=E, top_k=K, every_n_steps=1,
                    max_samples_per_step=B)
    model.mon = mon
    mon.step(0)
    model(torch.randint(0, 16, (B, S))).backward()
    mon.close()
    [msg] = sink.wait_routing(1)
    w, ids = model.seen[0]
    dense = torch.zeros(B, S, E, dtype=torch.float64).scatter_(-1, ids, w)
    for row in range(B):
        routed = dense[row][dense[row].sum(-1) > 0]
        want = (routed / routed.sum(-1, keepdim=True)).mean(0) if len(routed) else torch.full((E,), 1 / E)
        np.testing.assert_allclose(msg.mean_probs_NLE[row, 0], want.numpy(), atol=1e-6)
    assert msg.entropy_NL[2, 0] == pytest.approx(1.0)  # no routed token: the uniform distribution's
    assert msg.dropped_picks_L.tolist() == [2 * K + S + S * K]  # row 0's two tokens, row 1's second picks, row 2
    kept = torch.zeros(E, dtype=torch.int64).index_add_(0, ids[w > 0].reshape(-1), torch.ones(int((w > 0).sum()),
                                                                                            dtype=torch.int64))
    assert msg.expert_tokens_LE[0].tolist() == kept.tolist()
