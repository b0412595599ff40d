"""Blocks: chains with spatial (k x k) layers, strides, activations and a residual add.

* The fused CPU block kernel (``igc::block_forward``) against the reference (unfused PyTorch) in
  float64, the oracle: IGCV2 / IGCV3 style blocks, grouped and depth-wise spatial layers (k = 3,
  5, 7, channel multiplier 2), the spatial layer first, in the middle or last, stride 1 and 2,
  odd and tiny sizes, NCHW and channels-last, both work splits of the kernel (fewer images than
  threads: one scratch for every image; otherwise bands of output rows per image, several bands
  for the large cases), ``input_index``, every dtype; hypothesis-drawn blocks besides. Output
  shape, dtype and strides equal the reference's (but for dims of size 1, whose stride is
  arbitrary).
* Pointwise chains with activations and / or a residual add: the no-grad fused pass, and with
  gradients (fused chains between PyTorch activation ops): gradcheck and the reference's
  gradients.
* Validation of every new argument, spatial layers being inference only, the GPU backends'
  refusal, ``"auto"`` falling back to the reference for two spatial layers.
* The op ``torch.ops.igc.block_forward`` called directly: C++ checks, fake (meta) kernel,
  opcheck, no backward, torch.compile.

Tolerances come from the problem (see ``igc_test_utils``): an element of a chain computed with
unit roundoff ``u`` is within ``k u * magnitude`` of the exact value, ``magnitude`` being the same
chain run in float64 on ``|x|``, ``|W_l|``, ``|b_l|`` (activations dropped: on non-negative
values they only shrink it) and ``k = sum_l (n_l k_l^2 + 2)`` (+ the activation's and the
residual add's roundings). relu and relu6 are 1-Lipschitz, hardswish 1.5-Lipschitz: an error
entering a hardswish comes out at most 1.5 times larger.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import igc_kernels as igc
from igc_kernels import reference as R
from igc_kernels._chain import empty_like_layout, normalize, out_is_channels_last
from igc_kernels.backends import BACKENDS, BackendUnavailableError, select

from igc_test_utils import FUSED, case_maker, require_extension, unit_roundoff

LOW_PRECISION = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread unless a test asks for more (conftest restores the count): the reference's
    small convolutions are slow with several OpenMP threads when another process (a concurrent
    test run) competes for the cores."""
    torch.set_num_threads(1)


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------
# A layer: (C_out, groups, k, stride, activation, permutation, bias). k = 1: a pointwise layer
# (2-D weight, or the conv layout (C, n, 1, 1) with conv_layout=True); k > 1: a (C, n, k, k)
# spatial layer. permutation "random": an explicit random permutation.


