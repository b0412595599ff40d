"""Blocks of the IGC family built on the fused operator.

Every block takes ``fused: bool``. ``fused=True`` puts the chain of grouped 1x1 convolutions
and permutations in one :class:`igc_kernels.InterleavedGroupConv`; ``fused=False`` puts the
plain modules of that same chain there (``InterleavedGroupConv.unfuse()``: ``nn.Conv2d`` /
``nn.ChannelShuffle`` / ``ChannelGather``). Both are built from the same random draws, so two
blocks made with the same seed have the same parameters and compute the same function; the
chain's submodule is always named ``chain`` (``expand`` / ``reduce`` in IGCV3).

Blocks:

* :class:`IGCV1Block` (Zhang et al., ICCV 2017): primary grouped 3x3 convolution with ``L``
  groups, then "permute, secondary grouped 1x1 with ``M`` groups, permute back" (the fused
  chain: input index = the shuffle with ``L`` groups, one layer, ``"interleave"``), then BN and
  ReLU, as in the authors' released networks.
* :class:`IGCV2Block` (Xie et al., CVPR 2018): channel-wise 3x3 convolution, then the chain of
  grouped 1x1 layers of :meth:`ChainSpec.igcv2` (IGCV2*: ``ceil(log_K C)`` layers of width
  ``K``), then BN and ReLU. The block is a factorisation of one dense 3x3 convolution, so BN
  and ReLU come after the whole product (as IGCV1's released code does for its two kernels).
* :class:`IGCV3Block` (Sun et al., BMVC 2018): grouped 1x1 expansion + shuffle, BN,
  depth-wise 3x3, BN, ReLU6, grouped 1x1 reduction + shuffle (``C_out / G`` groups, as the
  authors' code), BN, residual when the stride is 1 and the widths match. BN sits after each
  permutation (per-channel affine maps commute with permutations, so this is the authors'
  "conv, BN, permute" with the BN parameters relabelled).
* :class:`CondenseLayer` (Huang et al., CVPR 2018): CondenseNet's converted 1x1 layer at
  inference: BN and ReLU on the input channels, index gather (``index`` may repeat and have
  any length), grouped 1x1, shuffle. (CondenseNet applies its BN after the gather with the
  parameters copied per gathered channel; that equals this order with one parameter per input
  channel, which is what CondenseNet trains.)
"""

from __future__ import annotations

import torch
from torch import nn

from .._chain import as_index_tensor, interleave_index
from ..modules import InterleavedGroupConv
from ..spec import ChainSpec


def make_chain(spec: ChainSpec, fused: bool, *, input_index=None, bias=False,
               backend: str = "auto") -> nn.Module:
    """The chain as one fused module, or (``fused=False``) as its plain modules; the same
    parameters for the same random state."""
    m = InterleavedGroupConv(spec, bias=bias, input_index=input_index, backend=backend)
    return m if fused else m.unfuse()


def _check_divides(what: str, a: int, b: int) -> None:
    if a <= 0 or b <= 0 or b % a:
        raise ValueError(f"{what}: {a} must be a positive divisor of {b}")


class IGCV1Block(nn.Module):
    """``y = ReLU(BN(P^T W_d P W_p x))``: primary grouped 3x3 ``W_p`` (``primary_groups`` =
    ``L`` groups, stride ``stride``), secondary grouped 1x1 ``W_d`` with ``M = C_out / L``
    groups of ``L`` channels, ``P`` the shuffle with ``L`` groups.
    """

    def __init__(self, in_channels: int, out_channels: int, primary_groups: int, *,
                 stride: int = 1, relu: bool = True, fused: bool = True, backend: str = "auto"):
        super().__init__()
        L = primary_groups
        _check_divides("primary_groups (L) and in_channels", L, in_channels)
        _check_divides("primary_groups (L) and out_channels", L, out_channels)
        M = out_channels // L
        self.primary = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                                 groups=L, bias=False)
        spec = ChainSpec([out_channels, out_channels], [M], ["interleave"])
        self.chain = make_chain(spec, fused, input_index=interleave_index(out_channels, L),
                                backend=backend)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x):
        return self.relu(self.bn(self.chain(self.primary(x))))


class IGCV2Block(nn.Module):
    """Channel-wise 3x3 convolution (``out_channels / in_channels`` outputs per input channel,
    stride ``stride``), the IGCV2* chain of grouped 1x1 layers of width ``group_size`` on
    ``out_channels``, BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, group_size: int = 8, *,
                 stride: int = 1, fused: bool = True, backend: str = "auto"):
        super().__init__()
        _check_divides("in_channels and out_channels", in_channels, out_channels)
        self.spatial = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                                 groups=in_channels, bias=False)
        self.spec = ChainSpec.igcv2(out_channels, group_size)
        self.chain = make_chain(self.spec, fused, backend=backend)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.chain(self.spatial(x))))


class IGCV3Block(nn.Module):
    """Inverted residual with interleaved low-rank group convolutions (IGCV3)."""

    def __init__(self, in_channels: int, out_channels: int, expansion: float = 6, *,
                 stride: int = 1, groups: int = 2, fused: bool = True, backend: str = "auto"):
        super().__init__()
        hidden = int(round(in_channels * expansion))
        G = groups
        for what, c in (("in_channels", in_channels), ("expanded width", hidden),
                        ("out_channels", out_channels)):
            _check_divides(f"groups and {what}", G, c)
        self.expand = make_chain(ChainSpec([in_channels, hidden], [G], ["interleave"]), fused,
                                 backend=backend)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden,
                                   bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU6(inplace=True)
        reduce_perm = interleave_index(out_channels, out_channels // G)
        self.reduce = make_chain(ChainSpec([hidden, out_channels], [G], [reduce_perm]), fused,
                                 backend=backend)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        h = self.bn1(self.expand(x))
        h = self.act(self.bn2(self.depthwise(h)))
        h = self.bn3(self.reduce(h))
        return x + h if self.residual else h


class CondenseLayer(nn.Module):
    """CondenseNet's 1x1 layer after condensation: BN + ReLU on the ``in_channels`` input
    channels, gather of ``index`` (length divisible by ``groups``, entries may repeat), grouped
    1x1 convolution to ``out_channels``, shuffle with ``groups`` groups."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, index, *,
                 fused: bool = True, backend: str = "auto"):
        super().__init__()
        index = as_index_tensor(index, "index")  # lists stay on the host (meta construction)
        if index.device.type != "meta" and (int(index.min()) < 0
                                            or int(index.max()) >= in_channels):
            raise ValueError(f"index entries must lie in [0, {in_channels}), got min "
                             f"{int(index.min())} and max {int(index.max())}")
        _check_divides("groups and len(index)", groups, index.numel())
        _check_divides("groups and out_channels", groups, out_channels)
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        spec = ChainSpec([index.numel(), out_channels], [groups], ["interleave"])
        self.chain = make_chain(spec, fused, input_index=index, backend=backend)

    def forward(self, x):
        return self.chain(self.relu(self.bn(x)))


def condense_index(in_channels: int, groups: int, keep: int, generator=None) -> torch.Tensor:
    """A CondenseNet-style index: each of ``groups`` groups keeps ``keep`` input channels chosen
    at random (different groups may pick the same channel, so entries repeat across groups).
    Length ``groups * keep``."""
    if keep > in_channels:
        raise ValueError(f"keep = {keep} exceeds in_channels = {in_channels}")
    parts = [torch.randperm(in_channels, generator=generator)[:keep].sort().values
             for _ in range(groups)]
    return torch.cat(parts)
