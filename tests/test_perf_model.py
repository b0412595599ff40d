"""The performance model (tools/perf_model.py) on synthetic SASS: loop trip counts (element and
byte counters, a predicate copied from a uniform predicate, a runtime-bounded tile loop), the
prediction's bounds, and measured-beside-predicted pairing. The model on real cubins is checked
in tests/test_gpu_static.py (slow): the dynamic FMA count of a compiled forward equals the
chain's multiply-adds."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import perf_model as pm  # noqa: E402


def _sass(lines):
    return "\n".join(f"        /*{a:04x}*/                   {t} ;" for a, t in lines)


# Prologue, a counted loop of 8 (element counter, 64-bit compare, predicate copied from a
# uniform predicate), a loop of 32 counted in bytes (step 4 up to 0x80), an epilogue.
COUNTED = _sass([
    (0x0000, "MOV R1, c[0x0][0x28]"),
    (0x0010, "CS2R R10, SRZ"),
    (0x0020, "FFMA R2, R3, R4, R2"),        # loop 1 body
    (0x0030, "SHFL.IDX PT, R5, R6, R7, 0x1f"),
    (0x0040, "UIADD3 UR4, UP0, UR4, 0x1, URZ"),
    (0x0050, "UISETP.NE.U32.AND UP0, UPT, UR4, 0x8, UPT"),
    (0x0060, "UISETP.NE.U32.AND.EX UP0, UPT, UR5, URZ, UPT, UP0"),
    (0x0070, "PLOP3.LUT P6, PT, PT, PT, UP0, 0x80, 0x0"),
    (0x0080, "@P6 BRA 0x20"),
    (0x0090, "FFMA R2, R3, R4, R2"),        # loop 2 body
    (0x00a0, "LDS.128 R12, [R13]"),
    (0x00b0, "IADD3 R10, P0, R10, 0x4, RZ"),
    (0x00c0, "ISETP.NE.U32.AND P0, PT, R10, 0x80, PT"),
    (0x00d0, "@P0 BRA 0x90"),
    (0x00e0, "STG.E desc[UR4][R8.64], R2"),
    (0x00f0, "EXIT"),
    (0x0100, "BRA 0x100"),
])


def test_counted_loops_are_weighted_by_their_trip_counts():
    ins = pm.parse_sass(COUNTED)
    assert [(s, e, t) for s, e, t in pm._loops(ins)] == [(0x20, 0x80, 8), (0x90, 0xD0, 32)]
    d = pm.dynamic_counts(COUNTED, persistent=False)
    assert d["counts"]["FFMA/HFMA"] == 8 + 32
    assert d["counts"]["SHFL"] == 8
    assert d["counts"]["LDS/STS"] == 32
    assert d["smem_bytes"] == 32 * 32 * 16  # 32 LDS.128 of 32 lanes x 16 bytes
    assert d["counts"]["LDG/STG"] == 1
    assert d["unresolved_loops"] == 0


def test_spilled_registers_count_as_l1_traffic():
    sass = _sass([(0x0000, "STL.64 [R1], R2"), (0x0010, "LDL R3, [R1+0x8]"), (0x0020, "EXIT")])
    d = pm.dynamic_counts(sass, persistent=False)
    assert d["local_bytes"] == 32 * 8 + 32 * 4 and d["smem_bytes"] == 0
    row = _row(ctas_per_sm=64)
    row["dyn"]["local_bytes"] = 1e6
    assert pm.predict(row, pm.DEVICES["h200"])["bound"] == "shared/L1"


# A persistent kernel: the outer loop over tiles has a runtime bound (register compare).
PERSISTENT = _sass([
    (0x0000, "MOV R1, c[0x0][0x28]"),
    (0x0010, "LDG.E R20, desc[UR4][R8.64]"),  # prologue: amortised over the tiles
    (0x0020, "FFMA R2, R3, R4, R2"),            # tile loop body
    (0x0030, "FFMA R2, R3, R4, R2"),            # inner loop of 4
    (0x0040, "IADD3 R11, R11, 0x1, RZ"),
    (0x0050, "ISETP.NE.AND P1, PT, R11, 0x4, PT"),
    (0x0060, "@P1 BRA 0x30"),
    (0x0070, "IADD3 R9, R9, R12, RZ"),
    (0x0080, "ISETP.GE.AND P0, PT, R9, R13, PT"),
    (0x0090, "@!P0 BRA 0x20"),
    (0x00a0, "EXIT"),
])


def test_persistent_kernels_count_the_tile_loop_body_once_per_tile():
    d = pm.dynamic_counts(PERSISTENT, persistent=True)
    assert d["tile_loop"]
    assert d["counts"]["FFMA/HFMA"] == 1 + 4
    assert d["counts"]["LDG/STG"] == 0  # prologue
    assert d["unresolved_loops"] == 0
    # not persistent: the runtime loop is unresolved and counted once, the prologue counts
    d2 = pm.dynamic_counts(PERSISTENT, persistent=False)
    assert d2["unresolved_loops"] == 1 and d2["counts"]["LDG/STG"] == 1


def _row(**kw):
    row = {"dtype": "float32", "direction": "forward", "c_x": 256, "c_out": 256,
           "block_p": 16, "num_warps": 4, "ctas_per_sm": 4,
           "dyn": {"counts": {c: 0.0 for c in pm.CLASSES}, "smem_bytes": 0.0,
                   "mma_fma": 0.0, "tf32_fma": 0.0}}
    row.update(kw)
    return row


def test_prediction_bounds():
    dev = pm.DEVICES["h200"]
    # nothing to compute, enough CTAs: memory bound at the copy bandwidth
    p = pm.predict(_row(ctas_per_sm=64), dev)
    assert p["bound"] == "memory" and p["fraction_of_copy"] == pytest.approx(1.0)
    # one CTA per SM loads, waits, stores: load / (latency + load) of the bandwidth
    p1 = pm.predict(_row(ctas_per_sm=1), dev)
    t_mem = 16 * (256 + 256) * 4 / (dev.copy_bytes_per_s / dev.sms)
    assert p1["bound"] == "latency"
    assert p1["fraction_of_copy"] == pytest.approx(t_mem / (dev.dram_latency_ns * 1e-9 + t_mem))
    # shuffles are a quarter of the FMA rate: a shuffle per FMA makes the shuffle pipe bound
    heavy = _row(ctas_per_sm=64)
    heavy["dyn"]["counts"].update({"FFMA/HFMA": 2000.0, "SHFL": 2000.0})
    ph = pm.predict(heavy, dev)
    assert ph["bound"] == "shuffle" and ph["fraction_of_copy"] < 1.0
    # more instructions never predict more bandwidth; the backward moves more bytes
    heavier = _row(ctas_per_sm=64)
    heavier["dyn"]["counts"].update({"FFMA/HFMA": 2000.0, "SHFL": 4000.0})
    assert pm.predict(heavier, dev)["fraction_of_copy"] < ph["fraction_of_copy"]
    assert pm.copy_bytes_per_position(_row(direction="backward")) == (2 * 256 + 256) * 4
    # a slower copy (H100) makes the same kernel closer to its copy bandwidth
    assert pm.predict(heavy, pm.DEVICES["h100"])["fraction_of_copy"] > ph["fraction_of_copy"]


def test_backward_partial_rows_beyond_l2_count_as_memory_traffic():
    """The CUDA backward's per-CTA fp32 dW rows: within three quarters of the L2 (the planner's
    margin) they cost nothing in the model; beyond it, each tile's read and write of its row
    joins the memory term (IGCV2(1024, 16): 49152 weights, 192 KiB a row, 2 CTAs on 132 SMs:
    49.5 of the 50 MiB)."""
    dev = pm.DEVICES["h200"]
    small = _row(direction="backward", backend="cuda", ctas_per_sm=2, macs_per_position=6144)
    assert pm.partial_row_bytes(small, dev) == 0.0  # 264 rows of 24 KB: 6.5 MB
    # the margin: 264 rows of 128 KiB (IGCV2(512, 32)) are 33 MiB, within 37.5; of 152 KiB, 39
    assert pm.partial_row_bytes(dict(small, macs_per_position=32768), dev) == 0.0
    assert pm.partial_row_bytes(dict(small, macs_per_position=38912), dev) == 2 * 4 * 38912
    big = _row(direction="backward", backend="cuda", ctas_per_sm=2, macs_per_position=49152)
    assert pm.partial_row_bytes(big, dev) == 2 * 4 * 49152
    fits = dict(big, ctas_per_sm=1)
    assert pm.partial_row_bytes(fits, dev) == 0.0  # 132 rows: 26 MB
    p_big, p_none = pm.predict(big, dev), pm.predict(dict(big, macs_per_position=0), dev)
    assert p_big["fraction_of_copy"] < p_none["fraction_of_copy"]
    assert p_big["partial_row_bytes_per_tile"] == 2 * 4 * 49152
    assert pm.partial_row_bytes(dict(big, backend="triton"), dev) == 0.0
    assert pm.partial_row_bytes(dict(big, direction="forward"), dev) == 0.0


def test_l2_term_counts_the_tile_the_reload_and_the_gradient_row():
    """What a tile moves between the SM and the L2 at the SM's share of the L2 bandwidth: its
    own bytes, x again where the backward reloads it, the CUDA backward's fp32 row (read
    and written unless the record says how many bytes cross, as reductions in L2 halve it),
    and the weight blocks a Triton backward loads every tile where the record gives them."""
    dev = pm.DEVICES["h200"]
    share = dev.l2_read_bytes_per_s / dev.sms
    fwd = _row(ctas_per_sm=64)
    assert pm.l2_bytes_per_tile(fwd) == 16 * (256 + 256) * 4
    p = pm.predict(fwd, dev)  # the L2 is faster than the copy: never the bound alone
    assert p["terms_per_tile_ns"]["L2"] == pytest.approx(16 * 512 * 4 / share * 1e9)
    assert p["bound"] == "memory"
    bwd = _row(direction="backward", backend="cuda", ctas_per_sm=4, macs_per_position=12288,
               dtype="bfloat16")
    tile = 16 * (2 * 256 + 256) * 2
    assert pm.l2_bytes_per_tile(bwd) == tile + 8 * 12288  # read and written
    red = dict(bwd, config={"row_l2_bytes": 4 * 12288})
    assert pm.l2_bytes_per_tile(red) == tile + 4 * 12288
    assert pm.l2_bytes_per_tile(dict(red, config={"row_l2_bytes": 4 * 12288, "reload_x": True})
                                ) == tile + 4 * 12288 + 16 * 256 * 2
    assert pm.l2_bytes_per_tile(dict(bwd, backend="triton")) == tile + 8 * 12288  # its row
    # and the weight blocks a Triton backward loads every tile (W_TILE), as the record says
    assert pm.l2_bytes_per_tile(dict(bwd, backend="triton", config={
        "row_l2_bytes": 4 * 12288, "weights_l2_bytes": 2 * 12288})) == tile + 6 * 12288
    assert pm.l2_bytes_per_tile(dict(bwd, backend="other")) == tile  # no fp32 row
    p_rw, p_red = pm.predict(bwd, dev), pm.predict(red, dev)
    assert p_rw["bound"] == p_red["bound"] == "L2"
    assert p_red["fraction_of_copy"] == pytest.approx(
        p_rw["fraction_of_copy"] * (tile + 8 * 12288) / (tile + 4 * 12288))


def test_prefetched_backward_tiles_wait_for_l2_not_dram():
    """A CUDA backward record with ``config["prefetch"]`` (one CTA per SM that prefetched its
    tile into L2): the latency term is the L2 hit plus the compute plus the loads (x and dy,
    not the stores) at the SM's share of the L2 read bandwidth; the memory term is unchanged."""
    dev = pm.DEVICES["h200"]
    row = _row(direction="backward", backend="cuda", ctas_per_sm=1)
    row["config"] = {"TP": 16}
    plain = pm.predict(row, dev)
    pre = pm.predict(dict(row, config={"TP": 16, "prefetch": True}), dev)
    loads = 16 * (256 + 256) * 4
    assert pm.load_bytes_per_position(row) * 16 == loads
    want = dev.l2_latency_ns + loads / (dev.l2_read_bytes_per_s / dev.sms) * 1e9
    assert pre["terms_per_tile_ns"]["latency"] == pytest.approx(want)
    assert pre["terms_per_tile_ns"]["memory"] == plain["terms_per_tile_ns"]["memory"]
    assert plain["bound"] == "latency"
    assert pre["fraction_of_copy"] > plain["fraction_of_copy"]
    # two CTAs per SM halve it as they halve the plain one
    two = pm.predict(dict(row, ctas_per_sm=2, config={"TP": 16, "prefetch": True}), dev)
    assert two["terms_per_tile_ns"]["latency"] == pytest.approx(want / 2)
    assert pm.load_bytes_per_position(dict(row, direction="forward")) == 256 * 4


