"""bfloat16 / float16: the fused kernel is at least as accurate as the unfused chain.

flash-attention's rule: against the float64 oracle (the reference chain run in float64 on the
very same low-precision inputs), the kernel's max error may be at most twice the max error of
the unfused PyTorch chain in the same dtype, for the output and for every gradient.
"""

from __future__ import annotations

import pytest
import torch

from igc_test_utils import FUSED, build_problem, forward_and_grads, make_tensor, oracle

CASES = {
    # name: (channels, groups, permutations, bias, spatial, layout)
    "nchw_nonsquare": ([32, 48, 32], [4, 8], "default", True, (5, 5), "contiguous"),
    "nchw_channels_last_random_perms": ([24, 24, 24, 24], [3, 3, 3], "random", True, (4, 4),
                                        "channels_last"),
    "tokens_deep": ([64] * 5, [8] * 4, "default", [True, False, False, True], (), "contiguous"),
    "ncl_sliced": ([18, 36, 12], [3, 6], "default", True, (9,), "sliced"),
    "ncdhw": ([16, 16, 32], [4, 2], "default", False, (2, 3, 3), "channels_last"),
    "odd_group_widths": ([34, 38, 34], [2, 2], "default", True, (7, 7), "channels_last"),
}


def _report(name, err_k, err_r, limit):
    bad = err_k > limit
    first = tuple(int(i) for i in torch.nonzero(bad)[0]) if bool(bad.any()) else None
    return (f"{name}: kernel max error {float(err_k.max()):.4e} (mean {float(err_k.mean()):.4e}) "
            f"> allowed {limit:.4e} = 2 x reference max error {float(err_r.max()):.4e} "
            f"(mean {float(err_r.mean()):.4e}); first mismatching index {first}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_low_precision_error_at_most_twice_reference(case, dtype):
    channels, groups, perms, bias, spatial, layout = case
    N = 3
    p = build_problem(channels, groups, spatial=spatial, N=N, layout=layout, dtype=dtype,
                      permutations=perms, bias=bias, seed=11)
    gen = torch.Generator().manual_seed(12)
    gy = make_tensor((N, channels[-1], *spatial), "contiguous", dtype, gen)

    yk, gk = forward_and_grads(lambda: p.call(FUSED), p.leaves(), gy)
    yr, gr = forward_and_grads(lambda: p.call("reference"), p.leaves(), gy)
    yo, go = oracle(p, gy)

    assert yk.dtype == dtype and all(g.dtype == dtype for g in gk)
    names = ["output"] + [f"grad of {n}" for n in p.leaf_names()]
    for name, k, r, o in zip(names, [yk] + gk, [yr] + gr, [yo] + go):
        o = o.detach()
        err_k = (k.detach().double() - o).abs()
        err_r = (r.detach().double() - o).abs()
        # No absolute floor: the kernel accumulates in float32 and rounds once at the end,
        # while the unfused chain also rounds after every layer, so its max error is at least
        # the final rounding the kernel pays (in a sweep over 15 seeds of these cases the
        # kernel's max error never exceeded the reference's).
        limit = 2 * float(err_r.max())
        assert bool(torch.isfinite(k).all()), f"{name}: non-finite values in the kernel result"
        assert float(err_k.max()) <= limit, _report(name, err_k, err_r, limit)
