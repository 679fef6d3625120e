"""docs/agent.md's worked examples for models we do not auto-detect, run against the frameworks' own classes.

Each framework lives in the venv's ``frameworks`` folder (Makefile: ``make frameworks``, pinned, without
its dependencies) and runs in a subprocess with that folder on its path, so that its imports (triton,
for torchtitan) never reach the other tests' process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = Path(sys.prefix) / "frameworks"


def run_with_frameworks(script: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    if not (FRAMEWORKS / module).is_dir():
        pytest.skip(f"{module} is not installed in {FRAMEWORKS}: run `make frameworks` (make test does)")
    path = os.pathsep.join([str(FRAMEWORKS), str(ROOT / "examples"), str(ROOT / "tests")])
    env = dict(os.environ, PYTHONPATH=path, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("how", ["eager", "fsdp", "compile"])
def test_torchtitan_example_ships_what_its_routers_computed(how):
    """examples/torchtitan_moe.py on torchtitan 0.3.0's MoE (TokenChoiceTopKRouter with sigmoid scores and
    a selection-only expert bias): the shipped means, counts (the router's own choice), entropies and
    cosines equal a float64 reference from what each router returned. "fsdp": under FSDP2, as torchtitan
    trains, the gate weight the hook passes is freed when its layer reshards, before the reduction: the
    first message has no cosines, the second those of the full weights. "compile": each MoE layer
    compiled in place (torchtitan's way; aot_eager), record() called from traced code."""
    args = [] if how == "eager" else [f"--{how}"]
    done = run_with_frameworks(ROOT / "tests" / "integration" / "torchtitan_driver.py", "torchtitan", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")


def test_megatron_example_ships_what_its_routers_computed():
    """examples/megatron_moe.py on Megatron-Core 0.16.1's TopKRouter (sequence-first tokens, top-k weights
    only): the rows are put first before they are recorded, so each sample gets its own tokens; means of
    the normalized top-k weights, counts, entropies and cosines equal a float64 reference."""
    done = run_with_frameworks(ROOT / "tests" / "integration" / "megatron_driver.py", "megatron")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")


def test_megatron_token_dropping_is_shipped_as_dropped_picks_and_the_fraction_is_megatrons():
    """Issue 31 part 2, the dropped-token fraction where a capacity factor applies: Megatron-Core 0.16.1's router
    drops picks after the choice (moe_expert_capacity_factor: apply_router_token_dropping zeroes their probs and
    routing map). The all-token counts stay its routing_map.sum(0); the dropped picks are shipped as such and
    /metrics' fraction is 1 - routing_map.sum() / (tokens x K) per layer. Negative control: without a capacity
    factor nothing is dropped (the test above asserts zero)."""
    done = run_with_frameworks(ROOT / "tests" / "integration" / "megatron_driver.py", "megatron", "capacity")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")


def test_olmo_core_example_shows_the_load_imbalance_olmo_core_logs():
    """Issue 31: examples/olmo_core_moe.py on OLMo-core 3.0's MoELinearRouter: the all-token counts are the
    router's own batch_size_per_expert, and /metrics' imbalance is what its compute_metrics() logs, per step."""
    done = run_with_frameworks(ROOT / "tests" / "integration" / "olmo_core_driver.py", "olmo_core")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok")
