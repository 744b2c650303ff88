#!/usr/bin/env bash
# One pass over a GPU machine (jax with CUDA, flax, optax, chex and torch installed; no network
# needed). Run from the repository root:
#   DEEPRNN_JAX_DATA=<folder with timemachine.txt> bash benchmarks/gpu_check.sh
#   SWEEP=1 ...   also the variant sweep of benchmarks/variants.py (unroll, gates, wavefront) and
#                 the chapter's run twice over one compilation cache, with the wavefront and with
#                 bfloat16 products
# Stages: device info; the fast-path tests at float32 precision; throughput of seed, wide and
# big-batch (layerwise in float32 and in bfloat16, wavefront, cudnn vs PyTorch); the chapter's
# 500-epoch run against PyTorch's; the model and training tests.
# Every stage has its own `timeout`, and the whole script a deadline (DEADLINE seconds, default
# 290): a stage that would start too late is skipped, a failing stage does not stop the others,
# and every stage's exit code is reported at the end. Output goes under $OUT (default
# ./gpu_check_out): gpu_check.log (everything printed), results/<device>/*.json (the measurements,
# as benchmarks/results/ keeps them: copy the folder there and run benchmarks/report.py), and
# results.tgz (the training runs' files), refreshed after every stage.
# DEVICE=cpu runs the same stages on the CPU: a dry run of this script, not a measurement, with
# FULL_RUN_ARGS="--num-epochs 5", SEED_VARIANTS=res:1,cudnn:1, IMPLS=layerwise, EPOCHS=1 and R=1
# to keep it short (its results go under $OUT as well, never into benchmarks/results/).
set -u

OUT="${OUT:-$PWD/gpu_check_out}"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/results"
DEVICE="${DEVICE:-gpu}"
DEADLINE="${DEADLINE:-290}"
export PYTHONPATH="${PYTHONPATH:-.}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax and torch processes share the GPU
if [ "$DEVICE" = cpu ]; then export JAX_PLATFORMS=cpu; fi

if [ -z "${DEEPRNN_JAX_DATA:-}" ]; then
  for d in ../shared/data shared/data .devdata; do
    if [ -f "$d/timemachine.txt" ]; then export DEEPRNN_JAX_DATA="$(cd "$d" && pwd)"; break; fi
  done
fi

declare -a SUMMARY=()
stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" secs="$2"; shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then
    SUMMARY+=("$name skipped (deadline)"); echo "=== $name: skipped, ${left}s left" | tee -a "$LOG"
    return
  fi
  [ "$secs" -gt "$left" ] && secs=$left
  echo "=== $name (timeout ${secs}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=3 "$secs" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" --exclude=checkpoint.msgpack --exclude=xla_cache -C "$WORK" . 2>/dev/null
}

full_run() {  # full_run NAME [train flags...]: the chapter's 500 epochs, wall time included
  local name="$1"; shift
  local t0; t0=$(date +%s%N)
  python -m deeprnn_jax.train --out "$WORK/run-$name" ${FULL_RUN_ARGS:-} "$@"
  local rc=$?
  echo "full run $name: wall $(( ($(date +%s%N) - t0) / 1000000 )) ms (process start to exit), rc $rc"
  return $rc
}
export -f full_run
export WORK FULL_RUN_ARGS="${FULL_RUN_ARGS:-}"
export DEEPRNN_JAX_CACHE="$WORK/xla_cache"  # cold for full-run-cold, warm for full-run-cached
XDIST=""
python -c "import xdist" 2>/dev/null && XDIST="-n 8 -p no:benchmark"

echo "date: $(date -u +%FT%TZ)  DEEPRNN_JAX_DATA=${DEEPRNN_JAX_DATA:-unset}  DEVICE=$DEVICE" | tee -a "$LOG"
if [ "$DEVICE" = gpu ]; then
  stage device-info 30 bash -c 'nvidia-smi; python -c "
import jax, flax, optax, chex, torch
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__, \"chex\", chex.__version__)
print(\"torch\", torch.__version__, torch.cuda.is_available(), torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else None)
"'
fi
# The fast paths against the nn.scan reference first, at full float32 precision (XLA:GPU and
# cuDNN may use TF32 by default; the equivalence tolerances are float32's).
HI="env JAX_DEFAULT_MATMUL_PRECISION=highest"
stage tests-implementations 100 $HI python -m pytest -q -p no:cacheprovider $XDIST tests/test_implementations.py
if [ "${SWEEP:-0}" = 1 ]; then
  stage variants-seed 80 env CONFIG=seed R="${R:-5}" N="${N:-3}" RESULTS_DIR="$RESULTS" \
    python benchmarks/variants.py "${SEED_VARIANTS:-res:8,sliced:8,res:16,wave:8}"
fi
IMPLS="${IMPLS:-layerwise,layerwise:bfloat16,wavefront,cudnn}"
# throughput.py's GPU epochs a repeat: 20 for seed, the train CLI's rhythm (two of them read back
# with their state, the others pipelined), 2 for wide and big-batch. The results file is written
# after every config, so a stage cut by its timeout keeps what it measured.
stage throughput 160 python benchmarks/throughput.py --device "$DEVICE" \
  --configs seed,wide,big-batch --impl "$IMPLS" --repeats "${R:-3}" --epochs "${EPOCHS:-0}" \
  --results-dir "$RESULTS"
# The chapter's run as a user starts it (compiling, no cache) against d2l's loop in PyTorch; in a
# dry run on the CPU, the train CLI alone with FULL_RUN_ARGS.
if [ "$DEVICE" = gpu ]; then
  stage full-run 90 python benchmarks/throughput.py --device "$DEVICE" --repeats 0 --full-run \
    --results-dir "$RESULTS"
else
  stage full-run 90 bash -c 'full_run default'
fi
if [ "${SWEEP:-0}" = 1 ]; then
  # The same run twice over one compilation cache: the second reads its programs from it.
  stage full-run-cold 40 bash -c 'full_run cold'
  stage full-run-cached 40 bash -c 'full_run cached'
  stage full-run-wavefront 40 bash -c 'full_run wavefront --impl wavefront'
fi
stage tests 100 $HI python -m pytest -q -p no:cacheprovider $XDIST tests/test_cells.py \
  tests/test_models.py tests/test_training.py tests/test_parallel.py tests/test_precision.py
if [ "${SWEEP:-0}" = 1 ]; then  # last: the stage the deadline may drop
  stage full-run-bfloat16 40 bash -c 'full_run bfloat16 --precision bfloat16'
fi

echo "=== summary (${SECONDS}s)" | tee -a "$LOG"
for s in "${SUMMARY[@]}"; do echo "  $s" | tee -a "$LOG"; done
for f in "$WORK"/run-*/summary.json; do [ -f "$f" ] && echo "$f: $(cat "$f")" | tee -a "$LOG"; done
exit 0
