"""The paper's offline protocol: run the probe over saved checkpoints.

    grokwatch replay --checkpoints ckpt/checkpoint-* --samples samples.jsonl \\
                     --endpoint tcp://127.0.0.1:5557 --run olmoe-replay

Each checkpoint is loaded, the agent is attached, and every sample of the set
is re-run forward-only (source ``replay``, step = the checkpoint's step); the
collector turns the stream into the same metrics and journal as live training.
Checkpoints: Hugging Face ``save_pretrained`` directories, or ``.pt`` files of
``torch.save({"factory": "module:function", "config": {...}, "state_dict": ...,
"step": N})`` for hand-written models. Samples: JSON lines
``{"id": ..., "group": ..., "input_ids": [...]}``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from typing import Any, Callable, Optional

import torch

import grokwatch.agent as gw


def load_samples(path: str) -> list[tuple[str, str, list[int]]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append((str(row["id"]), str(row.get("group", "all")), [int(t) for t in row["input_ids"]]))
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: a sample needs id and input_ids ({exc})") from None
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint: trainer_state.json's global_step, a saved
    ``step``, or the last number in its name."""
    state = os.path.join(path, "trainer_state.json")
    if os.path.isfile(state):
        with open(state) as fh:
            return int(json.load(fh)["global_step"])
    numbers = re.findall(r"\d+", os.path.basename(os.path.normpath(path)))
    if not numbers:
        raise ValueError(f"{path}: cannot tell the checkpoint's step (no trainer_state.json, no number in its name)")
    return int(numbers[-1])


def load_checkpoint(path: str):
    """-> (model, step, probe_fn or None, extra attach() keywords)"""
    if os.path.isdir(path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path), checkpoint_step(path), None, {}
    blob = torch.load(path, map_location="cpu", weights_only=False)
    module_name, fn_name = blob["factory"].split(":")
    factory = getattr(importlib.import_module(module_name), fn_name)
    model, probe_fn, extra = factory(blob["config"])
    model.load_state_dict(blob["state_dict"])
    return model, int(blob.get("step", checkpoint_step(path))), probe_fn, extra


def replay(checkpoints: list[str], samples: list[tuple[str, str, list[int]]], endpoint: str, run: str,
           batch_size: int = 16, on_checkpoint: Optional[Callable[[str, int], None]] = None,
           attach_kwargs: Optional[dict] = None) -> list[int]:
    """Probe every checkpoint in step order; returns the steps replayed."""
    loaded = sorted(((checkpoint_step(c) if os.path.isdir(c) else None, c) for c in checkpoints),
                    key=lambda x: (x[0] is None, x[0] or 0))
    steps = []
    for _, path in loaded:
        model, step, probe_fn, extra = load_checkpoint(path)
        model.eval()
        kwargs: dict[str, Any] = dict(max_samples_per_step=batch_size, probe_every_n_steps=1, probe_size=len(samples),
                      probe_fn=probe_fn, max_docs_per_sample=1, **extra, **(attach_kwargs or {}))
        mon = gw.attach(model, endpoint, run, **kwargs)
        if hasattr(model, "monitor"):  # models instrumented through record() hold their monitor
            model.monitor = mon  # pyright: ignore[reportArgumentType]  (torch types Module.__setattr__ for tensors)
        probe = mon.probe
        assert probe is not None  # probe_size=len(samples) > 0
        try:
            probe.set_samples(samples)
            probe.run(step, source="replay")
        finally:
            mon.close()
        steps.append(step)
        if on_checkpoint:
            on_checkpoint(path, step)
    return steps
