"""The Triton backend's staged backward (``_triton_ops.backward_stages``): a 16-bit chain whose
every packed backward configuration spills, or a float32 chain offered packed configurations
first but left on the FMA path (one layer per range), runs its backward in ranges of layers,
each a fused launch, through kept range inputs.

Without a GPU the ranges are forced (``force_stages``), or chosen from a stand-in for the
compile (the interface of ``K._dtype_spills``, as in test_triton.py's refusal test) with the
GPU-side check switched on; the kernels then run under Triton's interpreter. Results within
the oracle's bound of the problem (float32: its rounding bound; 16-bit: twice the unfused
chain's error), as every Triton result."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

import igc_kernels as igc
from igc_kernels import _triton_ops as T
from igc_kernels._chain import normalize
from igc_kernels.triton_kernels import chain as K
from igc_test_utils import build_problem, check_backend, make_tensor

DEVICE = "cpu" if T.INTERPRETED else "cuda"


def _gy(p, seed=1):
    shape = (p.x.shape[0], p.channels[-1], *p.x.shape[2:])
    return make_tensor(shape, "contiguous", p.x.dtype, torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _launches():
    """(kernel name, meta) of every launch inside the block."""
    out = []
    real = T._launch

    def record(fn, grid, args, meta):
        out.append((getattr(fn, "__name__", str(fn)), meta))
        return real(fn, grid, args, meta)

    T._launch = record
    try:
        yield out
    finally:
        T._launch = real


def _problem(dtype, layers=4, input_index=True, seed=3):
    """32 channels in groups of 8 (packed two per block in 16-bit), every permutation kind,
    biases on some layers, an input index with repeats and an unused channel."""
    gen = torch.Generator().manual_seed(seed)
    kinds = [torch.randperm(32, generator=gen), "interleave", None, "interleave", None][:layers]
    idx = torch.tensor([(5 * i + 1) % 31 for i in range(32)]) if input_index else None
    return build_problem([32] * (layers + 1), [4] * layers, spatial=(5, 3), N=2,
                         dtype=dtype, permutations=kinds,
                         bias=[True, False, True, False, True][:layers], seed=seed,
                         input_index=idx, in_channels=33 if input_index else None)


@pytest.mark.parametrize("config", [{}, {"pack": 1}], ids=["default", "pack"])
@pytest.mark.parametrize("stages", [((0, 2), (2, 4)), ((0, 1), (1, 3), (3, 4))],
                         ids=["halves", "three"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forced_stages_within_the_oracles_bound(dtype, stages, config):
    """Every gradient of a four-layer chain (input index, explicit permutation, shuffles,
    biases on some layers) within the oracle's bound when its backward runs in ``stages``; the
    launches are the forwards of every range but the last, from the first, then the backward of
    each range from the last, each over its own layers (its ``LAYERS``), and one reduction each."""
    p = _problem(dtype)
    with T.force_stages(stages), _launches() as launched:
        _, grads = check_backend(p, "triton", _gy(p), device=DEVICE, config=config)
    assert grads is not None and torch.equal(grads[0][:, 31:], torch.zeros_like(grads[0][:, 31:]))
    fwd = [m for name, m in launched if name == "igc_chain_fwd"]
    bwd = [m for name, m in launched if name == "igc_chain_bwd"]
    red = [m for name, m in launched if name == "_reduce_partials"]
    sizes = [b - a for a, b in stages]
    # the call's own forward (the output), then the ranges' forwards in the backward
    assert [len(m["LAYERS"]) for m in fwd] == [4] + sizes[:-1], fwd
    assert [len(m["LAYERS"]) for m in bwd] == sizes[::-1], bwd
    assert [m["HAS_INDEX"] for m in bwd] == [0] * (len(stages) - 1) + [1]
    assert len(red) == len(stages)


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False],
                                  [False, False, True], [False, True, True]],
                         ids=["x", "w", "b", "wb"])
def test_forced_stages_follow_the_output_mask(mask):
    """A staged backward returns what ``output_mask`` asks for and (0,) for the rest, with the
    values of the backward in one range (float32, the FMA path: the same products and sums)."""
    p = _problem(torch.float32, layers=3, input_index=False, seed=4)
    x = p.x.to(DEVICE)
    chain = normalize(x, [w.to(DEVICE) for w in p.weights], list(p.groups),
                      [q.to(DEVICE) if isinstance(q, torch.Tensor) else q
                       for q in p.permutations],
                      [b.to(DEVICE) if b is not None else None for b in p.biases])
    args = (chain.weights, [b if b is not None else x.new_empty((0,)) for b in chain.biases],
            list(chain.groups), chain.shuffles, chain.perms)
    gy = _gy(p).to(DEVICE)
    with torch.no_grad(), K.override_config(pack=0):
        whole = T.chain_backward(gy, x, *args, mask)
        with T.force_stages(((0, 1), (1, 3))):
            staged = T.chain_backward(gy, x, *args, mask)
    for name, want, m, got, ref in zip(("dx", "dW", "db"), ((2, 32, 5, 3), (3 * 256,), (64,)),
                                       mask, staged, whole):
        assert tuple(got.shape) == (want if m else (0,)), name
        if m:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=name)


def _packed_spill_stand_in(max_packed_layers, compiled=None):
    """Spilled bytes of a compile: a packed backward of more than ``max_packed_layers`` layers
    spills (every one, if negative), the rest nowhere."""
    def spills(fn, args, meta):
        backward = meta.get("NEED_DX") is not None
        if compiled is not None:
            compiled.append((backward, len(meta["LAYERS"]), int(meta.get("PACK") or 0)))
        if backward and meta.get("PACK") and (max_packed_layers < 0
                                              or len(meta["LAYERS"]) > max_packed_layers):
            return 48
        return 0
    return spills


@pytest.mark.parametrize("layers,max_packed,want", [
    (4, 2, ((0, 2), (2, 4))),
    (5, 2, ((0, 2), (2, 3), (3, 5))),
    (4, 1, ((0, 1), (1, 2), (2, 3), (3, 4))),
    (4, 4, ((0, 4),)),  # the whole chain's packed backward fits
    (4, -1, ((0, 4),)),  # no range's packed backward fits: the whole chain, on its FMA path
], ids=["halves", "five", "singles", "fits", "never"])
def test_stages_chosen_from_compiles(monkeypatch, layers, max_packed, want):
    """``backward_stages`` halves a 16-bit chain with packed layers, recursively, while the
    range's packed backward spills; the whole chain where its own packed backward fits, or where
    some range (down to one layer) would have no packed backward without spills. A float32
    chain of 32 channels whose backward fits (its own rule: below) and a one-layer chain are
    not split, nor any with ``IGC_TRITON_STAGED=0``. The ranges' forwards are checked too (not
    the last's)."""
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_STAGES", {})
    monkeypatch.setattr(T, "checks_spills", lambda t: True)
    compiled = []
    monkeypatch.setattr(K, "_dtype_spills", _packed_spill_stand_in(max_packed, compiled))
    p = _problem(torch.float16, layers=layers, input_index=False)
    chain = normalize(p.x, p.weights, list(p.groups), p.permutations, p.biases)
    assert T.backward_stages(p.x, chain, True, True, True) == want
    if len(want) > 1:  # every range but the last has its forward compiled
        assert {n for backward, n, _ in compiled if not backward} >= {
            b - a for a, b in want[:-1]}
    n = len(compiled)
    assert T.backward_stages(p.x, chain, True, True, True) == want and len(compiled) == n
    p32 = _problem(torch.float32, layers=layers, input_index=False)
    c32 = normalize(p32.x, p32.weights, list(p32.groups), p32.permutations, p32.biases)
    assert T.backward_stages(p32.x, c32, True, True, True) == ((0, layers),)
    monkeypatch.setenv(T.STAGED_ENV, "0")  # switched off: the whole chain
    assert T.backward_stages(p.x, chain, True, True, True) == ((0, layers),)
    monkeypatch.delenv(T.STAGED_ENV)
    p1 = _problem(torch.float16, layers=1, input_index=False)
    c1 = normalize(p1.x, p1.weights, list(p1.groups), p1.permutations, p1.biases)
    assert T.backward_stages(p1.x, c1, True, True, True) == ((0, 1),)


