"""The SAT training and evaluation loop (single process; the Ray Train loop wraps these pieces).

Each step attacks the batch (BatchNorm in eval mode, input gradients only), then updates the network on the
adversarial batch, optionally mixed with the clean one. SGD with Nesterov momentum, weight decay, label
smoothing, warm-up then cosine or step decay. Loaders yield (images, labels): images (N, C, H, W) as uint8
[0, 255] or float [0, 1]; a loader with `set_epoch(epoch)` (resolution schedules, samplers) is told the epoch.

Randomness comes from streams of `config.seed` per rank and epoch (`trainers.seeding`): an epoch's dropout and
attack starts do not depend on what ran before it, so a trial resumed at an epoch boundary continues exactly as
an uninterrupted one. The initial weights are the model builder's: `build_model(..., seed=config.seed)`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from trainers.activations import activation_phase
from trainers.attacks import AttackConfig, PGDAttacker
from trainers.faults import maybe_fault
# seed_everything is re-exported: scripts and tests import it from here.
from trainers.seeding import seed_epoch, seed_everything, stream_generator, use_deterministic_algorithms  # noqa: F401

AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU features under which oneDNN computes bf16 natively (torch.cpu's probes; absent ones count as no).
_CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 natively, so bf16 autocast is faster rather than emulated: CUDA GPUs of
    compute capability 8.0+ (Ampere on), CPUs with AVX512-BF16 or AMX (benchmarks/README.md: 2.1x fp32 on such
    a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in _CPU_BF16_PROBES)
    return False


class DivergenceError(RuntimeError):
    """The training loss stopped being finite; the run cannot continue meaningfully."""


class OptimizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(0.1, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    # Applied to conv/linear weights only: decaying BatchNorm scales, biases or a learnable activation
    # beta towards zero is not regularisation.
    weight_decay: float = Field(5e-4, ge=0, lt=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    # Step schedule: multiply the LR by `gamma` at each of these fractions of training.
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = Field(0.1, gt=0, le=1)

    @model_validator(mode="after")
    def _milestones_in_range(self) -> OptimizerConfig:
        if any(not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError("milestones are increasing fractions of training in (0, 1), e.g. [0.5, 0.75]")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0; set nesterov: false or a momentum")
        return self


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(1, ge=1, le=10_000)
    optimizer: OptimizerConfig = OptimizerConfig()
    # None trains on clean images (the baseline SAT compares against).
    train_attack: AttackConfig | None = AttackConfig(eps=4 / 255, step_size=4 / 255, steps=1,
                                                     clean_start_prob=0.2)
    eval_attack: AttackConfig | None = AttackConfig(eps=4 / 255, step_size=1 / 255, steps=10, keep_best=True)
    # 1.0: update on adversarial images only; 0.5: half clean, half adversarial loss.
    adv_loss_weight: float = Field(1.0, ge=0, le=1)
    # "auto": bf16 where the device computes it natively (native_bf16), else off; resolved where the device is
    # known (`for_device`: the worker, `fit`), so a study's trials on one kind of node all train alike.
    amp: Literal["off", "bf16", "fp16", "auto"] = "off"
    channels_last: bool = False
    # torch.compile the model (attack and update both run the compiled graph).
    compile: bool = False
    seed: int = Field(0, ge=0)
    # Cap evaluation cost per epoch (None: the whole eval set). A trial's workers evaluate a seeded,
    # class-balanced subset of this many batches' worth of images; `fit` the first batches of its loader.
    max_eval_batches: int | None = Field(None, ge=1)
    # CUDA: deterministic kernels only (trainers.seeding.use_deterministic_algorithms). CPU runs are
    # reproducible without it.
    deterministic: bool = False

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainConfig:
        if self.optimizer.warmup_epochs >= self.epochs and self.optimizer.warmup_epochs > 0:
            raise ValueError(f"optimizer.warmup_epochs ({self.optimizer.warmup_epochs}) must be shorter "
                             f"than epochs ({self.epochs})")
        return self

    def for_device(self, device: torch.device | str) -> TrainConfig:
        """This config with `amp: auto` resolved for `device` (itself when amp is explicit)."""
        if self.amp != "auto":
            return self
        return self.model_copy(update={"amp": "bf16" if native_bf16(device) else "off"})

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        if self.amp == "auto":
            raise ValueError("amp: auto depends on the device: use config.for_device(device) first")
        return AMP_DTYPES[self.amp]


def lr_multiplier(step: int, steps_per_epoch: int, epochs: int, config: OptimizerConfig) -> float:
    """The LR factor at optimizer step `step`: linear warm-up, then cosine, step or constant."""
    epoch = step / steps_per_epoch
    if epoch < config.warmup_epochs:
        return (step + 1) / (config.warmup_epochs * steps_per_epoch)
    if config.schedule == "constant":
        return 1.0
    progress = (epoch - config.warmup_epochs) / (epochs - config.warmup_epochs)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return config.gamma ** sum(epoch / epochs >= milestone for milestone in config.milestones)


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.SGD:
    decayed = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    not_decayed = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.SGD(
        [{"params": decayed, "weight_decay": config.weight_decay},
         {"params": not_decayed, "weight_decay": 0.0}],
        lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step, so warm-up and decay are smooth within epochs."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_multiplier, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                           config=config.optimizer))


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to `device` as float images in [0, 1] and int64 labels."""
    images = images.to(device, non_blocking=True)
    images = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True).long().view(-1)


