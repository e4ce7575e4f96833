"""Failures injected for real into studies on the session's Ray head: Train workers SIGKILLed at chosen points
(trainers/faults.py), the MLflow server crashing mid-study, a trial running out of memory.

The fault plan reaches every Train worker the way any setting reaches a Ray cluster's processes: as an
environment variable in the job's runtime_env.
"""
from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient

from orchestrator.runner import TrackingUnavailableError, run_study
from search_spaces.study import StudyConfig
from tests.conftest import DIGITS_RESOLUTION
from tests.fixtures.waiting import wait_until
from trainers.checkpoint import STATE_FILE, load_training_state
from trainers.faults import FAULT_PLAN_VARIABLE, FaultPlan, Kill, fired_kills
from trainers.training import lr_multiplier
from trainers.trial import TrialConfig

TRAIN_SAMPLES, EVAL_SAMPLES = 512, 128
NUM_WORKERS, GLOBAL_BATCH = 2, 128
STEPS_PER_EPOCH = TRAIN_SAMPLES // NUM_WORKERS // (GLOBAL_BATCH // NUM_WORKERS)  # per rank, last batch dropped
EPS = 0.1


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> dict[str, Path]:
    """Digits .beton files small enough for many short epochs."""
    from trainers.data.convert import WriteOptions, convert

    folder = tmp_path_factory.mktemp("small-digits")
    paths = {"train": folder / "train.beton", "test": folder / "test.beton"}
    for split, limit in (("train", TRAIN_SAMPLES), ("test", EVAL_SAMPLES)):
        convert("digits", paths[split], split=split, limit=limit, options=WriteOptions(num_workers=1))
    return paths


def study_values(name: str, betons: dict[str, Path], epochs: int, **base) -> dict:
    """A one-trial study (silu) of a tiny ResNet; `base` overrides top-level trial settings."""
    return {
        "name": name,
        "base": {
            "model": {"arch": "resnet18", "num_classes": 10, "width_mult": 0.125, "depth_mult": 0.25,
                      "resolution": DIGITS_RESOLUTION},
            "train": {"epochs": epochs, "optimizer": {"lr": 0.1},
                      "train_attack": {"eps": EPS, "step_size": 1.25 * EPS, "steps": 1},
                      "eval_attack": {"eps": EPS, "step_size": EPS / 4, "steps": 2}, "max_eval_batches": 1},
            "data": {"train_path": str(betons["train"]), "eval_path": str(betons["test"]),
                     "loader_options": {"train_crop": "resize", "flip_probability": 0.0}},
            "workers": {"num_workers": NUM_WORKERS},
            "global_batch_size": GLOBAL_BATCH,
            "reference_batch_size": GLOBAL_BATCH,
            **base,
        },
        "search": {"activations": ["silu"]},
        "tune": {"scheduler": "fifo"},
    }


@contextmanager
def ray_job_environment(address: str, variables: dict[str, str]) -> Iterator[None]:
    """Rejoin the session's cluster as a job whose runtime_env carries `variables`: Ray hands a job's
    environment variables to every actor it starts for it (Tune trial drivers, Train controllers, workers)."""
    ray.shutdown()
    ray.init(address=address, configure_logging=False, runtime_env={"env_vars": variables})
    try:
        yield
    finally:
        ray.shutdown()
        ray.init(address=address, configure_logging=False)


def random_kill_plan(count: int, seed: int) -> FaultPlan:
    """`count` kills cycling through the four points, each on a random rank and at a random batch of the second
    epoch its worker group runs (checkpoint points: at that epoch's checkpoint), so every group finishes at
    least one epoch before it dies: the study progresses and every kill fires."""
    chooser = random.Random(seed)
    points = ("attack", "optimizer_step", "checkpoint_write", "checkpoint_reported")
    kills = []
    for index in range(count):
        point, rank = points[index % len(points)], chooser.randrange(NUM_WORKERS)
        if point in ("attack", "optimizer_step"):
            occurrence = STEPS_PER_EPOCH + chooser.randint(1, STEPS_PER_EPOCH)
        elif point == "checkpoint_write":
            # Only rank 0 writes a file (state.pt, once per epoch; no RNG state): its second epoch's.
            rank, occurrence = 0, 2
        else:
            occurrence = 1
        kills.append(Kill(point=point, rank=rank, occurrence=occurrence))
    return FaultPlan(kills=tuple(kills))


