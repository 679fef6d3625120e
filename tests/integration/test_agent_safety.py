"""The agent never breaks or changes training: bit-identical losses, no collector, exceptions inside hooks,
models moved after attach, compiled reductions that change or fail, memory bounds, a script that dies."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch._dynamo
import zmq
from capture import (
    CUDA,
    RouterTap,
    check_against_reference,
    reference_summaries,
    run_one_step,
)
from helpers import wait_until
from tiny_models import VOCAB, tiny_model

import grokwatch.agent as gw
import grokwatch.agent.monitor as monitor_module
import grokwatch.agent.reduce as reduce_module
from grokwatch.agent.discover import discover
from grokwatch.wire import Routing


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
    [msg] = sink.wait_routing()
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
    [msg] = sink.wait_routing()
    ref = reference_summaries([c[0] for c in tap.calls], [c[1] for c in tap.calls], np.ones((2, 9)), [0, 1],
                              tap.weights, "softmax", 2, 8)
    check_against_reference(msg, ref)


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
        monkeypatch.setattr("grokwatch.agent.summaries.reduce_all", broken_reduction)
    else:
        def broken(*args, **kwargs):
            raise RuntimeError("broken gather")
        monkeypatch.setattr("grokwatch.agent.capture.gather_layer", broken)
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
    with pytest.raises(ValueError, match="reduction_layout"):
        gw.attach(tiny_model("olmoe"), "tcp://127.0.0.1:5999", "x", reduction_layout="experts_first")
    for most in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="reduction_layers_per_batch"):
            gw.attach(tiny_model("olmoe"), "tcp://127.0.0.1:5999", "x", reduction_layers_per_batch=most)


@pytest.mark.parametrize("compile_reduction", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_reduction_memory_mb_bounds_each_batch_and_changes_nothing_shipped(compile_reduction, sink):
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
    copies = reduce_module.TRANSIENT_COPIES_COMPILED if compile_reduction else reduce_module.TRANSIENT_COPIES_OP_BY_OP
    per_layer = copies * 4 * M * S * E
    model = Stack()
    torch._dynamo.reset()
    x = torch.randn(M, S, 8)
    shipped = []
    for budget_mb, most in ((256.0, None), (2.5 * per_layer / 2**20, None), (256.0, 1)):
        mon = model.mon = gw.attach(model, sink.endpoint, f"budget-{budget_mb}-{most}", num_layers=L, num_experts=E,
                                    top_k=1, every_n_steps=1, max_samples_per_step=M, reduction_memory_mb=budget_mb,
                                    compile_reduction=compile_reduction, reduction_layers_per_batch=most)
        mon.step(0)
        model(x)
        assert mon.stats()["reduction"] == ("compiled" if compile_reduction else "op by op")
        batches.append(list(mon.stats()["reduction_batches"]))
        mon.close()
        sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing)]) > len(shipped))
        shipped = sink.routing()
    assert batches == [[5], [2, 2, 1], [1, 1, 1, 1, 1]]
    whole, split, single = shipped
    np.testing.assert_allclose(split.mean_probs_NLE, whole.mean_probs_NLE, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(split.topk_counts_NLE, whole.topk_counts_NLE)
    np.testing.assert_allclose(split.entropy_NL, whole.entropy_NL, rtol=1e-6, atol=1e-7)
    assert whole.adj_cosine_NJ is not None and split.adj_cosine_NJ is not None
    np.testing.assert_allclose(split.adj_cosine_NJ, whole.adj_cosine_NJ, rtol=1e-5, atol=1e-6)
    for one in (split, single):
        np.testing.assert_allclose(one.mean_probs_NLE, whole.mean_probs_NLE, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(one.topk_counts_NLE, whole.topk_counts_NLE)
        assert one.adj_cosine_NJ is not None
        np.testing.assert_allclose(one.adj_cosine_NJ, whole.adj_cosine_NJ, rtol=1e-5, atol=1e-6)


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


def test_a_script_that_dies_without_close_still_flushes_what_it_summarized(sink):
    """The training script raises (or just ends) without mon.close(): at interpreter exit the monitor closes
    itself, so the summaries already handed over go out and the collector gets the agent's last heartbeat
    (its counts); the process exits with the script's own error, promptly."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from grokwatch.wire import Heartbeat

    script = textwrap.dedent(f"""
        import torch
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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and "the training script fails" in done.stderr
    sink.drain(until=lambda ms: any(isinstance(m, Heartbeat) for m in ms))
    assert [m.step for m in sink.routing()] == [0, 1, 2]
    [beat] = [m for m in sink.messages if isinstance(m, Heartbeat)]
    assert beat.messages_sent == 4 and not beat.disabled  # the hello and three summaries


def test_a_closed_and_deleted_monitor_frees_its_model(sink):
    """Issue 29: the fork handler held the monitor's bound method for the life of the process, and with it
    the model (+135 MB for three closed tiny models). It holds a weak reference now."""
    import gc
    import weakref

    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "freed", every_n_steps=1)
    ids = torch.randint(0, VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    mon.close()
    alive = weakref.ref(model)
    del model, mon
    gc.collect()
    assert alive() is None
