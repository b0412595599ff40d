"""pytest-benchmark suite: the comparisons of ``bench.py`` for the headline config, on CPU.

On demand only; ``python -m pytest`` / ``python -m pytest tests`` never collect this folder
(``testpaths = ["tests"]``). Run it with

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only
    python -m pytest benchmarks/test_bench_cpu.py --benchmark-only \\
        --benchmark-columns=median,iqr,min,rounds --benchmark-json=benchmarks/out/suite.json

Cases (``bench_common.default_cases``): the fused op per backend on NCHW and channels_last,
the unfused chain and the dense composed 1x1 conv in every oneDNN on/off x layout variant, and
the copy floor; each in forward (``no_grad``) and forward+backward (grads w.r.t. x and every
weight). One group per mode. ``benchmarks/conftest.py`` prints, after pytest-benchmark's
tables, every median against the fastest chain variant, the fastest dense variant and the copy.

Fused backends: ``IGC_BENCH_BACKENDS=cpu,reference`` (default: those usable on CPU, else the
reference). Correctness is checked once against the float64 reference before anything is
timed; a wrong result makes every benchmark of the module error out.
"""

from __future__ import annotations

import os

import pytest
import torch

import bench_common as bc

BACKENDS = ([b for b in os.environ.get("IGC_BENCH_BACKENDS", "").split(",") if b]
            or bc.default_backends())
CASES = bc.default_cases(BACKENDS)
PARAMS = [pytest.param(case, mode, id=f"{mode}-{case.id}")
          for mode in bc.MODES for case in CASES
          if not (case.kind == "copy" and mode == "fwd+bwd")]  # the copy is one measurement


@pytest.fixture(scope="module")
def problem():
    p = bc.make_problem(bc.HEADLINE)
    bc.check_correctness(p, CASES)
    return p


@pytest.fixture(scope="module")
def environment():
    return bc.environment()


@pytest.mark.parametrize("case, mode", PARAMS)
def test_cpu(benchmark, problem, environment, case, mode):
    cfg = problem.config
    benchmark.group = f"{mode}: {cfg.describe()}"
    benchmark.extra_info.update(
        environment, kind=case.kind, backend=case.backend, layout=case.layout,
        mkldnn=case.mkldnn, mode=mode, dtype=cfg.dtype, shape=list(cfg.shape),
        threads=torch.get_num_threads(),
        # least activation traffic of the step (GB/s = bytes / median); the copy moves x -> y
        bytes=problem.io_bytes("fwd") if case.kind == "copy" else problem.io_bytes(mode))
    benchmark(bc.build_step(case, problem, mode))
