"""Shared pieces of the CPU benchmarks (``bench.py`` and the pytest-benchmark suite).

What lives here
---------------
* :class:`Config` / :func:`make_problem`: one benchmark problem (input, weights, output gradient,
  the composed dense weight), built from a :class:`igc_kernels.ChainSpec`.
* :class:`Case` / :func:`build_step`: every implementation that is timed, as a zero-argument
  callable running one forward (``"fwd"``) or one forward+backward (``"fwd+bwd"``) step:

  - ``fused``: ``igc_kernels.interleaved_group_conv(..., backend=B)``;
  - ``chain``: the eager unfused chain written here, ``F.conv2d(groups=G_l)`` +
    ``F.channel_shuffle`` per layer, in every variant a user could pick (oneDNN on / off x NCHW /
    channels_last); the fastest variant is the baseline ratios are quoted against;
  - ``dense``: ``F.conv2d`` with the composed ``C_L x C_0`` matrix (what IGC replaces), same four
    variants;
  - ``compiled``: ``torch.compile`` of the chain (optional, slow to compile on small CPUs);
  - ``copy``: ``y.copy_(x)`` into a preallocated tensor, the memory-traffic floor.

  ``"fwd"`` runs under ``torch.no_grad()`` (inference). ``"fwd+bwd"`` runs the forward with
  ``x`` and every weight requiring grad, then ``torch.autograd.grad(y, [x, *weights], dy)``:
  gradients w.r.t. ``x`` and all weights, returned fresh (no accumulation into ``.grad``).
  ``dy`` is preallocated in the input's memory format.
* :func:`check_correctness`: every case against the float64 reference chain, forward and
  gradients, with the test suite's rule (the rounding bound of the problem in float32; twice
  the unfused chain's error in 16-bit dtypes).
* :func:`measure`: CPU timing (warm-up, then per-run ``time.perf_counter`` until a time budget
  and a minimum run count are met; median, p20, p80).
* :func:`peak_alloc_bytes` / :func:`saved_activation_bytes`: memory of a forward+backward step.
* :func:`environment`: device, versions, commit, threads, for every recorded row.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Import the package quietly (a missing compiled extension is reported by the benchmark itself);
# from this checkout when it is not installed.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import igc_kernels as igc
    except ImportError:
        sys.path.insert(0, REPO_ROOT)
        import igc_kernels as igc
    # the correctness rule is the test suite's (one copy, in tests/igc_test_utils.py)
    sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))
    from igc_test_utils import LOW_PRECISION, rounding_failure, two_x_failure  # noqa: E402


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("nchw", "channels_last")
MODES = ("fwd", "fwd+bwd")
# What is timed per device: the CPU times the training step (forward + backward); on a GPU the
# backward is timed alone (on a forward made once outside the timed region), so that its
# bandwidth can be read against the copy's.
DEVICE_MODES = {"cpu": ("fwd", "fwd+bwd"), "cuda": ("fwd", "bwd")}


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One benchmark problem: ``x`` of shape ``(batch, channels, height, width)`` through a chain
    of ``depth`` grouped 1x1 layers of group width ``group_size`` (``channels / group_size``
    groups each), channel shuffle after every layer but the last. ``depth=None`` is the IGCV2
    depth ``ceil(log_K C)`` (:meth:`igc_kernels.ChainSpec.igcv2`)."""

    channels: int = 256
    group_size: int = 8
    depth: Optional[int] = None
    batch: int = 8
    height: int = 32
    width: int = 32
    dtype: str = "float32"

    def spec(self) -> igc.ChainSpec:
        if self.depth is None:
            return igc.ChainSpec.igcv2(self.channels, self.group_size)
        L = self.depth
        return igc.ChainSpec([self.channels] * (L + 1), [self.channels // self.group_size] * L)

    @property
    def shape(self) -> tuple:
        return (self.batch, self.channels, self.height, self.width)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        spec = self.spec()
        L = spec.num_layers
        return (f"{self.dtype} x={self.shape} chain: {L} layer{'s' if L > 1 else ''} x "
                f"{spec.groups[0]} groups of width {self.group_size}")


HEADLINE = Config()


def sweep_configs(dtypes=("float32", "bfloat16")) -> list:
    """A small sweep around the headline config, one axis at a time, for every dtype:
    channels (IGCV2 depth), group width at C=256 (IGCV2 depth), depth at C=256, K=8."""
    shapes = []
    for C in (64, 128, 256, 512):
        shapes.append(dict(channels=C, group_size=8))
    for K in (4, 16):
        shapes.append(dict(channels=256, group_size=K))
    for L in (1, 2, 4, 6):
        shapes.append(dict(channels=256, group_size=8, depth=L))
    return [Config(dtype=dt, **s) for dt in dtypes for s in shapes]


def gpu_target_configs(batch=64, hw=56) -> list:
    """The GPU targets: bfloat16, x = (64, C, 56, 56) (200704 positions, far past the L2
    cache), C in {256, 512, 1024}, group width K in {8, 16, 32}, depth L in {2, 3, 4}."""
    return [Config(channels=C, group_size=K, depth=L, batch=batch, height=hw, width=hw,
                   dtype="bfloat16")
            for C in (256, 512, 1024) for K in (8, 16, 32) for L in (2, 3, 4)]


def gpu_sweep_configs(dtypes=("float32", "float16", "bfloat16"), batch=64, hw=56) -> list:
    """float32 / float16 / bfloat16 over C in {64 .. 2048} (K = 8, L = 3), K in {4, 16, 32}
    (C = 512, L = 3) and L in {1, 2, 4} (C = 512, K = 8)."""
    shapes = [dict(channels=C, group_size=8, depth=3) for C in (64, 128, 256, 512, 1024, 2048)]
    shapes += [dict(channels=512, group_size=K, depth=3) for K in (4, 16, 32)]
    shapes += [dict(channels=512, group_size=8, depth=L) for L in (1, 2, 4)]
    return [Config(batch=batch, height=hw, width=hw, dtype=dt, **s)
            for dt in dtypes for s in shapes]


TINY = Config(channels=32, group_size=4, depth=2, batch=2, height=5, width=5)  # smoke runs


@dataclass
class Problem:
    config: Config
    spec: igc.ChainSpec
    x: torch.Tensor  # (N, C_0, H, W), contiguous (NCHW)
    weights: list  # L leaf tensors (C_l, n_l, 1, 1), the conv layout
    grad_out: torch.Tensor  # (N, C_L, H, W), contiguous
    dense_weight: torch.Tensor  # (C_L, C_0, 1, 1): the composed chain, composed in float64
    groups: tuple
    perms: list  # per layer: ("shuffle", G) | ("index", LongTensor) | None
    compiled_chain: Optional[Callable] = None  # built on first use (--compile)

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def act_bytes(self, channels: int) -> int:
        c = self.config
        return c.batch * channels * c.height * c.width * self.x.element_size()

    def io_bytes(self, mode: str) -> int:
        """Least activation traffic of the step (what the fused operator moves; weights are
        negligible): forward reads x and writes y; forward+backward also reads x and dy and
        writes dx in the backward (intermediates recomputed, never stored)."""
        bx, by = self.act_bytes(self.spec.in_channels), self.act_bytes(self.spec.out_channels)
        return {"fwd": bx + by, "bwd": 2 * bx + by, "fwd+bwd": 3 * bx + 2 * by}[mode]


def make_problem(config: Config, seed: int = 0) -> Problem:
    """Random input N(0, 1), weights N(0, 1/n_l) (activations stay O(1) through the chain)."""
    spec = config.spec()
    gen = torch.Generator().manual_seed(seed)
    dtype = config.torch_dtype
    N, C, H, W = config.shape
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    weights64 = [torch.randn(c, k, generator=gen, dtype=torch.float64) / math.sqrt(k)
                 for c, k in spec.weight_shapes()]
    dy = torch.randn(N, spec.out_channels, H, W, generator=gen, dtype=torch.float64)
    perms = []
    for l, p in enumerate(spec.permutations):
        G, C_l = spec.groups[l], spec.channels[l + 1]
        if p is None or (isinstance(p, str) and (G <= 1 or G >= C_l)):
            perms.append(None)  # identity (a shuffle with 1 group or 1 channel per group)
        elif isinstance(p, str):
            perms.append(("shuffle", G))
        else:
            perms.append(("index", p.to(torch.int64)))
    dense = spec.dense_matrix(weights64)
    return Problem(
        config=config, spec=spec, x=x.to(dtype),
        weights=[w.to(dtype).reshape(*w.shape, 1, 1) for w in weights64],
        grad_out=dy.to(dtype),
        dense_weight=dense.to(dtype).reshape(*dense.shape, 1, 1),
        groups=tuple(spec.groups), perms=perms)


def problem_on(config: Config, device: str) -> Problem:
    """:func:`make_problem` with every tensor on ``device``."""
    p = make_problem(config)
    if device == "cpu":
        return p
    p.x = p.x.to(device)
    p.weights = [w.to(device) for w in p.weights]
    p.grad_out = p.grad_out.to(device)
    p.dense_weight = p.dense_weight.to(device)
    p.perms = [None if q is None else (q[0], q[1].to(device) if q[0] == "index" else q[1])
               for q in p.perms]
    return p


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A fresh copy of ``t`` in ``layout`` (never ``t`` itself: callers set requires_grad)."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return t.detach().clone(memory_format=fmt)


# --------------------------------------------------------------------------------------------
# The implementations that are timed
# --------------------------------------------------------------------------------------------
def eager_chain(x: torch.Tensor, weights, groups, perms) -> torch.Tensor:
    """The unfused chain as a user writes it: one grouped conv and one shuffle per layer."""
    h = x
    for w, g, p in zip(weights, groups, perms):
        h = F.conv2d(h, w, groups=g)
        if p is not None:
            h = F.channel_shuffle(h, p[1]) if p[0] == "shuffle" else h.index_select(1, p[1])
    return h


@dataclass(frozen=True)
class Case:
    """One timed implementation. ``mkldnn`` is None where the oneDNN switch does not apply."""

    kind: str  # "fused" | "chain" | "dense" | "compiled" | "copy"
    layout: str  # "nchw" | "channels_last"
    mkldnn: Optional[bool] = None
    backend: str = "torch"  # the igc backend for "fused"

    @property
    def label(self) -> str:
        name = f"fused[{self.backend}]" if self.kind == "fused" else self.kind
        if self.kind == "copy":
            return name
        onednn = "" if self.mkldnn is None else (" oneDNN" if self.mkldnn else " no-oneDNN")
        return f"{name} {self.layout}{onednn}"

    @property
    def id(self) -> str:
        """A short identifier (pytest ids, JSON)."""
        return self.label.replace("[", "-").replace("]", "").replace(" ", "-")


def default_cases(backends, compile_chain: bool = False, device: str = "cpu",
                  compile_layouts=None) -> list:
    """Every case of one config (the one case table of bench.py and the pytest-benchmark
    suite): the fused op per backend and layout; the chain and the dense composed conv in every
    layout (on the CPU also with oneDNN on and off); the compiled chain (``compile_chain``: both
    layouts, or ``compile_layouts``); the copy floor."""
    cases = [Case("fused", lay, None, b) for b in backends for lay in LAYOUTS]
    onednn = (True, False) if device == "cpu" else (None,)
    for kind in ("chain", "dense"):
        cases += [Case(kind, lay, mk) for lay in LAYOUTS for mk in onednn]
    if compile_layouts is None:
        compile_layouts = LAYOUTS if compile_chain else ()
    cases += [Case("compiled", lay) for lay in compile_layouts]
    cases.append(Case("copy", "nchw"))
    return cases


def _compiled_chain(problem: Problem):
    """``torch.compile`` of :func:`eager_chain` for this problem, built once (both layouts
    and both modes share it; dynamo specialises on what differs)."""
    if problem.compiled_chain is None:
        groups, perms = problem.groups, problem.perms
        problem.compiled_chain = torch.compile(
            lambda x, *ws: eager_chain(x, ws, groups, perms), dynamic=False)
    return problem.compiled_chain


def forward_fn(case: Case, problem: Problem) -> Callable:
    """``f(x, params) -> y`` for ``case`` (params: the chain's weights, or the dense weight)."""
    if case.kind == "fused":
        groups, backend = list(problem.groups), case.backend
        return lambda x, ws: igc.interleaved_group_conv(x, ws, groups, backend=backend)
    if case.kind == "chain":
        groups, perms = problem.groups, problem.perms
        return lambda x, ws: eager_chain(x, ws, groups, perms)
    if case.kind == "compiled":
        fn = _compiled_chain(problem)
        return lambda x, ws: fn(x, *ws)
    if case.kind == "dense":
        return lambda x, ws: F.conv2d(x, ws[0])
    raise ValueError(f"no forward for case kind {case.kind!r}")


def build_step(case: Case, problem: Problem, mode: str) -> Callable[[], object]:
    """A zero-argument callable running one ``mode`` step of ``case``; it returns ``y`` (fwd) or
    ``(y, grads)`` (fwd+bwd), grads w.r.t. ``[x, *params]``. Inputs are prepared once here."""
    if mode not in MODES + ("bwd",):
        raise ValueError(f"mode must be one of {MODES + ('bwd',)}, got {mode!r}")
    if case.kind == "copy":
        src = problem.x.detach()
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    if mode == "bwd":  # the backward alone, of a forward made here once
        x = to_layout(problem.x, case.layout).requires_grad_(True)
        src_params = [problem.dense_weight] if case.kind == "dense" else problem.weights
        params = [w.detach().clone().requires_grad_(True) for w in src_params]
        dy = to_layout(problem.grad_out, case.layout)
        y = forward_fn(case, problem)(x, params)
        inputs = [x, *params]
        return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)

    train = mode == "fwd+bwd"
    x = to_layout(problem.x, case.layout).requires_grad_(train)
    src_params = [problem.dense_weight] if case.kind == "dense" else problem.weights
    params = [w.detach().clone().requires_grad_(train) for w in src_params]
    dy = to_layout(problem.grad_out, case.layout)
    fwd = forward_fn(case, problem)
    inputs = [x, *params]

    if train:
        def step():
            y = fwd(x, params)
            return y, torch.autograd.grad(y, inputs, dy)
    else:
        def step():
            with torch.no_grad():
                return fwd(x, params)

    if case.mkldnn is None:
        return step

    enabled = case.mkldnn

    def step_with_flag():
        # The flag is read when each convolution (forward and backward) picks its kernel.
        with onednn_enabled(enabled):
            return step()

    return step_with_flag


@contextlib.contextmanager
def onednn_enabled(enabled: bool):
    """``torch.backends.mkldnn.flags(enabled=...)`` minus its side effects: ``flags()`` also
    sets ``allow_tf32=True`` and ``fp32_precision="none"`` for the scope; this switches only
    whether convolutions may use oneDNN, which is the choice a user makes."""
    prev = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = prev


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------
class CorrectnessError(AssertionError):
    pass


# Baselines (chain variants, dense) only need to compute the same function: a loose bound on
# max |err| / max |ref| per dtype. The fused operator gets the strict rule of _fused_bound.
BASELINE_RTOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}


