#!/usr/bin/env bash
# Compile igc_kernels._C with its CUDA kernels on a machine without a GPU, for a GPU machine whose
# python and torch differ from this one's (e.g. python 3.12 with torch 2.11.0+cu130 there), so
# that the GPU machine's time is not spent compiling: tools/gpu_session.sh then loads it with
# IGC_PREBUILT=<the .so> (and builds there only when it does not import).
#
#   tools/prebuild_cuda_ext.sh [TORCH_VERSION [PYTHON_VERSION [ARCHS]]]   (default 2.11.0 3.12 90)
#
# Needs here: a python of PYTHON_VERSION (pyenv or on PATH), nvcc (compiler only), g++, ninja, and
# pip access to the torch wheel of that version (its headers and libraries are linked against;
# torch is never imported, so no CUDA libraries are needed here). Output:
# build/gpu-ext/_C.cpython-<py>-x86_64-linux-gnu.so (build/ is ignored by git: carry the folder
# build/gpu-ext to the GPU machine; build/prebuilt holds the wheel and objects). The flags are
# setup.py's (csrc/build_flags.py; CPU kernels without per-ISA clones unless
# IGC_CPU_TARGET_CLONES=1, as tools/gpu_session.sh builds them) and those
# torch.utils.cpp_extension adds.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${1:-2.11.0}"
PYV="${2:-3.12}"
ARCHS="${3:-90}"
PYTAG="cp${PYV/./}"
WORK="build/prebuilt"
mkdir -p "$WORK/obj" "$WORK/wheel"

PYBIN="python$PYV"
if ! "$PYBIN" -c "" 2>/dev/null && command -v pyenv >/dev/null; then  # (a pyenv shim may refuse)
  PYBIN="$(pyenv root)/versions/$(pyenv versions --bare | grep "^$PYV" | tail -1)/bin/python"
fi
"$PYBIN" -c "" 2>/dev/null || { echo "no python $PYV found"; exit 1; }
PYINC="$("$PYBIN" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
EXT="$("$PYBIN" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"

whl=$(ls "$WORK"/wheel/torch-"$TORCH_VERSION"-"$PYTAG"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$whl" ]; then
  python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYV" \
    --implementation cp --platform manylinux_2_28_x86_64 -d "$WORK/wheel" "torch==$TORCH_VERSION"
  whl=$(ls "$WORK"/wheel/torch-"$TORCH_VERSION"-"$PYTAG"-*.whl | head -1)
fi
T="$WORK/torch-$TORCH_VERSION-$PYTAG"
if [ ! -d "$T/torch/include" ]; then
  mkdir -p "$T"
  python3 -m zipfile -e "$whl" "$T" >/dev/null
fi
T="$(cd "$T" && pwd)/torch"
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda
  [ -f "$CUDA_HOME/include/cuda_runtime.h" ] || CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
fi
[ -f "$CUDA_HOME/include/cuda_runtime.h" ] || { echo "set CUDA_HOME (no cuda_runtime.h found)"; exit 1; }
S="$(pwd)/csrc"

# the project's flags: C++, nvcc, macros (csrc/build_flags.py, as setup.py uses them)
mapfile -t F < <(IGC_CPU_TARGET_CLONES="${IGC_CPU_TARGET_CLONES:-0}" python3 csrc/build_flags.py)
gencode=""
for a in ${ARCHS//,/ }; do gencode="$gencode -gencode=arch=compute_$a,code=sm_$a"; done
last="${ARCHS##*,}"
gencode="$gencode -gencode=arch=compute_$last,code=compute_$last"

{
  # torch.utils.cpp_extension's own: the extension's name, the ABI, and nvcc's half/bf16 rules
  echo "defs = -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H -D_GLIBCXX_USE_CXX11_ABI=1 ${F[2]}"
  echo "incs = -I$S -I$T/include -I$T/include/torch/csrc/api/include -I$CUDA_HOME/include -I$PYINC"
  echo "cflags = -fPIC ${F[0]}"
  echo "nvflags = -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --compiler-options '-fPIC' ${F[1]}$gencode"
  echo "rule cxx"
  echo "  command = g++ -MMD -MF \$out.d \$defs \$incs \$cflags -c \$in -o \$out"
  echo "  depfile = \$out.d"
  echo "rule nvcc"
  echo "  command = nvcc -MD -MF \$out.d \$defs \$incs \$nvflags -c \$in -o \$out"
  echo "  depfile = \$out.d"
  echo "rule link"
  echo "  command = g++ -shared \$in -L$T/lib -lc10 -lc10_cuda -ltorch -ltorch_cpu -ltorch_cuda -ltorch_python -L$CUDA_HOME/lib64 -lcudart -o \$out"
  objs=""
  for f in "$S"/ops.cpp "$S"/cpu/*.cpp; do
    b=$(basename "$f" .cpp)
    echo "build obj/$b.o: cxx $f"
    objs="$objs obj/$b.o"
  done
  for f in "$S"/cuda/*.cu; do
    b=$(basename "$f" .cu)
    echo "build obj/$b.cu.o: nvcc $f"
    objs="$objs obj/$b.cu.o"
  done
  echo "build _C$EXT: link$objs"
} > "$WORK/build.ninja"
ninja -C "$WORK" -j "${MAX_JOBS:-2}"
# alone in its folder, the one path to carry to the GPU machine (the wheel and torch stay here)
mkdir -p build/gpu-ext
cp "$WORK/_C$EXT" "build/gpu-ext/_C$EXT"
echo "built build/gpu-ext/_C$EXT (torch $TORCH_VERSION, python $PYV, sm_${ARCHS//,/ sm_})"
