"""Derivatives of the operator beyond the first backward: double backward, forward mode, vmap.

Everything here rests on one identity. The chain is affine in ``x`` and in each ``(W_l, b_l)``,
so the pair ``(h, t)`` of a value and its tangent goes through layer ``l`` as

    u = W h + b,    t_u = W t + T h + t_b          (T, t_b: the tangents of W, b)

which is again a grouped layer, on twice the channels: group ``g`` maps ``(h_g, t_g)`` (``2 n``
inputs) to ``(u_g, t_{u,g})`` (``2 m`` outputs) with the block ``[[W_g, 0], [T_g, W_g]]``.
Permutations act on ``h`` and ``t`` alike. So the *doubled chain* -- the same groups, these
blocks, biases ``(b, t_b)``, permutations and input index re-indexed for the paired layout --
is a chain the fused kernels run as they are, and its output is ``(y, t_y)``: the value and the
forward-mode tangent in one pass (:func:`doubled_args`). With it:

* jvp of the forward: ``t_y``, the second half of the doubled chain's output.
* the backward op ``(dy, x, W, b) -> (gx, gW, gb)`` is the gradient of ``<dy, y>``; with
  cotangents ``(a_x, a_W, a_b)`` of its outputs, ``<a_x, gx> + <a_W, gW> + <a_b, gb> = <dy,
  t_y>`` where ``t_y`` is the tangent of ``y`` in the direction ``(a_x, a_W, a_b)``. Hence its
  vjp (double backward): ``d/d dy = t_y`` and ``d/d (x, W, b)`` = the doubled chain's backward
  with output gradient ``(0, dy)``, read on the ``h`` half (``W`` occurs twice in each block:
  its gradient is the sum of the two diagonal blocks').
* the jvp of the backward op in the direction ``(t_dy, t_x, t_W, t_b)``: the doubled chain's
  backward with output gradient ``(t_dy, dy)``, read the same way.

Every formula calls the fused ops (through the differentiable wrappers of the same family), so
derivatives of any order follow. A doubled chain that one family cannot run (twice the channels
over the Triton limit, or over a GPU's shared memory for the CUDA kernels) runs through the
reference chain instead. Costs: a doubled pass does four times the multiply-adds of a plain one
(a quarter of them on zero blocks) and moves twice the bytes.

Batching (``torch.vmap``): the ops' vmap rules fold a batch dimension of ``x`` / ``grad_y``
into the positions when nothing else is batched and no weight gradient is asked for (weight
gradients sum over positions, so per-sample weight gradients cannot share one call); otherwise
they call the op once per batch entry.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ._chain import Chain, has_bias, interleave_index, to_layout_of


# ---------------------------------------------------------------------------------------------
# Op argument helpers
# ---------------------------------------------------------------------------------------------
def _gather_index(shuffle: int, perm, channels: int, device) -> torch.Tensor:
    """The gather index of the permutation after a layer (identity included), int64."""
    if shuffle > 0:
        return interleave_index(channels, shuffle, device=device)
    if perm is not None:
        return perm.to(torch.int64)
    return torch.arange(channels, device=device)


def split_weight_grads(gw: torch.Tensor, weights) -> list:
    """Per-layer views of the flat ``grad_weights`` output (``None`` if it is empty)."""
    if gw.numel() == 0 and sum(w.numel() for w in weights) > 0:
        return [None] * len(weights)
    out, off = [], 0
    for w in weights:
        n = w.numel()
        out.append(gw[off:off + n].view(w.shape))
        off += n
    return out


def split_bias_grads(gb: torch.Tensor, biases) -> list:
    """Per-layer views of the flat ``grad_biases`` output (``None`` for layers without a bias,
    or every layer if it is empty)."""
    present = [has_bias(b) for b in biases]
    if gb.numel() == 0:
        return [None] * len(biases)
    out, off = [], 0
    for b, p in zip(biases, present):
        if p:
            out.append(gb[off:off + b.shape[0]])
            off += b.shape[0]
        else:
            out.append(None)
    return out


def _flat(parts: list, like: list) -> torch.Tensor:
    """Concatenate flattened ``parts`` (``None`` -> zeros shaped like the entry of ``like``)."""
    ref = next(t for t in like if t is not None)
    if not parts:
        return ref.new_zeros((0,))
    return torch.cat([(p if p is not None else torch.zeros_like(l)).reshape(-1)
                      for p, l in zip(parts, like)])


# ---------------------------------------------------------------------------------------------
# The doubled chain
# ---------------------------------------------------------------------------------------------
class Doubled(NamedTuple):
    x: torch.Tensor
    weights: list
    biases: list
    groups: list
    shuffles: list
    perms: list
    input_index: torch.Tensor
    c_in: int  # channels of the original x
    c_out: int  # C_L of the original chain


def doubled_args(x, tx, weights, tws, biases, tbs, groups, shuffles, perms, input_index
                 ) -> Doubled:
    """Op arguments of the chain on value/tangent pairs (see the module docstring).

    ``tx``, ``tws[l]``, ``tbs[l]``: tangents of ``x``, ``W_l``, ``b_l`` (``None`` for zero).
    ``biases`` is the ops' format (``[]``, or one entry per layer with ``(0,)`` for none).
    Layout: the doubled ``x`` is ``cat(x, tx)`` on channels; inside, every layer's input and
    output tiles are group-major pairs (group ``g``: its ``h`` channels, then its ``t``
    channels); the doubled ``y`` is ``cat(y, t_y)``.
    """
    dev = x.device
    L = len(weights)
    c_in = int(x.shape[1])
    X2 = torch.cat([x, torch.zeros_like(x) if tx is None else tx.to(x.dtype)], dim=1)
    idx = input_index.to(torch.int64) if input_index is not None else torch.arange(c_in,
                                                                                   device=dev)
    G1 = int(groups[0])
    n1 = int(weights[0].shape[1])
    idx2 = torch.stack([idx.view(G1, n1), (idx + c_in).view(G1, n1)], dim=1).reshape(-1)

    W2, B2, P2 = [], [], []
    any_bias = len(biases) > 0
    for l in range(L):
        W, G = weights[l], int(groups[l])
        C, n = int(W.shape[0]), int(W.shape[1])
        m = C // G
        W3 = W.reshape(G, m, n)
        T3 = torch.zeros_like(W3) if tws[l] is None else tws[l].reshape(G, m, n).to(W.dtype)
        top = torch.cat([W3, torch.zeros_like(W3)], dim=2)
        bot = torch.cat([T3, W3], dim=2)
        W2.append(torch.stack([top, bot], dim=1).reshape(2 * C, 2 * n))
        if any_bias:
            b = biases[l]
            if has_bias(b):
                tb = torch.zeros_like(b) if tbs[l] is None else tbs[l].to(b.dtype)
                B2.append(torch.stack([b.view(G, m), tb.view(G, m)], dim=1).reshape(-1))
            else:
                B2.append(b)
        # gather index after layer l in the paired layout
        p = _gather_index(int(shuffles[l]), perms[l], C, dev)
        src = [(p // m) * (2 * m) + s * m + p % m for s in (0, 1)]
        if l + 1 < L:
            n_next = C // int(groups[l + 1])
            Gn = int(groups[l + 1])
            P2.append(torch.stack([src[0].view(Gn, n_next), src[1].view(Gn, n_next)],
                                  dim=1).reshape(-1))
        else:
            P2.append(torch.cat(src))
    return Doubled(X2, W2, B2, [int(g) for g in groups], [0] * L, P2, idx2, c_in,
                   int(weights[-1].shape[0]))


def _weight_grads_from_doubled(gW2: list, weights, groups) -> list:
    out = []
    for g2, W, G in zip(gW2, weights, groups):
        if g2 is None:
            out.append(None)
            continue
        C, n = int(W.shape[0]), int(W.shape[1])
        v = g2.reshape(int(G), 2, C // int(G), 2 * n)
        out.append((v[:, 0, :, :n] + v[:, 1, :, n:]).reshape(C, n))
    return out


def _bias_grads_from_doubled(gB2: list, biases, groups) -> list:
    out = []
    for g2, b, G in zip(gB2, biases, groups):
        if g2 is None or not has_bias(b):
            out.append(None)
            continue
        out.append(g2.reshape(int(G), 2, -1)[:, 0].reshape(-1))
    return out


# ---------------------------------------------------------------------------------------------
# Families of ops: (forward, backward) pairs that are differentiable
# ---------------------------------------------------------------------------------------------
class Family:
    """A differentiable ``forward(x, W, B, groups, shuffles, perms, idx)`` and
    ``backward(dy, x, W, B, groups, shuffles, perms, mask, idx) -> (gx, gw, gb)`` with the
    ops' argument and result conventions, and ``fits(x, chain)``: whether it can run a chain."""

    def __init__(self, name, forward, backward, fits):
        self.name = name
        self.forward = forward
        self.backward = backward
        self.fits = fits


