"""Blocks and networks of the IGC family built on the fused operator, each buildable fused
(``fused=True``) or as the plain unfused modules with the same parameters (``fused=False``).

See :mod:`igc_kernels.models.blocks` for where BN and activations sit and why.
"""

from .blocks import (
    CondenseLayer,
    IGCV1Block,
    IGCV2Block,
    IGCV3Block,
    condense_index,
    make_chain,
)
from .networks import IGCV3_D_STAGES, IGCV2CifarNet, IGCV3Net
from .utils import parameter_pairs

__all__ = [
    "IGCV1Block",
    "IGCV2Block",
    "IGCV3Block",
    "CondenseLayer",
    "condense_index",
    "make_chain",
    "IGCV2CifarNet",
    "IGCV3Net",
    "IGCV3_D_STAGES",
    "parameter_pairs",
]
