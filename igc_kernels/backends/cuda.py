"""The fused CUDA kernels of the extension (csrc/cuda/). Their limits (layers, shared memory)
come from the extension itself (csrc/cuda/chain_limits.h through ``igc_kernels._C``)."""

from __future__ import annotations

import torch

from .. import _loader
from .base import Backend, run_op_family

_SMEM_OPTIN: dict = {}  # device index -> max dynamic shared memory per block (opt-in)


def _smem_optin(device: torch.device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMEM_OPTIN:
        props = torch.cuda.get_device_properties(idx)
        _SMEM_OPTIN[idx] = int(getattr(props, "shared_memory_per_block_optin", 0) or 49152)
    return _SMEM_OPTIN[idx]


class CUDABackend(Backend):
    name = "cuda"
    summary = "fused CUDA kernels of the C++ extension"
    priority = 10
    deterministic = "deterministic (fixed-order reduction of weight gradients)"

    @property
    def devices(self):
        return ("cuda",)

    def availability_reasons(self):
        out = []
        if not _loader.ext_loaded():
            out.append(_loader.ext_missing_reason())
        elif not _loader.ext_built_with_cuda():
            out.append("igc_kernels._C was built without its CUDA kernels (nvcc was not found or "
                       "torch had no CUDA at build time); rebuild with `pip install "
                       "--no-build-isolation -e .` where both are present")
        if not torch.cuda.is_available():
            out.append("torch reports no usable CUDA device")
        return out

    def limit_reasons(self, x, chain):
        ext = _loader.ext()
        out = []
        if chain.num_layers > ext.CUDA_MAX_LAYERS:
            out.append(f"the chain has {chain.num_layers} layers; the CUDA kernels support at "
                       f"most {ext.CUDA_MAX_LAYERS} layers")
        elif x.device.type == "cuda" and not torch.compiler.is_compiling():
            # while torch.compile traces the caller the op itself checks (and raises)
            optin = _smem_optin(x.device)
            acc = 8 if x.dtype == torch.float64 else 4
            need = ext.cuda_min_smem_bytes(list(chain.channels), acc)
            if need > optin:
                out.append(f"the widest layer ({max(chain.channels)} channels, {x.dtype}) needs "
                           f"{need} bytes of shared memory per block even with tiles of "
                           f"{ext.CUDA_MIN_TILE} positions; this GPU allows {optin}")
        return out

    def run(self, x, chain):
        from .. import _ops

        return run_op_family(_ops.FAMILY, x, chain)


BACKEND = CUDABackend()