def test_persistent_programs_cap_the_tiles_in_flight_and_overlap_their_next_loads():
    """A persistent grid's programs per SM cap k, the tiles in flight per SM, whatever else
    would fit (the Triton backward: two programs per SM, one for large partial rows; a record
    without the field but with its kernel name counts one, as that kernel launched then); a
    program that loads its next tile before computing this one
    (``next_tile_loaded``) takes the longer of the computation and the loads' latency plus
    transfer instead of their sum, and one that loads two tiles ahead (``tiles_ahead``) the
    longer of the computation and half of them; one that loads its own tile in two round trips
    (``load_phases``: the backward's DY_LATE) waits for DRAM twice."""
    dev = pm.DEVICES["h200"]
    row = _row(direction="backward", backend="triton", ctas_per_sm=4, kernel="igc_chain_bwd")
    row["dyn"]["counts"]["other"] = 4000.0  # 4 warps x 4000 instructions per tile
    t_mem = 16 * (2 * 256 + 256) * 4 / (dev.copy_bytes_per_s / dev.sms) * 1e9
    t_issue = 4 * 4000 / dev.issue_per_clk / dev.clock_hz * 1e9
    one = pm.predict(dict(row, programs_per_sm=1), dev)
    assert one["terms_per_tile_ns"]["latency"] == pytest.approx(
        dev.dram_latency_ns + t_issue + t_mem)
    assert pm.predict(row, dev)["terms_per_tile_ns"] == one["terms_per_tile_ns"]  # by name
    late = pm.predict(dict(row, programs_per_sm=1, load_phases=2), dev)
    assert late["terms_per_tile_ns"]["latency"] == pytest.approx(
        2 * dev.dram_latency_ns + t_issue + t_mem)
    assert pm.predict(dict(row, programs_per_sm=1, load_phases=1), dev) == one
    two = pm.predict(dict(row, programs_per_sm=2), dev)
    assert two["terms_per_tile_ns"]["latency"] == pytest.approx(
        one["terms_per_tile_ns"]["latency"] / 2)
    free = pm.predict(dict(row, kernel="k"), dev)  # not persistent: the 4 CTAs that fit
    assert free["terms_per_tile_ns"]["latency"] == pytest.approx(
        one["terms_per_tile_ns"]["latency"] / 4)
    over = pm.predict(dict(row, programs_per_sm=1, next_tile_loaded=True), dev)
    assert over["terms_per_tile_ns"]["latency"] == pytest.approx(
        max(t_issue, dev.dram_latency_ns + t_mem))
    assert over["fraction_of_copy"] > one["fraction_of_copy"]
    for ahead in (0, 1):  # 0: records made before the field, as one
        same = pm.predict(dict(row, programs_per_sm=1, next_tile_loaded=True,
                               tiles_ahead=ahead), dev)
        assert same["terms_per_tile_ns"] == over["terms_per_tile_ns"]
    row["dyn"]["counts"]["other"] = 400.0  # the loads' latency exceeds the computation
    t_issue /= 10
    ahead2 = pm.predict(dict(row, programs_per_sm=1, next_tile_loaded=True, tiles_ahead=2),
                        dev)
    assert dev.dram_latency_ns + t_mem > 2 * t_issue
    assert ahead2["terms_per_tile_ns"]["latency"] == pytest.approx(
        max(t_issue, (dev.dram_latency_ns + t_mem) / 2))