def _names(problem: Problem, kind: str) -> list:
    if kind == "dense":
        return ["y", "dx"]  # the dense weight's gradient is not comparable with the chain's
    return ["y", "dx"] + [f"dW{l}" for l in range(1, problem.spec.num_layers + 1)]


def _flatten(out) -> list:
    y, grads = out
    return [y.detach(), *grads]


def reference_float64(problem: Problem, absolute: bool = False) -> list:
    """[y, dx, dW1..dWL] of the float64 reference chain (igc_kernels.reference).

    ``absolute=True`` runs it on ``|x|``, ``|W_l|``, ``|dy|``: every element's ``sum |terms|``,
    the magnitude that rounding-error bounds scale with."""
    f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    x = f(problem.x).requires_grad_()
    ws = [f(w).requires_grad_() for w in problem.weights]
    y = igc.reference.interleaved_group_conv(x, ws, list(problem.groups))
    return [y.detach(), *torch.autograd.grad(y, [x, *ws], f(problem.grad_out))]


def accumulation_lengths(problem: Problem) -> tuple:
    """``(k_act, k_wgrad)``: number of rounded operations behind an element of y / dx, and of a
    weight gradient: ``sum n_l + sum m_l + 2 L`` (forward and backward chains), plus the
    reduction over all ``N H W`` positions for weight gradients (as in tests/igc_test_utils)."""
    spec, c = problem.spec, problem.config
    k = sum(n + m for m, n in spec.group_shapes()) + 2 * spec.num_layers
    return k, k + c.batch * c.height * c.width


