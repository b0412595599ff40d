"""Deployment without Python model code: a converted network through ``torch.export`` (saved,
loaded, run with a dynamic batch) and through AOTInductor (``aoti_compile_and_package`` +
``aoti_load_package``, CPU), outputs equal to eager. The C++ op registration is what makes the
AOTInductor package run: the package calls ``igc::chain_forward`` through the dispatcher (a
process that imports igc_kernels has it)."""

from __future__ import annotations

import pytest
import torch

import igc_kernels as igc


def _net():
    torch.manual_seed(0)
    net = igc.convert(igc.models.IGCV2CifarNet(width=32, depth=5, group_size=4, fused=False))
    x = torch.randn(4, 3, 16, 16)
    net.train()
    with torch.no_grad():
        net(x)  # BatchNorm statistics of a trained-like scale
    return net.eval(), x


def _exported(net, x):
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(net, (x,), dynamic_shapes=({0: batch},))


def test_export_save_load_dynamic_batch(tmp_path):
    net, x = _net()
    ep = _exported(net, x)
    assert any(n.target == torch.ops.igc.chain_forward.default for n in ep.graph.nodes)
    torch.export.save(ep, tmp_path / "net.pt2")
    loaded = torch.export.load(tmp_path / "net.pt2").module()
    with torch.no_grad():
        for batch in (4, 1, 9):
            xb = torch.randn(batch, 3, 16, 16)
            torch.testing.assert_close(loaded(xb), net(xb), rtol=0, atol=0)


def test_traced_graphs_pass_one_bias_entry_per_layer():
    """A chain without biases passes [] in eager calls (no allocations) and one (0,) entry per
    layer in traced graphs: AOTInductor hands an empty Tensor[] to the op as None."""
    chain = igc.InterleavedGroupConv(igc.ChainSpec.igcv2(16, 4), bias=False).eval()
    ep = torch.export.export(chain, (torch.randn(2, 16, 3, 3),))
    (node,) = [n for n in ep.graph.nodes if n.target == torch.ops.igc.chain_forward.default]
    assert len(node.args[2]) == len(chain.spec.groups)


@pytest.mark.slow  # an AOTInductor compile: ~15 s
def test_aoti_package_runs_on_the_cpu(tmp_path):
    net, x = _net()
    path = torch._inductor.aoti_compile_and_package(_exported(net, x),
                                                    package_path=str(tmp_path / "net.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for batch in (4, 2):
            xb = torch.randn(batch, 3, 16, 16)
            ref = net(xb)
            torch.testing.assert_close(runner(xb), ref, rtol=1e-5,
                                       atol=1e-5 * max(1.0, float(ref.abs().max())))
