"""torch.autograd.gradcheck (float64) of the fused CPU operator in x, every weight and bias."""

from __future__ import annotations

import pytest
import torch

import igc_kernels as igc
from igc_test_utils import FUSED, build_problem

CASES = {
    # name: (channels, groups, permutations, bias, spatial, layout)
    "tokens_bias": ([4, 6, 4], [2, 2], "default", True, (), "contiguous"),
    "ncl_random_perms": ([6, 6, 3], [3, 1], "random", [True, False], (3,), "contiguous"),
    "nchw_channels_last": ([4, 8, 4], [2, 4], "default", True, (2, 2), "channels_last"),
    "nchw_sliced": ([3, 6], [3], "random", True, (2, 2), "sliced"),
    "ncdhw_three_layers": ([4, 4, 6, 2], [2, 2, 2], "default", [False, True, True], (1, 2, 2),
                           "contiguous"),
    "igcv1_permute_back": ([4, 4, 4], [2, 2], "igcv1", False, (3,), "channels_last"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradcheck(case):
    channels, groups, perms, bias, spatial, layout = case
    if perms == "igcv1":
        perms = ["interleave", torch.argsort(igc.interleave_index(channels[1], groups[0]))]
    p = build_problem(channels, groups, spatial=spatial, N=2, layout=layout, permutations=perms,
                      bias=bias, seed=7)
    leaves = p.leaves()
    L = len(p.weights)
    bias_slots = [i for i, b in enumerate(p.biases or []) if b is not None]

    def fn(x, *params):
        ws = list(params[:L])
        bs = None
        if p.biases is not None:
            bs = [None] * L
            for slot, b in zip(bias_slots, params[L:]):
                bs[slot] = b
        return igc.interleaved_group_conv(x, ws, p.groups, p.permutations, bs, backend=FUSED)

    assert all(t.dtype == torch.float64 and t.requires_grad for t in leaves)
    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7, rtol=1e-5)
