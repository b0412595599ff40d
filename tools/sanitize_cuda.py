"""Small forward + backward runs of the fused CUDA backend for compute-sanitizer.

Every kernel and load/store path runs at least once on small inputs: float32 / float16 /
bfloat16 / float64; NCHW (row-aligned and not), channels_last, sliced views with a storage
offset, tokens, a stride-0 grad_output; input index with repeats; permutations; a chain whose
backward keeps its intermediates in shared memory and one (2048 channels, 3 layers) that
recomputes them; output masks; the tensor-core forward's in-place layers (IGCV2 with C = 512
and 1024) and the tensor-core backward with x and dy in one tile (IGCV2(1024, 16)). Each result
is compared with the reference chain, so the script also fails (exit 1) on a wrong result. Run it as

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck  --error-exitcode 99 python tools/sanitize_cuda.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 99 python tools/sanitize_cuda.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool initcheck --error-exitcode 99 python tools/sanitize_cuda.py

(``tools/gpu_session.sh sanitize`` runs all three; its ``race`` step runs racecheck a second
time with ``IGC_CUDA_FP32_MMA=1``, which sends the float32 forwards and backwards to the
tensor-core kernels' three-plane format, and a third time with TF32 allowed as well
(``TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1``: the two-plane format). Sizes are tiny so that a run under
racecheck takes seconds, not minutes.
"""

from __future__ import annotations

import os
import sys

import torch

import igc_kernels as igc

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}
if os.environ.get("IGC_CUDA_FP32_MMA") == "1" and torch.backends.cuda.matmul.allow_tf32:
    TOL[torch.float32] = 1e-3  # two bfloat16 planes: each product to about 3 * 2^-16


def make_x(N, C, spatial, layout, dtype, gen):
    shape = (N, C, *spatial)
    if layout == "channels_last":
        t = torch.randn(N, *spatial, C, generator=gen).movedim(-1, 1)
    elif layout == "sliced":
        big = torch.randn(N + 1, C + 2, *[s * 2 + 1 for s in spatial], generator=gen)
        idx = (slice(1, None), slice(1, C + 1)) + tuple(slice(1, 1 + 2 * s, 2) for s in spatial)
        t = big[idx]
    else:
        t = torch.randn(shape, generator=gen)
    assert tuple(t.shape) == shape
    base = torch.zeros(t.untyped_storage().nbytes() // t.element_size(), dtype=dtype,
                       device="cuda")
    out = base.as_strided(t.shape, t.stride(), t.storage_offset())
    out.copy_(t)
    return out.requires_grad_()


