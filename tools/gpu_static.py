"""Static GPU facts of the Triton kernels, without a GPU: compile for sm_80 / sm_90, read
registers, spills and shared memory off the cubin, count SASS instructions by class.

A chain's kernels are the ones the package would launch: the op bodies of
``igc_kernels._triton_ops`` run on CPU tensors with the launch itself replaced by a recorder,
which keeps the kernel, its arguments and its meta-parameters; each launch is then compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (the whole
pipeline, ptxas included; nothing runs), through Triton's own argument binding, as
``JITFunction.run`` does on a GPU: integer arguments equal to 1 are compile-time constants and
pointers and integers divisible by 16 carry divisibility hints. The problems' x is (2, C, 8, 8):
its position count per image (64) and strides are multiples of 16 as in the benchmarks' (56 x
56 = 3136), so the tiles' global accesses compile to 16-byte vectors as they would there (with
a spatial size that is not a multiple of 16, e.g. 14 x 14, a GPU compiles them to scalar
accesses: ``--no-launch-path`` shows that code). Triton ships ``cuobjdump``, which reads the
resource usage (``STACK``: spilled bytes) and the SASS.

Must run with ``TRITON_INTERPRET`` unset (the kernels must be JIT functions, not interpreted):
``python tools/gpu_static.py --help``. ``tests/test_gpu_static.py`` runs it on a subset in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("tools/gpu_static.py compiles the kernels: unset TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

import igc_kernels as igc  # noqa: E402
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_compile  # noqa: E402  (tools/cuda_compile.py, beside this file)
import perf_model  # noqa: E402  (tools/perf_model.py, beside this file)
from igc_kernels import _chain  # noqa: E402
from igc_kernels._ops import op_biases  # noqa: E402
from igc_kernels.backends.triton import triton_ops  # noqa: E402

T = triton_ops()
K = T.K
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Per-SM limits used for occupancy: registers, shared memory (bytes), resident threads, CTAs.
SM_LIMITS = {80: (65536, 167936, 2048, 32), 90: (65536, 233472, 2048, 32)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SIG = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
        torch.int32: "i32", torch.int64: "i64"}


# ---------------------------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------------------------
def structure_args(name: str):
    """``(x_channels, weights shapes, groups, permutations, input_index)`` of a named structure:
    ``igcv2(C,K)``, ``igcv3-expand(C,t,G)``, ``igcv3-reduce(C,t,G)``, ``condense(C,G)``,
    ``perm(C,K)`` (IGCV2 with explicit random permutations), ``deep(C,G,L)`` (L layers of G
    groups on C channels, interleaved: deeper than the kernels' pointer slots from L = 9);
    ``NAME[a:b]``: layers a..b-1 of NAME as a chain of their own (a range of the Triton
    backend's staged backward, ``_triton_ops.sub_chain``: its input h_a, the input index only
    where a is 0)."""
    r = re.fullmatch(r"(.+)\[(\d+):(\d+)\]", name)
    if r:
        c_x, spec, perms, idx = structure_args(r.group(1))
        a, b = int(r.group(2)), int(r.group(3))
        if not 0 <= a < b <= len(spec.groups):
            raise ValueError(f"{name!r}: no layers {a}..{b - 1} in {len(spec.groups)}")
        sub = igc.ChainSpec(list(spec.channels[a:b + 1]), list(spec.groups[a:b]))
        return (c_x if a == 0 else int(spec.channels[a])), sub, list(perms[a:b]), \
            (idx if a == 0 else None)
    m = re.fullmatch(r"([a-z0-9-]+)\(([\d,]+)\)", name)
    if not m:
        raise ValueError(f"unknown structure {name!r}")
    kind, nums = m.group(1), [int(v) for v in m.group(2).split(",")]
    gen = torch.Generator().manual_seed(0)
    if kind in ("igcv2", "perm"):
        C, Kw = nums
        spec = igc.ChainSpec.igcv2(C, Kw)
        perms = list(spec.permutations)
        if kind == "perm":
            perms = [torch.randperm(C, generator=gen) for _ in perms]
        return C, spec, perms, None
    if kind in ("igcv3-expand", "igcv3-reduce"):
        C, t, G = nums
        hidden = C * t
        if kind == "igcv3-expand":
            return C, igc.ChainSpec([C, hidden], [G]), ["interleave"], None
        return hidden, igc.ChainSpec([hidden, C], [G]), [igc.interleave_index(C, C // G)], None
    if kind == "condense":
        C, G = nums
        idx = torch.randint(0, C, (C // 2,), generator=gen)
        return C, igc.ChainSpec([C // 2, C], [G]), ["interleave"], idx
    if kind == "deep":
        C, G, L = nums
        return C, igc.ChainSpec([C] * (L + 1), [G] * L), ["interleave"] * L, None
    raise ValueError(f"unknown structure {name!r}")


# ---------------------------------------------------------------------------------------------
# Launch recording and compilation
# ---------------------------------------------------------------------------------------------
def problem_input(structure: str, dtype: str, layout: str):
    """``(x, normalized chain, spec)`` of a problem: x of shape (2, C, 8, 8) in ``layout``."""
    c_x, spec, perms, idx = structure_args(structure)
    dt = _DTYPES[dtype]
    x = torch.randn(2, c_x, 8, 8, dtype=dt)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    ws = [torch.randn(c, k, dtype=dt) for c, k in spec.weight_shapes()]
    return x, _chain.normalize(x, ws, list(spec.groups), perms, input_index=idx), spec


def record(structure: str, dtype: str, layout: str, direction: str, config=None) -> list:
    """The launches (kernel, args, meta) the op bodies make for this problem, with the fixed
    ``config`` (a dict for ``K.override_config``; default: the default configuration)."""
    x, chain, spec = problem_input(structure, dtype, layout)
    dt = x.dtype
    args = (chain.weights, op_biases(chain.biases, x), list(chain.groups), chain.shuffles,
            chain.perms, chain.input_index)
    launches = []
    real = T._launch
    T._launch = lambda fn, grid, a, meta: launches.append((fn, list(a), dict(meta)))
    try:
        with K.override_config(**(config or {})):
            if direction == "forward":
                T.chain_forward(x, *args[:5], args[5])
            else:
                # grad_y in y's layout (x's), as autograd passes it and as the backend's
                # spill check (``T.spill_reasons``) compiles it
                gy = _chain.empty_like_layout(x, spec.out_channels, dt).normal_()
                T.chain_backward(gy, x, *args[:5], [True, True, True], args[5])
    finally:
        T._launch = real
    return launches


def _signature(fn, args, meta):
    values = dict(zip(fn.arg_names, args))
    values.update(meta)
    num_warps = values.pop("num_warps", 4)
    signature, constexprs = {}, {}
    for i, (name, p) in enumerate(zip(fn.arg_names, fn.params)):
        v = values[name]
        if p.is_constexpr or v is None or (isinstance(v, int) and not isinstance(v, bool)
                                           and v == 1):
            signature[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _SIG[v.dtype]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i64" if abs(v) >= 2**31 else "i32"
        else:
            raise TypeError(f"{name}: cannot type {type(v).__name__}")
    return signature, constexprs, num_warps


@dataclass
class Record:
    structure: str
    dtype: str
    layout: str
    direction: str
    arch: str
    toolchain: str
    kernel: str
    config: dict
    compiled: bool = False
    error: str = ""
    compile_s: float = 0.0
    registers: int = 0
    spill_bytes: int = 0
    stack_bytes: int = 0  # ptxas's stack frame (local memory: spills and indexed copies)
    shared_bytes: int = 0
    num_warps: int = 4
    ctas_per_sm: int = 0
    programs_per_sm: int = 0  # a persistent grid's programs per SM (0: one program per tile)
    next_tile_loaded: bool = False  # a persistent program loads its next tile before computing
    tiles_ahead: int = 0  # tiles it loads ahead (the backward's PACK, the forward's AHEAD)
    load_phases: int = 1  # its tile's round trips to DRAM, one after the other (DY_LATE: 2)
    sass: dict = field(default_factory=dict)
    backend: str = "triton"
    reachable: bool = True
    is_default: bool = False
    autotuner_keeps: bool = False  # among what the autotuner times after its pruning
    fixed_path: bool = False  # what the fixed launch path takes (K.fixed_config)
    flags_exact: bool = False  # reachable / autotuner_keeps / fixed_path from every configuration
    per_position: bool = False
    block_p: int = 0
    c_x: int = 0
    c_out: int = 0
    macs_per_position: int = 0
    dyn: dict = field(default_factory=dict)


def _tool(name, *args) -> str:
    return subprocess.run([os.path.join(BIN, name), *args], capture_output=True, text=True,
                          check=True).stdout


def _sass_classes(sass: str) -> dict:
    """Static instruction counts of the cubin by class."""
    counts = {c: 0 for c in perf_model.CLASSES}
    for _, _, op, _ in perf_model.parse_sass(sass):
        counts[perf_model.classify(op)] += 1
    return counts


def ctas_per_sm(registers: int, shared: int, num_warps: int, arch: int) -> int:
    regs_sm, smem_sm, threads_sm, ctas_sm = SM_LIMITS[arch]
    threads = 32 * num_warps
    registers = -(-registers // 8) * 8  # allocated in units of 8 per thread
    by_regs = regs_sm // max(1, registers * threads)
    by_smem = smem_sm // shared if shared else ctas_sm
    return max(0, min(by_regs, by_smem, threads_sm // threads, ctas_sm))


# Compile through the JIT's own argument binding (below), as a launch on a GPU does, divisibility
# hints included; --no-launch-path: from _signature instead (integers equal to 1 constant, no
# hints: the tile's global accesses then compile to scalar loads and stores).
LAUNCH_PATH = [True]


def launch_path_source(fn, args, meta, arch: int):
    """``(ASTSource, options)`` of a launch as ``JITFunction.run`` builds them on a GPU of
    sm_``arch``: Triton's own argument binder and specialisation (constexpr tuples, None
    pointers, divisibility hints of the CPU tensors' addresses and of the integers), stopping
    before the launcher. Checks, without a GPU, that the launch path accepts the arguments."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    kw = {"num_stages": 1, **meta}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def compile_launch(fn, args, meta, arch: int, rec: Record) -> Record:
    signature, constexprs, num_warps = _signature(fn, args, meta)
    rec.num_warps = num_warps
    t0 = time.perf_counter()
    try:
        if LAUNCH_PATH[0]:
            src, options = launch_path_source(fn, args, meta, arch)
        else:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            options = {"num_warps": num_warps, "num_stages": 1}
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # report the first lines, as the issue asks
        rec.error = "\n".join(str(e).strip().splitlines()[:3])
        rec.compile_s = time.perf_counter() - t0
        return rec
    rec.compile_s = time.perf_counter() - t0
    rec.compiled = True
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = _tool("cuobjdump", "--dump-resource-usage", f.name)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
        rec.registers, stack, static_shared, local = (int(v) for v in m.groups())
        rec.spill_bytes = stack + local
        rec.shared_bytes = int(k.metadata.shared) + static_shared
        sass = _tool("cuobjdump", "--dump-sass", f.name)
        rec.sass = _sass_classes(sass)
        if rec.per_position:
            rec.dyn = perf_model.dynamic_counts(sass, persistent=rec.programs_per_sm > 0)
    rec.ctas_per_sm = ctas_per_sm(rec.registers, rec.shared_bytes, num_warps, arch)
    return rec


def chain_facts(structure: str) -> dict:
    """Channels of x and y and multiply-adds per position (sum over layers of C_l n_l)."""
    c_x, spec, _, _ = structure_args(structure)
    macs = sum(c * k for c, k in spec.weight_shapes())
    return {"c_x": c_x, "c_out": spec.out_channels, "macs_per_position": macs}


def analyse(structure, dtype, layout, direction, arch, config=None) -> list:
    """One :class:`Record` per kernel launched for this problem and configuration (``None``:
    the default configuration, the one the fixed launch path uses)."""
    out = []
    facts = chain_facts(structure)
    for fn, args, meta in record(structure, dtype, layout, direction, config):
        rec = Record(structure, dtype, layout, direction, f"sm_{arch}",
                     f"triton {triton.__version__}", fn.__name__,
                     {k: v for k, v in meta.items()  # the float32 dots' precision where
                      # it is not the default "ieee" (TF32 allowed, IGC_TRITON_FP32_MMA=1)
                      if (k != "PREC" or v != "ieee") and k not in K.STRUCTURE_KEYS})
        rec.is_default = rec.fixed_path = config is None  # until every configuration is known
        rec.per_position = "BLOCK_P" in meta
        rec.block_p = int(meta.get("BLOCK_P", 0))
        rec.c_x, rec.c_out = facts["c_x"], facts["c_out"]
        rec.macs_per_position = facts["macs_per_position"]
        if fn.__name__ == "igc_chain_bwd":
            f = {name: i for i, name in enumerate(K.LAYER_FIELDS)}
            row = dict(zip(fn.arg_names, args))["PROW"]  # the partial row's floats, as launched
            dev = perf_model.DEVICES["h200"]  # (the H100's SM count and L2 size are the same)
            rec.programs_per_sm = T.backward_programs_per_sm(row, dev.sms, dev.l2_bytes)
            # its packed configurations but SPLIT's: 1, or 2 (PACKED_AHEAD2)
            rec.tiles_ahead = 0 if meta.get("SPLIT") else int(meta.get("PACK") or 0)
            rec.next_tile_loaded = bool(rec.tiles_ahead)
            rec.load_phases = 2 if meta.get("DY_LATE") else 1  # dy after the forward
            if meta.get("PACK") and (meta["NATIVE16"] or meta.get("RED")):
                # the packed layers' dW: carried across the tiles by 16-bit chains (nothing per
                # tile), or with RED added to the row every tile by reductions (its bytes once;
                # RED 2: but the last layer's, carried); the other layers read and write theirs
                # every tile
                w = [lay[f["c_out"]] * lay[f["n"]] for lay in meta["LAYERS"]]
                packed = sum(x for x, lay in zip(w, meta["LAYERS"]) if lay[f["kb"]])
                held = meta.get("RED") == 2 and meta["LAYERS"][-1][f["kb"]]  # the last layer's
                red = packed - (w[-1] if held else 0)
                rec.config["row_l2_bytes"] = (8 * (sum(w) - packed)
                                              + (4 * red if meta.get("RED") else 0))
            if meta.get("W_TILE"):  # the packed layers' weight blocks, loaded every tile where
                # they are used: the recomputed forward's (KEEP = 1: every layer but the last
                # once; KEEP = 0: layer i once per later layer) and dh's (every layer that
                # needs it), each counted from L2 (no L1 hit assumed)
                lays = meta["LAYERS"]
                nl = len(lays)
                blocks = [lay[f["s_in"]] * lay[f["mb"]] * _DTYPES[dtype].itemsize
                          if lay[f["kb"]] else 0 for lay in lays]
                loads = [(i < nl - 1 if meta.get("KEEP") else nl - 1 - i)
                         + bool(i > 0 or meta.get("NEED_DX")) for i in range(nl)]
                rec.config["weights_l2_bytes"] = sum(b * n for b, n in zip(blocks, loads))
        if fn.__name__ == "igc_chain_fwd" and meta.get("AHEAD"):  # persistent, x loaded one
            # or two tiles ahead
            rec.programs_per_sm = T.FORWARD_PROGRAMS_PER_SM
            rec.next_tile_loaded = True
            rec.tiles_ahead = int(meta["AHEAD"])
        out.append(compile_launch(fn, args, meta, arch, rec))
    return out


def kernel_structure(structure: str, dtype: str):
    """The Triton kernels' ``Structure`` of a named structure (what the autotuner keys on)."""
    c_x, spec, perms, idx = structure_args(structure)
    dt = _DTYPES[dtype]
    x = torch.randn(2, c_x, 2, 2, dtype=dt)
    chain = _chain.normalize(x, [torch.randn(c, k, dtype=dt) for c, k in spec.weight_shapes()],
                             list(spec.groups), perms, input_index=idx)
    return K.make_structure(c_x, chain.channels, chain.groups, chain.shuffles,
                            [p is not None for p in chain.perms], [False] * chain.num_layers,
                            idx is not None, dt)


# the launch meta-parameters the autotuner varies (the rest are the structure's and the call's)
TUNED = ("BLOCK_P", "num_warps", "KEEP", "DENSE", "PACK", "AHEAD", "RED", "SPLIT", "DY_LATE",
         "W_TILE")


def autotune_configs(structure, dtype, direction) -> list:
    """The configurations the autotuner may choose for this structure (after its pruning), as
    ``K.override_config`` arguments."""
    st = kernel_structure(structure, dtype)
    backward = direction == "backward"
    configs = K._configs(st, backward)
    kept = K._prune(st, backward)(configs, {}) if configs else []
    return [dict(K.launch_config(c).__dict__) for c in kept]


def pruning(structure: str, dtype: str, layout: str, direction: str, arch: int) -> list:
    """The autotuner's pruning (``K._prune``) of this problem's configurations with the spills
    read off sm_``arch`` cubins compiled here: ``[(config, spill bytes or None, kept)]``."""
    fn, args, meta = record(structure, dtype, layout, direction)[0]
    st = kernel_structure(structure, dtype)
    backward = direction == "backward"
    tuned = set(TUNED)
    named_args = dict(zip(fn.arg_names, args))
    kwargs = {k: v for k, v in meta.items() if k not in tuned}
    seen = {}

    def spills(fn_, config, named, kw):
        m = {**kw, **config.kwargs, "num_warps": config.num_warps}
        rec = compile_launch(fn_, [named[n] for n in fn_.arg_names if n in named], m, arch,
                             Record(structure, dtype, layout, direction, f"sm_{arch}", "", "",
                                    {}))
        seen[id(config)] = rec.spill_bytes if rec.compiled else None
        _check_loads(rec)
        return rec.spill_bytes

    configs = K._configs(st, backward)
    real = K._real_gpu_tensors
    K._real_gpu_tensors = lambda named: True
    try:
        kept = K._prune(st, backward, fn, spills)(configs, named_args, **kwargs)
    finally:
        K._real_gpu_tensors = real
    return [(dict(c.kwargs, num_warps=c.num_warps), seen.get(id(c)), c in kept)
            for c in configs]


def _check_loads(rec) -> None:
    """Raises what the GPU's compile raises where ``rec`` did not compile, or (OutOfResources)
    where its shared memory exceeds the SM's, so the pruning and the fixed path skip it there
    as they do on a GPU (``_loads``)."""
    if not rec.compiled:
        raise RuntimeError(rec.error)
    if rec.ctas_per_sm <= 0:
        raise OutOfResources(rec.shared_bytes, SM_LIMITS[int(rec.arch[3:])][1], "shared memory")


def refusal(structure: str, dtype: str, layout: str, direction: str, arch: int) -> dict:
    """What the Triton backend decides on a GPU of sm_``arch`` for this problem, with the
    package's own check (``_triton_ops.spill_reasons``: the fixed path's candidates compiled,
    the first spill-free one taken) on sm_``arch`` cubins compiled here: ``refused`` with the
    reason, or the configuration the fixed path launches (spill-free); for the backward also
    its layer ranges (``stages``; where there are several, ``launches`` is None: each range
    launches its own)."""
    x, chain, _ = problem_input(structure, dtype, layout)
    taken = []

    def spills(fn, args, meta):
        rec = compile_launch(fn, list(args), dict(meta), arch,
                             Record(structure, dtype, layout, direction, f"sm_{arch}", "", "",
                                    {}))
        _check_loads(rec)
        taken.append(({k: v for k, v in meta.items()
                       if k in TUNED},
                      rec.spill_bytes))
        return rec.spill_bytes

    K._FIXED.clear()
    backward = direction == "backward"
    reasons = T.spill_reasons(x, chain, backward, backward, False, spills=spills)
    mine = [r for r in reasons if f"Triton {direction} kernel" in r]
    last = [t for t in taken if ("KEEP" in t[0]) == backward]
    # the backward's layer ranges (``T.backward_stages``, on the same compiles): more than one
    # where the whole chain's packed backward spills and its ranges' do not (then the whole
    # chain's kernel is not launched, and a whole chain that spills everywhere is not refused)
    stages = [list(r) for r in T.backward_stages(x, chain, True, True, False, spills=spills)] \
        if backward and not mine else None
    staged = stages is not None and len(stages) > 1
    return {"structure": structure, "dtype": dtype, "layout": layout, "direction": direction,
            "arch": f"sm_{arch}", "toolchain": f"triton {triton.__version__}",
            "refused": bool(mine), "reason": mine[0] if mine else "",
            "compiles": bool(last),  # False: no candidate compiled (the launch would raise)
            "compiled": [{"config": c, "spill_bytes": b} for c, b in last],
            "launches": None if mine or staged else (last[-1][0] if last else None),
            "stages": stages}


# ---------------------------------------------------------------------------------------------
# CUDA kernels: one compilation serves every chain (the chain is a run-time parameter)
# ---------------------------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CUDA_DTYPES = {"I13__nv_bfloat16f": "bfloat16", "I6__halff": "float16", "Iff": "float32",
                "Idd": "float64"}