def _chain_of(x, weights, biases, groups, shuffles, perms, idx) -> Chain:
    """A :class:`Chain` (no validation) from op arguments."""
    L = len(weights)
    bs = [b if has_bias(b) else None for b in biases] if len(biases) else [None] * L
    c0 = int(idx.shape[0]) if idx is not None else int(x.shape[1])
    channels = (c0,) + tuple(int(w.shape[0]) for w in weights)
    return Chain(channels, tuple(int(g) for g in groups), list(weights), bs,
                 [int(s) for s in shuffles], list(perms), idx, int(x.shape[1]))


def _ref_forward(x, weights, biases, groups, shuffles, perms, idx):
    from .reference import run_chain

    return run_chain(x, _chain_of(x, weights, biases, groups, shuffles, perms, idx))


def _ref_backward(dy, x, weights, biases, groups, shuffles, perms, mask, idx):
    """The backward op's results computed by autograd through the reference chain
    (differentiable when grad mode is on)."""
    from .reference import run_chain

    create = torch.is_grad_enabled()
    with torch.enable_grad():
        def leaf(t, need):
            if t.requires_grad or not need:
                return t
            return t.detach().requires_grad_()

        xs = leaf(x, mask[0])
        ws = [leaf(w, mask[1]) for w in weights]
        bs = [leaf(b, mask[2]) if has_bias(b) else b for b in biases]
        y = run_chain(xs, _chain_of(xs, ws, bs, groups, shuffles, perms, idx))
        want = ([xs] if mask[0] else []) + (ws if mask[1] else []) \
            + ([b for b in bs if has_bias(b)] if mask[2] else [])
        got = list(torch.autograd.grad(y, want, dy, create_graph=create, allow_unused=True)) \
            if want else []
    it = iter(got)
    gx = next(it) if mask[0] else x.new_empty((0,))
    if gx is None:
        gx = torch.zeros_like(x)
    gws = [next(it) for _ in ws] if mask[1] else []
    gw = _flat(gws, list(weights)) if mask[1] else x.new_empty((0,))
    present = [b for b in biases if has_bias(b)]
    gbs = [next(it) for _ in present] if mask[2] else []
    gb = _flat(gbs, present) if (mask[2] and present) else x.new_empty((0,))
    return gx, gw, gb


