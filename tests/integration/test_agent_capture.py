"""The agent on real tiny transformers models, read back through a real PULL socket."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch._dynamo
import zmq

import grokwatch.agent as gw
import grokwatch.agent.compiled as compiled_module
import grokwatch.agent.monitor as monitor_module
import grokwatch.agent.reduce as reduce_module
from grokwatch.agent.discover import discover
from grokwatch.wire import Hello, Routing
from helpers import wait_until
from reference import summaries
from sink import Sink
from tiny_models import FAMILIES, VOCAB, tiny_model


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


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
        np.testing.assert_allclose(msg.adj_cosine_NL1[i], r["cosine"], rtol=1e-4, atol=1e-5)


def close_and_read_one(mon, tap, sink) -> Routing:
    """Close the monitor and the tap, then the one routing message the sink receives."""
    mon.close()
    tap.remove()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing()
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


@pytest.fixture(params=["device", "experts_last", "layer_by_layer",
                        pytest.param("compiled", marks=pytest.mark.slow)])
def layout(request, monkeypatch):
    """"device": what attach() does on the test's device: on CPU op by op with the experts at dim -2
    ([G, M, E, S]); on CUDA compiled. "experts_last": op by op with the experts last ([G, M, S, E], the
    CUDA layout), on any machine. "layer_by_layer": as "device", with each layer reduced in a batch of
    its own (what reduction_memory_mb does to a model too large for it; the cosines then come from
    the staged means). "compiled": the reduction through torch.compile (on CPU; on CUDA that is
    "device"). Wherever compiled, the test fails unless the compiled code ran and never fell back."""
    callspec = getattr(request.node, "callspec", None)
    on_cuda = callspec is not None and callspec.params.get("device") == "cuda"
    if request.param == "layer_by_layer":
        batches = []
        within = reduce_module._within
        monkeypatch.setattr(reduce_module, "TRANSIENT_COPIES_OP_BY_OP", 10**15)
        monkeypatch.setattr(reduce_module, "TRANSIENT_COPIES_COMPILED", 10**15)
        monkeypatch.setattr(reduce_module, "_within", lambda *a: batches.extend(within(*a)) or within(*a))
    if request.param == "experts_last":
        monkeypatch.setattr(reduce_module, "expert_dim", lambda device: -1)
        monkeypatch.setattr(compiled_module, "compile_by_default", lambda device: False)
    elif request.param == "compiled":
        if on_cuda:
            pytest.skip("on CUDA the device's default is compiled")
        monkeypatch.setattr(compiled_module, "compile_by_default", lambda device: True)
    compiled = request.param == "compiled" or (request.param == "device" and on_cuda)
    made = []
    if compiled:
        torch._dynamo.reset()  # a fresh compile for this test's shapes (dynamo's recompile limit is per function)

        class Tracked(compiled_module.CompiledReduction):
            def __init__(self):
                super().__init__()
                made.append(self)

        monkeypatch.setattr(compiled_module, "CompiledReduction", Tracked)
    yield request.param
    if request.param == "layer_by_layer":
        assert batches and all(len(batch) == 1 for batch in batches), [len(b) for b in batches]
    if compiled:
        assert made and all(c.error is None for c in made), [c.error for c in made]
        assert all(c.compile_seconds is not None for c in made), "the compiled reduction never ran"


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_agent_ships_what_the_routers_computed(family, device, layout, sink):
    """On CUDA this also covers the pinned staging copy and the event the sender waits on."""
    model = tiny_model(family).to(device)
    shape = discover(model)
    assert shape.distribution == ("sigmoid" if family == "deepseek_v3" else "softmax")
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, f"t-{family}", every_n_steps=1, max_samples_per_step=3)
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
    mon = gw.attach(model, sink.endpoint, "bf16", every_n_steps=1, max_samples_per_step=2)
    torch.manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (2, 9))
    run_one_step(model, mon, input_ids)
    mon.close()
    tap.remove()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing("train")
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
    mon = gw.attach(model, sink.endpoint, "prefix", every_n_steps=1, max_samples_per_step=sampled)
    torch.manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (4, 10))
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[3, 7:] = 0
    run_one_step(model, mon, input_ids, mask)
    mon.close()
    tap.remove()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing("train")
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
                                every_n_steps=1)
    model(torch.zeros(1, 3, dtype=torch.long))
    mon.close()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing()
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
                                every_n_steps=1, max_samples_per_step=2)
    model(torch.zeros(2, 5, dtype=torch.long))
    mon.close()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing()
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
    mon = gw.attach(model, sink.endpoint, "packed", every_n_steps=1, max_samples_per_step=1)
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
    mon = gw.attach(model, sink.endpoint, "autocast", every_n_steps=1, max_samples_per_step=1)
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
        np.testing.assert_allclose(msg.adj_cosine_NL1[doc], ref["cosine"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_model_moved_after_attach_is_followed(device, sink, caplog):
    """attach(model), then model.cuda(): the staging buffers were made on the device seen at attach, and
    writing CUDA results into them would copy across devices on the training thread (a host sync) every
    sampled step. The agent moves its buffers to the inputs' device at the first forward there. On CPU the
    move is simulated: the monitor is told it was attached on "cpu:0", a device other than "cpu"."""
    caplog.set_level("INFO", logger="grokwatch.agent")
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, f"moved-{device}", every_n_steps=1, max_samples_per_step=2)
    attached_staging = mon.staging
    if device == "cpu":
        mon.device = torch.device("cpu", 0)
    else:
        model.to(device)
    tap = RouterTap(model)
    input_ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8)).to(device)
    run_one_step(model, mon, input_ids)
    stats = mon.stats()
    mon.close()
    tap.remove()
    assert stats["hook_errors"] == 0 and stats["dropped"] == {}, stats
    assert mon.staging is not attached_staging and mon.staging.device_buf.device.type == device
    assert sum("the agent follows" in r.message for r in caplog.records) == 1
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing()
    ref = reference_summaries([c[0] for c in tap.calls], [c[1] for c in tap.calls], np.ones((2, 9)), [0, 1],
                              tap.weights, "softmax", 2, 8)
    check_against_reference(msg, ref)


def test_a_model_attached_on_the_meta_device_is_followed_after_to_empty(sink):
    """Large models are built on the meta device and materialized with to_empty() (torchtitan's way), which
    puts new parameters in place of the meta ones: attached before that, the agent follows the model to its
    device at the first forward and takes the new router weights (their cosines), with no hook error."""
    with torch.device("meta"):
        model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "meta", every_n_steps=1, max_samples_per_step=2)
    model.to_empty(device="cpu")
    torch.manual_seed(4)
    model.init_weights()  # parameters and the rotary buffers, which to_empty() leaves as whatever was in memory
    tap = RouterTap(model)
    run_one_step(model, mon, torch.randint(0, VOCAB, (2, 9)))
    stats = mon.stats()
    mon.close()
    tap.remove()
    assert stats["hook_errors"] == 0 and stats["dropped"] == {}, stats
    assert mon.staging.device_buf.device.type == "cpu"
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing()
    ref = reference_summaries([c[0] for c in tap.calls], [c[1] for c in tap.calls], np.ones((2, 9)), [0, 1],
                              tap.weights, "softmax", 2, 8)
    check_against_reference(msg, ref)


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


@pytest.mark.parametrize("compile_reduction", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_loss_and_gradients_are_bit_identical_with_and_without_the_agent(compile_reduction, sink):
    """Also the user's random stream: the agent (compiled reduction included) draws nothing from it."""
    grads = {}
    for attached in (False, True):
        model = tiny_model("olmoe", seed=3)
        mon = (gw.attach(model, sink.endpoint, "bits", every_n_steps=1, compile_reduction=compile_reduction)
               if attached else None)
        torch.manual_seed(4)
        ids = torch.randint(0, VOCAB, (3, 16))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads[attached] = (out.loss.detach().clone(),
                           [p.grad.clone() for p in model.parameters() if p.grad is not None],
                           torch.randint(0, 2**30, (4,)))
        if mon:
            assert mon.stats()["reduction"] == ("compiled" if compile_reduction else "op by op")
            mon.close()
    assert torch.equal(grads[False][0], grads[True][0])
    assert len(grads[False][1]) == len(grads[True][1])
    for a, b in zip(grads[False][1], grads[True][1]):
        assert torch.equal(a, b)
    assert torch.equal(grads[False][2], grads[True][2])


def test_training_runs_with_no_collector_and_drops_are_counted():
    model = tiny_model("olmoe")
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.bind("tcp://127.0.0.1:0")
    endpoint = s.getsockopt_string(zmq.LAST_ENDPOINT)
    s.close(0)  # nobody listens there any more
    ctx.term()
    mon = gw.attach(model, endpoint, "alone", every_n_steps=1, sndhwm=2, heartbeat_interval_s=0.05)
    ids = torch.randint(0, VOCAB, (2, 8))
    for _ in range(20):
        run_one_step(model, mon, ids)
    wait_until(lambda: mon.stats()["dropped"].get("send_blocked", 0) > 0)  # the sender thread meets the full queue
    stats = mon.stats()
    mon.close()
    assert stats["hook_errors"] == 0
    assert sum(stats["dropped"].values()) > 0
    assert stats["dropped"].get("send_blocked", 0) > 0


@pytest.mark.parametrize("where", ["forward end", "router hook"])
def test_an_exception_inside_a_hook_never_reaches_training(where, sink, caplog, monkeypatch):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "broken", every_n_steps=1, max_hook_errors=3)
    if where == "forward end":
        def broken_reduction(*args, **kwargs):
            raise RuntimeError("broken reduction")
        monkeypatch.setattr("grokwatch.agent.monitor.reduce_all", broken_reduction)
    else:
        def broken(*args, **kwargs):
            raise RuntimeError("broken gather")
        monkeypatch.setattr("grokwatch.agent.hooks.gather_layer", broken)
    ids = torch.randint(0, VOCAB, (2, 8))
    for _ in range(6):
        run_one_step(model, mon, ids)  # must not raise
    stats = mon.stats()
    mon.close()
    assert stats["hook_errors"] == 3
    assert stats["disabled"] is True
    assert sum("error inside a hook" in r.message for r in caplog.records) == 1


