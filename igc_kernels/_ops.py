"""Python side of the ``igc`` operator library: fake kernels and autograd.

The schemas are defined once in C++ (``csrc/ops.cpp``)::

    igc::chain_forward(Tensor x, Tensor[] weights, Tensor[] biases, int[] groups,
                       int[] shuffles, Tensor?[] perms, Tensor? input_index=None) -> Tensor
    igc::chain_backward(Tensor grad_y, Tensor x, Tensor[] weights, Tensor[] biases,
                        int[] groups, int[] shuffles, Tensor?[] perms, bool[3] output_mask,
                        Tensor? input_index=None)
                        -> (Tensor grad_x, Tensor grad_weights, Tensor grad_biases)

``input_index`` gathers ``x``'s channels before layer 1; ``grad_x`` always has ``x``'s shape.

``grad_weights`` is the concatenation of every flattened ``dW_l`` in layer order, ``grad_biases``
that of every ``db_l`` of the layers that have a bias (fixed arity whatever the depth). An output
whose ``output_mask`` entry is false is returned with shape ``(0,)``. ``biases`` is empty (no
layer has a bias) or holds one tensor per layer, ``(0,)``-shaped for "no bias" (see
:func:`op_biases`): a ``Tensor?[]`` with ``None`` entries would be a single opaque argument to
``torch.library``'s autograd, and no gradient could reach the biases inside it. Each device registers its
kernels in C++; this module registers what is device independent: the fake (meta) kernels, with
the same sizes, strides and dtypes as the real ones; the autograd formulas (the forward op's
saves only ``x`` plus the weights, biases and permutations and calls the fused backward; the
backward op's is the double backward, see ``_autograd.py``); and the vmap rules. The public
function calls the ops through ``autograd.Function`` wrappers (:data:`FAMILY`), which add
forward-mode derivatives and work under ``torch.func``'s transforms.
"""

from __future__ import annotations

import torch

from ._chain import empty_like_layout, strided_spatial
from . import _autograd as A
from ._chain import has_bias


def _num_weight_elems(weights) -> int:
    return sum(int(w.shape[0]) * int(w.shape[1]) for w in weights)


def op_biases(biases: list, x: torch.Tensor) -> list:
    """The ops' ``biases`` argument for per-layer entries that are tensors or ``None``: empty
    when no layer has a bias, except in a traced graph (torch.compile, torch.export), which
    gets one (0,) entry per layer: AOTInductor's packages pass an empty ``Tensor[]`` to the op
    as None, which the schema refuses."""
    if all(b is None for b in biases) and not _tracing():
        return []
    return [x.new_empty((0,)) if b is None else b for b in biases]


def _tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and (
        compiler.is_compiling() or getattr(compiler, "is_exporting", lambda: False)()))


def _num_bias_elems(biases) -> int:
    return sum(int(b.shape[0]) for b in biases if has_bias(b))


def _fake_forward(x, weights, biases, groups, shuffles, perms, input_index=None):
    return empty_like_layout(x, weights[-1].shape[0])


def _fake_backward(grad_y, x, weights, biases, groups, shuffles, perms, output_mask,
                   input_index=None):
    gx = empty_like_layout(x, x.shape[1]) if output_mask[0] else x.new_empty((0,))
    dtype = weights[0].dtype
    gw = x.new_empty((_num_weight_elems(weights) if output_mask[1] else 0,), dtype=dtype)
    gb = x.new_empty((_num_bias_elems(biases) if output_mask[2] else 0,), dtype=dtype)
    return gx, gw, gb


def _fake_block_forward(x, weights, biases, groups, shuffles, perms, strides, activations,
                        residual, input_index=None):
    return empty_like_layout(x, weights[-1].shape[0],
                             spatial=strided_spatial(x.shape[2:], strides))


def _block_no_grad(ctx, grad):
    raise RuntimeError("igc::block_forward is inference only: it has no backward (spatial layers "
                       "have no gradients in this version; activations and residual adds with "
                       "gradients run through igc_kernels.interleaved_group_conv)")


def block_forward(x, chain):
    """One fused pass of a chain with spatial layers, activations or a residual add (no
    gradients): ``igc::block_forward``."""
    return torch.ops.igc.block_forward(
        x, chain.weights, op_biases(chain.biases, x), list(chain.groups), list(chain.shuffles),
        chain.perms, list(chain.strides), list(chain.activations), bool(chain.residual),
        chain.input_index)


def register_ops(forward_op, backward_op, fits, name: str):
    """Register the autograd formulas (first and second order) and the vmap rules of one
    ``chain_forward``/``chain_backward`` pair; return its differentiable family (the
    ``autograd.Function`` wrappers that also serve ``torch.func``'s transforms)."""
    raw = A.raw_family(name, forward_op, backward_op, fits)
    torch.library.register_autograd(forward_op, A.make_forward_backward(raw),
                                    setup_context=A.setup_forward_context)
    torch.library.register_autograd(backward_op, A.make_backward_backward(raw),
                                    setup_context=A.setup_backward_context)
    torch.library.register_vmap(forward_op, A.forward_vmap(forward_op))
    torch.library.register_vmap(backward_op, A.backward_vmap(backward_op))
    return A.make_family(name, forward_op, backward_op, fits)


def _cxx_fits(x, chain) -> bool:
    """Whether the C++ ops run ``chain`` on ``x``'s device (CUDA: shared memory and layers)."""
    if x.device.type != "cuda":
        return True
    from .backends import BACKENDS

    return not BACKENDS["cuda"].reasons(x, chain)


FAMILY = None  # the C++ ops' differentiable family, once registered


def register() -> None:
    """Register the fake kernels, autograd formulas and vmap rules of the C++ ops (the C++
    library must be loaded)."""
    global FAMILY
    torch.library.register_fake("igc::chain_forward")(_fake_forward)
    torch.library.register_fake("igc::chain_backward")(_fake_backward)
    torch.library.register_fake("igc::block_forward")(_fake_block_forward)
    torch.library.register_autograd("igc::block_forward", _block_no_grad)
    FAMILY = register_ops(torch.ops.igc.chain_forward.default,
                          torch.ops.igc.chain_backward.default, _cxx_fits, "igc")
