"""The CPU block kernel's channels-last tiles (``csrc/cpu/gemm_cl.h``): float32 blocks on a
channels-last ``x`` whose pointwise layers come packed (``cpu_block_pack``, what ``FusedBlock``
passes), computed as vectors of output channels with the permutations applied as broadcast
addresses and the depth-wise layer commuted past them.

* Against the float64 reference (bounds of ``test_block``): group widths that are and are not
  multiples of the vector width (a group's last vector spilling into the next group, the last
  group's into the row padding), wide and narrow groups, explicit and "interleave"
  permutations, input index with repeats, depth-wise 3x3 / 5x5 / 7x7 at stride 1 and 2 first,
  in the middle or last, no spatial layer, residual add, every activation, image sizes from 1x1
  to the banded work split, fewer images than threads, unevenly spaced positions (a view).
* The packed weights are what the tiles use (wrong packed weights change the result), and
  blocks the tiles do not take (NCHW x, channel multiplier, grouped k x k, float64) ignore them.
  ``IGC_CPU_BLOCK_TILES=channels_last`` (set for every test here) takes them wherever they
  apply; the kernel's own rule (unset) unless their vectors are much emptier.
* Non-finite values stay in the outputs that depend on them; buffers reused across calls hold
  nothing stale.
* ``FusedBlock`` re-packs after an in-place change of its weights, does not pack inference
  tensors, and gives the reference's values on channels-last inputs.
"""

from __future__ import annotations

import pytest
import torch

from igc_kernels import _loader
from igc_kernels.inference import FusedBlock

