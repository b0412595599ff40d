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

import os
import threading
from typing import List, Optional

import torch
import triton

from ._chain import Chain, empty_like_layout, validate_op_args
from ._ops import _fake_backward, _fake_forward, register_ops
from .triton_kernels import chain as K

INTERPRETED = K.INTERPRETED


# ---------------------------------------------------------------------------------------------
# Host-side preparation shared by forward and backward
# ---------------------------------------------------------------------------------------------
def _inverse(p: torch.Tensor) -> torch.Tensor:
    """The inverse permutation (``inv[p[j]] = j``) as int32; argsort of a permutation is its
    inverse (a sort: deterministic, no scatter)."""
    return torch.argsort(p, stable=True).to(torch.int32)


def channel_limit_reasons(chain) -> list:
    """The kernels' width limit (every channel count, x's included, at most ``MAX_CHANNELS``:
    a layer's tile of positions x channels lives in registers), as reasons; the backend's
    declaration, the direct calls and the higher derivatives all ask this."""
    widths = [("x", chain.in_channels)] if chain.input_index is not None else []
    widths += [(f"C_{l}", c) for l, c in enumerate(chain.channels)]
    return [f"{name} = {c} channels exceeds the Triton backend's limit of {K.MAX_CHANNELS} (a "
            f"layer's tile of positions x channels is held in registers)"
            for name, c in widths if c > K.MAX_CHANNELS]


def _dtypes() -> tuple:
    from .backends.triton import BACKEND

    return BACKEND.dtypes


def _checked_chain(x, weights, biases, groups, shuffles, perms, input_index, grad_y=None):
    """The :class:`Chain` of a direct call, its arguments checked like the public function's
    (``validate_op_args``: the same rules and messages, index values included: a host check
    under the interpreter, an asynchronous device-side assert on GPUs), then against these
    kernels' dtypes and width limit."""
    chain = validate_op_args(x, weights, biases, groups, shuffles, perms, input_index, grad_y)
    if x.dtype not in _dtypes():
        raise TypeError(f"x has dtype {x.dtype}; the Triton kernels support float32, float16 "
                        f"and bfloat16")
    reasons = channel_limit_reasons(chain)
    if reasons:
        raise ValueError("; ".join(reasons))
    return chain


def _structure(chain, dtype):
    """The kernels' ``Structure`` of a checked chain."""
    return K.make_structure(chain.in_channels, chain.channels, chain.groups, chain.shuffles,
                            [p is not None for p in chain.perms],
                            [b is not None for b in chain.biases],
                            chain.input_index is not None, dtype)


def _check_key(x, chain, need_dx, need_dw, need_db) -> tuple:
    """What the compile checks (``spill_reasons``, ``backward_stages``) depend on: the chain's
    structure, x's dtype, shape, strides and device, the gradients wanted, the dots' precision."""
    return (chain.in_channels, tuple(chain.channels), tuple(chain.groups), tuple(chain.shuffles),
            tuple(p is not None for p in chain.perms), tuple(b is not None for b in chain.biases),
            chain.input_index is not None, x.dtype, tuple(x.shape), tuple(x.stride()),
            x.device.index, bool(need_dx), bool(need_dw), bool(need_db), K.dot_precision())


def _prepare(x, weights, biases, groups, shuffles, perms, input_index, grad_y=None,
             needs=(False, False, False), chain=None):
    """(structure, the kernels' pointer arguments ``w0..w7, b0..b7, perm_ptr``).

    The arguments are checked (``_checked_chain``, unless its ``chain`` is given), then on GPUs
    ``spill_reasons`` for the forward and the gradients ``needs`` names; all before any launch.
    The kernels clamp index entries either way."""
    if chain is None:
        chain = _checked_chain(x, weights, biases, groups, shuffles, perms, input_index, grad_y)
    reasons = spill_reasons(x, chain, *needs) if checks_spills(x) else []
    if reasons:
        raise ValueError("; ".join(reasons))
    st = _structure(chain, x.dtype)
    ptrs = K.pointer_args(st, chain.weights, chain.biases,
                          K.permutation_buffer(st, chain.perms, _inverse))
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


_DEVICE_SIZES: dict = {}