REFERENCE = Family("reference", _ref_forward, _ref_backward, lambda x, chain: True)


def _pick(family: Family, d: Doubled) -> Family:
    chain = _chain_of(d.x, d.weights, d.biases, d.groups, d.shuffles, d.perms, d.input_index)
    return family if family.fits(d.x, chain) else REFERENCE


# ---------------------------------------------------------------------------------------------
# The formulas
# ---------------------------------------------------------------------------------------------
def forward_jvp(family: Family, x, weights, biases, groups, shuffles, perms, idx,
                tx, tws, tbs) -> torch.Tensor:
    """Tangent of ``y`` for tangents ``tx``, ``tws``, ``tbs`` (entries may be ``None``)."""
    d = doubled_args(x, tx, weights, tws, biases, tbs, groups, shuffles, perms, idx)
    y2 = _pick(family, d).forward(d.x, d.weights, d.biases, d.groups, d.shuffles, d.perms,
                                  d.input_index)
    # forward-mode AD wants the tangent in the primal's layout (x's, by the layout rule)
    return to_layout_of(y2[:, d.c_out:], x)


def backward_vjp(family: Family, dy, x, weights, biases, groups, shuffles, perms, idx,
                 ax, aws, abs_, need) -> tuple:
    """Gradients of ``<ax, gx> + <aws, gW> + <abs_, gb>`` (cotangents of the backward op's
    outputs; entries may be ``None``) with respect to ``(dy, x, weights, biases)``; ``need`` is
    ``(dy, x, weights, biases)`` flags. Returns ``(g_dy, g_x, [g_W], [g_b])``."""
    need_dy, need_x, need_w, need_b = need
    d = doubled_args(x, ax, weights, aws, biases, abs_, groups, shuffles, perms, idx)
    fam = _pick(family, d)
    g_dy = None
    if need_dy:
        y2 = fam.forward(d.x, d.weights, d.biases, d.groups, d.shuffles, d.perms, d.input_index)
        g_dy = y2[:, d.c_out:]
    g_x, g_ws, g_bs = None, [None] * len(weights), [None] * len(biases)
    need_b = need_b and any(has_bias(b) for b in biases)
    if need_x or need_w or need_b:
        dy2 = torch.cat([torch.zeros_like(dy), dy], dim=1)
        gx2, gw2, gb2 = fam.backward(dy2, d.x, d.weights, d.biases, d.groups, d.shuffles,
                                     d.perms, [need_x, need_w, need_b], d.input_index)
        if need_x:
            g_x = gx2[:, :d.c_in]
        if need_w:
            g_ws = _weight_grads_from_doubled(split_weight_grads(gw2, d.weights), weights,
                                              groups)
        if need_b:
            g_bs = _bias_grads_from_doubled(split_bias_grads(gb2, d.biases), biases, groups)
    return g_dy, g_x, g_ws, g_bs


