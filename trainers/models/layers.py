"""Small layers shared by the model families."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class InputNormalization(nn.Module):
    """(x - mean) / std inside the model, so callers (loaders, attacks) work on images in [0, 1].

    Keeping it in the model means eps is always in pixel scale and a checkpoint carries its own statistics.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"input_mean has {len(mean)} values but input_std has {len(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> activation (omitted when `act` is None)."""

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, act: nn.Module | None = None) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_chans, out_chans, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_chans),
        ]
        if act is not None:
            layers.append(act)
        super().__init__(*layers)


def round_channels(channels: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor`, never dropping more than 10% (EfficientNet's rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return int(rounded)
