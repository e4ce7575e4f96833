"""What a trial spends: the devices it holds times how long it ran, and an estimate in dollars.

Device-hours are the trial's Ray Train workers' resources (CPUs; GPUs when `workers.use_gpu`) times its wall time:
its running time as Tune counts it (`time_total_s`), added up over every run of the trial (Tune counts from 0
again when it restarts one at --resume or after a failure; `MLflowStudyCallback.trial_seconds`), its Train run's
start-up included (Train controller, workers, data loaders, first batch); not included are the few seconds
before that, while Ray starts the trial's own actor. Dollars: the share of a node the trial holds (the larger of
its CPU and GPU shares of the node type's resources in cluster/aws.yaml) times that node type's price per hour
(`cluster.pricing`, overridable in the study file's `cost` block), times the hours.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.pricing import aws_node_types

if TYPE_CHECKING:  # the reports import Spend and must stay light (no torch)
    from search_spaces.study import CostSettings
    from trainers.trial import TrialConfig, WorkersConfig

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Spend:
    wall_s: float
    cpu_hours: float
    gpu_hours: float
    usd: float

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.wall_s + other.wall_s, self.cpu_hours + other.cpu_hours,
                     self.gpu_hours + other.gpu_hours, self.usd + other.usd)

    def times(self, factor: float) -> Spend:
        return Spend(self.wall_s * factor, self.cpu_hours * factor, self.gpu_hours * factor, self.usd * factor)


NOTHING_SPENT = Spend(0.0, 0.0, 0.0, 0.0)


def trial_node_type(workers: WorkersConfig, settings: CostSettings) -> str:
    """The node type whose price a trial pays: the study's `cost.node_type`, else by what the trial asks for."""
    if settings.node_type:
        return settings.node_type
    if not workers.use_gpu:
        return "cpu"
    return "gpu_8x" if workers.accelerator_type == "A100" else "gpu_1x"


def trial_spend(trial: TrialConfig, wall_s: float, settings: CostSettings) -> Spend:
    workers = trial.workers
    hours = max(wall_s, 0.0) / SECONDS_PER_HOUR
    cpus = workers.num_workers * workers.cpus_per_worker
    gpus = workers.num_workers * workers.gpus_per_worker if workers.use_gpu else 0.0
    node_name = trial_node_type(workers, settings)
    node = aws_node_types()[node_name].resources
    node_cpus, node_gpus = node.get("CPU", 0), node.get("GPU", 0)
    node_share = max(cpus / node_cpus if node_cpus else 0.0, gpus / node_gpus if node_gpus else 0.0)
    return Spend(wall_s, cpus * hours, gpus * hours, node_share * settings.prices()[node_name] * hours)


def total_spend(spends: Iterable[Spend | None]) -> Spend:
    return sum((spend for spend in spends if spend is not None), NOTHING_SPENT)
