"""Model registry: `build_model(arch, num_classes, activation=..., ...)` for every family.

A model's full description (`ModelConfig`, resolved: resolution, stem, dropout filled in) is attached as
`model.spec`, so the data loader can follow the resolution the model was scaled for.

`width_mult`, `depth_mult` and `compound_phi` are relative to the architecture's own scale: for
`efficientnet_b3`, width_mult=1 means B3's 1.2. `compound_phi` applies a compound rule on top: depth x
compound_alpha**phi, width x compound_beta**phi, and the input side `base_resolution` (default: the arch's) x
compound_gamma**phi; the coefficients default to EfficientNet's (1.2, 1.1, 1.15). A `resolution` fixes the
input side outright, whatever phi says.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

from trainers.activations import activation_factory, activation_params, build_activation
from trainers.errors import ConfigError, one_of, validated
from trainers.models.cost import ModelCost, count_cost
from trainers.models.efficientnet import (ALPHA, BETA, EFFICIENTNET_SCALES, GAMMA, EfficientNet, EfficientNetScale,
                                          compound_scaling)
from trainers.models.layers import InputNormalization
from trainers.models.resnet import RESNET_LAYOUTS, ResNet
from trainers.seeding import seeded

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_RESOLUTION, MAX_RESOLUTION = 8, 2048  # input side lengths in pixels a model may be built for
# Below this input size the ImageNet stem's /4 downsampling throws away most of the image.
CIFAR_STEM_MAX_RESOLUTION = 64


@dataclass(frozen=True)
class ArchEntry:
    family: Literal["resnet", "efficientnet"]
    scale: EfficientNetScale  # the architecture's own width, depth, resolution, dropout
    build: Callable[..., nn.Module]


ARCHS: dict[str, ArchEntry] = {
    **{f"resnet{depth}": ArchEntry("resnet", EfficientNetScale(1.0, 1.0, 224, 0.0), partial(ResNet, depth))
       for depth in RESNET_LAYOUTS},
    **{f"efficientnet_{name}": ArchEntry("efficientnet", scale, EfficientNet)
       for name, scale in EFFICIENTNET_SCALES.items()},
}


class ModelConfig(BaseModel):
    """Everything that determines a model's architecture; validated, frozen, JSON-serialisable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    num_classes: int = Field(gt=1)
    activation: str = "relu"
    activation_params: dict[str, Any] = Field(default_factory=dict)
    width_mult: float = Field(1.0, gt=0, le=16)
    depth_mult: float = Field(1.0, gt=0, le=16)
    compound_phi: float = Field(0.0, ge=-4, le=12)
    # The compound rule phi applies (EfficientNet's unless a study searches another); absent in configs stored
    # before they existed, which therefore read exactly as they were written.
    compound_alpha: float = Field(ALPHA, gt=0)
    compound_beta: float = Field(BETA, gt=0)
    compound_gamma: float = Field(GAMMA, gt=0)
    # The input side at phi=0 that compound_gamma**phi grows (None: the arch's own).
    base_resolution: int | None = Field(None, ge=MIN_RESOLUTION, le=MAX_RESOLUTION)
    # A fixed input side: overrides what base_resolution and phi would give.
    resolution: int | None = Field(None, ge=MIN_RESOLUTION, le=MAX_RESOLUTION)
    in_chans: int = Field(3, ge=1)
    stem: Literal["cifar", "imagenet"] | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    drop_path: float = Field(0.0, ge=0, lt=1)
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        return one_of(arch, ARCHS, "arch")

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, activation: str) -> str:
        activation_params(activation)  # ConfigError (a ValueError) naming the valid activations
        return activation

    @field_validator("activation_params")
    @classmethod
    def _params_fit_activation(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Checked here, not only when the model is built, so a study rejects e.g. relu with a beta up front.
        if "activation" in info.data:  # else the activation itself was rejected
            try:
                build_activation(info.data["activation"], **params)
            except TypeError as error:  # a value of the wrong type, e.g. a string beta
                raise ValueError(f"activation {info.data['activation']!r}: {error}") from None
        return params

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.stem is not None and ARCHS[self.arch].family != "resnet":
            raise ValueError("stem applies to resnet archs only; remove it")
        for name in ("input_mean", "input_std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.in_chans:
                raise ValueError(f"{name} needs {self.in_chans} values (one per input channel)")
        if self.input_std is not None and min(self.input_std) <= 0:
            raise ValueError("input_std values must be positive")
        resolution = self.scale.resolution
        if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            raise ValueError(f"compound_phi {self.compound_phi:g} scales {self.arch}'s resolution to {resolution} px, "
                             f"outside [{MIN_RESOLUTION}, {MAX_RESOLUTION}]; lower compound_phi or set resolution")
        return self

    def resolved(self) -> ModelConfig:
        """This config with resolution, stem, dropout and normalization filled in from the arch."""
        scale = self.scale
        updates: dict[str, Any] = {
            "resolution": scale.resolution,
            "dropout": scale.dropout,
            "input_mean": self.input_mean or (IMAGENET_MEAN if self.in_chans == 3 else (0.5,) * self.in_chans),
            "input_std": self.input_std or (IMAGENET_STD if self.in_chans == 3 else (0.5,) * self.in_chans),
        }
        if ARCHS[self.arch].family == "resnet" and self.stem is None:
            updates["stem"] = "cifar" if scale.resolution <= CIFAR_STEM_MAX_RESOLUTION else "imagenet"
        return self.model_copy(update=updates)

    @property
    def scale(self) -> EfficientNetScale:
        """Effective width, depth, resolution and dropout: the arch's own, times the multipliers and the
        compound rule at phi."""
        base = ARCHS[self.arch].scale
        compound = compound_scaling(self.compound_phi, self.compound_alpha, self.compound_beta, self.compound_gamma,
                                    base_resolution=self.base_resolution or base.resolution)
        return EfficientNetScale(
            width_mult=base.width_mult * self.width_mult * compound.width_mult,
            depth_mult=base.depth_mult * self.depth_mult * compound.depth_mult,
            resolution=self.resolution or compound.resolution,
            dropout=base.dropout if self.dropout is None else self.dropout,
        )


def build_model(arch: str, num_classes: int, seed: int | None = None, **options: Any) -> nn.Module:
    """Build `arch` (see `ARCHS`) with the activation by name, e.g.

    `build_model("resnet50", 1000, activation="silu", seed=0)`,
    `build_model("efficientnet_b0", 10, activation="parametric_softplus", activation_params={"beta": 5})`.
    Options are the fields of `ModelConfig`. Inputs are images in [0, 1]; normalization is inside. With `seed`
    the initial weights are a function of (config, seed) alone; models that differ only in their activation
    get identical weights. Without it they come from torch's global RNG.
    """
    config = validated(ModelConfig, {"arch": arch, "num_classes": num_classes, **options})
    return build_model_from_config(config, seed)


def build_model_from_config(config: ModelConfig, seed: int | None = None) -> nn.Module:
    """The model `config` describes; with `seed`, initialised from the seed's `init` stream (the caller's RNG
    state is left as it was)."""
    with seeded(seed, "init") if seed is not None else contextlib.nullcontext():
        return _build_network(config)


def _build_network(config: ModelConfig) -> nn.Module:
    spec = config.resolved()
    act = activation_factory(spec.activation, **spec.activation_params)
    entry = ARCHS[spec.arch]
    common = dict(num_classes=spec.num_classes, act=act, in_chans=spec.in_chans,
                  width_mult=spec.scale.width_mult, depth_mult=spec.scale.depth_mult, dropout=spec.dropout)
    if entry.family == "resnet":
        if spec.drop_path:
            raise ConfigError("drop_path is implemented for efficientnet archs only; set it to 0")
        network = entry.build(stem=spec.stem, **common)
    else:
        network = entry.build(drop_path=spec.drop_path, **common)
    return SATModel(spec, network)


class SATModel(nn.Module):
    """A network behind its input normalization, carrying its resolved `spec`."""

    def __init__(self, spec: ModelConfig, network: nn.Module) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = InputNormalization(spec.input_mean, spec.input_std)
        self.network = network

    def forward(self, images):
        return self.network(self.normalize(images))

    def cost(self, resolution: int | None = None) -> ModelCost:
        """Parameters and FLOPs for one image at `resolution` (default: the spec's)."""
        return count_cost(self, resolution or self.spec.resolution, self.spec.in_chans)


__all__ = ["ARCHS", "ModelConfig", "ModelCost", "SATModel", "build_model", "build_model_from_config",
           "compound_scaling", "EFFICIENTNET_SCALES"]