def test_merged_reports_keep_every_route_to_a_compile(tmp_path):
    """A compile listed twice (one report of every configuration lists the default and the
    autotuner's same configuration; two reports may list one compile) counts once, with the
    flags of every exact listing OR-ed: the default row is the fixed path's, the other the
    autotuner's, and the launcher reaches the compile by either. A default-only report's
    flags give way to an exact report's."""
    base = dict(backend="triton", toolchain="triton x", structure="s", dtype="float32",
                layout="nchw", direction="forward", arch="sm_90", kernel="k",
                config={"BLOCK_P": 16})
    exact = [dict(base, is_default=True, fixed_path=True, autotuner_keeps=False,
                  reachable=True, flags_exact=True),
             dict(base, is_default=False, fixed_path=False, autotuner_keeps=True,
                  reachable=True, flags_exact=True)]
    rough = [dict(base, is_default=True, fixed_path=True, autotuner_keeps=False,
                  reachable=True, flags_exact=False)]
    paths = []
    for name, rows in (("rough", rough), ("exact", exact)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"command": name, "rows": rows}))
    (row,) = pm.merge_reports([str(p) for p in paths])["rows"]
    assert row["autotuner_keeps"] and row["fixed_path"] and row["reachable"], row
    assert row["is_default"] and row["flags_exact"], row


