"""Fused Triton kernels of the interleaved group convolution chain, forward and backward.

Algorithm
---------
Positions (pixels or tokens) are independent, so a program owns a tile of ``BLOCK_P`` positions
and *all* channels. The tile of layer ``l`` lives in registers as a ``[BLOCK_P, S_l]`` float32
tensor, ``S_l = max(16, next_pow2(C_l))``; slot ``c`` holds channel ``c`` of ``u_l = W_l h_{l-1}
+ b_l`` (padding slots hold exact zeros). Nothing between ``x`` and ``y`` goes through device
memory:

* ``x`` is loaded once (``input_index`` folded into the load addresses: ``h_0[:, j] = x[:,
  idx[j]]``), ``y`` stored once (the last permutation folded into the store addresses:
  ``u_L[:, c]`` goes to channel ``perm_L^{-1}(c)`` of ``y``).
* A permutation between layers is never applied to data: layer ``l`` reads its input channel
  ``j`` from slot ``perm_{l-1}[j]`` of the previous tile. ``"interleave"`` is a closed-form
  index (``perm[j] = (j % G) m + j // G``), an explicit permutation a small index vector.
* Layer ``l`` has two implementations, chosen per layer (see ``_layer_fma`` / ``_layer_dot``):
  - FMA ("gather") path, any sizes: ``u[:, o] = sum_k W[o, k] h[:, perm(g(o) n + k)]``, one
    register gather (``tl.gather``) and one fused multiply-add per ``k < n_l``: ``n_l C_l``
    FMAs per position, the exact work of the grouped convolution.
  - dense ``tl.dot`` path, for small layers (``S_{l-1}, S_l <= 128``): the block-diagonal
    ``W_l`` with the previous permutation folded into its rows (``Wf[s, o] = W[o, perm^{-1}(s)
    - g(o) n]`` inside the group, 0 outside) times the tile: ``C_{l-1} C_l`` multiply-adds per
    position, ``G_l`` times the grouped work, but on tensor cores (16-bit inputs of layer 1,
    and float32 only where TF32 is allowed) and with no gather at all.
* fp32 accumulation always; intermediates stay float32 (never rounded to the storage dtype),
  except on the packed path of 16-bit chains, which rounds each packed layer's input and the
  gradients it multiplies to the storage dtype where the unfused chain in that dtype rounds
  them, for one tensor-core product per block (``_layer_packed``).
  ``tl.dot`` on float32 operands uses ``input_precision="ieee"`` unless
  the user allows TF32 for matmul (then ``"tf32"``; ``tf32_allowed``) or the opt-in
  ``IGC_TRITON_FP32_MMA=1`` is (then ``"bf16x6"``: three bfloat16 parts per operand, six
  tensor-core products; ``dot_precision``). The opt-in also offers float32 chains the packed
  path.

Forward: one program per tile, or, in the packed configurations with ``AHEAD`` (1 or 2), a
persistent grid whose programs walk the tiles as the backward's do, loading the x of the tile
``AHEAD`` tiles ahead before they compute their own (16-bit chains holding their packed layers'
weight blocks across the tiles, as the backward does).

Backward: a persistent grid of ``NPROG`` programs; program ``p`` walks tiles ``p, p + NPROG,
...`` in order. Per tile it loads ``x`` and ``dy`` once (``dy`` through the inverse of the last
permutation; in packed configurations each iteration loads the next tile's before it computes
its own, so those loads are in flight meanwhile), recomputes the forward on chip (keeping the
intermediates, or recomputing them layer by layer when ``KEEP=0``, an autotuned choice), walks
the layers backward and writes ``dx`` once (with ``input_index``, ``dx[:, c]`` sums ``dh_0[:,
j]`` over ``idx[j] == c`` in increasing ``j``, read from a host-built sorted order: no atomics).
``dW_l``/``db_l`` of the tile are added to the program's own float32 row of a ``[NPROG, sum C_l
n_l + sum C_l]`` partial buffer (no other program touches it); ``_reduce_partials`` then sums
the rows in a fixed order.
Deterministic: bitwise identical results run to run for a given launch configuration.

Budget per position (fp32 storage, ``C`` channels, ``L`` layers, ``n`` inputs per group):
forward reads ``4 C_0`` bytes and writes ``4 C_L``; ``sum n_l C_l`` FMAs (FMA path); backward
reads ``4 (C_0 + C_L)``, writes ``4 C_0``, ``~3 sum n_l C_l`` FMAs (recompute, dW, dh).

Limits: every channel count (``x``'s included) at most ``MAX_CHANNELS`` = 1024 (the tile of a
layer lives in registers); larger chains are refused by the backend with a reason, so
``backend="auto"`` falls back.

Two ``@triton.jit`` kernels serve every chain, ``igc_chain_fwd`` and ``igc_chain_bwd``. A
chain's *structure* (depth; per layer ``C``, ``G``, the kind of permutation in front of it,
bias or not; ``input_index`` or not) reaches them as compile-time arguments: constexpr tuples,
one per layer, over which ``tl.static_range`` unrolls the layers, so Triton compiles one
straight-line specialisation per structure with literal sizes. The batch size, the spatial
sizes and the strides are run-time arguments, never part of the structure.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

MAX_CHANNELS = 1024
# Largest padded channel count a layer may have on either side to be eligible for the dense
# tl.dot path: its folded weight tile is S_{l-1} x S_l float32 (64 KiB at 128 x 128).
DENSE_MAX_SLOTS = 128
# The forward's dot path also takes layers whose folded weight has at most this many slots
# (S_{l-1} x S_l; e.g. an IGCV3 expansion 64 -> 384 or its reduction 384 -> 64, two groups, 64 x
# 512), where the FMA path gathers every input of a group across a tile of 512 slots: sm_90,
# bf16, 16 positions on 4 warps, H200, NCHW, predicted 54% (expansion) and 39% (reduction)
# of copy bandwidth against 11% and 2% (tools/gpu_static.py, tools/perf_model.py). Not the
# backward's: its folded dW of that size spills (6 to 25 KB) in every configuration. (The
# packed path on tiles padded group by group, ``_padded_ends``, now takes those layers first in
# 16-bit chains, both directions.)
DENSE_MAX_FORWARD_SLOTS = 32768
# Largest block-diagonal weight (C_IN x MB values) of the packed path: 32768 is IGCV2(1024,
# 32)'s (1024 x 32), whose bf16 forward compiles without spills for sm_90 with both Tritons at
# 16 positions on 8 warps (with the launch's divisibility hints; without them it spilled 11 KB).
# Configurations that spill (e.g. the packed backward of C = 1024, whose dW blocks do not fit
# the registers) are pruned by the autotuner like any other (docs/backends.md).
PACK_MAX_WEIGHTS = 32768

# Permutation kinds (how the channels of one tile feed the next layer).
PK_IDENTITY, PK_SHUFFLE, PK_EXPLICIT = 0, 1, 2


# =============================================================================================
# Device helpers
# =============================================================================================
@triton.jit
def _tile_offsets(t, NI, O1, O2, s0, s1, s2, BLOCK_P: tl.constexpr):
    """Tile ``t`` -> (int64 offset of its outer index for strides (s0, s1, s2), inner positions,
    position mask). Positions are (o0, o1, o2, inner); a tile covers BLOCK_P inner positions."""
    nblk = tl.cdiv(NI, BLOCK_P)
    ob = t // nblk
    ib = t - ob * nblk
    o2 = ob % O2
    ob = ob // O2
    o1 = ob % O1
    o0 = ob // O1
    off = o0.to(tl.int64) * s0 + o1.to(tl.int64) * s1 + o2.to(tl.int64) * s2
    inner = ib * BLOCK_P + tl.arange(0, BLOCK_P)
    return off, inner, inner < NI


@triton.jit
def _outer_offset(t, NI, O1, O2, s0, s1, s2, BLOCK_P: tl.constexpr):
    nblk = tl.cdiv(NI, BLOCK_P)
    ob = t // nblk
    o2 = ob % O2
    ob = ob // O2
    o1 = ob % O1
    o0 = ob // O1
    return o0.to(tl.int64) * s0 + o1.to(tl.int64) * s1 + o2.to(tl.int64) * s2


@triton.jit
def _perm_src(j, mask, perm_ptr, PK: tl.constexpr, SG: tl.constexpr, SM: tl.constexpr):
    """``perm[j]``: the previous tile's slot that feeds input channel ``j`` (gather form).
    PK_SHUFFLE: channel shuffle with SG groups of SM channels. PK_EXPLICIT: a loaded entry,
    clamped to the SG channels of the tile (entries are validated before launch; the clamp
    keeps a direct call with bad values inside the tile)."""
    if PK == 1:
        src = (j % SG) * SM + j // SG
    elif PK == 2:
        src = tl.load(perm_ptr + j, mask=mask, other=0)
        src = tl.minimum(tl.maximum(src, 0), SG - 1)
    else:
        src = j
    return tl.where(mask, src, 0)


@triton.jit
def _perm_inv(c, mask, inv_ptr, PK: tl.constexpr, SG: tl.constexpr, SM: tl.constexpr):
    """``perm^{-1}[c]``: the input channel that reads slot ``c`` of the previous tile."""
    if PK == 1:
        dst = (c % SM) * SG + c // SM
    elif PK == 2:
        dst = tl.load(inv_ptr + c, mask=mask, other=0)
    else:
        dst = c
    return tl.where(mask, dst, 0)


@triton.jit
def _load_tile(ptr, off, inner, pmask, s_in, s_c, chan, cmask):
    """``[BLOCK_P, S]`` tile ``ptr[off + inner * s_in + chan * s_c]`` (0 where masked)."""
    ptrs = ptr + off + inner.to(tl.int64)[:, None] * s_in + chan.to(tl.int64)[None, :] * s_c
    return tl.load(ptrs, mask=pmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _store_tile(ptr, off, inner, pmask, s_in, s_c, chan, cmask, val):
    ptrs = ptr + off + inner.to(tl.int64)[:, None] * s_in + chan.to(tl.int64)[None, :] * s_c
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _group_slots(s, NS: tl.constexpr, N: tl.constexpr):
    """(channel, mask) of the slots ``s`` of a tile laid out group by group with padding: NS
    slots per group, the first N of them its channels (``Layer.ns`` / ``Layer.ms``)."""
    return (s // NS) * N + s % NS, (s % NS) < N


@triton.jit
def _load_input(x_ptr, off, inner, pmask, s_in, s_c, Z, idx_ptr,
                C0: tl.constexpr, S0: tl.constexpr, HAS_INDEX: tl.constexpr, C_X: tl.constexpr,
                IN_NS: tl.constexpr, N0: tl.constexpr):
    """``h_0`` in the storage dtype: ``x[:, idx[j]]`` (or ``x[:, j]``) in slot ``j``, or,
    ``IN_NS`` > 0 (the first layer packed on a padded tile, never behind an index), channel
    ``(s / IN_NS) N0 + s % IN_NS`` in slot ``s`` and 0 in the padding. Index entries are clamped
    to x's ``C_X`` channels (validated before launch; the clamp keeps a direct call with bad
    values inside x)."""
    j = tl.arange(0, S0)
    jm = j < C0
    if IN_NS:
        j, jm = _group_slots(j, IN_NS, N0)
    if HAS_INDEX:
        c = tl.load(idx_ptr + j, mask=jm, other=0)
        c = tl.minimum(tl.maximum(c, 0), C_X - 1)
    else:
        c = j
    return _load_tile(x_ptr, off, inner, pmask, s_in, s_c, c + Z, jm)


@triton.jit
def _out_channels(inv_ptr, LAYERS: tl.constexpr, NL: tl.constexpr, OUT_PK: tl.constexpr,
                  OUT_SG: tl.constexpr, OUT_SM: tl.constexpr, PACK: tl.constexpr):
    """(the channel of y that each slot of the last layer's tile goes to, through the inverse
    of the permutation after the last layer, ``inv_ptr`` where it is explicit, else None: a
    pointer handed to a call whose results address a store counts as written for
    torch.compile's analysis of the kernel, which then clones it; the slots' mask). With no
    permutation, the arange itself (its masked slots are masked where it is used): through
    ``_perm_inv``'s select the compiler no longer knew the channels contiguous, and IGCV2(256,
    8)'s channels-last y stores were 16-bit scalars. (The select stays in ``_perm_inv``:
    without it, triton 3.6.0 compiled IGCV2(256, 8)'s default bf16 backward with three times
    the shuffles.) ``PACK`` and the last layer packed on a padded tile (``Layer.ms``): slot
    ``s`` holds its output channel ``(s / MS) M + s % MS``, the padding none."""
    CL: tl.constexpr = LAYERS[NL - 1][1]
    SL: tl.constexpr = LAYERS[NL - 1][5]
    M: tl.constexpr = LAYERS[NL - 1][3]
    MS: tl.constexpr = LAYERS[NL - 1][23]
    c = tl.arange(0, SL)
    cm = c < CL
    if PACK and LAYERS[NL - 1][17] > 0 and MS != M:
        c, cm = _group_slots(c, MS, M)
    if OUT_PK == 0:
        chan = c
    else:
        chan = _perm_inv(c, cm, inv_ptr, OUT_PK, OUT_SG, OUT_SM)
    return chan, cm


@triton.jit
def _tile_x(t, ntiles, Z, x_ptr, idx_ptr, NI, O1, O2, xs0, xs1, xs2, xsi, xsc,
            C0: tl.constexpr, S0: tl.constexpr, HAS_INDEX: tl.constexpr, C_X: tl.constexpr,
            IN_NS: tl.constexpr, N0: tl.constexpr, BLOCK_P: tl.constexpr):
    """(``h_0`` of tile ``t``, its inner positions, their mask), all masked where ``t >=
    ntiles``; ``Z``: the tile loop's opaque 0 (added to the channel offsets), or 0."""
    xoff, inner, pm = _tile_offsets(t, NI, O1, O2, xs0, xs1, xs2, BLOCK_P)
    pm = inner < tl.where(t < ntiles, NI, 0)
    a = _load_input(x_ptr, xoff, inner, pm, xsi, xsc, Z, idx_ptr, C0, S0, HAS_INDEX, C_X,
                    IN_NS, N0)
    return a, inner, pm


@triton.jit
def _tile_x_dy(t, ntiles, Z, x_ptr, dy_ptr, idx_ptr, NI, O1, O2, xs0, xs1, xs2, xsi, xsc,
               gs0, gs1, gs2, gsi, gsc, chan, cm, C0: tl.constexpr, S0: tl.constexpr,
               HAS_INDEX: tl.constexpr, C_X: tl.constexpr, IN_NS: tl.constexpr,
               N0: tl.constexpr, BLOCK_P: tl.constexpr):
    """``h_0`` and ``dy`` (output channels ``chan``) of tile ``t``, all masked where ``t >=
    ntiles``; ``Z``: the tile loop's opaque 0 (added to the channel offsets), or 0."""
    a, inner, pm = _tile_x(t, ntiles, Z, x_ptr, idx_ptr, NI, O1, O2, xs0, xs1, xs2, xsi, xsc,
                           C0, S0, HAS_INDEX, C_X, IN_NS, N0, BLOCK_P)
    goff = _outer_offset(t, NI, O1, O2, gs0, gs1, gs2, BLOCK_P)
    return a, _load_tile(dy_ptr, goff, inner, pm, gsi, gsc, chan + Z, cm)


