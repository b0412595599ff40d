"""The GPU benchmark script runs end to end (here on the CPU, one tiny problem), checks
correctness before timing and writes a JSON record with every field a GPU run reports."""

from __future__ import annotations

import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench_gpu(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import bench_gpu as mod

    return mod


def test_bench_gpu_smoke_on_cpu(bench_gpu, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = bench_gpu.main(["--device", "cpu", "--tiny", "--quick", "--no-compile",
                         "--backends", "cpu", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["correctness_failures"] == []
    rows = rec["rows"]
    labels = {(r["label"], r["mode"]) for r in rows}
    for lbl in ("fused[cpu] nchw", "fused[cpu] channels_last", "chain nchw",
                "chain channels_last", "dense nchw", "dense channels_last"):
        assert (lbl, "fwd") in labels and (lbl, "bwd") in labels
    fused = [r for r in rows if r["kind"] == "fused"]
    for r in fused:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["vs_chain"] is not None and r["vs_dense"] is not None
        assert r["frac_copy"] == pytest.approx(r["gbps"] / r["copy_gbps"])
        for key in ("torch", "git_commit", "device", "dtype", "layout", "shape", "command"):
            assert key in r
    assert "### float32" in capsys.readouterr().out


def test_bench_main_delegates_device_flag(bench_gpu, tmp_path, monkeypatch):
    import bench

    out = tmp_path / "r.json"
    assert bench.main(["--device", "cpu", "--tiny", "--quick", "--no-compile", "--no-memory",
                       "--backends", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"]
