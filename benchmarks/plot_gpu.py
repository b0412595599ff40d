#!/usr/bin/env python
"""PNG plots of a ``bench.py --device cuda`` JSON record: achieved GB/s of every implementation
per problem, forward and backward, with the measured copy bandwidth as the reference line.

    python benchmarks/plot_gpu.py benchmarks/results/gpu-<device>.json   # writes <json>.png

Needs matplotlib (``pip install matplotlib``); it plots only what the JSON holds.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit(__doc__)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = argv[0]
    out = argv[1] if len(argv) > 1 else path.rsplit(".", 1)[0] + ".png"
    with open(path) as f:
        rec = json.load(f)
    rows = [r for r in rec["rows"] if r["mode"] in ("fwd", "bwd")]
    dtypes = sorted({r["dtype"] for r in rows})
    panels = [(dt, mode) for dt in dtypes for mode in ("fwd", "bwd")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 3.6 * len(panels)), squeeze=False)
    for ax, (dt, mode) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r["dtype"] == dt and r["mode"] == mode]
        problems = []
        for r in sel:
            c = r["config"]
            key = f"C{c['channels']}/K{c['group_size']}/L{c['depth']}"
            if key not in problems:
                problems.append(key)
        series = defaultdict(dict)
        copy = {}
        for r in sel:
            c = r["config"]
            key = f"C{c['channels']}/K{c['group_size']}/L{c['depth']}"
            series[r["label"]][key] = r["gbps"]
            copy[key] = r["copy_gbps"]
        xs = range(len(problems))
        for label, vals in sorted(series.items()):
            style = "-o" if label.startswith("fused") else "--."
            ax.plot(xs, [vals.get(p, float("nan")) for p in problems], style, label=label,
                    markersize=4, linewidth=1.2)
        ax.plot(xs, [copy[p] for p in problems], "k-", linewidth=2, label="copy bandwidth")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(problems, rotation=60, fontsize=7)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{dt} {mode} ({rec['environment'].get('device')})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
