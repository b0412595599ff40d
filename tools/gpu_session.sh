#!/usr/bin/env bash
# A GPU validation pass on a machine with a CUDA GPU, torch with CUDA, nvcc and (for the
# sanitize steps) compute-sanitizer. Steps run in the order given (default: build test sanitize);
# STEP=SECONDS stops a step after that many seconds (timeout), e.g. `test-cuda=120`:
#
#   build        setup.py build_ext --inplace (CUDA kernels included, for $TORCH_CUDA_ARCH_LIST,
#                default 9.0; CPU kernels without per-ISA clones, IGC_CPU_TARGET_CLONES=0 by
#                default here: a faster build; ninja's progress is in the log, its per-file times
#                in $OUT/ninja_log) + info. With IGC_PREBUILT=FILE, a compiled igc_kernels._C
#                built elsewhere for this machine's python and torch (tools/prebuild_cuda_ext.sh),
#                that file is used instead when it imports with its CUDA kernels; otherwise the
#                step builds.
#                The package is used from this checkout (PYTHONPATH), not installed.
#   test         the whole pytest suite (the GPU tests run when a GPU is visible); Triton
#                autotuning off except where a test asks for it (IGC_TRITON_AUTOTUNE=0) and the
#                fixed path on the default configuration (IGC_TRITON_FIXED=default): one
#                compilation per structure
#   test-cuda    the CUDA backend's GPU tests alone (tests/test_cuda_gpu.py,
#                tests/test_gpu_derivatives_and_indices.py)
#   test-triton  the Triton backend's GPU tests alone (tests/test_triton_gpu.py), as `test`
#   sanitize     compute-sanitizer memcheck / racecheck / initcheck over the CUDA and Triton
#                sanitize scripts (PYTORCH_NO_CUDA_MEMORY_CACHING=1, so every buffer is its own
#                allocation and out-of-bounds accesses are seen)
#   race         compute-sanitizer racecheck over tools/sanitize_cuda.py alone, then again with
#                IGC_CUDA_FP32_MMA=1 (its float32 forwards on the tensor cores), and with TF32
#                allowed too (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1: two planes)
#   bench        benchmarks/bench.py --device cuda --targets (JSON under the output folder), then
#                each measured fraction of copy bandwidth beside the committed prediction
#                (tools/perf_model.py --measured, from benchmarks/results/gpu-static-*.json)
#   bench-quick  benchmarks/bench.py --device cuda --only "$BENCH_ONLY" (default: the nine
#                IGCV2 targets, IGCV2_TARGETS) --backends "$BENCH_BACKENDS" (default cuda),
#                no torch.compile, no memory measurements, then the same comparison
#   wide-off     bench-quick's measurement of IGCV2(1024, 16), (1024, 32), (512, 16) and
#                (512, 32) with IGC_CUDA_PLAN_L2_BYTES=0: the tensor-core backward's two CTAs
#                per SM (of 16 positions at C = 1024, of 32 at C = 512), to set beside
#                bench-quick's one CTA of twice the positions (bench-wide-off.json); in
#                float32 the CUDA-core backward's two CTAs per SM, to set beside fp32mma's
#                bench-fp32.json, one CTA with its next tile prefetched (bench-wide-off-fp32.json)
#   prefetch-off with IGC_CUDA_L2_PREFETCH=0, the backwards that run one CTA per SM (and the
#                CUDA-core forward) without their L2 prefetch of the next tile, to set beside
#                bench-quick's and fp32mma's: IGCV2(1024, 8) in bfloat16
#                (bench-prefetch-off.json), IGCV2(512, 8), (512, 16) and (512, 32) in float32 on
#                the CUDA-core kernels, forward and backward (bench-prefetch-off-fp32.json)
#                and IGCV2(512, 8) and (512, 16) with IGC_CUDA_FP32_MMA=1
#                (bench-prefetch-off-fp32mma.json)
#   items4       the nine IGCV2 targets in float32 on the CUDA-core kernels with
#                IGC_CUDA_WIDE_ITEMS=0: layer items of 4 positions only, to set beside
#                fp32mma's bench-fp32.json, items of 8 (bench-items4-fp32.json)
#   ctas2        bench-quick's measurement of IGCV2(256, 8), (256, 32), (1024, 8) and (1024, 16)
#                with IGC_CUDA_MAX_CTAS_PER_SM=2: the tensor-core forward at two CTAs per SM,
#                to set beside bench-quick's three (bench-ctas2.json)
#   fp32mma      bench-quick's measurement of the nine IGCV2 targets in float32, once as it is
#                (the CUDA-core kernels, bench-fp32.json) and once with IGC_CUDA_FP32_MMA=1: the
#                opt-in float32 tensor-core forward and backward, three bfloat16 planes
#                (bench-fp32mma.json), and once more with TF32 allowed for matmul
#                (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1): two planes (bench-fp32mma-2planes.json;
#                the eager baselines then run with TF32 too)
#   triton-fp32mma  the Triton backend's opt-in float32 tensor-core dots (IGC_TRITON_FP32_MMA=1):
#                its GPU test against the float32 bound, then IGCV2(256, 8), (256, 16) and
#                (512, 16) in float32 on the Triton backend autotuned, as it is
#                (bench-triton-fp32.json) and with the switch (bench-triton-fp32mma.json)
#   triton-packed  the Triton backend's packed path in bfloat16 (16-bit chains hold their weight
#                and dW blocks across a backward program's tiles): the packed cases of
#                tests/test_triton.py on the GPU, then IGCV2(256, 8), (256, 16) and (256, 32) in
#                bfloat16 on the Triton backend autotuned (bench-triton-bf16.json), each measured
#                fraction of copy bandwidth beside the committed prediction (compiled with the
#                CI's Triton: every configuration of these chains, packed ones included); then
#                those and IGCV2(512, 8), (512, 16), (1024, 16), (1024, 32) on the fixed path
#                (IGC_TRITON_AUTOTUNE=0: packed candidates first, at C = 1024 the backward's
#                SPLIT ones, bench-triton-bf16-fixed.json) beside its prediction (with the
#                CI's Triton and, where a triton 3.6.0 report has the problem, with 3.6.0)
#   triton-staged  the Triton backend's staged backward against the whole chain's, in one
#                run, on the fixed path (IGC_TRITON_AUTOTUNE=0): IGCV2(256, 32), (512, 8),
#                (512, 16), (512, 32) and (1024, 32) in float32 (one layer per range; the last
#                predicted 4% against 2% whole, the smallest gain) and IGCV2(1024, 8), (1024,
#                4) in bfloat16 (STAGED_FP32, STAGED_BF16), as the backend picks
#                (bench-triton-staged-{fp32,bf16}.json), then each chain with
#                IGC_TRITON_STAGED=0 (bench-triton-whole-C-K.json; a refused whole chain fails
#                its own step only), then the staged measurements beside their predictions
#                (the staged reports of both Tritons)
#   sweep        benchmarks/bench.py --device cuda --sweep --no-compile
#   timeline     tools/profile_cuda.py --timeline on IGCV2(256, 8) and (1024, 16), bf16: host time
#                per call (enqueue) against wall time, and torch.profiler's table of the launches
#
# The test steps run on $PYTEST_WORKERS pytest-xdist workers (default 8 where xdist is installed,
# 0: none; --dist loadgroup, as make test's slow step): most of their time is Triton's and nvcc's
# compilation, on one core per process.
#
# After a failed build, the steps that need the CUDA extension (test-cuda, sanitize, race, bench*,
# wide-off, prefetch-off, items4, ctas2, fp32mma, sweep, timeline) are skipped. Logs and JSON go
# to $OUT (default benchmarks/out/gpu-session). Exit status: the first failing step's. Example:
# tools/gpu_session.sh build=240 test-cuda=120 race=60
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu-session}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PY="${PY:-python3}"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test sanitize)
status=0