def test_records_label_predictions_and_pair_measurements():
    base = dict(structure="igcv2(256,8)", layout="nchw", arch="sm_90", toolchain="triton x",
                kernel="k", config={"BLOCK_P": 16}, compiled=True, registers=100,
                spill_bytes=0, shared_bytes=1024, per_position=True, is_default=True)
    report = {"rows": [{**_row(ctas_per_sm=64), **base},
                       {**_row(), **base, "per_position": False, "kernel": "reduce"},
                       {**_row(), **base, "arch": "sm_80"}]}
    recs = pm.records(report, "h200")
    assert [r["bound"] for r in recs] == ["memory", "one-off (not per position)",
                                         "no model for sm_80"]
    assert all(r["prediction"].startswith("PREDICTED") for r in recs)
    assert recs[0]["predicted_fraction_of_copy"] == pytest.approx(1.0)
    assert "PREDICTIONS" in pm.markdown(recs, "cmd")
    gpu_row = {"kind": "fused", "metric": "time", "mode": "fwd", "backend": "triton",
               "config": {"channels": 256, "group_size": 8, "depth": None},
               "dtype": "float32", "layout": "nchw", "frac_copy_bw": 0.5}
    # the IGCV2 depth given explicitly (bench.py's targets) is the same structure; another
    # depth is not
    explicit = {**gpu_row, "config": {**gpu_row["config"], "depth": 3}}
    other = {**gpu_row, "config": {**gpu_row["config"], "depth": 4}}
    lines = pm.measured_beside_predicted(recs, {"rows": [
        gpu_row, {**gpu_row, "dtype": "bfloat16"}, {**gpu_row, "kind": "chain"}, explicit,
        other]})
    assert lines == ["triton forward igcv2(256,8) float32 nchw: measured 50%, predicted 100%",
                     "triton forward igcv2(256,8) bfloat16 nchw: measured 50%, no prediction",
                     "triton forward igcv2(256,8) float32 nchw: measured 50%, predicted 100%"]
    # beside the fixed path's prediction: only records it takes
    assert pm.measured_beside_predicted(recs, {"rows": [gpu_row]}, fixed=True) == [
        "triton forward igcv2(256,8) float32 nchw: measured 50%, predicted for the fixed path "
        "100%"]
    # records of two toolchains (the GPU's Triton beside the CI's): one prediction each, named
    other_tc = [{**recs[0], "toolchain": "triton w", "predicted_fraction_of_copy": 0.25}]
    assert pm.measured_beside_predicted(recs + other_tc, {"rows": [gpu_row]}, fixed=True) == [
        "triton forward igcv2(256,8) float32 nchw: measured 50%, predicted for the fixed path "
        "25% (triton w), 100% (triton x)"]
    unfixed = [{**r, "fixed_path": False} for r in recs]
    assert pm.measured_beside_predicted(unfixed, {"rows": [gpu_row]}, fixed=True) == [
        "triton forward igcv2(256,8) float32 nchw: measured 50%, no prediction"]
    assert [pm._igcv2_depth(c, k) for c, k in ((256, 8), (1024, 8), (1024, 32), (512, 16),
                                                (8, 8), (9, 8))] == [3, 4, 2, 3, 1, 2]


