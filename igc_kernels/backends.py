"""The backend registry: what each implementation supports and why it cannot run an input.

Every backend answers :meth:`Backend.reasons` with a list of sentences (empty when it can run
the input). ``backend="auto"`` takes the first backend of :data:`AUTO_ORDER` with no reasons; an
explicitly requested backend that cannot run raises :class:`BackendUnavailableError` listing
all of its reasons. ``use_backend(name)`` sets the default for a ``with`` scope.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable, Optional

import torch

from ._chain import Chain
from ._ops import op_biases
from . import _loader

BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "reference")
# Order in which "auto" tries the backends: fused compiled kernels first, the reference last.
AUTO_ORDER = ("cuda", "cpu", "triton", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given input."""


class Backend:
    """One implementation of the operator, with a declarative description of its limits."""

    def __init__(self, name: str, summary: str, devices, dtypes: tuple,
                 deterministic: str, runner: Callable, availability: Callable[[], list],
                 input_reasons: Optional[Callable] = None, device_note: str = ""):
        self.name = name
        self.summary = summary
        self._devices = devices
        self.device_note = device_note
        self.dtypes = dtypes
        self.deterministic = deterministic
        self._runner = runner
        self._availability = availability
        self._input_reasons = input_reasons
        self._cached = None

    @property
    def devices(self) -> tuple:
        """Device types this backend runs on (for some backends it depends on the process:
        ``devices`` may be given as a callable)."""
        return self._devices() if callable(self._devices) else self._devices

    def unavailable_reasons(self) -> list:
        """Reasons this backend cannot run anything in this process (empty: usable).

        Computed once: what was built and what the process can use do not change.
        """
        if self._cached is None:
            self._cached = list(self._availability())
        return list(self._cached)

    def reasons(self, x: torch.Tensor, chain: Chain) -> list:
        """Reasons this backend cannot run ``x`` through ``chain`` (empty: it can)."""
        out = self.unavailable_reasons()
        if x.device.type not in self.devices:
            out.append(f"x is on {x.device.type}; this backend runs on {', '.join(self.devices)}"
                       + (f" ({self.device_note})" if self.device_note else ""))
        if x.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"dtype {x.dtype} is not supported (supported: {names})")
        if self._input_reasons is not None:
            out.extend(self._input_reasons(x, chain))
        return out

    def run(self, x: torch.Tensor, chain: Chain) -> torch.Tensor:
        return self._runner(x, chain)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


_ALL_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _run_reference(x, chain):
    from .reference import run_chain

    return run_chain(x, chain)


def _run_fused_op(x, chain):
    from . import _ops

    return _ops.FAMILY.forward(x, chain.weights, op_biases(chain.biases, x), list(chain.groups),
                               chain.shuffles, chain.perms, chain.input_index)


def _cpu_availability():
    return [] if _loader.ext_loaded() else [_loader.ext_missing_reason()]


def _cuda_availability():
    out = []
    if not _loader.ext_loaded():
        out.append(_loader.ext_missing_reason())
    elif not _loader.ext_built_with_cuda():
        out.append("igc_kernels._C was built without its CUDA kernels (nvcc was not found or "
                   "torch had no CUDA at build time); rebuild with `pip install "
                   "--no-build-isolation -e .` where both are present")
    if not torch.cuda.is_available():
        out.append("torch reports no usable CUDA device")
    return out


# Limits of the fused CUDA kernels (csrc/cuda/chain_kernels.cuh): at most kMaxLayers layers, and
# tiles of at least kMinTile positions of the chain must fit in shared memory (forward: two
# buffers of the widest layer; backward: the x tile, two gradient buffers and either every
# intermediate or two scratch buffers, whichever is smaller), in the accumulation type.
_CUDA_MAX_LAYERS = 32
_CUDA_MIN_TILE = 4
_CUDA_SMEM_OPTIN: dict = {}  # device index -> max dynamic shared memory per block (opt-in)


