"""A saved model (`trainers.checkpoint.save_model`) as MLflow's python_function flavour serves it.

MLflow's loader-module workflow: the MLmodel file names this module, MLflow calls `_load_pyfunc(data_path)` on the
model's data folder and then `predict` on what it returns. The model is rebuilt from its description and its
weights are read with the safe unpickler, so loading or serving a model from a shared registry runs no pickled
code. Torch only: MLflow itself is not imported here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.checkpoint import load_model
from trainers.models import SATModel

# Large batches are split so that a serving request holds at most this many images' activations at once.
PREDICT_CHUNK = 256


class ImageClassifier:
    """Images (float32, N x C x R x R, in [0, 1]) -> logits (float32, N x classes), in eval mode, no gradients."""

    def __init__(self, model: SATModel) -> None:
        self.model = model.eval()
        spec = model.spec
        self.input_shape = (spec.in_chans, spec.resolution, spec.resolution)

    def get_raw_model(self) -> SATModel:
        """The network itself (MLflow's `PyFuncModel.get_raw_model()`): for attacks and further training."""
        return self.model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ValueError(f"images: expected shape (N, {', '.join(map(str, self.input_shape))}) (N images, "
                             f"channels first, at the model's resolution), got {images.shape}")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"images: pixel values must lie in [0, 1] (got {images.min():g} to {images.max():g});"
                             " divide 8-bit pixels by 255")
        with torch.inference_mode():
            logits = [self.model(torch.from_numpy(chunk)) for chunk in np.split(
                images, range(PREDICT_CHUNK, len(images), PREDICT_CHUNK))]
        return torch.cat(logits).numpy()


def _load_pyfunc(data_path: str) -> ImageClassifier:
    """MLflow's entry point for the python_function flavour (`loader_module="trainers.serving"`)."""
    return ImageClassifier(load_model(Path(data_path)))
