#!/usr/bin/env bash
# One pass over a GPU machine (jax with CUDA, flax, optax, chex and torch installed; no network
# needed). Run from the repository root:
#   DEEPRNN_JAX_DATA=<folder with timemachine.txt> bash benchmarks/gpu_check.sh
# Stages, most wanted first:
#   device-info       nvidia-smi and the library versions
#   startup-cold      the chapter's run under benchmarks/timeline.py, compiling from scratch: where
#                     the time from start to exit goes, program by program
#   startup-cached    the same run again over the compilation cache the first one filled
#   throughput        tokens/s of seed, wide and big-batch against PyTorch's cuDNN loop, for each
#                     implementation in IMPLS (with @flags: under a named set of XLA flags)
#   full-run          the chapter's run as a user starts it (no cache) against d2l's in PyTorch
#   sweep             K = 8 models in one program against 8 runs one after the other, and K = 64
#   startup-<flags>   the cold run under each named set of XLA flags in STARTUP_FLAGS, with
#                     bfloat16 products, and with the train flags of each STARTUP_VARIANTS entry
#                     ("unroll4=--unroll 4;wavefront=--impl wavefront")
#   tests-*           the fast paths against the nn.scan reference, at full float32 precision
# Every stage has its own `timeout`, and the whole script a deadline (DEADLINE seconds, default
# 400): a stage that would start too late is skipped, a failing stage does not stop the others,
# and every stage's exit code is reported at the end. ONLY="a b" runs just the stages named.
# Output goes under $OUT (default ./gpu_check_out): gpu_check.log (everything printed) and
# results.tgz, refreshed after every stage, with results/<device>/*.json (the measurements, as
# benchmarks/results/ keeps them: copy the folder there and run benchmarks/report.py; the
# timelines are startup.json's entries) and the training runs' files.
# DEVICE=cpu runs the same stages on the CPU: a dry run of this script, not a measurement, with
# FULL_RUN_ARGS="--num-epochs 5", IMPLS=layerwise, EPOCHS=1, R=1 and SWEEP_ARGS to keep it short.
set -u

OUT="${OUT:-$PWD/gpu_check_out}"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
mkdir -p "$OUT" "$WORK/results"
LOG="$OUT/gpu_check.log"
RESULTS="$WORK/results"
DEVICE="${DEVICE:-gpu}"
DEADLINE="${DEADLINE:-400}"
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
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
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
  tar czf "$OUT/results.tgz" --exclude=checkpoint*.msgpack --exclude=xla_cache* -C "$WORK" . \
    2>/dev/null
}

# startup NAME CACHE [train flags...]: the chapter's run under timeline.py, wall time from the
# process's start to its exit; CACHE: a compilation cache folder, or none.
startup() {
  local name="$1" cache="$2"; shift 2
  local t0; t0=$(date +%s%N)
  DEEPRNN_JAX_CACHE="$cache" python benchmarks/timeline.py --out "$WORK/run-$name" \
    --name "$name" --results-dir "$RESULTS" ${FULL_RUN_ARGS:-} "$@"
  local rc=$?
  echo "startup $name: wall $(( ($(date +%s%N) - t0) / 1000000 )) ms (process start to exit)," \
    "rc $rc, XLA_FLAGS='${XLA_FLAGS:-}'"
  return $rc
}
export -f startup
export WORK RESULTS FULL_RUN_ARGS="${FULL_RUN_ARGS:-}"
XDIST=""
python -c "import xdist" 2>/dev/null && XDIST="-n 8 -p no:benchmark"
flags_of() { python -c "import sys; sys.path.insert(0, 'benchmarks'); import throughput; \
print(throughput.XLA_FLAG_SETS[sys.argv[1]])" "$1"; }

echo "date: $(date -u +%FT%TZ)  DEEPRNN_JAX_DATA=${DEEPRNN_JAX_DATA:-unset}  DEVICE=$DEVICE" | tee -a "$LOG"
if [ "$DEVICE" = gpu ]; then
  stage device-info 30 bash -c 'nvidia-smi; python -c "
import jax, flax, optax, chex, torch
print(\"jax\", jax.__version__, jax.devices(), \"flax\", flax.__version__, \"optax\", optax.__version__, \"chex\", chex.__version__)
print(\"torch\", torch.__version__, torch.cuda.is_available(), torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else None)
"'
fi
stage startup-cold 60 bash -c "startup cold '$WORK/xla_cache'"
stage startup-cached 40 bash -c "startup cached '$WORK/xla_cache'"
IMPLS="${IMPLS:-layerwise,layerwise:bfloat16,wavefront,cudnn,layerwise@notriton,layerwise@graphs}"
# throughput.py's GPU epochs a repeat: 20 for seed, the train CLI's rhythm (two of them read back
# with their state, the others pipelined), 2 for wide and big-batch. The results file is written
# after every config, so a stage cut by its timeout keeps what it measured.
stage throughput 150 python benchmarks/throughput.py --device "$DEVICE" \
  --configs seed,wide,big-batch --impl "$IMPLS" --repeats "${R:-3}" --epochs "${EPOCHS:-0}" \
  --results-dir "$RESULTS"
# The chapter's run as a user starts it (compiling, no cache) against d2l's loop in PyTorch.
if [ "$DEVICE" = gpu ]; then
  stage full-run 90 python benchmarks/throughput.py --device "$DEVICE" --repeats 0 --full-run \
    --results-dir "$RESULTS"
fi
stage sweep 100 python benchmarks/sweep.py ${SWEEP_ARGS:---num-models 8 --epochs 60 --repeats 1 \
  --memory= --cache --more 64} --results-dir "$RESULTS"
for f in ${STARTUP_FLAGS:-notriton graphs}; do
  stage "startup-$f" 40 env XLA_FLAGS="$(flags_of "$f")" bash -c "startup $f none"
done
stage startup-bfloat16 40 bash -c "startup bfloat16 none --precision bfloat16"
# STARTUP_VARIANTS="unroll4=--unroll 4;wavefront=--impl wavefront": more cold runs, NAME=flags.
IFS=';' read -ra VARIANTS <<< "${STARTUP_VARIANTS:-}"
for v in "${VARIANTS[@]}"; do
  stage "startup-${v%%=*}" 40 bash -c "startup ${v%%=*} none ${v#*=}"
done
HI="env JAX_DEFAULT_MATMUL_PRECISION=highest"
stage tests-implementations 90 $HI python -m pytest -q -p no:cacheprovider -o addopts="" $XDIST \
  tests/test_implementations.py
stage tests 90 $HI python -m pytest -q -p no:cacheprovider -o addopts="" $XDIST tests/test_cells.py \
  tests/test_models.py tests/test_training.py tests/test_precision.py

echo "=== summary (${SECONDS}s)" | tee -a "$LOG"
for s in "${SUMMARY[@]}"; do echo "  $s" | tee -a "$LOG"; done
for f in "$WORK"/run-*/summary.json; do [ -f "$f" ] && echo "$f: $(cat "$f")" | tee -a "$LOG"; done
exit 0
