"""``attach()``: validates the options, finds the MoE layers (discover.py) or takes the manual
shape, and returns the Monitor (monitor.py) with its hooks installed."""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from grokwatch.agent.config import DEFAULT_ENDPOINT, DEFAULT_EVERY_N_STEPS, DEFAULT_SAMPLES_PER_STEP, AgentConfig
from grokwatch.agent.discover import MoELayer, MoEShape, discover
from grokwatch.agent.monitor import Monitor

log = logging.getLogger("grokwatch.agent")


def attach(model: nn.Module, endpoint: Optional[str] = None, run: Optional[str] = None, *,
           every_n_steps: int = DEFAULT_EVERY_N_STEPS, max_samples_per_step: int = DEFAULT_SAMPLES_PER_STEP,
           probe_every_n_steps: int = 0, probe_size: int = 0, num_layers: Optional[int] = None,
           num_experts: Optional[int] = None, top_k: Optional[int] = None, distribution: str = "softmax",
           router_weights: Optional[Sequence[torch.Tensor]] = None, probe_fn: Optional[Callable] = None,
           layer_names: Optional[Sequence[str]] = None, **options) -> Monitor:
    """Hook the MoE routers of ``model`` and stream pathway summaries to a collector.

        import grokwatch.agent as gw
        mon = gw.attach(model, endpoint="tcp://127.0.0.1:5557", run="olmoe-a")
        for step, batch in enumerate(loader):
            mon.tag(sample_ids=batch["ids"], groups=batch["domain"])   # optional
            loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
        mon.close()

    transformers 5.x MoE models are found automatically. For any other model
    pass ``num_layers``, ``num_experts``, ``top_k`` and call ``mon.record()``
    from the router's forward. Fails fast (ValueError) on a bad configuration
    or a model without MoE layers; afterwards never raises into training.
    The probe (``probe_every_n_steps``, ``probe_size``) re-runs seen samples;
    ``probe_fn(model, input_ids, attention_mask) -> per-sample loss`` replaces
    the default causal-LM loss for other tasks.
    Endpoint and run default to GROKWATCH_ENDPOINT and GROKWATCH_RUN.
    The hello names the MoE layers (their module names; in manual mode
    ``layer_names`` if given, with global layer numbers under pipeline
    parallelism): a collector refuses a second set of layers under one run.
    """
    try:  # a misspelt GROKWATCH_* variable is one warning, never an error
        from grokwatch.envvars import warn_unknown

        warn_unknown(os.environ, log)
    except Exception:
        pass
    config = AgentConfig(
        endpoint=endpoint or os.environ.get("GROKWATCH_ENDPOINT", DEFAULT_ENDPOINT),
        run=run or os.environ.get("GROKWATCH_RUN", "default"),
        **{key: options.pop(key, None) or os.environ.get(f"GROKWATCH_{key.upper()}") or None
           for key in ("curve_server_key", "curve_secret_key")},
        every_n_steps=every_n_steps, max_samples_per_step=max_samples_per_step,
        probe_every_n_steps=probe_every_n_steps, probe_size=probe_size, **options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
    if num_layers is not None:
        if not (num_experts and top_k) or num_layers < 1 or num_experts < 2 or not 1 <= top_k <= num_experts:
            raise ValueError("manual mode: num_layers >= 1, num_experts >= 2 and 1 <= top_k <= num_experts")
        if distribution not in ("softmax", "sigmoid", "topk"):
            raise ValueError(f"distribution: {distribution!r} must be softmax, sigmoid or topk")
        layers = [MoELayer(f"manual.{i}", None, None, 0, None) for i in range(num_layers)]
        shape = MoEShape(num_layers, num_experts, top_k, distribution, layers)
        weights = list(router_weights) if router_weights is not None else [None] * num_layers
        if len(weights) != num_layers:
            raise ValueError(f"router_weights: {len(weights)} given for {num_layers} layers")
        if layer_names is not None:
            layer_names = [str(name) for name in layer_names]
            if len(layer_names) != num_layers or len(set(layer_names)) != num_layers:
                raise ValueError(f"layer_names: {num_layers} distinct names needed, got {layer_names!r:.200}")
        return Monitor(model, config, shape, router_weights=weights, probe_fn=probe_fn, layer_names=layer_names)
    if layer_names is not None:
        raise ValueError("layer_names is for manual mode (num_layers=...); found layers are named by their modules")
    shape = discover(model)
    return Monitor(model, config, shape, probe_fn=probe_fn, layer_names=[layer.name for layer in shape.layers])
