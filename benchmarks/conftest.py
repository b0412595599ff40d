"""pytest hooks of the on-demand benchmark suite (loaded only when benchmarks/ is collected).

Adds a summary after pytest-benchmark's tables: per group (mode), every median against the
fastest ``chain`` variant, the fastest ``dense`` variant, and the GB/s against the copy's.
"""

from __future__ import annotations

import pytest


def _median(bench):
    return bench.stats.median if bench.stats else None


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    benches = [b for b in getattr(session, "benchmarks", []) or []
               if _median(b) and "kind" in b.extra_info]
    if not benches:
        return
    copy = [b for b in benches if b.extra_info["kind"] == "copy"]
    copy_gbps = copy[0].extra_info["bytes"] / _median(copy[0]) / 1e9 if copy else None
    groups = {}
    for b in benches:
        if b.extra_info["kind"] != "copy":
            groups.setdefault(b.group, []).append(b)
    tr = terminalreporter
    tr.write_sep("-", "ratios (speed-up = baseline median / median; > 1: faster)")
    for group, items in groups.items():
        base = {k: min((_median(b) for b in items if b.extra_info["kind"] == k), default=None)
                for k in ("chain", "dense")}
        tr.write_line(f"{group}")
        tr.write_line(f"  {'name':<48} {'median ms':>10} {'vs chain':>9} {'vs dense':>9} "
                      f"{'GB/s':>7} {'%copy':>6}")
        for b in sorted(items, key=_median):
            t = _median(b)
            gbps = b.extra_info["bytes"] / t / 1e9
            ratio = lambda k: f"{base[k] / t:8.2f}x" if base[k] else f"{'-':>9}"  # noqa: E731
            frac = f"{100 * gbps / copy_gbps:5.0f}%" if copy_gbps else f"{'-':>6}"
            tr.write_line(f"  {b.name:<48} {t * 1e3:>10.3f} {ratio('chain')} {ratio('dense')} "
                          f"{gbps:>7.1f} {frac}")
    if copy_gbps:
        tr.write_line(f"copy x -> y: {_median(copy[0]) * 1e3:.3f} ms, {copy_gbps:.1f} GB/s")
