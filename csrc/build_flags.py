"""How igc_kernels._C is compiled, without importing torch: setup.py builds with these flags, and
tools/prebuild_cuda_ext.sh (a build for another machine's torch, never imported here) reads them
from ``python3 csrc/build_flags.py`` (three lines: C++ flags, nvcc flags, -D macros of a CUDA
build). torch.utils.cpp_extension adds its own flags to both."""

import os

CXX = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fvisibility=hidden"]
# at::parallel_for is a header template whose `#pragma omp parallel` is compiled into this
# extension: without -fopenmp it silently runs on one thread (where torch has OpenMP, on Linux).
# Not linked with -fopenmp on purpose: the GOMP symbols then resolve to the OpenMP runtime torch
# already loaded (a second runtime would bring a second, competing thread pool).
OPENMP = "-fopenmp"
# -lineinfo: source lines in compute-sanitizer and Nsight reports, no effect on the code
NVCC = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]


def macros(with_cuda: bool) -> list:
    """``(name, value)`` pairs. IGC_CPU_TARGET_CLONES=0: the CPU kernels for the default ISA only
    (no AVX-512 / AVX2 clones picked at run time), a faster build with slower CPU kernels."""
    out = [("IGC_BUILT_WITH_CUDA", "1" if with_cuda else "0")]
    if os.environ.get("IGC_CPU_TARGET_CLONES", "1") == "0":
        out.append(("IGC_NO_TARGET_CLONES", "1"))
    return out


if __name__ == "__main__":
    print(" ".join(CXX + [OPENMP]))
    print(" ".join(NVCC))
    print(" ".join(f"-D{k}={v}" for k, v in macros(True)))
