"""The conformance suite: every backend, on every device it runs on in this process, against
the float64 oracle, from one table of chains, dtypes and layouts.

The rule (``igc_test_utils.check_against_oracle``): float32 / float64 output and gradients
within the rounding bound of the problem; float16 / bfloat16 within twice the unfused chain's
max error in the same dtype (flash-attention's rule); output and ``grad x`` in the layout the
package promises. Backend-specific files keep what is specific to one backend (Triton's forced
launch configurations, the CUDA kernels' shared-memory limits and emulation).

Parameters come from each backend's declaration (its devices and dtypes); combinations that
need a GPU carry a skip marker built from a constant (``torch.cuda.is_available()``).
"""

from __future__ import annotations

import pytest
import torch

import igc_kernels as igc
from igc_test_utils import build_problem, check_backend, make_tensor

HAS_CUDA = torch.cuda.is_available()

CHAINS = {
    # name: (channels, groups, permutations, bias, spatial, N, input_index, in_channels)
    "nonsquare_bias": ([32, 48, 32], [4, 8], "default", True, (5, 5), 3, None, None),
    "random_perms_index": ([24, 24, 24], [3, 3], "random", [True, False], (7,), 2,
                           [5, 1, 1, 0, 3, 2, 4, 4, 7, 9, 11, 13, 2, 2, 8, 6, 10, 12, 14, 15,
                            16, 17, 18, 19], 21),
    "tokens_deep": ([16] * 5, [4] * 4, "default", [True, False, False, True], (), 9, None, None),
    "odd_group_widths_3d": ([14, 6, 14], [2, 2], "default", False, (2, 3, 3), 2, None, None),
}
LAYOUTS = ["contiguous", "channels_last", "sliced"]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16,
          "bf16": torch.bfloat16}


def _targets():
    """(backend, device, dtype) triples: every backend on every device it declares (CPU and
    CUDA) in every dtype it declares."""
    out = []
    for name, be in igc.BACKENDS.items():
        be.unavailable_reasons()  # loads what the declaration depends on (Triton's devices)
        for device in ("cpu", "cuda"):
            if device not in be.devices:
                continue
            marks = [pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")] \
                if device == "cuda" else []
            for dname, dtype in DTYPES.items():
                if dtype in be.dtypes:
                    out.append(pytest.param(name, device, dtype, marks=marks,
                                            id=f"{name}-{device}-{dname}"))
    return out


def _layout_for(layout, spatial):
    if layout == "channels_last" and len(spatial) == 0:
        return "contiguous"  # tokens have no channels-last form
    return layout


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chain", CHAINS.keys())
@pytest.mark.parametrize("backend, device, dtype", _targets())
def test_conformance(backend, device, dtype, chain, layout):
    be = igc.BACKENDS[backend]
    assert not be.unavailable_reasons(), f"{backend} is not usable: {be.unavailable_reasons()}"
    channels, groups, perms, bias, spatial, N, index, c_in = CHAINS[chain]
    p = build_problem(channels, groups, spatial=spatial, N=N,
                      layout=_layout_for(layout, spatial), dtype=dtype, permutations=perms,
                      bias=bias, seed=11, input_index=None if index is None
                      else torch.tensor(index), in_channels=c_in)
    gen = torch.Generator().manual_seed(12)
    gy = make_tensor((N, channels[-1], *spatial), "contiguous", dtype, gen)
    check_backend(p, backend, gy, device=device)
