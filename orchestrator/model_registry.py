"""Trained models in MLflow's own terms.

A model is logged as an MLflow Model: the python_function flavour through the loader module `trainers.serving`
(MLflow rebuilds it from its description and loads tensor-only weights: no pickle), a tensor signature (images
float32 [-1, C, R, R] in [0, 1] -> logits float32 [-1, classes]) and an input example, linked to the run that
trained it. The best model of a study is also registered in the Model Registry under the study's name, tagged
with what it is and how it was measured, and given the alias `best`; so

    mlflow.pyfunc.load_model("models:/STUDY/latest").predict(images)   # logits
    mlflow models serve -m models:/STUDY@best --env-manager local      # where satscale is installed

both work. `load_best_model` returns the SATModel itself (for attacks and further training).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.environment import environment_variables
from orchestrator.reports import StudyRow, trial_label
from trainers.attacks import AttackConfig
from trainers.checkpoint import save_model
from trainers.models import ModelConfig, SATModel
from trainers.trial import TrialConfig

logger = logging.getLogger(__name__)

LOADER_MODULE = "trainers.serving"
BEST_ALIAS = "best"
# What serving needs besides satscale itself (whose `trainers.serving` is the loader module): MLflow records
# these in the model's requirements files, pinned to the versions that trained it.
SERVING_PACKAGES = ("torch", "numpy", "pydantic", "mlflow")


def model_signature(spec: ModelConfig):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    images = TensorSpec(np.dtype(np.float32), (-1, spec.in_chans, spec.resolution, spec.resolution))
    logits = TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))
    return ModelSignature(inputs=Schema([images]), outputs=Schema([logits]))


def input_example(spec: ModelConfig) -> np.ndarray:
    """One mid-grey image: the shape and range a request must have."""
    return np.full((1, spec.in_chans, spec.resolution, spec.resolution), 0.5, dtype=np.float32)


def attack_description(attack: AttackConfig | None) -> str:
    """An attack as a tag, e.g. `PGD-10 linf eps=0.01569 step_size=0.003922 restarts=1`."""
    if attack is None:
        return "none (clean accuracy only)"
    return (f"PGD-{attack.steps} {attack.norm} eps={attack.eps:.4g} step_size={attack.step_size:.4g} "
            f"restarts={attack.restarts}")


def model_tags(study_name: str, row: StudyRow, trial: TrialConfig) -> dict[str, str]:
    """What a logged model is and how it was measured: tags on the logged model and its registered version."""
    model, scale = trial.model, trial.model.scale
    return {
        "study": study_name, "trial_id": row.trial_id, "trial": trial_label(row.params),
        "activation": model.activation, "activation_params": json.dumps(model.activation_params, sort_keys=True),
        "arch": model.arch, "width_mult": f"{scale.width_mult:g}", "depth_mult": f"{scale.depth_mult:g}",
        "resolution": str(scale.resolution), "epochs": str(row.epochs),
        "clean_acc": f"{row.clean_acc:.4f}", "robust_acc": f"{row.robust_acc:.4f}",
        "eval_images": str(row.eval_images), "attack": attack_description(trial.train.eval_attack),
    }


def _pinned_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def _fluent_mlflow_at(tracking_uri: str, experiment_id: str | None = None):
    """MLflow's model logging, registration and loading go through its fluent API, which reads the server (and,
    for a new logged model, its experiment) from the environment: point it at the study's for the call (nothing
    in satscale sets MLflow's global URI or experiment)."""
    values = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    return environment_variables({**values, "MLFLOW_EXPERIMENT_ID": experiment_id} if experiment_id else values)


def log_sat_model(tracking_uri: str, run_id: str, model: SATModel, *, name: str = "model",
                  tags: Mapping[str, Any] | None = None, registered_model_name: str | None = None) -> str:
    """Log `model` as an MLflow Model of run `run_id` (tagged `tags`); with `registered_model_name`, also
    register it there as a new version carrying the same tags, aliased `best`. Returns the URI that loads it:
    `models:/NAME/VERSION` when registered, else the logged model's `models:/MODEL_ID`."""
    import mlflow
    from mlflow.models import Model

    model = model.cpu().eval()
    tags = {key: str(value) for key, value in (tags or {}).items()}
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id  # the logged model belongs with its run
    with tempfile.TemporaryDirectory(prefix="satscale-model-") as scratch, \
            _fluent_mlflow_at(tracking_uri, experiment_id):
        data_path = Path(scratch) / "sat_model"
        save_model(data_path, model)
        info = Model.log(artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                         loader_module=LOADER_MODULE,
                         data_path=str(data_path), signature=model_signature(model.spec),
                         input_example=input_example(model.spec), pip_requirements=_pinned_requirements(),
                         tags=tags)
        if registered_model_name is None:
            return info.model_uri
        # MLflow prints its registration lines on stderr: the study's log file takes them, not the console.
        with contextlib.redirect_stderr(io.StringIO()) as printed:
            version = mlflow.register_model(info.model_uri, registered_model_name, tags=tags)
        logger.info("%s", printed.getvalue().strip())
        client.set_registered_model_alias(registered_model_name, BEST_ALIAS, version.version)
        return f"models:/{registered_model_name}/{version.version}"


def load_best_model(model_uri: str, tracking_uri: str) -> SATModel:
    """The SATModel behind an MLflow Model that `log_sat_model` logged (`models:/NAME/VERSION`, `models:/NAME@best`,
    `runs:/...`), rebuilt from its description and loaded safely, in eval mode on the CPU."""
    import mlflow.pyfunc

    with _fluent_mlflow_at(tracking_uri):
        return mlflow.pyfunc.load_model(model_uri).get_raw_model()
