"""Shared fixtures: one of each server per test session, tiny data, fixed seeds."""
from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

# Ray 2.59+ heads require token authentication, and Ray reads its auth settings once, at import. The test
# head gets its own random token (a fresh machine has no ~/.ray/auth_token, and `ray start` in token mode
# refuses to run without one); the head, study drivers and the job CLI inherit it from this environment.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

# Real servers: `mlflow server` (artifacts on the loopback S3 server); faults: an S3 server a test may restart,
# a relay that cuts the MLflow server off the network for a while.
pytest_plugins = ["tests.fixtures.mlflow_server", "tests.fixtures.restartable_s3", "tests.fixtures.outage_proxy"]
from orchestrator.scale_study import LOCAL_RAY_STARTUP  # noqa: E402
from tests.fixtures.network import accepts_connections, free_loopback_port, loopback_ray_head  # noqa: E402
from tests.fixtures.waiting import wait_until  # noqa: E402

# --- SAT core: real data (scikit-learn's digits), upscaled to 3x16x16 images in [0, 1] ---------------------

# The digits are 8x8: 16 px loses nothing and a training step costs about a third of 32 px's (benchmarks/README.md,
# the test suite's time); the tests' models and Ray studies take this resolution too.
DIGITS_RESOLUTION = 16


@pytest.fixture(scope="session", autouse=True)
def _two_torch_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 3, 16, 16) floats in [0, 1] and int64 labels."""
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
    model = build_model("resnet18", 10, activation="silu", width_mult=0.25, depth_mult=0.5,
                        resolution=DIGITS_RESOLUTION)
    config = TrainConfig(epochs=3, optimizer=OptimizerConfig(lr=0.1, label_smoothing=0.0), train_attack=None,
                         eval_attack=None)
    history = fit(model, _tensor_loader(train_images, train_labels, shuffle=True),
                  _tensor_loader(test_images, test_labels, batch_size=400), config)
    assert history[-1]["clean_acc"] > 0.9, history
    return model.eval()


# --- S3: one real S3-compatible server (moto) on loopback per session ---------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; returns its endpoint URL. While it runs, the standard AWS variables
    point boto3 at it with dummy credentials (restored afterwards), as they would at a real endpoint."""
    from moto.server import ThreadedMotoServer

    port = free_loopback_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as environment:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            environment.delenv(name, raising=False)
        environment.setenv("AWS_ENDPOINT_URL", endpoint)
        environment.setenv("AWS_ACCESS_KEY_ID", "testing")
        environment.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        environment.setenv("AWS_DEFAULT_REGION", "us-east-1")
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the session's S3 server."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


# --- FFCV data path: .beton files written once per session ------------------------------------------------
@pytest.fixture(scope="session")
def digits_betons(tmp_path_factory) -> dict[str, Path]:
    """scikit-learn digits as raw .beton files with manifests: {"train": 1437 samples, "test": 360}."""
    from trainers.data.convert import WriteOptions, convert

    folder = tmp_path_factory.mktemp("digits-beton")
    options = WriteOptions(num_workers=1)
    paths = {split: folder / f"digits-{split}.beton" for split in ("train", "test")}
    for split, path in paths.items():
        convert("digits", path, split=split, options=options)
    return paths


@pytest.fixture
def restore_torch_threads() -> Iterator[None]:
    """FFCV's Loader sets torch's global intra-op thread count to its num_workers; put it back so later
    tests run with the session's setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- Ray: one local cluster per session ----------------------------------------------------------------------
@dataclass(frozen=True)
class RayHead:
    address: str        # GCS address for ray.init / RAY_ADDRESS
    dashboard_url: str  # for `ray job submit --address`
    temp_dir: str


def _wait_for_job_agent(dashboard_url: str, timeout_s: float) -> None:
    """`ray start` returns before the node's job agent registers; run a trivial job until one succeeds."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)

    def a_job_succeeds() -> bool:
        job_id = client.submit_job(entrypoint="true")
        while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            time.sleep(0.5)
        return status == JobStatus.SUCCEEDED

    # RuntimeError: "No available agent to submit job, please try again later"
    wait_until(a_job_succeeds, timeout_s, f"the Ray head at {dashboard_url} to accept jobs", interval_s=1,
               retry_on=(RuntimeError,))


def _join_once_listening(port: int) -> bool:
    """Join the Ray head at `port` once its GCS listens: ray.init on an address with nothing behind it retries for
    minutes."""
    import ray

    if not accepts_connections(port):
        return False
    ray.init(address=f"127.0.0.1:{port}", configure_logging=False)
    return True


def _start_ray_head(temp_dir: str, attempts: int = 2) -> tuple[subprocess.Popen, str, str]:
    """A test head (4 logical CPUs) started in `temp_dir` and joined by this process: (head, GCS address,
    dashboard URL). A head that exits while starting is started once more on fresh ports: seen once, on a
    machine's first Ray start after the set-up (its log went with its temp dir; a port taken between choosing
    it and Ray binding it would look the same)."""
    # Results go to each test's explicit storage_path; the start-up settings of the local Ray scale_study.py
    # starts (a laptop's head, as this one is), worth a Train process and two idle workers per trial or driver.
    environment = {**os.environ, "RAY_DEDUP_LOGS": "0", **LOCAL_RAY_STARTUP}
    logs = []
    for attempt in range(attempts):
        port = free_loopback_port()
        command, dashboard_url = loopback_ray_head(port, temp_dir, "--num-cpus=4")
        log_path = Path(temp_dir) / f"head-{attempt}.log"
        with open(log_path, "w") as log:
            head = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_until(functools.partial(_join_once_listening, port), 180, "the test Ray head", process=head,
                       retry_on=(Exception,))
            return head, f"127.0.0.1:{port}", dashboard_url
        except AssertionError:
            timed_out = head.poll() is None
        with contextlib.suppress(ProcessLookupError):  # what it started, if any of it is left
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        logs.append(f"attempt {attempt + 1}, exit code {head.returncode}:\n{log_path.read_text()}")
        if timed_out:  # running but unreachable for 3 minutes: another try would not be faster
            break
    raise RuntimeError("ray head did not start:\n" + "\n".join(logs))


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> Iterator[RayHead]:
    """A real Ray head on loopback (`ray start --head`), shared by every Ray test; this process joins it.

    Started after the S3 server so its processes inherit the standard AWS variables, as nodes of a real
    cluster would from their environment. 4 logical CPUs on 2 cores: Train workers need CPU slots, not
    cores. Every port is a free one (another Ray on the machine must not collide with it); the temp dir is
    short because Ray's socket paths are limited. Only this head is stopped at the end.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    head, address, dashboard_url = _start_ray_head(temp_dir)
    try:
        _wait_for_job_agent(dashboard_url, 180)
        yield RayHead(address, dashboard_url, temp_dir)
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            # Its orderly stop takes about 30 s; the group's processes die as cleanly by SIGKILL (this test head
            # keeps nothing: no process or /dev/shm file is left either way).
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)