@pytest.mark.slow
def test_the_compiled_reduction_follows_changing_sequence_lengths_and_the_probe(sink):
    """Each new length recompiles (then dynamo compiles for any length); every step's summary must still
    equal the reference, the probe's forwards (other shapes, a mask) must be summarized too, and the
    reduction must stay compiled."""
    torch._dynamo.reset()
    model = tiny_model("olmoe")
    shape = discover(model)
    L = shape.num_layers
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, "lengths", every_n_steps=1, max_samples_per_step=2, compile_reduction=True,
                    probe_every_n_steps=5, probe_size=2)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, VOCAB, (2, S), generator=gen) for S in (8, 12, 16, 8, 20)]
    refs = []
    for ids in batches:
        weights = [layer.weight_EH.detach().clone() for layer in shape.layers]
        run_one_step(model, mon, ids)
        calls = tap.calls[len(refs) * L:(len(refs) + 1) * L]  # the probe's forwards (after step 5) come later
        refs.append(reference_summaries([c[0] for c in calls], [c[1] for c in calls], np.ones(tuple(ids.shape)),
                                        [0, 1], weights, "softmax", 2, 8))
    stats = mon.stats()
    mon.close()
    tap.remove()
    torch._dynamo.reset()
    assert stats["reduction"] == "compiled" and stats["hook_errors"] == 0 and stats["dropped"] == {}
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 6)
    msgs = sink.routing("train")
    assert [m.step for m in msgs] == [0, 1, 2, 3, 4]
    for msg, ref in zip(msgs, refs):
        check_against_reference(msg, ref)
    [probe] = sink.routing("probe")
    assert probe.step == 5 and probe.num_samples == 2 and (probe.loss_N > 0).all()


