"""igc_kernels.convert / unfuse and InterleavedGroupConv.from_modules / unfuse.

Every converted model is checked against the original on the same input: output, input
gradient and every parameter's gradient, in float64, with the fused "cpu" backend and with
"reference". Tolerance as in test_models: ``2 k u scale`` with ``k`` the longest chain of
roundings (fan-ins along the depth plus the reduction over positions).

The models are hand-built nets the package was not designed around: chains mixed with BN,
ReLU, 3x3 convolutions and residuals, in module trees (nn.Sequential) and in functional
forwards (F.conv2d, F.channel_shuffle, torch.channel_shuffle, index_select, x[:, idx]), plus a
ShuffleNet-style unit. (torchvision is not used: its PyPI wheels need a CUDA build of torch.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import igc_kernels as igc
from igc_kernels import ChannelGather, InterleavedGroupConv
from igc_kernels.models import IGCV1Block, IGCV2CifarNet, IGCV3Block, CondenseLayer
from igc_test_utils import FUSED, require_extension

U64 = torch.finfo(torch.float64).eps / 2
K_ROUND = 4000  # >= fan-ins along the depth + positions reduced (N*H*W <= 2*8*8) of these nets


def fused_modules(model):
    return [m for m in model.modules() if isinstance(m, InterleavedGroupConv)]


def assert_close64(a, b, name):
    scale = max(1.0, float(b.detach().abs().max()))
    err = float((a.detach() - b.detach()).abs().max())
    assert err <= 2 * K_ROUND * U64 * scale, f"{name}: max error {err:.3e}"


def check_equivalent(model, x, backend, expect_chains, inplace=True):
    """Convert a twin of ``model`` in place; outputs and all gradients equal the original's."""
    if backend == FUSED:
        require_extension()
    model = model.double().train()
    twin = copy.deepcopy(model)
    twin_params = list(twin.parameters())  # in the original order, before conversion
    conv = igc.convert(twin, inplace=inplace)
    fm = fused_modules(conv)
    assert len(fm) == expect_chains, conv
    for m in fm:
        m.backend = backend
    xa = x.double().clone().requires_grad_()
    xb = x.double().clone().requires_grad_()
    ya, yb = model(xa), conv(xb)
    assert_close64(yb, ya, "output")
    gy = torch.randn_like(ya)
    ya.backward(gy)
    yb.backward(gy)
    assert_close64(xb.grad, xa.grad, "grad of x")
    if inplace:  # the converted model uses twin's Parameters: compare their gradients
        conv_params = {id(p) for p in conv.parameters()}
        assert conv_params == {id(p) for p in twin_params}  # adopted, nothing new or dropped
        for (name, p1), p2 in zip(model.named_parameters(), twin_params):
            assert torch.equal(p1, p2), name
            if id(p2) in conv_params:
                assert p2.grad is not None, f"no gradient for {name}"
                assert_close64(p2.grad, p1.grad, f"grad of {name}")
    return conv


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def seq_chain():
    """conv(g4) + shuffle(4) [interleave] + conv(g8, no bias) + shuffle(2) [index] + gather
    (a permutation, composed with the shuffle) + conv(g2): one chain of three layers."""
    return nn.Sequential(
        nn.Conv2d(16, 32, 1, groups=4), nn.ChannelShuffle(4),
        nn.Conv2d(32, 32, 1, groups=8, bias=False), nn.ChannelShuffle(2),
        ChannelGather(torch.randperm(32)), nn.Conv2d(32, 16, 1, groups=2))


class ResidualMixed(nn.Module):
    """3x3 conv, BN, ReLU, a Sequential chain, BN, residual; a nested Sequential with a chain
    that a 3x3 conv interrupts; a grouped conv + shuffle pair; a lone grouped conv (not fused)."""

    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.chain = nn.Sequential(nn.Conv2d(16, 16, 1, groups=4, bias=False),
                                   nn.ChannelShuffle(4), nn.Conv2d(16, 16, 1, groups=4))
        self.bn2 = nn.BatchNorm2d(16)
        self.tail = nn.Sequential(
            nn.Conv2d(16, 24, 1, groups=2), nn.ChannelShuffle(2),          # chain A
            nn.Conv2d(24, 24, 3, padding=1, groups=4),                      # breaks it
            nn.ReLU(),
            nn.Conv2d(24, 24, 1, groups=3), nn.ChannelShuffle(3),          # chain B
            nn.BatchNorm2d(24),
            nn.Conv2d(24, 8, 1, groups=4),                                  # lone: not fused
        )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv3(x)))
        h = x + self.bn2(self.chain(h))
        return self.tail(h)


