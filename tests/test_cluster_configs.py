"""The cluster configs, offline: Ray's own validation of every cluster YAML and KubeRay manifest, then what the
schema cannot see (cluster/validate.py): the node types the studies ask for exist, the installs match
`make setup`, nothing is open to the internet, no credentials, token auth on, the runner's resource shapes."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from cluster import TRIAL_DRIVER_RESOURCE
from cluster.capacity import autoscaling_config_from_file, autoscaling_config_from_kuberay, cluster_config
from cluster.validate import (MakeSetup, NodeType, aws_commands_and_images, aws_exposure_problems, aws_node_types,
                              check_file, credential_problems, dockerfile_commands, image_problems,
                              install_problems, kubernetes_exposure_problems, kuberay_node_types, layout_problems,
                              load_documents, main, read_make_setup, study_problems)
from search_spaces.study import load_study, preset_names
from trainers.errors import ConfigError, validated
from trainers.trial import WorkersConfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
AWS = CLUSTER / "aws.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
SERVICES = CLUSTER / "kuberay" / "services.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
STUDY = CLUSTER / "study_gpu.yaml"


@pytest.fixture(scope="module")
def aws_types() -> list[NodeType]:
    return aws_node_types(AWS)


@pytest.fixture(scope="module")
def kuberay_types() -> list[NodeType]:
    return kuberay_node_types(load_documents(RAYCLUSTER)[0])


def _rayjob():
    config_map, rayjob = load_documents(RAYJOB)
    return config_map, rayjob


def _studies():
    return [load_study(name) for name in preset_names()] + [load_study(STUDY)]


# --- Ray's own validation -------------------------------------------------------------------------------------

def test_every_cluster_config_passes_rays_own_validation(aws_types, kuberay_types):
    config = autoscaling_config_from_file(AWS)  # prepare_config + validate_config, as `ray up` runs them
    assert config["provider"]["type"] == "aws" and config["idle_timeout_minutes"] > 0
    assert {node.name for node in aws_types} == {"head", "cpu", "gpu_1x_spot", "gpu_1x", "gpu_8x"}
    _, rayjob = _rayjob()
    for raycluster in (load_documents(RAYCLUSTER)[0], {"metadata": rayjob["metadata"],
                                                       "spec": rayjob["spec"]["rayClusterSpec"]}):
        derived = autoscaling_config_from_kuberay(raycluster)  # what KubeRay's in-tree autoscaler reads
        assert derived["idle_timeout_minutes"] == 10
    assert {node.name for node in kuberay_types} == {"headgroup", "cpu", "gpu-1x", "gpu-8x"}
    for node in (*aws_types, *kuberay_types):
        if node.resources.get("GPU"):
            assert node.min_workers == 0 and node.max_workers > 0, node  # GPU node types scale from zero
    assert any(node.spot for node in aws_types)  # spot GPU capacity, with on-demand beside it


def test_ray_rejects_a_broken_cluster_config(tmp_path):
    broken = yaml.safe_load(AWS.read_text())
    broken["available_node_types"]["gpu_1x"]["resources"]["GPU"] = "one"
    path = tmp_path / "aws.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(ConfigError, match="Ray rejects the cluster config"):
        autoscaling_config_from_file(path)


# --- layout: where trial drivers and Train workers go ---------------------------------------------------------

def test_head_trains_nothing_and_trial_drivers_stay_off_spot(aws_types, kuberay_types):
    assert layout_problems(aws_types) == []
    assert layout_problems(kuberay_types) == []
    for types in (aws_types, kuberay_types):
        head = next(node for node in types if node.head)
        assert head.resources.get("CPU") == 0 and not head.resources.get("GPU")
        assert head.resources[TRIAL_DRIVER_RESOURCE] >= 1

    def with_change(name: str, **change) -> list[NodeType]:
        return [NodeType(**{**vars(node), **change}) if node.name == name else node for node in aws_types]

    spot_driver = with_change("gpu_1x_spot", resources={"CPU": 8, "GPU": 1, TRIAL_DRIVER_RESOURCE: 4})
    assert any("spot node type offers" in problem for problem in layout_problems(spot_driver))
    training_head = with_change("head", resources={"CPU": 8, TRIAL_DRIVER_RESOURCE: 8})
    assert any("the head offers" in problem for problem in layout_problems(training_head))
    no_slots = [NodeType(**{**vars(node), "resources": {key: value for key, value in node.resources.items()
                                                        if key != TRIAL_DRIVER_RESOURCE}}) for node in aws_types]
    assert any("no node type offers" in problem for problem in layout_problems(no_slots))


def test_every_study_fits_the_node_types(aws_types, kuberay_types):
    for study in _studies():
        assert study_problems(study, aws_types) == [], study.name
        assert study_problems(study, kuberay_types) == [], study.name
    study = load_study(STUDY)
    too_many = load_study(STUDY, ["workers={num_workers: 64, use_gpu: true, accelerator_type: A100}",
                                  "global_batch_size=256"])
    assert "hold 16 at their max_workers" in study_problems(too_many, aws_types)[0]  # 2 nodes x 8 A100
    nowhere = load_study(STUDY, ["workers.accelerator_type=H100"])
    assert "no worker node type offers" in study_problems(nowhere, aws_types)[0]
    assert study_problems(study, [node for node in aws_types if not node.resources.get("GPU")])


def test_accelerator_type_pins_workers_to_a_node_type():
    workers = WorkersConfig(num_workers=2, use_gpu=True, accelerator_type="A10G")
    assert workers.resources_per_worker() == {"CPU": 1.0, "GPU": 1.0, "accelerator_type:A10G": 0.001}
    assert "accelerator_type:A10G" not in str(WorkersConfig(use_gpu=True).resources_per_worker())
    with pytest.raises(ConfigError, match=r"accelerator_type: unknown accelerator type .*accepted: .*A10G"):
        validated(WorkersConfig, {"accelerator_type": "a10g"})


def test_runner_sizes_studies_by_what_the_cluster_can_grow_to():
    """The runner's resource shapes against the AWS cluster at its largest, as Ray computes it from the
    ClusterConfig cluster.capacity publishes (Ray's own reader, used by Ray Train and the preflight check)."""
    from ray._private.state import GlobalState

    from orchestrator.runner import TRIAL_DRIVER_RESOURCES, max_concurrent_trials, trial_driver_resources

    published = cluster_config(autoscaling_config_from_file(AWS))
    keys = {key for group in published.node_group_configs for key in group.resources}
    capacity = {key: GlobalState._calculate_max_resource_from_cluster_config(published, key) for key in keys}
    # Drivers: the head's 8 slots and 8 on each of 4 cpu nodes. GPUs: 8 + 8 A10G nodes, 2 x 8 A100.
    assert capacity[TRIAL_DRIVER_RESOURCE] == 8 + 4 * 8 and capacity["GPU"] == 8 + 8 + 16
    assert trial_driver_resources(capacity) == {**TRIAL_DRIVER_RESOURCES, TRIAL_DRIVER_RESOURCE: 1}
    assert max_concurrent_trials(load_study(STUDY), capacity) == 32  # one GPU each; 40 driver slots
    one_node = load_study(STUDY, ["workers={num_workers: 8, use_gpu: true, cpus_per_worker: 4}",
                                  "global_batch_size=256"])
    assert max_concurrent_trials(one_node, capacity) == 4  # 8 GPUs per trial
    # A laptop (no driver slots): drivers hold only a token of memory, trials fit by CPU.
    laptop = {"CPU": 4.0, "memory": 8e9}
    assert trial_driver_resources(laptop) == TRIAL_DRIVER_RESOURCES
    assert max_concurrent_trials(load_study("default"), laptop) == 4


def test_local_storage_is_refused_where_trials_may_run_on_other_nodes(tmp_path):
    """Checkpoints are written from whichever node runs a trial and read back on another after a loss: on a
    cluster of several nodes, or one an autoscaler grows, a local folder must be shared. (The clusters here are
    described, not started: the real multi-node path is tests/test_cluster_autoscaling.py.)"""
    from orchestrator.preflight import ClusterCapacity, check_storage_reaches_every_node

    one_node = ClusterCapacity({"CPU": 2.0}, [{"CPU": 2.0}], autoscaling=False, alive_nodes=1)
    two_nodes = ClusterCapacity({"CPU": 4.0}, [{"CPU": 2.0}] * 2, autoscaling=False, alive_nodes=2)
    autoscaled = ClusterCapacity({"CPU": 34.0}, [{"CPU": 2.0}, {"CPU": 32.0}], autoscaling=True, alive_nodes=1)
    storage = tmp_path / "studies" / "new"  # not made yet: its nearest existing parent's filesystem counts
    storage.parent.mkdir()
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda1 / ext4 rw 0 0\nserver:/export {tmp_path / 'studies'} nfs4 rw 0 0\n")
    local_mounts = tmp_path / "local_mounts"
    local_mounts.write_text("/dev/vda1 / ext4 rw 0 0\n")

    check_storage_reaches_every_node(str(storage), one_node, shared_storage=False, mounts=local_mounts)
    for capacity, says in ((two_nodes, "2 nodes run this Ray cluster"), (autoscaled, "an autoscaler adds nodes")):
        for given in (str(storage), storage.as_uri()):
            with pytest.raises(ConfigError, match=rf"storage .*\(--storage\) is a folder on this node \(ext4 "
                                                  rf"filesystem\), but {says}.* use --storage s3://BUCKET/PREFIX, "
                                                  rf"or add --shared-storage"):
                check_storage_reaches_every_node(given, capacity, shared_storage=False, mounts=local_mounts)
        check_storage_reaches_every_node(str(storage), capacity, shared_storage=True, mounts=local_mounts)
        check_storage_reaches_every_node(str(storage), capacity, shared_storage=False, mounts=mounts)  # NFS
        check_storage_reaches_every_node("s3://bucket/studies", capacity, shared_storage=False, mounts=local_mounts)


# --- installs, images -----------------------------------------------------------------------------------------

def test_setup_installs_what_make_setup_does():
    setup = read_make_setup()
    assert "libopencv-dev" in setup.system_packages and setup.torch_spec.startswith("torch==")
    commands, images = aws_commands_and_images(AWS)
    assert install_problems(commands, "aws.yaml") == []
    assert image_problems(images, "aws.yaml") == [] and len(images) >= 2
    runs, bases = dockerfile_commands(DOCKERFILE)
    assert install_problems(runs, "Dockerfile") == []
    assert image_problems(bases, "Dockerfile") == []
    assert load_documents(RAYCLUSTER)[0]["spec"]["rayVersion"] == ray.__version__

    # Drift either way is caught: a package the cluster lost, a requirement make setup gained.
    without_turbojpeg = [command.replace("libturbojpeg0-dev", "") for command in commands]
    assert "libturbojpeg0-dev" in install_problems(without_turbojpeg, "aws.yaml")[0]
    grown = MakeSetup(setup.system_packages, setup.torch_spec, (*setup.pip_requirements, "optuna==3.6.1"))
    assert "optuna==3.6.1" in install_problems(commands, "aws.yaml", grown)[0]
    assert "is not rayproject/ray:" in image_problems(["rayproject/ray:2.9.0-py39-cpu"], "x")[0]


def fake_nvidia_smi(folder: Path, driver: str | None) -> dict[str, str]:
    """An environment whose PATH finds a stand-in `nvidia-smi` (no GPU here: the real one cannot run) reporting
    `driver` for two GPUs, or failing as it does on a machine without a GPU (driver None)."""
    folder.mkdir(exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '{driver}\\n{driver}\\n'\n" if driver else
                      "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA "
                      "driver' >&2\nexit 9\n")
    script.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize(("driver", "expected"), [
    ("580.65.06", "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130"),
    ("575.51.03", "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"),
    ("565.57.01", "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"),
    (None, "torch==2.13.0"),
])
def test_make_setup_installs_the_torch_build_the_driver_runs(driver, expected, tmp_path):
    environment = fake_nvidia_smi(tmp_path / "bin", driver)
    chosen = subprocess.run([sys.executable, str(CLUSTER / "torch_build.py")], env=environment, capture_output=True,
                            text=True, check=True)
    assert chosen.stdout.strip() == expected
    # What `make setup` would run (a dry run into an empty virtualenv folder): the same build, as pip arguments.
    plan = subprocess.run(["make", "-n", f"{tmp_path}/venv/.satscale-installed", f"VENV={tmp_path}/venv"], cwd=ROOT,
                          env=environment, capture_output=True, text=True, check=True)
    assert f"{tmp_path}/venv/bin/python -m pip install -q {expected}\n" in plan.stdout
    on_cluster_cpu = subprocess.run([sys.executable, str(CLUSTER / "torch_build.py"), "--cpu-index"],
                                    env=environment, capture_output=True, text=True, check=True).stdout.strip()
    assert on_cluster_cpu == (expected if driver else "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")


def test_a_driver_older_than_every_cuda_build_stops_the_setup_saying_what_it_needs(tmp_path):
    environment = fake_nvidia_smi(tmp_path / "bin", "535.183.01")
    chosen = subprocess.run([sys.executable, str(CLUSTER / "torch_build.py")], env=environment, capture_output=True,
                            text=True)
    assert chosen.returncode == 2 and chosen.stdout == ""
    assert "NVIDIA driver 535.183.01 is older than every CUDA build" in chosen.stderr
    assert "cu126 >= 560.28.03" in chosen.stderr and "TORCH_SPEC" in chosen.stderr
    plan = subprocess.run(["make", "-n", f"{tmp_path}/venv/.satscale-installed", f"VENV={tmp_path}/venv"], cwd=ROOT,
                          env=environment, capture_output=True, text=True)
    assert '[ -n "" ] || { echo "make: no PyTorch build for this machine' in plan.stdout  # stops before pip


def test_make_setup_is_read_from_the_makefile(tmp_path):
    makefile = tmp_path / "Makefile"
    makefile.write_text('TORCH_SPEC ?= torch==9.9\nSYSTEM_PACKAGES := a b\n'
                        '\t$(VENV)/bin/python -m pip install -q --upgrade pip\n'
                        '\t$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"\n'
                        '\t$(VENV)/bin/python -m pip install -q -e ".[dev]"\n'
                        '\t$(VENV)/bin/python -m pip install -q --no-deps "extra==1.0"\n')
    assert read_make_setup(makefile) == MakeSetup(("a", "b"), "torch==9.9", ("extra==1.0",))


# --- exposure, credentials, authentication --------------------------------------------------------------------

def test_nothing_opens_the_dashboard_or_mlflow_to_the_internet():
    raw = load_documents(AWS)[0]
    assert aws_exposure_problems(raw, "aws.yaml") == []
    for path in (RAYCLUSTER, RAYJOB, SERVICES):
        assert kubernetes_exposure_problems(load_documents(path), path.name) == []

    opened = copy.deepcopy(raw)
    opened["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    problems = aws_exposure_problems(opened, "aws.yaml")
    assert len(problems) == 1 and "8265-8265" in problems[0]
    services = load_documents(SERVICES)
    next(doc for doc in services if doc["kind"] == "Service")["spec"]["type"] = "LoadBalancer"
    assert "LoadBalancer" in kubernetes_exposure_problems(services, "services.yaml")[0]
    raycluster = load_documents(RAYCLUSTER)[0]
    raycluster["spec"]["headGroupSpec"]["serviceType"] = "NodePort"
    assert "NodePort" in kubernetes_exposure_problems([raycluster], "raycluster.yaml")[0]


def test_no_credentials_in_the_cluster_files():
    files = [path for path in CLUSTER.rglob("*")
             if path.suffix in (".yaml", ".json") or path.name.startswith("Dockerfile")]
    assert len(files) >= 9
    for path in files:
        assert credential_problems(path.read_text(), path.name) == [], path
    assert credential_problems("provider:\n  aws_secret_access_key: abc\n", "x")
    assert credential_problems("export RAY_AUTH_TOKEN=abc123", "x")


def test_token_auth_is_on_and_the_token_comes_from_a_secret():
    raw = load_documents(AWS)[0]
    starts = [command for command in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
              if "ray start" in command]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in command for command in starts)
    assert any("ssm" in command and "~/.ray/auth_token" in command for command in raw["setup_commands"])
    for spec in (load_documents(RAYCLUSTER)[0]["spec"], _rayjob()[1]["spec"]["rayClusterSpec"]):
        assert spec["authOptions"] == {"mode": "token"}  # KubeRay generates the Secret and sets the env


def test_iam_is_scoped_to_the_projects_bucket():
    text = AWS.read_text() + STUDY.read_text() + RAYJOB.read_text() + SERVICES.read_text()
    buckets = set(re.findall(r"s3://([a-z0-9.-]+)", text))
    assert len(buckets) == 1
    bucket = buckets.pop()
    profiles = {node["node_config"]["IamInstanceProfile"]["Name"]
                for node in load_documents(AWS)[0]["available_node_types"].values()}
    assert profiles == {"satscale-ray-head", "satscale-ray-worker"}
    for name in ("head-policy.json", "worker-policy.json"):
        statements = json.loads((CLUSTER / "iam" / name).read_text())["Statement"]
        for statement in statements:
            actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
            resources = [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]
            if any(action.startswith("s3:") for action in actions):
                assert "s3:*" not in actions
                assert set(resources) <= {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, name
            if any(action.startswith(("ssm:", "iam:")) for action in actions):
                assert "*" not in resources, name


# --- KubeRay RayJob -------------------------------------------------------------------------------------------

def test_rayjob_runs_the_study_file_on_the_rayclusters_spec():
    config_map, rayjob = _rayjob()
    raycluster = load_documents(RAYCLUSTER)[0]
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]  # the two cannot drift apart
    entrypoint = rayjob["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["python", "orchestrator/scale_study.py"]
    study_path = entrypoint[entrypoint.index("--config") + 1]
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    mount = next(mount for mount in head["containers"][0]["volumeMounts"] if study_path.startswith(mount["mountPath"]))
    volume = next(volume for volume in head["volumes"] if volume["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert Path(study_path).name in config_map["data"]
    carried = yaml.safe_load(config_map["data"][Path(study_path).name])
    assert carried == yaml.safe_load(STUDY.read_text())
    assert load_study(STUDY).base_values()["workers"]["accelerator_type"] == "A10G"
    assert entrypoint[entrypoint.index("--storage") + 1].startswith("s3://")


def test_the_validate_command_checks_every_cluster_file(tmp_path, capsys):
    files = [str(path) for path in (AWS, RAYCLUSTER, RAYJOB, SERVICES, DOCKERFILE)]
    assert main([*files, "--study", str(STUDY), "--study", "default"]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    bad = yaml.safe_load(AWS.read_text())
    bad["available_node_types"]["gpu_1x_spot"]["resources"][TRIAL_DRIVER_RESOURCE] = 2
    path = tmp_path / "aws.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert check_file(path) == [f"gpu_1x_spot: a spot node type offers {TRIAL_DRIVER_RESOURCE}; keep trial "
                                "drivers on on-demand nodes (remove the resource here)"]
    assert main([str(path)]) == 1
