"""The fused C++ CPU kernels of the extension (csrc/cpu/chain_cpu.cpp; csrc/cpu/block_cpu.cpp,
whose kernels are csrc/cpu/block_kernels.h)."""

from __future__ import annotations

from .. import _loader
from .base import Backend, run_op_family


class CPUBackend(Backend):
    name = "cpu"
    summary = "fused C++ CPU kernels (at::parallel_for over tiles of positions)"
    priority = 20
    deterministic = "deterministic at a given thread count"
    runs_blocks = True

    def availability_reasons(self):
        return [] if _loader.ext_loaded() else [_loader.ext_missing_reason()]

    def limit_reasons(self, x, chain):
        spatial = chain.spatial_layers()
        if len(spatial) > 1:
            return [f"layers {', '.join(map(str, spatial))} are spatial; the CPU block kernel "
                    f"runs at most one spatial layer per call"]
        return []

    def run(self, x, chain):
        from .. import _ops
        from .._block import needs_grad, run_segments

        if chain.is_plain:
            return run_op_family(_ops.FAMILY, x, chain)
        if needs_grad(x, chain):  # activations / residual with gradients (no spatial layer)
            return run_segments(x, chain, lambda h, c: run_op_family(_ops.FAMILY, h, c))
        return _ops.block_forward(x, chain)


BACKEND = CPUBackend()
