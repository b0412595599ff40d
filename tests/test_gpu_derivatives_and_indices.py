"""Higher-order derivatives and index checks of the GPU backends (``cuda``, ``triton``).

Skipped by a marker built from a constant (``torch.cuda.is_available()``) where there is no
CUDA device; ``test_higher_order.py`` and ``test_index_safety.py`` cover the same on the CPU
(fused CPU kernels, Triton under its interpreter, reference). Tolerances as there: float64 at
1e-10 relative to the result's magnitude, float32 at 1e-4 (TF32 off).

On a GPU an invalid index is caught by an asynchronous device-side assert, which leaves the
CUDA context unusable: those checks run in a child process and expect it to fail with the
assert's message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import autograd

import igc_kernels as igc
from igc_test_utils import build_problem

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("no_tf32")]
GPU_BACKENDS = ["cuda", "triton"]


def _leaves(backend):
    p = build_problem([6, 6, 3], [3, 1], spatial=(3,), N=2, permutations="random",
                      bias=[True, False], seed=7, input_index=torch.tensor([5, 1, 1, 0, 3, 2]),
                      in_channels=7)
    dtype = torch.float32 if backend == "triton" else torch.float64
    leaves = [t.detach().to("cuda", dtype).requires_grad_() for t in p.leaves()]
    perms = [q.cuda() for q in p.permutations]
    idx = p.input_index.cuda()

    def fn(x, w1, w2, b1, be=backend):
        return igc.interleaved_group_conv(x, [w1, w2], p.groups, perms, [b1, None],
                                          input_index=idx, backend=be)

    return fn, leaves


def _close(a, b, rtol, what):
    scale = max(1.0, float(b.detach().abs().max()))
    err = float((a.double() - b.double()).abs().max())
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradient_penalty_matches_reference(backend):
    fn, leaves = _leaves(backend)
    ref = [t.detach().double().requires_grad_() for t in leaves]

    def pen(f, ls):
        y = f(*ls)
        gx, = autograd.grad((y * y).sum(), ls[0], create_graph=True)
        return autograd.grad((gx * gx).sum(), ls)

    expected = pen(lambda *a: fn(*a, be="reference"), ref)
    rtol = 1e-4 if backend == "triton" else 1e-10
    for k, (g, e) in enumerate(zip(pen(fn, leaves), expected)):
        _close(g, e, rtol, f"{backend}: leaf {k}")


def test_cuda_gradgradcheck_float64():
    fn, leaves = _leaves("cuda")
    assert torch.autograd.gradgradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_jacfwd_and_per_sample_grads_match_reference(backend):
    fn, leaves = _leaves(backend)
    leaves = [t.detach() for t in leaves]
    ref = [t.double() for t in leaves]
    rtol = 1e-4 if backend == "triton" else 1e-10
    got = torch.func.jacfwd(fn, argnums=(0, 1, 2, 3))(*leaves)
    exp = torch.func.jacfwd(lambda *a: fn(*a, be="reference"), argnums=(0, 1, 2, 3))(*ref)
    for k, (g, e) in enumerate(zip(got, exp)):
        _close(g, e, rtol, f"{backend}: jacfwd in leaf {k}")
    xs = torch.randn(3, *leaves[0].shape, device="cuda", dtype=leaves[0].dtype)
    grad = torch.func.grad(lambda w, xb: (fn(xb, w, *leaves[2:]) ** 2).sum())
    got = torch.vmap(grad, in_dims=(None, 0))(leaves[1], xs)
    ref_grad = torch.func.grad(lambda w, xb: (fn(xb, w, *ref[2:], be="reference") ** 2).sum())
    exp = torch.stack([ref_grad(ref[1], xb.double()) for xb in xs])
    _close(got, exp, rtol, f"{backend}: per-sample gradients")


_CHILD = textwrap.dedent("""
    import sys, torch, igc_kernels as igc
    from igc_kernels._ops import op_biases
    backend, mode, what, dev = sys.argv[1:5]
    x = torch.randn(2, 6, 3, device=dev)
    ws = [torch.randn(8, 4, device=dev), torch.randn(6, 4, device=dev)]
    perm = torch.tensor([3, 1, 0, 2, 5, 4], device=dev)
    idx = torch.tensor([5, 1, 1, 0, 3, 2, 4, 4], device=dev)
    if what == "perm_duplicate":
        perm[4] = 3
    elif what == "perm_out_of_range":
        perm[4] = 6
    else:
        idx[2] = -1
    if mode == "raw":
        ops = torch.ops.igc_triton if backend == "triton" else torch.ops.igc
        if backend == "triton":
            igc.BACKENDS["triton"].unavailable_reasons()
            import igc_kernels._triton_ops  # noqa: F401
        y = ops.chain_forward(x, ws, op_biases([None, None], x), [2, 2], [2, 0], [None, perm],
                              idx)
    else:
        def fn(x, ws, perm, idx):
            return igc.interleaved_group_conv(x, ws, [2, 2], ["interleave", perm],
                                              input_index=idx, backend=backend)
        if mode == "compiled":
            fn = torch.compile(fn, fullgraph=True)
        y = fn(x, ws, perm, idx)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("NO ERROR", float(y.float().abs().max()))
""")


@pytest.mark.parametrize("what", ["perm_duplicate", "perm_out_of_range", "index_negative"])
@pytest.mark.parametrize("mode", ["eager", "compiled", "raw"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_bad_indices_fail_on_the_gpu(backend, mode, what):
    """Eager, compiled and raw calls with an invalid index fail (an asynchronous assert with the
    front end's message, or the CUDA index table's device-side assert); none completes. (The
    raw CUDA op checks ranges on the device, not duplicates: the front end does that.)"""
    if mode == "raw" and backend == "reference":
        pytest.skip("the reference backend has no raw op")
    if mode == "raw" and backend == "cuda" and what == "perm_duplicate":
        pytest.skip("the raw CUDA op checks ranges only (the kernels stay in bounds)")
    r = subprocess.run([sys.executable, "-c", _CHILD, backend, mode, what, "cuda"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "CUDA_LAUNCH_BLOCKING": "0"})
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "NO ERROR" not in out, out[-2000:]
    assert any(s in out for s in ("permutation", "input_index", "device-side assert",
                                  "Assertion")), out[-2000:]
