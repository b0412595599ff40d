#!/usr/bin/env python
"""End-to-end benchmark: whole IGC networks with the fused operator vs the unfused chain.

    python benchmarks/e2e.py                                  # CPU: IGCV2*(C416), batch 128, 32x32
    python benchmarks/e2e.py --models igcv2_cifar,igcv3_imagenet --device cuda --dtype bfloat16
    python benchmarks/e2e.py --smoke --json /tmp/e2e.json     # seconds; what CI runs

Models (``igc_kernels.models``; the fused and the unfused network are built from the same seed,
so they hold the same parameters):

* ``igcv2_cifar``: :class:`IGCV2CifarNet` (``--width``, default 416: IGCV2*(C416)-style, 20
  layers, K = 8) on ``(batch, 3, 32, 32)``, 10 classes;
* ``igcv3_imagenet``: :class:`IGCV3Net` (IGCV3-D, 3.5M parameters) on ``(batch, 3, 224, 224)``,
  1000 classes.

Implementations: ``fused`` (every chain one ``InterleavedGroupConv``, backend "auto": the row
records which backend that resolved to) and ``unfused`` (the same chains as ``nn.Conv2d`` +
``nn.ChannelShuffle`` / index gathers: oneDNN on CPU, cuDNN on GPU), each on NCHW and
channels_last input (``model.to(memory_format=...)``). Ratios are quoted against the FASTEST
unfused layout. ``--dtype bfloat16`` runs under ``torch.autocast`` with float32 parameters.

Inference also times ``optimized``: the fused network after
:func:`igc_kernels.optimize_for_inference` (BatchNorms folded into the convolution or chain in
front of them), each layout, its output checked against the fused network's.

``compiled`` (inference, ``--no-compile`` skips it): ``torch.compile`` of the unfused network
(default mode, Inductor), each layout, its compile time recorded and its output checked
against eager.

Modes: ``train``: ``zero_grad``, forward, cross-entropy, backward, SGD step (momentum 0.9);
``infer``: ``model.eval()`` forward under ``torch.no_grad()``.

Activations of a trained scale: every network's BatchNorm statistics are calibrated on
synthetic data before timing (``--no-calibrate-bn`` skips it), and on the CPU denormals are
flushed (``torch.set_flush_denormal(True)``; ``--no-flush-denormal``): a freshly initialised
deep network decays into denormals, on which x86 arithmetic is ~10x slower.

ONNX Runtime (CPU, float32, ``infer``; ``--no-onnxruntime`` skips it): the unfused network,
calibrated the same way, exported with ``torch.onnx.export(dynamo=True)`` and run with
``ORT_ENABLE_ALL`` on as many threads as torch, in the same run: what a user deploying on a
CPU would pick instead. Its output is checked against PyTorch's before it is timed.

Procedure: a correctness check first (the fused and unfused networks' eval outputs agree, in
float64 on CPU; in the run's dtype otherwise, relative to the output's scale); then timing:
CPU: ``bench_common.measure`` (warm-up, then ``time.perf_counter`` per step until
``--min-time`` and ``--min-runs``; median, p20, p80); GPU: CUDA events around every step after
warm-up, synchronised, same statistics. Inference variants (every layout of fused, unfused,
optimized, compiled, and ONNX Runtime) are built first and then timed in ``--rounds`` rounds,
each round timing every variant in turn (in reverse order every other round) for
``--min-time / --rounds`` s after its own warm-up; a row's statistics pool its rounds. On a
shared machine whose speed drifts by 2x within minutes, this gives every variant the same
conditions, so the ratios of one run hold even when the absolute times do not. Memory of one
step (not timed): CPU: peak of PyTorch's allocator above the live set at the step's start
(``torch.profiler``, ``profile_memory``); GPU: ``torch.cuda.max_memory_allocated`` above the
live set. ``saved_MiB`` (train): bytes of the distinct storages autograd saves for the
backward, parameters and the input excluded (``saved_tensors_hooks``): the activation memory.

Loss tracking: ``--loss-steps`` SGD steps (0: none) of a small IGCV2 network on synthetic data
(fixed batches), fused and unfused from the same initial parameters, in float64 and float32;
per step the losses are recorded. Pass: float64 losses agree to 1e-9 relative at every step, and the
float32 fused run's largest distance to the float64 unfused run is at most 2x that of the
float32 unfused run, plus 16 float32 ulps of the loss.

Output: a printed table and, with ``--json``, every row with the environment (device,
versions, commit, command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import plot  # noqa: E402

igc = bc.igc
from igc_kernels.backends import AUTO_ORDER  # noqa: E402
from igc_kernels.models import IGCV2CifarNet, IGCV3Net  # noqa: E402

MODELS = ("igcv2_cifar", "igcv3_imagenet")


def fused_backend(device: str) -> str:
    avail = igc.available_backends(device)
    return next(b for b in AUTO_ORDER if b in avail)


def build(model: str, fused: bool, args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    if model == "igcv2_cifar":
        return IGCV2CifarNet(args.width, depth=args.depth, group_size=args.group_size,
                             fused=fused)
    return IGCV3Net(1000, width_mult=args.width_mult, fused=fused)


def input_shape(model: str, batch: int) -> tuple:
    return (batch, 3, 32, 32) if model == "igcv2_cifar" else (batch, 3, 224, 224)


def num_classes(model: str) -> int:
    return 10 if model == "igcv2_cifar" else 1000


def autocast(args, device):
    if args.dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=bc.DTYPES[args.dtype])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def make_steps(net, x, target, args, device):
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

    def train():
        opt.zero_grad(set_to_none=True)
        with autocast(args, device):
            loss = F.cross_entropy(net(x), target)
        loss.backward()
        opt.step()

    def infer():
        with torch.no_grad(), autocast(args, device):
            net(x)

    return {"train": train, "infer": infer}


def time_step(fn, device, args) -> bc.Stats:
    if device == "cpu":
        return bc.measure(fn, min_time=args.min_time, min_runs=args.min_runs, warmup_time=0.0,
                          warmup_runs=args.warmup)
    for _ in range(args.warmup):
        fn()
    sync(device)
    times = []
    total = 0.0
    while total < args.min_time * 1e3 or len(times) < args.min_runs:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
        total += times[-1]
    return bc.stats_of(times)


def peak_bytes(fn, device):
    if device == "cpu":
        return bc.peak_alloc_bytes(fn)
    fn()
    sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() - base


def saved_bytes(net, x, target, args, device) -> int:
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    params.add(x.untyped_storage().data_ptr())
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(args, device):
        loss = F.cross_entropy(net(x), target)
    del loss
    return sum(n for ptr, n in storages.items() if ptr not in params)


# --------------------------------------------------------------------------------------------
# Correctness and loss tracking
# --------------------------------------------------------------------------------------------
def calibrate(net, model, args, device, memory_format=torch.contiguous_format):
    """BatchNorm running statistics of a trained-like scale: three train-mode forward passes
    without gradients on synthetic data (the same for every implementation). A freshly
    initialised deep network otherwise decays into denormal activations at eval time, and x86
    arithmetic on denormals is ~10x slower: timings would measure that, not the network."""
    xs = torch.randn(input_shape(model, max(2, min(args.batch, 16))),
                     generator=torch.Generator().manual_seed(7)).to(device)
    net.train()
    with torch.no_grad(), autocast(args, device):
        for _ in range(3):
            net(xs.contiguous(memory_format=memory_format))
    return net


def onnxruntime_step(net, x, args):
    """``infer`` through ONNX Runtime (CPU, ``ORT_ENABLE_ALL``, as many intra-op threads as
    torch): ``net`` exported with ``torch.onnx.export(dynamo=True)`` (the fused operator as
    standard ONNX, ``igc.onnx_translation_table``). None when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import tempfile

    import igc_kernels as igc

    net = net.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(net, (x,), dynamo=True, verbose=False,
                          custom_translation_table=igc.onnx_translation_table()).save(path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: x.contiguous().numpy()}
    with torch.no_grad():
        ref = net(x)
    got = torch.from_numpy(sess.run(None, feed)[0])
    err = float((got - ref).abs().max()) / max(1e-30, float(ref.abs().max()))
    if not err <= 1e-3:
        raise SystemExit(f"ONNX Runtime output differs from PyTorch's: relative {err:.2e}")
    return lambda: sess.run(None, feed)


