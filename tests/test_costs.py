"""What trials spend: device-hours from their workers' resources and wall time, dollars at node prices (the
cluster YAML's node types by default, the study file's `cost` block over them)."""
from __future__ import annotations

from dataclasses import astuple

import pytest
import yaml

from cluster.pricing import AWS_CLUSTER_CONFIG, NODE_PRICES_USD_PER_HOUR, aws_node_types
from orchestrator.costs import total_spend, trial_spend
from search_spaces.study import CostSettings, load_study
from trainers.errors import ConfigError
from trainers.trial import TrialConfig


def trial(**workers) -> TrialConfig:
    return TrialConfig.parse(load_study("default", [f"workers.{name}={value}" for name, value in workers.items()])
                             .base_values())


def test_every_node_type_of_the_cluster_yaml_has_a_price_and_its_resources():
    declared = yaml.safe_load(AWS_CLUSTER_CONFIG.read_text())["available_node_types"]
    assert set(NODE_PRICES_USD_PER_HOUR) == set(declared) == set(aws_node_types())
    assert aws_node_types()["gpu_8x"].resources["GPU"] == 8 and aws_node_types()["cpu"].resources["CPU"] == 8
    assert aws_node_types()["gpu_1x"].resources["GPU"] == 1


def test_a_trial_pays_its_share_of_the_node_type_it_needs_for_its_wall_time():
    defaults = CostSettings()
    # Two CPU workers of one CPU each for 90 minutes: a quarter of an 8-CPU node.
    cpu = trial_spend(trial(num_workers=2), 5400, defaults)
    assert astuple(cpu) == pytest.approx((5400, 3.0, 0.0, 0.25 * 0.384 * 1.5))
    # One A10G worker (8 CPUs asked, a whole g5.2xlarge) for an hour, at the on-demand price by default.
    gpu = trial_spend(trial(use_gpu=True, cpus_per_worker=8), 3600, defaults)
    assert astuple(gpu) == pytest.approx((3600, 8.0, 1.0, 1.212))
    # Four A100 workers: half a p4d.24xlarge.
    a100 = trial_spend(trial(use_gpu=True, num_workers=4, accelerator_type="A100", cpus_per_worker=4), 1800,
                       defaults)
    assert astuple(a100) == pytest.approx((1800, 8.0, 2.0, 0.5 * 32.773 * 0.5))
    # The study file's prices and node type win: the same GPU trial on spot at a negotiated price.
    spot = CostSettings(node_type="gpu_1x_spot", node_prices_usd_per_hour={"gpu_1x_spot": 0.3})
    assert trial_spend(trial(use_gpu=True, cpus_per_worker=8), 3600, spot).usd == pytest.approx(0.3)
    assert astuple(total_spend([cpu, None, gpu])) == pytest.approx((9000, 11.0, 1.0, cpu.usd + 1.212))


@pytest.mark.parametrize(("override", "expected"), [
    ("cost.node_type=gpu_9x", ["cost.node_type", "cpu, gpu_1x, gpu_1x_spot, gpu_8x", "gpu_9x"]),
    ("cost.node_type=head", ["cost.node_type", "node type that runs trials"]),
    ("cost.node_prices_usd_per_hour={gpu_9x: 1}", ["cost.node_prices_usd_per_hour", "gpu_9x", "gpu_1x_spot"]),
    ("cost.node_prices_usd_per_hour={cpu: -1}", ["cost.node_prices_usd_per_hour", "cpu", ">= 0"]),
])
def test_a_bad_cost_block_is_refused_naming_the_field(override, expected):
    with pytest.raises(ConfigError) as caught:
        load_study("default", [override])
    for text in expected:
        assert text in str(caught.value)
