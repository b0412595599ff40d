"""``igc_kernels.optimize_for_inference``: eval-mode BatchNorms folded into the convolution or
fused chain in front of them (through channel shuffles), outputs equal to the original eval
model's, the original untouched.

Tolerances: in float64 the fold changes each output by a few roundings of the folded
products (observed ~1e-17 relative); 1e-10 relative to the output's magnitude is far below any
wrong fold (a missed or misplaced channel changes outputs at order 1) and far above rounding.
In float32 the fold reorders a product per layer, so the bound is the depth times float32's
unit roundoff times the magnitude, with a safety factor of 4 (the shared rounding rule of
``igc_test_utils``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import igc_kernels as igc
from igc_kernels.models import networks as Nw
from igc_test_utils import shufflenet_style_net, unit_roundoff


def _calibrated(model, shape, dtype=torch.float64, seed=0):
    """``model`` in ``dtype`` with BatchNorm running statistics from a few synthetic batches
    (and non-trivial affine parameters), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    model = model.to(dtype)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen, dtype=dtype))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=dtype) * 0.1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(*shape, generator=gen, dtype=dtype))
    return model.eval()


def _count_bn(model) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _assert_same_function(a, b, x, rel):
    with torch.no_grad():
        ya, yb = a(x), b(x)
    scale = ya.abs().max().item()
    assert scale > 0
    err = (ya - yb).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel:.1e} x {scale:.3e}"


