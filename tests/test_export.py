"""Deployment without Python model code: converted networks (IGCV2, IGCV3, ShuffleNet-style)
through ``torch.export`` (saved, loaded, run with a dynamic batch) and through AOTInductor
(``aoti_compile_and_package`` + ``aoti_load_package``), outputs equal to eager: on the CPU
here; on a GPU the same tests cover the CUDA and the Triton backends (skipped without one).
The C++ op registration is what makes the AOTInductor package run: the package calls
``igc::chain_forward`` through the dispatcher (a process that imports igc_kernels has it)."""

from __future__ import annotations

import pytest
import torch

import igc_kernels as igc
from igc_test_utils import shufflenet_style_net


CUDA = torch.cuda.is_available()
# (device, backend of the fused modules): the CPU kernels here; on a GPU also the CUDA kernels
# and the Triton kernels (registered with torch.library.triton_op there)
TARGETS = [("cpu", "auto"),
           pytest.param("cuda", "cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU")),
           pytest.param("cuda", "triton", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))]


def _net(device="cpu", backend="auto", model="igcv2"):
    torch.manual_seed(0)
    if model == "igcv2":
        plain = igc.models.IGCV2CifarNet(width=32, depth=5, group_size=4, fused=False)
        x = torch.randn(4, 3, 16, 16)
    elif model == "shufflenet":
        plain = shufflenet_style_net()
        x = torch.randn(4, 3, 8, 8)
    else:
        plain = igc.models.IGCV3Net(num_classes=10, width_mult=0.25, fused=False)
        x = torch.randn(2, 3, 32, 32)
    net = igc.convert(plain, backend=backend).to(device)
    x = x.to(device)
    net.train()
    with torch.no_grad():
        net(x)  # BatchNorm statistics of a trained-like scale
    return net.eval(), x


def _exported(net, x):
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(net, (x,), dynamic_shapes=({0: batch},))


@pytest.mark.parametrize("model", ["igcv2", "igcv3", "shufflenet"])
@pytest.mark.parametrize("device,backend", TARGETS)
def test_export_save_load_dynamic_batch(tmp_path, device, backend, model):
    net, x = _net(device, backend, model)
    ep = _exported(net, x)
    fused_ops = {torch.ops.igc.chain_forward.default}
    if backend == "triton":
        fused_ops.add(torch.ops.igc_triton.chain_forward.default)
    assert fused_ops & {n.target for n in ep.graph.nodes if n.op == "call_function"}
    torch.export.save(ep, tmp_path / "net.pt2")
    loaded = torch.export.load(tmp_path / "net.pt2").module()
    with torch.no_grad():
        for batch in (x.shape[0], 1, 5):
            xb = torch.randn(batch, *x.shape[1:], device=device)
            torch.testing.assert_close(loaded(xb), net(xb), rtol=0, atol=0)


def test_traced_graphs_pass_one_bias_entry_per_layer():
    """A chain without biases passes [] in eager calls (no allocations) and one (0,) entry per
    layer in traced graphs: AOTInductor hands an empty Tensor[] to the op as None."""
    chain = igc.InterleavedGroupConv(igc.ChainSpec.igcv2(16, 4), bias=False).eval()
    ep = torch.export.export(chain, (torch.randn(2, 16, 3, 3),))
    (node,) = [n for n in ep.graph.nodes if n.target == torch.ops.igc.chain_forward.default]
    assert len(node.args[2]) == len(chain.spec.groups)


@pytest.mark.slow  # an AOTInductor compile: ~15 s
@pytest.mark.parametrize("device,backend", TARGETS)
def test_aoti_package_runs(tmp_path, device, backend):
    net, x = _net(device, backend)
    path = torch._inductor.aoti_compile_and_package(_exported(net, x),
                                                    package_path=str(tmp_path / "net.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        for batch in (4, 2):
            xb = torch.randn(batch, 3, 16, 16, device=device)
            ref = net(xb)
            torch.testing.assert_close(runner(xb), ref, rtol=1e-5,
                                       atol=1e-5 * max(1.0, float(ref.abs().max())))
