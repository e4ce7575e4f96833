"""Tell Ray how large an autoscaling cluster can grow.

Ray's readers of a cluster's largest size (Ray Train before it places a worker group, Ray Data, and the study's
own checks in `orchestrator.preflight.cluster_capacity`) read the autoscaler's `ClusterConfig` from the GCS, but
the open-source autoscalers (`ray up`, KubeRay) never write it: a cluster scaled down to zero GPU nodes looks as
if it could never run a GPU trial, and a study would be refused. The clusters in cluster/ publish it from their
autoscaling config as soon as the head is up:

    python -m cluster.capacity --config ~/ray_bootstrap_config.yaml     # ray up: head_start_ray_commands
    python -m cluster.capacity --kuberay NAME --namespace NAMESPACE     # KubeRay: the head's postStart hook
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from trainers.errors import ConfigError


def autoscaling_config_from_file(path: Path) -> dict[str, Any]:
    """A cluster YAML as the autoscaler reads it: Ray's own `prepare_config` and `validate_config` (what `ray up`
    runs before it touches the cloud; raises on a config Ray would reject)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read cluster config {path}: {error}") from None
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except (ValueError, KeyError, TypeError, jsonschema.ValidationError) as error:
        raise ConfigError(f"{path}: Ray rejects the cluster config: {str(error).splitlines()[0]}") from None
    return prepared


def autoscaling_config_from_kuberay(raycluster: Mapping[str, Any]) -> dict[str, Any]:
    """The autoscaling config Ray's KubeRay autoscaler derives from a RayCluster (it validates it, as there)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = copy.deepcopy(dict(raycluster))
    cr.setdefault("metadata", {}).setdefault("namespace", "default")
    return _derive_autoscaling_config_from_ray_cr(cr)


def cluster_config(autoscaling_config: Mapping[str, Any]):
    """Ray's `ClusterConfig` for an autoscaling config: one node group per node type, with its resources and
    node counts (the head counts once; a worker type at most the cluster-wide `max_workers`)."""
    from ray.core.generated import autoscaler_pb2

    cluster_max = autoscaling_config.get("max_workers")
    groups = []
    for name, node_type in autoscaling_config["available_node_types"].items():
        if name == autoscaling_config["head_node_type"]:
            low = high = 1
        else:
            low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
            high = min(high, cluster_max) if cluster_max is not None else high
        resources = {key: int(amount) for key, amount in node_type.get("resources", {}).items()}
        groups.append(autoscaler_pb2.NodeGroupConfig(name=name, resources=resources, min_count=low, max_count=high))
    return autoscaler_pb2.ClusterConfig(node_group_configs=groups)


def publish(gcs_address: str, autoscaling_config: Mapping[str, Any], wait_s: float = 0) -> None:
    """Write the cluster's `ClusterConfig` where Ray reads it, retrying for `wait_s` while the GCS starts.
    Token authentication comes from the environment (RAY_AUTH_MODE, the token), as for any Ray client."""
    from ray._raylet import GcsClient

    payload = cluster_config(autoscaling_config).SerializeToString()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            GcsClient(address=gcs_address).report_cluster_config(payload)
            return
        except Exception:  # the GCS is not up yet (connection or timeout errors of several kinds)
            if time.monotonic() >= deadline:
                raise
            time.sleep(2)


def _kuberay_config(name: str, namespace: str) -> dict[str, Any]:
    # What the KubeRay autoscaler itself runs each iteration: the RayCluster from the API server, with the pod's
    # service account (KubeRay grants the head pod read access to its RayCluster when autoscaling is on).
    from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

    return AutoscalingConfigProducer(name, namespace)()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.capacity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=Path, help="a Ray cluster YAML (on a `ray up` head: "
                                                    "~/ray_bootstrap_config.yaml)")
    source.add_argument("--kuberay", metavar="RAYCLUSTER", help="the RayCluster this head belongs to")
    parser.add_argument("--namespace", default="default", help="the RayCluster's namespace (with --kuberay)")
    parser.add_argument("--address", default="auto", help="GCS address (default: the Ray started on this machine)")
    parser.add_argument("--wait", type=float, default=300, metavar="SECONDS", help="how long to wait for the GCS")
    args = parser.parse_args(argv)
    try:
        config = autoscaling_config_from_file(args.config) if args.config else _kuberay_config(args.kuberay,
                                                                                               args.namespace)
    except ConfigError as error:
        print(f"cluster.capacity: {error}", file=sys.stderr)
        return 2
    address = args.address
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address_or_die

        address = canonicalize_bootstrap_address_or_die("auto")
    publish(address, config, wait_s=args.wait)
    groups = cluster_config(config).node_group_configs
    print("published: " + "; ".join(f"{group.name} x{group.max_count} {dict(group.resources)}" for group in groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
