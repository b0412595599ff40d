"""Static GPU facts of the Triton kernels without a GPU (tools/gpu_static.py): every kernel the
launcher would launch for a representative subset compiles for sm_90 (the whole pipeline,
ptxas included) and fits a block's shared memory; the default forward configuration does not
spill. (The backward spills today at every configuration the autotuner offers for 256-channel
chains; the report records it, docs/backends.md quotes it, and it is the next kernel issue's
input: this test pins the facts that hold, and that the backward compiles.)

Runs the tool in a subprocess with ``TRITON_INTERPRET`` unset (the suite sets it for the
interpreter tests), in the slow step of ``make test``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = "igcv2(256,8);igcv3-expand(64,6,2);igcv3-reduce(64,6,2)"
MAX_SHARED_SM90 = 232448  # opt-in shared memory per block on sm_90


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_static.py"),
                        "--structures", SUBSET, "--dtypes", "float32,bfloat16",
                        "--layouts", "nchw,channels_last", "--archs", "90", "--json", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(out.read_text())["rows"]


def test_every_launched_kernel_compiles_for_sm90_and_fits(report):
    assert len(report) == 3 * 2 * 2 * 3  # structures x dtypes x layouts x (fwd, bwd, reduce)
    for r in report:
        what = f"{r['structure']} {r['dtype']} {r['layout']} {r['direction']} {r['kernel']}"
        assert r["compiled"], f"{what}: {r['error']}"
        assert 0 < r["registers"] <= 255, what
        assert r["shared_bytes"] <= MAX_SHARED_SM90, what
        assert r["ctas_per_sm"] >= 1, what
        assert sum(r["sass"].values()) > 0, what


def test_default_forward_configuration_does_not_spill(report):
    fwd = [r for r in report if r["direction"] == "forward"]
    assert fwd
    for r in fwd:
        assert r["spill_bytes"] == 0, (f"{r['structure']} {r['dtype']} {r['layout']}: "
                                       f"{r['spill_bytes']} bytes spilled, {r['registers']} regs")
        assert r["sass"]["FFMA/HFMA"] + r["sass"]["HMMA/MMA"] > 0


def test_autotuner_pruning_drops_every_spilling_configuration():
    """The autotuner's pruning run on real sm_90 compiles (tools/gpu_static.py --pruning: the
    spills come from the cubins, the pruning is the package's own ``_prune``): what is kept
    does not spill, what spills is dropped, and IGCV2(256, 8)'s forward has both kinds (BLOCK_P
    >= 32 spills in float32), so the rule is exercised."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_static.py"), "--pruning",
                        "--structures", "igcv2(256,8)", "--dtypes", "float32", "--layouts",
                        "nchw", "--directions", "forward", "--archs", "90"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    (line,) = [json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")]
    configs = line["configs"]
    assert len(configs) >= 4
    kept = [(c, s) for c, s, k in configs if k]
    dropped = [(c, s) for c, s, k in configs if not k]
    assert kept and all(s == 0 for _, s in kept), configs
    assert dropped and all(s is None or s > 0 for _, s in dropped), configs
    assert {"BLOCK_P": 16, "num_warps": 4} in [c for c, _ in kept]