class Functional(nn.Module):
    """A functional forward: children convs, F.conv2d with module weights, F / torch channel
    shuffles, index_select and x[:, idx] gathers, a CondenseNet-style index layer."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 32, 1, groups=4)
        self.w2 = nn.Parameter(torch.randn(32, 4, 1, 1) * 0.5)
        self.register_buffer("perm", torch.randperm(32))
        self.register_buffer("idx", torch.tensor([0, 3, 3, 5, 15, 9, 9, 1, 2, 2, 0, 7] * 2))
        self.c3 = nn.Conv2d(24, 8, 1, groups=4, bias=False)
        self.c4 = nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.bn(x))
        y = self.c1(h)
        y = F.channel_shuffle(y, 4)
        y = F.conv2d(y, self.w2, None, 1, 0, 1, 8)
        y = y[:, self.perm]
        z = torch.index_select(h, 1, self.idx)
        z = self.c3(z)
        z = torch.channel_shuffle(z, 2)
        return self.c4(y) + z


class ShuffleUnit(nn.Module):
    """ShuffleNet-style unit with a shuffle written in forward: grouped 1x1, shuffle, depthwise
    3x3, grouped 1x1 + shuffle back to back (fused), residual."""

    def __init__(self, c=24, g=3):
        super().__init__()
        self.g = g
        self.gconv1 = nn.Conv2d(c, c, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.gconv2 = nn.Conv2d(c, c, 1, groups=g, bias=False)
        self.gconv3 = nn.Conv2d(c, c, 1, groups=2 * g, bias=False)

    def forward(self, x):
        h = F.relu(self.bn1(self.gconv1(x)))
        h = F.channel_shuffle(h, self.g)  # after BN/ReLU: not part of a chain
        h = self.bn2(self.dw(h))
        h = self.gconv2(h)
        h = F.channel_shuffle(h, self.g)
        h = self.gconv3(h)
        return F.relu(x + h)


class Net(nn.Module):
    """Module tree + functional pieces nested: Sequential of custom modules, ModuleList."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.units = nn.ModuleList([ShuffleUnit(), ShuffleUnit()])
        self.head = nn.Sequential(nn.Conv2d(24, 24, 1, groups=6), nn.ChannelShuffle(6),
                                  nn.Conv2d(24, 12, 1, groups=2), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        h = self.stem(x)
        for u in self.units:
            h = u(h)
        return self.head(h).flatten(1)


@pytest.mark.parametrize("backend", [FUSED, "reference"])
def test_sequential_chain(backend):
    conv = check_equivalent(seq_chain(), torch.randn(2, 16, 5, 5), backend, 1)
    m = conv[0]
    assert all(isinstance(conv[i], nn.Identity) for i in range(1, 6))
    assert list(m.spec.channels) == [16, 32, 32, 16] and list(m.spec.groups) == [4, 8, 2]
    perms = m.permutations()
    assert perms[0] == "interleave" and isinstance(perms[1], torch.Tensor) and perms[2] is None


@pytest.mark.parametrize("backend", [FUSED, "reference"])
def test_residual_mixed_module_tree(backend):
    torch.manual_seed(1)
    conv = check_equivalent(ResidualMixed(), torch.randn(2, 16, 6, 6), backend, 3)
    assert isinstance(conv.tail[7], nn.Conv2d)  # the lone grouped conv stays
    assert isinstance(conv.tail[2], nn.Conv2d) and conv.tail[2].kernel_size == (3, 3)
    # chain B: the shuffle with 3 groups after a conv with 3 groups is "interleave"
    assert conv.tail[4].permutations() == ["interleave"]


@pytest.mark.parametrize("backend", [FUSED, "reference"])
def test_functional_forward_fx(backend):
    torch.manual_seed(2)
    conv = check_equivalent(Functional(), torch.randn(2, 16, 5, 5), backend, 2)
    # the module keeps its class (a subclass whose forward is the traced graph)
    assert isinstance(conv, Functional) and type(conv).__name__ == "Functional"
    assert not isinstance(conv, torch.fx.GraphModule)
    a, b = fused_modules(conv)
    assert list(a.spec.channels) == [16, 32, 32] and a.input_index is None
    assert a.permutations()[0] == "interleave" and isinstance(a.permutations()[1], torch.Tensor)
    assert b.input_index is not None and b.input_index.numel() == 24  # repeats kept
    # a shuffle whose group count (2) differs from the conv's (4) becomes an index permutation
    assert torch.equal(b.permutations()[0], igc.interleave_index(8, 2))


@pytest.mark.parametrize("backend", [FUSED, "reference"])
def test_shufflenet_style_net(backend):
    torch.manual_seed(3)
    conv = check_equivalent(Net(), torch.randn(2, 3, 8, 8), backend, 3)
    for u in conv.units:  # each unit's forward was rewritten; its first shuffle stays
        assert isinstance(u, ShuffleUnit) and u.g == 3
        assert "channel_shuffle" in type(u)._igc_code
        assert hasattr(u, "gconv1") and not hasattr(u, "gconv2")
    assert isinstance(conv.head[0], InterleavedGroupConv)


def test_not_inplace_leaves_original_untouched():
    torch.manual_seed(4)
    model = ResidualMixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    conv = igc.convert(model)
    assert repr(model) == structure and len(fused_modules(model)) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in conv.parameters())
    assert len(fused_modules(conv)) == 3


