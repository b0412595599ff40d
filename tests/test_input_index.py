"""The optional input index (CondenseNet's index layer): ``h_0[:, j] = x[:, input_index[j]]``.

Any length, entries may repeat, channels of ``x`` may be left out; the gradient of ``x`` sums
over repeated entries and is zero for channels never selected. Checked for the fused backend
against the float64 oracle (the reference chain with ``index_select``) within the rounding
bound, against an independent dense formula, through the raw ops (opcheck, C++ checks),
gradcheck, torch.compile, and bad input.
"""

from __future__ import annotations

import pytest
import torch

import igc_kernels as igc
from igc_test_utils import (FUSED, assert_bitwise_deterministic, build_problem, check_against_oracle,
                            make_tensor, normalized_op_args)

CASES = {
    # name: (in_channels, index, channels after the index, groups, spatial, layout, dtype)
    "repeats_nchw": (6, [0, 1, 1, 5, 2, 2, 0, 3], [8, 8, 6], [4, 2], (3, 3), "contiguous",
                     torch.float32),
    "subset_channels_last": (12, [11, 3, 7, 0, 9, 4], [6, 9, 6], [3, 3], (2, 5), "channels_last",
                             torch.float32),
    "longer_than_x_tokens": (3, [2, 0, 1, 1, 0, 2, 2, 2, 1], [9, 6], [3], (), "contiguous",
                             torch.float64),
    "all_one_channel_sliced": (5, [4] * 4, [4, 4, 8], [2, 4], (3, 2), "sliced", torch.float32),
    "ncdhw_channels_last_f64": (7, [6, 5, 4, 3, 2, 1, 0, 6], [8, 8], [4], (2, 2, 3),
                                "channels_last", torch.float64),
    "bfloat16_sliced_cl": (8, [1, 3, 5, 7, 1, 3, 5, 7], [8, 12, 8], [2, 4], (3, 3),
                           "sliced_channels_last", torch.bfloat16),
}


def _problem(case, seed=0, bias=True, permutations="random"):
    cin, idx, channels, groups, spatial, layout, dtype = case
    return build_problem(channels, groups, spatial=spatial, N=3, layout=layout, dtype=dtype,
                         permutations=permutations, bias=bias, seed=seed,
                         input_index=torch.tensor(idx), in_channels=cin)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_against_oracle(case):
    p = _problem(case)
    gy = make_tensor((3, p.channels[-1], *p.x.shape[2:]), "contiguous", p.x.dtype,
                     torch.Generator().manual_seed(1))
    y, grads = check_against_oracle(p, FUSED, gy)
    assert grads[0].shape == p.x.shape


def test_unselected_channels_get_zero_gradient_and_repeats_add():
    """dx of a channel never selected is exactly 0; a channel selected twice by a chain that
    copies it to two outputs gets twice the gradient of one copy."""
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([1, 1, 3, 3])
    eye = torch.eye(4, dtype=torch.float64)  # identity layer with 1 group
    y = igc.interleaved_group_conv(x, [eye], [1], input_index=idx, backend=FUSED)
    torch.testing.assert_close(y, x[:, [1, 1, 3, 3]].detach(), rtol=0, atol=0)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(gx[:, [0, 2, 4]], torch.zeros(2, 3, 3, 3, dtype=torch.float64))
    assert torch.equal(gx[:, [1, 3]], torch.full((2, 2, 3, 3), 2.0, dtype=torch.float64))


def test_matches_dense_formula():
    """Independent oracle: y = M x[:, idx] with M the chain's composed dense matrix."""
    p = _problem(CASES["subset_channels_last"], bias=False)
    spec = igc.ChainSpec(p.channels, p.groups, p.permutations)
    M = spec.dense_matrix([w.detach().double() for w in p.weights])
    x64 = p.x.detach().double()[:, p.input_index]
    expected = torch.einsum("oc,nchw->nohw", M, x64)
    y = p.call(FUSED).double()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_deterministic():
    p = _problem(CASES["repeats_nchw"], seed=3)
    assert_bitwise_deterministic(p, FUSED, torch.ones(3, 6, 3, 3), runs=3)


def test_gradcheck_float64():
    p = _problem(CASES["repeats_nchw"], seed=2)
    p = p.to(torch.float64)

    def f(x, *ws):
        return igc.interleaved_group_conv(x, list(ws), p.groups, p.permutations,
                                          input_index=p.input_index, backend=FUSED)

    assert torch.autograd.gradcheck(f, (p.x, *p.weights))


@pytest.mark.parametrize("name", ["repeats_nchw", "subset_channels_last"])
def test_opcheck(igc_ops, name):
    p = _problem(CASES[name])
    args = normalized_op_args(p)
    assert args[-1] is not None
    torch.library.opcheck(igc_ops.chain_forward.default, args)
    x, ws, bs, groups, shuffles, perms, idx = args
    gy = torch.randn(x.shape[0], ws[-1].shape[0], *x.shape[2:], dtype=x.dtype)
    torch.library.opcheck(igc_ops.chain_backward.default,
                          (gy, x.detach(), [w.detach() for w in ws], [b.detach() for b in bs],
                           groups, shuffles, perms, [True, True, True], idx))


