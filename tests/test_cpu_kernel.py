"""The fused CPU kernel (backend "cpu") against the float64 oracle (the reference chain).

Forward outputs and the gradients of x, every weight and every bias are compared elementwise
within the rounding bound of the dtype (see ``igc_test_utils``): float64 runs are held to the
float64 bound, float32 runs to the float32 bound against the float64 oracle. Covered: a table
of deliberately odd sizes, hypothesis-drawn chains over every layout, the output memory format,
bitwise determinism, and empty inputs.
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings, strategies as st

import igc_kernels as igc
from igc_test_utils import (
    FUSED,
    X_KINDS,
    assert_bitwise_deterministic,
    Problem,
    assert_layout_like_contract,
    build_problem,
    draw_chain_shape,
    check_against_oracle,
    expanded_like,
    make_tensor,
    random_biases,
    random_weights,
)


# ---------------------------------------------------------------------------------------------
# Odd sizes
# ---------------------------------------------------------------------------------------------
CHANNELS_PER_GROUP = [1, 3, 7, 9, 17, 33]
HW = {"hw1": (1, 1), "hw7": (1, 7), "hw49": (7, 7)}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("N", [1, 3])
@pytest.mark.parametrize("hw", HW.values(), ids=HW.keys())
@pytest.mark.parametrize("cpg", CHANNELS_PER_GROUP)
def test_odd_shapes(cpg, hw, N, layout):
    """Two layers with ``cpg`` input channels per group, non-square groups in between
    (``C = 2 cpg -> 2 (cpg + 1) -> 2 cpg``), interleave, biases, float32 vs the float64 oracle."""
    channels = [2 * cpg, 2 * (cpg + 1), 2 * cpg]
    p = build_problem(channels, [2, 2], spatial=hw, N=N, layout=layout, dtype=torch.float32,
                      bias=True, seed=cpg * 100 + hw[1] * 10 + N)
    gy = torch.randn(N, channels[-1], *hw, dtype=torch.float32)
    y, _ = check_against_oracle(p, FUSED, gy)
    assert y.shape == (N, channels[-1], *hw)
    assert_layout_like_contract(y, p.x)


@pytest.mark.parametrize("cpg", CHANNELS_PER_GROUP)
def test_odd_shapes_deep_float64(cpg):
    """Four layers of ``cpg`` channels per group with random permutations, float64."""
    C = 3 * cpg
    p = build_problem([C] * 5, [3] * 4, spatial=(7,), N=3, permutations="random",
                      bias=[True, False, True, False], seed=cpg)
    gy = torch.randn(3, C, 7, dtype=torch.float64)
    check_against_oracle(p, FUSED, gy)


# ---------------------------------------------------------------------------------------------
# Hypothesis: random chains in every layout
# ---------------------------------------------------------------------------------------------
GRAD_KINDS = ("contiguous", "expanded", "ones_expanded", "channels_last", "sliced")


@st.composite
def chains(draw):
    channels, groups = draw_chain_shape(draw, max_layers=6, max_width=24)
    L = len(groups)
    perms = []
    for l in range(L):
        kind = draw(st.sampled_from(["none", "interleave", "random", "random_int32"]))
        perms.append(kind)
    bias = [draw(st.booleans()) for _ in range(L)]
    conv_layout = [draw(st.booleans()) for _ in range(L)]
    noncontig_w = [draw(st.booleans()) for _ in range(L)]
    return channels, groups, perms, bias, conv_layout, noncontig_w


@st.composite
def problems(draw, x_kind):
    channels, groups, perm_kinds, bias, conv_layout, noncontig_w = draw(chains())
    nsp, layout = X_KINDS[x_kind]
    spatial = tuple(draw(st.integers(1, 5 if nsp < 3 else 3)) for _ in range(nsp))
    N = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    grad_kind = draw(st.sampled_from(GRAD_KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    return (channels, groups, perm_kinds, bias, conv_layout, noncontig_w, x_kind, spatial, N,
            dtype, grad_kind, seed)


def _materialize(channels, groups, perm_kinds, bias, conv_layout, noncontig_w, x_kind, spatial,
                 N, dtype, grad_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    nsp, layout = X_KINDS[x_kind]
    x = make_tensor((N, channels[0], *spatial), layout, dtype, gen).requires_grad_()
    ws = []
    for l in range(len(groups)):
        (w,) = random_weights(channels[l:l + 2], groups[l:l + 1], dtype, gen,
                              conv_layout=conv_layout[l], noncontiguous=[noncontig_w[l]])
        ws.append(w)
    perms = []
    for l, kind in enumerate(perm_kinds):
        C = channels[l + 1]
        if kind == "none":
            perms.append(None)
        elif kind == "interleave":
            perms.append("interleave")
        else:
            p = torch.randperm(C, generator=gen)
            perms.append(p.to(torch.int32) if kind == "random_int32" else p)
    bs = random_biases(channels, bias, dtype, gen)
    out_shape = (N, channels[-1], *spatial)
    if grad_kind == "expanded":
        gy = expanded_like(out_shape, dtype, gen)
    elif grad_kind == "ones_expanded":
        gy = torch.ones((1,) * len(out_shape), dtype=dtype).expand(*out_shape)
    else:
        gy = make_tensor(out_shape, grad_kind, dtype, gen)
    return Problem(x, ws, list(groups), perms, bs, tuple(channels)), gy


# Every layout of x is a parameter (so each is certainly covered); hypothesis draws the chain,
# sizes, dtype and grad_output layout: a quarter of the profile's max_examples (10) per layout.
@pytest.mark.parametrize("x_kind", sorted(X_KINDS))
@settings(max_examples=max(3, settings().max_examples // 4))
@given(data=st.data())
def test_random_chains_against_reference(x_kind, data):
    p, gy = _materialize(*data.draw(problems(x_kind)))
    y, grads = check_against_oracle(p, FUSED, gy)
    assert_layout_like_contract(y, p.x)
    # gradients flow back to the user's tensors in their own shapes (conv layout included)
    for leaf, g in zip(p.leaves(), grads):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype


@pytest.mark.parametrize("perms", [None, "mixed", "all_explicit"])
@pytest.mark.parametrize("bias", [None, "mixed", "all"])
def test_bias_and_permutation_list_forms(bias, perms):
    """Every form of the Tensor?[] lists: none / some / all entries present, for biases and for
    explicit permutations. Gradients must reach every bias that is present."""
    gen = torch.Generator().manual_seed(0)
    which = {None: False, "mixed": [True, False, True], "all": True}[bias]
    perm_list = {None: None,
                 "mixed": ["interleave", torch.randperm(6, generator=gen), None],
                 "all_explicit": [torch.randperm(6, generator=gen) for _ in range(3)]}[perms]
    p = build_problem([6, 6, 6, 6], [2, 3, 2], spatial=(3,), N=2, permutations=perm_list,
                      bias=which, seed=2)
    gy = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen)
    _, grads = check_against_oracle(p, FUSED, gy)
    assert len(grads) == 1 + 3 + {None: 0, "mixed": 2, "all": 3}[bias]


@pytest.mark.parametrize("grad_kind", ["ones_expanded", "expanded", "sliced", "channels_last"])
@pytest.mark.parametrize("x_kind", ["tokens", "nchw", "nchw_channels_last", "ncdhw_sliced"])
def test_grad_output_layouts(x_kind, grad_kind):
    """Every grad_output layout (stride-0 expanded ones included) with every x layout class,
    deterministically (hypothesis draws these too, but not every pair)."""
    args = ([6, 9, 6], [3, 3], ["interleave", "random"], [True, False],
            [False, True], [True, False], x_kind, (3,) * X_KINDS[x_kind][0], 2,
            torch.float32, grad_kind, 17)
    p, gy = _materialize(*args)
    if grad_kind.endswith("expanded"):
        assert 0 in gy.stride()
    check_against_oracle(p, FUSED, gy)


# ---------------------------------------------------------------------------------------------
# Memory format
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [(5,), (3, 4), (2, 3, 2)], ids=["3d", "4d", "5d"])
def test_output_memory_format(spatial):
    gen = torch.Generator().manual_seed(0)
    ws = random_weights([6, 9, 12], [3, 3], torch.float64, gen)
    shape = (2, 6, *spatial)
    x_cl = make_tensor(shape, "channels_last", torch.float64, gen).requires_grad_()
    x_c = x_cl.detach().contiguous().requires_grad_()
    y_cl = igc.interleaved_group_conv(x_cl, ws, [3, 3], backend=FUSED)
    y_c = igc.interleaved_group_conv(x_c, ws, [3, 3], backend=FUSED)
    out_shape = (2, 12, *spatial)
    assert y_cl.shape == y_c.shape == out_shape
    assert y_c.is_contiguous()
    assert y_cl.movedim(1, -1).is_contiguous()
    if len(spatial) == 2:
        assert y_cl.is_contiguous(memory_format=torch.channels_last)
        assert not y_cl.is_contiguous()
    if len(spatial) == 3:
        assert y_cl.is_contiguous(memory_format=torch.channels_last_3d)
    # same values whatever the layout: float64, two layers of 2- and 3-term sums of O(1)
    # values, so any summation order agrees to ~1e-15; 1e-12 leaves ample slack
    torch.testing.assert_close(y_cl, y_c, rtol=1e-12, atol=1e-12)
    # the fused backward returns grad_x in the input's layout too (the fake kernel's contract;
    # the reference chain's convolutions do not promise it)
    (dx_cl,) = torch.autograd.grad(y_cl.sum(), x_cl)
    (dx_c,) = torch.autograd.grad(y_c.sum(), x_c)
    if FUSED != "reference":
        assert dx_cl.movedim(1, -1).is_contiguous()
        assert dx_c.is_contiguous()


def test_tokens_output_is_contiguous():
    """2-D tokens given transposed (strides (1, N)) give a contiguous (N, C_L) result."""
    x = torch.randn(8, 20, dtype=torch.float64).t()
    assert x.stride() == (1, 20)
    ws = [torch.randn(4, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)]
    y = igc.interleaved_group_conv(x, ws, [2, 2], backend=FUSED)
    assert y.shape == (20, 8) and y.is_contiguous()
    yr = igc.reference.interleaved_group_conv(x.contiguous(), ws, [2, 2])
    # float64, at most 4 + 2 terms per output of magnitude O(10): 1e-12 is ~1000 ulps of slack
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bitwise_determinism(layout):
    """Forward and every gradient are bitwise identical over repeated runs at one thread count.
    The problem is large enough (4 x 32 x 16 x 16) to be split across threads."""
    torch.set_num_threads(2)
    p = build_problem([32, 48, 32, 32], [4, 8, 4], spatial=(16, 16), N=4, layout=layout,
                      dtype=torch.float32, permutations=["interleave", torch.randperm(32), None],
                      bias=True, seed=3)
    assert_bitwise_deterministic(p, FUSED, torch.randn(4, 32, 16, 16))


# ---------------------------------------------------------------------------------------------
# Empty inputs
# ---------------------------------------------------------------------------------------------
EMPTY_CASES = {
    "n0_nchw": (0, (3, 3), "contiguous"),
    "n0_tokens": (0, (), "contiguous"),
    "n0_channels_last": (0, (2, 2), "channels_last"),
    "h0": (2, (0, 3), "contiguous"),
    "l0_ncl": (2, (0,), "contiguous"),
    "d0_ncdhw": (1, (2, 0, 2), "contiguous"),
}


@pytest.mark.parametrize("backend", [FUSED, "reference"])
@pytest.mark.parametrize("case", EMPTY_CASES.values(), ids=EMPTY_CASES.keys())
def test_empty_input(case, backend):
    N, spatial, layout = case
    p = build_problem([6, 9, 4], [3, 1], spatial=spatial, N=N, layout=layout,
                      dtype=torch.float32, permutations=["interleave", torch.randperm(4)],
                      bias=True)
    y = p.call(backend)
    assert y.shape == (N, 4, *spatial)
    assert y.dtype == torch.float32
    grads = torch.autograd.grad(y, p.leaves(), torch.ones_like(y))
    dx = grads[0]
    assert dx.shape == p.x.shape and dx.numel() == 0
    for name, g, leaf in zip(p.leaf_names()[1:], grads[1:], p.leaves()[1:]):
        assert g.shape == leaf.shape, name
        assert torch.equal(g, torch.zeros_like(leaf)), f"grad of {name} is not exactly zero: {g}"
