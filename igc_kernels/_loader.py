"""Loading of the optional parts: the compiled extension ``igc_kernels._C`` and Triton.

The package imports without either; a single warning names what is missing. Nothing here
queries a device.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

_EXT = None
_EXT_ERROR = None


def _load_ext():
    global _EXT, _EXT_ERROR
    import torch  # noqa: F401  (loads libc10 / libtorch, which _C links against)

    try:
        _EXT = importlib.import_module("igc_kernels._C")
    except ImportError as e:  # not built, or built against another torch
        _EXT_ERROR = f"{type(e).__name__}: {e}"


def ext_loaded() -> bool:
    return _EXT is not None


def ext_missing_reason() -> str:
    return ("the compiled extension igc_kernels._C is not available "
            f"({_EXT_ERROR}); build it with `pip install --no-build-isolation -e .`")


def ext():
    """The compiled extension module (``None`` when it is not built)."""
    return _EXT


def ext_built_with_cuda() -> bool:
    return bool(_EXT is not None and getattr(_EXT, "BUILT_WITH_CUDA", False))


def ext_build_info() -> dict:
    if _EXT is None:
        return {}
    return {k: getattr(_EXT, k) for k in dir(_EXT) if k.isupper()}


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def load() -> None:
    """Load the extension once and warn (once) about every optional part that is missing."""
    _load_ext()
    missing = []
    if _EXT is None:
        missing.append(f"the compiled extension igc_kernels._C ({_EXT_ERROR}): the 'cpu' and "
                       "'cuda' backends are unavailable")
    if not triton_installed():
        missing.append("triton (not installed): the 'triton' backend is unavailable")
    if missing:
        warnings.warn("igc_kernels: running without " + "; and without ".join(missing)
                      + ". The 'reference' backend works. See `python -m igc_kernels.info`.",
                      stacklevel=3)
