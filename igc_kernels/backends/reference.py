"""The unfused PyTorch chain (``igc_kernels.reference``): any device PyTorch runs on."""

from __future__ import annotations

from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    summary = "unfused PyTorch chain (grouped conv + shuffle per layer)"
    priority = 90
    deterministic = "as deterministic as the underlying convolutions"
    runs_blocks = True

    @property
    def devices(self):
        return ("cpu", "cuda", "xpu", "mps", "meta")

    def run(self, x, chain):
        from ..reference import run_chain

        return run_chain(x, chain)


BACKEND = ReferenceBackend()
