"""The benchmark entry point (benchmarks/bench.py) runs end to end on the CPU (one tiny problem),
checks correctness before timing and writes a JSON record with every field a run reports; the
GPU job's pieces that run without a GPU (its case table, the backward-alone step) are checked
here too (the CUDA timer and memory probe need a GPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import bench as mod

    return mod


def test_bench_smoke_on_cpu(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = bench.main(["--tiny", "--quick", "--compile-layouts", "none", "--backends", "cpu",
                     "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["correctness_failures"] == []
    rows = [r for r in rec["rows"] if r["metric"] == "time"]
    labels = {(r["label"], r["mode"]) for r in rows}
    for lbl in ("fused[cpu] nchw", "fused[cpu] channels_last", "chain nchw oneDNN",
                "chain channels_last no-oneDNN", "dense nchw oneDNN"):
        assert (lbl, "fwd") in labels and (lbl, "fwd+bwd") in labels
    for r in rows:
        if r["kind"] != "fused":
            continue
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["speedup_vs_chain"] > 0 and r["speedup_vs_dense"] > 0
        assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / r["copy_gbps"])
        for key in ("torch", "git_commit", "device", "dtype", "layout", "shape", "command"):
            assert key in r
    assert any(r["metric"] == "memory" for r in rec["rows"])
    assert "### float32" in capsys.readouterr().out
    png = out.with_suffix(".png")  # the plot beside the JSON
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_of_every_committed_result_and_the_progress_bar(tmp_path, monkeypatch):
    """benchmarks/plot.py draws each kind of committed JSON (micro-benchmark, end-to-end,
    per-call cost); the progress bar is off when quiet or when stderr is not a terminal."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (make deps)")
    monkeypatch.syspath_prepend(BENCH)
    import plot

    results = os.path.join(BENCH, "results")
    kinds = set()
    for name in ("cpu-amd-epyc-zen5-2threads.json", "e2e-cpu-amd-epyc-zen5-2threads.json",
                 "call-overhead-cpu-amd-epyc-zen5-1thread.json"):
        with open(os.path.join(results, name)) as f:
            kinds.add(plot._kind(json.load(f)))
        png = plot.plot(os.path.join(results, name), str(tmp_path / (name + ".png")))
        assert open(png, "rb").read()[:4] == b"\x89PNG"
    assert kinds == {"micro", "e2e", "call_overhead"}
    items = [1, 2, 3]
    assert plot.bar(items, quiet=True) is items
    assert plot.bar(items, quiet=False) is items  # stderr is not a terminal under pytest


def test_gpu_case_table_and_backward_step(bench):
    """The GPU job's case table (no oneDNN variants, compiled chain in channels_last) and its
    backward-alone step, whose gradients equal those of the training step."""
    import bench_common as bc

    cases = bc.default_cases(["cpu"], device="cuda", compile_layouts=["channels_last"])
    labels = [c.label for c in cases]
    assert labels == ["fused[cpu] nchw", "fused[cpu] channels_last", "chain nchw",
                      "chain channels_last", "dense nchw", "dense channels_last",
                      "compiled channels_last", "copy"]
    p = bc.problem_on(bc.TINY, "cpu")
    for case in cases[:3]:
        grads = bc.build_step(case, p, "bwd")()
        _, ref = bc.build_step(case, p, "fwd+bwd")()
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r)
    assert p.io_bytes("bwd") == 2 * p.act_bytes(32) + p.act_bytes(32)


def test_blocks_script_smoke(tmp_path, monkeypatch):
    """benchmarks/blocks.py on IGCV3Net with width multiplier 0.25 at batch 1: one row per
    distinct block, the three tile settings timed, their results equal within rounding, the
    totals weighted by the call counts, and the environment variable restored."""
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.delenv("IGC_CPU_BLOCK_TILES", raising=False)
    import blocks

    out = tmp_path / "b.json"
    rec = blocks.main(["--model", "igcv3_imagenet", "--width-mult", "0.25", "--threads", "1",
                       "--rounds", "1", "--calls", "1", "--json", str(out)])
    assert json.loads(out.read_text())["totals_us"] == rec["totals_us"]
    rows = rec["rows"]
    assert len(rows) >= 5 and sum(r["calls"] for r in rows) > len(rows)
    for r in rows:
        for v in blocks.VARIANTS:
            assert r[f"{v}_us"] > 0
        assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["output_scale"])
    for v in blocks.VARIANTS:
        assert rec["totals_us"][v] == pytest.approx(sum(r[f"{v}_us"] * r["calls"] for r in rows))
    assert "IGC_CPU_BLOCK_TILES" not in os.environ


def test_only_picks_the_gpu_problems(bench):
    """``--only C:K[:L],...`` replaces the GPU targets by these problems, in every ``--dtypes``
    (bfloat16 by default), at the GPU job's shape; a malformed or impossible problem is refused
    by name."""
    args = bench.parse_args(["--device", "cuda", "--only", "256:8:3,512:16"])
    cfgs = bench.configs_from_args(args)
    assert [(c.channels, c.group_size, c.depth, c.dtype) for c in cfgs] == [
        (256, 8, 3, "bfloat16"), (512, 16, None, "bfloat16")]
    assert all(c.shape == (64, c.channels, 56, 56) for c in cfgs)
    assert cfgs[1].spec().num_layers == 3  # the IGCV2 depth: 16^2 < 512
    args = bench.parse_args(["--device", "cuda", "--only", "1024:32", "--dtypes",
                             "float32,bfloat16", "--batch", "8", "--size", "28x28"])
    assert [(c.dtype, c.shape) for c in bench.configs_from_args(args)] == [
        ("float32", (8, 1024, 28, 28)), ("bfloat16", (8, 1024, 28, 28))]
    for bad, words in (("256:8:3:1", "C:K:L or C:K"), ("256:x", "C:K:L or C:K"),
                       ("256:7", "256:7")):
        with pytest.raises(SystemExit, match=words):
            bench.parse_only(bad)
    with pytest.raises(SystemExit):  # argparse's error: not silently ignored on the CPU
        bench.parse_args(["--only", "256:8"])
