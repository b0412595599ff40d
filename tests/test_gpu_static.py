"""Static GPU facts of the Triton kernels without a GPU (tools/gpu_static.py): every kernel the
launcher would launch for a representative subset compiles for sm_90 (the whole pipeline,
ptxas included) and fits a block's shared memory, with the CI's Triton and with triton 3.6.0
(the GPU machine's); with the CI's Triton the default forward configuration does not spill; the
autotuner's pruning, run on real compiles, keeps no spilling configuration when a spill-free
one exists; the performance model's dynamic instruction count matches the chain's arithmetic.
The backend's spill check, run on real compiles, launches a spill-free configuration where
the default spills, with both Tritons. (Structures where every configuration spills are
refused by that check; benchmarks/results/gpu-static-refusals-*.json lists them.)

Runs the tool in a subprocess with ``TRITON_INTERPRET`` unset (the suite sets it for the
interpreter tests), in the slow step of ``make test``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSET = "igcv2(256,8);igcv3-expand(64,6,2);igcv3-reduce(64,6,2)"
MAX_SHARED_SM90 = 232448  # opt-in shared memory per block on sm_90


# The GPU machine's Triton: `make deps` installs it beside the CI's (pip --target), for the
# compile-only checks below; only an unreachable package registry leaves it out.
TRITON_ALT = os.path.join(ROOT, "build", "triton-3.6.0")


def _tool(*args, pythonpath=None, timeout=1800, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra_env or {})
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_static.py"), *args],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout


def _subset_report(path, pythonpath=None):
    _tool("--structures", SUBSET, "--dtypes", "float32,bfloat16", "--layouts",
          "nchw,channels_last", "--archs", "90", "--json", str(path), pythonpath=pythonpath)
    return json.loads(path.read_text())


# The tests sharing a module fixture (``report``; ``cuda_report``, with the nvcc tests' compile)
# carry one xdist group: under pytest-xdist (`make test`) one worker builds it, once.
@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    return _subset_report(tmp_path_factory.mktemp("static") / "report.json")["rows"]


def _check_compiles_and_fits(rows, unpacked=(), fp32_split=True, fp32_packed_backward=()):
    # structures x dtypes x layouts x (fwd, bwd, reduce) of the default configuration, and the
    # fixed path's configuration where it is not the default: packed in bf16 (IGCV2(256, 8),
    # and the IGCV3 layers on tiles padded group by group), the IGCV3 layers' float32 forward
    # (their groups are 32 and 192 wide) and, ``fp32_split``, their float32 backward (dW by
    # reductions in two products, FIXED_SPLIT_PADDED_FP32; else the default, the FMA path: every
    # packed build of it spills, but for the structures of ``fp32_packed_backward``, which take
    # a later packed candidate); the bf16 ones of ``unpacked`` ((structure, dtype, layout,
    # direction)) are the default too
    default = [r for r in rows if r["is_default"]]
    assert len(default) == 3 * 2 * 2 * 3
    fixed = {}
    for r in rows:
        if r["fixed_path"] and r["per_position"]:
            key = (r["structure"], r["dtype"], r["layout"], r["direction"])
            assert key not in fixed, key
            fixed[key] = r
    assert len(fixed) == 3 * 2 * 2 * 2
    for key, r in fixed.items():
        structure, dtype, _, direction = key
        igcv3 = structure.startswith("igcv3")
        fp32_packed = igcv3 and (direction == "forward" or fp32_split
                                 or structure in fp32_packed_backward)
        packed = (dtype == "bfloat16" or fp32_packed) and key not in unpacked
        assert bool(r["config"].get("PACK")) == packed, r
        assert r["is_default"] != packed, r
        assert not packed or r["spill_bytes"] == 0, r
        if igcv3 and dtype == "float32" and direction == "backward" and fp32_split:
            assert (r["config"]["RED"], r["config"]["SPLIT"], r["num_warps"]) == (1, 2, 8), r
    # per layout: IGCV2(256, 8)'s packed forward, backward and reduction; the IGCV3 layers'
    # packed forwards (bf16, float32), and their bf16 (and, fp32_split, float32) backwards and
    # reductions
    fp32_bwd = 2 if fp32_split else len(fp32_packed_backward)
    assert len(rows) == (len(default) + 2 * 3 + 2 * 2 * 2 + 2 * 2 * (2 + fp32_bwd)
                         - 2 * len(unpacked))
    for r in rows:
        what = f"{r['structure']} {r['dtype']} {r['layout']} {r['direction']} {r['kernel']}"
        assert r["compiled"], f"{what}: {r['error']}"
        assert 0 < r["registers"] <= 255, what
        assert r["shared_bytes"] <= MAX_SHARED_SM90, what
        assert r["ctas_per_sm"] >= 1, what
        assert sum(r["sass"].values()) > 0, what


@pytest.mark.xdist_group("sm90-report")
def test_every_launched_kernel_compiles_for_sm90_and_fits(report):
    _check_compiles_and_fits(report)


def _need_triton_alt():
    if not os.path.isdir(os.path.join(TRITON_ALT, "triton")):
        pytest.skip(f"triton 3.6.0 is not installed in {TRITON_ALT}: `make deps` installs it "
                    "(it printed why it could not, e.g. the package registry is unreachable)")


def test_every_launched_kernel_compiles_with_the_gpu_machines_triton(tmp_path):
    """The same subset with triton 3.6.0, the GPU machine's version (its own ptxas)."""
    _need_triton_alt()
    rep = _subset_report(tmp_path / "report36.json", pythonpath=TRITON_ALT)
    assert rep["triton"] == "3.6.0"
    # the IGCV3 reduction's channels-last bf16 backward: every packed candidate of the fixed
    # path spills with this Triton (32 to 3920 bytes), so it runs the FMA path; so does the
    # IGCV3 reduction's float32 backward (its two-product build spills 208 to 1784 bytes, and
    # every other packed one); the expansion's takes a later packed candidate, which fits since
    # the packed backward computes its products transposed
    _check_compiles_and_fits(rep["rows"], unpacked=[("igcv3-reduce(64,6,2)", "bfloat16",
                                                     "channels_last", "backward")],
                             fp32_split=False, fp32_packed_backward=("igcv3-expand(64,6,2)",))


@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_launch_path_binds_and_compiles(tmp_path, alt):
    """Each launch compiled through Triton's own argument binding and specialisation (what
    ``JITFunction.run`` does on a GPU before the launcher: constexpr tuples, None pointer
    slots, divisibility hints), for a chain deeper than the pointer slots (weights
    concatenated), explicit permutations (one shared buffer) and an input index
    (CondenseNet-like)."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    path = tmp_path / "launch.json"
    _tool("--launch-path", "--structures", "deep(32,4,10);perm(64,8);condense(64,4)",
          "--dtypes", "bfloat16", "--layouts", "nchw", "--archs", "90", "--json", str(path),
          pythonpath=TRITON_ALT if alt else None)
    rows = json.loads(path.read_text())["rows"]
    # structures x (fwd, bwd, reduce) of the default configuration, and the fixed path's
    # launches where it is another (bf16 chains with packed layers try packed ones first)
    assert len([r for r in rows if r["is_default"]]) == 3 * 3
    fixed = [r for r in rows if r["fixed_path"] and r["per_position"]]
    assert sorted((r["structure"], r["direction"]) for r in fixed) == sorted(
        (s, d) for s in ("deep(32,4,10)", "perm(64,8)", "condense(64,4)")
        for d in ("forward", "backward"))
    assert {r["kernel"] for r in rows} == {"igc_chain_fwd", "igc_chain_bwd", "_reduce_partials"}
    for r in rows:
        assert r["compiled"], f"{r['structure']} {r['direction']} {r['kernel']}: {r['error']}"


_MUTATIONS = r"""
import json, os, torch
import triton.runtime as tr
from triton.backends.compiler import GPUTarget

class _Target:  # the one driver call TTIR generation makes, answered without a GPU
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

tr.driver.set_active(_Target())
os.environ.update(IGC_TRITON_AUTOTUNE="0", IGC_TRITON_FIXED="default")
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors
import igc_kernels._triton_ops as T

import igc_kernels.triton_kernels.chain as K

