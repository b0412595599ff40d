"""igc_kernels.models: every block and network built fused and unfused from the same seed
computes the same function with the same parameters; parameter counts against independent
formulas (and the authors' published count where there is one); the e2e benchmark's smoke run.

Tolerance: float64 everywhere. Both sides compute the same sums in a different order, each
within ``k u`` of the exact value relative to the magnitude of the terms, ``k`` the longest
chain of roundings (fan-ins along the depth, plus the reduction over positions of BN
statistics and weight gradients). ``assert_close64`` checks ``|a - b| <= 2 k u * scale``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import igc_kernels as igc
from igc_kernels import ChainSpec, InterleavedGroupConv
from igc_kernels.models import (
    CondenseLayer,
    IGCV1Block,
    IGCV2Block,
    IGCV2CifarNet,
    IGCV3Block,
    IGCV3Net,
    IGCV3_D_STAGES,
    condense_index,
    parameter_pairs,
)
from igc_test_utils import FUSED, require_extension

U64 = torch.finfo(torch.float64).eps / 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_close64(a, b, k, name):
    scale = max(1.0, float(b.detach().abs().max()))
    err = float((a.detach() - b.detach()).abs().max())
    tol = 2 * k * U64 * scale
    assert err <= tol, f"{name}: max error {err:.3e} exceeds 2 k u scale = {tol:.3e} (k = {k})"


def twins(ctor, backend):
    torch.manual_seed(0)
    f = ctor(True, backend).double()
    torch.manual_seed(0)
    u = ctor(False, backend).double()
    return f, u


def check_twins(f, u, x, k):
    """Same parameters; same output and gradients (input and every parameter)."""
    pairs = parameter_pairs(f, u)
    assert len(pairs) == len(list(f.parameters())) == len(list(u.parameters()))
    for name, p, q in pairs:
        assert p.shape == q.shape and torch.equal(p, q), f"{name} differs between the twins"
    xf = x.clone().requires_grad_()
    xu = x.clone().requires_grad_()
    yf, yu = f(xf), u(xu)
    assert_close64(yf, yu, k, "output")
    gy = torch.randn_like(yu)
    yf.backward(gy)
    yu.backward(gy)
    assert_close64(xf.grad, xu.grad, k, "grad of x")
    for name, p, q in pairs:
        assert p.grad is not None, f"no gradient for {name}"
        assert_close64(p.grad, q.grad, k, f"grad of {name}")


def n_fused(model):
    return sum(isinstance(m, InterleavedGroupConv) for m in model.modules())


BLOCKS = {
    "igcv1": (lambda f, b: IGCV1Block(24, 48, 4, stride=2, fused=f, backend=b), (2, 24, 7, 7)),
    "igcv2": (lambda f, b: IGCV2Block(16, 32, 4, stride=2, fused=f, backend=b), (2, 16, 9, 9)),
    "igcv2_square": (lambda f, b: IGCV2Block(64, 64, 4, fused=f, backend=b), (2, 64, 5, 5)),
    "igcv3": (lambda f, b: IGCV3Block(16, 16, 6, fused=f, backend=b), (2, 16, 7, 7)),
    "igcv3_stride": (lambda f, b: IGCV3Block(16, 24, 6, stride=2, fused=f, backend=b), (2, 16, 7, 7)),
    "condense": (lambda f, b: CondenseLayer(20, 16, 4, condense_index(20, 4, 7), fused=f,
                                            backend=b), (2, 20, 5, 5)),
}


@pytest.mark.parametrize("backend", [FUSED, "reference"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_fused_equals_unfused(name, backend):
    if backend == FUSED:
        require_extension()
    ctor, shape = BLOCKS[name]
    f, u = twins(ctor, backend)
    assert n_fused(f) >= 1 and n_fused(u) == 0
    x = torch.randn(shape, dtype=torch.float64)
    k = 4 * (shape[0] * shape[2] * shape[3] + 400)
    check_twins(f, u, x, k)
    # channels_last input: same function, and the fused block keeps the layout through
    f.eval(), u.eval()
    xc = x.to(memory_format=torch.channels_last)
    assert_close64(f(xc), u(x), k, "channels_last output")


@pytest.mark.parametrize("backend", [FUSED, "reference"])
def test_igcv2_cifar_net_fused_equals_unfused(backend):
    if backend == FUSED:
        require_extension()
    f, u = twins(lambda fu, b: IGCV2CifarNet(16, depth=8, group_size=4, fused=fu, backend=b),
                 backend)
    assert n_fused(f) == 6 and n_fused(u) == 0
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    check_twins(f, u, x, 8 * (2 * 32 * 32 + 600))


def test_igcv3_net_fused_equals_unfused_small():
    require_extension()
    stages = ((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2))
    f, u = twins(lambda fu, b: IGCV3Net(10, stages=stages, fused=fu, backend=b), FUSED)
    assert n_fused(f) == 2 * 5
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    check_twins(f, u, x, 16 * (2 * 16 * 16 + 1300))


# ---------------------------------------------------------------------------------------------
# Structure and parameter counts
# ---------------------------------------------------------------------------------------------
def _bn(c):
    return 2 * c  # weight and bias (running statistics are buffers)


def igcv2_cifar_params(C, depth, K, classes):
    """Closed form of IGCV2CifarNet's parameter count, from its description: stem 3x3 (27 C) +
    BN; per block: channel-wise 3x3 (9 C_out), ceil(log_K C_out) grouped layers of C_out K
    weights, BN; the linear classifier."""
    n = (depth - 2) // 3
    total = 27 * C + _bn(C)
    for w in (C, 2 * C, 4 * C):
        L = max(1, math.ceil(math.log(w) / math.log(K) - 1e-12))
        total += n * (9 * w + L * w * K + _bn(w))
    return total + 4 * C * classes + classes


@pytest.mark.parametrize("C,depth,K", [(416, 20, 8), (64, 20, 8), (24, 8, 4), (40, 11, 8)])
def test_igcv2_cifar_param_count(C, depth, K):
    net = IGCV2CifarNet(C, depth=depth, group_size=K, fused=True)
    got = sum(p.numel() for p in net.parameters())
    assert got == igcv2_cifar_params(C, depth, K, 10)
    torch.manual_seed(0)
    unfused = IGCV2CifarNet(C, depth=depth, group_size=K, fused=False)
    assert sum(p.numel() for p in unfused.parameters()) == got


def test_igcv2_c416_structure():
    """IGCV2*(C416): 20 layers (stem, 3 x 6 blocks, classifier); every block's chain is the
    IGCV2* rule: K = 8, ceil(log_8 C) layers, dense (every output reaches every input) but not
    complementary, since 416 (832, 1664) is not a power of 8."""
    net = IGCV2CifarNet(416)
    blocks = list(net.blocks)
    assert len(blocks) == 18
    assert [b.spec.channels[0] for b in blocks] == [416] * 6 + [832] * 6 + [1664] * 6
    assert {b.spec.num_layers for b in blocks[:6]} == {3}  # 8^3 = 512 >= 416
    assert {b.spec.num_layers for b in blocks[6:]} == {4}  # 8^3 < 832, 1664 <= 8^4
    for w in (416, 832, 1664):
        spec = ChainSpec.igcv2(w, 8)
        assert spec.is_dense() and not spec.is_complementary()
    assert sum(p.numel() for p in net.parameters()) == 760042
    y = IGCV2CifarNet(16, depth=5, group_size=4)(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)


def igcv3_params(stages, classes=1000, G=2):
    """Closed form of IGCV3-D's parameter count: stem 27*32 + BN; per block of input c, hidden
    h = t c, output o: expansion c h / G, BN(h), depth-wise 9 h, BN(h), reduction h o / G,
    BN(o); head 1x1 to 1280 + BN; classifier."""
    c = 32
    total = 27 * c + _bn(c)
    for t, o, n, _ in stages:
        for _ in range(n):
            h = c * t
            total += c * h // G + _bn(h) + 9 * h + _bn(h) + h * o // G + _bn(o)
            c = o
    return total + c * 1280 + _bn(1280) + 1280 * classes + classes


def test_igcv3_d_param_count_matches_authors():
    net = IGCV3Net(fused=True)
    got = sum(p.numel() for p in net.parameters())
    assert got == igcv3_params(IGCV3_D_STAGES)
    # the authors report 3.5M parameters for IGCV3-D 1.0 on ImageNet
    assert abs(got - 3.5e6) < 0.05e6, got
    assert len(net.blocks) == sum(n for _, _, n, _ in IGCV3_D_STAGES) == 32


def test_igcv3_permutations():
    blk = IGCV3Block(16, 24, 6, fused=True)
    assert blk.expand.permutations() == ["interleave"]
    perm = blk.reduce.permutations()[0]
    assert torch.equal(perm, igc.interleave_index(24, 12))  # shuffle with C_out / G groups
    assert not blk.residual and IGCV3Block(16, 16, 6).residual


def test_igcv1_block_is_the_paper_product():
    """The fused chain is P^T W_d P with P the shuffle of L groups: compare with the dense
    matrix built from the definition."""
    blk = IGCV1Block(12, 12, 3, fused=True).double()  # L = 3, M = 4
    L, M, C = 3, 4, 12
    P = torch.eye(C, dtype=torch.float64)[igc.interleave_index(C, L)]  # gather as a matrix
    W = blk.chain.weights[0].detach().reshape(C, L)
    Wd = torch.block_diag(*[W[m * L:(m + 1) * L] for m in range(M)])
    expected = P.t() @ Wd @ P
    x = torch.randn(2, C, 3, 3, dtype=torch.float64)
    y = blk.chain(x)
    y_ref = torch.einsum("oc,nchw->nohw", expected, x)
    assert_close64(y, y_ref, 2 * C, "IGCV1 chain")


def test_condense_layer_repeats_and_unused_channels():
    require_extension()
    index = torch.tensor([0, 3, 3, 5, 1, 0, 7, 3])  # repeats; channels 2, 4, 6 unused
    torch.manual_seed(0)
    f = CondenseLayer(8, 8, 2, index, fused=True, backend=FUSED).double()
    torch.manual_seed(0)
    u = CondenseLayer(8, 8, 2, index, fused=False).double()
    assert isinstance(u.chain[0], igc.ChannelGather)
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    check_twins(f, u, x, 4 * (3 * 16 + 20))


def test_block_argument_errors():
    with pytest.raises(ValueError, match="primary_groups"):
        IGCV1Block(24, 24, 5)
    with pytest.raises(ValueError, match="in_channels and out_channels"):
        IGCV2Block(16, 24)
    with pytest.raises(ValueError, match="groups and expanded width"):
        IGCV3Block(4, 8, 1.25, groups=2)  # hidden width 5
    with pytest.raises(ValueError, match=r"index entries must lie in \[0, 8\)"):
        CondenseLayer(8, 8, 2, [0, 9])
    with pytest.raises(ValueError, match="len\\(index\\)"):
        CondenseLayer(8, 8, 2, [0, 1, 2])
    with pytest.raises(ValueError, match="depth must be 3 n \\+ 2"):
        IGCV2CifarNet(16, depth=10)


def test_parameter_pairs_rejects_mismatched_twins():
    with pytest.raises(KeyError):
        parameter_pairs(IGCV2Block(8, 8, 2), nn.Sequential())


# ---------------------------------------------------------------------------------------------
# End-to-end benchmark smoke run (also what CI runs of benchmarks/e2e.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_e2e_benchmark_smoke(tmp_path):
    require_extension()
    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "e2e.py"), "--smoke",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert data["command"].endswith("--smoke --json " + str(out))
    rows = data["rows"]
    assert {(r["model"], r["mode"], r["impl"]) for r in rows} >= {
        ("igcv2_cifar", "train", "fused"), ("igcv2_cifar", "train", "unfused"),
        ("igcv2_cifar", "infer", "fused"), ("igcv2_cifar", "infer", "unfused")}
    for row in rows:
        assert row["median_ms"] > 0 and row["runs"] >= 1
    # inference variants timed in turn, in rounds (smoke: 2), each round at least one run
    infer_rows = [r for r in rows if r["mode"] == "infer"]
    assert all(r["rounds"] == 2 and r["runs"] >= 2 for r in infer_rows), infer_rows
    # optimize_for_inference's rows: every layout, output equal to the fused network's within
    # float32 rounding of a 5-layer-deep network
    opt = [r for r in rows if r["impl"] == "optimized"]
    assert {r["layout"] for r in opt} == {"nchw", "channels_last"}
    assert all(r["mode"] == "infer" and r["max_rel_diff_vs_fused"] < 1e-5 for r in opt), opt
    # torch.compile of the unfused network, in the same run
    comp = [r for r in rows if r["impl"] == "compiled"]
    assert {r["layout"] for r in comp} == {"nchw", "channels_last"}
    assert all(r["max_rel_diff_vs_eager"] < 1e-5 and r["transform_s"] > 0 for r in comp), comp
    track = data["loss_tracking"]
    assert track["steps"] >= 6 and track["passed"], track
    # fused and unfused float64 training stay together to float64 rounding, step by step
    assert max(track["float64_rel_diff"]) < 1e-9
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"  # the plot beside the JSON
    assert data["args"]["calibrate_bn"] and data["args"]["flush_denormal"]
    try:  # ONNX Runtime's row, in the same run, where onnxruntime is installed (make deps)
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    ort_rows = [r for r in rows if r["impl"] == "onnxruntime"]
    assert len(ort_rows) == 1 and ort_rows[0]["mode"] == "infer" and ort_rows[0]["median_ms"] > 0
    (infer,) = [s for s in data["summary"] if s["mode"] == "infer"]
    assert infer["speedup_vs_onnxruntime"] > 0
