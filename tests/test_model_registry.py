"""A study's model as an MLflow Model against the session's real `mlflow server` (SQLite registry, artifacts on
the loopback S3 server): logged without pickles, registered with its tags, loaded by `mlflow.pyfunc` and served
by a real `mlflow models serve` over HTTP."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from orchestrator.model_registry import BEST_ALIAS, LOADER_MODULE, load_best_model
from orchestrator.tracking import StudyTracker
from tests.fixtures.network import free_loopback_port
from tests.fixtures.waiting import wait_until
from trainers.models import build_model

RESOLUTION = 16
TAGS = {"activation": "softplus", "clean_acc": "0.9100", "robust_acc": "0.4200",
        "attack": "PGD-10 linf eps=0.03137 step_size=0.007843 restarts=1"}


@pytest.fixture
def registered(mlflow_server: str, mlflow_experiment: str):
    """A small Softplus ResNet logged under a study's parent run as its best model, and its URI."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, activation="softplus", activation_params={"beta": 10.0}, width_mult=0.125,
                        depth_mult=0.25, resolution=RESOLUTION).eval()
    tracker = StudyTracker(mlflow_server, mlflow_experiment)
    parent = tracker.start_study(mlflow_experiment, f"/studies/{mlflow_experiment}")
    model_uri = tracker.log_model(parent, model, TAGS, name="best_model", register=True)
    return model, model_uri, parent, mlflow_experiment


def logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def test_the_best_model_is_a_registered_mlflow_model_loaded_without_pickles(registered, mlflow_server,
                                                                            monkeypatch):
    import mlflow.pyfunc

    model, model_uri, parent, name = registered
    assert model_uri == f"models:/{name}/1"
    client = MlflowClient(mlflow_server)
    version = client.get_model_version(name, "1")
    assert version.run_id == parent and TAGS.items() <= version.tags.items()
    assert client.get_model_version_by_alias(name, BEST_ALIAS).version == "1"

    # What a user does: the tracking URI in the environment, the registry's name, numpy images in [0, 1].
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}/latest")
    signature = loaded.metadata.signature
    assert signature.inputs.inputs[0].shape == (-1, 3, RESOLUTION, RESOLUTION)
    assert signature.outputs.inputs[0].shape == (-1, 10)
    assert str(signature.inputs.inputs[0].type) == "float32"
    assert loaded.metadata.flavors["python_function"]["loader_module"] == LOADER_MODULE
    images = np.random.default_rng(0).random((5, 3, RESOLUTION, RESOLUTION), dtype=np.float32)
    predicted = loaded.predict(images)
    assert predicted.shape == (5, 10) and predicted.dtype == np.float32
    np.testing.assert_allclose(predicted, logits(model, images), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match=r"pixel values must lie in \[0, 1\].*255"):
        loaded.predict(images * 255)

    # The stored model: a description and tensor-only weights, no pickled object; the input example beside.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
    files = {path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()}
    assert {"MLmodel", "data/sat_model/model.json", "data/sat_model/weights.pt", "input_example.json",
            "requirements.txt"} <= files
    assert not [path for path in files if path.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    torch.load(local / "data/sat_model/weights.pt", weights_only=True)  # tensors only: the safe unpickler reads it

    # The SATModel itself, for attacks and further training.
    again = load_best_model(f"models:/{name}@{BEST_ALIAS}", mlflow_server)
    assert again.spec == model.spec
    np.testing.assert_allclose(logits(again, images), logits(model, images), rtol=1e-5, atol=1e-5)


def wait_until_serving(server: subprocess.Popen, port: int, timeout_s: float = 120) -> None:
    def answers_ping() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as ping:
            return ping.status == 200

    def what() -> str:  # its output, once it has exited (reading a live one's pipe would block)
        output = server.stdout.read()[-3000:] if server.poll() is not None else ""
        return f"mlflow models serve to answer /ping{'; its output: ' + output if output else ''}"

    wait_until(answers_ping, timeout_s, what, process=server, retry_on=(urllib.error.URLError, ConnectionError))


def test_mlflow_models_serve_answers_with_the_models_logits(registered, mlflow_server):
    model, _, _, name = registered
    port = free_loopback_port()
    command = ["mlflow", "models", "serve", "-m", f"models:/{name}@best", "--env-manager", "local", "--host",
               "127.0.0.1", "--port", str(port), "--workers", "1"]
    # As in an activated environment: the CLI starts the environment's uvicorn by name.
    environment = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server,
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(command, env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    images = np.random.default_rng(1).random((3, 3, RESOLUTION, RESOLUTION), dtype=np.float32)
    try:
        wait_until_serving(server, port)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": images.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    finally:
        with contextlib.suppress(ProcessLookupError):  # the CLI and the web server it started
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    np.testing.assert_allclose(np.asarray(answer["predictions"], dtype=np.float32), logits(model, images),
                               rtol=1e-4, atol=1e-4)


def test_on_request_every_trial_that_ended_gets_its_model_under_its_own_run(mlflow_server, mlflow_experiment,
                                                                           tmp_path):
    """`tracking.models: finished`: the best trial's model registered from the parent run, and each trial that
    ended without error its own MLflow Model under its run (loaded from its last checkpoint); a failed trial none."""
    from types import SimpleNamespace

    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from orchestrator.reports import StudyRow
    from orchestrator.runner import _log_study_end
    from search_spaces.study import TrackingSettings, load_study
    from trainers.checkpoint import save_training_state
    from trainers.models import build_model_from_config
    from trainers.trial import TrialConfig

    tracker = StudyTracker(mlflow_server, mlflow_experiment)
    parent = tracker.start_study(mlflow_experiment, f"/studies/{mlflow_experiment}")
    trial = TrialConfig.parse(load_study("default", ["model.width_mult=0.125", "model.depth_mult=0.25"]).base_values())
    rows, results = [], []
    for trial_id, robust in (("a_00000", 0.40), ("b_00001", 0.50), ("c_00002", None)):
        checkpoint = tmp_path / trial_id
        checkpoint.mkdir()
        save_training_state(checkpoint, {"trial": trial.model_dump(mode="json"), "epoch": 0,
                                         "model": build_model_from_config(trial.model, seed=0).state_dict()})
        state = "failed" if robust is None else "finished"
        rows.append(StudyRow(trial_id, {"activation": "relu"}, state, 0.8, robust, None, 1))
        results.append(SimpleNamespace(metrics={"trial_id": trial_id, CHECKPOINT_PATH_KEY: str(checkpoint)}))
    study = SimpleNamespace(name=mlflow_experiment, tracking=TrackingSettings(models="finished"))

    best_uri = _log_study_end(tracker, parent, study, rows, results, str(tmp_path))
    client = MlflowClient(mlflow_server)
    assert best_uri == f"models:/{mlflow_experiment}/1"
    assert client.get_model_version(mlflow_experiment, "1").tags["trial_id"] == "b_00001"
    experiment = client.get_experiment_by_name(mlflow_experiment).experiment_id
    logged = client.search_logged_models([experiment])
    by_run = {}
    for model in logged:
        by_run.setdefault(model.source_run_id, []).append(model.tags["trial_id"])
    trial_runs = {trial_id: tracker.trial_run(parent, trial_id, {}, restart=False)
                  for trial_id in ("a_00000", "b_00001")}
    assert by_run == {parent: ["b_00001"], trial_runs["a_00000"]: ["a_00000"], trial_runs["b_00001"]: ["b_00001"]}
