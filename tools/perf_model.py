"""Performance model of the GPU kernels: turns the static report of tools/gpu_static.py (compiled
SASS, registers, shared memory, occupancy) into a predicted time per position on an H100 / H200,
and the fraction of copy bandwidth that time reaches. PREDICTIONS, not measurements: nothing here
ran on a GPU. docs/benchmarks.md ("Performance model") states the model and its assumptions.

    python tools/gpu_static.py --json benchmarks/out/gpu-static.json ...
    python tools/perf_model.py benchmarks/out/gpu-static.json \
        --json benchmarks/results/predicted-h200.json --markdown benchmarks/results/predicted-h200.md
    python tools/perf_model.py REPORT --measured GPU_BENCH.json  # bench.py --device cuda --json

The model, per kernel launch configuration (one CTA processes one tile of BLOCK_P positions;
a persistent kernel loops over tiles):
* dynamic SASS per tile: each instruction of the cubin weighted by the trip counts of the loops
  around it (``dynamic_counts``), times the warps of the CTA;
* the SM's time per tile is the maximum of the pipes it needs: instruction issue (4 warp
  instructions per clock), the FP32/FP16 FMA pipe (4 warp FMAs per clock), shuffles (1 warp
  SHFL per clock), shared memory and spilled registers (L1: 128 bytes per clock), tensor cores (``mma.sync`` at
  ``mma_fma_per_clk`` multiply-adds per clock, half for TF32), and the tile's share of the
  device-copy bandwidth;
* latency (Little's law): a CTA loads its tile, waits ~``dram_latency_ns``, computes, stores;
  with k CTAs resident per SM at most k tiles are in flight, so an SM finishes at most
  k / (latency + compute time) tiles per second (a persistent grid caps k at its programs per
  SM, ``programs_per_sm``: the Triton backward's two, or one for large partial rows, and the
  Triton forward's persistent configurations' two, whatever else would fit; records made
  before the backward launched two carry no field and count one); a persistent program that
  loads its next tile before computing this one (``next_tile_loaded``: the Triton backward's
  packed configurations but SPLIT's, the forward's with ``AHEAD``) takes the longer of the
  computation and the loads' latency and transfer instead of their sum, and one that loads
  two tiles ahead (``tiles_ahead``: the backward's PACK = 2, the forward's AHEAD = 2) the
  longer of the computation and half of them; one that loads its own tile in two round trips
  (``load_phases``: the Triton backward's DY_LATE, dy after the recomputed forward) waits
  twice; where the CUDA backward prefetches its
  next tile's x and dy into L2 (``config["prefetch"]``: one CTA per SM), the loads wait for
  an L2 hit (``l2_latency_ns``) and take the SM's share of the L2's read bandwidth instead,
  the stores draining behind the next tile (both assumptions, Device);
* the CUDA backward's per-CTA fp32 weight-gradient rows (``partial_row_bytes``): every tile
  adds its gradients to its CTA's row; where the rows of all resident CTAs exceed three
  quarters of the L2 (the planner's margin for the tiles' streams), that traffic is counted
  with the tile's own at the copy bandwidth;
* L2 (``l2_bytes_per_tile``): everything a tile moves between the SM and the L2 at the SM's
  share of the L2 bandwidth (``l2_read_bytes_per_s``, taken for reads, writes and reductions
  alike: an assumption): the tile's own bytes, x a second time where the backward reloads it
  (``config["reload_x"]``), and the backward's fp32 row (CUDA and Triton: a row per CTA or
  program, updated every tile), read and written (twice its bytes) or, where the kernel adds
  to it by reductions in L2, once, or, for the layers whose gradients a Triton program carries
  across its tiles (its packed configurations' packed layers), not at all
  (``config["row_l2_bytes"]``, set by tools/gpu_static.py), and the weight blocks that the
  Triton backward's ``W_TILE`` configurations load every tile where they are used
  (``config["weights_l2_bytes"]``: each load counted, no L1 hit assumed). Other kernels'
  weight loads every tile (the FMA paths', the float32 packed blocks') are not counted: the
  model takes them as L1 hits, so where they do not stay in L1 it overestimates those kernels;
* time per position = 1 / (SMs x tiles per second per SM x BLOCK_P); the fraction of copy
  bandwidth is the copy time of the bytes the operator must move (forward: x read, y written;
  backward: x and grad_y read, grad_x written) over that time. One-off kernels (the backward's
  partial-row reduction) and launch overheads are not per position and are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    name: str
    arch: str
    sms: int
    clock_hz: float
    copy_bytes_per_s: float  # device-to-device copy, bytes read + written per second
    dram_latency_ns: float
    issue_per_clk: float = 4.0        # warp instructions per clock per SM (4 schedulers)
    fma_per_clk: float = 4.0          # warp FFMA/HFMA2 per clock per SM (128 FP32 lanes)
    shfl_per_clk: float = 1.0         # warp shuffles per clock per SM (32 lanes per clock)
    smem_bytes_per_clk: float = 128.0
    mma_fma_per_clk: float = 1024.0   # 16-bit mma.sync multiply-adds per clock per SM
    l2_bytes: float = 50 * 2 ** 20    # L2 cache (GH100: 50 MiB, as the device reports it)
    # assumptions for loads that hit L2 (the backward's prefetched tiles): an L2 hit's latency
    # (the far partition's included) and the L2's read bandwidth, from a third-party
    # microbenchmark of the H100 PCIe (about 5.5 TB/s at its lower clocks)
    l2_latency_ns: float = 300.0
    l2_read_bytes_per_s: float = 5.5e12


# Copy bandwidths: the project's device notes (H200 ~4.3 TB/s read+write measured with a
# device copy) and the issue's H100 figure; clocks are the boost clocks; the mma.sync rate is
# half of Hopper's dense 16-bit peak (which needs wgmma), the A100 per-SM rate.
DEVICES = {
    "h200": Device("H200", "sm_90", 132, 1.98e9, 4.3e12, 700.0),
    "h100": Device("H100 SXM", "sm_90", 132, 1.98e9, 3.0e12, 700.0),
}

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# ---------------------------------------------------------------------------------------------
# SASS: dynamic instruction counts
# ---------------------------------------------------------------------------------------------
# (opcodes may hold lower-case letters: REDG.E.ADD.F32x2)
_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
CLASSES = ("FFMA/HFMA", "HMMA/MMA", "LDG/STG", "LDS/STS", "SHFL", "BAR", "other")


def classify(op: str) -> str:
    if op.startswith(("FFMA", "HFMA", "DFMA")):
        return "FFMA/HFMA"
    if op.startswith(("HMMA", "MMA", "HGMMA", "WGMMA", "IMMA")):
        return "HMMA/MMA"
    if op.startswith(("LDG", "STG", "LDGSTS", "RED", "ATOM")):
        return "LDG/STG"
    if op.startswith(("LDS", "STS", "LDSM")):
        return "LDS/STS"
    if op.startswith("SHFL"):
        return "SHFL"
    if op.startswith(("BAR", "BSYNC")):
        return "BAR"
    return "other"


def parse_sass(sass: str) -> list:
    """``[(address, predicate, opcode, operands)]`` of every instruction of one kernel."""
    out = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3),
                        m.group(4).strip()))
    return out


def _imm(field: str):
    return int(field, 0) if re.fullmatch(r"0x[0-9a-f]+|\d+", field) else None


def _trip_count(ins: list, start: int, end: int, reg: str, bound: int):
    """Trip count of a loop whose counter ``reg`` is compared with the immediate ``bound``: the
    counter's step is the immediate of the add that updates it inside the loop (a counter may
    count elements or bytes), its first value the immediate it is set to before the loop (0 when
    it is cleared or not found)."""
    step = None
    for a, _, op, args in ins:
        if start <= a <= end and op.startswith(("IADD3", "UIADD3", "IADD", "VIADD")):
            f = [x.strip() for x in args.split(",")]
            operands = [x for x in f[1:] if not x.startswith(("P", "!P", "UP", "!UP"))]
            if f[0] == reg and reg in operands:
                imms = [_imm(x) for x in operands if _imm(x) is not None]
                if imms:
                    step = imms[0]
                    break
    if not step or step <= 0:
        return None
    first = 0
    for a, _, op, args in reversed([i for i in ins if i[0] < start]):
        f = [x.strip() for x in args.split(",")]
        if f and f[0] == reg:
            if op.startswith("MOV") and len(f) > 1 and _imm(f[1]) is not None:
                first = _imm(f[1])
            break
    n = (bound - first) // step
    return n if n > 0 and (bound - first) % step == 0 else None


def without_bias_paths(ins) -> list:
    """``ins`` less the paths that only layers with a bias run: where an item's first k-step has
    two copies (csrc/cuda/chain_mma.cuh, mma_layer_k's kBiasBranch: the CUDA backward's
    recompute), the one that takes the bias as its products' c operand, from the conditional
    branch over it to its unconditional branch past the other copy (whose HMMAs take RZ as c).
    The static report's chains have no biases; with biases, every item of a recomputed layer
    runs that path instead."""
    skip = set()
    at = {a: i for i, (a, _, _, _) in enumerate(ins)}
    for i, (addr, pred, op, args) in enumerate(ins):
        if not (op.startswith("BRA") and pred):
            continue
        m = re.search(r"0x([0-9a-f]+)", args)
        target = int(m.group(1), 16) if m else -1
        if target <= addr or target not in at:
            continue
        j = at[target] - 1  # the instruction before the target: the bias copy's branch past
        ja, jp, jop, jargs = ins[j]
        m2 = re.search(r"0x([0-9a-f]+)", jargs)
        if not (jop.startswith("BRA") and not jp and m2 and int(m2.group(1), 16) > target):
            continue
        merge = int(m2.group(1), 16)
        copy, other = ins[i + 1:j], [x for x in ins if target <= x[0] < merge]
        # two straight-line copies of a k-step: HMMAs in both, no branch in either, RZ as c of
        # the other's first products and of none of the bias copy's
        def rz(blk):
            return sum(1 for _, _, o, a in blk if o.startswith("HMMA") and a.endswith("RZ"))
        if all(any(o.startswith("HMMA") for _, _, o, _ in blk)
               and not any(o.startswith("BRA") for _, _, o, _ in blk) for blk in (copy, other)) \
                and rz(other) > 0 and rz(copy) == 0:
            skip.update(x[0] for x in ins[i + 1:j + 1])
    return [x for x in ins if x[0] not in skip]


def _loops(ins: list) -> list:
    """Backward branches as loops ``(start, end, trip)``: ``trip`` is the immediate the loop's
    exit predicate is compared with (a counter from 0 in steps of 1, as Triton's and nvcc's
    counted loops compile), or None when the bound is a register (a runtime trip count)."""
    loops = []
    for i, (addr, pred, op, args) in enumerate(ins):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", args)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr:  # forward branch, or the trailing self-loop after EXIT
            continue
        p = pred.lstrip("@!")
        trip = None
        for a2, _, op2, args2 in reversed(ins[:i]):
            if a2 < target:
                break
            first_field = args2.split(",")[0].strip()
            if op2.startswith("PLOP3") and first_field == p:
                # a predicate copied from a uniform predicate: follow the copy
                src = [f.strip().lstrip("!") for f in args2.split(",")[1:]]
                src = [f for f in src if re.fullmatch(r"U?P[0-6]", f)]
                if len(src) == 1:
                    p = src[0]
                    continue
                break
            if op2.startswith(("ISETP", "UISETP")) and first_field == p:
                if ".EX" in op2:  # the high word of a 64-bit compare: keep looking
                    continue
                fields = [f.strip() for f in args2.split(",")]
                if len(fields) >= 4 and re.fullmatch(r"0x[0-9a-f]+|\d+", fields[3]):
                    trip = _trip_count(ins, target, addr, fields[2], int(fields[3], 0))
                break
        loops.append((target, addr, trip))
    return loops


def shared_bytes_of(op: str) -> float:
    """Shared-memory bytes one warp instruction costs (in 128-byte wavefronts): LDSM moves
    128 bytes per 8x8 matrix (.x1 / .x2 / .x4); other accesses 32 lanes x max(width, 32 bits)."""
    if op.startswith("LDSM"):
        m = re.search(r"\.(\d)$", op)
        return 128.0 * (int(m.group(1)) if m else 1)
    width = re.search(r"\.(32|64|128|U8|S8|U16|S16)\b", op)
    bits = int(width.group(1)) if width and width.group(1).isdigit() else 32
    return 32 * max(bits, 32) / 8


def mma_fma_of(op: str) -> float:
    """Multiply-adds of one warp-level HMMA (HMMA.16816: m16 n8 k16)."""
    shape = re.match(r"HMMA\.(\d+)", op)
    return {"16816": 2048, "1688": 1024, "1684": 512}.get(shape.group(1), 0) if shape else 0


def dynamic_counts(sass: str, persistent: bool) -> dict:
    """Warp instructions one warp executes per tile, by class, with each instruction weighted by
    the trip counts of the counted loops around it. In a ``persistent`` kernel the outermost
    loop with a runtime bound is the loop over tiles: its body counts once per tile and what
    lies outside it (prologue, epilogue) is amortised over the tiles (weight 0). Also returns
    shared-memory bytes per warp, tensor-core multiply-adds per warp and what the analysis could
    not resolve (``unresolved_loops``: loops with a runtime bound other than the tile loop,
    counted once)."""
    ins = parse_sass(sass)
    loops = _loops(ins)
    tile_loop = None
    if persistent:
        runtime = [lp for lp in loops if lp[2] is None]
        if runtime:
            tile_loop = max(runtime, key=lambda lp: lp[1] - lp[0])
    unresolved = sum(1 for lp in loops if lp[2] is None and lp is not tile_loop)
    counts = {c: 0.0 for c in CLASSES}
    smem_bytes = local_bytes = mma_fma = tf32_fma = 0.0
    for addr, _, op, args in ins:
        if op == "EXIT" or (op.startswith("BRA") and f"0x{addr:x}" in args):
            continue
        w = 1.0
        if tile_loop is not None and not (tile_loop[0] <= addr <= tile_loop[1]):
            w = 0.0
        for start, end, trip in loops:
            if start <= addr <= end and trip is not None:
                w *= trip
        if w == 0.0:
            continue
        cls = classify(op)
        counts[cls] += w
        if op.startswith(("LDL", "STL")):  # spilled registers: local memory through L1
            width = re.search(r"\.(64|128)\b", op)
            local_bytes += w * 32 * (int(width.group(1)) if width else 32) / 8
        if cls == "LDS/STS":
            smem_bytes += w * shared_bytes_of(op)
        elif cls == "HMMA/MMA":
            f = mma_fma_of(op)
            if "TF32" in op:
                tf32_fma += w * f
            else:
                mma_fma += w * f
    return {"counts": counts, "smem_bytes": smem_bytes, "local_bytes": local_bytes,
            "mma_fma": mma_fma,
            "tf32_fma": tf32_fma, "loops": len(loops), "unresolved_loops": unresolved,
            "tile_loop": tile_loop is not None}


def parse_ptxas_verbose(text: str) -> list:
    """Per kernel of an ``nvcc -Xptxas -v`` log: ``{"mangled", "arch", "registers",
    "stack_bytes", "spill_bytes" (spill stores), "shared_bytes" (static)}``."""
    out, cur, props = [], None, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "registers": 0, "stack_bytes": 0,
                   "spill_bytes": 0, "shared_bytes": 0}
            out.append(cur)
            props = None
            continue
        m = re.search(r"Function properties for (\w+)", line)
        if m:  # a kernel's, or a non-inlined device function's (which is not the kernel's)
            props = cur if cur is not None and m.group(1) == cur["mangled"] else None
            continue
        if props is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if m:
            props["stack_bytes"], props["spill_bytes"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            props["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            props["shared_bytes"] = int(m.group(1))
    return out


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------
def copy_bytes_per_position(row: dict) -> int:
    """Bytes the operator must move per position: forward x + y, backward x + grad_y + grad_x."""
    b = _DTYPE_BYTES[row["dtype"]]
    if row["direction"] == "forward":
        return (row["c_x"] + row["c_out"]) * b
    return (2 * row["c_x"] + row["c_out"]) * b


def load_bytes_per_position(row: dict) -> int:
    """Bytes the operator reads per position: forward x, backward x and grad_y."""
    b = _DTYPE_BYTES[row["dtype"]]
    return (row["c_x"] + (row["c_out"] if row["direction"] == "backward" else 0)) * b


def partial_row_bytes(row: dict, dev: Device) -> float:
    """Bytes per tile of the CUDA backward's fp32 weight-gradient row (read and written: the
    CTA adds its tile's dW to it) that reach DRAM: all of them when the rows of every resident
    CTA (SMs x CTAs per SM rows of num_w fp32, num_w = the chain's multiply-adds per position)
    exceed three quarters of the L2 (plan_backward_mma's margin, mma_backward_wide_tile), else
    none. Forwards, other backends and rows without the chain's size: 0."""
    if row["direction"] != "backward" or row.get("backend") != "cuda":
        return 0.0
    num_w = row.get("macs_per_position") or 0
    row_bytes = 4.0 * num_w
    if dev.sms * max(1, row["ctas_per_sm"]) * row_bytes <= 0.75 * dev.l2_bytes:
        return 0.0
    return 2.0 * row_bytes


def l2_bytes_per_tile(row: dict) -> float:
    """Bytes one tile moves between the SM and the L2: its own (x and y, or x, grad_y and
    grad_x), x again where the backward reloads it, and the backward's fp32 gradient row (CUDA:
    the CTA's, Triton: the program's; ``config["row_l2_bytes"]`` where the record gives it,
    else read and written: 8 bytes per weight), and the weight blocks a Triton backward loads
    every tile (``config["weights_l2_bytes"]``, W_TILE)."""
    cfg = row.get("config") or {}
    b = row["block_p"] * copy_bytes_per_position(row)
    if row["direction"] == "backward" and cfg.get("reload_x"):
        b += row["block_p"] * row["c_x"] * _DTYPE_BYTES[row["dtype"]]
    if row["direction"] == "backward" and row.get("backend") in ("cuda", "triton"):
        # (both backends' backwards add every tile's gradients to a per-CTA / per-program row)
        row_l2 = cfg.get("row_l2_bytes")
        b += 8.0 * (row.get("macs_per_position") or 0) if row_l2 is None else row_l2
    return b + cfg.get("weights_l2_bytes", 0)


def predict(row: dict, dev: Device) -> dict:
    """Predicted time per position and its bound for one compiled per-position kernel (a row of
    tools/gpu_static.py with ``dyn``, ``block_p``, ``num_warps``, ``ctas_per_sm``)."""
    dyn = row["dyn"]
    warps = row["num_warps"]
    c = {k: v * warps for k, v in dyn["counts"].items()}  # warp instructions per tile
    total = sum(c.values())
    clk = 1.0 / dev.clock_hz
    pipes = {
        "issue": total / dev.issue_per_clk * clk,
        "fma": c["FFMA/HFMA"] / dev.fma_per_clk * clk,
        "shuffle": c["SHFL"] / dev.shfl_per_clk * clk,
        # shared memory and spilled registers (local memory, at best L1 hits) share L1's port
        "shared/L1": (dyn["smem_bytes"] + dyn.get("local_bytes", 0.0)) * warps
        / dev.smem_bytes_per_clk * clk,
        "tensor": (dyn["mma_fma"] + 2 * dyn["tf32_fma"]) * warps / dev.mma_fma_per_clk * clk,
    }
    compute_bound = max(pipes, key=pipes.get)
    t_compute = pipes[compute_bound]  # seconds per tile on one SM
    bpp = copy_bytes_per_position(row)
    partial = partial_row_bytes(row, dev)
    t_memory = (row["block_p"] * bpp + partial) / (dev.copy_bytes_per_s / dev.sms)
    k = max(1, row["ctas_per_sm"])
    progs = row.get("programs_per_sm") or (1 if row.get("kernel") == "igc_chain_bwd" else 0)
    if progs:  # a persistent grid: no more tiles in flight per SM than its programs per SM
        k = min(k, progs)
    if row.get("config", {}).get("prefetch"):
        # the tile's x and dy were prefetched into L2 while the previous tile ran: its loads
        # wait for L2, not DRAM, and its stores drain behind the next tile (the DRAM transfer
        # itself is the memory term)
        loaded = row["block_p"] * load_bytes_per_position(row)
        t_latency = (dev.l2_latency_ns * 1e-9 + t_compute
                     + loaded / (dev.l2_read_bytes_per_s / dev.sms)) / k
    elif row.get("next_tile_loaded"):
        # a persistent program loads its next tile (or, ``tiles_ahead`` = 2, the one after it)
        # before it computes this one (the Triton backward's packed configurations): those
        # loads wait while it computes, and it waits for them only where their latency and
        # transfer take longer than the computation of the tiles in between (Little's law:
        # ``tiles_ahead`` tiles in flight)
        ahead = max(1, int(row.get("tiles_ahead") or 1))
        t_latency = max(t_compute, (dev.dram_latency_ns * 1e-9 + t_memory) / ahead) / k
    else:  # (load_phases: round trips to DRAM per tile, one after the other)
        phases = int(row.get("load_phases") or 1)
        t_latency = (phases * dev.dram_latency_ns * 1e-9 + t_compute + t_memory) / k
    t_l2 = l2_bytes_per_tile(row) / (dev.l2_read_bytes_per_s / dev.sms)
    terms = {**pipes, "memory": t_memory, "L2": t_l2, "latency": t_latency}
    bound = max(terms, key=terms.get)
    t_tile = terms[bound]
    t_pos = t_tile / (dev.sms * row["block_p"])
    t_copy = bpp / dev.copy_bytes_per_s
    return {"seconds_per_position": t_pos, "fraction_of_copy": t_copy / t_pos, "bound": bound,
            "terms_per_tile_ns": {k2: v * 1e9 for k2, v in terms.items()},
            "copy_bytes_per_position": bpp, "partial_row_bytes_per_tile": partial}


def _structure_label(row: dict) -> str:
    return row["structure"]


def records(report: dict, device: str = "h200") -> list:
    """The prediction records of a gpu_static report (the JSON schema in docs/benchmarks.md)."""
    dev = DEVICES[device]
    out = []
    for r in report["rows"]:
        per_position = r.get("per_position", False)
        rec = {
            "backend": r.get("backend", "triton"), "direction": r["direction"],
            "structure": _structure_label(r), "dtype": r["dtype"], "layout": r["layout"],
            "arch": r["arch"], "toolchain": r["toolchain"], "kernel": r["kernel"],
            "config": r["config"], "reachable": r.get("reachable", True),
            "compiled": r["compiled"], "registers": r["registers"],
            "spill_bytes": r["spill_bytes"], "shared_bytes": r["shared_bytes"],
            "ctas_per_sm": r["ctas_per_sm"], "is_default": bool(r.get("is_default")),
            "autotuner_keeps": bool(r.get("autotuner_keeps")),
            "fixed_path": bool(r.get("fixed_path", r.get("is_default"))),
            "prediction": "PREDICTED (model, no GPU run)",
            "device_model": dev.name, "predicted_fraction_of_copy": None, "bound": None,
        }
        if not r["compiled"]:
            rec["bound"] = "not compiled"
        elif rec["backend"] == "cuda" and not (per_position and r.get("dyn")):
            rec["bound"] = "no per-position model (run-time loop bounds)"
        elif not per_position:
            rec["bound"] = "one-off (not per position)"
        elif r["arch"] != dev.arch or not r.get("dyn"):
            rec["bound"] = f"no model for {r['arch']}"
        else:
            p = predict(r, dev)
            rec["predicted_fraction_of_copy"] = round(p["fraction_of_copy"], 4)
            rec["bound"] = p["bound"]
            rec["predicted_ns_per_kposition"] = round(p["seconds_per_position"] * 1e12, 3)
            rec["terms_per_tile_ns"] = {k: round(v, 2) for k, v in p["terms_per_tile_ns"].items()}
            rec["dynamic_warp_instructions_per_position"] = {
                k: round(v * r["num_warps"] / r["block_p"], 2)
                for k, v in r["dyn"]["counts"].items()}
            rec["unresolved_loops"] = r["dyn"].get("unresolved_loops", 0)
            if r["dyn"].get("model"):
                rec["count_model"] = r["dyn"]["model"]
            if dev.name != "H100 SXM":
                rec["predicted_fraction_of_copy_h100"] = round(
                    predict(r, DEVICES["h100"])["fraction_of_copy"], 4)
        out.append(rec)
    return out


def markdown(recs: list, command: str, stages: list = ()) -> str:
    lines = ["# Predicted fraction of copy bandwidth (PREDICTIONS: model, no GPU run)", "",
             f"Command: `{command}`", "",
             "Model: tools/perf_model.py, docs/benchmarks.md (\"GPU performance model\"). Per "
             "structure, dtype, layout and direction: the best configuration the autotuner "
             "keeps after its spill pruning (it would pick that one if the model is right; "
             "where a report compiled only the default configuration and the fixed path's, "
             "the better of those that do not spill) and the fixed "
             "launch path's configuration (IGC_TRITON_AUTOTUNE=0, deterministic mode: its "
             "first spill-free candidate, triton_kernels/chain.py fixed_candidates; chains "
             "with packed layers try packed ones first, in float32 where groups are at least "
             "16 wide or a tile has 512 channels or more, the 16-bit backward's SPLIT ones "
             "first where a tile has 1024; -: not among the compiled "
             "configurations). H200 and H100 columns.", "",
             *(["Where the Triton backend runs a chain's backward in layer ranges (the staged "
                "section below), its fixed path column adds that prediction: \"(staged: "
                "...)\"; the whole chain's kernel is then not launched. Where the whole "
                "chain's fixed path is a packed build without spills, the backend runs it "
                "whole instead, and the column says \"(ranges: ..., not run)\".", ""]
               if stages else []),
             "| backend | toolchain | direction | structure | dtype | layout | best config | regs "
             "| spill B | H200 | H100 | bound | fixed path H200 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in recs:
        if r["predicted_fraction_of_copy"] is None or not r["reachable"]:
            continue
        key = (r["backend"], r["toolchain"], r["direction"], r["structure"], r["dtype"],
               r["layout"], r["arch"])
        groups.setdefault(key, []).append(r)
    for key, rs in sorted(groups.items()):
        tuned = [r for r in rs if r["autotuner_keeps"]] or rs
        best = max(tuned, key=lambda r: r["predicted_fraction_of_copy"])
        default = [r for r in rs if r.get("fixed_path")]
        d = f"{default[0]['predicted_fraction_of_copy']:.0%}" if default else "-"
        staged_here = [s for s in stages if key[0] == "triton" and key[2] == "backward"
                       and (s["toolchain"], s["structure"], s["dtype"], s["layout"],
                            s["arch"]) == (key[1], *key[3:])]
        if staged_here:  # the backend runs the ranges instead (the staged section)
            pct = f"{staged_here[0]['predicted_fraction_of_copy']:.0%}"
            if default and _runs_whole(default[0]):
                d += f" (ranges: {pct}, not run)"
            else:
                d += f" (staged: {pct})"
        cfg = ", ".join(f"{k}={v}" for k, v in best["config"].items()
                        if k in ("BLOCK_P", "num_warps", "KEEP") or k.startswith("DENSE"))
        pack = max([v for k, v in best["config"].items() if k.startswith("PACK")] or [0])
        if pack:  # the packed path on every eligible layer (backward: tiles loaded ahead)
            cfg += f", PACK={pack}"
        if best["config"].get("AHEAD"):  # the forward's persistent grid: tiles loaded ahead
            cfg += f", AHEAD={best['config']['AHEAD']}"
        if best["config"].get("RED"):  # the backward's packed dW by reductions (2: but the
            cfg += f", RED={best['config']['RED']}"  # last layer's, held)
        if best["config"].get("SPLIT"):  # in that many products, no tile loaded ahead
            cfg += f", SPLIT={best['config']['SPLIT']}"
        if best["config"].get("W_TILE"):  # the weight blocks loaded every tile
            cfg += ", W_TILE=1"
        h100 = best.get("predicted_fraction_of_copy_h100")
        lines.append(f"| {' | '.join(key[:6])} | {cfg} | {best['registers']} | "
                     f"{best['spill_bytes']} | {best['predicted_fraction_of_copy']:.0%} | "
                     f"{'-' if h100 is None else format(h100, '.0%')} | {best['bound']} | {d} |")
    return "\n".join(lines) + "\n"


def _igcv2_depth(channels: int, width: int) -> int:
    """ceil(log_K C) (ChainSpec.igcv2's depth), in integers."""
    depth, reach = 1, width
    while reach < channels:
        depth, reach = depth + 1, reach * width
    return depth


def _measured_key(m: dict):
    """(backend, direction, structure, dtype, layout) of a fused-operator timing row of
    ``benchmarks/bench.py --device cuda --json`` (IGCV2 problems: depth ``None`` or the IGCV2
    depth), else None."""
    cfg = m.get("config") or {}
    direction = {"fwd": "forward", "bwd": "backward"}.get(m.get("mode"))
    if (m.get("kind") != "fused" or m.get("metric") != "time" or direction is None
            or "frac_copy_bw" not in m):
        return None
    depth = cfg.get("depth")
    if depth is not None and depth != _igcv2_depth(cfg["channels"], cfg["group_size"]):
        return None
    return (m.get("backend"), direction, f"igcv2({cfg['channels']},{cfg['group_size']})",
            m.get("dtype"), m.get("layout"))


def measured_beside_predicted(recs: list, measured: dict, fixed: bool = False,
                              stages: list = ()) -> list:
    """Lines pairing each measured fraction of copy bandwidth (the fused-operator rows of a GPU
    benchmark JSON, ``benchmarks/bench.py --device cuda --json``: same traffic definition) with
    the prediction for the same backend, direction, structure, dtype and layout (the best
    reachable configuration's: the autotuner's pick if the model is right; ``fixed``: the fixed
    launch path's, for a benchmark run with ``IGC_TRITON_AUTOTUNE=0`` or in deterministic
    mode); one per toolchain, each named, where the records come from several (the GPU's
    Triton may not be the CI's: their builds differ). ``stages``: ``staged`` records; a
    toolchain's staged prediction replaces its whole-chain ones for that backward (the backend
    runs the ranges, with the autotuner on or off), marked "staged", unless that toolchain's
    whole-chain fixed path is a packed build without spills (``_runs_whole``)."""
    out = []
    for m in measured.get("rows", []):
        key = _measured_key(m)
        if key is None:
            continue
        same = [r for r in recs if (r["backend"], r["direction"], r["structure"], r["dtype"],
                                    r["layout"]) == key]
        match = {}
        for r in same:
            if (r["predicted_fraction_of_copy"] is not None and r["reachable"]
                    and (r["fixed_path"] or not fixed)):
                match.setdefault(r["toolchain"], []).append(r["predicted_fraction_of_copy"])
        whole = {r["toolchain"] for r in same if r.get("fixed_path") and _runs_whole(r)}
        staged_tc = set()
        for r in stages:
            if (("triton", "backward", r["structure"], r["dtype"], r["layout"]) == key
                    and r["toolchain"] not in whole):
                match[r["toolchain"]] = [r["predicted_fraction_of_copy"]]
                staged_tc.add(r["toolchain"])
        what = "predicted for the fixed path" if fixed else "predicted"
        if not match:
            pred = "no prediction"
        elif len(match) == 1:
            tc, v = next(iter(match.items()))
            pred = f"{what} {max(v):.0%}" + (" (staged)" if tc in staged_tc else "")
        else:
            pred = f"{what} " + ", ".join(
                f"{max(v):.0%} ({tc}{', staged' if tc in staged_tc else ''})"
                for tc, v in sorted(match.items()))
        out.append(f"{' '.join(key)}: measured {m['frac_copy_bw']:.0%}, {pred}")
    return out


_RANGE = re.compile(r"(.+)\[(\d+):(\d+)\]")


def staged(rows: list, device: str = "h200") -> list:
    """Predictions of the Triton backend's staged backward (``_triton_ops.backward_stages``)
    from a report's records of its layer ranges (structures ``NAME[a:b]``, gpu_static.py): per
    toolchain, chain, dtype and layout whose backward ranges cover its layers one after the
    other, the fixed path's launches of the staged run, each range's forward but the last's
    and every range's backward, one after the other (the times per position add). The fraction
    is of the whole chain's copy (x, grad_y and grad_x once); the ranges' own copies count the
    rest (x read again, each kept range input ``h_a`` written and read, each ``dh_a`` written
    and read)."""
    dev = DEVICES[device]
    parts = {}
    for r in rows:
        m = _RANGE.fullmatch(r["structure"])
        if (not m or r.get("backend", "triton") != "triton" or not r.get("per_position")
                or not r.get("fixed_path") or not r["compiled"] or r["arch"] != dev.arch
                or not r.get("dyn")):
            continue
        key = (r["toolchain"], m.group(1), r["dtype"], r["layout"], r["arch"])
        parts.setdefault(key, {})[(int(m.group(2)), int(m.group(3)), r["direction"])] = r
    out = []
    for (toolchain, name, dtype, layout, arch), got in sorted(parts.items()):
        ranges = sorted({(a, b) for a, b, d in got if d == "backward"})
        if (not ranges or ranges[0][0] != 0
                or any(r1[1] != r2[0] for r1, r2 in zip(ranges, ranges[1:]))
                or any((a, b, "forward") not in got for a, b in ranges[:-1])):
            continue  # not one partition of the layers, or a range's forward missing
        launches = [got[(a, b, "forward")] for a, b in ranges[:-1]]
        launches += [got[(a, b, "backward")] for a, b in reversed(ranges)]
        first, last = got[(*ranges[0], "backward")], got[(*ranges[-1], "backward")]
        whole = {"dtype": dtype, "direction": "backward", "c_x": first["c_x"],
                 "c_out": last["c_out"]}
        rec = {"backend": "triton", "toolchain": toolchain, "structure": name, "dtype": dtype,
               "layout": layout, "arch": arch, "stages": [list(r) for r in ranges],
               "prediction": "PREDICTED (model, no GPU run)", "device_model": dev.name,
               "spill_bytes": max(r["spill_bytes"] for r in launches), "parts": []}
        for d in (dev, DEVICES["h100"]):
            t = 0.0
            for r in launches:
                p = predict(r, d)
                t += p["seconds_per_position"]
                if d is dev:
                    m = _RANGE.fullmatch(r["structure"])
                    rec["parts"].append({
                        "range": [int(m.group(2)), int(m.group(3))],
                        "direction": r["direction"], "config": r["config"],
                        "fraction_of_own_copy": round(p["fraction_of_copy"], 4),
                        "bound": p["bound"],
                        "ns_per_kposition": round(p["seconds_per_position"] * 1e12, 3)})
            frac = copy_bytes_per_position(whole) / d.copy_bytes_per_s / t
            rec["predicted_fraction_of_copy" + ("" if d is dev else "_h100")] = round(frac, 4)
        out.append(rec)
    return out


def _runs_whole(fixed: dict) -> bool:
    """Whether the backend runs a chain's backward whole, not in the ranges of a staged
    report, from its whole-chain fixed-path record: a packed build without spills
    (``_triton_ops.backward_stages`` stages a 16-bit chain whose every packed build spills, a
    float32 one offered packed builds first but left on the FMA path, or spilling everywhere)."""
    packed = any(v for k, v in fixed.get("config", {}).items() if k.startswith("PACK"))
    return packed and fixed.get("spill_bytes", 0) == 0


def staged_markdown(recs: list) -> str:
    """The staged backward's predictions as a markdown section ("" when there are none)."""
    if not recs:
        return ""
    lines = ["", "## Staged backward (Triton; PREDICTIONS)", "",
             "The backward of a chain the backend runs in layer ranges "
             "(`_triton_ops.backward_stages`: a 16-bit chain whose every packed backward "
             "configuration spills; a float32 chain offered packed configurations first but "
             "left on the FMA path, one layer per range): each range's forward but the "
             "last's, then each range's backward from the last, one after the other; the "
             "fraction is of the whole chain's copy. Parts, in launch order: range, direction, "
             "the fraction of its own copy and its bound. A chain listed here whose whole "
             "backward's fixed path is a packed build without spills runs whole (\"not run\" "
             "in the fixed path column above).", "",
             "| toolchain | structure | dtype | layout | ranges | parts | spill B | H200 | H100 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        ranges = ", ".join(f"{a}:{b}" for a, b in r["stages"])
        parts = "; ".join(f"{p['range'][0]}:{p['range'][1]} "
                          f"{'fwd' if p['direction'] == 'forward' else 'bwd'} "
                          f"{p['fraction_of_own_copy']:.0%} {p['bound']}" for p in r["parts"])
        lines.append(f"| {r['toolchain']} | {r['structure']} | {r['dtype']} | {r['layout']} | "
                     f"{ranges} | {parts} | {r['spill_bytes']} | "
                     f"{r['predicted_fraction_of_copy']:.0%} | "
                     f"{r['predicted_fraction_of_copy_h100']:.0%} |")
    return "\n".join(lines) + "\n"


def merge_reports(paths) -> dict:
    """The rows of several gpu_static reports, each (backend, toolchain, structure, dtype,
    layout, direction, arch, kernel, configuration) once. What the launcher can pick
    (``reachable``, ``autotuner_keeps``) comes from a report of every configuration when there
    is one (``flags_exact``); a report of the default configuration alone counts it as
    reachable."""
    rows, seen, commands, torch_versions = [], {}, [], set()
    for path in paths:
        with open(path) as f:
            rep = json.load(f)
        commands.append(rep.get("command"))
        torch_versions.add(rep.get("torch"))
        for r in rep["rows"]:
            if "kernel" not in r:  # a spill-check report (--refusals): no compile records
                continue
            key = (r.get("backend", "triton"), r["toolchain"], r["structure"], r["dtype"],
                   r["layout"], r["direction"], r["arch"], r["kernel"],
                   json.dumps(r["config"], sort_keys=True))
            if key in seen:  # the same compile twice: in two reports, or in one report as
                # the default and as one of the autotuner's configurations
                old = seen[key]
                old["is_default"] = bool(old.get("is_default") or r.get("is_default"))
                if r.get("flags_exact") and not old.get("flags_exact"):
                    # a report of every configuration knows what the launcher picks
                    for flag in ("autotuner_keeps", "fixed_path", "reachable", "flags_exact"):
                        old[flag] = r.get(flag)
                elif r.get("flags_exact") and old.get("flags_exact"):
                    # both exact: the launcher reaches the compile by either route
                    for flag in ("autotuner_keeps", "fixed_path", "reachable"):
                        old[flag] = bool(old.get(flag) or r.get(flag))
                continue
            seen[key] = r
            rows.append(r)
    return {"rows": rows, "commands": commands, "torch": sorted(v for v in torch_versions if v)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Predicted GPU performance from a static report")
    p.add_argument("reports", nargs="+",
                   help="JSON files written by tools/gpu_static.py --json (merged; a kernel "
                        "and configuration reported twice counts once)")
    p.add_argument("--device", default="h200", choices=sorted(DEVICES))
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--measured", default=None,
                   help="a GPU benchmark JSON: print measured beside predicted")
    p.add_argument("--fixed", action="store_true",
                   help="with --measured: beside the fixed launch path's prediction (a "
                        "benchmark run with IGC_TRITON_AUTOTUNE=0), not the best reachable")
    args = p.parse_args(argv)
    report = merge_reports(args.reports)
    recs = records(report, args.device)
    command = "python tools/perf_model.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    meta = {"prediction": "PREDICTED: performance model of tools/perf_model.py, nothing ran on a "
                          "GPU", "command": command, "report_commands": report["commands"],
            "torch": report["torch"],
            "device_model": DEVICES[args.device].__dict__}
    for r in recs:
        if r["predicted_fraction_of_copy"] is not None:
            print(f"{r['backend']:<6} {r['direction']:<8} {r['structure']:<22} {r['dtype']:<8} "
                  f"{r['layout']:<13} {str(r['config']):<70} "
                  f"{r['predicted_fraction_of_copy']:6.1%} {r['bound']}")
    stage_recs = staged(report["rows"], args.device)
    for r in stage_recs:
        print(f"triton backward {r['structure']:<22} {r['dtype']:<8} {r['layout']:<13} staged "
              f"{r['stages']} {r['predicted_fraction_of_copy']:6.1%}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**meta, "records": recs, **({"staged": stage_recs} if stage_recs
                                                   else {})}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(recs, command, stage_recs) + staged_markdown(stage_recs))
    if args.measured:
        with open(args.measured) as f:
            for line in measured_beside_predicted(recs, json.load(f), args.fixed, stage_recs):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
