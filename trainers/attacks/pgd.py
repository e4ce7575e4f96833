"""The PGD attack loop (L-inf or L2 through a threat model), with SAT's attack-time model state.

While attacking, the model runs with BatchNorm on running statistics (eval mode), and no parameter
requires grad, so the backward pass computes input gradients only: SAT's recipe and a large saving.

The training attack runs in the "attack" activation phase (the ablation's surrogate gradient applies there);
an evaluation attack runs in no phase: it attacks every model through its true gradient, the same way for
every arm. Random starts and clean-start choices draw from the attacker's `generator` (a seeded stream per
epoch in the training loop), so trials with the same seed see the same starts.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from trainers.activations import Phase, activation_phase
from trainers.attacks.threat_models import THREAT_MODELS, ThreatModel


class AttackConfig(BaseModel):
    """A PGD attack. eps and step_size are in pixel scale ([0, 1] images) and accept "4/255" strings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(4 / 255, ge=0)
    step_size: float = Field(1 / 255, gt=0)
    steps: int = Field(1, ge=1, le=10_000)
    random_start: bool = True
    # SAT starts a fraction of the examples (0.2) from the clean image instead of a random point.
    clean_start_prob: float = Field(0.0, ge=0, le=1)
    restarts: int = Field(1, ge=1, le=100)
    # Return each example's strongest iterate, not the last one, so more steps never weaken the attack
    # (one extra forward pass; meant for evaluation).
    keep_best: bool = False
    targeted: bool = False

    @field_validator("eps", "step_size", mode="before")
    @classmethod
    def _fraction(cls, value):
        if isinstance(value, str):
            try:
                return float(Fraction(value.replace(" ", "")))
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"expected a number or a fraction like '4/255', got {value!r}") from None
        return value

    @model_validator(mode="after")
    def _in_range(self) -> AttackConfig:
        if self.norm == "linf" and self.eps > 1:
            raise ValueError("linf eps is in pixel scale [0, 1] (e.g. 4/255); got more than 1")
        if self.steps == 1 and self.eps > 0:
            # One step is projected back onto the eps-ball: from the clean image anything past eps is wasted,
            # and from a random start a step past 2 * eps lands every example on the same boundary point,
            # which is plain FGSM again (the setting that overfits catastrophically).
            limit, start = (2 * self.eps, "a random start") if self.random_start else (self.eps, "the clean image")
            if self.step_size > limit:
                raise ValueError(
                    f"step_size ({self.step_size:g}) exceeds {'2 * ' if self.random_start else ''}eps ({limit:g}) "
                    f"with steps=1 from {start}: the step is clipped back to the eps-ball; use step_size <= "
                    f"{limit:g} (FGSM with random start: random_start: true, step_size 1.25 * eps), or more steps")
        return self

    @classmethod
    def fgsm_rs(cls, eps: float, **overrides) -> AttackConfig:
        """FGSM with random start (fast adversarial training): one step of 1.25 * eps."""
        return cls(eps=eps, step_size=1.25 * eps, steps=1, random_start=True, **overrides)