def backward_jvp(family: Family, dy, x, weights, biases, groups, shuffles, perms, idx, mask,
                 tdy, tx, tws, tbs) -> tuple:
    """Tangents of the backward op's outputs ``(gx, gw, gb)`` (flat, as the op returns them;
    empty where ``mask`` is off) for tangents of ``(dy, x, weights, biases)``."""
    d = doubled_args(x, tx, weights, tws, biases, tbs, groups, shuffles, perms, idx)
    fam = _pick(family, d)
    need_b = bool(mask[2]) and any(has_bias(b) for b in biases)
    dy2 = torch.cat([torch.zeros_like(dy) if tdy is None else tdy, dy], dim=1)
    gx2, gw2, gb2 = fam.backward(dy2, d.x, d.weights, d.biases, d.groups, d.shuffles, d.perms,
                                 [bool(mask[0]), bool(mask[1]), need_b], d.input_index)
    t_gx = to_layout_of(gx2[:, :d.c_in], x) if mask[0] else x.new_zeros((0,))
    if mask[1]:
        t_gw = _flat(_weight_grads_from_doubled(split_weight_grads(gw2, d.weights), weights,
                                                groups), list(weights))
    else:
        t_gw = x.new_zeros((0,))
    if need_b:
        present = [b for b in biases if has_bias(b)]
        t_gb = _flat([g for g, b in zip(_bias_grads_from_doubled(
            split_bias_grads(gb2, d.biases), biases, groups), biases) if has_bias(b)], present)
    else:
        t_gb = x.new_zeros((0,))
    return t_gx, t_gw, t_gb


# ---------------------------------------------------------------------------------------------
# autograd.Function wrappers of one registration's ops (torch.func transforms need these)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Meta:
    """The non-tensor part of a call: what the flat tensor list holds. (A plain class, not a
    tuple: functorch flattens tuple arguments of an ``autograd.Function`` as pytrees.)"""

    num_layers: int
    groups: tuple
    shuffles: tuple
    bias_mask: Optional[tuple]  # None: the ops' biases list is empty
    perm_mask: tuple