@triton.jit
def _layer_fma(h, w_ptr, b_ptr, perm_ptr,
               N: tl.constexpr, M: tl.constexpr, C_OUT: tl.constexpr, S_OUT: tl.constexpr,
               PK: tl.constexpr, SG: tl.constexpr, SM: tl.constexpr, HAS_BIAS: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """``u[:, o] = sum_k W[o, k] h[:, perm(g(o) N + k)] (+ b[o])`` with one gather and one FMA
    per k. ``h``: ``[BLOCK_P, S_IN]`` (any float dtype); returns ``[BLOCK_P, S_OUT]`` float32."""
    h = h.to(tl.float32)
    o = tl.arange(0, S_OUT)
    om = o < C_OUT
    base = (o // M) * N
    acc = tl.zeros((BLOCK_P, S_OUT), dtype=tl.float32)
    for k in range(N):
        src = _perm_src(base + k, om, perm_ptr, PK, SG, SM)
        hk = tl.gather(h, tl.broadcast_to(src[None, :], (BLOCK_P, S_OUT)), axis=1)
        wk = tl.load(w_ptr + o * N + k, mask=om, other=0.0).to(tl.float32)
        acc += hk * wk[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=om, other=0.0).to(tl.float32)[None, :]
    # padding slots exactly 0 even when a masked weight met a non-finite input
    return tl.where(om[None, :], acc, 0.0)


@triton.jit
def _folded_weight(w_ptr, inv_ptr, N: tl.constexpr, M: tl.constexpr, C_IN: tl.constexpr,
                   C_OUT: tl.constexpr, S_IN: tl.constexpr, S_OUT: tl.constexpr,
                   PK: tl.constexpr, SG: tl.constexpr, SM: tl.constexpr):
    """``[S_IN, S_OUT]`` block-diagonal ``W^T`` with the incoming permutation folded into its
    rows: ``Wf[s, o] = W[o, perm^{-1}(s) - g(o) N]`` when that is in o's group, else 0."""
    s = tl.arange(0, S_IN)
    o = tl.arange(0, S_OUT)
    sm = s < C_IN
    j = _perm_inv(s, sm, inv_ptr, PK, SG, SM)
    k = j[:, None] - ((o // M) * N)[None, :]
    valid = sm[:, None] & (o < C_OUT)[None, :] & (k >= 0) & (k < N)
    return tl.load(w_ptr + o[None, :] * N + k, mask=valid, other=0.0)


@triton.jit
def _layer_dot(h, w_ptr, b_ptr, inv_ptr,
               N: tl.constexpr, M: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr,
               S_IN: tl.constexpr, S_OUT: tl.constexpr, PK: tl.constexpr, SG: tl.constexpr,
               SM: tl.constexpr, HAS_BIAS: tl.constexpr, NATIVE: tl.constexpr,
               PREC: tl.constexpr):
    """The same layer as one ``tl.dot`` with the folded block-diagonal weight. NATIVE: ``h``
    and ``W`` are 16-bit storage values (layer 1): exact products on tensor cores."""
    wf = _folded_weight(w_ptr, inv_ptr, N, M, C_IN, C_OUT, S_IN, S_OUT, PK, SG, SM)
    if NATIVE:
        acc = tl.dot(h, wf.to(h.dtype), out_dtype=tl.float32)
    else:
        acc = tl.dot(h.to(tl.float32), wf.to(tl.float32), input_precision=PREC,
                     out_dtype=tl.float32)
    o = tl.arange(0, S_OUT)
    om = o < C_OUT
    if HAS_BIAS:
        acc += tl.load(b_ptr + o, mask=om, other=0.0).to(tl.float32)[None, :]
    return tl.where(om[None, :], acc, 0.0)


@triton.jit
def _packed_dot(a, b, MODE: tl.constexpr, PREC: tl.constexpr):
    """Batched ``a @ b`` (``[B, P, K] x [B, K, O]``) accumulated in float32, one operand
    storage-dtype weights. MODE 0: float32 operands (``PREC``: exact "ieee", "tf32" when the
    user allows it for matmul, "bf16x6" with the opt-in ``IGC_TRITON_FP32_MMA=1``); 1 (16-bit
    chains): ``a`` rounded to the storage dtype (16-bit storage values are already), one
    tensor-core product of exact 16-bit products."""
    if MODE == 0:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC,
                     out_dtype=tl.float32)
    else:
        acc = tl.dot(a.to(b.dtype), b, out_dtype=tl.float32)
    return acc


# The packed backward's blocks and weight offsets (``_layer_packed`` keeps its own copy of the
# same code: routed through these helpers, its sm_90 build of IGCV2(512, 8) in bf16 went from
# 247 registers to 255 and spilled 24 bytes).
@triton.jit
def _packed_blocks(h, perm_ptr, C_IN: tl.constexpr, KB: tl.constexpr, PK: tl.constexpr,
                   SG: tl.constexpr, SM: tl.constexpr, BLOCK_P: tl.constexpr):
    """The packed path's input: the incoming permutation applied to the ``[BLOCK_P, C_IN]``
    tile (a shuffle is a reshape and a transpose, an explicit one a single gather), viewed as
    ``[C_IN / KB, BLOCK_P, KB]`` blocks."""
    if PK == 1:
        h = tl.reshape(tl.permute(tl.reshape(h, (BLOCK_P, SG, SM)), (0, 2, 1)), (BLOCK_P, C_IN))
    elif PK == 2:
        j = tl.arange(0, C_IN)
        src = _perm_src(j, j < C_IN, perm_ptr, PK, SG, SM)
        h = tl.gather(h, tl.broadcast_to(src[None, :], (BLOCK_P, C_IN)), axis=1)
    NB: tl.constexpr = C_IN // KB
    return tl.permute(tl.reshape(h, (BLOCK_P, NB, KB)), (1, 0, 2))


@triton.jit
def _packed_weight_offsets(N: tl.constexpr, M: tl.constexpr, C_IN: tl.constexpr,
                           KB: tl.constexpr, MB: tl.constexpr, Z, NS: tl.constexpr,
                           MS: tl.constexpr):
    """``(o * N + kk, in-group mask)`` of the ``[C_IN / KB, KB, MB]`` block-diagonal weight
    blocks (``C_IN``: the input tile's slots): block b holds inputs ``b KB ..`` and outputs
    ``b MB ..``; ``W[o, kk]`` sits at input ``g(o) N + kk``. On padded tiles (``NS`` slots per
    group on the input, ``MS`` on the output; N and M where the channels are in order) output
    slot ``o`` is channel ``g M + o % MS`` of group ``g = o / MS``, and the padding gets none."""
    NB: tl.constexpr = C_IN // KB
    b = tl.arange(0, NB)[:, None, None] + Z
    k = b * KB + tl.arange(0, KB)[None, :, None]  # input slot
    o = b * MB + tl.arange(0, MB)[None, None, :]  # output slot
    if NS == N and MS == M:
        kk = k - (o // M) * N
        off = o * N + kk
        mask = (kk >= 0) & (kk < N)
    else:
        g = o // MS
        j = o - g * MS
        kk = k - g * NS
        off = (g * M + j) * N + kk
        mask = (kk >= 0) & (kk < N) & (j < M)
    return off, mask


@triton.jit
def _grad_dot(a, b, DT: tl.constexpr, ROUND16: tl.constexpr, PREC: tl.constexpr):
    """Batched ``a @ b`` of two float32 operands accumulated in float32. ROUND16 (16-bit
    chains): both rounded to ``DT``, one tensor-core product; else float32 operands
    (``PREC``)."""
    if ROUND16:
        acc = tl.dot(a.to(DT), b.to(DT), out_dtype=tl.float32)
    else:
        acc = tl.dot(a, b, input_precision=PREC, out_dtype=tl.float32)
    return acc


@triton.jit
def _grad_dot_t(dubt, hb, DT: tl.constexpr, ROUND16: tl.constexpr, PREC: tl.constexpr):
    """``dW_b = h_b^T du_b`` (``[NB, KB, MB]``) of ``dubt`` (``du_b^T``, ``[NB, MB, BLOCK_P]``)
    and ``hb`` (``[NB, BLOCK_P, KB]``), as the transposed product ``du_b^T h_b``
    (``_layer_packed_bwd``)."""
    return tl.permute(_grad_dot(dubt, hb, DT, ROUND16, PREC), (0, 2, 1))


@triton.jit
def _layer_packed(h, wb, HOLD: tl.constexpr, w_ptr, b_ptr, perm_ptr, Z,
                  N: tl.constexpr, M: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr,
                  KB: tl.constexpr, MB: tl.constexpr, PK: tl.constexpr, SG: tl.constexpr,
                  SM: tl.constexpr, HAS_BIAS: tl.constexpr, MODE: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_P: tl.constexpr, NS: tl.constexpr,
                  MS: tl.constexpr):
    """The layer as tensor-core products on packed groups: the incoming permutation applied to
    the tile (a shuffle is a reshape and a transpose of the register tile, an explicit one a
    single gather), the ``[BLOCK_P, C_IN]`` tile viewed as ``C_IN / KB`` blocks of ``KB``
    channels, each multiplied by its ``[KB, MB]`` block of the block-diagonal weight (``KB / N``
    whole groups per block; ``wb`` where the program holds it, ``HOLD``, else loaded here), one
    batched ``tl.dot``. ``C_IN`` and ``C_OUT`` are the tiles' slots: the channels in order, or
    (the chain's ends, ``NS`` / ``MS`` slots per group where they differ from N / M) group by
    group with padding, which gets no weight (``_packed_weight_offsets``). MODE 1 (16-bit
    chains): the tile rounded to the storage dtype first (where the unfused chain rounds the
    previous layer's output), so the permutation moves 16-bit values and one product per block
    does. Returns ``[BLOCK_P, C_OUT]`` float32."""
    if MODE != 0:
        h = h.to(w_ptr.dtype.element_ty)
    if PK == 1:
        h = tl.reshape(tl.permute(tl.reshape(h, (BLOCK_P, SG, SM)), (0, 2, 1)), (BLOCK_P, C_IN))
    elif PK == 2:
        j = tl.arange(0, C_IN)
        src = _perm_src(j, j < C_IN, perm_ptr, PK, SG, SM)
        h = tl.gather(h, tl.broadcast_to(src[None, :], (BLOCK_P, C_IN)), axis=1)
    NB: tl.constexpr = C_IN // KB
    hb = tl.permute(tl.reshape(h, (BLOCK_P, NB, KB)), (1, 0, 2))  # [NB, BLOCK_P, KB]
    if not HOLD:
        if NS == N and MS == M:
            b = tl.arange(0, NB)[:, None, None] + Z
            k = b * KB + tl.arange(0, KB)[None, :, None]  # input channel
            o = b * MB + tl.arange(0, MB)[None, None, :]  # output channel
            g = o // M
            kk = k - g * N
            wb = tl.load(w_ptr + o * N + kk, mask=(kk >= 0) & (kk < N), other=0.0)
        else:  # padded tiles (the chain's ends only: these blocks are not used elsewhere)
            woff, wmask = _packed_weight_offsets(N, M, C_IN, KB, MB, Z, NS, MS)
            wb = tl.load(w_ptr + woff, mask=wmask, other=0.0)  # [NB, KB, MB]
    acc = _packed_dot(hb, wb, MODE, PREC)  # [NB, BLOCK_P, MB]
    acc = tl.reshape(tl.permute(acc, (1, 0, 2)), (BLOCK_P, C_OUT))
    if HAS_BIAS:
        if MS == M:
            acc += tl.load(b_ptr + tl.arange(0, C_OUT)).to(tl.float32)[None, :]
        else:
            o, om = _group_slots(tl.arange(0, C_OUT), MS, M)
            acc += tl.load(b_ptr + o, mask=om, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _layer_packed_bwd(du, h, acc, wb, HOLD: tl.constexpr, DW_MODE: tl.constexpr, w_ptr,
                      perm_ptr, inv_ptr, pw_ptr, pb_ptr, Z, N: tl.constexpr, M: tl.constexpr,
                      C_IN: tl.constexpr, C_OUT: tl.constexpr, KB: tl.constexpr, MB: tl.constexpr,
                      PK: tl.constexpr, SG: tl.constexpr, SM: tl.constexpr,
                      NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                      ROUND16: tl.constexpr, PREC: tl.constexpr, BLOCK_P: tl.constexpr,
                      SPLIT: tl.constexpr, NS: tl.constexpr, MS: tl.constexpr):
    """Backward of ``_layer_packed`` on the same blocks: ``dW_b = h_b^T du_b`` and ``dh_b =
    du_b W_b^T``, one batched ``tl.dot`` each, computed transposed (``dW_b^T = du_b^T h_b``,
    ``dh_b^T = W_b du_b^T``): every operand then has the orientation of a copy in shared
    memory that another product reads too, so the compiler writes each once per tile (``h_b``:
    the recomputed forward's A operand; ``du_b^T``: one copy for both products; ``W_b``: the
    forward's held blocks). As ``h_b^T du_b`` and ``du_b W_b^T`` they took two more tile
    copies per layer, and IGCV2(256, 8)'s bf16 backward moved 22% more bytes through shared
    memory. Not with ``SPLIT``: its dW products take halves of the blocks, new values with
    copies of their own either way, and transposed, IGCV2(1024, 32)'s ``SPLIT`` = 4 build
    went from 248 registers to 255 and spilled 16 bytes. Nor where the blocks are taller than
    wide (``KB > MB``): transposed, the IGCV3 reduction's blocks of 256 x 32 (bf16, 16
    positions on 8 warps, two tiles ahead) took 254 registers instead of 228 in NCHW and
    spilled in channels-last. Nor, in 16-bit chains, where they are wider than tall (float32
    ones gain there: the CondenseNet-like layer's 16 x 32 blocks, 237 registers -> 128):
    transposed, the CondenseNet-like layer's bf16 build (16 positions on 8 warps) took 144
    registers instead of 124 with triton 3.6.0, and the IGCV3 expansion's (32 x 256)
    channels-last build 232 instead of 229 with 3.9.0. Then the permutation undone on the
    tile (a shuffle's inverse reshape / transpose, an explicit one's inverse gather). ``HOLD``
    (16-bit chains): the program holds the layer's weight blocks ``wb`` across its tiles
    (``_w_blocks``), else they are loaded here. ``DW_MODE``: where ``dW_b`` goes: 1, added to
    the dW blocks ``acc`` that the program holds across its tiles (``_dw_blocks``); 2, added to
    the partial row at ``pw_ptr`` by reductions in L2 (``tl.atomic_add`` with no result: the
    row is the program's own and each element has one owning thread, whose adds take effect in
    program order, so the sums are the read-add-write's, in the same order; red.add flushes
    subnormal partial sums to zero), as ``SPLIT`` products of consecutive blocks
    (``_dw_red_split``); 0, read, added and written back (``_rmw_add``). ROUND16
    (16-bit chains): ``du`` and ``h`` rounded to the storage dtype first, as the forward
    rounds the layer's input and the unfused chain rounds every gradient (db sums the rounded
    ``du`` too). ``C_IN`` and ``C_OUT`` are the tiles' slots (``_layer_packed``; ``du`` is 0
    in the padding of a padded one). Returns ``(dh, acc)``."""
    NB: tl.constexpr = C_IN // KB
    DT: tl.constexpr = w_ptr.dtype.element_ty
    if ROUND16:
        dus = du.to(DT)
    else:
        dus = du
    # the transposed products, or (SPLIT, blocks taller than wide, 16-bit blocks wider than
    # tall) as written above
    TRANS: tl.constexpr = (SPLIT <= 1) and ((KB == MB) or ((KB < MB) and (not ROUND16)))
    if TRANS:
        dubt = tl.permute(tl.reshape(dus, (BLOCK_P, NB, MB)), (1, 2, 0))  # [NB, MB, BLOCK_P]
    else:
        dub = tl.permute(tl.reshape(dus, (BLOCK_P, NB, MB)), (1, 0, 2))  # [NB, BLOCK_P, MB]
    woff, wmask = _packed_weight_offsets(N, M, C_IN, KB, MB, Z, NS, MS)
    if NEED_DW:
        if ROUND16:
            hs = h.to(DT)
        else:
            hs = h.to(tl.float32)
        hb = _packed_blocks(hs, perm_ptr, C_IN, KB, PK, SG, SM, BLOCK_P)
        if DW_MODE == 2 and SPLIT > 1:
            _dw_red_split(tl.permute(hb, (0, 2, 1)), dub, pw_ptr, Z, N, M, KB, MB, DT, ROUND16,
                          PREC, BLOCK_P, SPLIT, NS, MS)
        else:
            if TRANS:
                dwb = _grad_dot_t(dubt, hb, DT, ROUND16, PREC)  # [NB, KB, MB]
            else:
                dwb = _grad_dot(tl.permute(hb, (0, 2, 1)), dub, DT, ROUND16, PREC)
            if DW_MODE == 1:
                acc = acc + dwb
            elif DW_MODE == 2:
                tl.atomic_add(pw_ptr + woff, dwb, mask=wmask, sem="relaxed")
            else:
                _rmw_add(pw_ptr + woff, wmask, dwb)
    if NEED_DB:
        c = tl.arange(0, C_OUT)
        cm = c < C_OUT
        if MS != M:
            c, cm = _group_slots(c, MS, M)
        _rmw_add(pb_ptr + c, cm, tl.sum(dus.to(tl.float32), axis=0))
    dh = tl.zeros((BLOCK_P, C_IN), dtype=tl.float32)
    if NEED_DH:
        if not HOLD:
            wb = tl.load(w_ptr + woff, mask=wmask, other=0.0)  # [NB, KB, MB] storage dtype
        if not TRANS:
            dhb = _packed_dot(dub, tl.permute(wb, (0, 2, 1)), 1 if ROUND16 else 0, PREC)
            dh = tl.reshape(tl.permute(dhb, (1, 0, 2)), (BLOCK_P, C_IN))  # d(permuted input)
        else:
            dht = _packed_dot(wb, dubt, 1 if ROUND16 else 0, PREC)  # [NB, KB, BLOCK_P]
            dh = tl.reshape(tl.permute(dht, (2, 0, 1)), (BLOCK_P, C_IN))
        if PK == 1:  # undo the shuffle: the forward's reshape / transpose inverted
            dh = tl.reshape(tl.permute(tl.reshape(dh, (BLOCK_P, SM, SG)), (0, 2, 1)),
                            (BLOCK_P, C_IN))
        elif PK == 2:  # dh[:, s] = d(permuted)[:, perm^-1(s)]
            s = tl.arange(0, C_IN)
            j = _perm_inv(s, s < C_IN, inv_ptr, PK, SG, SM)
            dh = tl.gather(dh, tl.broadcast_to(j[None, :], (BLOCK_P, C_IN)), axis=1)
    return dh, acc


@triton.jit
def _halves(t, A: tl.constexpr, B: tl.constexpr):
    """The two halves of ``[NB, A, B]`` blocks along their first axis (blocks ``0 .. NB / 2``
    and the rest)."""
    NB: tl.constexpr = t.shape[0]
    return tl.split(tl.permute(tl.reshape(t, (2, NB // 2, A, B)), (1, 2, 3, 0)))


@triton.jit
def _dw_red(hbt, dub, pw_ptr, Z, N: tl.constexpr, M: tl.constexpr, KB: tl.constexpr,
            MB: tl.constexpr, DT: tl.constexpr, ROUND16: tl.constexpr, PREC: tl.constexpr,
            NS: tl.constexpr, MS: tl.constexpr):
    """``dW_b = h_b^T du_b`` of consecutive blocks (``hbt`` ``[NB, KB, BLOCK_P]``, ``dub``
    ``[NB, BLOCK_P, MB]``) added by reductions to the row at ``pw_ptr`` (their first block's
    weights)."""
    NB: tl.constexpr = hbt.shape[0]
    woff, wmask = _packed_weight_offsets(N, M, NB * KB, KB, MB, Z, NS, MS)
    tl.atomic_add(pw_ptr + woff, _grad_dot(hbt, dub, DT, ROUND16, PREC), mask=wmask,
                  sem="relaxed")


@triton.jit
def _dw_red_split(hbt, dub, pw_ptr, Z, N: tl.constexpr, M: tl.constexpr, KB: tl.constexpr,
                  MB: tl.constexpr, DT: tl.constexpr, ROUND16: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_P: tl.constexpr, SPLIT: tl.constexpr,
                  NS: tl.constexpr, MS: tl.constexpr):
    """``_dw_red`` in ``SPLIT`` (1, 2 or 4) products of consecutive blocks, one after the other,
    so one product's float32 output is live at a time (the whole layer's is as large as its
    weights: IGCV2(1024, 32)'s holds 128 values per thread on 8 warps). The same products and
    sums as one ``_dw_red``: the blocks are independent."""
    NB: tl.constexpr = hbt.shape[0]
    # weights per block (KB / NS whole groups of M x N): MB * N where the tiles are in order
    BW: tl.constexpr = (KB // NS) * M * N
    if SPLIT > 1 and NB % SPLIT == 0:
        H: tl.constexpr = NB // 2
        hlo, hhi = _halves(hbt, KB, BLOCK_P)
        dlo, dhi = _halves(dub, BLOCK_P, MB)
        if SPLIT == 4:
            hlo0, hlo1 = _halves(hlo, KB, BLOCK_P)
            dlo0, dlo1 = _halves(dlo, BLOCK_P, MB)
            _dw_red(hlo0, dlo0, pw_ptr, Z, N, M, KB, MB, DT, ROUND16, PREC, NS, MS)
            _dw_red(hlo1, dlo1, pw_ptr + (H // 2) * BW, Z, N, M, KB, MB, DT, ROUND16, PREC, NS, MS)
            hhi0, hhi1 = _halves(hhi, KB, BLOCK_P)
            dhi0, dhi1 = _halves(dhi, BLOCK_P, MB)
            _dw_red(hhi0, dhi0, pw_ptr + H * BW, Z, N, M, KB, MB, DT, ROUND16, PREC, NS, MS)
            _dw_red(hhi1, dhi1, pw_ptr + (H + H // 2) * BW, Z, N, M, KB, MB, DT, ROUND16,
                    PREC, NS, MS)
        else:
            _dw_red(hlo, dlo, pw_ptr, Z, N, M, KB, MB, DT, ROUND16, PREC, NS, MS)
            _dw_red(hhi, dhi, pw_ptr + H * BW, Z, N, M, KB, MB, DT, ROUND16, PREC, NS, MS)
    else:
        _dw_red(hbt, dub, pw_ptr, Z, N, M, KB, MB, DT, ROUND16, PREC, NS, MS)


@triton.jit
def _rmw_add(ptrs, mask, val):
    """``*ptrs += val`` on this program's private partial row (no other program writes it)."""
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + val, mask=mask)


@triton.jit
def _layer_fma_bwd(du, h, w_ptr, perm_ptr, inv_ptr, pw_ptr, pb_ptr,
                   N: tl.constexpr, M: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr,
                   S_IN: tl.constexpr, S_OUT: tl.constexpr, PK: tl.constexpr, SG: tl.constexpr,
                   SM: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr,
                   NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_P: tl.constexpr):
    """Backward of ``_layer_fma``. ``du``: gradient of ``u`` [BLOCK_P, S_OUT] float32 (0 in
    padding); ``h``: the layer's input tile. Adds the tile's dW / db to the partial row and
    returns the gradient of the previous tile (slots of ``h``)."""
    o = tl.arange(0, S_OUT)
    om = o < C_OUT
    if NEED_DW:
        hf = h.to(tl.float32)
        base = (o // M) * N
        for k in range(N):
            src = _perm_src(base + k, om, perm_ptr, PK, SG, SM)
            hk = tl.gather(hf, tl.broadcast_to(src[None, :], (BLOCK_P, S_OUT)), axis=1)
            _rmw_add(pw_ptr + o * N + k, om, tl.sum(du * hk, axis=0))
    if NEED_DB:
        _rmw_add(pb_ptr + o, om, tl.sum(du, axis=0))
    dh = tl.zeros((BLOCK_P, S_IN), dtype=tl.float32)
    if NEED_DH:
        s = tl.arange(0, S_IN)
        sm = s < C_IN
        j = _perm_inv(s, sm, inv_ptr, PK, SG, SM)
        g = j // N
        ks = j - g * N
        for i in range(M):
            oo = tl.where(sm, g * M + i, 0)
            dui = tl.gather(du, tl.broadcast_to(oo[None, :], (BLOCK_P, S_IN)), axis=1)
            wv = tl.load(w_ptr + oo * N + ks, mask=sm, other=0.0).to(tl.float32)
            dh += dui * wv[None, :]
    return dh


@triton.jit
def _layer_dot_bwd(du, h, w_ptr, perm_ptr, inv_ptr, pw_ptr, pb_ptr,
                   N: tl.constexpr, M: tl.constexpr, C_IN: tl.constexpr, C_OUT: tl.constexpr,
                   S_IN: tl.constexpr, S_OUT: tl.constexpr, NP: tl.constexpr,
                   PK: tl.constexpr, SG: tl.constexpr, SM: tl.constexpr,
                   NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                   PREC: tl.constexpr, BLOCK_P: tl.constexpr):
    """Backward of ``_layer_dot``: ``dh = du Wf^T``, ``dWf = h^T du`` (then the in-group entries
    of dWf are gathered back to W's ``(C_OUT, N)`` layout), ``db = sum du``."""
    o = tl.arange(0, S_OUT)
    om = o < C_OUT
    wf = _folded_weight(w_ptr, inv_ptr, N, M, C_IN, C_OUT, S_IN, S_OUT, PK, SG, SM)
    wf = wf.to(tl.float32)
    if NEED_DW:
        dwf = tl.dot(tl.trans(h.to(tl.float32)), du, input_precision=PREC, out_dtype=tl.float32)
        kk = tl.arange(0, NP)
        valid = (kk[:, None] < N) & om[None, :]
        src = _perm_src(((o // M) * N)[None, :] + kk[:, None], valid, perm_ptr, PK, SG, SM)
        dw = tl.gather(dwf, src, axis=0)  # [NP, S_OUT]: dW[o, k]
        _rmw_add(pw_ptr + o[None, :] * N + kk[:, None], valid, dw)
    if NEED_DB:
        _rmw_add(pb_ptr + o, om, tl.sum(du, axis=0))
    dh = tl.zeros((BLOCK_P, S_IN), dtype=tl.float32)
    if NEED_DH:
        dh = tl.dot(du, tl.trans(wf), input_precision=PREC, out_dtype=tl.float32)
    return dh


@triton.jit
def _index_grad(dh0, order_ptr, start_ptr, count_ptr, C_X: tl.constexpr, S_X: tl.constexpr,
                BLOCK_P: tl.constexpr):
    """``dx[:, c] = sum_{j: idx[j] == c} dh0[:, j]`` in increasing j (``order`` lists the j
    sorted by ``idx[j]``, stable; ``start``/``count`` delimit channel c's run)."""
    c = tl.arange(0, S_X)
    cm = c < C_X
    st = tl.load(start_ptr + c, mask=cm, other=0)
    cnt = tl.load(count_ptr + c, mask=cm, other=0)
    acc = tl.zeros((BLOCK_P, S_X), dtype=tl.float32)
    for r in range(0, tl.max(cnt, axis=0)):
        has = cm & (r < cnt)
        j = tl.load(order_ptr + st + r, mask=has, other=0)
        v = tl.gather(dh0, tl.broadcast_to(j[None, :], (BLOCK_P, S_X)), axis=1)
        acc += tl.where(has[None, :], v, 0.0)
    return acc


@triton.jit
def _reduce_partials(part_ptr, gw_ptr, gb_ptr, R, WT, BT, ROW, BLOCK: tl.constexpr):
    """Sum the R partial rows in row order (deterministic): ``gw = sum_r part[r, :WT]``,
    ``gb = sum_r part[r, WT:WT + BT]``."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < WT + BT
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for r in range(R):
        acc += tl.load(part_ptr + r * ROW + e, mask=m, other=0.0)
    tl.store(gw_ptr + e, acc.to(gw_ptr.dtype.element_ty), mask=e < WT)
    tl.store(gb_ptr + (e - WT), acc.to(gb_ptr.dtype.element_ty), mask=m & (e >= WT))


INTERPRETED = type(_reduce_partials).__name__ == "InterpretedFunction"


# =============================================================================================
# The chain kernels
# =============================================================================================
# A chain's structure reaches the kernels as compile-time constants (``Structure.meta``): one
# tuple per layer in ``LAYERS`` (fields in the order of ``LAYER_FIELDS``, unpacked by the
# ``_fwd_layer`` / ``_bwd_layer`` helpers) and a few chain-wide values. ``tl.static_range``
# unrolls the layers, so each layer's tile keeps its own static shape and the code is the
# straight line that the structure implies. Pointers are plain arguments, never tuples of
# tensors (``torch.library.wrap_triton`` keeps tuple arguments as constants, which is right for
# the constexpr tuples and wrong for tensors): the weights and biases of chains of at most
# ``POINTER_SLOTS`` layers take one argument each (``w0``.., ``b0``..), deeper chains pass all of
# them concatenated in slot 0 with each layer's offset; every explicit permutation and its
# inverse share one int32 buffer, ``perm_ptr``. A layer's ``dense_ok`` is 2 where the dot path
# takes it in both directions (``Layer.dense_eligible``), 1 where only the forward's does
# (``Layer.dense_forward_eligible``), else 0.
POINTER_SLOTS = 8
LAYER_FIELDS = ("c_in", "c_out", "n", "m", "s_in", "s_out", "pk", "sg", "sm", "bias",
                "w_slot", "w_at", "b_slot", "b_at", "p_at", "q_at", "dense_ok", "kb", "mb",
                "np", "w_off", "b_off", "ns", "ms")


@triton.jit
def _fwd_layer(h, wb, HOLD: tl.constexpr, WP, BP, perm_ptr, Z, LAYERS: tl.constexpr,
               I: tl.constexpr, NATIVE16: tl.constexpr, DENSE: tl.constexpr,
               PACK: tl.constexpr, PREC: tl.constexpr, BLOCK_P: tl.constexpr):
    """Layer ``I`` of the chain: ``u_I`` from tile ``h`` on the packed path (``PACK`` and the
    layer packs; ``wb`` its weight blocks where the program holds them, ``HOLD``), the dot path
    (``DENSE`` and the layer is eligible: its ``dense_ok`` field at least ``DENSE``, which the
    forward kernel passes as 1 and the backward's recomputed forward as 2, the layers whose
    backward takes the dot path too) or the FMA path."""
    C_IN: tl.constexpr = LAYERS[I][0]
    C_OUT: tl.constexpr = LAYERS[I][1]
    N: tl.constexpr = LAYERS[I][2]
    M: tl.constexpr = LAYERS[I][3]
    S_IN: tl.constexpr = LAYERS[I][4]
    S_OUT: tl.constexpr = LAYERS[I][5]
    PK: tl.constexpr = LAYERS[I][6]
    SG: tl.constexpr = LAYERS[I][7]
    SM: tl.constexpr = LAYERS[I][8]
    BIAS: tl.constexpr = LAYERS[I][9]
    W_SLOT: tl.constexpr = LAYERS[I][10]
    W_AT: tl.constexpr = LAYERS[I][11]
    B_SLOT: tl.constexpr = LAYERS[I][12]
    B_AT: tl.constexpr = LAYERS[I][13]
    P_AT: tl.constexpr = LAYERS[I][14]
    Q_AT: tl.constexpr = LAYERS[I][15]
    DENSE_OK: tl.constexpr = LAYERS[I][16]
    KB: tl.constexpr = LAYERS[I][17]
    MB: tl.constexpr = LAYERS[I][18]
    NS: tl.constexpr = LAYERS[I][22]
    MS: tl.constexpr = LAYERS[I][23]
    w_ptr = WP[W_SLOT] + W_AT + Z
    if BIAS:
        b_ptr = BP[B_SLOT] + B_AT + Z
    else:
        b_ptr = None
    if PK == 2:
        p_ptr = perm_ptr + P_AT
        q_ptr = perm_ptr + Q_AT
    else:
        p_ptr = None
        q_ptr = None
    # 16-bit storage: the dot path's layer 1 multiplies the storage values (exact products);
    # the packed path rounds every layer's input to the storage dtype (the unfused chain's
    # rounding) and multiplies 16-bit values
    NATIVE: tl.constexpr = NATIVE16 and I == 0
    if PACK and KB > 0:
        MODE: tl.constexpr = 1 if NATIVE16 else 0
        u = _layer_packed(h, wb, HOLD, w_ptr, b_ptr, p_ptr, Z, N, M, S_IN, S_OUT, KB, MB, PK, SG,
                          SM, BIAS, MODE, PREC, BLOCK_P, NS, MS)
    elif DENSE and DENSE_OK >= DENSE:
        u = _layer_dot(h, w_ptr, b_ptr, q_ptr, N, M, C_IN, C_OUT, S_IN, S_OUT, PK, SG, SM, BIAS,
                       NATIVE, PREC)
    else:
        u = _layer_fma(h, w_ptr, b_ptr, p_ptr, N, M, C_OUT, S_OUT, PK, SG, SM, BIAS, BLOCK_P)
    return u


@triton.jit
def _bwd_layer(g, h, acc, wb, HOLD: tl.constexpr, DW_MODE: tl.constexpr, WP, perm_ptr, prow,
               Z, LAYERS: tl.constexpr,
               I: tl.constexpr, W_TOTAL: tl.constexpr, NATIVE16: tl.constexpr,
               NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
               DENSE: tl.constexpr, PACK: tl.constexpr, PREC: tl.constexpr,
               BLOCK_P: tl.constexpr, SPLIT: tl.constexpr):
    """Backward of layer ``I`` on the path its forward took (packed, dot or FMA): ``g`` the
    gradient of its output, ``h`` its input tile; ``HOLD`` (16-bit chains): ``wb`` its weight
    blocks, which the program holds across its tiles (``_w_blocks``); ``acc`` its dW blocks,
    held likewise where ``DW_MODE`` is 1 (``_dw_blocks``). Adds its dW to ``acc`` (packed
    path, ``DW_MODE`` 1) or to the partial row ``prow`` (packed path: by reductions where
    ``DW_MODE`` is 2, in ``SPLIT`` products), its db to ``prow``; returns the gradient of
    ``h`` (not computed for the first layer unless ``NEED_DX``) and ``acc``."""
    C_IN: tl.constexpr = LAYERS[I][0]
    C_OUT: tl.constexpr = LAYERS[I][1]
    N: tl.constexpr = LAYERS[I][2]
    M: tl.constexpr = LAYERS[I][3]
    S_IN: tl.constexpr = LAYERS[I][4]
    S_OUT: tl.constexpr = LAYERS[I][5]
    PK: tl.constexpr = LAYERS[I][6]
    SG: tl.constexpr = LAYERS[I][7]
    SM: tl.constexpr = LAYERS[I][8]
    BIAS: tl.constexpr = LAYERS[I][9]
    W_SLOT: tl.constexpr = LAYERS[I][10]
    W_AT: tl.constexpr = LAYERS[I][11]
    P_AT: tl.constexpr = LAYERS[I][14]
    Q_AT: tl.constexpr = LAYERS[I][15]
    DENSE_OK: tl.constexpr = LAYERS[I][16]
    KB: tl.constexpr = LAYERS[I][17]
    MB: tl.constexpr = LAYERS[I][18]
    NP: tl.constexpr = LAYERS[I][19]
    W_OFF: tl.constexpr = LAYERS[I][20]
    B_OFF: tl.constexpr = LAYERS[I][21]
    NS: tl.constexpr = LAYERS[I][22]
    MS: tl.constexpr = LAYERS[I][23]
    w_ptr = WP[W_SLOT] + W_AT + Z
    if PK == 2:
        p_ptr = perm_ptr + P_AT
        q_ptr = perm_ptr + Q_AT
    else:
        p_ptr = None
        q_ptr = None
    if BIAS:
        pb_ptr = prow + (W_TOTAL + B_OFF)
    else:
        pb_ptr = None
    NEED_DH: tl.constexpr = 1 if I > 0 else NEED_DX
    DB: tl.constexpr = NEED_DB if BIAS else 0
    if PACK and KB > 0:
        dh, acc = _layer_packed_bwd(g, h, acc, wb, HOLD, DW_MODE, w_ptr, p_ptr, q_ptr, prow + W_OFF,
                                    pb_ptr, Z, N, M, S_IN, S_OUT, KB, MB, PK, SG, SM, NEED_DH,
                                    NEED_DW, DB, NATIVE16, PREC, BLOCK_P, SPLIT, NS, MS)
    elif DENSE and DENSE_OK == 2:
        dh = _layer_dot_bwd(g, h, w_ptr, p_ptr, q_ptr, prow + W_OFF, pb_ptr, N, M, C_IN, C_OUT,
                            S_IN, S_OUT, NP, PK, SG, SM, NEED_DH, NEED_DW, DB, PREC, BLOCK_P)
    else:
        dh = _layer_fma_bwd(g, h, w_ptr, p_ptr, q_ptr, prow + W_OFF, pb_ptr, N, M, C_IN, C_OUT,
                            S_IN, S_OUT, PK, SG, SM, BIAS, NEED_DH, NEED_DW, DB, BLOCK_P)
    return dh, acc


@triton.jit
def _dw_blocks(LAYERS: tl.constexpr, I: tl.constexpr, NEED_DW: tl.constexpr,
               PACK: tl.constexpr, DW_MODE: tl.constexpr):
    """Zero dW blocks for layer ``I`` to carry across the persistent loop: ``[C_IN / KB, KB,
    MB]`` float32 on the packed path where the program holds them (``DW_MODE`` 1; one product's
    output per tile is added to them, no partial-row traffic per tile), a placeholder
    elsewhere (those layers add to the row every tile)."""
    C_IN: tl.constexpr = LAYERS[I][4]  # the input tile's slots
    KB: tl.constexpr = LAYERS[I][17]
    MB: tl.constexpr = LAYERS[I][18]
    if PACK and KB > 0 and NEED_DW and DW_MODE == 1:
        acc = tl.zeros((C_IN // KB, KB, MB), dtype=tl.float32)
    else:
        acc = tl.zeros((1,), dtype=tl.float32)
    return acc


@triton.jit
def _w_blocks(WP, LAYERS: tl.constexpr, I: tl.constexpr, PACK: tl.constexpr,
              HOLD: tl.constexpr):
    """Layer ``I``'s block-diagonal weight blocks ``[C_IN / KB, KB, MB]`` (storage dtype, 0
    outside the groups) on the packed path where the program holds them (``HOLD``), loaded
    once before the persistent loop: every tile's recomputed forward and its ``dh`` product use
    them (loaded per tile, their masked loads and per-element offsets took 405 of the 1013 warp
    instructions per tile of IGCV2(256, 8)'s bf16 packed backward, 16 positions on 16 warps); a
    placeholder elsewhere."""
    C_IN: tl.constexpr = LAYERS[I][4]  # the input tile's slots
    N: tl.constexpr = LAYERS[I][2]
    M: tl.constexpr = LAYERS[I][3]
    W_SLOT: tl.constexpr = LAYERS[I][10]
    W_AT: tl.constexpr = LAYERS[I][11]
    KB: tl.constexpr = LAYERS[I][17]
    MB: tl.constexpr = LAYERS[I][18]
    if PACK and KB > 0 and HOLD:
        woff, wmask = _packed_weight_offsets(N, M, C_IN, KB, MB, 0, LAYERS[I][22],
                                             LAYERS[I][23])
        wb = tl.load(WP[W_SLOT] + W_AT + woff, mask=wmask, other=0.0)
    else:
        wb = tl.zeros((1,), dtype=tl.float32)
    return wb


@triton.jit
def _dw_flush(acc, prow, LAYERS: tl.constexpr, I: tl.constexpr, NEED_DW: tl.constexpr,
              PACK: tl.constexpr, DW_MODE: tl.constexpr):
    """Adds the carried dW blocks of a packed layer (``_dw_blocks``) to the program's partial
    row, once."""
    C_IN: tl.constexpr = LAYERS[I][4]  # the input tile's slots
    N: tl.constexpr = LAYERS[I][2]
    M: tl.constexpr = LAYERS[I][3]
    KB: tl.constexpr = LAYERS[I][17]
    MB: tl.constexpr = LAYERS[I][18]
    W_OFF: tl.constexpr = LAYERS[I][20]
    if PACK and KB > 0 and NEED_DW and DW_MODE == 1:
        woff, wmask = _packed_weight_offsets(N, M, C_IN, KB, MB, 0, LAYERS[I][22],
                                             LAYERS[I][23])
        _rmw_add(prow + W_OFF + woff, wmask, acc)


@triton.jit
def igc_chain_fwd(x_ptr, y_ptr, idx_ptr, w0, w1, w2, w3, w4, w5, w6, w7,
                  b0, b1, b2, b3, b4, b5, b6, b7, perm_ptr,
                  NI, O0, O1, O2, xs0, xs1, xs2, xsi, xsc, ys0, ys1, ys2, ysi, ysc, layout_key,
                  LAYERS: tl.constexpr, NL: tl.constexpr, C_X: tl.constexpr,
                  S_X: tl.constexpr, HAS_INDEX: tl.constexpr, NATIVE16: tl.constexpr,
                  OUT_PK: tl.constexpr, OUT_SG: tl.constexpr, OUT_SM: tl.constexpr,
                  OUT_Q_AT: tl.constexpr,
                  W_TOTAL: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
                  DENSE: tl.constexpr, PACK: tl.constexpr, AHEAD: tl.constexpr):
    """Forward of the chain: one program per tile of BLOCK_P positions (``AHEAD`` 0), or
    (``AHEAD`` 1 or 2, packed configurations) a persistent grid whose program ``p`` walks tiles
    ``p, p + nprog, ...`` and loads the x of its tile ``AHEAD`` tiles ahead before it computes
    this one, so those loads are in flight meanwhile (16-bit chains: holding its packed layers'
    weight blocks across the tiles); ``x`` read once, every layer on chip, ``y`` written
    once."""
    WP = (w0, w1, w2, w3, w4, w5, w6, w7)
    BP = (b0, b1, b2, b3, b4, b5, b6, b7)
    C0: tl.constexpr = LAYERS[0][0]
    S0: tl.constexpr = LAYERS[0][4]
    N0: tl.constexpr = LAYERS[0][2]
    # the first layer packed on a padded input tile (``Layer.ns``): its slots per group
    IN_NS: tl.constexpr = LAYERS[0][22] if PACK and LAYERS[0][17] > 0 and LAYERS[0][22] != N0 \
        else 0
    if AHEAD:
        if OUT_PK == 2:
            chan, cm = _out_channels(perm_ptr + OUT_Q_AT, LAYERS, NL, OUT_PK, OUT_SG, OUT_SM, PACK)
        else:
            chan, cm = _out_channels(None, LAYERS, NL, OUT_PK, OUT_SG, OUT_SM, PACK)
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        ntiles = O0 * O1 * O2 * tl.cdiv(NI, BLOCK_P)
        # 16-bit chains: the program holds its packed layers' weight blocks across its tiles,
        # as the backward does (_w_blocks): loaded per tile, they were IGCV2(256, 8)'s other 6
        # of 10 global accesses per warp and tile (16 positions on 8 warps), and their loads in
        # flight spilled IGCV2(1024, 32)'s two tiles ahead on 16 warps (128 registers, 32
        # bytes), which fit with them held (108 registers; the blocks take shared memory)
        HOLD: tl.constexpr = NATIVE16
        wts = ()
        for i in tl.static_range(NL):
            wts = wts + (_w_blocks(WP, LAYERS, i, PACK, HOLD),)
        a_next = _tile_x(pid, ntiles, 0, x_ptr, idx_ptr, NI, O1, O2, xs0, xs1, xs2, xsi, xsc,
                         C0, S0, HAS_INDEX, C_X, IN_NS, N0, BLOCK_P)[0]
        if AHEAD == 2:
            a_next2 = _tile_x(pid + nprog, ntiles, 0, x_ptr, idx_ptr, NI, O1, O2, xs0, xs1,
                              xs2, xsi, xsc, C0, S0, HAS_INDEX, C_X, IN_NS, N0, BLOCK_P)[0]
        for t in range(pid, ntiles, nprog):
            # the backward's opaque 0 (igc_chain_bwd): the address tensors stay in the loop,
            # and the tiles keep their 16-byte vectors
            zero = (t // ntiles) * 16
            h = a_next
            a_new = _tile_x(t + AHEAD * nprog, ntiles, zero, x_ptr, idx_ptr, NI, O1, O2, xs0,
                            xs1, xs2, xsi, xsc, C0, S0, HAS_INDEX, C_X, IN_NS, N0, BLOCK_P)[0]
            if AHEAD == 2:
                a_next = a_next2
                a_next2 = a_new
            else:
                a_next = a_new
            inner, pm = _tile_offsets(t, NI, O1, O2, xs0, xs1, xs2, BLOCK_P)[1:]
            yoff = _outer_offset(t, NI, O1, O2, ys0, ys1, ys2, BLOCK_P)
            for i in tl.static_range(NL):
                h = _fwd_layer(h, wts[i], HOLD, WP, BP, perm_ptr, zero, LAYERS, i, NATIVE16,
                               DENSE, PACK, PREC, BLOCK_P)
            _store_tile(y_ptr, yoff, inner, pm, ysi, ysc, chan + zero, cm, h)
    else:
        t = tl.program_id(0)
        xoff, inner, pm = _tile_offsets(t, NI, O1, O2, xs0, xs1, xs2, BLOCK_P)
        yoff = _outer_offset(t, NI, O1, O2, ys0, ys1, ys2, BLOCK_P)
        h = _load_input(x_ptr, xoff, inner, pm, xsi, xsc, 0, idx_ptr, C0, S0, HAS_INDEX, C_X,
                        IN_NS, N0)
        for i in tl.static_range(NL):
            h = _fwd_layer(h, None, 0, WP, BP, perm_ptr, 0, LAYERS, i, NATIVE16, DENSE, PACK,
                           PREC, BLOCK_P)
        if OUT_PK == 2:
            chan, cm = _out_channels(perm_ptr + OUT_Q_AT, LAYERS, NL, OUT_PK, OUT_SG, OUT_SM, PACK)
        else:
            chan, cm = _out_channels(None, LAYERS, NL, OUT_PK, OUT_SG, OUT_SM, PACK)
        _store_tile(y_ptr, yoff, inner, pm, ysi, ysc, chan, cm, h)


@triton.jit
def igc_chain_bwd(dy_ptr, x_ptr, dx_ptr, idx_ptr, ord_ptr, start_ptr, count_ptr,
                  w0, w1, w2, w3, w4, w5, w6, w7, b0, b1, b2, b3, b4, b5, b6, b7, perm_ptr,
                  part_ptr, PROW, NI, O0, O1, O2, gs0, gs1, gs2, gsi, gsc, xs0, xs1, xs2, xsi,
                  xsc, ds0, ds1, ds2, dsi, dsc, layout_key,
                  LAYERS: tl.constexpr, NL: tl.constexpr, C_X: tl.constexpr,
                  S_X: tl.constexpr, HAS_INDEX: tl.constexpr, NATIVE16: tl.constexpr,
                  OUT_PK: tl.constexpr, OUT_SG: tl.constexpr, OUT_SM: tl.constexpr,
                  OUT_Q_AT: tl.constexpr,
                  W_TOTAL: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
                  KEEP: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
                  NEED_DB: tl.constexpr, DENSE: tl.constexpr, PACK: tl.constexpr,
                  RED: tl.constexpr, SPLIT: tl.constexpr, DY_LATE: tl.constexpr,
                  W_TILE: tl.constexpr):
    """Backward of the chain: a persistent grid; per tile, the forward recomputed on chip
    (``KEEP``: every intermediate kept, else each layer's input recomputed from ``x`` when
    needed), the layers walked backward, ``dx`` written once, dW / db added to the program's
    partial row: every tile's on the FMA and dot paths and for float32 packed layers; a 16-bit
    chain's packed layers load their weight blocks once, before the program's first tile, and
    carry their dW blocks across its tiles, adding them once, after its last (``RED``: add them
    every tile by reductions, ``SPLIT``: in that many products; ``DY_LATE``: with SPLIT, a
    tile's dy loaded after its forward is recomputed; ``W_TILE``: with SPLIT, the weight
    blocks loaded every tile instead)."""
    WP = (w0, w1, w2, w3, w4, w5, w6, w7)
    BP = (b0, b1, b2, b3, b4, b5, b6, b7)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    prow = part_ptr + pid.to(tl.int64) * PROW
    ntiles = O0 * O1 * O2 * tl.cdiv(NI, BLOCK_P)
    C0: tl.constexpr = LAYERS[0][0]
    S0: tl.constexpr = LAYERS[0][4]
    N0: tl.constexpr = LAYERS[0][2]
    # the first layer packed on a padded input tile (``Layer.ns``): its slots per group
    IN_NS: tl.constexpr = LAYERS[0][22] if PACK and LAYERS[0][17] > 0 and LAYERS[0][22] != N0 \
        else 0
    if OUT_PK == 2:
        chan, cm = _out_channels(perm_ptr + OUT_Q_AT, LAYERS, NL, OUT_PK, OUT_SG, OUT_SM, PACK)
    else:
        chan, cm = _out_channels(None, LAYERS, NL, OUT_PK, OUT_SG, OUT_SM, PACK)
    # packed configurations: x and dy of the program's first tile (PACK = 2: and of its
    # second), then every iteration loads those of its tile PACK tiles ahead (all masked past
    # the last tile) before it computes, so those loads are in flight meanwhile. (The FMA
    # configurations load their own tile: the tiles held ahead cost registers that their
    # spill-free configurations do not have; with them IGCV2(256, 8) in float32 spilled 8 to
    # 24 bytes in every 16-position configuration. So do the SPLIT configurations, for tiles of
    # 1024 channels: IGCV2(1024, 16)'s SPLIT = 2, 16 positions on 8 warps, spilled 192 bytes
    # with its next tile's x and dy held, none without.)
    AHEAD: tl.constexpr = 0 if SPLIT else PACK
    if AHEAD:
        a_next, g_next = _tile_x_dy(pid, ntiles, 0, x_ptr, dy_ptr, idx_ptr, NI, O1, O2, xs0,
                                    xs1, xs2, xsi, xsc, gs0, gs1, gs2, gsi, gsc, chan, cm, C0,
                                    S0, HAS_INDEX, C_X, IN_NS, N0, BLOCK_P)
    if AHEAD == 2:
        a_next2, g_next2 = _tile_x_dy(pid + nprog, ntiles, 0, x_ptr, dy_ptr, idx_ptr, NI, O1,
                                      O2, xs0, xs1, xs2, xsi, xsc, gs0, gs1, gs2, gsi, gsc,
                                      chan, cm, C0, S0, HAS_INDEX, C_X, IN_NS, N0, BLOCK_P)
    # 16-bit chains' packed layers: the program holds their weight blocks and (unless RED) dW
    # blocks across its tiles (float32 chains do not: on the opt-in packed path, the "bf16x6"
    # products split what they hold into more registers, and IGCV2(256, 16)'s backward, 16
    # positions on 16 warps, spilled 8 bytes where it had none). RED: the packed layers add
    # their dW to the partial row every tile by reductions in L2 (held, IGCV2(512, 8)'s dW
    # blocks alone took 48 registers per thread on 16 warps, and every packed configuration
    # spilled). RED = 2 (16-bit chains): the last layer's dW blocks are held, the others' added
    # by reductions (HELD: IGCV2(512, 8)'s and (512, 16)'s fit on 8 warps, 242 and 253
    # registers, and their rows' L2 traffic per tile falls by a third). W_TILE (SPLIT): the
    # weight blocks loaded every tile where they are used, not held (both Tritons keep held
    # blocks in shared memory: IGCV2(1024, 16)'s SPLIT = 2 took 197,632 bytes with the CI's
    # Triton, and 246,784 with triton 3.6.0, more than an SM has; loaded every tile, 82,944
    # there, and with the CI's Triton the builds spill)
    HOLD: tl.constexpr = NATIVE16 and not W_TILE
    DW_MODE: tl.constexpr = 2 if RED else (1 if NATIVE16 else 0)
    HELD: tl.constexpr = NL - 1 if RED == 2 else -1
    accs = ()
    wts = ()
    for i in tl.static_range(NL):
        accs = accs + (_dw_blocks(LAYERS, i, NEED_DW, PACK, 1 if i == HELD else DW_MODE),)
        wts = wts + (_w_blocks(WP, LAYERS, i, PACK, HOLD),)
    for t in range(pid, ntiles, nprog):
        # 0, unknown to the compiler: the address tensors computed from it stay in the loop
        # (hoisted out of it, they held registers across tiles and the kernels spilled). A
        # multiple of 16 added to the channel offsets, not to the strides: the compiler keeps
        # the tiles' contiguity and alignment, so with the launch's divisibility hints x, dy and
        # dx move in 16-byte vectors (added to the channel stride, it made them 16-bit scalars)
        zero = (t // ntiles) * 16
        prow_t = prow + zero
        if AHEAD:
            a0 = a_next
            g_in = g_next
            a_new, g_new = _tile_x_dy(t + AHEAD * nprog, ntiles, zero, x_ptr, dy_ptr, idx_ptr,
                                      NI, O1, O2, xs0, xs1, xs2, xsi, xsc, gs0, gs1, gs2, gsi,
                                      gsc, chan, cm, C0, S0, HAS_INDEX, C_X, IN_NS, N0,
                                      BLOCK_P)
            if AHEAD == 2:
                a_next = a_next2
                g_next = g_next2
                a_next2 = a_new
                g_next2 = g_new
            else:
                a_next = a_new
                g_next = g_new
            _, inner, pm = _tile_offsets(t, NI, O1, O2, xs0, xs1, xs2, BLOCK_P)
        else:
            xoff, inner, pm = _tile_offsets(t, NI, O1, O2, xs0, xs1, xs2, BLOCK_P)
            goff = _outer_offset(t, NI, O1, O2, gs0, gs1, gs2, BLOCK_P)
            a0 = _load_input(x_ptr, xoff, inner, pm, xsi, xsc, zero, idx_ptr, C0, S0,
                             HAS_INDEX, C_X, IN_NS, N0)
            if not DY_LATE:
                g_in = _load_tile(dy_ptr, goff, inner, pm, gsi, gsc, chan + zero, cm)
        acts = (a0,)
        if KEEP:
            for i in tl.static_range(NL - 1):
                acts = acts + (_fwd_layer(acts[i], wts[i], HOLD, WP, BP, perm_ptr, zero,
                                          LAYERS, i, NATIVE16, 2 * DENSE, PACK, PREC,
                                          BLOCK_P),)
        if DY_LATE:  # dy's registers are not held during the recomputed forward: another
            # round trip per tile
            g_in = _load_tile(dy_ptr, goff, inner, pm, gsi, gsc, chan + zero, cm)
        g = g_in.to(tl.float32)
        carried = ()
        for i in tl.static_range(NL - 1, -1, -1):
            if KEEP:
                h = acts[i]
            else:
                h = a0
                for k in tl.static_range(i):
                    h = _fwd_layer(h, wts[k], HOLD, WP, BP, perm_ptr, zero, LAYERS, k,
                                   NATIVE16, 2 * DENSE, PACK, PREC, BLOCK_P)
            g, a = _bwd_layer(g, h, accs[i], wts[i], HOLD, 1 if i == HELD else DW_MODE, WP,
                              perm_ptr, prow_t, zero, LAYERS, i, W_TOTAL, NATIVE16, NEED_DX,
                              NEED_DW, NEED_DB, DENSE, PACK, PREC, BLOCK_P, SPLIT)
            carried = (a,) + carried
        accs = carried
        if NEED_DX:
            doff = _outer_offset(t, NI, O1, O2, ds0, ds1, ds2, BLOCK_P)
            if HAS_INDEX:
                gx = _index_grad(g, ord_ptr, start_ptr, count_ptr, C_X, S_X, BLOCK_P)
                cx = tl.arange(0, S_X)
                _store_tile(dx_ptr, doff, inner, pm, dsi, dsc, cx + zero, cx < C_X, gx)
            else:
                cx = tl.arange(0, S0)
                cxm = cx < C0
                if IN_NS:  # the padded input tile's slots to x's channels
                    cx, cxm = _group_slots(cx, IN_NS, N0)
                _store_tile(dx_ptr, doff, inner, pm, dsi, dsc, cx + zero, cxm, g)
    for i in tl.static_range(NL):
        _dw_flush(accs[i], prow, LAYERS, i, NEED_DW, PACK, 1 if i == HELD else DW_MODE)


# =============================================================================================
# Chain structure
# =============================================================================================
def slots(c: int) -> int:
    """Register width of a tile of ``c`` channels (a power of two, >= 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(int(c)))


@dataclass(frozen=True)
class Layer:
    c_in: int
    c_out: int
    groups: int
    pk: int  # permutation in front of this layer (between layer l-1 and l)
    sg: int  # its shuffle groups (PK_SHUFFLE)
    sm: int  # its channels per shuffle group
    bias: bool
    w_off: int  # offset of dW in the partial row
    b_off: int  # offset of db (after all dW) or -1
    p_at: int = -1  # an explicit permutation in front: its offset in the permutation buffer
    q_at: int = -1  # and its inverse's
    # slots per group of the packed path's input / output tile where that tile is laid out
    # group by group with padding (``make_structure``: the chain's input and output tiles
    # only), 0 where the tile holds the channels in order
    ns: int = 0
    ms: int = 0

    @property
    def n(self):
        return self.c_in // self.groups

    @property
    def m(self):
        return self.c_out // self.groups

    @property
    def s_in(self):
        return slots(self.c_in)

    @property
    def s_out(self):
        return slots(self.c_out)

    @property
    def dense_eligible(self):
        """The dot path takes the layer in both directions."""
        return self.s_in <= DENSE_MAX_SLOTS and self.s_out <= DENSE_MAX_SLOTS

    @property
    def dense_forward_eligible(self):
        """The forward's dot path takes the layer (``DENSE_MAX_FORWARD_SLOTS``)."""
        return self.dense_eligible or self.s_in * self.s_out <= DENSE_MAX_FORWARD_SLOTS

    @property
    def n_slots(self):
        """Slots per group on the input tile: ``ns`` where it is padded, else N."""
        return self.ns or self.n

    @property
    def m_slots(self):
        """Slots per group on the output tile: ``ms`` where it is padded, else M."""
        return self.ms or self.m

    @property
    def pack(self):
        """``(KB, MB)``: input and output slots of one block of the packed path (``KB / NS``
        whole groups: 16 input slots, or one group of NS >= 16), or None when the layer cannot
        take it: the groups' slots must fill the tile (in order: channels a power of two; group
        by group with padding, ``ns`` / ``ms``: G groups of a power of two of slots), blocks be
        at least tl.dot's 16 wide, and the block-diagonal weight ``S_IN x MB`` fit
        PACK_MAX_WEIGHTS registers' worth."""
        ns, ms, g = self.n_slots, self.m_slots, self.groups
        kb = max(16, ns)
        if (g * ns != self.s_in or g * ms != self.s_out or kb % ns or self.s_in % kb
                or kb & (kb - 1)):
            return None
        mb = kb // ns * ms
        if mb < 16 or mb & (mb - 1) or self.s_in // kb * mb != self.s_out:
            return None
        if self.s_in * mb > PACK_MAX_WEIGHTS:
            return None
        return kb, mb


@dataclass(frozen=True)
class Structure:
    """Everything about a call that is compiled into the kernels (``meta``)."""

    layers: tuple
    c_x: int  # channels of x
    has_index: bool
    out_pk: int  # the permutation after the last layer
    out_sg: int
    out_sm: int
    native16: bool  # storage dtype is 16-bit (layer 1's dense dot may run on it directly)
    out_q_at: int = -1  # an explicit last permutation: its inverse's offset in the buffer
    # float32 storage: its dots' precision (dot_precision; one autotuner per precision), and
    # whether it is offered the packed path ("ieee", or the opt-in IGC_TRITON_FP32_MMA=1)
    f32_prec: str = "ieee"
    f32_pack: bool = False

    @property
    def num_layers(self):
        return len(self.layers)

    @property
    def w_total(self):
        return sum(l.c_out * l.n for l in self.layers)

    @property
    def b_total(self):
        return sum(l.c_out for l in self.layers if l.bias)

    @property
    def deep(self):
        """More layers than pointer slots: weights and biases are passed concatenated."""
        return self.num_layers > POINTER_SLOTS

    @property
    def offers_pack(self):
        """Whether the kernels offer the packed path (``PACK``). Compiled, 16-bit chains get
        it, and float32 chains (``f32_pack``) with exact float32 products (``"ieee"``: the
        block products compile to FFMAs, no tensor cores and no shuffles) or with the opt-in
        ``IGC_TRITON_FP32_MMA=1`` (on tensor cores: "bf16x6", or "tf32" where TF32 is allowed
        too), not where TF32 alone is allowed. (Compiled without the launch's divisibility
        hints, the float32 packed kernels had collapsed to 32 registers and spilled 3-7 KB for
        sm_90.) Under the interpreter every dtype does, so the CPU tests check the path's
        indexing in float32 too."""
        return self.native16 or self.f32_pack or INTERPRETED

    @property
    def packed_layers(self) -> list:
        """The layers (0-based) the packed path takes when it is on."""
        if not self.offers_pack:
            return []
        return [i for i, l in enumerate(self.layers) if l.pack]

    @property
    def dense_layers(self) -> list:
        """The layers (0-based) the dot path takes when it is on (``DENSE``), in the backward
        and its recomputed forward."""
        return [i for i, l in enumerate(self.layers) if l.dense_eligible]

    @property
    def dense_forward_layers(self) -> list:
        """The layers (0-based) the forward's dot path takes when it is on: ``dense_layers``
        and those of at most DENSE_MAX_FORWARD_SLOTS weight slots."""
        return [i for i, l in enumerate(self.layers) if l.dense_forward_eligible]

    def dot_layers(self, backward: bool) -> list:
        """The layers the dot path of that direction's kernel takes when it is on."""
        return self.dense_layers if backward else self.dense_forward_layers

    def name(self) -> str:
        parts = [f"x{self.c_x}{'i' if self.has_index else ''}"]
        for l in self.layers:
            parts.append(f"{l.c_in}g{l.groups}o{l.c_out}p{l.pk}{'b' if l.bias else ''}")
        return "_".join(parts) + f"_p{self.out_pk}"

    def meta(self) -> dict:
        """The kernels' compile-time arguments for this structure (``LAYERS``: one tuple per
        layer, fields in the order of ``LAYER_FIELDS``)."""
        packed = set(self.packed_layers)
        rows = []
        for i, l in enumerate(self.layers):
            kb, mb = l.pack if i in packed else (0, 0)
            b_at = max(l.b_off, 0)
            ns, ms = (l.n_slots, l.m_slots) if i in packed else (l.n, l.m)
            rows.append((l.c_in, l.c_out, l.n, l.m, l.s_in, l.s_out, l.pk, l.sg, l.sm,
                         int(l.bias), 0 if self.deep else i, l.w_off if self.deep else 0,
                         0 if self.deep else i, b_at if self.deep else 0, max(l.p_at, 0),
                         max(l.q_at, 0),
                         2 if l.dense_eligible else int(l.dense_forward_eligible), kb, mb,
                         triton.next_power_of_2(l.n), l.w_off, b_at, ns, ms))
        return {"LAYERS": tuple(rows), "NL": self.num_layers, "C_X": self.c_x,
                "S_X": slots(self.c_x), "HAS_INDEX": int(self.has_index),
                "NATIVE16": int(self.native16), "OUT_PK": self.out_pk, "OUT_SG": self.out_sg,
                "OUT_SM": self.out_sm, "OUT_Q_AT": max(self.out_q_at, 0),
                "W_TOTAL": self.w_total}


# The names of ``Structure.meta`` (reports leave them out of a launch's configuration).
STRUCTURE_KEYS = ("LAYERS", "NL", "C_X", "S_X", "HAS_INDEX", "NATIVE16", "OUT_PK", "OUT_SG",
                  "OUT_SM", "OUT_Q_AT", "W_TOTAL")


def make_structure(c_x, channels, groups, shuffles, perm_present, bias_present, has_index,
                   dtype) -> Structure:
    """The Structure of a chain. ``shuffles[l] > 0``: shuffle with that many groups after layer
    l; else ``perm_present[l]``: an explicit permutation; else identity. Explicit permutations
    and their inverses are laid out in layer order in one buffer (``permutation_buffer``)."""
    L = len(groups)

    def kind(l):  # the permutation after layer l (0-based)
        if shuffles[l] > 0:
            return PK_SHUFFLE, int(shuffles[l]), int(channels[l + 1]) // int(shuffles[l])
        if perm_present[l]:  # sg: the permuted channel count (the clamp of _perm_src)
            return PK_EXPLICIT, int(channels[l + 1]), 1
        return PK_IDENTITY, 1, 1

    # offset of the explicit permutation after layer l in the buffer, or -1 (its inverse
    # follows it: q_at)
    at, p_at = 0, []
    for l in range(L):
        explicit = kind(l)[0] == PK_EXPLICIT
        p_at.append(at if explicit else -1)
        at += 2 * int(channels[l + 1]) if explicit else 0

    def q_at(l):
        return p_at[l] + int(channels[l + 1]) if p_at[l] >= 0 else -1

    layers, w_off, b_off = [], 0, 0
    for l in range(L):
        pk, sg, sm = kind(l - 1) if l > 0 else (PK_IDENTITY, 1, 1)
        c_in, c_out, g = int(channels[l]), int(channels[l + 1]), int(groups[l])
        layers.append(Layer(c_in, c_out, g, pk, sg, sm, bool(bias_present[l]), w_off,
                            b_off if bias_present[l] else -1,
                            p_at[l - 1] if l > 0 else -1, q_at(l - 1) if l > 0 else -1))
        w_off += c_out * (c_in // g)
        b_off += c_out if bias_present[l] else 0
    layers = _padded_ends(layers, has_index)
    opk, osg, osm = kind(L - 1)
    # 16-bit storage: layer 1's dense dot runs on the storage values (exact products). Not for
    # bfloat16 under the interpreter, which has no bfloat16 arithmetic (numpy has no bfloat16).
    native16 = dtype == torch.float16 or (dtype == torch.bfloat16 and not INTERPRETED)
    f32 = dtype == torch.float32
    prec = dot_precision() if f32 else "ieee"
    return Structure(tuple(layers), int(c_x), bool(has_index), opk, osg, osm, native16,
                     q_at(L - 1), prec, f32 and (prec == "ieee" or fp32_mma_requested()))


def _padded_ends(layers: list, has_index: bool) -> list:
    """The layers with the chain's input and output tiles laid out group by group with padding
    where that lets the first / last layer take the packed path and the channels in order do
    not: each of the G groups (a power of two) gets the next power of two of its channels in
    slots (an IGCV3 expansion 64 -> 384 in two groups: 2 x 256 output slots, 64 of each group's
    padding), and its tile has the slots it has in order. Only at the chain's ends, where the
    tile is loaded from x (not behind ``input_index``) or stored to y: the loads and stores map
    every slot to its channel, and no permutation between layers has to move padded tiles."""
    out = list(layers)
    for i in sorted({0, len(out) - 1}):
        l = out[i]
        if l.pack:
            continue
        pad_in = i == 0 and not has_index
        ns = triton.next_power_of_2(l.n) if pad_in else 0
        ms = triton.next_power_of_2(l.m) if i == len(out) - 1 else 0
        padded = replace(l, ns=ns if ns != l.n else 0, ms=ms if ms != l.m else 0)
        if padded != l and padded.pack:
            out[i] = padded
    return tuple(out)


def pointer_args(st: Structure, weights, biases, perm_buffer) -> list:
    """The kernels' pointer arguments ``w0..w7, b0..b7, perm_ptr``: one weight and one bias (or
    None) per layer, or, for chains deeper than POINTER_SLOTS, all weights and all biases
    concatenated in slot 0 (``Structure.meta`` says where each layer's start); then the
    permutation buffer or None."""
    if st.deep:
        ws = [torch.cat([w.reshape(-1) for w in weights])]
        present = [b.reshape(-1) for b in biases if b is not None]
        bs = [torch.cat(present) if present else None]
    else:
        ws = [w.contiguous() for w in weights]
        bs = [b.contiguous() if b is not None else None for b in biases]
    pad = [None] * POINTER_SLOTS
    return (ws + pad)[:POINTER_SLOTS] + (bs + pad)[:POINTER_SLOTS] + [perm_buffer]


def permutation_buffer(st: Structure, perms, inverse):
    """The explicit permutations of the structure and their inverses, ``[p, inverse(p)]`` in
    layer order (``perms[l]``: the one after layer l), as one int32 buffer (None when there is
    none)."""
    after = [l.pk for l in st.layers[1:]] + [st.out_pk]
    parts = []
    for p, pk in zip(perms, after):
        if pk == PK_EXPLICIT:
            parts += [p.to(torch.int32), inverse(p)]
    return torch.cat(parts) if parts else None


# =============================================================================================
# Launch configurations and autotuning
# =============================================================================================
# Search space of the autotuner (GPU only; the interpreter launches DEFAULT_CONFIG). Keyed on
# the structure (channels, groups, permutation kinds: one autotuner per structure), the
# tensors' dtypes (Triton adds them to the key) and the layout class (``layout_key``); never on
# the batch or spatial sizes.
#   (BLOCK_P, num_warps)  positions per program and warps; forward (16, 4), (16, 16), (32, 4),
#                         (64, 8), (128, 8), (16, 8) ((16, 8): the only spill-free packed one of
#                         IGCV2(1024, 8); last, so the fixed path, which takes the first
#                         spill-free one, takes it only where no other is, or where
#                         FIXED_PACKED_FORWARD names it); backward (8, 8),
#                         (8, 16), (16, 4), (16, 16), (32, 4), (64, 8). Many warps on few
#                         positions spread the backward's live tiles over more threads: for
#                         several chains the only spill-free configurations
#                         (docs/backends.md). BLOCK_P 8 takes the FMA path only (tl.dot needs
#                         16 rows).
#   DENSE                 every dense-eligible layer on the tl.dot path (1) or all on the FMA
#                         path (0); only varied when some layer is eligible (else 0)
#   KEEP                  (backward, L > 1) keep the recomputed intermediates in registers (1)
#                         or recompute each layer's input from x when needed (0: fewer live
#                         registers, L (L - 1) / 2 layer applications instead of L - 1)
#   PACK                  every packed-eligible layer (``Layer.pack``) as batched tensor-core
#                         products on blocks of whole groups (``_layer_packed``, backward
#                         ``_layer_packed_bwd`` with KEEP=1), the others on the FMA path;
#                         offered beside the DENSE choices when some layer is eligible (else
#                         0). The fixed path tries it first for 16-bit chains (FIXED_PACKED_*,
#                         the static model's choice), and for float32 ones whose groups are
#                         16 wide or more or whose tiles have 512 channels or more. In the
#                         backward, PACK is also how many tiles ahead a program loads x and
#                         dy: 1, or 2 in the configurations of PACKED_AHEAD2 (one CTA per SM:
#                         its next tile's loads alone do not cover their latency)
#   AHEAD                 (forward, packed, at the tiles of PACKED_AHEAD2) 1 or 2: a persistent
#                         grid (_triton_ops.FORWARD_PROGRAMS_PER_SM programs per SM) that load
#                         x that many tiles ahead; 0: one program per tile. The wide chains'
#                         packed forwards run one CTA per SM (IGCV2(1024, 8) and (1024, 32)),
#                         where one program per tile overlapped nothing with its loads. Two
#                         tiles ahead take more registers, so both are offered.
#   RED                   (backward, packed, PACKED_RED) 1: the packed layers add their dW to
#                         the program's partial row every tile by reductions in L2 (no value
#                         comes back) instead of holding dW blocks across the tiles (16-bit
#                         chains) or reading, adding and writing the row (float32 chains):
#                         held, IGCV2(512, 8)'s and (512, 16)'s spilled in every packed
#                         configuration, and IGCV2(256, 16)'s float32 ones read-added-written;
#                         2 (PACKED_RED_HELD, 16-bit chains whose last layer and another are
#                         packed): the last layer's dW blocks held across the tiles, the
#                         others' by reductions, so a third less row traffic per tile for
#                         IGCV2(512, 8) and (512, 16), whose L2 bounded them
#   SPLIT                 (backward, PACK = 1, RED = 1, PACKED_SPLIT, 16-bit chains with packed
#                         layers whose tiles have SPLIT_CHANNELS channels or more; float32's
#                         spill, IGCV2(1024, 16)'s 1368 bytes or more) 2 or 4: each packed
#                         layer's dW product in that many products of consecutive blocks, and
#                         the program loads its own tile (no tile ahead): at 1024 channels a
#                         layer's dW product alone is as large as its weights in float32 (128
#                         values per thread for IGCV2(1024, 32) on 8 warps), and every other
#                         packed configuration spilled; 0 elsewhere
#   DY_LATE               (backward, SPLIT) 1: a tile's dy loaded after its forward is recomputed
#                         (no dy registers held meanwhile, a second round trip per tile):
#                         added for IGCV2(1024, 16) channels-last, which fitted it in a report
#                         compiled with an NCHW dy; with a channels-last dy, as the backend
#                         launches it, it spills there (136 bytes; the chain's backward is
#                         staged, _triton_ops), and no reported chain takes it: a later
#                         candidate
#   W_TILE                (backward, SPLIT) 1: the packed layers' weight blocks loaded every
#                         tile where they are used (from L1 / L2) instead of held across the
#                         tiles (in shared memory): triton 3.6.0's held SPLIT builds need more
#                         shared memory than an SM has (IGCV2(1024, 16): 246,784 bytes); loaded
#                         every tile, IGCV2(1024, 16) and (1024, 32) fit there, without
#                         spills, in both layouts (with the CI's Triton the held ones fit, and
#                         loaded every tile its builds spill: they come after the held ones)
# At most 22 forward and 37 backward configurations per structure (each is a compilation on
# first use). _prune drops those whose register tiles clearly cannot fit, then those whose
# compiled kernel spills (compiled for the GPU at hand before anything launches).
TILE_CONFIGS = ((16, 4), (16, 16), (32, 4), (64, 8), (128, 8), (16, 8))
BWD_TILE_CONFIGS = ((8, 8), (8, 16), (16, 4), (16, 16), (32, 4), (64, 8))
PACKED_AHEAD2 = ((16, 8), (16, 16))
# the backward's RED configurations (PACK, BLOCK_P, num_warps): packed layers' dW added to the
# partial row by reductions every tile instead of held across the tiles
PACKED_RED = ((1, 16, 16), (2, 16, 8), (2, 16, 16))
# and those with RED = 2 (the last layer's dW held)
PACKED_RED_HELD = ((2, 16, 8), (1, 16, 16))
# the backward's SPLIT configurations (SPLIT, BLOCK_P, num_warps, DY_LATE, W_TILE; PACK = 1,
# RED = 1), offered to 16-bit chains where a tile has SPLIT_CHANNELS channels or more
PACKED_SPLIT = tuple((sp, 16, 8, late, wt) for wt in (0, 1) for sp, late in ((2, 0), (4, 0),
                                                                           (2, 1)))
SPLIT_CHANNELS = 1024
# and the one offered to float32 chains with a packed layer on a tile padded group by group
# (``_padded_packed``; SPLIT, BLOCK_P, num_warps): the IGCV3 layers, whose float32 dW blocks
# (2 x 32 x 256 slots) spill every other packed build (sm_90, CI Triton: 254 and 241 registers
# without spills, predicted 12% and 24% of copy bandwidth against the FMA path's 3% and 4%)
PACKED_SPLIT_PADDED_FP32 = ((2, 16, 8),)
MIN_DOT_ROWS = 16  # tl.dot's smallest M: smaller tiles take the FMA path
# Rough register budget per thread for the tiles a program holds (the compiler needs the rest);
# configurations above 4x this are pruned, not tried: they spill to local memory.
REG_BUDGET = 128


@dataclass(frozen=True)
class LaunchConfig:
    block_p: int = 16
    num_warps: int = 4
    dense: int = 1
    keep: int = 1
    pack: int = 0
    ahead: int = 0  # the forward's persistent grid (packed only): tiles loaded ahead, or 0
    red: int = 0  # the backward's packed dW by reductions in L2 every tile (packed only; 2:
    # the last layer's held across the tiles instead)
    split: int = 0  # the backward's dW reductions in that many products, no tile ahead (RED 1)
    dy_late: int = 0  # (SPLIT) a tile's dy loaded after its recomputed forward
    w_tile: int = 0  # (SPLIT) the packed layers' weight blocks loaded every tile, not held


DEFAULT_CONFIG = LaunchConfig()
_OVERRIDE = threading.local()

# The fixed path's first candidates (``fixed_candidates``) for chains with packed layers (16-bit;
# float32 as ``_packed_first`` says), before the default, in this order; the first that
# compiles without spills runs (RED = 2 is offered to 16-bit chains only, so float32 ones skip
# it). For the IGCV2 targets (C 256..1024, groups of 8..32) in bf16 the static model
# (tools/perf_model.py, docs/benchmarks.md) predicts the default FMA configuration at 2% to 42%
# of copy bandwidth, these at 35% to 100% (C = 1024's backward: SPLIT, 33% to 35% where it
# fits, IGCV2(1024, 16) and (1024, 32) NCHW; where every packed build spills, IGCV2(1024, 8)
# for one, the backward is staged, _triton_ops.backward_stages, 16% to 21%):
# the forward on 16 positions on 4 warps, else persistent on 8 warps loading two tiles ahead
# (first where a tile has FIXED_PERSISTENT_CHANNELS channels or more: one CTA then fills an SM,
# and IGCV2(1024, 16) is predicted at 100% persistent, 86% not; IGCV2(1024, 8)'s and (1024,
# 32)'s 4-warp builds spill), else persistent loading one tile ahead on 8 warps, then on 16
# (float32: the one-layer ranges of IGCV2(1024, 8) and (1024, 16), whose two-tiles-ahead builds
# spill, predicted 85% against 51% for 4 warps one tile per program; IGCV2(512, 32), whose
# first three spill, 39% against the FMA default's 24%), else one tile per program on 16
# warps, then on 8 (float32 IGCV2(1024, 8) and (1024, 16), whose persistent builds spill, 26%
# and 31% against the FMA path's 13% and 16%; the range 0:1 of IGCV2(1024, 32), 40% against
# 22%); the backward loading two tiles ahead on 8 warps, else
# (IGCV2(512, 8) and (512, 16), whose held dW spill) the same with the last layer's dW held and
# the others' by reductions, else (IGCV2(512, 32)) with every packed layer's by reductions;
# where a tile has SPLIT_CHANNELS channels or more, first the SPLIT ones (FIXED_SPLIT_BACKWARD:
# at 1024 channels every other packed backward spills; those holding their weight blocks
# first, then, for triton 3.6.0 where the held ones do not fit the SM's shared memory, those
# loading them every tile).
# Float32 chains' packed products are FFMAs (or, opt-in, "bf16x6" tensor-core products): they
# try these first only where every packed layer's groups are at least 16 wide (no block holds
# another group's zeros) or a tile has FIXED_FP32_PACKED_CHANNELS channels or more (the FMA
# path's register tiles and shuffles grow with the channels); IGCV2(256, 8), whose blocks are
# half zeros, keeps the default (predicted 86% on the FMA path, 49% packed). Where a packed
# layer's tile is padded group by group (the IGCV3 layers), the backward first tries dW by
# reductions in two products on 8 warps (FIXED_SPLIT_PADDED_FP32, PACKED_SPLIT_PADDED_FP32);
# triton 3.6.0 spills it (208 to 1784 bytes), and takes a later packed build for the expansion
# (with the transposed products) and the FMA path for the reduction, whose other packed builds
# spill too.
# Float32 chains with exact products ("ieee") of at most FIXED_FP32_SMALL_CHANNELS channels per
# tile: the default's dot path multiplies every zero of the block-diagonal weight on the CUDA
# cores (G_l times the FMAs; sm_90, CI Triton, H200, NCHW: IGCV2(64, 4)'s forward predicted at
# 10% against 100% on the FMA path), so their default is FIXED_FP32_DEFAULT, the FMA path on
# the same tile, where a dense-eligible layer has two groups or more (fixed_default), and
# their backward tries 32 positions on 4 warps first (IGCV2(64, 4) 60%
# against 42% for 16 positions, (64, 8) 56% against 39%; at 256 channels it spills). Their
# packed candidates come first only from FIXED_FP32_PACKED_MIN_CHANNELS channels on (IGCV2(64,
# 16)'s packed forward 40% against 72% on the FMA path, (64, 32) 21% against 42%; at 128
# channels packed wins: (128, 16) 71% against 57%, (128, 32) 39% against 24%).
FIXED_PERSISTENT_CHANNELS = 1024
FIXED_FP32_PACKED_CHANNELS = 512
FIXED_FP32_PACKED_MIN_CHANNELS = 128
FIXED_FP32_SMALL_CHANNELS = 128
FIXED_FP32_DEFAULT = LaunchConfig(dense=0)
FIXED_FP32_BACKWARD = (LaunchConfig(block_p=32, num_warps=4, dense=0),)
# Forwards whose dot path takes a layer beyond DENSE_MAX_SLOTS (DENSE_MAX_FORWARD_SLOTS) where
# the default takes the dot path: 32 positions on 4 warps first (the IGCV3 layers in bf16 before
# the padded tiles packed them, predicted 96% and 58% against 54% and 39% on the default's 16
# positions: the folded weight's loads and layout conversions are shared by twice the
# positions)
FIXED_WIDE_DOT_FORWARD = (LaunchConfig(block_p=32, num_warps=4, dense=1),)
FIXED_PACKED_FORWARD = (LaunchConfig(block_p=16, num_warps=4, dense=0, pack=1),
                        LaunchConfig(block_p=16, num_warps=8, dense=0, pack=1, ahead=2),
                        LaunchConfig(block_p=16, num_warps=8, dense=0, pack=1, ahead=1),
                        LaunchConfig(block_p=16, num_warps=16, dense=0, pack=1, ahead=1),
                        LaunchConfig(block_p=16, num_warps=16, dense=0, pack=1),
                        LaunchConfig(block_p=16, num_warps=8, dense=0, pack=1))
FIXED_PACKED_BACKWARD = (LaunchConfig(block_p=16, num_warps=8, dense=0, pack=2),
                         LaunchConfig(block_p=16, num_warps=8, dense=0, pack=2, red=2),
                         LaunchConfig(block_p=16, num_warps=8, dense=0, pack=2, red=1),
                         LaunchConfig(block_p=16, num_warps=16, dense=0, pack=1, red=1))
FIXED_SPLIT_BACKWARD = tuple(LaunchConfig(block_p=bp, num_warps=w, dense=0, pack=1, red=1,
                                          split=sp, dy_late=late, w_tile=wt)
                             for sp, bp, w, late, wt in PACKED_SPLIT)
FIXED_SPLIT_PADDED_FP32 = tuple(LaunchConfig(block_p=bp, num_warps=w, dense=0, pack=1, red=1,
                                             split=sp) for sp, bp, w in PACKED_SPLIT_PADDED_FP32)


def autotune_enabled() -> bool:
    """Autotuning is on unless ``IGC_TRITON_AUTOTUNE=0`` (read at every launch): then every
    structure launches the fixed path's configuration (``fixed_choice``: compiled, never timed;
    usually one compilation per kernel instead of up to 29 timed ones, as a test run over many
    structures on a GPU wants)."""
    return os.environ.get("IGC_TRITON_AUTOTUNE", "1") != "0"


class override_config:
    """``with override_config(block_p=..., dense=..., keep=...):`` launch with this config and
    no autotuning (tests use it to cover both layer paths and both backward variants)."""

    def __init__(self, **kw):
        self.cfg = LaunchConfig(**{**DEFAULT_CONFIG.__dict__, **kw})

    def __enter__(self):
        self.prev = getattr(_OVERRIDE, "cfg", None)
        _OVERRIDE.cfg = self.cfg
        return self.cfg

    def __exit__(self, *exc):
        _OVERRIDE.cfg = self.prev


def _tiles_live(st: Structure, backward: bool, keep: int) -> int:
    widths = [st.layers[0].s_in] + [l.s_out for l in st.layers]
    if not backward:
        return 3 * max(widths)
    if keep:
        return sum(widths) + 2 * max(widths)
    return 4 * max(widths)


def _cost(st: Structure, backward: bool, config) -> float:
    """Values per thread the program's live register tiles hold under ``config``."""
    kw = config.kwargs if hasattr(config, "kwargs") else config.all_kwargs()
    return kw["BLOCK_P"] * _tiles_live(st, backward, kw.get("KEEP", 1)) / (32 * config.num_warps)


def _compiled_spills(fn, config, named_args, kwargs):
    """Bytes of local memory the compiled kernel uses under ``config`` (spills): compiles for
    the current GPU without launching (``warmup``; the autotuner's timing runs reuse the
    compiled kernel from Triton's cache)."""
    k = fn.warmup(grid=(1,), **named_args, **kwargs, **config.all_kwargs())
    k._init_handles()
    return 4 * int(k.n_spills)


def _real_gpu_tensors(named_args) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    ts = [v for v in named_args.values() if isinstance(v, torch.Tensor)]
    return bool(ts) and all(t.is_cuda and not isinstance(t, FakeTensor) for t in ts)


def spill_free(configs, spills) -> list:
    """The configurations that do not spill (``spills(config)``: spilled bytes, or an exception
    when it does not compile); when every configuration spills, the one spilling least, so a
    launch still happens; when none compiles, ``configs`` unchanged (the autotuner then reports
    the compiler's error)."""
    measured = []
    for c in configs:
        try:
            measured.append((spills(c), c))
        except Exception:  # a configuration that does not compile is not offered
            continue
    if not measured:
        return list(configs)
    free = [c for s, c in measured if s == 0]
    return free or [min(measured, key=lambda sc: sc[0])[1]]


def _prune(st: Structure, backward: bool, fn=None, spills=_compiled_spills):
    """The autotuner's ``early_config_prune``: drops configurations whose register tiles clearly
    cannot fit (more than 4x REG_BUDGET values per thread), then, when the arguments are real
    GPU tensors, every configuration whose compiled kernel spills (it is compiled, not
    launched). When all of them spill only the least spilling one is kept, but the backend has
    refused such a structure before (``_triton_ops.spill_reasons``: these configurations are
    among the fixed path's candidates). Under tracing (fake tensors) only the first rule
    applies."""
    def prune(configs, named_args, **kwargs):
        ok = [c for c in configs if _cost(st, backward, c) <= 4 * REG_BUDGET]
        ok = ok or [min(configs, key=lambda c: _cost(st, backward, c))]
        if fn is not None and len(ok) > 1 and _real_gpu_tensors(named_args):
            ok = spill_free(ok, lambda c: spills(fn, c, named_args, kwargs))
        return ok
    return prune


def launch_config(c) -> LaunchConfig:
    """The ``LaunchConfig`` of one of the autotuner's ``triton.Config`` s (a switch the
    structure does not have takes the default's value)."""
    kw = c.kwargs
    return LaunchConfig(block_p=kw["BLOCK_P"], num_warps=c.num_warps,
                        dense=kw.get("DENSE", DEFAULT_CONFIG.dense),
                        keep=kw.get("KEEP", DEFAULT_CONFIG.keep),
                        pack=kw.get("PACK", DEFAULT_CONFIG.pack),
                        ahead=kw.get("AHEAD", DEFAULT_CONFIG.ahead),
                        red=kw.get("RED", DEFAULT_CONFIG.red),
                        split=kw.get("SPLIT", DEFAULT_CONFIG.split),
                        dy_late=kw.get("DY_LATE", DEFAULT_CONFIG.dy_late),
                        w_tile=kw.get("W_TILE", DEFAULT_CONFIG.w_tile))


def _configs(st: Structure, backward: bool) -> list:
    """The autotuner's configurations: ``DENSE`` (every dense-eligible layer on the dot path,
    or none) and ``PACK`` (every packed layer packed, the rest on the FMA path; the backward
    then keeps its intermediates, and ``PACKED_AHEAD2`` adds configurations with PACK = 2,
    which load two tiles ahead, ``PACKED_RED`` backward ones with RED = 1 and, for 16-bit
    chains whose last layer and another are packed, ``PACKED_RED_HELD`` ones with RED = 2
    (the last layer's dW held), for 16-bit chains where a tile has SPLIT_CHANNELS channels or
    more ``PACKED_SPLIT`` ones with RED = 1, SPLIT 2 or 4, DY_LATE and W_TILE, for float32
    chains with a packed layer on a padded tile ``PACKED_SPLIT_PADDED_FP32``, and the forward
    persistent ones with AHEAD 1 and 2) are only varied where the structure has such layers;
    otherwise they are 0."""
    dense = bool(st.dot_layers(backward))
    pack = bool(st.packed_layers)
    out = []

    def bwd(bp, w, pk, keep=1, red=0, split=0, late=0, wt=0, d=0):
        return triton.Config({"BLOCK_P": bp, "DENSE": d, "PACK": pk, "KEEP": keep, "RED": red,
                              "SPLIT": split, "DY_LATE": late, "W_TILE": wt}, num_warps=w,
                             num_stages=1)

    def fwd(bp, w, pk, ahead=0, d=0):
        return triton.Config({"BLOCK_P": bp, "DENSE": d, "PACK": pk, "AHEAD": ahead},
                             num_warps=w, num_stages=1)

    for bp, w in (BWD_TILE_CONFIGS if backward else TILE_CONFIGS):
        for d in ((0, 1) if dense and bp >= MIN_DOT_ROWS else (0,)):
            for keep in ((1, 0) if backward and st.num_layers > 1 else (1,)):
                out.append(bwd(bp, w, 0, keep, d=d) if backward else fwd(bp, w, 0, d=d))
        if pack and bp >= MIN_DOT_ROWS:  # the backward keeps its intermediates
            out.append(bwd(bp, w, 1) if backward else fwd(bp, w, 1))
    if pack and backward:  # loading two tiles ahead; dW by reductions
        out += [bwd(bp, w, 2) for bp, w in PACKED_AHEAD2]
        out += [bwd(bp, w, pk, red=1) for pk, bp, w in PACKED_RED]
        packed = st.packed_layers
        if st.native16 and len(packed) > 1 and packed[-1] == st.num_layers - 1:
            out += [bwd(bp, w, pk, red=2) for pk, bp, w in PACKED_RED_HELD]
        if st.native16 and _widest(st) >= SPLIT_CHANNELS:
            out += [bwd(bp, w, 1, red=1, split=sp, late=late, wt=wt)
                    for sp, bp, w, late, wt in PACKED_SPLIT]
        if not st.native16 and _padded_packed(st):
            out += [bwd(bp, w, 1, red=1, split=sp) for sp, bp, w in PACKED_SPLIT_PADDED_FP32]
    if pack and not backward:  # persistent, loading one or two tiles ahead
        out += [fwd(bp, w, 1, ahead) for bp, w in PACKED_AHEAD2 for ahead in (1, 2)]
    return out


class Kernels:
    """The forward and backward kernels of one structure: the shared ``igc_chain_fwd`` /
    ``igc_chain_bwd`` with the structure's compile-time arguments (``meta``), plain and
    autotuned (one autotuner per structure, so its cache is per structure)."""

    def __init__(self, st: Structure):
        self.st = st
        self.fwd = igc_chain_fwd
        self.bwd = igc_chain_bwd
        self.meta = st.meta()
        self.fwd_tuned = self.bwd_tuned = None
        if not INTERPRETED:
            self.fwd_tuned = triton.autotune(
                configs=_configs(st, False), key=["layout_key"],
                prune_configs_by={"early_config_prune": _prune(st, False, self.fwd)})(self.fwd)
            self.bwd_tuned = triton.autotune(
                configs=_configs(st, True), key=["layout_key"],
                prune_configs_by={"early_config_prune": _prune(st, True, self.bwd)},
                reset_to_zero=["part_ptr"])(self.bwd)

    def fixed_meta(self, cfg: LaunchConfig, backward: bool) -> dict:
        """The meta-parameters of a launch with ``cfg`` (the structure's ``meta`` excluded)."""
        dot_rows = cfg.block_p >= MIN_DOT_ROWS
        meta = {"BLOCK_P": cfg.block_p, "num_warps": cfg.num_warps,
                "DENSE": cfg.dense if dot_rows and self.st.dot_layers(backward) else 0,
                "PACK": cfg.pack if dot_rows and self.st.packed_layers else 0}
        if backward:  # dW by reductions (split) only where packed
            meta["KEEP"] = cfg.keep
            meta["RED"] = cfg.red if meta["PACK"] else 0
            meta["SPLIT"] = cfg.split if meta["RED"] == 1 else 0
            meta["DY_LATE"] = cfg.dy_late if meta["SPLIT"] else 0
            meta["W_TILE"] = cfg.w_tile if meta["SPLIT"] else 0
        else:  # persistent only where packed
            meta["AHEAD"] = cfg.ahead if meta["PACK"] else 0
        return meta


_KERNELS: dict = {}
_KERNELS_LOCK = threading.Lock()


def kernels_for(st: Structure) -> Kernels:
    k = _KERNELS.get(st)
    if k is None:
        with _KERNELS_LOCK:
            k = _KERNELS.get(st)
            if k is None:
                k = Kernels(st)
                _KERNELS[st] = k
    return k


def _dtype_spills(fn, args, meta):
    """Spilled bytes of ``fn`` compiled for the current GPU with ``meta``, from the arguments'
    dtypes alone (``warmup`` with tensors replaced by their dtypes: the same compile whether the
    call is eager or traced with fake tensors)."""
    wrapped = [a.dtype if isinstance(a, torch.Tensor) else a for a in args]
    k = fn.warmup(*wrapped, grid=(1,), **meta)
    k._init_handles()
    return 4 * int(k.n_spills)


def _args_key(args) -> tuple:
    """What the compiled kernel depends on besides meta: dtypes, absent pointers, and the
    integer specialisations (== 1, divisible by 16)."""
    return tuple(str(a.dtype) if isinstance(a, torch.Tensor)
                 else (type(a).__name__, a == 1, a % 16 == 0) if isinstance(a, int)
                 else type(a).__name__ for a in args)


_FIXED: dict = {}


def _widest(st: Structure) -> int:
    """The most channels a tile of ``st`` has (x or a layer's output)."""
    return max([st.c_x] + [l.c_out for l in st.layers])


def _padded_packed(st: Structure) -> bool:
    """Whether a packed layer of ``st`` has a tile laid out group by group with padding
    (``Layer.ns`` / ``Layer.ms``)."""
    return any(st.layers[i].ns or st.layers[i].ms for i in st.packed_layers)


def _packed_first(st: Structure) -> bool:
    """Whether the fixed path tries FIXED_PACKED_* before the default: chains with packed
    layers, in 16-bit; in float32 where no packed block is padded (every packed layer's groups
    at least 16 wide) and a tile has FIXED_FP32_PACKED_MIN_CHANNELS channels or more, or where
    a tile has FIXED_FP32_PACKED_CHANNELS or more."""
    if not st.packed_layers:
        return False
    if st.native16:
        return True
    return ((all(st.layers[i].n >= 16 for i in st.packed_layers)
             and _widest(st) >= FIXED_FP32_PACKED_MIN_CHANNELS)
            or _widest(st) >= FIXED_FP32_PACKED_CHANNELS)


def _fp32_exact(st: Structure) -> bool:
    """Float32 storage with exact dot products (``"ieee"``: the dot path runs on CUDA cores)."""
    return not st.native16 and st.f32_prec == "ieee"


def fixed_default(st: Structure, backward: bool = False) -> LaunchConfig:
    """The fixed path's default configuration: DEFAULT_CONFIG, or for float32 chains with exact
    products where a layer the direction's dot path takes has two groups or more,
    FIXED_FP32_DEFAULT (the FMA path on the same tile: their dot path's products are FFMAs,
    G_l times the grouped convolution's; a layer of one group has no zeros in its weight)."""
    grouped = any(st.layers[i].groups > 1 for i in st.dot_layers(backward))
    return FIXED_FP32_DEFAULT if _fp32_exact(st) and grouped else DEFAULT_CONFIG


def fixed_candidates(st: Structure, backward: bool, accept_spills: bool = False) -> list:
    """The fixed path's candidates in the order it compiles them: for chains with packed layers
    (16-bit; float32 as ``_packed_first`` says), those of FIXED_PACKED_FORWARD /
    FIXED_PACKED_BACKWARD that the autotuner offers for ``st`` (the forward's persistent one
    first where a tile has FIXED_PERSISTENT_CHANNELS channels or more, the backward's
    FIXED_SPLIT_BACKWARD first where it has SPLIT_CHANNELS or more, and in float32 with a
    packed layer on a padded tile FIXED_SPLIT_PADDED_FP32 first; in the backward of float32
    chains with "bf16x6" products, those that add dW by reductions, ``red`` = 1, first); then
    the default configuration (``fixed_default``; before it, in the backward of float32
    chains whose
    default is FIXED_FP32_DEFAULT and whose tiles have at most FIXED_FP32_SMALL_CHANNELS
    channels, FIXED_FP32_BACKWARD, and in the forward of chains whose default takes the dot
    path and whose forward's dot path takes a layer the backward's does not,
    FIXED_WIDE_DOT_FORWARD);
    then the rest of the autotuner's list (after its register-tile rule). With
    ``accept_spills`` (``IGC_TRITON_FIXED=default``) the default comes first whatever the
    chain."""
    tuned = []
    for c in _prune(st, backward)(_configs(st, backward), {}):  # the register-tile rule only
        cand = launch_config(c)
        if cand not in tuned:
            tuned.append(cand)
    out = []
    if _packed_first(st) and not accept_spills:
        first = FIXED_PACKED_BACKWARD if backward else FIXED_PACKED_FORWARD
        wide = _widest(st) >= FIXED_PERSISTENT_CHANNELS
        if not backward and wide:
            first = sorted(first, key=lambda c: not c.ahead)  # the persistent ones first
        if backward and _widest(st) >= SPLIT_CHANNELS:
            first = FIXED_SPLIT_BACKWARD + first
        if backward and not st.native16 and _padded_packed(st):
            first = FIXED_SPLIT_PADDED_FP32 + first
        if backward and st.f32_prec == "bf16x6":
            # dW by reductions first (stable: the order otherwise kept): the row read, added
            # and written every tile binds the L2 in "bf16x6" (IGCV2(256, 16) / (256, 32),
            # sm_90, predicted 55% / 35% of copy bandwidth against 74% / 52% with RED = 1;
            # with exact products both are bound by shared memory, alike)
            first = sorted(first, key=lambda c: c.red != 1)
        out = [c for c in first if c in tuned]
    default = fixed_default(st, backward)
    if (not backward and not accept_spills and default.dense
            and st.dense_forward_layers != st.dense_layers):
        out += [c for c in FIXED_WIDE_DOT_FORWARD if c in tuned and c not in out]
    if (backward and not accept_spills and default == FIXED_FP32_DEFAULT
            and _widest(st) <= FIXED_FP32_SMALL_CHANNELS):
        out += [c for c in FIXED_FP32_BACKWARD if c in tuned and c not in out]
    out.append(default)
    return out + [c for c in tuned if c not in out]


def fixed_choice(kern: Kernels, backward: bool, fn, args, base_meta: dict, spills=None,
                 accept_spills: bool = False):
    """``(config, spilled bytes)`` of the fixed path (autotuning off or deterministic mode):
    the first of ``fixed_candidates`` whose compiled kernel does not spill (16-bit chains with
    packed layers: a packed configuration of FIXED_PACKED_*, else the default, else the first
    of the autotuner's list that does not); when every one spills, the least spilling one
    with its spill, which the backend's check (``_triton_ops.spill_reasons``) refuses before
    anything launches. Chosen once per kernel and argument signature from compiles, never from
    timings, so it is deterministic; ``(fixed_default, None)`` when nothing can be compiled here
    (interpreter, or a compile error). ``spills``: spilled bytes of a compile (default
    ``_dtype_spills``). ``accept_spills`` (``IGC_TRITON_FIXED=default``): the first candidate
    that fits the GPU, spilling or not, so normally the default with its one compile; a
    candidate whose compile fails otherwise than by not fitting is taken as it is (its launch
    reports the error)."""
    spills = spills or _dtype_spills
    base_meta = {**kern.meta, **base_meta}
    key = (id(fn), backward, _args_key(args), tuple(sorted(base_meta.items())), accept_spills)
    hit = _FIXED.get(key)
    if hit is not None:
        return hit
    measured = []
    for cand in fixed_candidates(kern.st, backward, accept_spills):
        try:
            s = spills(fn, args, {**base_meta, **kern.fixed_meta(cand, backward)})
        except Exception as e:  # not compilable here: not a candidate
            # (OutOfResources: the kernel does not fit the GPU, e.g. its shared memory)
            if accept_spills and not isinstance(e, OutOfResources):
                measured = [(None, cand)]
                break
            continue
        if s == 0 or accept_spills:
            measured = [(s, cand)]
            break
        measured.append((s, cand))
    best = (min(measured, key=lambda sc: sc[0]) if measured
            else (None, fixed_default(kern.st, backward)))
    choice = (best[1], best[0])
    _FIXED[key] = choice
    return choice


def fixed_config(kern: Kernels, backward: bool, fn, args, base_meta: dict,
                 spills=None) -> LaunchConfig:
    """The fixed path's configuration (``fixed_choice`` without the spill)."""
    return fixed_choice(kern, backward, fn, args, base_meta, spills)[0]


def launch_choice(kern: Kernels, backward: bool, args=None, base_meta=None):
    """(kernel, meta): the autotuned kernel on GPUs with the structure's meta only (its
    configurations supply the rest), unless an override is active, autotuning is switched off
    (``IGC_TRITON_AUTOTUNE=0``) or deterministic algorithms are requested (then the plain kernel
    with a fixed configuration, so the result does not depend on which configuration a timing
    run preferred: the override's, else ``fixed_config``'s on GPUs when ``args`` are given,
    else the default; ``IGC_TRITON_FIXED=default`` skips the search, one compilation per
    structure, for test runs over many structures: the default unless it does not fit the GPU,
    spilling or not)."""
    cfg = getattr(_OVERRIDE, "cfg", None)
    tuned = kern.bwd_tuned if backward else kern.fwd_tuned
    if (cfg is None and tuned is not None and autotune_enabled()
            and not torch.are_deterministic_algorithms_enabled()):
        return tuned, dict(kern.meta)
    plain = kern.bwd if backward else kern.fwd
    if cfg is None and args is not None and not INTERPRETED:
        quick = os.environ.get("IGC_TRITON_FIXED", "") == "default"
        cfg = fixed_choice(kern, backward, plain, args, base_meta or {},
                           accept_spills=quick)[0]
    return plain, {**kern.meta, **kern.fixed_meta(cfg or DEFAULT_CONFIG, backward)}


FP32_MMA_ENV = "IGC_TRITON_FP32_MMA"


def fp32_mma_requested() -> bool:
    """The opt-in ``IGC_TRITON_FP32_MMA=1`` (read at every call; never under the interpreter,
    which knows no "bf16x6")."""
    return os.environ.get(FP32_MMA_ENV, "0") == "1" and not INTERPRETED


def tf32_allowed() -> bool:
    """Whether the user allows TF32 for float32 matmuls on CUDA, as torch's own matmul reads it:
    ``torch.backends.cuda.matmul.fp32_precision == "tf32"`` where torch has that API (2.9 and
    newer; the legacy ``allow_tf32`` and ``torch.set_float32_matmul_precision`` set it too, and
    the legacy getter raises once the new API has been used), else ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    prec = getattr(matmul, "fp32_precision", None)
    return prec == "tf32" if prec is not None else bool(matmul.allow_tf32)


def dot_precision() -> str:
    """``input_precision`` of the kernels' float32 ``tl.dot`` s (read at every call): "tf32"
    where the user allows TF32 for matmul (``tf32_allowed``); else,
    with ``IGC_TRITON_FP32_MMA=1`` in the environment (opt-in), "bf16x6": each operand as
    three bfloat16 parts that add up to it, six of the nine partial products on tensor cores
    (the scheme of the CUDA backend's opt-in ``IGC_CUDA_FP32_MMA=1``); else "ieee" (exact
    float32 products, no tensor cores). The interpreter knows only "tf32", "tf32x3" and "ieee"
    and multiplies in float32 whatever it is told: "ieee" there."""
    if tf32_allowed():
        return "tf32"
    return "bf16x6" if fp32_mma_requested() else "ieee"


# =============================================================================================
# Host-side layout of the positions
# =============================================================================================
def position_dims(shape, strides_list):
    """Collapse the non-channel dims of tensors shaped like ``shape`` (channel dim 1) into at
    most 4 (outer..inner) that every tensor can address with one stride each.

    Returns ``sizes`` (4 ints: O0, O1, O2, NI) and, per tensor, 4 strides (s0, s1, s2, s_inner).
    Size-1 dims are dropped; neighbours are merged when ``stride[a] == stride[b] * size[b]`` in
    every tensor. More than 4 groups cannot happen (N plus at most 3 spatial dims).
    """
    dims = [d for d in range(len(shape)) if d != 1 and int(shape[d]) != 1]
    groups = []  # [size, [stride per tensor]] from inner to outer
    for d in reversed(dims):
        size = int(shape[d])
        st = [int(s[d]) for s in strides_list]
        if groups:
            gsize, gst = groups[-1]
            if all(a == b * gsize for a, b in zip(st, gst)):
                groups[-1][0] = gsize * size
                continue
        groups.append([size, st])
    if not groups:
        groups.append([1, [0] * len(strides_list)])
    while len(groups) < 4:
        groups.append([1, [0] * len(strides_list)])
    groups = groups[::-1]  # outer .. inner
    sizes = [g[0] for g in groups]
    per_tensor = [[g[1][t] for g in groups] for t in range(len(strides_list))]
    return sizes, per_tensor
