"""Per-call cost of the operator's Python front end on a tiny problem (the kernels' own time is
small there), and the cost of the derivative paths relative to a plain backward.

Rows, each the median of many runs (``bench_common.measure``), for one backend:

* ``raw_op_forward``: ``torch.ops.igc.chain_forward`` on normalised arguments (no front end);
* ``forward_no_grad``: the public function under ``torch.no_grad`` (validation, index value
  checks, backend selection, the op);
* ``forward_backward``: forward and ``backward()`` with every leaf requiring grad;
* ``double_backward``: a gradient penalty (``create_graph=True``, then a second backward);
* ``jvp``: ``torch.func.jvp`` in every leaf.

The problem has one explicit permutation (checked on every call) and one shuffle. Usage::

    python benchmarks/call_overhead.py [--channels 16] [--group-size 4] [--backend cpu]
                                       [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

import igc_kernels as igc  # noqa: E402
from bench_common import environment, measure  # noqa: E402
from igc_kernels._chain import normalize  # noqa: E402
from igc_kernels._ops import op_biases  # noqa: E402
import plot  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=2, help="spatial size (size x size)")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", default=None, help="write the rows here, and a PNG plot beside it")
    ap.add_argument("--quiet", action="store_true",
                    help="no progress bar (also off when stderr is not a terminal)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    spec = igc.ChainSpec.igcv2(args.channels, args.group_size)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, generator=gen)
    ws = [torch.randn(c, k, generator=gen) / k ** 0.5 for c, k in spec.weight_shapes()]
    groups = list(spec.groups)
    perms = [torch.randperm(args.channels, generator=gen)] + ["interleave"] * (len(groups) - 2) \
        + [None]
    perms = perms[:len(groups)]
    leaves = [x.clone().requires_grad_()] + [w.clone().requires_grad_() for w in ws]

    def call(x, *w):
        return igc.interleaved_group_conv(x, list(w), groups, perms, backend=args.backend)

    ch = normalize(x, ws, groups, perms)

    def raw():
        torch.ops.igc.chain_forward(x, ch.weights, op_biases(ch.biases, x), groups, ch.shuffles,
                                    ch.perms, ch.input_index)

    def fwd():
        with torch.no_grad():
            call(x, *ws)

    def fwd_bwd():
        call(*leaves).sum().backward()

    def penalty():
        y = call(*leaves)
        gx, = torch.autograd.grad((y * y).sum(), leaves[0], create_graph=True)
        (gx * gx).sum().backward()

    tangents = [torch.ones_like(t) for t in leaves]

    def jvp():
        torch.func.jvp(call, tuple(t.detach() for t in leaves), tuple(tangents))

    rows = {}
    cases = [("forward_no_grad", fwd), ("forward_backward", fwd_bwd),
             ("double_backward", penalty), ("jvp", jvp)]
    if args.backend == "cpu":
        cases.insert(0, ("raw_op_forward", raw))
    for name, fn in plot.bar(cases, args.quiet, desc="call paths"):
        s = measure(fn, min_time=args.min_time, min_runs=50)
        rows[name] = {"median_us": s.median_ms * 1e3, "p20_us": s.p20_ms * 1e3,
                      "p80_us": s.p80_ms * 1e3, "runs": s.runs}
        print(f"{name:18s} median {s.median_ms * 1e3:9.1f} us   p20-p80 "
              f"{s.p20_ms * 1e3:8.1f} - {s.p80_ms * 1e3:8.1f} us   ({s.runs} runs)")
    out = {"environment": environment(), "backend": args.backend,
           "problem": {"x": list(x.shape), "spec": repr(spec)}, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        plot.save_beside(args.json)
    return out


if __name__ == "__main__":
    main()
