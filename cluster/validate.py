"""Offline checks of the cluster configs, for what Ray's schema cannot see.

Ray validates a cluster YAML's structure (`cluster.capacity.autoscaling_config_from_file`: `prepare_config` and
`validate_config`, as `ray up` does) and derives node types from a RayCluster as its KubeRay autoscaler does; this
module checks the rest against the project:

- layout: the head trains nothing; trial drivers have slots (`orchestrator.runner.TRIAL_DRIVER_RESOURCE`) on
  on-demand nodes only; GPU node types scale from zero;
- studies: each study's worker group fits the node types at their max counts (else it would wait forever);
- installs: the setup commands / Dockerfile install what `make setup` does (the Makefile's SYSTEM_PACKAGES and
  pip lines) on the Ray and Python versions the project pins;
- exposure: no security group rule or Kubernetes Service opens anything but SSH to the internet; no credentials.

    python -m cluster.validate cluster/aws.yaml --study cluster/study_gpu.yaml
    python -m cluster.validate cluster/kuberay/*.yaml cluster/Dockerfile --study compound_scaling

Each check returns a list of problems (empty when fine), each naming the file's setting and the fix.
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster import TRIAL_DRIVER_RESOURCE
from cluster.capacity import autoscaling_config_from_file, autoscaling_config_from_kuberay
from cluster.torch_build import TORCH_VERSION
from trainers.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = ROOT / "Makefile"
OPEN_TO_ALL = {"0.0.0.0/0", "::/0"}
_CREDENTIALS = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|aws_session_token"
                          r"|RAY_AUTH_TOKEN\s*[=:]\s*\S", re.I)


@dataclass(frozen=True)
class NodeType:
    """One node type as the autoscaler sees it, and whether it runs on interruptible (spot) capacity."""

    name: str
    resources: Mapping[str, float]
    min_workers: int
    max_workers: int
    head: bool
    spot: bool

    @property
    def trains(self) -> bool:
        return bool(self.resources.get("CPU") or self.resources.get("GPU"))


# ------------------------------------------------------------------------------------------------ loading

def load_documents(path: Path) -> list[dict[str, Any]]:
    try:
        return [document for document in yaml.safe_load_all(Path(path).read_text()) if document]
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None


def aws_node_types(path: Path) -> list[NodeType]:
    """The node types of a `ray up` YAML, after Ray's own validation."""
    config = autoscaling_config_from_file(Path(path))
    types = []
    for name, node_type in config["available_node_types"].items():
        market = node_type.get("node_config", {}).get("InstanceMarketOptions", {}).get("MarketType", "")
        head = name == config["head_node_type"]
        types.append(NodeType(name, dict(node_type.get("resources", {})), 0 if head else node_type["min_workers"],
                              1 if head else node_type["max_workers"], head, market.lower() == "spot"))
    return types


def _pod_is_spot(template: Mapping[str, Any]) -> bool:
    spec = template.get("spec", {})
    selected = " ".join(f"{key}={value}" for key, value in (spec.get("nodeSelector") or {}).items())
    return "spot" in selected.lower()


def kuberay_node_types(raycluster: Mapping[str, Any]) -> list[NodeType]:
    """The node types Ray's KubeRay autoscaler derives from a RayCluster (and validates)."""
    config = autoscaling_config_from_kuberay(raycluster)
    spec = raycluster["spec"]
    templates = {config["head_node_type"]: spec["headGroupSpec"]["template"],
                 **{group["groupName"]: group["template"] for group in spec.get("workerGroupSpecs", [])}}
    return [NodeType(name, dict(node_type["resources"]), node_type["min_workers"],
                     1 if name == config["head_node_type"] else node_type["max_workers"],
                     name == config["head_node_type"], _pod_is_spot(templates[name]))
            for name, node_type in config["available_node_types"].items()]


# ------------------------------------------------------------------------------------------------ layout

def layout_problems(node_types: Sequence[NodeType]) -> list[str]:
    problems = []
    for node_type in node_types:
        if node_type.head and node_type.trains:
            problems.append(f"{node_type.name}: the head offers {dict(node_type.resources)}; give it CPU: 0 and no "
                            "GPU so that no Train worker runs there")
        if node_type.spot and node_type.resources.get(TRIAL_DRIVER_RESOURCE):
            problems.append(f"{node_type.name}: a spot node type offers {TRIAL_DRIVER_RESOURCE}; keep trial drivers "
                            "on on-demand nodes (remove the resource here)")
        if not node_type.head and node_type.resources.get("GPU") and node_type.min_workers:
            problems.append(f"{node_type.name}: min_workers is {node_type.min_workers}; GPU node types should "
                            "scale from 0")
    if not any(node_type.resources.get(TRIAL_DRIVER_RESOURCE) and node_type.max_workers for node_type in node_types):
        problems.append(f"no node type offers {TRIAL_DRIVER_RESOURCE} (the trial drivers' slots); add it to the "
                        "head's resources")
    return problems


