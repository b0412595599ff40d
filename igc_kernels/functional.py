"""The public functional operator."""

from __future__ import annotations

import torch

from . import backends
from ._block import inference_only_check
from ._chain import normalize


_JIT_UNSUPPORTED = (
    "igc_kernels does not support TorchScript (torch.jit.trace / torch.jit.script, deprecated "
    "by PyTorch): use torch.compile, or torch.export (then AOTInductor) to deploy; "
    "igc_kernels.unfuse(model) gives plain modules that TorchScript accepts")


def _autocast_args(x, weights, biases):
    """Under ``torch.autocast`` cast floating inputs to the autocast dtype (float64 excepted)."""
    if not isinstance(x, torch.Tensor):
        return x, weights, biases
    dev = x.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return x, weights, biases
    dtype = torch.get_autocast_dtype(dev)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
            return t.to(dtype)
        return t

    weights = [cast(w) for w in weights] if isinstance(weights, (list, tuple)) else weights
    biases = [cast(b) for b in biases] if isinstance(biases, (list, tuple)) else biases
    return cast(x), weights, biases


def interleaved_group_conv(x, weights, groups, permutations=None, biases=None, *,
                           input_index=None, strides=None, activations=None,
                           residual: bool = False, backend: str = "auto") -> torch.Tensor:
    r"""Fused interleaved group convolution ``y = P_L a_L(W_L ... P_1 a_1(W_1 x))``, optionally
    ``+ x``: a chain of grouped 1x1 layers (per position), or a whole block with spatial layers.

    Args:
        x: ``(N, C_0)`` or ``(N, C_0, *spatial)`` with 1 to 3 spatial dims, any strides.
        weights: ``L`` tensors, ``W_l`` of shape ``(C_l, C_{l-1} // G_l)`` or the conv layout
            ``(C_l, C_{l-1} // G_l, 1, ..., 1)``; or ``(C_l, C_{l-1} // G_l, k, k)`` with ``k``
            odd, ``3 <= k <= 7``, for a spatial layer (a grouped or depth-wise ``k x k``
            convolution with padding ``k // 2``; ``x`` must then be 4-D). Spatial layers run
            in inference only: a call that needs gradients through one raises.
        groups: ``L`` ints ``G_l``.
        permutations: ``L`` entries, each ``None`` (identity), ``"interleave"`` (the channel
            shuffle with ``G_l`` groups) or a 1-D integer gather index of length ``C_l``
            (``out[:, j] = in[:, perm[j]]``). Default: ``"interleave"`` after every layer but
            the last.
        biases: ``L`` entries, each ``None`` or a ``(C_l,)`` tensor added after ``W_l``.
        input_index: ``None`` or a 1-D integer index of ``x``'s channels applied before layer
            1 (``h_0[:, j] = x[:, input_index[j]]``, CondenseNet's index layer): any length
            ``C_0 >= 1``, entries in ``[0, x.shape[1])``, repeats allowed. The gradient of
            ``x`` sums over repeated entries; channels never selected get zero.
        strides: ``None`` (all 1) or ``L`` ints, each 1 or 2; 2 only on spatial layers.
        activations: ``None`` or ``L`` entries, each ``None``, ``"relu"``, ``"relu6"`` or
            ``"hardswish"``, applied after layer ``l``'s bias (before its permutation, which
            commutes with it).
        residual: add ``x`` to the output (needs ``C_L`` = x's channels and stride 1).
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``. Chains with
            spatial layers, activations or a residual add run on ``"cpu"`` (one fused pass in
            inference; with gradients, activations and the add run as PyTorch ops between fused
            chains) and ``"reference"``; the GPU backends refuse them (``"auto"`` falls back).

    Returns:
        ``y`` with ``x``'s shape but ``C_L`` channels (spatial sizes divided by the strides,
        rounded up), in ``x``'s memory format (channels-last in, channels-last out).
        Differentiable in ``x``, every weight and every bias, except through spatial layers.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        raise TypeError(_JIT_UNSUPPORTED)
    x, weights, biases = _autocast_args(x, weights, biases)
    backends.check_backend_name(backend)
    chain = normalize(x, weights, groups, permutations, biases, input_index=input_index,
                      strides=strides, activations=activations, residual=residual)
    inference_only_check(x, chain)
    return backends.select(backend, x, chain).run(x, chain)
