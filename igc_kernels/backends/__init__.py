"""The backends and the dispatcher: which implementation runs an input, and why not.

Each backend is one file of this package (``cpu.py``, ``cuda.py``, ``triton.py``,
``reference.py``) declaring a :class:`~igc_kernels.backends.base.Backend`: its devices, dtypes,
limits and priority, and :meth:`reasons` (a list of sentences, empty when it can run the
input). ``backend="auto"`` takes the usable backend of lowest priority; when none is, and when an
explicitly requested backend cannot run, :class:`BackendUnavailableError` lists every reason.
``use_backend(name)`` sets what ``"auto"`` means for a ``with`` scope.

Adding a backend: a file here defining ``BACKEND`` (an instance of a ``Backend`` subclass) and
its name in :data:`_MODULES`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import threading

import torch

from .._chain import Chain
from .base import Backend

# The backend files, one line each.
_MODULES = ("cuda", "cpu", "triton", "reference")

BACKENDS = {}
for _m in _MODULES:
    _be = importlib.import_module(f"{__name__}.{_m}").BACKEND
    BACKENDS[_be.name] = _be
# Order in which "auto" tries the backends (by priority: fused kernels first, the reference last).
AUTO_ORDER = tuple(sorted(BACKENDS, key=lambda n: BACKENDS[n].priority))
BACKEND_NAMES = ("auto",) + AUTO_ORDER

__all__ = ["Backend", "BACKENDS", "AUTO_ORDER", "BACKEND_NAMES", "BackendUnavailableError",
           "available_backends", "select", "use_backend", "check_backend_name"]


class BackendUnavailableError(RuntimeError):
    """No backend (or not the requested one) can run the given input."""


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
    """The backend that runs ``x`` through ``chain`` (validated) for the requested ``name``."""
    check_backend_name(name)
    if name == "auto":
        name = _default_backend()
    if name != "auto":
        be = BACKENDS[name]
        reasons = be.reasons(x, chain)
        if reasons:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run this input:\n  - " + "\n  - ".join(reasons))
        return be
    every = []
    for candidate in AUTO_ORDER:
        be = BACKENDS[candidate]
        reasons = be.reasons(x, chain)
        if not reasons:
            return be
        every.append(f"{candidate}: " + "; ".join(reasons))
    raise BackendUnavailableError("no backend can run this input:\n  - " + "\n  - ".join(every))


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
