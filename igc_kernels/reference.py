"""The unfused chain in plain PyTorch: the ground truth and the benchmark baseline.

``interleaved_group_conv`` here has the signature of :func:`igc_kernels.interleaved_group_conv`
and computes ``y = P_L W_L ... P_1 W_1 x`` layer by layer with ``F.conv{1,2,3}d(groups=G_l)``
(after ``index_select`` of the input index, when one is given)
(cuDNN on GPUs, oneDNN or ATen on CPUs), ``F.channel_shuffle`` for ``"interleave"`` and
``index_select`` for explicit permutations. Every intermediate goes through memory, and autograd
keeps them alive for the backward: exactly the cost the fused operator removes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._block import apply_activation, inference_only_check
from ._chain import Chain, empty_like_layout, normalize, strided_spatial, to_layout_of

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def run_chain(x: torch.Tensor, chain: Chain) -> torch.Tensor:
    """Apply a normalised chain to ``x`` with one PyTorch op per layer and per permutation."""
    if x.dim() > 2 and x.numel() == 0 and chain.spatial_layers():
        # nothing to compute: an empty output of the strided spatial size
        return empty_like_layout(x, chain.channels[-1],
                                 spatial=strided_spatial(x.shape[2:], chain.strides))
    if x.dim() > 2 and x.numel() == 0 and x.shape[0] > 0:
        # A spatial size of zero: F.conv*d refuses an empty spatial extent, so run the chain on
        # the (zero) positions as tokens and give the result x's shape and memory format.
        y = run_chain(x.movedim(1, -1).reshape(-1, x.shape[1]), chain)
        return to_layout_of(y.reshape(x.shape[0], *x.shape[2:], y.shape[1]).movedim(-1, 1), x)
    tokens = x.dim() == 2
    h = x.unsqueeze(-1) if tokens else x
    if chain.input_index is not None:
        h = h.index_select(1, chain.input_index)
    conv = _CONV[h.dim() - 2]
    ones = (1,) * (h.dim() - 2)
    L = chain.num_layers
    ks = chain.kernel_sizes or (1,) * L
    strides = chain.strides or (1,) * L
    acts = chain.activations or (0,) * L
    for l in range(L):
        W = chain.weights[l]
        if ks[l] > 1:  # k x k spatial layer (x is 4-D), padding k // 2
            h = F.conv2d(h, W, chain.biases[l], stride=strides[l], padding=ks[l] // 2,
                         groups=chain.groups[l])
        else:
            h = conv(h, W.reshape(*W.shape, *ones), chain.biases[l], groups=chain.groups[l])
        h = apply_activation(h, acts[l])
        if chain.shuffles[l] > 0:
            h = F.channel_shuffle(h, chain.shuffles[l])
        elif chain.perms[l] is not None:
            h = h.index_select(1, chain.perms[l])
    if tokens:
        h = h.squeeze(-1)
    if chain.residual:
        h = h + x
    return to_layout_of(h, x)


def interleaved_group_conv(x, weights, groups, permutations=None, biases=None, *,
                           input_index=None, strides=None, activations=None, residual=False,
                           backend="reference"):
    """Reference (unfused) interleaved group convolution; same arguments as the fused operator.

    ``backend`` exists for signature parity only and must be ``"reference"`` or ``"auto"``.
    """
    if backend not in ("reference", "auto"):
        raise ValueError(
            f"igc_kernels.reference.interleaved_group_conv only runs the reference chain, "
            f"got backend={backend!r}"
        )
    chain = normalize(x, weights, groups, permutations, biases, input_index=input_index,
                      strides=strides, activations=activations, residual=residual)
    inference_only_check(x, chain)
    return run_chain(x, chain)