def test_items_count_the_first_k_step_without_bias():
    """``without_bias_paths`` (the CUDA tensor-core items of tools/gpu_static.py): of an item's
    two first k-steps (with the bias as the HMMAs' c, or from zero: ``RZ``), the static model
    keeps the one the report's bias-free chains run; a branch between two variants of a layer
    (loops or other branches inside) is not such a pair."""
    item = _sass([
        (0x0000, "LDG.E.64 R50, desc[UR12][R50.64]"),
        (0x0010, "@P1 BRA 0x60"),
        (0x0020, "LDG.E R36, desc[UR12][R28.64]"),      # the bias copy
        (0x0030, "IMAD.MOV.U32 R38, RZ, RZ, R36"),
        (0x0040, "HMMA.16816.F32.BF16 R28, R32, R50, R36"),
        (0x0050, "BRA 0x70"),
        (0x0060, "HMMA.16816.F32.BF16 R28, R32, R50, RZ"),  # from zero
        (0x0070, "F2FP.BF16.F32.PACK_AB R28, R29, R28"),
        (0x0080, "EXIT"),
    ])
    ins = pm.parse_sass(item)
    kept = [a for a, _, _, _ in pm.without_bias_paths(ins)]
    assert kept == [0x00, 0x10, 0x60, 0x70, 0x80]
    # both copies take the bias (no RZ), or the skipped block holds a loop: nothing dropped
    for sass in (item.replace("R50, RZ", "R50, R36"),
                 item.replace("IMAD.MOV.U32 R38, RZ, RZ, R36", "@P2 BRA 0x20")):
        ins = pm.parse_sass(sass)
        assert pm.without_bias_paths(ins) == ins


