"""The fused CUDA backend (backend="cuda") on a GPU.

Skipped by a marker built from a constant (``torch.cuda.is_available()``) where there is no CUDA
device; ``test_cuda_compile_nvcc.py`` covers the kernels without one (nvcc compile check and host
emulation). On a GPU machine: ``pip install --no-build-isolation -e .`` then
``python -m pytest tests/test_cuda_gpu.py -q``.

* float32 (TF32 off) within the float32 rounding bound of the problem against the float64
  oracle, and float32 / float16 / bfloat16 within twice the max error of the unfused PyTorch
  chain (cuDNN) in the same dtype, for the output and every gradient; layouts (NCHW,
  channels_last, sliced views with storage offsets, permuted strides, tokens, 3-D), odd sizes,
  group widths 1..64 and non-square groups, channel counts up to 2048 (which also exercises the
  backward's recompute mode), input index;
* a bitwise determinism loop, ``torch.library.opcheck`` of both ops, ``torch.compile
  (fullgraph=True)``, capture and replay in a CUDA graph, ``gradcheck`` in float64;
* limits: a clear error (and "auto" falling back) where a chain does not fit in shared memory;
  64-bit offsets (a tensor of more than 2^31 elements); empty inputs; a side stream.
"""

from __future__ import annotations

import pytest
import torch

import igc_kernels as igc
from igc_kernels import backends
from igc_test_utils import (
    assert_bitwise_deterministic,
    problem_on,
    to_device,
    assert_layout_like_contract,
    build_problem,
    check_against_oracle,
    forward_and_grads,
    make_tensor,
    normalized_op_args,
    Problem,
)

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("no_tf32")]


def cuda_like(t, requires_grad=None):
    """``t`` on the GPU, strides and storage offset kept (``igc_test_utils.to_device``)."""
    return to_device(t, "cuda", requires_grad)


def on_cuda(p: Problem) -> Problem:
    return problem_on(p, "cuda")


def _gy(p, seed=1, kind="contiguous"):
    shape = (p.x.shape[0], p.channels[-1], *p.x.shape[2:])
    return cuda_like(make_tensor(shape, kind, p.x.dtype, torch.Generator().manual_seed(seed)))


def _problem(channels, groups, *, dtype, layout="contiguous", spatial=(5, 5), N=2,
             perms="default", bias=True, seed=0, input_index=None, in_channels=None):
    return on_cuda(build_problem(channels, groups, spatial=spatial, N=N, layout=layout,
                                 dtype=dtype, permutations=perms, bias=bias, seed=seed,
                                 input_index=input_index, in_channels=in_channels))