def make_block(N, C0, spatial, layers, *, residual=False, dtype=torch.float32,
               channels_last=False, input_index=None, in_channels=None, seed=0, scale=1.0,
               conv_layout=False, requires_grad=False):
    """Arguments of ``interleaved_group_conv`` for a random block. Weights are
    ``U(-1/sqrt(n k^2), 1/sqrt(n k^2))`` (nn.Conv2d's scale: activations stay O(scale))."""
    gen = torch.Generator().manual_seed(seed)
    cx = C0 if input_index is None else in_channels
    x = torch.randn((N, cx, *spatial), generator=gen, dtype=torch.float64).mul_(scale)
    if channels_last:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    x = x.to(dtype)
    c = C0
    ws, gs, ps, bs, ss, acts = [], [], [], [], [], []
    for (cout, g, k, s, act, perm, bias) in layers:
        n = c // g
        bound = 1.0 / math.sqrt(n * k * k)
        w = (torch.rand(cout, n, k, k, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        if k == 1 and not conv_layout:
            w = w.reshape(cout, n)
        ws.append(w.to(dtype))
        gs.append(g)
        ps.append(torch.randperm(cout, generator=gen) if perm == "random" else perm)
        bs.append((torch.rand(cout, generator=gen, dtype=torch.float64) - 0.5).to(dtype)
                  if bias else None)
        ss.append(s)
        acts.append(act)
        c = cout
    args = dict(x=x, weights=ws, groups=gs, permutations=ps, biases=bs, strides=ss,
                activations=acts, residual=residual, input_index=input_index)
    if requires_grad:
        for t in leaves(args):
            t.requires_grad_()
    return args


def leaves(args) -> list:
    return [args["x"], *args["weights"], *(b for b in args["biases"] if b is not None)]


def call(args, backend=FUSED, fn=None, **changes):
    a = {**args, **changes}
    fn = fn or igc.interleaved_group_conv
    kw = {} if fn is R.interleaved_group_conv else {"backend": backend}
    return fn(a["x"], a["weights"], a["groups"], a["permutations"], a["biases"],
              input_index=a["input_index"], strides=a["strides"], activations=a["activations"],
              residual=a["residual"], **kw)


def reference64(args, *, absolute=False, no_activations=False):
    """The reference chain in float64 on the (exactly upcast) tensors of ``args``; with
    ``absolute`` on their absolute values (the magnitudes). ``x`` is made contiguous: the values
    do not depend on its layout."""

    def cast(t, fmt=torch.preserve_format):
        if t is None:
            return None
        t = t.detach()
        out = torch.empty_like(t, dtype=torch.float64, memory_format=fmt)
        out.copy_(t)
        return out.abs_() if absolute else out

    a = dict(args)
    a["x"] = cast(args["x"], torch.contiguous_format)
    a["weights"] = [cast(w) for w in args["weights"]]
    a["biases"] = [cast(b) for b in args["biases"]]
    if no_activations:
        a["activations"] = None
    with torch.no_grad():
        return call(a, fn=R.interleaved_group_conv)


def reduction_length(args) -> int:
    """``k`` of the module docstring."""
    k = 0
    for w, act in zip(args["weights"], args["activations"] or [None] * len(args["weights"])):
        taps = w.shape[2] * w.shape[3] if w.dim() == 4 else 1
        k += int(w.shape[1]) * taps + 2 + (4 if act else 0)
    return k + (1 if args["residual"] else 0)


def expected_shape(args) -> tuple:
    x = args["x"]
    sp = [int(d) for d in x.shape[2:]]
    for s in args["strides"] or []:
        sp = [(d - 1) // s + 1 for d in sp]
    return (int(x.shape[0]), int(args["weights"][-1].shape[0]), *sp)


def assert_matches_reference(args, y, *, safety=4.0, y64=None, mag=None):
    """``y`` (computed from ``args`` in their dtype) against the float64 reference: shape,
    dtype, strides of the reference in the same dtype, and values within the rounding bound."""
    x = args["x"]
    dtype = x.dtype
    assert tuple(y.shape) == expected_shape(args), (tuple(y.shape), expected_shape(args))
    assert y.dtype == dtype
    # the layout contract: channels-last in, channels-last out (what the fake kernel allocates)
    want = empty_like_layout(x, y.shape[1], spatial=y.shape[2:])
    assert y.stride() == want.stride(), (
        f"strides {y.stride()} != {want.stride()} (shape {tuple(y.shape)}, x strides "
        f"{x.stride()})")
    with torch.no_grad():
        ref = call(args, fn=R.interleaved_group_conv)
    # (a dim of size 1 has no stride of consequence: there the reference's may differ)
    assert all(a == b or n == 1 for a, b, n in zip(y.stride(), ref.stride(), y.shape)), (
        f"strides {y.stride()} != reference's {ref.stride()} (shape {tuple(y.shape)}, x "
        f"strides {x.stride()})")
    y64 = reference64(args) if y64 is None else y64
    mag = reference64(args, absolute=True, no_activations=True) if mag is None else mag
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n_hs = sum(a == "hardswish" for a in (args["activations"] or []))
    L = len(args["weights"])
    rel = reduction_length(args) * unit_roundoff(acc)
    if dtype in LOW_PRECISION:  # rounding of the output (and of every intermediate, at worst)
        rel += (L + 1) * unit_roundoff(dtype)
    if dtype == torch.float64:  # the oracle has an error of the same size
        safety *= 2
    tol = safety * 1.5 ** n_hs * rel * mag
    err = (y.detach().double() - y64).abs()
    bad = err > tol
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0, 0])
        ratio = (err / tol.clamp_min(1e-300)).max().item()
        raise AssertionError(
            f"{int(bad.sum())} of {err.numel()} elements beyond the rounding bound (max error "
            f"{err.max().item():.3e}, worst error/bound {ratio:.2f}); first at flat index {i}: "
            f"got {y.detach().double().flatten()[i].item():.8e}, expected "
            f"{y64.flatten()[i].item():.8e}, bound {tol.flatten()[i].item():.3e}")
    if dtype == torch.float64:
        torch.testing.assert_close(y, y64, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# 1. The fused block kernel against the reference
# ---------------------------------------------------------------------------------------------
BLOCKS = {
    # name: (C_0, layers, residual)
    "igcv2_s1": (16, [(16, 16, 3, 1, None, None, False), (32, 4, 1, 1, None, "interleave", False),
                      (32, 4, 1, 1, "relu", None, True)], False),
    "igcv2_s2": (16, [(16, 16, 3, 2, None, None, False), (32, 4, 1, 1, None, "interleave", False),
                      (32, 4, 1, 1, "relu", None, True)], False),
    "igcv3_residual": (16, [(64, 2, 1, 1, None, "interleave", True),
                            (64, 64, 3, 1, "relu6", None, True),
                            (16, 2, 1, 1, None, "random", True)], True),
    "grouped3x3_first_s1": (8, [(16, 2, 3, 1, "relu", "interleave", True),
                                (8, 4, 1, 1, None, None, False)], False),
    "grouped3x3_first_s2": (8, [(16, 2, 3, 2, "relu", "interleave", True),
                                (8, 4, 1, 1, None, "random", False)], False),
    "spatial_last_k7_s1": (8, [(8, 2, 1, 1, None, "interleave", False),
                               (16, 4, 7, 1, "relu", None, True)], False),
    "spatial_last_k7_s2": (8, [(8, 2, 1, 1, "relu6", "interleave", True),
                               (16, 4, 7, 2, "relu", "interleave", True)], False),
    "k5_hardswish_s2": (12, [(24, 3, 1, 1, "hardswish", "interleave", True),
                             (24, 24, 5, 2, "hardswish", None, True),
                             (12, 3, 1, 1, None, None, True)], False),
    "k5_middle_residual": (8, [(16, 4, 1, 1, "relu6", "interleave", True),
                               (16, 16, 5, 1, "relu6", None, True),
                               (8, 4, 1, 1, None, None, True)], True),
    "dw_multiplier2_s1": (8, [(16, 8, 3, 1, "relu", None, True),
                              (8, 4, 1, 1, None, "random", False)], False),
    "dw_multiplier2_s2": (8, [(16, 8, 3, 2, None, "interleave", True),
                              (8, 4, 1, 1, "hardswish", None, True)], False),
    "single_dw_k3_s2": (8, [(8, 8, 3, 2, None, None, False)], False),
    "single_dense_k3": (4, [(6, 1, 3, 1, "relu", "random", True)], False),
}

SIZES = {
    "8x8": (8, 8),
    "9x6": (9, 6),  # H != W
    "6x7": (6, 7),  # odd W (stride 2: 4 output columns from 7)
    "1x1": (1, 1),
    "2x3": (2, 3),  # smaller than every kernel
    "5x1": (5, 1),
}

# (images, threads): 1 thread -> bands of rows; more threads than images -> one scratch for all
# images; 3 images on 2 threads -> bands in parallel.
SPLITS = [(1, 1), (1, 4), (3, 1), (3, 2), (3, 4)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("block", BLOCKS.values(), ids=BLOCKS.keys())
def test_block_matches_reference(block, size, layout):
    C0, layers, residual = block
    for i, (N, threads) in enumerate(SPLITS):
        args = make_block(N, C0, size, layers, residual=residual,
                          channels_last=layout == "channels_last", seed=i)
        y64 = reference64(args)
        mag = reference64(args, absolute=True, no_activations=True)
        with num_threads(threads), torch.no_grad():
            y = call(args)
        try:
            assert_matches_reference(args, y, y64=y64, mag=mag)
        except AssertionError as e:
            raise AssertionError(f"N={N}, threads={threads}: {e}") from None
        if layout == "channels_last" and size[0] * size[1] > 1:
            assert y.movedim(1, -1).is_contiguous()


@st.composite
def blocks(draw):
    """A random block: 1 to 4 layers, at most one spatial (k = 3, 5 or 7, stride 1 or 2;
    grouped, depth-wise or depth-wise with multiplier 2), pointwise layers of 1 to 8 groups,
    activations, permutations, biases, a residual add where the shapes allow it, an input index
    with repeats, sizes from 1 x 1, NCHW or channels-last, float32 or float64, 1 or 2 threads."""
    c0 = draw(st.sampled_from([4, 6, 8, 12, 16, 24]))
    L = draw(st.integers(1, 4))
    spatial_at = draw(st.sampled_from([None, *range(L)]))
    layers, c = [], c0
    for l in range(L):
        if l == spatial_at:
            k, s = draw(st.sampled_from([3, 5, 7])), draw(st.sampled_from([1, 2]))
            g = draw(st.sampled_from([d for d in (1, 2, 4, c) if c % d == 0]))
            cout = c * draw(st.sampled_from([1, 2])) if g == c else c
        else:
            k, s = 1, 1
            g = draw(st.sampled_from([d for d in (1, 2, 3, 4, 8) if c % d == 0]))
            cout = g * draw(st.sampled_from([1, 2, 3, 4, 8]))
        layers.append((cout, g, k, s, draw(st.sampled_from([None, "relu", "relu6", "hardswish"])),
                       draw(st.sampled_from([None, "interleave", "random"])), draw(st.booleans())))
        c = cout
    index = draw(st.booleans())
    residual = c == c0 and not index and all(lay[3] == 1 for lay in layers) and draw(st.booleans())
    size = draw(st.sampled_from([1, 2, 5, 8, 9])), draw(st.sampled_from([1, 3, 6, 7]))
    return (c0, layers, residual, index, size, draw(st.integers(1, 3)),
            draw(st.sampled_from([torch.float32, torch.float64])), draw(st.booleans()),
            draw(st.sampled_from([1, 2])), draw(st.integers(0, 999)))


@settings(max_examples=max(10, settings().max_examples),
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=blocks())
def test_random_blocks_match_reference(spec):
    """Random blocks through the fused CPU block kernel: output shape, dtype and layout of the
    contract, values within the rounding bound of the float64 reference."""
    c0, layers, residual, index, size, N, dtype, cl, threads, seed = spec
    idx = None
    if index:
        idx = torch.randint(0, c0 + 2, (c0,), generator=torch.Generator().manual_seed(seed))
    args = make_block(N, c0, size, layers, residual=residual, dtype=dtype, channels_last=cl,
                      seed=seed, input_index=idx, in_channels=c0 + 2 if index else None)
    with num_threads(threads), torch.no_grad():
        y = call(args)
    assert_matches_reference(args, y)


def test_conv_layout_pointwise_weights():
    """1x1 layers given as (C, n, 1, 1) conv weights around a spatial layer."""
    C0, layers, residual = BLOCKS["igcv3_residual"]
    args = make_block(2, C0, (7, 5), layers, residual=residual, conv_layout=True)
    assert args["weights"][0].dim() == 4
    with torch.no_grad():
        y = call(args)
    assert_matches_reference(args, y)


LARGE = {
    # name: (N, C_0, size, layers, residual, channels_last). The band of output rows is sized
    # to keep a scratch of the spatial layer's input rows near 512 KiB: with 512 channels in
    # float32, bands of 4 of the 40 output rows (10 bands), of 2 of the 21 output rows at
    # stride 2 (11 bands, the last partial), of 2 of 24 rows for k = 7 (12 bands), of 6 of 20
    # rows for k = 5 (4 bands, the last partial). 1 thread, or 2 threads for >= 2 images: bands.
    "dw3_512ch_40x40": (2, 512, (40, 40), [(512, 512, 3, 1, "relu6", None, True),
                                           (64, 8, 1, 1, None, "interleave", True)], False, False),
    "dw3_s2_512ch_41x40_cl": (3, 512, (41, 40), [(512, 512, 3, 2, "relu6", None, True),
                                                 (64, 8, 1, 1, None, "interleave", True)],
                              False, True),
    "dw7_512ch_24x24": (2, 512, (24, 24), [(512, 512, 7, 1, "relu", None, True)], False, False),
    "expand_dw5_reduce_residual": (2, 64, (20, 20), [(512, 8, 1, 1, "relu", None, True),
                                                     (512, 512, 5, 1, "relu6", None, True),
                                                     (64, 8, 1, 1, None, "interleave", True)],
                                   True, False),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", LARGE.values(), ids=LARGE.keys())
def test_block_large_bands(case, threads):
    N, C0, size, layers, residual, cl = case
    args = make_block(N, C0, size, layers, residual=residual, channels_last=cl)
    with num_threads(threads), torch.no_grad():
        y = call(args)
    assert_matches_reference(args, y)


# Fewer images than threads (N, size, threads): bands narrowed so that every thread gets an
# equal share (40x40, 3x3 stride 1: 2 or 4 bands of 20 or 10 rows; 41x40 stride 2), or, where
# such bands would recompute too much of the prefix, whole planes with one range of positions per
# thread, longer than a tile (14x14: 112 + 84 positions on 2 threads, 80 + 80 + 36 on 3) or
# shorter (7x7: 32 + 17). Channel counts that are not a multiple of the vector width.
BELOW_THREADS = [(1, (40, 40), 2), (1, (40, 40), 4), (1, (41, 40), 2), (2, (41, 40), 3),
                 (1, (14, 14), 2), (1, (14, 14), 3), (1, (7, 7), 2), (2, (7, 7), 3)]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("N,size,threads", BELOW_THREADS)
def test_block_fewer_images_than_threads(N, size, threads, layout):
    for stride in (1, 2):
        layers = [(60, 2, 1, 1, "relu6", "interleave", True),
                  (60, 60, 3, stride, "relu6", None, True),
                  (24, 2, 1, 1, None, "interleave", True)]
        args = make_block(N, 24, size, layers, residual=stride == 1,
                          channels_last=layout == "channels_last", seed=stride)
        with num_threads(threads), torch.no_grad():
            y = call(args)
        assert_matches_reference(args, y)


@pytest.mark.parametrize("threads", [1, 2])
def test_block_reused_buffers_hold_nothing_stale(threads):
    """The tile, depth-wise and scratch buffers are reused from call to call: a call on
    non-finite values, then one with other channel counts (not multiples of the vector width:
    padding lanes) and one with the first's shapes on finite values, give exactly what fresh
    buffers give."""
    big = [(60, 2, 1, 1, "relu6", "interleave", True), (60, 60, 3, 1, "relu6", None, True),
           (24, 2, 1, 1, None, "interleave", True)]
    small = [(36, 2, 1, 1, "relu", None, True), (36, 36, 3, 1, None, None, True),
             (12, 4, 1, 1, None, "interleave", True)]
    with num_threads(threads), torch.no_grad():
        for size in [(7, 7), (40, 40)]:
            first = make_block(1, 24, size, big, residual=True, channels_last=True)
            second = make_block(1, 12, size, small, channels_last=True, seed=1)
            third = make_block(1, 24, size, big, residual=True, channels_last=True, seed=2)
            clean = [call(second), call(third)]
            poisoned = {**first, "x": torch.full_like(first["x"], float("nan"))}
            poisoned["x"][..., 0] = float("inf")
            assert not torch.isfinite(call(poisoned)).all()
            assert torch.equal(call(second), clean[0])
            assert torch.equal(call(third), clean[1])


DTYPE_BLOCKS = ["igcv2_s2", "igcv3_residual", "k5_hardswish_s2", "dw_multiplier2_s1",
                "spatial_last_k7_s2"]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("name", DTYPE_BLOCKS)
def test_block_dtypes(name, dtype, layout):
    C0, layers, residual = BLOCKS[name]
    for i, (N, threads) in enumerate([(2, 1), (2, 4)]):
        args = make_block(N, C0, (9, 6), layers, residual=residual, dtype=dtype,
                          channels_last=layout == "channels_last", seed=i)
        with num_threads(threads), torch.no_grad():
            y = call(args)
        assert_matches_reference(args, y)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("stride", [1, 2])
def test_block_input_index(stride, layout):
    """input_index (with a repeated entry) in front of a grouped 3x3 layer."""
    index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])
    layers = [(16, 2, 3, stride, "relu", "interleave", True), (8, 4, 1, 1, None, None, False)]
    for N, threads in [(1, 4), (3, 1)]:
        args = make_block(N, 8, (6, 7), layers, input_index=index, in_channels=7,
                          channels_last=layout == "channels_last")
        with num_threads(threads), torch.no_grad():
            y = call(args)
        assert_matches_reference(args, y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_block_input_index_residual(dtype):
    """input_index selecting 12 of x's 8 channels (repeats), depth-wise 3x3, a reduction back
    to 8 channels, residual add of x (not of the gathered input)."""
    index = torch.tensor([3, 3, 0, 1, 7, 6, 5, 2, 2, 4, 0, 7])
    layers = [(12, 12, 3, 1, "relu6", None, True), (8, 4, 1, 1, None, "random", True)]
    for N, threads in [(1, 4), (3, 1)]:
        args = make_block(N, 12, (5, 6), layers, residual=True, input_index=index,
                          in_channels=8, dtype=dtype)
        with num_threads(threads), torch.no_grad():
            y = call(args)
        assert_matches_reference(args, y)


@pytest.mark.parametrize("backend", ["reference", "auto_two_spatial"])
@pytest.mark.parametrize("which", ["permutation", "input_index"])
def test_reference_channels_last_stride2_with_index(which, backend):
    """The reference (and "auto" when it falls back to it) on a channels-last x with a stride-2
    layer and an index (index_select gives a contiguous tensor of the output's size, which must
    be laid out channels-last at that size): the values of the contiguous x's result."""
    layers = [(8, 8, 3, 2, None, None, True), (8, 4, 1, 1, "relu", "random", True)]
    if backend == "auto_two_spatial":  # two spatial layers: "auto" runs the reference
        layers.append((8, 8, 5, 1, None, None, False))
    index = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]) if which == "input_index" else None
    args = make_block(2, 8, (6, 5), layers, channels_last=True, input_index=index,
                      in_channels=7 if index is not None else None)
    if which == "input_index":
        args["permutations"] = [None] * len(layers)
    with torch.no_grad():
        y = call(args, fn=R.interleaved_group_conv) if backend == "reference" \
            else call(args, "auto")
    assert y.shape == (2, 8, 3, 3) and y.movedim(1, -1).is_contiguous()
    assert_matches_reference(args, y)


def test_block_batch_zero():
    C0, layers, residual = BLOCKS["igcv2_s2"]
    args = make_block(0, C0, (5, 6), layers, residual=residual)
    with torch.no_grad():
        y = call(args)
    assert tuple(y.shape) == (0, 32, 3, 3)


@pytest.mark.parametrize("backend", [FUSED, "reference"], ids=["fused", "reference"])
@pytest.mark.parametrize("shape,stride", [
    pytest.param((2, 8, 0, 5), 1, id="H0_s1"),
    pytest.param((2, 8, 0, 5), 2, id="H0_s2"),
    pytest.param((2, 8, 3, 0), 2, id="W0_s2"),
])
def test_block_empty_spatial(shape, stride, backend):
    """An empty spatial extent gives an empty output of (H - 1) // s + 1 rows: 0 for H = 0 (in
    C++ (0 - 1) / 2 truncates to 0: the kernel must not round that way)."""
    x = torch.randn(shape)
    w = torch.randn(8, 1, 3, 3)
    with torch.no_grad():
        y = igc.interleaved_group_conv(x, [w], [8], strides=[stride], backend=backend)
    want = (2, 8, *[(d - 1) // stride + 1 for d in shape[2:]])
    assert tuple(y.shape) == want
    assert tuple(y.shape) == tuple(_op_meta_shape(x, w, stride))


def _op_meta_shape(x, w, stride):
    """The fake kernel's output shape for the same call."""
    require_extension()
    return torch.ops.igc.block_forward(x.to("meta"), [w.to("meta")], [], [8], [0], [None],
                                       [stride], [0], False, None).shape


def test_auto_selects_cpu_for_one_spatial_layer():
    require_extension()
    C0, layers, residual = BLOCKS["igcv3_residual"]
    args = make_block(2, C0, (5, 5), layers, residual=residual)
    chain = normalize(args["x"], args["weights"], args["groups"], args["permutations"],
                      args["biases"], strides=args["strides"], activations=args["activations"],
                      residual=args["residual"])
    assert select("auto", args["x"], chain).name == "cpu"
    with torch.no_grad():
        assert torch.equal(call(args, "auto"), call(args, "cpu"))


# ---------------------------------------------------------------------------------------------
# 2. Pointwise chains with activations and / or a residual add
# ---------------------------------------------------------------------------------------------
POINTWISE = {
    # name: (C_0, layers (k = 1, stride 1), residual)
    "relu_mid_residual": (8, [(16, 4, 1, 1, "relu", "interleave", True),
                              (8, 4, 1, 1, None, None, True)], True),
    "act_every_layer": (8, [(12, 2, 1, 1, "hardswish", "interleave", True),
                            (12, 3, 1, 1, "relu6", "random", False),
                            (6, 3, 1, 1, "relu", None, True)], False),
    "residual_only": (8, [(8, 2, 1, 1, None, "interleave", False),
                          (8, 4, 1, 1, None, None, True)], True),
    "act_first_only": (6, [(6, 3, 1, 1, "relu", "interleave", True),
                           (9, 3, 1, 1, None, None, False)], False),
    "act_last_only": (6, [(6, 3, 1, 1, None, "interleave", True),
                          (9, 3, 1, 1, "relu6", "random", True)], False),
    "single_layer_relu6_residual": (8, [(8, 4, 1, 1, "relu6", "random", True)], True),
}

X_SHAPES = {
    "tokens": ((), False),
    "ncl": ((5,), False),
    "nchw": ((3, 4), False),
    "nchw_channels_last": ((3, 4), True),
    "ncdhw": ((2, 2, 3), False),
}

# Pre-activations of O(scale): x scaled so that relu6's and hardswish's upper pieces are used.
SCALE = 6.0


class _Spy:
    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        orig = getattr(module, name)

        def wrapper(*a, **k):
            self.calls += 1
            return orig(*a, **k)

        monkeypatch.setattr(module, name, wrapper)


def _spies(monkeypatch):
    from igc_kernels import _block, _ops

    return _Spy(monkeypatch, _ops, "block_forward"), _Spy(monkeypatch, _block, "run_segments")


@pytest.mark.parametrize("xs", X_SHAPES.values(), ids=X_SHAPES.keys())
@pytest.mark.parametrize("chain", POINTWISE.values(), ids=POINTWISE.keys())
def test_pointwise_block_no_grad(chain, xs, monkeypatch):
    """Without gradients: one fused pass of igc::block_forward, equal to the reference."""
    C0, layers, residual = chain
    spatial, cl = xs
    fused, segments = _spies(monkeypatch)
    for i, (N, threads) in enumerate([(1, 1), (3, 2)]):
        args = make_block(N, C0, spatial, layers, residual=residual, channels_last=cl, seed=i,
                          scale=SCALE)
        with num_threads(threads), torch.no_grad():
            y = call(args)
        assert_matches_reference(args, y)
    # grad mode on, nothing requires grad: the fused pass too
    y = call(args)
    assert not y.requires_grad
    assert_matches_reference(args, y)
    if FUSED == "cpu":
        assert (fused.calls, segments.calls) == (3, 0)


@pytest.mark.parametrize("xs", ["nchw", "nchw_channels_last", "tokens"])
@pytest.mark.parametrize("chain", POINTWISE.values(), ids=POINTWISE.keys())
def test_pointwise_block_grads_match_reference(chain, xs, monkeypatch):
    """With gradients: output and every gradient equal the reference's (float64)."""
    C0, layers, residual = chain
    spatial, cl = X_SHAPES[xs]
    fused, segments = _spies(monkeypatch)
    args = make_block(2, C0, spatial, layers, residual=residual, channels_last=cl,
                      dtype=torch.float64, scale=SCALE, requires_grad=True)
    y = call(args)
    yr = call(args, fn=R.interleaved_group_conv)
    assert y.requires_grad and y.stride() == yr.stride()
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = torch.autograd.grad(y, leaves(args), gy)
    gr = torch.autograd.grad(yr, leaves(args), gy)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if FUSED == "cpu":
        assert (fused.calls, segments.calls) == (0, 1)
    # the forward alone (grad wanted) matches in float32 too
    a32 = make_block(2, C0, spatial, layers, residual=residual, channels_last=cl,
                     scale=SCALE, requires_grad=True)
    assert_matches_reference(a32, call(a32))


@pytest.mark.parametrize("chain", POINTWISE.values(), ids=POINTWISE.keys())
def test_pointwise_block_gradcheck(chain):
    C0, layers, residual = chain
    for spatial, cl in [((2, 2), False), ((2, 3), True)]:
        args = make_block(2, C0, spatial, layers, residual=residual, channels_last=cl,
                          dtype=torch.float64, scale=SCALE, requires_grad=True)
        ts = leaves(args)
        nw = len(args["weights"])

        def f(x, *rest):
            ws, bs_present = list(rest[:nw]), list(rest[nw:])
            bs = [bs_present.pop(0) if b is not None else None for b in args["biases"]]
            return call(args, x=x, weights=ws, biases=bs)

        assert torch.autograd.gradcheck(f, ts, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_forward_mode_and_transforms():
    """torch.func.jvp and vmap through activations and a residual add on the fused backend
    equal the reference's (they take the segmented path: the block op has no forward-mode or
    vmap rule), and a jvp through a spatial layer is refused like a gradient."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, generator=g)
    w = [torch.randn(8, 4, dtype=torch.float64, generator=g),
         torch.randn(8, 4, dtype=torch.float64, generator=g)]
    t = torch.randn(x.shape, dtype=torch.float64, generator=g)
    kw = dict(activations=["relu", "hardswish"], residual=True)

    def f(x):
        return igc.interleaved_group_conv(x, w, [2, 2], backend=FUSED, **kw)

    def r(x):
        return R.interleaved_group_conv(x, w, [2, 2], **kw)

    for a, b in zip(torch.func.jvp(f, (x,), (t,)), torch.func.jvp(r, (x,), (t,))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.vmap(f)(x.unsqueeze(1)), torch.vmap(r)(x.unsqueeze(1)),
                               rtol=1e-10, atol=1e-10)
    wd = torch.randn(8, 1, 3, 3, dtype=torch.float64, generator=g)
    with pytest.raises(ValueError, match=r"layer 1 is a 3x3 spatial layer"):
        torch.func.jvp(lambda x: igc.interleaved_group_conv(x, [wd], [8], backend=FUSED),
                       (x,), (t,))


def test_pointwise_block_input_index_grads():
    """input_index with repeats + activations + residual, with gradients: dx sums over the
    repeated channels and adds the residual's identity."""
    index = torch.tensor([5, 0, 0, 1, 2, 3, 7, 7])
    layers = [(16, 4, 1, 1, "hardswish", "interleave", True), (8, 2, 1, 1, "relu", None, True)]
    args = make_block(2, 8, (3, 3), layers, residual=True, input_index=index, in_channels=8,
                      dtype=torch.float64, scale=SCALE, requires_grad=True)
    y, yr = call(args), call(args, fn=R.interleaved_group_conv)
    g = torch.autograd.grad(y.sum(), leaves(args))
    gr = torch.autograd.grad(yr.sum(), leaves(args))
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        assert_matches_reference(args, call(args))


def test_plain_fields_are_plain():
    """Explicit all-1 strides, no activations and residual=False: the plain chain, with
    gradients, bitwise equal to the call without the fields."""
    layers = [(12, 2, 1, 1, None, "interleave", True), (6, 3, 1, 1, None, None, False)]
    args = make_block(2, 8, (3, 4), layers, requires_grad=True)
    y1 = call(args, strides=[1, 1], activations=[None, None], residual=False)
    y0 = call(args, strides=None, activations=None)
    assert torch.equal(y0, y1)
    g1 = torch.autograd.grad(y1.sum(), leaves(args))
    g0 = torch.autograd.grad(y0.sum(), leaves(args))
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)
    chain = normalize(args["x"], args["weights"], args["groups"], strides=(1, 1),
                      activations=(None, None))
    assert chain.is_plain


# ---------------------------------------------------------------------------------------------
# 3. Validation
# ---------------------------------------------------------------------------------------------
def _good():
    """x (2, 8, 5, 6) -> depth-wise 3x3, stride 2, relu -> grouped 1x1 (2 groups) 8 -> 8."""
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(2, 8, 5, 6, generator=g),
                weights=[torch.randn(8, 1, 3, 3, generator=g) / 3,
                         torch.randn(8, 4, generator=g) / 2],
                groups=[8, 2], permutations=None, biases=[torch.randn(8, generator=g), None],
                strides=[2, 1], activations=["relu", None], residual=False, input_index=None)


_case = case_maker(_good)


def _weight(i, w):
    def change(args):
        ws = list(args["weights"])
        ws[i] = w
        return ws
    return change


BAD = {
    "strides_not_list": (_case(strides=2), TypeError,
                         r"strides must be a list or tuple with one entry per layer, got int"),
    "strides_too_short": (_case(strides=[2]), ValueError,
                          r"strides must have one entry per layer \(2\), got 1"),
    "strides_too_long": (_case(strides=[2, 1, 1]), ValueError,
                         r"strides must have one entry per layer \(2\), got 3"),
    "stride_3": (_case(strides=[3, 1]), ValueError, r"layer 1: stride must be 1 or 2, got 3"),
    "stride_0": (_case(strides=[0, 1]), ValueError, r"layer 1: stride must be 1 or 2, got 0"),
    "stride_negative": (_case(strides=[-1, 1]), ValueError,
                        r"layer 1: stride must be 1 or 2, got -1"),
    "stride_float": (_case(strides=[2.0, 1]), ValueError,
                     r"layer 1: stride must be 1 or 2, got 2.0"),
    "stride_bool": (_case(strides=[True, 1]), ValueError,
                    r"layer 1: stride must be 1 or 2, got True"),
    "stride_str": (_case(strides=[2, "1"]), ValueError,
                   r"layer 2: stride must be 1 or 2, got '1'"),
    "stride_2_on_1x1": (_case(strides=[1, 2]), ValueError,
                        r"layer 2: stride 2 on a pointwise \(1x1\) layer"),
    "stride_2_on_1x1_conv_layout": (
        _case(strides=[1, 2], weights=_weight(1, torch.randn(8, 4, 1, 1))), ValueError,
        r"layer 2: stride 2 on a pointwise \(1x1\) layer"),
    "activations_not_list": (_case(activations="relu"), TypeError,
                             r"activations must be a list or tuple with one entry per layer, "
                             r"got str"),
    "activations_too_short": (_case(activations=["relu"]), ValueError,
                              r"activations must have one entry per layer \(2\), got 1"),
    "activation_unknown": (_case(activations=[None, "gelu"]), ValueError,
                           r"layer 2: unknown activation 'gelu'; expected None, 'relu', "
                           r"'relu6' or 'hardswish'"),
    "activation_wrong_case": (_case(activations=["ReLU", None]), ValueError,
                              r"layer 1: unknown activation 'ReLU'"),
    "activation_int": (_case(activations=[1, None]), TypeError,
                       r"layer 1: activation must be None or one of 'relu', 'relu6', "
                       r"'hardswish', got int"),
    "activation_callable": (_case(activations=[None, torch.relu]), TypeError,
                            r"layer 2: activation must be None or one of"),
    "residual_int": (_case(residual=1), TypeError, r"residual must be a bool, got int"),
    "residual_none": (_case(residual=None), TypeError, r"residual must be a bool, got NoneType"),
    "residual_str": (_case(residual="True"), TypeError, r"residual must be a bool, got str"),
    "residual_channels": (
        _case(residual=True, strides=[1, 1], weights=_weight(1, torch.randn(6, 4))), ValueError,
        r"residual=True adds x to the output: x has 8 channels but the last layer has "
        r"C_2 = 6"),
    "residual_stride_2": (_case(residual=True), ValueError,
                          r"residual=True needs the output's spatial size to equal x's; layer 1 "
                          r"has stride 2"),
    "kernel_even": (_case(weights=_weight(0, torch.randn(8, 1, 4, 4))), ValueError,
                    r"layer 1: weight has shape \(8, 1, 4, 4\): a spatial layer's kernel must "
                    r"be k x k with k odd, 3 <= k <= 7"),
    "kernel_2": (_case(weights=_weight(0, torch.randn(8, 1, 2, 2))), ValueError,
                 r"layer 1: weight has shape \(8, 1, 2, 2\): a spatial layer's kernel"),
    "kernel_9": (_case(weights=_weight(0, torch.randn(8, 1, 9, 9))), ValueError,
                 r"layer 1: weight has shape \(8, 1, 9, 9\): a spatial layer's kernel"),
    "kernel_not_square": (_case(weights=_weight(0, torch.randn(8, 1, 3, 5))), ValueError,
                          r"layer 1: weight has shape \(8, 1, 3, 5\)"),
    "kernel_1x3": (_case(weights=_weight(0, torch.randn(8, 1, 1, 3))), ValueError,
                   r"layer 1: weight has shape \(8, 1, 1, 3\)"),
    "kernel_3d": (_case(weights=_weight(0, torch.randn(8, 1, 3, 3, 3))), ValueError,
                  r"layer 1: weight has shape \(8, 1, 3, 3, 3\)"),
    "x_3d_spatial_weight": (_case(x=torch.randn(2, 8, 5), strides=None), ValueError,
                            r"layer 1: a 3x3 spatial layer needs x of shape \(N, C, H, W\), "
                            r"got shape \(2, 8, 5\)"),
    "x_2d_spatial_weight": (_case(x=torch.randn(2, 8), strides=None), ValueError,
                            r"layer 1: a 3x3 spatial layer needs x of shape \(N, C, H, W\)"),
    "x_5d_spatial_weight": (_case(x=torch.randn(2, 8, 3, 4, 5), strides=None), ValueError,
                            r"layer 1: a 3x3 spatial layer needs x of shape \(N, C, H, W\)"),
    "spatial_weight_wrong_in": (_case(weights=_weight(0, torch.randn(8, 2, 3, 3))), ValueError,
                                r"x has 8 channels, but layer 1 expects C_0 = weight.shape\[1\] "
                                r"\* groups = 2 \* 8 = 16"),
    "spatial_weight_dtype": (_case(weights=_weight(0, torch.randn(8, 1, 3, 3,
                                                                  dtype=torch.float64))),
                             TypeError, r"layer 1: weight has dtype torch.float64 but x has "
                                        r"dtype torch.float32"),
    "spatial_bias_shape": (_case(biases=[torch.randn(7), None]), ValueError,
                           r"layer 1: bias has shape \(7,\), expected \(8,\)"),
}


def _good_call_works(backend):
    with torch.no_grad():
        y = call(_good(), backend)
    assert y.shape == (2, 8, 3, 3) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("backend", ["reference", FUSED, "auto"])
@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_block_input(case, backend):
    make, exc, fragment = case
    with torch.no_grad(), pytest.raises(exc, match=fragment):
        call(make(), backend)
    _good_call_works(backend)


@pytest.mark.parametrize("case", ["stride_3", "stride_2_on_1x1", "activation_unknown",
                                  "activation_int", "residual_int", "residual_channels",
                                  "kernel_even", "x_3d_spatial_weight"])
def test_bad_block_input_reference_function(case):
    make, exc, fragment = BAD[case]
    with torch.no_grad(), pytest.raises(exc, match=fragment):
        call(make(), fn=R.interleaved_group_conv)


def _spatial_second():
    """x (2, 8, 5, 6) -> 1x1 expand to 16 -> depth-wise 5x5 (layer 2) -> 1x1 reduce to 8."""
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(2, 8, 5, 6, generator=g),
                weights=[torch.randn(16, 4, generator=g) / 2,
                         torch.randn(16, 1, 5, 5, generator=g) / 5,
                         torch.randn(8, 8, generator=g) / 3],
                groups=[2, 16, 2], permutations=["interleave", None, None],
                biases=[None, torch.randn(16, generator=g), None],
                strides=[1, 1, 1], activations=[None, "relu6", None], residual=True,
                input_index=None)


GRAD_LEAVES = {"x": lambda a: a["x"], "spatial_weight": lambda a: a["weights"][1],
               "pointwise_weight": lambda a: a["weights"][2],
               "spatial_bias": lambda a: a["biases"][1]}


@pytest.mark.parametrize("backend", ["reference", FUSED, "auto"])
@pytest.mark.parametrize("leaf", GRAD_LEAVES.values(), ids=GRAD_LEAVES.keys())
def test_spatial_layer_is_inference_only(leaf, backend):
    args = _spatial_second()
    leaf(args).requires_grad_()
    with pytest.raises(ValueError, match=r"layer 2 is a 5x5 spatial layer: spatial layers run "
                                         r"in inference only"):
        call(args, backend)
    with pytest.raises(ValueError, match=r"layer 2 is a 5x5 spatial layer"):
        call(args, fn=R.interleaved_group_conv)
    # no gradients wanted: works, equal to the reference
    with torch.no_grad():
        y = call(args, backend)
    assert not y.requires_grad
    assert_matches_reference(args, y)
    with torch.inference_mode():
        y = call(args, backend)
    assert_matches_reference(args, y)
    leaf(args).requires_grad_(False)
    y = call(args, backend)
    assert not y.requires_grad
    assert_matches_reference(args, y)


# ---------------------------------------------------------------------------------------------
# 4. Backends: the GPU backends' refusal, two spatial layers
# ---------------------------------------------------------------------------------------------
REFUSED = {
    # name: (changes to _spatial_second(), what the reason names)
    "spatial": (dict(activations=None, residual=False), "spatial layers"),
    "activations_only": (dict(weights=lambda a: [a["weights"][0], torch.randn(16, 1),
                                                 a["weights"][2]], residual=False), "activations"),
    "residual_only": (dict(weights=lambda a: [a["weights"][0], torch.randn(16, 1),
                                              a["weights"][2]], activations=None),
                      "a residual add"),
    "everything": (dict(), "spatial layers or activations or a residual add"),
}


def _chain_of(args):
    return normalize(args["x"], args["weights"], args["groups"], args["permutations"],
                     args["biases"], input_index=args["input_index"], strides=args["strides"],
                     activations=args["activations"], residual=args["residual"])


@pytest.mark.parametrize("name", ["cuda", "triton"])
@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_gpu_backends_refuse_blocks(case, name):
    changes, what = case
    args = _spatial_second()
    for k, v in changes.items():
        args[k] = v(args) if callable(v) else v
    chain = _chain_of(args)
    assert not chain.is_plain
    reasons = BACKENDS[name].reasons(args["x"], chain)
    hits = [r for r in reasons if r.startswith("this backend runs chains of grouped 1x1 layers "
                                               "only")]
    assert len(hits) == 1, reasons
    assert f"not {what} (the cpu and reference backends run them)" in hits[0], hits[0]
    # a plain chain of the same 1x1 layers is not refused for that reason
    plain = normalize(args["x"], [args["weights"][0], torch.randn(16, 1), args["weights"][2]],
                      args["groups"])
    assert plain.is_plain
    assert not any("grouped 1x1 layers only" in r
                   for r in BACKENDS[name].reasons(args["x"], plain))
    assert BACKENDS["reference"].reasons(args["x"], chain) == []


def _two_spatial():
    g = torch.Generator().manual_seed(2)
    return dict(x=torch.randn(2, 8, 7, 6, generator=g),
                weights=[torch.randn(8, 1, 3, 3, generator=g) / 3,
                         torch.randn(16, 4, generator=g) / 2,
                         torch.randn(16, 1, 5, 5, generator=g) / 5],
                groups=[8, 2, 16], permutations=None, biases=[torch.randn(8, generator=g), None,
                                                              torch.randn(16, generator=g)],
                strides=[1, 1, 2], activations=["relu", None, "relu6"], residual=False,
                input_index=None)


def test_two_spatial_layers_auto_falls_back_to_reference():
    args = _two_spatial()
    chain = _chain_of(args)
    reasons = BACKENDS["cpu"].reasons(args["x"], chain)
    if not BACKENDS["cpu"].unavailable_reasons():
        assert reasons == ["layers 1, 3 are spatial; the CPU block kernel runs at most one "
                           "spatial layer per call"]
    assert select("auto", args["x"], chain).name == "reference"
    with torch.no_grad():
        y = call(args, "auto")
        yr = call(args, fn=R.interleaved_group_conv)
    assert torch.equal(y, yr) and y.stride() == yr.stride()
    assert tuple(y.shape) == (2, 16, 4, 3)
    assert_matches_reference(args, y)


def test_two_spatial_layers_cpu_raises():
    require_extension()
    args = _two_spatial()
    with torch.no_grad(), pytest.raises(BackendUnavailableError,
                                        match=r"backend 'cpu' cannot run this input:\n  - "
                                              r"layers 1, 3 are spatial; the CPU block kernel "
                                              r"runs at most one spatial layer per call"):
        call(args, "cpu")
    with torch.no_grad(), igc.use_backend("cpu"), pytest.raises(BackendUnavailableError,
                                                                match=r"at most one spatial"):
        call(args, "auto")
    # with gradients wanted the inference-only check comes first
    args["x"].requires_grad_()
    with pytest.raises(ValueError, match=r"layer 1 is a 3x3 spatial layer"):
        call(args, "auto")


# ---------------------------------------------------------------------------------------------
# 5. The op igc::block_forward called directly
# ---------------------------------------------------------------------------------------------
def _op_args(**changes):
    """x (2, 8, 9, 7) -> depth-wise 3x3 (bias, relu, stride 2) -> grouped 1x1 8 -> 6."""
    g = torch.Generator().manual_seed(3)
    a = dict(x=torch.randn(2, 8, 9, 7, generator=g),
             weights=[torch.randn(8, 1, 3, 3, generator=g) / 3, torch.randn(6, 4, generator=g) / 2],
             biases=[torch.randn(8, generator=g), torch.empty(0)], groups=[8, 2],
             shuffles=[0, 0], perms=[None, torch.randperm(6, generator=g)], strides=[2, 1],
             activations=[1, 0], residual=False, input_index=None)
    a.update(changes)
    return a


_OP_ORDER = ("x", "weights", "biases", "groups", "shuffles", "perms", "strides", "activations",
             "residual", "input_index")


def _op(a):
    return torch.ops.igc.block_forward(*[a[k] for k in _OP_ORDER])


def _to(a, device):
    def mv(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, list):
            return [mv(t) for t in v]
        return v
    return {k: mv(v) for k, v in a.items()}


def test_op_matches_public_function(igc_ops):
    a = _op_args()
    with torch.no_grad():
        y = _op(a)
        yr = R.interleaved_group_conv(a["x"], a["weights"], a["groups"], [None, a["perms"][1]],
                                      [a["biases"][0], None], strides=a["strides"],
                                      activations=["relu", None])
    assert y.shape == (2, 6, 5, 4)
    # float32, reductions of <= 9 + 4 terms of O(1) values
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)