def test_raw_op_checks(igc_ops):
    """The C++ checks refuse an index the front end would refuse, and the op works afterwards."""
    p = _problem(CASES["repeats_nchw"])
    x, ws, bs, groups, shuffles, perms, idx = normalized_op_args(p)
    with torch.no_grad():
        bad = idx.clone()
        bad[2] = 6
        with pytest.raises(RuntimeError, match=r"input_index entry 2 = 6 is outside \[0, 6\)"):
            igc_ops.chain_forward(x, ws, bs, groups, shuffles, perms, bad)
        with pytest.raises(RuntimeError, match="input_index must be int64 or int32"):
            igc_ops.chain_forward(x, ws, bs, groups, shuffles, perms, idx.float())
        with pytest.raises(RuntimeError, match="layer 1"):
            igc_ops.chain_forward(x, ws, bs, groups, shuffles, perms, idx[:6])
        y = igc_ops.chain_forward(x, ws, bs, groups, shuffles, perms, idx)
    assert y.shape == (3, 6, 3, 3)


def test_compile_fullgraph():
    torch._dynamo.reset()
    p = _problem(CASES["repeats_nchw"], seed=5, bias=False, permutations="default")

    def f(x, w1, w2):
        return igc.interleaved_group_conv(x, [w1, w2], p.groups, input_index=p.input_index,
                                          backend=FUSED)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    yc = compiled(*p.leaves())
    ye = f(*p.leaves())
    torch.testing.assert_close(yc, ye, rtol=0, atol=0)
    gc = torch.autograd.grad(yc.sum(), p.leaves())
    ge = torch.autograd.grad(ye.sum(), p.leaves())
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


BAD = [
    (torch.tensor([0, 6, 1, 2]), ValueError, r"input_index entries must lie in \[0, 6\), got min 0 and max 6"),
    (torch.tensor([0, -1, 1, 2]), ValueError, r"input_index entries must lie in \[0, 6\)"),
    (torch.tensor([0.0, 1, 2, 3]), TypeError, "input_index must be an integer tensor"),
    (torch.tensor([[0, 1, 2, 3]]), ValueError, r"input_index has shape \(1, 4\)"),
    (torch.tensor([], dtype=torch.int64), ValueError, "non-empty 1-D index"),
    ("first", TypeError, "input_index must be None or a 1-D integer index tensor"),
    ([0, 1, 2.5, 3], TypeError, "sequence must hold ints"),
    (torch.tensor([0, 1, 2, 3, 4, 5]), ValueError,
     r"input_index selects 6 channels, but layer 1 expects C_0 = weight.shape\[1\] \* groups"),
    (torch.tensor([0, 1, 2, 3, 4]), ValueError, r"input_index's length\) must be divisible by groups = 2"),
]


@pytest.mark.parametrize("idx,exc,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_index(idx, exc, msg):
    x = torch.randn(2, 6, 3)
    w = torch.randn(4, 2)
    with pytest.raises(exc, match=msg):
        igc.interleaved_group_conv(x, [w], [2], input_index=idx, backend=FUSED)
    # the same call with a valid index still works afterwards
    y = igc.interleaved_group_conv(x, [w], [2], input_index=[5, 5, 0, 1], backend=FUSED)
    assert y.shape == (2, 4, 3)


def test_index_list_of_ints_and_int32():
    x = torch.randn(2, 6, 4)
    w = torch.randn(4, 2)
    y_list = igc.interleaved_group_conv(x, [w], [2], input_index=[5, 5, 0, 1], backend=FUSED)
    y_i32 = igc.interleaved_group_conv(x, [w], [2], input_index=torch.tensor([5, 5, 0, 1],
                                                                             dtype=torch.int32),
                                       backend=FUSED)
    y_ref = igc.reference.interleaved_group_conv(x, [w], [2], input_index=[5, 5, 0, 1])
    torch.testing.assert_close(y_list, y_ref)
    assert torch.equal(y_list, y_i32)


@pytest.mark.parametrize("form", ["omitted", "none", "index"])
def test_raw_op_autograd_with_and_without_index_argument(igc_ops, form):
    """Autograd of the raw op whether the trailing input_index is left out, None, or given."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    extra = {"omitted": (), "none": (None,), "index": (torch.tensor([0, 0, 1, 3]),)}[form]
    y = igc_ops.chain_forward(x, [w], [], [2], [0], [None], *extra)
    gx, gw = torch.autograd.grad(y.sum(), [x, w])
    idx = extra[0] if form == "index" else None
    y_ref = igc.reference.interleaved_group_conv(x, [w], [2], [None], input_index=idx)
    rx, rw = torch.autograd.grad(y_ref.sum(), [x, w])
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)
