"""Networks: the IGCV2 CIFAR family (32x32 inputs) and an IGCV3 ImageNet network (224x224).

Both take ``fused: bool`` (see :mod:`igc_kernels.models.blocks`): the same seed gives the same
parameters either way.
"""

from __future__ import annotations

from torch import nn

from .blocks import IGCV2Block, IGCV3Block


class IGCV2CifarNet(nn.Module):
    """IGCV2*(C) for 32x32 inputs, laid out as the IGC papers' plain CIFAR networks.

    ``depth = 3 n + 2`` weighted layers: a 3x3 convolution to ``width`` channels (BN, ReLU),
    three stages of ``n`` :class:`IGCV2Block` at widths ``width``, ``2 width``, ``4 width`` on
    32x32, 16x16 and 8x8 maps (the first block of stages 2 and 3 has stride 2 and a channel-wise
    convolution with two outputs per input channel), global average pooling and a linear
    classifier. ``depth=20`` gives 6 blocks per stage; ``IGCV2CifarNet(416)`` is the
    IGCV2*(C416)-style network (group width ``K = 8``, ``ceil(log_8 C)`` grouped 1x1 layers
    per block).
    """

    def __init__(self, width: int = 64, depth: int = 20, group_size: int = 8,
                 num_classes: int = 10, *, fused: bool = True, backend: str = "auto"):
        super().__init__()
        if depth < 5 or (depth - 2) % 3:
            raise ValueError(f"depth must be 3 n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 3
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        blocks, c = [], width
        for stage, w in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(IGCV2Block(c, w, group_size, stride=stride, fused=fused,
                                         backend=backend))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))).flatten(1))


# (expansion t, output channels c, blocks n, first stride s) of IGCV3-D, the authors' ImageNet
# network: MobileNetV2's layout with more blocks per stage and grouped (G = 2) 1x1 layers.
IGCV3_D_STAGES = ((1, 16, 1, 1), (6, 24, 4, 2), (6, 32, 6, 2), (6, 64, 8, 2), (6, 96, 6, 1),
                  (6, 160, 6, 2), (6, 320, 1, 1))


def _even(c: float) -> int:
    c = int(round(c))
    return c + 1 if c % 2 else c


class IGCV3Net(nn.Module):
    """IGCV3-D for ImageNet-size inputs: 3x3 stride-2 convolution to 32 channels (BN, ReLU6),
    the stages of :data:`IGCV3_D_STAGES` made of :class:`IGCV3Block` (``groups = 2``), a 1x1
    convolution to 1280 channels (BN, ReLU6), global average pooling, a linear classifier.
    ``width_mult`` scales every width (rounded to even numbers, as the authors' code)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, groups: int = 2,
                 stages=IGCV3_D_STAGES, *, fused: bool = True, backend: str = "auto"):
        super().__init__()
        c = _even(32 * width_mult)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU6(inplace=True))
        blocks = []
        for t, out, n, s in stages:
            out = _even(out * width_mult)
            for i in range(n):
                blocks.append(IGCV3Block(c, out, t, stride=s if i == 0 else 1, groups=groups,
                                         fused=fused, backend=backend))
                c = out
        self.blocks = nn.Sequential(*blocks)
        last = max(1280, _even(1280 * width_mult)) if width_mult > 1.0 else 1280
        self.head = nn.Sequential(nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last),
                                  nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.head(self.blocks(self.stem(x)))).flatten(1))
