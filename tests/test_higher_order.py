"""Derivatives beyond the first backward, on every backend that runs on the CPU: double backward
(``gradgradcheck`` in float64, gradient penalties), third order, forward mode (``jvp``,
``jacfwd``, dual numbers), ``torch.func.grad`` / ``jacrev`` / ``hessian`` and ``vmap``
(batched inputs, batched weights, per-sample gradients), and the raw ops' own double backward.

The oracle is the reference chain in float64 (plain PyTorch ops, differentiated by autograd).
Float64 results of the fused CPU backend are compared at 1e-10 relative to the result's
magnitude (a few hundred roundings of 1.1e-16 each, with a wide margin). The Triton backend
(float32 under the interpreter) is compared at 1e-4: the longest rounding chain of these small
problems (double backward through a doubled chain of <= 3 layers, 16 channels, 24 positions) is
below 200 float32 roundings of 6e-8, i.e. 1.2e-5 relative, with the 2x margin of CONVENTIONS
and some more for cancellation.
"""

from __future__ import annotations

import pytest
import torch
from torch import autograd

import igc_kernels as igc
from igc_test_utils import FUSED, build_problem, normalized_op_args

F64_RTOL = 1e-10
F32_RTOL = 1e-4

CASES = {
    # name: (channels, groups, permutations, bias, spatial, layout, input_index, in_channels)
    "tokens_bias": ([4, 6, 4], [2, 2], "default", True, (), "contiguous", None, None),
    "random_perms_index": ([6, 6, 3], [3, 1], "random", [True, False], (3,), "contiguous",
                           [5, 1, 1, 0, 3, 2], 7),
    "channels_last_3_layers": ([4, 8, 4, 4], [2, 4, 2], "default", [False, True, True], (2, 2),
                               "channels_last", None, None),
    "sliced_igcv1": ([4, 4, 4], [2, 2], "igcv1", False, (3,), "sliced", None, None),
}


def _problem(case, dtype=torch.float64, seed=7):
    channels, groups, perms, bias, spatial, layout, index, c_in = case
    if perms == "igcv1":
        perms = ["interleave", torch.argsort(igc.interleave_index(channels[1], groups[0]))]
    idx = None if index is None else torch.tensor(index)
    p = build_problem(channels, groups, spatial=spatial, N=2, layout=layout, permutations=perms,
                      bias=bias, seed=seed, input_index=idx, in_channels=c_in)
    return p if dtype == torch.float64 else p.to(dtype)


def _fn(p, backend):
    """``f(x, *weights, *present biases)`` for problem ``p`` on ``backend``."""
    L = len(p.weights)
    slots = [i for i, b in enumerate(p.biases or []) if b is not None]

    def fn(x, *params):
        bs = None
        if p.biases is not None:
            bs = [None] * L
            for slot, b in zip(slots, params[L:]):
                bs[slot] = b
        return igc.interleaved_group_conv(x, list(params[:L]), p.groups, p.permutations, bs,
                                          input_index=p.input_index, backend=backend)

    return fn


def _close(actual, expected, rtol, what):
    assert actual is not None, f"{what}: no derivative (None)"
    scale = max(1.0, float(expected.abs().max()))
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def _penalty_grads(fn, leaves):
    """A WGAN-GP style gradient penalty: ``|d sum(y^2) / dx|^2`` differentiated in every leaf
    (second derivatives mixing x with every parameter)."""
    y = fn(*leaves)
    gx, = autograd.grad((y * y).sum(), leaves[0], create_graph=True)
    return autograd.grad((gx * gx).sum() + gx.sum(), leaves, allow_unused=True)


