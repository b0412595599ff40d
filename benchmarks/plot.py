"""Plots of the benchmark JSON files, and the benchmarks' progress bars.

``python benchmarks/plot.py FILE.json [FILE.json ...]`` writes ``FILE.png`` beside each file:
- micro-benchmark (``bench.py``): median time of every variant per problem and mode, the fused
  operator's bars marked, with its speed-up over the fastest eager chain in the title; a sweep
  (more than four problems) plots that speed-up per problem instead;
- end-to-end (``e2e.py``): step time and peak memory, fused vs unfused (and ONNX Runtime's
  time where the run has it), per model, mode and layout;
- per-call cost (``call_overhead.py``): median time of every call path.

The benchmarks call :func:`save_beside` after writing their JSON (skipped, with a note, when
matplotlib is missing: ``make bench`` installs it). :func:`bar` is their progress bar: tqdm on
stderr, off with ``--quiet`` and when stderr is not a terminal.
"""

from __future__ import annotations

import json
import os
import sys


def bar(iterable, quiet: bool = False, **kw):
    """``tqdm(iterable)`` on stderr, or ``iterable`` itself when ``quiet``, when stderr is not a
    terminal or when tqdm is missing."""
    if quiet or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, file=sys.stderr, leave=False, dynamic_ncols=True, **kw)


def _kind(data: dict) -> str:
    rows = data.get("rows")
    if isinstance(rows, dict):
        return "call_overhead"
    if rows and "impl" in rows[0]:
        return "e2e"
    return "micro"


def _micro(data, plt):
    rows = [r for r in data["rows"] if r.get("metric") == "time"]
    groups = {}
    for r in rows:
        if r["mode"] != "copy":
            groups.setdefault((r["config_name"], r["mode"]), []).append(r)
    for r in rows:  # the copy of x (the floor) beside the forward's variants
        if r["mode"] == "copy" and (r["config_name"], "fwd") in groups:
            groups[(r["config_name"], "fwd")].append(r)
    if len(groups) > 4:  # a sweep: the fused speed-up per problem
        fig, ax = plt.subplots(figsize=(10, 4 + 0.2 * len(groups)))
        labels, ups = [], []
        for (cfg, mode), rs in groups.items():
            fused = [r for r in rs if r["kind"] == "fused" and "speedup_vs_chain" in r]
            if fused:
                best = max(fused, key=lambda r: r["speedup_vs_chain"])
                labels.append(f"{cfg} [{mode}]")
                ups.append(best["speedup_vs_chain"])
        ax.barh(range(len(ups)), ups, color="tab:orange")
        ax.set_yticks(range(len(ups)), labels, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("speed-up of the fused operator over the fastest eager chain (x)")
        return fig
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 3.2 * len(groups)), squeeze=False)
    for ax, ((cfg, mode), rs) in zip(axes[:, 0], groups.items()):
        rs = sorted(rs, key=lambda r: r["median_ms"])
        colors = ["tab:orange" if r["kind"] == "fused" else
                  "tab:gray" if r["kind"] == "copy" else "tab:blue" for r in rs]
        ax.barh(range(len(rs)), [r["median_ms"] for r in rs], color=colors)
        ax.set_yticks(range(len(rs)), [r["label"] for r in rs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("median time (ms)")
        fused = [r for r in rs if r["kind"] == "fused" and "speedup_vs_chain" in r]
        up = f", fused {max(r['speedup_vs_chain'] for r in fused):.1f}x the fastest eager " \
             "chain" if fused else ""
        ax.set_title(f"{cfg} | {mode}{up}", fontsize=9)
    env = data.get("environment", {})
    fig.suptitle(f"{env.get('device', '?')}, {env.get('threads', '?')} threads", fontsize=9)
    return fig


def _e2e(data, plt):
    rows = data["rows"]
    keys = sorted({(r["model"], r["mode"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 2.8 * len(keys)), squeeze=False)
    for (model, mode, batch), (ax_t, ax_m) in zip(keys, axes):
        rs = [r for r in rows if (r["model"], r["mode"], r["batch"]) == (model, mode, batch)]
        layouts = sorted({r["layout"] for r in rs})
        impls = [i for i in ("fused", "optimized", "unfused", "compiled", "onnxruntime")
                 if any(r["impl"] == i for r in rs)]
        w = 0.8 / len(impls)
        colors = {"fused": "tab:orange", "optimized": "tab:red", "unfused": "tab:blue",
                  "compiled": "tab:purple", "onnxruntime": "tab:green"}
        for i, impl in enumerate(impls):
            by = {r["layout"]: r for r in rs if r["impl"] == impl}
            xs = [j + w * i for j in range(len(layouts))]
            ax_t.bar(xs, [by[lay]["median_ms"] if lay in by else 0 for lay in layouts],
                     width=w, color=colors[impl], label=impl)
            ax_m.bar(xs, [(by[lay]["peak_bytes"] or 0) / 2**20 if lay in by else 0
                          for lay in layouts], width=w, color=colors[impl], label=impl)
        for ax, what in ((ax_t, "median step time (ms)"), (ax_m, "peak memory (MiB)")):
            ax.set_xticks([j + w * (len(impls) - 1) / 2 for j in range(len(layouts))], layouts)
            ax.set_ylabel(what, fontsize=8)
            ax.set_title(f"{model} {mode}, batch {batch}", fontsize=9)
            ax.legend(fontsize=7)
    return fig


def _call_overhead(data, plt):
    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(rows)
    ax.barh(range(len(names)), [rows[n]["median_us"] for n in names], color="tab:orange")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median time per call (us)")
    ax.set_title(f"per-call cost, {data.get('problem', '')}", fontsize=9)
    return fig


def plot(path: str, out: str = None) -> str:
    """Writes the plot of the benchmark JSON ``path`` to ``out`` (default: beside it, .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    fig = {"micro": _micro, "e2e": _e2e, "call_overhead": _call_overhead}[_kind(data)](data, plt)
    fig.tight_layout()
    out = out or os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def save_beside(path: str, log=print) -> None:
    """The benchmarks' last step: the plot beside their JSON, or a note why there is none."""
    try:
        log(f"wrote {plot(path)}")
    except ImportError:
        log("no plot: matplotlib is not installed (make bench installs it)")


def main(argv=None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        print(__doc__)
        return 2
    for p in paths:
        print(plot(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
