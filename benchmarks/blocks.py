#!/usr/bin/env python
"""Per-block times of a network after ``optimize_for_inference`` on the CPU, with each kind of
tiles of the block kernel, in one process.

    python benchmarks/blocks.py --model igcv3_imagenet --batch 1 --threads 2 --json out.json

The network (``e2e.py``'s models, BatchNorm statistics calibrated the same way, denormals
flushed, channels-last) is optimized, one forward pass records the input of every
``FusedBlock`` call, and each distinct block (shape and structure) is timed through the call
``FusedBlock`` makes (the direct kernel entry, its packed weights) under every setting of
``IGC_CPU_BLOCK_TILES``: ``channel_major`` ([channel][position] tiles), ``channels_last``
(vectors of output channels, where they apply) and ``auto`` (the kernel's rule). The
variants' calls alternate, ``--rounds`` rounds of ``--calls`` calls each, so that the machine's
drift (large on shared machines) hits every variant alike; a variant's time is its fastest
call. Rows: per block, its call count in the network and the three times; the totals weight
each block by its count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

import igc_kernels as igc  # noqa: E402
from igc_kernels import _loader  # noqa: E402
from igc_kernels.inference import FusedBlock  # noqa: E402
from bench_common import environment  # noqa: E402
import e2e  # noqa: E402

VARIANTS = ("channel_major", "channels_last", "auto")


def block_calls(model: str, args):
    """(FusedBlock, its input) for every distinct block call of one forward pass, with the
    number of calls of each."""
    net = e2e.build(model, True, args).to(memory_format=torch.channels_last)
    e2e.calibrate(net, model, args, "cpu", torch.channels_last)
    opt = igc.optimize_for_inference(net.eval())
    x = torch.randn(e2e.input_shape(model, args.batch),
                    generator=torch.Generator().manual_seed(1))
    x = x.contiguous(memory_format=torch.channels_last)
    seen: dict = {}
    counts: dict = {}

    def record(m, inp, out):  # returns None: the output is kept
        key = (tuple(inp[0].shape), m.extra_repr())
        seen.setdefault(key, (m, inp[0].clone()))
        counts[key] = counts.get(key, 0) + 1

    hooks = [m.register_forward_hook(record) for m in opt.modules()
             if isinstance(m, FusedBlock)]
    with torch.no_grad():
        opt(x)
    for h in hooks:
        h.remove()
    return [(key, m, xi, counts[key]) for key, (m, xi) in seen.items()]


def time_block(m: FusedBlock, x: torch.Tensor, args) -> dict:
    ext = _loader.ext()
    call_args = m._direct_args(x)
    assert call_args is not None, "the block does not take the direct kernel call"
    best = {v: float("inf") for v in VARIANTS}
    outputs = {}
    old = os.environ.get("IGC_CPU_BLOCK_TILES")
    try:
        with torch.no_grad():
            for v in VARIANTS:  # warm-up, and the variants' results
                os.environ["IGC_CPU_BLOCK_TILES"] = v
                for _ in range(3):
                    outputs[v] = ext.cpu_block_forward(*call_args)
            for r in range(args.rounds):
                order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
                for v in order:
                    os.environ["IGC_CPU_BLOCK_TILES"] = v
                    for _ in range(args.calls):
                        t = time.perf_counter()
                        ext.cpu_block_forward(*call_args)
                        best[v] = min(best[v], time.perf_counter() - t)
    finally:
        if old is None:
            os.environ.pop("IGC_CPU_BLOCK_TILES", None)
        else:
            os.environ["IGC_CPU_BLOCK_TILES"] = old
    ref = outputs["channel_major"]
    diff = max((outputs[v] - ref).abs().max().item() for v in VARIANTS)
    scale = ref.abs().max().item()
    return {**{f"{v}_us": best[v] * 1e6 for v in VARIANTS}, "max_abs_diff": diff,
            "output_scale": scale}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="igcv3_imagenet", choices=e2e.MODELS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=int, default=416)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=6)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.dtype = "float32"
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = []
    for key, m, xi, count in block_calls(args.model, args):
        row = {"input_shape": list(key[0]), "block": key[1], "calls": count,
               **time_block(m, xi, args)}
        rows.append(row)
        print(f"{count:2d} x {str(tuple(key[0])):20s} " + "  ".join(
            f"{v} {row[f'{v}_us']:8.1f} us" for v in VARIANTS)
              + f"  ratio cm/auto {row['channel_major_us'] / row['auto_us']:.2f}")
    totals = {v: sum(r[f"{v}_us"] * r["calls"] for r in rows) for v in VARIANTS}
    print("total (weighted by calls): " + "  ".join(f"{v} {totals[v]:.0f} us" for v in VARIANTS)
          + f"  ratio cm/auto {totals['channel_major'] / totals['auto']:.2f}")
    out = {"environment": environment(), "command": "python " + " ".join(sys.argv),
           "args": vars(args), "rows": rows, "totals_us": totals}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
