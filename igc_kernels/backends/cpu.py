"""The fused C++ CPU kernels of the extension (csrc/cpu/chain_cpu.cpp)."""

from __future__ import annotations

from .. import _loader
from .base import Backend, run_op_family


class CPUBackend(Backend):
    name = "cpu"
    summary = "fused C++ CPU kernels (at::parallel_for over tiles of positions)"
    priority = 20
    deterministic = "deterministic at a given thread count"

    def availability_reasons(self):
        return [] if _loader.ext_loaded() else [_loader.ext_missing_reason()]

    def run(self, x, chain):
        from .. import _ops

        return run_op_family(_ops.FAMILY, x, chain)


BACKEND = CPUBackend()
