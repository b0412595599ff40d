"""Shared helpers of the test suite: problem builders, layouts, the float64 oracle, tolerances.

Tolerances come from the problem, not from a run. For a chain computed in a floating point type
with unit roundoff ``u`` (half the machine epsilon), every output and gradient element is a sum
of products; the classic bound for a sum of ``k`` rounded terms is ``|error| <= gamma_k *
sum|terms|`` with ``gamma_k ~ k u``, and through a product of ``L`` layers the relative errors
add (``gamma_{n_1} + ... + gamma_{n_L}``). ``sum|terms|`` for every element is obtained exactly by
running the same chain in float64 on ``|x|``, ``|W_l|``, ``|b_l|`` and ``|grad_y|``: the
*magnitude* of that element. So an implementation that accumulates in a type with unit roundoff
``u`` must satisfy, elementwise,

    |result - exact| <= k * u * magnitude,   k = sum_l n_l + sum_l m_l + 2 L + positions

(``n_l``/``m_l``: inputs/outputs per group, summed over forward and backward chains; ``2 L`` for
the multiply and bias roundings per layer; ``positions``: the reduction over positions of the
weight and bias gradients). :func:`assert_within_rounding` checks that bound, with a safety
factor for the oracle's own error.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import igc_kernels as igc
from igc_kernels import _loader
from igc_kernels._chain import normalize, out_is_channels_last, empty_like_layout
from igc_kernels._ops import op_biases

# The backend under test for the fused kernel. Always "cpu" in CI, where the extension is built;
# a test that needs it FAILS (BackendUnavailableError / pytest.fail) when igc_kernels._C is
# missing, it is never skipped. IGC_TEST_FUSED_BACKEND=reference runs the same assertions
# against the reference chain: useful only to check the tests themselves without a build.
FUSED = os.environ.get("IGC_TEST_FUSED_BACKEND", "cpu")


def require_extension() -> None:
    """Fail (never skip) when the compiled extension is missing: CI always builds it."""
    if not _loader.ext_loaded():
        pytest.fail(
            "igc_kernels._C is not built or failed to import: "
            + _loader.ext_missing_reason()
            + ". Build it with `pip install --no-build-isolation -e .`",
            pytrace=False,
        )


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One call of the operator: ``x`` and the chain's arguments as a user passes them."""

    x: torch.Tensor
    weights: list
    groups: list
    permutations: Optional[list] = None
    biases: Optional[list] = None
    channels: tuple = field(default=())
    input_index: Optional[torch.Tensor] = None  # gathers x's channels before layer 1

    def leaves(self) -> list:
        """``x``, every weight and every (present) bias: what gradients are checked for."""
        out = [self.x, *self.weights]
        if self.biases is not None:
            out += [b for b in self.biases if b is not None]
        return out

    def leaf_names(self) -> list:
        names = ["x"] + [f"weight[{l + 1}]" for l in range(len(self.weights))]
        if self.biases is not None:
            names += [f"bias[{l + 1}]" for l, b in enumerate(self.biases) if b is not None]
        return names

    def call(self, backend: str, x=None, weights=None, biases=None):
        return igc.interleaved_group_conv(
            self.x if x is None else x,
            self.weights if weights is None else weights,
            self.groups, self.permutations,
            self.biases if biases is None else biases, input_index=self.input_index,
            backend=backend)

    def num_positions(self) -> int:
        return int(self.x.numel() // max(1, self.x.shape[1])) if self.x.numel() else 0

    def reduction_length(self) -> int:
        """``k`` of the module docstring: the longest chain of roundings into any result."""
        k = 0
        for l, g in enumerate(self.groups):
            k += self.channels[l] // g + self.channels[l + 1] // g + 2
        if self.input_index is not None and self.input_index.numel():
            k += int(torch.bincount(self.input_index).max())  # dx sums over repeated entries
        return k + self.num_positions()

    def to(self, dtype, requires_grad=True) -> "Problem":
        """A copy with every floating tensor cast to ``dtype`` (strides of ``x`` preserved)."""

        def cast(t):
            if t is None:
                return None
            c = _clone_preserving_strides(t, dtype)
            return c.requires_grad_(requires_grad)

        return Problem(
            cast(self.x), [cast(w) for w in self.weights], list(self.groups), self.permutations,
            None if self.biases is None else [cast(b) for b in self.biases], self.channels,
            self.input_index)


def _clone_preserving_strides(t: torch.Tensor, dtype) -> torch.Tensor:
    """A copy in ``dtype``; dense tensors keep their strides, views get a dense stride order."""
    out = torch.empty_like(t.detach(), dtype=dtype, memory_format=torch.preserve_format)
    with torch.no_grad():
        out.copy_(t.detach())
    return out


def random_weights(channels, groups, dtype, gen, conv_layout=False, noncontiguous=None):
    """Weights ``U(-1/sqrt(n_l), 1/sqrt(n_l))`` (nn.Conv2d's scale, keeps activations O(1))."""
    ws = []
    for l, g in enumerate(groups):
        c, n = channels[l + 1], channels[l] // g
        bound = 1.0 / math.sqrt(n)
        nc = noncontiguous[l] if noncontiguous is not None else False
        if nc:  # a transposed view: (C_l, n_l) with strides (1, C_l)
            w = (torch.rand(n, c, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype).t()
        else:
            w = (torch.rand(c, n, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)
        if conv_layout:
            w = w.reshape(c, n, 1, 1) if not nc else w.unsqueeze(-1).unsqueeze(-1)
        ws.append(w.requires_grad_())
    return ws


def random_biases(channels, which, dtype, gen):
    if which is None:
        return None
    out = []
    for l, has in enumerate(which):
        if has:
            out.append((torch.rand(channels[l + 1], generator=gen, dtype=torch.float64) - 0.5)
                       .to(dtype).requires_grad_())
        else:
            out.append(None)
    return out


def random_permutation(n, gen) -> torch.Tensor:
    return torch.randperm(n, generator=gen)


# ---------------------------------------------------------------------------------------------
# Layouts of x (and of grad_y)
# ---------------------------------------------------------------------------------------------


def make_tensor(shape, layout, dtype, gen, *, scale=1.0) -> torch.Tensor:
    """A random tensor of ``shape`` = ``(N, C, *spatial)`` laid out as ``layout``.

    * ``contiguous``: NC(D)HW.
    * ``channels_last``: C innermost (``channels_last`` / ``channels_last_3d`` for 4-D / 5-D,
      the same stride order for 3-D).
    * ``sliced``: a view into a larger contiguous tensor with a storage offset, a step of 2 in
      the last spatial dim and padding in every dim.
    * ``sliced_channels_last``: the same view of a channels-last tensor.
    * ``permuted``: spatial dims stored in reverse order (C outermost after N), an unusual but
      valid stride order.
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)

    def fill(t):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64).mul_(scale))
        return t

    if layout == "contiguous" or nd == 2 and layout in ("channels_last", "permuted"):
        return fill(torch.empty(shape, dtype=dtype))
    if layout == "channels_last":
        return fill(torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype).movedim(-1, 1))
    if layout == "permuted":
        perm = [0, 1] + list(range(nd - 1, 1, -1))
        base = torch.empty([shape[p] for p in perm], dtype=dtype)
        return fill(base.permute(*perm))
    if layout in ("sliced", "sliced_channels_last"):
        # pad every dim by 1 in front (storage offset) and 2 behind; step 2 in the last dim
        big = [s + 3 for s in shape]
        big[-1] = 2 * shape[-1] + 3
        if layout == "sliced_channels_last" and nd >= 3:
            base = torch.empty((big[0], *big[2:], big[1]), dtype=dtype).movedim(-1, 1)
        else:
            base = torch.empty(big, dtype=dtype)
        idx = tuple(slice(1, 1 + s) for s in shape[:-1]) + (slice(1, 1 + 2 * shape[-1], 2),)
        view = base[idx]
        assert view.shape == shape
        return fill(view)
    raise ValueError(layout)


def expanded_like(shape, dtype, gen) -> torch.Tensor:
    """A grad_output with stride 0 in every dim but the channels: ``randn(1, C, 1..).expand``."""
    small = torch.randn((1, shape[1]) + (1,) * (len(shape) - 2), generator=gen,
                        dtype=torch.float64).to(dtype)
    return small.expand(*shape)


def expected_channels_last(x: torch.Tensor) -> bool:
    return out_is_channels_last(x)


def assert_layout_like_contract(y: torch.Tensor, x: torch.Tensor, what="output") -> None:
    """``y`` has the memory format the package promises for inputs shaped like ``x``:
    channels-last in, channels-last out; anything else, contiguous out. The significant strides
    (dims of size > 1) must equal those of the fake kernel's allocation."""
    if expected_channels_last(x):
        assert y.movedim(1, -1).is_contiguous(), (
            f"{what}: expected channels-last strides for x of shape {tuple(x.shape)} strides "
            f"{x.stride()}, got strides {y.stride()}")
    else:
        assert y.is_contiguous(), (
            f"{what}: expected a contiguous result for x of shape {tuple(x.shape)} strides "
            f"{x.stride()}, got strides {y.stride()}")
    fake = empty_like_layout(x, y.shape[1])
    for d in range(y.dim()):
        if y.shape[d] > 1:
            assert y.stride(d) == fake.stride(d), (
                f"{what}: stride of dim {d} is {y.stride(d)}, the fake kernel gives "
                f"{fake.stride(d)} (strides {y.stride()} vs {fake.stride()})")


# Kinds of x the layout tests sweep: name -> (number of spatial dims, layout of make_tensor).
X_KINDS = {
    "tokens": (0, "contiguous"),
    "tokens_sliced": (0, "sliced"),
    "ncl": (1, "contiguous"),
    "ncl_channels_last": (1, "channels_last"),
    "nchw": (2, "contiguous"),
    "nchw_channels_last": (2, "channels_last"),
    "nchw_sliced": (2, "sliced"),
    "nchw_sliced_channels_last": (2, "sliced_channels_last"),
    "nchw_permuted": (2, "permuted"),
    "ncdhw": (3, "contiguous"),
    "ncdhw_channels_last": (3, "channels_last"),
    "ncdhw_sliced": (3, "sliced"),
}


def to_device(t, device, requires_grad=None):
    """``t`` on ``device`` with the same sizes, strides and storage offset (stride-0 dims stay
    expanded); non-tensors are returned as they are."""
    if t is None or not isinstance(t, torch.Tensor):
        return t
    t = t.detach()
    if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        idx = tuple(slice(0, 1) if s == 0 else slice(None) for s in t.stride())
        out = to_device(t[idx].contiguous(), device).expand(t.shape)
    else:
        numel = t.untyped_storage().nbytes() // t.element_size()
        base = torch.zeros(numel, dtype=t.dtype, device=device)
        out = base.as_strided(t.shape, t.stride(), t.storage_offset())
        out.copy_(t)
    if requires_grad:
        out.requires_grad_()
    return out


def problem_on(p: "Problem", device) -> "Problem":
    """``p`` with every tensor on ``device`` (layouts kept; x, weights and biases as leaves)."""
    perms = None if p.permutations is None else [
        to_device(q, device) if isinstance(q, torch.Tensor) else q for q in p.permutations]
    biases = None if p.biases is None else [to_device(b, device, True) for b in p.biases]
    return Problem(to_device(p.x, device, True), [to_device(w, device, True) for w in p.weights],
                   list(p.groups), perms, biases, p.channels, to_device(p.input_index, device))


# ---------------------------------------------------------------------------------------------
# Oracle and comparisons
# ---------------------------------------------------------------------------------------------
def forward_and_grads(fn, leaves, grad_y=None):
    """``y = fn()`` and the gradients of ``<y, grad_y>`` w.r.t. ``leaves`` (None: no grads)."""
    y = fn()
    if grad_y is None:
        return y, None
    grads = torch.autograd.grad(y, leaves, grad_y, allow_unused=True)
    return y, list(grads)


def oracle(problem: Problem, grad_y=None, backend="reference"):
    """float64 output and gradients computed by the unfused reference chain."""
    p64 = problem.to(torch.float64)
    gy = None if grad_y is None else grad_y.to(torch.float64)
    return forward_and_grads(lambda: p64.call(backend), p64.leaves(), gy)


def magnitudes(problem: Problem, grad_y=None):
    """``sum|terms|`` of every output and gradient element (see the module docstring)."""
    pa = problem.to(torch.float64)
    with torch.no_grad():
        for t in pa.leaves():
            t.abs_()
    gy = None if grad_y is None else grad_y.to(torch.float64).abs()
    return forward_and_grads(lambda: pa.call("reference"), pa.leaves(), gy)


LOW_PRECISION = (torch.float16, torch.bfloat16)


def rounding_failure(name, actual, expected, magnitude, k, dtype, *, safety=2.0):
    """``None`` if ``|actual - expected| <= safety * k * u(dtype) * magnitude`` elementwise, else
    a message with the max / mean error and the first failing index."""
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.dtype != dtype:
        return f"{name}: dtype {actual.dtype}, expected {dtype}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    tol = safety * k * unit_roundoff(dtype) * magnitude.detach().to(torch.float64)
    err = (a - e).abs()
    bad = ~(err <= tol)  # also catches NaN
    if not bool(bad.any()):
        return None
    first = tuple(int(i) for i in torch.nonzero(bad)[0])
    return (f"{name}: {int(bad.sum())} of {err.numel()} elements exceed the rounding bound "
            f"{safety} * k={k} * u({dtype}) * magnitude; max error {float(err.max()):.3e}, "
            f"mean error {float(err.mean()):.3e}; first at index {first}: got "
            f"{float(a[first]):.17g}, expected {float(e[first]):.17g}, bound "
            f"{float(tol[first]):.3e}")


def two_x_failure(name, actual, expected, unfused):
    """``None`` if ``actual``'s max error against the float64 ``expected`` is at most twice the
    max error of ``unfused`` (the unfused chain in the same dtype; flash-attention's rule) and
    ``actual`` is finite, else a message. No absolute floor: the kernels accumulate in float32
    and round once, the unfused chain rounds after every layer too, so its max error is at
    least the final rounding the kernel pays."""
    if actual.shape != expected.shape:
        return f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    e = expected.detach().to(torch.float64)
    err_k = (actual.detach().to(torch.float64) - e).abs()
    err_r = (unfused.detach().to(torch.float64) - e).abs()
    limit = 2 * float(err_r.max()) if err_r.numel() else 0.0
    bad = ~(err_k <= limit)
    if not bool(bad.any()):
        return None
    first = tuple(int(i) for i in torch.nonzero(bad)[0])
    return (f"{name}: max error {float(err_k.max()):.4e} (mean {float(err_k.mean()):.4e}) > "
            f"2 x the unfused chain's max error {float(err_r.max()):.4e} (mean "
            f"{float(err_r.mean()):.4e}); first at index {first}")


def assert_within_rounding(actual, expected, magnitude, k, dtype, *, safety=2.0, name="result"):
    """``|actual - expected| <= safety * k * u(dtype) * magnitude`` elementwise."""
    msg = rounding_failure(name, actual, expected, magnitude, k, dtype, safety=safety)
    if msg:
        raise AssertionError(msg)


def check_against_oracle(problem: Problem, backend: str, grad_y, *, safety=2.0):
    """The conformance rule of every backend: run ``problem`` (on its device) through
    ``backend`` and compare the output and every gradient with the float64 oracle, float32 /
    float64 within the rounding bound of the problem (elementwise), float16 / bfloat16 within
    twice the unfused chain's error in the same dtype; dtypes, shapes, the layout contract of
    the output and of ``grad x``. Returns ``(y, grads)``."""
    dtype = problem.x.dtype
    y, grads = forward_and_grads(lambda: problem.call(backend), problem.leaves(), grad_y)
    assert y.dtype == dtype, f"output dtype {y.dtype}, expected {dtype}"
    assert_layout_like_contract(y, problem.x)
    y64, grads64 = oracle(problem, grad_y)
    names = ["output"]
    results, expected = [y], [y64]
    if grads is not None:
        for name, g, leaf in zip(problem.leaf_names(), grads, problem.leaves()):
            assert g is not None, f"no gradient for {name}"
            assert g.shape == leaf.shape, f"grad of {name}: shape {tuple(g.shape)} != {tuple(leaf.shape)}"
        if backend != "reference":  # plain PyTorch's gradient layouts are not ours to promise
            assert_layout_like_contract(grads[0], problem.x, what="grad of x")
        names += [f"grad of {n}" for n in problem.leaf_names()]
        results += grads
        expected += grads64
    if dtype in LOW_PRECISION:
        yr, gr = forward_and_grads(lambda: problem.call("reference"), problem.leaves(), grad_y)
        unfused = [yr] + (gr if grads is not None else [])
        fails = [two_x_failure(n, r, e, u) for n, r, e, u in zip(names, results, expected,
                                                                   unfused)]
        fails += [f"{n}: dtype {r.dtype}" for n, r in zip(names, results) if r.dtype != dtype]
    else:
        # float64 results are compared with a float64 oracle that has its own error of the same
        # size: the difference of two results each within the bound is within twice the bound.
        if dtype == torch.float64:
            safety = 2 * safety
        ymag, gmags = magnitudes(problem, grad_y)
        mags = [ymag] + (gmags if grads is not None else [])
        k = problem.reduction_length()
        fails = [rounding_failure(n, r, e, m, k, dtype, safety=safety)
                 for n, r, e, m in zip(names, results, expected, mags)]
    fails = [f for f in fails if f]
    if fails:
        raise AssertionError(f"backend {backend!r}: " + "\n".join(fails))
    return y, grads


def check_backend(problem: Problem, backend: str, grad_y, *, device=None, config=None):
    """:func:`check_against_oracle` on the device the backend runs on (``device``, else its
    first), with a Triton launch configuration forced when ``config`` is given. Returns the
    output and gradients as CPU tensors."""
    be = igc.BACKENDS[backend]
    device = device or be.devices[0]
    pd = problem_on(problem, device)
    gy = to_device(grad_y, device)
    ctx = contextlib.nullcontext()
    if config:
        from igc_kernels.backends.triton import triton_ops

        ctx = triton_ops().K.override_config(**config)
    with ctx:
        y, grads = check_against_oracle(pd, backend, gy)
    return y.detach().cpu(), None if grads is None else [g.detach().cpu() for g in grads]


def assert_bitwise_deterministic(problem: Problem, backend: str, grad_y, runs: int = 10):
    """The output and every gradient are bitwise identical over ``runs`` calls."""
    y0, g0 = forward_and_grads(lambda: problem.call(backend), problem.leaves(), grad_y)
    y0, g0 = y0.detach().clone(), [g.clone() for g in g0]
    for run in range(1, runs):
        y, grads = forward_and_grads(lambda: problem.call(backend), problem.leaves(), grad_y)
        assert torch.equal(y, y0), f"run {run}: output differs"
        for name, g, ref in zip(problem.leaf_names(), grads, g0):
            assert torch.equal(g, ref), f"run {run}: gradient of {name} differs"


class RoundTo(torch.autograd.Function):
    """Rounds its input to ``dtype`` (kept in its own dtype, float64 in the models) and the
    gradient it passes back too: a rounding point of the unfused chain in ``dtype`` (every
    layer's output, every gradient), for float64 models of the 16-bit kernels."""

    @staticmethod
    def forward(ctx, t, dtype):
        ctx.dtype = dtype
        return t.to(dtype).to(t.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).to(g.dtype), None


def draw_chain_shape(draw, max_layers: int, max_width: int) -> tuple:
    """``(channels, groups)`` of a random chain for a hypothesis strategy: 1..``max_layers``
    layers of 1..4 groups; every ``C_l`` a multiple of the groups of the layers that produce and
    consume it, at most about ``max_width``."""
    from hypothesis import strategies as st

    L = draw(st.integers(1, max_layers))
    groups = [draw(st.integers(1, 4)) for _ in range(L)]
    channels = []
    for l in range(L + 1):
        unit = 1
        if l > 0:
            unit = math.lcm(unit, groups[l - 1])
        if l < L:
            unit = math.lcm(unit, groups[l])
        channels.append(unit * draw(st.integers(1, max(1, max_width // unit))))
    return channels, groups


def build_problem(channels, groups, *, spatial=(), N=2, layout="contiguous", dtype=torch.float64,
                  permutations="default", bias=False, conv_layout=False, seed=0,
                  input_index=None, in_channels=None) -> Problem:
    """A random problem. ``permutations``: "default" (None: IGCV2 default), "random" (an
    explicit random index after every layer), or a list as the operator takes it. ``bias``:
    bool or a list of bools per layer. ``input_index`` (with ``x`` of ``in_channels``
    channels) gathers ``channels[0] = len(input_index)`` channels before layer 1."""
    gen = torch.Generator().manual_seed(seed)
    channels = tuple(channels)
    L = len(groups)
    if permutations == "default":
        perms = None
    elif permutations == "random":
        perms = [random_permutation(channels[l + 1], gen) for l in range(L)]
    else:
        perms = permutations
    which = None
    if bias is True:
        which = [True] * L
    elif isinstance(bias, (list, tuple)):
        which = list(bias)
    c_x = channels[0] if input_index is None else int(in_channels)
    x = make_tensor((N, c_x, *spatial), layout, dtype, gen).requires_grad_()
    ws = random_weights(channels, groups, dtype, gen, conv_layout=conv_layout)
    bs = random_biases(channels, which, dtype, gen)
    return Problem(x, ws, list(groups), perms, bs, channels, input_index)


def normalized_op_args(problem: Problem):
    """``(x, weights, biases, groups, shuffles, perms, input_index)`` for
    ``torch.ops.igc.chain_forward``, built by the package's own normalisation of the user
    arguments."""
    ch = normalize(problem.x, problem.weights, problem.groups, problem.permutations, problem.biases,
                   input_index=problem.input_index)
    return (problem.x, ch.weights, op_biases(ch.biases, problem.x), list(ch.groups),
            list(ch.shuffles), ch.perms, ch.input_index)


def shufflenet_style_net(channels: int = 48, groups: int = 3, units: int = 2) -> "torch.nn.Module":
    """A small ShuffleNet-style network (unfused): stem, then units of grouped 1x1 -> channel
    shuffle -> BN -> ReLU -> depth-wise 3x3 -> BN -> grouped 1x1 -> BN, with a residual add;
    pooled head. (The shuffle sits right after the grouped convolution, where ShuffleNet's
    BN + ReLU commute with it.) ``igc_kernels.convert`` fuses each grouped 1x1 + shuffle."""
    import torch.nn as nn

    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            mid = channels // 2
            self.branch = nn.Sequential(
                nn.Conv2d(channels, mid, 1, groups=groups, bias=False), nn.ChannelShuffle(groups),
                nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                nn.Conv2d(mid, channels, 1, groups=groups, bias=False), nn.BatchNorm2d(channels))

        def forward(self, x):
            return torch.relu(x + self.branch(x))

    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
                         *[Unit() for _ in range(units)], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(channels, 10))


# ---------------------------------------------------------------------------------------------
# Multi-process runs (gloo on the CPU): DDP and FSDP2 tests
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_workers(worker, out_dir, world: int, deadline_s: float, what: str) -> list:
    """Runs ``worker(rank, port, out_dir)`` in ``world`` spawned processes (each saves
    ``rank{r}.pt`` in ``out_dir``); fails after ``deadline_s`` seconds, terminating the workers;
    returns the loaded per-rank results. Fails (not skips) without torch.distributed + gloo."""
    import time

    import pytest
    import torch.distributed as dist
    import torch.multiprocessing as mp

    require_extension()
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.fail("torch.distributed with gloo is required for this test")
    ctx = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} workers did not finish within {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt")) for r in range(world)]


@contextlib.contextmanager
def gloo_group(rank: int, port: int, world: int, out_dir: str):
    """A worker's process group (gloo on 127.0.0.1:``port``, one thread, a 60 s timeout).
    Yields ``save(obj)``, which writes the rank's result where :func:`run_gloo_workers` reads
    it; the ranks meet at a barrier before the group is destroyed."""
    import datetime

    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield lambda obj: torch.save(obj, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def case_maker(good):
    """``case(**changes)`` -> a function building ``good()``'s arguments with ``changes``
    applied (a callable change receives the arguments and returns the new value): the bad-input
    tables of the error tests."""
    def case(**changes):
        def make():
            args = good()
            for key, value in changes.items():
                args[key] = value(args) if callable(value) else value
            return args
        return make
    return case
