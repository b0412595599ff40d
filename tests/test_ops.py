"""The registered operators igc::chain_forward / igc::chain_backward called directly.

* ``torch.library.opcheck``: schema, autograd registration, fake (meta) kernels with the real
  kernels' sizes / strides / dtypes, and AOT dispatch with dynamic shapes.
* ``chain_backward`` against the float64 oracle's gradients, output_mask honoured.
* Inconsistent arguments raise ``RuntimeError`` from the C++ checks (never crash), and the op
  still works afterwards.

Arguments are built by the package's own ``normalize()`` from user-level arguments.
"""

from __future__ import annotations

import pytest
import torch

import igc_kernels as igc

from igc_test_utils import (
    build_problem,
    check_against_oracle,
    magnitudes,
    normalized_op_args,
    oracle,
    assert_within_rounding,
)

OP_CASES = {
    # name: (channels, groups, permutations, bias, spatial, layout, dtype)
    "tokens_float32": ([8, 12, 8], [4, 2], "default", False, (), "contiguous", torch.float32),
    "nchw_bias": ([6, 9, 6], [3, 3], "default", True, (3, 4), "contiguous", torch.float32),
    "nchw_channels_last_bias_perms": ([8, 8, 12], [2, 4], "random", True, (3, 3),
                                      "channels_last", torch.float32),
    "ncl_float64_perms": ([6, 6, 6], [2, 3], ["interleave", "random"], True, (5,),
                          "contiguous", torch.float64),
    "ncdhw_channels_last": ([4, 8], [2], "random", False, (2, 2, 3), "channels_last",
                            torch.float32),
    "nchw_sliced_bfloat16": ([8, 8], [4], "default", True, (3, 2), "sliced", torch.bfloat16),
}


def _problem(case, requires_grad=True, seed=0):
    channels, groups, perms, bias, spatial, layout, dtype = case
    if isinstance(perms, list):  # "random" entries become explicit random indices
        g = torch.Generator().manual_seed(seed)
        perms = [torch.randperm(channels[l + 1], generator=g) if p == "random" else p
                 for l, p in enumerate(perms)]
    p = build_problem(channels, groups, spatial=spatial, N=2, layout=layout, dtype=dtype,
                      permutations=perms, bias=bias, seed=seed)
    if not requires_grad:
        for t in p.leaves():
            t.requires_grad_(False)
    return p


@pytest.mark.parametrize("case", OP_CASES.values(), ids=OP_CASES.keys())
def test_opcheck_chain_forward(igc_ops, case):
    p = _problem(case)
    torch.library.opcheck(igc_ops.chain_forward.default, normalized_op_args(p))


def test_opcheck_chain_forward_no_grad_mixed_biases(igc_ops):
    """Biases on some layers only ((0,)-shaped entries for none), no input requiring grad."""
    case = ([6, 6, 6, 3], [3, 2, 3], "random", [True, False, True], (2, 3), "contiguous",
            torch.float32)
    p = _problem(case, requires_grad=False)
    torch.library.opcheck(igc_ops.chain_forward.default, normalized_op_args(p))


def test_opcheck_chain_forward_mixed_biases_with_grad(igc_ops):
    """Biases on some layers only, every input requiring grad: the present biases get theirs."""
    case = ([6, 6, 6, 3], [3, 2, 3], "random", [True, False, True], (2, 3), "contiguous",
            torch.float64)
    p = _problem(case)
    args = normalized_op_args(p)
    torch.library.opcheck(igc_ops.chain_forward.default, args)
    y = igc_ops.chain_forward(*args)
    bs = [b for b in args[2] if b.numel() > 0]
    grads = torch.autograd.grad(y.sum(), bs)
    # d(sum y)/d b_1 and b_3 through the float64 reference chain
    x = p.x.detach()
    ref_bs = [b.detach().clone().requires_grad_(True) if b is not None else None
              for b in p.biases]
    y_ref = igc.reference.interleaved_group_conv(x, [w.detach() for w in p.weights], p.groups,
                                                 p.permutations, ref_bs)
    ref = torch.autograd.grad(y_ref.sum(), [b for b in ref_bs if b is not None])
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


