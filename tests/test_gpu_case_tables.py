"""The case tables of the GPU-only test files describe valid problems. Those files are skipped
without a GPU, so a case that cannot even be built (e.g. groups that do not divide the channels)
would otherwise first fail on a GPU machine; here each one is built on the CPU and run once
through the CPU backend against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

import igc_kernels as igc
import test_cuda_gpu as gpu
import test_triton_gpu as tgpu
from igc_test_utils import FUSED, build_problem, check_against_oracle, make_tensor


def _run_on_the_cpu(case, seed, spatial=None, N=None):
    """A case ``(channels, groups, permutations, bias, spatial, N, layout)`` built and run through
    the CPU backend against the float64 oracle (``spatial`` / ``N``: smaller ones instead)."""
    channels, groups, perms, bias, case_spatial, case_n, layout = case
    p = build_problem(channels, groups, spatial=spatial or case_spatial, N=N or case_n,
                      layout=layout, dtype=torch.float32, permutations=perms, bias=bias,
                      seed=seed)
    gy = make_tensor((p.x.shape[0], p.channels[-1], *p.x.shape[2:]), "contiguous",
                     p.x.dtype, torch.Generator().manual_seed(seed + 1))
    check_against_oracle(p, FUSED, gy)


@pytest.mark.parametrize("case", gpu.CASES.values(), ids=gpu.CASES.keys())
def test_cuda_gpu_cases_build_and_run_on_the_cpu(case):
    _run_on_the_cpu(case, seed=3)


@pytest.mark.parametrize("case", gpu.LARGE.values(), ids=gpu.LARGE.keys())
def test_cuda_gpu_large_cases_are_valid_chains(case):
    channels, groups, _, _ = case
    spec = igc.ChainSpec(channels, groups)
    assert spec.channels == tuple(channels)


@pytest.mark.parametrize("case", gpu.OPCHECK_CASES.values(), ids=gpu.OPCHECK_CASES.keys())
def test_cuda_gpu_opcheck_cases_build(case):
    c = dict(case)
    p = build_problem(c.pop("channels"), c.pop("groups"), spatial=(3, 4), seed=17,
                      permutations=c.pop("perms"), **c)
    assert p.x.shape[1] == (c.get("in_channels") or p.channels[0])


# the Triton GPU cases are run by the CPU backend too (the largest ones on fewer positions)
@pytest.mark.parametrize("case", tgpu.FP32_CASES.values(), ids=tgpu.FP32_CASES.keys())
def test_triton_gpu_cases_build_and_run_on_the_cpu(case):
    spatial, N = case[4], case[5]
    _run_on_the_cpu(case, seed=len(case[0]), spatial=tuple(min(s, 4) for s in spatial),
                    N=min(N, 2))


def test_triton_gpu_low_precision_cases_exist():
    assert set(tgpu.LP_CASES) <= set(tgpu.FP32_CASES)