@pytest.mark.slow
def test_a_reduction_that_cannot_be_compiled_runs_op_by_op_and_says_why(sink, caplog):
    """A machine without a C++ compiler (or Triton) cannot compile the reduction: the first sampled step
    must still ship its summary (op by op), with no hook error, one warning, and stats that say so."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = tiny_model("olmoe")
    tap = RouterTap(model)
    mon = gw.attach(model, sink.endpoint, "no-compiler", every_n_steps=1, max_samples_per_step=2,
                    compile_reduction=True)
    input_ids = torch.randint(0, VOCAB, (2, 8))
    # inductor's own patch(): monkeypatch's undo deletes config keys it did not see set, and every
    # later compile in the process then fails ("fx_graph_cache does not exist").
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}):
        for _ in range(2):
            run_one_step(model, mon, input_ids)
    stats = mon.stats()
    mon.close()
    tap.remove()
    torch._dynamo.reset()
    assert stats["hook_errors"] == 0 and stats["disabled"] is False
    assert stats["reduction"].startswith("op by op (compiling failed"), stats["reduction"]
    assert sum("compiling the batched reduction failed" in r.message for r in caplog.records) == 1
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    msgs = sink.routing("train")
    assert [m.step for m in msgs] == [0, 1]
    shape = discover(model)
    ref = reference_summaries([c[0] for c in tap.calls[:shape.num_layers]],
                              [c[1] for c in tap.calls[:shape.num_layers]], np.ones((2, 8)), [0, 1],
                              tap.weights[:shape.num_layers], "softmax", 2, 8)
    check_against_reference(msgs[0], ref)


def test_attach_fails_fast_on_bad_config_and_dense_models():
    import transformers as tf

    dense = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        gw.attach(dense, "tcp://127.0.0.1:5999", "x")
    for endpoint in ("http://nope", "tcp://collector", "tcp://collector:99999", "tcp://no port:5557"):
        with pytest.raises(ValueError, match="endpoint"):
            gw.attach(tiny_model("olmoe"), endpoint, "x")
    with pytest.raises(ValueError, match="every_n_steps"):
        gw.attach(tiny_model("olmoe"), "tcp://127.0.0.1:5999", "x", every_n_steps=0)
    with pytest.raises(ValueError, match="compile_reduction"):
        gw.attach(tiny_model("olmoe"), "tcp://127.0.0.1:5999", "x", compile_reduction="yes")
    for budget in (0, -1.0, float("nan"), "lots"):
        with pytest.raises(ValueError, match="reduction_memory_mb"):
            gw.attach(tiny_model("olmoe"), "tcp://127.0.0.1:5999", "x", reduction_memory_mb=budget)


@pytest.mark.parametrize("compile_reduction", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_reduction_memory_mb_bounds_each_batch_and_changes_nothing_shipped(compile_reduction, sink, monkeypatch):
    """The batched reduction runs at the end of the forward, when the saved activations peak: beyond
    reduction_memory_mb of (estimated) transient memory, the layers are reduced in several batches;
    what ships is the same, cosines across the batch boundaries included."""
    L, E, M, S = 5, 4, 2, 6

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.routers = torch.nn.ModuleList(torch.nn.Linear(8, E, bias=False) for _ in range(L))

        def forward(self, x_BSH):
            for i, router in enumerate(self.routers):
                self.mon.record(i, logits=router(x_BSH), router_weight=router.weight)
                x_BSH = torch.tanh(x_BSH + router.weight.sum(0)[:8])
            return x_BSH.sum()

    batches = []
    within = reduce_module._within
    monkeypatch.setattr(reduce_module, "_within", lambda *a: batches.append([len(b) for b in within(*a)])
                        or within(*a))
    copies = reduce_module.TRANSIENT_COPIES_COMPILED if compile_reduction else reduce_module.TRANSIENT_COPIES_OP_BY_OP
    per_layer = copies * 4 * M * S * E
    model = Stack()
    torch._dynamo.reset()
    x = torch.randn(M, S, 8)
    shipped = []
    for budget_mb in (256.0, 2.5 * per_layer / 2**20):
        mon = model.mon = gw.attach(model, sink.endpoint, f"budget-{budget_mb}", num_layers=L, num_experts=E,
                                    top_k=1, every_n_steps=1, max_samples_per_step=M, reduction_memory_mb=budget_mb,
                                    compile_reduction=compile_reduction)
        mon.step(0)
        model(x)
        assert mon.stats()["reduction"] == ("compiled" if compile_reduction else "op by op")
        mon.close()
        sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) > len(shipped))
        shipped = sink.routing()
    assert batches == [[5], [2, 2, 1]]
    whole, split = shipped
    np.testing.assert_allclose(split.mean_probs_NLE, whole.mean_probs_NLE, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(split.topk_counts_NLE, whole.topk_counts_NLE)
    np.testing.assert_allclose(split.entropy_NL, whole.entropy_NL, rtol=1e-6, atol=1e-7)
    assert whole.adj_cosine_NL1 is not None and split.adj_cosine_NL1 is not None
    np.testing.assert_allclose(split.adj_cosine_NL1, whole.adj_cosine_NL1, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_shares_the_step_budget_and_numbers_untagged_rows_on(sink, tmp_path):
    """A real HF Trainer with gradient_accumulation_steps=2: the micro-batches of one optimizer step share
    max_samples_per_step, all under that step, and untagged rows are numbered on across them, so no two
    samples of a step share an id (the collector follows samples, and keeps their losses, by id)."""
    from transformers import Trainer, TrainingArguments

    from grokwatch.agent import GrokwatchCallback

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True, logging_steps=100)
    callback = GrokwatchCallback(endpoint=sink.endpoint, run="accumulate", every_n_steps=1, max_samples_per_step=3)
    Trainer(model=tiny_model("olmoe"), args=args, train_dataset=Rows(), callbacks=[callback]).train()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 4)
    shipped = [(m.step, list(m.sample_ids)) for m in sink.routing("train")]
    assert shipped == [(0, ["0:0", "0:1"]), (0, ["0:2"]), (1, ["1:0", "1:1"]), (1, ["1:2"])]


def test_trainer_evaluations_go_out_as_eval_scores_per_data_group(sink, tmp_path):
    """A real Trainer evaluating an eval_dataset dict (one dataset per data group, the paper's
    per-domain accuracy): with eval_metric="accuracy" each evaluation's score goes out under its
    group, the ground truth the report lines up with that group's pathways; the Trainer's own
    timings never go out as scores. Evaluation forwards (eval mode, no grad) are not summarized."""
    from transformers import Trainer, TrainingArguments

    from grokwatch.agent import GrokwatchCallback
    from grokwatch.wire import Eval

    class Rows(torch.utils.data.Dataset):
        def __init__(self, seed):
            self.seed = seed

        def __len__(self):
            return 4

        def __getitem__(self, i):
            ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(self.seed * 100 + i))
            return {"input_ids": ids, "labels": ids}

    def accuracy(prediction):  # next-token accuracy of the tiny model: any value in [0, 1]
        logits, labels = prediction.predictions, prediction.label_ids
        return {"accuracy": float((logits[:, :-1].argmax(-1) == labels[:, 1:]).mean())}

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                             logging_steps=100)
    callback = GrokwatchCallback(endpoint=sink.endpoint, run="evals", eval_metric="accuracy", every_n_steps=1,
                                 max_samples_per_step=2)
    Trainer(model=tiny_model("olmoe"), args=args, train_dataset=Rows(0),
            eval_dataset={"math": Rows(1), "code": Rows(2)}, compute_metrics=accuracy, callbacks=[callback]).train()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Eval)]) >= 4)
    evals = [(m.step, dict(m.scores)) for m in sink.messages if isinstance(m, Eval)]
    assert [(step, sorted(scores)) for step, scores in evals] == [(2, ["math"]), (2, ["code"]), (4, ["math"]),
                                                                  (4, ["code"])]
    assert all(0.0 <= v <= 1.0 for _, scores in evals for v in scores.values())
    assert [m.step for m in sink.routing("train")] == [0, 1, 2, 3]  # training forwards only


@pytest.mark.parametrize("remove_unused_columns, torch_compile", [
    (False, False), (True, False), pytest.param(False, True, marks=pytest.mark.slow)])
def test_trainer_rows_are_named_by_their_examples_sample_id_and_group(remove_unused_columns, torch_compile, sink,
                                                                      tmp_path, caplog):
    """A Trainer user names rows without code of their own: each example's sample_id and group travel
    through the callback's collator into the forward's arguments, where the agent takes them out (the
    model never receives them, evaluation forwards included). The Trainer drops unknown example keys
    unless remove_unused_columns=False: then a warning says why the samples go out untagged. Also with
    TrainingArguments(torch_compile=True), where the hooks run as opaque calls from compiled code."""
    from transformers import Trainer, TrainingArguments

    from grokwatch.agent import GrokwatchCallback

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids, "sample_id": torch.tensor(100 + i),
                    "group": "math" if i % 2 == 0 else "code"}

    model = tiny_model("olmoe")
    reached = []
    model.model.register_forward_pre_hook(lambda m, a, kw: reached.extend(kw), with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                             logging_steps=100, remove_unused_columns=remove_unused_columns,
                             torch_compile=torch_compile)
    callback = GrokwatchCallback(endpoint=sink.endpoint, run="named", every_n_steps=1, max_samples_per_step=4)
    with caplog.at_level(logging.WARNING, logger="grokwatch.agent"):
        Trainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(), data_collator=callback.collator(),
                callbacks=[callback]).train()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    shipped = [(sid, group) for m in sink.routing("train") for sid, group in zip(m.sample_ids, m.groups)]
    assert len(shipped) == 8 and "grokwatch_tags" not in reached and "sample_id" not in reached
    if remove_unused_columns:
        assert {group for _, group in shipped} == {"all"} and "remove_unused_columns" in caplog.text
    else:
        assert sorted(shipped) == sorted((str(100 + i), "math" if i % 2 == 0 else "code") for i in range(8))
        assert "remove_unused_columns" not in caplog.text


def train_batches(model, loader) -> None:
    """SGD on each batch of a loader, called as model(**batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()


def test_a_plain_loop_names_rows_with_the_tagging_collator(sink):
    """Not only the Trainer: any loop that calls model(**batch) names its rows with TaggingCollator as
    the DataLoader's collate_fn (the example's keys go to the agent, never to the model)."""
    model = tiny_model("olmoe")
    examples = [{"input_ids": torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i)),
                 "sample_id": f"doc-{i}", "group": ("math", "code")[i % 2]} for i in range(4)]
    for example in examples:
        example["labels"] = example["input_ids"]
    loader = torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=gw.TaggingCollator())
    mon = gw.attach(model, sink.endpoint, "loop", every_n_steps=1)
    train_batches(model, loader)
    mon.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    assert [(list(m.sample_ids), list(m.groups)) for m in sink.routing("train")] == [
        (["doc-0", "doc-1"], ["math", "code"]), (["doc-2", "doc-3"], ["math", "code"])]