def check_models(model, args, device):
    """Eval outputs of the fused and unfused network agree (before anything is timed)."""
    f, u = build(model, True, args), build(model, False, args)
    x = torch.randn(input_shape(model, 2), generator=torch.Generator().manual_seed(1))
    if device == "cpu":
        f, u, x = f.double().eval(), u.double().eval(), x.double()
        with torch.no_grad():
            yf, yu = f(x), u(x)
        tol = 1e-9
    else:
        f, u, x = f.to(device).eval(), u.to(device).eval(), x.to(device)
        with torch.no_grad(), autocast(args, device):
            yf, yu = f(x).float(), u(x).float()
        tol = 5e-2 if args.dtype != "float32" else 1e-3
    err = float((yf - yu).abs().max()) / max(1e-30, float(yu.abs().max()))
    if not err <= tol:
        raise SystemExit(f"correctness check failed for {model}: relative max error {err:.3e} "
                         f"> {tol:g}")
    return err


def loss_tracking(steps: int, device: str, smoke: bool) -> dict:
    """Train the fused and unfused small IGCV2 network on the same synthetic batches."""
    width, depth, K, batch, hw = (8, 5, 4, 4, 16) if smoke else (32, 11, 4, 32, 32)
    gen = torch.Generator().manual_seed(123)
    data = [(torch.randn(batch, 3, hw, hw, generator=gen),
             torch.randint(0, 10, (batch,), generator=gen)) for _ in range(steps)]

    def run(fused, dtype):
        torch.manual_seed(7)
        net = IGCV2CifarNet(width, depth=depth, group_size=K, fused=fused).to(device, dtype)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        losses = []
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x.to(device, dtype)), y.to(device))
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    f64, u64 = run(True, torch.float64), run(False, torch.float64)
    f32, u32 = run(True, torch.float32), run(False, torch.float32)
    rel64 = [abs(a - b) / abs(b) for a, b in zip(f64, u64)]
    err_f = max(abs(a - b) for a, b in zip(f32, u64))
    err_u = max(abs(a - b) for a, b in zip(u32, u64))
    floor = 16 * torch.finfo(torch.float32).eps * max(abs(v) for v in u64)
    passed = max(rel64) <= 1e-9 and err_f <= 2 * err_u + floor
    return {"steps": steps, "model": f"IGCV2CifarNet({width}, depth={depth}, group_size={K})",
            "batch": batch, "input": [3, hw, hw], "lr": 0.05, "momentum": 0.9,
            "fused_float64": f64, "unfused_float64": u64, "fused_float32": f32,
            "unfused_float32": u32, "float64_rel_diff": rel64,
            "float32_fused_max_err": err_f, "float32_unfused_max_err": err_u,
            "float32_floor": floor, "passed": passed}


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def run_model(model, args, device, log) -> list:
    rows = []
    pending = []  # inference rows and their steps, timed together at the end
    err = check_models(model, args, device)
    log(f"{model}: fused vs unfused eval outputs agree (relative max difference {err:.2e})")
    shape = input_shape(model, args.batch)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=gen)
    target = torch.randint(0, num_classes(model), (args.batch,), generator=gen).to(device)
    backend = fused_backend(device)
    for impl in ("fused", "unfused"):
        for layout in args.layouts:
            mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            net = build(model, impl == "fused", args).to(device).to(memory_format=mf)
            if args.calibrate_bn:
                calibrate(net, model, args, device, mf)
            x = x0.to(device).contiguous(memory_format=mf)
            steps = make_steps(net, x, target, args, device)
            for mode in plot.bar(args.modes, args.quiet, desc=f"{model} {impl} {layout}"):
                net.train(mode == "train")
                peak = peak_bytes(steps[mode], device)
                row = {
                    "model": model, "impl": impl, "layout": layout, "mode": mode,
                    "dtype": args.dtype, "batch": args.batch, "input_shape": list(shape),
                    "fused_backend": backend if impl == "fused" else None,
                    "peak_bytes": peak,
                    "params": sum(p.numel() for p in net.parameters()),
                }
                note = f"  peak {peak / 2**20:8.1f} MiB" if peak is not None else ""
                rows.append(row)
                if mode == "infer":  # timed with the other inference variants, below
                    pending.append((row, steps[mode], note))
                    continue
                row["saved_bytes"] = saved_bytes(net, x, target, args, device)
                note += f"  saved {row['saved_bytes'] / 2**20:8.1f} MiB"
                timed(row, time_step(steps[mode], device, args), note, log)
            del net, steps
    if "infer" in args.modes:
        # the fused network with its BatchNorms folded, and torch.compile of the unfused one
        variants = [("optimized", True, igc.optimize_for_inference, "max_rel_diff_vs_fused",
                     "optimize_for_inference of the fused network")]
        if args.compile:
            variants.append(("compiled", False, torch.compile, "max_rel_diff_vs_eager",
                             "torch.compile of the unfused network"))
        for impl, fused, transform, diff_key, what in variants:
            for layout in args.layouts:
                row, step, note = _infer_variant(model, impl, fused, transform, diff_key, what,
                                                 layout, x0, target, shape, backend, args,
                                                 device, log)
                rows.append(row)
                pending.append((row, step, note))
    if args.onnxruntime and device == "cpu" and args.dtype == "float32" and "infer" in args.modes:
        net = build(model, False, args)
        if args.calibrate_bn:
            calibrate(net, model, args, device)
        step = onnxruntime_step(net, x0, args)
        if step is None:
            log("  onnxruntime is not installed: no ONNX Runtime row (make deps installs it)")
        else:
            row = {"model": model, "impl": "onnxruntime", "layout": "nchw", "mode": "infer",
                   "dtype": args.dtype, "batch": args.batch, "input_shape": list(shape),
                   "fused_backend": None, "peak_bytes": None,
                   "params": sum(p.numel() for p in net.parameters())}
            rows.append(row)
            pending.append((row, step, "; the unfused network exported to ONNX, ORT_ENABLE_ALL"))
    time_interleaved(pending, device, args, log)
    return rows


