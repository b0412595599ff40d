"""Module lifecycle: deferred initialisation (meta construction, ``to_empty``,
``reset_parameters``, FSDP2 ``fully_shard``) for every module and network, the reference
backend on meta tensors, and ``use_backend`` scopes that belong to one thread / asyncio task.
"""

from __future__ import annotations

import asyncio
import datetime
import threading

import pytest
import torch
from torch import nn

import igc_kernels as igc
from igc_kernels import backends as backends_mod
from igc_kernels import models as M
from igc_kernels.modules import ChannelGather, InterleavedGroupConv
from igc_test_utils import free_port

# name: builder (called with the same seed inside and outside a meta device scope)
BUILDERS = {
    "IGCV1Block": lambda fused: M.IGCV1Block(16, 16, 4, fused=fused),
    "IGCV2Block": lambda fused: M.IGCV2Block(8, 16, 4, fused=fused),
    "IGCV3Block": lambda fused: M.IGCV3Block(16, 16, 6, fused=fused),
    "CondenseLayer": lambda fused: M.CondenseLayer(12, 8, 2, [0, 3, 3, 7, 11, 2, 5, 5],
                                                    fused=fused),
    "IGCV2CifarNet": lambda fused: M.IGCV2CifarNet(8, depth=5, group_size=4, fused=fused),
    "IGCV3Net": lambda fused: M.IGCV3Net(num_classes=10, width_mult=0.25, fused=fused),
    "InterleavedGroupConv(input_index, perms)": lambda fused: _igc(fused),
    "from_modules": lambda fused: _from_modules(fused),
}
IN_SHAPE = {"IGCV1Block": (2, 16, 5, 5), "IGCV2Block": (2, 8, 5, 5), "IGCV3Block": (2, 16, 5, 5),
            "CondenseLayer": (2, 12, 5, 5), "IGCV2CifarNet": (2, 3, 16, 16),
            "IGCV3Net": (1, 3, 64, 64), "InterleavedGroupConv(input_index, perms)": (2, 10, 3, 2),
            "from_modules": (2, 8, 3, 3)}


def _igc(fused):
    spec = igc.ChainSpec([8, 8, 6], [2, 2], [[3, 1, 0, 2, 5, 4, 7, 6], [5, 4, 3, 2, 1, 0]])
    m = InterleavedGroupConv(spec, bias=[True, False], input_index=[9, 0, 0, 4, 7, 1, 2, 3])
    return m if fused else m.unfuse()


def _from_modules(fused):
    mods = [ChannelGather([1, 0, 3, 2, 5, 4, 7, 6]), nn.Conv2d(8, 8, 1, groups=2),
            nn.ChannelShuffle(2), ChannelGather([7, 6, 5, 4, 3, 2, 1, 0]),
            nn.Conv2d(8, 8, 1, groups=4)]
    m = InterleavedGroupConv.from_modules(mods)
    return m if fused else m.unfuse()


def _index_buffers(model) -> dict:
    return {n: b for n, b in model.named_buffers() if not b.is_floating_point()
            and "num_batches_tracked" not in n}


def _reset_all(model):
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name", BUILDERS.keys())
def test_meta_construction_to_empty_reset(name, fused):
    """Built on the meta device, given memory with to_empty and re-initialised with
    reset_parameters: every index buffer holds the values of a normally built twin (before,
    construction failed on .item() of meta tensors, or the buffers stayed uninitialised memory),
    and with the twin's parameters the outputs are equal."""
    torch.manual_seed(0)
    ref = BUILDERS[name](fused)
    with torch.device("meta"):
        m = BUILDERS[name](fused)
    assert all(t.device.type == "meta" for t in m.state_dict().values())
    m.to_empty(device="cpu")
    _reset_all(m)
    ref_idx, m_idx = _index_buffers(ref), _index_buffers(m)
    assert m_idx.keys() == ref_idx.keys()
    for k in ref_idx:
        assert torch.equal(m_idx[k], ref_idx[k]), f"{k} was not restored"
    m.load_state_dict(ref.state_dict())
    ref.eval()
    m.eval()
    x = torch.randn(IN_SHAPE[name])
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_index_built_from_a_meta_tensor_cannot_be_reset_silently():
    with torch.device("meta"):
        g = ChannelGather(torch.tensor([1, 0, 2]))  # created on the meta device: no values
    g.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match=r"ChannelGather.index was built from a meta tensor"):
        g.reset_parameters()
    g.load_state_dict({"index": torch.tensor([2, 1, 0])})  # loaded values become the reset ones
    g.index.fill_(7)
    g.reset_parameters()
    assert g.index.tolist() == [2, 1, 0]


