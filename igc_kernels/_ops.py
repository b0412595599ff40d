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
the same sizes, strides and dtypes as the real ones, and the autograd formula, which saves only
``x`` (plus the weights, biases and permutations) and calls the fused backward.
"""

from __future__ import annotations

import torch

from ._chain import empty_like_layout


def _num_weight_elems(weights) -> int:
    return sum(int(w.shape[0]) * int(w.shape[1]) for w in weights)


def has_bias(b: torch.Tensor) -> bool:
    """Whether an entry of the ops' ``biases`` list is a bias (``(0,)`` stands for none)."""
    return not (b.dim() == 1 and b.shape[0] == 0)


def op_biases(biases: list, x: torch.Tensor) -> list:
    """The ops' ``biases`` argument for per-layer entries that are tensors or ``None``."""
    if all(b is None for b in biases):
        return []
    return [x.new_empty((0,)) if b is None else b for b in biases]


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


def setup_context(ctx, inputs, output):
    x, weights, biases, groups, shuffles, perms = inputs[:6]
    input_index = inputs[6] if len(inputs) > 6 else None
    L = len(weights)
    ctx.has_index = input_index is not None
    ctx.num_layers = L
    ctx.num_biases = len(biases)
    ctx.perm_mask = [p is not None for p in perms]
    ctx.groups = list(groups)
    ctx.shuffles = list(shuffles)
    ctx.save_for_backward(x, *weights, *biases, *[p for p in perms if p is not None],
                          *([input_index] if input_index is not None else []))


def make_backward(backward_op):
    """The autograd formula of a ``chain_forward`` op whose fused backward is ``backward_op``
    (same arguments and results as ``igc::chain_backward``); used with :func:`setup_context`
    by every registration of the operator (the C++ ops here, the Triton ops elsewhere)."""

    def backward(ctx, grad_y):
        saved = list(ctx.saved_tensors)
        L = ctx.num_layers
        nb = ctx.num_biases
        x, weights, biases = saved[0], saved[1:1 + L], saved[1 + L:1 + L + nb]
        it = iter(saved[1 + L + nb:])
        perms = [next(it) if has else None for has in ctx.perm_mask]
        input_index = next(it) if ctx.has_index else None
        bias_mask = [has_bias(b) for b in biases]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w_any = any(need_w) if isinstance(need_w, (list, tuple)) else bool(need_w)
        need_b_any = any(need_b) if isinstance(need_b, (list, tuple)) else bool(need_b)
        mask = [bool(need_x), need_w_any, need_b_any and any(bias_mask)]
        gx, gw, gb = backward_op(grad_y, x, list(weights), list(biases), ctx.groups,
                                 ctx.shuffles, perms, mask, input_index)
        grad_ws = [None] * L
        if mask[1]:
            off = 0
            for l, w in enumerate(weights):
                n = int(w.shape[0]) * int(w.shape[1])
                grad_ws[l] = gw[off:off + n].view(w.shape)
                off += n
        grad_bs = [None] * nb
        if mask[2]:
            off = 0
            for l, b in enumerate(biases):
                if bias_mask[l]:
                    n = int(b.shape[0])
                    grad_bs[l] = gb[off:off + n]
                    off += n
        # register_autograd checks the returned structure against the inputs': a Tensor?[]
        # holding a None (perms) is one opaque argument, answered by a single None; a list of
        # tensors by a list.
        grad_perms = [None] * L if all(ctx.perm_mask) else None
        out = ((gx if mask[0] else None), grad_ws, grad_bs, None, None, grad_perms)
        # The dispatcher drops trailing arguments equal to their default (input_index=None)
        # before torch.library's autograd records the inputs' structure: answer only what it
        # recorded.
        return out + (None,) if ctx.has_index else out

    return backward


def register() -> None:
    """Register the fake kernels and the autograd formula (the C++ library must be loaded)."""
    torch.library.register_fake("igc::chain_forward")(_fake_forward)
    torch.library.register_fake("igc::chain_backward")(_fake_backward)
    torch.library.register_autograd(
        "igc::chain_forward",
        make_backward(lambda *args: torch.ops.igc.chain_backward(*args)),
        setup_context=setup_context,
    )