def reference_same_dtype(problem: Problem) -> list:
    """[y, dx, dW1..dWL] of the unfused reference chain in the problem's dtype (NCHW)."""
    x = problem.x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in problem.weights]
    y = igc.reference.interleaved_group_conv(x, ws, list(problem.groups))
    return [y.detach(), *torch.autograd.grad(y, [x, *ws], problem.grad_out)]


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max())


def _mismatch_report(name: str, got: torch.Tensor, ref: torch.Tensor, bound: float) -> str:
    err = (got.double() - ref).abs()
    bad = torch.nonzero(err > bound)
    first = tuple(int(i) for i in bad[0]) if len(bad) else ()
    return (f"{name}: max |err| = {float(err.max()):.3e} (bound {bound:.3e}), mean |err| = "
            f"{float(err.mean()):.3e}, first mismatch at index {first}: got "
            f"{float(got[first]):.6g}, float64 reference {float(ref[first]):.6g}")


def check_correctness(problem: Problem, cases, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every case's forward+backward once and compare with the float64 reference.

    Fused operator, for the output and every gradient: the package's one correctness rule
    (``tests/igc_test_utils``, shared with the test suite): float32 elementwise within the
    rounding bound ``2 k u32 magnitude`` (``k`` from :func:`accumulation_lengths`, magnitude =
    the chain on absolute values), bfloat16 / float16 within twice the max error of the unfused
    chain in the same dtype. Baselines: ``max|err| <= BASELINE_RTOL[dtype] * max|ref|``.
    Returns {case label: {tensor name: max abs error}}; raises CorrectnessError on failure.
    """
    ref = reference_float64(problem)
    unfused = reference_same_dtype(problem)
    mags = reference_float64(problem, absolute=True)
    k_act, k_wgrad = accumulation_lengths(problem)
    ks = [k_act, k_act] + [k_wgrad] * problem.spec.num_layers
    errors, failures = {}, []
    for case in cases:
        if case.kind == "copy":
            continue
        got = _flatten(build_step(case, problem, "fwd+bwd")())
        # the forward alone (no_grad path) must agree with the forward of the training step
        y_inf = build_step(case, problem, "fwd")()
        got_y_inf = y_inf.detach()
        names = _names(problem, case.kind)
        errors[case.label] = {}
        for i, name in enumerate(names + ["y (no_grad)"]):
            j = 0 if name == "y (no_grad)" else i
            g = got_y_inf if name == "y (no_grad)" else got[i]
            r = ref[j]
            if tuple(g.shape) != tuple(r.shape):
                failures.append(f"{case.label}: {name} has shape {tuple(g.shape)}, "
                                f"expected {tuple(r.shape)}")
                continue
            e = _max_err(g, r)
            errors[case.label][name] = e
            if case.kind == "fused":
                if problem.dtype in LOW_PRECISION:
                    msg = two_x_failure(name, g, r, unfused[j])
                else:
                    msg = rounding_failure(name, g, r, mags[j], ks[j], problem.dtype)
            else:
                bound = BASELINE_RTOL[problem.dtype] * float(r.abs().max())
                msg = None if e <= bound else _mismatch_report(name, g, r, bound)
            if msg:
                failures.append(f"{case.label}: {msg}")
        log(f"check {case.label:<34} max|err| " + " ".join(
            f"{k}={v:.1e}" for k, v in errors[case.label].items()))
    if failures:
        raise CorrectnessError(f"{problem.config.describe()}: wrong results, not timing them:\n  "
                               + "\n  ".join(failures))
    return errors


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
@dataclass
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    mean_ms: float
    runs: int
    times_ms: list = field(repr=False, default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "times_ms"}


def _quantile(sorted_v: list, q: float) -> float:
    pos = q * (len(sorted_v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_v[lo] + (sorted_v[hi] - sorted_v[lo]) * (pos - lo)


def stats_of(times_ms: list) -> Stats:
    """The statistics of run times in ms (in the order measured): median, p20, p80, min, mean."""
    s = sorted(times_ms)
    return Stats(median_ms=_quantile(s, 0.5), p20_ms=_quantile(s, 0.2), p80_ms=_quantile(s, 0.8),
                 min_ms=s[0], mean_ms=sum(s) / len(s), runs=len(s), times_ms=list(times_ms))


def measure(fn: Callable, min_time: float = 0.5, min_runs: int = 10, warmup_time: float = 0.1,
            warmup_runs: int = 2, max_runs: int = 100_000) -> Stats:
    """Time ``fn`` on the CPU: warm-up (at least ``warmup_runs`` runs and ``warmup_time`` s),
    then time every run with ``time.perf_counter`` until ``min_time`` s have been measured and
    at least ``min_runs`` runs were made. The median is the figure reported; p20/p80 its spread.
    Results are dropped right away so every run allocates what a real call allocates."""
    t_end = time.perf_counter() + warmup_time
    n = 0
    while n < warmup_runs or time.perf_counter() < t_end:
        fn()
        n += 1
    times = []
    total = 0.0
    while (total < min_time or len(times) < min_runs) and len(times) < max_runs:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt * 1e3)
        total += dt
    return stats_of(times)


class CPUTimer:
    """:func:`measure` with the given budget (``min_time``, ``min_runs``, warm-up)."""

    def __init__(self, **timing):
        self.timing = timing

    def __call__(self, fn: Callable) -> Stats:
        return measure(fn, **self.timing)


class CUDATimer:
    """``triton.testing.do_bench``: CUDA events, the L2 cache flushed before every run; median,
    p20, p80."""

    def __init__(self, quick: bool = False):
        self.warmup, self.rep = (10, 30) if quick else (25, 100)

    def __call__(self, fn: Callable) -> Stats:
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep,
                                     quantiles=[0.5, 0.2, 0.8])
        med, p20, p80 = (float(v) for v in ms)
        return Stats(median_ms=med, p20_ms=p20, p80_ms=p80, min_ms=p20, mean_ms=med, runs=0)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
def peak_step_bytes(case: Case, problem: Problem, device: str) -> Optional[int]:
    """Peak memory of one forward+backward step above what was live before it: the CPU
    allocator's profile (:func:`peak_alloc_bytes`) or ``torch.cuda.max_memory_allocated``."""
    step = build_step(case, problem, "fwd+bwd")
    if device != "cuda":
        return peak_alloc_bytes(step)
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak

def peak_alloc_bytes(step: Callable) -> Optional[int]:
    """Peak bytes allocated during one call of ``step`` above what was live when it started.

    Runs ``step`` under ``torch.profiler`` with ``profile_memory=True``, which records every
    allocation and free made through PyTorch's CPU allocator (sizes signed, time-stamped);
    the peak of their running sum in time order is the answer. It counts outputs, saved
    intermediates, gradients and workspaces that ATen allocates; memory a library allocates
    with its own malloc (e.g. a oneDNN scratchpad) is not seen. Returns None if the profiler's
    event tree is unavailable in this torch version.
    """
    step()  # warm: first-call allocations (caches, oneDNN primitives) are not part of a step
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with _c_stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                           profile_memory=True) as prof:
            step()
        allocs = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if node.typed[0] == _EventType.Allocation:
                allocs.append((node.start_time_ns, node.typed[1].alloc_size))
            stack.extend(node.children)
    except Exception:  # private profiler API moved: report "not measured", never a wrong number
        return None
    live = peak = 0
    for _, size in sorted(allocs, key=lambda a: a[0]):
        live += size
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _c_stderr_silenced():
    """Silence file descriptor 2 (libkineto prints two log lines per profiling session)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def saved_activation_bytes(case: Case, problem: Problem) -> int:
    """Bytes autograd keeps alive between forward and backward, beyond the inputs themselves.

    Counts, with ``torch.autograd.graph.saved_tensors_hooks``, the distinct storages of every
    tensor saved for backward by the forward of ``case`` (both C++ and Python autograd nodes
    are seen), minus the storages of ``x`` and the parameters, which the caller holds anyway.
    """
    x = to_layout(problem.x, case.layout).requires_grad_()
    src = [problem.dense_weight] if case.kind == "dense" else problem.weights
    params = [w.detach().clone().requires_grad_() for w in src]
    inputs = {t.untyped_storage().data_ptr() for t in [x, *params]}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages.setdefault(st.data_ptr(), st.nbytes())
        return t

    ctx = onednn_enabled(case.mkldnn) if case.mkldnn is not None else contextlib.nullcontext()
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = forward_fn(case, problem)(x, params)
    del y
    return sum(n for ptr, n in storages.items() if ptr not in inputs)


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_caches() -> dict:
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            if not idx.startswith("index"):
                continue
            rd = lambda f: open(os.path.join(base, idx, f)).read().strip()  # noqa: E731
            kind = rd("type")
            if kind == "Instruction":
                continue
            out[f"L{rd('level')}"] = rd("size")
    except OSError:
        pass
    return out


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"git_commit": commit, "git_dirty": dirty}


def environment() -> dict:
    """What every recorded row carries: device, versions, commit, threads."""
    try:
        import triton  # noqa: F401
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    from igc_kernels import _loader

    return {
        "device": cpu_model(),
        "device_type": "cpu",
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_caches": cpu_caches(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "igc_kernels": igc.__version__,
        "igc_extension": _loader.ext_loaded(),
        "mkldnn_available": torch.backends.mkldnn.is_available(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        **git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def device_environment(device: str) -> dict:
    """:func:`environment`, with the GPU's name, SM count, memory and cuDNN version on CUDA."""
    env = environment()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), device_type="cuda",
                   sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cudnn=torch.backends.cudnn.version())
    return env


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"


def default_backends() -> list:
    """The fused backends usable on CPU; the reference only when nothing fused is built."""
    fused = [b for b in igc.available_backends("cpu") if b != "reference"]
    return fused or ["reference"]