@contextlib.contextmanager
def attack_mode(model: nn.Module, phase: Phase | None = None) -> Iterator[None]:
    """Eval-mode BatchNorm, frozen parameters and the activation `phase` (None: the model's true gradient);
    restored on exit."""
    was_training = model.training
    requires_grad = [param.requires_grad for param in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        with activation_phase(phase):
            yield
    finally:
        model.train(was_training)
        for param, flag in zip(model.parameters(), requires_grad):
            param.requires_grad_(flag)


@dataclass
class _Candidate:
    """Adversarial images with, per example, whether they fool the model and the attack objective."""

    images: torch.Tensor
    fooled: torch.Tensor | None = None
    objective: torch.Tensor | None = None


def _stronger(best: _Candidate | None, candidate: _Candidate) -> _Candidate:
    """Per example, the stronger of two candidates: fooling beats not fooling, then the higher objective."""
    if best is None:
        return candidate
    better = (candidate.fooled & ~best.fooled) | (
        (candidate.fooled == best.fooled) & (candidate.objective > best.objective))
    per_image = better.view(-1, *([1] * (candidate.images.dim() - 1)))
    return _Candidate(torch.where(per_image, candidate.images, best.images), best.fooled | candidate.fooled,
                      torch.where(better, candidate.objective, best.objective))


def _stronger_at(best: _Candidate | None, candidate: _Candidate, index: torch.Tensor) -> _Candidate:
    """`_stronger` for the examples `index` of `best` (a whole batch), `candidate` holding just those; the
    first candidate of a batch covers all of it."""
    if best is None:
        return candidate
    chosen = _stronger(_Candidate(best.images[index], best.fooled[index], best.objective[index]), candidate)
    best.images[index], best.fooled[index], best.objective[index] = chosen.images, chosen.fooled, chosen.objective
    return best


class PGDAttacker:
    """Projected gradient descent on the cross-entropy loss.

    `perturb` returns adversarial images. With `restarts > 1` (and, with `keep_best`, across iterates) it
    keeps, per example, the worst case for the model: fooling it beats not fooling it, then higher loss wins.
    An evaluation attack stops attacking an example once it is fooled (with `keep_best`, from the iterate
    that fooled it; later restarts go to the examples not fooled yet): its outcome can no longer change, and
    the model, in eval mode, treats every example on its own. AutoAttack does the same; on a robust model most
    of the cost goes to the examples that resist.
    `autocast_dtype` (torch.bfloat16/float16) runs the model under autocast; the images stay fp32.
    `phase`: "attack" for the training attack (the ablation's surrogate gradient), None to evaluate.
    `generator`: where random starts, clean starts and random targets come from (None: torch's global RNG).
    """

    def __init__(self, config: AttackConfig, autocast_dtype: torch.dtype | None = None, phase: Phase | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.config = config
        self.threat: ThreatModel = THREAT_MODELS[config.norm](config.eps)
        self.autocast_dtype = autocast_dtype
        self.phase = phase
        self.generator = generator

    def perturb(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                target_labels: torch.Tensor | None = None) -> torch.Tensor:
        images = images.detach()
        if self.config.eps == 0:
            return images.clone()
        with attack_mode(model, self.phase):
            if self.config.targeted and target_labels is None:
                target_labels = self._random_targets(model, images, labels)
            attacked_labels = target_labels if self.config.targeted else labels
            best = self._run(model, images, labels, attacked_labels)
            for _ in range(self.config.restarts - 1):
                remaining = torch.nonzero(~best.fooled).view(-1)
                if remaining.numel() == 0:
                    break
                best = _stronger_at(best, self._run(model, images[remaining], labels[remaining],
                                                    attacked_labels[remaining]), remaining)
            return best.images

    def _logits(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return model(images).float()

    def _scored(self, images, logits, labels, attacked_labels) -> _Candidate:
        """`images` with the per-example outcome of `logits` (their predictions)."""
        predictions = logits.detach().argmax(dim=1)
        fooled = predictions == attacked_labels if self.config.targeted else predictions != labels
        return _Candidate(images.detach(), fooled, self._objective(logits.detach(), attacked_labels))

    def _objective(self, logits: torch.Tensor, attacked_labels: torch.Tensor) -> torch.Tensor:
        """Per-example quantity the attack increases: CE to the label, or minus CE to the target."""
        loss = F.cross_entropy(logits, attacked_labels, reduction="none")
        return -loss if self.config.targeted else loss

    def _run(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             attacked_labels: torch.Tensor) -> _Candidate:
        config = self.config
        adv_images = self.threat.random_start(images, self.generator) if config.random_start else images.clone()
        if config.random_start and config.clean_start_prob > 0:
            from_clean = torch.rand(images.shape[0], device=images.device,
                                    generator=self.generator) < config.clean_start_prob
            adv_images = torch.where(from_clean.view(-1, *([1] * (images.dim() - 1))), images, adv_images)
        if not config.keep_best:
            for _ in range(config.steps):
                adv_images = self._step(model, adv_images, images, attacked_labels)[0]
            if config.restarts == 1:
                return _Candidate(adv_images)  # training: no scoring pass needed
            with torch.no_grad():
                return self._scored(adv_images, self._logits(model, adv_images), labels, attacked_labels)
        best, active = None, torch.arange(images.shape[0], device=images.device)  # the examples not fooled yet
        for _ in range(config.steps):
            stepped, scored = self._step(model, adv_images[active], images[active], attacked_labels[active],
                                         labels[active])
            best = _stronger_at(best, scored, active)
            adv_images[active] = stepped
            active = active[~scored.fooled]
            if active.numel() == 0:
                return best
        with torch.no_grad():
            final = adv_images[active]
            return _stronger_at(best, self._scored(final, self._logits(model, final), labels[active],
                                                   attacked_labels[active]), active)

    def _input_gradient(self, objective: torch.Tensor, logits: torch.Tensor, adv_images: torch.Tensor
                        ) -> torch.Tensor:
        """d objective.sum() / d images (summed, so each example's gradient is independent of the batch size).
        Under fp16 autocast the backward pass runs in half precision, where the small gradients of confident
        predictions underflow to zero (a zero sign step: an attack weaker than it reports). So each example's
        gradient at the logits is scaled to a largest entry of 1 before it enters the network: a positive factor
        per example, which changes no step (each follows its own gradient's direction), as GradScaler scales a
        training loss."""
        if self.autocast_dtype != torch.float16:
            (grad,) = torch.autograd.grad(objective.sum(), adv_images)
            return grad
        (logit_grad,) = torch.autograd.grad(objective.sum(), logits, retain_graph=True)
        largest = logit_grad.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        (grad,) = torch.autograd.grad(logits, adv_images, grad_outputs=logit_grad / largest)
        return grad

    def _step(self, model: nn.Module, adv_images: torch.Tensor, images: torch.Tensor, attacked_labels: torch.Tensor,
              labels: torch.Tensor | None = None) -> tuple[torch.Tensor, _Candidate | None]:
        """One PGD step from `adv_images`; with `labels`, also the outcome of the iterate it started from."""
        adv_images = adv_images.detach().requires_grad_(True)
        logits = self._logits(model, adv_images)
        objective = self._objective(logits, attacked_labels)
        scored = self._scored(adv_images, logits, labels, attacked_labels) if labels is not None else None
        grad = self._input_gradient(objective, logits, adv_images)
        stepped = self.threat.step(adv_images.detach(), grad, self.config.step_size)
        return self.threat.project(stepped, images), scored

    @torch.no_grad()
    def _random_targets(self, model, images, labels) -> torch.Tensor:
        num_classes = self._logits(model, images[:1]).shape[1]
        offsets = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=self.generator)
        return (labels + offsets) % num_classes