def run(name, channels, groups, *, spatial=(3, 5), N=2, layout="contiguous",
        dtype=torch.float32, perms=None, bias=False, index=None, c_in=None, grad="contiguous",
        mask=(True, True, True)):
    gen = torch.Generator().manual_seed(len(name))
    L = len(groups)
    x = make_x(N, c_in if index is not None else channels[0], spatial, layout, dtype, gen)
    ws = [(torch.randn(channels[l + 1], channels[l] // g, generator=gen)
           / (channels[l] // g) ** 0.5).to("cuda", dtype).requires_grad_()
          for l, g in enumerate(groups)]
    bs = ([(torch.randn(channels[l + 1], generator=gen) * 0.1).to("cuda", dtype).requires_grad_()
           for l in range(L)] if bias else None)
    perms = None if perms is None else [p.cuda() if isinstance(p, torch.Tensor) else p
                                        for p in perms]
    index = None if index is None else index.cuda()
    out_shape = (N, channels[-1], *spatial)
    if grad == "expanded":
        gy = torch.randn((1, channels[-1]) + (1,) * len(spatial), generator=gen).to(
            "cuda", dtype).expand(out_shape)
    else:
        gy = torch.randn(out_shape, generator=gen).to("cuda", dtype)
    # only the requested gradients are computed (the op's output_mask follows requires_grad)
    x.requires_grad_(mask[0])
    for w in ws:
        w.requires_grad_(mask[1])
    for b in bs or []:
        b.requires_grad_(mask[2])
    results = {}
    for backend in ("cuda", "reference"):
        xin = x if backend == "cuda" else x.detach().double().requires_grad_(mask[0])
        w_in = ws if backend == "cuda" else [w.detach().double().requires_grad_(mask[1])
                                             for w in ws]
        b_in = bs if backend == "cuda" or bs is None else [
            b.detach().double().requires_grad_(mask[2]) for b in bs]
        y = igc.interleaved_group_conv(xin, w_in, groups, perms, b_in, input_index=index,
                                       backend=backend)
        lv = ([xin] if mask[0] else []) + (w_in if mask[1] else []) + (
            (b_in or []) if mask[2] else [])
        grads = torch.autograd.grad(y, lv, gy.double() if backend == "reference" else gy)
        results[backend] = [y] + list(grads)
    torch.cuda.synchronize()
    worst = 0.0
    for a, b in zip(results["cuda"], results["reference"]):
        err = float((a.detach().double() - b.detach()).abs().max()) if a.numel() else 0.0
        scale = max(1.0, float(b.detach().abs().max()) if b.numel() else 0.0)
        worst = max(worst, err / scale)
    ok = worst <= TOL[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max relative error {worst:.2e}")
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    gen = torch.Generator().manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        tag = str(dtype).replace("torch.", "")
        ok &= run(f"nchw_bias_{tag}", [16, 32, 16], [4, 4], dtype=dtype, bias=True)
        ok &= run(f"channels_last_{tag}", [24, 24, 24], [3, 6], dtype=dtype,
                  layout="channels_last", perms=["interleave", torch.randperm(24, generator=gen)])
    ok &= run("nchw_aligned_rows", [32, 32], [4], spatial=(8, 8))
    ok &= run("sliced_storage_offset", [12, 24, 10], [4, 2], layout="sliced", bias=True)
    ok &= run("tokens", [64, 64, 64], [8, 8], spatial=(), N=37)
    ok &= run("expanded_grad", [16, 16], [2], grad="expanded", layout="channels_last")
    ok &= run("input_index", [8, 16, 8], [2, 4], c_in=9, bias=True,
              index=torch.tensor([3, 0, 3, 5, 7, 7, 7, 1]))
    ok &= run("input_index_channels_last_int32", [8, 16], [4], c_in=11, layout="channels_last",
              index=torch.tensor([10, 0, 3, 3, 4, 9, 9, 2], dtype=torch.int32))
    ok &= run("odd_widths", [9, 15, 10], [3, 5], spatial=(7,), bias=True)
    ok &= run("recompute_c2048", [2048] * 4, [32, 32, 32], spatial=(2, 3), N=1)
    # bfloat16 forwards with in-place layers (one tile; racecheck: no warp overwrites a row
    # another still reads), groups of 8 (32 positions), 16 (64) and 32 (32)
    for name, c, g, sp in (("in_place_w8", 1024, 128, (4, 8)), ("in_place_w16", 512, 32, (8, 8)),
                           ("in_place_w32", 1024, 32, (4, 8))):
        L = {8: 4, 16: 3, 32: 2}[c // g]
        ok &= run(name, [c] * (L + 1), [g] * L, spatial=sp, N=1, dtype=torch.bfloat16,
                  perms=["interleave"] * (L - 1) + [None], bias=True)
    # the tensor-core backward with x and dy in one tile (IGCV2(1024, 16): two CTAs per SM
    # instead of one at any size; racecheck: dy loaded over x, x reloaded over dy)
    ok &= run("backward_reload_x", [1024] * 4, [64] * 3, spatial=(4, 8), N=1,
              dtype=torch.bfloat16, perms=["interleave", "interleave", None], bias=True)
    ok &= run("mask_weights_only", [16, 16, 16], [4, 4], bias=True, mask=(False, True, False))
    ok &= run("mask_x_only", [16, 16, 16], [4, 4], bias=True, mask=(True, False, False))
    print("all ok" if ok else "FAILURES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
