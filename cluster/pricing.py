"""What the node types of cluster/aws.yaml cost and hold: the default prices of a study's cost estimate.

Prices are USD per node-hour, AWS us-west-2, Linux: on-demand list prices, and a typical spot price for the spot
type (spot prices move; the study file's `cost.node_prices_usd_per_hour` overrides any of them). A node's CPUs
and GPUs are the Ray resources its type advertises in the YAML, read from the file so they cannot drift apart.
"""
from __future__ import annotations

import functools
from pathlib import Path

from cluster.validate import NodeType
from cluster.validate import aws_node_types as read_node_types

AWS_CLUSTER_CONFIG = Path(__file__).with_name("aws.yaml")
NODE_PRICES_USD_PER_HOUR = {
    "head": 0.384,          # m5.2xlarge on demand
    "cpu": 0.384,           # m5.2xlarge on demand
    "gpu_1x_spot": 0.50,    # g5.2xlarge (1 A10G) spot, typical
    "gpu_1x": 1.212,        # g5.2xlarge on demand
    "gpu_8x": 32.773,       # p4d.24xlarge (8 A100) on demand
}


@functools.cache
def aws_node_types() -> dict[str, NodeType]:
    """cluster/aws.yaml's node types (as Ray's autoscaler reads them) by name, with the resources they advertise."""
    return {node.name: node for node in read_node_types(AWS_CLUSTER_CONFIG)}