def _mobilenet_v2_style():
    """Inverted residual blocks built by hand: 1x1 expand (dense) -> BN -> ReLU6 -> depth-wise
    3x3 (stride 1 and 2) -> BN -> ReLU6 -> 1x1 project -> BN, residual when shapes match."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            hid = cin * 4
            self.expand = nn.Conv2d(cin, hid, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(hid)
            self.dw = nn.Conv2d(hid, hid, 3, stride=stride, padding=1, groups=hid, bias=False)
            self.bn2 = nn.BatchNorm2d(hid)
            self.project = nn.Conv2d(hid, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
            self.res = stride == 1 and cin == cout

        def forward(self, x):
            h = torch.clamp(self.bn1(self.expand(x)), 0, 6)
            h = nn.functional.relu6(self.bn2(self.dw(h)))
            h = self.bn3(self.project(h))
            return x + h if self.res else h

    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.ReLU6(), Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))


NETS = {
    "igcv2_fused": (lambda: Nw.IGCV2CifarNet(width=32, depth=8, fused=True), (2, 3, 16, 16)),
    "igcv2_unfused": (lambda: Nw.IGCV2CifarNet(width=32, depth=8, fused=False), (2, 3, 16, 16)),
    "igcv3_fused": (lambda: Nw.IGCV3Net(num_classes=10, width_mult=0.35, fused=True),
                    (2, 3, 32, 32)),
    "igcv3_unfused": (lambda: Nw.IGCV3Net(num_classes=10, width_mult=0.35, fused=False),
                      (2, 3, 32, 32)),
    "igcv3_converted": (lambda: igc.convert(Nw.IGCV3Net(num_classes=10, width_mult=0.35,
                                                        fused=False)), (2, 3, 32, 32)),
    "shufflenet_style": (lambda: shufflenet_style_net(), (2, 3, 12, 12)),
    "shufflenet_style_converted": (lambda: igc.convert(shufflenet_style_net()), (2, 3, 12, 12)),
    "mobilenet_v2_style": (_mobilenet_v2_style, (2, 3, 16, 16)),
}


@pytest.mark.parametrize("name", list(NETS))
def test_every_batchnorm_folded_and_the_function_kept(name):
    make, shape = NETS[name]
    torch.manual_seed(0)
    model = _calibrated(make(), shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = igc.optimize_for_inference(model)
    assert _count_bn(model) > 0 and _count_bn(opt) == 0
    assert not opt.training
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _assert_same_function(model, opt, x, 1e-10)
    # the original is untouched and shares no parameter with the result
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k])
                                                 for k in before)
    ids = {id(p) for p in model.parameters()}
    assert not any(id(p) in ids for p in opt.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in opt.parameters())


@pytest.mark.parametrize("name", ["igcv3_fused", "shufflenet_style_converted"])
def test_float32_within_rounding(name):
    make, shape = NETS[name]
    torch.manual_seed(0)
    model = _calibrated(make(), shape, dtype=torch.float32)
    opt = igc.optimize_for_inference(model)
    depth = sum(isinstance(m, (nn.Conv2d, igc.InterleavedGroupConv, nn.Linear))
                for m in model.modules())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    _assert_same_function(model, opt, x, 4 * depth * unit_roundoff(torch.float32))


def _chain_then_bn(perm_last, bias, input_index=None):
    C = 12
    spec = igc.ChainSpec([12, 12, C], [3, 4], ["interleave", perm_last])
    chain = igc.InterleavedGroupConv(spec, bias=bias, input_index=input_index)
    return nn.Sequential(chain, nn.BatchNorm2d(C), nn.ReLU())


@pytest.mark.parametrize("last", ["interleave", "explicit", None])
@pytest.mark.parametrize("bias", [False, [True, True]], ids=["no_bias", "bias"])
def test_fold_into_a_chain_through_its_last_permutation(last, bias):
    """The chain's last layer takes the BatchNorm through its last permutation (a shuffle with
    that layer's groups, an explicit index, none), with or without a bias of its own, with an
    input index in front."""
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3)) if last == "explicit" \
        else last
    idx = torch.tensor([0, 4, 4, 7, 1, 2, 9, 9, 3, 5, 6, 8])
    model = _calibrated(_chain_then_bn(perm, bias, idx), (2, 10, 3, 3))
    opt = igc.optimize_for_inference(model)
    assert _count_bn(opt) == 0
    # the chain, its folded BatchNorm and the ReLU are one block; its last layer has a bias
    (block,) = [m for m in opt.modules() if isinstance(m, igc.FusedBlock)]
    assert block.num_layers == 2 and block.activations == [None, "relu"]
    assert block.bias_1 is not None
    x = torch.randn(2, 10, 3, 3, dtype=torch.float64)
    _assert_same_function(model, opt, x, 1e-10)


def test_what_is_not_folded():
    """A BatchNorm without running statistics (it normalises with the batch even in eval
    mode), one whose producer has another consumer, and one after a non-permutation op stay;
    the function is kept."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.bn_batch = nn.BatchNorm2d(4, track_running_stats=False)
            self.b = nn.Conv2d(4, 4, 1)
            self.bn_shared = nn.BatchNorm2d(4)
            self.c = nn.Conv2d(4, 4, 1)
            self.bn_after_relu = nn.BatchNorm2d(4)
            self.d = nn.Conv2d(4, 4, 1)
            self.bn_ok = nn.BatchNorm2d(4)

        def forward(self, x):
            x = self.bn_batch(self.a(x))
            h = self.b(x)
            x = self.bn_shared(h) + h
            x = self.bn_after_relu(torch.relu(self.c(x)))
            return self.bn_ok(self.d(x))

    model = _calibrated(Net(), (3, 4, 2, 2))
    opt = igc.optimize_for_inference(model)
    left = {n for n, m in opt.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert left == {"bn_batch", "bn_shared", "bn_after_relu"}
    _assert_same_function(model, opt, torch.randn(3, 4, 2, 2, dtype=torch.float64), 1e-10)


def test_untraceable_module_keeps_its_children_folded():
    """A module whose forward cannot be traced (data-dependent branch) is kept; its children
    are folded one by one."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return self.body(x)
            return -self.body(x)

    model = _calibrated(Branchy(), (2, 4, 3, 3))
    opt = igc.optimize_for_inference(model)
    assert type(opt) is Branchy and _count_bn(opt) == 0
    for sign in (1, -1):
        x = sign * torch.rand(2, 4, 3, 3, dtype=torch.float64)
        _assert_same_function(model, opt, x, 1e-10)


def test_training_model_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"call model.eval\(\) first"):
        igc.optimize_for_inference(model)
    with pytest.raises(TypeError, match="expects an nn.Module"):
        igc.optimize_for_inference(lambda x: x)


# --- blocks fused into one call --------------------------------------------------------------


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, igc.FusedBlock)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_igcv3_blocks_become_one_call_each(fused):
    """Every IGCV3 block (expand chain + shuffle, depth-wise 3x3 + ReLU6, reduce chain, residual
    add) is one FusedBlock with one spatial layer; no activation, depth-wise convolution or
    residual add is left outside the blocks."""
    torch.manual_seed(0)
    model = _calibrated(Nw.IGCV3Net(num_classes=10, width_mult=0.35, fused=fused), (2, 3, 32, 32))
    opt = igc.optimize_for_inference(model)
    blocks = _blocks(opt)
    n_res = sum(b.residual for b in model.blocks)
    assert sum(b.residual for b in blocks) == n_res > 0
    for b in blocks:
        ks = [getattr(b, f"weight_{l}").dim() for l in range(b.num_layers)]
        assert ks.count(4) <= 1
    left = [n for n, m in opt.named_modules()
            if isinstance(m, (nn.ReLU6, igc.InterleavedGroupConv, nn.ChannelShuffle))
            or (isinstance(m, nn.Conv2d) and m.groups > 1)]
    assert left == ["stem.2"]  # the ReLU6 after the dense stem convolution (not fused)
    add_nodes = [n for n in opt.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert not add_nodes
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _assert_same_function(model, opt, x, 1e-10)
    _assert_same_function(model, opt, x.to(memory_format=torch.channels_last), 1e-10)


def test_igcv2_block_is_one_call():
    """Channel-wise 3x3 -> chain -> (folded BN) -> ReLU: one block per IGCV2 block, the cut
    between two blocks right before the next depth-wise convolution."""
    torch.manual_seed(0)
    model = _calibrated(Nw.IGCV2CifarNet(width=32, depth=8), (2, 3, 16, 16))
    opt = igc.optimize_for_inference(model)
    blocks = _blocks(opt)
    assert len(blocks) == len(model.blocks)  # the dense stem convolution is not fused
    for b in blocks:
        assert b.weight_0.dim() == 4 and b.activations[-1] == "relu"
        assert all(getattr(b, f"weight_{l}").dim() == 2 for l in range(1, b.num_layers))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    _assert_same_function(model, opt, x, 1e-10)


def test_optimized_model_runs_without_no_grad():
    """The blocks hold buffers and the other parameters do not require grad, so a plain eval
    call (grad mode on) runs; an input that requires grad through a spatial layer is refused
    with the layer named."""
    model = _calibrated(Nw.IGCV3Net(num_classes=10, width_mult=0.35), (2, 3, 32, 32),
                        dtype=torch.float32)
    opt = igc.optimize_for_inference(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    y = opt(x)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(ValueError, match=r"layer \d+ is a 3x3 spatial layer"):
        torch.func.jvp(opt, (x,), (torch.randn_like(x),))  # forward mode: refused too
    with pytest.raises(ValueError, match=r"layer \d+ is a 3x3 spatial layer"):
        opt(x.requires_grad_())


def test_what_is_not_fused():
    """A dense 3x3 convolution (more than 8 inputs per group), a dilated one, an activation whose
    input has another consumer, a module with a hook and two activations in a row keep their
    modules; the function is kept."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Conv2d(16, 16, 3, padding=1)
            self.dil = nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16)
            self.pw = nn.Conv2d(16, 16, 1)
            self.hooked = nn.ReLU()
            self.hooked.register_forward_hook(lambda m, i, o: None)
            self.pw2 = nn.Conv2d(16, 16, 1, groups=4)

        def forward(self, x):
            h = torch.relu(self.dense(x))
            h = torch.relu(self.dil(h))
            p = self.pw(h)
            h = torch.relu(p) + p
            h = self.hooked(self.pw2(h))
            return h

    model = Net().double().eval()
    opt = igc.optimize_for_inference(model)
    names = {n for n, m in opt.named_modules()}
    assert {"dense", "dil", "pw", "hooked", "pw2"} <= names
    _assert_same_function(model, opt, torch.randn(2, 16, 6, 6, dtype=torch.float64), 1e-10)