launches = []
T._launch = lambda fn, grid, args, meta: launches.append((fn, args, meta))
g = torch.Generator().manual_seed(0)
# IGC_TEST_PACKED=1: bf16, under each of the fixed path's packed configurations (the SPLIT
# ones too: 64 channels in groups of 4, four blocks of 16 per layer, so SPLIT 4 splits)
packed = os.environ.get("IGC_TEST_PACKED") == "1"
dt = torch.bfloat16 if packed else torch.float32
fwd_cfgs = K.FIXED_PACKED_FORWARD if packed else [K.DEFAULT_CONFIG]
bwd_cfgs = K.FIXED_SPLIT_BACKWARD + K.FIXED_PACKED_BACKWARD if packed else [K.DEFAULT_CONFIG]
C = 64 if packed else 16
G = C // 4  # groups of 4 channels
L = 10  # deeper than the pointer slots
x = torch.randn(2, C, 3, 3, generator=g).to(dt)
ws = [torch.randn(C, 4, generator=g).to(dt) for _ in range(L)]
bs = [torch.randn(C, generator=g).to(dt) if l % 2 else None for l in range(L)]
explicit = [l % 3 == 0 and l < L - 1 for l in range(L)]  # the last one: see the test
perms = [torch.randperm(C, generator=g) if e else None for e in explicit]
shuffles = [0 if e else G for e in explicit]
idx = torch.randint(0, C, (C,), generator=g)
args = (ws, [b if b is not None else torch.empty(0) for b in bs], [G] * L, shuffles, perms)
gy = torch.randn(2, C, 3, 3, generator=g).to(dt)
for cfg in fwd_cfgs:
    with K.override_config(**cfg.__dict__):
        T.chain_forward(x, *args, idx)
for cfg in bwd_cfgs:
    with K.override_config(**cfg.__dict__):
        T.chain_backward(gy, x, *args, [True, True, True], idx)
out = []
for fn, a, meta in launches:
    kw = dict(zip(fn.arg_names, a))
    kw.update({k: v for k, v in meta.items() if k != "num_warps"})
    acc = identify_accessed_tensors(fn, kw, {})
    out.append([fn.__name__, meta.get("PACK", 0), meta.get("SPLIT", 0), meta.get("W_TILE", 0),
                sorted(d.name for d in acc.read_writes.writes)])
