"""EfficientNet with compound scaling (Tan & Le 2019), the B0-B7 table and SAT's L1.

Compound scaling: for a coefficient phi, depth x alpha**phi, width x beta**phi, resolution x gamma**phi with
alpha=1.2, beta=1.1, gamma=1.15 (alpha * beta**2 * gamma**2 ~= 2, so FLOPs grow ~2**phi).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainers.models.layers import ConvBNAct, round_channels

ActFactory = Callable[[], nn.Module]

ALPHA, BETA, GAMMA = 1.2, 1.1, 1.15
# Scaling rules with the same FLOPs growth (alpha * beta**2 * gamma**2 = 2 per unit of phi): EfficientNet's
# compound rule, and each dimension alone (EfficientNet's Figure 3 comparison), as (alpha, beta, gamma).
COMPOUND_RULES = {"efficientnet": (ALPHA, BETA, GAMMA), "depth": (2.0, 1.0, 1.0), "width": (1.0, 2 ** 0.5, 1.0),
                  "resolution": (1.0, 1.0, 2 ** 0.5)}
BASE_RESOLUTION = 224


@dataclass(frozen=True)
class EfficientNetScale:
    width_mult: float
    depth_mult: float
    resolution: int
    dropout: float


# The published coefficient table (width, depth, resolution, dropout); L1 is SAT's largest model.
EFFICIENTNET_SCALES: dict[str, EfficientNetScale] = {
    "b0": EfficientNetScale(1.0, 1.0, 224, 0.2),
    "b1": EfficientNetScale(1.0, 1.1, 240, 0.2),
    "b2": EfficientNetScale(1.1, 1.2, 260, 0.3),
    "b3": EfficientNetScale(1.2, 1.4, 300, 0.3),
    "b4": EfficientNetScale(1.4, 1.8, 380, 0.4),
    "b5": EfficientNetScale(1.6, 2.2, 456, 0.4),
    "b6": EfficientNetScale(1.8, 2.6, 528, 0.5),
    "b7": EfficientNetScale(2.0, 3.1, 600, 0.5),
    "l1": EfficientNetScale(3.9, 3.7, 600, 0.5),
}


def compound_scaling(phi: float, alpha: float = ALPHA, beta: float = BETA, gamma: float = GAMMA,
                     base_resolution: int = BASE_RESOLUTION, resolution_multiple: int = 8) -> EfficientNetScale:
    """Depth, width and resolution multipliers for compound coefficient `phi` (dropout: B0's 0.2).

    A scaled resolution is rounded to `resolution_multiple`; phi=0 keeps `base_resolution` as published.
    """
    resolution = base_resolution
    if phi != 0:
        resolution = max(resolution_multiple,
                         round(base_resolution * gamma**phi / resolution_multiple) * resolution_multiple)
    return EfficientNetScale(width_mult=beta**phi, depth_mult=alpha**phi, resolution=resolution, dropout=0.2)


@dataclass(frozen=True)
class StageSpec:
    expand_ratio: int
    kernel_size: int
    stride: int
    out_chans: int
    repeats: int


# EfficientNet-B0's stages; every other size scales these.
B0_STAGES = (
    StageSpec(1, 3, 1, 16, 1),
    StageSpec(6, 3, 2, 24, 2),
    StageSpec(6, 5, 2, 40, 2),
    StageSpec(6, 3, 2, 80, 3),
    StageSpec(6, 5, 1, 112, 3),
    StageSpec(6, 5, 2, 192, 4),
    StageSpec(6, 3, 1, 320, 1),
)
STEM_CHANS, HEAD_CHANS, SE_RATIO = 32, 1280, 0.25


class SqueezeExcite(nn.Module):
    def __init__(self, chans: int, reduced_chans: int, act: ActFactory) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(chans, reduced_chans, 1), act(),
                                  nn.Conv2d(reduced_chans, chans, 1), nn.Sigmoid())

    def forward(self, x):
        return x * self.gate(x)


class MBConv(nn.Module):
    """Inverted residual: expand 1x1 -> depthwise kxk -> squeeze-excite -> project 1x1 (+ skip)."""

    def __init__(self, in_chans: int, out_chans: int, spec: StageSpec, stride: int, act: ActFactory,
                 drop_path: float) -> None:
        super().__init__()
        hidden = in_chans * spec.expand_ratio
        layers: list[nn.Module] = []
        if spec.expand_ratio != 1:
            layers.append(ConvBNAct(in_chans, hidden, 1, act=act()))
        layers += [
            ConvBNAct(hidden, hidden, spec.kernel_size, stride, groups=hidden, act=act()),
            SqueezeExcite(hidden, max(1, int(in_chans * SE_RATIO)), act),
            ConvBNAct(hidden, out_chans, 1),
        ]
        self.block = nn.Sequential(*layers)
        self.use_skip = stride == 1 and in_chans == out_chans
        self.drop_path = drop_path

    def forward(self, x):
        out = self.block(x)
        if not self.use_skip:
            return out
        if self.training and self.drop_path > 0:  # stochastic depth, per example
            keep = 1.0 - self.drop_path
            mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
            out = out * mask / keep
        return x + out


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int, act: ActFactory, width_mult: float = 1.0, depth_mult: float = 1.0,
                 dropout: float = 0.2, drop_path: float = 0.2, in_chans: int = 3) -> None:
        super().__init__()
        stem_chans = round_channels(STEM_CHANS * width_mult)
        self.stem = ConvBNAct(in_chans, stem_chans, 3, 2, act=act())
        repeats = [math.ceil(stage.repeats * depth_mult) for stage in B0_STAGES]
        total_blocks, block_index = sum(repeats), 0
        blocks, chans = [], stem_chans
        for stage, stage_repeats in zip(B0_STAGES, repeats):
            out_chans = round_channels(stage.out_chans * width_mult)
            for index in range(stage_repeats):
                stride = stage.stride if index == 0 else 1
                # Drop-path rate grows linearly with depth, as in the reference implementation.
                rate = drop_path * block_index / total_blocks
                blocks.append(MBConv(chans, out_chans, stage, stride, act, rate))
                chans, block_index = out_chans, block_index + 1
        self.blocks = nn.Sequential(*blocks)
        head_chans = round_channels(HEAD_CHANS * width_mult)
        self.head = nn.Sequential(ConvBNAct(chans, head_chans, 1, act=act()), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Dropout(dropout), nn.Linear(head_chans, num_classes))
        self.num_features = head_chans
        self.stage_repeats = tuple(repeats)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