def test_non_finite_eval_scores_are_left_out_and_the_rest_still_sent(sink, caplog):
    """The wire refuses a message holding a NaN: one diverged score (eval loss NaN) must not take the
    other groups' scores with it."""
    from grokwatch.wire import Eval

    mon = gw.attach(tiny_model("olmoe"), sink.endpoint, "evals")
    with caplog.at_level(logging.WARNING, logger="grokwatch.agent"):
        mon.log_eval(5, {"math": float("nan"), "code": 0.4, "bio": float("inf")})
        mon.log_eval(6, {"math": float("nan")})  # nothing left: no message
        mon.log_eval(7, {"math": 0.5})
    stats = mon.stats()
    mon.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Eval)]) >= 2)
    assert [(m.step, dict(m.scores)) for m in sink.messages if isinstance(m, Eval)] == [(5, {"code": 0.4}),
                                                                                       (7, {"math": 0.5})]
    assert stats["non_finite_scores"] == 3 and stats["hook_errors"] == 0
    assert len([r for r in caplog.records if "not finite" in r.getMessage()]) == 1


def test_a_lightning_trainer_streams_with_one_callback(sink):
    """A real Lightning fit: the callback attaches to the transformers model inside the LightningModule
    (Lightning calls training_step, not the module's forward), rows are named by TaggingCollator, each
    validation's logged score goes out as its group's eval (the sanity check's does not), and the
    monitor is closed at fit end."""
    L = pytest.importorskip("lightning.pytorch")
    from grokwatch.wire import Eval

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_model("olmoe")

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def validation_step(self, batch, batch_idx):
            logits = self.model(**batch).logits
            accuracy = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]).float().mean()
            self.log("val/math_acc", accuracy)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    examples = [{"input_ids": torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(i)),
                 "sample_id": f"doc-{i}", "group": "math"} for i in range(8)]
    for example in examples:
        example["labels"] = example["input_ids"]
    loader = torch.utils.data.DataLoader(examples, batch_size=2, collate_fn=gw.TaggingCollator())
    callback = gw.GrokwatchLightningCallback(sink.endpoint, "lit", every_n_steps=1, max_samples_per_step=2,
                                             eval_scores={"math": "val/math_acc"})
    module = Module()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, val_check_interval=2, num_sanity_val_steps=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert callback.monitor is None  # closed at fit end
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Eval)]) >= 2)
    train = sink.routing("train")
    assert [m.step for m in train] == [0, 1, 2, 3]
    assert [list(m.sample_ids) for m in train] == [[f"doc-{2 * i}", f"doc-{2 * i + 1}"] for i in range(4)]
    evals = [(m.step, sorted(m.scores)) for m in sink.messages if isinstance(m, Eval)]
    assert evals == [(2, ["math"]), (4, ["math"])]


