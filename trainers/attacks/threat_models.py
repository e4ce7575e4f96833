"""Threat models: where an attack starts, how it steps, and how it is projected back.

The attack loop (`pgd.py`) knows nothing about norms; each threat model here owns its random start, its
steepest-ascent step and its projection onto the eps-ball intersected with the image box [0, 1].
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def _per_example_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped to broadcast against the batch."""
    return tensor.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (tensor.dim() - 1)))


class ThreatModel(ABC):
    def __init__(self, eps: float) -> None:
        self.eps = eps

    @abstractmethod
    def random_start(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A uniformly random point of the eps-ball around `images`, inside [0, 1], drawn from `generator`
        (torch's global RNG when None)."""

    @abstractmethod
    def step(self, adv_images: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        """One steepest-ascent step of length `step_size` in this norm."""

    @abstractmethod
    def project(self, adv_images: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The nearest point to `adv_images` within eps of `images`, clipped to [0, 1]."""


class LinfThreat(ThreatModel):
    def random_start(self, images, generator=None):
        noise = torch.empty_like(images).uniform_(-self.eps, self.eps, generator=generator)
        return (images + noise).clamp(0, 1)

    def step(self, adv_images, grad, step_size):
        return adv_images + step_size * grad.sign()

    def project(self, adv_images, images):
        delta = (adv_images - images).clamp(-self.eps, self.eps)
        return (images + delta).clamp(0, 1)


class L2Threat(ThreatModel):
    def random_start(self, images, generator=None):
        # Uniform in the ball: a Gaussian direction, radius eps * u^(1/d).
        direction = torch.empty_like(images).normal_(generator=generator)
        direction = direction / _per_example_norm(direction)
        dims = images[0].numel()
        radius = self.eps * torch.rand(images.shape[0], device=images.device, generator=generator) ** (1.0 / dims)
        return self.project(images + direction * radius.view(-1, *([1] * (images.dim() - 1))), images)

    def step(self, adv_images, grad, step_size):
        return adv_images + step_size * grad / _per_example_norm(grad)

    def project(self, adv_images, images):
        delta = adv_images - images
        delta = delta * (self.eps / _per_example_norm(delta)).clamp(max=1.0)
        return (images + delta).clamp(0, 1)


THREAT_MODELS: dict[str, type[ThreatModel]] = {"linf": LinfThreat, "l2": L2Threat}
