"""``InterleavedGroupConv``: an ``nn.Module`` that owns a chain's weights and runs the fused op."""

from __future__ import annotations

import math

import torch
from torch import nn

from .functional import interleaved_group_conv
from .spec import ChainSpec


class InterleavedGroupConv(nn.Module):
    """A chain of grouped 1x1 convolutions and permutations, run as one fused operator.

    Args:
        spec: the :class:`ChainSpec` (channels, groups, permutations).
        bias: add a learnable bias after every layer.
        backend: passed to :func:`igc_kernels.interleaved_group_conv`.

    Parameters: ``weights[l]`` of conv layout ``(C_l, C_{l-1} / G_l, 1, 1)``, initialised as
    ``nn.Conv2d`` does (Kaiming-uniform with ``a = sqrt(5)``), and with ``bias=True``
    ``biases[l]`` of shape ``(C_l,)``. Explicit index permutations are buffers ``perm_l``.
    """

    def __init__(self, spec: ChainSpec, bias: bool = False, *, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(spec, ChainSpec):
            raise TypeError(f"spec must be a ChainSpec, got {type(spec).__name__}")
        self.spec = spec
        self.backend = backend
        kw = {"device": device, "dtype": dtype}
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(c, k, 1, 1, **kw)) for c, k in spec.weight_shapes()])
        if bias:
            self.biases = nn.ParameterList(
                [nn.Parameter(torch.empty(c, **kw)) for c in spec.channels[1:]])
        else:
            self.biases = None
        self._perm_names = []
        for l, p in enumerate(spec.permutations):
            if isinstance(p, torch.Tensor):
                name = f"perm_{l}"
                self.register_buffer(name, p.detach().to(device=device, dtype=torch.int64).clone())
                self._perm_names.append(name)
            else:
                self._perm_names.append(p)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for l, w in enumerate(self.weights):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            if self.biases is not None:
                fan_in = w.shape[1]
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(self.biases[l], -bound, bound)

    def permutations(self) -> list:
        out = []
        for p in self._perm_names:
            if p is None or p == "interleave":
                out.append(p)
            else:
                out.append(getattr(self, p))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = None if self.biases is None else list(self.biases)
        return interleaved_group_conv(x, list(self.weights), list(self.spec.groups),
                                      self.permutations(), biases, backend=self.backend)

    def dense_matrix(self) -> torch.Tensor:
        # the permutation buffers, not self.spec's tensors: load_state_dict may have replaced them
        spec = ChainSpec(self.spec.channels, self.spec.groups, self.permutations())
        return spec.dense_matrix(list(self.weights))

    def extra_repr(self) -> str:
        return (f"channels={list(self.spec.channels)}, groups={list(self.spec.groups)}, "
                f"bias={self.biases is not None}, backend={self.backend!r}")