def backward_programs_per_sm(row_floats: int, sms: int, l2_bytes: int) -> int:
    """Programs of the persistent backward grid per SM (tools/perf_model.py caps the tiles in
    flight per SM at this): 2, so that where two programs fit an SM one's tile loads while the
    other computes (where they do not, the second half of the grid runs after the first), unless
    the float32 partial rows of 2 per SM (``row_floats`` each) would take more than half the L2:
    the FMA and dot paths add to their row every tile, and the reduction reads every row. Then
    1."""
    return 2 if 2 * sms * row_floats * 4 <= l2_bytes // 2 else 1


# Programs per SM of the forward's persistent grid (its AHEAD configurations; the model's
# cap on their tiles in flight per SM): two, so that where two fit an SM one's tiles load while
# the other computes; where one fits, the second half of the grid runs after the first.
FORWARD_PROGRAMS_PER_SM = 2


def _device_sizes(device: torch.device) -> tuple:
    """(SMs, L2 bytes) of a CUDA device, cached."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    sizes = _DEVICE_SIZES.get(key)
    if sizes is None:
        props = torch.cuda.get_device_properties(key)
        sizes = _DEVICE_SIZES[key] = (props.multi_processor_count, props.L2_cache_size)
    return sizes


def backward_programs(device: torch.device, row_floats: int) -> int:
    """Programs of the persistent backward grid: ``backward_programs_per_sm`` per SM on GPUs
    (the partial buffer has one row of ``row_floats`` per program); 3 under the interpreter (an
    odd count, so tiles split unevenly)."""
    if INTERPRETED or device.type != "cuda":
        return 3
    sizes = _device_sizes(device)
    return sizes[0] * backward_programs_per_sm(row_floats, *sizes)


def forward_programs(device: torch.device, ntiles: int) -> int:
    """Programs of the forward's persistent grid for ``ntiles`` tiles: at most
    ``FORWARD_PROGRAMS_PER_SM`` per SM on GPUs, 3 under the interpreter (as the backward's)."""
    if INTERPRETED or device.type != "cuda":
        return min(3, ntiles)
    return min(_device_sizes(device)[0] * FORWARD_PROGRAMS_PER_SM, ntiles)


def _store_dtype(dtype):
    """The dtype the kernels write results in. Triton's interpreter converts float32 to
    bfloat16 by truncation (the compiled kernels round to nearest even), so under the
    interpreter bfloat16 results are written as float32 and rounded by torch afterwards."""
    return torch.float32 if INTERPRETED and dtype == torch.bfloat16 else dtype


def _launch(kernel, grid, args, meta):
    if INTERPRETED:
        kernel[grid](*args, **meta)
    else:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)


def _forward_args(x, y, idx, ptrs):
    """(the forward kernel's arguments, (O0, O1, O2, NI))."""
    sizes, (xs, ys) = K.position_dims(x.shape, [x.stride(), y.stride()])
    NI, O1, O2 = sizes[3], sizes[1], sizes[2]
    args = [x, y, idx, *ptrs, NI, sizes[0], O1, O2, xs[0], xs[1], xs[2], xs[3], x.stride(1),
            ys[0], ys[1], ys[2], ys[3], y.stride(1), _layout_key((xs[3], x.stride(1)))]
    return args, tuple(sizes)


def _backward_args(grad_y, x, dx, need_dx, index, ptrs, part, row):
    """The backward kernel's arguments (``dx`` unused unless ``need_dx``; ``index`` the input
    index's (idx, order, start, count), Nones without one)."""
    dxs = dx.stride() if need_dx else x.stride()
    sizes, (gs, xs, ds) = K.position_dims(x.shape, [grad_y.stride(), x.stride(), dxs])
    O0, O1, O2, NI = sizes
    return [grad_y, x, dx, *index, *ptrs, part, row, NI, O0, O1, O2,
            gs[0], gs[1], gs[2], gs[3], grad_y.stride(1), xs[0], xs[1], xs[2], xs[3],
            x.stride(1), ds[0], ds[1], ds[2], ds[3], dx.stride(1) if need_dx else 0,
            _layout_key((xs[3], x.stride(1)))]


def _backward_meta(need_dx, need_dw, need_db) -> dict:
    return {"PREC": K.dot_precision(), "NEED_DX": int(need_dx), "NEED_DW": int(need_dw),
            "NEED_DB": int(need_db)}


