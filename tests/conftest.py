"""Shared fixtures: one of each server per test session, tiny data, fixed seeds."""
from __future__ import annotations

# --- SAT core: real data (scikit-learn's digits), upscaled to 3x32x32 images in [0, 1] ---------------------
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

DIGITS_RESOLUTION = 32


@pytest.fixture(scope="session", autouse=True)
def _two_torch_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 3, 32, 32) floats in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=DIGITS_RESOLUTION, mode="bilinear", align_corners=False)
    return images.clamp(0, 1).repeat(1, 3, 1, 1).contiguous(), torch.tensor(digits.target, dtype=torch.long)


@pytest.fixture(scope="session")
def digits_split(digits_tensors):
    """A fixed 1400 / 397 train / test split."""
    images, labels = digits_tensors
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return (images[train], labels[train]), (images[test], labels[test])


def _tensor_loader(images, labels, batch_size=64, shuffle=False, seed=0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle,
                      generator=generator)


@pytest.fixture(scope="session")
def tensor_loader():
    """`tensor_loader(images, labels, batch_size=64, shuffle=False, seed=0)`: a seeded in-memory loader."""
    return _tensor_loader


@pytest.fixture(scope="session")
def trained_digits_model(digits_split):
    """A small ResNet trained cleanly on digits (~97% test accuracy): a fixed target for attack tests."""
    from trainers.models import build_model
    from trainers.training import OptimizerConfig, TrainConfig, fit, seed_everything

    (train_images, train_labels), (test_images, test_labels) = digits_split
    seed_everything(0)
    model = build_model("resnet18", 10, activation="silu", width_mult=0.25, depth_mult=0.5, resolution=32)
    config = TrainConfig(epochs=3, optimizer=OptimizerConfig(lr=0.1, label_smoothing=0.0), train_attack=None,
                         eval_attack=None)
    history = fit(model, _tensor_loader(train_images, train_labels, shuffle=True),
                  _tensor_loader(test_images, test_labels, batch_size=400), config)
    assert history[-1]["clean_acc"] > 0.9, history
    return model.eval()

