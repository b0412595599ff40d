"""Blocks: chains with spatial layers, activations and a residual add, outside the fused kernels.

:func:`apply_activation` is the PyTorch form of an activation code; :func:`run_segments` runs a
chain that has activations and/or a residual add (no spatial layer) as plain fused chains, one
per run of layers between activations, with the activations and the add as PyTorch ops: what a
backend without a block kernel does when gradients are wanted (every piece is differentiable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._autograd import _needs_autograd
from ._chain import Chain, to_layout_of

_ACT_FNS = {1: F.relu, 2: F.relu6, 3: F.hardswish}


def apply_activation(h: torch.Tensor, code: int) -> torch.Tensor:
    """``h`` through the activation of ``code`` (0: unchanged)."""
    return _ACT_FNS[code](h) if code else h


def needs_grad(x, chain: Chain) -> bool:
    """Whether a call with these tensors needs derivatives: reverse mode (grad mode on and x, a
    weight or a bias requires grad), forward mode or a torch.func transform (the rule of the
    chain ops' autograd wrappers). The block op has none of them."""
    return _needs_autograd(x, chain.weights, [b for b in chain.biases if b is not None])


def inference_only_check(x: torch.Tensor, chain: Chain) -> None:
    """Raise when derivatives are wanted through a spatial layer (spatial layers are inference
    only in this version)."""
    spatial = chain.spatial_layers()
    if spatial and needs_grad(x, chain):
        l = spatial[0]
        k = chain.kernel_sizes[l - 1]
        raise ValueError(
            f"layer {l} is a {k}x{k} spatial layer: spatial layers run in inference only (no "
            f"gradients); call under torch.no_grad() or torch.inference_mode(), or with "
            f"tensors that do not require grad")


def run_segments(x: torch.Tensor, chain: Chain, run_plain) -> torch.Tensor:
    """``chain`` (pointwise layers, with activations and/or a residual add) as plain chains cut
    after every activation, each run by ``run_plain(h, plain_chain)``, then the activations and
    the add in PyTorch."""
    assert not chain.spatial_layers()
    L = chain.num_layers
    acts = chain.activations or (0,) * L
    h, start = x, 0
    for l in range(L):
        if acts[l] == 0 and l < L - 1:
            continue
        sub = Chain(chain.channels[start:l + 2], chain.groups[start:l + 1],
                    chain.weights[start:l + 1], chain.biases[start:l + 1],
                    chain.shuffles[start:l + 1], chain.perms[start:l + 1],
                    chain.input_index if start == 0 else None,
                    chain.in_channels if start == 0 else chain.channels[start])
        h = apply_activation(run_plain(h, sub), acts[l])
        start = l + 1
    if chain.residual:
        h = to_layout_of(h + x, x)
    return h