def test_tile_moves_take_the_plain_loop_unless_the_chain_gathers():
    """``_tile_move_model`` of tools/gpu_static.py keeps, beside the innermost loop of each kind,
    the cheapest (``_min``) and the costliest (``_max``) loop; the tensor-core records take the
    cheapest for a tile the chain moves plainly, the costliest for one moved through an index
    (``_move_sfx``). Here a plain NCHW load of 5 instructions per vector and a gathered one of 8
    (its channel read from the index first). In a process of its own: the tool refuses
    TRITON_INTERPRET, which the fast suite sets."""
    import json
    import subprocess

    sass = _sass([
        (0x0000, "MOV R1, c[0x0][0x28]"),
        (0x0010, "LDG.E.128 R4, desc[UR4][R2.64]"),   # plain: row pointer steps
        (0x0020, "STS.128 [R8], R4"),
        (0x0030, "IADD3 R2, P0, R2, R10, RZ"),
        (0x0040, "ISETP.GE.AND P1, PT, R9, R11, PT"),
        (0x0050, "@!P1 BRA 0x10"),
        (0x0060, "LDG.E R12, desc[UR4][R14.64]"),     # gathered: the channel from the index
        (0x0070, "IMAD.WIDE R16, R12, R18, R20"),
        (0x0080, "LEA R16, P2, R16, R22, 0x1"),
        (0x0090, "LDG.E.128 R4, desc[UR4][R16.64]"),
        (0x00a0, "STS.128 [R8], R4"),
        (0x00b0, "IADD3 R14, P0, R14, 0x4, RZ"),
        (0x00c0, "ISETP.GE.AND P1, PT, R9, R11, PT"),
        (0x00d0, "@!P1 BRA 0x60"),
        (0x00e0, "EXIT"),
    ])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import json, sys; sys.path.insert(0, 'tools'); import gpu_static as gs, "
            "perf_model as pm; ins = pm.parse_sass(sys.stdin.read()); "
            "m = gs._tile_move_model(ins, pm._loops(ins)); "
            "print(json.dumps({k: sum(v['counts'].values()) for k, v in m.items()} | "
            "{'sfx': [gs._move_sfx(False), gs._move_sfx(True)]}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], input=sass, cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["load_nchw_min"] == 5 and got["load_nchw_max"] == 8, got
    assert got["load_nchw"] == 5  # the innermost: the shorter span
    assert got["sfx"] == ["_min", "_max"]


