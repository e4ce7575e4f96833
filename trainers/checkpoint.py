"""Training checkpoints in a safe format: `torch.save` of tensors and plain Python values only, read back
with `torch.load(weights_only=True)`, so a checkpoint from elsewhere cannot run code when loaded.

A checkpoint directory holds `state.pt` (model, optimizer, scheduler, grad scaler, epoch; written by rank 0).
No RNG state: each epoch derives its random streams from the trial's seed (`trainers.seeding`). Files are
written to a temporary name and renamed, so a process killed mid-write never leaves a truncated file behind.

A finished model (`save_model`) is its description (`model.json`, a ModelConfig) and its weights
(`weights.pt`, tensors only): `load_model` rebuilds it from the model registry, never from pickled code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from trainers.errors import validated
from trainers.faults import maybe_fault
from trainers.models import ModelConfig, SATModel, build_model_from_config

STATE_FILE = "state.pt"
MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE = "model.json", "weights.pt"


def _atomic_save(value: Any, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    torch.save(value, partial)
    maybe_fault("checkpoint_write")
    os.replace(partial, path)


def save_training_state(directory: Path, state: dict[str, Any]) -> None:
    """Write rank 0's training state (state dicts and the epoch just finished)."""
    _atomic_save(state, Path(directory) / STATE_FILE)


def load_training_state(directory: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read `state.pt` with the safe unpickler; anything but tensors and plain values is refused."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a satscale checkpoint directory")
    return torch.load(path, map_location=map_location, weights_only=True)


def save_model(directory: Path, model: SATModel) -> None:
    """Write `model` (built by `trainers.models`) as its description and its weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MODEL_CONFIG_FILE).write_text(model.spec.model_dump_json(indent=2))
    torch.save(model.state_dict(), directory / MODEL_WEIGHTS_FILE)


def load_model(directory: Path, map_location: torch.device | str = "cpu") -> SATModel:
    """The model `save_model` wrote, in eval mode: built from its validated description, weights read with the
    safe unpickler (a weights file holding anything but tensors is refused)."""
    directory = Path(directory)
    config_path, weights_path = directory / MODEL_CONFIG_FILE, directory / MODEL_WEIGHTS_FILE
    if not (config_path.is_file() and weights_path.is_file()):
        raise FileNotFoundError(f"{directory} lacks {MODEL_CONFIG_FILE} or {MODEL_WEIGHTS_FILE}: not a saved "
                                "satscale model")
    model = build_model_from_config(validated(ModelConfig, json.loads(config_path.read_text())))
    model.load_state_dict(torch.load(weights_path, map_location=map_location, weights_only=True))
    return model.eval()