def test_chainspec_and_from_modules_accept_meta_indices():
    with torch.device("meta"):
        spec = igc.ChainSpec([4, 4], [2], [torch.tensor([1, 0, 3, 2])])
    assert spec.permutations[0].device.type == "meta"
    with pytest.raises(ValueError, match="layer 1: the permutation is a meta tensor"):
        spec.dense_matrix([torch.randn(4, 2)])


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_reference_backend_on_meta_tensors(backend):
    """Shape propagation on the meta device, with explicit permutations and an input index
    (no values read)."""
    with torch.device("meta"):
        x = torch.randn(2, 10, 4, 4).to(memory_format=torch.channels_last)
        ws = [torch.randn(8, 4), torch.randn(6, 4)]
        perm = torch.tensor([3, 1, 0, 2, 5, 4, 7, 6])
        idx = torch.tensor([9, 0, 0, 4, 7, 1, 2, 3])
    y = igc.interleaved_group_conv(x, ws, [2, 2], [perm, None], input_index=idx,
                                   backend=backend)
    assert y.device.type == "meta" and y.shape == (2, 6, 4, 4)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_fsdp2_deferred_init_one_process():
    """The deferred-init recipe with FSDP2 (gloo, one process): meta construction, fully_shard
    per block and at the root, to_empty, reset_parameters; the loss and the gradients equal an
    unfused twin's. (tests/test_fsdp2.py trains with two processes.)"""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        ref = M.IGCV2CifarNet(8, depth=5, group_size=4, fused=False).double()
        with torch.device("meta"):
            m = M.IGCV2CifarNet(8, depth=5, group_size=4, fused=True).double()
        for blk in m.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(m, mesh=mesh)
        m.to_empty(device="cpu")
        _reset_all(m)
        pairs = M.parameter_pairs(m, ref)
        assert len(pairs) == len(list(ref.parameters()))
        with torch.no_grad():
            for _, p, q in pairs:
                p.to_local().copy_(q.reshape(p.shape))  # one shard of one: the whole tensor
        x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
        loss, ref_loss = m(x).square().mean(), ref(x).square().mean()
        loss.backward()
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
        for n, p, q in pairs:
            torch.testing.assert_close(p.grad.full_tensor(), q.grad.reshape(p.shape),
                                       rtol=1e-10, atol=1e-12, msg=n)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# use_backend scopes
# ---------------------------------------------------------------------------------------------
def test_use_backend_is_per_thread():
    """Two threads in different, nested scopes at the same time each see their own (before, a
    process-global stack: one thread's scope changed what "auto" meant in the other, and
    interleaved exits corrupted the stack)."""
    barrier = threading.Barrier(2, timeout=30)
    seen, errors = {}, []

    def worker(tag, outer, inner):
        try:
            with igc.use_backend(outer):
                barrier.wait()
                seen[tag, 1] = backends_mod._default_backend()
                with igc.use_backend(inner):
                    barrier.wait()
                    seen[tag, 2] = backends_mod._default_backend()
                    barrier.wait()
                barrier.wait()
                seen[tag, 3] = backends_mod._default_backend()
            seen[tag, 4] = backends_mod._default_backend()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=("a", "reference", "cpu")),
          threading.Thread(target=worker, args=("b", "cpu", "triton"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert [seen["a", i] for i in (1, 2, 3, 4)] == ["reference", "cpu", "reference", "auto"]
    assert [seen["b", i] for i in (1, 2, 3, 4)] == ["cpu", "triton", "cpu", "auto"]
    assert backends_mod._default_backend() == "auto"


def test_use_backend_is_per_asyncio_task():
    async def task(name, ready, go):
        with igc.use_backend(name):
            ready.set()
            await go.wait()
            return backends_mod._default_backend()

    async def main():
        ra, rb, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
        ta = asyncio.create_task(task("reference", ra, go))
        tb = asyncio.create_task(task("cpu", rb, go))
        await ra.wait()
        await rb.wait()
        outside = backends_mod._default_backend()
        go.set()
        return await ta, await tb, outside

    assert asyncio.run(main()) == ("reference", "cpu", "auto")


def test_compiled_code_follows_the_scope(monkeypatch):
    """A compiled function re-specialises when the scope changes (Dynamo guards on the
    thread's scope), so it runs the scoped backend."""
    calls = []
    for name in ("cpu", "reference"):
        be = igc.BACKENDS[name]
        orig = be.run

        def runner(x, chain, _orig=orig, _name=name):
            calls.append(_name)
            return _orig(x, chain)

        monkeypatch.setattr(be, "run", runner)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w: igc.interleaved_group_conv(x, [w], [2]), backend="eager",
                       fullgraph=True)
    x, w = torch.randn(2, 8), torch.randn(8, 4)
    fn(x, w)
    with igc.use_backend("reference"):
        fn(x, w)
    fn(x, w)
    # (Dynamo replays the list appends of the traced code on every call)
    assert calls == ["cpu", "reference", "cpu"], calls