def test_staged_backward_adds_its_launches_times():
    """The Triton backend's staged backward (``pm.staged``): records of a chain's layer ranges
    ``NAME[a:b]`` (the fixed path's) that cover its layers one after the other give one
    prediction, the launches' times per position added (each range's forward but the last's,
    each range's backward) against the whole chain's copy. Memory-bound parts at their own copy
    speed: 2 + 3 + 3 copies of a 256-channel float32 tensor per position for the 3 of the whole
    backward, 3/8. Ranges that leave a gap, a missing forward, or rows the fixed path does not
    take give none."""
    base = dict(backend="triton", toolchain="triton x", layout="nchw", arch="sm_90",
                kernel="k", config={}, compiled=True, spill_bytes=0, per_position=True,
                fixed_path=True, ctas_per_sm=64)
    rows = [_row(**base, structure="s[0:2]"),
            _row(**base, structure="s[0:2]", direction="backward"),
            _row(**base, structure="s[2:4]", direction="backward"),
            _row(**{**base, "fixed_path": False}, structure="s[2:4]")]
    for r in rows:
        assert pm.predict(r, pm.DEVICES["h200"])["fraction_of_copy"] == pytest.approx(1.0)
    (rec,) = pm.staged(rows, "h200")
    assert rec["structure"] == "s" and rec["stages"] == [[0, 2], [2, 4]], rec
    assert rec["predicted_fraction_of_copy"] == pytest.approx(3 / 8, abs=1e-4), rec
    assert [(p["range"], p["direction"]) for p in rec["parts"]] == [
        ([0, 2], "forward"), ([2, 4], "backward"), ([0, 2], "backward")]
    assert rec["prediction"].startswith("PREDICTED")
    assert "PREDICTIONS" in pm.staged_markdown([rec]) and pm.staged_markdown([]) == ""
    assert pm.staged(rows[1:], "h200") == []  # the first range's forward is missing
    assert pm.staged([rows[0], rows[2]], "h200") == []  # layers 0..1's backward is missing
    gap = [rows[0], rows[1], _row(**base, structure="s[3:4]", direction="backward")]
    assert pm.staged(gap, "h200") == []


