"""Fused Triton kernels of igc_kernels (installed as ``igc_kernels.triton_kernels``).

``chain``: the forward / backward kernels of the whole chain (specialised per chain structure
by constexpr tuples), launch configurations and autotuning (see its docstring). Importing
``chain`` imports Triton and decorates the kernels: set ``TRITON_INTERPRET=1`` before that to
run them on CPU tensors. This package itself imports nothing heavy.
"""


def facts() -> str:
    """One line for ``python -m igc_kernels.info``: how the kernels run here and their limits."""
    try:
        from . import chain
    except Exception as e:  # Triton missing or unusable
        return f"not loadable ({type(e).__name__}: {e})"
    mode = ("interpreted on CPU tensors (TRITON_INTERPRET=1)" if chain.INTERPRETED
            else "compiled for CUDA GPUs")
    return (f"{mode}; channels <= {chain.MAX_CHANNELS}; permutations and input_index as "
            f"gather indices or folded weights (explicit ones on the same path as interleave); "
            f"tl.dot path for layers <= {chain.DENSE_MAX_SLOTS} channels; autotuned over "
            f"{len(chain.TILE_CONFIGS)} forward / {len(chain.BWD_TILE_CONFIGS)} backward tile "
            f"sizes x dot/FMA x keep/recompute")
