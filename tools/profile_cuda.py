"""One forward and one backward of the fused CUDA backend on a benchmark problem, for a profiler
(``ncu``), or (``--timeline``) the host and device time of repeated calls under torch.profiler.

    ncu --clock-control none --set full \
        --kernel-name regex:"chain_(forward|backward)_mma|reduce_partials" \
        python tools/profile_cuda.py 1024:16:3
    python tools/profile_cuda.py --timeline 256:8:3 1024:16:3

Problems are ``C:K[:L]`` (channels, group width, depth; the IGCV2 depth when L is left out) on
``x = (batch, C, hw, hw)``, as in benchmarks/bench.py (bfloat16 by default).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

import bench_common as bc  # noqa: E402


def parse_problem(text: str, args) -> bc.Config:
    parts = [int(v) for v in text.split(":")]
    if len(parts) not in (2, 3):
        raise SystemExit(f"problem {text!r}: expected C:K or C:K:L")
    return bc.Config(channels=parts[0], group_size=parts[1],
                     depth=parts[2] if len(parts) == 3 else None, batch=args.batch,
                     height=args.hw, width=args.hw, dtype=args.dtype)


def steps(cfg: bc.Config, layout: str, backend: str, device: str):
    problem = bc.problem_on(cfg, device)
    case = bc.Case("fused", layout, backend=backend)
    return bc.build_step(case, problem, "fwd"), bc.build_step(case, problem, "bwd")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeline(fwd, bwd, reps: int, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    for fn in (fwd, bwd):
        fn()
    sync(device)
    for name, fn in (("forward", fwd), ("backward", bwd)):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        host = (time.perf_counter() - t0) / reps
        sync(device)
        wall = (time.perf_counter() - t0) / reps
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(reps):
                fn()
            sync(device)
        print(f"-- {name}: host {host * 1e3:.4f} ms per call (enqueue), wall {wall * 1e3:.4f} "
              f"ms per call, {reps} calls")
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if device == "cuda"
                                              else "self_cpu_time_total", row_limit=12))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problems", nargs="+", help="C:K[:L]")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layout", default="nchw", choices=("nchw", "channels_last"))
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a smoke test of this script with --backend cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--hw", type=int, default=56)
    ap.add_argument("--timeline", action="store_true",
                    help="time repeated calls (host enqueue, wall) and print torch.profiler's table")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    for text in args.problems:
        cfg = parse_problem(text, args)
        print(f"== {text}: {cfg.describe()} {args.layout} backend {args.backend}", flush=True)
        fwd, bwd = steps(cfg, args.layout, args.backend, args.device)
        if args.timeline:
            timeline(fwd, bwd, args.reps, args.device)
        else:
            fwd()
            bwd()
            sync(args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