def test_documents_packed_by_the_flattening_collator_go_out_under_their_own_names(sink):
    """Packed pretraining: DataCollatorWithFlattening puts the examples in one row, position ids
    restarting at each. Each document is summarized on its own (as before), and now goes out under its
    example's id and group, not "<row id>#d" and one group for the row (a row mixes domains)."""
    from transformers import DataCollatorWithFlattening

    model = tiny_model("olmoe")
    examples = [{"input_ids": torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist(),
                 "sample_id": name, "group": group} for n, name, group in [(5, "doc-a", "math"), (3, "doc-b", "code"),
                                                                        (4, "doc-c", "math")]]
    loader = torch.utils.data.DataLoader(examples, batch_size=3,
                                         collate_fn=gw.TaggingCollator(DataCollatorWithFlattening()))
    mon = gw.attach(model, sink.endpoint, "flat", every_n_steps=1, max_samples_per_step=1)
    train_batches(model, loader)
    mon.close()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing("train")
    assert list(msg.sample_ids) == ["doc-a", "doc-b", "doc-c"] and list(msg.groups) == ["math", "code", "math"]
    assert msg.token_counts_N.tolist() == [5, 3, 4]


def test_a_forward_may_be_tagged_with_groups_alone(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "groups", every_n_steps=1, max_samples_per_step=3)
    ids = torch.randint(0, VOCAB, (3, 8))
    mon.tag(groups=["math", "code", "math"])
    run_one_step(model, mon, ids)
    mon.close()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing("train")
    assert list(msg.sample_ids) == ["0:0", "0:1", "0:2"] and list(msg.groups) == ["math", "code", "math"]