def _per_node(node_type: NodeType, bundle: Mapping[str, float]) -> int:
    """How many `bundle`s one node of `node_type` holds."""
    return min((math.floor(node_type.resources.get(name, 0) / need) for name, need in bundle.items() if need > 0),
               default=0)


def study_problems(study, node_types: Sequence[NodeType]) -> list[str]:
    """Whether `study`'s worker group (from its base trial) can ever be placed on these node types."""
    from trainers.trial import TrialConfig

    workers = TrialConfig.parse(study.base_values()).workers
    bundle = workers.resources_per_worker()
    workers_nodes = [node_type for node_type in node_types if not node_type.head and node_type.max_workers]
    fitting = {node_type.name: _per_node(node_type, bundle) * node_type.max_workers for node_type in workers_nodes
               if _per_node(node_type, bundle)}
    if not fitting:
        return [f"study {study.name}: each worker needs {bundle}, which no worker node type offers; add a node type "
                "that does, or change the study's workers"]
    if sum(fitting.values()) < workers.num_workers:
        return [f"study {study.name}: {workers.num_workers} workers of {bundle}, but the node types that fit them "
                f"({', '.join(fitting)}) hold {sum(fitting.values())} at their max_workers; raise max_workers"]
    return []


# ------------------------------------------------------------------------------------------------ installs

TORCH_BUILD_SCRIPT = "cluster/torch_build.py"


@dataclass(frozen=True)
class MakeSetup:
    """What `make setup` installs, read from the Makefile."""

    system_packages: tuple[str, ...]
    torch_spec: str
    pip_requirements: tuple[str, ...]  # every other pip-installed requirement; the project itself excluded


def read_make_setup(makefile: Path = MAKEFILE) -> MakeSetup:
    text = makefile.read_text()
    packages = re.search(r"^SYSTEM_PACKAGES\s*:?=\s*(.+)$", text, re.M).group(1).split()
    torch_spec = re.search(r"^TORCH_SPEC\s*\?=\s*(.+)$", text, re.M).group(1).strip()
    if TORCH_BUILD_SCRIPT in torch_spec:  # chosen per machine: the pinned version is the script's
        torch_spec = f"torch=={TORCH_VERSION}"
    requirements = []
    for line in re.findall(r"pip install (.+)$", text, re.M):
        for argument in shlex.split(line):
            if argument.startswith(("-", ".")) or "$(" in argument or argument == "pip":
                continue  # options, the TORCH_SPEC variable, the project itself, pip's own upgrade
            requirements.append(argument)
    return MakeSetup(tuple(packages), torch_spec, tuple(requirements))


