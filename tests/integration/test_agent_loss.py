"""The training loss as phase evidence, as the agent sends it (METRICS.md §5): per-row losses averaged per
tagged group, a dict per group, a scalar only where it names one group; on the sampled steps of
step(loss=...), at once with log_loss(); never raising, never syncing in training."""

from __future__ import annotations

import pytest
import torch

import grokwatch.agent as gw
from grokwatch.wire import Loss
from sink import Sink
from tiny_models import VOCAB, tiny_model


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def _forward(model, mon, groups):
    ids = torch.randint(0, VOCAB, (len(groups), 8))
    mon.tag([f"r{i}" for i in range(len(groups))], groups)
    return model(input_ids=ids)


def _losses(sink):
    sink.drain(until=lambda ms: False, timeout_s=1.5)
    return [m for m in sink.messages if isinstance(m, Loss)]


def test_each_form_of_loss_reaches_the_wire_per_group(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "loss", every_n_steps=2)
    _forward(model, mon, ["a", "b", "a", "b"])
    mon.step(2, loss=torch.tensor([1.0, 3.0, 2.0, 5.0]))  # per row: a = 1.5, b = 4.0
    mon.step(3, loss=torch.tensor([9.0, 9.0, 9.0, 9.0]))  # not a sampled step: not sent
    mon.log_loss(3, {"a": torch.tensor(0.5), "b": 0.25})  # a dict, at once
    _forward(model, mon, ["a", "a"])
    mon.log_loss(4, torch.tensor(0.75))  # a scalar over rows of one group names it
    _forward(model, mon, ["a", "b"])
    mon.log_loss(5, 0.9)  # a scalar over two groups names none: not sent, counted
    mon.log_loss(6, {"a": float("nan"), "b": 1.0})  # non-finite left out
    mon.close()
    got = {m.step: m.losses for m in _losses(sink)}
    assert got == {2: {"a": 1.5, "b": 4.0}, 3: {"a": 0.5, "b": 0.25}, 4: {"a": 0.75}, 6: {"b": 1.0}}
    assert mon.stats()["unattributed_losses"] == 1


def test_an_untagged_run_sends_its_loss_as_group_all(sink):
    model = tiny_model("olmoe")
    mon = gw.attach(model, sink.endpoint, "plain", every_n_steps=1)
    model(input_ids=torch.randint(0, VOCAB, (2, 8)))
    mon.step(1, loss=torch.tensor(2.5, requires_grad=True) * 1.0)  # a graph-attached loss: detached, not kept
    mon.close()
    assert [m.losses for m in _losses(sink)] == [{"all": 2.5}]
