#!/usr/bin/env python
"""Benchmark of the fused interleaved group convolution against its baselines, on the CPU or a
GPU: one entry point, one case table (``bench_common.default_cases``), a timer per device.

    python benchmarks/bench.py                       # CPU headline config (about a minute, 2 cores)
    python benchmarks/bench.py --sweep               # + sweep: channels, group width, depth, dtype
    python benchmarks/bench.py --quick               # smoke run: few repetitions
    python benchmarks/bench.py --backends cpu,reference --compile --json out.json
    python benchmarks/bench.py --device cuda --json benchmarks/results/gpu-<device>.json
    python benchmarks/bench.py --device cuda --sweep --no-compile

On a GPU (``--device cuda``) the problems are the targets (bfloat16, x = (64, C, 56, 56), C in
{256, 512, 1024}, group width 8, 16 and 32, depth 2 to 4; ``--sweep`` adds fp32 / fp16 / bf16 over
C 64..2048, widths 4..32, depths 1..4); timing is ``triton.testing.do_bench`` (CUDA events, L2
flushed before every run); the backward is timed alone (``bwd``: the gradients of a forward
made once outside the timed region) so that its GB/s reads against the copy's; the chain and
the dense conv run on cuDNN with ``cudnn.benchmark`` on, TF32 off; ``torch.compile`` of the
chain is a baseline (channels_last by default); memory is ``torch.cuda.max_memory_allocated``.
The CPU methodology follows.

Methodology
-----------
For every config (headline: float32, x = (8, 256, 32, 32), ``ChainSpec.igcv2(256, 8)`` = 3
layers of 32 groups of width 8, channel shuffle between layers), in one process and one run:

1. Correctness first. Every implementation runs one forward+backward and one no-grad forward;
   the output and the gradients w.r.t. x and every weight are compared with the float64
   reference chain (``igc_kernels.reference``). The fused operator must meet the test suite's
   rule (``bench_common.check_correctness``: the rounding bound in float32, twice the unfused
   chain's error in 16-bit dtypes); the baselines a per-dtype relative bound. A failing config
   is not timed, and the run exits with status 1.
2. Timing (``bench_common.measure``): warm-up (>= 2 runs and 0.1 s), then every run is timed
   with ``time.perf_counter`` until >= ``--min-time`` seconds (default 0.5) and >= 10 runs; the
   median is reported with p20 / p80. Threads: ``torch.get_num_threads()`` (``--threads``).
   Implementations, forward (under ``torch.no_grad``) and forward+backward
   (``torch.autograd.grad`` w.r.t. x and every weight, ``dy`` preallocated in x's layout):
   * ``fused[B]``: ``igc_kernels.interleaved_group_conv(backend=B)`` on NCHW and channels_last x;
   * ``chain``: ``F.conv2d(groups=G_l)`` + ``F.channel_shuffle`` per layer (the same weights),
     oneDNN on / off (``torch.backends.mkldnn.enabled``) x NCHW / channels_last. The fastest of
     the four is the baseline of the "vs chain" column (all four are reported);
   * ``dense``: one ``F.conv2d`` with the composed C_L x C_0 matrix, the same four variants;
     the fastest is the baseline of the "vs dense" column;
   * ``compiled`` (``--compile``): ``torch.compile`` of the chain, both layouts;
   * ``copy``: ``y.copy_(x)`` into a preallocated tensor: the measured copy bandwidth
     ``2 * bytes(x) / t``, which sets the floor.
   Speed-ups are ``t(baseline) / t(row)`` (> 1: the row is faster). GB/s is the least traffic
   of the step over its time: forward ``bytes(x) + bytes(y)``; forward+backward adds the
   backward's ``bytes(x) + bytes(dy) + bytes(dx)``. ``%copy`` is that GB/s over the copy's.
   The "floor" rows are that least traffic at the copy bandwidth.
3. Memory of one forward+backward step (not timed):
   * ``peak``: peak of the running sum of every allocation / free made through PyTorch's CPU
     allocator during the step (``torch.profiler`` with ``profile_memory=True``), above what was
     live before it: outputs, saved intermediates, gradients, ATen workspaces. Allocations a
     library makes with its own malloc (oneDNN scratchpads) are invisible to it.
   * ``saved``: bytes of the distinct storages autograd saves for backward
     (``torch.autograd.graph.saved_tensors_hooks``), beyond x and the weights themselves.

Output: progress (one line per check / measurement) on stderr, tables on stdout, and a JSON
record (``--json``, default ``benchmarks/out/<cpu>-<timestamp>.json``) where every row carries
the device, versions, commit, threads, dtype, layout, shape, mode and backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

import bench_common as bc
import plot

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the fused interleaved group convolution against the unfused "
                    "chain, its compiled form, the dense 1x1 conv and a copy (see the module "
                    "docstring).")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu (default): the headline config, timed with perf_counter; cuda: "
                        "the GPU targets, timed with triton.testing.do_bench")
    p.add_argument("--backends", type=str, default=None,
                   help="comma-separated igc backends timed as 'fused' (default: the fused "
                        "backends usable on the device, or 'reference' when none is)")
    p.add_argument("--sweep", action="store_true",
                   help="also run the sweep (CPU: C in {64..512}, group width {4, 8, 16}, depth "
                        "{1, 2, 4, 6}, float32 and bfloat16; CUDA: fp32/fp16/bf16 over C "
                        "64..2048, widths 4..32, depths 1..4)")
    p.add_argument("--targets", action="store_true",
                   help="CUDA: the target problems (the default there)")
    p.add_argument("--tiny", action="store_true", help="one tiny problem (smoke runs)")
    p.add_argument("--only", type=str, default=None,
                   help="CUDA: only these problems, comma-separated C:K:L (or C:K for the "
                        "IGCV2 depth), in each of --dtypes (default bfloat16), instead of the "
                        "targets / sweep")
    p.add_argument("--dtypes", type=str, default=None,
                   help="comma-separated dtypes (float32, bfloat16, float16); default float32 for "
                        "the CPU headline, float32,bfloat16 for the CPU sweep")
    p.add_argument("--channels", type=int, default=bc.HEADLINE.channels, help="headline C")
    p.add_argument("--group-size", type=int, default=bc.HEADLINE.group_size,
                   help="headline group width K (C/K groups per layer)")
    p.add_argument("--depth", type=int, default=None,
                   help="headline depth L (default: IGCV2 depth ceil(log_K C))")
    p.add_argument("--batch", type=int, default=None,
                   help=f"N (default {bc.HEADLINE.batch} on the CPU, 64 on CUDA)")
    p.add_argument("--size", type=str, default=None,
                   help=f"spatial size HxW (default {bc.HEADLINE.height}x{bc.HEADLINE.width} on "
                        f"the CPU, 56x56 on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the chain in both layouts")
    p.add_argument("--compile-layouts", default=None,
                   help="layouts of the torch.compile baseline, comma-separated "
                        "(nchw,channels_last) or 'none' (default: none on the CPU, "
                        "channels_last on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="same as --compile-layouts none")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: few repetitions, numbers not meant to be quoted")
    p.add_argument("--min-time", type=float, default=None,
                   help="CPU: seconds measured per timing (default 0.5; 0.02 with --quick)")
    p.add_argument("--min-runs", type=int, default=None,
                   help="CPU: least timed runs per timing (default 10; 3 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--json", type=str, default=None,
                   help="where to write the JSON record (default benchmarks/out/<device>-<time>"
                        ".json); a PNG plot is written beside it")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (they are also off when stderr is not a terminal)")
    args = p.parse_args(argv)
    if args.only and args.device != "cuda":
        p.error("--only picks CUDA problems; on the CPU use --channels, --group-size, --depth")
    if args.no_compile or args.compile_layouts == "none":
        args.compile_layouts = []
    elif args.compile:
        args.compile_layouts = list(bc.LAYOUTS)
    elif args.compile_layouts is None:
        args.compile_layouts = ["channels_last"] if args.device == "cuda" else []
    else:
        args.compile_layouts = [s for s in args.compile_layouts.split(",") if s]
        for s in args.compile_layouts:
            if s not in bc.LAYOUTS:
                p.error(f"--compile-layouts: unknown layout {s!r}")
    return args


def configs_from_args(args) -> list:
    dtypes = args.dtypes.split(",") if args.dtypes else None
    for dt in dtypes or []:
        if dt not in bc.DTYPES:
            raise SystemExit(f"unknown dtype {dt!r}; choose from {', '.join(bc.DTYPES)}")
    if args.tiny:
        return [dataclasses.replace(bc.TINY, dtype=dt) for dt in (dtypes or ["float32"])]
    cuda = args.device == "cuda"
    size = args.size or ("56x56" if cuda else f"{bc.HEADLINE.height}x{bc.HEADLINE.width}")
    try:
        h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size must look like 32x32, got {size!r}")
    batch = args.batch or (64 if cuda else bc.HEADLINE.batch)
    if cuda and args.only:
        return [bc.Config(batch=batch, height=h, width=w, dtype=dt, **shape)
                for dt in (dtypes or ["bfloat16"]) for shape in parse_only(args.only)]
    if cuda:
        configs = []
        if args.targets or not args.sweep:
            configs += bc.gpu_target_configs(batch, h)
        if args.sweep:
            configs += [c for c in bc.gpu_sweep_configs(tuple(dtypes or ("float32", "float16",
                                                                          "bfloat16")), batch, h)
                        if c not in configs]
        return configs
    head = bc.Config(channels=args.channels, group_size=args.group_size, depth=args.depth,
                     batch=batch, height=h, width=w)
    try:
        head.spec()
    except ValueError as e:
        raise SystemExit(f"invalid headline config: {e}")
    configs = [dataclasses.replace(head, dtype=dt) for dt in (dtypes or ["float32"])]
    if args.sweep:
        configs += [c for c in bc.sweep_configs(tuple(dtypes or ("float32", "bfloat16")))
                    if c not in configs]
    return configs


def parse_only(text: str) -> list:
    """``"256:8:3,512:16"`` -> ``[dict(channels=256, group_size=8, depth=3), ...]`` (no depth:
    the IGCV2 depth), each checked by building its chain."""
    shapes = []
    for item in (t for t in text.split(",") if t.strip()):
        try:
            nums = [int(v) for v in item.split(":")]
        except ValueError:
            nums = []
        if len(nums) not in (2, 3):
            raise SystemExit(f"--only: expected C:K:L or C:K, got {item!r}")
        shape = dict(channels=nums[0], group_size=nums[1],
                     depth=nums[2] if len(nums) == 3 else None)
        try:
            bc.Config(**shape).spec()
        except ValueError as e:
            raise SystemExit(f"--only: invalid problem {item!r}: {e}")
        shapes.append(shape)
    return shapes


def backends_from_args(args, device: str) -> list:
    if args.backends:
        names = args.backends.split(",")
    else:
        names = [b for b in bc.igc.available_backends(device) if b != "reference"]
        names = names or ["reference"]
    for name in names:
        if name not in bc.igc.BACKENDS:
            raise SystemExit(f"unknown backend {name!r}; choose from {', '.join(bc.igc.BACKENDS)}")
        reasons = bc.igc.BACKENDS[name].unavailable_reasons()
        if reasons:
            raise SystemExit(f"backend {name!r} is unavailable:\n  - " + "\n  - ".join(reasons))
    return names


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# One config
# --------------------------------------------------------------------------------------------
def best(results: dict, mode: str, kind: str):
    """(case, stats) of the fastest case of ``kind`` in ``mode`` (``(None, None)`` if none)."""
    cands = [(c, s) for (c, m), s in results.items() if m == mode and c.kind == kind]
    return min(cands, key=lambda cs: cs[1].median_ms) if cands else (None, None)


def run_config(cfg: bc.Config, device: str, backends: list, args, timer, env: dict) -> list:
    problem = bc.problem_on(cfg, device)
    cases = bc.default_cases(backends, device=device, compile_layouts=args.compile_layouts)
    modes = bc.DEVICE_MODES[device]
    progress(f"== {cfg.describe()} on {env['device']}, threads={torch.get_num_threads()}")

    errors = bc.check_correctness(problem, cases, log=progress)

    results = {}
    plan = [(c, "copy") for c in cases if c.kind == "copy"]
    plan += [(c, m) for m in modes for c in cases if c.kind != "copy"]
    for i, (case, mode) in enumerate(plot.bar(plan, args.quiet, desc="timing"), 1):
        s = timer(bc.build_step(case, problem, "fwd" if mode == "copy" else mode))
        results[(case, mode)] = s
        progress(f"[{i:2d}/{len(plan)}] {mode:<7} {case.label:<34} median {s.median_ms:9.4f} ms "
                 f" (p20 {s.p20_ms:.4f}, p80 {s.p80_ms:.4f}, {s.runs} runs)")

    memory = {}
    if not args.no_memory:
        for case in cases:
            if case.kind == "copy":
                continue
            peak = bc.peak_step_bytes(case, problem, device)
            saved = bc.saved_activation_bytes(case, problem)
            memory[case] = (peak, saved)
            progress(f"memory  {case.label:<34} peak {_mib(peak)} MiB, saved {_mib(saved)} MiB")

    copy_case = next(c for c in cases if c.kind == "copy")
    copy_stats = results[(copy_case, "copy")]
    copy_gbps = 2 * problem.act_bytes(cfg.channels) / copy_stats.median_ms / 1e6

    rows = []
    print()
    print(f"### {cfg.describe()} | threads={torch.get_num_threads()} | {env['device']}")
    for mode in modes:
        rows += report_mode(problem, mode, results, copy_case, copy_gbps, env, errors)
    if memory:
        rows += report_memory(problem, memory, env)
    sys.stdout.flush()
    return rows


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


BASELINES = ("chain", "compiled", "dense")
TITLES = {"fwd": "forward", "bwd": "backward (grads w.r.t. x and all weights)",
          "fwd+bwd": "forward+backward (grads w.r.t. x and all weights)"}


def report_mode(problem, mode, results, copy_case, copy_gbps, env, errors) -> list:
    io = problem.io_bytes(mode)
    base = {k: best(results, mode, k) for k in BASELINES}
    base = {k: v for k, v in base.items() if v[0] is not None}
    floor_ms = io / copy_gbps / 1e6
    print(f"\n{TITLES[mode]}: least traffic {io / 2**20:.1f} MiB; baselines: " + ", ".join(
        f"{c.label} (fastest {k})" for k, (c, _) in base.items()))
    hdr = (f"{'implementation':<34} {'median ms':>10} {'p20-p80 ms':>19}"
           + "".join(f" {'vs ' + k:>12}" for k in base) + f" {'GB/s':>8} {'%copy':>6}")
    print(hdr)
    print("-" * len(hdr))

    def line(label, ms, spread, gbps):
        print(f"{label:<34} {ms:>10.4f} {spread:>19}"
              + "".join(f" {s.median_ms / ms:>11.2f}x" for _, s in base.values())
              + f" {gbps:>8.1f} {100 * gbps / copy_gbps:>5.0f}%")

    rows = []
    for (case, m), s in results.items():
        if m != mode:
            continue
        gbps = io / s.median_ms / 1e6
        line(case.label, s.median_ms, f"{s.p20_ms:.4f}-{s.p80_ms:.4f}", gbps)
        rows.append(_time_row(problem, case, mode, s, io, gbps, copy_gbps, base, env,
                              errors.get(case.label)))
    copy_s = results[(copy_case, "copy")]
    if mode == "fwd":
        copy_io = 2 * problem.act_bytes(problem.spec.in_channels)
        line("copy x -> y (measured)", copy_s.median_ms,
             f"{copy_s.p20_ms:.4f}-{copy_s.p80_ms:.4f}", copy_io / copy_s.median_ms / 1e6)
        rows.append(_time_row(problem, copy_case, "copy", copy_s, copy_io, copy_gbps, copy_gbps,
                              base, env, None))
    line("floor (least traffic at copy GB/s)", floor_ms, "derived", copy_gbps)
    return rows


def _base_row(problem, case, mode, env) -> dict:
    cfg = problem.config
    return {
        **env,
        "config": dataclasses.asdict(cfg),
        "config_name": cfg.describe(),
        "dtype": cfg.dtype,
        "shape": list(cfg.shape),
        "channels": list(problem.spec.channels),
        "groups": list(problem.spec.groups),
        "layout": case.layout,
        "mode": mode,
        "kind": case.kind,
        "backend": case.backend,
        "mkldnn": case.mkldnn,
        "label": case.label,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _time_row(problem, case, mode, s, io, gbps, copy_gbps, base, env, errors) -> dict:
    row = {
        **_base_row(problem, case, mode, env),
        "metric": "time",
        **s.as_dict(),
        "bytes": io,
        "gbps": gbps,
        "frac_copy_bw": gbps / copy_gbps,
        "copy_gbps": copy_gbps,
        "max_abs_err_vs_float64": errors,
    }
    for k, (bcase, bs) in base.items():
        row[f"speedup_vs_{k}"] = bs.median_ms / s.median_ms
        row[f"{k}_baseline"] = bcase.label
    return row


def report_memory(problem, memory, env) -> list:
    x_bytes = problem.act_bytes(problem.spec.in_channels)
    print(f"\nmemory of one forward+backward step (x = {x_bytes / 2**20:.1f} MiB)")
    hdr = f"{'implementation':<34} {'peak MiB':>9} {'peak/x':>7} {'saved MiB':>10} {'saved/x':>8}"
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for case, (peak, saved) in memory.items():
        pk = "n/a" if peak is None else f"{peak / x_bytes:.2f}"
        print(f"{case.label:<34} {_mib(peak):>9} {pk:>7} {_mib(saved):>10} {saved / x_bytes:>8.2f}")
        rows.append({**_base_row(problem, case, "fwd+bwd", env), "metric": "memory",
                     "peak_alloc_bytes": peak, "saved_bytes_beyond_inputs": saved,
                     "x_bytes": x_bytes})
    return rows


# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch reports no usable CUDA device")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 rows are true float32
        torch.backends.cudnn.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = backends_from_args(args, device)
    configs = configs_from_args(args)
    if device == "cuda":
        timer = bc.CUDATimer(args.quick)
        timing = {"timer": "triton.testing.do_bench", "warmup_ms": timer.warmup,
                  "rep_ms": timer.rep}
    else:
        timing = dict(min_time=0.5, min_runs=10)
        if args.quick:
            timing = dict(min_time=0.02, min_runs=3, warmup_time=0.0, warmup_runs=1)
        if args.min_time is not None:
            timing["min_time"] = args.min_time
        if args.min_runs is not None:
            timing["min_runs"] = args.min_runs
        timer = bc.CPUTimer(**timing)

    env = bc.device_environment(device)
    env["fused_backends"] = backends
    if backends == ["reference"]:
        progress("note: no fused backend is usable here; 'fused[reference]' rows time the "
                 "package's reference chain (build igc_kernels._C for the fused kernels)")
    load = env["loadavg_at_start"]
    if device == "cpu" and load and load[0] > 0.5:
        progress(f"warning: load average {load[0]:.2f} before the run: other processes use the "
                 "CPU and the timings will be noisy (recorded in the JSON as loadavg_at_start)")
    progress(f"device: {env['device']} | torch {env['torch']} | threads {env['threads']} | "
             f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} | "
             f"backends {','.join(backends)}")

    t0 = time.perf_counter()
    rows, failed = [], []
    path = args.json or os.path.join(
        HERE, "out", f"{bc.device_slug(env['device'])}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for cfg in plot.bar(configs, args.quiet or len(configs) == 1, desc="problems"):
        try:
            rows += run_config(cfg, device, backends, args, timer, env)
        except bc.CorrectnessError as e:
            progress(f"CORRECTNESS FAILURE, not timed: {e}")
            failed.append(str(e))
        if device == "cuda":
            torch.cuda.empty_cache()
        # rewritten after every problem: a run stopped part-way keeps what it measured
        with open(path, "w") as f:
            json.dump({"environment": env, "timing": timing, "backends": backends, "rows": rows,
                       "correctness_failures": failed}, f, indent=1, default=str)
    progress(f"\nwrote {len(rows)} rows to {path} ({time.perf_counter() - t0:.0f} s)")
    plot.save_beside(path, progress)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