CUDA_THREADS = 256  # kThreads of csrc/cuda/chain_kernels.cuh


_CUDA_SASS = {}  # arch -> (toolchain, ptxas log, SASS of every kernel), filled by cuda_records
# arch -> {(kernel, callee): start address of the callee's code in the kernel's SASS listing}
# (functions that are not inlined), from nvdisasm's labels; filled by cuda_records
_CUDA_CALLEES = {}


def _callee_starts(nvdisasm: str) -> dict:
    """{(kernel, callee): address} of the labels ``$kernel$callee:`` of nvdisasm's listing: the
    first instruction of each function a kernel calls (same addresses as cuobjdump's)."""
    out, pending = {}, None
    for line in nvdisasm.splitlines():
        m = re.match(r"^\$(_Z\w+)\$(_Z\w+):\s*$", line)
        if m:
            pending = (m.group(1), m.group(2))
            continue
        if pending is not None:
            a = re.search(r"/\*([0-9a-f]{4,})\*/", line)
            if a:
                out[pending] = int(a.group(1), 16)
                pending = None
    return out


def _sass_slice(sass: str, lo: int, hi: int) -> str:
    """The instruction lines of a SASS listing with addresses in [lo, hi)."""
    keep = []
    for line in sass.splitlines():
        a = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if a and lo <= int(a.group(1), 16) < hi:
            keep.append(line)
    return "\n".join(keep) + "\n"


def _kernel_parts(arch: int, kernel: str, sass: str) -> dict:
    """The kernel's own code ("body") and each function it calls, by name, as SASS listings."""
    starts = sorted((a, callee) for (k, callee), a in _CUDA_CALLEES.get(arch, {}).items()
                    if k == kernel)
    bounds = [a for a, _ in starts] + [1 << 40]
    parts = {"body": _sass_slice(sass, 0, bounds[0])}
    for (a, callee), hi in zip(starts, bounds[1:]):
        parts[callee] = _sass_slice(sass, a, hi)
    return parts


