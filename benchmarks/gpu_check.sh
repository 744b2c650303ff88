#!/usr/bin/env bash
# One pass over a lent GPU machine (H100; jax, flax, optax, chex, torch preinstalled; no network).
# Run from the repository root:
#   DEEPRNN_JAX_DATA=<folder with timemachine.txt> PYTHONPATH=. bash benchmarks/gpu_check.sh
#   SWEEP=1 ...   also the variant sweep (unroll, impl, precision) of benchmarks/variants.py
#                 and the chapter's run with the wavefront and with bfloat16 products
# Stages: device info; the fast-path tests at float32 precision; throughput of seed, wide and
# big-batch (layerwise in float32 and in bfloat16, wavefront, cudnn vs PyTorch); the chapter's
# 500-epoch run cold and then with its compiled programs cached; the model and training tests.
# Every stage has its own `timeout`, and the whole script a deadline (DEADLINE seconds, default
# 290: under 5 minutes): a stage that would start too late is skipped, a failing stage does not
# stop the others, and every stage's exit code is reported at the end. Output goes under $OUT
# (default ./gpu_check_out), in few files (the device tool returns at most 8): gpu_check.log
# (everything printed), BENCHMARKS_gpu.md (tables), variants.jsonl, and results.tgz (the JSON
# results and the training runs' files), refreshed after every stage.
# DEVICE=cpu runs the same stages on the CPU: a dry run of this script, not a measurement, with
# FULL_RUN_ARGS="--num-epochs 5", SEED_VARIANTS=res:1,cudnn:1, IMPLS=layerwise, SEED_EPOCHS=5 and
# R=1 to keep it short. A session with a device: carry a folder holding timemachine.txt (the ../shared beside
# the checkout does not travel) and leave the command ~30 s more than DEADLINE.
set -u

OUT="${OUT:-$PWD/gpu_check_out}"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
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
export DEEPRNN_JAX_CACHE="$WORK/xla_cache"  # cold for the first full run, warm for the second
XDIST=""
python -c "import xdist" 2>/dev/null && XDIST="-n 8 -p no:benchmark"

LABEL="$DEVICE"
echo "date: $(date -u +%FT%TZ)  DEEPRNN_JAX_DATA=${DEEPRNN_JAX_DATA:-unset}  DEVICE=$DEVICE" | tee -a "$LOG"
if [ "$DEVICE" = gpu ]; then
  LABEL="GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  stage device-info 30 bash -c 'nvidia-smi; python -c "
import jax, flax, optax, chex, torch
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__, \"chex\", chex.__version__)
print(\"torch\", torch.__version__, torch.cuda.is_available(), torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else None)
"'
fi
# The fast paths against the nn.scan reference first, at full float32 precision (XLA:GPU and
# cuDNN may use TF32 by default; the equivalence tolerances are float32's).
HI="env JAX_DEFAULT_MATMUL_PRECISION=highest"
stage tests-fast-paths 100 $HI python -m pytest -q -p no:cacheprovider $XDIST tests/test_fast_paths.py
if [ "${SWEEP:-0}" = 1 ]; then
  stage variants-seed 80 env CONFIG=seed R="${R:-5}" N="${N:-3}" JSON="$OUT/variants.jsonl" \
    python benchmarks/variants.py "${SEED_VARIANTS:-res:8,sliced:8,res:16,wave:8}"
fi
IMPLS="${IMPLS:-layerwise,layerwise:bfloat16,wavefront,cudnn}"
# 20 epochs a repeat: the train CLI's rhythm, two of them read back with their state (throughput.py
# LOG_EVERY), the others pipelined.
stage throughput-seed 55 python benchmarks/throughput.py --device "$DEVICE" --configs seed \
  --impl "$IMPLS" --repeats 3 --epochs "${SEED_EPOCHS:-20}" --label "$LABEL" \
  --out "$WORK/throughput_seed.json" --append-md "$OUT/BENCHMARKS_gpu.md"
# The chapter's run as a user starts it: the first time (compiling), then again (its programs
# read from the compilation cache the CLI keeps).
stage full-run 40 bash -c 'full_run default'
stage full-run-cached 40 bash -c 'full_run cached'
if [ "${SWEEP:-0}" = 1 ]; then
  stage full-run-wavefront 40 bash -c 'full_run wavefront --impl wavefront'
fi
for cfg in wide big-batch; do
  stage "throughput-$cfg" 50 python benchmarks/throughput.py --device "$DEVICE" --configs "$cfg" \
    --impl "$IMPLS" --repeats 3 --epochs 2 --label "$LABEL" \
    --out "$WORK/throughput_$cfg.json" --append-md "$OUT/BENCHMARKS_gpu.md"
done
stage tests 100 $HI python -m pytest -q -p no:cacheprovider $XDIST tests/test_cells.py \
  tests/test_models.py tests/test_training.py tests/test_parallel.py tests/test_precision.py
if [ "${SWEEP:-0}" = 1 ]; then  # last: the stage the deadline may drop
  stage full-run-bfloat16 40 bash -c 'full_run bfloat16 --precision bfloat16'
fi

echo "=== summary (${SECONDS}s)" | tee -a "$LOG"
for s in "${SUMMARY[@]}"; do echo "  $s" | tee -a "$LOG"; done
for f in "$WORK"/run-*/summary.json; do [ -f "$f" ] && echo "$f: $(cat "$f")" | tee -a "$LOG"; done
exit 0
