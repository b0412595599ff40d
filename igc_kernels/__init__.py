"""igc_kernels: fused interleaved group convolutions for PyTorch.

``y = P_L W_L ... P_1 W_1 x`` per position, where every ``W_l`` is a grouped 1x1 convolution and
every ``P_l`` a channel permutation, computed by one fused operator (one read of ``x``, one write
of ``y``; the backward recomputes on chip). See ``README.md`` and ``python -m igc_kernels.info``.
"""

from . import _loader

_loader.load()

if _loader.ext_loaded():
    from . import _ops as _ops

    _ops.register()

from . import reference  # noqa: E402
from ._chain import interleave_index  # noqa: E402
from .backends import (  # noqa: E402
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    use_backend,
)
from .functional import interleaved_group_conv  # noqa: E402
from .modules import InterleavedGroupConv  # noqa: E402
from .modules import ChannelGather  # noqa: E402
from .convert import convert, unfuse  # noqa: E402
from .inference import FusedBlock, optimize_for_inference  # noqa: E402
from . import models  # noqa: E402
from .spec import ChainSpec  # noqa: E402
from .onnx import onnx_translation_table  # noqa: E402  (imports onnxscript only when called)

__version__ = "0.1.0"

__all__ = [
    "interleaved_group_conv",
    "ChainSpec",
    "InterleavedGroupConv",
    "available_backends",
    "use_backend",
    "BackendUnavailableError",
    "BACKENDS",
    "interleave_index",
    "reference",
    "ChannelGather",
    "convert",
    "unfuse",
    "optimize_for_inference",
    "FusedBlock",
    "models",
    "onnx_translation_table",
]
