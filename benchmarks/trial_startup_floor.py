"""The floor under a trial's start-up: how long Ray Tune and Ray Train alone take from a trial's TorchTrainer to
its worker's loop, when the loop does none of satscale's work (no FFCV, no model, no MLflow).

Runs the embedded default's shape on a local Ray started the way scale_study.py starts it (its start-up
settings, `orchestrator.scale_study.connect_ray`): 4 trials, as many at a time as it runs (2 on 2 cores), each
trial's Tune driver holding no CPU (`orchestrator.runner.trial_driver_resources`), one Train worker with one
CPU, Tune reusing trial actors. Each trial's clock starts where satscale's does (`trainers.distributed.
build_trainer`: the TorchTrainer's construction). Its loop notes when it began, then keeps its core busy for
`--busy-s` seconds, as a trial's training does, so later trials start beside a training one, as in the study.
Compare `time_to_loop_s` with embedded_default.json's `time_to_worker_start_s` (the same span in the study);
run the two back to back:

    python benchmarks/trial_startup_floor.py && python benchmarks/embedded_default.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

from embedded_default import machine, spread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results" / "trial_startup_floor.json"


def _idle_loop(config: dict) -> None:
    """A Train worker's loop with nothing of satscale's in it: report when it began, then busy its core."""
    import ray.train

    entered = time.time()
    while time.time() < entered + config["busy_s"]:
        pass
    ray.train.report({"time_to_loop_s": entered - config["built_at"]})


def _trial(config: dict) -> None:
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    TorchTrainer(_idle_loop, train_loop_config={"built_at": time.time(), "busy_s": config["busy_s"]},
                 scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"floor-{tune.get_context().get_trial_id()}",
                                      storage_path=config["storage_path"], callbacks=[TuneReportCallback()])).fit()


def measure(trials: int, busy_s: float, storage_path: str) -> list[float]:
    """Each trial's seconds from its TorchTrainer's construction to its worker's loop, in trial order."""
    from orchestrator.scale_study import connect_ray, local_ray_settings

    local_ray_settings(bind_all=False)
    connect_ray(bind_all=False, log_to_driver=False)
    from ray import tune

    from orchestrator.runner import cluster_capacity, max_concurrent_trials, trial_driver_resources
    from search_spaces.study import load_study

    capacity = cluster_capacity().totals
    tuner = tune.Tuner(
        tune.with_resources(_trial, trial_driver_resources(capacity)),
        param_space={"busy_s": busy_s, "storage_path": storage_path, "index": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(reuse_actors=True,
                                    max_concurrent_trials=max_concurrent_trials(load_study("default"), capacity)),
        run_config=tune.RunConfig(name="floor", storage_path=storage_path, verbose=0))
    results = tuner.fit()
    failed = [result.error for result in results if result.error]
    if failed:
        raise SystemExit(f"{len(failed)} trial(s) failed: {failed[0]}")
    ordered = sorted(results, key=lambda result: result.config["index"])
    return [round(result.metrics["time_to_loop_s"], 2) for result in ordered]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--busy-s", type=float, default=20.0, help="each loop's busy time (a trial's training)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    host = machine()
    with tempfile.TemporaryDirectory(prefix="satscale-floor-") as storage_path:
        started = time.time()
        per_trial = measure(args.trials, args.busy_s, storage_path)
        wall = time.time() - started
    record = {"date": datetime.date.today().isoformat(), "machine": host, "trials": args.trials,
              "busy_s": args.busy_s, "wall_seconds": round(wall, 1), "time_to_loop_s_per_trial": per_trial,
              "time_to_loop_s": spread(per_trial)}
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["time_to_loop_s"]))
    print(f"Ray Tune + Ray Train alone: trial start -> worker's loop {record['time_to_loop_s']['median']} s median "
          f"over {args.trials} trials -> {args.output}")


if __name__ == "__main__":
    main()