def test_two_activations_and_clamp():
    """clamp(0, 6) is read as ReLU6; a second activation on the same layer ends the block."""
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Hardtanh(0.0, 6.0),
                          nn.ReLU(), nn.Conv2d(8, 16, 1, groups=2), nn.Hardswish()).double()
    opt = igc.optimize_for_inference(model.eval())
    blocks = _blocks(opt)
    assert [b.activations for b in blocks] == [["relu6"], ["hardswish"]]
    _assert_same_function(model, opt, torch.randn(2, 8, 5, 5, dtype=torch.float64), 1e-10)


def test_fused_block_direct_call_equals_the_functional_path():
    """A FusedBlock sends an ordinary CPU tensor straight to the block op (which validates its
    arguments itself); other inputs (a use_backend scope, an input requiring grad) take the
    functional path. Both give the same values."""
    torch.manual_seed(0)
    model = _calibrated(Nw.IGCV3Net(num_classes=10, width_mult=0.35), (2, 3, 32, 32),
                        dtype=torch.float32)
    opt = igc.optimize_for_inference(model)
    block = next(b for b in _blocks(opt) if b.residual)
    x = torch.randn(2, block.weight_0.shape[1] * block.groups[0], 8, 8)
    assert block._direct_args(x) is not None
    with torch.no_grad():
        direct = block(x)
        with igc.use_backend("reference"):
            assert block._direct_args(x) is None
            ref = block(x)
    assert block._direct_args(x.double()) is None  # dtype mismatch: the functional path's error
    torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-5)
    # a bad input still gets the operator's own error through the direct path
    with pytest.raises(RuntimeError, match="igc::block_forward"):
        block(torch.randn(2, 3, 8, 8))