def _shell_commands(command: str) -> list[list[str]]:
    """The simple commands of a shell line, as words (split at &&, ||, ;, | and parentheses)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set("&|;()"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def _pip_arguments(commands: Iterable[str]) -> list[list[str]]:
    """The arguments of every `pip install` in `commands`."""
    return [words[words.index("install") + 1:] for command in commands for words in _shell_commands(command)
            if "pip" in words[:3] and "install" in words]


def install_problems(commands: Sequence[str], where: str, setup: MakeSetup | None = None) -> list[str]:
    """Whether `commands` (a node's setup commands, a Dockerfile's RUN lines) install what `make setup` does, on
    the Ray version the project pins."""
    import ray

    setup = setup or read_make_setup()
    problems = []
    apt = " ".join(command for command in commands if "apt-get install" in command).split()
    missing = [package for package in setup.system_packages if package not in apt]
    if missing:
        problems.append(f"{where}: apt-get install lacks {missing} (the Makefile's SYSTEM_PACKAGES)")
    pip = _pip_arguments(commands)
    installed = {argument for arguments in pip for argument in arguments}
    if any(TORCH_BUILD_SCRIPT in command and "pip install" in command for command in commands):
        installed.add(f"torch=={TORCH_VERSION}")  # the build the node's driver runs, of the pinned version
    for requirement in (setup.torch_spec, *setup.pip_requirements, f"ray[default]=={ray.__version__}"):
        if requirement not in installed:
            problems.append(f"{where}: no pip install of {requirement!r} (make setup installs it; Ray must match "
                            "the image)")
    if not any("-e" in arguments for arguments in pip):
        problems.append(f"{where}: the project is not pip-installed (-e PATH), as make setup does")
    return problems


def image_problems(images: Iterable[str], where: str) -> list[str]:
    """Every Ray image on the Ray and Python versions the project runs."""
    import ray

    expected = f"rayproject/ray:{ray.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return [f"{where}: image {image} is not {expected}-*, the project's Ray and Python" for image in images
            if not image.startswith(f"{expected}-")]


def dockerfile_commands(path: Path) -> tuple[list[str], list[str]]:
    """(RUN commands, FROM images) of a Dockerfile, continuation lines joined."""
    text = Path(path).read_text().replace("\\\n", " ")
    runs = re.findall(r"^RUN\s+(.+)$", text, re.M)
    return runs, re.findall(r"^FROM\s+(\S+)", text, re.M)


def aws_commands_and_images(path: Path) -> tuple[list[str], list[str]]:
    raw = load_documents(path)[0]
    commands = [*raw.get("setup_commands", []), *raw.get("head_setup_commands", []),
                *raw.get("worker_setup_commands", [])]
    docker = raw.get("docker", {})
    images = [docker[key] for key in ("image", "head_image", "worker_image") if key in docker]
    for node_type in raw.get("available_node_types", {}).values():
        commands += node_type.get("worker_setup_commands", [])
        images += [node_type["docker"]["worker_image"]] if "worker_image" in node_type.get("docker", {}) else []
    return commands, images


# ------------------------------------------------------------------------------------------------ exposure

def aws_exposure_problems(config: Mapping[str, Any], where: str) -> list[str]:
    """Security group rules in the config: only SSH (22/tcp) may be open to the whole internet."""
    problems = []
    rules = config.get("provider", {}).get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        cidrs = {item.get("CidrIp") for item in rule.get("IpRanges", [])} | {
            item.get("CidrIpv6") for item in rule.get("Ipv6Ranges", [])}
        ssh_only = (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort")) == ("tcp", 22, 22)
        if cidrs & OPEN_TO_ALL and not ssh_only:
            problems.append(f"{where}: provider.security_group opens ports {rule.get('FromPort')}-"
                            f"{rule.get('ToPort')} to the internet; the dashboard and MLflow are for SSH port "
                            "forwarding (ray dashboard) only")
    for name, node_type in config.get("available_node_types", {}).items():
        if node_type.get("node_config", {}).get("SecurityGroupIds"):
            problems.append(f"{where}: available_node_types.{name}.node_config.SecurityGroupIds: groups outside "
                            "this file cannot be checked; use provider.security_group")
    return problems


def kubernetes_exposure_problems(documents: Sequence[Mapping[str, Any]], where: str) -> list[str]:
    """Services stay inside the Kubernetes cluster (ClusterIP), no Ingress, no host ports."""
    problems = []
    for document in documents:
        kind, name = document.get("kind"), document.get("metadata", {}).get("name")
        if kind == "Service" and document.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"{where}: Service {name} is {document['spec']['type']}; use ClusterIP and "
                            "kubectl port-forward")
        if kind == "Ingress":
            problems.append(f"{where}: Ingress {name} exposes the cluster; use kubectl port-forward")
        spec = document.get("spec", {})
        for raycluster in (spec, spec.get("rayClusterSpec", {})) if kind in ("RayCluster", "RayJob") else ():
            service_type = raycluster.get("headGroupSpec", {}).get("serviceType", "ClusterIP")
            if service_type != "ClusterIP":
                problems.append(f"{where}: {kind} {name}: headGroupSpec.serviceType is {service_type}; use "
                                "ClusterIP")
        if re.search(r"\bhostPort\b|\bhostNetwork:\s*true", yaml.safe_dump(dict(document))):
            problems.append(f"{where}: {kind} {name} uses the node's network (hostPort/hostNetwork)")
    return problems


def credential_problems(text: str, where: str) -> list[str]:
    return [f"{where}: looks like a credential ({match.group(0)[:20]}...); take it from an instance profile, "
            "a Secret or SSM instead" for match in _CREDENTIALS.finditer(text)]


# ------------------------------------------------------------------------------------------------ command line

def check_file(path: Path, studies: Sequence[Any] = ()) -> list[str]:
    """Every check that applies to one cluster file (a `ray up` YAML, KubeRay manifests, a Dockerfile)."""
    path = Path(path)
    if path.name.endswith("Dockerfile"):
        runs, images = dockerfile_commands(path)
        return install_problems(runs, str(path)) + image_problems(images, str(path))
    documents = load_documents(path)
    problems = credential_problems(path.read_text(), str(path))
    if any("kind" in document for document in documents):  # Kubernetes manifests
        problems += kubernetes_exposure_problems(documents, str(path))
        for document in documents:
            if document.get("kind") in ("RayCluster", "RayJob"):
                spec = document["spec"] if document["kind"] == "RayCluster" else document["spec"]["rayClusterSpec"]
                node_types = kuberay_node_types({"metadata": document["metadata"], "spec": spec})
                problems += layout_problems(node_types)
                problems += [problem for study in studies for problem in study_problems(study, node_types)]
    else:
        node_types = aws_node_types(path)
        problems += layout_problems(node_types) + aws_exposure_problems(documents[0], str(path))
        commands, images = aws_commands_and_images(path)
        problems += install_problems(commands, str(path)) + image_problems(images, str(path))
        problems += [problem for study in studies for problem in study_problems(study, node_types)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="cluster YAML files, KubeRay manifests, Dockerfiles")
    parser.add_argument("--study", action="append", default=[], help="a study file or preset to check the "
                                                                     "node types against (repeatable)")
    args = parser.parse_args(argv)
    from search_spaces.study import load_study

    try:
        studies = [load_study(study) for study in args.study]
        problems = [problem for path in args.files for problem in check_file(path, studies)]
    except ConfigError as error:
        print(f"cluster.validate: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) in {', '.join(map(str, args.files))}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