# the IGCV2 targets (C:K:L, L the IGCV2 depth): C in {256, 512, 1024}, K in {8, 16, 32}
IGCV2_TARGETS=256:8:3,256:16:2,256:32:2,512:8:3,512:16:3,512:32:2,1024:8:4,1024:16:3,1024:32:2
# the chains the triton-staged step times staged and whole (C:K:L)
STAGED_FP32=256:32:2,512:8:3,512:16:3,512:32:2,1024:32:2
STAGED_BF16=1024:8:4,1024:4:5
workers=()
if "$PY" -c "import xdist" 2>/dev/null && [ "${PYTEST_WORKERS:-8}" != 0 ]; then
  workers=(-n "${PYTEST_WORKERS:-8}" --dist loadgroup)  # xdist_group: shared fixtures built once
fi
limit=0  # seconds of the step being run (0: none)
last_rc=0
run_step() {
  local name="$1"; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  # a shell function runs under timeout in a child shell that defines it
  [ "$(type -t "$1")" = function ] && set -- bash -c "$(declare -f "$1"); $1"
  if [ "$limit" -gt 0 ]; then set -- timeout --signal=INT --kill-after=10 "$limit" "$@"; fi
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
  last_rc=$rc
  return 0
}
built=1  # 0 after a failed build: the steps that need the CUDA extension are skipped

