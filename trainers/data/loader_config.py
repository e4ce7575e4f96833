"""What a trial asks of its loaders: resolution (with ffcv-imagenet's progressive resizing), crops, order,
sharding. Pure configuration, no FFCV: the processes that only plan trials (the study driver, each trial's Tune
actor) import this and never pay for FFCV's import and numba compilation; `trainers.data.loaders` builds the
FFCV loaders from it on the Train workers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TrainCrop = Literal["random_resized_crop", "resize"]
EvalCrop = Literal["center_crop", "resize"]


def resolution_for_epoch(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int,
                         multiple: int = 32) -> int:
    """ffcv-imagenet's progressive resizing: ``min_res`` up to ``start_ramp``, ``max_res`` from ``end_ramp``,
    linear in between rounded to ``multiple`` (and kept within [min_res, max_res], so small images can use a
    small multiple without the rounding jumping past either end)."""
    if not 0 < min_res <= max_res or start_ramp >= end_ramp or multiple < 1:
        raise ValueError(f"need 0 < min_res <= max_res, start_ramp < end_ramp and multiple >= 1; got "
                         f"min_res={min_res} max_res={max_res} start_ramp={start_ramp} end_ramp={end_ramp} "
                         f"multiple={multiple}")
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interpolated = min_res + (max_res - min_res) * (epoch - start_ramp) / (end_ramp - start_ramp)
    return max(min_res, min(max_res, round(interpolated / multiple) * multiple))


class ProgressiveResizing(BaseModel):
    """Train at ``min_res`` until ``start_ramp``, reach the config's ``resolution`` at ``end_ramp``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_res: int = Field(ge=1)
    start_ramp: int = Field(ge=0)
    end_ramp: int = Field(ge=1)
    multiple: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _ramp_goes_forward(self) -> ProgressiveResizing:
        if self.end_ramp <= self.start_ramp:
            raise ValueError(f"end_ramp ({self.end_ramp}) must be after start_ramp ({self.start_ramp})")
        return self


class LoaderConfig(BaseModel):
    """What a trial asks of its loaders. Endpoint/credentials for s3:// paths are not here: AWS environment."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    batch_size: int = Field(ge=1)
    resolution: int = Field(ge=1, description="final training side length in pixels")
    eval_resolution: int | None = Field(default=None, ge=1, description="default: resolution")
    eval_samples: int | None = Field(default=None, ge=1, description="evaluate a seeded, class-balanced subset "
                                     "of this many samples (the same for every trial); default: all")
    progressive: ProgressiveResizing | None = None
    train_crop: TrainCrop = "random_resized_crop"
    eval_crop: EvalCrop = "center_crop"
    crop_scale: tuple[float, float] = (0.08, 1.0)      # random_resized_crop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)   # random_resized_crop aspect range
    center_crop_ratio: float = Field(default=1.0, gt=0, le=1, description="crop side / short side; "
                                     "1.0 keeps whole small images, ImageNet recipes use 224/256")
    flip_probability: float = Field(default=0.5, ge=0, le=1)
    order: Literal["random", "quasi_random", "sequential"] = "random"
    distributed: bool = False
    seed: int = Field(default=0, ge=0, description="same on every rank: the DDP shards depend on it")
    drop_last: bool = True                             # training only; evaluation keeps every sample
    num_workers: int = Field(default=1, ge=1)
    batches_ahead: int = Field(default=3, ge=1)
    os_cache: bool = True
    cache_dir: Path | None = None                      # local cache for s3:// datasets

    @model_validator(mode="after")
    def _consistent(self) -> LoaderConfig:
        if self.order == "quasi_random" and self.distributed:
            raise ValueError("order='quasi_random' is not available with distributed=True in FFCV 1.0.2; "
                             "use order='random'")
        if self.progressive and self.progressive.min_res > self.resolution:
            raise ValueError(f"progressive.min_res ({self.progressive.min_res}) exceeds resolution "
                             f"({self.resolution})")
        for name, (low, high) in (("crop_scale", self.crop_scale), ("crop_ratio", self.crop_ratio)):
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(low, high)}")
        return self

    def train_resolution(self, epoch: int) -> int:
        if self.progressive is None:
            return self.resolution
        return resolution_for_epoch(epoch, self.progressive.min_res, self.resolution, self.progressive.start_ramp,
                                    self.progressive.end_ramp, self.progressive.multiple)