from igc_test_utils import require_extension
from test_block import assert_matches_reference, make_block, num_threads, reference64


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One thread unless a test asks for more, and the channels-last tiles wherever they
    apply (IGC_CPU_BLOCK_TILES, read at every call), not only where the kernel's rule prefers
    them."""
    require_extension()
    torch.set_num_threads(1)
    monkeypatch.setenv("IGC_CPU_BLOCK_TILES", "channels_last")


def _fused(args) -> FusedBlock:
    return FusedBlock(args["weights"], args["groups"], args["permutations"], args["biases"],
                      args["strides"], args["activations"], residual=args["residual"],
                      input_index=args["input_index"])


def _direct(blk: FusedBlock, x, packed="auto"):
    """The direct kernel call FusedBlock makes, with its packed weights (or the ones given, or
    none)."""
    args = blk._direct_args(x)
    assert args is not None
    base = args[:10]
    if packed == "auto":
        return _loader.ext().cpu_block_forward(*args)
    return _loader.ext().cpu_block_forward(*base, packed)


def _packed_of(blk: FusedBlock, scale=1.0):
    static = blk._static_args()
    ws = [w * scale for w in static[0]]
    return _loader.ext().cpu_block_pack(ws, static[1], blk.groups)


# (C_0, layers, residual); a layer: (C_out, groups, k, stride, activation, permutation, bias)
CL_BLOCKS = {
    # IGCV3: grouped expand, depth-wise 3x3, grouped reduce (12 outputs per group: one vector
    # per group spilling 4 lanes into the next), residual
    "igcv3_narrow_reduce": (24, [(144, 2, 1, 1, None, "interleave", True),
                                 (144, 144, 3, 1, "relu6", None, True),
                                 (24, 2, 1, 1, None, "interleave", True)], True),
    # wide groups: 80 outputs per group (5 vectors: 3 + 2), 1x1 dense tail of 96 outputs
    "igcv3_wide_dense_tail": (32, [(160, 2, 1, 1, "relu6", "random", True),
                                   (160, 160, 3, 2, "relu6", None, True),
                                   (40, 2, 1, 1, None, "interleave", True),
                                   (96, 1, 1, 1, "hardswish", None, True)], False),
    # 7 vectors per group (4 + 3), 8-output groups (half vectors), explicit permutations
    "groups_100_and_8": (16, [(200, 2, 1, 1, "relu", "random", False),
                              (200, 200, 5, 1, None, "random", True),
                              (40, 5, 1, 1, "relu", "random", True)], False),
    # IGCV2: depth-wise first (no prefix), a chain of 8-input groups
    "igcv2_dw_first": (32, [(32, 32, 3, 1, None, None, False),
                            (32, 4, 1, 1, None, "interleave", False),
                            (32, 4, 1, 1, "relu", None, True)], False),
    "igcv2_dw_first_s2": (24, [(24, 24, 7, 2, "hardswish", "random", True),
                               (48, 3, 1, 1, None, "interleave", False),
                               (48, 6, 1, 1, "relu", "random", True)], False),
    # depth-wise last (no suffix; its output permuted), one pointwise layer in front
    "dw_last": (12, [(36, 3, 1, 1, "relu6", "interleave", True),
                     (36, 36, 3, 2, "relu", "random", True)], False),
    "single_dw": (20, [(20, 20, 3, 1, "relu", None, True)], False),
    # no spatial layer
    "pointwise_only": (20, [(40, 2, 1, 1, "relu", "interleave", True),
                            (20, 4, 1, 1, None, "random", True)], True),
}

SIZES = {"7x7": (7, 7), "14x14": (14, 14), "9x6": (9, 6), "1x1": (1, 1), "2x3": (2, 3),
         "5x1": (5, 1)}
# (images, threads): whole planes split into ranges of positions, bands
SPLITS = [(1, 1), (1, 2), (1, 3), (2, 1), (3, 2)]


def _check(args, threads, *, packed="auto"):
    blk = _fused(args)
    x = args["x"]
    with num_threads(threads), torch.no_grad():
        y = _direct(blk, x, packed)
        y_ref_path = _direct(blk, x, None)  # the [channel][position] tiles
    assert_matches_reference(args, y)
    return blk, y, y_ref_path


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("block", CL_BLOCKS.values(), ids=CL_BLOCKS.keys())
def test_channels_last_tiles_match_reference(block, size):
    C0, layers, residual = block
    for i, (N, threads) in enumerate(SPLITS):
        args = make_block(N, C0, size, layers, residual=residual, channels_last=True, seed=i)
        try:
            _check(args, threads)
        except AssertionError as e:
            raise AssertionError(f"N={N}, threads={threads}: {e}") from None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["igcv3_narrow_reduce", "igcv2_dw_first"])
def test_channels_last_tiles_bands(name, threads):
    """Images large enough for several bands of rows per image."""
    C0, layers, residual = CL_BLOCKS[name]
    args = make_block(2, C0, (56, 40), layers, residual=residual, channels_last=True)
    _check(args, threads)


@pytest.mark.parametrize("name", ["igcv3_narrow_reduce", "igcv2_dw_first", "pointwise_only"])
def test_channels_last_tiles_input_index(name):
    C0, layers, residual = CL_BLOCKS[name]
    gen = torch.Generator().manual_seed(3)
    index = torch.randint(0, C0 - 2, (C0,), generator=gen)
    index[1] = index[0]  # a repeat
    for N, threads in [(1, 2), (2, 1)]:
        args = make_block(N, C0, (7, 9), layers, residual=False, channels_last=True,
                          input_index=index, in_channels=C0 - 2)
        _check(args, threads)


def test_channels_last_tiles_uneven_positions():
    """A channels-last view whose positions are not evenly spaced (a column slice): x's rows
    are copied into the tile instead of read in place."""
    C0, layers, residual = CL_BLOCKS["pointwise_only"]
    for name in ["pointwise_only", "igcv3_narrow_reduce"]:
        C0, layers, residual = CL_BLOCKS[name]
        args = make_block(2, C0, (9, 12), layers, residual=residual, channels_last=True)
        args["x"] = args["x"][:, :, 1:, 2:]
        assert args["x"].stride(1) == 1
        for threads in (1, 2):
            _check(args, threads)


@pytest.mark.parametrize("name", [n for n in CL_BLOCKS if n != "single_dw"])  # no 1x1 layer
def test_packed_weights_are_used(name):
    """The packed weights decide the result where the channels-last tiles apply: packed from
    doubled weights, the result changes; with the packing of the weights themselves it is the
    [channel][position] tiles' result within rounding."""
    C0, layers, residual = CL_BLOCKS[name]
    args = make_block(1, C0, (7, 7), layers, residual=residual, channels_last=True)
    blk = _fused(args)
    with torch.no_grad():
        y = _direct(blk, args["x"])
        y_other = _direct(blk, args["x"], _packed_of(blk, 2.0))
        y_tiles = _direct(blk, args["x"], None)
    assert not torch.allclose(y, y_other)
    torch.testing.assert_close(y, y_tiles, rtol=1e-5, atol=1e-5)