def test_stages_run_where_chosen_and_lift_the_refusal(monkeypatch):
    """With the check on (the compile a stand-in), a chain whose whole backward spills in every
    configuration but whose halves' packed backwards do not is not refused: autograd's
    backward runs the halves (within the oracle's bound). Without halves that fit, the
    refusal stands."""
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_STAGES", {})
    monkeypatch.setattr(T, "_SPILL_REASONS", {})
    monkeypatch.setattr(T, "checks_spills", lambda t: True)

    def spills(fn, args, meta):  # the whole backward spills everywhere, its halves nowhere
        backward = meta.get("NEED_DX") is not None
        return 40 if backward and len(meta["LAYERS"]) > 2 else 0

    monkeypatch.setattr(K, "_dtype_spills", spills)
    p = _problem(torch.float16)
    x = p.x.to(DEVICE)
    chain = normalize(x, p.weights, list(p.groups), p.permutations, p.biases,
                      input_index=p.input_index)
    assert T.spill_reasons(x, chain, True, True, True) == []
    with _launches() as launched:
        check_backend(p, "triton", _gy(p), device=DEVICE)
    assert [len(m["LAYERS"]) for name, m in launched if name == "igc_chain_bwd"] == [2, 2]
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_STAGES", {})
    monkeypatch.setattr(T, "_SPILL_REASONS", {})
    monkeypatch.setattr(K, "_dtype_spills",
                        lambda fn, a, m: 40 if m.get("NEED_DX") is not None else 0)
    reasons = T.spill_reasons(x, chain, True, True, True)
    assert len(reasons) == 1 and "backward kernel" in reasons[0]
    xg = p.x.clone().requires_grad_()
    with pytest.raises(igc.BackendUnavailableError, match=r"backward kernel .* 40 bytes"):
        igc.interleaved_group_conv(xg, p.weights, list(p.groups), p.permutations,
                                   backend="triton", input_index=p.input_index)