MASKS = [[True, True, True], [True, False, False], [False, True, True], [False, False, True]]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
@pytest.mark.parametrize("case", OP_CASES.values(), ids=OP_CASES.keys())
def test_opcheck_chain_backward(igc_ops, case, mask):
    p = _problem(case, requires_grad=False)
    x, ws, bs, groups, shuffles, perms, _ = normalized_op_args(p)
    out_shape = (x.shape[0], ws[-1].shape[0], *x.shape[2:])
    gy = torch.randn(out_shape, dtype=x.dtype)
    if case[5] == "channels_last":
        gy = gy.movedim(1, -1).contiguous().movedim(-1, 1)
    torch.library.opcheck(igc_ops.chain_backward.default,
                          (gy, x, ws, bs, groups, shuffles, perms, mask))


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
def test_chain_backward_values_and_mask(igc_ops, mask):
    """chain_backward's flat outputs against the oracle's gradients; masked outputs are (0,)."""
    p = build_problem([6, 9, 6], [3, 3], spatial=(2, 3), N=2, permutations="random",
                      bias=[True, False], seed=5)
    x, ws, bs, groups, shuffles, perms, _ = normalized_op_args(p)
    gy = torch.randn(2, 6, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        gx, gw, gb = igc_ops.chain_backward(gy, x, ws, bs, groups, shuffles, perms, mask)
    _, g64 = oracle(p, gy)
    _, mags = magnitudes(p, gy)
    k = p.reduction_length()
    nw = sum(w.numel() for w in ws)
    if mask[0]:
        assert_within_rounding(gx, g64[0], mags[0], k, torch.float64, safety=4, name="grad_x")
    else:
        assert gx.shape == (0,)
    if mask[1]:
        assert gw.shape == (nw,)
        assert_within_rounding(gw, torch.cat([g.reshape(-1) for g in g64[1:3]]),
                               torch.cat([m.reshape(-1) for m in mags[1:3]]), k, torch.float64,
                               safety=4, name="grad_weights")
    else:
        assert gw.shape == (0,)
    if mask[2]:
        assert gb.shape == (9,)  # only layer 1 (C_1 = 9) has a bias
        assert_within_rounding(gb, g64[3], mags[3], k, torch.float64, safety=4, name="grad_biases")
    else:
        assert gb.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Inconsistent arguments to the raw op: RuntimeError from the C++ checks, never a crash
# ---------------------------------------------------------------------------------------------
def _good_args():
    x = torch.randn(2, 8, 3, 3)
    ws = [torch.randn(12, 4), torch.randn(6, 6)]
    return x, ws, [torch.randn(12), torch.empty(0)], [2, 2], [2, 0], [None, torch.randperm(6)]


def _with(index, value):
    def make():
        args = list(_good_args())
        args[index] = value(args) if callable(value) else value
        return args
    return make


def _replace_in_list(index, pos, value):
    def make():
        args = list(_good_args())
        lst = list(args[index])
        lst[pos] = value
        args[index] = lst
        return args
    return make


BAD_FORWARD = {
    "empty_layer_list": _with(1, []),
    "groups_length": _with(3, [2]),
    "shuffles_length": _with(4, [2, 0, 0]),
    "biases_length": _with(2, [torch.randn(12)]),
    "perms_length": _with(5, [None]),
    "x_one_dim": _with(0, torch.randn(8)),
    "x_six_dims": _with(0, torch.randn(1, 8, 1, 1, 1, 1)),
    "x_wrong_channels": _with(0, torch.randn(2, 10, 3, 3)),
    "x_int64": _with(0, torch.zeros(2, 8, 3, 3, dtype=torch.int64)),
    "groups_zero": _with(3, [0, 2]),
    "groups_negative": _with(3, [-2, 2]),
    "groups_not_dividing": _with(3, [3, 2]),
    "weight_3d": _replace_in_list(1, 0, torch.randn(12, 4, 3)),
    "weight_wrong_fan_in": _replace_in_list(1, 0, torch.randn(12, 3)),
    "layers_do_not_chain": _replace_in_list(1, 1, torch.randn(6, 5)),
    "out_channels_not_divisible": _replace_in_list(1, 1, torch.randn(7, 6)),
    "weight_dtype": _replace_in_list(1, 1, torch.randn(6, 6, dtype=torch.float64)),
    "bias_shape": _replace_in_list(2, 0, torch.randn(11)),
    "bias_dtype": _replace_in_list(2, 0, torch.randn(12, dtype=torch.float64)),
    "shuffle_negative": _with(4, [-1, 0]),
    "shuffle_not_dividing": _with(4, [5, 0]),
    "perm_wrong_length": _replace_in_list(5, 1, torch.arange(5)),
    "perm_float": _replace_in_list(5, 1, torch.arange(6.0)),
    "perm_out_of_range": _replace_in_list(5, 1, torch.tensor([0, 1, 2, 3, 4, 6])),
    "perm_negative": _replace_in_list(5, 1, torch.tensor([0, 1, 2, 3, 4, -1])),
    "perm_duplicate": _replace_in_list(5, 1, torch.tensor([0, 1, 2, 3, 3, 5])),
}


def _good_forward_call(igc_ops):
    x, ws, bs, groups, shuffles, perms = _good_args()
    y = igc_ops.chain_forward(x, ws, bs, groups, shuffles, perms)
    assert y.shape == (2, 6, 3, 3)
    return y


@pytest.mark.parametrize("make_args", BAD_FORWARD.values(), ids=BAD_FORWARD.keys())
def test_chain_forward_rejects_inconsistent_args(igc_ops, make_args):
    _good_forward_call(igc_ops)
    # the C++ argument checks name the op (a TORCH_CHECK, not an incidental failure)
    with pytest.raises(RuntimeError, match="igc::chain_forward"):
        igc_ops.chain_forward(*make_args())
    _good_forward_call(igc_ops)  # the process keeps working


BAD_BACKWARD = {
    "grad_y_channels": lambda a: (torch.randn(2, 7, 3, 3), *a),
    "grad_y_spatial": lambda a: (torch.randn(2, 6, 3, 4), *a),
    "grad_y_batch": lambda a: (torch.randn(3, 6, 3, 3), *a),
    "grad_y_dims": lambda a: (torch.randn(2, 6, 9), *a),
    "grad_y_dtype": lambda a: (torch.randn(2, 6, 3, 3, dtype=torch.float64), *a),
    "weights_layers_do_not_chain": lambda a: (
        torch.randn(2, 6, 3, 3), a[0], [a[1][0], torch.randn(6, 5)], *a[2:]),
    "perm_out_of_range": lambda a: (
        torch.randn(2, 6, 3, 3), *a[:5], [None, torch.tensor([0, 1, 2, 3, 4, 9])]),
}


@pytest.mark.parametrize("make_args", BAD_BACKWARD.values(), ids=BAD_BACKWARD.keys())
def test_chain_backward_rejects_inconsistent_args(igc_ops, make_args):
    with pytest.raises(RuntimeError, match="igc::chain_backward"):
        igc_ops.chain_backward(*make_args(_good_args()), [True, True, True])
    x, ws, bs, groups, shuffles, perms = _good_args()
    gx, gw, gb = igc_ops.chain_backward(torch.randn(2, 6, 3, 3), x, ws, bs, groups, shuffles,
                                        perms, [True, True, True])
    assert gx.shape == x.shape and gw.shape == (12 * 4 + 6 * 6,) and gb.shape == (12,)


def test_op_forward_matches_oracle_with_int32_perm(igc_ops):
    """The op accepts int32 permutation tensors as well as int64 ones."""
    p = build_problem([6, 6], [3], spatial=(4,), N=2, permutations=[torch.randperm(6).int()])
    x, ws, bs, groups, shuffles, perms, _ = normalized_op_args(p)
    perms32 = [q.to(torch.int32) if q is not None else None for q in perms]
    y32 = igc_ops.chain_forward(x, ws, bs, groups, shuffles, perms32)
    y64 = igc_ops.chain_forward(x, ws, bs, groups, shuffles, perms)
    assert torch.equal(y32, y64)
    check_against_oracle(p, "cpu", None)


def test_chain_backward_checks_grad_y(igc_ops):
    """A grad_y of the wrong shape or dtype raises from the shared C++ check, naming both."""
    p = build_problem([6, 9, 6], [3, 3], spatial=(2, 3), N=2, seed=6)
    x, ws, bs, groups, shuffles, perms, _ = normalized_op_args(p)
    x, ws = x.detach(), [w.detach() for w in ws]
    mask = [True, True, False]
    with pytest.raises(RuntimeError, match=r"grad_y has shape \[2, 5, 2, 3\], expected x's shape "
                                           r"with 6 channels"):
        igc_ops.chain_backward(torch.zeros(2, 5, 2, 3, dtype=x.dtype), x, ws, bs, groups,
                               shuffles, perms, mask)
    with pytest.raises(RuntimeError, match=r"grad_y has shape \[2, 6, 3, 3\] but x has shape"):
        igc_ops.chain_backward(torch.zeros(2, 6, 3, 3, dtype=x.dtype), x, ws, bs, groups,
                               shuffles, perms, mask)
    with pytest.raises(RuntimeError, match="grad_y has dtype Float but x has dtype Double"):
        igc_ops.chain_backward(torch.zeros(2, 6, 2, 3), x, ws, bs, groups, shuffles, perms, mask)
    gx, gw, _ = igc_ops.chain_backward(torch.zeros(2, 6, 2, 3, dtype=x.dtype), x, ws, bs, groups,
                                       shuffles, perms, mask)
    assert gx.shape == x.shape and not bool(gw.abs().any())
