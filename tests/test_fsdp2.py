"""FSDP2 training with the fused operator: gloo, 2 processes on the CPU.

Each rank builds the fused IGCV2 network on the meta device (deferred init), shards it with
``fully_shard`` per block and at the root, materialises it (``to_empty``, ``reset_parameters``)
and loads the unfused twin's parameters shard by shard; the unfused twin is sharded the same
way. Both train three SGD steps on the rank's own shard of each batch. Step by step, on every
rank, the losses and the (all-reduced, gathered) gradients of the fused model equal the unfused
model's. float64; tolerance ``2 k u scale`` as in test_ddp.

Robustness: a free TCP port, a 60 s timeout on the process group, a deadline on the run.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import igc_kernels as igc  # noqa: F401
from igc_kernels.models import IGCV2CifarNet, parameter_pairs
from igc_test_utils import assert_within_rounding, gloo_group, run_gloo_workers

pytestmark = pytest.mark.slow  # subprocesses: the slow step of `make test`

WORLD = 2
STEPS = 3
K_ROUND = 4 * 8 * (4 * 16 * 16 + 600)
DEADLINE_S = 300


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (4,), generator=g))


def _reset(model):
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _worker(rank, port, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, port, WORLD, out_dir) as save:
        mesh = init_device_mesh("cpu", (WORLD,))
        torch.manual_seed(0)
        unfused = IGCV2CifarNet(8, depth=5, group_size=4, fused=False).double()
        with torch.device("meta"):
            fused = IGCV2CifarNet(8, depth=5, group_size=4, fused=True).double()
        # fused name -> (unfused name, the unfused tensor), before sharding swaps the Parameters
        uname = {id(q): n for n, q in unfused.named_parameters()}
        twin = {n: (uname[id(q)], q.detach().clone())
                for n, _, q in parameter_pairs(fused, unfused)}
        for model in (fused, unfused):
            for blk in model.blocks:
                fully_shard(blk, mesh=mesh)
            fully_shard(model, mesh=mesh)
        fused.to_empty(device="cpu")
        _reset(fused)
        with torch.no_grad():  # this rank's shard (dim 0, torch.chunk placement) of each tensor
            for n, p in fused.named_parameters():
                local = p.to_local()
                whole = twin[n][1].reshape(p.shape)
                local.copy_(whole.chunk(WORLD, dim=0)[rank][: local.shape[0]])
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (fused, unfused)]
        record = []
        for step in range(STEPS):
            x, y = _batch(step, rank)
            out = {}
            for tag, model, opt in (("fused", fused, opts[0]), ("unfused", unfused, opts[1])):
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                grads = {n: p.grad.full_tensor().detach().clone()
                         for n, p in model.named_parameters()}
                opt.step()
                out[tag] = (loss.detach().clone(), grads)
            record.append(out)
        save({"record": record, "twin": {n: t[0] for n, t in twin.items()}})


def _close(a, b, what):
    scale = torch.full_like(b, max(1.0, float(b.abs().max())))
    assert_within_rounding(a, b, scale, K_ROUND, torch.float64, name=what)


def test_fsdp2_fused_training_equals_unfused(tmp_path):
    results = run_gloo_workers(_worker, tmp_path, WORLD, DEADLINE_S, "FSDP2")
    twin = results[0]["twin"]
    assert len(twin) == len(results[0]["record"][0]["unfused"][1])  # every parameter paired
    for r, res in enumerate(results):
        losses = []
        for step, out in enumerate(res["record"]):
            (lf, gf), (lu, gu) = out["fused"], out["unfused"]
            _close(lf, lu, f"rank {r} step {step}: loss")
            losses.append(float(lu))
            for n, g in gf.items():
                ref = gu[twin[n]].reshape(g.shape)
                _close(g, ref, f"rank {r} step {step}: gradient of {n}")
                # gathered gradients are the all-reduced ones: equal on both ranks
                _close(g, results[0]["record"][step]["fused"][1][n], f"rank {r} vs 0: {n}")
        assert len(set(losses)) == STEPS  # training moved
    # the ranks saw different data, so equal gradients show the reduction happened
    assert float(results[0]["record"][0]["fused"][0]) != float(results[1]["record"][0]["fused"][0])