def optimize_for_device(model: nn.Module, config: TrainConfig) -> nn.Module:
    """The module to train: `model` in channels_last memory format and/or compiled, as `config` asks.

    Parameters are shared with `model`, so its state dict stays the one to checkpoint.
    """
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if config.compile else model


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel: attacks need no gradient synchronisation."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks when torch.distributed is running (else unchanged), on its device."""
    if not _distributed():
        return tensor
    backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    reduced = tensor.to(backend_device, copy=True)
    torch.distributed.all_reduce(reduced)
    return reduced.to(tensor.device)


def global_sum(*values: torch.Tensor | float) -> list[float]:
    """Each value summed over all ranks (one all-reduce for all of them)."""
    return all_reduce_sum(torch.tensor([float(v) for v in values], dtype=torch.float64)).tolist()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _world_size() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig,
                    device: torch.device, scaler: torch.amp.GradScaler | None = None,
                    epoch: int = 0) -> dict[str, float]:
    """One pass over `loader` (epoch `epoch`): attack each batch, then update on it. Returns the epoch's train
    metrics (summed over ranks under torch.distributed)."""
    rank = _rank()
    seed_epoch(config.seed, rank, epoch)
    attacker = PGDAttacker(config.train_attack, config.autocast_dtype, phase="attack",
                           generator=stream_generator(config.seed, "train_attack", rank, epoch, device=device)
                           ) if config.train_attack else None
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    weight = config.adv_loss_weight if attacker else 0.0
    smoothing = config.optimizer.label_smoothing
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, lr, start = 0, optimizer.param_groups[0]["lr"], time.perf_counter()
    model.train()
    for images, labels, *_ in loader:
        images, labels = to_device(images, labels, device, config.channels_last)
        if attacker:
            maybe_fault("attack")
        adv_images = attacker.perturb(unwrap_parallel(model), images, labels) if attacker else images
        with activation_phase("update"), _autocast(device, config.autocast_dtype):
            if weight in (0.0, 1.0):
                logits = model(adv_images if weight else images).float()
                loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
            else:
                clean_logits, logits = model(torch.cat([images, adv_images])).float().chunk(2)
                loss = ((1 - weight) * F.cross_entropy(clean_logits, labels, label_smoothing=smoothing)
                        + weight * F.cross_entropy(logits, labels, label_smoothing=smoothing))
        diverged = int(all_reduce_sum((~torch.isfinite(loss.detach())).int()).item())
        if diverged:  # decided by every rank together: one raising alone would leave the others in the all-reduce
            raise DivergenceError(f"training loss is not finite on {diverged} of {_world_size()} rank(s) (here: "
                                  f"{loss.item()}) after {seen} images (lr {optimizer.param_groups[0]['lr']:.4g}); "
                                  "lower the lr or add warm-up")
        optimizer.zero_grad(set_to_none=True)
        with activation_phase("update"):
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        maybe_fault("optimizer_step")
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.argmax(dim=1) == labels).sum()
        seen += labels.shape[0]
    elapsed = time.perf_counter() - start
    loss_total, correct_total, seen_total = global_sum(loss_sum, correct, seen)
    return {
        "train_loss": loss_total / max(seen_total, 1),
        # Accuracy on the batches the network was updated on (adversarial ones under AT).
        "train_robust_acc": correct_total / max(seen_total, 1),
        "images_per_s": seen_total / elapsed if elapsed > 0 else 0.0,
        "lr": lr,
    }