# ---------------------------------------------------------------------------------------------
# Spilling structures are refused before launch
# ---------------------------------------------------------------------------------------------
def checks_spills(x) -> bool:
    """Whether the backend compiles ``x``'s kernels to look for spills before launching: on
    GPUs, unless ``IGC_TRITON_FIXED=default`` (test runs over many structures: one compile
    each, the default configuration, whatever it spills), and not while a graph with symbolic
    sizes is traced (the eager calls are checked)."""
    return (not INTERPRETED and x.device.type == "cuda"
            and os.environ.get("IGC_TRITON_FIXED", "") != "default"
            # traced with symbolic sizes (torch.compile dynamic shapes): no concrete compile key
            and all(type(v) is int for v in (*x.shape, *x.stride())))


def _meta_like(shape, strides, dtype):
    return torch.empty_strided(tuple(shape), tuple(strides), dtype=dtype, device="meta")


def spill_reasons(x, chain, need_dx: bool, need_dw: bool, need_db: bool, spills=None) -> list:
    """Reasons (empty when none) for which these kernels do not run ``x`` through ``chain``:
    every launch configuration of its forward (or of the backward it will need: the gradients
    named) spills registers to local memory when compiled for the GPU at hand. The kernels are
    compiled, not launched (``K.fixed_choice``, cached per kernel and argument signature; the
    launch reuses the compile). ``spills``: for tests, spilled bytes of a compile."""
    key = _check_key(x, chain, need_dx, need_dw, need_db)
    hit = _SPILL_REASONS.get(key) if spills is None else None
    if hit is not None:
        return list(hit)
    reasons = _spill_reasons(x, chain, need_dx, need_dw, need_db, spills)
    if spills is None:
        _SPILL_REASONS[key] = tuple(reasons)
    return reasons


_SPILL_REASONS: dict = {}


def _spill_reasons(x, chain, need_dx, need_dw, need_db, spills):
    reasons = []
    for direction, cfg, spilled in _fixed_choices(x, chain, need_dx, need_dw, need_db, spills):
        if spilled and direction == "backward" and len(
                backward_stages(x, chain, need_dx, need_dw, need_db, spills)) > 1:
            continue  # the backward runs in layer ranges that do not spill
        if spilled:
            reasons.append(
                f"every launch configuration of the Triton {direction} kernel for this chain "
                f"spills registers to local memory on this GPU (the least: {spilled} bytes per "
                f"thread, BLOCK_P={cfg.block_p}, num_warps={cfg.num_warps}); a spilling kernel "
                f"is not launched")
    return reasons


def _fixed_choices(x, chain, need_dx, need_dw, need_db, spills=None, device=None) -> list:
    """``(direction, configuration, spilled bytes)`` of the fixed path's choice
    (``K.fixed_choice``: compiled, not launched) for ``x``'s forward through ``chain`` and, where
    a gradient is needed, its backward. ``x`` may be a meta tensor; ``device``: then the GPU
    (x's device by default)."""
    st = _structure(chain, x.dtype)
    kern = K.kernels_for(st)
    i32 = torch.empty((0,), dtype=torch.int32, device="meta")
    weights = [_meta_like(w.shape, w.stride(), w.dtype) for w in chain.weights]
    biases = [_meta_like(b.shape, b.stride(), b.dtype) if b is not None else None
              for b in chain.biases]
    perms = [_meta_like(p.shape, (1,), p.dtype) if p is not None else None
             for p in chain.perms]
    ptrs = K.pointer_args(st, weights, biases, K.permutation_buffer(st, perms, _inverse))
    xm = _meta_like(x.shape, x.stride(), x.dtype)
    ym = empty_like_layout(xm, chain.channels[-1], x.dtype)
    index = (i32,) * 4 if chain.input_index is not None else (None,) * 4
    fwd_args, _ = _forward_args(xm, ym, index[0], ptrs)
    checks = [("forward", kern.fwd, False, fwd_args, {"PREC": K.dot_precision()})]
    need_db = need_db and st.b_total > 0
    if need_dx or need_dw or need_db:
        row = st.w_total + st.b_total
        part = _meta_like((backward_programs(device or x.device, row), row), (row, 1),
                          torch.float32)
        dxm = xm if need_dx else _meta_like((0,), (1,), x.dtype)
        bwd_args = _backward_args(ym, xm, dxm, need_dx, index, ptrs, part, row)
        checks.append(("backward", kern.bwd, True, bwd_args,
                       _backward_meta(need_dx, need_dw, need_db)))
    return [(direction, *K.fixed_choice(kern, backward, fn, args, base, spills))
            for direction, fn, backward, args, base in checks]


