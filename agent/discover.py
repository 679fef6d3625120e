"""Find the MoE routers of a model (transformers 5.x) and what they return.

Every 5.x MoE block has a router module (``mlp.gate``; ``mlp.router`` in
GPT-OSS) whose class is named by
``type(model.model)._can_record_outputs["router_logits"]``. In 5.24 each router
returns ``(router_logits[T,E], top_k_weights[T,K], top_k_index[T,K])``; the
index tensor is the exact routing decision. Where a model does not declare
its router class (DeepSeek-V3 in 5.17), a ``gate``/``router`` module beside an
``experts`` module is one. Where a router returns no indices
(DeepSeek-V3 before 5.13) the sibling ``experts`` module's forward pre-hook
receives ``(hidden[T,H], top_k_index[T,K], top_k_weights[T,K])`` instead.

We never turn on ``output_router_logits``: in 5.x it adds the aux loss to the
training loss.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# Families whose routers score experts with a sigmoid (METRICS.md Notation:
# the distribution is the sigmoid scores divided by their sum). Others are
# found from their code (``_scores_by_sigmoid``).
SIGMOID_MODEL_TYPES = frozenset({"deepseek_v3", "glm4_moe", "dots1", "kimi_k2"})


@dataclass
class MoELayer:
    name: str  # module path of the router, e.g. "model.layers.3.mlp.gate"
    router: Optional[nn.Module]  # None in manual mode (record())
    experts: Optional[nn.Module]  # sibling experts module (indices fallback)
    logits_index: int  # which output of the router holds the logits
    weight_EH: Optional[torch.Tensor]  # router weight rows: expert embeddings (METRICS.md §2)
    weight_name: str = "weight"  # its name in the router ("wg.weight": a Linear inside, HunYuan's)

    def weight_now(self) -> Optional[torch.Tensor]:
        """The router's weight as it is now: FSDP swaps parameters in for a layer's forward, to_empty()
        replaces them. Read by name, not kept: ``weight_EH`` is the one seen at discovery."""
        if self.router is None:
            return None
        if self.weight_name == "weight":
            return getattr(self.router, "weight", None)
        try:
            return self.router.get_parameter(self.weight_name)
        except AttributeError:
            return None


@dataclass
class MoEShape:
    num_layers: int
    num_experts: int
    top_k: int
    distribution: str  # "softmax" | "sigmoid"
    layers: list[MoELayer]
    # transformers 5.0-5.5 routers put probabilities in the logits slot: check on the device.
    detect_probs: bool = False


def _returns_probs_maybe() -> bool:
    try:
        import transformers

        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    except Exception:
        return True  # unknown version: keep the on-device check
    return (major, minor) < (5, 6)


class NoMoELayersError(ValueError):
    pass


def _recorder(model: nn.Module):
    for module in model.modules():
        record = getattr(type(module), "_can_record_outputs", None)
        if isinstance(record, dict) and "router_logits" in record:
            return record["router_logits"]
    return None


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _router_by_structure(model: nn.Module):
    """For releases whose model does not declare ``router_logits`` (DeepSeek-V3
    before 5.18, say): the class of the ``gate``/``router`` child with a 2-D
    weight of every block that also has an ``experts`` child."""
    found = set()
    for module in model.modules():
        if not isinstance(getattr(module, "experts", None), nn.Module):
            continue
        for name in ("gate", "router"):
            child = getattr(module, name, None)
            weight = getattr(child, "weight", None)
            if isinstance(child, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                found.add(type(child))
                break
    return found.pop() if len(found) == 1 else None


def _parent(modules: dict, name: str) -> Optional[nn.Module]:
    """The module holding ``name`` (a router's MoE block)."""
    return modules.get(name.rsplit(".", 1)[0]) if "." in name else None


def _calls(function) -> set[str]:
    """The names a function's code calls (``torch.sigmoid(x)``, ``x.sigmoid()``: "sigmoid")."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return set()
    return {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            for node in ast.walk(tree) if isinstance(node, ast.Call)}


def _scores_by_sigmoid(router: nn.Module, block: Optional[nn.Module], config) -> bool:
    """Whether the routers score experts with a sigmoid. A config that names the choice decides
    (``scoring_func``; Cohere2-MoE's ``expert_selection_fn``); then the known families; then the
    code: a sigmoid and no softmax among the calls of the router's forward and of its block's
    ``route_tokens_to_experts`` (where DeepSeek-style blocks score the router's logits) — Llama 4,
    MiniMax-M2, Nemotron-H, GLM-4-MoE-Lite, EXAONE-MoE, Solar-Open, AFMoE, Laguna in transformers 5.24."""
    named = _config_value(config, "scoring_func", "expert_selection_fn", default=None)
    if isinstance(named, str):
        return named == "sigmoid"
    if getattr(config, "model_type", "") in SIGMOID_MODEL_TYPES:
        return True
    calls = _calls(type(router).forward)
    route = getattr(type(block), "route_tokens_to_experts", None) if block is not None else None
    if route is not None:
        calls |= _calls(route)
    return "sigmoid" in calls and "softmax" not in calls


def _router_weight(router: nn.Module) -> tuple[Optional[torch.Tensor], str]:
    """The router's 2-D weight and its name in the router: its own ``weight``, else its only 2-D
    parameter (a Linear inside the router module: HunYuan-MoE's ``wg``, JetMoE's ``layer``)."""
    weight = getattr(router, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight, "weight"
    named = [(name, p) for name, p in router.named_parameters() if p.dim() == 2]
    return (named[0][1], named[0][0]) if len(named) == 1 else (None, "weight")


def _output_width(layers: list[MoELayer], hidden: Optional[int]) -> Optional[int]:
    """How many scores each router writes, from its weight: [E, H] with H the hidden size, the same E in
    every layer. It can exceed the config's expert count: LongCat-Flash also routes to zero-computation
    experts, which are real routing choices. None when a weight is missing or not of that shape
    (transposed, sharded away): the config says then."""
    rows = set()
    for layer in layers:
        w = layer.weight_EH
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or hidden is None or w.shape[1] != hidden:
            return None
        rows.add(int(w.shape[0]))
    return rows.pop() if len(rows) == 1 and min(rows) >= 2 else None


def discover(model: nn.Module) -> MoEShape:
    """The MoE layers of a transformers 5.x model, in forward order.
    Raises ``NoMoELayersError`` naming the class when there are none."""
    recorder = _recorder(model)
    router_cls = getattr(recorder, "target_class", None)
    if router_cls is None:
        router_cls = _router_by_structure(model)  # the logits are the first output, as in every 5.x router
    if router_cls is None:
        raise NoMoELayersError(
            f"{type(model).__name__}: no MoE router found (the model declares no 'router_logits' output). "
            "For other models call attach(..., num_layers=, num_experts=, top_k=) and mon.record() "
            "from your router's forward.")
    index = int(getattr(recorder, "index", 0) or 0)
    modules = dict(model.named_modules())
    layers = []
    for name, module in model.named_modules():
        if type(module) is not router_cls:
            continue
        parent = _parent(modules, name)
        experts = getattr(parent, "experts", None) if parent is not None else None
        weight, weight_name = _router_weight(module)
        layers.append(MoELayer(name, module, experts if isinstance(experts, nn.Module) else None, index,
                               weight, weight_name))
    if not layers:
        raise NoMoELayersError(f"{type(model).__name__}: declares router class {router_cls.__name__} "
                               "but contains none (all layers dense?)")
    config = getattr(model, "config", None)
    first = layers[0].router
    num_experts = _output_width(layers, _config_value(config, "hidden_size", default=None)) or int(
        _config_value(first, "num_experts", default=None)
        or _config_value(config, "num_experts", "num_local_experts", "n_routed_experts")
        or layers[0].weight_EH.shape[0])
    block = _parent(modules, layers[0].name)
    top_k = (_config_value(first, "top_k", default=None) or _config_value(block, "top_k", default=None)
             or _config_value(config, "num_experts_per_tok", "moe_topk", "top_k"))
    if not isinstance(top_k, int) or top_k < 1:
        raise NoMoELayersError(f"{type(model).__name__}: found its routers ({type(first).__name__}) but not how many "
                               "experts each token takes; attach(..., num_layers=, num_experts=, top_k=) and "
                               "mon.record() say it")
    for layer in layers:  # expert embeddings are its rows: [E, H]
        if layer.weight_EH is not None and layer.weight_EH.shape[0] != num_experts:
            layer.weight_EH = None
    sigmoid = _scores_by_sigmoid(first, block, config)
    return MoEShape(len(layers), num_experts, top_k, "sigmoid" if sigmoid else "softmax", layers,
                    detect_probs=_returns_probs_maybe())
