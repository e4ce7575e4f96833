"""Fault injection for the reliability tests (tests/test_faults_*.py): off unless SATSCALE_FAULT_PLAN is set.

The training code calls `maybe_fault(point)` at a few named points. With SATSCALE_FAULT_PLAN naming a JSON
`FaultPlan` file (Ray hands the variable to trial drivers and Train workers through the job's runtime_env), a
worker SIGKILLs itself at the planned occurrence of a point: no exception, no cleanup, what a reclaimed spot
instance does to a process. Each planned kill fires once and in plan order: a marker file next to the plan
records it, so the restarted worker group runs on to the next kill. A plan may also cap a worker's address
space (`memory_limit_mb`) so that an oversized trial meets a real allocator failure without endangering the
machine. Without the variable, `maybe_fault` is one environment lookup.
"""
from __future__ import annotations

import json
import os
import resource
import signal
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trainers.errors import validated

FAULT_PLAN_VARIABLE = "SATSCALE_FAULT_PLAN"

# worker_start: a Train worker begins (before data and model); attack: a batch's attack is about to run;
# optimizer_step: the parameters were just updated, the LR schedule not yet; checkpoint_write: a checkpoint
# file is fully written under its temporary name, not yet renamed; checkpoint_reported: ray.train.report
# returned (checkpoint uploaded, its registration by the controller possibly still pending).
FaultPoint = Literal["worker_start", "attack", "optimizer_step", "checkpoint_write", "checkpoint_reported"]


class Kill(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    point: FaultPoint
    rank: int = Field(0, ge=0, description="the worker rank that dies")
    occurrence: int = Field(1, ge=1, description="the Nth time that worker process reaches `point`")


class FaultPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kills: tuple[Kill, ...] = ()
    memory_limit_mb: int | None = Field(None, ge=1, description="address space a worker may map beyond what it "
                                                                "maps at worker_start")

    def write(self, path: Path) -> Path:
        path.write_text(self.model_dump_json(indent=1))
        return path


def fired_dir(plan_path: Path) -> Path:
    """Where a plan's fired kills are recorded: one `kill-{index}.json` each (point, rank, pid)."""
    return plan_path.with_name(plan_path.name + ".fired")


def fired_kills(plan_path: Path) -> list[dict]:
    return [json.loads(marker.read_text()) for marker in sorted(fired_dir(plan_path).glob("kill-*.json"),
                                                               key=lambda marker: int(marker.stem.split("-")[1]))]


@lru_cache(maxsize=4)
def _plan(path: str) -> FaultPlan:
    return validated(FaultPlan, json.loads(Path(path).read_text()))


# Occurrences of each point in this process: a restarted worker is a new process and counts from zero.
_reached: Counter[str] = Counter()


def _rank() -> int:
    import torch.distributed

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _limit_address_space(extra_mb: int) -> None:
    with open("/proc/self/statm") as statm:
        mapped_bytes = int(statm.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped_bytes + (extra_mb << 20), hard))


def maybe_fault(point: FaultPoint) -> None:
    """Apply the fault plan at `point`, if there is one: SIGKILL this process when the first kill not yet fired
    is planned here, for this rank, at this occurrence."""
    plan_path = os.environ.get(FAULT_PLAN_VARIABLE)
    if not plan_path:
        return
    plan = _plan(plan_path)
    _reached[point] += 1
    if point == "worker_start" and plan.memory_limit_mb:
        _limit_address_space(plan.memory_limit_mb)
    markers = fired_dir(Path(plan_path))
    index = next((i for i in range(len(plan.kills)) if not (markers / f"kill-{i}.json").exists()), None)
    if index is None:
        return
    kill = plan.kills[index]
    if (kill.point, kill.rank, kill.occurrence) != (point, _rank(), _reached[point]):
        return
    markers.mkdir(exist_ok=True)
    with open(markers / f"kill-{index}.json", "x") as marker:
        json.dump({**kill.model_dump(), "pid": os.getpid()}, marker)
    os.kill(os.getpid(), signal.SIGKILL)