# ---------------------------------------------------------------------------------------------
# Staged backward: chains whose packed backward spills run in ranges of layers
# ---------------------------------------------------------------------------------------------
_FORCED = threading.local()
STAGED_ENV = "IGC_TRITON_STAGED"  # "0": never staged (read at every call)


class force_stages:
    """Context manager (tests): the backward of the calls within runs in these layer ranges,
    ``((0, a), (a, b), ..., (z, L))``, whatever ``backward_stages`` would choose."""

    def __init__(self, ranges):
        self.ranges = tuple((int(a), int(b)) for a, b in ranges)

    def __enter__(self):
        self.prev = getattr(_FORCED, "ranges", None)
        _FORCED.ranges = self.ranges

    def __exit__(self, *exc):
        _FORCED.ranges = self.prev


def sub_chain(chain, a: int, b: int):
    """Layers ``a .. b-1`` of ``chain`` as a chain of their own: its input is ``h_a`` (x, through
    the input index, where ``a`` is 0), its output the layer ``b - 1``'s through the permutation
    after it, which is the next range's input (the kernels fold the permutation into the
    store)."""
    first = a == 0
    return Chain(tuple(chain.channels[a:b + 1]), tuple(chain.groups[a:b]),
                 list(chain.weights[a:b]), list(chain.biases[a:b]), list(chain.shuffles[a:b]),
                 list(chain.perms[a:b]), chain.input_index if first else None,
                 chain.in_channels if first else int(chain.channels[a]))


def backward_stages(x, chain, need_dx: bool, need_dw: bool, need_db: bool,
                    spills=None) -> tuple:
    """The layer ranges ``((0, a), ..., (z, L))`` in which the backward runs: the whole chain,
    but in two cases. A 16-bit chain with packed layers (``K.fixed_candidates`` offers it packed
    configurations first) whose every packed backward configuration spills on the GPU at hand
    (IGCV2(1024, 8): the fixed path would take an FMA configuration, about 2% of copy bandwidth
    predicted, docs/benchmarks.md). Such a chain is halved, recursively, until each range's
    backward takes a packed configuration without spills (a range without packed layers: any
    configuration without spills) and each range's forward but the last's compiles without
    spills; where a single layer still fails, the whole chain. A float32 chain runs in ranges of
    one layer where its whole backward spills everywhere, or where it is offered packed
    configurations first but none fits (the FMA path: chains of 512 or 1024 channels whose
    packed builds all spill, such as IGCV2(512, 16) and (512, 32);
    ``_single_layer_stages``). Chosen from compiles
    (``K.fixed_choice``, cached), never from timings, so the same with the autotuner on or off;
    not under the interpreter or where ``checks_spills`` says no, unless ``spills`` (the spilled
    bytes of a compile, as for ``spill_reasons``) is given, nor with ``IGC_TRITON_STAGED=0``
    (the whole chain then, and its refusal where it spills everywhere: no range inputs kept in
    memory) (``force_stages`` overrides, for tests)."""
    forced = getattr(_FORCED, "ranges", None)
    whole = ((0, chain.num_layers),)
    if forced is not None:
        return forced
    if (chain.num_layers < 2 or (spills is None and not checks_spills(x))
            or os.environ.get(STAGED_ENV, "1") == "0"):
        return whole
    key = _check_key(x, chain, need_dx, need_dw, need_db)
    hit = _STAGES.get(key) if spills is None else None
    if hit is None:
        hit = _stages(x, chain, (need_dx, need_dw, need_db), spills) or whole
        if spills is None:
            _STAGES[key] = hit
    return hit


_STAGES: dict = {}