@pytest.mark.parametrize("call", ["model(...)", "model.forward(...)"])
def test_training_the_model_around_its_hooks_is_warned_about_once(call, sink, caplog):
    """model.forward(...) skips module hooks: nothing can be summarized. Silence would look like a quiet
    run; after some optimizer steps with no training forward seen, the agent says why, once."""
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "around", every_n_steps=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    forward = model.forward if call == "model.forward(...)" else model
    ids = torch.randint(0, VOCAB, (2, 8))
    with caplog.at_level(logging.WARNING, logger="grokwatch.agent"):
        for _ in range(2 * monitor_module.STEPS_BEFORE_UNSEEN_WARNING):
            forward(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    mon.close()
    warnings = [r for r in caplog.records if "no training forward" in r.getMessage()]
    assert len(warnings) == (1 if call == "model.forward(...)" else 0)


def test_untagged_rows_of_several_ranks_carry_their_rank(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "ranks", every_n_steps=1, max_samples_per_step=2)
    mon.sampler.rank, mon.sampler.world_size = 1, 2  # what attach() reads from torch.distributed
    run_one_step(model, mon, torch.randint(0, VOCAB, (2, 8)))
    mon.close()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing()
    assert list(msg.sample_ids) == ["0:1:0", "0:1:1"]


def test_ids_and_groups_given_as_tensors_are_their_values(sink):
    """A DataLoader collates integer sample ids (and domain ids) into tensors: tag() takes their values,
    not "tensor(7)" per element."""
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "tensor-ids", every_n_steps=1, max_samples_per_step=2)
    run_one_step(model, mon, torch.randint(0, VOCAB, (2, 8)), ids=torch.tensor([17, 4]), groups=torch.tensor([1, 0]))
    mon.close()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing()
    assert sorted(zip(msg.sample_ids, msg.groups)) == [("17", "1"), ("4", "0")]