def trial_runs(tracking_uri: str, study_name: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    return [] if experiment is None else client.search_runs([experiment.experiment_id],
                                                            "tags.`satscale.role` = 'trial'")


def test_sigkilled_workers_resume_from_the_last_complete_checkpoint(ray_cluster, mlflow_server, small_digits,
                                                                    tmp_path):
    """Kills (SATSCALE_FAULT_KILLS, default 4: each of the four points once) of a two-worker trial, one per worker
    group; the plan is random (SATSCALE_FAULT_SEED) but replayable. docs/reliability.md has the tally of the
    10-kill runs (SATSCALE_FAULT_KILLS=10, about 6 minutes: more than the suite's budget)."""
    kills = int(os.environ.get("SATSCALE_FAULT_KILLS", 4))
    seed = int(os.environ.get("SATSCALE_FAULT_SEED", 0))
    plan_path = random_kill_plan(kills, seed).write(tmp_path / "plan.json")
    epochs = kills + 2
    study = StudyConfig.parse(study_values("killed-workers", small_digits, epochs, max_failures=kills))
    storage = tmp_path / "storage"
    with ray_job_environment(ray_cluster.address, {FAULT_PLAN_VARIABLE: str(plan_path)}):
        outcome = run_study(study, str(storage), mlflow_server)

    fired = fired_kills(plan_path)
    (row,) = outcome.rows
    # The run went on after every kill when it finished; otherwise the last kill is the one it did not survive.
    survived = len(fired) if row.state == "finished" else len(fired) - 1
    print(f"\n{survived}/{kills} injected worker kills survived (seed {seed}): "
          + ", ".join(f"{kill['point']}@rank{kill['rank']}#{kill['occurrence']}" for kill in fired))
    assert len(fired) == kills, f"only {len(fired)} of {kills} planned kills fired: {fired}"
    for kill in fired:  # each was a real SIGKILL: the process is gone
        with pytest.raises(ProcessLookupError):
            os.kill(kill["pid"], 0)
    assert (row.state, row.epochs, row.failure_reason) == ("finished", epochs, None)

    # MLflow: one child run for the one trial, every epoch exactly once.
    (child,) = trial_runs(mlflow_server, "killed-workers")
    assert child.info.status == "FINISHED" and child.data.tags["satscale.trial_state"] == "finished"
    client = MlflowClient(mlflow_server)
    for metric in ("clean_acc", "robust_acc", "train_loss", "lr"):
        steps = [point.step for point in client.get_metric_history(child.info.run_id, metric)]
        assert sorted(steps) == list(range(epochs)), (metric, steps)

    # Storage: Ray registers a checkpoint once every rank has reported it. The registered ones, the only ones a
    # restart may resume from, are complete and hold each epoch once; a kill may leave unregistered ones behind.
    run_dir = next(storage.glob("killed-workers-train-*"))
    registered = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
    assert [entry["metrics"]["epoch"] for entry in registered] == list(range(epochs))
    for entry in registered:
        checkpoint = run_dir / entry["checkpoint_dir_name"]
        assert {path.name for path in checkpoint.iterdir()} == {STATE_FILE}
        assert load_training_state(checkpoint)["epoch"] == entry["metrics"]["epoch"]
    assert not list(storage.rglob("*.partial"))  # a half-written file never left its worker
    # Each resume continued from the checkpoint's state: every epoch trained on all samples once, and ended on
    # the LR the uninterrupted schedule gives (a lost or replayed optimizer step would shift it).
    trial = TrialConfig.parse(load_training_state(run_dir / registered[-1]["checkpoint_dir_name"])["trial"])
    for entry in registered:
        metrics = entry["metrics"]
        assert (metrics["samples_trained"], metrics["samples_repeated"]) == (TRAIN_SAMPLES, 0)
        last_step = (metrics["epoch"] + 1) * STEPS_PER_EPOCH - 1
        assert metrics["lr"] == pytest.approx(trial.scaled_lr * lr_multiplier(
            last_step, STEPS_PER_EPOCH, epochs, trial.train.optimizer)), metrics["epoch"]


def test_mlflow_unreachable_mid_study_delays_metrics_but_loses_none(ray_cluster, mlflow_outage, small_digits,
                                                                   tmp_path):
    """The study's MLflow server drops off the network (connections refused, open ones closed: the server itself
    keeps running) once the trial has started, and is reachable again after its first epoch: training goes on
    meanwhile, and every epoch reaches the trial's run exactly once."""
    proxy, tracking_uri = mlflow_outage
    # Two epochs of ~1.5 s: the trial's last report can arrive while the driver's MLflow calls are failing. The
    # callback sends them from its own thread, so Tune's result hand-off never waits on MLflow (before it did,
    # this hung the trial 3 times in 8 runs; docs/reliability.md).
    epochs = 2
    study = StudyConfig.parse(study_values("mlflow-outage", small_digits, epochs, workers={"num_workers": 1}))
    storage = tmp_path / "storage"
    outage: dict[str, float] = {}

    def cut_then_restore() -> None:
        try:
            wait_until(lambda: trial_runs(tracking_uri, "mlflow-outage"), 300, "the trial's run")
            proxy.cut()
            outage["down"] = time.time()
            # The first epoch's report reached Tune: its result log has a line.
            wait_until(lambda: any(path.read_text().strip()
                                   for path in storage.glob("mlflow-outage/run_trial_*/result.json")),
                       300, "the first epoch's report in Tune")
            outage["up"] = time.time()
            proxy.restore()
        except Exception as error:  # surfaced by the test
            outage["error"] = repr(error)

    saboteur = threading.Thread(target=cut_then_restore, daemon=True)
    saboteur.start()
    outcome = run_study(study, str(storage), tracking_uri)
    saboteur.join(timeout=60)
    assert "up" in outage, outage

    (row,) = outcome.rows
    assert (row.state, row.epochs) == ("finished", epochs)
    result_lines = next(storage.glob("mlflow-outage/run_trial_*/result.json")).read_text().splitlines()
    reported_at = {json.loads(line)["epoch"]: json.loads(line)["timestamp"] for line in result_lines}
    during_outage = [epoch for epoch, at in reported_at.items()  # Tune's timestamps are whole seconds
                     if int(outage["down"]) <= at <= outage["up"]]
    assert during_outage, ("no epoch was reported while MLflow was unreachable", reported_at, outage)

    client = MlflowClient(tracking_uri)
    (child,) = trial_runs(tracking_uri, "mlflow-outage")
    assert child.info.status == "FINISHED" and child.data.tags["satscale.trial_state"] == "finished"
    for metric in ("clean_acc", "robust_acc", "train_loss"):
        history = client.get_metric_history(child.info.run_id, metric)
        assert sorted(point.step for point in history) == list(range(epochs)), (metric, history)
        # What was reported during the outage was queued and logged once the server was back.
        assert all(point.timestamp >= outage["up"] * 1000 for point in history if point.step in during_outage)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {item.path for item in client.list_artifacts(parent.info.run_id, "reports")} >= {
        "reports/leaderboard.csv", "reports/leaderboard.md"}


def test_mlflow_still_down_when_the_study_ends_fails_clearly_and_resume_logs_the_rest(ray_cluster, mlflow_outage,
                                                                                       small_digits, tmp_path):
    """MLflow drops off once the trial has started and is still unreachable when the study ends: the driver
    stops with a clear error naming where the results are and `--resume` (not a stack trace, not a hang), the
    parent run is left as it was; once MLflow is back, resuming runs no trial again and logs what was missing,
    each epoch once."""
    proxy, tracking_uri = mlflow_outage
    study = StudyConfig.parse(study_values("mlflow-down-at-end", small_digits, 1, workers={"num_workers": 1}))
    storage = tmp_path / "storage"

    def cut_when_the_trial_runs() -> None:
        wait_until(lambda: trial_runs(tracking_uri, "mlflow-down-at-end"), 300, "the trial's run")
        proxy.cut()

    saboteur = threading.Thread(target=cut_when_the_trial_runs, daemon=True)
    saboteur.start()
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as failed:
        run_study(study, str(storage), tracking_uri)
    saboteur.join(timeout=10)
    message = str(failed.value)
    assert "--resume" in message and str(storage) in message and tracking_uri in message, message
    assert [(row.state, row.epochs) for row in failed.value.rows] == [("finished", 1)]
    assert time.monotonic() - started < 300  # bounded: no call waits on the unreachable server for long

    proxy.restore()
    client = MlflowClient(tracking_uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("mlflow-down-at-end").experiment_id],
                                   "tags.`satscale.role` = 'study'")
    assert parent.info.status == "RUNNING"  # left as it was, not marked finished or failed
    outcome = run_study(study, str(storage), tracking_uri, resume=True)
    assert outcome.parent_run_id == parent.info.run_id
    assert [(row.state, row.epochs) for row in outcome.rows] == [("finished", 1)]
    assert len(list(storage.glob("mlflow-down-at-end/run_trial_*"))) == 1  # the trial did not run again
    assert client.get_run(outcome.parent_run_id).info.status == "FINISHED"
    assert {item.path for item in client.list_artifacts(outcome.parent_run_id, "reports")} >= {
        "reports/leaderboard.csv", "reports/leaderboard.md"}
    (child,) = trial_runs(tracking_uri, "mlflow-down-at-end")
    assert child.info.status == "FINISHED"
    for metric in ("clean_acc", "robust_acc"):
        assert [point.step for point in client.get_metric_history(child.info.run_id, metric)] == [0], metric