@dataclass(frozen=True)
class Mask:
    """``output_mask`` of a backward call (a plain class for the same reason as :class:`Meta`)."""

    x: bool
    w: bool
    b: bool

    def __getitem__(self, i):
        return (self.x, self.w, self.b)[i]

    def __iter__(self):
        return iter((self.x, self.w, self.b))


def pack(x, weights, biases, groups, shuffles, perms) -> tuple:
    """``(meta, tensors)``: the op arguments as a flat tensor tuple (weights, present biases,
    present permutations) and the structure to rebuild them."""
    bias_mask = tuple(has_bias(b) for b in biases) if len(biases) else None
    perm_mask = tuple(p is not None for p in perms)
    meta = Meta(len(weights), tuple(int(g) for g in groups), tuple(int(s) for s in shuffles),
                bias_mask, perm_mask)
    tensors = list(weights)
    if bias_mask is not None:
        tensors += [b for b, m in zip(biases, bias_mask) if m]
    tensors += [p for p in perms if p is not None]
    return meta, tuple(tensors)


def unpack(meta: Meta, tensors, x) -> tuple:
    """``(weights, biases, perms)`` in the ops' format from :func:`pack`'s flat tuple."""
    L = meta.num_layers
    weights = list(tensors[:L])
    k = L
    biases = []
    if meta.bias_mask is not None:
        for m in meta.bias_mask:
            if m:
                biases.append(tensors[k])
                k += 1
            else:
                biases.append(x.new_empty((0,)))
    perms = []
    for m in meta.perm_mask:
        if m:
            perms.append(tensors[k])
            k += 1
        else:
            perms.append(None)
    return weights, biases, perms


def _present_biases(meta: Meta) -> int:
    return 0 if meta.bias_mask is None else sum(meta.bias_mask)


def _transforms_active() -> bool:
    """Whether a torch.func transform or a forward-mode level is active."""
    return bool(torch._C._are_functorch_transforms_active()
                or torch.autograd.forward_ad._current_level >= 0)


def _needs_autograd(x, weights, biases) -> bool:
    """Whether a call must go through the ``autograd.Function`` (a gradient to record, a
    forward-mode level or a torch.func transform active); otherwise the op is called directly
    (the Function costs ~35 us per call on the benchmark CPU)."""
    if _transforms_active():
        return True
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(w.requires_grad for w in weights) \
        or any(b.requires_grad for b in biases)


_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowADInplaceOrView", None)


def _call_below_autograd(op, *args):
    """``op(*args)`` dispatched past the autograd keys, as the op's registered autograd kernel
    does itself when grad mode is off (that Python kernel in between cost ~10 us per call on the
    benchmark CPU). For calls that record nothing (the caller's part: grad mode off, or nothing
    requiring grad); with a forward-mode level or a torch.func transform active, or while
    torch.compile traces, the op is called as usual."""
    if _BELOW_AUTOGRAD is None or _transforms_active() or torch.compiler.is_compiling():
        return op(*args)
    with _BELOW_AUTOGRAD():
        return op(*args)