def timed(row: dict, stats: bc.Stats, note: str, log) -> None:
    """``row`` gets ``stats``' figures; one log line."""
    row.update(median_ms=stats.median_ms, p20_ms=stats.p20_ms, p80_ms=stats.p80_ms,
               min_ms=stats.min_ms, runs=stats.runs)
    log(f"  {row['impl'][:8]:8s} {row['layout']:14s} {row['mode']:6s} {stats.median_ms:10.2f} ms "
        f"(p20 {stats.p20_ms:.2f}, p80 {stats.p80_ms:.2f}, {stats.runs} runs{note})")


def time_interleaved(pending: list, device: str, args, log) -> None:
    """Times the (row, step, note) entries in ``args.rounds`` rounds: each round runs every
    step in turn (reversed every other round) for ``min_time / rounds`` after its own warm-up
    (at least ``ceil(min_runs / rounds)`` runs); each row gets the statistics of its pooled
    times and ``rounds``."""
    if not pending:
        return
    rounds = max(1, args.rounds)
    sub = argparse.Namespace(**{**vars(args), "min_time": args.min_time / rounds,
                                "min_runs": -(-args.min_runs // rounds)})
    times: list = [[] for _ in pending]
    for r in plot.bar(range(rounds), args.quiet, desc="inference rounds"):
        order = range(len(pending)) if r % 2 == 0 else reversed(range(len(pending)))
        for i in order:
            times[i] += time_step(pending[i][1], device, sub).times_ms
    for (row, _, note), ts in zip(pending, times):
        row["rounds"] = rounds
        timed(row, bc.stats_of(ts), note, log)


def _infer_variant(model, impl, fused, transform, diff_key, what, layout, x0, target, shape,
                   backend, args, device, log) -> tuple:
    """An inference row for ``transform(net)`` (``net``: the fused or unfused network,
    calibrated, in eval mode, in ``layout``), its step and log note: its output checked against
    ``net``'s, the time of the transform (``transform_s``, for torch.compile its compilation)
    recorded; timed later (time_interleaved)."""
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    net = build(model, fused, args).to(device).to(memory_format=mf)
    if args.calibrate_bn:
        calibrate(net, model, args, device, mf)
    net.eval()
    x = x0.to(device).contiguous(memory_format=mf)
    t0 = time.perf_counter()
    variant = transform(net)
    with torch.no_grad(), autocast(args, device):
        ref, got = net(x).float(), variant(x).float()  # torch.compile compiles here
    transform_s = time.perf_counter() - t0
    rel = float((got - ref).abs().max()) / max(1e-30, float(ref.abs().max()))
    step = make_steps(variant, x, target, args, device)["infer"]
    peak = peak_bytes(step, device) if impl == "optimized" else None
    row = {"model": model, "impl": impl, "layout": layout, "mode": "infer",
           "dtype": args.dtype, "batch": args.batch, "input_shape": list(shape),
           "fused_backend": backend if fused else None, "peak_bytes": peak,
           "params": sum(p.numel() for p in net.parameters()),
           "transform_s": transform_s, diff_key: rel}
    note = (f"; {what}, made in {transform_s:.1f} s, output vs it {rel:.1e}"
            + (f"  peak {peak / 2**20:8.1f} MiB" if peak is not None else ""))
    return row, step, note


def summarize(rows) -> list:
    """Per model and mode: fastest fused vs fastest unfused (time, peak, saved)."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        for mode in ("train", "infer"):
            sel = [r for r in rows if r["model"] == model and r["mode"] == mode]
            f = [r for r in sel if r["impl"] == "fused"]
            u = [r for r in sel if r["impl"] == "unfused"]
            if not f or not u:
                continue
            bf = min(f, key=lambda r: r["median_ms"])
            bu = min(u, key=lambda r: r["median_ms"])
            s = {"model": model, "mode": mode, "fused_layout": bf["layout"],
                 "unfused_layout": bu["layout"], "fused_ms": bf["median_ms"],
                 "unfused_ms": bu["median_ms"], "speedup": bu["median_ms"] / bf["median_ms"],
                 "fused_backend": bf["fused_backend"]}
            if bf["peak_bytes"] and bu["peak_bytes"]:
                s["peak_ratio"] = bf["peak_bytes"] / bu["peak_bytes"]
            if mode == "train":
                s["saved_ratio"] = bf["saved_bytes"] / bu["saved_bytes"]
            o = [r for r in sel if r["impl"] == "onnxruntime"]
            if o:
                s["onnxruntime_ms"] = o[0]["median_ms"]
                s["speedup_vs_onnxruntime"] = o[0]["median_ms"] / bf["median_ms"]
            c = [r for r in sel if r["impl"] == "compiled"]
            if c:
                bc_ = min(c, key=lambda r: r["median_ms"])
                s["compiled_ms"] = bc_["median_ms"]
                s["compiled_layout"] = bc_["layout"]
            z = [r for r in sel if r["impl"] == "optimized"]
            if z:
                bz = min(z, key=lambda r: r["median_ms"])
                s["optimized_ms"] = bz["median_ms"]
                s["optimized_layout"] = bz["layout"]
                s["optimized_speedup"] = bu["median_ms"] / bz["median_ms"]
                if o:
                    s["optimized_vs_onnxruntime"] = o[0]["median_ms"] / bz["median_ms"]
                if c:
                    s["optimized_vs_compiled"] = bc_["median_ms"] / bz["median_ms"]
            out.append(s)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=416)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--modes", default="train,infer")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--min-runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4,
                   help="inference: rounds in which every variant is timed in turn (see above)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--loss-steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-calibrate-bn", dest="calibrate_bn", action="store_false",
                   help="keep the initial BatchNorm statistics (default: calibrate them on "
                        "synthetic data first, see calibrate())")
    p.add_argument("--no-flush-denormal", dest="flush_denormal", action="store_false",
                   help="CPU: keep denormal arithmetic (default: torch.set_flush_denormal(True))")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="infer: skip the torch.compile row (the unfused network compiled)")
    p.add_argument("--no-onnxruntime", dest="onnxruntime", action="store_false",
                   help="CPU, float32, infer: skip the ONNX Runtime row")
    p.add_argument("--smoke", action="store_true",
                   help="tiny network and batch, one timed run: checks that everything runs")
    p.add_argument("--json", default=None,
                   help="write the rows and environment here, and a PNG plot beside it")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (they are also off when stderr is not a terminal)")
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args.models is None:
        args.models = "igcv2_cifar" if device == "cpu" else "igcv2_cifar,igcv3_imagenet"
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.smoke:
        args.batch, args.width, args.depth, args.group_size = 8, 16, 8, 4
        args.min_time, args.min_runs, args.warmup, args.rounds = 0.0, 1, 1, min(args.rounds, 2)
        args.loss_steps = min(args.loss_steps, 6)
        models = [m for m in models if m == "igcv2_cifar"] or ["igcv2_cifar"]
    args.layouts = [s for s in args.layouts.split(",") if s]
    args.modes = [s for s in args.modes.split(",") if s]
    if args.threads:
        torch.set_num_threads(args.threads)
    if device == "cpu" and args.flush_denormal:
        torch.set_flush_denormal(True)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True

    env = bc.environment()
    if device == "cuda":
        env.update(device=torch.cuda.get_device_name(), device_type="cuda",
                   cudnn=torch.backends.cudnn.version())
    env["command"] = " ".join(["python", "benchmarks/e2e.py"] + sys.argv[1:]) if argv is None \
        else " ".join(["python", "benchmarks/e2e.py"] + list(argv))
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"device {env['device']} ({device}), torch {env['torch']}, threads {env['threads']}, "
        f"dtype {args.dtype}, commit {env.get('git_commit')}")
    backend = fused_backend(device)
    if backend == "reference":
        log("WARNING: no fused backend is usable on this device: the 'fused' rows run the "
            "reference chain (see `python -m igc_kernels.info`)")

    rows = []
    for m in plot.bar(models, args.quiet or len(models) == 1, desc="models"):
        rows += run_model(m, args, device, log)
    summary = summarize(rows)
    log("\nsummary (fastest layout of each):")
    for s in summary:
        extra = ""
        if "peak_ratio" in s:
            extra += f", peak memory fused/unfused {s['peak_ratio']:.2f}"
        if "saved_ratio" in s:
            extra += f", saved activations fused/unfused {s['saved_ratio']:.2f}"
        if "onnxruntime_ms" in s:
            extra += (f"; ONNX Runtime {s['onnxruntime_ms']:.2f} ms, fused "
                      f"{s['speedup_vs_onnxruntime']:.2f}x")
        if "compiled_ms" in s:
            extra += f"; torch.compile(unfused) {s['compiled_ms']:.2f} ms ({s['compiled_layout']})"
        if "optimized_ms" in s:
            extra += (f"; optimize_for_inference {s['optimized_ms']:.2f} ms "
                      f"({s['optimized_layout']}), {s['optimized_speedup']:.2f}x unfused"
                      + (f", {s['optimized_vs_onnxruntime']:.2f}x ONNX Runtime"
                         if "optimized_vs_onnxruntime" in s else ""))
        log(f"  {s['model']:15s} {s['mode']:6s} fused {s['fused_ms']:.2f} ms ({s['fused_layout']}) "
            f"vs unfused {s['unfused_ms']:.2f} ms ({s['unfused_layout']}): "
            f"{s['speedup']:.2f}x{extra}")
    track = None  # --loss-steps 0: no loss tracking
    if args.loss_steps > 0:
        track = loss_tracking(args.loss_steps, device, args.smoke)
        log(f"\nloss tracking over {track['steps']} SGD steps ({track['model']}): float64 max "
            f"relative difference {max(track['float64_rel_diff']):.2e}; float32 distance to "
            f"the float64 run: fused {track['float32_fused_max_err']:.2e}, unfused "
            f"{track['float32_unfused_max_err']:.2e} -> "
            f"{'PASS' if track['passed'] else 'FAIL'}")
        log("  step  fused(f32)   unfused(f32)  unfused(f64)")
        for i, (a, b, c) in enumerate(zip(track["fused_float32"], track["unfused_float32"],
                                          track["unfused_float64"])):
            log(f"  {i:4d}  {a:.6f}    {b:.6f}     {c:.6f}")
    out = {"environment": env, "command": env["command"], "args": {
        k: v for k, v in vars(args).items() if k != "json"}, "rows": rows, "summary": summary,
        "loss_tracking": track}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        log(f"wrote {args.json}")
        plot.save_beside(args.json, log)
    return 0 if track is None or track["passed"] else 1


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    sys.exit(rc)