# Address space a Train worker may add to what it maps when it starts: the healthy trial needs a fraction of
# it; the 8x-wide one's parameters alone (313 M, 1.25 GB) do not fit, so it fails while torch's allocator builds
# the model. At 4x (78 M, 0.31 GB) the model fitted and what failed next depended on the CPU: torch's allocator
# here, oneDNN's scratch memory on CI's ("could not create a primitive", which does not say memory).
WORKER_MEMORY_LIMIT_MB = 1024
OVERSIZED_WIDTH = 8


def test_a_trial_out_of_memory_fails_with_its_reason_and_the_study_finishes(ray_cluster, mlflow_server,
                                                                           small_digits, tmp_path):
    """Real: the allocator's own failure (torch's DefaultCPUAllocator) in a Train worker. What is arranged is
    only the limit it hits: RLIMIT_AS, set by the fault plan in each worker, stands in for a small GPU or node,
    so the oversized trial fails without taking memory from the machine's other users."""
    plan_path = FaultPlan(memory_limit_mb=WORKER_MEMORY_LIMIT_MB).write(tmp_path / "plan.json")
    values = study_values("out-of-memory", small_digits, epochs=1, workers={"num_workers": 1})
    values["search"]["scaling"] = {"mode": "direct", "width_mult": {"grid": [0.125, OVERSIZED_WIDTH]}}
    with ray_job_environment(ray_cluster.address, {FAULT_PLAN_VARIABLE: str(plan_path)}):
        outcome = run_study(StudyConfig.parse(values), str(tmp_path / "storage"), mlflow_server)

    rows = {row.params["width_mult"]: row for row in outcome.rows}
    assert (rows[0.125].state, rows[0.125].epochs) == ("finished", 1)  # the rest of the study finished
    oversized = rows[OVERSIZED_WIDTH]
    assert oversized.state == "failed" and "can't allocate memory" in oversized.failure_reason, oversized
    runs = {float(run.data.params["width_mult"]): run for run in trial_runs(mlflow_server, "out-of-memory")}
    assert runs[OVERSIZED_WIDTH].info.status == "FAILED"
    assert runs[OVERSIZED_WIDTH].data.tags["satscale.trial_state"] == "failed"
    assert "can't allocate memory" in runs[OVERSIZED_WIDTH].data.tags["satscale.failure_reason"]
    assert runs[0.125].info.status == "FINISHED"
