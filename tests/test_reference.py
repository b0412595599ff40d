"""The reference (unfused) chain against an independent oracle: the composed dense matrix.

``ChainSpec.dense_matrix`` / ``dense_bias`` build ``M = P_L W_L ... P_1 W_1`` and the composed
bias from block-diagonal matrices (no convolution, no channel shuffle op), so ``y = M x + b`` per
position is an independent computation of the operator. Everything here is float64; the
tolerance is the rounding bound of ``igc_test_utils`` (both sides round, hence safety 4), with
``C_0 + C_L`` added to the reduction length for the dense matrix-vector products.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import igc_kernels as igc
from igc_kernels import ChainSpec
from igc_test_utils import (
    assert_within_rounding,
    build_problem,
    magnitudes,
    make_tensor,
)

# (channels, groups, permutations, bias): square and non-square groups, explicit permutations,
# identity permutations, an IGCV1-style explicit "permute back", biases on some layers.
CONFIGS = {
    "igcv2_square": ([12, 12, 12], [3, 4], "default", False),
    "nonsquare_bias": ([6, 15, 10, 4], [3, 5, 2], "default", True),
    "random_perms_mixed_bias": ([8, 12, 6, 9], [2, 3, 3], "random", [True, False, True]),
    "identity_perms": ([8, 8, 8], [2, 4], [None, None], [False, True]),
    "igcv1_permute_back": ([12, 12, 12], [4, 3], "igcv1", True),
    "single_dense_layer": ([5, 7], [1], "default", True),
    "depthwise_then_pointwise": ([6, 6, 9, 3], [6, 3, 1], ["interleave", "interleave", None], True),
}
SPATIAL = {"tokens": (), "1d": (5,), "2d": (2, 3), "3d": (2, 1, 3)}


def _permutations(kind, channels, groups, gen):
    if kind == "igcv1":
        # interleave after layer 1; after layer 2 the explicit inverse of that shuffle
        fwd = igc.interleave_index(channels[1], groups[0])
        return ["interleave", torch.argsort(fwd)]
    return kind


def _dense_apply(M, b, x):
    """``M x + b`` at every position of ``x`` (channels in dim 1)."""
    y = x.movedim(1, -1) @ M.t()
    if b is not None:
        y = y + b
    return y.movedim(-1, 1)


@pytest.mark.parametrize("spatial", SPATIAL.values(), ids=SPATIAL.keys())
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_reference_matches_dense_matrix(config, spatial):
    channels, groups, perms, bias = config
    gen = torch.Generator().manual_seed(1)
    perms = _permutations(perms, channels, groups, gen)
    p = build_problem(channels, groups, spatial=spatial, N=3, permutations=perms, bias=bias,
                      seed=len(spatial))
    spec = ChainSpec(channels, groups, p.permutations)
    biases = p.biases if p.biases is not None else [None] * len(groups)
    gy = torch.randn(3, channels[-1], *spatial, dtype=torch.float64, generator=gen)
    leaves = p.leaves()

    y = igc.reference.interleaved_group_conv(p.x, p.weights, groups, p.permutations, p.biases)
    assert y.shape == (3, channels[-1], *spatial)
    assert y.dtype == torch.float64
    grads = torch.autograd.grad(y, leaves, gy)

    # the dense oracle, differentiable through block_diag / indexing
    M = spec.dense_matrix(p.weights)
    assert M.shape == (channels[-1], channels[0])
    b = spec.dense_bias(p.weights, biases) if p.biases is not None else None
    y_dense = _dense_apply(M, b, p.x)
    grads_dense = torch.autograd.grad(y_dense, leaves, gy)

    ymag, gmags = magnitudes(p, gy)
    k = p.reduction_length() + channels[0] + channels[-1]
    assert_within_rounding(y, y_dense, ymag, k, torch.float64, safety=4, name="output")
    for name, g, gd, mag in zip(p.leaf_names(), grads, grads_dense, gmags):
        assert_within_rounding(g, gd, mag, k, torch.float64, safety=4, name=f"grad of {name}")


def test_dense_matrix_by_hand():
    """One layer, 2 groups, then an explicit permutation: M written out entry by entry."""
    W = torch.arange(1.0, 13.0, dtype=torch.float64).view(6, 2)  # C_1 = 6, C_0 = 4, G = 2
    perm = torch.tensor([5, 0, 3, 1, 4, 2])
    spec = ChainSpec([4, 6], [2], [perm])
    M = spec.dense_matrix([W])
    expected = torch.zeros(6, 4, dtype=torch.float64)
    for i in range(6):  # u = blockdiag(W) x: rows 0..2 read inputs 0..1, rows 3..5 inputs 2..3
        g = i // 3
        expected[i, 2 * g:2 * g + 2] = W[i]
    expected = expected[perm]  # gather: out[j] = u[perm[j]]
    assert torch.equal(M, expected)
    b = torch.tensor([1.0, 2, 3, 4, 5, 6], dtype=torch.float64)
    assert torch.equal(spec.dense_bias([W], [b]), b[perm])


@pytest.mark.parametrize("C,G", [(8, 2), (12, 3), (12, 4), (6, 6), (5, 1)])
def test_interleave_is_channel_shuffle(C, G):
    idx = igc.interleave_index(C, G)
    m = C // G
    expected = torch.tensor([g * m + k for k in range(m) for g in range(G)])
    assert torch.equal(idx, expected)
    # the same as nn.ChannelShuffle(G) applied to the channel numbers
    shuffled = nn.ChannelShuffle(G)(torch.arange(C, dtype=torch.float64).view(1, C, 1, 1))
    assert torch.equal(shuffled.flatten().long(), idx)
    # and the operator's "interleave" after a grouped layer equals conv + nn.ChannelShuffle
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    W = torch.randn(C, C // G, dtype=torch.float64)
    y = igc.reference.interleaved_group_conv(x, [W], [G], ["interleave"])
    y_nn = nn.ChannelShuffle(G)(torch.nn.functional.conv2d(x, W[:, :, None, None], groups=G))
    torch.testing.assert_close(y, y_nn, rtol=0, atol=0)
    y_idx = igc.reference.interleaved_group_conv(x, [W], [G], [idx])
    torch.testing.assert_close(y_idx, y_nn, rtol=0, atol=0)


def test_default_permutations_are_igcv2():
    p = build_problem([12, 12, 12, 12], [3, 4, 2], spatial=(2, 2))
    y_default = igc.reference.interleaved_group_conv(p.x, p.weights, p.groups)
    y_explicit = igc.reference.interleaved_group_conv(
        p.x, p.weights, p.groups, ["interleave", "interleave", None])
    assert torch.equal(y_default, y_explicit)
    y_none = igc.reference.interleaved_group_conv(p.x, p.weights, p.groups, [None] * 3)
    assert not torch.allclose(y_default, y_none)


def test_permutation_forms_agree():
    """An index as int64 tensor, int32 tensor or Python list of ints gives the same result."""
    p = build_problem([6, 9], [3], spatial=(4,))
    perm = torch.randperm(9)
    outs = [igc.reference.interleaved_group_conv(p.x, p.weights, [3], [q])
            for q in (perm, perm.to(torch.int32), perm.tolist())]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    base = igc.reference.interleaved_group_conv(p.x, p.weights, [3], [None])
    assert torch.equal(outs[0], base[:, perm])


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_conv_layout_weights(ndim):
    """``(C_l, n_l, 1, ..., 1)`` weights give the same result as 2-D ones, and their gradient has
    the conv layout."""
    p = build_problem([8, 12, 4], [4, 2], spatial=(3, 2), bias=True)
    conv_ws = [w.detach().reshape(*w.shape, *([1] * (ndim - 2))).requires_grad_()
               for w in p.weights]
    y2 = igc.reference.interleaved_group_conv(p.x, p.weights, p.groups, biases=p.biases)
    yc = igc.reference.interleaved_group_conv(p.x, conv_ws, p.groups, biases=p.biases)
    assert torch.equal(y2, yc)
    g2 = torch.autograd.grad(y2.sum(), p.weights)
    gc = torch.autograd.grad(yc.sum(), conv_ws)
    for a, c, w in zip(g2, gc, conv_ws):
        assert c.shape == w.shape
        assert torch.equal(a, c.reshape(a.shape))


@pytest.mark.parametrize("spatial", [(3,), (3, 4), (2, 3, 2)])
def test_reference_memory_format(spatial):
    gen = torch.Generator().manual_seed(0)
    W = [torch.randn(8, 2, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)]
    shape = (2, 4, *spatial)
    x_cl = make_tensor(shape, "channels_last", torch.float64, gen)
    x_c = x_cl.contiguous()
    y_cl = igc.reference.interleaved_group_conv(x_cl, W, [2, 2])
    y_c = igc.reference.interleaved_group_conv(x_c, W, [2, 2])
    assert y_cl.movedim(1, -1).is_contiguous()
    assert y_c.is_contiguous()
    if len(spatial) == 2:
        assert y_cl.is_contiguous(memory_format=torch.channels_last)
    if len(spatial) == 3:
        assert y_cl.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(y_cl, y_c, rtol=1e-14, atol=1e-14)


def test_reference_module_rejects_other_backends():
    x = torch.randn(2, 4)
    W = [torch.randn(4, 2)]
    with pytest.raises(ValueError, match="only runs the reference chain"):
        igc.reference.interleaved_group_conv(x, W, [2], backend="cpu")
    y = igc.reference.interleaved_group_conv(x, W, [2], backend="auto")
    assert y.shape == (2, 4)
