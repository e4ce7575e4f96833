"""SAT on Ray Train: `train_loop_per_worker(config)` on N data-parallel workers, and the TorchTrainer around it.

Each worker builds its FFCV loaders (sharded when N > 1), the model (DDP through `prepare_model`), optimizer
and schedule from one validated `TrialConfig`, resumes from `ray.train.get_checkpoint()` when there is one,
and reports once per epoch with a checkpoint. Storage is a local folder or `s3://bucket/prefix`; S3 endpoint
and credentials come from the standard AWS environment (pyarrow reads `AWS_ENDPOINT_URL` and friends).
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from torch import nn

from trainers.checkpoint import load_training_state, save_training_state
from trainers.errors import ConfigError
from trainers.faults import maybe_fault
from trainers.models import build_model_from_config
from trainers.seeding import use_deterministic_algorithms
from trainers.training import (all_reduce_sum, build_optimizer, build_scheduler, evaluate, optimize_for_device,
                               train_one_epoch)
from trainers.trial import TrialConfig


class ShardRecorder:
    """Counts which samples this rank trained on in an epoch; summed over ranks it shows the sharding."""

    def __init__(self, num_samples: int) -> None:
        self.counts = torch.zeros(num_samples, dtype=torch.int32)

    def wrap(self, loader):
        for images, labels, indices in loader:
            indices = indices.to("cpu", torch.long).view(-1)
            self.counts.index_add_(0, indices, torch.ones_like(indices, dtype=torch.int32))
            yield images, labels

    def summary(self) -> dict[str, int]:
        counts = all_reduce_sum(self.counts)
        return {"samples_trained": int((counts > 0).sum()), "samples_repeated": int((counts > 1).sum())}


# The loop config's key for the trial's start (unix seconds), stamped by `build_trainer` beside the TrialConfig
# fields: per-trial overhead is measured from it.
TRIAL_STARTED_AT_KEY = "trial_started_at"


class StartupClock:
    """Per-trial overhead: seconds from the trial's start to this worker's loop entry (Ray placing and starting
    the worker group) and to its first training batch (plus loaders, FFCV's JIT, model). Wall-clock time, as
    the start was stamped in another process."""

    def __init__(self, trial_started_at: float | None) -> None:
        self.trial_started_at = trial_started_at
        self.worker_started_at = time.time()
        self.first_batch_at: float | None = None

    def wrap(self, loader):
        for batch in loader:
            if self.first_batch_at is None:
                self.first_batch_at = time.time()
            yield batch

    def metrics(self) -> dict[str, float]:
        if self.trial_started_at is None or self.first_batch_at is None:
            return {}
        return {"time_to_worker_start_s": self.worker_started_at - self.trial_started_at,
                "time_to_first_batch_s": self.first_batch_at - self.trial_started_at}


def parameters_digest(model: nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on all ranks exactly when the replicas agree."""
    digest = hashlib.sha256()
    for param in model.parameters():
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _all_ranks(value: Any) -> list[Any]:
    if not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's per-worker function. `config` is `TrialConfig.model_dump(mode="json")`, with the trial's
    start time under `TRIAL_STARTED_AT_KEY` when `build_trainer` made it."""
    config = dict(config)
    startup = StartupClock(config.pop(TRIAL_STARTED_AT_KEY, None))
    maybe_fault("worker_start")
    trial = TrialConfig.parse(config)
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    train_config = trial.effective_train_config().for_device(device)

    # Imported here, on the worker: each trial's Tune actor imports this module for `build_trainer` and never
    # reads data, so it should not pay for FFCV's import and numba compilation (benchmarks/README.md).
    from trainers.data import set_jit_opt_level

    set_jit_opt_level(trial.loader_jit_opt_level())
    from trainers.data.loaders import build_loaders

    loaders = build_loaders(trial.data.train_path, trial.data.eval_path, trial.loader_config(),
                            train_indices=True)
    if loaders.num_classes != trial.model.num_classes:
        raise ConfigError(f"model.num_classes is {trial.model.num_classes} but {trial.data.train_path} has "
                          f"{loaders.num_classes} classes; set model.num_classes: {loaders.num_classes}")
    # FFCV's Loader set torch's thread count to its own workers; fix it from the config, so a trial's kernels
    # (and their floating-point reduction order) do not depend on what the loader or the node chose.
    torch.set_num_threads(trial.workers.torch_threads)
    use_deterministic_algorithms(train_config.deterministic)
    # The same initial weights on every rank, and in every trial with this seed and these parameter shapes.
    model = build_model_from_config(trial.model, seed=train_config.seed).to(device)
    optimizer = build_optimizer(model, train_config.optimizer)
    scheduler = build_scheduler(optimizer, train_config, steps_per_epoch=len(loaders.train))
    scaler = torch.amp.GradScaler(device.type, enabled=train_config.amp == "fp16")

    # Every epoch re-derives its random streams from (seed, rank, epoch) (trainers.seeding), so a resume needs
    # the model, optimizer, schedule and scaler only.
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_state(Path(directory), map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        startup.trial_started_at = None  # a resumed run's overhead would include the epochs before it stopped

    runnable = ray.train.torch.prepare_model(optimize_for_device(model, train_config))
    batch_summary = trial.batch_summary()
    metrics: dict[str, Any] = {}
    if checkpoint is not None and start_epoch >= train_config.epochs:
        # Restarted after its last epoch (e.g. a Tune trial restored from state saved just before it ended):
        # report that epoch again so the caller sees the run's final result.
        metrics = state["metrics"]
        ray.train.report(metrics, checkpoint=checkpoint)
    for epoch in range(start_epoch, train_config.epochs):
        loaders.train.set_epoch(epoch)
        loaders.eval.set_epoch(epoch)
        resolution = loaders.train.resolution
        shards = ShardRecorder(loaders.train.manifest.num_samples)
        metrics = {"epoch": epoch, "resolution": resolution, **batch_summary,
                   **train_one_epoch(runnable, startup.wrap(shards.wrap(loaders.train)), optimizer, scheduler,
                                     train_config, device, scaler, epoch),
                   **shards.summary(),
                   **(startup.metrics() if epoch == start_epoch else {}),
                   # max_batches None: the eval loader already holds max_eval_batches' balanced subset.
                   **evaluate(runnable, loaders.eval, train_config.eval_attack, device,
                              train_config.autocast_dtype, None, train_config.channels_last,
                              train_config.seed, epoch)}
        with tempfile.TemporaryDirectory(prefix="satscale-ckpt-") as directory:
            epoch_checkpoint = None
            if rank == 0:
                save_training_state(Path(directory), {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                    "trial": trial.model_dump(mode="json"), "metrics": metrics})
                epoch_checkpoint = Checkpoint.from_directory(directory)
            # Every rank reports (Train V2 treats report as a barrier); rank 0's report carries the checkpoint.
            ray.train.report(metrics, checkpoint=epoch_checkpoint)
        maybe_fault("checkpoint_reported")
    digests = _all_ranks(parameters_digest(model))
    return {"final_metrics": metrics, "replicas_in_sync": len(set(digests)) == 1, "world_size": len(digests)}


def build_trainer(trial: TrialConfig, storage_path: str, name: str,
                  callbacks: Sequence[UserCallback] = ()) -> TorchTrainer:
    """A TorchTrainer for `trial`. Re-running a trainer with the same `name` and `storage_path` resumes.
    `callbacks`: Ray Train callbacks (a Tune trial passes `TuneReportCallback()` to forward its reports).
    The trial's overhead (`time_to_first_batch_s`, reported with the first epoch) is timed from this call."""
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**trial.model_dump(mode="json"), TRIAL_STARTED_AT_KEY: time.time()},
        scaling_config=ScalingConfig(num_workers=trial.workers.num_workers, use_gpu=trial.workers.use_gpu,
                                     resources_per_worker=trial.workers.resources_per_worker()),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=list(callbacks),
            failure_config=FailureConfig(max_failures=trial.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=trial.checkpoints_to_keep)),
    )
