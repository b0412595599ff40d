#!/usr/bin/env python
"""CPU benchmark of the fused interleaved group convolution against its baselines.

    python benchmarks/bench.py                       # headline config (about a minute on 2 cores)
    python benchmarks/bench.py --sweep               # + sweep: channels, group width, depth, dtype
    python benchmarks/bench.py --quick               # smoke run: few repetitions
    python benchmarks/bench.py --backends cpu,reference --compile --json out.json
    python benchmarks/bench.py --device cuda --targets   # the GPU job: see bench_gpu.py

Methodology
-----------
For every config (headline: float32, x = (8, 256, 32, 32), ``ChainSpec.igcv2(256, 8)`` = 3
layers of 32 groups of width 8, channel shuffle between layers), in one process and one run:

1. Correctness first. Every implementation runs one forward+backward and one no-grad forward;
   the output and the gradients w.r.t. x and every weight are compared with the float64
   reference chain (``igc_kernels.reference``). The fused operator must stay within 2x the
   error of the unfused chain in the same dtype plus the worst-case float32 accumulation error
   (``bench_common.check_correctness``); the baselines within a per-dtype relative bound. Any
   failure aborts the run (exit status 1) before anything is timed.
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

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark the fused interleaved group convolution on CPU against the "
                    "unfused chain, the dense 1x1 conv and a copy (see the module docstring).")
    p.add_argument("--backends", type=str, default=None,
                   help="comma-separated igc backends timed as 'fused' (default: the fused "
                        "backends usable on CPU, or 'reference' when none is built)")
    p.add_argument("--sweep", action="store_true",
                   help="also run the sweep: C in {64..512}, group width in {4, 8, 16}, depth in "
                        "{1, 2, 4, 6}, for float32 and bfloat16 (unless --dtypes)")
    p.add_argument("--dtypes", type=str, default=None,
                   help="comma-separated dtypes (float32, bfloat16, float16); default float32 for "
                        "the headline, float32,bfloat16 for the sweep")
    p.add_argument("--channels", type=int, default=bc.HEADLINE.channels, help="headline C")
    p.add_argument("--group-size", type=int, default=bc.HEADLINE.group_size,
                   help="headline group width K (C/K groups per layer)")
    p.add_argument("--depth", type=int, default=None,
                   help="headline depth L (default: IGCV2 depth ceil(log_K C))")
    p.add_argument("--batch", type=int, default=bc.HEADLINE.batch, help="headline N")
    p.add_argument("--size", type=str, default=f"{bc.HEADLINE.height}x{bc.HEADLINE.width}",
                   help="headline spatial size HxW")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the chain (slow to compile on small CPUs)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: few repetitions, numbers not meant to be quoted")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds measured per timing (default 0.5; 0.02 with --quick)")
    p.add_argument("--min-runs", type=int, default=None,
                   help="least timed runs per timing (default 10; 3 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--json", type=str, default=None,
                   help="where to write the JSON record (default benchmarks/out/<cpu>-<time>.json)")
    return p.parse_args(argv)


def configs_from_args(args) -> list:
    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size must look like 32x32, got {args.size!r}")
    dtypes = args.dtypes.split(",") if args.dtypes else None
    for dt in dtypes or []:
        if dt not in bc.DTYPES:
            raise SystemExit(f"unknown dtype {dt!r}; choose from {', '.join(bc.DTYPES)}")
    head = bc.Config(channels=args.channels, group_size=args.group_size, depth=args.depth,
                     batch=args.batch, height=h, width=w)
    try:
        head.spec()
    except ValueError as e:
        raise SystemExit(f"invalid headline config: {e}")
    configs = [dataclasses.replace(head, dtype=dt) for dt in (dtypes or ["float32"])]
    if args.sweep:
        configs += [c for c in bc.sweep_configs(tuple(dtypes or ("float32", "bfloat16")))
                    if c not in configs]
    return configs


def backends_from_args(args) -> list:
    names = args.backends.split(",") if args.backends else bc.default_backends()
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
    """(case, stats) of the fastest case of ``kind`` in ``mode``."""
    cands = [(c, s) for (c, m), s in results.items() if m == mode and c.kind == kind]
    return min(cands, key=lambda cs: cs[1].median_ms) if cands else (None, None)


def run_config(cfg: bc.Config, backends: list, args, timing: dict, env: dict) -> list:
    problem = bc.make_problem(cfg)
    cases = bc.default_cases(backends, compile_chain=args.compile)
    progress(f"== {cfg.describe()}, threads={torch.get_num_threads()}")

    errors = bc.check_correctness(problem, cases, log=progress)

    results = {}
    plan = [(c, "copy") for c in cases if c.kind == "copy"]
    plan += [(c, m) for m in bc.MODES for c in cases if c.kind != "copy"]
    for i, (case, mode) in enumerate(plan, 1):
        step = bc.build_step(case, problem, "fwd" if mode == "copy" else mode)
        s = bc.measure(step, **timing)
        results[(case, mode)] = s
        progress(f"[{i:2d}/{len(plan)}] {mode:<7} {case.label:<34} median {s.median_ms:9.3f} ms  "
                 f"(p20 {s.p20_ms:.3f}, p80 {s.p80_ms:.3f}, {s.runs} runs)")

    memory = {}
    if not args.no_memory:
        for case in cases:
            if case.kind in ("copy",):
                continue
            peak = bc.peak_alloc_bytes(bc.build_step(case, problem, "fwd+bwd"))
            saved = bc.saved_activation_bytes(case, problem)
            memory[case] = (peak, saved)
            progress(f"memory  {case.label:<34} peak {_mib(peak)} MiB, saved {_mib(saved)} MiB")

    copy_case = next(c for c in cases if c.kind == "copy")
    copy_stats = results[(copy_case, "copy")]
    copy_gbps = 2 * problem.act_bytes(cfg.channels) / copy_stats.median_ms / 1e6

    rows = []
    print()
    print(f"### {cfg.describe()} | threads={torch.get_num_threads()} | {env['device']}")
    for mode in bc.MODES:
        rows += report_mode(problem, mode, results, copy_case, copy_gbps, env, errors)
    if memory:
        rows += report_memory(problem, memory, env)
    sys.stdout.flush()
    return rows


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def report_mode(problem, mode, results, copy_case, copy_gbps, env, errors) -> list:
    io = problem.io_bytes(mode)
    chain_case, chain_s = best(results, mode, "chain")
    dense_case, dense_s = best(results, mode, "dense")
    floor_ms = io / copy_gbps / 1e6
    title = "forward" if mode == "fwd" else "forward+backward (grads w.r.t. x and all weights)"
    print(f"\n{title}: least traffic {io / 2**20:.1f} MiB; baselines: {chain_case.label} "
          f"(fastest chain), {dense_case.label} (fastest dense)")
    hdr = (f"{'implementation':<34} {'median ms':>10} {'p20-p80 ms':>17} {'vs chain':>9} "
           f"{'vs dense':>9} {'GB/s':>7} {'%copy':>6}")
    print(hdr)
    print("-" * len(hdr))

    def line(label, ms, spread, gbps):
        print(f"{label:<34} {ms:>10.3f} {spread:>17} {chain_s.median_ms / ms:>8.2f}x "
              f"{dense_s.median_ms / ms:>8.2f}x {gbps:>7.1f} {100 * gbps / copy_gbps:>5.0f}%")

    rows = []
    for (case, m), s in results.items():
        if m != mode:
            continue
        gbps = io / s.median_ms / 1e6
        line(case.label, s.median_ms, f"{s.p20_ms:.3f}-{s.p80_ms:.3f}", gbps)
        rows.append(_time_row(problem, case, mode, s, io, gbps, copy_gbps, chain_case, chain_s,
                              dense_case, dense_s, env, errors.get(case.label)))
    copy_s = results[(copy_case, "copy")]
    if mode == "fwd":
        copy_io = 2 * problem.act_bytes(problem.spec.in_channels)
        line("copy x -> y (measured)", copy_s.median_ms,
             f"{copy_s.p20_ms:.3f}-{copy_s.p80_ms:.3f}", copy_io / copy_s.median_ms / 1e6)
        rows.append(_time_row(problem, copy_case, "copy", copy_s, copy_io, copy_gbps, copy_gbps,
                              chain_case, chain_s, dense_case, dense_s, env, None))
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


def _time_row(problem, case, mode, s, io, gbps, copy_gbps, chain_case, chain_s, dense_case,
              dense_s, env, errors) -> dict:
    return {
        **_base_row(problem, case, mode, env),
        "metric": "time",
        **s.as_dict(),
        "bytes": io,
        "gbps": gbps,
        "frac_copy_bw": gbps / copy_gbps,
        "copy_gbps": copy_gbps,
        "speedup_vs_chain": chain_s.median_ms / s.median_ms,
        "chain_baseline": chain_case.label,
        "speedup_vs_dense": dense_s.median_ms / s.median_ms,
        "dense_baseline": dense_case.label,
        "max_abs_err_vs_float64": errors,
    }


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--device" in argv or any(a.startswith("--device=") for a in argv):
        # The GPU job (and its CPU smoke mode) lives in bench_gpu.py; same command line there.
        import bench_gpu

        return bench_gpu.main(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = backends_from_args(args)
    configs = configs_from_args(args)
    timing = dict(min_time=0.5, min_runs=10)
    if args.quick:
        timing = dict(min_time=0.02, min_runs=3, warmup_time=0.0, warmup_runs=1)
    if args.min_time is not None:
        timing["min_time"] = args.min_time
    if args.min_runs is not None:
        timing["min_runs"] = args.min_runs

    env = bc.environment()
    if backends == ["reference"]:
        progress("note: no fused backend is usable here; 'fused[reference]' rows time the "
                 "package's reference chain (build igc_kernels._C for the fused CPU kernels)")
    load = env["loadavg_at_start"]
    if load and load[0] > 0.5:
        progress(f"warning: load average {load[0]:.2f} before the run: other processes use the "
                 "CPU and the timings will be noisy (recorded in the JSON as loadavg_at_start)")
    progress(f"device: {env['device']} | torch {env['torch']} | threads {env['threads']} | "
             f"commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''} | "
             f"backends {','.join(backends)}")

    t0 = time.perf_counter()
    rows = []
    for cfg in configs:
        try:
            rows += run_config(cfg, backends, args, timing, env)
        except bc.CorrectnessError as e:
            progress(f"ERROR: {e}")
            return 1

    path = args.json or os.path.join(
        HERE, "out", f"{bc.device_slug(env['device'])}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "timing": timing, "backends": backends, "rows": rows},
                  f, indent=1)
    progress(f"\nwrote {len(rows)} rows to {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