def make_family(name: str, forward_op, backward_op, fits) -> Family:
    """The differentiable family of one registration: ``autograd.Function`` s around
    ``forward_op`` / ``backward_op`` with backward, jvp and (generated) vmap rules."""

    fam = Family(name, None, None, fits)

    class ChainForward(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(meta, x, idx, *tensors):
            weights, biases, perms = unpack(meta, tensors, x)
            # (grad mode is off in here)
            return _call_below_autograd(forward_op, x, weights, biases, list(meta.groups),
                                        list(meta.shuffles), perms, idx)

        @staticmethod
        def setup_context(ctx, inputs, output):
            meta, x, idx, *tensors = inputs
            ctx.meta = meta
            ctx.save_for_backward(x, idx, *tensors)
            ctx.save_for_forward(x, idx, *tensors)
            ctx.set_materialize_grads(False)

        @staticmethod
        def backward(ctx, dy):
            meta = ctx.meta
            x, idx, *tensors = ctx.saved_tensors
            weights, biases, perms = unpack(meta, tensors, x)
            L, nb = meta.num_layers, _present_biases(meta)
            needs = ctx.needs_input_grad
            need_x = needs[1]
            need_w = any(needs[3:3 + L])
            need_b = any(needs[3 + L:3 + L + nb])
            none = (None, None, None) + (None,) * len(tensors)
            if dy is None or not (need_x or need_w or need_b):
                return none
            gx, gw, gb = fam.backward(dy, x, weights, biases, list(meta.groups),
                                      list(meta.shuffles), perms, [need_x, need_w, need_b], idx)
            gws = split_weight_grads(gw, weights) if need_w else [None] * L
            gbs = [g for g, b in zip(split_bias_grads(gb, biases), biases) if has_bias(b)] \
                if need_b else [None] * nb
            return (None, gx if need_x else None, None, *gws, *gbs) \
                + (None,) * (len(tensors) - L - nb)

        @staticmethod
        def jvp(ctx, _meta_t, tx, _idx_t, *t_tensors):
            meta = ctx.meta
            x, idx, *tensors = ctx.saved_tensors
            weights, biases, perms = unpack(meta, tensors, x)
            L, nb = meta.num_layers, _present_biases(meta)
            tws = list(t_tensors[:L])
            tb_present = iter(t_tensors[L:L + nb])
            tbs = [next(tb_present) if has_bias(b) else None for b in biases]
            if tx is None and all(t is None for t in tws) and all(t is None for t in tbs):
                return None
            return forward_jvp(fam, x, weights, biases, list(meta.groups), list(meta.shuffles),
                               perms, idx, tx, tws, tbs)

    class ChainBackward(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(meta, mask, dy, x, idx, *tensors):
            weights, biases, perms = unpack(meta, tensors, x)
            return backward_op(dy, x, weights, biases, list(meta.groups), list(meta.shuffles),
                               perms, list(mask), idx)

        @staticmethod
        def setup_context(ctx, inputs, output):
            meta, mask, dy, x, idx, *tensors = inputs
            ctx.meta, ctx.mask = meta, mask
            ctx.save_for_backward(dy, x, idx, *tensors)
            ctx.save_for_forward(dy, x, idx, *tensors)
            ctx.set_materialize_grads(False)

        @staticmethod
        def backward(ctx, agx, agw, agb):
            meta, mask = ctx.meta, ctx.mask
            dy, x, idx, *tensors = ctx.saved_tensors
            weights, biases, perms = unpack(meta, tensors, x)
            L, nb = meta.num_layers, _present_biases(meta)
            needs = ctx.needs_input_grad
            need = (needs[2], needs[3], any(needs[5:5 + L]), any(needs[5 + L:5 + L + nb]))
            none = (None,) * (5 + len(tensors))
            ax = agx if (mask[0] and agx is not None and agx.numel() == x.numel()) else None
            aws = split_weight_grads(agw, weights) if (mask[1] and agw is not None) \
                else [None] * L
            abs_ = split_bias_grads(agb, biases) if (mask[2] and agb is not None
                                                      and len(biases)) else [None] * len(biases)
            if not any(need) or (ax is None and all(a is None for a in aws)
                                 and all(a is None for a in abs_)):
                return none
            g_dy, g_x, g_ws, g_bs = backward_vjp(
                fam, dy, x, weights, biases, list(meta.groups), list(meta.shuffles), perms,
                idx, ax, aws, abs_, need)
            g_bs = [g for g, b in zip(g_bs, biases) if has_bias(b)] if len(biases) else []
            if not need[3]:
                g_bs = [None] * nb
            return (None, None, g_dy, g_x, None, *g_ws, *g_bs) \
                + (None,) * (len(tensors) - L - nb)

        @staticmethod
        def jvp(ctx, _meta_t, _mask_t, tdy, tx, _idx_t, *t_tensors):
            meta, mask = ctx.meta, ctx.mask
            dy, x, idx, *tensors = ctx.saved_tensors
            weights, biases, perms = unpack(meta, tensors, x)
            L, nb = meta.num_layers, _present_biases(meta)
            tws = list(t_tensors[:L])
            tb_present = iter(t_tensors[L:L + nb])
            tbs = [next(tb_present) if has_bias(b) else None for b in biases]
            return backward_jvp(fam, dy, x, weights, biases, list(meta.groups),
                                list(meta.shuffles), perms, idx, mask, tdy, tx, tws, tbs)

    def forward(x, weights, biases, groups, shuffles, perms, idx):
        if torch.compiler.is_compiling():
            # Dynamo traces the op (its registered autograd: first and second order), not the
            # Function: the functorch rules matter only in eager mode.
            return forward_op(x, list(weights), list(biases), list(groups), list(shuffles),
                              list(perms), idx)
        if not _needs_autograd(x, weights, biases):
            return _call_below_autograd(forward_op, x, weights, biases, list(groups),
                                        list(shuffles), perms, idx)
        meta, tensors = pack(x, weights, biases, groups, shuffles, perms)
        return ChainForward.apply(meta, x, idx, *tensors)

    def backward(dy, x, weights, biases, groups, shuffles, perms, mask, idx):
        if not torch.is_grad_enabled():
            return _call_below_autograd(backward_op, dy, x, weights, biases, list(groups),
                                        list(shuffles), perms, list(mask), idx)
        meta, tensors = pack(x, weights, biases, groups, shuffles, perms)
        return ChainBackward.apply(meta, Mask(*(bool(m) for m in mask)), dy, x, idx, *tensors)

    # Function.apply binds its arguments to forward's signature on every call; inspecting the
    # function took ~25 us of each call on the benchmark CPU, a signature stored on it is read
    # back instead (inspect.signature honours __signature__).
    for fn in (ChainForward, ChainBackward):
        fn.forward.__signature__ = inspect.signature(fn.forward)
    fam.forward = forward
    fam.backward = backward
    fam.ChainForward = ChainForward
    fam.ChainBackward = ChainBackward
    return fam


# ---------------------------------------------------------------------------------------------
# Autograd formulas of the raw ops (torch.library.register_autograd): double backward too
# ---------------------------------------------------------------------------------------------
def raw_family(name, forward_op, backward_op, fits) -> Family:
    """The raw ops as a family: their own registered autograd makes them differentiable."""
    return Family(name, forward_op, backward_op, fits)


def setup_forward_context(ctx, inputs, output):
    x, weights, biases, groups, shuffles, perms = inputs[:6]
    input_index = inputs[6] if len(inputs) > 6 else None
    ctx.has_index = input_index is not None
    ctx.meta, tensors = pack(x, weights, biases, groups, shuffles, perms)
    ctx.save_for_backward(x, input_index, *tensors)


def setup_backward_context(ctx, inputs, output):
    grad_y, x, weights, biases, groups, shuffles, perms, output_mask = inputs[:8]
    input_index = inputs[8] if len(inputs) > 8 else None
    ctx.has_index = input_index is not None
    ctx.mask = tuple(bool(m) for m in output_mask)
    ctx.meta, tensors = pack(x, weights, biases, groups, shuffles, perms)
    ctx.save_for_backward(grad_y, x, input_index, *tensors)


def _flag(v) -> bool:
    return any(v) if isinstance(v, (list, tuple)) else bool(v)


def _perm_grads(meta: Meta):
    # register_autograd checks the returned structure against the inputs': a Tensor?[] holding
    # a None is one opaque argument, answered by a single None; a list of tensors by a list.
    return [None] * meta.num_layers if all(meta.perm_mask) else None


def make_forward_backward(family: Family):
    """The ``register_autograd`` backward of a ``chain_forward`` op (``family``: its raw ops)."""

    def backward(ctx, grad_y):
        meta = ctx.meta
        x, idx, *tensors = ctx.saved_tensors
        weights, biases, perms = unpack(meta, tensors, x)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [bool(need_x), _flag(need_w), _flag(need_b) and _present_biases(meta) > 0]
        gx, gw, gb = family.backward(grad_y, x, weights, biases, list(meta.groups),
                                     list(meta.shuffles), perms, mask, idx)
        grad_ws = split_weight_grads(gw, weights) if mask[1] else [None] * len(weights)
        grad_bs = split_bias_grads(gb, biases) if mask[2] else [None] * len(biases)
        out = ((gx if mask[0] else None), grad_ws, grad_bs, None, None, _perm_grads(meta))
        # The dispatcher drops trailing arguments equal to their default (input_index=None)
        # before torch.library's autograd records the inputs' structure: answer only what it
        # recorded.
        return out + (None,) if ctx.has_index else out

    return backward


def make_backward_backward(family: Family):
    """The ``register_autograd`` backward of a ``chain_backward`` op: the double backward."""

    def backward(ctx, agx, agw, agb):
        meta, mask = ctx.meta, ctx.mask
        dy, x, idx, *tensors = ctx.saved_tensors
        weights, biases, perms = unpack(meta, tensors, x)
        n = ctx.needs_input_grad
        need = (bool(n[0]), bool(n[1]), _flag(n[2]), _flag(n[3]))
        ax = agx if (mask[0] and agx is not None and agx.numel() == x.numel()) else None
        aws = split_weight_grads(agw, weights) if (mask[1] and agw is not None) \
            else [None] * len(weights)
        abs_ = split_bias_grads(agb, biases) if (mask[2] and agb is not None and len(biases)) \
            else [None] * len(biases)
        g_dy, g_x, g_ws, g_bs = backward_vjp(family, dy, x, weights, biases, list(meta.groups),
                                             list(meta.shuffles), perms, idx, ax, aws, abs_,
                                             need)
        out = (g_dy, g_x, g_ws, g_bs, None, None, _perm_grads(meta), None)
        return out + (None,) if ctx.has_index else out

    return backward


# ---------------------------------------------------------------------------------------------
# vmap rules of the raw ops
# ---------------------------------------------------------------------------------------------
def _batched(d) -> bool:
    if isinstance(d, (list, tuple)):
        return any(e is not None for e in d)
    return d is not None


def _select(arg, bdim, i):
    if isinstance(arg, (list, tuple)):
        dims = bdim if isinstance(bdim, (list, tuple)) else [bdim] * len(arg)
        return [_select(a, d, i) for a, d in zip(arg, dims)]
    if bdim is None or not isinstance(arg, torch.Tensor):
        return arg
    return arg.select(bdim, i)


def _loop(op, info, in_dims, args):
    """Batch by calling ``op`` once per batch entry (always correct)."""
    outs = [op(*[_select(a, d, i) for a, d in zip(args, in_dims)])
            for i in range(info.batch_size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    return tuple(torch.stack(list(o)) for o in zip(*outs)), (0,) * len(outs[0])


def _fold(t, bdim, batch):
    """``(B, N, ...)`` -> ``(B N, ...)`` with the batch dim first."""
    t = t.movedim(bdim, 0) if bdim is not None else t.unsqueeze(0).expand(batch, *t.shape)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def forward_vmap(op):
    def rule(info, in_dims, x, weights, biases, groups, shuffles, perms, input_index=None):
        args = (x, weights, biases, groups, shuffles, perms, input_index)
        if any(_batched(d) for d in in_dims[1:]):
            return _loop(op, info, in_dims, args)
        B = info.batch_size
        y = op(_fold(x, in_dims[0], B), weights, biases, groups, shuffles, perms, input_index)
        return y.reshape(B, y.shape[0] // B, *y.shape[1:]), 0

    return rule


def backward_vmap(op):
    def rule(info, in_dims, grad_y, x, weights, biases, groups, shuffles, perms, output_mask,
             input_index=None):
        args = (grad_y, x, weights, biases, groups, shuffles, perms, output_mask, input_index)
        if any(_batched(d) for d in in_dims[2:]) or output_mask[1] or output_mask[2]:
            return _loop(op, info, in_dims, args)
        B = info.batch_size
        gx, gw, gb = op(_fold(grad_y, in_dims[0], B), _fold(x, in_dims[1], B), weights, biases,
                        groups, shuffles, perms, output_mask, input_index)
        if output_mask[0]:
            gx = gx.reshape(B, gx.shape[0] // B, *gx.shape[1:])
        return (gx, gw, gb), (0 if output_mask[0] else None, None, None)

    return rule
