"""torch.compile(fullgraph=True) of the functional operator and of the module: no graph break,
the fused op in the graph, forward and backward equal to eager, static and dynamic shapes.

Few tests on purpose: Inductor compilation is slow on a 2-core runner.
"""

from __future__ import annotations

import pytest
import torch

import igc_kernels as igc
from igc_test_utils import FUSED, build_problem

# The compiled graph calls the very same kernels with the same inputs (the op is opaque to
# Inductor), so results should agree to the last bits. In case Inductor hands the kernel a
# differently strided (but equal) input, allow the float32 rounding bound of this problem:
# values O(1) (weights scaled by 1/sqrt(n_l), module init), reductions of <= 12 terms per
# element plus <= 30 positions for the weight gradients: ~50 * 6e-8 * O(5) ~ 1.5e-5.
TOL = dict(rtol=2e-5, atol=2e-5)


def _fn(x, w1, w2, b1, perm):
    return igc.interleaved_group_conv(x, [w1, w2], [4, 2], ["interleave", perm], [b1, None],
                                      backend=FUSED)


def _inputs(N, H, W, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 8, H, W, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w1 = torch.randn(12, 2, generator=g) / 2 ** 0.5
    w2 = torch.randn(6, 6, generator=g) / 6 ** 0.5
    b1 = torch.randn(12, generator=g)
    perm = torch.randperm(6, generator=g)
    return [x.requires_grad_(), w1.requires_grad_(), w2.requires_grad_(), b1.requires_grad_(),
            perm]


def _run(fn, args, gy_seed=1):
    y = fn(*args)
    g = torch.Generator().manual_seed(gy_seed)
    gy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, args[:4], gy)
    return y, grads


def _assert_same(eager, compiled):
    (ye, ge), (yc, gc) = eager, compiled
    assert yc.shape == ye.shape and yc.stride() == ye.stride()
    torch.testing.assert_close(yc, ye, **TOL)
    for a, b in zip(gc, ge):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL)


def test_graph_contains_fused_op_without_break():
    """Dynamo captures one graph (fullgraph) and it calls igc::chain_forward, not the
    unfused reference chain."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    backend = EagerAndRecordGraphs()
    compiled = torch.compile(_fn, backend=backend, fullgraph=True)
    args = _inputs(2, 3, 3)
    _assert_same(_run(_fn, args), _run(compiled, args))
    assert len(backend.graphs) == 1
    targets = {str(n.target) for n in backend.graphs[0].graph.nodes if n.op == "call_function"}
    if FUSED == "cpu":
        assert any("igc.chain_forward" in t for t in targets), targets
        assert not any("conv" in t for t in targets), targets


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_functional(dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(_fn, fullgraph=True, dynamic=dynamic)
    shapes = [(2, 3, 3, False), (3, 5, 2, True)] if dynamic else [(2, 3, 3, True)]
    for i, (N, H, W, cl) in enumerate(shapes):
        args = _inputs(N, H, W, channels_last=cl, seed=i)
        eager = _run(_fn, args)
        comp = _run(compiled, args)
        _assert_same(eager, comp)
        if cl:
            assert comp[0].is_contiguous(memory_format=torch.channels_last)


def test_compile_module_dynamic():
    torch._dynamo.reset()
    spec = igc.ChainSpec([8, 8, 8, 8], [2, 2, 4], ["interleave", torch.randperm(8), None])
    m = igc.InterleavedGroupConv(spec, bias=True, backend=FUSED)
    compiled = torch.compile(m, fullgraph=True, dynamic=True)
    for N, L in [(2, 5), (4, 7)]:
        x = torch.randn(N, 8, L, requires_grad=True)
        ye = m(x)
        ge = torch.autograd.grad(ye.sum(), [x, *m.parameters()])
        yc = compiled(x)
        gc = torch.autograd.grad(yc.sum(), [x, *m.parameters()])
        torch.testing.assert_close(yc, ye, **TOL)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, **TOL)


def test_compiled_matches_oracle_float64():
    """Compiled (static shapes) against the float64 oracle on a problem with every feature."""
    torch._dynamo.reset()
    p = build_problem([6, 9, 6], [3, 3], spatial=(2, 3), N=2, permutations="random",
                      bias=True, seed=4)

    def f(x, w1, w2, b1, b2):
        return igc.interleaved_group_conv(x, [w1, w2], p.groups, p.permutations, [b1, b2],
                                          backend=FUSED)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(*p.leaves())
    y_ref = igc.reference.interleaved_group_conv(p.x, p.weights, p.groups, p.permutations,
                                                 p.biases)
    # float64; <= 9-term sums of O(1) values through two layers: 1e-12 is ~1000 ulps of slack
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
