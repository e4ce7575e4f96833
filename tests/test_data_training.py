"""The loader feeds the SAT training loop: a few epochs of adversarial training straight from .beton files."""
from __future__ import annotations

import math

import pytest

from trainers.attacks import AttackConfig
from trainers.data.loader_config import LoaderConfig, ProgressiveResizing
from trainers.data.loaders import build_loaders
from trainers.models import build_model
from trainers.training import OptimizerConfig, TrainConfig, fit

# numba's dispatcher finalizer raises a harmless KeyError when FFCV's compiled closures are collected.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("restore_torch_threads")]


def test_sat_trains_from_beton_files_with_progressive_resizing(digits_betons):
    config = LoaderConfig(batch_size=64, resolution=32, num_workers=1, train_crop="resize", eval_crop="resize",
                          flip_probability=0.0,  # digits are not mirror-symmetric
                          progressive=ProgressiveResizing(min_res=16, start_ramp=0, end_ramp=1, multiple=16))
    loaders = build_loaders(digits_betons["train"], digits_betons["test"], config)
    model = build_model("resnet18", num_classes=loaders.num_classes, activation="silu", width_mult=0.25,
                        depth_mult=0.5, resolution=32)
    train_config = TrainConfig(epochs=2, optimizer=OptimizerConfig(lr=0.05),
                               train_attack=AttackConfig(eps=8 / 255, step_size=10 / 255, steps=1),
                               eval_attack=AttackConfig(eps=8 / 255, step_size=2 / 255, steps=3))
    resolutions = []
    history = fit(model, loaders.train, loaders.eval, train_config,
                  on_epoch_end=lambda _metrics: resolutions.append(loaders.train.decoder.output_size))

    assert resolutions == [(16, 16), (32, 32)]  # fit's set_epoch drove the schedule
    assert [m["epoch"] for m in history] == [0, 1]
    assert all(math.isfinite(m["train_loss"]) for m in history)
    assert history[-1]["clean_acc"] > 0.5, history  # chance is 0.1
    assert 0.0 <= history[-1]["robust_acc"] <= history[-1]["clean_acc"]
