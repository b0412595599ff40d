"""DistributedDataParallel with the fused operator: gloo backend, 2 processes on the CPU.

Each rank trains the same fused and unfused IGCV2 network (same seed, so the same parameters)
on its own shard of a batch. After backward, DDP has all-reduced (averaged) the gradients: the
test checks that the fused model's gradients equal the unfused model's on every rank, that both
ranks hold the same gradients, and that they equal the mean of the per-shard gradients computed
in this process without DDP. float64 throughout; tolerance ``2 k u scale`` as in test_models.

Robustness: a free TCP port on 127.0.0.1, a 60 s timeout on the process group, and a deadline
on the whole run after which the workers are terminated and the test fails.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import igc_kernels as igc  # noqa: F401
from igc_kernels.models import IGCV2CifarNet, parameter_pairs
from igc_test_utils import assert_within_rounding, gloo_group, run_gloo_workers

# Slow (compilers, subprocesses): run as its own step of `make test` (-m slow).
pytestmark = pytest.mark.slow

WORLD = 2
K_ROUND = 4 * 8 * (4 * 16 * 16 + 600)
DEADLINE_S = 240


def _model(fused):
    torch.manual_seed(0)
    return IGCV2CifarNet(8, depth=5, group_size=4, fused=fused).double()


def _shard(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (4,), generator=g))


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    with gloo_group(rank, port, WORLD, out_dir) as save:
        x, y = _shard(rank)
        result = {}
        for fused in (True, False):
            net = torch.nn.parallel.DistributedDataParallel(_model(fused))
            result["fused" if fused else "unfused"] = _grads(net, x, y)
        # the wrapper names its parameters "module.<name>"
        result = {k: {n.removeprefix("module."): g for n, g in v.items()} for k, v in result.items()}
        save(result)


def _close(a, b, name):
    scale = torch.full_like(b, max(1.0, float(b.abs().max())))
    assert_within_rounding(a, b, scale, K_ROUND, torch.float64, name=name)


def test_ddp_fused_gradients_equal_unfused(tmp_path):
    results = run_gloo_workers(_worker, tmp_path, WORLD, DEADLINE_S, "DDP")

    fused, unfused = _model(True), _model(False)
    pairs = parameter_pairs(fused, unfused)
    name_of = {id(p): n for n, p in fused.named_parameters()}
    uname_of = {id(p): n for n, p in unfused.named_parameters()}
    # the mean of the per-shard gradients, computed here without DDP (unfused model)
    per_shard = [_grads(unfused, *_shard(r)) for r in range(WORLD)]
    mean = {n: sum(g[n] for g in per_shard) / WORLD for n in per_shard[0]}
    assert len(pairs) == len(mean)
    # the shards give different gradients, so matching the mean shows the all-reduce happened
    assert all(not torch.allclose(per_shard[0][n], mean[n]) for n in mean if "weight" in n)
    for r, res in enumerate(results):
        for _, pf, pu in pairs:
            nf, nu = name_of[id(pf)], uname_of[id(pu)]
            _close(res["fused"][nf], res["unfused"][nu], f"rank {r}: fused vs unfused grad of {nf}")
            _close(res["unfused"][nu], mean[nu], f"rank {r}: all-reduced grad of {nu} vs the mean")
            _close(res["fused"][nf], results[0]["fused"][nf], f"rank {r} vs rank 0: grad of {nf}")