print(json.dumps(out))
"""


@pytest.mark.parametrize("packed", [False, True], ids=["fp32-default", "bf16-fixed-packed"])
def test_torch_compile_sees_what_the_kernels_write(packed):
    """``torch.compile`` (Inductor) traces the Triton op bodies and reads each kernel's TTIR
    (generated for sm_90 here) to find the tensors it writes, so that it clones exactly those:
    for the kernels with their constexpr tuples and None pointer slots (a chain deeper than
    the slots, explicit permutations, biases on some layers, an input index) the analysis finds
    y in the forward, dx and the partial rows in the backward, the gradients in the reduction,
    and nothing else. (An explicit permutation after the last layer makes it also name
    ``perm_ptr`` in the forward, whose loaded values address the stores of y: Inductor then
    clones that small buffer, which costs a copy and changes no result.) In bf16 likewise
    under each of the fixed path's packed configurations (deterministic mode and
    ``IGC_TRITON_AUTOTUNE=0`` launch them: batched dots, the persistent forwards, dW held,
    added by reductions, or both: RED = 2, and the SPLIT ones, with dy loaded late and with
    the weight blocks loaded every tile, on a chain of 64 channels)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["IGC_TEST_PACKED"] = "1" if packed else "0"
    r = subprocess.run([sys.executable, "-c", _MUTATIONS], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    from igc_kernels.triton_kernels import chain as K

    writes = json.loads(r.stdout.strip().splitlines()[-1])
    fwd = [["igc_chain_fwd", 1 if packed else 0, 0, 0, ["y_ptr"]]] * (
        len(K.FIXED_PACKED_FORWARD) if packed else 1)
    packs = ([(c.pack, c.split, c.w_tile) for c in K.FIXED_SPLIT_BACKWARD
              + K.FIXED_PACKED_BACKWARD] if packed else [(0, 0, 0)])
    # SPLIT (2, 4, 2 with DY_LATE; held, then W_TILE); held dW; the last layer's held;
    # reductions
    assert not packed or packs == ([(1, 2, 0), (1, 4, 0), (1, 2, 0), (1, 2, 1), (1, 4, 1),
                                    (1, 2, 1)] + [(2, 0, 0)] * 3 + [(1, 0, 0)])
    bwd = [row for pk in packs  # the PACK, SPLIT and W_TILE of each backward launch
           for row in (["igc_chain_bwd", *pk, ["dx_ptr", "part_ptr"]],
                       ["_reduce_partials", 0, 0, 0, ["gb_ptr", "gw_ptr"]])]
    assert writes == fwd + bwd, writes


@pytest.mark.xdist_group("sm90-report")
def test_launched_forward_configuration_does_not_spill(report):
    """The forward each chain of the subset launches (the fixed path's) does not spill; the
    default itself may (the IGCV3 layers' float32 one: its dot path takes them, and the fixed
    path, whose float32 default is the FMA path there, does not launch it)."""
    fwd = [r for r in report if r["direction"] == "forward" and r["fixed_path"]]
    assert len(fwd) == 3 * 2 * 2
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
    configs = _pruning("float32")
    kept = [c for c, s, k in configs if k]
    assert {"BLOCK_P": 16, "DENSE": 0, "PACK": 0, "AHEAD": 0, "num_warps": 4} in kept
    _check_pruning(configs)


def test_autotuner_pruning_with_the_gpu_machines_triton():
    """Triton 3.6.0 spills other configurations than the CI's Triton (its default forward
    configuration spills a few bytes for IGCV2(256, 8) in float32): the pruning, which compiles
    on the GPU at hand, drops exactly those."""
    _need_triton_alt()
    _check_pruning(_pruning("float32", TRITON_ALT))


def _pruning(dtype, pythonpath=None):
    out = _tool("--pruning", "--structures", "igcv2(256,8)", "--dtypes", dtype, "--layouts",
                "nchw", "--directions", "forward", "--archs", "90", pythonpath=pythonpath)
    (line,) = [json.loads(s) for s in out.splitlines() if s.startswith("{")]
    return line["configs"]


def _check_pruning(configs):
    assert len(configs) >= 4
    kept = [(c, s) for c, s, k in configs if k]
    dropped = [(c, s) for c, s, k in configs if not k]
    assert kept and all(s == 0 for _, s in kept), configs
    assert dropped and all(s is None or s > 0 for _, s in dropped), configs


def _packed(path, pythonpath=None):
    _tool("--structures", "igcv2(256,8)", "--dtypes", "bfloat16", "--layouts", "nchw",
          "--directions", "forward", "--archs", "90", "--config",
          json.dumps({"block_p": 64, "num_warps": 8, "pack": 1, "dense": 0}), "--json",
          str(path), pythonpath=pythonpath)
    (row,) = json.loads(path.read_text())["rows"]
    return row


def _check_packed(r):
    """The packed forward of IGCV2(256, 8) in bf16 compiles for sm_90 without spills, and its
    three layers run on tensor cores: HMMA, no shuffles (no per-input gathers)."""
    assert r["compiled"] and r["config"]["PACK"] == 1, r
    assert r["spill_bytes"] == 0 and r["shared_bytes"] <= MAX_SHARED_SM90, r
    assert r["sass"]["HMMA/MMA"] > 0 and r["sass"]["SHFL"] == 0, r["sass"]


def test_packed_forward_compiles_without_spills(tmp_path):
    pytest.importorskip("triton")
    _check_packed(_packed(tmp_path / "p.json"))


def test_packed_forward_with_the_gpu_machines_triton(tmp_path):
    _need_triton_alt()
    _check_packed(_packed(tmp_path / "p.json", TRITON_ALT))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("structure", ["igcv2(64,4)", "igcv2(256,8)"])
@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_packed_backward_compiles_without_spills(tmp_path, alt, structure, layout):
    """The packed backward (dW and dh as batched tensor-core products on the forward's blocks)
    of IGCV2(64, 4) and IGCV2(256, 8) in bf16, 16 positions on 16 warps, compiles for sm_90
    without spills, on HMMA and without shuffles. (IGCV2(256, 8)'s spilled in every
    configuration while the tile loop's address tensors were hoisted out of the loop;
    docs/backends.md.) Its tile loop issues no more global loads and stores than the tile's
    x, dy and dx take in 16-byte vectors: the weight blocks are loaded before the loop, the
    dW blocks carried across it (with them loaded and added to the partial row every tile,
    IGCV2(256, 8) issued 112 per position), and the accesses vectorised in both layouts (with
    the tile loop's opaque zero added to the channel stride they were 16-bit scalars: 24 per
    position)."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    path = tmp_path / "pb.json"
    _tool("--structures", structure, "--dtypes", "bfloat16", "--layouts", layout,
          "--directions", "backward", "--archs", "90", "--config",
          json.dumps({"block_p": 16, "num_warps": 16, "pack": 1, "dense": 0}), "--json",
          str(path), pythonpath=TRITON_ALT if alt else None)
    (r,) = [r for r in json.loads(path.read_text())["rows"] if r["kernel"] == "igc_chain_bwd"]
    assert r["compiled"] and r["config"]["PACK"] == 1, r
    assert r["spill_bytes"] == 0 and r["shared_bytes"] <= MAX_SHARED_SM90, r
    assert r["sass"]["HMMA/MMA"] > 0 and r["sass"]["SHFL"] == 0, r["sass"]
    c = int(structure.split("(")[1].split(",")[0])  # channels of x, dy and dx
    # 16-byte vectors per thread and tensor (at least one access each)
    vectors = max(1, c * r["block_p"] * 2 // (16 * 32 * r["num_warps"]))
    assert r["dyn"]["tile_loop"] and r["dyn"]["counts"]["LDG/STG"] <= 3 * vectors, r["dyn"]
    assert r["config"]["row_l2_bytes"] == 0  # every layer packs: the model counts no row
    assert r["programs_per_sm"] == 2  # small rows: two programs per SM


def _backward_with_and_without_red(tmp_path, structure, dtype, alt, reds=(0, 1)) -> dict:
    """{RED: the igc_chain_bwd record} of ``structure``'s packed backward, 16 positions on 16
    warps, NCHW, sm_90, for each RED of ``reds``."""
    rows = {}
    for red in reds:
        path = tmp_path / f"red{red}.json"
        _tool("--structures", structure, "--dtypes", dtype, "--layouts", "nchw",
              "--directions", "backward", "--archs", "90", "--config",
              json.dumps({"block_p": 16, "num_warps": 16, "pack": 1, "red": red}), "--json",
              str(path), pythonpath=TRITON_ALT if alt else None)
        (rows[red],) = [r for r in json.loads(path.read_text())["rows"]
                        if r["kernel"] == "igc_chain_bwd"]
    return rows


@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_packed_backward_dw_by_reductions(tmp_path, alt):
    """RED = 1 (``PACKED_RED``): the packed backward adds its dW blocks to the partial row by
    reductions every tile; RED = 2 (``PACKED_RED_HELD``) all but the last layer's, which it
    holds. IGCV2(256, 8) in bf16, 16 positions on 16 warps, compiles for sm_90 without spills
    with and without them; with them the tile loop issues its reductions as 16-byte vectors
    (at most one per 16 bytes of the reduced layers' dW blocks and warp: three layers, or two)
    besides the tile's accesses, and the record counts the row's L2 traffic once (4 bytes per
    reduced weight; held, none)."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    rows = _backward_with_and_without_red(tmp_path, "igcv2(256,8)", "bfloat16", alt, (0, 1, 2))
    for red in (0, 1, 2):
        assert rows[red]["compiled"] and rows[red]["spill_bytes"] == 0, rows[red]
        assert rows[red]["config"]["RED"] == red, rows[red]["config"]
    weights = 256 * 8  # per layer
    assert rows[0]["config"]["row_l2_bytes"] == 0
    for red, reduced in ((1, 3), (2, 2)):
        assert rows[red]["config"]["row_l2_bytes"] == 4 * reduced * weights
        vectors = reduced * 256 * 16 * 4 // (16 * 32 * 16)  # [16, 16, 16] fp32 blocks a layer
        extra = rows[red]["dyn"]["counts"]["LDG/STG"] - rows[0]["dyn"]["counts"]["LDG/STG"]
        assert 0 < extra <= vectors, (red, rows[0]["dyn"], rows[red]["dyn"])
    assert (rows[2]["dyn"]["counts"]["LDG/STG"] < rows[1]["dyn"]["counts"]["LDG/STG"])


def test_weight_blocks_loaded_every_tile_are_counted(tmp_path):
    """W_TILE (a SPLIT configuration's weight blocks loaded every tile where they are used
    instead of held across the tiles): IGCV2(256, 16) in bf16 (two layers of 256 x 16), SPLIT
    2, 16 positions on 8 warps, compiled for sm_90 with the CI's Triton with and without it.
    With it the tile loop issues more global loads, and the record gives the weight bytes the
    model counts per tile from L2: layer 0's blocks for the recomputed forward, both layers'
    for dh (dx is wanted), 2 bytes a weight; held, none."""
    pytest.importorskip("triton")
    rows = {}
    for wt in (0, 1):
        path = tmp_path / f"wt{wt}.json"
        _tool("--structures", "igcv2(256,16)", "--dtypes", "bfloat16", "--layouts", "nchw",
              "--directions", "backward", "--archs", "90", "--config",
              json.dumps({"block_p": 16, "num_warps": 8, "pack": 1, "dense": 0, "red": 1,
                          "split": 2, "w_tile": wt}), "--json", str(path))
        (rows[wt],) = [r for r in json.loads(path.read_text())["rows"]
                       if r["kernel"] == "igc_chain_bwd"]
        assert rows[wt]["compiled"] and rows[wt]["config"]["W_TILE"] == wt, rows[wt]
        assert rows[wt]["config"]["SPLIT"] == 2
    assert "weights_l2_bytes" not in rows[0]["config"]
    assert rows[1]["config"]["weights_l2_bytes"] == (1 + 2) * 256 * 16 * 2
    assert (rows[1]["dyn"]["counts"]["LDG/STG"] > rows[0]["dyn"]["counts"]["LDG/STG"]), (
        rows[0]["dyn"], rows[1]["dyn"])


@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_16bit_blocks_wider_than_tall_fit_two_ctas_per_sm(tmp_path, alt):
    """The CondenseNet-like layer's bf16 backward on its fixed path (16 positions on 8 warps,
    two tiles ahead; blocks of 16 inputs x 32 outputs) keeps the untransposed products in
    16 bits, and so fits two CTAs per SM (at most 128 registers) without spills, NCHW with
    both Tritons and channels-last with the GPU machine's. Transposed, triton 3.6.0 built it
    with 144 and 146 registers: one CTA per SM, predicted latency-bound at 70% of copy
    bandwidth instead of 89% (NCHW)."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    path = tmp_path / "condense.json"
    layouts = "nchw,channels_last" if alt else "nchw"
    _tool("--structures", "condense(128,4)", "--dtypes", "bfloat16", "--layouts", layouts,
          "--directions", "backward", "--archs", "90", "--config",
          json.dumps({"block_p": 16, "num_warps": 8, "pack": 2, "red": 0, "keep": 1,
                      "dense": 0}), "--json", str(path),
          pythonpath=TRITON_ALT if alt else None)
    rows = [r for r in json.loads(path.read_text())["rows"] if r["kernel"] == "igc_chain_bwd"]
    assert len(rows) == len(layouts.split(",")), rows
    for r in rows:
        assert r["compiled"] and r["config"]["PACK"] == 2 and r["spill_bytes"] == 0, r
        assert r["registers"] <= 128 and r["ctas_per_sm"] == 2, r


def test_float32_packed_backward_fits_with_reductions(tmp_path):
    """Float32 chains' packed backward reads, adds and writes its dW blocks in the partial row
    every tile; IGCV2(256, 32)'s, 16 positions on 16 warps, spills doing so (8 bytes with the
    CI's Triton) and does not with the reductions (RED = 1). (IGCV2(256, 16)'s, which spilled
    496 bytes, fits either way since the products are computed transposed.)"""
    pytest.importorskip("triton")
    rows = _backward_with_and_without_red(tmp_path, "igcv2(256,32)", "float32", False)
    assert rows[0]["spill_bytes"] > 0 and rows[1]["spill_bytes"] == 0, rows
    assert rows[1]["config"]["row_l2_bytes"] == 4 * 2 * 256 * 32


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("ahead", [1, 2])
@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_persistent_packed_forward(tmp_path, alt, ahead, layout):
    """The forward's persistent packed configurations (``AHEAD`` 1 and 2: x loaded one or two
    tiles ahead) of IGCV2(256, 8) in bf16, 16 positions on 8 warps, compile for sm_90 without
    spills, on HMMA and without shuffles. The tile loop is the kernel's run-time loop, and the
    only global accesses in it are the tile's x loads and y stores, in 16-byte vectors: the
    weight blocks are held across the tiles (loaded per tile, they took 6 more per warp). The
    record carries what the model needs: two programs per SM, ``AHEAD`` tiles ahead."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    path = tmp_path / "pf.json"
    _tool("--structures", "igcv2(256,8)", "--dtypes", "bfloat16", "--layouts", layout,
          "--directions", "forward", "--archs", "90", "--config",
          json.dumps({"block_p": 16, "num_warps": 8, "pack": 1, "ahead": ahead}), "--json",
          str(path), pythonpath=TRITON_ALT if alt else None)
    (r,) = json.loads(path.read_text())["rows"]
    assert r["compiled"] and r["config"]["PACK"] == 1 and r["config"]["AHEAD"] == ahead, r
    assert r["spill_bytes"] == 0 and r["shared_bytes"] <= MAX_SHARED_SM90, r
    assert r["sass"]["HMMA/MMA"] > 0 and r["sass"]["SHFL"] == 0, r["sass"]
    vectors = max(1, 256 * r["block_p"] * 2 // (16 * 32 * r["num_warps"]))  # per tensor
    assert r["dyn"]["tile_loop"] and r["dyn"]["counts"]["LDG/STG"] <= 2 * vectors, r["dyn"]
    assert r["programs_per_sm"] == 2 and r["next_tile_loaded"] and r["tiles_ahead"] == ahead


@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_opt_in_float32_packed_forward_runs_six_bf16_products(tmp_path, alt):
    """With ``IGC_TRITON_FP32_MMA=1`` float32 chains take the packed path too, its dots in
    Triton's "bf16x6" precision: IGCV2(256, 16)'s packed forward (16 positions, 4 warps)
    compiles for sm_90 without spills or shuffles, and its tensor cores run six bfloat16
    products per multiply-add of the chain (two layers of 256 x 16, no padding at K = 16).
    Without the switch the packed path's products are exact float32 ("ieee"): the same
    configuration compiles to one FFMA per multiply-add, no HMMA and no shuffles."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    rows = {}
    for opt in ("1", "0"):
        path = tmp_path / f"f32-{opt}.json"
        _tool("--structures", "igcv2(256,16)", "--dtypes", "float32", "--layouts", "nchw",
              "--directions", "forward", "--archs", "90", "--config",
              json.dumps({"block_p": 16, "num_warps": 4, "pack": 1, "dense": 0}), "--json",
              str(path), pythonpath=TRITON_ALT if alt else None,
              extra_env={"IGC_TRITON_FP32_MMA": opt})
        (rows[opt],) = json.loads(path.read_text())["rows"]
    r = rows["1"]
    assert r["compiled"] and r["config"]["PACK"] == 1 and r["config"]["PREC"] == "bf16x6", r
    assert r["spill_bytes"] == 0 and r["shared_bytes"] <= MAX_SHARED_SM90, r
    assert r["sass"]["SHFL"] == 0, r["sass"]
    assert r["dyn"]["mma_fma"] * r["num_warps"] == 6 * 16 * 2 * 256 * 16, r["dyn"]
    off = rows["0"]
    assert off["config"]["PACK"] == 1 and "PREC" not in off["config"], off
    assert off["spill_bytes"] == 0 and off["sass"]["HMMA/MMA"] == off["sass"]["SHFL"] == 0, off
    ffma = off["dyn"]["counts"]["FFMA/HFMA"] * off["num_warps"]
    assert ffma == pytest.approx(16 * 2 * 256 * 16 / 32, rel=0.01), off["dyn"]


def _refusals(pythonpath=None, structure="igcv2(512,32)", dtype="float32",
              directions="forward,backward"):
    out = _tool("--refusals", "--structures", structure, "--dtypes", dtype,
                "--layouts", "nchw", "--directions", directions, "--archs", "90",
                pythonpath=pythonpath)
    return {r["direction"]: r for r in (json.loads(s) for s in out.splitlines()
                                        if s.startswith("{"))}


def _check_refusals(rows):
    """IGCV2(512, 32) fp32 (two layers of 16 groups of 32) runs on both directions; the
    backward's first candidate spills (with both Tritons: 952 and 2752 bytes), so the check
    compiles on until a spill-free candidate, which is what the forward launches. The whole
    backward's is on the FMA path (no packed build fits), so the backward runs one layer per
    range (``T.backward_stages``: 512 channels), and the whole chain's kernel is not launched.
    (IGCV2(512, 8), which this checked before, has a packed backward build without spills
    with both Tritons since the packed backward computes its products transposed.)"""
    for r in rows.values():
        assert not r["refused"], r
        assert r["compiled"][-1]["spill_bytes"] == 0, r
    assert rows["forward"]["launches"] == rows["forward"]["compiled"][-1]["config"]
    bwd = rows["backward"]
    assert len(bwd["compiled"]) >= 2 and bwd["compiled"][0]["spill_bytes"] > 0, bwd
    assert bwd["compiled"][-1]["config"]["PACK"] == 0, bwd
    assert bwd["stages"] == [[0, 1], [1, 2]] and bwd["launches"] is None, bwd


def test_spill_check_launches_a_spill_free_configuration():
    pytest.importorskip("triton")
    _check_refusals(_refusals())


def test_spill_check_with_the_gpu_machines_triton():
    _need_triton_alt()
    _check_refusals(_refusals(TRITON_ALT))


# (structure, dtype, the configuration each direction launches as (BLOCK_P, num_warps, PACK,
# AHEAD or RED), how many candidates the check compiles for it (None: not compiled here), the
# backward's SPLIT and W_TILE), and with which Tritons (alt: triton 3.6.0; its builds of
# IGCV2(1024, 32)'s SPLIT configurations that hold their weight blocks take more shared memory
# than an SM has, so on its GPU they do not load, and those that load them every tile come
# next)
_FIXED_PACKED_CASES = [
    ("igcv2(256,8)", "bfloat16", ((16, 4, 1, 0), 1), ((16, 8, 2, 0), 1), (0, 0), (False, True)),
    ("igcv2(512,16)", "bfloat16", ((16, 4, 1, 0), 1), ((16, 8, 2, 2), 2), (0, 0), (False, True)),
    ("igcv2(256,16)", "float32", ((16, 4, 1, 0), 1), ((16, 8, 2, 0), 1), (0, 0), (False, True)),
    ("igcv2(512,8)", "float32", None, ((16, 8, 2, 1), 2), (0, 0), (False, True)),
    ("igcv2(1024,16)", "bfloat16", None, ((16, 8, 1, 1), 1), (2, 0), (False,)),
    ("igcv2(1024,32)", "bfloat16", None, ((16, 8, 1, 1), 2), (4, 1), (True,)),
]


@pytest.mark.parametrize("alt,case", [(alt, c) for c in _FIXED_PACKED_CASES for alt in c[5]],
                         ids=lambda v: (("triton-3.6.0" if v else "ci-triton")
                                        if isinstance(v, bool) else f"{v[0]}-{v[1]}"))
def test_fixed_path_launches_its_first_spill_free_packed_configuration(alt, case):
    """The fixed path's first candidates are packed (FIXED_PACKED_*) and the spill check
    compiles them in order, launching the first without spills, with both Tritons (sm_90):
    IGCV2(256, 8) in bf16 the first of each direction (the default FMA configuration is
    predicted at 42% / 19% of copy bandwidth, these at 100% / 94%); IGCV2(512, 16) in bf16
    the backward's second, the last layer's dW held and the others' by reductions (RED 2:
    holding all of them spills), predicted 55% against 43% with every layer's by reductions
    and 2% on the FMA default; IGCV2(256, 16) in float32 (exact products: FFMAs; groups 16
    wide, so packed first; RED 2 is not offered) the first of each direction (the backward's
    second, dW by reductions, before its products were computed transposed), predicted 71% /
    44% against the default's 45% / 11%;
    IGCV2(512, 8) in float32 (tiles of 512 channels: packed first) the backward's second, every
    packed layer's dW by reductions, predicted 28% against the FMA path's 8% (a packed backward
    build fits since the products are computed transposed; before, the backend staged it);
    IGCV2(1024, 16) in bf16, with the CI's Triton, the backward's first SPLIT candidate (dW by
    reductions in two products per layer, no tile ahead: every other packed backward spills),
    predicted 33% against the FMA default's 1% (its forward, persistent, is compiled
    elsewhere); IGCV2(1024, 32) in bf16 with triton 3.6.0, whose SPLIT builds holding their
    weight blocks exceed the SM's shared memory (not counted: they do not load), the
    second of those that load them every tile (W_TILE; SPLIT 2's spills)."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    from igc_kernels.triton_kernels import chain as K

    structure, dtype, fwd, bwd, (split, w_tile), _ = case
    rows = _refusals(TRITON_ALT if alt else None, structure, dtype,
                     "forward,backward" if fwd else "backward")
    assert set(rows) == ({"forward", "backward"} if fwd else {"backward"})
    cands = {"forward": K.FIXED_PACKED_FORWARD,
             "backward": K.FIXED_SPLIT_BACKWARD + K.FIXED_PACKED_BACKWARD}
    for direction, r in rows.items():
        (bp, warps, pack, last), n = fwd if direction == "forward" else bwd
        assert not r["refused"] and len(r["compiled"]) == n, r
        assert all(c["spill_bytes"] > 0 for c in r["compiled"][:-1]), r
        launched = r["launches"]
        assert launched == r["compiled"][-1]["config"] and r["compiled"][-1]["spill_bytes"] == 0
        got = (launched["BLOCK_P"], launched["num_warps"], launched["PACK"],
               launched["AHEAD" if direction == "forward" else "RED"])
        assert got == (bp, warps, pack, last), r
        assert launched.get("SPLIT", 0) == (split if direction == "backward" else 0), r
        assert launched.get("W_TILE", 0) == (w_tile if direction == "backward" else 0), r
        assert any((c.block_p, c.num_warps, c.pack, c.ahead or c.red, c.split, c.w_tile)
                   == (*got, launched.get("SPLIT", 0), launched.get("W_TILE", 0))
                   for c in cands[direction]), got


@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_spill_check_stages_the_backward_whose_packed_builds_spill(alt):
    """IGCV2(1024, 8) in bf16 (four layers of 128 groups of 8): every packed backward build of
    the whole chain spills with both Tritons (sm_90), so the fixed path would launch the FMA
    path (2% predicted). The backend's check (``T.backward_stages`` on the same compiles) runs
    it in two ranges of two layers instead, whose packed builds do not spill: the report says
    so, and that the whole chain's kernel is not launched."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    r = _refusals(TRITON_ALT if alt else None, "igcv2(1024,8)", "bfloat16", "backward")
    r = r["backward"]
    assert not r["refused"] and r["stages"] == [[0, 2], [2, 4]], r
    assert r["launches"] is None, r
    assert all(c["spill_bytes"] > 0 for c in r["compiled"] if c["config"]["PACK"]), r


def test_float32_backward_whose_packed_build_fits_runs_whole():
    """IGCV2(256, 32) in float32 (two layers of 8 groups of 32) is offered packed backward
    builds first; since the packed backward computes its products transposed, the first (16
    positions on 8 warps, two tiles ahead) compiles without spills with the CI's Triton
    (sm_90), so the check launches it on the whole chain. Before, every packed build spilled
    and the backend ran it one layer per range (predicted 22%, against 24% whole now)."""
    pytest.importorskip("triton")
    r = _refusals(None, "igcv2(256,32)", "float32", "backward")["backward"]
    assert not r["refused"] and r["stages"] == [[0, 2]], r
    assert len(r["compiled"]) == 1 and r["compiled"][0]["spill_bytes"] == 0, r
    assert r["launches"] == r["compiled"][0]["config"] and r["launches"]["PACK"] == 2, r


# (structure, the Triton (alt: triton 3.6.0), the forward it launches as (BLOCK_P, num_warps,
# PACK, AHEAD), how many candidates the check compiles)
_FP32_WIDE_FORWARD_CASES = [
    ("igcv2(1024,8)[0:1]", False, (16, 8, 1, 1), 2),
    ("igcv2(1024,8)[0:1]", True, (16, 8, 1, 1), 2),
    ("igcv2(1024,16)", True, (16, 16, 1, 1), 3),
]


@pytest.mark.parametrize("case", _FP32_WIDE_FORWARD_CASES,
                         ids=lambda c: f"{c[0]}-{'triton-3.6.0' if c[1] else 'ci-triton'}")
def test_spill_check_launches_a_later_packed_forward_in_float32(case):
    """Float32 forwards at 1024 channels whose persistent build two tiles ahead spills take the
    next of FIXED_PACKED_FORWARD that does not (sm_90): IGCV2(1024, 8)'s first layer alone (the
    range a staged backward recomputes) persistent one tile ahead on 8 warps with both Tritons
    (predicted 85% of copy bandwidth, against 51% for the 4-warp build one tile per program);
    the whole IGCV2(1024, 16) with triton 3.6.0 one tile ahead on 16 warps (49%, against the
    FMA path's 16%). Every earlier candidate spills."""
    structure, alt, launched, n = case
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    r = _refusals(TRITON_ALT if alt else None, structure, "float32", "forward")["forward"]
    assert not r["refused"] and len(r["compiled"]) == n, r
    assert all(c["spill_bytes"] > 0 for c in r["compiled"][:-1]), r
    assert r["compiled"][-1]["spill_bytes"] == 0 and r["launches"] == r["compiled"][-1]["config"]
    got = r["launches"]
    assert (got["BLOCK_P"], got["num_warps"], got["PACK"], got["AHEAD"]) == launched, r


def _check_first_candidate_launches(alt, structure, dtype, want):
    """The spill check (sm_90; alt: triton 3.6.0) launches each direction's first fixed-path
    candidate, without spills: ``want[direction]`` = (BLOCK_P, num_warps, DENSE, PACK)."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    rows = _refusals(TRITON_ALT if alt else None, structure, dtype)
    for direction, launched in want.items():
        r = rows[direction]
        assert not r["refused"] and len(r["compiled"]) == 1, r
        assert r["compiled"][0]["spill_bytes"] == 0, r
        cfg = r["compiled"][0]["config"]
        assert (cfg["BLOCK_P"], cfg["num_warps"], cfg["DENSE"], cfg["PACK"]) == launched, r
        assert r["launches"] == cfg, r


@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_small_float32_chains_launch_the_fma_path(alt):
    """Float32 chains of at most 128 channels per tile with exact products (sm_90): their dot
    path's products would be FFMAs over the block-diagonal weights' zeros (IGCV2(64, 8)'s
    forward predicted at 15% of copy bandwidth, against 99% on the FMA path), so the fixed path
    launches the FMA path: the forward on 16 positions, the backward on 32 (FIXED_FP32_BACKWARD,
    predicted 56% against 17% for the 8-position build it fell back to when the dot path's
    default spilled), each its first candidate, without spills, with both Tritons; IGCV2(64,
    16), whose groups are 16 wide, too (packed first only from 128 channels on: its packed
    forward is predicted at 40%, the FMA path at 72%)."""
    for structure in ("igcv2(64,8)", "igcv2(64,16)"):
        _check_first_candidate_launches(alt, structure, "float32",
                                        {"forward": (16, 4, 0, 0), "backward": (32, 4, 0, 0)})


@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_igcv3_layers_on_the_packed_path(alt):
    """The IGCV3 layers (64 -> 384 and 384 -> 64, two groups of 32 -> 192 and 192 -> 32) in
    bf16 take the packed path on tiles padded group by group (2 x 256 slots for the 384
    channels, ``Layer.ns`` / ``Layer.ms``): the fixed path's forward its first candidate (16
    positions on 4 warps), the backward a packed build (two tiles ahead on 8 warps with the
    CI's Triton, its first candidate; with triton 3.6.0 that one spills and the one adding dW
    by reductions runs), without spills, with both Tritons (sm_90). Before, the forward took
    the dot path (predicted 96% and 58% of copy bandwidth) and the backward the FMA path (2%)."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    for structure in ("igcv3-expand(64,6,2)", "igcv3-reduce(64,6,2)"):
        rows = _refusals(TRITON_ALT if alt else None, structure, "bfloat16")
        for direction, first in (("forward", (16, 4, 0, 1)), ("backward", (16, 8, 0, 2))):
            r = rows[direction]
            assert not r["refused"] and r["compiled"][-1]["spill_bytes"] == 0, r
            cfg = r["compiled"][-1]["config"]
            assert r["launches"] == cfg and cfg["PACK"] > 0, r
            head = r["compiled"][0]["config"]
            assert (head["BLOCK_P"], head["num_warps"], head["DENSE"], head["PACK"]) == first
            assert len(r["compiled"]) == 1 or (alt and direction == "backward"), r