def iter_outcomes(model: nn.Module, loader: Iterable, attack: AttackConfig | None, device: torch.device,
                  autocast_dtype: torch.dtype | None = None, max_batches: int | None = None,
                  channels_last: bool = False, generator: torch.Generator | None = None):
    """Per batch of `loader`, whether each example is classified correctly clean and, with `attack`, robustly
    (correct clean *and* under the attack, AutoAttack's convention, so robust never exceeds clean): two bool
    tensors, the second None without an attack. The attack sees the model's true gradient (no activation
    phase), whatever its activation."""
    attacker = PGDAttacker(attack, autocast_dtype, phase=None, generator=generator) if attack else None
    model.eval()
    for batch_index, (images, labels, *_) in enumerate(loader):
        if max_batches is not None and batch_index >= max_batches:
            break
        images, labels = to_device(images, labels, device, channels_last)
        with torch.no_grad(), _autocast(device, autocast_dtype):
            clean = model(images).argmax(dim=1) == labels
        robust = None
        if attacker:
            adv_images = attacker.perturb(unwrap_parallel(model), images, labels)
            with torch.no_grad(), _autocast(device, autocast_dtype):
                robust = clean & (model(adv_images).argmax(dim=1) == labels)
        yield clean, robust


# The per-epoch metrics of train_one_epoch and evaluate that a study can rank its trials by (Tune's metric), with
# the direction that is better. robust_acc is reported only by trials with an eval attack.
OBJECTIVES: dict[str, Literal["max", "min"]] = {
    "robust_acc": "max", "clean_acc": "max", "train_robust_acc": "max", "train_loss": "min", "images_per_s": "max"}


def objectives(config: TrainConfig) -> dict[str, Literal["max", "min"]]:
    """The OBJECTIVES every epoch of a trial with `config` reports."""
    return {name: mode for name, mode in OBJECTIVES.items() if name != "robust_acc" or config.eval_attack}


def evaluate(model: nn.Module, loader: Iterable, attack: AttackConfig | None, device: torch.device,
             autocast_dtype: torch.dtype | None = None, max_batches: int | None = None,
             channels_last: bool = False, seed: int = 0, epoch: int = 0) -> dict[str, float]:
    """Clean accuracy and, with `attack`, accuracy under it (`robust_acc`), and how many images they count
    (`eval_images`); over all ranks' shards. The attack's
    random starts come from the `eval_attack` stream of (`seed`, rank, `epoch`)."""
    generator = stream_generator(seed, "eval_attack", _rank(), epoch, device=device)
    # Device-side counters: no host sync per batch on a GPU.
    clean_correct = torch.zeros((), device=device, dtype=torch.long)
    robust_correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for clean, robust in iter_outcomes(model, loader, attack, device, autocast_dtype, max_batches, channels_last,
                                       generator):
        clean_correct += clean.sum()
        if robust is not None:
            robust_correct += robust.sum()
        seen += clean.numel()
    clean_correct, robust_correct, seen = global_sum(clean_correct, robust_correct, seen)
    metrics = {"clean_acc": clean_correct / max(seen, 1), "eval_images": int(seen)}
    if attack:
        metrics["robust_acc"] = robust_correct / max(seen, 1)
    return metrics


def fit(model: nn.Module, train_loader: Iterable, eval_loader: Iterable | None, config: TrainConfig,
        device: torch.device | str | None = None,
        on_epoch_end: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Train `model` for `config.epochs` and return one metrics dict per epoch. Build the model with
    `seed=config.seed` for its initial weights to follow the config too."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    config = config.for_device(device)
    use_deterministic_algorithms(config.deterministic)
    optimizer = build_optimizer(model, config.optimizer)
    model = optimize_for_device(model.to(device), config)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    history = []
    for epoch in range(config.epochs):
        for loader in (train_loader, eval_loader):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
        metrics = {"epoch": epoch, **train_one_epoch(model, train_loader, optimizer, scheduler, config,
                                                     device, scaler, epoch)}
        if eval_loader is not None:
            metrics.update(evaluate(model, eval_loader, config.eval_attack, device, config.autocast_dtype,
                                    config.max_eval_batches, config.channels_last, config.seed, epoch))
        history.append(metrics)
        if on_epoch_end is not None:
            on_epoch_end(metrics)
    return history
