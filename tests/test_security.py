"""Security: no credential reaches anything a study writes; the Ray the CLI starts listens on 127.0.0.1 only and
refuses clients without its token; checkpoints and models load with the safe unpickler only."""
from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow.artifacts
import psutil
import pytest
import torch

from tests.conftest import DIGITS_RESOLUTION
from tests.test_study import study_runs, write_study
from trainers.checkpoint import MODEL_WEIGHTS_FILE, STATE_FILE, load_model, load_training_state, save_model
from trainers.models import build_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "orchestrator" / "scale_study.py"
LOOPBACK_ADDRESSES = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _random(length: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def planted_credentials() -> dict[str, str]:
    """Fake but well-formed credentials, unique to this run, so any occurrence in the output is a leak."""
    return {
        "AWS_ACCESS_KEY_ID": "AKIA" + _random(16, string.ascii_uppercase + string.digits),
        "AWS_SECRET_ACCESS_KEY": _random(40),
        "AWS_SESSION_TOKEN": _random(96),
        "MLFLOW_TRACKING_PASSWORD": _random(24),
        "MLFLOW_TRACKING_TOKEN": _random(32),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }


@pytest.fixture
def ray_temp_root() -> Iterator[Path]:
    """A short folder for a Ray the test starts (Ray's socket paths are limited), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        yield from (path for path in root.rglob("*") if path.is_file() and not path.is_symlink())


def _s3_objects(bucket: str) -> Iterator[tuple[str, bytes]]:
    import boto3

    client = boto3.session.Session().client("s3")
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            yield item["Key"], client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()


def test_planted_credentials_appear_nowhere_the_study_wrote(mlflow_server, s3_bucket, digits_betons, tmp_path,
                                                            ray_temp_root, monkeypatch):
    """A real study (CLI, the local Ray it starts, S3 data and storage, an MLflow server) with fake credentials
    in its environment. They are the only AWS credentials there, so every S3 call (staging, checkpoints) was
    signed with them (moto accepts any pair); then every MLflow param, tag, metric key, run name and artifact,
    every storage object, every file of the Ray session and the driver's output are searched for them."""
    from trainers.data.s3 import upload_dataset

    data = {split: upload_dataset(path, f"s3://{s3_bucket}/data/digits-{split}.beton")
            for split, path in digits_betons.items()}
    name = f"security-{uuid.uuid4().hex[:8]}"
    study = write_study(tmp_path / "study.yaml", data, name, ["silu"])
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    planted = planted_credentials()
    environment = {**os.environ, **planted, "MLFLOW_TRACKING_USERNAME": "satscale", "RAY_TMPDIR": str(ray_temp_root),
                   "SATSCALE_CACHE_DIR": str(cache)}
    for variable in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        environment.pop(variable, None)
    driver = subprocess.run([sys.executable, str(SCRIPT), "--config", str(study), "--set", "train.epochs=1",
                             "--storage", f"s3://{s3_bucket}/runs", "--mlflow-uri", mlflow_server],
                            cwd=work, env=environment, capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stdout[-3000:] + driver.stderr[-5000:]

    found: list[str] = []
    scanned: dict[str, int] = {}

    def scan(where: str, content: bytes | str) -> None:
        blob = content.encode(errors="replace") if isinstance(content, str) else content
        scanned[where.split(":", 1)[0]] = scanned.get(where.split(":", 1)[0], 0) + 1
        found.extend(f"{variable} in {where}" for variable, value in planted.items() if value.encode() in blob)

    scan("driver:stdout", driver.stdout)
    scan("driver:stderr", driver.stderr)
    client, parents, children = study_runs(mlflow_server, name)
    assert len(parents) == 1 and len(children) == 1
    for run in parents + children:
        where = f"mlflow:run {run.info.run_id}"
        scan(where, json.dumps({"name": run.info.run_name, "params": run.data.params, "tags": run.data.tags,
                                "metrics": sorted(run.data.metrics)}))
        downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts" / run.info.run_id)))
        for path in _files_under(downloaded):
            scan(f"artifact:{path.relative_to(downloaded)}", path.read_bytes())
    # The best model: an MLflow Model of its own (artifacts beside the runs'), and its registry entry.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # where models:/ URIs are looked up
    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}@best",
                                                     dst_path=str(tmp_path / "model")))
    for path in _files_under(model):
        scan(f"artifact:model/{path.relative_to(model)}", path.read_bytes())
    version = client.get_model_version_by_alias(name, "best")
    scan("mlflow:model version", json.dumps({"tags": version.tags, "source": version.source}))
    for key, body in _s3_objects(s3_bucket):
        if not key.startswith("data/"):
            scan(f"storage:{key}", body)
    for path in _files_under(ray_temp_root, work, cache):
        scan(f"file:{path}", path.read_bytes())

    assert not found, found
    # The search covered what the study wrote: both runs, the reports, the best model and its registry entry,
    # Tune's and Train's storage, and the Ray session's logs.
    assert scanned["mlflow"] == 3 and scanned["artifact"] >= 8, scanned
    assert scanned["storage"] >= 5 and scanned["file"] >= 20, scanned


