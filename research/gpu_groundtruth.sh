#!/usr/bin/env bash
# Round 3 on a leased GPU (issue 28; device tool): the three seeds and the all-rand null run of
# grokwatch.demo.round3 side by side on one CUDA device, each stopped after RUN_S seconds (default 420:
# the whole script fits 8 minutes of device time), their JSON-lines logs under $OUT, then the
# pre-registered analysis over them (research/groundtruth_round3.py). Run it with timeout_s 600 and
# carry=[".whl"] (`make gpu-wheels`: pyzmq and rapidfuzz for the device image's Python); what a run wrote
# before its stop comes back with it (a log is flushed at every probe step).
# MINI=1 runs it in miniature on the CPU (a few steps, no wheels): the test suite does, so a task with a
# device runs this script as it is.
set -u
OUT=${OUT:-/tmp/grokwatch-gpu}
mkdir -p "$OUT"
if [ -n "${MINI:-}" ]; then
  DEVICE=cpu STEPS=${STEPS:-40} PROBE=${PROBE:-20} RUN_S=${RUN_S:-120} PY=${PY:-python3}
  EXTRA=(--train-docs 40 --probe-docs 8 --permutations 10)
else
  DEVICE=cuda STEPS=${STEPS:-60000} PROBE=${PROBE:-200} RUN_S=${RUN_S:-420} PY=python3
  EXTRA=()
  ls .whl/rapidfuzz-*.whl >/dev/null 2>&1 || { echo "no rapidfuzz wheel in .whl/: run 'make gpu-wheels' here, then carry .whl" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  for d in agent wire collector; do ln -sfn "../$d" "grokwatch/$d"; done
  export PYTHONPATH="$PWD:/tmp/site"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
fi
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
run() {  # name, then round3's flags
  local name=$1; shift
  timeout "$RUN_S" "$PY" -m grokwatch.demo.round3 --device "$DEVICE" --steps "$STEPS" --probe-every "$PROBE" \
    --quiet --log "$OUT/r3-gpu-$name.jsonl" "${EXTRA[@]}" "$@" > "$OUT/r3-gpu-$name.out" 2>&1
  echo "$name: exit $? after $(grep -c '"step"' "$OUT/r3-gpu-$name.jsonl" 2>/dev/null || echo 0) probe steps"
}
run seed0 --seed 0 ${R3_FLAGS:-} &
run seed1 --seed 1 ${R3_FLAGS:-} &
run seed2 --seed 2 ${R3_FLAGS:-} &
run null --seed 3 --domains rand,rand2,rand3,rand4,rand5,rand6 ${R3_FLAGS:-} &
wait
"$PY" research/groundtruth_round3.py --seeds "$OUT"/r3-gpu-seed{0,1,2}.jsonl --null "$OUT/r3-gpu-null.jsonl" \
  --json "$OUT/r3-gpu-analysis.json" 2>&1 | tee "$OUT/r3-gpu-analysis.txt"
