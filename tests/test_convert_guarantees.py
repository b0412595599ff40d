"""What ``igc_kernels.convert`` guarantees beyond equal outputs on batched inputs: models that
index with negative indices, unbatched inputs, checkpoints in both directions (``strict=True``),
the converted modules' classes, attributes and methods, and clear errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import igc_kernels as igc
from igc_kernels import ChannelGather, InterleavedGroupConv
from test_convert import Functional, Net, ResidualMixed, seq_chain


def _fused(model):
    return [m for m in model.modules() if isinstance(m, InterleavedGroupConv)]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


class NegativeIndex(nn.Module):
    """``x[:, idx]`` with negative entries (as PyTorch allows): before a chain (x's channel
    count unknown at conversion: left as it is) and between two convolutions (normalised)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 8, 1, groups=2)
        self.c2 = nn.Conv2d(8, 8, 1, groups=4)
        self.register_buffer("lead", torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6]))
        self.register_buffer("mid", torch.tensor([-8, -1, 1, 2, 3, 4, 5, 6]))

    def forward(self, x):
        return self.c2(self.c1(x[:, self.lead])[:, self.mid])

    def lead_width(self):  # a method, kept by the conversion
        return self.lead.numel()


class TrainingDependent(nn.Module):
    """A forward that reads ``self.training``: a traced graph would freeze one branch."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(8, 8, 1, groups=2)
        self.c2 = nn.Conv2d(8, 8, 1, groups=2)

    def forward(self, x):
        h = self.c1(x)
        if self.training:
            h = F.channel_shuffle(h, 2)
        return self.c2(h)


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 1


# ---------------------------------------------------------------------------------------------
def test_negative_indices_are_normalised_or_left_alone():
    torch.manual_seed(0)
    model = Wrapper(NegativeIndex()).double()
    conv = igc.convert(model)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    _close(conv(x), model(x))
    (fused,) = _fused(conv)
    assert fused.input_index is None  # the leading x[:, lead] stayed in the forward
    assert torch.equal(fused.permutations()[0], torch.tensor([0, 7, 1, 2, 3, 4, 5, 6]))
    assert conv.inner.lead_width() == 8


def test_conversion_errors_name_the_module(monkeypatch):
    def boom(*a, **k):
        raise ValueError("node c1: something is wrong")

    monkeypatch.setattr(InterleavedGroupConv, "from_ops", classmethod(lambda cls, *a, **k:
                                                                     boom()))
    with pytest.raises(ValueError, match=r"convert: in module 'inner' \(NegativeIndex\): node "
                                         r"c1: something is wrong"):
        igc.convert(Wrapper(NegativeIndex()))
    with pytest.raises(ValueError, match=r"convert: in module 'chain' \(Sequential\)"):
        igc.convert(ResidualMixed())


def test_training_dependent_forward_is_not_converted():
    model = TrainingDependent()
    conv = igc.convert(model)
    assert not _fused(conv) and type(conv) is TrainingDependent


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_unbatched_inputs_behave_as_the_original(kind):
    """On a 3-D input nn.Conv2d runs unbatched, and nn.ChannelShuffle / F.channel_shuffle /
    x[:, idx] act on dim 1 (the height): the converted model does exactly the same (before, it
    shuffled channels: outputs differed by up to 1.87), errors included."""
    torch.manual_seed(1)
    model = (seq_chain() if kind == "sequential" else Functional()).double()
    conv = igc.convert(model)
    assert _fused(conv)
    if kind == "sequential":
        xu = torch.randn(16, 32, 3, dtype=torch.float64)
        _close(conv(xu), model(xu))
    # Functional's BatchNorm refuses 3-D inputs; the sequential chain's shuffles need a height
    # divisible by their groups: the same error either way
    bad = torch.randn(16, 5, 3, dtype=torch.float64)
    with pytest.raises(Exception) as orig_err:
        model(bad)
    with pytest.raises(type(orig_err.value)) as conv_err:
        conv(bad)
    assert str(conv_err.value) == str(orig_err.value)
    with pytest.raises(ValueError, match="Expected 3D \\(unbatched\\) or 4D"):
        _fused(conv)[0](torch.randn(2, 16, 3, 3, 1, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
MODELS = {
    "sequential_with_gather": lambda: seq_chain(),
    "functional_fx": lambda: Functional(),
    "residual_mixed": lambda: ResidualMixed(),
    "shufflenet_net": lambda: Net(),
    "negative_index": lambda: Wrapper(NegativeIndex()),
}
INPUTS = {"sequential_with_gather": (2, 16, 4, 4), "functional_fx": (2, 16, 4, 4),
          "residual_mixed": (2, 16, 4, 4), "shufflenet_net": (2, 3, 8, 8),
          "negative_index": (2, 8, 3, 3)}


@pytest.mark.parametrize("name", MODELS.keys())
def test_checkpoints_load_both_ways(name):
    """A converted model saves the original's state-dict keys and loads the original's state
    dict, both with strict=True (before, the keys changed: block.c1.weight became
    block.igc_fused_0.weights.0)."""
    torch.manual_seed(2)
    original = MODELS[name]().double().eval()
    conv = igc.convert(original).eval()
    assert _fused(conv)
    assert conv.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(INPUTS[name], dtype=torch.float64)

    torch.manual_seed(3)  # another initialisation of each
    other = MODELS[name]().double().eval()
    other_conv = igc.convert(MODELS[name]().double()).eval()
    # original checkpoint -> converted model
    other_conv.load_state_dict(original.state_dict(), strict=True)
    _close(other_conv(x), original(x))
    # converted checkpoint -> original model
    other.load_state_dict(conv.state_dict(), strict=True)
    _close(other(x), conv(x))
    # and the converted model's own round trip
    other_conv.load_state_dict(conv.state_dict(), strict=True)
    _close(other_conv(x), conv(x))


def test_checkpoint_with_other_index_values_is_recomposed():
    """A ChannelGather index that differs in the checkpoint: the fused permutation is
    recomposed from it (the outputs are the original model's with that checkpoint)."""
    torch.manual_seed(4)
    original = seq_chain().double()
    conv = igc.convert(original)
    sd = original.state_dict()
    sd["4.index"] = torch.randperm(32)
    original.load_state_dict(sd, strict=True)
    conv.load_state_dict(sd, strict=True)
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    _close(conv(x), original(x))
    assert torch.equal(conv.state_dict()["4.index"], sd["4.index"])


def test_checkpoint_that_changes_the_chain_structure_is_refused():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(8, 8, 1, groups=2), ChannelGather(torch.arange(8)),
                          nn.Conv2d(8, 8, 1, groups=2))
    conv = igc.convert(model)
    assert conv[0].permutations()[0] is None  # the identity gather: no permutation at all
    sd = model.state_dict()
    sd["1.index"] = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])  # no longer the identity
    with pytest.raises(RuntimeError, match="index values do not give this converted chain"):
        conv.load_state_dict(sd)