def test_fused_block_direct_call_is_seen_by_modes_and_profiler():
    """The direct call skips the dispatcher: under a torch dispatch mode the block takes the op
    (the mode sees igc::block_forward), and a profile of a direct call still names the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    model = _calibrated(Nw.IGCV3Net(num_classes=10, width_mult=0.35), (2, 3, 32, 32),
                        dtype=torch.float32)
    block = next(b for b in _blocks(igc.optimize_for_inference(model)) if b.residual)
    x = torch.randn(1, block.weight_0.shape[1] * block.groups[0], 7, 7)

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad():
        direct = block(x)
        with Record():
            assert block._direct_args(x) is None
            moded = block(x)
        with torch.profiler.profile() as prof:
            block(x)
    assert any("igc.block_forward" in s for s in seen), seen
    assert torch.equal(direct, moded)
    assert any(e.name == "igc::block_forward" for e in prof.events())


def test_direct_block_entry_checks_its_argument_types():
    ext = igc._loader.ext()
    x = torch.randn(1, 8, 4, 4)
    w = torch.randn(8, 4)
    good = (x, [w], [], [2], [0], [None], [1], [0], False, None)
    assert ext.cpu_block_forward(*good).shape == (1, 8, 4, 4)
    with pytest.raises(TypeError, match="x must be a tensor"):
        ext.cpu_block_forward(None, *good[1:])
    with pytest.raises(TypeError, match="weights must be a tensor"):
        ext.cpu_block_forward(x, [None], *good[2:])
    with pytest.raises(TypeError, match="groups must be a sequence"):
        ext.cpu_block_forward(x, [w], [], 2, *good[4:])
    with pytest.raises(TypeError):
        ext.cpu_block_forward(x, [w], [], ["a"], *good[4:])
    with pytest.raises(RuntimeError, match="igc::block_forward"):  # the kernel's own checks
        ext.cpu_block_forward(x, [w], [], [3], *good[4:])


def test_fused_block_direct_arguments_follow_buffer_changes():
    """The direct call's arguments are built once per set of buffers: in-place changes, replaced
    buffers, dtype conversions and copies give the functional path's values."""
    import copy

    torch.manual_seed(0)
    model = _calibrated(Nw.IGCV3Net(num_classes=10, width_mult=0.35), (2, 3, 32, 32),
                        dtype=torch.float32)
    block = next(b for b in _blocks(igc.optimize_for_inference(model)) if b.residual)
    x = torch.randn(1, block.weight_0.shape[1] * block.groups[0], 6, 6)

    def check(b, x):
        assert b._direct_args(x) is not None
        with torch.no_grad():
            direct = b(x)
            with igc.use_backend("reference"):
                ref = b(x)
        torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-5)
        return direct

    y0 = check(block, x)
    with torch.no_grad():
        block.weight_0.mul_(2.0)
    assert not torch.equal(check(block, x), y0)
    block.weight_2 = block.weight_2 * 0.5  # a replaced buffer
    check(block, x)
    twin = copy.deepcopy(block)
    with torch.no_grad():
        twin.weight_0.zero_()
    assert not torch.equal(check(twin, x), check(block, x))
    block.double()
    check(block, x.double())