NOT_TAKEN = {
    # (C_0, layers, residual, channels_last, dtype)
    "nchw": (24, CL_BLOCKS["igcv3_narrow_reduce"][1], True, False, torch.float32),
    "dw_multiplier2": (8, [(16, 8, 3, 1, "relu", None, True), (8, 4, 1, 1, None, "random", False)],
                       False, True, torch.float32),
    "grouped3x3": (8, [(16, 2, 3, 1, "relu", "interleave", True),
                       (8, 4, 1, 1, None, None, False)], False, True, torch.float32),
    "float64": (24, CL_BLOCKS["igcv3_narrow_reduce"][1], True, True, torch.float64),
}


@pytest.mark.parametrize("case", NOT_TAKEN.values(), ids=NOT_TAKEN.keys())
def test_packed_weights_ignored_where_tiles_do_not_apply(case):
    C0, layers, residual, cl, dtype = case
    args = make_block(2, C0, (6, 7), layers, residual=residual, channels_last=cl, dtype=dtype)
    blk = _fused(args)
    x = args["x"]
    wrong = _loader.ext().cpu_block_pack([w.float() * 2 for w in blk._static_args()[0]],
                                         [b.float() for b in blk._static_args()[1]], blk.groups)
    with torch.no_grad():
        y = _direct(blk, x, wrong)
        y_plain = _direct(blk, x, None)
    assert torch.equal(y, y_plain)
    assert_matches_reference(args, y)


def test_packed_weights_checked():
    C0, layers, residual = CL_BLOCKS["igcv3_narrow_reduce"]
    args = make_block(1, C0, (7, 7), layers, residual=residual, channels_last=True)
    blk = _fused(args)
    packed = _packed_of(blk)
    with pytest.raises(ValueError, match="3 packed layers expected"):
        _direct(blk, args["x"], packed[:2])
    bad = list(packed)
    bad[0] = bad[0][:-1]
    with pytest.raises(ValueError, match="layer 1: packed weights must be"):
        _direct(blk, args["x"], bad)
    with pytest.raises(TypeError, match="packed must be a sequence"):
        _direct(blk, args["x"], 3)
    pk = _loader.ext().cpu_block_pack(blk._static_args()[0], blk._static_args()[1], blk.groups)
    assert pk[1] is None and pk[0] is not None  # the depth-wise layer is not packed


@pytest.mark.parametrize("name", ["groups_100_and_8", "igcv3_narrow_reduce"])
def test_channels_last_tiles_non_finite_isolated(name):
    """An inf in one input channel reaches exactly the outputs the reference's reaches (the
    extra lanes of a group's last vector, computed with zero weights, never reach an output)."""
    C0, layers, residual = CL_BLOCKS[name]
    args = make_block(1, C0, (7, 7), layers, residual=residual, channels_last=True)
    args["x"][0, 3, 2, 4] = float("inf")
    blk = _fused(args)
    with torch.no_grad():
        y = _direct(blk, args["x"])
        ref = reference64(args)
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref))
    assert not torch.isfinite(y).all()


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("act", ["relu", "relu6", "hardswish"])
def test_nan_passes_through_activations(act, layout):
    """NaN in, NaN out, as torch's relu / relu6 / hardswish (both kinds of tiles): a NaN input
    channel makes exactly the outputs that depend on it NaN."""
    layers = [(48, 2, 1, 1, act, "interleave", True), (48, 48, 3, 1, act, None, True),
              (16, 2, 1, 1, act, "random", True)]
    args = make_block(1, 16, (7, 7), layers, channels_last=layout == "channels_last")
    args["x"][0, 5, 3, 3] = float("nan")
    blk = _fused(args)
    ref = reference64(args)
    with torch.no_grad():
        for packed in ("auto", None):
            y = _direct(blk, args["x"], packed)
            assert torch.equal(torch.isnan(y), torch.isnan(ref)), packed
    assert torch.isnan(ref).any()