# ---------------------------------------------------------------------------------------------
def test_fx_converted_module_keeps_class_attributes_and_methods():
    torch.manual_seed(6)
    model = Wrapper(NegativeIndex())
    model.inner.note = "kept"
    conv = igc.convert(model)
    inner = conv.inner
    assert isinstance(inner, NegativeIndex) and type(inner).__name__ == "NegativeIndex"
    assert inner.note == "kept" and inner.lead_width() == 8
    assert not hasattr(inner, "c1") and not hasattr(inner, "c2")  # fused: removed
    assert isinstance(conv, Wrapper)
    copy = __import__("copy").deepcopy(conv)
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(copy(x), conv(x))


# ---------------------------------------------------------------------------------------------
def test_torchscript_is_refused_clearly():
    m = nn.Sequential(InterleavedGroupConv(igc.ChainSpec.igcv2(16, 4)))
    x = torch.randn(2, 16, 3, 3)
    with pytest.raises(TypeError, match=r"does not support TorchScript.*torch.compile"):
        torch.jit.trace(m, x)
    with pytest.raises(TypeError, match=r"does not support TorchScript.*torch.export"):
        torch.jit.script(m)


@pytest.mark.parametrize("layout", ["sparse", "mkldnn"])
def test_non_dense_x_is_refused(layout):
    x = torch.randn(2, 8)
    x = x.to_sparse() if layout == "sparse" else x.to_mkldnn()
    with pytest.raises(TypeError, match=r"x must be a dense \(strided\) tensor, got layout"):
        igc.interleaved_group_conv(x, [torch.randn(8, 4)], [2])


@pytest.mark.parametrize("call, pattern", [
    (lambda: igc.interleave_index(10, 3), r"channels = 10 is not divisible by groups = 3"),
    (lambda: igc.interleave_index(10, 0), r"channels and groups must be positive ints"),
    (lambda: igc.ChainSpec.balanced(64, 0), r"num_layers must be a positive int, got 0"),
    (lambda: igc.ChainSpec.min_params(64, 0), r"num_layers must be a positive int, got 0"),
    (lambda: igc.ChainSpec.optimal_depth(0), r"channels must be a positive int, got 0"),
    (lambda: igc.ChainSpec.balanced_group_sizes(0, 2), r"channels must be a positive int"),
    (lambda: igc.ChainSpec.igcv2(64, 1), r"group_size = 1 makes every group a single channel"),
])
def test_clear_value_errors(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_numpy_integers_are_accepted():
    """Channels, groups and index lists given as numpy integers (as torch accepts them)."""
    spec = igc.ChainSpec([np.int64(8), np.int32(8)], [np.int64(2)],
                         [[np.int64(v) for v in [1, 0, 3, 2, 5, 4, 7, 6]]])
    assert spec.channels == (8, 8) and type(spec.channels[0]) is int
    assert igc.ChainSpec.igcv2(np.int64(16), np.int64(4)).num_layers == 2
    x, w = torch.randn(2, 8, 3), torch.randn(8, 4)
    ref = igc.interleaved_group_conv(x, [w], [2], [torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])],
                                     input_index=torch.arange(8))
    for perm in ([np.int64(v) for v in [1, 0, 3, 2, 5, 4, 7, 6]],
                 np.array([1, 0, 3, 2, 5, 4, 7, 6])):
        y = igc.interleaved_group_conv(x, [w], [np.int64(2)], [perm],
                                       input_index=np.arange(8))
        torch.testing.assert_close(y, ref)
    m = InterleavedGroupConv(spec, input_index=np.arange(8))
    assert m.input_index.tolist() == list(range(8))
    assert igc.interleave_index(np.int64(6), np.int64(2)).tolist() == [0, 3, 1, 4, 2, 5]