# --- the Ray the CLI starts --------------------------------------------------------------------------------------
EMBEDDED_RAY = """
import json, sys
from orchestrator import scale_study

scale_study.local_ray_settings(bind_all=False)
scale_study.connect_ray(bind_all=False)
import ray



@ray.remote(num_cpus=0)
def nodes_seen_from_inside() -> int:
    # What Ray Train's PlacementGroupCleaner does: the State API, called in the cluster without an address.
    from ray.util.state import list_nodes

    return len(list_nodes())


print(json.dumps({"gcs": ray.get_runtime_context().gcs_address,
                  "dashboard": ray._private.worker.get_dashboard_url(),
                  "nodes_seen_from_inside": ray.get(nodes_seen_from_inside.remote())}), flush=True)
sys.stdin.read()  # until the test closes stdin
"""


def _process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _bound_sockets(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP and bound UDP socket of `processes`."""
    pids = {process.pid for process in processes}
    names = {process.pid: process.name() for process in processes}
    return sorted({(names[connection.pid], connection.laddr.ip, connection.laddr.port)
                   for connection in psutil.net_connections(kind="inet")
                   if connection.pid in pids and connection.laddr
                   and (connection.status == psutil.CONN_LISTEN or (connection.type == socket.SOCK_DGRAM and not connection.raddr))})


def _http_status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_local_ray_listens_on_loopback_only_and_refuses_clients_without_the_token(ray_temp_root, ray_cluster):
    """`ray_cluster`: another Ray runs on the machine meanwhile, as on a shared workstation; the State API inside
    the local Ray still finds its own cluster."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    token = secrets.token_hex(32)
    environment = {**os.environ, "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": str(ray_temp_root), "PYTHONPATH": str(ROOT)}
    for variable in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        environment.pop(variable, None)  # as on a user's machine: the CLI sets what it needs
    driver = subprocess.Popen([sys.executable, "-c", EMBEDDED_RAY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=environment, cwd=ray_temp_root, start_new_session=True)
    processes: list[psutil.Process] = []
    try:
        started = json.loads(driver.stdout.readline())
        assert started["nodes_seen_from_inside"] == 1
        processes = _process_tree(driver.pid)
        sockets = _bound_sockets(processes)
        assert len({name for name, _, _ in sockets}) >= 4, sockets  # GCS, raylet, dashboard, agents, workers
        assert {address for _, address, _ in sockets} <= LOOPBACK_ADDRESSES, sockets

        jobs = f"http://{started['dashboard']}/api/jobs/"
        assert _http_status(jobs, {}) == 401
        assert _http_status(jobs, {"Authorization": "Bearer not-the-token"}) == 403
        assert _http_status(jobs, {"Authorization": f"Bearer {token}"}) == 200

        nodes = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(grpc.insecure_channel(started["gcs"]))
        for metadata in ((), (("authorization", "Bearer not-the-token"),)):
            with pytest.raises(grpc.RpcError) as refused:
                nodes.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=30, metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = nodes.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(), timeout=30,
                                     metadata=(("authorization", f"Bearer {token}"),))
        assert len(reply.node_info_list) == 1
    finally:
        driver.stdin.close()  # the driver shuts its Ray down
        try:
            driver.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(driver.pid, signal.SIGKILL)
        for process in processes:  # anything that outlived its driver
            if process.is_running():
                process.kill()


# --- safe loading ------------------------------------------------------------------------------------------------
class _WritesAFile:
    """Unpickling this creates `path`: proof that loading ran code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _tiny_model():
    return build_model("resnet18", 10, width_mult=0.125, depth_mult=0.25, resolution=DIGITS_RESOLUTION)


@pytest.mark.parametrize("loader", ["training state", "model weights"])
def test_a_malicious_pickle_checkpoint_is_refused_without_running_it(loader, tmp_path):
    marker = tmp_path / "code-ran"
    exploit = pickle.dumps({"model": _WritesAFile(marker)})
    if loader == "training state":
        (tmp_path / STATE_FILE).write_bytes(exploit)
        load = lambda: load_training_state(tmp_path)  # noqa: E731
    else:
        save_model(tmp_path, _tiny_model())
        (tmp_path / MODEL_WEIGHTS_FILE).write_bytes(exploit)
        load = lambda: load_model(tmp_path)  # noqa: E731
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load()
    assert not marker.exists()


def test_a_saved_model_loads_back_from_its_description_and_weights(tmp_path):
    torch.manual_seed(0)
    model = _tiny_model().eval()
    save_model(tmp_path, model)
    loaded = load_model(tmp_path)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