def test_several_optimizers_make_one_step_and_another_models_optimizer_none(sink):
    """MoE training often steps the experts and the rest with two optimizers (their own learning rates),
    and a loop may train another model too: the step the agent counts is a training step of its model."""
    model = tiny_model("olmoe")
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    rest = [p for n, p in model.named_parameters() if ".experts." not in n]
    optimizers = [torch.optim.SGD(experts, lr=1e-3), torch.optim.SGD(rest, lr=1e-3)]
    other = torch.nn.Linear(4, 1)
    other_opt = torch.optim.SGD(other.parameters(), lr=1e-3)
    mon = gw.attach(model, sink.endpoint, "two-optimizers", every_n_steps=2, max_samples_per_step=2)
    for _ in range(4):
        ids = torch.randint(0, VOCAB, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        other(torch.randn(3, 4)).sum().backward()
        other_opt.step()
    stats = mon.stats()
    mon.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    assert stats["step"] == 4
    assert [m.step for m in sink.routing()] == [0, 2]


def test_sampling_follows_the_same_sample_ids_over_steps(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "follow", every_n_steps=2, max_samples_per_step=2)
    pool = [f"doc-{i}" for i in range(6)]
    for step in range(4):
        ids = torch.randint(0, VOCAB, (6, 8))
        perm = list(np.random.default_rng(step).permutation(6))
        run_one_step(model, mon, ids, ids=[pool[i] for i in perm], groups=["g"] * 6)
    mon.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    msgs = sink.routing()
    assert [m.step for m in msgs] == [0, 2]  # every_n_steps=2, counted by the optimizer hook
    assert set(msgs[0].sample_ids) == set(msgs[1].sample_ids)


def test_probe_reruns_seen_samples_with_their_loss(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "probe", every_n_steps=1, max_samples_per_step=2, probe_every_n_steps=2,
                    probe_size=3)
    for step in range(4):
        ids = torch.randint(0, VOCAB, (2, 8))
        run_one_step(model, mon, ids, ids=[f"s{step}a", f"s{step}b"], groups=["g", "h"])
    mon.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing) and m.source == "probe"]) >= 4)
    probes = sink.routing("probe")
    assert sorted({m.step for m in probes}) == [2, 4]
    ids_at_4 = [sid for m in probes if m.step == 4 for sid in m.sample_ids]
    assert sorted(ids_at_4) == ["s0a", "s0b", "s1a"]
    for m in probes:
        assert m.loss_N is not None and (m.loss_N > 0).all()
    assert model.training  # the probe restores train mode


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
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    assert [m.step for m in sink.routing()] == [0, 2]
    msg = sink.routing()[-1]
    assert msg.mean_probs_NLE.shape == (2, 3, 4)
    assert msg.topk_counts_NLE.sum(axis=2).tolist() == [[5, 1, 5], [5, 1, 5]]
    means = torch.stack([torch.softmax(x, -1).mean(dim=1) for x in model.seen], dim=1)  # [N, L, E]
    np.testing.assert_allclose(msg.mean_probs_NLE, means.numpy(), rtol=1e-5, atol=1e-6)
    emb = torch.stack([means[:, i] @ r.weight.detach().double() for i, r in enumerate(model.routers)], dim=1)
    cos = torch.nn.functional.cosine_similarity(emb[:, :-1], emb[:, 1:], dim=-1)
    np.testing.assert_allclose(msg.adj_cosine_NL1, cos.numpy(), rtol=1e-4, atol=1e-5)
    # The router z-loss: the mean over each sample's tokens of logsumexp(logits)² (ST-MoE), per layer.
    zloss = torch.stack([torch.logsumexp(x, -1).square().mean(dim=1) for x in model.seen], dim=1)  # [N, L]
    np.testing.assert_allclose(msg.zloss_NL, zloss.numpy(), rtol=1e-5, atol=1e-6)


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
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 1)
    (msg,) = sink.routing()
    return msg


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
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing()
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
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 3)
    first, *later = sink.routing()
    assert stats["hook_errors"] == 0
    assert first.adj_cosine_NL1 is None
    assert sum("freed before the reduction" in r.getMessage() for r in caplog.records) == 1
    for step, msg in enumerate(later, start=1):
        (l0, w0), (l1, w1) = model.seen[2 * step:2 * step + 2]
        emb = [torch.softmax(logits, -1).mean(dim=(0, 1)) @ w for logits, w in ((l0, w0), (l1, w1))]
        expected = torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0).item()
        np.testing.assert_allclose(msg.adj_cosine_NL1[0, 0], expected, rtol=1e-4, atol=1e-5)


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
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    [msg] = sink.routing()
    assert stats["hook_errors"] == 0 and stats["dropped"] == {"incomplete": 1}
    assert sum("recorded MoE layers [0, 0] of 0..1" in r.message for r in caplog.records) == 1
    assert msg.step == 0 and msg.adj_cosine_NL1 is None
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
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    first, second = sink.routing()
    assert stats["hook_errors"] == 0 and first.adj_cosine_NL1 is None
    assert sum("were freed before the reduction" in r.getMessage() for r in caplog.records) == 1
    L = shape.num_layers
    calls = tap.calls[L:2 * L]
    ref = reference_summaries([c[0] for c in calls], [c[1] for c in calls], np.ones((2, 9)), [0, 1], weights,
                              "softmax", 2, 8)
    check_against_reference(second, ref)


def test_pause_removes_every_hook_and_resume_restores_them(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "pause", every_n_steps=1)
    hooked = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked
    mon.pause()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    ids = torch.randint(0, VOCAB, (2, 8))
    run_one_step(model, mon, ids)  # paused: nothing sampled
    mon.resume()
    run_one_step(model, mon, ids)
    mon.close()
    sink.drain(until=lambda ms: any(isinstance(m, Routing) for m in ms))
    assert [m.step for m in sink.routing()] == [1]  # the step count went on while paused


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