OP_BAD = {
    "stride_3": (dict(strides=[3, 1]), r"layer 1: stride must be 1 or 2, got 3"),
    "stride_2_pointwise": (dict(strides=[2, 2]), r"layer 2: a pointwise layer has stride 1, got 2"),
    "activation_7": (dict(activations=[7, 0]), r"layer 1: unknown activation code 7"),
    "activation_negative": (dict(activations=[0, -1]), r"layer 2: unknown activation code -1"),
    "strides_length": (dict(strides=[2]), r"strides and activations must have one entry per "
                                          r"layer \(2\), got 1 and 2"),
    "kernel_even": (dict(weights=[torch.randn(8, 1, 4, 4), torch.randn(6, 4)]),
                    r"layer 1: a spatial weight must be \(C_out, C_in / groups, k, k\) with k odd"),
    "kernel_9": (dict(weights=[torch.randn(8, 1, 9, 9), torch.randn(6, 4)]),
                 r"layer 1: a spatial weight must be"),
    "two_spatial": (dict(weights=[torch.randn(8, 1, 3, 3), torch.randn(6, 4, 3, 3)],
                         strides=[1, 1]),
                    r"layer 2: at most one spatial layer per block \(layer 1 is one\)"),
    "x_3d": (dict(x=torch.randn(2, 8, 9), strides=[1, 1]),
             r"a spatial layer needs x of shape \(N, C, H, W\)"),
    "residual_channels": (dict(residual=True, strides=[1, 1]),
                          r"residual adds x: x has 8 channels but C_L = 6"),
    "residual_stride": (dict(residual=True, weights=[torch.randn(8, 1, 3, 3), torch.randn(8, 4)],
                             perms=[None, None]),
                        r"residual needs stride 1"),
}


