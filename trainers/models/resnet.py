"""ResNet-18/34/50/101/152 with a CIFAR stem (small images) or an ImageNet stem, width/depth multipliers."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from trainers.models.layers import ConvBNAct, round_channels

ActFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class ResNetLayout:
    block: str  # "basic" or "bottleneck"
    blocks_per_stage: tuple[int, int, int, int]


RESNET_LAYOUTS: dict[int, ResNetLayout] = {
    18: ResNetLayout("basic", (2, 2, 2, 2)),
    34: ResNetLayout("basic", (3, 4, 6, 3)),
    50: ResNetLayout("bottleneck", (3, 4, 6, 3)),
    101: ResNetLayout("bottleneck", (3, 4, 23, 3)),
    152: ResNetLayout("bottleneck", (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chans: int, width: int, stride: int, act: ActFactory) -> None:
        super().__init__()
        out_chans = width * self.expansion
        self.residual = nn.Sequential(
            ConvBNAct(in_chans, width, 3, stride, act=act()),
            ConvBNAct(width, out_chans, 3),
        )
        self.shortcut = _shortcut(in_chans, out_chans, stride)
        self.act = act()

    def forward(self, x):
        return self.act(self.residual(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_chans: int, width: int, stride: int, act: ActFactory) -> None:
        super().__init__()
        out_chans = width * self.expansion
        self.residual = nn.Sequential(
            ConvBNAct(in_chans, width, 1, act=act()),
            ConvBNAct(width, width, 3, stride, act=act()),
            ConvBNAct(width, out_chans, 1),
        )
        # Zero-init the last BN so each block starts as identity (standard for deep ResNets).
        nn.init.zeros_(self.residual[-1][1].weight)
        self.shortcut = _shortcut(in_chans, out_chans, stride)
        self.act = act()

    def forward(self, x):
        return self.act(self.residual(x) + self.shortcut(x))


def _shortcut(in_chans: int, out_chans: int, stride: int) -> nn.Module:
    if stride == 1 and in_chans == out_chans:
        return nn.Identity()
    return ConvBNAct(in_chans, out_chans, 1, stride)


class ResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, act: ActFactory, stem: str, in_chans: int = 3,
                 width_mult: float = 1.0, depth_mult: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        layout = RESNET_LAYOUTS[depth]
        block = BasicBlock if layout.block == "basic" else Bottleneck
        widths = [round_channels(w * width_mult) for w in STAGE_WIDTHS]
        stem_chans = widths[0]
        if stem == "cifar":  # 3x3 stride 1, no pooling: keeps 32x32 inputs at full resolution
            self.stem = ConvBNAct(in_chans, stem_chans, 3, 1, act=act())
        else:  # 7x7 stride 2 + max-pool: /4 before the first stage
            self.stem = nn.Sequential(ConvBNAct(in_chans, stem_chans, 7, 2, act=act()),
                                      nn.MaxPool2d(3, 2, 1))
        stages, chans = [], stem_chans
        for stage, (width, blocks) in enumerate(zip(widths, layout.blocks_per_stage)):
            repeats = max(1, math.ceil(blocks * depth_mult))
            for index in range(repeats):
                stride = 2 if stage > 0 and index == 0 else 1
                stages.append(block(chans, width, stride, act))
                chans = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(chans, num_classes))
        self.num_features = chans

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))
