"""Build of igc_kernels._C.

The CPU kernels are always built. The CUDA kernels (csrc/cuda/*.cu) are built when torch has
CUDA and nvcc is found, or when IGC_FORCE_CUDA=1; without a visible GPU TORCH_CUDA_ARCH_LIST
defaults to sm_80 and sm_90. Install with `pip install --no-build-isolation -e .`.
The folder triton_kernels/ is installed as igc_kernels.triton_kernels.
IGC_CPU_TARGET_CLONES=0 compiles the CPU kernels for the default x86-64 ISA only instead of
AVX-512 / AVX2 / default clones picked at run time (the largest file: 71 s instead of 128 s on
one core), with slower CPU kernels, for machines that test the GPU backends
(tools/gpu_session.sh sets it).
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# the flags (csrc/build_flags.py, shared with tools/prebuild_cuda_ext.sh), loaded from their file
_spec = importlib.util.spec_from_file_location("build_flags", os.path.join(ROOT, "csrc",
                                                                           "build_flags.py"))
flags = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flags)


def _build_cuda() -> bool:
    if os.environ.get("IGC_FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = _build_cuda() and bool(cuda_sources)
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = list(flags.CXX)
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx.append(flags.OPENMP)
    macros = flags.macros(with_cuda)
    if not with_cuda:
        return CppExtension("igc_kernels._C", sources, extra_compile_args={"cxx": cxx},
                            define_macros=macros, include_dirs=[os.path.join(ROOT, "csrc")])
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return CUDAExtension("igc_kernels._C", sources + cuda_sources,
                         extra_compile_args={"cxx": cxx, "nvcc": list(flags.NVCC)},
                         define_macros=macros,
                         include_dirs=[os.path.join(ROOT, "csrc")])


setup(
    packages=["igc_kernels", "igc_kernels.backends", "igc_kernels.models",
              "igc_kernels.triton_kernels"],
    package_dir={"igc_kernels": "igc_kernels", "igc_kernels.triton_kernels": "triton_kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
