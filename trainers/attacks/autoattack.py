"""AutoAttack (Croce & Hein 2020) from an established implementation, the `torchattacks` package: an
independent, parameter-free check that a model's PGD robust accuracy is not inflated by gradient masking.

`torchattacks` is optional and installed without its dependencies (`pip install --no-deps torchattacks==3.5.1`,
as `make setup` does): its metadata asks for torchvision, which this project avoids, but its code never
imports it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from trainers.attacks.pgd import attack_mode
from trainers.errors import ConfigError

AutoAttackVersion = Literal["standard", "apgd"]
# standard: the published ensemble (APGD-CE, APGD-T, FAB-T, Square with 5000 queries).
# apgd: its two gradient attacks only (APGD-CE, then targeted APGD-T on what survives), which find nearly all
# of the standard ensemble's successes at a fraction of the cost (Croce & Hein 2020, Table 2): the CPU check.
AUTOATTACK_VERSIONS: tuple[str, ...] = ("standard", "apgd")
_TORCHATTACKS_NORMS = {"linf": "Linf", "l2": "L2"}


def _torchattacks():
    try:
        import torchattacks
    except ImportError as error:
        raise ConfigError("AutoAttack needs the torchattacks package: pip install --no-deps torchattacks==3.5.1 "
                          "(make setup installs it)") from error
    return torchattacks


def build_autoattack(model: nn.Module, norm: str, eps: float, num_classes: int,
                     version: AutoAttackVersion = "standard", seed: int = 0):
    """A torchattacks attack object: `attack(images, labels)` returns adversarial images in [0, 1]."""
    if norm not in _TORCHATTACKS_NORMS:
        raise ConfigError(f"AutoAttack norm {norm!r} is not supported; use one of {sorted(_TORCHATTACKS_NORMS)}")
    if version not in AUTOATTACK_VERSIONS:
        raise ConfigError(f"AutoAttack version {version!r} is unknown; use one of {list(AUTOATTACK_VERSIONS)}")
    torchattacks = _torchattacks()
    lp = _TORCHATTACKS_NORMS[norm]
    if version == "standard":
        return torchattacks.AutoAttack(model, norm=lp, eps=eps, version="standard", n_classes=num_classes,
                                       seed=seed)
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm=lp, eps=eps, loss="ce", n_restarts=1, seed=seed),
        torchattacks.APGDT(model, norm=lp, eps=eps, n_classes=num_classes, n_restarts=1, seed=seed),
    ])


def autoattack_outcomes(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], norm: str,
                        eps: float, num_classes: int, version: AutoAttackVersion = "standard",
                        seed: int = 0) -> torch.Tensor:
    """Per example of `batches` ([0, 1] float images, labels): correct clean *and* under AutoAttack (its own
    convention: robust never exceeds clean), a bool tensor. BatchNorm in eval mode and the model's true gradient
    (no activation phase) throughout."""
    outcomes = []
    with attack_mode(model):
        attack = build_autoattack(model, norm, eps, num_classes, version, seed)
        for images, labels in batches:
            adversarial = attack(images, labels)
            with torch.no_grad():
                clean = model(images).argmax(dim=1) == labels
                outcomes.append(clean & (model(adversarial).argmax(dim=1) == labels))
    return torch.cat(outcomes)


def autoattack_accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], norm: str,
                        eps: float, num_classes: int, version: AutoAttackVersion = "standard",
                        seed: int = 0) -> float:
    """The share of `batches` correct clean and under AutoAttack."""
    return float(autoattack_outcomes(model, batches, norm, eps, num_classes, version, seed).float().mean())
