"""InterleavedGroupConv (parameters, init, buffers, state_dict, output) and backend selection
(available_backends, use_backend, "auto")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import igc_kernels as igc
from igc_kernels import ChainSpec, InterleavedGroupConv
from igc_kernels import backends as backends_mod
from igc_test_utils import FUSED, assert_within_rounding, magnitudes, Problem


SPEC = ChainSpec([12, 18, 8, 8], [3, 2, 4], ["interleave", torch.randperm(8), None])


def test_parameters_one_per_layer_in_order():
    m = InterleavedGroupConv(SPEC, bias=True)
    names = [n for n, _ in m.named_parameters()]
    assert names == ["weights.0", "weights.1", "weights.2", "biases.0", "biases.1", "biases.2"]
    # conv layout (C_l, n_l, 1, 1), n_l = C_{l-1} / G_l
    assert [tuple(w.shape) for w in m.weights] == [(18, 4, 1, 1), (8, 9, 1, 1), (8, 2, 1, 1)]
    assert [tuple(b.shape) for b in m.biases] == [(18,), (8,), (8,)]
    no_bias = InterleavedGroupConv(SPEC)
    assert no_bias.biases is None
    assert [n for n, _ in no_bias.named_parameters()] == ["weights.0", "weights.1", "weights.2"]


def test_init_bounds_like_conv2d():
    """Kaiming-uniform(a=sqrt(5)) as nn.Conv2d: weights and biases within +-1/sqrt(n_l)."""
    spec = ChainSpec([64, 64, 64], [16, 2])  # n_1 = 4, n_2 = 32
    torch.manual_seed(0)
    m = InterleavedGroupConv(spec, bias=True).requires_grad_(False)
    for l, (w, b) in enumerate(zip(m.weights, m.biases)):
        n = w.shape[1]
        bound = 1 / math.sqrt(n)
        assert float(w.abs().max()) <= bound
        assert float(b.abs().max()) <= bound
        # uniform over the whole interval, not a degenerate fill: the extremes come close
        assert float(w.max()) > 0.8 * bound and float(w.min()) < -0.8 * bound
        assert abs(float(w.mean())) < 0.2 * bound
        # the same bound nn.Conv2d uses for this layer
        conv = nn.Conv2d(spec.channels[l], spec.channels[l + 1], 1, groups=spec.groups[l])
        conv_bound = 1 / math.sqrt(conv.weight[0].numel())
        assert math.isclose(bound, conv_bound)
        assert float(conv.weight.detach().abs().max()) <= conv_bound


def test_module_rejects_non_spec():
    with pytest.raises(TypeError, match="spec must be a ChainSpec"):
        InterleavedGroupConv([12, 18])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["auto", FUSED, "reference"])
def test_module_output_equals_reference(bias, backend):
    m = InterleavedGroupConv(SPEC, bias=bias, backend=backend, dtype=torch.float64)
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 8, 3, 5)
    biases = list(m.biases) if bias else None
    y_ref = igc.reference.interleaved_group_conv(x, list(m.weights), list(SPEC.groups),
                                                 list(SPEC.permutations), biases)
    p = Problem(x, list(m.weights), list(SPEC.groups), list(SPEC.permutations), biases,
                SPEC.channels)
    ymag, _ = magnitudes(p)
    assert_within_rounding(y, y_ref, ymag, p.reduction_length(), torch.float64, safety=4)
    # and the module's dense matrix is the operator
    M = m.dense_matrix()
    assert M.shape == (8, 12)
    if not bias:
        y_dense = (x.movedim(1, -1) @ M.t()).movedim(-1, 1)
        assert_within_rounding(y, y_dense, ymag, p.reduction_length() + 20, torch.float64,
                               safety=4)
    y.sum().backward()
    for w in m.weights:
        assert w.grad is not None and w.grad.shape == w.shape


def test_explicit_permutations_are_buffers():
    perm = torch.randperm(8)
    spec = ChainSpec([8, 8, 8], [2, 4], [perm, "interleave"])
    m = InterleavedGroupConv(spec)
    buffers = dict(m.named_buffers())
    assert list(buffers) == ["perm_0"]
    assert buffers["perm_0"].dtype == torch.int64
    assert torch.equal(buffers["perm_0"], perm)
    assert "perm_0" in m.state_dict()
    # dtype casts leave the index alone; the module still runs
    m = m.to(torch.float64)
    assert m.perm_0.dtype == torch.int64 and m.weights[0].dtype == torch.float64
    assert m(torch.randn(1, 8, 2, dtype=torch.float64)).dtype == torch.float64
    # the buffer is a copy: editing the spec's tensor does not change the module
    with torch.no_grad():
        perm[0], perm[1] = perm[1].clone(), perm[0].clone()
    assert not torch.equal(m.perm_0, perm)


def test_state_dict_round_trip():
    spec = ChainSpec([8, 8, 8], [2, 4], [torch.randperm(8), None])
    torch.manual_seed(1)
    a = InterleavedGroupConv(spec, bias=True)
    torch.manual_seed(2)
    b = InterleavedGroupConv(ChainSpec([8, 8, 8], [2, 4], [torch.arange(8), None]), bias=True)
    x = torch.randn(3, 8, 4)
    assert not torch.equal(a(x), b(x))
    missing = b.load_state_dict(a.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    assert torch.equal(a(x), b(x))
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    # the loaded permutation is the one the module uses everywhere, dense_matrix() included
    assert torch.equal(a.dense_matrix(), b.dense_matrix())


def test_extra_repr():
    r = repr(InterleavedGroupConv(SPEC, bias=True, backend="reference"))
    assert "channels=[12, 18, 8, 8]" in r and "groups=[3, 2, 4]" in r
    assert "bias=True" in r and "backend='reference'" in r


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------
def test_available_backends():
    names = igc.available_backends()
    assert "reference" in names
    assert "cpu" in names, (
        "the 'cpu' backend is unavailable: "
        + "; ".join(igc.BACKENDS["cpu"].unavailable_reasons()))
    assert "cpu" in igc.available_backends("cpu")
    assert "cuda" not in igc.available_backends("cpu")
    assert igc.available_backends("meta") == ["reference"]
    if not torch.cuda.is_available():
        assert "cuda" not in names


def _count_runs(monkeypatch, name):
    calls = []
    be = igc.BACKENDS[name]
    orig = be.run

    def runner(x, chain):
        calls.append(name)
        return orig(x, chain)

    monkeypatch.setattr(be, "run", runner)
    return calls


def test_auto_picks_cpu_kernel_for_cpu_tensors(monkeypatch):
    cpu_calls = _count_runs(monkeypatch, "cpu")
    ref_calls = _count_runs(monkeypatch, "reference")
    igc.interleaved_group_conv(torch.randn(2, 8), [torch.randn(8, 4)], [2])
    assert cpu_calls == ["cpu"] and ref_calls == []


def test_use_backend_scope(monkeypatch):
    cpu_calls = _count_runs(monkeypatch, "cpu")
    ref_calls = _count_runs(monkeypatch, "reference")
    x, ws = torch.randn(2, 8), [torch.randn(8, 4)]
    with igc.use_backend("reference"):
        igc.interleaved_group_conv(x, ws, [2])
        with igc.use_backend("cpu"):
            igc.interleaved_group_conv(x, ws, [2])
        igc.interleaved_group_conv(x, ws, [2])
        # an explicit backend argument wins over the scope
        igc.interleaved_group_conv(x, ws, [2], backend="cpu")
    igc.interleaved_group_conv(x, ws, [2])
    assert ref_calls == ["reference", "reference"]
    assert cpu_calls == ["cpu", "cpu", "cpu"]


def test_use_backend_scope_is_restored_after_an_error():
    x, ws = torch.randn(2, 8), [torch.randn(8, 4)]
    with pytest.raises(igc.BackendUnavailableError, match="backend 'cuda' cannot run"):
        with igc.use_backend("cuda"):  # CPU tensors: the scoped explicit backend refuses
            igc.interleaved_group_conv(x, ws, [2])
    assert backends_mod._default_backend() == "auto"
    assert igc.interleaved_group_conv(x, ws, [2]).shape == (2, 8)


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with igc.use_backend("fast"):
            pass
    assert backends_mod._default_backend() == "auto"


def test_backend_descriptions():
    for name, be in igc.BACKENDS.items():
        assert be.name == name and be.summary and be.deterministic
        assert torch.float32 in be.dtypes
    assert igc.BACKENDS["cpu"].unavailable_reasons() == []
    assert igc.BACKENDS["reference"].unavailable_reasons() == []


def test_auto_error_lists_every_backends_reasons(monkeypatch):
    """When no backend can run an input, one error collects every backend's reasons."""
    for name, be in igc.BACKENDS.items():
        monkeypatch.setattr(be, "limit_reasons", lambda x, chain, n=name: [f"{n} refuses"])
    with pytest.raises(igc.BackendUnavailableError, match="no backend can run this input") as e:
        igc.interleaved_group_conv(torch.randn(2, 8), [torch.randn(8, 4)], [2])
    for name, be in igc.BACKENDS.items():
        assert f"{name}: " in str(e.value)
        if not be.unavailable_reasons():
            assert f"{name} refuses" in str(e.value)


def test_backends_are_declared_one_file_each():
    """Each backend is a module of igc_kernels.backends defining BACKEND; the registry and the
    auto order come from the declarations (priority)."""
    from igc_kernels.backends import base

    for name in backends_mod._MODULES:
        mod = __import__(f"igc_kernels.backends.{name}", fromlist=["BACKEND"])
        assert isinstance(mod.BACKEND, base.Backend) and igc.BACKENDS[mod.BACKEND.name] is \
            mod.BACKEND
    prio = [igc.BACKENDS[n].priority for n in backends_mod.AUTO_ORDER]
    assert prio == sorted(prio) and backends_mod.AUTO_ORDER[-1] == "reference"
