"""The Triton backend's operators ``igc_triton::chain_forward`` / ``igc_triton::chain_backward``.

Same arguments and results as the C++ schemas ``igc::chain_forward`` / ``igc::chain_backward``
(see ``_ops.py``), but registered from Python so that they need neither the compiled extension
nor a GPU at import time::

    igc_triton::chain_forward(Tensor x, Tensor[] weights, Tensor[] biases, int[] groups,
                              int[] shuffles, Tensor?[] perms, Tensor? input_index=None) -> Tensor
    igc_triton::chain_backward(Tensor grad_y, Tensor x, Tensor[] weights, Tensor[] biases,
                               int[] groups, int[] shuffles, Tensor?[] perms, bool[] output_mask,
                               Tensor? input_index=None) -> (Tensor, Tensor, Tensor)

On GPUs they are ``torch.library.triton_op`` s whose bodies launch the kernels through
``torch.library.wrap_triton``: ``torch.compile`` sees the Triton kernels themselves (no graph
break, Inductor schedules them). Under ``TRITON_INTERPRET=1`` Triton's interpreter cannot run on
the fake tensors that tracing uses, so there the same bodies are registered as opaque
``torch.library.custom_op`` s with explicit fake kernels (``torch.compile`` then calls the op as
a unit; still no graph break). Autograd is registered once for both.

Importing this module requires Triton (``igc_kernels.triton_kernels.chain`` decorates the
kernels); ``backends.py`` imports it lazily.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton

from ._chain import empty_like_layout
from ._ops import has_bias
from .triton_kernels import chain as K

INTERPRETED = K.INTERPRETED


# ---------------------------------------------------------------------------------------------
# Host-side preparation shared by forward and backward
# ---------------------------------------------------------------------------------------------
def _inverse(p: torch.Tensor) -> torch.Tensor:
    """The inverse permutation (``inv[p[j]] = j``) as int32; argsort of a permutation is its
    inverse (a sort: deterministic, no scatter)."""
    return torch.argsort(p, stable=True).to(torch.int32)


def _prepare(x, weights, biases, groups, shuffles, perms, input_index):
    """(structure, per-layer pointer tensors in the generated kernels' argument order)."""
    L = len(weights)
    channels = [int(weights[0].shape[1]) * int(groups[0])] + [int(w.shape[0]) for w in weights]
    bias_present = [has_bias(b) for b in biases] if len(biases) else [False] * L
    perm_present = [int(s) == 0 and p is not None for s, p in zip(shuffles, perms)]
    st = K.make_structure(int(x.shape[1]), channels, groups, shuffles, perm_present,
                          bias_present, input_index is not None, x.dtype)
    ptrs = []
    for l in range(L):
        ptrs.append(weights[l].contiguous())
        if bias_present[l]:
            ptrs.append(biases[l].contiguous())
    for l in range(L):
        if perm_present[l]:
            ptrs += [perms[l].to(torch.int32), _inverse(perms[l])]
    return st, ptrs


def _index_order(input_index: torch.Tensor, c_x: int):
    """(idx, order, start, count) int32: ``order`` lists j sorted by ``idx[j]`` (stable, so
    increasing j within a channel); channel c's entries are ``order[start[c]:start[c]+count[c]]``."""
    idx = input_index.to(torch.int32)
    order = torch.argsort(input_index, stable=True)
    srt = input_index.index_select(0, order)
    chans = torch.arange(c_x, device=input_index.device, dtype=input_index.dtype)
    start = torch.searchsorted(srt, chans)
    count = torch.searchsorted(srt, chans, right=True) - start
    return idx, order.to(torch.int32), start.to(torch.int32), count.to(torch.int32)


def _layout_key(x_strides) -> int:
    """The layout class that the autotuner keys on: channel stride 1 (channels-last like) or
    positions innermost with stride 1 (NCHW like), or neither."""
    return int(x_strides[1] == 1) + 2 * int(x_strides[0] == 1)


_NUM_PROGRAMS: dict = {}


def backward_programs(device: torch.device) -> int:
    """Programs of the persistent backward grid: one per SM on GPUs (the partial buffer has one
    row per program); 3 under the interpreter (an odd count, so tiles split unevenly)."""
    if INTERPRETED or device.type != "cuda":
        return 3
    key = device.index if device.index is not None else torch.cuda.current_device()
    n = _NUM_PROGRAMS.get(key)
    if n is None:
        n = torch.cuda.get_device_properties(key).multi_processor_count
        _NUM_PROGRAMS[key] = n
    return n


def _launch(kernel, grid, args, meta):
    if INTERPRETED:
        kernel[grid](*args, **meta)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


# ---------------------------------------------------------------------------------------------
# Operator bodies
# ---------------------------------------------------------------------------------------------
def chain_forward(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                  groups: List[int], shuffles: List[int], perms: List[Optional[torch.Tensor]],
                  input_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    y = empty_like_layout(x, weights[-1].shape[0])
    if y.numel() == 0:
        return y
    st, ptrs = _prepare(x, weights, biases, groups, shuffles, perms, input_index)
    kern = K.kernels_for(st)
    sizes, (xs, ys) = K.position_dims(x.shape, [x.stride(), y.stride()])
    O0, O1, O2, NI = sizes
    idx = input_index.to(torch.int32) if input_index is not None else None
    fn, meta = K.launch_choice(kern, backward=False)

    def grid(META):
        return (O0 * O1 * O2 * triton.cdiv(NI, META["BLOCK_P"]),)

    args = [x, y, idx, *ptrs, NI, O1, O2, xs[0], xs[1], xs[2], xs[3], x.stride(1),
            ys[0], ys[1], ys[2], ys[3], y.stride(1), _layout_key((xs[3], x.stride(1)))]
    _launch(fn, grid, args, {"PREC": K.dot_precision(), **meta})
    return y


def chain_backward(grad_y: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor],
                   biases: List[torch.Tensor], groups: List[int], shuffles: List[int],
                   perms: List[Optional[torch.Tensor]], output_mask: List[bool],
                   input_index: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    need_dx, need_dw, need_db = (bool(m) for m in output_mask)
    st, ptrs = _prepare(x, weights, biases, groups, shuffles, perms, input_index)
    need_db = need_db and st.b_total > 0
    dtype = weights[0].dtype
    dx = empty_like_layout(x, x.shape[1]) if need_dx else x.new_empty((0,))
    gw = x.new_empty((st.w_total if need_dw else 0,), dtype=dtype)
    gb = x.new_empty((st.b_total if need_db else 0,), dtype=dtype)
    if not (need_dx or need_dw or need_db):
        return dx, gw, gb
    if x.numel() == 0:
        gw.zero_()
        gb.zero_()
        return dx, gw, gb
    kern = K.kernels_for(st)
    dxs = dx.stride() if need_dx else x.stride()
    sizes, (gs, xs, ds) = K.position_dims(x.shape, [grad_y.stride(), x.stride(), dxs])
    O0, O1, O2, NI = sizes
    nprog = backward_programs(x.device)
    row = st.w_total + st.b_total
    part = torch.zeros((nprog, row) if (need_dw or need_db) else (1, 1), device=x.device,
                       dtype=torch.float32)
    if input_index is not None:
        idx, order, start, count = _index_order(input_index, int(x.shape[1]))
    else:
        idx = order = start = count = None
    fn, meta = K.launch_choice(kern, backward=True)
    args = [grad_y, x, dx, idx, order, start, count, *ptrs, part, row, NI, O0, O1, O2,
            gs[0], gs[1], gs[2], gs[3], grad_y.stride(1), xs[0], xs[1], xs[2], xs[3],
            x.stride(1), ds[0], ds[1], ds[2], ds[3], dx.stride(1) if need_dx else 0,
            _layout_key((xs[3], x.stride(1)))]
    _launch(fn, (nprog,), args, {"PREC": K.dot_precision(), "NEED_DX": int(need_dx),
                                 "NEED_DW": int(need_dw), "NEED_DB": int(need_db), **meta})
    if need_dw or need_db:
        gw_out = gw if need_dw else x.new_empty((st.w_total,), dtype=dtype)
        gb_out = gb if need_db else x.new_empty((st.b_total,), dtype=dtype)
        block = 256
        _launch(K._reduce_partials, (triton.cdiv(row, block),),
                [part, gw_out, gb_out, nprog, st.w_total, st.b_total, row], {"BLOCK": block})
    return dx, gw, gb


# ---------------------------------------------------------------------------------------------
# Fake kernels (used where the bodies cannot run on fake tensors: under the interpreter)
# ---------------------------------------------------------------------------------------------
def _fake_forward(x, weights, biases, groups, shuffles, perms, input_index=None):
    return empty_like_layout(x, weights[-1].shape[0])


def _fake_backward(grad_y, x, weights, biases, groups, shuffles, perms, output_mask,
                   input_index=None):
    dtype = weights[0].dtype
    nw = sum(int(w.shape[0]) * int(w.shape[1]) for w in weights)
    nb = sum(int(b.shape[0]) for b in biases if has_bias(b))
    gx = empty_like_layout(x, x.shape[1]) if output_mask[0] else x.new_empty((0,))
    gw = x.new_empty((nw if output_mask[1] else 0,), dtype=dtype)
    gb = x.new_empty((nb if output_mask[2] and nb else 0,), dtype=dtype)
    return gx, gw, gb


# ---------------------------------------------------------------------------------------------
# Registration and autograd
# ---------------------------------------------------------------------------------------------
if INTERPRETED:
    forward_op = torch.library.custom_op("igc_triton::chain_forward", mutates_args=())(
        chain_forward)
    backward_op = torch.library.custom_op("igc_triton::chain_backward", mutates_args=())(
        chain_backward)
    forward_op.register_fake(_fake_forward)
    backward_op.register_fake(_fake_backward)
else:
    forward_op = torch.library.triton_op("igc_triton::chain_forward", mutates_args=())(
        chain_forward)
    backward_op = torch.library.triton_op("igc_triton::chain_backward", mutates_args=())(
        chain_backward)


def _setup_context(ctx, inputs, output):
    x, weights, biases, groups, shuffles, perms = inputs[:6]
    input_index = inputs[6] if len(inputs) > 6 else None
    ctx.has_index = input_index is not None
    ctx.num_layers = len(weights)
    ctx.num_biases = len(biases)
    ctx.perm_mask = [p is not None for p in perms]
    ctx.groups = list(groups)
    ctx.shuffles = list(shuffles)
    ctx.save_for_backward(x, *weights, *biases, *[p for p in perms if p is not None],
                          *([input_index] if input_index is not None else []))


def _backward(ctx, grad_y):
    saved = list(ctx.saved_tensors)
    L, nb = ctx.num_layers, ctx.num_biases
    x, weights, biases = saved[0], saved[1:1 + L], saved[1 + L:1 + L + nb]
    it = iter(saved[1 + L + nb:])
    perms = [next(it) if has else None for has in ctx.perm_mask]
    input_index = next(it) if ctx.has_index else None
    bias_mask = [has_bias(b) for b in biases]
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_w_any = any(need_w) if isinstance(need_w, (list, tuple)) else bool(need_w)
    need_b_any = any(need_b) if isinstance(need_b, (list, tuple)) else bool(need_b)
    mask = [bool(need_x), need_w_any, need_b_any and any(bias_mask)]
    gx, gw, gb = backward_op(grad_y, x, list(weights), list(biases), ctx.groups, ctx.shuffles,
                             perms, mask, input_index)
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
    # As in _ops.py: a Tensor?[] holding a None is one opaque argument (answered by one None).
    grad_perms = [None] * L if all(ctx.perm_mask) else None
    out = ((gx if mask[0] else None), grad_ws, grad_bs, None, None, grad_perms)
    # As in _ops.py: the dispatcher drops a trailing input_index=None before torch.library's
    # autograd records the inputs' structure; answer only what it recorded.
    return out + (None,) if ctx.has_index else out


forward_op.register_autograd(_backward, setup_context=_setup_context)


def run(x, chain) -> torch.Tensor:
    """Run a normalised :class:`~igc_kernels._chain.Chain` through ``igc_triton::chain_forward``."""
    from ._ops import op_biases

    return forward_op(x, chain.weights, op_biases(chain.biases, x), list(chain.groups),
                      list(chain.shuffles), chain.perms, chain.input_index)