def _stages(x, chain, needs, spills):
    """``backward_stages``' ranges, or None for the whole chain."""
    xm = _meta_like(x.shape, x.stride(), x.dtype)
    L = chain.num_layers

    def choices(a, b):
        """The fixed path's choices for layers a..b-1 as one range: its backward, and its
        forward unless it is the last range."""
        sub = sub_chain(chain, a, b)
        xs = xm if a == 0 else empty_like_layout(xm, int(chain.channels[a]), x.dtype)
        got = _fixed_choices(xs, sub, a > 0 or needs[0], needs[1], needs[2], spills, x.device)
        return sub, [g for g in got if b < L or g[0] == "backward"]

    got = _fixed_choices(xm, chain, *needs, spills)
    bwd = [(cfg, spilled) for direction, cfg, spilled in got if direction == "backward"]
    if not bwd:
        return None
    whole, whole_spills = bwd[0]
    st = _structure(chain, x.dtype)
    if not st.native16:
        return _single_layer_stages(st, whole, whole_spills, choices)

    def fits(a, b):
        """Whether layers a..b-1 run as one range without spills (their forward too, unless
        they are the last range), their backward in a packed configuration where the range
        offers packed ones first."""
        sub, got = choices(a, b)
        if any(spilled for _, _, spilled in got):
            return False
        bwd = [cfg for direction, cfg, _ in got if direction == "backward"]
        return not bwd or bool(bwd[0].pack) or not K._packed_first(_structure(sub, x.dtype))

    def split(a, b):
        if fits(a, b):
            return [(a, b)]
        if b - a == 1:
            return None
        mid = (a + b) // 2
        left, right = split(a, mid), split(mid, b)
        return left + right if left is not None and right is not None else None

    if (whole.pack and not whole_spills) or not K._packed_first(st):
        return None
    left, right = split(0, L // 2), split(L // 2, L)
    return tuple(left + right) if left is not None and right is not None else None


def _single_layer_stages(st, whole, whole_spills, choices):
    """A float32 chain's ranges: one layer each, or None. Its packed builds at 512 and 1024
    channels fall back to the FMA path in ranges of several layers too, where the permutations
    between layers live in registers and every input of every group is a gather over the
    register tile. A one-layer range holds none: its input comes from memory, the permutation
    after it is folded into its store (and IGCV2(256, 32)'s fit the packed path). Taken where
    the whole chain's backward spills in every configuration (it would be refused), or where
    the fixed path offers it packed configurations first (``K._packed_first``: groups at least
    16 wide and a tile of 128 channels or more, or a tile of 512 channels or more) and none
    fits, so that it runs the FMA path;
    each range's backward, and its forward but the last range's, without spills (predictions:
    docs/benchmarks.md, "Staged backward"). Nothing compiled (spills None: a compile error)
    decides nothing: the whole chain."""
    if whole_spills is None:
        return None
    if not whole_spills and (whole.pack or not K._packed_first(st)):
        return None  # the whole chain fits, packed or not offered packed first
    singles = tuple((a, a + 1) for a in range(st.num_layers))
    for a, b in singles:
        if any(spilled != 0 for _, _, spilled in choices(a, b)[1]):  # (None: not compiled)
            return None
    return singles


def _staged_backward(grad_y, x, chain, weights, biases, groups, shuffles, perms, need,
                     input_index, stages):
    """The backward in layer ranges: the forward of every range but the last, from x, keeping
    each range's input ``h_a`` (in x's dtype and layout), then the backward of each range from
    the last, its input gradient the previous range's output gradient; the weight and bias
    gradients concatenated in layer order (``chain``: the checked whole chain, whose ranges the
    backwards take as checked). Every launch is one of the fused kernels, each
    deterministic; the extra device traffic: each kept ``h_a`` written once and read by its
    range's forward (but the last range's) and backward, x read twice, each ``dh_a`` written
    and read once (docs/backends.md)."""
    need_dx, need_dw, need_db = need
    nb = len(biases)

    def part(a, b):
        return (list(weights[a:b]), list(biases[a:b]) if nb else [], list(groups[a:b]),
                list(shuffles[a:b]), list(perms[a:b]), input_index if a == 0 else None)

    inputs = [x]
    for a, b in stages[:-1]:
        w, bs, g, sh, pm, idx = part(a, b)
        inputs.append(chain_forward(inputs[-1], w, bs, g, sh, pm, idx))
    grad = grad_y
    gws, gbs = [], []
    for s in range(len(stages) - 1, -1, -1):
        a, b = stages[s]
        w, bs, g, sh, pm, idx = part(a, b)
        grad, gw, gb = _backward(grad, inputs[s], w, bs, g, sh, pm,
                                 (need_dx or s > 0, need_dw, need_db), idx,
                                 sub_chain(chain, a, b))  # (checked with the whole chain)
        gws.insert(0, gw)
        gbs.insert(0, gb)
    dtype = weights[0].dtype
    dx = grad if need_dx else x.new_empty((0,), dtype=dtype)
    return dx, torch.cat(gws), torch.cat(gbs)


# ---------------------------------------------------------------------------------------------
# Operator bodies
# ---------------------------------------------------------------------------------------------
def chain_forward(x: torch.Tensor, weights: List[torch.Tensor], biases: List[torch.Tensor],
                  groups: List[int], shuffles: List[int], perms: List[Optional[torch.Tensor]],
                  input_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    st, ptrs = _prepare(x, weights, biases, groups, shuffles, perms, input_index)
    y = empty_like_layout(x, weights[-1].shape[0], _store_dtype(x.dtype))
    if y.numel() == 0:
        return y.to(x.dtype)
    kern = K.kernels_for(st)
    idx = input_index.to(torch.int32) if input_index is not None else None
    args, (O0, O1, O2, NI) = _forward_args(x, y, idx, ptrs)
    base = {"PREC": K.dot_precision()}
    fn, meta = K.launch_choice(kern, backward=False, args=args, base_meta=base)

    def grid(META):
        ntiles = O0 * O1 * O2 * triton.cdiv(NI, META["BLOCK_P"])
        return (forward_programs(x.device, ntiles) if META.get("AHEAD") else ntiles,)

    _launch(fn, grid, args, {**base, **meta})
    return y.to(x.dtype)


def chain_backward(grad_y: torch.Tensor, x: torch.Tensor, weights: List[torch.Tensor],
                   biases: List[torch.Tensor], groups: List[int], shuffles: List[int],
                   perms: List[Optional[torch.Tensor]], output_mask: List[bool],
                   input_index: Optional[torch.Tensor] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    need = tuple(bool(m) for m in output_mask)
    chain = _checked_chain(x, weights, biases, groups, shuffles, perms, input_index, grad_y)
    if any(need) and x.numel():
        stages = backward_stages(x, chain, *need)
        if len(stages) > 1:
            return _staged_backward(grad_y, x, chain, weights, biases, groups, shuffles, perms,
                                    need, input_index, stages)
    return _backward(grad_y, x, weights, biases, groups, shuffles, perms, need, input_index,
                     chain)


def _backward(grad_y, x, weights, biases, groups, shuffles, perms, need, input_index,
              chain=None):
    """The backward of the whole chain in one launch of the backward kernel (and the reduction
    of its partial rows); ``chain``: checked already."""
    need_dx, need_dw, need_db = need
    st, ptrs = _prepare(x, weights, biases, groups, shuffles, perms, input_index, grad_y,
                        need, chain)
    need_db = need_db and st.b_total > 0
    dtype = _store_dtype(weights[0].dtype)
    dx = empty_like_layout(x, x.shape[1], dtype) if need_dx else x.new_empty((0,), dtype=dtype)
    gw = x.new_empty((st.w_total if need_dw else 0,), dtype=dtype)
    gb = x.new_empty((st.b_total if need_db else 0,), dtype=dtype)
    out_dtype = weights[0].dtype
    if not (need_dx or need_dw or need_db):
        return dx.to(out_dtype), gw.to(out_dtype), gb.to(out_dtype)
    if x.numel() == 0:
        gw.zero_()
        gb.zero_()
        return dx.to(out_dtype), gw.to(out_dtype), gb.to(out_dtype)
    kern = K.kernels_for(st)
    row = st.w_total + st.b_total
    nprog = backward_programs(x.device, row)
    part = torch.zeros((nprog, row) if (need_dw or need_db) else (1, 1), device=x.device,
                       dtype=torch.float32)
    if input_index is not None:
        index = _index_order(input_index, int(x.shape[1]))
    else:
        index = (None,) * 4
    args = _backward_args(grad_y, x, dx, need_dx, index, ptrs, part, row)
    base = _backward_meta(need_dx, need_dw, need_db)
    fn, meta = K.launch_choice(kern, backward=True, args=args, base_meta=base)
    _launch(fn, (nprog,), args, {**base, **meta})
    if need_dw or need_db:
        gw_out = gw if need_dw else x.new_empty((st.w_total,), dtype=dtype)
        gb_out = gb if need_db else x.new_empty((st.b_total,), dtype=dtype)
        block = 256
        _launch(K._reduce_partials, (triton.cdiv(row, block),),
                [part, gw_out, gb_out, nprog, st.w_total, st.b_total, row], {"BLOCK": block})
    return dx.to(out_dtype), gw.to(out_dtype), gb.to(out_dtype)


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


def _fits(x, chain) -> bool:
    """Whether these kernels run ``chain`` (the doubled chains of higher derivatives may not)."""
    return x.dtype in _dtypes() and not channel_limit_reasons(chain)


# The autograd formulas and vmap rules shared with the C++ ops (_ops.py), over this backend's ops.
FAMILY = register_ops(forward_op, backward_op, _fits, "igc_triton")
