"""nvcc -cubin of the torch-free CUDA device code (``tests/csrc/chain_kernels_instantiate.cu``).

One function, shared by the nvcc tests (``tests/test_cuda_compile_nvcc.py``) and the static GPU
report (``tools/gpu_static.py --cuda``), which read the same ptxas report and SASS. With
``IGC_NVCC_CACHE`` naming a directory, a compile whose command and sources match one already
there is not run again: the test suite sets it for its session, so that the sm_90 compile
(about a minute) serves both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "csrc", "chain_kernels_instantiate.cu")


def _sources_digest() -> str:
    """sha256 over every file the instantiation can include (csrc/, tests/csrc/), by path."""
    h = hashlib.sha256()
    for top in (os.path.join(ROOT, "csrc"), os.path.join(ROOT, "tests", "csrc")):
        for dirpath, dirnames, files in os.walk(top):
            dirnames.sort()
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, ROOT).encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


def compile_instantiations(archs, out_dir: str, nvcc: str | None = None) -> dict:
    """``{arch: (cubin path, nvcc command, ptxas log)}`` for each arch of ``archs`` ("80",
    "90", ...), the compilations run in parallel into ``out_dir`` (or reused from
    ``IGC_NVCC_CACHE``). Warnings are errors; a failed compile raises RuntimeError with
    nvcc's output."""
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not on PATH")
    cache = os.environ.get("IGC_NVCC_CACHE")
    digest = _sources_digest() if cache else ""
    result, procs = {}, []
    for arch in archs:
        out = os.path.join(out_dir, f"chain_kernels_sm{arch}.cubin")
        cmd = [nvcc, "-cubin", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-Werror",
               "all-warnings", "-Xptxas", "-v", f"-gencode=arch=compute_{arch},code=sm_{arch}",
               f"-I{os.path.join(ROOT, 'csrc', 'cuda')}", SOURCE, "-o", out]
        key = None
        if cache:
            key = hashlib.sha256((digest + "\0" + "\0".join(cmd[:-1])).encode()).hexdigest()
            hit = os.path.join(cache, key)
            if os.path.exists(hit + ".log"):
                with open(hit + ".log") as f:
                    result[arch] = (hit + ".cubin", cmd, f.read())
                continue
        procs.append((arch, cmd, out, key, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for arch, cmd, out, key, p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}\n{stdout[-4000:]}\n{stderr[-8000:]}")
        log = stdout + stderr
        if key is not None:  # the log last: its presence marks a complete entry
            hit = os.path.join(cache, key)
            os.makedirs(cache, exist_ok=True)
            tmp = f"{hit}.{os.getpid()}.tmp"  # processes sharing the cache write their own
            shutil.copyfile(out, tmp)
            os.replace(tmp, hit + ".cubin")
            with open(tmp, "w") as f:
                f.write(log)
            os.replace(tmp, hit + ".log")
        result[arch] = (out, cmd, log)
    return result
