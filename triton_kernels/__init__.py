"""Fused Triton kernels of igc_kernels (installed as ``igc_kernels.triton_kernels``).

This version ships no Triton kernels yet; the ``"triton"`` backend reports itself unavailable.
"""
