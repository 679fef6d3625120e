"""Fixtures of the integration tests: a real PULL socket to read the agents' messages (sink), and the
reduction layouts the capture tests run under (layout)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from sink import Sink

import grokwatch.agent.compiled as compiled_module


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


@pytest.fixture(params=["device", "experts_last", "layer_by_layer",
                        pytest.param("compiled", marks=pytest.mark.slow)])
def layout(request, monkeypatch):
    """attach() options choosing the batched reduction's strategy; a test passes them on (``**layout``).
    "device": attach()'s defaults on the test's device: on CPU op by op with the experts at dim -2
    ([L, M, E, S]); on CUDA compiled. "experts_last": op by op with the experts last ([L, M, S, E], the
    CUDA layout), on any machine. "layer_by_layer": as "device", with each layer reduced in a batch of
    its own (what reduction_memory_mb does to a model too large for it; the cosines then come from
    the staged means). "compiled": the reduction through torch.compile (on CPU; on CUDA that is
    "device"). Wherever compiled, the test fails unless the compiled code ran and never fell back."""
    callspec = getattr(request.node, "callspec", None)
    on_cuda = callspec is not None and callspec.params.get("device") == "cuda"
    options = {"device": {},
               "experts_last": dict(reduction_layout="experts_last", compile_reduction=False),
               "layer_by_layer": dict(reduction_layers_per_batch=1),
               "compiled": dict(compile_reduction=True)}[request.param]
    if request.param == "compiled" and on_cuda:
        pytest.skip("on CUDA the device's default is compiled")
    compiled = request.param == "compiled" or (request.param == "device" and on_cuda)
    made = []
    if compiled:
        torch._dynamo.reset()  # a fresh compile for this test's shapes (dynamo's recompile limit is per function)

        class Tracked(compiled_module.CompiledReduction):  # observes the compiled reductions made
            def __init__(self):
                super().__init__()
                made.append(self)

        monkeypatch.setattr(compiled_module, "CompiledReduction", Tracked)
    yield options
    if compiled:
        assert made and all(c.error is None for c in made), [c.error for c in made]
        assert all(c.compile_seconds is not None for c in made), "the compiled reduction never ran"
