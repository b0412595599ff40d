"""The public functional operator."""

from __future__ import annotations

import torch

from . import backends
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
                           input_index=None, backend: str = "auto") -> torch.Tensor:
    r"""Fused interleaved group convolution ``y = P_L W_L ... P_1 W_1 x`` (1x1, per position).

    Args:
        x: ``(N, C_0)`` or ``(N, C_0, *spatial)`` with 1 to 3 spatial dims, any strides.
        weights: ``L`` tensors, ``W_l`` of shape ``(C_l, C_{l-1} // G_l)`` or the conv layout
            ``(C_l, C_{l-1} // G_l, 1, ..., 1)``.
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
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``y`` with ``x``'s shape but ``C_L`` channels, in ``x``'s memory format (channels-last
        in, channels-last out). Differentiable in ``x``, every weight and every bias.
    """
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        raise TypeError(_JIT_UNSUPPORTED)
    x, weights, biases = _autocast_args(x, weights, biases)
    backends.check_backend_name(backend)
    chain = normalize(x, weights, groups, permutations, biases, input_index=input_index)
    return backends.select(backend, x, chain).run(x, chain)
