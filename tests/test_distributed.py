"""SAT on Ray Train: 2 CPU workers (gloo) on a real local Ray cluster, FFCV loaders over the digits .beton."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest
import torch

from tests.conftest import DIGITS_RESOLUTION
from tests.fixtures.waiting import wait_until
from trainers.checkpoint import STATE_FILE, load_training_state
from trainers.distributed import build_trainer
from trainers.errors import ConfigError
from trainers.trial import TrialConfig

EPS = 0.1


def digits_trial(betons, epochs=2, num_workers=2, **overrides) -> TrialConfig:
    values = {
        "model": {"arch": "resnet18", "num_classes": 10, "activation": "silu", "width_mult": 0.25,
                  "depth_mult": 0.5, "resolution": DIGITS_RESOLUTION},
        "train": {"epochs": epochs, "optimizer": {"lr": 0.2, "warmup_epochs": 0.5},
                  "train_attack": {"eps": EPS, "step_size": 1.25 * EPS, "steps": 1},
                  "eval_attack": {"eps": EPS, "step_size": EPS / 4, "steps": 3}, "max_eval_batches": 2},
        "data": {"train_path": str(betons["train"]), "eval_path": str(betons["test"]),
                 "loader_options": {"train_crop": "resize", "flip_probability": 0.0}},
        "workers": {"num_workers": num_workers},
        "global_batch_size": 64,
        "reference_batch_size": 128,
    }
    for key, value in overrides.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return TrialConfig.parse(values)


def reported_epochs(result) -> list[int]:
    return sorted(int(epoch) for epoch in result.metrics_dataframe["epoch"])


def test_trial_config_batch_and_lr_arithmetic(digits_betons):
    trial = digits_trial(digits_betons, num_workers=2, lr_scaling="sqrt")
    assert trial.per_worker_batch_size == 32
    assert trial.scaled_lr == pytest.approx(0.2 * (64 / 128) ** 0.5)
    assert trial.effective_train_config().optimizer.lr == pytest.approx(trial.scaled_lr)
    loader = trial.loader_config()
    assert (loader.batch_size, loader.resolution, loader.distributed) == (32, DIGITS_RESOLUTION, True)
    assert digits_trial(digits_betons).scaled_lr == pytest.approx(0.1)  # linear by default
    restored = TrialConfig.parse(trial.model_dump(mode="json"))  # the dict that crosses into Ray
    assert restored == trial


@pytest.mark.parametrize("overrides, message", [
    ({"global_batch_size": 63}, r"global_batch_size \(63\) must be divisible by workers.num_workers \(2\)"),
    ({"workers": {"num_workers": 0}}, "workers.num_workers"),
    ({"train": {"epochs": 2, "optimizer": {"lr": -1}}}, "train.optimizer.lr"),
    ({"data": {"loader_options": {"batch_size": 8}}}, "loader_options may not set"),
    ({"data": {"loader_options": {"order": "quasi-random"}}}, "data.loader_options.order"),
    ({"model": {"arch": "resnet18", "num_classes": 10, "widht_mult": 1}}, "model.widht_mult: unknown key"),
    ({"max_failure": 3}, "max_failure: unknown key"),
])
def test_trial_config_rejects_bad_fields(digits_betons, overrides, message):
    with pytest.raises(ConfigError, match=message):
        digits_trial(digits_betons, **overrides)


def test_two_workers_ddp_disjoint_shards_identical_weights(ray_cluster, digits_betons, tmp_path):
    trial = digits_trial(digits_betons, epochs=2)
    result = build_trainer(trial, str(tmp_path / "storage"), "ddp-two-workers").fit()
    assert result.error is None
    assert result.return_value["world_size"] == 2
    assert result.return_value["replicas_in_sync"]
    assert reported_epochs(result) == [0, 1]
    frame = result.metrics_dataframe
    steps_per_epoch = 1437 // 2 // 32  # per rank, last partial batch dropped
    assert (frame["samples_repeated"] == 0).all()
    assert (frame["samples_trained"] == steps_per_epoch * 32 * 2).all()
    assert (frame["per_worker_batch_size"] == 32).all() and (frame["global_batch_size"] == 64).all()
    for column in ("clean_acc", "robust_acc", "train_loss", "train_robust_acc", "images_per_s", "lr",
                   "resolution"):
        assert frame[column].notna().all(), column
    assert frame["clean_acc"].iloc[-1] > 0.3  # chance is 0.1
    # Per-trial overhead, reported with the first epoch only: the worker starts, then its first batch arrives.
    first, second = frame.sort_values("epoch").to_dict("records")
    assert 0 < first["time_to_worker_start_s"] < first["time_to_first_batch_s"] < 300
    assert pd.isna(second.get("time_to_first_batch_s"))
    with result.checkpoint.as_directory() as directory:
        assert STATE_FILE in os.listdir(directory)
        state = load_training_state(Path(directory))
    assert state["epoch"] == 1
    # The checkpoint rebuilds its model on its own: a plain state dict (no DDP/compile prefixes).
    from trainers.models import build_model_from_config
    build_model_from_config(TrialConfig.parse(state["trial"]).model).load_state_dict(state["model"])


def _kill_a_worker_during_epoch(storage: Path, delay_s: float, outcome: dict) -> None:
    """Wait for the first checkpoint, let the next epoch get going, then SIGKILL one Train worker process."""
    try:
        from ray.util.state import list_actors

        wait_until(lambda: list(storage.glob("*/checkpoint_*/" + STATE_FILE)), 240, "the first checkpoint",
                   interval_s=0.2)
        time.sleep(delay_s)
        workers = [actor for actor in list_actors(filters=[("state", "=", "ALIVE")])
                   if actor.class_name.endswith("RayTrainWorker")]
        outcome["workers"] = [(actor.class_name, actor.pid) for actor in workers]
        os.kill(workers[-1].pid, signal.SIGKILL)
        outcome["killed"] = workers[-1].pid
    except Exception as error:  # surfaced by the test: a thread's exception is otherwise lost
        outcome["error"] = repr(error)


def test_checkpoints_on_s3_and_resume_from_them(ray_cluster, digits_betons, s3_bucket):
    storage = f"s3://{s3_bucket}/runs"
    # One worker: resuming two is tested on local storage (tests/test_faults_study.py); this is about S3.
    first = build_trainer(digits_trial(digits_betons, epochs=1, num_workers=1), storage, "s3-resume").fit()
    assert first.error is None and reported_epochs(first) == [0]
    keys = [item["Key"] for item in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any(key.endswith(STATE_FILE) for key in keys), keys
    # Same run name, longer schedule: the trainer picks up the S3 checkpoint and trains only epoch 1.
    second = build_trainer(digits_trial(digits_betons, epochs=2, num_workers=1), storage, "s3-resume").fit()
    assert second.error is None
    assert second.return_value["final_metrics"]["epoch"] == 1
    assert reported_epochs(second) == [0, 1]
    resumed_epoch = second.metrics_dataframe.set_index("epoch").loc[1]
    assert pd.isna(resumed_epoch.get("time_to_first_batch_s"))  # it would include the first run's epoch
    with second.checkpoint.as_directory() as directory:
        assert load_training_state(Path(directory))["epoch"] == 1


def test_compile_and_channels_last_on_cpu_train_as_eager_does(digits_split, tensor_loader):
    """The GPU switches run on CPU too (without Ray: the same functions the worker calls), and torch.compile
    changes nothing but rounding: from the same weights and batches, an epoch compiled and one eager (both
    channels_last, amp: auto as the presets set it: bf16 where the CPU computes it natively) give the same losses,
    accuracies and weights to bf16 precision. (Forced bf16 on an AVX2-only CPU made inductor's cold compile 88 s
    instead of 66 s; test_training covers bf16 autocast itself.)"""
    from trainers.models import build_model
    from trainers.training import TrainConfig, fit

    (images, labels), _ = digits_split

    def one_epoch(compiled: bool):
        model = build_model("resnet18", 10, activation="gelu", width_mult=0.125, depth_mult=0.25,
                            resolution=DIGITS_RESOLUTION, seed=0)
        config = TrainConfig(epochs=1, amp="auto", channels_last=True, compile=compiled,
                             train_attack={"eps": EPS, "step_size": EPS, "steps": 1},
                             eval_attack={"eps": EPS, "step_size": EPS / 2, "steps": 2})
        history = fit(model, tensor_loader(images[:128], labels[:128]), tensor_loader(images[:64], labels[:64]),
                      config)
        return model, history[0]

    eager_model, eager = one_epoch(compiled=False)
    compiled_model, compiled = one_epoch(compiled=True)
    assert torch.isfinite(torch.tensor(compiled["train_loss"]))
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=0.02)
    for metric in ("clean_acc", "robust_acc", "train_robust_acc"):
        assert compiled[metric] == pytest.approx(eager[metric], abs=3 / 64), metric  # a few images at most
    initial = build_model("resnet18", 10, activation="gelu", width_mult=0.125, depth_mult=0.25,
                          resolution=DIGITS_RESOLUTION, seed=0)
    start, eager_end, compiled_end = (torch.cat([p.detach().flatten() for p in m.parameters()])
                                      for m in (initial, eager_model, compiled_model))
    # The same update to bf16 rounding (about 10 % per tensor at most here; a different update would differ by ~100 %).
    assert (compiled_end - eager_end).norm() <= 0.25 * (eager_end - start).norm()
