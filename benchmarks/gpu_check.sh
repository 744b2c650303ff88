#!/usr/bin/env bash
# One pass over a lent GPU machine (H100; jax, flax, optax, chex, torch preinstalled; no network).
# Run from the repository root:   PYTHONPATH=. bash benchmarks/gpu_check.sh
# Stays under 5 minutes: every stage has its own `timeout`; a failing stage does not stop the
# others, and every stage's exit code is reported at the end. Everything printed is also saved
# under $OUT (default: ./gpu_check_out).
set -u

OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
export PYTHONPATH="${PYTHONPATH:-.}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # so jax and torch can share the GPU in one script

if [ -z "${DEEPRNN_JAX_DATA:-}" ]; then
  for d in ../shared/data shared/data; do
    if [ -f "$d/timemachine.txt" ]; then export DEEPRNN_JAX_DATA="$(cd "$d" && pwd)"; break; fi
  done
fi

declare -a SUMMARY=()
stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" secs="$2"; shift 2
  echo "=== $name (timeout ${secs}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout --kill-after=3 "$secs" "$@" 2>&1 | tee -a "$LOG" "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
  echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

echo "date: $(date -u +%FT%TZ)  DEEPRNN_JAX_DATA=${DEEPRNN_JAX_DATA:-unset}" | tee -a "$LOG"
stage device-info 15 bash -c 'nvidia-smi; python -c "import jax, torch; print(jax.__version__, jax.devices()); print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else None)"'
# f32 matmuls at full precision for the 1e-5 equivalence tests (XLA:GPU's default may use TF32).
# The GPU-relevant tests (equations, fast paths, training); the whole suite does not fit 5 minutes.
stage tests 110 env JAX_DEFAULT_MATMUL_PRECISION=highest python -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_fast_paths.py tests/test_training.py
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
for cfg in seed wide big-batch; do  # one stage each, so a slow one does not lose the others
  stage "throughput-$cfg" 30 python benchmarks/throughput.py --device gpu --configs "$cfg" \
    --repeats 3 --epochs 3 --label "GPU: $GPU_NAME" \
    --out "$OUT/throughput_gpu_$cfg.json" --append-md "$OUT/BENCHMARKS_gpu.md"
done
stage unroll-1 25 env DEEPRNN_JAX_UNROLL=1 python benchmarks/throughput.py --device gpu \
  --configs seed --repeats 2 --epochs 3 --label "GPU: $GPU_NAME, DEEPRNN_JAX_UNROLL=1" \
  --out "$OUT/throughput_gpu_unroll1.json" --append-md "$OUT/BENCHMARKS_gpu.md"
stage generation 20 python benchmarks/throughput.py --device gpu --repeats 0 --generation \
  --out "$OUT/generation_gpu.json" --append-md "$OUT/BENCHMARKS_gpu.md"
stage full-run 35 bash -c "t0=\$(date +%s%N); python -m deeprnn_jax.train --quiet --out '$OUT/run'; rc=\$?; echo \"full-run wall \$(( (\$(date +%s%N) - t0) / 1000000 )) ms\"; exit \$rc"

echo "=== summary" | tee -a "$LOG"
for s in "${SUMMARY[@]}"; do echo "  $s" | tee -a "$LOG"; done
exit 0
