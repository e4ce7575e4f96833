"""Checkpoint files: safe to load and complete."""
import pickle

import pytest
import torch

from tests.conftest import DIGITS_RESOLUTION
from trainers.checkpoint import STATE_FILE, load_training_state, save_training_state
from trainers.models import build_model
from trainers.training import OptimizerConfig, TrainConfig, build_optimizer, build_scheduler


def test_training_state_round_trip(tmp_path):
    model = build_model("resnet18", 10, width_mult=0.125, depth_mult=0.25, resolution=DIGITS_RESOLUTION)
    config = TrainConfig(epochs=3, optimizer=OptimizerConfig(lr=0.1, warmup_epochs=1))
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=4)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step(), scheduler.step(), scheduler.step()
    save_training_state(tmp_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "epoch": 1})
    state = load_training_state(tmp_path)
    fresh = build_model("resnet18", 10, width_mult=0.125, depth_mult=0.25, resolution=DIGITS_RESOLUTION)
    fresh.load_state_dict(state["model"])
    fresh_optimizer = build_optimizer(fresh, config.optimizer)
    fresh_optimizer.load_state_dict(state["optimizer"])
    fresh_scheduler = build_scheduler(fresh_optimizer, config, steps_per_epoch=4)
    fresh_scheduler.load_state_dict(state["scheduler"])
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr() and state["epoch"] == 1
    assert not list(tmp_path.glob("*.partial"))


class _Exploit:
    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(pickle.dumps({"model": _Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_training_state(tmp_path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a satscale checkpoint directory"):
        load_training_state(tmp_path)
