"""The agent on real tiny transformers models, read back through a real PULL socket: what it ships equals
the reference summaries of what the routers computed, in every layout, device, dtype, mask and packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch._dynamo
from capture import (
    CUDA,
    RouterTap,
    _train_and_collect,
    check_against_reference,
    close_and_read_one,
    reference_summaries,
    run_one_step,
)
from sink import Sink
from tiny_models import FAMILIES, VOCAB, tiny_model

import grokwatch.agent as gw
from grokwatch.agent.discover import discover
from grokwatch.wire import Hello, Routing


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_agent_ships_what_the_routers_computed(family, device, layout, sink):
    """On CUDA this also covers the pinned staging copy and the event the sender waits on."""
    model = tiny_model(family).to(device)
    shape = discover(model)
    assert shape.distribution == ("sigmoid" if family == "deepseek_v3" else "softmax")
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, f"t-{family}", every_n_steps=1, max_samples_per_step=3, **layout)
    torch.manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    ids = ["d", "a", "c", "b"]
    input_ids, mask = input_ids.to(device), mask.to(device)
    run_one_step(model, mon, input_ids, mask, ids=ids, groups=["g1", "g2", "g1", "g2"])
    mon.close()
    tap.remove()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    hello = next(m for m in sink.messages if isinstance(m, Hello))
    assert (hello.num_layers, hello.num_experts, hello.top_k) == (shape.num_layers, 8, 2)
    [msg] = sink.routing("train")
    # Three rows chosen deterministically by their ids, in batch order.
    order = sorted(range(4), key=lambda r: (__import__("zlib").crc32(ids[r].encode()), r))
    rows = sorted(order[:3])
    assert list(msg.sample_ids) == [ids[r] for r in rows]
    assert list(msg.groups) == [["g1", "g2", "g1", "g2"][r] for r in rows]
    weights = tap.weights[:shape.num_layers]
    ref = reference_summaries([c[0] for c in tap.calls], [c[1] for c in tap.calls], mask.cpu().numpy(), rows, weights,
                              shape.distribution, 2, 8)
    check_against_reference(msg, ref)


@pytest.mark.slow  # tracing takes ~14 s a case here
@pytest.mark.parametrize("family, backend, how, reduction", [
    ("olmoe", "eager", "model", "op by op"),  # attach(model), then torch.compile(model)
    ("olmoe", "aot_eager", "model", "op by op"),
    ("deepseek_v3", "eager", "model", "op by op"),
    ("olmoe", "eager", "wrapper", "op by op"),  # attach(torch.compile(model))
    ("olmoe", "eager", "blocks", "op by op"),  # each decoder layer compiled in place before attach (torchtitan's way)
    ("olmoe", "inductor", "model", "compiled"),  # the agent's own compiled reduction, called from compiled code
])
def test_a_compiled_model_ships_what_the_eager_model_ships(family, backend, how, reduction, sink):
    """Compiled code does not see hooks added or removed after it was traced: the agent arms its router
    hooks while torch.compile traces (or at attach, when it finds compiled modules), keeps them armed,
    and never lets the compiler trace its own Python. At a cadence where eager training arms and
    disarms, the compiled model must ship the same summaries; pausing and closing must silence hooks
    the compiled code still holds."""
    import torch._dynamo

    shipped = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_model(family)
        forward, attach_to = model, None
        if compiled and how == "blocks":
            for block in model.model.layers:
                block.compile(backend=backend)
        elif compiled:
            forward = torch.compile(model, backend=backend)
            attach_to = forward if how == "wrapper" else None
        stats = _train_and_collect(model, forward, sink, f"compiled-{compiled}", every=2, pause_at=(4,),
                                   attach_to=attach_to, compile_reduction=reduction == "compiled")
        assert stats["hook_errors"] == 0 and stats["dropped"] == {}
        assert stats["reduction"] == reduction
        run = f"compiled-{compiled}"
        sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing) and m.run == run]) >= 3)
        shipped[compiled] = [m for m in sink.routing("train") if m.run == run]
    torch._dynamo.reset()
    assert [m.step for m in shipped[True]] == [m.step for m in shipped[False]] == [0, 2, 6]  # step 4 paused
    for eager, comp in zip(shipped[False], shipped[True]):
        np.testing.assert_allclose(comp.mean_probs_NLE, eager.mean_probs_NLE, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(comp.topk_counts_NLE, eager.topk_counts_NLE)


@pytest.mark.slow
def test_compiled_code_traced_without_the_hooks_is_counted_and_explained(sink, caplog):
    """Two compiled instances of one class share compiled code (dynamo does not guard on hooks by
    default): the monitored one then runs code traced on the other, without the agent's hooks. That
    cannot be repaired from inside; it must be counted, and the log must say why."""
    import torch._dynamo

    torch._dynamo.reset()
    other, monitored = tiny_model("olmoe"), tiny_model("olmoe")
    ids = torch.randint(0, VOCAB, (2, 8))
    torch.compile(other, backend="eager")(input_ids=ids, labels=ids)  # traced first, without hooks
    mon = gw.attach(monitored, sink.endpoint, "shared-code", every_n_steps=1)
    compiled = torch.compile(monitored, backend="eager")
    for step in range(2):
        mon.step(step)
        compiled(input_ids=ids, labels=ids).loss.backward()
    stats = mon.stats()
    mon.close()
    torch._dynamo.reset()
    assert stats["dropped"] == {"incomplete": 2} and stats["hook_errors"] == 0
    assert sum("skip_nnmodule_hook_guards" in r.message for r in caplog.records) == 1


def test_a_bf16_model_is_summarized_in_float32_from_its_own_router_outputs(layout, sink):
    """The GPU benchmark trains in bf16: the reduction upcasts the router's bf16 logits once and matches
    a float64 reference of the same bf16 values (and bf16 router weights for the cosines)."""
    model = tiny_model("olmoe").to(torch.bfloat16)
    shape = discover(model)
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, "bf16", every_n_steps=1, max_samples_per_step=2, **layout)
    torch.manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (2, 9))
    run_one_step(model, mon, input_ids)
    mon.close()
    tap.remove()
    [msg] = sink.wait_routing(source="train")
    assert tap.calls[0][0].dtype == torch.float64 and shape.layers[0].router.weight.dtype == torch.bfloat16
    weights = tap.weights[:shape.num_layers]
    ref = reference_summaries([c[0] for c in tap.calls], [c[1] for c in tap.calls], np.ones((2, 9)), [0, 1],
                              weights, shape.distribution, 2, 8)
    check_against_reference(msg, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cuda_agent_never_makes_the_training_thread_wait_for_the_device(family, sink, monkeypatch):
    """The agent's training-thread part under torch.cuda.set_sync_debug_mode("error"): an op in it that
    waits for the device raises, and the guard counts it as a hook error. The mode is on only inside the
    agent's hooks (the model's own forward may sync: expert offsets, the experts loop), and the hand-over
    to the sender waits until it is off (the sender's event wait is its own, on its own thread)."""
    from grokwatch.agent.monitor import Monitor

    held = []

    def strict(fn):
        def wrapper(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return wrapper

    torch._dynamo.reset()  # the compiled reduction: compiled here, not left from other tests' shapes
    router_hook = Monitor._router_hook
    monkeypatch.setattr(Monitor, "_on_forward_start", strict(Monitor._on_forward_start))
    monkeypatch.setattr(Monitor, "_on_forward_end", strict(Monitor._on_forward_end))
    monkeypatch.setattr(Monitor, "_router_hook", lambda self, index: strict(router_hook(self, index)))
    model = tiny_model(family).to("cuda")
    mon = gw.attach(model, sink.endpoint, f"nosync-{family}", every_n_steps=1, max_samples_per_step=3)
    real_submit = mon.sender.submit
    mon.sender.submit = held.append
    input_ids = torch.randint(0, VOCAB, (4, 12), device="cuda")
    mask = torch.ones(4, 12, dtype=torch.long, device="cuda")
    mask[1, 9:] = 0
    # A masked, tagged batch (layout built, rows gathered), then an unmasked untagged one (cached, sliced).
    run_one_step(model, mon, input_ids, mask, ids=["d", "a", "c", "b"], groups=["g"] * 4)
    run_one_step(model, mon, input_ids)
    for pending in held:
        real_submit(pending)
    stats = mon.stats()
    mon.close()
    assert stats["hook_errors"] == 0, "a host sync (or other error) inside the agent's hooks: see the log"
    assert stats["reduction"] == "compiled", "compiling failed (a sync in the compiled code?): see the log"
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    assert len(sink.routing("train")) == 2


@pytest.mark.parametrize("sampled", [4, 2])
def test_untagged_batch_whose_first_rows_are_sampled_takes_views_not_gathers(sampled, layout, sink):
    """Rows 0..M-1 with M = max_samples_per_step: the slice path (no slice at all when M is the
    whole batch); same values as the reference, in both layouts."""
    model = tiny_model("qwen2_moe")
    shape = discover(model)
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, "prefix", every_n_steps=1, max_samples_per_step=sampled, **layout)
    torch.manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[3, 7:] = 0
    run_one_step(model, mon, input_ids, mask)
    mon.close()
    tap.remove()
    [msg] = sink.wait_routing(source="train")
    assert list(msg.sample_ids) == ["0:0", "0:1", "0:2", "0:3"][:sampled]
    weights = tap.weights[:shape.num_layers]
    ref = reference_summaries([c[0] for c in tap.calls], [c[1] for c in tap.calls], mask.numpy(),
                              list(range(sampled)), weights, shape.distribution, 2, 8)
    check_against_reference(msg, ref)


def test_a_masked_out_expert_adds_nothing_to_the_entropy(layout, sink):
    """A router that sets an expert's logit to -inf (p = 0) must not turn the entropy into NaN."""
    class MaskingRouter(torch.nn.Module):
        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 4)
            logits[..., 2] = float("-inf")
            self.mon.record(0, logits=logits)
            return logits

    model = MaskingRouter()
    mon = model.mon = gw.attach(model, sink.endpoint, "masked", num_layers=1, num_experts=4, top_k=1,
                                every_n_steps=1, **layout)
    model(torch.zeros(1, 3, dtype=torch.long))
    mon.close()
    [msg] = sink.wait_routing()
    np.testing.assert_allclose(msg.mean_probs_NLE[0, 0], [1 / 3, 1 / 3, 0, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(msg.entropy_NL[0, 0], math.log(3) / math.log(4), rtol=1e-6)


def test_router_output_that_is_not_contiguous_is_summarized_in_both_layouts(layout, sink):
    """A router may hand over a transposed view ([T, E] with strides of [E, T]): stacking the sampled
    rows must not assume contiguous memory."""
    class TransposedRouter(torch.nn.Module):
        def forward(self, input_ids):
            self.logits_ET = torch.randn(4, input_ids.numel())
            self.mon.record(0, logits=self.logits_ET.t())  # [T, E], not contiguous
            return self.logits_ET

    model = TransposedRouter()
    mon = model.mon = gw.attach(model, sink.endpoint, "strided", num_layers=1, num_experts=4, top_k=1,
                                every_n_steps=1, max_samples_per_step=2, **layout)
    model(torch.zeros(2, 5, dtype=torch.long))
    mon.close()
    [msg] = sink.wait_routing()
    expected = torch.softmax(model.logits_ET.t().reshape(2, 5, 4), -1).mean(dim=1)
    np.testing.assert_allclose(msg.mean_probs_NLE[:, 0], expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family, kind", [("olmoe", "bool"), ("olmoe", "additive"), ("gpt_oss", "dict")])
def test_a_4d_attention_mask_counts_the_tokens_some_query_may_attend_to(family, kind, sink):
    """transformers models also take a [B, 1, S, S] mask (bool, or additive float: 0 allows, the dtype's
    minimum masks), e.g. for packing, and models with sliding-window layers a dict of them per attention
    kind. Before, the agent raised on these (a hook error every sampled forward, then disabled itself).
    A position no query may attend to is padding; the probe keeps the same tokens."""
    model = tiny_model(family)
    shape = discover(model)
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, f"mask4d-{family}-{kind}", every_n_steps=1, max_samples_per_step=3,
                    probe_every_n_steps=1, probe_size=3)
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    mask_BS = torch.ones(3, 12, dtype=torch.long)
    mask_BS[1, 9:] = 0  # right padding: every query still has a key to attend to
    allowed = torch.tril(torch.ones(12, 12, dtype=torch.bool))[None] & mask_BS.bool()[:, None, :]
    mask4 = allowed[:, None]
    if kind == "additive":
        mask4 = torch.zeros(mask4.shape).masked_fill(~mask4, torch.finfo(torch.float32).min)
    elif kind == "dict":  # the same mask for both kinds: sliding windows wider than the sequence
        mask4 = {"full_attention": mask4, "sliding_attention": mask4}
    run_one_step(model, mon, input_ids, mask4)  # the probe runs after the optimizer step
    stats = mon.stats()
    mon.close()
    tap.remove()
    assert stats["hook_errors"] == 0, stats
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    [msg] = sink.routing("train")
    assert msg.token_counts_N.tolist() == [12, 9, 12]
    L = shape.num_layers
    ref = reference_summaries([c[0] for c in tap.calls[:L]], [c[1] for c in tap.calls[:L]], mask_BS.numpy(),
                              [0, 1, 2], tap.weights[:L], "softmax", 2, 8)
    check_against_reference(msg, ref)
    [probe] = sink.routing("probe")
    assert probe.token_counts_N.tolist() == [12, 9, 12] and (probe.loss_N > 0).all()


def test_gradient_checkpointing_records_each_layer_once(sink):
    results, router_calls = {}, {}
    for mode in ("off", "non_reentrant", "reentrant"):
        model = tiny_model("olmoe")
        if mode != "off":
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
            else:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
        calls = []
        handle = discover(model).layers[0].router.register_forward_hook(lambda *a: calls.append(1))
        s = Sink()
        try:
            mon = gw.attach(model, s.endpoint, "gc", every_n_steps=1, max_samples_per_step=2)
            torch.manual_seed(2)
            ids = torch.randint(0, VOCAB, (2, 10))
            for _ in range(3):
                run_one_step(model, mon, ids)
            mon.close()
            s.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 3)
            results[mode] = s.routing("train")
            router_calls[mode] = len(calls)
        finally:
            handle.remove()
            s.close()
    assert router_calls["off"] == 3
    assert router_calls["non_reentrant"] == router_calls["reentrant"] == 6  # recomputed in backward
    for mode in ("non_reentrant", "reentrant"):
        assert len(results[mode]) == len(results["off"]) == 3
        for a, b in zip(results["off"], results[mode]):
            np.testing.assert_array_equal(a.topk_counts_NLE, b.topk_counts_NLE)
            np.testing.assert_allclose(a.mean_probs_NLE, b.mean_probs_NLE, rtol=1e-6)


def test_packed_sequences_split_where_position_ids_restart(layout, sink):
    model = tiny_model("olmoe")
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, "packed", every_n_steps=1, max_samples_per_step=1, **layout)
    input_ids = torch.randint(0, VOCAB, (1, 12))
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    run_one_step(model, mon, input_ids, position_ids=position_ids, ids=["row"], groups=["g"])
    msg = close_and_read_one(mon, tap, sink)
    assert list(msg.sample_ids) == ["row", "row#1", "row#2"]
    assert msg.token_counts_N.tolist() == [5, 3, 4]
    shape = discover(model)
    for doc, (lo, hi) in enumerate([(0, 5), (5, 8), (8, 12)]):
        mask = np.zeros((1, 12), np.int64)
        mask[0, lo:hi] = 1
        ref = reference_summaries([c[0] for c in tap.calls], [c[1] for c in tap.calls], mask, [0],
                                  tap.weights[:shape.num_layers], "softmax", 2, 8)[0]
        np.testing.assert_allclose(msg.mean_probs_NLE[doc], ref["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(msg.topk_counts_NLE[doc], ref["counts"])


@pytest.mark.parametrize("packed", [False, True])
def test_inside_the_users_autocast_the_summaries_stay_float32(packed, layout, sink):
    """The reduction runs in the model's forward hook, inside the user's autocast region (HF Trainer
    with bf16=True). Its matmuls (cosines; token means of packed rows) must not run in bf16: before
    this was handled the cosines were off by 1.4e-3 here."""
    model = tiny_model("olmoe")
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, "autocast", every_n_steps=1, max_samples_per_step=1, **layout)
    input_ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    kwargs = dict(input_ids=input_ids, labels=input_ids)
    docs = [(0, 12)]
    if packed:
        kwargs["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
        docs = [(0, 5), (5, 8), (8, 12)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**kwargs).loss
    loss.backward()
    msg = close_and_read_one(mon, tap, sink)
    assert msg.num_samples == len(docs)
    for doc, (lo, hi) in enumerate(docs):
        mask = np.zeros((1, 12), np.int64)
        mask[0, lo:hi] = 1
        ref = reference_summaries([c[0] for c in tap.calls], [c[1] for c in tap.calls], mask, [0], tap.weights,
                                  "softmax", 2, 8)[0]
        np.testing.assert_allclose(msg.mean_probs_NLE[doc], ref["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(msg.entropy_NL[doc], ref["entropy"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(msg.adj_cosine_NJ[doc], ref["cosine"], rtol=1e-4, atol=1e-5)


def test_left_padding_with_position_ids_keeps_one_document_per_row(sink):
    """transformers' own position ids for a left-padded row are [1, 1, 1, 0, 1, 2, ...] (padding set to 1):
    the restart at the first real token is not a second document. Before, the row's tokens shipped as
    "row#1" — another sample id than the same row without padding; a real restart still splits."""
    model = tiny_model("olmoe")
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, "leftpad", every_n_steps=1, max_samples_per_step=2)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, :2] = 0  # left padding, then two packed documents
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    position_ids[1, 7:] = torch.arange(5)  # the second document of row 1 starts at token 7
    run_one_step(model, mon, input_ids, mask, position_ids=position_ids, ids=["a", "b"], groups=["g", "g"])
    msg = close_and_read_one(mon, tap, sink)
    assert list(msg.sample_ids) == ["a", "b", "b#1"]
    assert msg.token_counts_N.tolist() == [9, 5, 5]
    shape = discover(model)
    for slot, (row, lo, hi) in enumerate([(0, 3, 12), (1, 2, 7), (1, 7, 12)]):
        doc_mask = np.zeros((2, 12), np.int64)
        doc_mask[row, lo:hi] = 1
        ref = reference_summaries([c[0] for c in tap.calls], [c[1] for c in tap.calls], doc_mask, [row],
                                  tap.weights[:shape.num_layers], "softmax", 2, 8)[0]
        np.testing.assert_allclose(msg.mean_probs_NLE[slot], ref["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(msg.topk_counts_NLE[slot], ref["counts"])


def test_probabilities_in_the_logits_slot_are_never_softmaxed_twice():
    """transformers 5.0-5.5 routers return probabilities where 5.6+ return logits."""
    from grokwatch.agent.reduce import routing_distribution

    logits = torch.randn(2, 5, 8)
    probs = torch.softmax(logits, -1)
    for given in (logits, probs):
        dist, log_dist = routing_distribution(given, "softmax", detect_probs=True)
        torch.testing.assert_close(dist, probs)
        torch.testing.assert_close(log_dist, probs.log(), atol=1e-5, rtol=1e-5)
    dist, _ = routing_distribution(logits, "sigmoid")
    torch.testing.assert_close(dist, torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True))
    # record(probs=...): weights that do not sum to 1 are scaled per token on the device.
    dist, log_dist = routing_distribution(3 * probs, "probs")
    torch.testing.assert_close(dist, probs)
    torch.testing.assert_close(log_dist, probs.log(), atol=1e-5, rtol=1e-5)
    # The experts in the middle (the CPU layout [G, M, E, S]): the same distribution, per layer, also
    # over many experts, and log p floored where a logit is -inf (p log p = 0, not NaN).
    for width in (8, 64):
        wide = torch.randn(3, 2, 5, width)
        for given in (wide, torch.softmax(wide, -1)):
            dist, log_dist = routing_distribution(given.transpose(-1, -2), "softmax", detect_probs=True, dim=-2)
            torch.testing.assert_close(dist.transpose(-1, -2), torch.softmax(wide, -1))
            torch.testing.assert_close(log_dist.exp().transpose(-1, -2), torch.softmax(wide, -1))
    masked = torch.tensor([[0.0, float("-inf"), 0.0]])
    dist, log_dist = routing_distribution(masked, "softmax")
    assert torch.isfinite(log_dist).all() and (dist * log_dist).sum().item() == pytest.approx(-math.log(2))
    # Layers reduced together [G, M, S, E]: the check is made per layer.
    dist, _ = routing_distribution(torch.stack([probs, logits]), "softmax", detect_probs=True)
    torch.testing.assert_close(dist, torch.stack([probs, probs]))