def _fp32_spill_stand_in(whole, layer, forward_spills=False, compiled=None):
    """Spilled bytes of a compile: a backward of several layers spills everywhere (``whole`` is
    "never"), in its packed configurations only ("fma") or nowhere ("fits"); a one-layer
    backward everywhere (``layer`` "never") or nowhere ("fits"); a one-layer forward where
    ``forward_spills``; the rest nowhere."""
    def spills(fn, args, meta):
        n = len(meta["LAYERS"])
        if compiled is not None:
            compiled.append((meta.get("NEED_DX") is not None, n))
        if meta.get("NEED_DX") is None:
            return 64 if forward_spills and n == 1 else 0
        rule = whole if n > 1 else layer
        return 32 if rule == "never" or (rule == "fma" and meta.get("PACK")) else 0
    return spills


def _fp32_chain(channels, width=8, layers=3):
    """A float32 chain of ``channels`` channels in groups of ``width``, every permutation kind,
    on a small input (the compiles are stand-ins: nothing runs)."""
    gen = torch.Generator().manual_seed(5)
    kinds = [torch.randperm(channels, generator=gen), "interleave", None][:layers]
    p = build_problem([channels] * (layers + 1), [channels // width] * layers, spatial=(2, 2),
                      N=1, dtype=torch.float32, permutations=kinds, seed=5)
    return p.x, normalize(p.x, p.weights, list(p.groups), p.permutations, p.biases)


SINGLES = ((0, 1), (1, 2), (2, 3))


@pytest.mark.parametrize("channels,width,whole,layer,forward_spills,want", [
    (512, 8, "fma", "fits", False, SINGLES),  # 512 channels on the FMA path: one layer each
    (512, 8, "fits", "fits", False, ((0, 3),)),  # its packed backward fits: the whole chain
    (512, 8, "fma", "never", False, ((0, 3),)),  # a layer spills everywhere: the whole chain
    (512, 8, "fma", "fits", True, ((0, 3),)),  # a kept range's forward spills: the whole chain
    (128, 16, "fma", "fits", False, SINGLES),  # groups of 16 on the FMA path: one layer each
    (128, 16, "fits", "fits", False, ((0, 3),)),  # their packed backward fits: the whole chain
    (32, 16, "fma", "fits", False, ((0, 3),)),  # under 128 channels no packed ones first
    (32, 8, "fma", "fits", False, ((0, 3),)),  # no packed candidates first: the whole chain
    (32, 8, "never", "fits", False, SINGLES),  # the whole chain spills everywhere: layers
    (32, 8, "never", "never", False, ((0, 3),)),  # so do its layers: the whole chain (refused)
], ids=["512-fma", "512-packed", "512-layer-spills", "512-forward-spills", "w16-fma",
        "w16-packed", "w16-32-channels", "w8", "w8-spills", "w8-all-spill"])
def test_float32_stages_of_one_layer(monkeypatch, channels, width, whole, layer,
                                     forward_spills, want):
    """A float32 chain runs its backward one layer per range where its whole backward spills
    in every configuration, or where the fixed path offers it packed configurations first
    (groups of 16 or more from 128 channels on, or 512 channels or more) and none fits without
    spills (the FMA
    path); each range's backward and each kept range's forward without spills; else the whole
    chain, whose ranges are then not compiled where neither case holds."""
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_STAGES", {})
    monkeypatch.setattr(T, "checks_spills", lambda t: True)
    compiled = []
    monkeypatch.setattr(K, "_dtype_spills",
                        _fp32_spill_stand_in(whole, layer, forward_spills, compiled))
    x, chain = _fp32_chain(channels, width)
    packed_first = channels >= 512 or (width >= 16 and channels >= 128)
    assert K._packed_first(T._structure(chain, torch.float32)) == packed_first
    assert T.backward_stages(x, chain, True, True, True) == want
    ranges_compiled = any(backward and n == 1 for backward, n in compiled)
    assert ranges_compiled == (whole == "never" or (packed_first and whole == "fma"))


def test_float32_stages_need_compiles(monkeypatch):
    """Where nothing compiles (every compile raising otherwise than by spilling: the fixed path
    then knows no spills, ``K.fixed_choice`` returns None for them), a float32 chain of 512
    channels keeps its whole backward; likewise where only its one-layer ranges fail to
    compile."""
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_STAGES", {})
    monkeypatch.setattr(T, "checks_spills", lambda t: True)

    def fails(fn, args, meta):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(K, "_dtype_spills", fails)
    x, chain = _fp32_chain(512)
    assert T.backward_stages(x, chain, True, True, True) == ((0, 3),)
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_STAGES", {})
    fma = _fp32_spill_stand_in("fma", "fits")

    def ranges_fail(fn, args, meta):
        if len(meta["LAYERS"]) == 1:
            raise RuntimeError("no compiler here")
        return fma(fn, args, meta)

    monkeypatch.setattr(K, "_dtype_spills", ranges_fail)
    assert T.backward_stages(x, chain, True, True, True) == ((0, 3),)
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_STAGES", {})
    monkeypatch.setattr(K, "_dtype_spills", fma)  # (the same chain, compiling: staged)
    assert T.backward_stages(x, chain, True, True, True) == SINGLES


def test_float32_stages_run_and_lift_the_refusal(monkeypatch):
    """A float32 chain whose whole backward spills everywhere, each layer of it nowhere, is not
    refused: autograd's backward runs three one-layer backwards (the first with the input
    index), each with its range input kept, within the oracle's bound."""
    monkeypatch.setattr(K, "_FIXED", {})
    monkeypatch.setattr(T, "_STAGES", {})
    monkeypatch.setattr(T, "_SPILL_REASONS", {})
    monkeypatch.setattr(T, "checks_spills", lambda t: True)
    monkeypatch.setattr(K, "_dtype_spills", _fp32_spill_stand_in("never", "fits"))
    p = _problem(torch.float32, layers=3)
    x = p.x.to(DEVICE)
    chain = normalize(x, p.weights, list(p.groups), p.permutations, p.biases,
                      input_index=p.input_index)
    assert T.spill_reasons(x, chain, True, True, True) == []
    with _launches() as launched:
        _, grads = check_backend(p, "triton", _gy(p), device=DEVICE)
    assert grads is not None
    bwd = [m for name, m in launched if name == "igc_chain_bwd"]
    assert [(len(m["LAYERS"]), m["HAS_INDEX"]) for m in bwd] == [(1, 0), (1, 0), (1, 1)]
    assert [len(m["LAYERS"]) for name, m in launched if name == "igc_chain_fwd"] == [3, 1, 1]


@st.composite
def staged_chains(draw):
    """A float32 chain of 2 to 4 layers over 8 to 32 channels (groups dividing both sides,
    packed or FMA layers), its ranges (every cut between layers drawn), biases, permutation
    kinds, an input index with repeats or none, and the forced configuration."""
    L = draw(st.integers(2, 4))
    channels = [draw(st.sampled_from([8, 16, 24, 32])) for _ in range(L + 1)]
    groups = [draw(st.sampled_from([g for g in (1, 2, 4, 8)
                                     if channels[l] % g == 0 and channels[l + 1] % g == 0]))
              for l in range(L)]
    cuts = [c for c in range(1, L) if draw(st.booleans())] or [draw(st.integers(1, L - 1))]
    bounds = [0, *cuts, L]
    stages = tuple(zip(bounds[:-1], bounds[1:]))
    perms = draw(st.sampled_from(["default", "random"]))
    bias = [draw(st.booleans()) for _ in range(L)]
    index = draw(st.booleans())
    config = draw(st.sampled_from([{}, {"pack": 1}, {"dense": 0}]))
    return channels, groups, stages, perms, bias, index, config, draw(st.integers(0, 999))


@settings(max_examples=max(6, settings().max_examples // 2))
@given(spec=staged_chains())
def test_random_staged_chains(spec):
    """Random float32 chains whose backward runs in drawn layer ranges: every gradient within
    the float32 rounding bound, one backward launch per range over its own layers, the input
    index only in the first range's."""
    channels, groups, stages, perms, bias, index, config, seed = spec
    idx = None
    if index:
        idx = torch.randint(0, channels[0] + 1, (channels[0],),
                            generator=torch.Generator().manual_seed(seed))
    p = build_problem(channels, groups, spatial=(3, 3), N=2, dtype=torch.float32,
                      permutations=perms, bias=bias, seed=seed, input_index=idx,
                      in_channels=channels[0] + 1 if index else None)
    with T.force_stages(stages), _launches() as launched:
        check_backend(p, "triton", _gy(p, seed=seed + 1), device=DEVICE, config=config)
    bwd = [m for name, m in launched if name == "igc_chain_bwd"]
    assert [len(m["LAYERS"]) for m in bwd] == [b - a for a, b in stages][::-1], bwd
    assert [m["HAS_INDEX"] for m in bwd] == [0] * (len(stages) - 1) + [int(index)], bwd