def _cuda_smem_optin(device: torch.device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CUDA_SMEM_OPTIN:
        if torch.compiler.is_compiling():
            return None  # not queried while tracing; the op itself raises if it does not fit
        props = torch.cuda.get_device_properties(idx)
        _CUDA_SMEM_OPTIN[idx] = int(getattr(props, "shared_memory_per_block_optin", 0) or 49152)
    return _CUDA_SMEM_OPTIN[idx]


def _cuda_smem_needed(x: torch.Tensor, chain: Chain) -> int:
    """Shared memory (bytes) of the smallest tiles the CUDA kernels can use for this chain."""
    acc = 8 if x.dtype == torch.float64 else 4
    tp = _CUDA_MIN_TILE  # row length = tp for tiles below 8 positions
    cmax = max(chain.channels)
    L = chain.num_layers
    forward = 2 * cmax * tp * acc + 2 * tp * 8
    middle = min(sum(chain.channels[1:L]), 2 * cmax) if L > 1 else 0
    backward = (chain.channels[0] + 2 * cmax + middle) * tp * acc + 3 * tp * 8
    return max(forward, backward)


def _cuda_input_reasons(x, chain):
    out = []
    if chain.num_layers > _CUDA_MAX_LAYERS:
        out.append(f"the chain has {chain.num_layers} layers; the CUDA kernels support at most "
                   f"{_CUDA_MAX_LAYERS} layers")
    if x.device.type == "cuda" and torch.cuda.is_available():
        optin = _cuda_smem_optin(x.device)
        need = _cuda_smem_needed(x, chain)
        if optin is not None and need > optin:
            out.append(f"the widest layer ({max(chain.channels)} channels, {x.dtype}) needs "
                       f"{need} bytes of shared memory per block even with tiles of "
                       f"{_CUDA_MIN_TILE} positions; this GPU allows {optin}")
    return out


_TRITON_OPS = [None]  # the imported igc_kernels._triton_ops module, once loaded


def _triton_ops():
    if _TRITON_OPS[0] is None:
        from . import _triton_ops as mod

        _TRITON_OPS[0] = mod
    return _TRITON_OPS[0]


def _triton_availability():
    if not _loader.triton_installed():
        return ["triton is not installed (pip install triton)"]
    try:
        mod = _triton_ops()
    except Exception as e:  # a Triton too old or broken: say why, never fail the import
        return [f"the Triton kernels could not be loaded ({type(e).__name__}: {e})"]
    if not mod.INTERPRETED and not torch.cuda.is_available():
        return ["torch reports no usable CUDA device and Triton's interpreter is off"]
    return []


def _triton_input_reasons(x, chain):
    out = []
    mod = _TRITON_OPS[0]
    if mod is None:  # the kernels could not be loaded: the availability reasons say why
        return out
    limit = mod.K.MAX_CHANNELS
    widths = [("x", chain.in_channels)] if chain.input_index is not None else []
    widths += [(f"C_{l}", c) for l, c in enumerate(chain.channels)]
    for name, c in widths:
        if c > limit:
            out.append(f"{name} = {c} channels exceeds the Triton backend's limit of {limit} "
                       f"(a layer's tile of positions x channels is held in registers)")
    return out


def _triton_devices() -> tuple:
    """CUDA when the kernels are compiled, the CPU when Triton's interpreter runs them (both
    while the kernels are not loaded: then the availability reasons say why)."""
    mod = _TRITON_OPS[0]
    if mod is None:
        return ("cuda", "cpu")
    return ("cpu",) if mod.INTERPRETED else ("cuda",)


def _run_triton(x, chain):
    return _triton_ops().run(x, chain)


BACKENDS = {
    "cuda": Backend(
        "cuda", "fused CUDA kernels of the C++ extension", ("cuda",), _ALL_FLOAT,
        "deterministic (fixed-order reduction of weight gradients)", _run_fused_op,
        _cuda_availability, _cuda_input_reasons),
    "cpu": Backend(
        "cpu", "fused C++ CPU kernels (at::parallel_for over tiles of positions)", ("cpu",),
        _ALL_FLOAT, "deterministic at a given thread count", _run_fused_op, _cpu_availability),
    "triton": Backend(
        "triton", "fused Triton kernels (one program per tile of positions, all layers in "
        "registers)", _triton_devices, (torch.float32, torch.float16, torch.bfloat16),
        "deterministic (fixed-order reduction of weight gradients)", _run_triton,
        _triton_availability, _triton_input_reasons,
        device_note="CPU tensors run through Triton's interpreter only, with TRITON_INTERPRET=1 "
                    "set before igc_kernels.triton_kernels is imported"),
    "reference": Backend(
        "reference", "unfused PyTorch chain (grouped conv + shuffle per layer)",
        ("cpu", "cuda", "xpu", "mps", "meta"), _ALL_FLOAT,
        "as deterministic as the underlying convolutions", _run_reference, lambda: []),
}

# The scopes of use_backend(), per thread and per asyncio task: a context variable holding the
# stack of names. torch.compile cannot trace a context variable, so every change is mirrored in
# a thread-local attribute, which Dynamo reads (and guards on: a compiled function re-specialises
# when the scope changes). Under torch.compile the scope is therefore per thread: asyncio tasks
# that share a thread and enter different scopes should pass ``backend=`` explicitly to compiled
# code.
_SCOPE = contextvars.ContextVar("igc_kernels_backend_scope", default=())


class _TracedScope(threading.local):
    name = "auto"


_TRACED = _TracedScope()


def _default_backend() -> str:
    if torch.compiler.is_compiling():
        return _TRACED.name
    stack = _SCOPE.get()
    return stack[-1] if stack else "auto"


def scope_stack() -> tuple:
    """The ``use_backend`` scopes active in this thread / task, outermost first."""
    return _SCOPE.get()


@contextlib.contextmanager
def use_backend(name: str):
    """Make ``name`` the backend that ``backend="auto"`` resolves to inside a ``with`` block.

    The scope belongs to the current thread and asyncio task (a ``contextvars`` variable):
    other threads and tasks keep their own. Scopes nest."""
    check_backend_name(name)
    token = _SCOPE.set(_SCOPE.get() + (name,))
    _TRACED.name = name
    try:
        yield
    finally:
        _SCOPE.reset(token)
        stack = _SCOPE.get()
        _TRACED.name = stack[-1] if stack else "auto"


def check_backend_name(name) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown backend {name!r}; choose one of " + ", ".join(repr(n) for n in BACKEND_NAMES)
        )


def select(name: str, x: torch.Tensor, chain: Chain) -> Backend:
    """The backend that runs ``x`` through ``chain`` for the requested ``name``."""
    check_backend_name(name)
    if name == "auto":
        name = _default_backend()
    if name != "auto":
        be = BACKENDS[name]
        reasons = be.reasons(x, chain)
        if reasons:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run this input:\n  - " + "\n  - ".join(reasons)
            )
        return be
    for candidate in AUTO_ORDER:
        be = BACKENDS[candidate]
        if not be.reasons(x, chain):
            return be
    raise BackendUnavailableError("no backend can run this input")  # pragma: no cover


def available_backends(device: str | torch.device | None = None) -> list:
    """Names of the backends usable in this process (for ``device``'s type when given)."""
    dev = None if device is None else torch.device(device).type
    out = []
    for name in AUTO_ORDER:
        be = BACKENDS[name]
        if be.unavailable_reasons():
            continue
        if dev is not None and dev not in be.devices:
            continue
        out.append(name)
    return out
