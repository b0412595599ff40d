#!/usr/bin/env python
"""GPU benchmark of the fused interleaved group convolution against its baselines.

    python benchmarks/bench_gpu.py --targets --json benchmarks/results/gpu-<device>.json
    python benchmarks/bench_gpu.py --sweep --no-compile          # fp32/fp16/bf16 sweep
    python benchmarks/bench.py --device cuda ...                  # the same, from the main job
    python benchmarks/bench_gpu.py --device cpu --quick --tiny    # smoke run of this script

Methodology
-----------
Problems (``--targets``): bfloat16, x = (64, C, 56, 56) (200704 positions, far past the L2
cache), C in {256, 512, 1024}, group width K in {8, 16}, depth L in {2, 3, 4}, channel shuffle
after every layer but the last. ``--sweep``: float32 / float16 / bfloat16 over C in {64 .. 2048}
(K = 8, L = 3), K in {4, 8, 16, 32} (C = 512, L = 3) and L in {1 .. 4} (C = 512, K = 8).

For every problem, in one process and one run:

1. Correctness first (``bench_common.check_correctness``): every implementation's output and
   gradients against the float64 reference chain; the fused backends within 2x the unfused
   chain's error in the same dtype. A failure aborts before anything is timed.
2. Timing with ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run; median,
   p20, p80). ``fwd``: forward under ``torch.no_grad``. ``bwd``: the backward alone (dx and
   every dW): ``torch.autograd.grad(y, [x, *W], dy, retain_graph=True)`` on a forward made
   once outside the timed region. Implementations:
   * ``fused[B]`` for each fused backend B (``cuda``, ``triton``), NCHW and channels_last x;
   * ``chain``: ``F.conv2d(groups=G_l)`` + ``F.channel_shuffle`` per layer, cuDNN with
     ``torch.backends.cudnn.benchmark = True``, NCHW and channels_last; the fastest of the two
     is the "vs chain" baseline;
   * ``compiled``: ``torch.compile`` of that chain, for the layouts in ``--compile-layouts``
     (default channels_last), the "vs compiled" baseline;
   * ``dense``: one ``F.conv2d`` with the composed C_L x C_0 matrix, both layouts, fastest;
   * ``copy``: ``dst.copy_(x)``: the measured copy bandwidth ``2 bytes(x) / t``.
   TF32 stays off (``torch.backends.cuda.matmul.allow_tf32 = False``,
   ``torch.backends.cudnn.allow_tf32 = False``): float32 rows are true fp32 for every row.
3. GB/s is the least traffic over the time: forward ``bytes(x) + bytes(y)``, backward
   ``bytes(x) + bytes(dy) + bytes(dx)``; ``%copy`` is that over the copy bandwidth.
4. Memory: peak ``torch.cuda.max_memory_allocated`` above the live bytes during one forward +
   backward step.

Output: a table per problem on stdout, progress on stderr, and a JSON record (``--json``)
whose every row carries device, versions, commit, dtype, layout, shape, mode and backend.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

import torch

import bench_common as bc

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_MODES = ("fwd", "bwd")


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------
def target_configs(batch=64, hw=56) -> list:
    return [bc.Config(channels=C, group_size=K, depth=L, batch=batch, height=hw, width=hw,
                      dtype="bfloat16")
            for C in (256, 512, 1024) for K in (8, 16) for L in (2, 3, 4)]


def sweep_configs(dtypes=("float32", "float16", "bfloat16"), batch=64, hw=56) -> list:
    shapes = [dict(channels=C, group_size=8, depth=3) for C in (64, 128, 256, 512, 1024, 2048)]
    shapes += [dict(channels=512, group_size=K, depth=3) for K in (4, 16, 32)]
    shapes += [dict(channels=512, group_size=8, depth=L) for L in (1, 2, 4)]
    return [bc.Config(batch=batch, height=hw, width=hw, dtype=dt, **s)
            for dt in dtypes for s in shapes]


def tiny_configs() -> list:
    """For ``--tiny`` (smoke runs of this script, e.g. on the CPU)."""
    return [bc.Config(channels=32, group_size=4, depth=2, batch=2, height=5, width=5,
                      dtype="float32")]


def problem_on(cfg: bc.Config, device: str) -> bc.Problem:
    p = bc.make_problem(cfg)
    p.x = p.x.to(device)
    p.weights = [w.to(device) for w in p.weights]
    p.grad_out = p.grad_out.to(device)
    p.dense_weight = p.dense_weight.to(device)
    p.perms = [None if q is None else (q[0], q[1].to(device) if q[0] == "index" else q[1])
               for q in p.perms]
    return p


def gpu_cases(backends, compile_layouts) -> list:
    cases = [bc.Case("fused", lay, None, b) for b in backends for lay in bc.LAYOUTS]
    cases += [bc.Case("chain", lay) for lay in bc.LAYOUTS]
    cases += [bc.Case("compiled", lay) for lay in compile_layouts]
    cases += [bc.Case("dense", lay) for lay in bc.LAYOUTS]
    cases.append(bc.Case("copy", "nchw"))
    return cases


# --------------------------------------------------------------------------------------------
# Steps and timing
# --------------------------------------------------------------------------------------------
def build_gpu_step(case: bc.Case, problem: bc.Problem, mode: str):
    """Zero-argument callable of one ``mode`` step (``fwd``: no-grad forward; ``bwd``: the
    backward of a forward made here, once)."""
    if case.kind == "copy" or mode == "fwd":
        return bc.build_step(case, problem, "fwd")
    x = bc.to_layout(problem.x, case.layout).requires_grad_(True)
    src = [problem.dense_weight] if case.kind == "dense" else problem.weights
    params = [w.detach().clone().requires_grad_(True) for w in src]
    dy = bc.to_layout(problem.grad_out, case.layout)
    y = bc.forward_fn(case, problem)(x, params)
    inputs = [x, *params]
    return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)


def time_step(fn, device: str, quick: bool) -> bc.Stats:
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                                     quantiles=[0.5, 0.2, 0.8])
        med, p20, p80 = (float(v) for v in ms)
        return bc.Stats(median_ms=med, p20_ms=p20, p80_ms=p80, min_ms=p20, mean_ms=med, runs=0)
    return bc.measure(fn, min_time=0.02 if quick else 0.3, min_runs=3 if quick else 10)


def peak_step_bytes(case: bc.Case, problem: bc.Problem, device: str):
    if device != "cuda" or case.kind == "copy":
        return None
    step = bc.build_step(case, problem, "fwd+bwd")
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


# --------------------------------------------------------------------------------------------
# One problem
# --------------------------------------------------------------------------------------------
def io_bytes(problem: bc.Problem, mode: str) -> int:
    bx = problem.act_bytes(problem.spec.in_channels)
    by = problem.act_bytes(problem.spec.out_channels)
    return bx + by if mode == "fwd" else 2 * bx + by


def run_config(cfg, device, backends, args, env, log) -> list:
    problem = problem_on(cfg, device)
    cases = gpu_cases(backends, args.compile_layouts)
    log(f"== {cfg.describe()} on {env['device']}")
    errors = bc.check_correctness(problem, cases, log=log)
    results = {}
    for case in cases:
        for mode in (("fwd",) if case.kind == "copy" else GPU_MODES):
            s = time_step(build_gpu_step(case, problem, mode), device, args.quick)
            results[(case.label, mode)] = s
            log(f"{mode:<4} {case.label:<30} median {s.median_ms:9.4f} ms "
                f"(p20 {s.p20_ms:.4f}, p80 {s.p80_ms:.4f})")
    copy_ms = results[("copy", "fwd")].median_ms
    copy_gbps = 2 * problem.act_bytes(cfg.channels) / copy_ms / 1e6

    def fastest(kind, mode):
        c = [(lbl, s) for (lbl, m), s in results.items()
             if m == mode and lbl.split(" ")[0] == kind]
        return min(c, key=lambda t: t[1].median_ms) if c else (None, None)

    rows = []
    print(f"\n### {cfg.describe()} | {env['device']} | copy {copy_gbps:.0f} GB/s")
    print(f"{'mode':<5}{'implementation':<30}{'ms':>10}{'GB/s':>9}{'%copy':>7}"
          f"{'vs chain':>10}{'vs compiled':>12}{'vs dense':>10}")
    for mode in GPU_MODES:
        io = io_bytes(problem, mode)
        base = {k: fastest(k, mode) for k in ("chain", "compiled", "dense")}
        for case in cases:
            if case.kind == "copy":
                continue
            s = results[(case.label, mode)]
            gbps = io / s.median_ms / 1e6
            ratio = {k: (b[1].median_ms / s.median_ms if b[1] else None)
                     for k, b in base.items()}
            print(f"{mode:<5}{case.label:<30}{s.median_ms:>10.4f}{gbps:>9.0f}"
                  f"{100 * gbps / copy_gbps:>6.0f}%" + "".join(
                      f"{(f'{r:.2f}x' if r else '-'):>{w}}"
                      for r, w in ((ratio['chain'], 10), (ratio['compiled'], 12),
                                   (ratio['dense'], 10))))
            rows.append({
                **env, "config": dataclasses.asdict(cfg), "shape": list(cfg.shape),
                "dtype": cfg.dtype, "layout": case.layout, "mode": mode, "kind": case.kind,
                "backend": case.backend if case.kind == "fused" else "torch",
                "label": case.label, **s.as_dict(), "io_bytes": io, "gbps": gbps,
                "copy_gbps": copy_gbps, "frac_copy": gbps / copy_gbps,
                "fastest_chain": base["chain"][0], "vs_chain": ratio["chain"],
                "fastest_compiled": base["compiled"][0], "vs_compiled": ratio["compiled"],
                "fastest_dense": base["dense"][0], "vs_dense": ratio["dense"],
                "max_abs_err": errors.get(case.label),
            })
    if not args.no_memory:
        for case in cases:
            peak = peak_step_bytes(case, problem, device)
            if peak is not None:
                rows.append({**env, "config": dataclasses.asdict(cfg), "dtype": cfg.dtype,
                             "layout": case.layout, "mode": "memory", "kind": case.kind,
                             "label": case.label, "peak_bytes": peak})
                print(f"mem  {case.label:<30} peak {peak / 2**20:10.1f} MiB")
    sys.stdout.flush()
    return rows


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default); cpu only to smoke-test this script")
    p.add_argument("--targets", action="store_true", help="the target problems (default)")
    p.add_argument("--sweep", action="store_true", help="the dtype / C / K / L sweep")
    p.add_argument("--tiny", action="store_true", help="one tiny problem (smoke runs)")
    p.add_argument("--backends", default=None,
                   help="comma-separated fused backends (default: every usable one but the "
                        "reference)")
    p.add_argument("--compile-layouts", default="channels_last",
                   help="layouts of the torch.compile baseline, comma-separated "
                        "(nchw,channels_last) or 'none'")
    p.add_argument("--no-compile", action="store_true", help="same as --compile-layouts none")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hw", type=int, default=56)
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None, help="JSON output path")
    args = p.parse_args(argv)
    if args.no_compile or args.compile_layouts == "none":
        args.compile_layouts = []
    else:
        args.compile_layouts = [s for s in args.compile_layouts.split(",") if s]
        for s in args.compile_layouts:
            if s not in bc.LAYOUTS:
                p.error(f"--compile-layouts: unknown layout {s!r}")
    return args


def gpu_environment(device: str) -> dict:
    env = bc.environment()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), device_type="cuda",
                   sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch reports no usable CUDA device")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in bc.igc.available_backends(device) if b != "reference"]
        backends = backends or ["reference"]
    for b in backends:
        if b not in bc.igc.BACKENDS:
            raise SystemExit(f"unknown backend {b!r}")
    configs = []
    if args.tiny:
        configs += tiny_configs()
    if args.targets or not (args.sweep or args.tiny):
        configs += target_configs(args.batch, args.hw)
    if args.sweep:
        configs += [c for c in sweep_configs(batch=args.batch, hw=args.hw) if c not in configs]
    env = gpu_environment(device)
    env["fused_backends"] = backends
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rows, failed = [], []
    for cfg in configs:
        try:
            rows += run_config(cfg, device, backends, args, env, log)
        except bc.CorrectnessError as e:
            failed.append(str(e))
            log(f"CORRECTNESS FAILURE, not timed: {e}")
        if device == "cuda":
            torch.cuda.empty_cache()
    path = args.json or os.path.join(
        HERE, "out", f"{bc.device_slug(env['device'])}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows, "correctness_failures": failed}, f,
                  indent=1, default=str)
    log(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