@pytest.mark.parametrize("alt", [False, True], ids=["ci-triton", "triton-3.6.0"])
def test_igcv3_float32_backward_adds_dw_in_two_products(alt):
    """The IGCV3 layers' float32 backward: every packed build but one spills (their dW blocks
    are 2 x 32 x 256 float32 slots), so the fixed path tries first dW by reductions in two
    products on 8 warps (FIXED_SPLIT_PADDED_FP32). With the CI's Triton it fits (sm_90) and
    launches, predicted at 12% and 24% of copy bandwidth against the FMA path's 3% and 4%;
    triton 3.6.0 spills it (208 to 1784 bytes), and launches the next packed build that fits
    for the expansion, whose blocks (32 x 256) take the transposed products (two tiles ahead
    on 8 warps, since those products), and the FMA path (16 positions on 4 warps) for the
    reduction, whose blocks (256 x 32) keep the untransposed ones and spill in every packed
    build."""
    if alt:
        _need_triton_alt()
    else:
        pytest.importorskip("triton")
    for structure in ("igcv3-expand(64,6,2)", "igcv3-reduce(64,6,2)"):
        r = _refusals(TRITON_ALT if alt else None, structure, "float32", "backward")["backward"]
        assert not r["refused"], r
        head = r["compiled"][0]["config"]
        assert (head["BLOCK_P"], head["num_warps"], head["PACK"], head["RED"],
                head["SPLIT"]) == (16, 8, 1, 1, 2), r
        cfg = r["compiled"][-1]["config"]
        assert r["launches"] == cfg and r["compiled"][-1]["spill_bytes"] == 0, r
        if alt:
            packed = structure.startswith("igcv3-expand")
            assert r["compiled"][0]["spill_bytes"] > 0 and (cfg["PACK"] > 0) == packed, r
            assert all(c["spill_bytes"] > 0 for c in r["compiled"][:-1]), r
        else:
            assert len(r["compiled"]) == 1, r