def cuda_records(archs) -> list:
    """Registers, spills (ptxas's spill stores), stack and static shared memory of every CUDA
    kernel and dtype (``tests/csrc/chain_kernels_instantiate.cu``) for each arch, from
    ``nvcc -Xptxas -v`` (``cuda_compile.compile_instantiations``: in parallel, or reused from
    ``IGC_NVCC_CACHE``). The dynamic shared memory is sized
    per chain at launch (``plan_forward`` / ``plan_backward``); the kernels' loops have
    run-time trip counts, so the model has no per-position count for them."""
    import shutil

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("--cuda needs nvcc on PATH")
    version = re.search(r"release ([\d.]+)",
                        subprocess.run([nvcc, "--version"], capture_output=True,
                                       text=True).stdout)
    toolchain = f"nvcc {version.group(1) if version else '?'}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            compiled = cuda_compile.compile_instantiations([str(a) for a in archs], tmp, nvcc)
        except RuntimeError as e:
            raise SystemExit(f"nvcc failed:\n{str(e)[-3000:]}")
        rows = []
        for arch in archs:
            cubin, _, log = compiled[str(arch)]
            _CUDA_SASS[arch] = (toolchain, log, _tool("cuobjdump", "--dump-sass", cubin))
            _CUDA_CALLEES[arch] = _callee_starts(_tool("nvdisasm", "-c", cubin))
            for k in perf_model.parse_ptxas_verbose(log):
                kind = re.search(r"(chain_forward_kernel|chain_backward_kernel|"
                                 r"reduce_partials_kernel)", k["mangled"])
                if kind is None:
                    continue
                dtype = next((d for tag, d in _CUDA_DTYPES.items()
                              if k["mangled"].split(kind.group(1), 1)[1].startswith(tag)), "?")
                regs = -(-k["registers"] // 8) * 8  # allocated in units of 8 per thread
                rec = Record("any (run-time chain)", dtype, "any", "forward"
                             if kind.group(1) == "chain_forward_kernel" else "backward",
                             k["arch"], toolchain, kind.group(1), {"threads": CUDA_THREADS})
                rec.backend = "cuda"
                rec.compiled = True
                rec.registers, rec.spill_bytes = k["registers"], k["spill_bytes"]
                rec.stack_bytes = k["stack_bytes"]
                rec.shared_bytes = k["shared_bytes"]
                rec.num_warps = CUDA_THREADS // 32
                rec.ctas_per_sm = min(65536 // (regs * CUDA_THREADS), 2048 // CUDA_THREADS)
                rows.append(rec)
    return rows


# ---------------------------------------------------------------------------------------------
# The CUDA tensor-core forward (csrc/cuda/chain_mma.cuh): per-position counts for one chain
# ---------------------------------------------------------------------------------------------
def _sass_functions(sass: str) -> dict:
    return {f.split()[0]: f for f in sass.split("Function : ")[1:]}


def _region_counts(ins, lo, hi) -> dict:
    """Warp instructions by class, shared bytes and tensor multiply-adds of the SASS in
    [lo, hi] (each instruction once)."""
    c = {k: 0.0 for k in perf_model.CLASSES}
    smem = mma = 0.0
    for a, _, op, _ in ins:
        if lo <= a <= hi:
            cls = perf_model.classify(op)
            c[cls] += 1
            if cls == "LDS/STS":
                smem += perf_model.shared_bytes_of(op)
            elif cls == "HMMA/MMA":
                mma += perf_model.mma_fma_of(op)
    return {"counts": c, "smem_bytes": smem, "mma_fma": mma}


def _combine(*terms) -> dict:
    """sum of weight * counts over (weight, counts) terms"""
    out = {"counts": {k: 0.0 for k in perf_model.CLASSES}, "smem_bytes": 0.0, "mma_fma": 0.0}
    for w, t in terms:
        for k in perf_model.CLASSES:
            out["counts"][k] += w * t["counts"][k]
        out["smem_bytes"] += w * t["smem_bytes"]
        out["mma_fma"] += w * t["mma_fma"]
    return out


def _layer_model(ins, loops, mt: int, planes: int = 1) -> dict:
    """k16 / k8 costs of one inlined mma_layer among ``loops``: per k-step of a k16 / k8 item
    (the innermost loop holding that HMMA and ldmatrix.trans, divided by its unroll factor: the
    number of ldmatrix.trans over mt), per item besides its k-steps (the enclosing loop minus
    the k-step loop and its remainder copies; a straight-line item, whose innermost loop
    already holds the result stores, is that loop). Where the item's first k-step is peeled off
    the loop (HMMAs in the item outside it: "peeled"), the item's cost includes that k-step and
    the loop counts the others (``_mma_layer_terms``). Items of two output blocks (two HMMAs per
    ldmatrix: pair items) are "k16p" / "k8p", items of four (the in-place forward's groups of
    32) "k16q"; k8 items of two groups of one block each (one ldmatrix x4 for both groups'
    activations) are "k8g". With three planes (the float32 kernel, MmaF32x3) a k-step issues
    three ldmatrix and six HMMAs per product where the 16-bit kernel issues one of each (two
    planes, MmaF32x2: two and three, ``MMA_PRODUCTS``). Items
    whose first k-step has a copy for layers with a bias count the other one
    (``perf_model.without_bias_paths``)."""
    ins = perf_model.without_bias_paths(ins)

    def ops(lp):
        return [op for ad, _, op, _ in ins if lp[0] <= ad <= lp[1]]

    out = {}
    for name, needle in (("k16", "HMMA.16816"), ("k8", "HMMA.1688")):
        cands = [lp for lp in loops if any(o.startswith(needle) for o in ops(lp))
                 and any(o.startswith("LDSM.16.MT88") for o in ops(lp))]
        inner = [lp for lp in cands
                 if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] for o in cands)]
        for kl in sorted(inner, key=lambda lp: lp[1] - lp[0]):
            body = ops(kl)
            lds = sum(1 for o in body if o.startswith("LDSM.16.MT88")) / planes
            hmma = sum(1 for o in body if o.startswith(needle)) / MMA_PRODUCTS[planes]
            if name == "k8" and any(o.startswith("LDSM.16.MT88.4") for o in body):
                # k8 items of two groups: one ldmatrix x4 loads both groups' activations (single
                # k8 items: x2) and feeds two HMMAs, like the pair items
                key = "k8g"
            elif hmma >= 4 * lds:
                key = f"{name}q"  # four HMMAs per ldmatrix: an item of four output blocks
            elif hmma >= 2 * lds:
                key = f"{name}p"  # two HMMAs per ldmatrix: an item of two output blocks
            else:
                key = name
            if key in out:
                continue  # the smallest loop of each kind
            unroll = max(1, round(lds / mt))
            if any(op.startswith("STS") for op in body):
                # no k-step loop (the k8 item is straight-line): the loop is the item loop, with
                # as many items per iteration as it holds ldmatrix.trans over mt (unrolling)
                whole = _region_counts(ins, kl[0], kl[1])
                out[key] = {"step": _combine(), "item": _combine((1.0 / unroll, whole)),
                            "unroll": unroll}
                continue
            item = None
            for a, b, _ in loops:  # the smallest loop strictly around the k-step loop
                if a <= kl[0] and kl[1] <= b and (a, b) != kl[:2]:
                    if item is None or b - a < item[1] - item[0]:
                        item = (a, b)
            kc = _region_counts(ins, kl[0], kl[1])
            step = _combine((1.0 / unroll, kc))
            whole = _region_counts(ins, *item)
            base = _combine((1.0, whole), (-1.0, kc), (-(unroll - 1), step))
            # the item's first k-step peeled off the loop (it takes the bias as the products'
            # c operand): the item holds HMMAs of its own and the loop runs the other k-steps
            out[key] = {"step": step, "item": base, "unroll": unroll,
                        "peeled": base["counts"]["HMMA/MMA"] > 0}
    return out


def _tile_move_model(ins, loops) -> dict:
    """Tile movement, per 16-byte vector (NCHW rows: one per lane and iteration) or per 8x8
    block (channels-last: a 32-bit load, a movmatrix and a 32-bit store per lane; loops of 1
    and of 4 blocks per warp step, "_cl1" / "_cl4"): the innermost loop of each kind, and as
    ``<kind>_min`` / ``<kind>_max`` the cheapest and the costliest of the kernel's loops of that
    kind. A kernel has several where a load takes a plain row path and a gathered one (x
    through the input index, dy through the last gather index): the tensor-core records take
    the cheapest for a tile the chain does not gather and the costliest for one it does
    (``_move_sfx``)."""
    out = {}
    for name, needles, per_iter in (("load_nchw", ("LDG.E.128", "STS.128"), "LDG.E.128"),
                                    ("load_scalar", ("LDG.E.U16", "STS.U16"), "STS.U16"),
                                    ("load_cl", ("LDG.E", "MOVM", "STS"), "MOVM"),
                                    ("load_clw", ("LDG.E.128", "STSM.16.MT88.4"), "STSM"),
                                    ("store_nchw", ("LDS.128", "STG.E.128"), "STG.E.128"),
                                    ("store_cl", ("LDS", "MOVM", "STG.E"), "MOVM"),
                                    ("store_clw", ("LDSM.16.MT88.4", "STG.E.128"), "STG.E.128"),
                                    # the float32 kernel's element paths: three plane stores
                                    # (loads) per element
                                    ("load_f32scalar", ("LDG.E", "STS.U16"), "STS.U16"),
                                    ("store_f32scalar", ("LDS.U16", "STG.E"), "STG.E")):
        for a, b, _ in loops:
            ops = [op for ad, _, op, _ in ins if a <= ad <= b]
            if any(o.startswith("HMMA") for o in ops) or not all(
                    any(o.startswith(n) for o in ops) for n in needles):
                continue
            n = sum(1 for o in ops if o.startswith(per_iter))
            key = name if name.endswith(("nchw", "scalar", "clw")) else f"{name}{n}"
            cost = _combine((1.0 / max(1, n), _region_counts(ins, a, b)))
            cost["span"] = b - a
            total = sum(cost["counts"].values())
            for suffix, better in (("_min", lambda t, o: t < o), ("_max", lambda t, o: t > o)):
                prev = out.get(key + suffix)
                if prev is None or better(total, sum(prev["counts"].values())):
                    out[key + suffix] = cost
            if key in out and out[key]["span"] <= b - a:
                continue  # keep the innermost loop of each kind
            out[key] = cost
    return out


def mma_kernel_model(sass: str, mt: int, planes: int = 1) -> dict:
    """Executed warp instructions of chain_forward_mma_kernel<Fmt, mt>, read from its SASS: the
    k16 / k8 item and k-step costs of its layer (``_layer_model``; ``planes``: 3 for the
    float32 kernel) and the tile load and store loops (``_tile_move_model``)."""
    ins = perf_model.parse_sass(sass)
    loops = perf_model._loops(ins)
    return {**_layer_model(ins, loops, mt, planes), **_tile_move_model(ins, loops)}


