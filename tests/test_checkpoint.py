"""Checkpoint files: safe to load, complete, and each rank's random stream resumes exactly."""
import pickle
import random

import numpy as np
import pytest
import torch

from trainers.checkpoint import (STATE_FILE, load_rng_state, load_training_state, restore_rng_state,
                                 save_rng_state, save_training_state)
from trainers.models import build_model
from trainers.training import OptimizerConfig, TrainConfig, build_optimizer, build_scheduler


def draws():
    return torch.rand(4), random.random(), float(np.random.rand())


def test_rng_states_resume_every_stream(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    save_rng_state(tmp_path, rank=3)
    expected = draws()
    draws()  # move every stream on
    restore_rng_state(load_rng_state(tmp_path, rank=3))
    again = draws()
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
    assert load_rng_state(tmp_path, rank=4) is None  # a rank that did not write one


def test_training_state_round_trip(tmp_path):
    model = build_model("resnet18", 10, width_mult=0.125, depth_mult=0.25, resolution=32)
    config = TrainConfig(epochs=3, optimizer=OptimizerConfig(lr=0.1, warmup_epochs=1))
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=4)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step(), scheduler.step(), scheduler.step()
    save_training_state(tmp_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "epoch": 1})
    state = load_training_state(tmp_path)
    fresh = build_model("resnet18", 10, width_mult=0.125, depth_mult=0.25, resolution=32)
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