def test_a_build_larger_than_the_sm_is_skipped_as_on_a_gpu():
    """The static check (``--refusals``, ``--pruning``) takes a build whose shared memory exceeds
    the SM's as the GPU's compile takes it, OutOfResources, which the fixed path and the
    pruning skip (triton 3.6.0 builds IGCV2(1024, 16)'s SPLIT backward with 246,784 bytes; the
    CI's Triton with 197,632, which loads)."""
    pytest.importorskip("triton")
    script = (
        "import sys; sys.path.insert(0, 'tools'); import gpu_static as g\n"
        "from triton.runtime.errors import OutOfResources\n"
        "r = g.Record('igcv2(1024,16)', 'bfloat16', 'nchw', 'backward', 'sm_90', '', '', {})\n"
        "r.compiled = True\n"
        "for smem, regs in ((246784, 250), (197632, 252)):\n"
        "    r.shared_bytes, r.ctas_per_sm = smem, g.ctas_per_sm(regs, smem, 8, 90)\n"
        "    try:\n"
        "        g._check_loads(r); print(smem, r.ctas_per_sm, 'loads')\n"
        "    except OutOfResources:\n"
        "        print(smem, r.ctas_per_sm, 'OutOfResources')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["246784 0 OutOfResources", "197632 1 loads"], out.stdout


@pytest.mark.xdist_group("sm90-report")
def test_dynamic_fma_count_equals_the_chains_multiply_adds(report):
    """The performance model's dynamic instruction count (tools/perf_model.py: each SASS
    instruction weighted by its loops' trip counts) on a real cubin: IGCV2(256, 8)'s forward
    (FMA path, no padding: 256 channels fill the register tile) executes one warp FFMA per 32
    of the chain's multiply-adds per position."""
    rows = [r for r in report if r["structure"] == "igcv2(256,8)" and r["direction"] == "forward"
            and r["dtype"] == "float32"]
    assert rows
    for r in rows:
        ffma = r["dyn"]["counts"]["FFMA/HFMA"] * r["num_warps"] / r["block_p"]
        assert ffma == pytest.approx(r["macs_per_position"] / 32, rel=0.02), r["dyn"]
        assert r["dyn"]["unresolved_loops"] == 0


_FP32_FORWARD = ["igcv2(64,4)", "igcv2(256,8)", "igcv2(256,32)", "igcv3-reduce(64,6,2)",
                 "condense(128,4)"]
_FP32_BACKWARD = ["igcv2(256,8)", "igcv2(1024,8)", "igcv2(2048,4)", "igcv3-reduce(64,6,2)"]


# the 16-bit tensor-core kernels' structures: igcv2(512,16): a 32-position tile, whose forward
# takes the pair items (two blocks of 8 outputs per item) in place (one tile of 64 positions
# instead of two of 32); igcv2(1024,8): in-place layers (one tile of 32 positions instead of two
# of 16), items of two groups
_MMA_16BIT = ["igcv2(256,8)", "igcv2(64,4)", "igcv3-reduce(64,6,2)", "igcv2(512,16)",
              "igcv2(1024,8)"]


@pytest.fixture(scope="module")
def cuda_report(tmp_path_factory):
    """One ``--cuda`` static report (one nvcc compile of every kernel) of the structures of the
    tests below: float32 for the CUDA-core kernels and the opt-in float32 tensor-core kernels,
    float16 and bfloat16 for the tensor-core kernels, both directions."""
    pytest.importorskip("triton")
    if not shutil.which("nvcc"):
        pytest.skip("nvcc is not on PATH")
    out = tmp_path_factory.mktemp("cuda") / "cuda.json"
    structures = list(dict.fromkeys(_FP32_FORWARD + _FP32_BACKWARD + _MMA_16BIT))
    _tool("--cuda", "--no-triton", "--structures", ";".join(structures), "--dtypes",
          "bfloat16,float16,float32", "--layouts", "nchw,channels_last", "--archs", "90",
          "--json", str(out))
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fp32_cuda_report(cuda_report):
    """The float32 records of ``cuda_report`` whose structures the float32 tests name."""
    keep = set(_FP32_FORWARD + _FP32_BACKWARD)
    return {**cuda_report, "rows": [r for r in cuda_report["rows"]
                                    if r.get("dtype") == "float32" and r["structure"] in keep]}


@pytest.mark.xdist_group("nvcc")
def test_cuda_core_float32_forward_model_counts_the_multiply_adds(fp32_cuda_report):
    """The static model of the CUDA-core float32 forward (``--cuda``: the SASS of its layer
    items and tile loops times the chain's items and vectors): per position one warp FFMA per
    32 of the chain's multiply-adds, for items with 16-byte weight loads (K = 4, 8, 16), with
    a loop over 16 k-steps (K = 32) and with a run-time K (192), each of 4 output rows; the
    kernel does not spill, the tile is the planner's, and every record becomes a labelled
    prediction."""
    report = {**fp32_cuda_report, "rows": [
        r for r in fp32_cuda_report["rows"] if r["kernel"] == "chain_forward_kernel"
        and r.get("per_position") and r["structure"] in _FP32_FORWARD]}
    rows = report["rows"]
    assert len(rows) == len(_FP32_FORWARD) * 2
    for r in rows:
        what = f"{r['structure']} {r['layout']}"
        ffma = r["dyn"]["counts"]["FFMA/HFMA"] * r["num_warps"] / r["block_p"]
        # the FMA class also holds the compiler's HFMA2.MMA register moves (a few per item):
        # at least the products, within 5%
        assert r["macs_per_position"] / 32 <= ffma <= 1.05 * r["macs_per_position"] / 32, what
        assert r["compiled"] and r["spill_bytes"] == 0 and r["registers"] <= 128, what
        # plan_forward: two fp32 [C][TP + 4] buffers of the widest layer fit two CTAs per SM
        tp, cmax = r["block_p"], max(r["c_x"], r["c_out"], 64 * 6 if "igcv3" in what else 0)
        assert r["shared_bytes"] == 2 * cmax * (tp + 4) * 4 + 16 * tp, what
        assert r["shared_bytes"] <= 233472 // 2 - 1024 < 2 * cmax * (2 * tp + 4) * 4, what
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import perf_model

    preds = [p for p in perf_model.records(report) if p["kernel"] == "chain_forward_kernel"
             and p["predicted_fraction_of_copy"] is not None]
    assert len(preds) == len(rows)
    for p in preds:
        assert p["prediction"].startswith("PREDICTED")
        assert 0 < p["predicted_fraction_of_copy"] <= 1.0, p


@pytest.mark.xdist_group("nvcc")
def test_cuda_core_float32_backward_model_counts_the_multiply_adds(fp32_cuda_report):
    """The static model of the CUDA-core float32 backward (the SASS of the functions the
    kernel calls, found by nvdisasm's labels, and of its weight-gradient blocks): per position
    at least one warp FFMA per 32 multiply-adds of the recompute (store-all, IGCV2(1024, 8) in
    tiles of 4 too: layers 1 .. L-1 once; recompute mode, IGCV2(2048, 4), six layers, whose
    intermediates do not fit even tiles of 4: layers 1 .. l for each l), of dh and of dW, within
    10% (HFMA2.MMA register moves; per-item overhead over tiles of 4 positions); labelled
    predictions."""
    report = {**fp32_cuda_report, "rows": [
        r for r in fp32_cuda_report["rows"] if r["kernel"] == "chain_backward_kernel"
        and r.get("per_position") and r["structure"] in _FP32_BACKWARD
        and r["layout"] == "nchw"]}
    rows = report["rows"]
    assert len(rows) == len(_FP32_BACKWARD)
    import igc_kernels as igc

    specs = {"igcv2(256,8)": igc.ChainSpec.igcv2(256, 8),
             "igcv2(1024,8)": igc.ChainSpec.igcv2(1024, 8),
             "igcv2(2048,4)": igc.ChainSpec.igcv2(2048, 4),
             "igcv3-reduce(64,6,2)": igc.ChainSpec([384, 64], [2])}
    for r in rows:
        macs = [c * k for c, k in specs[r["structure"]].weight_shapes()]
        store_all = r["config"]["store_all"]
        assert store_all == (r["structure"] != "igcv2(2048,4)"), r["structure"]
        recompute = (sum(macs[:-1]) if store_all
                     else sum(sum(macs[:l]) for l in range(1, len(macs))))
        expected = (recompute + 2 * sum(macs)) / 32
        ffma = r["dyn"]["counts"]["FFMA/HFMA"] * r["num_warps"] / r["block_p"]
        assert expected <= ffma <= 1.10 * expected, (r["structure"], ffma, expected)
        assert r["compiled"] and r["spill_bytes"] == 0, r["structure"]
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import perf_model

    preds = [p for p in perf_model.records(report) if p["kernel"] == "chain_backward_kernel"
             and p["predicted_fraction_of_copy"] is not None]
    assert len(preds) == len(rows)
    assert all(p["prediction"].startswith("PREDICTED") for p in preds)


def _assert_labelled_predictions(report, rows):
    """tools/perf_model.py turns every one of ``rows`` (records of ``report``) into a labelled
    prediction within copy bandwidth."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import perf_model

    preds = list(perf_model.records({**report, "rows": rows}))
    assert len(preds) == len(rows)
    for p in preds:
        assert p["prediction"].startswith("PREDICTED")
        assert 0 < p["predicted_fraction_of_copy"] <= 1.0, p


@pytest.mark.xdist_group("nvcc")
def test_float32_tensor_core_forward_model_counts_six_products(fp32_cuda_report):
    """The opt-in float32 tensor-core forwards (MmaF32x3, three bfloat16 planes, and MmaF32x2,
    two) in the same report: per position six (two planes: three) times the padded products
    of the 16-bit kernel, that many planes of shared memory per tile, no spills, not marked
    as the path a float32 call runs, and labelled predictions."""
    rows = [r for r in fp32_cuda_report["rows"] if r["kernel"] == "chain_forward_mma_kernel"
            and r["structure"] in _FP32_FORWARD]
    per_format = len(_FP32_FORWARD) * 2  # (two layouts)
    assert sorted(r["config"]["planes"] for r in rows) == [2] * per_format + [3] * per_format
    import igc_kernels as igc

    specs = {"igcv2(64,4)": igc.ChainSpec.igcv2(64, 4),
             "igcv2(256,8)": igc.ChainSpec.igcv2(256, 8),
             "igcv2(256,32)": igc.ChainSpec.igcv2(256, 32),
             "igcv3-reduce(64,6,2)": igc.ChainSpec([384, 64], [2]),
             "condense(128,4)": None}
    for r in rows:
        what = f"{r['structure']} {r['layout']} {r['config']['planes']} planes"
        planes = r["config"]["planes"]
        products = {3: 6, 2: 3}[planes]
        assert r["dtype"] == "float32", what
        assert not r["is_default"] and not r["fixed_path"], what
        assert r["compiled"] and r["spill_bytes"] == 0 and r["stack_bytes"] == 0, what
        assert r["registers"] <= 128, what
        spec = specs[r["structure"]]
        if spec is not None:
            padded = sum(g * 8 * -(-(cout // g) // 8) * (8 if n <= 8 else 16 * -(-n // 16))
                         for (cout, n), g in zip(spec.weight_shapes(), spec.groups))
            per_position = r["dyn"]["mma_fma"] * r["num_warps"] / r["block_p"]
            assert per_position == pytest.approx(products * padded, rel=1e-9), what
            if not r["config"]["in_place"]:
                chans = [spec.in_channels] + [c for c, _ in spec.weight_shapes()]
                n_rows = (-(-max(chans[0::2]) // 4) * 4) + (-(-max(chans[1::2]) // 4) * 4)
                tp = r["block_p"]
                assert r["shared_bytes"] == planes * (n_rows + 2) * tp * 2 + 16 * tp, what
    _assert_labelled_predictions(fp32_cuda_report, rows)


def _kpad(k):
    """a group's inputs padded to the mma shapes: m16n8k8 for at most 8, else k-steps of 16"""
    return 8 if k <= 8 else 16 * -(-k // 16)


def _padded_backward_products(spec):
    """multiply-adds per position of the tensor-core backward's padded products: the recompute
    of layers 1 .. L-1, dh = W^T du with n and m swapped, dW in 16 x 8 blocks of the group or
    two 16 x 8 products per pair of groups of at most 8 x 8 (the tile's positions as K)"""
    shapes = spec.weight_shapes()
    padded = 0
    for l, ((cout, n), g) in enumerate(zip(shapes, spec.groups)):
        m = cout // g
        if l + 1 < len(shapes):
            padded += g * 8 * -(-m // 8) * _kpad(n)  # the recompute
        padded += g * 8 * -(-n // 8) * _kpad(m)  # dh = W^T du
        if max(m, n) <= 8:  # dW: two groups per item, two 16 x 8 products
            padded += -(-g // 2) * 2 * 16 * 8
        else:  # dW: 16 x 8 blocks of a group
            padded += g * 16 * -(-max(m, n) // 16) * 8 * -(-min(m, n) // 8)
    return padded


def _backward_tile_rows(spec, reload):
    """rows of the tensor-core backward's store-all tiles (mma_backward_rows): x and dy (one
    tile of the wider with ``reload``) and u_1 .. u_{L-1}, each a multiple of 4"""
    chans = [spec.in_channels] + [c for c, _ in spec.weight_shapes()]
    x_dy = [max(chans[0], chans[-1])] if reload else [chans[0], chans[-1]]
    return sum(-(-c // 4) * 4 for c in x_dy + chans[1:-1])


@pytest.mark.xdist_group("nvcc")
def test_float32_tensor_core_backward_model_counts_six_products(cuda_report):
    """The opt-in float32 tensor-core backwards (MmaF32x3, and MmaF32x2 with two planes) in the
    same report: per position six (two planes: three) times the padded products of the 16-bit
    kernel (recompute, dh, dW), that many planes of shared memory per tile, the planner's tile
    (two CTAs of 32 positions where they fit, else two of 16, within 128 registers; else one
    CTA: IGCV2(512, 16) with three planes, which prefetches its next tile into L2; with x and
    dy in one tile where that gives more positions per SM: IGCV2(256, 8) and (512, 16) with two
    planes), no spills, not marked as the path a float32 call runs, labelled predictions; no
    record where the store-all tiles do not fit (IGCV2(1024, 8): the CUDA-core backward runs
    it)."""
    import igc_kernels as igc

    specs = {"igcv2(64,4)": igc.ChainSpec.igcv2(64, 4),
             "igcv2(256,8)": igc.ChainSpec.igcv2(256, 8),
             "igcv2(256,32)": igc.ChainSpec.igcv2(256, 32),
             "igcv2(512,16)": igc.ChainSpec.igcv2(512, 16),
             "igcv3-reduce(64,6,2)": igc.ChainSpec([384, 64], [2])}
    # planes: (tile, x and dy in one tile, two CTAs per SM)
    plans = {3: {"igcv2(64,4)": (32, False, True), "igcv2(256,8)": (16, False, True),
                 "igcv2(256,32)": (32, True, True), "igcv3-reduce(64,6,2)": (32, False, True),
                 "igcv2(512,16)": (16, False, False)},
             2: {"igcv2(64,4)": (32, False, True), "igcv2(256,8)": (32, True, True),
                 "igcv2(256,32)": (32, False, True), "igcv3-reduce(64,6,2)": (32, False, True),
                 "igcv2(512,16)": (16, True, True)}}
    rows = [r for r in cuda_report["rows"] if r["kernel"] == "chain_backward_mma_kernel"
            and r.get("dtype") == "float32" and r["structure"] in (*_FP32_FORWARD,
                                                                   *_FP32_BACKWARD, *specs)]
    for planes in (3, 2):
        assert sorted({r["structure"] for r in rows if r["config"]["planes"] == planes}) == \
            sorted([*specs, "condense(128,4)"]), planes
    for r in rows:
        planes = r["config"]["planes"]
        what = f"{r['structure']} {r['layout']} {planes} planes"
        assert r["dtype"] == "float32", what
        assert not r["is_default"] and not r["fixed_path"], what
        assert r["compiled"] and r["spill_bytes"] == 0 and r["stack_bytes"] == 0, what
        spec = specs.get(r["structure"])
        if spec is None:
            continue
        tp, reload, two = plans[planes][r["structure"]]
        assert (r["block_p"], r["config"]["reload_x"]) == (tp, reload), what
        assert (r["ctas_per_sm"] >= 2) == two and (not two or r["registers"] <= 128), what
        assert r["config"]["prefetch"] == (not two), what  # a lone CTA prefetches into L2
        per_position = r["dyn"]["mma_fma"] * r["num_warps"] / r["block_p"]
        products = {3: 6, 2: 3}[planes]
        assert per_position == pytest.approx(products * _padded_backward_products(spec),
                                             rel=1e-9), what
        n_rows = _backward_tile_rows(spec, reload)
        assert r["shared_bytes"] == planes * (n_rows + 2) * tp * 2 + 24 * tp, what
    _assert_labelled_predictions(cuda_report, rows)


@pytest.mark.xdist_group("nvcc")
def test_cuda_tensor_core_forward_model_counts_the_padded_products(cuda_report):
    """The static model of the CUDA tensor-core forward and backward (``--cuda``: nvcc for
    sm_90, the kernels' SASS loop bodies times the chain's items and k-steps): per position it
    counts exactly the multiply-adds of the padded products (forward: groups of n <= 8 inputs
    as m16n8k8, wider ones in k-steps of 16, outputs in blocks of 8; backward: the recompute of
    layers 1 .. L-1, dh = W^T du with n and m swapped, dW in 16 x 8 blocks of the group, or
    two 16 x 8 products per pair of groups of at most 8 x 8, with the tile's positions as K),
    the kernels do not spill, and tools/perf_model.py turns every record into a labelled
    prediction."""
    report = {**cuda_report, "rows": [r for r in cuda_report["rows"]
                                      if r.get("dtype") in ("bfloat16", "float16")
                                      and r["structure"] in _MMA_16BIT]}
    rows = [r for r in report["rows"] if r["kernel"] == "chain_forward_mma_kernel"]
    assert len(rows) == 5 * 2 * 2
    import igc_kernels as igc

    specs = {"igcv2(256,8)": igc.ChainSpec.igcv2(256, 8), "igcv2(64,4)": igc.ChainSpec.igcv2(64, 4),
             "igcv3-reduce(64,6,2)": igc.ChainSpec([384, 64], [2]),
             "igcv2(512,16)": igc.ChainSpec.igcv2(512, 16),
             "igcv2(1024,8)": igc.ChainSpec.igcv2(1024, 8)}
    for r in rows:
        what = f"{r['structure']} {r['dtype']} {r['layout']}"
        spec = specs[r["structure"]]
        padded = 0
        for (cout, n), g in zip(spec.weight_shapes(), spec.groups):
            kpad = 8 if n <= 8 else 16 * -(-n // 16)
            padded += g * 8 * -(-(cout // g) // 8) * kpad
        per_position = r["dyn"]["mma_fma"] * r["num_warps"] / r["block_p"]
        assert per_position == pytest.approx(padded, rel=1e-9), what
        assert r["compiled"] and r["spill_bytes"] == 0 and r["ctas_per_sm"] >= 1, what
        # no local memory at all (a kernel argument indexed at run time is copied there)
        assert r["stack_bytes"] == 0, what
        assert r["block_p"] in (16, 32, 64), what
        # in-place layers where two tiles would not leave room for two CTAs: one tile of
        # C + 2 rows (and the offsets)
        tiles = {"igcv2(1024,8)": (1024, 32), "igcv2(512,16)": (512, 64)}
        in_place = r["structure"] in tiles
        assert r["config"]["in_place"] == in_place, what
        if in_place:
            c, tp = tiles[r["structure"]]
            assert r["block_p"] == tp and r["shared_bytes"] == (c + 2) * tp * 2 + tp * 16, what
        # items of two blocks of 8 outputs of a group of 16 (tiles of 16 or 32 positions, any
        # tile in place) or of two groups of at most 8 (16 or 32 positions): here, the in-place
        # chains; the others have 64-position tiles
        assert r["dyn"]["pair_item_layers"] == (len(spec.groups) if in_place else 0), what
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import perf_model

    back = [r for r in report["rows"] if r["kernel"] == "chain_backward_mma_kernel"]
    assert len(back) == 5 * 2 * 2
    for r in back:
        what = f"{r['structure']} {r['dtype']} {r['layout']} backward"
        spec = specs[r["structure"]]
        per_position = r["dyn"]["mma_fma"] * r["num_warps"] / r["block_p"]
        assert per_position == pytest.approx(_padded_backward_products(spec), rel=1e-9), what
        assert r["compiled"] and r["spill_bytes"] == 0 and r["registers"] <= 128, what
        assert r["stack_bytes"] == 0, what
        assert r["block_p"] in (16, 32, 64), what
        # x and dy in one tile where that gives more positions per SM: IGCV2(256, 8) 64
        # positions instead of 32, (512, 16) 32 instead of 16 (then 64, one CTA: below)
        reload = r["structure"] in ("igcv2(256,8)", "igcv2(512,16)")
        assert r["config"]["reload_x"] == reload, what
        # the next tile prefetched into L2 where one CTA runs per SM (IGCV2(1024, 8): four
        # store-all tiles of 16 positions; IGCV2(512, 16): its fp32 row has the bytes of its
        # 32-position tile's x, dy and dx, so one CTA of 64, mma_backward_wide_tile) and the
        # rows and those tiles fit the L2's margin
        one = r["structure"] in ("igcv2(1024,8)", "igcv2(512,16)")
        assert (r["ctas_per_sm"] == 1) == one and r["config"]["prefetch"] == one, what
        assert r["block_p"] == {"igcv2(1024,8)": 16, "igcv2(512,16)": 64}.get(
            r["structure"], r["block_p"]), what
        n_rows = _backward_tile_rows(spec, reload)
        assert r["shared_bytes"] == (n_rows + 2) * r["block_p"] * 2 + 3 * r["block_p"] * 8, what
    preds = [p for p in perf_model.records(report)
             if p["kernel"] in ("chain_forward_mma_kernel", "chain_backward_mma_kernel")]
    assert len(preds) == len(rows) + len(back)
    for p in preds:
        assert p["prediction"].startswith("PREDICTED")
        assert 0 < p["predicted_fraction_of_copy"] <= 1.0, p
