"""``ChainSpec``: the structure of an interleaved group convolution chain and the IGCV2 rules.

A chain maps ``C_0`` channels to ``C_L`` channels through ``L`` grouped 1x1 layers; layer ``l``
has ``G_l`` groups, each a dense ``(m_l, n_l)`` block with ``n_l = C_{l-1} / G_l`` inputs and
``m_l = C_l / G_l`` outputs, followed by a channel permutation ``P_l`` (gather form).

Design rules of IGCV2 (Xie et al., "IGCV2: Interleaved Structured Sparse Convolutional Neural
Networks", CVPR 2018), exposed as helpers:

* complementary condition: every output channel has exactly one path to every input channel
  (:meth:`ChainSpec.is_complementary`); with square groups of width ``K_l`` this needs
  ``prod K_l = C``;
* "dense": at least one path (:meth:`ChainSpec.is_dense`), the weaker property of
  IGCV2*(Cx) = :meth:`ChainSpec.igcv2`;
* balance condition: with ``prod K_l = C`` the parameter count ``C * (S K_1 + K_2 + ... + K_L)``
  is least when ``S K_1 = K_2 = ... = K_L = (S C)^(1/L)`` (:meth:`ChainSpec.balanced_group_sizes`),
  and over ``L`` it is least at ``L = ln(S C)`` (:meth:`ChainSpec.optimal_depth`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._chain import _is_ndarray, as_index_tensor, interleave_index, is_int, normalize_permutation


def _positive_int(v, what: str) -> int:
    if not is_int(v) or v <= 0:
        raise ValueError(f"{what} must be a positive int, got {v!r}")
    return int(v)


class ChainSpec:
    """Channels, groups and permutations of a chain of ``L`` grouped 1x1 layers.

    Args:
        channels: ``L + 1`` ints ``C_0 .. C_L``.
        groups: ``L`` ints ``G_1 .. G_L``; ``G_l`` divides ``C_{l-1}`` and ``C_l``.
        permutations: ``L`` entries (``None``, ``"interleave"`` or an index tensor / list), or
            ``None`` for the default: ``"interleave"`` after every layer but the last.
    """

    def __init__(self, channels: Sequence[int], groups: Sequence[int],
                 permutations: Optional[Sequence] = None):
        channels, groups = list(channels), list(groups)
        if len(groups) == 0:
            raise ValueError("groups is empty: the chain needs at least one layer")
        if len(channels) != len(groups) + 1:
            raise ValueError(
                f"channels must have len(groups) + 1 = {len(groups) + 1} entries (C_0 .. C_L), "
                f"got {len(channels)}"
            )
        for i, c in enumerate(channels):
            if not is_int(c) or c <= 0:
                raise ValueError(f"channels[{i}] (C_{i}) must be a positive int, got {c!r}")
        for l, g in enumerate(groups, start=1):
            if not is_int(g) or g <= 0:
                raise ValueError(f"layer {l}: groups must be a positive int, got {g!r}")
            if channels[l - 1] % g or channels[l] % g:
                raise ValueError(
                    f"layer {l}: groups = {g} must divide C_{l - 1} = {channels[l - 1]} and "
                    f"C_{l} = {channels[l]}"
                )
        channels, groups = [int(c) for c in channels], [int(g) for g in groups]
        L = len(groups)
        if permutations is None:
            permutations = ["interleave"] * (L - 1) + [None]
        permutations = list(permutations)
        if len(permutations) != L:
            raise ValueError(f"permutations must have one entry per layer ({L}), got {len(permutations)}")
        perms = []
        for l, p in enumerate(permutations, start=1):
            if isinstance(p, (list, tuple)) or _is_ndarray(p):  # on the CPU (even under a
                p = as_index_tensor(p, f"layer {l}: permutation")  # torch.device scope)
            device = p.device if isinstance(p, torch.Tensor) else None
            normalize_permutation(p, l, channels[l], groups[l - 1], device)  # raises if invalid
            perms.append(p)
        self.channels = tuple(channels)
        self.groups = tuple(groups)
        self.permutations = tuple(perms)

    # --- construction rules -------------------------------------------------------------
    @classmethod
    def igcv2(cls, channels: int, group_size: int) -> "ChainSpec":
        """IGCV2*(Cx): ``ceil(log_K C)`` layers of ``C / K`` groups of width ``K``, interleaved.

        Complementary when ``C`` is a power of ``K``; dense (not complementary) otherwise.
        """
        C, K = channels, group_size
        if not (is_int(C) and is_int(K)) or C <= 0 or K <= 0:
            raise ValueError(f"channels and group_size must be positive ints, got {C!r}, {K!r}")
        C, K = int(C), int(K)
        if C % K:
            raise ValueError(f"group_size = {K} must divide channels = {C}")
        if K == 1 and C > 1:
            raise ValueError(f"group_size = 1 makes every group a single channel: no chain of "
                             f"such layers connects different channels (IGCV2 needs a dense "
                             f"chain); use group_size >= 2 (channels = {C})")
        L = 1
        if K > 1:
            while K ** L < C:
                L += 1
        return cls([C] * (L + 1), [C // K] * L)

    @classmethod
    def balanced(cls, channels: int, num_layers: int) -> "ChainSpec":
        """The complementary chain of ``L`` layers with equal group widths ``K = C^(1/L)``."""
        C = _positive_int(channels, "channels")
        L = _positive_int(num_layers, "num_layers")
        K = round(C ** (1.0 / L))
        if K ** L != C:
            raise ValueError(f"channels = {C} is not an L-th power (L = {L}); no balanced "
                             f"complementary chain with equal integer group widths exists")
        return cls([C] * (L + 1), [C // K] * L)

    @staticmethod
    def balanced_group_sizes(channels: int, num_layers: int, spatial: int = 1) -> list:
        """Group widths ``K_1..K_L`` (reals) minimising parameters under ``prod K_l = C``.

        ``spatial`` is ``S``, the kernel size of a spatial first layer (``S K_1`` parameters per
        channel): ``S K_1 = K_2 = ... = K_L = (S C)^(1/L)``.
        """
        channels = _positive_int(channels, "channels")
        num_layers = _positive_int(num_layers, "num_layers")
        spatial = _positive_int(spatial, "spatial")
        k = (spatial * channels) ** (1.0 / num_layers)
        return [k / spatial] + [k] * (num_layers - 1)

    @staticmethod
    def min_params(channels: int, num_layers: int, spatial: int = 1) -> float:
        """Least parameter count ``L C (S C)^(1/L)`` of a complementary chain of depth ``L``."""
        channels = _positive_int(channels, "channels")
        num_layers = _positive_int(num_layers, "num_layers")
        spatial = _positive_int(spatial, "spatial")
        return num_layers * channels * (spatial * channels) ** (1.0 / num_layers)

    @staticmethod
    def optimal_depth(channels: int, spatial: int = 1) -> int:
        """The integer depth minimising :meth:`min_params`; the real optimum is ``ln(S C)``."""
        channels = _positive_int(channels, "channels")
        spatial = _positive_int(spatial, "spatial")
        best = max(1, math.floor(math.log(spatial * channels)))
        cands = [c for c in (best, best + 1) if c >= 1]
        return min(cands, key=lambda L: ChainSpec.min_params(channels, L, spatial))

    # --- structure ----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.groups)

    @property
    def in_channels(self) -> int:
        return self.channels[0]

    @property
    def out_channels(self) -> int:
        return self.channels[-1]

    def group_shapes(self) -> list:
        """``(m_l, n_l)`` per layer: outputs and inputs of one group."""
        return [(self.channels[l + 1] // g, self.channels[l] // g) for l, g in enumerate(self.groups)]

    def weight_shapes(self) -> list:
        """``(C_l, n_l)`` per layer (the conv layout adds ``(1, 1)``)."""
        return [(self.channels[l + 1], self.channels[l] // g) for l, g in enumerate(self.groups)]

    def num_params(self, bias: bool = False) -> int:
        n = sum(c * k for c, k in self.weight_shapes())
        return n + (sum(self.channels[1:]) if bias else 0)

    def macs_per_position(self) -> int:
        """Multiply-adds per position (pixel or token): ``sum_l C_l n_l``."""
        return sum(c * k for c, k in self.weight_shapes())

    def flops_per_position(self, bias: bool = False) -> int:
        return 2 * self.macs_per_position() + (sum(self.channels[1:]) if bias else 0)

    def gather_indices(self) -> list:
        """The gather index of every permutation (CPU int64; identity included)."""
        out = []
        for l, p in enumerate(self.permutations):
            C = self.channels[l + 1]
            if p is None:
                out.append(torch.arange(C))
            elif isinstance(p, str):
                out.append(interleave_index(C, self.groups[l]))
            elif p.device.type == "meta":
                raise ValueError(f"layer {l + 1}: the permutation is a meta tensor, whose values "
                                 f"are unknown; give it as a CPU tensor or a list")
            else:
                out.append(p.detach().to("cpu", torch.int64))
        return out

    def _block_masks(self, dtype) -> list:
        masks = []
        for (m, n), g in zip(self.group_shapes(), self.groups):
            masks.append(torch.block_diag(*[torch.ones(m, n, dtype=dtype)] * g))
        return masks

    def path_counts(self) -> torch.Tensor:
        """``(C_L, C_0)`` float64: number of paths from each input to each output channel."""
        M = torch.eye(self.channels[0], dtype=torch.float64)
        for B, idx in zip(self._block_masks(torch.float64), self.gather_indices()):
            M = (B @ M)[idx]
        return M

    def is_complementary(self) -> bool:
        """Exactly one path from every input channel to every output channel."""
        return bool((self.path_counts() == 1).all())

    def is_dense(self) -> bool:
        """At least one path from every input channel to every output channel."""
        return bool((self.path_counts() > 0).all())

    def _layer_matrices(self, weights: Sequence[torch.Tensor]) -> list:
        """``(B_l, gather_l)`` per layer: the block-diagonal ``(C_l, C_{l-1})`` matrix of the
        given weight and the gather index of the permutation after it."""
        if len(weights) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} weights, got {len(weights)}")
        out = []
        for l, (W, (c, k), g, idx) in enumerate(
                zip(weights, self.weight_shapes(), self.groups, self.gather_indices()), start=1):
            if W.numel() != c * k or any(s != 1 for s in W.shape[2:]):
                raise ValueError(f"layer {l}: weight has shape {tuple(W.shape)}, expected ({c}, {k})")
            W = W.reshape(c, k)
            m = c // g
            B = torch.block_diag(*[W[i * m:(i + 1) * m] for i in range(g)])
            out.append((B, idx.to(W.device)))
        return out

    def dense_matrix(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """The composed ``(C_L, C_0)`` matrix ``P_L W_L ... P_1 W_1`` of the given weights."""
        M = None
        for B, idx in self._layer_matrices(weights):
            M = (B if M is None else B @ M)[idx]
        return M

    def dense_bias(self, weights: Sequence[torch.Tensor], biases: Sequence) -> torch.Tensor:
        """The composed ``(C_L,)`` bias of the affine chain (zeros where a layer has none)."""
        b_tot = None
        for (B, idx), b in zip(self._layer_matrices(weights), biases):
            if b is None:
                b = torch.zeros(B.shape[0], dtype=B.dtype, device=B.device)
            b_tot = (b if b_tot is None else B @ b_tot + b)[idx]
        return b_tot

    def __eq__(self, other) -> bool:
        if not isinstance(other, ChainSpec):
            return NotImplemented
        if self.channels != other.channels or self.groups != other.groups:
            return False
        return all(torch.equal(a, b) for a, b in zip(self.gather_indices(), other.gather_indices()))

    __hash__ = None

    def __repr__(self) -> str:
        perms = ", ".join(
            repr(p) if p is None or isinstance(p, str) else f"tensor(len={p.numel()})"
            for p in self.permutations)
        return f"ChainSpec(channels={list(self.channels)}, groups={list(self.groups)}, permutations=[{perms}])"
