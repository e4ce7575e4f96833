"""One trial, fully described: model, SAT training recipe, data, workers and batch/LR arithmetic.

This is the object a study's search space produces and a Ray Train worker consumes (as a plain dict at the
Ray boundary: `TrialConfig.model_dump(mode="json")` there, `TrialConfig.parse(...)` back).
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainers.data.errors import StagingError
from trainers.data.loader_config import LoaderConfig, ProgressiveResizing
from trainers.data.s3 import S3Uri
from trainers.errors import one_of, validated
from trainers.models import ModelConfig
from trainers.training import TrainConfig

# LoaderConfig fields a trial sets itself (from the model, the batch arithmetic and the worker count).
_DERIVED_LOADER_FIELDS = frozenset({"batch_size", "resolution", "distributed", "seed", "progressive",
                                    "eval_samples"})
# What each worker asks of its node's `accelerator_type:<name>` resource (Ray's ScalingConfig uses the same).
ACCELERATOR_CONSTRAINT = 0.001


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    train_path: str = Field(min_length=1, description="a .beton file (with its manifest) or s3://bucket/key")
    eval_path: str = Field(min_length=1)
    # FFCV decoding threads per Train worker (FFCV refuses more than the worker's visible cores).
    loader_workers: int = Field(1, ge=1)
    # numba's optimisation level (NUMBA_OPT, 0-3) for the loader pipeline FFCV compiles in every worker. None: 0 on
    # CPU workers, where compiling at 0 starts a trial seconds sooner and the loader, at 0.3-0.5x its rate at 3,
    # still outruns CPU adversarial training 40x or more; 3 (numba's default) with GPUs (benchmarks/README.md).
    jit_opt_level: int | None = Field(None, ge=0, le=3)
    progressive: ProgressiveResizing | None = None
    # Any other LoaderConfig field (crops, flips, order, eval_resolution, cache_dir, ...).
    loader_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("train_path", "eval_path")
    @classmethod
    def _local_or_s3(cls, path: str) -> str:
        if path.lower().startswith("s3:"):
            try:
                S3Uri.parse(path)
            except StagingError as error:
                raise ValueError(str(error)) from None
        elif "://" in path:
            raise ValueError(f"scheme {path.partition('://')[0]!r} is not supported; accepted: a local .beton path "
                             "or s3://BUCKET/KEY")
        return path

    @model_validator(mode="after")
    def _known_loader_options(self) -> DataConfig:
        derived = sorted(_DERIVED_LOADER_FIELDS & set(self.loader_options))
        if derived:
            raise ValueError(f"loader_options may not set {derived}: they come from the model, "
                             "global_batch_size, workers and train (seed, max_eval_batches)")
        validated(LoaderConfig, {"batch_size": 1, "resolution": 32, **self.loader_options},
                  prefix="data.loader_options")
        return self


class WorkersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    num_workers: int = Field(1, ge=1, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    # Ray's name for the accelerator (`ray.util.accelerators`: A10G, A100, H100, ...): the workers go only to nodes
    # that advertise it, which pins a trial to a node type (GPU nodes detect it; cluster/ node types declare it).
    accelerator_type: str | None = None

    @field_validator("accelerator_type")
    @classmethod
    def _known_accelerator(cls, accelerator_type: str | None) -> str | None:
        if accelerator_type is None:
            return None
        import ray.util.accelerators.accelerators as ray_accelerators  # only when set: it imports Ray

        names = {value for name, value in vars(ray_accelerators).items() if name.isupper() and isinstance(value, str)}
        return one_of(accelerator_type, names, "accelerator type (Ray's names, case-sensitive)")

    @property
    def torch_threads(self) -> int:
        """Intra-op threads per worker: its whole CPUs, at least one."""
        return max(1, int(self.cpus_per_worker))

    def resources_per_worker(self) -> dict[str, float]:
        """One worker's Ray resources (its placement-group bundle)."""
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        if self.accelerator_type:
            # Ray's own constraint for ScalingConfig(accelerator_type=...): a sliver of the node's
            # `accelerator_type:<name>` resource, so any number of workers fit beside it.
            resources[f"accelerator_type:{self.accelerator_type}"] = ACCELERATOR_CONSTRAINT
        return resources


class TrialConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig
    train: TrainConfig = TrainConfig()
    data: DataConfig
    workers: WorkersConfig = WorkersConfig()
    # Images per optimizer step over all workers; each worker gets global_batch_size / num_workers.
    global_batch_size: int = Field(256, ge=1)
    # train.optimizer.lr is the LR for reference_batch_size; the scaled LR is what the optimizer uses.
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    reference_batch_size: int = Field(256, ge=1)
    checkpoints_to_keep: int | None = Field(None, ge=1, description="None keeps every epoch's checkpoint")
    # Worker-group restarts Ray Train allows (each resumes from the last checkpoint); -1 for unlimited.
    max_failures: int = Field(0, ge=-1)

    @model_validator(mode="after")
    def _batch_divides(self) -> TrialConfig:
        if self.global_batch_size % self.workers.num_workers:
            raise ValueError(f"global_batch_size ({self.global_batch_size}) must be divisible by "
                             f"workers.num_workers ({self.workers.num_workers}); change one of them")
        if self.data.progressive and self.data.progressive.min_res > self.resolution:
            raise ValueError(f"data.progressive.min_res ({self.data.progressive.min_res}) exceeds the model's "
                             f"resolution ({self.resolution}); lower min_res to at most {self.resolution}")
        return self

    @classmethod
    def parse(cls, values: dict[str, Any]) -> TrialConfig:
        """Validate a plain dict, with a ConfigError naming each bad field."""
        return validated(cls, values)

    @property
    def resolution(self) -> int:
        return self.model.resolved().resolution

    @property
    def per_worker_batch_size(self) -> int:
        return self.global_batch_size // self.workers.num_workers

    @property
    def scaled_lr(self) -> float:
        ratio = self.global_batch_size / self.reference_batch_size
        factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[self.lr_scaling]
        return self.train.optimizer.lr * factor

    def effective_train_config(self) -> TrainConfig:
        """`train` with the scaled learning rate: what the workers actually run."""
        optimizer = self.train.optimizer.model_copy(update={"lr": self.scaled_lr})
        return self.train.model_copy(update={"optimizer": optimizer})

    def loader_config(self) -> LoaderConfig:
        """The workers' loaders; `train.max_eval_batches` becomes a class-balanced evaluation subset of that many
        global batches' worth of images (the same images for every trial of a study)."""
        eval_samples = self.train.max_eval_batches * self.global_batch_size if self.train.max_eval_batches else None
        return LoaderConfig(batch_size=self.per_worker_batch_size, resolution=self.resolution,
                            distributed=self.workers.num_workers > 1, seed=self.train.seed, eval_samples=eval_samples,
                            num_workers=self.data.loader_workers, progressive=self.data.progressive,
                            **self.data.loader_options)

    def loader_jit_opt_level(self) -> int:
        """`data.jit_opt_level`, or its default for these workers (0 on CPUs, 3 with GPUs)."""
        if self.data.jit_opt_level is not None:
            return self.data.jit_opt_level
        return 3 if self.workers.use_gpu else 0

    def batch_summary(self) -> dict[str, float]:
        """The batch and LR arithmetic, logged with every run."""
        return {"global_batch_size": self.global_batch_size, "per_worker_batch_size": self.per_worker_batch_size,
                "num_workers": self.workers.num_workers, "base_lr": self.train.optimizer.lr,
                "scaled_lr": self.scaled_lr, "reference_batch_size": self.reference_batch_size}