def mma_backward_kernel_model(sass: str, mt: int, planes: int = 1) -> dict:
    """Executed warp instructions of chain_backward_mma_kernel<Fmt, mt>, read from its SASS.
    The forward recompute is the loop over layers that holds the tensor-core layer and no
    ldmatrix without .trans; the walk back is the loop that holds the weight-gradient products
    (LDSM.16.M88: ldmatrix without .trans). Inside them: the recompute's layer costs ("fwd"), the
    transposed product's ("dh"; the same code on W^T, with the permutation as the store rows),
    per weight-gradient item (the loop around its HMMA.16816 and non-trans LDSM.x4s, mt k-steps,
    2 HMMAs each; where the k-steps are a loop, its body counted once per iteration, and the
    update of the CTA's fp32 row (added by reductions in L2): "dw_item", a 16 x 16 block of a
    group, 8 values per lane; "dw_full_item", the same where every block is full, 4 pairs per
    lane; "dw_wide_item", 16 x 32 of full blocks, 8 pairs per lane and 4 HMMAs per k-step (one
    and two planes, ``MMA_WIDE_ITEMS``); "dw_pair_item", two groups of 8 x 8 (whole pairs, in
    their own loop), 4 values per lane; "dw_pair_edge_item", the other pairs, bounds checked),
    and the
    tile loads and stores (the costliest loop of each kind). With three planes (the float32
    kernel, MmaF32x3) every ldmatrix is three and every HMMA six (two planes: two and three)."""
    hmma_per = MMA_PRODUCTS[planes]
    ins = perf_model.parse_sass(sass)
    loops = perf_model._loops(ins)

    def ops_in(a, b):
        return [op for ad, _, op, _ in ins if a <= ad <= b]

    def inside(outer):
        return [l for l in loops if outer[0] <= l[0] and l[1] <= outer[1] and l[:2] != outer[:2]]

    def smallest(cands):
        return min(cands, key=lambda l: l[1] - l[0])

    with_layer = [l for l in loops if any(o.startswith("HMMA") for o in ops_in(l[0], l[1]))
                  and any(o.startswith("BAR") for o in ops_in(l[0], l[1]))]
    recompute = smallest([l for l in with_layer
                          if not any(o.startswith("LDSM.16.M88") for o in ops_in(l[0], l[1]))])
    walk = smallest([l for l in with_layer
                     if any(o.startswith("LDSM.16.M88") for o in ops_in(l[0], l[1]))])
    # weight-gradient item loops: HMMA.16816 and non-trans LDSM.x4, the updates of the fp32 row,
    # no trans LDSM (dh). Per item and lane: the general 16 x 16 item 8 values, the pair item
    # 4, the full-block items pairs, 4 ("full") or 8 ("wide", 16 x 32: three ldmatrix feed four
    # HMMAs per k-step). Reductions in L2, a pair one REDG.E.ADD.F32x2 on sm_90 and two scalar
    # RED.E.ADD.F32 on sm_80; the general items' and the partial pair items' reductions each
    # under a branch (BSSY), the full, wide and whole pair items' (two 8 x 8 groups: their own
    # loop) not.
    def values(lp):
        """(values added, branches around them) in the loop"""
        body = ops_in(lp[0], lp[1])
        pairs = sum(1 for o in body if o.startswith("RED") and "F32x2" in o)
        scalar = sum(1 for o in body if o.startswith("RED") and "F32x2" not in o)
        return 2 * pairs + scalar, sum(1 for o in body if o.startswith("BSSY"))

    def hmma_per_ldsm(lp):
        body = ops_in(lp[0], lp[1])
        hmma = sum(1 for o in body if o.startswith("HMMA.16816")) / hmma_per
        ldsm = sum(1 for o in body if o.startswith("LDSM.16.M88.4")) / planes
        return hmma / ldsm
    items = [l for l in inside(walk)
             if all(any(o.startswith(n) for o in ops_in(l[0], l[1]))
                    for n in ("HMMA.16816", "LDSM.16.M88.4"))
             and not any(o.startswith("LDSM.16.MT88") for o in ops_in(l[0], l[1]))
             and values(l)[0] > 0]
    items = [l for l in items if not any(o is not l and l[0] <= o[0] and o[1] <= l[1]
                                         for o in items)]
    # (a loop may hold two items: item_cost divides by the items per iteration)
    def per_iter(lp, per_step):
        """items per iteration: one where the k-steps are a loop of their own, else the HMMAs
        over those of one item (mt k-steps of ``per_step``)"""
        if any(any(o.startswith("HMMA") for o in ops_in(k[0], k[1])) for k in inside(lp)):
            return 1
        hmma = sum(1 for o in ops_in(lp[0], lp[1]) if o.startswith("HMMA.16816")) / hmma_per
        return max(1, round(hmma / (per_step * mt)))

    kinds = {}
    for lp in items:
        wide = hmma_per_ldsm(lp) > 1.2
        k = per_iter(lp, 4 if wide else 2)
        n, branches = (v // k for v in values(lp))
        if wide:
            key = "wide"
        else:
            key = {(8, False): "full", (4, False): 4, (8, True): 8,
                   (4, True): "pair_edge"}.get((n, branches > 0), n)
        if key in kinds:
            raise SystemExit(f"two weight-gradient item loops of kind {key}")
        kinds[key] = lp
    # (the 16 x 32 items with one and two planes only)
    want = [4, 8, "full", "pair_edge"] + (["wide"] if MMA_WIDE_ITEMS[planes] else [])
    if sorted(kinds, key=str) != sorted(want, key=str):
        raise SystemExit(f"weight-gradient item loops not found (values, branches per "
                         f"loop: {sorted(values(l) for l in items)})")

    def item_cost(lp, per_step=2):
        """one item: the loop body, its k-step loop (when not fully unrolled) once per
        iteration: mt over the k-steps (``per_step`` HMMAs each, times six with three planes)
        one iteration holds; without a k-step loop, the body over the items it holds
        (``per_iter``)"""
        kloops = [l for l in inside(lp) if any(o.startswith("HMMA")
                                               for o in ops_in(l[0], l[1]))]
        whole = _region_counts(ins, lp[0], lp[1])
        if kloops:
            k = smallest(kloops)
            body = _region_counts(ins, k[0], k[1])
            steps = max(1, round(body["counts"]["HMMA/MMA"] / (per_step * hmma_per)))
            return _combine((1.0, whole), (max(1, mt // steps) - 1, body))
        return _combine((1.0 / per_iter(lp, per_step), whole))

    dw_items = [kinds[k][:2] for k in kinds]
    out = {"fwd": _layer_model(ins, inside(recompute), mt, planes),
           "dh": _layer_model(ins, [l for l in inside(walk) if l[:2] not in dw_items], mt,
                              planes),
           "dw_item": item_cost(kinds[8]), "dw_full_item": item_cost(kinds["full"]),
           "dw_pair_item": item_cost(kinds[4])}
    if "wide" in kinds:
        out["dw_wide_item"] = item_cost(kinds["wide"], 4)
    if "pair_edge" in kinds:
        out["dw_pair_edge_item"] = item_cost(kinds["pair_edge"])
    out.update(_tile_move_model(ins, loops))
    return out


def mma_tile_rows(c: int) -> int:
    """mma_tile_rows of chain_mma.cuh: a tile buffer's rows, a multiple of 4"""
    return -(-c // 4) * 4


def mma_wrap_layout(chans, layers: int) -> bool:
    """mma_wrap_layout of chain_mma.cuh: the in-place forward of 2^nb channels, nb % 3 != 0,
    with at least 3 layers takes mma_elem's kWrap tile layout"""
    c = max(chans)
    return layers >= 3 and c >= 32 and c & (c - 1) == 0 and (c.bit_length() - 1) % 3 != 0


def mma_smem_bytes(chans, tp: int, in_place: bool = False, planes: int = 1) -> int:
    """mma_forward_smem_bytes of chain_mma.cuh for channels C_0 .. C_L: a tile of the widest
    of C_0, C_2, ... and one of the widest of C_1, C_3, ... (with in-place layers, one of the
    widest), the zero and scratch rows (all of it ``planes`` times: 3 or 2 for float32), two offset
    arrays"""
    rows = (mma_tile_rows(max(chans)) if in_place
            else mma_tile_rows(max(chans[0::2])) + mma_tile_rows(max(chans[1::2])))
    return planes * (rows + 2) * tp * 2 + 2 * tp * 8


def _two_cta_budget(arch: int) -> int:
    """cta_smem_budget of chain_kernels.cuh for two CTAs per SM (below the opt-in limit, the
    SM's shared memory less 1 KB)."""
    return SM_LIMITS[arch][1] // 2 - 1024


def mma_tile(arch: int, smem, max_tp: int = 64, ctas: int = 2) -> int:
    """mma_choose_mt of chain_mma.cuh for many positions: the largest tile (at most
    ``max_tp``) that leaves room for two CTAs per SM, else the largest that fits one
    (``smem(tp)``: bytes of a tile); with ``ctas`` = 1, the largest that fits one."""
    optin = SM_LIMITS[arch][1] - 1024
    for budget in ((_two_cta_budget(arch), optin) if ctas == 2 else (optin,)):
        for tp in (128, 64, 32, 16):
            if tp <= max_tp and smem(tp) <= budget:
                return min(tp, 64)
    return 0


def mma_forward_plan(spec, chans, arch: int, planes: int = 1) -> tuple:
    """(tile, in-place layers) of plan_forward_mma for channels ``chans`` (C_0 .. C_L):
    in-place layers (mma_in_place_max_tp: every group square, at most 16 wide, or 25 to 32
    wide with tiles of at most 32 positions; float32, ``planes`` > 1: at most 32 positions) where
    they give a larger tile than two tiles do (float32: more positions per SM, the tile times
    the CTAs whose shared memory fits)."""
    tp = mma_tile(arch, lambda t: mma_smem_bytes(chans, t, False, planes))
    widths = [(cout // g, cin // g) for (cout, _), g, cin in
              zip(spec.weight_shapes(), spec.groups, chans[:-1])]
    if all(m == n and (m <= 16 or 24 < m <= 32) for m, n in widths):
        max_tp = 32 if planes > 1 or any(m > 16 for m, _ in widths) else 64
        tp_ip = mma_tile(arch, lambda t: mma_smem_bytes(chans, t, True, planes), max_tp)
        if planes > 1:  # float32: by positions per SM (tile x CTAs whose shared memory fits)
            def per_sm(t, ip):
                two = mma_smem_bytes(chans, t, ip, planes) <= _two_cta_budget(arch)
                return t * (2 if two else 1)
            if tp_ip and (not tp or per_sm(tp_ip, True) > per_sm(tp, False)):
                return tp_ip, True
        elif tp_ip > tp:
            return tp_ip, True
    return tp, False


def mma_backward_smem_bytes(rows: int, tp: int, planes: int = 1) -> int:
    """mma_backward_smem_bytes of chain_mma_backward.cuh (``planes``: 3 or 2 for float32)"""
    return planes * (rows + 2) * tp * 2 + 3 * tp * 8


def mma_backward_tile(rows: int, arch: int, planes: int = 1) -> tuple:
    """(tile, two CTAs per SM) of plan_backward_mma for many positions (tile 0: the CUDA-core
    backward runs instead): the forward's rule (``mma_tile``) on the store-all tiles' bytes;
    float32 (three or two planes): 32 positions where two CTAs fit, else 16 where two fit (the
    float32 kernels that run two per SM: mma_backward_min_ctas), else the largest tile for one
    CTA."""
    smem = lambda t: mma_backward_smem_bytes(rows, t, planes)  # noqa: E731
    if planes > 1:
        for tp in (32, 16):
            if smem(tp) <= _two_cta_budget(arch):
                return tp, True
        return mma_tile(arch, smem, ctas=1), False
    tp = mma_tile(arch, smem)
    return tp, bool(tp) and smem(tp) <= _two_cta_budget(arch)


# SMs and L2 bytes of the device the tile rules are mirrored for (sm_80: A100; sm_90: the
# model's H200, whose L2 the H100 shares)
PLAN_DEVICE = {80: (108, 40 << 20),
               90: (perf_model.DEVICES["h200"].sms, int(perf_model.DEVICES["h200"].l2_bytes))}


def mma_backward_plan(chans, arch: int, row_floats: int = 0, planes: int = 1,
                      c_in: int = 0) -> tuple:
    """(tile, reload x, tile rows) of plan_backward_mma for channels ``chans`` (C_0 .. C_L), for
    many positions: the store-all tiles x | u_1 .. u_{L-1} | dy, or with L >= 2 x and dy in one
    tile where that gives more positions per SM (tile x CTAs per SM by shared memory, 2 or 1);
    then mma_backward_wide_tile: where two CTAs per SM fit and their fp32 gradient rows
    (``row_floats`` weights and biases each; 0: not counted) exceed three quarters of the L2 of
    ``PLAN_DEVICE[arch]``, or (one plane) a row's bytes are at least those of a tile's x, dy and
    dx (``c_in``: x's channels, default C_0), one CTA per SM with a tile twice as long, where it
    fits one CTA.
    Float32 (``planes`` = 3 or 2): that many planes of every tile (``mma_backward_tile``)."""
    mid = sum(mma_tile_rows(c) for c in chans[1:-1])
    xr, dyr = mma_tile_rows(chans[0]), mma_tile_rows(chans[-1])

    def pick(rows):
        tp, two = mma_backward_tile(rows, arch, planes)
        return tp, tp * (2 if two else 1), two

    keep = xr + mid + dyr
    tp, per_sm, two = pick(keep)
    reload, rows = False, keep
    if len(chans) >= 3:
        tp_r, per_sm_r, two_r = pick(max(xr, dyr) + mid)
        if per_sm_r > per_sm:
            tp, two, reload, rows = tp_r, two_r, True, max(xr, dyr) + mid
    sms, l2 = PLAN_DEVICE[arch]
    tile_bytes = tp * (chans[0] + (c_in or chans[0]) + chans[-1]) * 2
    if (two and 16 <= tp < 64
            and (4 * (2 * sms * 4 * row_floats) > 3 * l2
                 or (planes == 1 and row_floats and 4 * row_floats >= tile_bytes))
            and mma_backward_smem_bytes(rows, 2 * tp, planes) <= SM_LIMITS[arch][1] - 1024):
        tp *= 2
    return tp, reload, rows


def backward_l2_prefetch(ctas_per_sm: int, arch: int, row_floats: int, tp: int, c_x: int,
                         c_out: int, planes: int = 1, elem_bytes: int = 0) -> bool:
    """The L2 prefetch of the next tile's x and dy of plan_backward_mma (and plan_backward:
    l2_prefetch_fits): where one CTA runs per SM and, on ``PLAN_DEVICE[arch]``, the CTAs' fp32
    gradient rows (``row_floats`` each) and those tiles (``tp`` positions of ``c_x`` + ``c_out``
    channels of ``elem_bytes``; by default 2, or 4 for float32 with three planes) take at most
    three quarters of the L2."""
    sms, l2 = PLAN_DEVICE[arch]
    tile_bytes = tp * (c_x + c_out) * (elem_bytes or (4 if planes > 1 else 2))
    return ctas_per_sm == 1 and 4 * sms * (4 * row_floats + tile_bytes) <= 3 * l2


def forward_l2_prefetch(ctas_per_sm: int, arch: int, tp: int, c_x: int, elem_bytes: int) -> bool:
    """The CUDA-core forward's L2 prefetch of the next tile's x (plan_forward: l2_prefetch_fits):
    where, on ``PLAN_DEVICE[arch]``, the next tiles of every resident CTA (``tp`` positions of
    ``c_x`` channels of ``elem_bytes``) take at most three quarters of the L2."""
    sms, l2 = PLAN_DEVICE[arch]
    return 4 * sms * ctas_per_sm * tp * c_x * elem_bytes <= 3 * l2


def _mma_record(s, dtype, layout, direction, arch, toolchain, kernel, tp, k, smem):
    """A per-position record of a tensor-core kernel (ptxas facts ``k``, dynamic shared memory
    ``smem``); the caller adds its counts."""
    warps = CUDA_THREADS // 32
    rec = Record(s, dtype, layout, direction, f"sm_{arch}", toolchain, kernel,
                 {"threads": CUDA_THREADS, "TP": tp})
    rec.backend = "cuda"
    rec.compiled = True
    rec.registers, rec.spill_bytes = k["registers"], k["spill_bytes"]
    rec.stack_bytes = k["stack_bytes"]
    rec.shared_bytes = smem
    rec.num_warps = warps
    rec.ctas_per_sm = ctas_per_sm(rec.registers, rec.shared_bytes + 1024, warps, arch)
    rec.per_position = True
    rec.block_p = tp
    facts = chain_facts(s)
    rec.c_x, rec.c_out = facts["c_x"], facts["c_out"]
    rec.macs_per_position = facts["macs_per_position"]
    rec.is_default = rec.fixed_path = rec.autotuner_keeps = True
    return rec


def _cuda_archs(archs):
    """(arch, toolchain, SASS functions, ptxas records by mangled name) for every arch of
    ``archs`` that cuda_records compiled."""
    for arch in archs:
        if arch not in _CUDA_SASS:
            continue
        toolchain, log, sass = _CUDA_SASS[arch]
        yield (arch, toolchain, _sass_functions(sass),
               {k["mangled"]: k for k in perf_model.parse_ptxas_verbose(log)})


# the tensor-core kernels' element formats per dtype, and their bfloat16 planes (float32: three,
# or two where the user allows TF32 for matmul; both opt-in, IGC_CUDA_FP32_MMA=1)
_MMA_FORMATS = {"bfloat16": ("MmaBf16",), "float16": ("MmaF16",),
                "float32": ("MmaF32x3", "MmaF32x2")}
MMA_PLANES = {"MmaBf16": 1, "MmaF16": 1, "MmaF32x3": 3, "MmaF32x2": 2}
# HMMAs per product: every pair of planes whose indices sum to at most planes - 1
MMA_PRODUCTS = {1: 1, 2: 3, 3: 6}
# whether the backward's weight gradients take 16 x 32 items (mma_weight_grads: not with three
# planes, whose nine operand fragments per k-step took the kernel past 128 registers)
MMA_WIDE_ITEMS = {1: True, 2: True, 3: False}


def _mma_problems(structures, dtypes, archs, float32: bool = False):
    """(arch, toolchain, SASS functions, ptxas records, dtype, Fmt name, structure) for every
    compiled arch, 16-bit dtype (with ``float32``, also float32: the opt-in float32 kernels,
    MmaF32x3 and MmaF32x2) and structure of the tensor-core kernels' records."""
    for arch, toolchain, funcs, ptxas in _cuda_archs(archs):
        for dtype in dtypes:
            if dtype not in ("bfloat16", "float16") and not (float32 and dtype == "float32"):
                continue
            for fmt in _MMA_FORMATS[dtype]:
                for s in structures:
                    yield arch, toolchain, funcs, ptxas, dtype, fmt, s


def _set_mma_dyn(rec, total: dict, model: str) -> None:
    """The per-warp dynamic counts of a tensor-core record from the per-CTA ``total``."""
    warps = rec.num_warps
    rec.dyn = {"counts": {c: v / warps for c, v in total["counts"].items()},
               "smem_bytes": total["smem_bytes"] / warps,
               "mma_fma": total["mma_fma"] / warps, "tf32_fma": 0.0,
               "local_bytes": 0.0, "unresolved_loops": 0, "model": model}


def cuda_mma_backward_records(structures, dtypes, layouts, archs) -> list:
    """One backward record (dx and every dW) per structure, 16-bit dtype, layout and arch for
    the tensor-core backward (and per float32 structure for the opt-in float32 kernels, MmaF32x3
    and MmaF32x2: three and two planes, the tile of ``mma_backward_plan``; not marked as the
    default path), with
    per-position counts: the chain's recompute items and k-steps (layers 1 .. L-1), the
    transposed products' (every layer), the weight-gradient items (pairs of groups where a
    group has at most 8 outputs and inputs, else 16 x 16 blocks), and the tile loads of x (twice where x and dy share a tile) and dy and the store of dx, times
    the SASS costs of ``mma_backward_kernel_model`` (needs cuda_records first, for the SASS).
    Chains whose store-all tiles do not fit get no record (the CUDA-core backward runs them)."""
    rows = []
    for arch, toolchain, funcs, ptxas, dtype, fmt, s in _mma_problems(structures, dtypes, archs,
                                                                      float32=True):
        c_x, spec, perms, idx = structure_args(s)
        c0 = c_x if idx is None else len(idx)
        shapes = spec.weight_shapes()
        chans = [c0] + [c for c, _ in shapes]
        planes = MMA_PLANES[fmt]
        # the fp32 gradient row: the weights (the static structures have no biases)
        row_floats = sum(c * k for c, k in shapes)
        tp, reload, rows_ = mma_backward_plan(chans, arch, row_floats, planes, c_x)
        if tp == 0:
            continue
        mt = tp // 16
        name = next(n for n in funcs if "chain_backward_mma_kernel" in n
                    and f"{fmt}ELi{mt}E" in n)
        model = mma_backward_kernel_model(funcs[name], mt, planes)
        terms = []
        row_l2 = 0  # bytes of the fp32 row per tile between the SM and the L2
        for l, ((cout, n), g) in enumerate(zip(shapes, spec.groups)):
            m = cout // g
            # added by reductions in L2: the row's bytes once
            row_l2 += 4 * cout * n
            if l + 1 < len(shapes):  # recomputed u_{l+1}
                terms += _mma_layer_terms(model["fwd"], g, m, n)
            terms += _mma_layer_terms(model["dh"], g, n, m)  # dh = W^T du
            wide, narrow = max(m, n), min(m, n)
            if wide <= 8:  # dW items: pairs of groups (one plane: the whole pairs of 8 x 8
                # groups in their own loop, the rest in the bounds-checked one)
                if "dw_pair_edge_item" not in model:
                    terms.append((-(-g // 2), model["dw_pair_item"]))
                elif m == n == 8:
                    terms += [(g // 2, model["dw_pair_item"]), (g % 2, model["dw_pair_edge_item"])]
                else:
                    terms.append((-(-g // 2), model["dw_pair_edge_item"]))
            elif (MMA_WIDE_ITEMS[planes] and n <= m and n % 32 == 0
                  and m % 16 == 0):  # 16 x 32 blocks (mma_weight_grads: full blocks with B in
                # pairs, with reductions; the layer's offset in the fp32 row is even here)
                terms.append((g * (m // 16) * (n // 32), model["dw_wide_item"]))
            else:  # 16 x 16 blocks of a group (mma_weight_grads: full blocks with n <= m
                # take the float2 loop)
                full = n <= m and n % 16 == 0 and m % 16 == 0
                terms.append((g * -(-wide // 16) * -(-narrow // 16),
                              model["dw_full_item" if full else "dw_item"]))
        for layout in layouts:
            cl = layout == "channels_last"

            # x through the input index, dy to the rows of the last permutation's gather
            sx, sy = _move_sfx(idx is not None), _move_sfx(perms[-1] is not None)
            if planes > 1:
                ldx, ldx_elems = _f32_load_cost(model, cl, c0, planes, idx is None, sx)
                ldy, ldy_elems = _f32_load_cost(model, cl, spec.out_channels, planes, True, sy)
                st, st_elems = _f32_store_cost(model, cl, c_x, planes)
            elif not cl:
                ldx, ldx_elems = model["load_nchw" + sx], 256
                ldy, st = model["load_nchw" + sy], model["store_nchw_max"]
                ldy_elems = st_elems = 256
            else:
                ldx, ldx_elems = (_cl_cost(model, "load", c0, sx) if idx is None
                                  else (model["load_scalar_max"], 32))
                ldy, ldy_elems = _cl_cost(model, "load", spec.out_channels, sy)
                st, st_elems = _cl_cost(model, "store", c_x)
            # with reload, x is loaded twice (the second time for layer 1's dW)
            total = _combine(*terms, ((2 if reload else 1) * c0 * tp / ldx_elems, ldx),
                             (spec.out_channels * tp / ldy_elems, ldy),
                             (c_x * tp / st_elems, st))
            rec = _mma_record(s, dtype, layout, "backward", arch, toolchain,
                              "chain_backward_mma_kernel", tp, ptxas[name],
                              mma_backward_smem_bytes(rows_, tp, planes))
            rec.config["reload_x"] = reload
            rec.config["row_l2_bytes"] = row_l2
            rec.config["prefetch"] = backward_l2_prefetch(
                rec.ctas_per_sm, arch, row_floats, tp, c_x, spec.out_channels, planes)
            if planes > 1:  # opt-in (IGC_CUDA_FP32_MMA=1): not what a float32 call runs
                rec.config["planes"] = planes
                rec.is_default = rec.fixed_path = rec.autotuner_keeps = False
            _set_mma_dyn(rec, total,
                         "per layer: recompute and dh items x item cost + items "
                         "x k-steps x k-step cost, dW items x item cost (its "
                         "mt k-steps and the fp32 row update); tile loads of x "
                         "and dy and store of dx per 16-byte vector or 8x8 block "
                         "(SASS loop bodies of the kernel; per-tile offsets, "
                         "barriers, bias gradients and the reduction kernel are "
                         "left out)")
            rows.append(rec)
    return rows


def _move_sfx(gathered: bool) -> str:
    """The tile-move cost a tensor-core record takes (``_tile_move_model``): the costliest loop
    of its kind for a tile moved through an index or gathered rows (and for stores), else the
    cheapest (the plain path)."""
    return "_max" if gathered else "_min"


def _cl_cost(model, kind, c, sfx="_max"):
    """(cost, elements per counted unit) of a channels-last tile load or store of c channels:
    where c % 32 == 0, the 16-byte loop (``load_clw`` / ``store_clw``: 256 elements per warp
    step; the load only on sm_90, through stmatrix) if the kernel has it, else four 8x8
    movmatrix blocks per warp step; one block per step otherwise (64 elements per block).
    ``sfx``: ``_move_sfx``."""
    if c % 32 == 0 and f"{kind}_clw" in model:
        return model[f"{kind}_clw{sfx}"], 256
    return model[f"{kind}_cl{4 if c % 32 == 0 else 1}{sfx}"], 64


def _f32_block_key(model, kind):
    """The float32 kernel's channels-last block loop (``load_cl<n>`` / ``store_cl<n>``: n
    movmatrix per iteration, one per plane of an 8x8 block, the loop unrolled as the compiler
    chose)."""
    return next(k for k in model if k.startswith(f"{kind}_cl") and k[len(kind) + 3:].isdigit())


def _f32_load_cost(model, cl, c, planes, vec=True, sfx="_max"):
    """(cost, elements per counted unit) of a float32 tile load (MmaF32x3, MmaF32x2: ``planes``
    3 or 2) of c channels: per 16-byte global access (4 elements per lane) on NCHW rows;
    channels-last (``vec``: no input index): per stmatrix (one per plane: a third or a half of
    8 positions x 32 channels) in the 32-channel steps (C % 32 == 0, sm_90), per movmatrix (one
    plane of an 8x8 block) on other tiles of C % 8 == 0; else the element path, per plane store
    (a plane of an element per lane). ``sfx``: ``_move_sfx``."""
    if not cl:
        return model["load_nchw" + sfx], 128
    if vec and c % 32 == 0 and "load_clw" in model:
        return model["load_clw" + sfx], 256 / planes
    if vec and c % 8 == 0:
        return model[_f32_block_key(model, "load") + sfx], 64 / planes
    return model["load_f32scalar_max"], 32 / planes


def _f32_store_cost(model, cl, c, planes):
    """(cost, elements per counted unit) of a float32 tile store of c channels: per 16-byte
    global access on NCHW rows and in the channels-last 32-channel steps (C % 32 == 0); per
    movmatrix (one plane of an 8x8 block) on other channels-last tiles of C % 8 == 0; else per
    element. The costliest loop of its kind (``_tile_move_model``)."""
    if not cl:
        return model["store_nchw_max"], 128
    if c % 32 == 0 and "store_clw" in model:
        return model["store_clw_max"], 128
    if c % 8 == 0:
        return model[_f32_block_key(model, "store") + "_max"], 64 / planes
    return model["store_f32scalar_max"], 32


def _mma_item_kind(costs, groups, outs, ins):
    """(cost key, items per group) of a tensor-core layer of ``groups`` groups of ``ins``
    inputs and ``outs`` outputs: "k8" (at most 8 inputs) or "k16"; the pair items ("k8p" /
    "k16p", two blocks of 8 outputs each) where the kernel has them and the blocks pair up
    (items of four blocks, "k16q", where the kernel has them and a group has four); the items
    of two groups ("k8g", half an item per group) for k8 groups of one block."""
    blocks = -(-outs // 8)
    kind = "k8" if ins <= 8 else "k16"
    if blocks == 4 and f"{kind}q" in costs:
        return f"{kind}q", 1
    if blocks % 2 == 0 and f"{kind}p" in costs:
        return f"{kind}p", blocks // 2
    if kind == "k8" and blocks == 1 and groups % 2 == 0 and "k8g" in costs:
        return "k8g", 0.5
    return kind, blocks


def _mma_layer_terms(costs, groups, outs, ins) -> list:
    """(count, cost) terms of one tensor-core layer pass per tile: groups x ceil(outs / 8)
    items, each ceil(ins / 16) k-steps (one for at most 8 inputs; one fewer in the loop where
    the item holds the first, "peeled"), with the item and k-step
    costs of ``costs["k8"]`` or ``costs["k16"]`` (by the inputs per group); where the kernel
    has pair items ("k8p" / "k16p") and a group's blocks of 8 outputs pair up, half as many
    items with the pair costs; likewise half as many "k8g" items (two groups each)."""
    kind, blocks = _mma_item_kind(costs, groups, outs, ins)
    items = groups * blocks
    k = costs[kind]
    steps = (1 if ins <= 8 else -(-ins // 16)) - (1 if k.get("peeled") else 0)
    return [(items, k["item"]), (items * steps, k["step"])]


def cuda_mma_records(structures, dtypes, layouts, archs) -> list:
    """One forward record per structure, 16-bit dtype, layout and arch for the tensor-core
    kernel the planner launches (two tiles or in-place layers: ``mma_forward_plan``), and one
    per float32 structure for each opt-in float32 kernel (MmaF32x3 and MmaF32x2, three and two
    planes; not marked as the default path), with
    per-position counts: the chain's items and k-steps per layer times the SASS costs of
    ``mma_kernel_model`` (needs cuda_records first, for the SASS)."""
    rows = []
    for arch, toolchain, funcs, ptxas, dtype, fmt, s in _mma_problems(structures, dtypes, archs,
                                                                      float32=True):
        c_x, spec, _, idx = structure_args(s)
        chans = [c_x if idx is None else len(idx)] + [c for c, _ in spec.weight_shapes()]
        planes = MMA_PLANES[fmt]
        tp, in_place = mma_forward_plan(spec, chans, arch, planes)
        if tp == 0:
            continue
        mt = tp // 16
        wrap = in_place and mma_wrap_layout(chans, len(chans) - 1)
        name = next(n for n in funcs if "chain_forward_mma_kernel" in n
                    and f"{fmt}ELi{mt}ELb{int(in_place)}ELb{int(wrap)}E" in n)
        model = mma_kernel_model(funcs[name], mt, planes)
        terms = []
        pair_layers = 0
        for (cout, n), g in zip(spec.weight_shapes(), spec.groups):
            terms += _mma_layer_terms(model, g, cout // g, n)
            pair_layers += _mma_item_kind(model, g, cout // g, n)[0][-1] in "pgq"
        for layout in layouts:
            cl = layout == "channels_last"
            # per counted unit: a 16-byte vector per lane of a warp (NCHW, and
            # channels-last where C % 32 == 0 and the loop exists: 256 elements), an
            # 8x8 block (channels-last: 64), an element per lane (the scalar load of a
            # channels-last tile through an input index: 32)
            sx = _move_sfx(idx is not None)  # x through the input index
            if planes > 1:
                ld, ld_elems = _f32_load_cost(model, cl, chans[0], planes, idx is None, sx)
                st, st_elems = _f32_store_cost(model, cl, spec.out_channels, planes)
            elif not cl:
                ld, ld_elems = model["load_nchw" + sx], 256
            elif idx is None:
                ld, ld_elems = _cl_cost(model, "load", chans[0], sx)
            else:
                ld, ld_elems = model["load_scalar_max"], 32
            if planes == 1:
                st, st_elems = (_cl_cost(model, "store", spec.out_channels) if cl
                                else (model["store_nchw_max"], 256))
            total = _combine(*terms, (chans[0] * tp / ld_elems, ld),
                             (spec.out_channels * tp / st_elems, st))
            rec = _mma_record(s, dtype, layout, "forward", arch, toolchain,
                              "chain_forward_mma_kernel", tp, ptxas[name],
                              mma_smem_bytes(chans, tp, in_place, planes))
            rec.config["in_place"] = in_place
            if planes > 1:  # opt-in (IGC_CUDA_FP32_MMA=1): not what a float32 call runs
                rec.config["planes"] = planes
                rec.is_default = rec.fixed_path = rec.autotuner_keeps = False
            if wrap:
                rec.config["wrap_layout"] = True
            _set_mma_dyn(rec, total,
                         "per layer: items x item cost + items x k-steps x "
                         "k-step cost; tile load/store per 16-byte vector "
                         "(SASS loop bodies of the kernel; the per-tile "
                         "offsets and barriers are left out)")
            rec.dyn["pair_item_layers"] = pair_layers
            rows.append(rec)
    return rows


# ---------------------------------------------------------------------------------------------
# The CUDA-core float32 forward (chain_forward_kernel<float, float>): per-position counts
# ---------------------------------------------------------------------------------------------
_FMA_WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # grouped_rows_k's compile-time group widths


def fma_kernel_model(sass: str) -> dict:
    """Executed warp instructions of the CUDA-core forward's pieces, read from its SASS (the
    layer items of grouped_rows, not inlined, and the tile loops of load_tile / store_tile):
    - per item of OUTS rows x PV positions (PV = 4, or 8: grouped_rows_k's items with 16-byte
      weight loads in tiles of a multiple of 8) with K inputs known at compile time and no
      k-loop left (straight-line items: K <= U, or K = 2 U where the first U k-steps run ahead
      of the loop, kPeelFirstSteps): the loop holding the item's K PV / 4 16-byte activation
      loads (LDS.128), OUTS K PV FFMAs and its OUTS PV / 4 result stores (STS.128), keyed (K,
      OUTS, VW, PV); VW: the weights loaded 16 bytes at a time (LDG.E.128 in the loop);
    - items whose inputs run in a loop (U = 16 k-steps per iteration for PV = 4, 4 for PV = 8;
      run-time K: 4, plus up to 3 peeled): ("loop", U, OUTS, VW, PV) with the enclosing item
      minus the k-loop ("item", with any k-steps run ahead of the loop) and the k-loop's body
      ("steps", U k-steps);
    - the tile moves per 16-byte vector of 4 elements per lane: "load_nchw" / "store_nchw"
      (a channel's run of positions, LDG.E.128 / STG.E.128) and "load_cl" / "store_cl"
      (channels-last, the same with the position's offset read from shared memory, LDS.64)."""
    ins = perf_model.parse_sass(sass)
    loops = perf_model._loops(ins)

    def ops(a, b):
        return [op for ad, _, op, _ in ins if a <= ad <= b]

    def n(o, *prefixes):
        return sum(x.startswith(prefixes) for x in o)

    out = {}
    ffma = {(a, b): n(ops(a, b), "FFMA") for a, b, _ in loops}
    for a, b, _ in sorted(loops, key=lambda lp: lp[1] - lp[0]):  # innermost first
        o = ops(a, b)
        f, lds, vec, sts = ffma[(a, b)], n(o, "LDS.128"), n(o, "LDG.E.128"), n(o, "STS.128")
        inner = [lp for lp in loops if a <= lp[0] and lp[1] <= b and (lp[0], lp[1]) != (a, b)
                 and ffma[(lp[0], lp[1])]]
        # per k-step: 4 OUTS FFMAs per 16-byte activation load; OUTS PV / 4 stores per item
        if f and sts and not inner:
            outs = f // (4 * lds) if lds else 0
            pv = 4 * sts // outs if outs else 0
            if pv in (4, 8) and f == outs * pv * (4 * lds // pv):
                out.setdefault((4 * lds // pv, outs, vec > 0, pv), _region_counts(ins, a, b))
        elif f and sts and inner:
            c, d = min(((lp[0], lp[1]) for lp in inner), key=lambda lp: lp[1] - lp[0])
            u = n(ops(c, d), "LDS.128")
            outs = ffma[(c, d)] // (4 * u)
            pv = 4 * sts // outs
            key = ("loop", 4 * u // pv, outs, n(ops(c, d), "LDG.E.128") > 0, pv)
            if key not in out:
                body = _region_counts(ins, c, d)
                out[key] = {"item": _combine((1.0, _region_counts(ins, a, b)), (-1.0, body)),
                            "steps": body}
        elif not f and (vec or n(o, "STG.E.128")):
            cl = n(o, "LDS.64") > 0
            if vec and n(o, "STS"):
                key = "load_cl" if cl else "load_nchw"
                per = vec
            elif n(o, "STG.E.128"):
                key = "store_cl" if cl else "store_nchw"
                per = n(o, "STG.E.128")
            else:
                continue
            out.setdefault(key, _combine((1.0 / per, _region_counts(ins, a, b))))
    return out


def fma_forward_plan(chans, arch: int) -> int:
    """plan_forward's tile for float32 (forward_smem_bytes: two [C][tile_ld] fp32 buffers of
    the widest layer and two offset arrays; choose_tile with two CTAs per SM, tiles of 4 to
    128 positions) for many positions."""
    cmax = max(chans)

    def smem(tp):
        return 2 * cmax * (tp + 4 if tp >= 8 else tp) * 4 + 2 * tp * 8

    optin = SM_LIMITS[arch][1] - 1024
    for budget in (_two_cta_budget(arch), optin):
        for tp in (128, 64, 32, 16, 8, 4):
            if smem(tp) <= budget:
                return tp
    return 0


def fma_layer_terms(model: dict, groups: int, outs: int, ins: int, w_aligned: bool,
                    tp: int, backward: bool = False) -> list:
    """(count, cost) terms of one CUDA-core layer per tile of ``tp`` positions: items of OUTS
    rows (4 where the group's outputs allow, else 2 or 1) x PV positions, one per lane (counted
    in warp iterations, 32 items each), with the cost of the item kind grouped_rows_k picks
    (16-byte weight loads where OUTS is 4, K is a compile-time width of at least 4 and the
    layer's weights are 16-byte aligned; those items take 8 positions where tp is a multiple
    of 8, 4 k-steps per loop iteration beyond 4 inputs; in the forward kernel, not
    ``backward``, a run-time width that is a multiple of 16 takes them too, on items of 4
    positions)."""
    outs_per = 4 if outs % 4 == 0 else 2 if outs % 2 == 0 else 1
    k = ins if ins in _FMA_WIDTHS else 0
    vw = outs_per == 4 and k >= 4 and w_aligned
    pv = 8 if vw and tp % 8 == 0 else 4
    if not k and not backward and outs_per == 4 and ins % 16 == 0 and w_aligned:
        # a run-time width that is a multiple of 16 (the forward kernel's layers): the 16-byte
        # weight loads' loop of 16 k-steps on items of 4 positions, its first iteration ahead
        # of the loop where the item holds it (kPeelFirstSteps), as for a compile-time width
        c = model[("loop", 16, 4, True, 4)]
        items = groups * outs // 4 * (tp // 4) / 32
        peeled = round(c["item"]["counts"]["FFMA/HFMA"] / (16 * 4 * 4))
        return [(items, c["item"]), (items * (ins // 16 - peeled), c["steps"])]
    items = groups * outs // outs_per * (tp // pv) / 32  # warp iterations: an item per lane
    if k and (k, outs_per, vw, pv) in model:  # straight-line item
        return [(items, model[(k, outs_per, vw, pv)])]
    u = 4 if pv == 8 else 16 if k else 4
    c = model[("loop", u, outs_per, vw, pv)]
    if k:
        # the item holds the k-step groups run ahead of the loop (kPeelFirstSteps: U k-steps
        # with 16-byte weight loads; its FFMAs over a group's)
        peeled = round(c["item"]["counts"]["FFMA/HFMA"] / (u * outs_per * pv))
        return [(items, c["item"]), (items * (k // u - peeled), c["steps"])]
    # run-time K: the loop of 4 k-steps runs ins // 4 times; the item holds the remainder's
    # k-steps peeled (up to 3: its FFMAs over a k-step's), of which ins % 4 run
    peeled = round(c["item"]["counts"]["FFMA/HFMA"] / (4 * outs_per))
    return [(items, c["item"]), (items * (ins // 4), c["steps"]),
            (-items * (peeled - ins % 4) / 4, c["steps"])]


def cuda_fma_records(structures, dtypes, layouts, archs) -> list:
    """One float32 forward record per structure, layout and arch for the CUDA-core kernel
    (float32 runs there), with per-position counts from ``fma_kernel_model``: every layer's
    items times their cost, and the tile load of x and store of y per 16-byte vector (needs
    cuda_records first, for the SASS). The per-tile offsets and barriers are left out."""
    rows = []
    if "float32" not in dtypes:
        return rows
    for arch, toolchain, funcs, ptxas in _cuda_archs(archs):
        name = next(nm for nm in funcs if "chain_forward_kernelIffE" in nm)
        model = fma_kernel_model(funcs[name])
        for s in structures:
            c_x, spec, _, idx = structure_args(s)
            shapes = spec.weight_shapes()
            chans = [c_x if idx is None else len(idx)] + [c for c, _ in shapes]
            tp = fma_forward_plan(chans, arch)
            if tp == 0:
                continue
            terms, w_off = [], 0
            for (cout, n_in), g in zip(shapes, spec.groups):
                terms += fma_layer_terms(model, g, cout // g, n_in, w_off % 4 == 0, tp)
                w_off += cout * n_in
            for layout in layouts:
                cl = layout == "channels_last"
                vectors_in, vectors_out = chans[0] * tp / 4 / 32, spec.out_channels * tp / 4 / 32
                total = _combine(*terms, (vectors_in, model["load_cl" if cl else "load_nchw"]),
                                 (vectors_out, model["store_cl" if cl else "store_nchw"]))
                rec = _mma_record(s, "float32", layout, "forward", arch, toolchain,
                                  "chain_forward_kernel", tp, ptxas[name],
                                  2 * max(chans) * (tp + 4 if tp >= 8 else tp) * 4 + 16 * tp)
                rec.config["prefetch"] = forward_l2_prefetch(rec.ctas_per_sm, arch, tp, c_x, 4)
                _set_mma_dyn(rec, total,
                             "per layer: items (OUTS rows x 4 or 8 positions) x item cost, "
                             "plus k-loop iterations x their cost where the k-steps run in a "
                             "loop; tile load/store per 16-byte vector (SASS loop bodies of "
                             "the kernel; per-tile offsets and barriers are left out)")
                rows.append(rec)
    return rows


def fma_backward_plan(chans, arch: int, row_floats: int = 0) -> tuple:
    """(tile, store-all, tile rows, dynamic shared memory) of plan_backward for float32 for many
    positions (choose_backward_tile): x, two gradient buffers of the widest layer and every
    intermediate ("store-all") with tiles of at least 16 positions where they fit two CTAs per
    SM, else one; otherwise the mode with more positions per SM (the tile times the CTAs whose
    shared memory fits), store-all on a tie, recompute mode being x, the gradients and two
    scratch buffers; fp32 [rows][tile_ld] plus three offset arrays. Where the fp32 gradient rows
    (``row_floats`` each) of two CTAs per SM exceed three quarters of ``PLAN_DEVICE[arch]``'s L2
    and one CTA's do not, the same choice for one CTA per SM, its shared memory request raised
    past two CTAs' share (partial_rows_exceed_l2)."""
    cmax, L = max(chans), len(chans) - 1
    optin = SM_LIMITS[arch][1] - 1024
    rows_all = chans[0] + 2 * cmax + sum(chans[1:-1])
    rows_rec = chans[0] + 4 * cmax

    def smem(rows, tp):
        return rows * (tp + 4 if tp >= 8 else tp) * 4 + 24 * tp

    def tile(rows, min_tp, ctas):
        for budget in ((_two_cta_budget(arch), optin) if ctas == 2 else (optin,)):
            for tp in (128, 64, 32, 16, 8, 4):
                if tp >= min_tp and smem(rows, tp) <= budget:
                    return tp
        return 0

    def choose(ctas):
        tp = tile(rows_all, 16, ctas)
        if tp:
            return tp, True
        budget = _two_cta_budget(arch) if ctas == 2 else optin

        def per_sm(rows, t):
            return t * (ctas if smem(rows, t) <= budget else 1)

        t_all = tile(rows_all, 4, ctas)
        t_rec = tile(rows_rec, 4, ctas) if L > 1 else 0
        if t_rec and (not t_all or per_sm(rows_rec, t_rec) > per_sm(rows_all, t_all)):
            return t_rec, False
        return t_all, True

    tp, store_all = choose(2)
    rows = rows_all if store_all else rows_rec
    nbytes = smem(rows, tp)
    sms, l2 = PLAN_DEVICE[arch]
    if (tp and nbytes <= _two_cta_budget(arch) and 4 * 2 * sms * 4 * row_floats > 3 * l2
            and 4 * sms * 4 * row_floats <= 3 * l2):
        tp, store_all = choose(1)
        rows = rows_all if store_all else rows_rec
        nbytes = max(smem(rows, tp), _two_cta_budget(arch) + 16)
    return tp, store_all, rows, nbytes


def fma_backward_model(arch: int, kernel: str, sass: str) -> dict:
    """Costs of the CUDA-core backward's pieces from its SASS: the layer items of the
    recompute ("fwd") and of the transposed product ("dh"), read from the two grouped_rows
    functions the kernel calls (``fma_kernel_model``), its tile moves (load_tile / store_tile),
    and from the kernel's own code the weight-gradient blocks (2 outputs x 4 inputs, 32 FFMAs
    per 16-byte vector of positions): "dw_vector", one vector of a block (the loop body over
    32 / its FFMAs), and "dw_block", the rest of a block (the enclosing loop without it)."""
    parts = _kernel_parts(arch, kernel, sass)
    callee = {k.split("EEvPK")[0].split("cuda")[-1]: v for k, v in parts.items() if k != "body"}
    fwd = next(v for k, v in callee.items() if "grouped_rowsILb0E" in k)
    trn = next(v for k, v in callee.items() if "grouped_rowsILb1E" in k)
    out = {"fwd": fma_kernel_model(fwd), "dh": fma_kernel_model(trn)}
    for name in ("load_tile", "store_tile"):
        out.update(fma_kernel_model(next(v for k, v in callee.items() if name in k)))
    ins = perf_model.parse_sass(parts["body"])
    loops = perf_model._loops(ins)
    for a, b, _ in sorted(loops, key=lambda lp: lp[1] - lp[0]):
        ops = [op for ad, _, op, _ in ins if a <= ad <= b]
        f = sum(o.startswith("FFMA") for o in ops)
        # (its 16-byte activation loads: LDS.128, or generic LD.E.128 where the compiler
        # could not tell the tile is shared memory; no global access inside: the layer items'
        # loops load their weights)
        if f and f % 32 == 0 and any(o.startswith(("LD.E.128", "LDS.128")) for o in ops) \
                and not any(o.startswith(("STG", "LDG")) for o in ops):
            body = _region_counts(ins, a, b)
            outer = min(((c, d) for c, d, _ in loops if c <= a and b <= d and (c, d) != (a, b)),
                        key=lambda lp: lp[1] - lp[0])
            vector = _combine((32.0 / f, body))
            rest = _combine((1.0, _region_counts(ins, *outer)), (-1.0, body))
            # the unrolled loop's remainder vectors, peeled into the block: every vector is
            # counted by dw_vector, so the block's cost leaves them out
            peeled = round(rest["counts"]["FFMA/HFMA"] / 32)
            out["dw_vector"] = vector
            out["dw_block"] = _combine((1.0, rest), (-peeled, vector))
            break
    return out


def cuda_fma_backward_records(structures, dtypes, layouts, archs) -> list:
    """One float32 backward record (dx and every dW) per structure, layout and arch for the
    CUDA-core backward, with per-position counts from ``fma_backward_model``: the tile loads of
    x and dy and the store of dx, the recompute (store-all: layers 0 .. L-2 once; recompute mode:
    layers 0 .. l-1 for each l >= 1), for every layer its weight-gradient blocks and its
    transposed product. Chains whose weight gradients do not take the 2 x 4 blocks (odd outputs
    or inputs not a multiple of 4 per group) get no record. The per-tile offsets, barriers and
    the reduction kernel are left out."""
    rows = []
    if "float32" not in dtypes:
        return rows
    for arch, toolchain, funcs, ptxas in _cuda_archs(archs):
        name = next(nm for nm in funcs if "chain_backward_kernelIffE" in nm)
        model = fma_backward_model(arch, name, funcs[name])
        if "dw_vector" not in model:
            continue
        for s in structures:
            c_x, spec, _, idx = structure_args(s)
            shapes = spec.weight_shapes()
            chans = [c_x if idx is None else len(idx)] + [c for c, _ in shapes]
            L = len(shapes)
            groups = list(spec.groups)
            if any((cout // g) % 2 or n % 4 for (cout, n), g in zip(shapes, groups)):
                continue
            row_floats = sum(c * n for c, n in shapes)
            tp, store_all, _, smem = fma_backward_plan(chans, arch, row_floats)
            if tp == 0:
                continue
            w_offs = [sum(c * n for c, n in shapes[:l]) for l in range(L)]

            def fwd_terms(l):
                (cout, n), g = shapes[l], groups[l]
                return fma_layer_terms(model["fwd"], g, cout // g, n, w_offs[l] % 4 == 0, tp,
                                       backward=True)

            terms = []
            for l in range(L - 1) if store_all else []:
                terms += fwd_terms(l)
            for l in range(1, L) if not store_all else []:
                for k in range(l):
                    terms += fwd_terms(k)
            for l, ((cout, n), g) in enumerate(zip(shapes, groups)):
                m = cout // g
                blocks = cout // 2 * (n // 4) / 32  # warp iterations: a block per lane
                terms += [(blocks, model["dw_block"]), (blocks * tp / 4, model["dw_vector"])]
                terms += fma_layer_terms(model["dh"], g, n, m, w_offs[l] % 4 == 0, tp,
                                         backward=True)
            for layout in layouts:
                cl = layout == "channels_last"
                ld, st = model["load_cl" if cl else "load_nchw"], model["store_cl" if cl
                                                                        else "store_nchw"]
                total = _combine(*terms, ((chans[0] + spec.out_channels) * tp / 128, ld),
                                 (c_x * tp / 128, st))
                rec = _mma_record(s, "float32", layout, "backward", arch, toolchain,
                                  "chain_backward_kernel", tp, ptxas[name], smem)
                rec.config["store_all"] = store_all
                rec.config["row_l2_bytes"] = 8 * row_floats  # read and written per tile
                # plan_backward's L2 prefetch of the next tile (the fp32 partial row: the weights)
                rec.config["prefetch"] = backward_l2_prefetch(
                    rec.ctas_per_sm, arch, row_floats, tp, c_x, spec.out_channels, elem_bytes=4)
                _set_mma_dyn(rec, total,
                             "x and dy loads and the dx store per 16-byte vector; the recompute "
                             "and the transposed products as the forward's layer items; per "
                             "layer the weight-gradient blocks (2 x 4 per lane) x (block cost "
                             "+ tile vectors x vector cost) (SASS of the kernel and the "
                             "functions it calls; per-tile offsets, barriers and the reduction "
                             "kernel are left out)")
                rows.append(rec)
    return rows


def _loads(r) -> bool:
    """Whether a compiled record is a candidate at all: it compiled and fits the SM (a kernel
    whose shared memory exceeds the SM's does not load: on the GPU the check's compile raises
    OutOfResources, and neither the autotuner nor the fixed path takes it)."""
    return r.compiled and r.ctas_per_sm > 0


def _fixed_pick(records):
    """The fixed path's rule (``K.fixed_choice``) over compiled per-position records in its
    candidates' order (an iterable, read only up to the first spill-free one): that one, else
    the least spilling, else None."""
    tried = []
    for r in records:
        if not _loads(r):
            continue
        if r.spill_bytes == 0:
            return r
        tried.append(r)
    return min(tried, key=lambda r: r.spill_bytes, default=None)


def _mark_reachable(problem: list, default_is_tuned: bool, order: list) -> None:
    """Marks what the launcher can launch, with the rules the GPU applies to its own compiles:
    the autotuner keeps the configurations ``K.spill_free`` keeps; the fixed path
    (``K.fixed_config``: autotuning off, deterministic mode) takes the first spill-free one of
    its candidates in their order (``order``: ``K.fixed_candidates``), else the least spilling
    one. Everything else is unreachable."""
    main = [(cfg, r) for cfg, r in problem if r.per_position]

    def measured(r):
        if not _loads(r):
            raise RuntimeError("not compiled")
        return r.spill_bytes

    tuned = [r for cfg, r in main if cfg is not None or default_is_tuned]
    kept = {id(r) for r in K.spill_free(tuned, measured)}

    def rank(cfg):
        c = K.LaunchConfig(**{**_default_config_kwargs(), **(cfg or {})})
        return order.index(c) if c in order else len(order)

    fixed = _fixed_pick(r for _, r in sorted(main, key=lambda cr: rank(cr[0])))
    fixed_cfg = next((cfg for cfg, r in main if r is fixed), ())
    for cfg, r in problem:  # (the fixed configuration's other launch: the backward's reduction)
        r.fixed_path = fixed is not None and cfg == fixed_cfg
    for _, r in main:
        r.autotuner_keeps = id(r) in kept
        r.reachable = r.autotuner_keeps or r.fixed_path
        r.flags_exact = True


def fixed_path_records(structure, dtype, layout, direction, arch, default) -> list:
    """A report of the default configuration alone: the fixed path's own configuration
    (``K.fixed_config``'s rule on sm_``arch`` compiles: its candidates in order, the first that
    fits the SM without spills, else the least spilling one) marked ``fixed_path``; where it is
    not the default (16-bit chains with packed layers, or a default that spills) the records of
    its launches are returned to be added, and a spilling default is marked unreachable (the
    autotuner's pruning drops it as well). ``default``: the default's ``(None, record)`` pairs
    (a candidate too, compiled already)."""
    order = K.fixed_candidates(kernel_structure(structure, dtype), direction == "backward")
    launches = {}  # id of a candidate's per-position record -> its (config, record) pairs

    def compiled():  # each candidate's records, compiled when the pick reaches it
        for cand in order:
            cfg = dict(cand.__dict__)
            pairs = default if cand == K.DEFAULT_CONFIG else [
                (cfg, r) for r in analyse(structure, dtype, layout, direction, arch, cfg)]
            for _, r in pairs:
                if r.per_position:
                    launches[id(r)] = pairs
                    yield r

    main = _fixed_pick(compiled())
    if main is None:
        return []
    pairs = launches[id(main)]
    spills = next((r.spill_bytes for _, r in default if r.per_position), 0)
    for _, r in default:
        r.fixed_path = False
        if main.spill_bytes == 0 and spills:  # the autotuner's pruning drops it too
            r.reachable = False
    for _, r in pairs:  # (its launches: the chain's kernel and the backward's reduction)
        r.fixed_path = r.reachable = True
    return [] if pairs is default else pairs


def _default_config_kwargs() -> dict:
    return dict(K.DEFAULT_CONFIG.__dict__)


# ---------------------------------------------------------------------------------------------
STRUCTURES = ["igcv2(64,4)", "igcv2(128,8)", "igcv2(256,8)", "igcv2(256,16)", "igcv2(512,8)",
              "igcv2(1024,32)", "igcv3-expand(64,6,2)", "igcv3-reduce(64,6,2)",
              "condense(128,4)", "perm(256,8)"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Static GPU report of the Triton kernels")
    p.add_argument("--structures", default=",".join(STRUCTURES).replace("),", ");"),
                   help="';'-separated structures (default: the report's table)")
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--directions", default="forward,backward")
    p.add_argument("--archs", default="90,80")
    p.add_argument("--all-configs", action="store_true",
                   help="every configuration the autotuner may choose (default: the default one)")
    p.add_argument("--config", default=None,
                   help="one launch configuration instead of the default, as JSON for "
                        "K.override_config, e.g. '{\"block_p\": 64, \"num_warps\": 8, "
                        "\"pack\": 1}'")
    p.add_argument("--json", default=None)
    p.add_argument("--cuda", action="store_true",
                   help="also report the CUDA kernels (nvcc -Xptxas -v for each arch)")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--launch-path", action=argparse.BooleanOptionalAction, default=True,
                   help="compile each launch through Triton's own argument binding (what "
                        "JITFunction.run does on a GPU, divisibility hints included; the "
                        "default), or (--no-launch-path) from a signature built here (integers "
                        "equal to 1 constant, no divisibility hints)")
    p.add_argument("--pruning", action="store_true",
                   help="run the autotuner's pruning on real compiles of each problem instead "
                        "(one JSON line per problem: configuration, spilled bytes, kept)")
    p.add_argument("--refusals", action="store_true",
                   help="run the backend's spill check (what it launches, or refuses with a "
                        "reason) on real compiles of each problem instead (one JSON line each)")
    args = p.parse_args(argv)
    LAUNCH_PATH[0] = args.launch_path
    if args.refusals:
        out = []
        for s in args.structures.split(";"):
            for dt in args.dtypes.split(","):
                for lay in args.layouts.split(","):
                    for d in args.directions.split(","):
                        for arch in (int(a) for a in args.archs.split(",")):
                            out.append(refusal(s, dt, lay, d, arch))
                            print(json.dumps(out[-1]), flush=True)
        if args.json:
            _write_report(args.json, argv, out)
        return 0
    if args.pruning:
        for s in args.structures.split(";"):
            for dt in args.dtypes.split(","):
                for lay in args.layouts.split(","):
                    for d in args.directions.split(","):
                        for arch in (int(a) for a in args.archs.split(",")):
                            print(json.dumps({"structure": s, "dtype": dt, "layout": lay,
                                              "direction": d, "arch": f"sm_{arch}",
                                              "configs": pruning(s, dt, lay, d, arch)}),
                                  flush=True)
        return 0
    rows = []
    if args.cuda:
        archs = [int(a) for a in args.archs.split(",")]
        for r in cuda_records(archs):
            rows.append(asdict(r))
            print(f"cuda   {r.kernel:<24} {r.dtype:<9} {r.arch} regs {r.registers:3d} spill "
                  f"{r.spill_bytes:4d} static smem {r.shared_bytes:5d} ctas/SM {r.ctas_per_sm}",
                  flush=True)
        mma_rows = cuda_mma_records(args.structures.split(";"), args.dtypes.split(","),
                                    args.layouts.split(","), archs)
        if "forward" in args.directions.split(","):
            mma_rows += cuda_fma_records(args.structures.split(";"), args.dtypes.split(","),
                                         args.layouts.split(","), archs)
        if "backward" in args.directions.split(","):
            mma_rows += cuda_fma_backward_records(args.structures.split(";"),
                                                  args.dtypes.split(","),
                                                  args.layouts.split(","), archs)
            mma_rows += cuda_mma_backward_records(args.structures.split(";"),
                                                  args.dtypes.split(","),
                                                  args.layouts.split(","), archs)
        for r in mma_rows:
            rows.append(asdict(r))
            print(f"cuda   {r.kernel:<24} {r.structure:<22} {r.dtype:<9} {r.layout:<14} "
                  f"{r.arch} TP {r.block_p} regs {r.registers:3d} spill {r.spill_bytes} smem "
                  f"{r.shared_bytes:6d} ctas/SM {r.ctas_per_sm}", flush=True)
    for s in ([] if args.no_triton else args.structures.split(";")):
        for dt in args.dtypes.split(","):
            for lay in args.layouts.split(","):
                for d in args.directions.split(","):
                    configs, tuned = [json.loads(args.config) if args.config else None], []
                    if args.all_configs:  # the default, then what the autotuner may choose
                        tuned = autotune_configs(s, dt, d)
                        configs += [c for c in tuned if c != _default_config_kwargs()]
                    for arch in (int(a) for a in args.archs.split(",")):
                        problem = []
                        for cfg in configs:
                            for r in analyse(s, dt, lay, d, arch, cfg):
                                problem.append((cfg, r))
                        if tuned:
                            _mark_reachable(problem, _default_config_kwargs() in tuned,
                                            K.fixed_candidates(kernel_structure(s, dt),
                                                               d == "backward"))
                        elif configs == [None]:
                            problem += fixed_path_records(s, dt, lay, d, arch, problem)
                        for _, r in problem:
                            rows.append(asdict(r))
                            print(f"{s:<22} {dt:<9} {lay:<14} {d:<9} sm_{arch} "
                                  f"{r.kernel[:28]:<28} {str(r.config):<60} "
                                  + (f"regs {r.registers:3d} spill {r.spill_bytes:5d} smem "
                                     f"{r.shared_bytes:6d} ctas/SM {r.ctas_per_sm}"
                                     + ("" if r.reachable else " (pruned: spills)")
                                     if r.compiled else f"FAILED {r.error[:60]}"),
                                  flush=True)
    if args.json:
        _write_report(args.json, argv, rows)
    return 0


def _env_prefix() -> str:
    """The environment switches that change the compiled kernels, as a command prefix: the
    Triton kernels' opt-in float32 tensor-core dots (``IGC_TRITON_FP32_MMA=1``)."""
    return f"{K.FP32_MMA_ENV}=1 " if K.fp32_mma_requested() else ""


def _write_report(path, argv, rows) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"triton": triton.__version__, "torch": torch.__version__,
                   "command": _env_prefix() + "python tools/gpu_static.py " + shlex.join(
                       argv if argv is not None else sys.argv[1:]),
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
