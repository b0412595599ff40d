"""ONNX export (igc_kernels.onnx_translation_table): converted networks exported with
``torch.onnx.export(dynamo=True, custom_translation_table=...)`` run in onnxruntime (CPU) with
outputs equal to PyTorch's within float32 tolerance, with a dynamic batch; every chain feature
(biases, shuffles, explicit permutations, input_index, token inputs, 16-bit storage) has a
case; the exported graph holds standard operators only.

onnx, onnxscript and onnxruntime are test dependencies (`make deps` installs them, pinned); the
tests are skipped only when they could not be installed, with that reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import igc_kernels as igc
from igc_kernels.models import blocks
from igc_test_utils import shufflenet_style_net

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (make deps)")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (make deps)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (make deps)")


def _export(model, x, path, dynamic_batch=True, opset=18):
    dyn = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic_batch else None
    prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dyn,
                             custom_translation_table=igc.onnx_translation_table(),
                             opset_version=opset)
    prog.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    domains = {n.domain for n in proto.graph.node} | {
        n.domain for f in proto.functions for n in f.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard operators: {domains}"
    return proto, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(sess, x):
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _tol(ref):
    return dict(rtol=1e-4, atol=1e-4 * max(1.0, float(ref.abs().max())))


def _check_batches(model, sess, sample_shape, batches):
    """onnxruntime's output equals PyTorch's for fresh inputs of each batch size."""
    with torch.no_grad():
        for batch in batches:
            xb = torch.randn(batch, *sample_shape)
            ref = model(xb)
            torch.testing.assert_close(_run(sess, xb), ref, **_tol(ref))


def _calibrate(model, x):
    """BatchNorm statistics of trained-like scale (not the initial 0/1), then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


def test_converted_igcv2_network_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(0)
    net = igc.models.IGCV2CifarNet(width=32, depth=5, group_size=4, fused=False)
    x = torch.randn(4, 3, 16, 16)
    fused = _calibrate(igc.convert(net), x)
    assert any(isinstance(m, igc.InterleavedGroupConv) for m in fused.modules())
    proto, sess = _export(fused, x, tmp_path / "igcv2.onnx")
    assert not any(n.op_type.startswith("chain") for n in proto.graph.node)
    _check_batches(fused, sess, (3, 16, 16), (4, 1, 7))


def test_converted_shufflenet_style_network_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(3, 3, 8, 8)
    fused = _calibrate(igc.convert(shufflenet_style_net()), x)
    assert sum(isinstance(m, igc.InterleavedGroupConv) for m in fused.modules()) == 2
    _, sess = _export(fused, x, tmp_path / "shufflenet.onnx")
    _check_batches(fused, sess, (3, 8, 8), (3, 1))


@pytest.mark.slow  # 18 s: 17 blocks of chains exported and compared
def test_converted_igcv3_network_runs_in_onnxruntime(tmp_path):
    torch.manual_seed(1)
    net = igc.models.IGCV3Net(num_classes=10, width_mult=0.25, fused=False)
    x = torch.randn(2, 3, 32, 32)
    fused = _calibrate(igc.convert(net), x)
    _, sess = _export(fused, x, tmp_path / "igcv3.onnx")
    _check_batches(fused, sess, (3, 32, 32), (2, 3))


@pytest.mark.parametrize("opset", [18, 21])
def test_every_chain_feature(tmp_path, opset):
    """Biases on some layers, a shuffle, an explicit permutation after the last layer, an input
    index with repeats (CondenseNet), token inputs (N, C) and 3-D inputs (N, C, L)."""
    gen = torch.Generator().manual_seed(2)
    spec = igc.ChainSpec([12, 24, 12], [4, 3], ["interleave", torch.randperm(12, generator=gen)])
    chain = igc.InterleavedGroupConv(spec, bias=[True, False]).eval()
    for shape in [(5, 12), (3, 12, 7), (2, 12, 3, 4)]:
        x = torch.randn(*shape, generator=gen)
        _, sess = _export(chain, x, tmp_path / f"chain{len(shape)}.onnx", opset=opset)
        with torch.no_grad():
            ref = chain(x)
        torch.testing.assert_close(_run(sess, x), ref, **_tol(ref))
    layer = blocks.CondenseLayer(16, 32, 4, blocks.condense_index(16, 4, 6, generator=gen)).eval()
    x = torch.randn(2, 16, 5, 5, generator=gen)
    _, sess = _export(layer, x, tmp_path / "condense.onnx", opset=opset)
    with torch.no_grad():
        ref = layer(x)
    torch.testing.assert_close(_run(sess, x), ref, **_tol(ref))


def test_float16_is_computed_in_float32(tmp_path):
    """A float16 model exports with float32 arithmetic inside (the fused operator never rounds
    intermediates to 16 bits) and float16 input and output."""
    spec = igc.ChainSpec.igcv2(32, 4)
    chain = igc.InterleavedGroupConv(spec, bias=True).eval()
    x = torch.randn(3, 32, 4, 4)
    ref64 = igc.InterleavedGroupConv(spec, bias=True).double().eval()
    ref64.load_state_dict(chain.state_dict())
    chain = chain.half()
    proto, sess = _export(chain, x.half(), tmp_path / "fp16.onnx", dynamic_batch=False)
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    with torch.no_grad():
        exact = ref64(x.double())
        fused_err = (chain(x.half()).double() - exact).abs().max()
    onnx_err = (_run(sess, x.half()).double() - exact).abs().max()
    assert onnx_err <= 2 * fused_err + 1e-3  # within the fused operator's own 16-bit error


def test_a_chain_without_static_weight_shapes_is_refused_with_a_reason():
    from igc_kernels.onnx import _has_bias

    class Dyn:
        shape = None

    with pytest.raises(ValueError, match="no static shape"):
        _has_bias(Dyn())
