"""The Triton backend on a CUDA GPU: compiled kernels, autotuned and forced configurations.

Skipped (by a marker built from a constant, never at collection) where torch sees no CUDA
device or where TRITON_INTERPRET=1 makes Triton interpret its kernels; ``test_triton.py`` then
covers the contract on CPU tensors. On a GPU machine run ``python -m pytest tests/test_triton_gpu.py
-q`` (and ``test_triton.py``, which then runs on CUDA tensors too).

* correctness against the float64 oracle: float32 (TF32 off) within the float32 rounding bound
  of the problem; float16 / bfloat16 within twice the error of the unfused PyTorch chain (cuDNN)
  in the same dtype, for the output and every gradient; across channel counts 8..1024, group
  widths 1..64, non-square groups, odd sizes, depths 1..6 and every layout;
* a bitwise determinism loop (autotuned and fixed configurations);
* ``torch.library.opcheck`` of both ops, ``torch.compile(fullgraph=True)`` with Inductor (no
  graph break, static and dynamic shapes), capture and replay in a CUDA graph;
* 64-bit offsets (a tensor of more than 2^31 elements).
"""

from __future__ import annotations

import os

import pytest
import torch

import igc_kernels as igc
from igc_test_utils import (
    assert_bitwise_deterministic,
    assert_within_rounding,
    build_problem,
    check_backend,
    magnitudes,
    make_tensor,
    normalized_op_args,
    oracle,
    problem_on,
    to_device,
)

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = [pytest.mark.skipif(not HAS_CUDA or INTERPRET,
                                 reason="needs a CUDA GPU and compiled (not interpreted) Triton"),
              pytest.mark.usefixtures("no_tf32")]


def _K():
    from igc_kernels.triton_kernels import chain as K

    return K


def _gy(p, seed=1, kind="contiguous"):
    shape = (p.x.shape[0], p.channels[-1], *p.x.shape[2:])
    return make_tensor(shape, kind, p.x.dtype, torch.Generator().manual_seed(seed))


def _on_cuda(p):
    return problem_on(p, "cuda")


def _dev(t, requires_grad=None):
    return to_device(t, "cuda", requires_grad)


# ---------------------------------------------------------------------------------------------
# float32 against the oracle
# ---------------------------------------------------------------------------------------------
FP32_CASES = {
    # name: (channels, groups, permutations, bias, spatial, N, layout)
    "igcv2_c256_k8_nchw": ([256] * 4, [32, 32, 32], "default", False, (16, 16), 4, "contiguous"),
    "igcv2_c256_k8_cl": ([256] * 4, [32, 32, 32], "default", True, (16, 16), 4, "channels_last"),
    "c1024_k64": ([1024, 1024, 1024], [16, 16], "random", True, (7, 7), 3, "channels_last"),
    "c1024_k2_deep": ([1024] * 7, [512] * 6, "default", False, (5, 5), 2, "contiguous"),
    "c1024_to_512_nonsquare": ([1024, 512, 1024], [32, 16], "random", [True, False], (9,), 4,
                               "contiguous"),
    "c64_k64_dense": ([64, 64, 64], [1, 1], "random", True, (13, 11), 2, "channels_last"),
    "odd_33": ([66, 66, 66], [2, 2], "default", True, (7, 7), 3, "sliced_channels_last"),
    "odd_17_9_tokens": ([51, 27, 51], [3, 3], "random", True, (), 1000, "contiguous"),
    "odd_3_7_ncdhw": ([6, 14, 6], [2, 2], "default", [False, True], (3, 5, 7), 2, "sliced"),
    "width1_depthwise": ([96, 96, 192], [96, 96], "random", True, (49,), 3, "channels_last"),
    "hw1": ([32, 48, 32], [4, 8], "default", True, (1, 1), 7, "contiguous"),
}


@pytest.mark.parametrize("case", FP32_CASES.values(), ids=list(FP32_CASES))
def test_float32_against_oracle(case):
    channels, groups, perms, bias, spatial, N, layout = case
    p = build_problem(channels, groups, spatial=spatial, N=N, layout=layout,
                      dtype=torch.float32, permutations=perms, bias=bias, seed=len(channels))
    check_backend(p, "triton", _gy(p), device="cuda")


