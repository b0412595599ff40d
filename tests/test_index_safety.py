"""Index values (permutations, ``input_index``) are checked on every path, and no kernel reads
or writes outside its tensors whatever the values.

* Every backend that runs on the CPU (the fused ``cpu`` kernels, ``triton`` under the
  interpreter, ``reference``) rejects an entry out of range (too large, negative) and a
  permutation with duplicates: eagerly (``ValueError`` naming the layer), under
  ``torch.compile(fullgraph=True)`` (an asynchronous assert: ``RuntimeError``) and through the
  raw ``torch.ops`` calls.
* Nothing is cached: an index changed in place through ``.data`` or ``.numpy()`` after a
  successful call is caught on the next call, and no user tensor is kept alive by the package.
* The Triton kernels clamp entries: with the raw op's value check switched off, a bad entry
  gives exactly the result of the clamped entry (nothing outside the tile or ``x`` is read).
  (The CUDA kernels' index table does the same: tests/test_cuda_compile_nvcc.py.)
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import igc_kernels as igc
from igc_kernels._ops import op_biases

BACKENDS = ["cpu", "triton", "reference"]

# (what, permutation of layer 2, input_index, x channels, error pattern)
GOOD_PERM = [3, 1, 0, 2, 5, 4]
GOOD_INDEX = [5, 1, 1, 0, 3, 2, 4, 4]
BAD = {
    "perm_too_large": ([3, 1, 0, 2, 6, 4], GOOD_INDEX, r"layer 2: permutation entries must lie "
                                                        r"in \[0, 6\)"),
    "perm_negative": ([3, 1, 0, 2, -1, 4], GOOD_INDEX, r"layer 2: permutation entries must lie "
                                                         r"in \[0, 6\)"),
    "perm_duplicate": ([3, 1, 0, 2, 3, 4], GOOD_INDEX, r"layer 2: permutation (has duplicate|"
                                                        r"entries must lie in \[0, 6\) and form)"),
    "index_too_large": (GOOD_PERM, [5, 1, 1, 0, 6, 2, 4, 4], r"input_index entries must lie in "
                                                              r"\[0, 6\)"),
    "index_negative": (GOOD_PERM, [5, 1, -2, 0, 3, 2, 4, 4], r"input_index entries must lie in "
                                                              r"\[0, 6\)"),
    "index_far_out": (GOOD_PERM, [5, 1, 1, 0, 3, 2, 4, 1 << 40], r"input_index entries must "
                                                                  r"lie in \[0, 6\)"),
}


def _args(perm, index, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=gen, dtype=dtype)
    w1 = torch.randn(8, 4, generator=gen, dtype=dtype)
    w2 = torch.randn(6, 4, generator=gen, dtype=dtype)
    return x, [w1, w2], [2, 2], ["interleave", torch.tensor(perm)], torch.tensor(index)


def _call(backend, x, ws, groups, perms, idx):
    return igc.interleaved_group_conv(x, ws, groups, perms, input_index=idx, backend=backend)


@pytest.mark.parametrize("case", BAD.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_rejects_bad_indices(backend, case):
    perm, index, pattern = BAD[case]
    x, ws, groups, perms, idx = _args(perm, index)
    with pytest.raises(ValueError, match=pattern):
        _call(backend, x, ws, groups, perms, idx)
    _call(backend, *_args(GOOD_PERM, GOOD_INDEX))  # and the process keeps working


@pytest.mark.parametrize("case", ["perm_too_large", "perm_negative", "perm_duplicate",
                                  "index_too_large", "index_negative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_rejects_bad_indices(backend, case):
    """Under torch.compile the values are checked by a traced assert (no graph break); before
    this, the reference and Triton backends accepted them and read outside x."""
    perm, index, pattern = BAD[case]
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: _call(backend, *a), fullgraph=True)
    x, ws, groups, perms, idx = _args(GOOD_PERM, GOOD_INDEX)
    expected = _call(backend, x, ws, groups, perms, idx)
    torch.testing.assert_close(fn(x, ws, groups, perms, idx), expected)
    x, ws, groups, perms, idx = _args(perm, index)
    with pytest.raises(RuntimeError, match=pattern):
        fn(x, ws, groups, perms, idx)


def _raw_args(perm, index):
    x, ws, groups, perms, idx = _args(perm, index)
    return x, ws, op_biases([None, None], x), groups, [2, 0], [None, perms[1]], idx


def _triton_ops():
    igc.BACKENDS["triton"].unavailable_reasons()
    from igc_kernels import _triton_ops

    return _triton_ops


@pytest.mark.parametrize("case", BAD.keys())
@pytest.mark.parametrize("ops", ["igc", "igc_triton"])
def test_raw_ops_reject_bad_indices(ops, case):
    perm, index, _ = BAD[case]
    if ops == "igc_triton":
        _triton_ops()
    lib = getattr(torch.ops, ops)
    x, ws, bs, groups, shuffles, perms, idx = _raw_args(perm, index)
    with pytest.raises((RuntimeError, ValueError), match=r"permutation|input_index"):
        lib.chain_forward(x, ws, bs, groups, shuffles, perms, idx)
    gy = torch.randn(2, 6, 3)
    with pytest.raises((RuntimeError, ValueError), match=r"permutation|input_index"):
        lib.chain_backward(gy, x, ws, bs, groups, shuffles, perms, [True, True, False], idx)


@pytest.mark.parametrize("case", ["perm_too_large", "perm_negative", "perm_far_out",
                                  "index_too_large", "index_negative", "index_far_out"])
def test_triton_kernels_clamp_unchecked_entries(monkeypatch, case):
    """The raw Triton op with its value check switched off: a bad entry of a permutation
    between layers or of the input index is clamped into range in the kernel, so the result is
    the one of the clamped index (a read outside the tile or x would give something else, or
    fail under the interpreter). (The last layer's permutation is only used through its
    inverse, an argsort: always in range.)"""
    mod = _triton_ops()
    bad = {"too_large": 8, "negative": -3, "far_out": 1 << 40}[case.split("_", 1)[1]]
    perm = torch.tensor([3, 1, 0, 2, 5, 4, 7, 6])
    idx = torch.tensor(GOOD_INDEX)
    if case.startswith("perm"):
        perm[5] = bad
    else:
        idx[2] = bad
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=gen)
    ws = [torch.randn(8, 4, generator=gen), torch.randn(6, 4, generator=gen)]
    gy = torch.randn(2, 6, 3, generator=gen)
    args = (ws, [], [2, 2], [0, 0], [perm, None])
    # the kernels take index entries as int32 (a far-out int64 entry wraps), then clamp them
    clamped = (ws, [], [2, 2], [0, 0], [perm.to(torch.int32).long().clamp(0, 7), None])
    idx_c = idx.to(torch.int32).long().clamp(0, 5)
    import igc_kernels._chain as chain_mod

    monkeypatch.setattr(chain_mod, "check_index_values", lambda *a, **k: None)
    # the register-gather (FMA) path reads the permutation itself; the tl.dot path folds its
    # inverse (an argsort: in range whatever the values) into the weights
    with mod.K.override_config(dense=0):
        expected = mod.chain_forward(x, *clamped, idx_c)
        assert torch.equal(mod.chain_forward(x, *args, idx), expected)
        # the backward recomputes the forward from x (through idx) with the same clamps (its
        # gradient path goes through the permutation's argsort instead: in range, but not the
        # clamped permutation's inverse)
        exp_b = mod.chain_backward(gy, x, *clamped, [False, True, False], idx_c)
        got_b = mod.chain_backward(gy, x, *args, [False, True, False], idx)
        if case.startswith("index"):
            assert torch.equal(got_b[1], exp_b[1])
        assert torch.isfinite(got_b[1]).all()
    with mod.K.override_config(dense=1):  # memory safe there too
        assert torch.isfinite(mod.chain_forward(x, *args, idx)).all()


@pytest.mark.parametrize("how", ["data", "numpy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_index_changed_in_place_after_a_call_is_caught(backend, how):
    """In-place changes through ``.data`` / ``.numpy()`` do not move the version counter; a cache
    keyed on it trusted the stale check. Nothing is cached now."""
    x, ws, groups, perms, idx = _args(GOOD_PERM, GOOD_INDEX)
    _call(backend, x, ws, groups, perms, idx)
    if how == "data":
        perms[1].data[4] = perms[1].data[0]
    else:
        perms[1].numpy()[4] = perms[1].numpy()[0]
    with pytest.raises(ValueError, match=r"layer 2: permutation has duplicate"):
        _call(backend, x, ws, groups, perms, idx)
    idx.numpy()[0] = 9
    perms[1].numpy()[:] = GOOD_PERM
    with pytest.raises(ValueError, match=r"input_index entries must lie in \[0, 6\)"):
        _call(backend, x, ws, groups, perms, idx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_user_tensor_is_retained(backend):
    """Index tensors (and the bases of index views) are not kept alive after the call."""
    base = torch.arange(600)
    perm = base[100:106] - 100
    perm.copy_(torch.tensor(GOOD_PERM))
    x, ws, groups, perms, idx = _args(GOOD_PERM, GOOD_INDEX)
    refs = [weakref.ref(base), weakref.ref(perm), weakref.ref(idx)]
    _call(backend, x, ws, groups, ["interleave", perm], idx)
    del base, perm, idx, perms
    gc.collect()
    assert all(r() is None for r in refs), "a user index tensor outlived the call"
