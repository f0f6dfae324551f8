#!/usr/bin/env bash
# The GPU figures the README leaves open, in one run on a CUDA machine (budget: under 10 minutes on an H200).
#
#   bash benchmarks/gpu_session.sh [RESULTS_DIR]        (default: $OUT if set, else benchmarks/results)
#
# Each step has its own time limit and the next one runs whatever the previous gave; the log names the card.
# The machine's Python lacks this project's transformers and pypdfium2: run ../shared/gpu/wheels.sh here first and
# send .whl/ along (the device call's carry: [".whl"]); the script installs them into /tmp/site (counted in its time).
# 0. the imports and versions, the card's name.
# 1. benchmarks.gpu_checks: the CUDA branches of the data path against the CPU (on-device normalisation bit for bit,
#    no synchronising call in an upload, launch returning before the forward, encode with forkserver workers and
#    pinned copies equal to a CPU run, out-of-memory halving under a memory cap).
# 2. benchmarks.pipeline: end to end, feed-only and tower-only pages/s, first-batch seconds (Base b32, Gundam b8),
#    and `deepencoder encode` itself in a fresh process (--command: seconds from its start to its first batch).
# 3. if time is left: Gundam b8 again with --views-per-call 16 (the eager bound on a batch's tile passes), then
#    benchmarks.tower_v2 / tower (quick, ours and transformers' port only: the compiled paths take minutes).
#
# The whole script stops before GPU_SESSION_SECONDS (default 540, the install included: a device call is cut at
# 600 s): each step's limit shrinks to the time left and a step with under 30 s left is skipped. The log is also
# written to RESULTS_DIR, so it comes back with the results even if the call is cut.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-${OUT:-benchmarks/results}}
mkdir -p "$results"
exec > >(tee -a "$results/gpu_session.log") 2>&1
budget=${GPU_SESSION_SECONDS:-540}
if compgen -G ".whl/*.whl" >/dev/null; then  # ../shared/gpu/wheels.sh's wheels, sent along (carry: [".whl"])
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "
import importlib.metadata as m, torch, transformers, pypdfium2, PIL, deepencoder
print('torch', torch.__version__, 'transformers', transformers.__version__, 'pypdfium2', m.version('pypdfium2'),
      'on', torch.cuda.get_device_name(0))" || exit 1

step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2 left=$((budget - SECONDS))
  shift 2
  if ((left < 30)); then
    echo "=== $name: skipped, ${left}s of the session's ${budget}s left"
    return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tail -40
  echo "=== $name: exit ${PIPESTATUS[0]}, $((SECONDS - start)) s"
}

step 150 "CUDA data path against the CPU" python3 -m benchmarks.gpu_checks

step 240 "pipeline Base b32" python3 -m benchmarks.pipeline --tower real --modes base --pages 288 --batch-size 32 \
  --workers 15 --device cuda --compute-dtype bfloat16 --command --out "$results/pipeline-base"
step 150 "pipeline Gundam b8" python3 -m benchmarks.pipeline --tower real --modes gundam --pages 96 --batch-size 8 \
  --workers 15 --device cuda --compute-dtype bfloat16 --command --out "$results/pipeline-gundam"
step 150 "pipeline Gundam b8, at most 16 views per pass" python3 -m benchmarks.pipeline --tower real --modes gundam \
  --pages 96 --batch-size 8 --workers 15 --device cuda --compute-dtype bfloat16 --views-per-call 16 \
  --out "$results/pipeline-gundam"
step 120 "tower V2" python3 -m benchmarks.tower_v2 --device cuda --dtype bf16 --paths ours,transformers --out "$results"
step 240 "tower (quick)" python3 -m benchmarks.tower --device cuda --dtype bf16 --quick --paths ours,transformers \
  --out "$results"
