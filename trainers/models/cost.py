"""Parameter and FLOP counts at a given resolution, for cost reports and Pareto plots."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class ModelCost:
    params: int
    # Multiply-accumulates for one image: what papers (ResNet, EfficientNet, SAT) report as "FLOPs".
    macs: int
    resolution: int

    @property
    def flops(self) -> int:
        """Floating-point operations (2 per multiply-accumulate)."""
        return 2 * self.macs


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_cost(model: nn.Module, resolution: int, in_chans: int = 3) -> ModelCost:
    """Count one forward pass of a single image in eval mode (dropout/drop-path off), on the model's device."""
    parameter = next(model.parameters())
    image = torch.zeros(1, in_chans, resolution, resolution, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image)
    finally:
        model.train(was_training)
    return ModelCost(params=count_parameters(model), macs=counter.get_total_flops() // 2,
                     resolution=resolution)