def test_inplace_adopts_parameters_without_copy():
    torch.manual_seed(5)
    model = seq_chain()
    params = [model[0].weight, model[0].bias, model[2].weight, model[5].weight, model[5].bias]
    ptrs = [p.data_ptr() for p in params]
    conv = igc.convert(model, inplace=True)
    assert conv is model
    m = conv[0]
    assert m.weights[0] is params[0] and m.biases[0] is params[1]
    assert m.weights[1] is params[2] and m.biases[1] is None
    assert m.weights[2] is params[3] and m.biases[2] is params[4]
    assert [p.data_ptr() for p in params] == ptrs
    # an optimizer built before the conversion still updates what the fused module uses
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(2, 16, 3, 3)
    m(x).sum().backward()
    w0 = m.weights[0].detach().clone()
    opt.step()
    assert not torch.equal(m.weights[0], w0)


def test_filter_fn_and_hooks():
    torch.manual_seed(6)
    names = []

    def keep(module, name):
        names.append(name)
        return name != "2"  # keep the second conv out: the chain splits

    conv = igc.convert(seq_chain(), filter_fn=keep)
    assert "0" in names and "1" in names
    fm = fused_modules(conv)
    assert len(fm) == 2 and isinstance(conv[2], nn.Conv2d)
    assert list(fm[0].spec.channels) == [16, 32]  # conv + shuffle(4)
    hooked = seq_chain()
    hooked[2].register_forward_hook(lambda *a: None)
    conv = igc.convert(hooked)
    assert isinstance(conv[2], nn.Conv2d) and len(fused_modules(conv)) == 2


def test_what_is_not_fused():
    cases = [
        nn.Sequential(nn.Conv2d(8, 8, 1, groups=2)),                               # lone conv
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.ChannelShuffle(2), nn.Conv2d(8, 8, 1)),  # dense
        nn.Sequential(nn.Conv2d(8, 8, 1, groups=2, stride=2), nn.ChannelShuffle(2)),  # stride
        nn.Sequential(nn.Conv2d(8, 8, 1, groups=2, padding=1), nn.ChannelShuffle(2)),  # padding
        nn.Sequential(nn.Conv2d(8, 8, 1, groups=2, dilation=2), nn.ChannelShuffle(2)),
        nn.Sequential(nn.Conv2d(8, 8, 1, groups=2), nn.ChannelShuffle(3)),           # 8 % 3
    ]
    for seq in cases:
        assert len(fused_modules(igc.convert(seq))) == 0, seq


def test_gather_that_is_not_a_permutation_starts_a_new_chain():
    torch.manual_seed(7)
    seq = nn.Sequential(nn.Conv2d(8, 8, 1, groups=2), nn.ChannelShuffle(2),
                        ChannelGather([0, 0, 1, 2, 3, 3]), nn.Conv2d(6, 4, 1, groups=2))
    conv = check_equivalent(seq, torch.randn(2, 8, 3, 3), FUSED, 2)
    assert conv[2].input_index is not None and list(conv[2].spec.channels) == [6, 4]


