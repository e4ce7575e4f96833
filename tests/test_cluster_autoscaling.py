"""Autoscaling on one machine: cluster/aws.yaml in miniature on Ray's fake multi-node provider.

The head is a real `ray start --head --autoscaling-config=...` with RAY_FAKE_CLUSTER=1 and Ray's autoscaler v2 (what
`ray up` runs); its "nodes" are real raylets the fake provider starts on this machine. The fake part is the cloud:
no instance is bought, and the "GPU" nodes have no GPU. So the study pins its workers with
`workers.accelerator_type: A10G` (a resource only the A10G node types advertise) and trains on CPU: the autoscaler
must start an A10G node from zero for it, and remove it once idle.

(ray.cluster_utils.AutoscalingCluster is not used: in the installed Ray it cannot start, and it runs
`ray stop --force`, which would stop every Ray on the machine. Only the head started here, and the process group
it leads with the nodes it spawned, is stopped.)
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from cluster import TRIAL_DRIVER_RESOURCE
from cluster.capacity import main as publish_capacity
from tests.conftest import DIGITS_RESOLUTION
from tests.fixtures.network import free_loopback_port, loopback_ray_head
from tests.fixtures.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "cluster" / "aws.yaml"
SCRIPT = ROOT / "orchestrator" / "scale_study.py"
FAKE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
IDLE_TIMEOUT_MINUTES = 0.1
HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head's node type


def fake_cluster_config(aws: dict, gcs_address: str) -> dict:
    """aws.yaml's node types with their resources, priorities and custom resources (trial-driver slots,
    accelerator types), on the fake provider: one CPU and at most one node per type, a short idle timeout."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    node_types = {}
    for name, node_type in aws["available_node_types"].items():
        resources = {**node_type["resources"], "CPU": min(node_type["resources"].get("CPU", 0), 1)}
        if name == aws["head_node_type"]:
            node_types[HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
        else:
            node_types[name] = {"resources": resources, "node_config": {}, "min_workers": 0, "max_workers": 1,
                                **({"priority": node_type["priority"]} if "priority" in node_type else {})}
    return {
        "cluster_name": "fake-satscale", "max_workers": len(node_types) - 1, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MINUTES,
        # `type: fake_multinode` needs a defaults file the wheel lacks; the same provider class as an external
        # module needs none. gcs_address: this head's port, not the default 6379 another Ray may hold.
        "provider": {"type": "external", "module": FAKE_PROVIDER, "gcs_address": gcs_address,
                     "head_node_id": FAKE_HEAD_NODE_ID, "launch_multiple": True, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": node_types, "head_node_type": HEAD_TYPE,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def _stop_group(process: subprocess.Popen, grace_s: float = 60) -> None:
    """End the process group `process` leads: `ray start --block` stops its processes on SIGTERM (the fake
    nodes were spawned inside the group too); SIGKILL for whatever outlives the grace period."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            process.poll()
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(1)


def _node_types(gcs_address: str) -> list[str]:
    """The node types the autoscaler reports up or starting, head included."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(gcs_address)
    return sorted(node.ray_node_type_name for node in
                  status.active_nodes + status.idle_nodes + status.pending_nodes)


# What the autoscaler reports comes from the GCS, which answers slowly (or not) while the machine is busy.
_GCS_SLOW = (Exception,)


def _start_head(config: dict, port: int, temp_dir: Path, log_path: Path) -> subprocess.Popen:
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    config_path = temp_dir / "fake_cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head = config["available_node_types"][HEAD_TYPE]["resources"]
    environment = {**os.environ,  # RAY_AUTH_MODE=token and the session's token (tests/conftest.py)
                   "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                   # What `ray up` sets for the head: autoscaler v2, the head's instance id and node type.
                   "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                   "RAY_NODE_TYPE_NAME": HEAD_TYPE}
    custom = {name: amount for name, amount in head.items() if name not in ("CPU", "GPU")}
    command, _ = loopback_ray_head(port, temp_dir, f"--num-cpus={head['CPU']}", f"--resources={json.dumps(custom)}",
                                   f"--autoscaling-config={config_path}")
    with open(log_path, "a") as log:
        return subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.fixture
def fake_autoscaling_cluster(tmp_path):
    """(GCS address, head process): a fake autoscaling head whose node types are aws.yaml's, with the cluster's
    capacity published as the head of cluster/aws.yaml does (cluster/capacity.py)."""
    from ray._private.services import resolve_ip_for_localhost

    temp_dir = Path(tempfile.mkdtemp(prefix="rf-", dir="/tmp"))  # short: Ray's socket paths are limited
    log_path = tmp_path / "head.log"
    head = None
    try:
        for attempt in range(2):  # a free port taken by another Ray between choosing and binding it
            port = free_loopback_port()
            gcs_address = f"{resolve_ip_for_localhost('127.0.0.1')}:{port}"
            config = fake_cluster_config(yaml.safe_load(AWS.read_text()), gcs_address)
            head = _start_head(config, port, temp_dir, log_path)
            try:
                wait_until(lambda: HEAD_TYPE in _node_types(gcs_address), 240, "the fake head", interval_s=1,
                           process=head, retry_on=_GCS_SLOW)
            except AssertionError:
                pass
            if head.poll() is None:
                break
            _stop_group(head, grace_s=20)
        else:
            raise RuntimeError(f"the fake autoscaling head did not start:\n{log_path.read_text()[-4000:]}")
        # What aws.yaml's head_start_ray_commands run after `ray start`.
        assert publish_capacity(["--config", str(temp_dir / "fake_cluster.yaml"), "--address", gcs_address,
                                 "--wait", "60"]) == 0
        yield gcs_address, head
    finally:
        if head is not None:
            _stop_group(head, grace_s=5)  # an orderly stop takes ~30 s; SIGKILL leaves nothing behind either
        shutil.rmtree(temp_dir, ignore_errors=True)


def _study_file(path: Path, betons) -> Path:
    study = {
        "name": "fake-gpu-node",
        "base": {
            "model": {"arch": "resnet18", "num_classes": 10, "width_mult": 0.125, "depth_mult": 0.25,
                      "resolution": DIGITS_RESOLUTION},
            "train": {"epochs": 1, "optimizer": {"lr": 0.1}, "max_eval_batches": 1,
                      "train_attack": {"eps": 0.1, "step_size": 0.125, "steps": 1},
                      "eval_attack": {"eps": 0.1, "step_size": 0.025, "steps": 2}},
            "data": {"train_path": str(betons["train"]), "eval_path": str(betons["test"]),
                     "loader_options": {"train_crop": "resize"}},
            # Only the A10G node types advertise this; the fake ones have no CUDA, so use_gpu stays off.
            "workers": {"num_workers": 1, "accelerator_type": "A10G"},
            "global_batch_size": 128, "reference_batch_size": 128,
        },
        "search": {"activations": ["relu"]},
        "tune": {"scheduler": "fifo"},
    }
    path.write_text(yaml.safe_dump(study))
    return path


def test_a_study_scales_a_gpu_node_type_up_from_zero_and_back(fake_autoscaling_cluster, digits_betons, tmp_path):
    gcs_address, head = fake_autoscaling_cluster
    assert _node_types(gcs_address) == [HEAD_TYPE]  # no worker node before the study

    command = [sys.executable, str(SCRIPT), "--config", str(_study_file(tmp_path / "study.yaml", digits_betons)),
               "--storage", str(tmp_path / "storage"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "--verbose"]  # Tune's own status lines too: they name the resources the trial's driver took
    # A local folder on an autoscaling cluster is refused before anything runs; these fake nodes share this
    # machine's disk, which --shared-storage vouches for.
    refused = subprocess.run(command, env={**os.environ, "RAY_ADDRESS": gcs_address}, capture_output=True,
                             text=True, timeout=180)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    assert "is a folder on this node" in refused.stderr and "--shared-storage" in refused.stderr
    assert not (tmp_path / "storage").exists() and not (tmp_path / "mlflow.db").exists()
    command.append("--shared-storage")
    log_path = tmp_path / "study.log"
    with open(log_path, "w") as log:
        study = subprocess.Popen(command, env={**os.environ, "RAY_ADDRESS": gcs_address}, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 480
        while study.poll() is None and time.monotonic() < deadline:
            try:
                seen.update(_node_types(gcs_address))
            except Exception:  # a slow GCS answer; the next poll retries
                pass
            time.sleep(1)
    finally:
        if study.poll() is None:
            _stop_group(study, grace_s=10)
    output = log_path.read_text()
    assert study.returncode == 0, output[-6000:]
    assert "| 1 | relu |" in output  # the trial finished and made the leaderboard

    # The spot A10G type (priority 1 in aws.yaml) was started for it, nothing else: not the on-demand A10G
    # fallback, not the A100 or CPU types, though all were at zero too.
    assert seen - {HEAD_TYPE} == {"gpu_1x_spot"}, seen
    assert f"{TRIAL_DRIVER_RESOURCE}" in output  # the trial's driver took a slot (Tune's resource line)
    assert head.poll() is None
    # Idle for idle_timeout_minutes, the node is removed.
    wait_until(lambda: _node_types(gcs_address) == [HEAD_TYPE], 120 + 60 * IDLE_TIMEOUT_MINUTES,
               "the idle A10G node's removal", interval_s=1, retry_on=_GCS_SLOW)