# ---------------------------------------------------------------------------------------------
# Double backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradgradcheck_fused_cpu(case):
    p = _problem(case)
    leaves = tuple(p.leaves())
    assert torch.autograd.gradgradcheck(_fn(p, FUSED), leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", [FUSED, "auto", "triton"])
@pytest.mark.parametrize("case", ["tokens_bias", "random_perms_index", "channels_last_3_layers"])
def test_gradient_penalty_matches_reference(backend, case):
    """The issue's reproduction (``autograd.grad(gx.sum(), w)`` after ``create_graph=True``)
    was exactly zero on the fused backends; it must equal the reference's second derivatives."""
    ref = _problem(CASES[case])
    expected = _penalty_grads(_fn(ref, "reference"), ref.leaves())
    dtype = torch.float32 if backend == "triton" else torch.float64
    p = ref.to(dtype)
    got = _penalty_grads(_fn(p, backend), p.leaves())
    rtol = F32_RTOL if dtype == torch.float32 else F64_RTOL
    for name, g, e in zip(p.leaf_names(), got, expected):
        assert float(e.abs().max()) > 0, f"{name}: the oracle's derivative is zero"
        _close(g, e, rtol, f"{backend}: d penalty / d {name}")


def test_third_order_matches_reference():
    ref = _problem(CASES["random_perms_index"])

    def third(fn, leaves):
        y = fn(*leaves)
        gx, = autograd.grad((y ** 2).sum(), leaves[0], create_graph=True)
        gw, = autograd.grad((gx ** 2).sum(), leaves[1], create_graph=True)
        return autograd.grad(gw.sum(), leaves)

    expected = third(_fn(ref, "reference"), ref.leaves())
    got = third(_fn(ref, FUSED), ref.leaves())
    for name, g, e in zip(ref.leaf_names(), got, expected):
        _close(g, e, F64_RTOL, f"third order, {name}")


def test_raw_op_double_backward():
    """``torch.ops.igc.chain_forward`` called directly: its registered backward is itself
    differentiable (gradgradcheck through both ops)."""
    p = _problem(CASES["random_perms_index"])
    x, ws, bs, groups, shuffles, perms, idx = normalized_op_args(p)
    ws = [w.detach().requires_grad_() for w in ws]
    bs = [b.detach().requires_grad_() if b.numel() else b for b in bs]
    L = len(ws)

    def fn(x, *params):
        return torch.ops.igc.chain_forward(x, list(params[:L]), [params[L], bs[1]], groups,
                                           shuffles, perms, idx)

    assert torch.autograd.gradgradcheck(fn, (x, *ws, bs[0]), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_wide_triton_chain_double_backward_falls_back_to_reference():
    """A doubled chain over the Triton limit (2 x 640 > 1024 channels) runs through the
    reference chain; the result is still the true second derivative."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 640, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.randn(640, 8, generator=gen, dtype=torch.float64) / 8).requires_grad_()

    def pen(backend, x, w):
        y = igc.interleaved_group_conv(x, [w], [80], backend=backend)
        gx, = autograd.grad((y * y).sum(), x, create_graph=True)
        return autograd.grad(gx.sum(), w)[0]

    expected = pen("reference", x, w)
    got = pen("triton", x.float().detach().requires_grad_(), w.float().detach().requires_grad_())
    _close(got, expected, F32_RTOL, "triton, 640 channels")


# ---------------------------------------------------------------------------------------------
# Forward mode
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [FUSED, "triton"])
@pytest.mark.parametrize("case", ["tokens_bias", "random_perms_index", "sliced_igcv1"])
def test_jacfwd_matches_reference(backend, case):
    ref = _problem(CASES[case])
    argnums = tuple(range(len(ref.leaves())))
    expected = torch.func.jacfwd(_fn(ref, "reference"), argnums=argnums)(*ref.leaves())
    dtype = torch.float32 if backend == "triton" else torch.float64
    p = ref.to(dtype)
    got = torch.func.jacfwd(_fn(p, backend), argnums=argnums)(*p.leaves())
    rtol = F32_RTOL if dtype == torch.float32 else F64_RTOL
    for name, g, e in zip(p.leaf_names(), got, expected):
        assert float(e.detach().abs().max()) > 0
        _close(g, e, rtol, f"{backend}: jacfwd in {name}")


def test_dual_numbers_and_jvp():
    """``torch.autograd.forward_ad`` and ``torch.func.jvp`` give the directional derivative."""
    import torch.autograd.forward_ad as fwAD

    p = _problem(CASES["channels_last_3_layers"])
    leaves = [t.detach() for t in p.leaves()]
    gen = torch.Generator().manual_seed(11)
    tangents = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in leaves]
    _, expected = torch.func.jvp(_fn(p, "reference"), tuple(leaves), tuple(tangents))
    _, got = torch.func.jvp(_fn(p, FUSED), tuple(leaves), tuple(tangents))
    _close(got, expected, F64_RTOL, "torch.func.jvp")
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, d) for t, d in zip(leaves, tangents)]
        y = _fn(p, FUSED)(*duals)
        _close(fwAD.unpack_dual(y).tangent, expected, F64_RTOL, "forward_ad")


def test_hessian_of_weights_matches_reference():
    """``torch.func.hessian`` (forward over reverse) in the first layer's weight."""
    p = _problem(CASES["tokens_bias"])
    leaves = [t.detach() for t in p.leaves()]

    def loss(backend):
        fn = _fn(p, backend)
        return lambda w: (fn(leaves[0], w, *leaves[2:]) ** 2).sum()

    expected = torch.func.hessian(loss("reference"))(leaves[1])
    got = torch.func.hessian(loss(FUSED))(leaves[1])
    _close(got, expected, F64_RTOL, "hessian")


# ---------------------------------------------------------------------------------------------
# torch.func.grad / jacrev / vmap
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [FUSED, "triton"])
def test_func_grad_and_jacrev(backend):
    ref = _problem(CASES["random_perms_index"])
    dtype = torch.float32 if backend == "triton" else torch.float64
    rtol = F32_RTOL if dtype == torch.float32 else F64_RTOL
    p = ref.to(dtype)
    argnums = tuple(range(len(p.leaves())))
    for transform in (lambda f: torch.func.grad(lambda *a: f(*a).sum(), argnums=argnums),
                      lambda f: torch.func.jacrev(f, argnums=argnums)):
        expected = transform(_fn(ref, "reference"))(*[t.detach() for t in ref.leaves()])
        got = transform(_fn(p, backend))(*[t.detach() for t in p.leaves()])
        for name, g, e in zip(p.leaf_names(), got, expected):
            _close(g, e, rtol, f"{backend}: {name}")


@pytest.mark.parametrize("backend", [FUSED, "triton"])
def test_vmap(backend):
    """A batch of inputs (folded into positions), a batch of weights (one call per entry) and
    per-sample gradients (``vmap(grad)``: one backward per sample), against a Python loop over
    the reference."""
    ref = _problem(CASES["tokens_bias"])
    dtype = torch.float32 if backend == "triton" else torch.float64
    rtol = F32_RTOL if dtype == torch.float32 else F64_RTOL
    p = ref.to(dtype)
    x, w1, w2, b1, b2 = [t.detach() for t in p.leaves()]
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(3, *x.shape, generator=gen, dtype=dtype)
    w1s = torch.randn(3, *w1.shape, generator=gen, dtype=dtype)
    fn, rfn = _fn(p, backend), _fn(ref, "reference")
    d = lambda t: t.double()  # noqa: E731

    got = torch.vmap(lambda xb: fn(xb, w1, w2, b1, b2))(xs)
    expected = torch.stack([rfn(d(xb), d(w1), d(w2), d(b1), d(b2)) for xb in xs])
    _close(got, expected, rtol, "vmap over x")

    got = torch.vmap(lambda wb: fn(x, wb, w2, b1, b2))(w1s)
    expected = torch.stack([rfn(d(x), d(wb), d(w2), d(b1), d(b2)) for wb in w1s])
    _close(got, expected, rtol, "vmap over a weight")

    def loss(f, *rest):
        return lambda w, xb: (f(xb, w, *rest) ** 2).sum()

    got = torch.vmap(torch.func.grad(loss(fn, w2, b1, b2)), in_dims=(None, 0))(w1, xs)
    expected = torch.stack([torch.func.grad(loss(rfn, d(w2), d(b1), d(b2)))(d(w1), d(xb))
                            for xb in xs])
    _close(got, expected, rtol, "per-sample gradients")


def test_vmap_of_the_raw_ops_folds_or_loops():
    """The ops' own vmap rules: batched ``x`` / ``grad_y`` fold into positions; batched weights
    and weight gradients go one batch entry at a time. Both equal a loop of plain calls."""
    p = _problem(CASES["random_perms_index"])
    x, ws, bs, groups, shuffles, perms, idx = normalized_op_args(p)
    x, ws, bs = x.detach(), [w.detach() for w in ws], [b.detach() for b in bs]
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(4, *x.shape, generator=gen, dtype=x.dtype)
    fwd, bwd = torch.ops.igc.chain_forward, torch.ops.igc.chain_backward
    got = torch.vmap(lambda xb: fwd(xb, ws, bs, groups, shuffles, perms, idx))(xs)
    assert torch.equal(got, torch.stack([fwd(xb, ws, bs, groups, shuffles, perms, idx)
                                         for xb in xs]))
    dys = torch.randn(4, *fwd(x, ws, bs, groups, shuffles, perms, idx).shape, generator=gen,
                      dtype=x.dtype)
    for mask in ([True, False, False], [True, True, True]):
        got = torch.vmap(lambda dy, xb: bwd(dy, xb, ws, bs, groups, shuffles, perms, mask,
                                            idx))(dys, xs)
        loop = [bwd(dy, xb, ws, bs, groups, shuffles, perms, mask, idx)
                for dy, xb in zip(dys, xs)]
        for k in range(3):
            if mask[k]:
                torch.testing.assert_close(got[k], torch.stack([o[k] for o in loop]),
                                           rtol=1e-12, atol=1e-12)