FP32_MMA_CASES = {
    "igcv2_c256_k8_nchw": FP32_CASES["igcv2_c256_k8_nchw"],
    "igcv2_c256_k16_cl_bias": ([256] * 3, [16, 16], "random", True, (8, 8), 4, "channels_last"),
    "c64_k16_nonsquare": ([64, 128, 64], [4, 4], "default", [True, False], (6, 7), 3,
                          "contiguous"),
}


@pytest.mark.parametrize("case", FP32_MMA_CASES.values(), ids=list(FP32_MMA_CASES))
def test_float32_opt_in_tensor_cores_within_the_float32_bound(case, monkeypatch):
    """With ``IGC_TRITON_FP32_MMA=1`` float32 chains take the packed path with "bf16x6" dots
    (three bfloat16 parts per operand, six products): forced onto it, the output and every
    gradient stay within the float32 rounding bound of the problem, as the CUDA backend's
    opt-in three-plane path does."""
    monkeypatch.setenv("IGC_TRITON_FP32_MMA", "1")
    assert _K().dot_precision() == "bf16x6"
    channels, groups, perms, bias, spatial, N, layout = case
    p = build_problem(channels, groups, spatial=spatial, N=N, layout=layout,
                      dtype=torch.float32, permutations=perms, bias=bias, seed=5)
    check_backend(p, "triton", _gy(p), device="cuda",
                  config=dict(pack=1, dense=0, keep=1, block_p=16, num_warps=8))


@pytest.mark.parametrize("config", [dict(dense=0, keep=1, block_p=16),
                                    dict(dense=1, keep=0, block_p=64),
                                    dict(dense=1, keep=1, block_p=128, num_warps=8),
                                    dict(dense=0, keep=0, block_p=32)],
                         ids=["fma_keep_16", "dot_recompute_64", "dot_keep_128", "fma_redo_32"])
@pytest.mark.parametrize("case", ["igcv2_c256_k8_cl", "c64_k64_dense", "odd_3_7_ncdhw"])
def test_float32_forced_configs(case, config):
    channels, groups, perms, bias, spatial, N, layout = FP32_CASES[case]
    p = build_problem(channels, groups, spatial=spatial, N=N, layout=layout,
                      dtype=torch.float32, permutations=perms, bias=bias, seed=3)
    check_backend(p, "triton", _gy(p), device="cuda", config=config)


def test_input_index_large():
    """CondenseNet-like: 512 input channels, an index selecting 256 of them with repeats."""
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 512, (256,), generator=gen)
    p = build_problem([256, 256, 128], [8, 8], spatial=(14, 14), N=4, layout="channels_last",
                      dtype=torch.float32, permutations="random", bias=True, seed=1,
                      input_index=idx, in_channels=512)
    check_backend(p, "triton", _gy(p), device="cuda")


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16: at most twice the unfused chain's error
# ---------------------------------------------------------------------------------------------
LP_CASES = ["igcv2_c256_k8_nchw", "igcv2_c256_k8_cl", "c1024_k64", "c64_k64_dense", "odd_33",
            "odd_17_9_tokens", "width1_depthwise"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LP_CASES)
def test_low_precision_at_most_twice_unfused_error(case, dtype):
    channels, groups, perms, bias, spatial, N, layout = FP32_CASES[case]
    p = build_problem(channels, groups, spatial=spatial, N=N, layout=layout, dtype=dtype,
                      permutations=perms, bias=bias, seed=11)
    # the shared rule: twice the unfused chain's (cuDNN's) error, both on the GPU
    check_backend(p, "triton", _gy(p, seed=12), device="cuda")


# ---------------------------------------------------------------------------------------------
# Determinism, opcheck, compile, CUDA graphs, 64-bit offsets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("deterministic", [False, True], ids=["autotuned", "deterministic_mode"])
def test_bitwise_determinism_loop(deterministic, monkeypatch):
    monkeypatch.setenv("IGC_TRITON_AUTOTUNE", "1")  # the autotuned case autotunes in any run
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        p = _on_cuda(build_problem([256] * 4, [32] * 3, spatial=(32, 32), N=8,
                                   layout="channels_last", dtype=torch.float16,
                                   permutations=["interleave", torch.randperm(256), None],
                                   bias=True, seed=3))
        gy = torch.randn(8, 256, 32, 32, device="cuda", dtype=torch.float16)
        assert_bitwise_deterministic(p, "triton", gy)
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    p = build_problem([32, 48, 32], [4, 8], spatial=(5, 5), N=2, layout="channels_last",
                      dtype=dtype, permutations="random", bias=[True, False], seed=2,
                      input_index=torch.randint(0, 40, (32,)), in_channels=40)
    x, ws, bs, groups, shuffles, perms, idx = normalized_op_args(p)
    args = (_dev(x, True), [_dev(w, True) for w in ws], [_dev(b, True) for b in bs],
            groups, shuffles, [_dev(q) for q in perms], _dev(idx))
    torch.library.opcheck(torch.ops.igc_triton.chain_forward.default, args)
    gy = _dev(_gy(p))
    for mask in ([True, True, True], [False, True, False], [True, False, False]):
        bargs = (gy, args[0].detach(), [w.detach() for w in args[1]],
                 [b.detach() for b in args[2]], groups, shuffles, args[5], mask, args[6])
        torch.library.opcheck(torch.ops.igc_triton.chain_backward.default, bargs)


