#!/usr/bin/env bash
# A GPU validation pass on a machine with a CUDA GPU, torch with CUDA, nvcc and (for the
# sanitize step) compute-sanitizer. Steps run in the order given (default: build test sanitize):
#
#   build     pip install --no-build-isolation --no-deps -e . (CUDA kernels included) + info
#   test      the whole pytest suite (the GPU tests run when a GPU is visible); Triton
#             autotuning off except where a test asks for it (IGC_TRITON_AUTOTUNE=0) and the
#             fixed path on the default configuration (IGC_TRITON_FIXED=default): one
#             compilation per structure
#   sanitize  compute-sanitizer memcheck / racecheck / initcheck over the CUDA and Triton
#             sanitize scripts (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so every buffer is its own
#             allocation and out-of-bounds accesses are seen)
#   bench     benchmarks/bench.py --device cuda --targets (JSON under the output folder), then
#             each measured fraction of copy bandwidth beside the committed prediction
#             (tools/perf_model.py --measured, from benchmarks/results/gpu-static-*.json)
#   sweep     benchmarks/bench.py --device cuda --sweep --no-compile
#
# Logs and JSON go to $OUT (default benchmarks/out/gpu-session). Exit status: the first failing
# step's. Example: tools/gpu_session.sh build test sanitize
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu-session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PY:-python3}"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize)
status=0

run_step() {
  local name="$1"; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  return 0
}

sanitize_all() {
  local rc=0 tool
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for tool in memcheck racecheck initcheck; do
    for script in tools/sanitize_cuda.py tools/sanitize_triton.py; do
      [ -f "$script" ] || { echo "missing $script"; rc=1; continue; }
      [ "$tool" = initcheck ] && [ "$script" = tools/sanitize_triton.py ] && continue
      echo "--- compute-sanitizer --tool $tool $script"
      compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
        "$PY" "$script" || rc=$?
    done
  done
  return $rc
}

for step in "${steps[@]}"; do
  case "$step" in
    build)
      run_step build env MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
        "$PY" -m pip install --no-build-isolation --no-deps -e . ;
      run_step info "$PY" -m igc_kernels.info ;;
    # the Triton tests compile each chain structure once with the default configuration
    # (IGC_TRITON_AUTOTUNE=0; the determinism test still autotunes) instead of up to 24 times
    test) run_step test env IGC_TRITON_AUTOTUNE="${IGC_TRITON_AUTOTUNE:-0}" \
      IGC_TRITON_FIXED="${IGC_TRITON_FIXED:-default}" "$PY" -m pytest tests -q -ra --maxfail=25 ;;
    sanitize) run_step sanitize sanitize_all ;;
    bench) run_step bench "$PY" benchmarks/bench.py --device cuda --targets --json "$OUT/bench-targets.json" ;
      run_step predicted "$PY" tools/perf_model.py benchmarks/results/gpu-static-*.json \
        --measured "$OUT/bench-targets.json" ;;
    sweep) run_step sweep "$PY" benchmarks/bench.py --device cuda --sweep --no-compile --json "$OUT/bench-sweep.json" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $status
