"""Which forwards and rows the agent summarizes, under which names: tags, ranks, optimizers, the probe,
and hooks armed only for the forwards it summarizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
from capture import (
    run_one_step,
)
from tiny_models import VOCAB, tiny_model

import grokwatch.agent as gw
from grokwatch.agent.discover import discover
from grokwatch.wire import Routing


def test_untagged_rows_of_several_ranks_carry_their_rank(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "ranks", every_n_steps=1, max_samples_per_step=2)
    mon.identity.rank, mon.identity.world_size = 1, 2  # what attach() reads from torch.distributed
    run_one_step(model, mon, torch.randint(0, VOCAB, (2, 8)))
    mon.close()
    [msg] = sink.wait_routing()
    assert list(msg.sample_ids) == ["0:1:0", "0:1:1"]


def test_ids_and_groups_given_as_tensors_are_their_values(sink):
    """A DataLoader collates integer sample ids (and domain ids) into tensors: tag() takes their values,
    not "tensor(7)" per element."""
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "tensor-ids", every_n_steps=1, max_samples_per_step=2)
    run_one_step(model, mon, torch.randint(0, VOCAB, (2, 8)), ids=torch.tensor([17, 4]), groups=torch.tensor([1, 0]))
    mon.close()
    [msg] = sink.wait_routing()
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
    msgs = sink.wait_routing(2)
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


def test_fresh_documents_ride_each_probe_round_after_the_training_samples_under_their_own_label(sink):
    """METRICS.md §6: the fresh (never trained) documents a user hands probe_fresh() are routed every
    round, after the round's training samples, as FRESH_PREFIX + group, with their loss."""
    from grokwatch.wire import FRESH_PREFIX

    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "fresh", every_n_steps=1, max_samples_per_step=2, probe_every_n_steps=2,
                    probe_size=2)
    mon.probe_fresh([(f"new{i}", "g", torch.randint(0, VOCAB, (6,)).tolist()) for i in range(3)])
    for step in range(4):
        ids = torch.randint(0, VOCAB, (2, 8))
        run_one_step(model, mon, ids, ids=[f"s{step}a", f"s{step}b"], groups=["g", "g"])
    mon.close()
    sink.drain(until=lambda ms: len([m for m in ms if isinstance(m, Routing) and m.source == "probe"]) >= 4)
    for step in (2, 4):
        msgs = [m for m in sink.routing("probe") if m.step == step]
        order = [(sid, grp) for m in msgs for sid, grp in zip(m.sample_ids, m.groups)]
        assert order[:2] == [("s0a", "g"), ("s0b", "g")]  # the training samples first
        assert order[2:] == [(f"new{i}", FRESH_PREFIX + "g") for i in range(3)]
        assert all(m.loss_N is not None for m in msgs)


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


@pytest.mark.parametrize("counts", [False, True], ids=["counts-off", "counts-on"])
def test_layer_hooks_are_armed_only_for_the_forwards_that_need_them(sink, counts):
    """A module with hooks takes torch's slow call path: with the all-token counts off, unsampled steps must
    not pay for it (armed for summarized forwards only); with them on (the default) every training forward
    needs the routers' decisions, so the hooks stay armed."""
    model = tiny_model("olmoe")
    routers = [layer.router for layer in discover(model).layers]
    seen = []
    taps = [r.register_forward_pre_hook(lambda m, a: seen.append(len(m._forward_hooks))) for r in routers]
    mon = gw.attach(model, sink.endpoint, f"armed-{counts}", every_n_steps=2, expert_counts=counts)
    ids = torch.randint(0, VOCAB, (2, 8))
    for _ in range(3):  # steps 0 (sampled), 1 (not), 2 (sampled)
        run_one_step(model, mon, ids)
        if not counts:
            assert not any(r._forward_hooks for r in routers)  # disarmed between forwards
    mon.close()
    n = len(routers)
    assert seen == ([1] * 3 * n if counts else [1] * n + [0] * n + [1] * n)
    for t in taps:
        t.remove()
    assert [m.step for m in sink.wait_routing(2)] == [0, 2]


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
    msgs = sink.wait_routing(3)
    assert [m.step for m in msgs] == [0, 1, 2] and all(m.token_counts_N.tolist() == [8, 8] for m in msgs)
    K = discover(model).top_k
    assert all((m.topk_counts_NLE.sum(axis=2) == 8 * K).all() for m in msgs)  # each token counted once
    assert mon.stats()["dropped"] == {} and mon.stats()["hook_errors"] == 0
