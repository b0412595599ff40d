"""The fused Triton backend (``backend="triton"``) against the float64 oracle.

Without a GPU (CI) the kernels run on CPU tensors through Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest.py before anything imports the kernels); on a GPU
machine the same tests run the compiled kernels on CUDA tensors (every input is copied to the
device with its exact strides and storage offset). Shapes are small so that the interpreter
stays fast; ``test_triton_gpu.py`` adds large shapes, compile / CUDA-graph and timing-free GPU
checks.

float32 results (output and every gradient) must be within the float32 rounding bound of the
problem against the float64 oracle (see ``igc_test_utils``); float16 / bfloat16 results within
twice the error of the unfused chain in the same dtype. Both layer implementations (FMA /
dense ``tl.dot``) and both backward variants (intermediates kept / recomputed) are covered by
forcing the launch configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st

import igc_kernels as igc
from igc_kernels import _triton_ops as T
from igc_kernels import backends
from igc_kernels._chain import normalize
from igc_kernels.triton_kernels import chain as K
from igc_test_utils import (
    RoundTo,
    X_KINDS,
    Problem,
    assert_bitwise_deterministic,
    assert_within_rounding,
    build_problem,
    draw_chain_shape,
    check_backend,
    expanded_like,
    magnitudes,
    make_tensor,
    normalized_op_args,
    oracle,
    problem_on,
    to_device,
)

DEVICE = "cpu" if T.INTERPRETED else "cuda"


# ---------------------------------------------------------------------------------------------
# Helpers: problems on the device, checks against the oracle
# ---------------------------------------------------------------------------------------------
def to_dev(t, requires_grad=None):
    """``t`` on DEVICE, strides and storage offset kept (``igc_test_utils.to_device``)."""
    return to_device(t, DEVICE, requires_grad)


def on_device(p: Problem) -> Problem:
    return problem_on(p, DEVICE)


def check_fp32(p: Problem, gy, **config):
    """Output and gradients of ``p`` through backend="triton" on DEVICE within the shared
    conformance rule (``igc_test_utils.check_against_oracle``: the float32 rounding bound;
    16-bit: twice the unfused chain's error), with the launch configuration ``config`` forced;
    returned as CPU tensors."""
    return check_backend(p, "triton", gy, device=DEVICE, config=config)


check_low_precision = check_fp32  # the rule follows the problem's dtype


def _gy(p: Problem, kind="contiguous", seed=1):
    shape = (p.x.shape[0], p.channels[-1], *p.x.shape[2:])
    gen = torch.Generator().manual_seed(seed)
    if kind == "expanded":
        return expanded_like(shape, p.x.dtype, gen)
    return make_tensor(shape, kind, p.x.dtype, gen)


# ---------------------------------------------------------------------------------------------
# Odd sizes, layouts, both layer paths
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dense", [0, 1], ids=["fma", "dot"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cpg", [1, 3, 7])
def test_odd_group_widths_nonsquare(cpg, layout, dense):
    """``cpg`` input channels per group, non-square groups (2 cpg -> 2 (cpg + 1) -> 2 cpg),
    interleave, biases, 7 x 7 positions (tails of the 16-position tiles)."""
    channels = [2 * cpg, 2 * (cpg + 1), 2 * cpg]
    p = build_problem(channels, [2, 2], spatial=(7, 7), N=2, layout=layout,
                      dtype=torch.float32, bias=True, seed=cpg)
    check_fp32(p, _gy(p), dense=dense)


@pytest.mark.parametrize("x_kind", X_KINDS, ids=list(X_KINDS))
def test_layouts(x_kind):
    """Every layout of x (views with storage offsets and steps included) with an explicit
    permutation, a shuffle, a bias on one layer and a stride-0 grad_output on some."""
    nsp, layout = X_KINDS[x_kind]
    spatial = {0: (), 1: (5,), 2: (3, 4), 3: (2, 3, 2)}[nsp]
    gen = torch.Generator().manual_seed(3)
    perms = [torch.randperm(12, generator=gen), "interleave", None]
    p = build_problem([6, 12, 12, 9], [3, 4, 3], spatial=spatial, N=3, layout=layout,
                      dtype=torch.float32, permutations=perms, bias=[False, True, False], seed=4)
    gy = _gy(p, "expanded" if nsp % 2 else "contiguous")
    check_fp32(p, gy)


@pytest.mark.parametrize("keep", [1, 0], ids=["keep", "recompute"])
@pytest.mark.parametrize("dense", [0, 1], ids=["fma", "dot"])
@pytest.mark.parametrize("perm_kind", ["identity", "interleave", "explicit"])
def test_paths_and_permutation_kinds(perm_kind, dense, keep):
    """Three layers, every permutation kind between them and after the last, both layer
    implementations, both backward variants, a 32-position tile."""
    gen = torch.Generator().manual_seed(5)
    C = [12, 24, 24, 12]
    perms = {"identity": [None, None, None],
             "interleave": ["interleave", "interleave", "interleave"],
             "explicit": [torch.randperm(c, generator=gen) for c in C[1:]]}[perm_kind]
    p = build_problem(C, [3, 4, 2], spatial=(5, 7), N=2, dtype=torch.float32,
                      permutations=perms, bias=[True, False, True], seed=6)
    check_fp32(p, _gy(p), dense=dense, keep=keep, block_p=32)


@pytest.mark.parametrize("depth", [K.POINTER_SLOTS, K.POINTER_SLOTS + 2])
def test_depth_and_pointer_slots(depth, monkeypatch):
    """Chains of up to POINTER_SLOTS layers pass one weight / bias argument per layer; deeper
    ones pass them concatenated in slot 0 with each layer's offset (``LAYERS``), and the
    explicit permutations share one buffer either way. Biases on some layers, every
    permutation kind, both backward variants."""
    gen = torch.Generator().manual_seed(21)
    C = [6] + [12, 6] * (depth // 2)
    groups = [3, 2] * (depth // 2)
    kinds = [torch.randperm(c, generator=gen) if l % 3 == 0 else
             ("interleave" if l % 3 == 1 else None) for l, c in enumerate(C[1:])]
    bias = [l % 4 != 1 for l in range(depth)]
    p = build_problem(C, groups, spatial=(3, 5), N=2, dtype=torch.float32, permutations=kinds,
                      bias=bias, seed=22)
    launches = []
    real = T._launch
    monkeypatch.setattr(T, "_launch", lambda fn, grid, a, meta: (launches.append((a, meta)),
                                                                  real(fn, grid, a, meta)))
    for keep in (1, 0):
        check_fp32(p, _gy(p, seed=23), keep=keep)
    args, meta = launches[0]
    w_slots = args[3:3 + K.POINTER_SLOTS]
    at = K.LAYER_FIELDS.index("w_at")
    if depth > K.POINTER_SLOTS:  # one concatenated weight buffer, layers at their offsets
        assert w_slots[0].numel() == sum(w.numel() for w in p.weights)
        assert all(w is None for w in w_slots[1:])
        assert [row[at] for row in meta["LAYERS"]][1] == p.weights[0].numel()
    else:
        assert all(w is not None for w in w_slots)
        assert all(row[at] == 0 for row in meta["LAYERS"])
    perm_buffer = args[3 + 2 * K.POINTER_SLOTS]
    assert perm_buffer.numel() == 2 * sum(c for l, c in enumerate(C[1:]) if l % 3 == 0)


def test_backward_grid_runs_two_programs_per_sm_unless_their_rows_crowd_the_l2():
    """Two persistent backward programs per SM (one's tile loads while the other computes,
    where both fit), unless the float32 partial rows of two per SM take more than half the L2:
    then one."""
    sms, l2 = 132, 50 * 2 ** 20
    fits = l2 // 2 // (2 * sms * 4)  # the longest row that two programs per SM may have
    assert T.backward_programs_per_sm(fits, sms, l2) == 2
    assert T.backward_programs_per_sm(fits + 1, sms, l2) == 1
    assert T.backward_programs_per_sm(3 * 256 * 8, sms, l2) == 2  # IGCV2(256, 8)
    assert T.backward_programs_per_sm(3 * 1024 * 32, sms, l2) == 1  # IGCV2(1024, 32)
    assert T.backward_programs(torch.device("cpu"), 3 * 256 * 8) == 3  # off the GPU


def test_layer_fields_match_the_kernels_unpacking():
    """``Structure.meta`` writes each layer's tuple in ``LAYER_FIELDS`` order and the layer
    helpers read it back by position (``NAME: tl.constexpr = LAYERS[I][k]``): every position
    they read names the field stored there, and the tuples hold one value per field."""
    import inspect
    import re

    for helper in (K._fwd_layer, K._bwd_layer):
        src = inspect.getsource(helper.fn if hasattr(helper, "fn") else helper)
        reads = re.findall(r"(\w+): tl\.constexpr = LAYERS\[I\]\[(\d+)\]", src)
        assert len(reads) >= 15, helper
        for name, k in reads:
            assert name.lower() == K.LAYER_FIELDS[int(k)], (helper, name, k)
    st = K.make_structure(6, [6, 12, 6], [3, 2], [0, 0], [True, False], [True, False], False,
                          torch.float32)
    rows = st.meta()["LAYERS"]
    assert all(len(r) == len(K.LAYER_FIELDS) for r in rows)
    f = {name: i for i, name in enumerate(K.LAYER_FIELDS)}
    assert [(r[f["c_in"]], r[f["c_out"]], r[f["n"]], r[f["m"]]) for r in rows] == \
        [(6, 12, 2, 4), (12, 6, 6, 3)]
    assert rows[1][f["pk"]] == K.PK_EXPLICIT and rows[1][f["q_at"]] == 12  # after [p, inv(p)]


@pytest.mark.parametrize("keep", [1, 0], ids=["keep", "recompute"])
@pytest.mark.parametrize("block_p,num_warps", [(8, 8), (8, 16), (16, 16)])
def test_backward_tiles_of_few_positions(block_p, num_warps, keep):
    """The backward-only tiles (8 positions, many warps: the autotuner's spill-free choices for
    several chains), with a dot-eligible chain and dense requested: 8-position tiles take the
    FMA path (tl.dot needs 16 rows), forward and backward stay within the oracle's bound."""
    from igc_kernels.triton_kernels import chain as K

    gen = torch.Generator().manual_seed(9)
    p = build_problem([12, 24, 24, 12], [3, 4, 2], spatial=(5, 7), N=2, dtype=torch.float32,
                      permutations=["interleave", torch.randperm(24, generator=gen), None],
                      bias=[True, False, True], seed=10)
    check_fp32(p, _gy(p), dense=1, keep=keep, block_p=block_p, num_warps=num_warps)
    st = K.make_structure(12, [12, 24, 24, 12], [3, 4, 2], [2, 0, 0], [False, True, False],
                          [True, False, True], False, torch.float32)
    kern = K.Kernels(st)
    assert st.dense_layers == [0, 1, 2]  # the chain is dot-eligible
    meta = kern.fixed_meta(K.LaunchConfig(block_p=block_p, num_warps=num_warps), True)
    assert meta["DENSE"] == int(block_p >= K.MIN_DOT_ROWS)
    tiles = {(c.kwargs["BLOCK_P"], c.num_warps, c.kwargs["DENSE"])
             for c in K._configs(st, True)}
    assert (8, 8, 1) not in tiles and (8, 8, 0) in tiles and (16, 4, 1) in tiles


@pytest.mark.parametrize("dense", [0, 1], ids=["fma", "dot"])
def test_group_width_64(dense):
    """Group widths 64 (in) and 32 (out), and 64 -> 64: the widest the backend promises."""
    p = build_problem([128, 64, 128], [2, 1], spatial=(3,), N=2, dtype=torch.float32,
                      permutations=[torch.randperm(64), None], bias=[True, False], seed=7)
    check_fp32(p, _gy(p), dense=dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dense", [0, 1], ids=["fma", "dot"])
def test_wide_layers_take_the_forward_dot_path_only(dense, dtype):
    """An IGCV3-like block, 48 -> 288 (two groups of 24 -> 144, then interleaved) -> 48 (two
    groups of 144 -> 24), with a bias: each layer's folded weight has 64 x 512 slots, beyond
    DENSE_MAX_SLOTS on one side, within DENSE_MAX_FORWARD_SLOTS, so with ``DENSE`` the forward
    takes the dot path on both layers, and the backward (its own and its recomputed forward)
    the FMA path; output and gradients within the conformance rule either way."""
    st = K.make_structure(48, [48, 288, 48], [2, 2], [2, 0], [False, False], [True, False],
                          False, dtype)
    assert [(l.s_in, l.s_out) for l in st.layers] == [(64, 512), (512, 64)]
    assert st.dense_forward_layers == [0, 1] and st.dense_layers == []
    assert [row[K.LAYER_FIELDS.index("dense_ok")] for row in st.meta()["LAYERS"]] == [1, 1]
    kern = K.Kernels(st)
    assert kern.fixed_meta(K.LaunchConfig(dense=1), False)["DENSE"] == 1
    assert kern.fixed_meta(K.LaunchConfig(dense=1), True)["DENSE"] == 0
    assert {c.kwargs["DENSE"] for c in K._configs(st, False)} == {0, 1}
    assert {c.kwargs["DENSE"] for c in K._configs(st, True)} == {0}
    # the fixed path: the forward on 32 positions first where the default takes the dot path
    # (16-bit), float32's FMA default (exact products) otherwise
    fwd = K.fixed_candidates(st, False)
    if dtype == torch.float16:
        assert fwd[:2] == [*K.FIXED_WIDE_DOT_FORWARD, K.DEFAULT_CONFIG]
        assert [(c.block_p, c.num_warps, c.dense) for c in K.FIXED_WIDE_DOT_FORWARD] == [
            (32, 4, 1)]
    else:
        assert fwd[0] == K.FIXED_FP32_DEFAULT
    assert K.fixed_candidates(st, False, accept_spills=True)[0] == K.fixed_default(st)
    # the backward's default: no layer its dot path takes, so DEFAULT_CONFIG (FMA path there)
    assert K.fixed_default(st, True) == K.DEFAULT_CONFIG
    assert K.fixed_candidates(st, True)[0] == K.DEFAULT_CONFIG
    p = build_problem([48, 288, 48], [2, 2], spatial=(5, 3), N=2, dtype=dtype,
                      permutations=["interleave", None], bias=[True, False], seed=12)
    check_low_precision(p, _gy(p), dense=dense)


def test_channel_limit_1024():
    """C = 1024 with 16 groups of 64 channels, then 1024 -> 512 with 32 groups (FMA path: too
    wide for the dense one), a few tokens."""
    p = build_problem([1024, 1024, 512], [16, 32], N=5, dtype=torch.float32, bias=[False, True],
                      seed=8)
    check_fp32(p, _gy(p))


# ---------------------------------------------------------------------------------------------
# input_index
# ---------------------------------------------------------------------------------------------
INDEX_CASES = {
    # name: (in_channels, index, channels after it, groups, spatial, layout)
    "repeats_nchw": (6, [0, 1, 1, 5, 2, 2, 0, 3], [8, 8, 6], [4, 2], (3, 3), "contiguous"),
    "subset_channels_last": (12, [11, 3, 7, 0, 9, 4], [6, 9, 6], [3, 3], (2, 5), "channels_last"),
    "longer_than_x_tokens": (3, [2, 0, 1, 1, 0, 2, 2, 2, 1], [9, 6], [3], (), "contiguous"),
    "one_channel_sliced": (5, [4] * 4, [4, 4, 8], [2, 4], (3, 2), "sliced"),
}


@pytest.mark.parametrize("dense", [0, 1], ids=["fma", "dot"])
@pytest.mark.parametrize("case", INDEX_CASES.values(), ids=list(INDEX_CASES))
def test_input_index(case, dense):
    cin, idx, channels, groups, spatial, layout = case
    p = build_problem(channels, groups, spatial=spatial, N=3, layout=layout,
                      dtype=torch.float32, permutations="random", bias=True, seed=9,
                      input_index=torch.tensor(idx), in_channels=cin)
    _, grads = check_fp32(p, _gy(p), dense=dense)
    unused = sorted(set(range(cin)) - set(idx))
    if unused:  # channels never selected get exactly zero
        assert torch.equal(grads[0][:, unused], torch.zeros_like(grads[0][:, unused]))


# ---------------------------------------------------------------------------------------------
# The packed path (groups packed into 16-wide blocks, batched tensor-core products)
# ---------------------------------------------------------------------------------------------
PACK_CASES = {
    # name: (channels, groups, permutations, bias, dtype, layout, packed layers)
    "igcv2_64_4_channels_last": ([64, 64, 64, 64], [16, 16, 16], "default", True,
                                 torch.float32, "channels_last", 3),
    "nonsquare_then_fma": ([32, 64, 32], [8, 8], "default", [True, False], torch.float32,
                           "contiguous", 1),
    "explicit_perms": ([64, 64, 64], [4, 4], "random", False, torch.float32, "contiguous", 2),
    "width_32": ([64, 64, 64], [2, 2], "default", True, torch.float32, "contiguous", 2),
    "fp16_split": ([64, 64, 64, 64], [8, 8, 8], "default", True, torch.float16, "contiguous", 3),
    "bf16": ([32, 32, 32], [4, 4], "random", True, torch.bfloat16, "channels_last", 2),
    # the chain's ends padded group by group (Layer.ns / Layer.ms): an IGCV3-like expansion
    # (2 groups of 8 -> 24 outputs: 2 x 32 output slots, two groups per 16-input block), a
    # reduction behind an explicit permutation (2 groups of 48 inputs: 2 x 64 input slots),
    # and a chain padded at both ends around an in-order layer
    "padded_expansion": ([16, 48], [2], ["interleave"], True, torch.float32, "channels_last",
                         1),
    "padded_reduction": ([96, 32], [2], "random", True, torch.float16, "contiguous", 1),
    "padded_ends": ([48, 64, 64, 96], [4, 4, 2], "random", [True, False, True],
                    torch.float32, "contiguous", 3),
}


@pytest.mark.parametrize("pack", [(1, 0), (2, 2)], ids=["pack1", "pack2_ahead2"])
@pytest.mark.parametrize("case", PACK_CASES.values(), ids=list(PACK_CASES))
def test_packed_path(case, pack, monkeypatch):
    """The packed path (``_layer_packed``: the permutation applied to the tile, whole groups
    packed into blocks of 16 inputs or one wider group, one batched ``tl.dot``; 16-bit
    intermediates rounded to the storage dtype, as the unfused chain rounds them) within the
    oracle's bound, on the layers that can take it (the rest on the FMA path), forward and
    backward (``_layer_packed_bwd``: dW and dh as batched products on the same blocks, the
    permutation undone on the tile). ``pack`` (PACK, AHEAD) (2, 2): the backward and the
    persistent forward loading their tiles two ahead, the tail tile masked."""
    pack, ahead = pack
    channels, groups, perms, bias, dtype, layout, packed = case
    p = build_problem(channels, groups, spatial=(5, 3), N=2, layout=layout, dtype=dtype,
                      permutations=perms, bias=bias, seed=13)
    metas = []
    real = T._launch
    monkeypatch.setattr(T, "_launch", lambda fn, grid, a, meta: (metas.append(meta),
                                                                  real(fn, grid, a, meta)))
    check_fp32(p, _gy(p, seed=14), pack=pack, ahead=ahead)
    fwd = [m for m in metas if "KEEP" not in m and "BLOCK_P" in m]
    bwd = [m for m in metas if "KEEP" in m]
    kb = K.LAYER_FIELDS.index("kb")
    assert fwd and fwd[0]["PACK"] == pack and fwd[0]["AHEAD"] == ahead, metas
    assert bwd and bwd[0]["PACK"] == pack, metas
    assert sum(row[kb] > 0 for row in fwd[0]["LAYERS"]) == packed, fwd


@pytest.mark.parametrize("pack", [(1, 0), (2, 1)], ids=["pack1", "pack2_ahead1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_path_with_input_index(dtype, pack, monkeypatch):
    """The packed path behind ``input_index``: 32 entries over 24 of x's 26 channels (8 repeats,
    2 channels unused) feed two packed layers. Within the oracle's bound, forward and backward
    (dx sums over the repeats; the unused channels' gradients are exactly zero); float16's
    packed layers hold their weight and dW blocks across the tiles, float32's load and add them
    per tile."""
    idx = [(7 * i + 3) % 24 for i in range(32)]
    p = build_problem([32, 32, 32], [4, 4], spatial=(5, 3), N=2, layout="contiguous",
                      dtype=dtype, permutations="random", bias=True, seed=21,
                      input_index=torch.tensor(idx), in_channels=26)
    metas = []
    real = T._launch
    monkeypatch.setattr(T, "_launch", lambda fn, grid, a, meta: (metas.append(meta),
                                                                  real(fn, grid, a, meta)))
    pack, ahead = pack
    _, grads = check_fp32(p, _gy(p, seed=22), pack=pack, ahead=ahead)
    kb = K.LAYER_FIELDS.index("kb")
    bwd = [m for m in metas if "KEEP" in m]
    fwd = [m for m in metas if "KEEP" not in m and "BLOCK_P" in m]
    assert fwd and fwd[0]["AHEAD"] == ahead and fwd[0]["HAS_INDEX"], metas
    assert bwd and bwd[0]["PACK"] == pack and bwd[0]["HAS_INDEX"], metas
    assert sum(row[kb] > 0 for row in bwd[0]["LAYERS"]) == 2, bwd
    assert torch.equal(grads[0][:, 24:], torch.zeros_like(grads[0][:, 24:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_padded_ends(dtype):
    """The packed path on tiles padded group by group at the chain's ends (``Layer.ns``: 4
    groups of 12 input channels in 4 x 16 slots; ``Layer.ms``: 4 groups of 24 output channels
    in 4 x 32 slots): x loaded, y stored, dy loaded and dx stored through the slots' channels,
    the weight blocks, biases and dW / db through them too, the padding never stored. Every
    packed configuration (tiles loaded ahead, dW held, by reductions, in SPLIT products of
    single blocks, whose offsets count the groups' real weights) within the oracle's bound and
    equal to PACK = 1's bit for bit."""
    p = build_problem([48, 64, 96], [4, 4], spatial=(6, 9), N=2, layout="channels_last",
                      dtype=dtype, permutations="random", bias=True, seed=41)
    gy = _gy(p, seed=42)
    ns, ms = K.LAYER_FIELDS.index("ns"), K.LAYER_FIELDS.index("ms")
    variants = (dict(pack=1), dict(pack=2, ahead=2), dict(pack=1, red=1),
                dict(pack=1, red=2), dict(pack=1, red=1, split=4),
                dict(pack=1, red=1, split=2), dict(pack=1, red=1, split=2, dy_late=1, w_tile=1))
    got = []
    for cfg in variants:
        with _launches() as metas:
            y, grads = check_fp32(p, gy, **cfg)
        fwd = [m for m in metas if "KEEP" not in m and "BLOCK_P" in m]
        bwd = [m for m in metas if "KEEP" in m]
        assert [(row[ns], row[ms]) for row in fwd[0]["LAYERS"]] == [(16, 16), (16, 32)], fwd
        assert bwd and bwd[0]["PACK"] == cfg["pack"] and bwd[0]["RED"] == cfg.get("red", 0)
        got.append([y, *grads])
    for cfg, g in zip(variants[1:], got[1:]):
        assert all(torch.equal(a, b) for a, b in zip(got[0], g)), cfg


@contextlib.contextmanager
def _launches():
    """The meta-parameters of every kernel launch inside the block."""
    metas = []
    real = T._launch
    T._launch = lambda fn, grid, a, meta: (metas.append(meta), real(fn, grid, a, meta))
    try:
        yield metas
    finally:
        T._launch = real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_packed_tiles_loaded_ahead(dtype):
    """Tiles loaded ahead: the packed backward's PACK = 2 (``PACKED_AHEAD2``: x and dy two
    tiles ahead instead of one) and the forward's persistent grid (``AHEAD`` 1 and 2: x one
    or two tiles ahead; 0: one program per tile). 20 tiles over the interpreter's 3 programs
    (each walks 6 or 7, so the loads rotate through both slots, and the last ones of each are
    masked past the end): the same tiles add in the same order, so output and gradients equal
    PACK = 1's (AHEAD 0) bit for bit, and are within the oracle's bound. So do the backward's
    RED configurations (``PACKED_RED``: the packed layers' dW added to the partial row by
    reductions every tile, in the same order as held across the tiles (float16) or read,
    added and written (float32)), whose launches carry RED = 1, RED = 2
    (``PACKED_RED_HELD``: the last layer's dW held across the tiles, the others' by
    reductions; offered to 16-bit chains, run here in both dtypes), and RED = 1 with SPLIT 2
    and 4 (``PACKED_SPLIT``: each layer's dW product in that many products of its 4 blocks,
    each program's own tile loaded, none ahead, with DY_LATE its dy after its recomputed
    forward, and with W_TILE the weight blocks loaded every tile where they are used instead
    of held across the tiles (float16; float32 chains never hold them); offered to tiles of
    1024 channels, run here on 64)."""
    p = build_problem([64, 64, 64], [8, 8], spatial=(10, 16), N=2, layout="contiguous",
                      dtype=dtype, permutations="random", bias=True, seed=31)
    gy = _gy(p, seed=32)
    got = {}
    variants = ((1, 0, 0, 0, 0), (1, 1, 0, 0, 0), (2, 2, 0, 0, 0), (1, 0, 1, 0, 0),
                (2, 2, 1, 0, 0), (1, 0, 2, 0, 0), (2, 2, 2, 0, 0), (1, 0, 1, 2, 0),
                (1, 0, 1, 4, 0), (1, 0, 1, -2, 0), (1, 0, 1, 2, 1), (1, 0, 1, 4, 1),
                (1, 0, 1, -2, 1))
    for pack, ahead, red, split, wt in variants:
        late = int(split < 0)  # -2: SPLIT 2 with DY_LATE
        with _launches() as metas:
            y, grads = check_fp32(p, gy, pack=pack, ahead=ahead, red=red, split=abs(split),
                                  dy_late=late, w_tile=wt)
        assert ([(m["RED"], m["SPLIT"], m["DY_LATE"], m["W_TILE"]) for m in metas
                 if "KEEP" in m] == [(red, abs(split), late, wt)]), metas
        got[pack, ahead, red, split, wt] = [y, *grads]
    for k in variants[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got[variants[0]], got[k])), k


def _chain_float64(p: Problem, round_to=None):
    """The chain of ``p`` in float64 (leaves, output); with ``round_to``, every layer's output but
    the last and every gradient reaching it rounded to that dtype."""
    import torch.nn.functional as F

    x = p.x.detach().cpu().to(torch.float64).requires_grad_()
    ws = [w.detach().cpu().to(torch.float64).requires_grad_() for w in p.weights]
    bs = [None if b is None else b.detach().cpu().to(torch.float64).requires_grad_()
          for b in (p.biases or [None] * len(ws))]
    ch = normalize(x, ws, p.groups, p.permutations, bs)
    h = x
    for l in range(ch.num_layers):
        w = ch.weights[l]
        h = F.conv2d(h, w.reshape(*w.shape, 1, 1), ch.biases[l], groups=ch.groups[l])
        if ch.shuffles[l] > 0:
            h = F.channel_shuffle(h, ch.shuffles[l])
        elif ch.perms[l] is not None:
            h = h.index_select(1, ch.perms[l])
        if round_to is not None and l < ch.num_layers - 1:
            h = RoundTo.apply(h, round_to)
    return [x] + ws + [b for b in bs if b is not None], h


LOW_DTYPES_HERE = [torch.float16] if T.INTERPRETED else [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", LOW_DTYPES_HERE, ids=str)
def test_packed_path_rounds_like_the_unfused_chain(dtype):
    """16-bit chains on the packed path take one tensor-core product per layer: each packed
    layer's input, and each gradient it multiplies, rounded to the storage dtype, where the
    unfused chain in that dtype rounds them. Output, dx, every dW and db equal the float64 chain
    rounded at those points (then to the dtype) in at least 95% of their elements (float32
    accumulation may flip a last bit: here 0 to 1.6%), while the exact float64 chain differs in
    a fifth or more (here 36% to 52%)."""
    p = on_device(build_problem([64, 64, 64, 64], [8, 8, 8], spatial=(5, 3), N=2, dtype=dtype,
                                bias=True, seed=21))
    gy = to_dev(make_tensor((2, 64, 5, 3), "contiguous", dtype, torch.Generator().manual_seed(3)))
    with K.override_config(pack=1):
        y = p.call("triton")
        got = [y] + list(torch.autograd.grad(y, p.leaves(), gy))
    rates = {}
    for name, rnd in (("rounded", dtype), ("exact", None)):
        leaves, h = _chain_float64(p, rnd)
        ref = [h] + list(torch.autograd.grad(h, leaves, gy.cpu().to(torch.float64)))
        rates[name] = [(a.cpu() != e.to(dtype)).double().mean().item() for a, e in zip(got, ref)]
    assert max(rates["rounded"]) <= 0.05, rates
    # (the last layer's db sums dy itself, which neither chain rounds)
    assert min(rates["exact"][:-1]) >= 0.2, rates


def test_packed_path_eligibility(monkeypatch):
    """Which layers the packed path takes: channels filling the tile, 16-wide blocks of whole
    groups (or one group of 16+), a block-diagonal weight within PACK_MAX_WEIGHTS; and the
    autotuner offers it beside the DENSE choices (the backward with KEEP=1)."""
    from igc_kernels.triton_kernels import chain as K

    def layer(c_in, c_out, g):
        return K.Layer(c_in, c_out, g, 0, 1, 1, False, 0, -1)

    assert layer(256, 256, 32).pack == (16, 16)  # IGCV2(256, 8): two groups per block
    assert layer(64, 64, 16).pack == (16, 16)  # four groups of 4
    assert layer(64, 64, 2).pack == (32, 32)  # one group of 32 per block
    assert layer(32, 64, 8).pack == (16, 32)  # non-square groups
    assert layer(64, 32, 8).pack is None  # blocks of 8 outputs: below tl.dot's 16
    assert layer(48, 48, 6).pack is None  # 48 channels leave padding slots
    assert layer(512, 512, 64).pack == (16, 16)  # IGCV2(512, 8): 512 x 16 weights
    assert layer(1024, 1024, 32).pack == (32, 32)  # 1024 x 32 = PACK_MAX_WEIGHTS
    assert layer(1024, 1024, 16).pack is None  # groups of 64: 1024 x 64 weights
    # tiles padded group by group (Layer.ns / ms): an IGCV3 expansion 64 -> 384 in two groups
    # on 2 x 256 output slots, its reduction on 2 x 256 input slots; the groups must be a
    # power of two to fill the tile
    assert layer(64, 384, 2).pack is None and layer(384, 64, 2).pack is None
    assert K.Layer(64, 384, 2, 0, 1, 1, False, 0, -1, ms=256).pack == (32, 256)
    assert K.Layer(384, 64, 2, 0, 1, 1, False, 0, -1, ns=256).pack == (256, 32)
    assert K.Layer(96, 96, 3, 0, 1, 1, False, 0, -1, ns=32, ms=32).pack is None
    # make_structure pads only the chain's ends, where that packs a layer that does not pack
    # in order, and not behind input_index
    def ends(c_x, channels, groups, index=False):
        L = len(groups)
        st = K.make_structure(c_x, channels, groups, [0] * L, [False] * L, [False] * L, index,
                              torch.float16)
        return [(l.ns, l.ms) for l in st.layers], st.packed_layers

    assert ends(64, [64, 384], [2]) == ([(0, 256)], [0])
    assert ends(384, [384, 64], [2]) == ([(256, 0)], [0])
    assert ends(384, [384, 64], [2], index=True) == ([(0, 0)], [])
    assert ends(48, [48, 64, 96], [4, 4]) == ([(16, 0), (0, 32)], [0, 1])
    assert ends(48, [48, 96, 48], [4, 4]) == ([(0, 0), (0, 0)], [])  # 96 inside: in order
    assert ends(64, [64, 64], [8]) == ([(0, 0)], [0])  # in order already
    st = K.make_structure(256, [256] * 4, [32] * 3, [32, 32, 0], [False] * 3, [False] * 3,
                          False, torch.bfloat16)
    fwd = K._configs(st, False)
    packed = [c for c in fwd if c.kwargs["PACK"]]
    assert len(packed) == len(K.TILE_CONFIGS) + 2 * len(K.PACKED_AHEAD2) and len(fwd) <= 22
    assert all(c.kwargs["DENSE"] == 0 and c.kwargs["PACK"] == 1 for c in packed)
    # the forward's persistent configurations, loading one or two tiles ahead; only packed
    persistent = [(c.kwargs["BLOCK_P"], c.num_warps, c.kwargs["AHEAD"]) for c in fwd
                  if c.kwargs["AHEAD"]]
    assert persistent == [(bp, w, a) for bp, w in K.PACKED_AHEAD2 for a in (1, 2)]
    assert all(c.kwargs["PACK"] for c in fwd if c.kwargs["AHEAD"])
    assert all("AHEAD" not in c.kwargs for c in K._configs(st, True))
    bwd = K._configs(st, True)
    packed_bwd = [c for c in bwd if c.kwargs["PACK"]]  # the backward keeps its intermediates
    assert len(packed_bwd) == (sum(bp >= K.MIN_DOT_ROWS for bp, _ in K.BWD_TILE_CONFIGS)
                               + len(K.PACKED_AHEAD2) + len(K.PACKED_RED)
                               + len(K.PACKED_RED_HELD) * st.native16)
    assert all(c.kwargs["KEEP"] == 1 and c.kwargs["DENSE"] == 0 for c in packed_bwd)
    ahead2 = [(c.kwargs["BLOCK_P"], c.num_warps) for c in packed_bwd
              if c.kwargs["PACK"] == 2 and not c.kwargs["RED"]]
    assert ahead2 == list(K.PACKED_AHEAD2)  # loading two tiles ahead
    # packed dW by reductions (RED 2, the last layer's held: 16-bit chains, which bf16 is not
    # under the interpreter; float16, below)
    for red, tiles in ((1, K.PACKED_RED), (2, K.PACKED_RED_HELD * st.native16)):
        got = [(c.kwargs["PACK"], c.kwargs["BLOCK_P"], c.num_warps) for c in bwd
               if c.kwargs["RED"] == red]
        assert got == list(tiles)  # only packed
    assert len(bwd) <= 34 and not any(c.kwargs["SPLIT"] for c in bwd)
    assert K.DEFAULT_CONFIG.pack == 0
    kb, mb = K.LAYER_FIELDS.index("kb"), K.LAYER_FIELDS.index("mb")
    assert [(row[kb], row[mb]) for row in st.meta()["LAYERS"]] == [(16, 16)] * 3
    # compiled for a GPU too, float32 chains with exact products ("ieee") are offered it (the
    # block products on FFMAs; TF32 allowed alone: not, test_precision_follows_...)
    monkeypatch.setattr(K, "INTERPRETED", False)
    st32 = K.make_structure(256, [256] * 4, [32] * 3, [32, 32, 0], [False] * 3, [False] * 3,
                            False, torch.float32)
    st16 = K.make_structure(256, [256] * 4, [32] * 3, [32, 32, 0], [False] * 3, [False] * 3,
                            False, torch.float16)
    assert st32.f32_prec == "ieee" and st32.packed_layers == [0, 1, 2]
    assert st16.packed_layers == [0, 1, 2]
    # RED = 2 (the last layer's dW held) for 16-bit chains only: float32 ones hold no blocks
    assert [(c.kwargs["PACK"], c.kwargs["BLOCK_P"], c.num_warps)
            for c in K._configs(st16, True) if c.kwargs["RED"] == 2] == list(K.PACKED_RED_HELD)
    assert not [c for c in K._configs(st32, True) if c.kwargs["RED"] == 2]
    # SPLIT (dW by reductions in 2 or 4 products, no tile ahead; DY_LATE: dy loaded after the
    # recomputed forward, for one of them; each with the weight blocks held, then each with
    # them loaded every tile, W_TILE): 16-bit chains with tiles of
    # SPLIT_CHANNELS channels (their other packed backwards spill), not float32 ones (theirs
    # spill too)
    for dt, want in ((torch.float16, list(K.PACKED_SPLIT)), (torch.float32, [])):
        wide = K.make_structure(1024, [1024] * 3, [64] * 2, [64, 0], [False] * 2, [False] * 2,
                                False, dt)
        cfgs = K._configs(wide, True)
        assert [(c.kwargs["SPLIT"], c.kwargs["BLOCK_P"], c.num_warps, c.kwargs["DY_LATE"],
                 c.kwargs["W_TILE"]) for c in cfgs if c.kwargs["SPLIT"]] == want
        assert all((c.kwargs["PACK"], c.kwargs["RED"]) == (1, 1) for c in cfgs
                   if c.kwargs["SPLIT"])
        assert not [c for c in cfgs if c.kwargs["W_TILE"] and not c.kwargs["SPLIT"]]
        assert len(cfgs) <= 37 and all("SPLIT" not in c.kwargs for c in K._configs(wide, False))
    assert [t[3:] for t in K.PACKED_SPLIT] == [(0, 0), (0, 0), (1, 0), (0, 1), (0, 1), (1, 1)]
    # a structure without packed layers (48 channels leave padding slots) compiles no packed
    # block, and never varies PACK
    st48 = K.make_structure(48, [48] * 3, [6] * 2, [6, 0], [False] * 2, [False] * 2, False,
                            torch.float16)
    assert st48.packed_layers == []
    assert [row[kb] for row in st48.meta()["LAYERS"]] == [0, 0]
    assert not any(c.kwargs["PACK"] for c in K._configs(st48, False))


# ---------------------------------------------------------------------------------------------
# Low precision
# ---------------------------------------------------------------------------------------------
LP_CASES = {
    "nchw_nonsquare": ([32, 48, 32], [4, 8], "default", True, (5, 5), "contiguous"),
    "channels_last_random_perms": ([24, 24, 24], [3, 3], "random", True, (4, 4),
                                   "channels_last"),
    "tokens_deep_wide": ([64, 64, 64, 64], [4, 8, 8], "default", [True, False, True], (),
                         "contiguous"),
}


@pytest.mark.parametrize("dense", [0, 1], ids=["fma", "dot"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LP_CASES.values(), ids=list(LP_CASES))
def test_low_precision_at_most_twice_unfused_error(case, dtype, dense):
    channels, groups, perms, bias, spatial, layout = case
    p = build_problem(channels, groups, spatial=spatial, N=3, layout=layout, dtype=dtype,
                      permutations=perms, bias=bias, seed=11)
    check_low_precision(p, _gy(p, seed=12), dense=dense)


# ---------------------------------------------------------------------------------------------
# Hypothesis: random chains
# ---------------------------------------------------------------------------------------------
@st.composite
def chains(draw):
    channels, groups = draw_chain_shape(draw, max_layers=4, max_width=20)
    L = len(groups)
    perms = [draw(st.sampled_from(["none", "interleave", "random"])) for _ in range(L)]
    bias = [draw(st.booleans()) for _ in range(L)]
    x_kind = draw(st.sampled_from(sorted(X_KINDS)))
    dense = draw(st.integers(0, 1))
    keep = draw(st.integers(0, 1))
    seed = draw(st.integers(0, 2**31 - 1))
    return channels, groups, perms, bias, x_kind, dense, keep, seed


@settings(max_examples=max(6, settings().max_examples // 3))
@given(spec=chains())
def test_random_chains(spec):
    channels, groups, perm_kinds, bias, x_kind, dense, keep, seed = spec
    gen = torch.Generator().manual_seed(seed)
    perms = [None if k == "none" else "interleave" if k == "interleave"
             else torch.randperm(c, generator=gen) for k, c in zip(perm_kinds, channels[1:])]
    nsp, layout = X_KINDS[x_kind]
    spatial = {0: (), 1: (4,), 2: (2, 3), 3: (2, 2, 2)}[nsp]
    p = build_problem(channels, groups, spatial=spatial, N=2, layout=layout,
                      dtype=torch.float32, permutations=perms, bias=bias, seed=seed % 1000)
    check_fp32(p, _gy(p), dense=dense, keep=keep)


# the packed path's float32 configurations (LaunchConfig): batched products, tiles loaded ahead,
# dW by reductions (RED 1; RED 2, the last layer's dW held, is offered to 16-bit chains only), in
# SPLIT products, with dy late or the weight blocks loaded every tile
PACKED_CONFIGS = [dict(pack=1), dict(pack=2, ahead=2), dict(pack=2, ahead=1),
                  dict(pack=1, red=1), dict(pack=1, red=1, split=2),
                  dict(pack=1, red=1, split=4, w_tile=1), dict(pack=1, red=1, split=2, dy_late=1)]


@st.composite
def packed_chains(draw):
    """1 to 3 layers over 16, 32 or 64 channels (tiles the packed path fills; x and y also 24
    or 48, whose tiles it fills group by group with padding where the groups allow), each
    layer of 1 to 16 groups dividing both sides (blocks of several narrow groups, one group of
    16 or more, and layers whose blocks are too narrow, which stay on the FMA path)."""
    L = draw(st.integers(1, 3))
    ends = [16, 24, 32, 48, 64]
    channels = [draw(st.sampled_from(ends if i in (0, L) else [16, 32, 64]))
                for i in range(L + 1)]
    groups = [draw(st.sampled_from([g for g in (1, 2, 4, 8, 16)
                                     if channels[l] % g == 0 and channels[l + 1] % g == 0]))
              for l in range(L)]
    perms = draw(st.sampled_from(["default", "random"]))
    bias = [draw(st.booleans()) for _ in range(L)]
    layout = draw(st.sampled_from(["contiguous", "channels_last"]))
    config = dict(draw(st.sampled_from(PACKED_CONFIGS)), block_p=draw(st.sampled_from([16, 32])),
                  num_warps=draw(st.sampled_from([4, 8])))
    return channels, groups, perms, bias, layout, config, draw(st.integers(0, 999))


@settings(max_examples=max(6, settings().max_examples // 2))
@given(spec=packed_chains())
def test_random_packed_chains(spec):
    """Random float32 chains on the packed path's configurations, forward and backward: within
    the float32 rounding bound, with the forced configuration launched. (16-bit chains are held
    to twice the unfused chain's error, a statistic of many outputs: on chains this small a
    correct result can miss it by a last bit, so their cases are the fixed ones above.)"""
    channels, groups, perms, bias, layout, config, seed = spec
    p = build_problem(channels, groups, spatial=(5, 3), N=2, layout=layout,
                      dtype=torch.float32, permutations=perms, bias=bias, seed=seed)
    with _launches() as metas:
        check_fp32(p, _gy(p, seed=seed + 1), **config)
    fwd = [m for m in metas if "KEEP" not in m and "BLOCK_P" in m]
    bwd = [m for m in metas if "KEEP" in m]
    kb = K.LAYER_FIELDS.index("kb")
    # (a chain none of whose layers packs launches the FMA path's kernels)
    pack = config["pack"] if any(row[kb] > 0 for row in fwd[0]["LAYERS"]) else 0
    assert bwd and all(m["PACK"] == pack for m in fwd + bwd), metas
    assert all(m["SPLIT"] == (config.get("split", 0) if pack else 0) for m in bwd), metas


# ---------------------------------------------------------------------------------------------
# Determinism, empty input, output_mask, op registration
# ---------------------------------------------------------------------------------------------
def test_bitwise_determinism():
    """Forward and every gradient bitwise identical over repeated runs; 2 x 8 x 8 positions
    are 8 tiles of 16 over the persistent backward's programs (several tiles per program)."""
    p = on_device(build_problem([16, 24, 16], [4, 4], spatial=(8, 8), N=2,
                                dtype=torch.float32, permutations=["interleave",
                                                                   torch.randperm(16)],
                                bias=True, seed=13))
    assert_bitwise_deterministic(p, "triton", to_dev(_gy(p)), runs=3)


@pytest.mark.parametrize("shape", [(0, 6, 3, 3), (0, 6), (2, 6, 0, 3)], ids=["n0", "tokens0",
                                                                           "h0"])
def test_empty_input(shape):
    p = on_device(build_problem([6, 9, 4], [3, 1], spatial=shape[2:], N=shape[0],
                                dtype=torch.float32, permutations=["interleave",
                                                                   torch.randperm(4)],
                                bias=True))
    y = p.call("triton")
    assert y.shape == (shape[0], 4, *shape[2:])
    grads = torch.autograd.grad(y, p.leaves(), torch.ones_like(y))
    assert grads[0].shape == p.x.shape
    for name, g, leaf in zip(p.leaf_names()[1:], grads[1:], p.leaves()[1:]):
        assert torch.equal(g, torch.zeros_like(leaf)), f"grad of {name} is not exactly zero"


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False],
                                  [False, False, True], [False, True, True]],
                         ids=["x", "w", "b", "wb"])
def test_backward_output_mask(mask):
    """``chain_backward`` computes only what ``output_mask`` asks for; the rest is (0,)."""
    p = build_problem([6, 9, 6], [3, 3], spatial=(2, 3), N=2, dtype=torch.float32,
                      permutations="random", bias=[True, False], seed=5)
    x, ws, bs, groups, shuffles, perms, idx = normalized_op_args(p)
    gy = _gy(p)
    with torch.no_grad():
        gx, gw, gb = T.backward_op(to_dev(gy), to_dev(x), [to_dev(w) for w in ws],
                                   [to_dev(b) for b in bs], groups, shuffles,
                                   [to_dev(q) for q in perms], mask, to_dev(idx))
    _, g64 = oracle(p, gy)
    _, mags = magnitudes(p, gy)
    k = p.reduction_length()
    if mask[0]:
        assert_within_rounding(gx.cpu(), g64[0], mags[0], k, torch.float32, name="grad_x")
    else:
        assert gx.shape == (0,)
    if mask[1]:
        assert_within_rounding(gw.cpu(), torch.cat([g.reshape(-1) for g in g64[1:3]]),
                               torch.cat([m.reshape(-1) for m in mags[1:3]]), k, torch.float32,
                               name="grad_weights")
    else:
        assert gw.shape == (0,)
    if mask[2]:
        assert_within_rounding(gb.cpu(), g64[3], mags[3], k, torch.float32, name="grad_biases")
    else:
        assert gb.shape == (0,)


def test_public_api_goes_through_the_triton_op():
    """interleaved_group_conv(backend="triton") and "auto" inside use_backend("triton") call
    igc_triton::chain_forward (and its backward op), not the C++ or reference ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    p = on_device(build_problem([8, 8], [2], spatial=(3,), N=2, dtype=torch.float32, seed=1))
    for scope in [None, "triton"]:
        rec = Record()
        with rec:
            if scope is None:
                y = p.call("triton")
            else:
                with igc.use_backend(scope):
                    y = p.call("auto")
            y.sum().backward()
        assert any("igc_triton.chain_forward" in n for n in rec.names), rec.names
        assert any("igc_triton.chain_backward" in n for n in rec.names), rec.names
        assert not any(n.startswith("igc.") or "convolution" in n for n in rec.names), rec.names


def test_opcheck():
    """torch.library.opcheck of both ops: schema, autograd registration, fake kernels (sizes,
    strides, dtypes equal to the real ones) and AOT dispatch, channels-last and an index."""
    gen = torch.Generator().manual_seed(0)
    p = build_problem([8, 12, 8], [2, 4], spatial=(2, 3), N=2, layout="channels_last",
                      dtype=torch.float32, permutations=["interleave", torch.randperm(8,
                                                                                  generator=gen)],
                      bias=[True, False], seed=2, input_index=torch.tensor([5, 1, 1, 0, 3, 2, 4,
                                                                            4]),
                      in_channels=6)
    x, ws, bs, groups, shuffles, perms, idx = normalized_op_args(p)
    args = (to_dev(x, True), [to_dev(w, True) for w in ws], [to_dev(b, True) for b in bs],
            groups, shuffles, [to_dev(q) for q in perms], to_dev(idx))
    torch.library.opcheck(torch.ops.igc_triton.chain_forward.default, args)
    gy = to_dev(_gy(p, "channels_last"))
    bargs = (gy, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:1]],
             [w.detach() for w in args[1]], [b.detach() for b in args[2]], groups, shuffles,
             args[5], [True, True, True], args[6])
    torch.library.opcheck(torch.ops.igc_triton.chain_backward.default, bargs)


def test_compile_fullgraph_no_graph_break():
    """torch.compile(fullgraph=True) captures one graph that calls the Triton op (aot_eager:
    the same kernels, traced through AOTAutograd); forward and backward equal to eager."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    def fn(x, w1, w2, b1, perm):
        return igc.interleaved_group_conv(x, [w1, w2], [4, 2], ["interleave", perm], [b1, None],
                                          backend="triton")

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 8, 3, 3, generator=g), torch.randn(12, 2, generator=g),
            torch.randn(6, 6, generator=g), torch.randn(12, generator=g),
            torch.randperm(6, generator=g)]
    args = [to_dev(a, requires_grad=a.is_floating_point()) for a in args]
    torch._dynamo.reset()
    rec = EagerAndRecordGraphs()
    y_rec = torch.compile(fn, backend=rec, fullgraph=True)(*args)
    assert len(rec.graphs) == 1
    targets = {str(n.target) for n in rec.graphs[0].graph.nodes if n.op == "call_function"}
    assert any("igc_triton.chain_forward" in t for t in targets), targets
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y_c = compiled(*args)
    y_e = fn(*args)
    gy = torch.randn(y_e.shape, generator=g).to(DEVICE)
    gc = torch.autograd.grad(y_c, args[:4], gy)
    ge = torch.autograd.grad(y_e, args[:4], gy)
    assert torch.equal(y_rec, y_e)
    torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Limits and bad input
# ---------------------------------------------------------------------------------------------
def test_available_and_info():
    assert "triton" in igc.available_backends(DEVICE)
    assert not igc.BACKENDS["triton"].unavailable_reasons()
    from igc_kernels.info import report

    assert "triton" in report()


def test_over_the_channel_limit_raises_with_reason_and_auto_falls_back():
    x = torch.randn(2, 1040, device=DEVICE)
    w = torch.randn(1040, 1, device=DEVICE)
    with pytest.raises(igc.BackendUnavailableError, match=r"C_1 = 1040 channels exceeds"):
        igc.interleaved_group_conv(x, [w], [1040], backend="triton")
    chain = normalize(x, [w], [1040])
    assert backends.select("auto", x, chain).name != "triton"
    y = igc.interleaved_group_conv(x, [w], [1040], backend="auto")
    torch.testing.assert_close(y, x * w[:, 0], rtol=1e-6, atol=1e-6)
    with pytest.raises(igc.BackendUnavailableError, match=r"x = 2000 channels exceeds"):
        igc.interleaved_group_conv(torch.randn(2, 2000, device=DEVICE),
                                   [torch.randn(4, 2, device=DEVICE)], [2],
                                   input_index=torch.tensor([0, 1999, 5, 5], device=DEVICE),
                                   backend="triton")


def test_float64_is_refused_with_reason():
    x = torch.randn(2, 4, dtype=torch.float64, device=DEVICE)
    w = torch.randn(4, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(igc.BackendUnavailableError, match=r"dtype torch.float64 is not supported"):
        igc.interleaved_group_conv(x, [w], [2], backend="triton")


@pytest.mark.parametrize("bad, match", [
    (lambda a: a.__setitem__(1, [a[1][0][:, :3], a[1][1]]),
     r"x has 8 channels, but layer 1 expects C_0 = weight.shape\[1\] \* groups = 3 \* 2"),
    (lambda a: a.__setitem__(2, [torch.zeros(5, device=DEVICE), a[2][1]]),
     r"layer 1: bias has shape \(5,\)"),
    (lambda a: a.__setitem__(4, [5, 0]), r"layer 1: shuffles = 5 must be 0 or divide C_1 = 12"),
    (lambda a: a.__setitem__(5, [None, torch.arange(5, device=DEVICE)]),
     r"layer 2: permutation has shape \(5,\)"),
    (lambda a: a.__setitem__(3, [2]), r"one entry per layer"),
    (lambda a: a.__setitem__(0, a[0].double()), r"x has dtype torch.float64"),
])
def test_raw_op_rejects_inconsistent_args_before_launch(bad, match):
    """The raw op checks structure itself (the public API checks more, before it), raising a
    ValueError / TypeError naming the layer, and keeps working afterwards."""
    g = torch.Generator().manual_seed(0)
    good = [torch.randn(2, 8, 3, generator=g), [torch.randn(12, 4, generator=g),
                                                torch.randn(6, 6, generator=g)],
            [torch.randn(12, generator=g), torch.randn(6, generator=g)], [2, 2], [2, 0],
            [None, None]]
    good = [to_dev(a) if isinstance(a, torch.Tensor) else
            [to_dev(t) for t in a] if isinstance(a, list) else a for a in good]
    args = list(good)
    bad(args)
    with pytest.raises((ValueError, TypeError), match=match):
        T.forward_op(*args)
    y = T.forward_op(*good)
    assert y.shape == (2, 6, 3)


def test_public_api_errors_name_layer_and_value():
    x = torch.randn(2, 8, 3, device=DEVICE)
    ws = [torch.randn(12, 4, device=DEVICE), torch.randn(6, 5, device=DEVICE)]
    with pytest.raises(ValueError, match=r"layer 2: weight has shape \(6, 5\), expected"):
        igc.interleaved_group_conv(x, ws, [2, 2], backend="triton")
    with pytest.raises(ValueError, match=r"input_index entries must lie in \[0, 8\)"):
        igc.interleaved_group_conv(x, ws[:1], [2], input_index=torch.tensor([0, 1, 8, 2],
                                                                            device=DEVICE),
                                   backend="triton")
    y = igc.interleaved_group_conv(x, ws[:1], [2], backend="triton")
    assert y.shape == (2, 12, 3)


def test_precision_follows_the_tf32_flag_and_the_opt_in(monkeypatch):
    """float32 dots: "ieee" by default, "tf32" where TF32 is allowed for matmul, else "bf16x6"
    with IGC_TRITON_FP32_MMA=1 (compiled kernels only: the interpreter knows no "bf16x6").
    A float32 structure offers the packed path with exact products ("ieee") or with the
    opt-in, not where TF32 alone is allowed, and its precision keys the structure (one
    autotuner per precision)."""
    prev = torch.backends.cuda.matmul.allow_tf32

    def fp32_structure():
        return K.make_structure(256, [256] * 3, [16] * 2, [16, 0], [False] * 2, [False] * 2,
                                False, torch.float32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.delenv(K.FP32_MMA_ENV, raising=False)
        assert K.dot_precision() == "ieee"
        monkeypatch.setenv(K.FP32_MMA_ENV, "1")
        assert K.dot_precision() == ("ieee" if K.INTERPRETED else "bf16x6")
        monkeypatch.setattr(K, "INTERPRETED", False)  # as compiled for a GPU
        assert K.dot_precision() == "bf16x6"
        st = st_bf16x6 = fp32_structure()
        assert st.f32_prec == "bf16x6" and st.f32_pack and st.packed_layers == [0, 1]
        assert any(c.kwargs["PACK"] for c in K._configs(st, False))
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 allowed too: it sets the precision
        st = fp32_structure()
        assert K.dot_precision() == "tf32" and st.f32_prec == "tf32"
        assert st.packed_layers == [0, 1] and st != st_bf16x6  # an autotuner per precision
        monkeypatch.setenv(K.FP32_MMA_ENV, "0")  # TF32 allowed without the opt-in: not packed
        st = fp32_structure()
        assert K.dot_precision() == "tf32" and not st.f32_pack and st.packed_layers == []
        assert not any(c.kwargs["PACK"] for c in K._configs(st, False))
        torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.delenv(K.FP32_MMA_ENV)  # exact products: the packed path on FFMAs
        st = fp32_structure()
        assert K.dot_precision() == "ieee" and st.f32_pack and st.packed_layers == [0, 1]
        assert any(c.kwargs["PACK"] for c in K._configs(st, False))
        # 16-bit chains: their own packed path either way, never the float32 switch
        monkeypatch.setenv(K.FP32_MMA_ENV, "1")
        st16 = K.make_structure(256, [256] * 3, [16] * 2, [16, 0], [False] * 2, [False] * 2,
                                False, torch.float16)
        assert st16.f32_prec == "ieee" and not st16.f32_pack and st16.packed_layers == [0, 1]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"),
                    reason="torch without the fp32_precision API (before 2.9)")
def test_tf32_follows_the_fp32_precision_api():
    """TF32 set through torch's fp32_precision API (per backend op or globally) turns the
    float32 dots to "tf32" as the legacy flag does (torch's legacy getter raises once that API
    has been used: tf32_allowed reads the new one); "ieee" turns them back."""
    matmul = torch.backends.cuda.matmul
    prev = (torch.backends.fp32_precision, matmul.fp32_precision)
    try:
        matmul.fp32_precision = "tf32"
        assert K.tf32_allowed() and K.dot_precision() == "tf32"
        matmul.fp32_precision = "ieee"
        assert not K.tf32_allowed() and K.dot_precision() in ("ieee", "bf16x6")
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"  # inherited from the global setting
        assert K.tf32_allowed()
    finally:
        torch.backends.fp32_precision, matmul.fp32_precision = prev
    assert matmul.allow_tf32 is False and not K.tf32_allowed()  # restored


def test_position_dims_collapse():
    """The host-side collapse of the position dims: NCHW keeps (N, HW), channels-last and
    tokens collapse to one dim, a strided view keeps its steps, size-1 dims vanish."""
    x = torch.empty(4, 6, 5, 7)
    assert K.position_dims(x.shape, [x.stride()]) == ([1, 1, 4, 35], [[0, 0, 210, 1]])
    cl = x.to(memory_format=torch.channels_last)
    assert K.position_dims(cl.shape, [cl.stride()]) == ([1, 1, 1, 140], [[0, 0, 0, 6]])
    v = torch.empty(4, 6, 9, 16)[:, :, 1:6, 1:12:2]  # rows of 6 with step 2: H, W stay apart
    sizes, (s,) = K.position_dims(v.shape, [v.stride()])
    assert sizes == [1, 4, 5, 6] and s == [0, 864, 16, 2]
    w = torch.empty(4, 6, 9, 16)[:, :, 1:6, ::2]  # rows of 8 with step 2 tile H exactly
    assert K.position_dims(w.shape, [w.stride()]) == ([1, 1, 4, 40], [[0, 0, 864, 2]])
    t = torch.empty(1, 6, 1, 3)
    assert K.position_dims(t.shape, [t.stride()]) == ([1, 1, 1, 3], [[0, 0, 0, 1]])


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_autotuned_launch_path_up_to_the_launch(monkeypatch, direction):
    """The autotuned branch (the GPU default) through the op bodies up to the kernel launch: the
    launch gets a dict of meta-parameters with the precision (and the backward's flags) and no
    fixed tile, and the forward's grid takes the autotuner's BLOCK_P. (The interpreter has no
    autotuned kernels: sentinels stand in for them; the launch is recorded, not run. Before,
    the autotuned branch returned meta=None and ``{"PREC": ..., **None}`` raised TypeError on
    the first call on any GPU.)"""
    launches = []
    real_kernels_for = K.kernels_for

    def kernels_for(st):
        kern = real_kernels_for(st)
        return types.SimpleNamespace(fwd=kern.fwd, bwd=kern.bwd, fwd_tuned="tuned_fwd",
                                     bwd_tuned="tuned_bwd", fixed_meta=kern.fixed_meta,
                                     meta=kern.meta)

    monkeypatch.setattr(K, "kernels_for", kernels_for)
    monkeypatch.setattr(T, "_launch", lambda fn, grid, args, meta: launches.append(
        (fn, grid, args, meta)))
    monkeypatch.setenv("IGC_TRITON_AUTOTUNE", "1")
    x = to_dev(torch.randn(2, 8, 5))
    ws = [to_dev(torch.randn(8, 4)), to_dev(torch.randn(8, 2))]
    args = (ws, [], [2, 4], [2, 0], [None, None])
    if direction == "forward":
        T.chain_forward(x, *args)
        fn, grid, _, meta = launches[0]
        assert fn == "tuned_fwd" and "BLOCK_P" not in meta and meta["PREC"] in ("ieee", "tf32")
        assert "DENSE" not in meta and meta["NL"] == 2  # the structure's compile-time arguments
        assert grid({"BLOCK_P": 16}) == (2,) and grid({"BLOCK_P": 2}) == (6,)  # 2 x 5 positions
    else:
        T.chain_backward(to_dev(torch.randn(2, 8, 5)), x, *args, [True, True, False])
        fn, _, _, meta = launches[0]
        assert fn == "tuned_bwd" and "BLOCK_P" not in meta and "KEEP" not in meta
        assert meta["NL"] == 2 and meta["W_TOTAL"] == 8 * 4 + 8 * 2
        assert meta["NEED_DX"] == 1 and meta["NEED_DW"] == 1 and meta["NEED_DB"] == 0


def test_autotune_switch_and_launch_choice(monkeypatch):
    """IGC_TRITON_AUTOTUNE=0, an override or deterministic mode launch a fixed configuration;
    otherwise the autotuned kernel (where one exists: on GPUs) is chosen."""
    import types

    from igc_kernels.triton_kernels import chain as K

    kern = types.SimpleNamespace(fwd="plain", bwd="plain_bwd", fwd_tuned="tuned",
                                 bwd_tuned="tuned_bwd", meta={"NL": 3},
                                 fixed_meta=lambda cfg, backward: {"BLOCK_P": cfg.block_p})
    monkeypatch.delenv("IGC_TRITON_AUTOTUNE", raising=False)
    assert K.autotune_enabled()
    # the structure's compile-time arguments go with every launch
    assert K.launch_choice(kern, False) == ("tuned", {"NL": 3})
    assert K.launch_choice(kern, True) == ("tuned_bwd", {"NL": 3})
    monkeypatch.setenv("IGC_TRITON_AUTOTUNE", "0")
    assert not K.autotune_enabled()
    assert K.launch_choice(kern, True) == ("plain_bwd", {"NL": 3,
                                                         "BLOCK_P": K.DEFAULT_CONFIG.block_p})
    monkeypatch.setenv("IGC_TRITON_AUTOTUNE", "1")
    with K.override_config(block_p=64):
        assert K.launch_choice(kern, False) == ("plain", {"NL": 3, "BLOCK_P": 64})
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert K.launch_choice(kern, False)[0] == "plain"
    finally:
        torch.use_deterministic_algorithms(prev)


def test_autotuner_prunes_spilling_configurations(monkeypatch):
    """The autotuner's pruning: configurations whose tiles clearly cannot fit go first; then,
    with real GPU tensors, every configuration whose compiled kernel spills (here a stand-in
    reports the spills; tests/test_gpu_static.py uses real sm_90 compiles); when all spill, the
    least spilling one alone; a configuration that fails to compile is dropped; under tracing
    (no real GPU tensors) only the first rule applies."""
    import triton

    from igc_kernels.triton_kernels import chain as K

    st = K.make_structure(256, [256, 256], [32], [0], [False], [False], False, torch.float32)
    configs = [c for c in K._configs(st, False) if not c.kwargs["PACK"]]  # FMA path
    assert [(c.kwargs["BLOCK_P"], c.num_warps) for c in configs] == list(K.TILE_CONFIGS)
    spilled = {16: 0, 32: 64, 64: 512, 128: 4096}

    def spills(fn, c, named_args, kwargs):
        assert fn == "fn" and kwargs == {"PREC": "ieee"} and "x_ptr" in named_args
        if c.num_warps == 16:
            raise RuntimeError("does not compile")
        # 16 positions on 8 warps: 16 bytes more than on 4
        return spilled[c.kwargs["BLOCK_P"]] + (16 if c.num_warps == 8 and
                                               c.kwargs["BLOCK_P"] == 16 else 0)

    prune = K._prune(st, False, "fn", spills)
    args = {"x_ptr": torch.zeros(1)}
    # on the CPU (and under tracing) the arguments are not real GPU tensors: cost rule only
    assert prune(configs, args, PREC="ieee") == configs
    monkeypatch.setattr(K, "_real_gpu_tensors", lambda named_args: True)
    kept = prune(configs, args, PREC="ieee")
    assert [(c.kwargs["BLOCK_P"], c.num_warps) for c in kept] == [(16, 4)]
    spilled[16] = 8  # all spill: the least spilling one alone
    assert [(c.kwargs["BLOCK_P"], c.num_warps) for c in prune(configs, args, PREC="ieee")] \
        == [(16, 4)]
    # none compiles: the list is left to the autotuner, which reports the compiler's error
    assert K.spill_free(configs, lambda c: 1 / 0) == configs
    assert K.spill_free([triton.Config({"BLOCK_P": 16})], lambda c: 0) != []


def test_fixed_path_avoids_spilling_configurations(monkeypatch):
    """Autotuning off or deterministic mode: the plain kernel launches the default
    configuration unless its compile spills; then the first configuration of the autotuner's
    list that does not (the least spilling one when all do), chosen once per argument signature
    from compiles (a stand-in here; on GPUs ``warmup`` from the arguments' dtypes, the same
    compile eager and traced). A configuration that does not compile is skipped; the
    interpreter keeps the default."""
    import types

    from igc_kernels.triton_kernels import chain as K

    st = K.make_structure(256, [256, 256, 256], [32, 32], [8, 0], [False, False],
                          [False, False], False, torch.float32)
    kern = types.SimpleNamespace(st=st, fwd="plain", bwd="plain_bwd", fwd_tuned=None,
                                 bwd_tuned=None, meta=st.meta(),
                                 fixed_meta=lambda cfg, backward: K.Kernels.fixed_meta(
                                     types.SimpleNamespace(st=st), cfg, backward))
    calls = []
    spilled = {(16, 4): 1000, (8, 8): 64, (8, 16): 0, (16, 16): 0}

    def spills(fn, args, meta):
        calls.append((meta["BLOCK_P"], meta["num_warps"], meta["KEEP"]))
        assert fn == "plain_bwd" and meta["PREC"] == "ieee" and args[0].dtype == torch.float32
        if meta["num_warps"] == 8:
            raise RuntimeError("does not compile")
        return spilled.get((meta["BLOCK_P"], meta["num_warps"]), 500)

    monkeypatch.setattr(K, "_FIXED", {})
    args = [torch.zeros(4), 7, None]
    choice = K.fixed_config(kern, True, "plain_bwd", args, {"PREC": "ieee"}, spills)
    # the default (16, 4, keep) spills; (8, 8) does not compile; (8, 16, keep) is the first
    # spill-free configuration in the autotuner's order
    assert (choice.block_p, choice.num_warps, choice.keep) == (8, 16, 1)
    assert calls[0] == (16, 4, 1) and calls[-1] == (8, 16, 1)
    n = len(calls)
    assert K.fixed_config(kern, True, "plain_bwd", args, {"PREC": "ieee"}, spills) == choice
    assert len(calls) == n  # cached per signature
    # all spill: the least spilling; nothing compiles: the default
    monkeypatch.setattr(K, "_FIXED", {})
    assert K.fixed_config(kern, True, "plain_bwd", args, {"PREC": "ieee"},
                          lambda f, a, m: 100 - m["BLOCK_P"]).block_p == 64
    monkeypatch.setattr(K, "_FIXED", {})
    assert K.fixed_config(kern, True, "plain_bwd", args, {"PREC": "ieee"},
                          lambda f, a, m: 1 / 0) == K.DEFAULT_CONFIG
    # launch_choice takes it on the fixed path of a compiled (non-interpreted) run
    monkeypatch.setenv("IGC_TRITON_AUTOTUNE", "0")
    monkeypatch.setattr(K, "INTERPRETED", False)
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(K, "_dtype_spills", spills)
    monkeypatch.setattr(K.fixed_config, "__defaults__", (spills,))
    fn, meta = K.launch_choice(kern, True, args=args, base_meta={"PREC": "ieee"})
    assert fn == "plain_bwd" and (meta["BLOCK_P"], meta["num_warps"]) == (8, 16)
    monkeypatch.setenv("IGC_TRITON_FIXED", "default")  # no search: one compilation
    assert K.launch_choice(kern, True, args=args,
                           base_meta={"PREC": "ieee"})[1]["BLOCK_P"] == 16
    assert K.fixed_choice(kern, True, "plain_bwd", args, {"PREC": "ieee"},
                          accept_spills=True) == (
        K.DEFAULT_CONFIG, 1000)  # taken although it spills

    from triton.runtime.errors import OutOfResources

    def too_big_default(fn, args, meta):
        if (meta["BLOCK_P"], meta["num_warps"]) == (16, 4):
            raise OutOfResources(450560, 232448, "shared memory")
        return spills(fn, args, meta)

    # ... unless it does not fit the GPU: the next candidate that fits, spilling or not
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(K, "_dtype_spills", too_big_default)
    meta = K.launch_choice(kern, True, args=args, base_meta={"PREC": "ieee"})[1]
    assert (meta["BLOCK_P"], meta["num_warps"]) != (16, 4)
    assert (meta["BLOCK_P"], meta["num_warps"]) in [c[:2] for c in calls]
    monkeypatch.delenv("IGC_TRITON_FIXED")
    monkeypatch.setattr(K, "INTERPRETED", True)  # the interpreter: the default, no compile
    assert K.launch_choice(kern, True, args=args, base_meta={})[1]["BLOCK_P"] == 16


def _igcv2(c, width, dtype):
    """IGCV2(c, width), three layers, interleaved, as the fixed path's tests build it."""
    return K.make_structure(c, [c] * 4, [c // width] * 3, [c // width, c // width, 0],
                            [False] * 3, [False] * 3, False, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_fixed_path_tries_packed_configurations_first(monkeypatch, dtype):
    """Chains with packed layers: the fixed path's candidates start with FIXED_PACKED_FORWARD /
    FIXED_PACKED_BACKWARD (the static model's choices, each one of the autotuner's
    configurations), then the default, then the autotuner's list; the first that compiles
    without spills runs. 16-bit chains always; float32 chains where no packed block is padded
    (groups at least 16 wide) and a tile has FIXED_FP32_PACKED_MIN_CHANNELS channels or more,
    or where a tile has FIXED_FP32_PACKED_CHANNELS or more, else the default first (IGCV2(256,
    8), (64, 16)). Float32's default (exact products) is the FMA path (FIXED_FP32_DEFAULT: no
    dot path, whose products would be FFMAs over the block-diagonal weight's zeros), and where
    a tile has at most FIXED_FP32_SMALL_CHANNELS channels its backward tries
    FIXED_FP32_BACKWARD (32 positions) first. IGC_TRITON_FIXED=default (one compile: the
    default first) keeps the default first. Where a tile has 1024 channels, the persistent
    forward comes first, and in 16-bit the backward's FIXED_SPLIT_BACKWARD."""
    import types

    st = _igcv2(256, 8, dtype)
    assert st.packed_layers
    native = dtype == torch.float16
    assert K.FIXED_FP32_PACKED_CHANNELS == 512 and K.FIXED_FP32_PACKED_MIN_CHANNELS == 128
    assert K.FIXED_FP32_SMALL_CHANNELS == 128
    assert K.FIXED_FP32_DEFAULT == dataclasses.replace(K.DEFAULT_CONFIG, dense=0)
    assert [(c.block_p, c.num_warps, c.dense, c.pack) for c in K.FIXED_FP32_BACKWARD] == [
        (32, 4, 0, 0)]
    for s, packed_first in ((st, native), (_igcv2(256, 16, dtype), True),
                            (_igcv2(256, 32, dtype), True), (_igcv2(512, 8, dtype), True),
                            (_igcv2(128, 8, dtype), native), (_igcv2(128, 16, dtype), True),
                            (_igcv2(64, 16, dtype), native), (_igcv2(64, 32, dtype), native)):
        assert s.packed_layers
        small = s.c_x <= 128
        assert bool(s.dense_layers) == small
        # the default: DEFAULT_CONFIG, float32's FMA twin where the chain has dense layers
        default = K.FIXED_FP32_DEFAULT if small and not native else K.DEFAULT_CONFIG
        assert K.fixed_default(s) == K.fixed_default(s, True) == default
        for backward, first in ((False, K.FIXED_PACKED_FORWARD),
                                (True, K.FIXED_PACKED_BACKWARD)):
            cands = K.fixed_candidates(s, backward)
            tuned = [K.launch_config(c) for c in K._configs(s, backward)]
            assert len(cands) == len(set(cands))
            assert set(cands) - {K.DEFAULT_CONFIG} <= set(tuned)
            expect = [c for c in first if c in tuned] if packed_first else []
            if backward and small and not native:
                expect += list(K.FIXED_FP32_BACKWARD)
            n = len(expect)
            assert n or not packed_first
            assert cands[:n] == expect and cands[n] == default, cands[:n + 1]
            assert all(c.pack for c in first) and all(c.dense == 0 for c in first)
            assert K.fixed_candidates(s, backward, accept_spills=True)[0] == default
    # float32 with "bf16x6" products (IGC_TRITON_FP32_MMA=1): the backward's candidates that
    # add dW by reductions first, the others in their order; the forward's order unchanged
    if not native:
        for s in (_igcv2(256, 16, dtype), _igcv2(256, 32, dtype)):
            mma = dataclasses.replace(s, f32_prec="bf16x6")
            exact = K.fixed_candidates(s, True)
            cands = K.fixed_candidates(mma, True)
            assert sorted(cands, key=exact.index) == exact, (cands, exact)
            assert [(c.pack, c.red) for c in cands[:3]] == [(2, 1), (1, 1), (2, 0)], cands
            assert K.fixed_candidates(mma, False) == K.fixed_candidates(s, False)
    # a dense layer (one group: no zeros in its weight) keeps the dot path's default
    one = K.make_structure(64, [64, 64], [1], [0], [False], [False], False, dtype)
    assert one.dense_layers == [0] and K.fixed_default(one) == K.DEFAULT_CONFIG
    cands = K.fixed_candidates(one, True)  # (no 32-position FMA backward before it)
    assert cands.index(K.DEFAULT_CONFIG) < cands.index(K.FIXED_FP32_BACKWARD[0])
    # a tile of 1024 channels (one CTA fills an SM): the persistent forward candidate first
    wide = _igcv2(1024, 16, dtype)
    fwd, bwd = K.fixed_candidates(wide, False), K.fixed_candidates(wide, True)
    assert K.FIXED_PERSISTENT_CHANNELS == 1024 and wide.packed_layers
    # the persistent ones (two tiles ahead, then one; 8 warps before 16) before the others,
    # each in FIXED_PACKED_FORWARD's order
    fexp = sorted(K.FIXED_PACKED_FORWARD, key=lambda c: not c.ahead)
    assert [(c.ahead, c.num_warps) for c in fexp] == [(2, 8), (1, 8), (1, 16), (0, 4), (0, 16),
                                                      (0, 8)]
    assert fwd[:len(fexp) + 1] == [*fexp, K.DEFAULT_CONFIG]
    bexp = [c for c in K.FIXED_PACKED_BACKWARD if c.red != 2 or native]  # RED 2: 16-bit only
    # and the backward's SPLIT candidates (16-bit only: float32's spill) before the others
    split = list(K.FIXED_SPLIT_BACKWARD) * native
    assert K.SPLIT_CHANNELS == 1024
    assert ([(c.split, c.dy_late, c.w_tile) for c in K.FIXED_SPLIT_BACKWARD]
            == [(2, 0, 0), (4, 0, 0), (2, 1, 0), (2, 0, 1), (4, 0, 1), (2, 1, 1)])
    assert all((c.pack, c.red) == (1, 1) for c in K.FIXED_SPLIT_BACKWARD)
    assert fwd[0].ahead == 2 and bwd[:len(split) + len(bexp) + 1] == [*split, *bexp,
                                                                      K.DEFAULT_CONFIG]
    st = _igcv2(256, 16, dtype)  # packed first in either dtype
    kern = types.SimpleNamespace(st=st, meta=st.meta(),
                                 fixed_meta=lambda cfg, backward: K.Kernels.fixed_meta(
                                     types.SimpleNamespace(st=st), cfg, backward))
    calls = []

    def spills(fn, args, meta):  # the first packed backward candidate spills
        calls.append((meta["BLOCK_P"], meta["num_warps"], meta["PACK"], meta["RED"]))
        return 24 if (meta["PACK"], meta["RED"]) == (2, 0) else 0

    monkeypatch.setattr(K, "_FIXED", {})
    args = [torch.zeros(4, dtype=dtype), 7, None]
    choice = K.fixed_config(kern, True, "plain_bwd", args, {"PREC": "ieee"}, spills)
    # the second candidate: 16-bit, the last layer's dW held (RED 2); float32 (offered no
    # RED 2), every packed layer's dW by reductions
    second = (16, 8, 2, 2 if native else 1)
    assert (choice.block_p, choice.num_warps, choice.pack, choice.red) == second
    assert calls == [(16, 8, 2, 0), second]
    # no packed candidate compiles (e.g. their shared memory): the default, as before
    monkeypatch.setattr(K, "_FIXED", {})
    assert K.fixed_config(kern, False, "plain", args, {"PREC": "ieee"},
                          lambda f, a, m: 1 / 0 if m["PACK"] else 0) == K.DEFAULT_CONFIG


def test_structure_whose_every_configuration_spills_is_refused_before_launch(monkeypatch):
    """On GPUs the backend compiles (never launches) the fixed path's candidates for the input's
    forward, and for the backward when gradients are wanted; when every one spills, the Triton
    backend refuses the input with the reason (an explicit ``backend="triton"`` raises,
    ``"auto"`` falls back, a direct op call raises before any launch). The compile here is a
    stand-in with the same interface as ``K._dtype_spills``; on the CPU the check is off."""
    x = torch.randn(2, 32, 3, device=DEVICE)
    w = [torch.randn(32, 4, device=DEVICE), torch.randn(32, 4, device=DEVICE)]
    assert not T.checks_spills(torch.randn(1, device="cpu"))
    compiled = []

    def spills(fn, args, meta):  # the forward spills everywhere, the backward nowhere
        compiled.append(fn.__name__.split("_")[-1])
        assert all(not isinstance(a, torch.Tensor) or a.device.type == "meta" for a in args)
        return 0 if meta.get("NEED_DX") is not None else 24 + meta["BLOCK_P"]

    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_SPILL_REASONS", {})
    monkeypatch.setattr(K, "_dtype_spills", spills)
    chain = normalize(x, w, [8, 8])
    reasons = T.spill_reasons(x, chain, False, False, False)
    assert len(reasons) == 1 and "forward" in reasons[0] and "40 bytes" in reasons[0]
    assert set(compiled) == {"fwd"}  # no gradient wanted: the backward is not compiled
    assert T.spill_reasons(x, chain, True, True, False) == reasons
    assert "bwd" in compiled
    n = len(compiled)
    assert T.spill_reasons(x, chain, False, False, False) == reasons and len(compiled) == n

    monkeypatch.setattr(T, "checks_spills", lambda t: True)
    with pytest.raises(igc.BackendUnavailableError, match=r"forward kernel for this chain spills"):
        igc.interleaved_group_conv(x, w, [8, 8], backend="triton")
    assert backends.select("auto", x, chain).name != "triton"
    y = igc.interleaved_group_conv(x, w, [8, 8], backend="auto")
    torch.testing.assert_close(y, igc.interleaved_group_conv(x, w, [8, 8],
                                                             backend="reference"))
    with pytest.raises(ValueError, match=r"spills registers to local memory"):
        T.chain_forward(x, chain.weights, [], list(chain.groups), chain.shuffles, chain.perms)
    # a backward that spills everywhere is refused only when gradients are wanted
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_SPILL_REASONS", {})
    monkeypatch.setattr(K, "_dtype_spills",
                        lambda fn, a, m: 16 if m.get("NEED_DX") is not None else 0)
    assert backends.select("triton", x, chain).name == "triton"
    xg = x.clone().requires_grad_()
    with pytest.raises(igc.BackendUnavailableError, match=r"backward kernel .* 16 bytes"):
        igc.interleaved_group_conv(xg, w, [8, 8], backend="triton")
    with torch.no_grad():
        igc.interleaved_group_conv(xg, w, [8, 8], backend="triton")
    # while torch.compile traces the caller, the check is left to the op's body
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert backends.BACKENDS["triton"].limit_reasons(xg, normalize(xg, w, [8, 8])) == []