def test_layer_hooks_are_armed_only_for_the_forwards_that_are_summarized(sink):
    """A module with hooks takes torch's slow call path; unsampled steps must not pay for it."""
    model = tiny_model("olmoe")
    routers = [layer.router for layer in discover(model).layers]
    seen = []
    taps = [r.register_forward_pre_hook(lambda m, a: seen.append(len(m._forward_hooks))) for r in routers]
    mon = gw.attach(model, sink.endpoint, "armed", every_n_steps=2)
    ids = torch.randint(0, VOCAB, (2, 8))
    for _ in range(3):  # steps 0 (sampled), 1 (not), 2 (sampled)
        run_one_step(model, mon, ids)
        assert not any(r._forward_hooks for r in routers)  # disarmed between forwards
    mon.close()
    n = len(routers)
    assert seen == [1] * n + [0] * n + [1] * n
    for t in taps:
        t.remove()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    assert [m.step for m in sink.routing()] == [0, 2]


def test_at_every_step_the_layer_hooks_stay_armed_and_other_forwards_are_not_summarized(sink):
    """every_n_steps=1: arming and disarming each forward would cost more than it saves. A forward the
    agent does not summarize (the user's no-grad eval, a second micro-batch past the budget) still
    passes through the armed hooks: it must ship nothing and leave the next summary intact."""
    model = tiny_model("olmoe")
    routers = [layer.router for layer in discover(model).layers]
    mon = gw.attach(model, sink.endpoint, "kept", every_n_steps=1, max_samples_per_step=2)
    ids = torch.randint(0, VOCAB, (2, 8))
    run_one_step(model, mon, ids)  # learns that the routers return their indices: re-armed without experts hooks
    run_one_step(model, mon, ids)
    assert all(len(r._forward_hooks) == 1 for r in routers)  # still armed after the forward
    with torch.no_grad():
        model(input_ids=torch.randint(0, VOCAB, (3, 5)))  # eval-like forward, other shape
    model(input_ids=ids, labels=ids).loss.backward()  # same step, budget spent: not summarized
    run_one_step(model, mon, ids)
    mon.close()
    assert not any(r._forward_hooks for r in routers)
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 3)
    msgs = sink.routing()
    assert [m.step for m in msgs] == [0, 1, 2] and all(m.token_counts_N.tolist() == [8, 8] for m in msgs)
    K = discover(model).top_k
    assert all((m.topk_counts_NLE.sum(axis=2) == 8 * K).all() for m in msgs)  # each token counted once
    assert mon.stats()["dropped"] == {} and mon.stats()["hook_errors"] == 0


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
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) >= 2)
    msgs = sink.routing()
    assert len(msgs) == 2
    for n, msg in enumerate(msgs):
        for row in range(2):
            for layer in range(3):
                expected = np.bincount(decisions[3 * n + layer].reshape(2, 6, K)[row].numpy().ravel(), minlength=E)
                np.testing.assert_array_equal(msg.topk_counts_NLE[row, layer], expected)
        assert (msg.topk_counts_NLE[:, :, 0] == 6).all()  # the bias always selects expert 0
    assert mon._needs_experts_hook == [True, True, True]

    # A router that returns its indices (every transformers 5.24 family): the experts hook is dropped.
    olmoe = tiny_model("olmoe")
    mon = gw.attach(olmoe, sink.endpoint, "with-indices", every_n_steps=1)
    run_one_step(olmoe, mon, torch.randint(0, VOCAB, (2, 8)))
    assert not any(mon._needs_experts_hook)
    run_one_step(olmoe, mon, torch.randint(0, VOCAB, (2, 8)))
    assert not any(layer.experts._forward_pre_hooks for layer in discover(olmoe).layers)  # kept armed: routers only
    mon.close()


def test_a_script_that_dies_without_close_still_flushes_what_it_summarized(sink):
    """The training script raises (or just ends) without mon.close(): at interpreter exit the monitor closes
    itself, so the summaries already handed over go out and the collector gets the agent's last heartbeat
    (its counts); the process exits with the script's own error, promptly."""
    import subprocess
    import sys
    import textwrap

    from grokwatch.wire import Heartbeat

    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[1])!r})
        from tiny_models import VOCAB, tiny_model
        import grokwatch.agent as gw
        model = tiny_model("olmoe")
        mon = gw.attach(model, {sink.endpoint!r}, "dies", every_n_steps=1, max_samples_per_step=2,
                        heartbeat_interval_s=600)
        for step in range(3):
            ids = torch.randint(0, VOCAB, (2, 8))
            model(input_ids=ids, labels=ids).loss.backward()
            mon.step(step + 1)
        raise RuntimeError("the training script fails")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "the training script fails" in done.stderr
    sink.drain(until=lambda ms: any(isinstance(m, Heartbeat) for m in ms))
    assert [m.step for m in sink.routing()] == [0, 1, 2]
    [beat] = [m for m in sink.messages if isinstance(m, Heartbeat)]
    assert beat.messages_sent == 4 and not beat.disabled  # the hello and three summaries


def test_router_zloss_false_leaves_it_out(sink):
    msg = _one_routing_message(sink, lambda x: torch.softmax(x, -1), "no-zloss", router_zloss=False)
    assert msg.zloss_NL is None and msg.mean_probs_NLE.shape == (2, 1, 4)