def _fn(x, w1, w2, b1, perm):
    return igc.interleaved_group_conv(x, [w1, w2], [8, 4], ["interleave", perm], [b1, None],
                                      backend="triton")


def _inputs(N, H, W, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 64, H, W, generator=g).to(memory_format=torch.channels_last)
    w1 = torch.randn(96, 8, generator=g) / 8 ** 0.5
    w2 = torch.randn(64, 24, generator=g) / 24 ** 0.5
    b1 = torch.randn(96, generator=g)
    perm = torch.randperm(64, generator=g)
    out = [t.to("cuda", dtype) for t in (x, w1, w2, b1)] + [perm.cuda()]
    for t in out[:4]:
        t.requires_grad_()
    return out


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_inductor_fullgraph(dynamic):
    """Inductor sees the Triton kernels (triton_op): one graph, no break, same values."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    rec = EagerAndRecordGraphs()
    torch.compile(_fn, backend=rec, fullgraph=True)(*_inputs(2, 5, 5))
    assert len(rec.graphs) == 1
    torch._dynamo.reset()
    compiled = torch.compile(_fn, fullgraph=True, dynamic=dynamic)
    for shape in ([(2, 5, 5), (3, 7, 4)] if dynamic else [(2, 5, 5)]):
        args = _inputs(*shape)
        y_c = compiled(*args)
        y_e = _fn(*args)
        gy = torch.randn_like(y_e)
        gc = torch.autograd.grad(y_c, args[:4], gy)
        ge = torch.autograd.grad(y_e, args[:4], gy)
        torch.testing.assert_close(y_c, y_e, rtol=1e-6, atol=1e-6)
        for a, b in zip(gc, ge):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_cuda_graph_capture_forward_backward():
    """Forward + backward captured in a CUDA graph (no host sync, current stream) and replayed
    on new data equal eager runs on that data."""
    args = _inputs(4, 8, 8)
    static = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    gy = torch.randn(4, 64, 8, 8, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up: autotuning and compilation happen here, not in capture
            y = _fn(*static)
            torch.autograd.grad(y, static[:4], gy)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = _fn(*static)
        g_static = torch.autograd.grad(y_static, static[:4], gy)
    new = _inputs(4, 8, 8, seed=5)
    with torch.no_grad():
        for a, b in zip(static[:4], new[:4]):
            a.copy_(b)
    graph.replay()
    torch.cuda.synchronize()
    # the permutation is part of the captured structure (not data): the eager run keeps it
    y_e = _fn(*new[:4], static[4])
    g_e = torch.autograd.grad(y_e, new[:4], gy)
    assert torch.equal(y_static, y_e)
    for a, b in zip(g_static, g_e):
        assert torch.equal(a, b)


def test_64bit_offsets():
    """x with more than 2^31 elements (float16, channels-last, 2^25 positions x 72 channels):
    the last positions, whose element offsets pass 2^31, match the reference chain."""
    P = 2 ** 25
    x = torch.randn(1, 72, P // 4096, 4096, device="cuda", dtype=torch.float16)
    x = x.to(memory_format=torch.channels_last)
    assert x.numel() > 2 ** 31
    w = [torch.randn(72, 8, device="cuda", dtype=torch.float16) / 8 ** 0.5,
         torch.randn(72, 8, device="cuda", dtype=torch.float16) / 8 ** 0.5]
    with torch.no_grad():
        y = igc.interleaved_group_conv(x, w, [9, 9], backend="triton")
        tail = x[:, :, -2:, :]
        y_ref = igc.interleaved_group_conv(tail.float(), [t.float() for t in w], [9, 9],
                                           backend="reference")
    torch.testing.assert_close(y[:, :, -2:, :].float(), y_ref, rtol=2e-2, atol=2e-2)


def test_tf32_when_allowed():
    """With TF32 allowed the dense path runs on TF32 tensor cores: errors grow to the TF32
    level (10-bit mantissa) but no further."""
    torch.backends.cuda.matmul.allow_tf32 = True
    p = build_problem([64, 64, 64], [1, 1], spatial=(8, 8), N=4, dtype=torch.float32,
                      permutations="random", bias=True, seed=4)
    from igc_kernels.backends.triton import triton_ops

    pd = _on_cuda(p)
    with triton_ops().K.override_config(dense=1):
        y = pd.call("triton").detach().cpu()
    y64, _ = oracle(p, _gy(p))
    ymag, _ = magnitudes(p, _gy(p))
    # TF32 rounds each operand to 11 significant bits (u = 2^-11), 2 layers of 64-term sums
    assert_within_rounding(y, y64, ymag, 2 * (64 + 2), torch.float32,
                           safety=2.0 * 2.0 ** -11 / (torch.finfo(torch.float32).eps / 2))


def _record_launches(monkeypatch, T) -> list:
    """(kernel name, number of layers) of every Triton launch from here on in the test."""
    launched = []
    real = T._launch

    def record(fn, grid, a, meta):  # (the autotuner wraps the kernel: its .fn)
        name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", "")
        launched.append((name, len(meta.get("LAYERS", ()))))
        return real(fn, grid, a, meta)

    monkeypatch.setattr(T, "_launch", record)
    return launched


def test_staged_backward_of_a_chain_whose_packed_backward_spills(monkeypatch):
    """IGCV2(1024, 8) in bf16: every packed backward build of the whole chain spills on sm_90
    (the static report, both Tritons), so the backend runs its backward in ranges of layers
    whose packed builds do not (``backward_stages``, from this GPU's compiles), each a fused
    launch; the gradients stay within twice the unfused chain's error."""
    from igc_kernels import _triton_ops as T

    monkeypatch.delenv("IGC_TRITON_FIXED", raising=False)  # the compile checks run
    p = build_problem([1024] * 5, [128] * 4, spatial=(7, 7), N=2, dtype=torch.bfloat16,
                      permutations="default", bias=False, seed=5)
    pd = _on_cuda(p)
    from igc_kernels._chain import normalize

    nc = normalize(pd.x, pd.weights, list(pd.groups), pd.permutations, pd.biases)
    stages = T.backward_stages(pd.x, nc, True, True, False)
    assert len(stages) > 1 and stages[0][0] == 0 and stages[-1][1] == 4, stages
    launched = _record_launches(monkeypatch, T)
    check_backend(p, "triton", _gy(p, seed=6), device="cuda")
    bwd = [n for name, n in launched if name == "igc_chain_bwd"]
    assert bwd == [b - a for a, b in reversed(stages)], (launched, stages)


def test_float32_backward_one_layer_per_range(monkeypatch):
    """IGCV2(512, 32) in float32: no packed backward build of the whole chain fits without
    spills on sm_90 (the static report, both Tritons), so its backward would run the FMA path
    on 8 positions; the backend runs it one layer per range instead (``backward_stages``, from
    this GPU's compiles), each a fused launch with its range input kept in float32; the
    gradients within the float32 bound. No bias, as the static report compiled it.
    (IGCV2(512, 8) has a packed build that fits since the products are computed transposed.)"""
    from igc_kernels import _triton_ops as T
    from igc_kernels._chain import normalize

    monkeypatch.delenv("IGC_TRITON_FIXED", raising=False)  # the compile checks run
    p = build_problem([512] * 3, [16] * 2, spatial=(7, 7), N=2, dtype=torch.float32,
                      permutations="default", bias=False, seed=7)
    pd = _on_cuda(p)
    nc = normalize(pd.x, pd.weights, list(pd.groups), pd.permutations, pd.biases)
    assert T.backward_stages(pd.x, nc, True, True, False) == ((0, 1), (1, 2))
    launched = _record_launches(monkeypatch, T)
    check_backend(p, "triton", _gy(p, seed=8), device="cuda")
    assert [n for name, n in launched if name == "igc_chain_bwd"] == [1, 1], launched