@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_tiles_reused_buffers_hold_nothing_stale(threads):
    big = CL_BLOCKS["groups_100_and_8"]
    small = CL_BLOCKS["igcv3_narrow_reduce"]
    with num_threads(threads), torch.no_grad():
        for size in [(7, 7), (30, 30)]:
            first = make_block(1, big[0], size, big[1], channels_last=True)
            second = make_block(1, small[0], size, small[1], residual=True, channels_last=True,
                                seed=1)
            b1, b2 = _fused(first), _fused(second)
            clean = _direct(b2, second["x"])
            poisoned = torch.full_like(first["x"], float("nan"))
            poisoned[..., 0] = float("inf")
            assert not torch.isfinite(_direct(b1, poisoned)).all()
            assert torch.equal(_direct(b2, second["x"]), clean)


def test_fused_block_repacks_after_in_place_change():
    C0, layers, residual = CL_BLOCKS["igcv3_narrow_reduce"]
    args = make_block(1, C0, (7, 7), layers, residual=residual, channels_last=True)
    blk = _fused(args).eval()
    x = args["x"]
    with torch.no_grad():
        y0 = blk(x)
        assert blk._packed is not None
        blk.weight_2.mul_(2)  # in place: the version counter moves
        y1 = blk(x)
        blk.load_state_dict({**blk.state_dict(), "bias_0": blk.bias_0 * 0})
        y2 = blk(x)
    args2 = dict(args, weights=[blk.weight_0, blk.weight_1, blk.weight_2],
                 biases=[blk.bias_0, blk.bias_1, blk.bias_2])
    assert not torch.equal(y0, y1) and not torch.equal(y1, y2)
    assert_matches_reference(args2, y2)


def test_fused_block_inference_tensors_not_packed():
    C0, layers, residual = CL_BLOCKS["igcv3_narrow_reduce"]
    with torch.inference_mode():
        args = make_block(1, C0, (7, 7), layers, residual=residual, channels_last=True)
        blk = _fused(args).eval()
        y = blk(args["x"])
    assert blk._packed is None
    assert_matches_reference(args, y)


def test_tiles_rule(monkeypatch):
    """Unset, the kernel takes the channels-last tiles unless their vectors of outputs are less
    than 3/4 as full as vectors of positions: a 7x7 image (49 positions in 64 lanes) with 32-
    and 16-output groups takes them, a 40x40 one whose layers fill 64% of their output vectors
    (100 and 8 outputs per group) does not; "channel_major" never takes them."""
    monkeypatch.delenv("IGC_CPU_BLOCK_TILES")

    blocks = {**CL_BLOCKS, "full_vectors": (32, [(64, 2, 1, 1, "relu6", "interleave", True),
                                                  (64, 64, 3, 1, "relu6", None, True),
                                                  (32, 2, 1, 1, None, "interleave", True)],
                                            True)}

    def uses_packed(name, size, env=None):
        if env is not None:
            monkeypatch.setenv("IGC_CPU_BLOCK_TILES", env)
        C0, layers, residual = blocks[name]
        args = make_block(1, C0, size, layers, residual=residual, channels_last=True)
        blk = _fused(args)
        with torch.no_grad():
            y = _direct(blk, args["x"], _packed_of(blk, 2.0))
            return not torch.equal(y, _direct(blk, args["x"], None))

    assert uses_packed("full_vectors", (7, 7))
    assert not uses_packed("groups_100_and_8", (40, 40))
    assert not uses_packed("full_vectors", (7, 7), "channel_major")
    assert uses_packed("groups_100_and_8", (40, 40), "channels_last")
