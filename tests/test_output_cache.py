"""The CPU kernels' output cache (csrc/cpu/output_cache.h): large outputs reuse the buffers of
freed outputs of the same size instead of page-faulting fresh memory; nothing is aliased while
alive; the storages are ordinary resizable CPU storages; IGC_CPU_OUTPUT_CACHE_MB limits it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

import igc_kernels as igc
from igc_kernels import _loader

pytestmark = pytest.mark.skipif(not _loader.ext_loaded(), reason="C++ extension not built")

MIB = 1 << 20


def _ext():
    return _loader.ext()


def _chain_args(n=4, c=64, h=32):  # a 1 MiB float32 output: cached
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, h, generator=g)
    w = [torch.randn(c, 8, generator=g), torch.randn(c, 8, generator=g)]
    return x, w


def test_freed_output_is_reused_and_live_outputs_do_not_alias():
    ext = _ext()
    ext.cpu_output_cache_clear()
    x, w = _chain_args()
    want = igc.reference.interleaved_group_conv(x, w, [8, 8])
    y1 = igc.interleaved_group_conv(x, w, [8, 8], backend="cpu")
    assert ext.cpu_output_cache_bytes() == 0
    p1 = y1.data_ptr()
    del y1
    assert ext.cpu_output_cache_bytes() == 2 * MIB  # 1 MiB rounded up to 2 MiB
    y2 = igc.interleaved_group_conv(x, w, [8, 8], backend="cpu")
    assert y2.data_ptr() == p1 and ext.cpu_output_cache_bytes() == 0
    y3 = igc.interleaved_group_conv(x, w, [8, 8], backend="cpu")
    assert y3.data_ptr() != y2.data_ptr()
    torch.testing.assert_close(y2, want)
    torch.testing.assert_close(y3, want)
    # the block op's outputs too (channels-last kept)
    xc = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        yb = igc.interleaved_group_conv(xc, w, [8, 8], activations=[None, "relu"],
                                        backend="cpu")
    assert yb.movedim(1, -1).is_contiguous()
    torch.testing.assert_close(yb, want.relu())
    ext.cpu_output_cache_clear()
    assert ext.cpu_output_cache_bytes() == 0


def test_small_outputs_bypass_the_cache_and_storages_resize():
    ext = _ext()
    ext.cpu_output_cache_clear()
    x, w = _chain_args(n=1, h=8)  # 16 KiB
    y = igc.interleaved_group_conv(x, w, [8, 8], backend="cpu")
    del y
    assert ext.cpu_output_cache_bytes() == 0
    x, w = _chain_args()
    y = igc.interleaved_group_conv(x, w, [8, 8], backend="cpu")
    assert y.untyped_storage().resizable()
    before = y.clone()
    y.resize_(8, 64, 32, 32)  # a larger storage, allocated through the cache's allocator
    assert torch.equal(y[:4], before)
    ext.cpu_output_cache_clear()


def test_threads_share_the_cache_safely():
    x, w = _chain_args()
    want = igc.reference.interleaved_group_conv(x, w, [8, 8])
    errors = []

    def work():
        try:
            for _ in range(20):
                y = igc.interleaved_group_conv(x, w, [8, 8], backend="cpu")
                if not torch.allclose(y, want, rtol=1e-5, atol=1e-5):
                    errors.append("mismatch")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("value,ok", [("0", True), ("3", True), ("-1", False), ("lots", False)])
def test_limit_from_the_environment(value, ok):
    code = (
        "import torch, igc_kernels as igc\n"
        "from igc_kernels import _loader\n"
        "x = torch.randn(4, 64, 32, 32); w = [torch.randn(64, 8), torch.randn(64, 8)]\n"
        "ys = [igc.interleaved_group_conv(x, w, [8, 8], backend='cpu') for _ in range(3)]\n"
        "del ys\n"
        "print(_loader.ext().cpu_output_cache_bytes())\n")
    env = dict(os.environ, IGC_CPU_OUTPUT_CACHE_MB=value)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    if not ok:
        assert r.returncode != 0 and "IGC_CPU_OUTPUT_CACHE_MB must be a non-negative" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    # three freed 2 MiB buffers; the limit keeps as many as fit
    assert int(r.stdout.strip().splitlines()[-1]) == min(3, int(value) // 2) * 2 * MIB