# the prebuilt extension in place, kept only when it imports with its CUDA kernels
use_prebuilt() {
  local so="igc_kernels/_C$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  cp "$IGC_PREBUILT" "$so" || return 1
  "$PY" -c 'import sys, igc_kernels, igc_kernels._loader as l
sys.exit(0 if l.ext_built_with_cuda() else 1)' && return 0
  "$PY" -c 'import torch, igc_kernels._C'  # the reason it did not load
  rm -f "$so"
  return 1
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

for arg in "${steps[@]}"; do
  step="${arg%%=*}"
  limit=0
  [ "$step" != "$arg" ] && limit="${arg#*=}"
  case "$step" in
    test-cuda|sanitize|race|bench-quick|wide-off|prefetch-off|items4|ctas2|fp32mma|bench|sweep|\
      timeline)
      if [ "$built" -eq 0 ]; then echo "=== $step: skipped (the build failed)"; continue; fi ;;
  esac
  case "$step" in
    build)
      last_rc=1
      if [ -n "${IGC_PREBUILT:-}" ]; then
        run_step prebuilt use_prebuilt
      fi
      if [ "$last_rc" -ne 0 ]; then
        run_step build env MAX_JOBS="${MAX_JOBS:-16}" \
          TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
          IGC_CPU_TARGET_CLONES="${IGC_CPU_TARGET_CLONES:-0}" \
          "$PY" setup.py build_ext --inplace ;
        find build -name .ninja_log -exec cp {} "$OUT/ninja_log" \; 2>/dev/null
      fi
      [ "$last_rc" -ne 0 ] && built=0
      run_step info "$PY" -m igc_kernels.info ;;
    # the Triton tests compile each chain structure once with the default configuration
    # (IGC_TRITON_AUTOTUNE=0; the determinism test still autotunes) instead of up to 24 times
    test) run_step test env IGC_TRITON_AUTOTUNE="${IGC_TRITON_AUTOTUNE:-0}" \
      IGC_TRITON_FIXED="${IGC_TRITON_FIXED:-default}" "$PY" -m pytest tests -q -ra --maxfail=25 \
      "${workers[@]}" ;;
    test-cuda) run_step test-cuda "$PY" -m pytest tests/test_cuda_gpu.py \
      tests/test_gpu_derivatives_and_indices.py -q -ra --maxfail=25 "${workers[@]}" ;;
    test-triton) run_step test-triton env IGC_TRITON_AUTOTUNE="${IGC_TRITON_AUTOTUNE:-0}" \
      IGC_TRITON_FIXED="${IGC_TRITON_FIXED:-default}" "$PY" -m pytest tests/test_triton_gpu.py \
      -q -ra --maxfail=25 "${workers[@]}" ;;
    sanitize) run_step sanitize sanitize_all ;;
    race) run_step race env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \
      --error-exitcode 99 --print-limit 20 "$PY" tools/sanitize_cuda.py ;
      run_step race-fp32mma env IGC_CUDA_FP32_MMA=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool racecheck --error-exitcode 99 --print-limit 20 \
        "$PY" tools/sanitize_cuda.py ;
      run_step race-fp32mma-2planes env IGC_CUDA_FP32_MMA=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 \
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 99 \
        --print-limit 20 "$PY" tools/sanitize_cuda.py ;;
    bench-quick) run_step bench-quick "$PY" benchmarks/bench.py --device cuda --no-compile \
      --no-memory --quiet --only "${BENCH_ONLY:-$IGCV2_TARGETS}" \
      --backends "${BENCH_BACKENDS:-cuda}" --json "$OUT/bench-quick.json" ;
      run_step predicted-quick "$PY" tools/perf_model.py benchmarks/results/gpu-static-*.json \
        --measured "$OUT/bench-quick.json" ;;
    wide-off) run_step wide-off env IGC_CUDA_PLAN_L2_BYTES=0 "$PY" benchmarks/bench.py \
      --device cuda --no-compile --no-memory --quiet \
      --only 1024:16:3,1024:32:2,512:16:3,512:32:2 \
      --backends cuda --json "$OUT/bench-wide-off.json" ;
      run_step wide-off-fp32 env IGC_CUDA_PLAN_L2_BYTES=0 "$PY" benchmarks/bench.py \
      --device cuda --no-compile --no-memory --quiet --only 1024:16:3,1024:32:2 \
      --dtypes float32 --backends cuda --json "$OUT/bench-wide-off-fp32.json" ;;
    prefetch-off) run_step prefetch-off env IGC_CUDA_L2_PREFETCH=0 "$PY" benchmarks/bench.py \
      --device cuda --no-compile --no-memory --quiet --only 1024:8:4 \
      --backends cuda --json "$OUT/bench-prefetch-off.json" ;
      run_step prefetch-off-fp32 env IGC_CUDA_L2_PREFETCH=0 "$PY" benchmarks/bench.py \
      --device cuda --no-compile --no-memory --quiet --only 512:8:3,512:16:3,512:32:2 \
      --dtypes float32 --backends cuda --json "$OUT/bench-prefetch-off-fp32.json" ;
      run_step prefetch-off-fp32mma env IGC_CUDA_L2_PREFETCH=0 IGC_CUDA_FP32_MMA=1 "$PY" \
      benchmarks/bench.py --device cuda --no-compile --no-memory --quiet \
      --only 512:8:3,512:16:3 --dtypes float32 --backends cuda \
      --json "$OUT/bench-prefetch-off-fp32mma.json" ;;
    items4) run_step items4-fp32 env IGC_CUDA_WIDE_ITEMS=0 "$PY" benchmarks/bench.py \
      --device cuda --no-compile --no-memory --quiet --only "$IGCV2_TARGETS" --dtypes float32 \
      --backends cuda --json "$OUT/bench-items4-fp32.json" ;;
    ctas2) run_step ctas2 env IGC_CUDA_MAX_CTAS_PER_SM=2 "$PY" benchmarks/bench.py \
      --device cuda --no-compile --no-memory --quiet --only 256:8:3,256:32:2,1024:8:4,1024:16:3 \
      --backends cuda --json "$OUT/bench-ctas2.json" ;;
    fp32mma) run_step fp32 "$PY" benchmarks/bench.py --device cuda --no-compile --no-memory \
      --quiet --only "$IGCV2_TARGETS" --dtypes float32 --backends cuda \
      --json "$OUT/bench-fp32.json" ;
      run_step fp32mma env IGC_CUDA_FP32_MMA=1 "$PY" benchmarks/bench.py --device cuda \
      --no-compile --no-memory --quiet --only "$IGCV2_TARGETS" --dtypes float32 \
      --backends cuda --json "$OUT/bench-fp32mma.json" ;
      run_step fp32mma-2planes env IGC_CUDA_FP32_MMA=1 TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 \
      "$PY" benchmarks/bench.py --device cuda --no-compile --no-memory --quiet \
      --only "$IGCV2_TARGETS" --dtypes float32 --backends cuda \
      --json "$OUT/bench-fp32mma-2planes.json" ;;
    triton-fp32mma) run_step triton-fp32mma-test env IGC_TRITON_FP32_MMA=1 "$PY" -m pytest \
      tests/test_triton_gpu.py -q -ra -k opt_in_tensor_cores ;
      run_step triton-fp32 "$PY" benchmarks/bench.py --device cuda --no-compile --no-memory \
      --quiet --only 256:8:3,256:16:2,512:16:3 --dtypes float32 --backends triton \
      --json "$OUT/bench-triton-fp32.json" ;
      run_step triton-fp32mma env IGC_TRITON_FP32_MMA=1 "$PY" benchmarks/bench.py --device cuda \
      --no-compile --no-memory --quiet --only 256:8:3,256:16:2,512:16:3 --dtypes float32 \
      --backends triton --json "$OUT/bench-triton-fp32mma.json" ;;
    triton-packed) run_step triton-packed-test "$PY" -m pytest tests/test_triton.py -q -ra \
      -k "packed" ;
      run_step triton-bf16 "$PY" benchmarks/bench.py --device cuda --no-compile --no-memory \
      --quiet --only 256:8:3,256:16:2,256:32:2 --dtypes bfloat16 --backends triton \
      --json "$OUT/bench-triton-bf16.json" ;
      run_step triton-bf16-predicted "$PY" tools/perf_model.py \
        benchmarks/results/gpu-static-triton-3.9.0-packed-k16.json \
        benchmarks/results/gpu-static-triton-3.9.0-configs.json \
        --measured "$OUT/bench-triton-bf16.json" ;
      run_step triton-bf16-fixed env IGC_TRITON_AUTOTUNE=0 "$PY" benchmarks/bench.py \
      --device cuda --no-compile --no-memory --quiet \
      --only 256:8:3,256:16:2,256:32:2,512:8:3,512:16:3,1024:8:4,1024:16:3,1024:32:2 \
      --dtypes bfloat16 --backends triton --json "$OUT/bench-triton-bf16-fixed.json" ;
      run_step triton-bf16-fixed-predicted "$PY" tools/perf_model.py \
        benchmarks/results/gpu-static-triton-3.9.0-packed-k16.json \
        benchmarks/results/gpu-static-triton-3.9.0-configs.json \
        benchmarks/results/gpu-static-triton-3.9.0-packed-wide-forward.json \
        benchmarks/results/gpu-static-triton-3.9.0-wide-backward.json \
        benchmarks/results/gpu-static-triton-3.6.0-default.json \
        benchmarks/results/gpu-static-triton-3.6.0-wide-backward.json \
        benchmarks/results/gpu-static-triton-3.9.0-staged.json \
        benchmarks/results/gpu-static-triton-3.6.0-staged.json \
        --measured "$OUT/bench-triton-bf16-fixed.json" --fixed ;;
    triton-staged)
      for dt in fp32 bf16; do
        only=$STAGED_BF16 dtype=bfloat16
        [ "$dt" = fp32 ] && only=$STAGED_FP32 dtype=float32
        run_step "triton-staged-$dt" env IGC_TRITON_AUTOTUNE=0 "$PY" benchmarks/bench.py \
          --device cuda --no-compile --no-memory --quiet --only "$only" --dtypes "$dtype" \
          --backends triton --json "$OUT/bench-triton-staged-$dt.json"
        for c in ${only//,/ }; do  # each chain whole, alone: a refused one fails its step only
          IFS=: read -r ch k _ <<< "$c"
          run_step "triton-whole-$ch-$k" env IGC_TRITON_AUTOTUNE=0 IGC_TRITON_STAGED=0 "$PY" \
            benchmarks/bench.py --device cuda --no-compile --no-memory --quiet --only "$c" \
            --dtypes "$dtype" --backends triton --json "$OUT/bench-triton-whole-$ch-$k.json"
        done
        run_step "triton-staged-$dt-predicted" "$PY" tools/perf_model.py \
          benchmarks/results/gpu-static-triton-3.9.0-default.json \
          benchmarks/results/gpu-static-triton-3.6.0-default.json \
          benchmarks/results/gpu-static-triton-3.9.0-staged.json \
          benchmarks/results/gpu-static-triton-3.6.0-staged.json \
          benchmarks/results/gpu-static-triton-3.9.0-staged-fp32.json \
          benchmarks/results/gpu-static-triton-3.6.0-staged-fp32.json \
          --measured "$OUT/bench-triton-staged-$dt.json" --fixed
      done ;;
    bench) run_step bench "$PY" benchmarks/bench.py --device cuda --targets --json "$OUT/bench-targets.json" ;
      run_step predicted "$PY" tools/perf_model.py benchmarks/results/gpu-static-*.json \
        --measured "$OUT/bench-targets.json" ;;
    timeline) run_step timeline "$PY" tools/profile_cuda.py --timeline --reps 30 256:8:3 \
      1024:16:3 ;;
    sweep) run_step sweep "$PY" benchmarks/bench.py --device cuda --sweep --no-compile --json "$OUT/bench-sweep.json" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $status
