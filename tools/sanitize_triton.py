"""Run the Triton backend's kernels once per structure class, for compute-sanitizer.

Small problems that together reach every code path of the kernels: both layer
implementations (FMA and dense tl.dot), both backward variants (intermediates kept and
recomputed), every permutation kind, biases on some layers, input_index with repeats, padded
channel counts (odd sizes), tails of the position tiles, NCHW / channels-last / sliced / token
layouts, float32 / float16 / bfloat16, and every output_mask of the backward. Each result is
checked against the reference chain (float64), so a run that the sanitizer passes is also a
correct one. Fixed launch configurations (no autotuning: the autotuner's timing runs would
multiply the sanitizer's time).

On a GPU machine:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \\
        python tools/sanitize_triton.py
    compute-sanitizer --tool racecheck python tools/sanitize_triton.py --quick
    compute-sanitizer --tool initcheck python tools/sanitize_triton.py --quick
    compute-sanitizer --tool synccheck python tools/sanitize_triton.py --quick

(``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` makes every tensor its own allocation, so that memcheck
sees accesses past a tensor's end instead of landing in the caching allocator's slack.)
Exit status 0 when every case matched the reference; the sanitizer reports its own errors.
"""

from __future__ import annotations

import argparse
import sys

import torch

import igc_kernels as igc
from igc_kernels.triton_kernels import chain as K

CASES = [
    # (name, in_channels or None, index or None, channels, groups, permutations, bias,
    #  spatial, N, layout)
    ("shuffle_bias_nchw", None, None, [12, 18, 12], [3, 3], ["interleave", None], [True, False],
     (5, 7), 2, "nchw"),
    ("explicit_perms_cl", None, None, [16, 32, 16], [4, 8], ["random", "random"], [True, True],
     (3, 5), 3, "channels_last"),
    ("odd_widths_sliced", None, None, [6, 14, 6], [2, 2], ["interleave", "random"],
     [False, True], (3, 4), 2, "sliced"),
    ("deep_identity_tokens", None, None, [24] * 5, [3, 4, 6, 2], [None] * 4, [True] * 4, (), 37,
     "tokens"),
    ("wide_groups_fma", None, None, [256, 256, 128], [4, 8], ["interleave", "random"],
     [False, True], (3, 3), 2, "channels_last"),
    ("index_repeats", 10, [9, 0, 0, 3, 3, 3, 7, 1], [8, 12, 8], [2, 4], ["random", None],
     [True, False], (2, 3), 2, "nchw"),
]
CONFIGS = [dict(dense=0, keep=1, block_p=16), dict(dense=1, keep=0, block_p=32),
           dict(dense=1, keep=1, block_p=64, num_warps=8)]
MASKS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


def _x(shape, layout, dtype, device, gen):
    data = torch.randn(shape, generator=gen, dtype=torch.float64)
    if layout == "channels_last" and len(shape) == 4:
        return data.to(device, dtype).to(memory_format=torch.channels_last)
    if layout == "sliced":
        big = torch.randn((shape[0] + 1, shape[1] + 2, shape[2] + 1, 2 * shape[3]),
                          generator=gen, dtype=torch.float64).to(device, dtype)
        return big[1:, 1:-1, 1:, ::2]
    return data.to(device, dtype)


def run_case(case, dtype, config, mask, device, gen) -> float:
    name, cin, index, channels, groups, perms, bias, spatial, N, layout = case
    c_x = cin if cin is not None else channels[0]
    x = _x((N, c_x, *spatial), layout, dtype, device, gen).requires_grad_(mask[0])
    ws = [(torch.randn(channels[l + 1], channels[l] // g, generator=gen, dtype=torch.float64)
           / (channels[l] // g) ** 0.5).to(device, dtype).requires_grad_(mask[1])
          for l, g in enumerate(groups)]
    bs = [(torch.randn(channels[l + 1], generator=gen, dtype=torch.float64)).to(device, dtype)
          .requires_grad_(mask[2]) if b else None for l, b in enumerate(bias)]
    ps = [torch.randperm(c, generator=gen).to(device) if p == "random" else p
          for p, c in zip(perms, channels[1:])]
    idx = None if index is None else torch.tensor(index, device=device)
    leaves = [t for t, m in [(x, mask[0])] + [(w, mask[1]) for w in ws]
              + [(b, mask[2]) for b in bs if b is not None] if m]
    with K.override_config(**config):
        y = igc.interleaved_group_conv(x, ws, groups, ps, bs, input_index=idx, backend="triton")
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device, dtype)
        grads = torch.autograd.grad(y, leaves, gy) if leaves else []

    def f64(t):
        return t.detach().double().requires_grad_(t.requires_grad)

    x64, ws64 = f64(x), [f64(w) for w in ws]
    bs64 = [None if b is None else f64(b) for b in bs]
    y64 = igc.interleaved_group_conv(x64, ws64, groups, ps, bs64, input_index=idx,
                                     backend="reference")
    leaves64 = [t for t, m in [(x64, mask[0])] + [(w, mask[1]) for w in ws64]
                + [(b, mask[2]) for b in bs64 if b is not None] if m]
    grads64 = torch.autograd.grad(y64, leaves64, gy.double()) if leaves64 else []
    err = 0.0
    for a, b in zip([y] + list(grads), [y64] + list(grads64)):
        scale = float(b.detach().abs().max()) or 1.0
        err = max(err, float((a.detach().double() - b.detach()).abs().max()) / scale)
    return err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="one configuration, one dtype and the full output_mask per case")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.float16, torch.bfloat16]
    configs = CONFIGS[:1] if args.quick else CONFIGS
    masks = MASKS[:1] if args.quick else MASKS
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
    gen = torch.Generator().manual_seed(0)
    failed = 0
    for case in CASES:
        for dtype in dtypes:
            for config in configs:
                for mask in masks:
                    err = run_case(case, dtype, config, mask, args.device, gen)
                    ok = err <= tol[dtype]
                    failed += not ok
                    print(f"{'ok ' if ok else 'BAD'} {case[0]:<22} {str(dtype)[6:]:<9} "
                          f"{config} mask={''.join('1' if m else '0' for m in mask)} "
                          f"max rel err {err:.2e}")
    if args.device == "cuda":
        torch.cuda.synchronize()
    print("all cases match the reference" if not failed else f"{failed} cases FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