def test_cuda_backend_is_built_and_usable():
    from igc_kernels import _loader

    assert _loader.ext_built_with_cuda(), _loader.ext_build_info()
    assert "cuda" in igc.available_backends("cuda")
    x = torch.randn(2, 8, 3, 3, device="cuda")
    chain = igc._chain.normalize(x, [torch.randn(8, 2, device="cuda")], [4], None, None)
    assert backends.select("auto", x, chain).name == "cuda"


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------
CASES = {
    # name: (channels, groups, permutations, bias, spatial, N, layout)
    "igcv2_c256_k8_nchw": ([256] * 4, [32, 32, 32], "default", False, (16, 16), 4, "contiguous"),
    "igcv2_c256_k8_cl": ([256] * 4, [32, 32, 32], "default", True, (16, 16), 4, "channels_last"),
    "c512_k64_random_perms": ([512, 512, 512], [8, 8], "random", True, (7, 7), 3,
                              "channels_last"),
    "k1_k2_k4_deep": ([16, 16, 32, 32, 16, 16], [16, 8, 8, 4, 8], "default", True, (9,), 3,
                      "contiguous"),
    "k16_k32_nonsquare": ([64, 128, 64], [4, 2], "default", True, (6, 6), 2, "contiguous"),
    "odd_widths_3_7_9": ([21, 63, 21], [7, 3], "random", [True, False], (7, 7), 3,
                         "channels_last"),
    "odd_widths_17_33": ([34, 66, 34], [2, 2], "default", True, (1, 7), 3, "sliced"),
    "tokens": ([48, 96, 48], [6, 12], "default", True, (), 37, "contiguous"),
    "tokens_sliced": ([24, 24], [3], "random", True, (), 33, "sliced"),
    "permuted_strides": ([32, 32, 32], [4, 4], "default", False, (5, 3), 2, "permuted"),
    "sliced_channels_last": ([32, 64, 32], [8, 8], "default", True, (4, 6), 2,
                             "sliced_channels_last"),
    "ncdhw_channels_last": ([16, 32, 16], [4, 4], "default", True, (2, 3, 5), 2,
                            "channels_last"),
    "hw1": ([8, 8], [2], "default", True, (1, 1), 5, "contiguous"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_float32_within_rounding_bound(case):
    channels, groups, perms, bias, spatial, N, layout = case
    p = _problem(channels, groups, dtype=torch.float32, layout=layout, spatial=spatial, N=N,
                 perms=perms, bias=bias, seed=3)
    y, grads = check_against_oracle(p, "cuda", _gy(p, 4))
    assert y.is_cuda
    assert_layout_like_contract(y, p.x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_error_at_most_twice_unfused_chain(case, dtype):
    channels, groups, perms, bias, spatial, N, layout = case
    p = _problem(channels, groups, dtype=dtype, layout=layout, spatial=spatial, N=N,
                 perms=perms, bias=bias, seed=5)
    check_against_oracle(p, "cuda", _gy(p, 6))


@pytest.mark.parametrize("grad_kind", ["expanded", "channels_last", "sliced"])
def test_grad_output_layouts(grad_kind):
    p = _problem([32, 32, 32], [4, 4], dtype=torch.float32, layout="channels_last", seed=7)
    shape = (p.x.shape[0], 32, *p.x.shape[2:])
    if grad_kind == "expanded":
        gy = torch.randn(1, 32, 1, 1, device="cuda").expand(shape)
    else:
        gy = _gy(p, 8, grad_kind)
    check_against_oracle(p, "cuda", gy)


LARGE = {
    # channel counts up to 2048: store-all backward in small tiles (float32 IGCV2(1024, 32): one
    # CTA per SM, 8 positions), and recompute mode where the intermediates do not fit a tile of
    # 4 (2048 channels, six layers)
    "c1024_k32": ([1024, 1024, 1024], [32, 32], (4, 4), 2),
    "c2048_6layers_recompute": ([2048] * 7, [64] * 6, (2, 3), 1),
    # bf16: the tensor-core backward with x and dy in one tile (two CTAs per SM instead of one)
    "c1024_k16_igcv2": ([1024] * 4, [64] * 3, (4, 8), 2),
    "c2048_k64_3layers": ([2048] * 4, [32, 32, 32], (3, 3), 2),
    "c2048_dense_layer_k2048": ([2048, 2048], [1], (2, 3), 1),
    "c2048_to_256": ([2048, 512, 256], [64, 16], (4, 4), 2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", LARGE.values(), ids=LARGE.keys())
def test_large_channel_counts(case, dtype):
    channels, groups, spatial, N = case
    p = _problem(channels, groups, dtype=dtype, layout="channels_last", spatial=spatial, N=N,
                 perms="random", seed=9)
    check_against_oracle(p, "cuda", _gy(p, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_input_index(layout, dtype, index_dtype):
    """Repeated entries and channels never referenced (their gradient is exactly 0)."""
    g = torch.Generator().manual_seed(11)
    c_in = 40
    index = torch.randint(0, c_in - 8, (48,), generator=g)  # channels 32..39 never referenced
    index[:4] = 3
    p = _problem([48, 96, 48], [6, 12], dtype=dtype, layout=layout, spatial=(5, 7), N=2,
                 input_index=index.to(index_dtype), in_channels=c_in, seed=12)
    gy = _gy(p, 13)
    _, grads = check_against_oracle(p, "cuda", gy)
    assert grads[0].shape == p.x.shape
    assert bool((grads[0][:, 32:] == 0).all())


def test_float64_gradcheck():
    p = _problem([6, 9, 6], [3, 3], dtype=torch.float64, spatial=(2, 3), N=2, perms="random",
                 bias=[True, False], seed=14)

    def fn(x, w1, w2, b1):
        return igc.interleaved_group_conv(x, [w1, w2], p.groups, p.permutations, [b1, None],
                                          backend="cuda")

    assert torch.autograd.gradcheck(fn, (p.x, *p.weights, p.biases[0]))


# ---------------------------------------------------------------------------------------------
# Determinism, ops, compile, graphs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bitwise_deterministic(dtype):
    p = _problem([128, 128, 128], [16, 16], dtype=dtype, layout="channels_last",
                 spatial=(32, 32), N=8, seed=15)
    assert_bitwise_deterministic(p, "cuda", _gy(p, 16))


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (8, 0),
                    reason="tensor cores for bf16 need sm_80")
@pytest.mark.parametrize("groups", [[16, 16], [8, 8], [4, 4], [10, 5]],
                         ids=["pairs_8x8", "blocks_16", "blocks_16x32", "bounds_checked"])
def test_tensor_core_backward_reductions_are_deterministic(groups):
    """The tensor-core backward adds its weight gradients to each CTA's fp32 row by reductions
    in L2 (red.add); every element has one owning lane, so the gradients are bitwise equal over
    runs for each kind of item: pairs of 8 x 8 groups, 16 x 16 and 16 x 32 blocks, and the
    bounds-checked blocks of groups of 12 and 24 channels. Many tiles per CTA."""
    channels = [120] * 3 if groups == [10, 5] else [128] * 3
    p = _problem(channels, groups, dtype=torch.bfloat16, spatial=(48, 48), N=4, seed=17)
    assert_bitwise_deterministic(p, "cuda", _gy(p, 18), runs=4)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (8, 0),
                    reason="tensor cores for bf16 need sm_80")
def test_tensor_core_backward_flushes_subnormal_partial_sums():
    """red.add.f32 flushes subnormal operands and results to zero (PTX ISA; docs/backends.md):
    with x and grad_y near 1e-20, every tile's partial sum of every weight gradient (about
    1e-39) is subnormal, so the bfloat16 weight gradients of the tensor-core backward are all
    zero, while the float64 chain's are not and grad_x is unaffected."""
    p = _problem([48, 48, 48, 48], [6, 3, 2], dtype=torch.bfloat16, bias=False, seed=19)
    x = (p.x.detach().float() * 1e-20).to(torch.bfloat16).requires_grad_()
    gy = (_gy(p, 20).float() * 1e-20).to(torch.bfloat16)
    y = p.call("cuda", x=x)
    grads = torch.autograd.grad(y, [x, *p.weights], gy)
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in p.weights]
    y64 = igc.reference.interleaved_group_conv(x64, w64, p.groups, p.permutations)
    g64 = torch.autograd.grad(y64, [x64, *w64], gy.double())
    for g in g64[1:]:
        assert bool((g.abs() > 0).all()) and float(g.abs().max()) < 2.0 ** -120
    for g in grads[1:]:
        assert int(torch.count_nonzero(g)) == 0
    err = (grads[0].double() - g64[0]).abs().max() / g64[0].abs().max()
    assert float(err) < 0.05, float(err)


OPCHECK_CASES = {
    "nchw_bias_perm": dict(channels=[8, 12, 8], groups=[4, 2], perms="random", bias=True,
                           layout="contiguous", dtype=torch.float32),
    "channels_last_bf16": dict(channels=[16, 16], groups=[4], perms="default", bias=False,
                               layout="channels_last", dtype=torch.bfloat16),
    "input_index": dict(channels=[6, 12, 6], groups=[3, 3], perms="default", bias=True,
                        layout="contiguous", dtype=torch.float32,
                        input_index=torch.tensor([0, 2, 2, 5, 1, 0]), in_channels=7),
}


@pytest.mark.parametrize("case", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
def test_opcheck(case):
    c = dict(case)
    p = _problem(c.pop("channels"), c.pop("groups"), spatial=(3, 4), seed=17, **c)
    args = normalized_op_args(p)
    torch.library.opcheck(torch.ops.igc.chain_forward.default, args)
    x, ws, bs, groups, shuffles, perms, index = args
    gy = _gy(p, 18)
    bwd_args = (gy, x.detach(), [w.detach() for w in ws], [b.detach() for b in bs], groups,
                shuffles, perms, [True, True, True], index)
    torch.library.opcheck(torch.ops.igc.chain_backward.default, bwd_args)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_fullgraph(dynamic):
    p = _problem([16, 24, 16], [4, 2], dtype=torch.float32, layout="channels_last",
                 perms=["interleave", torch.randperm(16)], seed=19)
    perms = [q.cuda() if isinstance(q, torch.Tensor) else q for q in p.permutations]

    def fn(x, w1, w2, b1, b2):
        return igc.interleaved_group_conv(x, [w1, w2], [4, 2], perms, [b1, b2], backend="cuda")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    args = [p.x, *p.weights, *p.biases]
    gy = _gy(p, 20)
    ye, ge = forward_and_grads(lambda: fn(*args), args, gy)
    yc, gc = forward_and_grads(lambda: compiled(*args), args, gy)
    assert yc.stride() == ye.stride()
    torch.testing.assert_close(yc, ye, rtol=0, atol=0)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_graph_capture_and_replay():
    p = _problem([64, 64, 64], [8, 8], dtype=torch.float16, layout="channels_last",
                 spatial=(8, 8), N=4, perms="random", seed=21)
    x, ws, bs = p.x, p.weights, p.biases
    gy = _gy(p, 22)

    def step():
        y = igc.interleaved_group_conv(x, ws, p.groups, p.permutations, bs, backend="cuda")
        return (y,) + torch.autograd.grad(y, [x, *ws, *bs], gy)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    with torch.no_grad():
        x.add_(0.5)  # new input values, same buffers
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(static_out, eager):
        assert torch.equal(a, b)


def test_side_stream():
    p = _problem([32, 32], [4], dtype=torch.float32, spatial=(16, 16), N=4, seed=23)
    ref = p.call("cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = p.call("cuda")
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(y, ref)


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------
def test_chain_too_wide_for_shared_memory_is_refused_clearly():
    # float64 with 8192 channels: even the forward's two buffers of 4-position tiles need 512 KiB
    C = 8192
    x = torch.randn(1, C, 2, 2, device="cuda", dtype=torch.float64)
    w = torch.randn(C, 8, device="cuda", dtype=torch.float64)
    chain = igc._chain.normalize(x, [w], [C // 8], None, None)
    reasons = backends.BACKENDS["cuda"].reasons(x, chain)
    assert any("shared memory" in r for r in reasons), reasons
    with pytest.raises(backends.BackendUnavailableError, match="shared memory"):
        igc.interleaved_group_conv(x, [w], [C // 8], backend="cuda")
    assert backends.select("auto", x, chain).name != "cuda"
    with pytest.raises(RuntimeError, match="does not fit in shared memory"):
        torch.ops.igc.chain_forward(x, [w], [], [C // 8], [0], [None])
    # the process keeps working
    small = _problem([8, 8], [2], dtype=torch.float32, seed=24)
    check_against_oracle(small, "cuda", _gy(small, 25))


def test_more_than_32_layers_is_refused_clearly():
    x = torch.randn(2, 4, 3, device="cuda")
    ws = [torch.randn(4, 2, device="cuda") for _ in range(33)]
    chain = igc._chain.normalize(x, ws, [2] * 33, None, None)
    assert any("32 layers" in r for r in backends.BACKENDS["cuda"].reasons(x, chain))
    with pytest.raises(RuntimeError, match="at most 32"):
        torch.ops.igc.chain_forward(x, ws, [], [2] * 33, [0] * 33, [None] * 33)


def test_64bit_offsets():
    """x of more than 2^31 elements (float16, 4 GiB): the last positions are checked against
    the reference chain run on just those positions (the chain acts per position)."""
    C, S = 8, (1 << 28) + 96
    x = torch.empty(1, C, S, device="cuda", dtype=torch.float16)
    x.view(-1)[-C * 4096:].normal_()
    x.view(-1)[:-C * 4096].zero_()
    assert x.numel() > 2**31
    g = torch.Generator().manual_seed(26)
    w1 = (torch.randn(16, 4, generator=g) / 2).half().cuda()
    w2 = (torch.randn(8, 8, generator=g) / 3).half().cuda()
    y = igc.interleaved_group_conv(x, [w1, w2], [2, 2], backend="cuda")
    tail = x[..., -1000:]
    ref = igc.interleaved_group_conv(tail.float(), [w1.float(), w2.float()], [2, 2],
                                     backend="reference")
    torch.testing.assert_close(y[..., -1000:].float(), ref, rtol=2e-2, atol=2e-2)
    gy = torch.zeros_like(y)
    gy[..., -1000:] = 1
    del y
    xg = x.detach().requires_grad_()
    y2 = igc.interleaved_group_conv(xg, [w1, w2], [2, 2], backend="cuda")
    (gx,) = torch.autograd.grad(y2, [xg], gy)
    tg = tail.float().detach().requires_grad_()
    yr = igc.interleaved_group_conv(tg, [w1.float(), w2.float()], [2, 2], backend="reference")
    (gr,) = torch.autograd.grad(yr, [tg], torch.ones_like(yr))
    torch.testing.assert_close(gx[..., -1000:].float(), gr, rtol=2e-2, atol=2e-2)


def test_empty_inputs():
    w = torch.randn(8, 2, device="cuda", requires_grad=True)
    for shape in [(0, 8, 4, 4), (2, 8, 0, 3)]:
        x = torch.randn(*shape, device="cuda", requires_grad=True)
        y = igc.interleaved_group_conv(x, [w], [4], backend="cuda")
        assert y.shape == shape
        gx, gw = torch.autograd.grad(y.sum(), [x, w])
        assert gx.shape == x.shape and bool((gw == 0).all())


# ---------------------------------------------------------------------------------------------
# The tensor-core forward (float16 / bfloat16, sm_80 and newer)
# ---------------------------------------------------------------------------------------------
_KERNELS_SCRIPT = """
import sys, torch, igc_kernels as igc
x = torch.randn(2, 256, 16, 16, device="cuda", dtype=torch.bfloat16)
ws = [torch.randn(256, 8, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    y = igc.interleaved_group_conv(x, ws, [32, 32, 32], backend="cuda")
    torch.cuda.synchronize()
ref = igc.reference.interleaved_group_conv(x.double(), [w.double() for w in ws], [32, 32, 32])
print(sorted({e.name for e in prof.events() if "chain_forward" in e.name}))
print(float((y.double() - ref).abs().max()), float(ref.abs().max()))
print(sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()))
"""


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (8, 0),
                    reason="tensor cores for bf16 need sm_80")
@pytest.mark.parametrize("tensor_cores", ["1", "0"])
def test_tensor_core_forward_is_used_unless_turned_off(tensor_cores):
    """bfloat16 forwards run chain_forward_mma_kernel on sm_80+, and the CUDA-core kernel with
    IGC_CUDA_TENSOR_CORES=0 (read once per process: a subprocess each); both results are close
    to the float64 chain (the 2x rule of every case above runs with the default, tensor cores).
    The tensor-core forward is two launches: the per-call preparation (tables and weight
    fragments, from the weights as they are) and the chain."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, IGC_CUDA_TENSOR_CORES=tensor_cores)
    r = subprocess.run([sys.executable, "-c", _KERNELS_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    names, errs, launches = r.stdout.strip().splitlines()[-3:]
    mma = "chain_forward_mma_kernel" in names
    assert mma == (tensor_cores == "1"), names
    err, scale = (float(v) for v in errs.split())
    assert err <= 0.05 * scale, (err, scale)
    if mma:
        assert int(launches) == 2, launches


_FP32_MMA_SCRIPT = """
import os, sys, torch, igc_kernels as igc
sys.path.insert(0, "tests")
from igc_test_utils import rounding_failure
torch.manual_seed(0)
# two bfloat16 planes where TF32 is allowed for matmul (with IGC_CUDA_FP32_MMA=1)
two = os.environ["IGC_CUDA_FP32_MMA"] == "1" and torch.backends.cuda.matmul.allow_tf32
worst = []
for C, K, L, layout in ((256, 32, 2, torch.contiguous_format), (512, 16, 3, torch.channels_last),
                        (256, 8, 3, torch.contiguous_format)):
    x = torch.randn(3, C, 9, 11, device="cuda").to(memory_format=layout).requires_grad_()
    ws = [(torch.randn(C, K, device="cuda") / K ** 0.5).requires_grad_() for _ in range(L)]
    bs = [torch.randn(C, device="cuda").requires_grad_() for _ in range(L)]
    gy = torch.randn(3, C, 9, 11, device="cuda").to(memory_format=layout)
    g = [C // K] * L
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = igc.interleaved_group_conv(x, ws, g, biases=bs, backend="cuda")
        grads = torch.autograd.grad(y, [x, *ws, *bs], gy)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if "chain_" in e.name})
    def oracle(f):
        leaves = [f(t.detach().double()).requires_grad_() for t in (x, *ws, *bs)]
        out = igc.reference.interleaved_group_conv(leaves[0], leaves[1:1 + L], g,
                                                   biases=leaves[1 + L:])
        return [out.detach()] + list(torch.autograd.grad(out, leaves, f(gy.double())))
    ref, mag = oracle(lambda t: t), oracle(torch.abs)
    k = sum(2 * K + 2 for _ in range(L))  # the output; the gradients also sum the positions
    k += (2 * L + 1) * 3 * 2 ** 8 if two else 0  # each split product: 3 * 2^-16 (EmuCase.k_mma)
    msgs = [rounding_failure(name, a.cpu(), r.cpu(), m.cpu(), k + (i > 0) * 3 * 9 * 11,
                             torch.float32)
            for i, (name, a, r, m) in enumerate(zip(["output", "grad of x"] + ["grad of w"] * L +
                                                    ["grad of b"] * L, [y, *grads], ref, mag))]
    print(names, msgs)
    assert all(m is None for m in msgs), msgs
    worst.append(max(float(((a.double() - r).abs() / m.clamp_min(1e-30)).max())
                     for a, r, m in zip([y, *grads], ref, mag)))
    if two:  # TF32 disallowed (read at every call): three planes, other bits
        torch.backends.cuda.matmul.allow_tf32 = False
        y3 = igc.interleaved_group_conv(x, ws, g, biases=bs, backend="cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        assert not torch.equal(y3, y)
        assert rounding_failure("output", y3.cpu(), ref[0].cpu(), mag[0].cpu(),
                                k - (2 * L + 1) * 3 * 2 ** 8, torch.float32) is None
print("worst relative error", max(worst))
"""


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (8, 0),
                    reason="the float32 tensor-core kernels need sm_80")
@pytest.mark.parametrize("tf32", [False, True], ids=["highest", "tf32_allowed"])
@pytest.mark.parametrize("fp32_mma", ["1", "0"])
def test_float32_tensor_cores_are_opt_in(fp32_mma, tf32):
    """float32 forwards and backwards run chain_forward_mma_kernel and chain_backward_mma_kernel
    only with IGC_CUDA_FP32_MMA=1 (read once per process: a subprocess each), and either way
    the output and every gradient lie within the float32 rounding bound of the problem (NCHW
    and channels-last, groups of 32, 16 and 8). With TF32 allowed for matmul
    (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1) the opted-in kernels run two bfloat16 planes: within
    the bound with each split product counted at 3 * 2^-16, other bits than the three-plane
    output of the same call with TF32 disallowed; without the opt-in, the CUDA-core kernels
    either way."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, IGC_CUDA_FP32_MMA=fp32_mma)
    env.pop("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", None)
    if tf32:
        env["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "1"
    r = subprocess.run([sys.executable, "-c", _FP32_MMA_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]  # the kernel names
    assert len(lines) == 3 and "worst relative error" in r.stdout, r.stdout[-2000:]
    for line in lines:
        assert ("chain_forward_mma_kernel" in line) == (fp32_mma == "1"), line
        assert ("chain_backward_mma_kernel" in line) == (fp32_mma == "1"), line


_BACKWARD_KERNELS_SCRIPT = """
import sys, torch, igc_kernels as igc
x = torch.randn(2, 256, 16, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
ws = [torch.randn(256, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
      for _ in range(3)]
gy = torch.randn(2, 256, 16, 16, device="cuda", dtype=torch.bfloat16)
y = igc.interleaved_group_conv(x, ws, [32, 32, 32], backend="cuda")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    grads = torch.autograd.grad(y, [x, *ws], gy)
    torch.cuda.synchronize()
x64 = x.detach().double().requires_grad_()
w64 = [w.detach().double().requires_grad_() for w in ws]
ref = torch.autograd.grad(igc.reference.interleaved_group_conv(x64, w64, [32, 32, 32]),
                          [x64, *w64], gy.double())
print(sorted({e.name for e in prof.events() if "chain_backward" in e.name}))
print(max(float((g.double() - r).abs().max() / r.abs().max()) for g, r in zip(grads, ref)))
print(sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()))
"""


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (8, 0),
                    reason="tensor cores for bf16 need sm_80")
@pytest.mark.parametrize("tensor_cores", ["1", "0"])
def test_tensor_core_backward_is_used_unless_turned_off(tensor_cores):
    """bfloat16 backwards run chain_backward_mma_kernel on sm_80+, and the CUDA-core kernel
    with IGC_CUDA_TENSOR_CORES=0 (a subprocess each); dx and every dW close to the float64
    chain's. The tensor-core backward is three launches: the preparation, the chain, the
    reduction of the weight gradients."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, IGC_CUDA_TENSOR_CORES=tensor_cores)
    r = subprocess.run([sys.executable, "-c", _BACKWARD_KERNELS_SCRIPT], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    names, err, launches = r.stdout.strip().splitlines()[-3:]
    mma = "chain_backward_mma_kernel" in names
    assert mma == (tensor_cores == "1"), names
    assert "chain_backward_kernel" in names or mma, names
    assert float(err) <= 0.05, err
    if mma:
        assert int(launches) == 3, launches


def _grads_script(channels, width, layers, seed, scale, dtype="bfloat16"):
    """A script that runs an IGCV2(channels, width)-shaped chain of ``layers`` layers on
    x = (2, channels, 48, 48) in ``dtype``, saves (x's and every weight's gradient, then the
    output) to argv[1] and prints the names of the backward kernels it launched."""
    return f"""
import sys, torch, igc_kernels as igc
g = torch.Generator(device="cuda").manual_seed({seed})
x = torch.randn(2, {channels}, 48, 48, device="cuda", dtype=torch.{dtype}, generator=g)
ws = [({scale} * torch.randn({channels}, {width}, device="cuda", dtype=torch.{dtype},
                             generator=g)) for _ in range({layers})]
gy = torch.randn(2, {channels}, 48, 48, device="cuda", dtype=torch.{dtype}, generator=g)
x.requires_grad_()
for w in ws:
    w.requires_grad_()
y = igc.interleaved_group_conv(x, ws, [{channels // width}] * {layers}, backend="cuda")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    grads = torch.autograd.grad(y, [x, *ws], gy)
    torch.cuda.synchronize()
torch.save([t.cpu() for t in grads] + [y.detach().cpu()], sys.argv[1])
print(sorted({{e.name for e in prof.events() if "chain_backward" in e.name}}))
"""


def _run_script(script, path, var, value):
    """``script`` (argv[1]: path) in a process of its own, with the environment variable ``var``
    set to ``value`` (None: unset), since the extension reads its variables once."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != var}
    if value is not None:
        env[var] = value
    return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, env=env, timeout=600)


def _check_switch(script, var, kernel, tmp_path):
    """Runs ``script`` with the environment variable ``var`` unset, "0" and "2": "2" is refused
    with the variable's name; the other two launch ``kernel`` (not a fallback) and give the
    same bits, finite."""
    out = {}
    for v in (None, "0", "2"):
        path = tmp_path / f"grads_{v}.pt"
        r = _run_script(script, path, var, v)
        if v == "2":
            assert r.returncode != 0 and var in r.stderr, r.stderr[-3000:]
            continue
        assert r.returncode == 0, r.stderr[-3000:]
        assert kernel in r.stdout.strip().splitlines()[-1], (kernel, r.stdout[-2000:])
        out[v] = torch.load(path)
    for a, b in zip(out[None], out["0"]):
        assert torch.equal(a, b)
        assert bool(torch.isfinite(a).all())


_WIDE_TILE_SCRIPT = _grads_script(1024, 16, 3, 0, 0.25)


# one CTA per SM on an H100 / H200: the tensor-core backward of IGCV2(1024, 8) in bf16 (four
# store-all tiles of 16 positions), the CUDA-core one of IGCV2(512, 8) in float32
_PREFETCH_SCRIPTS = {"MmaBf16, 1>": _grads_script(1024, 8, 4, 1, 0.3),
                     "chain_backward_kernel<float, float>": _grads_script(512, 8, 3, 2, 0.3,
                                                                         "float32")}


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (8, 0),
                    reason="tensor cores for bf16 need sm_80")
def test_backward_l2_prefetch_is_a_hint(tmp_path):
    """Chains whose backward runs one CTA per SM on an H100 / H200 and prefetches its next
    tile's x and dy into L2 (IGCV2(1024, 8) in bf16 on the tensor cores, IGCV2(512, 8) in
    float32 on the CUDA cores, whose forward prefetches its next tile's x too), 4608 positions:
    every gradient and the output bitwise equal with IGC_CUDA_L2_PREFETCH=0 (no prefetch), and
    another value of the variable refused with its name."""
    for kernel, script in _PREFETCH_SCRIPTS.items():
        _check_switch(script, "IGC_CUDA_L2_PREFETCH", kernel, tmp_path)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_narrow_items_switch(tmp_path):
    """IGCV2(256, 16)-shaped float32 chain on the CUDA-core kernels (tiles of 32 and 16
    positions: items of 8 positions): with IGC_CUDA_WIDE_ITEMS=0 (items of 4 positions only)
    the output and every gradient are bitwise equal (the same products in the same order), and
    another value of the variable is refused with its name."""
    _check_switch(_grads_script(256, 16, 2, 3, 0.3, "float32"), "IGC_CUDA_WIDE_ITEMS",
                  "chain_backward_kernel<float, float>", tmp_path)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.get_device_capability() < (8, 0),
                    reason="tensor cores for bf16 need sm_80")
def test_tensor_core_backward_wide_tile_beyond_l2(tmp_path):
    """IGCV2(1024, 16)-shaped bf16 chain, 4608 positions: where the fp32 gradient rows of two
    CTAs per SM exceed three quarters of the L2 (an H100 / H200: 264 rows of 192 KiB, 50 MiB),
    the backward takes one CTA per SM with tiles of 32 positions (kernel <MmaBf16, 2>), and
    with IGC_CUDA_PLAN_L2_BYTES=0 two of 16 (<MmaBf16, 1>). dx is bitwise equal between the two
    (per position the same arithmetic), every dW close to the float64 chain's in both."""
    props = torch.cuda.get_device_properties(0)
    rows = 2 * props.multi_processor_count * 4 * 3 * 1024 * 16  # fp32 rows at two CTAs per SM
    tile16 = (3 * 1024 + 2) * 16 * 2 + 3 * 16 * 8  # x / dy, u_1, u_2, zero rows; offsets
    two_ctas = props.shared_memory_per_multiprocessor >= 2 * (tile16 + 1024)
    wide = two_ctas and 4 * rows > 3 * props.L2_cache_size
    out = {}
    for l2 in (None, "0"):
        path = tmp_path / f"grads_{l2}.pt"
        r = _run_script(_WIDE_TILE_SCRIPT, path, "IGC_CUDA_PLAN_L2_BYTES", l2)
        assert r.returncode == 0, r.stderr[-3000:]
        out[l2] = (torch.load(path), r.stdout.strip().splitlines()[-1])
    (g_rule, names_rule), (g_off, names_off) = out[None], out["0"]
    assert "MmaBf16, 1>" in names_off, names_off
    assert ("MmaBf16, 2>" if wide else "MmaBf16, 1>") in names_rule, (names_rule, wide)
    assert torch.equal(g_rule[0], g_off[0])
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 1024, 48, 48, device="cuda", dtype=torch.bfloat16, generator=gen)
    ws = [(0.25 * torch.randn(1024, 16, device="cuda", dtype=torch.bfloat16, generator=gen))
          for _ in range(3)]
    gy = torch.randn(2, 1024, 48, 48, device="cuda", dtype=torch.bfloat16, generator=gen)
    x64 = x.double().requires_grad_()
    w64 = [w.double().requires_grad_() for w in ws]
    ref = torch.autograd.grad(igc.reference.interleaved_group_conv(x64, w64, [64, 64, 64]),
                              [x64, *w64], gy.double())
    for grads in (g_rule, g_off):
        for g, r in zip(grads, ref):
            r = r.cpu()
            assert float((g.double() - r).abs().max() / r.abs().max()) <= 0.05
