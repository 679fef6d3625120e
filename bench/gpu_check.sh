#!/usr/bin/env bash
# The one prepared script for a leased GPU (device tool): the agent's CUDA path
# against the float64 reference, then the paired overhead benchmark at the
# OLMoE-1B-7B shape in one process — the A/A control, every step with
# attach()'s default (the reduction compiled), every step op by op, the default
# cadence with and without the all-token expert counts (10:nocounts) — then the host time per hook at that shape, then the reduction's
# transient memory (Triton's fusion against the CPU's). At most ≈ 9 min in all:
# run it with timeout_s 600; each part is time-boxed, and what it wrote under
# $OUT comes back even if the last is cut short. Budget: tests 130 s; overhead
# under 5.5 min (5 cadences x (45 s + warm-up), the model, the reduction's
# compile); hook cost 55 s; memory 30 s. Runs under the device image's own python3
# (torch, numba, msgpack are there); pyzmq travels as a wheel in .whl/ (see
# docs/benchmarks.md).
set -u
OUT=${OUT:-/tmp/grokwatch-gpu}
mkdir -p "$OUT"
ls .whl/pyzmq-*.whl >/dev/null 2>&1 || { echo "no pyzmq wheel in .whl/: run 'make gpu-wheels' here, then carry .whl" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
# The import names without an install: grokwatch.{agent,wire,collector} are the top-level folders.
for d in agent wire collector; do ln -sfn "../$d" "grokwatch/$d"; done
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, zmq, numba; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pyzmq', zmq.__version__, 'numba', numba.__version__)" | tee -a "$OUT/gpu.txt"
[ -n "${SKIP_TESTS:-}" ] || timeout "${PYTEST_S:-130}" python3 -m pytest -q -p no:cacheprovider tests/integration/test_agent_capture.py tests/integration/test_agent_safety.py -k "cuda and not layer_by_layer" 2>&1 | tail -25 | tee "$OUT/pytest_cuda.txt"
bench() { timeout "$1" python3 bench/agent_overhead.py --device cuda --shape olmoe-1b-7b --steps 400 --warmup 8 \
    --max-seconds "$2" --json "$OUT/agent_overhead.json" --cadences 0,1,1:off,10,10:nocounts "${@:3}" 2>&1 \
    | tee -a "$OUT/agent_overhead.txt"; }
bench "${BENCH_S:-330}" "${CADENCE_S:-45}"
# Out of memory on a smaller card: the same shape at half the tokens.
[ -s "$OUT/agent_overhead.json" ] || bench 200 40 --seq 2048
# Where a sampled step's host time goes (hooks, reduction, hand-over), at the same shape.
timeout "${HOOK_S:-55}" python3 bench/agent_hook_cost.py --device cuda --shape olmoe-1b-7b --steps 30 --warmup 5 \
    2>&1 | tee "$OUT/hook_cost.txt"
timeout "${MEM_S:-30}" python3 bench/reduction_memory.py --device cuda 2>&1 | tee "$OUT/reduction_memory.txt"
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv | tee -a "$OUT/gpu.txt"