@pytest.mark.parametrize("case", OP_BAD.values(), ids=OP_BAD.keys())
def test_op_checks(igc_ops, case):
    changes, fragment = case
    with torch.no_grad(), pytest.raises(RuntimeError, match=fragment):
        _op(_op_args(**changes))
    with torch.no_grad():
        assert _op(_op_args()).shape == (2, 6, 5, 4)


META_CASES = {
    # name: (changes to _op_args, x shape, channels_last)
    "s2_odd": (dict(), (2, 8, 9, 7), False),
    "s2_channels_last": (dict(), (2, 8, 9, 7), True),
    "s1_channels_last": (dict(strides=[1, 1]), (3, 8, 4, 5), True),
    "s2_1x1": (dict(), (2, 8, 1, 1), True),
    "s2_1xW": (dict(), (1, 8, 1, 5), True),
    "input_index_residual": (dict(strides=[1, 1], residual=True,
                                  weights=[torch.randn(10, 1, 5, 5), torch.randn(6, 5)],
                                  biases=[], groups=[10, 2], perms=[None, None],
                                  input_index=torch.tensor([0, 1, 2, 3, 4, 5, 5, 4, 3, 0])),
                             (2, 6, 6, 5), True),
    "pointwise_residual_tokens": (dict(strides=[1, 1], residual=True, activations=[3, 2],
                                       weights=[torch.randn(8, 8), torch.randn(8, 4)],
                                       groups=[1, 2], perms=[None, None]), (5, 8), False),
}


