"""The fused Triton kernels (triton_kernels/chain.py, registered by ``_triton_ops.py``): CUDA
tensors when the kernels compile, CPU tensors under Triton's interpreter."""

from __future__ import annotations

import torch

from .. import _loader
from .base import Backend, run_op_family

_OPS = [None]  # the imported igc_kernels._triton_ops module, once loaded


def triton_ops():
    """``igc_kernels._triton_ops``, imported on first use (it imports Triton)."""
    if _OPS[0] is None:
        from .. import _triton_ops as mod

        _OPS[0] = mod
    return _OPS[0]


class TritonBackend(Backend):
    name = "triton"
    summary = ("fused Triton kernels (one program per tile of positions, all layers in "
               "registers)")
    priority = 30
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    deterministic = "deterministic (fixed-order reduction of weight gradients)"
    device_note = ("CPU tensors run through Triton's interpreter only, with TRITON_INTERPRET=1 "
                   "set before igc_kernels.triton_kernels is imported")

    @property
    def devices(self):
        """CUDA when the kernels are compiled, the CPU when Triton's interpreter runs them (both
        while the kernels are not loaded: then the availability reasons say why)."""
        mod = _OPS[0]
        if mod is None:
            return ("cuda", "cpu")
        return ("cpu",) if mod.INTERPRETED else ("cuda",)

    def availability_reasons(self):
        if not _loader.triton_installed():
            return ["triton is not installed (pip install triton)"]
        try:
            mod = triton_ops()
        except Exception as e:  # a Triton too old or broken: say why, never fail the import
            return [f"the Triton kernels could not be loaded ({type(e).__name__}: {e})"]
        if not mod.INTERPRETED and not torch.cuda.is_available():
            return ["torch reports no usable CUDA device and Triton's interpreter is off"]
        return []

    def limit_reasons(self, x, chain):
        """The channel limit; on GPUs also a structure whose every launch configuration spills
        when compiled for this GPU (forward, and the backward when gradients are wanted).
        While torch.compile traces the caller, the spill check is left to the op's body (it
        compiles kernels: not traceable by Dynamo), where a refusal raises instead of falling
        back."""
        mod = triton_ops()
        reasons = mod.channel_limit_reasons(chain)
        if not reasons and not torch.compiler.is_compiling() and mod.checks_spills(x):
            grad = torch.is_grad_enabled()
            reasons = mod.spill_reasons(
                x, chain, need_dx=grad and x.requires_grad,
                need_dw=grad and any(w.requires_grad for w in chain.weights),
                need_db=grad and any(b is not None and b.requires_grad for b in chain.biases))
        return reasons

    def run(self, x, chain):
        return run_op_family(triton_ops().FAMILY, x, chain)


BACKEND = TritonBackend()