@pytest.mark.parametrize("backend", [FUSED, "reference"])
def test_round_trip_models(backend):
    """The unfused blocks of igc_kernels.models convert back to fused ones; unfuse undoes it."""
    if backend == FUSED:
        require_extension()
    torch.manual_seed(8)
    for model, x, n in [
        (IGCV2CifarNet(16, depth=5, group_size=4, fused=False), torch.randn(2, 3, 16, 16), 3),
        (IGCV1Block(12, 12, 3, fused=False), torch.randn(2, 12, 4, 4), 1),
        (IGCV3Block(8, 8, 2, fused=False), torch.randn(2, 8, 4, 4), 2),
        (CondenseLayer(10, 8, 2, [0, 1, 1, 4, 9, 9], fused=False), torch.randn(2, 10, 4, 4), 1),
    ]:
        conv = check_equivalent(model, x, backend, n)
        back = igc.unfuse(conv)
        assert len(fused_modules(back)) == 0
        with torch.no_grad():
            assert_close64(back(x.double()), conv(x.double()), "unfuse round trip")


def test_from_modules_and_unfuse_share_parameters():
    torch.manual_seed(9)
    seq = seq_chain().double()
    m = InterleavedGroupConv.from_modules(list(seq), backend="reference")
    plain = m.unfuse()
    convs = [c for c in plain if isinstance(c, nn.Conv2d)]
    assert [c.weight for c in convs] == list(m.weights)
    assert isinstance(plain[1], nn.ChannelShuffle) and plain[1].groups == 4
    x = torch.randn(2, 16, 3, 3, dtype=torch.float64)
    assert_close64(plain(x), seq(x), "unfused")
    assert_close64(m(x), seq(x), "fused")
    # unbatched input, as nn.Conv2d accepts: the modules' own semantics (on a 3-D tensor
    # nn.ChannelShuffle shuffles dim 1, the height), errors included
    xu = torch.randn(16, 32, 3, dtype=torch.float64)
    assert_close64(m(xu), seq(xu), "unbatched")
    with pytest.raises(RuntimeError, match="divisible by groups"):
        seq(x[0])
    with pytest.raises(RuntimeError, match="divisible by groups"):
        m(x[0])


def test_from_modules_errors_name_the_module():
    with pytest.raises(ValueError, match=r"modules\[1\]: stride \(2, 2\) is not 1"):
        InterleavedGroupConv.from_modules([nn.Conv2d(8, 8, 1, groups=2),
                                           nn.Conv2d(8, 8, 1, stride=2)])
    with pytest.raises(TypeError, match=r"modules\[1\]: ReLU is not part of a fusable chain"):
        InterleavedGroupConv.from_modules([nn.Conv2d(8, 8, 1), nn.ReLU()])
    with pytest.raises(ValueError, match=r"modules\[1\]: in_channels 6 does not match the 8"):
        InterleavedGroupConv.from_modules([nn.Conv2d(8, 8, 1), nn.Conv2d(6, 8, 1)])
    with pytest.raises(ValueError, match=r"modules\[1\]: 8 channels are not divisible by "
                                         r"shuffle groups 3"):
        InterleavedGroupConv.from_modules([nn.Conv2d(8, 8, 1), nn.ChannelShuffle(3)])
    with pytest.raises(ValueError, match=r"modules\[1\]: the gather after a convolution must "
                                         r"be a permutation of its 8 channels"):
        InterleavedGroupConv.from_modules([nn.Conv2d(8, 8, 1), ChannelGather([0, 0, 1])])
    with pytest.raises(ValueError, match="no 1x1 convolution"):
        InterleavedGroupConv.from_modules([nn.ChannelShuffle(2)])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        igc.convert(lambda x: x)


def test_input_index_module_option():
    require_extension()
    idx = torch.tensor([2, 2, 0, 5, 1, 3])
    spec = igc.ChainSpec([6, 4], [2], [None])
    m = InterleavedGroupConv(spec, input_index=idx, backend=FUSED).double()
    assert "input_index" in m.state_dict() and m.input_index.dtype == torch.int64
    x = torch.randn(2, 7, 3, 3, dtype=torch.float64)  # any channel count > max entry
    ref = F.conv2d(x[:, idx], m.weights[0], groups=2)
    assert_close64(m(x), ref, "input index")
    with pytest.raises(ValueError, match="input_index has length 5, but the chain's first width"):
        InterleavedGroupConv(spec, input_index=idx[:5])