def _meta_case(case, seed=0):
    changes, shape, cl = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if cl:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)
    return _op_args(x=x, **changes)


@pytest.mark.parametrize("case", META_CASES.values(), ids=META_CASES.keys())
def test_op_fake_kernel_matches_real(igc_ops, case):
    """Meta tensors and FakeTensorMode: the real kernel's shape, strides and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    a = _meta_case(case)
    with torch.no_grad():
        y = _op(a)
    ym = _op(_to(a, "meta"))
    assert ym.device.type == "meta"
    assert ym.shape == y.shape and ym.stride() == y.stride() and ym.dtype == y.dtype
    with FakeTensorMode() as mode:
        yf = _op({k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else
                      [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in v]
                      if isinstance(v, list) else v) for k, v in a.items()})
        assert yf.shape == y.shape and yf.stride() == y.stride()
    x = a["x"]
    want = [(d - 1) // 2 + 1 if a["strides"][0] == 2 else d for d in x.shape[2:]]
    assert tuple(y.shape) == (x.shape[0], a["weights"][-1].shape[0], *want)


@pytest.mark.parametrize("case", ["s2_odd", "s1_channels_last", "input_index_residual",
                                  "pointwise_residual_tokens"])
def test_op_opcheck(igc_ops, case):
    torch.library.opcheck(igc_ops.block_forward.default,
                          tuple(_meta_case(META_CASES[case])[k] for k in _OP_ORDER))


def test_op_has_no_backward(igc_ops):
    a = _op_args()
    a["x"] = a["x"].requires_grad_()
    y = _op(a)
    with pytest.raises(RuntimeError, match=r"igc::block_forward is inference only"):
        y.sum().backward()


def _compiled_fn(x, w1, w2, b1, perm):
    return igc.interleaved_group_conv(x, [w1, w2], [8, 2], ["interleave", perm], [b1, None],
                                      strides=[2, 1], activations=["hardswish", "relu6"],
                                      backend=FUSED)


def test_compile_fullgraph_no_grad():
    """torch.compile(fullgraph=True) under no_grad: one graph calling igc::block_forward, the
    same values, shape and strides as eager (Inductor hands the opaque op the same inputs)."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 9, 7, generator=g).movedim(1, -1).contiguous().movedim(-1, 1)
    args = (x, torch.randn(8, 1, 3, 3, generator=g) / 3, torch.randn(6, 4, generator=g) / 2,
            torch.randn(8, generator=g), torch.randperm(6, generator=g))
    torch._dynamo.reset()
    rec = EagerAndRecordGraphs()
    with torch.no_grad():
        eager = _compiled_fn(*args)
        assert torch.equal(torch.compile(_compiled_fn, backend=rec, fullgraph=True)(*args), eager)
        assert len(rec.graphs) == 1
        targets = {str(n.target) for n in rec.graphs[0].graph.nodes if n.op == "call_function"}
        if FUSED == "cpu":
            assert any("igc.block_forward" in t for t in targets), targets
            assert not any("conv" in t for t in targets), targets
        torch._dynamo.reset()
        comp = torch.compile(_compiled_fn, fullgraph=True)(*args)
    assert comp.shape == eager.shape == (2, 6, 5, 4) and comp.stride() == eager.stride()
    torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)