def test_measured_backward_of_a_staged_chain_pairs_with_the_staged_prediction():
    """Where the backend stages a chain's backward, a measurement of it is paired with the
    staged prediction of that toolchain, not its whole chain's fixed path."""
    whole = dict(backend="triton", direction="backward", structure="igcv2(1024,8)",
                 dtype="bfloat16", layout="nchw", toolchain="triton x", reachable=True,
                 fixed_path=True, predicted_fraction_of_copy=0.02)
    stage = dict(backend="triton", toolchain="triton x", structure="igcv2(1024,8)",
                 dtype="bfloat16", layout="nchw", predicted_fraction_of_copy=0.19)
    row = {"kind": "fused", "metric": "time", "mode": "bwd", "backend": "triton",
           "config": {"channels": 1024, "group_size": 8, "depth": None}, "dtype": "bfloat16",
           "layout": "nchw", "frac_copy_bw": 0.1}
    assert pm.measured_beside_predicted([whole], {"rows": [row]}, True) == [
        "triton backward igcv2(1024,8) bfloat16 nchw: measured 10%, predicted for the fixed "
        "path 2%"]
    assert pm.measured_beside_predicted([whole], {"rows": [row]}, True, [stage]) == [
        "triton backward igcv2(1024,8) bfloat16 nchw: measured 10%, predicted for the fixed "
        "path 19% (staged)"]
    other = {**whole, "toolchain": "triton w", "predicted_fraction_of_copy": 0.03}
    assert pm.measured_beside_predicted([whole, other], {"rows": [row]}, True, [stage]) == [
        "triton backward igcv2(1024,8) bfloat16 nchw: measured 10%, predicted for the fixed "
        "path 3% (triton w), 19% (triton x, staged)"]


def test_a_chain_whose_whole_backward_fits_packed_is_not_reported_staged():
    """A chain with layer-range records whose whole-chain fixed path is a packed build without
    spills runs whole (``_triton_ops.backward_stages`` stages only chains left on the FMA path
    or spilling everywhere): the fixed path column keeps its prediction and names the ranges'
    as not run, and a measurement pairs with the whole chain's prediction; an FMA or spilling
    whole-chain fixed path is replaced by the staged prediction."""
    stage = dict(backend="triton", toolchain="triton x", structure="igcv2(256,32)",
                 dtype="float32", layout="nchw", arch="sm_90", predicted_fraction_of_copy=0.21,
                 stages=[[0, 1], [1, 2]], parts=[], spill_bytes=0,
                 predicted_fraction_of_copy_h100=0.3)
    whole = dict(backend="triton", toolchain="triton x", direction="backward",
                 structure="igcv2(256,32)", dtype="float32", layout="nchw", arch="sm_90",
                 kernel="igc_chain_bwd", reachable=True, fixed_path=True,
                 autotuner_keeps=False, registers=255, spill_bytes=0, bound="shared/L1",
                 predicted_fraction_of_copy=0.24, predicted_fraction_of_copy_h100=0.34,
                 config={"BLOCK_P": 16, "num_warps": 8, "PACK": 2})
    row = {"kind": "fused", "metric": "time", "mode": "bwd", "backend": "triton",
           "config": {"channels": 256, "group_size": 32, "depth": None}, "dtype": "float32",
           "layout": "nchw", "frac_copy_bw": 0.2}
    fma = {**whole, "config": {"BLOCK_P": 16, "num_warps": 4}, "predicted_fraction_of_copy": 0.1}
    spilling = {**whole, "spill_bytes": 8}
    assert "24% (ranges: 21%, not run)" in pm.markdown([whole], "cmd", [stage])
    assert pm.measured_beside_predicted([whole], {"rows": [row]}, True, [stage]) == [
        "triton backward igcv2(256,32) float32 nchw: measured 20%, predicted for the fixed "
        "path 24%"]
    for r in (fma, spilling):
        assert "(staged: 21%)" in pm.markdown([r], "cmd", [stage])
        assert pm.measured_beside_predicted([r], {"rows": [row]}, True, [stage])[0].endswith(
            "predicted for the fixed path 21% (staged)")
