"""ONNX export of the fused operator as standard ONNX operators.

``torch.onnx.export(model, args, dynamo=True,
custom_translation_table=igc_kernels.onnx_translation_table())`` writes every
``igc::chain_forward`` call (and the Triton backend's ``igc_triton::chain_forward``) as the
unfused chain it computes: per layer one grouped ``Conv`` with 1-wide kernels over the
positions flattened to one axis, the permutations and the input index as ``Gather`` on the
channel axis, the biases as ``Conv`` biases. Any opset from 18. The batch and spatial sizes stay
symbolic (dynamic shapes export as dynamic). 16-bit inputs are computed in float32 and cast
back, as the CPU kernels accumulate (intermediates are not rounded to 16 bits; the GPU's 16-bit
tensor-core paths round them where the unfused chain does, docs/design.md).

Needs ``onnxscript`` (it comes with ``torch.onnx``'s dynamo exporter) and, to run the model,
``onnxruntime``.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["onnx_translation_table"]


def _static_shape(v) -> Optional[tuple]:
    shape = getattr(v, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _has_bias(b) -> bool:
    """The ops' bias convention: a (0,)-shaped entry stands for "no bias"."""
    shape = _static_shape(b)
    if shape is None:
        raise ValueError("igc ONNX export: a bias entry has no static shape; cannot tell a bias "
                         "from the (0,) 'no bias' sentinel")
    return shape != (0,)


def _shuffle_gather(channels: int, groups: int) -> list:
    """Gather index of a channel shuffle with ``groups`` groups: out[k * g + q] = in[q * m + k]."""
    m = channels // groups
    return [q * m + k for k in range(m) for q in range(groups)]


def onnx_translation_table() -> dict:
    """``{op overload: ONNX translation}`` for ``torch.onnx.export(..., dynamo=True,
    custom_translation_table=...)``: the fused chain written as standard ONNX operators (see the
    module docstring). Raises ImportError naming what to install when onnxscript is missing."""
    try:
        from onnxscript import opset18 as op
        from onnxscript import ir
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("igc_kernels.onnx_translation_table needs onnxscript "
                          "(pip install onnxscript onnx; onnxruntime to run the model)") from e

    float_types = {ir.DataType.FLOAT, ir.DataType.DOUBLE}

    def chain_forward(x, weights, biases, groups, shuffles, perms, input_index=None):
        L = len(weights)
        if not (len(groups) == len(shuffles) == len(perms) == L):
            raise ValueError("igc ONNX export: weights, groups, shuffles and perms must have "
                             f"one entry per layer; got {L}, {len(groups)}, {len(shuffles)}, "
                             f"{len(perms)}")
        if len(biases) not in (0, L):
            raise ValueError(f"igc ONNX export: biases must be empty or have {L} entries, got "
                             f"{len(biases)}")
        dtype = x.dtype
        compute = dtype if dtype in float_types else ir.DataType.FLOAT

        def cast(v):
            return v if dtype == compute else op.Cast(v, to=compute)

        shape = op.Shape(x)
        # (N, C, *spatial) -> (N, C, P): one position axis, any rank from 2 on
        h = op.Reshape(cast(x), op.Concat(op.Shape(x, start=0, end=2),
                                          op.Constant(value_ints=[-1]), axis=0))
        if input_index is not None:
            h = op.Gather(h, input_index, axis=1)
        c_out = None
        for l in range(L):
            w = weights[l]
            w_shape = _static_shape(w)
            if w_shape is None or len(w_shape) != 2:
                raise ValueError(f"igc ONNX export: layer {l + 1}: the weight needs a static "
                                 f"2-D shape (C_out, C_in / groups), got {w.shape}")
            c_out = w_shape[0]
            inputs = [h, op.Unsqueeze(cast(w), op.Constant(value_ints=[2]))]
            if biases and _has_bias(biases[l]):
                inputs.append(cast(biases[l]))
            h = op.Conv(*inputs, group=int(groups[l]), kernel_shape=[1])
            if int(shuffles[l]) > 0:
                idx = op.Constant(value_ints=_shuffle_gather(c_out, int(shuffles[l])))
                h = op.Gather(h, idx, axis=1)
            elif perms[l] is not None:
                h = op.Gather(h, perms[l], axis=1)
        out_shape = op.Concat(op.Shape(x, start=0, end=1), op.Constant(value_ints=[c_out]),
                              op.Slice(shape, op.Constant(value_ints=[2]),
                                       op.Constant(value_ints=[2 ** 62])), axis=0)
        y = op.Reshape(h, out_shape)
        return y if dtype == compute else op.Cast(y, to=dtype)

    table = {torch.ops.igc.chain_forward.default: chain_forward}
    triton_ns = getattr(torch.ops, "igc_triton", None)
    if triton_ns is not None and hasattr(triton_ns, "chain_forward"):
        table[triton_ns.chain_forward.default] = chain_forward
    return table
