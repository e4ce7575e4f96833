"""MLflow tracking of studies against a real `mlflow server` (SQLite, artifacts on the loopback S3 server)
and a real local Ray Tune run; reports; resume idempotency; an unreachable server; secret redaction."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re
import select
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient
from ray import cloudpickle

from orchestrator.console import StudyConsole
from orchestrator.costs import Spend
from orchestrator.reports import (StudyRow, cost_front, leaderboard, leaderboard_markdown, pareto_front, seed_groups,
                                  seed_groups_markdown, write_leaderboard_csv, write_reports)
from orchestrator.tracking import (REDACTED, MLflowStudyCallback, StudyTracker, redact,
                                   resolve_tracking_uri, scrub, study_rows, trial_failure_reason)
from tests.fixtures.network import free_loopback_port
from tests.fixtures.waiting import wait_until

STUDY_PARAMS = ("activation", "arch", "depth_mult", "width_mult", "resolution", "train_attack_steps", "train_eps",
                "train_step_size")
# Fake credentials planted in trial configs and in the environment: none may reach MLflow.
FAKE_KEY_ID = "AKIAFAKEFAKEFAKE1234"
FAKE_SECRET = "fake/Secret+Access/Key0123456789abcdefghij"
FAKE_TOKEN = "FakeSessionToken-0123456789-abcdefghijkl"
SECRETS = (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN)

MAX_EPOCHS = 3
ACTIVATION_QUALITY = {"relu": 0.4, "softplus": 0.7, "silu": 0.8, "broken": 0.6}


def synthetic_metrics(config: dict, epoch: int) -> dict[str, Any]:
    clean = ACTIVATION_QUALITY[config["activation"]] * (0.8 + 0.1 * epoch)
    return {"epoch": epoch, "clean_acc": clean, "robust_acc": clean / 2, "train_loss": 2.0 - 0.5 * epoch,
            # Not finite at epoch 0: the tracker must leave it out, not fail.
            "train_robust_acc": math.nan if epoch == 0 else clean / 3,
            "images_per_s": 1000.0, "lr": 0.1, "resolution": config["resolution"], "global_batch_size": 64}


def synthetic_trial(config: dict) -> None:
    from ray import tune

    for epoch in range(MAX_EPOCHS):
        if config["activation"] == "broken" and epoch == 1:
            raise ValueError("synthetic divergence in 'broken'\nsecond line of the message")
        tune.report(synthetic_metrics(config, epoch))


def stop_weak_trials(trial_id: str, result: dict) -> bool:
    """The early stopper: relu's clean accuracy (0.32 at epoch 0) is too low to go on."""
    return result["clean_acc"] < 0.45


def trial_cost(config: dict) -> float:
    return 1.8e9 * config["width_mult"] ** 2 * config["depth_mult"]


def half_cpu_spend(config: dict, wall_s: float) -> Spend:
    """The trial_spend hook of a trial on half a CPU at $0.40 per CPU-hour."""
    return Spend(wall_s, 0.5 * wall_s / 3600, 0.0, 0.2 * wall_s / 3600)


def all_params(config: dict) -> dict[str, Any]:
    """The trial_params hook, careless on purpose: everything in the config, credentials included."""
    return dict(config)


@dataclass
class FakeTrial:
    """The part of ray.tune.experiment.Trial the callback reads."""
    trial_id: str
    config: dict
    last_result: dict = field(default_factory=dict)
    status: str = "RUNNING"
    pickled_error_file: str | None = None
    error_file: str | None = None

    def get_pickled_error(self) -> None:
        return None

    def get_error(self) -> None:
        return None


def complete(callback: MLflowStudyCallback, trial: FakeTrial) -> None:
    """What Tune does when a trial completes: its last result marked done, the callback told, the trial ended."""
    trial.last_result = {**trial.last_result, "done": True}
    callback.on_trial_complete(0, [trial], trial)
    trial.status = "TERMINATED"


def study_config(activation: str = "silu") -> dict[str, Any]:
    return {"activation": activation, "arch": "resnet18", "depth_mult": 0.5, "width_mult": 0.25, "resolution": 32,
            "train_attack_steps": 1, "train_eps": 4 / 255, "train_step_size": 4 / 255}


def experiment_id(client: MlflowClient, name: str) -> str:
    return client.get_experiment_by_name(name).experiment_id


def child_runs(client: MlflowClient, experiment: str, parent_run_id: str):
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def steps(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, metric))


def assert_no_secrets(client: MlflowClient, experiment: str) -> None:
    runs = client.search_runs([experiment])
    assert runs
    for run in runs:
        logged = {**run.data.params, **run.data.tags}
        for name, value in logged.items():
            for secret in SECRETS:
                assert secret not in value, (run.info.run_id, name)


@pytest.fixture
def tracker(mlflow_server: str, mlflow_experiment: str) -> StudyTracker:
    return StudyTracker(mlflow_server, mlflow_experiment)


@pytest.fixture
def planted_env_token(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)


# --- (a) a real Tune study mirrored into MLflow ------------------------------------------------------------------
def test_tune_study_has_parent_and_child_runs_with_params_metrics_and_states(
        ray_cluster, tracker: StudyTracker, mlflow_experiment: str, planted_env_token, tmp_path: Path):
    from ray import tune

    parent = tracker.start_study("study-a", "/studies/study-a", params={"max_epochs": MAX_EPOCHS, "aws_secret_access_key": FAKE_SECRET},
                                 tags={"satscale.search": "grid", "launched_with": f"token {FAKE_TOKEN}"})
    callback = MLflowStudyCallback(tracker, parent, all_params, trial_cost, max_epochs=MAX_EPOCHS,
                                   trial_spend=half_cpu_spend)
    console_output = io.StringIO()  # not a terminal: plain lines, as under `ray job submit`
    console = StudyConsole("study-a", all_params, len(ACTIVATION_QUALITY), MAX_EPOCHS, "PGD-10", console_output)
    space = {**study_config(), "activation": tune.grid_search(list(ACTIVATION_QUALITY)),
             # Credentials a careless config could carry: by name, as an access key id, in a URL, in free text.
             "aws_secret_access_key": FAKE_SECRET, "dataset_owner": FAKE_KEY_ID,
             "dataset_uri": f"https://user:{FAKE_SECRET}@data.example/train.beton", "note": f"uses {FAKE_TOKEN}"}
    # Half a CPU each: all four trials at once on a two-core machine.
    tuner = tune.Tuner(tune.with_resources(synthetic_trial, {"cpu": 0.5}), param_space=space,
                       run_config=tune.RunConfig(name="study-a", storage_path=str(tmp_path),
                                                 callbacks=[callback, console], stop=stop_weak_trials, verbose=0))
    results = tuner.fit()
    trial_ids = {result.metrics["trial_id"]: result.config["activation"] for result in results}
    running_s = {result.config["activation"]: result.metrics["time_total_s"] for result in results}
    tracker.finish_study(parent)

    client = tracker.client
    experiment = experiment_id(client, mlflow_experiment)
    parent_run = client.get_run(parent)
    assert parent_run.data.tags["satscale.role"] == "study" and parent_run.data.tags["satscale.study"] == "study-a"
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.params["aws_secret_access_key"] == REDACTED
    # Names a person recognises in MLflow's UI, and an experiment it opens on its training runs.
    assert parent_run.info.run_name == "study-a"
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"

    children = child_runs(client, experiment, parent)
    by_activation = {trial_ids[run.data.tags["satscale.trial_id"]]: run for run in children}
    assert len(children) == len(ACTIVATION_QUALITY) and set(by_activation) == set(ACTIVATION_QUALITY)
    expected = {"relu": ("stopped_early", "KILLED", [0]), "softplus": ("finished", "FINISHED", [0, 1, 2]),
                "silu": ("finished", "FINISHED", [0, 1, 2]), "broken": ("failed", "FAILED", [0])}
    for activation, run in by_activation.items():
        state, status, epochs = expected[activation]
        assert run.data.tags["satscale.role"] == "trial"
        assert run.info.run_name == f"{activation} resnet18 d0.5 w0.25 32px"
        assert (run.data.tags["satscale.trial_state"], run.info.status) == (state, status), activation
        params = run.data.params
        assert set(STUDY_PARAMS) <= set(params)
        assert params["activation"] == activation and params["arch"] == "resnet18" and params["resolution"] == "32"
        assert float(params["train_eps"]) == pytest.approx(4 / 255)
        assert params["aws_secret_access_key"] == REDACTED and params["dataset_owner"] == REDACTED
        for metric in ("clean_acc", "robust_acc", "train_loss", "images_per_s"):
            assert steps(client, run.info.run_id, metric) == epochs, (activation, metric)
        history = client.get_metric_history(run.info.run_id, "clean_acc")
        assert [point.value for point in sorted(history, key=lambda point: point.step)] == pytest.approx(
            [synthetic_metrics(study_config(activation), epoch)["clean_acc"] for epoch in epochs])
        assert steps(client, run.info.run_id, "train_robust_acc") == epochs[1:]  # NaN at epoch 0 left out
        assert "global_batch_size" not in run.data.metrics
        # What it spent, by Tune's count of its running time: failed and stopped trials too.
        assert run.data.metrics["wall_s"] == pytest.approx(running_s[activation]) and running_s[activation] > 0
        assert run.data.metrics["cpu_hours"] == pytest.approx(0.5 * running_s[activation] / 3600)
        assert run.data.metrics["cost_usd"] == pytest.approx(0.2 * running_s[activation] / 3600)
        assert run.data.metrics["gpu_hours"] == 0
    reason = by_activation["broken"].data.tags["satscale.failure_reason"]
    assert reason == "ValueError: synthetic divergence in 'broken'"
    assert "satscale.failure_reason" not in by_activation["silu"].data.tags

    rows = {trial_ids[row.trial_id]: row for row in callback.rows}
    assert {activation: row.state for activation, row in rows.items()} == {
        activation: state for activation, (state, _, _) in expected.items()}
    assert rows["silu"].epochs == 3 and rows["relu"].epochs == 1
    assert rows["silu"].clean_acc == pytest.approx(0.8)
    assert rows["silu"].cost_flops == pytest.approx(trial_cost(study_config()))
    assert rows["broken"].spend == half_cpu_spend({}, running_s["broken"])
    assert rows["broken"].failure_reason == reason
    assert rows["silu"].params["aws_secret_access_key"] == REDACTED
    assert sorted(study_rows(results, all_params, trial_cost, MAX_EPOCHS, half_cpu_spend),
                  key=lambda row: row.trial_id) == sorted(
        callback.rows, key=lambda row: row.trial_id)
    assert callback.unlogged == []
    assert_no_secrets(client, experiment)

    # The live view: every trial's start, epochs and end on one line each, the failure's reason at once, the
    # study's progress after each trial's end; no escape codes off a terminal.
    lines = console_output.getvalue().splitlines()
    assert "\x1b" not in console_output.getvalue() and "\r" not in console_output.getvalue()
    events = [line.split(maxsplit=1)[1] for line in lines if not line.startswith("study ")]
    name = "resnet18 d0.5 w0.25 32px"
    assert sorted(event for event in events if event.startswith("started")) == sorted(
        f"started    {activation} {name}" for activation in ACTIVATION_QUALITY)
    assert f"epoch 3/3  silu {name}  clean  80.0 %  PGD-10  40.0 %" in events
    assert f"finished   silu {name}  clean  80.0 %  PGD-10  40.0 %  (3 epochs)" in events
    assert (f"stopped    relu {name}  clean  32.0 %  PGD-10  16.0 %  (stopped early by the scheduler after 1 of 3 "
            "epochs)") in events
    assert f"FAILED     broken {name}: ValueError: synthetic divergence in 'broken'" in events
    progress = [line for line in lines if line.startswith("study ")]
    assert len(progress) == len(ACTIVATION_QUALITY)  # one per ended trial
    assert re.fullmatch(r"study study-a \[#{20}\] 4/4 trials ended, 0 running, 8/8 epochs, \d+:\d\d elapsed",
                        progress[-1]), progress[-1]


# --- (b) resume: parent, children and epochs are reused, never duplicated ----------------------------------------
def test_start_study_reuses_its_own_runs_parent_only_on_resume(tracker: StudyTracker):
    first = tracker.start_study("study-b", "/studies/study-b", params={"max_epochs": 3})
    tracker.finish_study(first, "interrupted")
    assert tracker.start_study("study-b", "/studies/study-b", resume=True) == first  # interrupted: continue it
    assert tracker.client.get_run(first).info.status == "RUNNING"
    # A new run of the study (its own results folder) never nests under another run's parent, finished or not.
    second = tracker.start_study("study-b", "/studies/study-b-run2")
    assert second != first and tracker.client.get_run(second).info.run_name == "study-b-run2"
    assert tracker.start_study("study-b", "/studies/study-b-run2", resume=True) == second
    assert tracker.study_run_id("study-b", "/studies/study-b") == first
    assert tracker.study_run_id("study-b", "/studies/study-b-run2") == second
    assert tracker.study_run_id("study-b", "/studies/study-b-run3") is None
    tracker.finish_study(first)
    assert tracker.start_study("study-b", "/studies/study-b") != first  # not resumed: a new parent


def test_trial_run_and_log_epoch_are_idempotent_across_trackers(tracker: StudyTracker, mlflow_server: str,
                                                               mlflow_experiment: str):
    parent = tracker.start_study("study-c", "/studies/study-c")
    child = tracker.trial_run(parent, "trial_00001", study_config())
    assert tracker.trial_run(parent, "trial_00001", study_config()) == child
    assert tracker.log_epoch(child, {"clean_acc": 0.5, "robust_acc": math.inf, "label": "x", "flag": True}, 0) == 1
    assert tracker.log_epoch(child, {"clean_acc": 0.5}, 0) == 0
    tracker.finish_trial(child, "failed", "RuntimeError: lost the node")

    # A new driver process (resumed study): same parent, same child (running again), no replayed epoch twice.
    resumed = StudyTracker(mlflow_server, mlflow_experiment)
    assert resumed.start_study("study-c", "/studies/study-c", resume=True) == parent
    assert resumed.trial_run(parent, "trial_00001", study_config()) == child
    assert resumed.log_epoch(child, {"clean_acc": 0.5}, 0) == 0
    assert resumed.log_epoch(child, {"clean_acc": 0.6, "robust_acc": 0.3}, 1) == 2
    run = resumed.client.get_run(child)
    assert run.info.status == "RUNNING" and run.data.tags["satscale.trial_state"] == "running"
    assert "satscale.failure_reason" not in run.data.tags
    assert steps(resumed.client, child, "clean_acc") == [0, 1]
    assert steps(resumed.client, child, "robust_acc") == [1]
    assert len(child_runs(resumed.client, experiment_id(resumed.client, mlflow_experiment), parent)) == 1


def test_an_interrupted_study_resumes_into_the_same_runs_through_the_callback(tracker: StudyTracker,
                                                                            mlflow_server: str,
                                                                            mlflow_experiment: str):
    parent = tracker.start_study("study-d", "/studies/study-d")
    done = FakeTrial("done_00000", study_config("softplus"))
    cut = FakeTrial("cut_00001", study_config("silu"))
    before = MLflowStudyCallback(tracker, parent, all_params, max_epochs=MAX_EPOCHS, trial_spend=half_cpu_spend)
    # Tuner pickles its RunConfig, callbacks included, when built; Tuner.restore brings that copy back.
    pickled_by_tuner = cloudpickle.dumps(before)
    for trial in (done, cut):
        before.on_trial_start(0, [], trial)
    for epoch in range(MAX_EPOCHS):
        done.last_result = synthetic_metrics(done.config, epoch)
        before.on_trial_result(0, [], done, done.last_result)
    complete(before, done)
    cut.last_result = {**synthetic_metrics(cut.config, 0), "time_total_s": 5.0}  # Tune's count of its running time
    before.on_trial_result(0, [], cut, cut.last_result)
    before.flush()  # what reached MLflow before the driver died
    saved_by_tune = before.get_state()  # Tune saves its callbacks' state with the experiment
    # The driver dies here. The resumed study restores `cut` from its epoch-0 checkpoint, so epoch 0's result
    # may be reported again; `done` is not re-run.
    assert StudyTracker(mlflow_server, mlflow_experiment).start_study("study-d", "/studies/study-d", resume=True) == parent
    after = cloudpickle.loads(pickled_by_tuner)
    after.set_state(saved_by_tune)
    assert MLflowStudyCallback.restored(parent) is after  # the copy in effect, for the driver's report rows
    after.on_trial_start(0, [], cut)
    for epoch in range(MAX_EPOCHS):  # restarted without a Tune checkpoint: Tune counts its time from 0 again
        cut.last_result = {**synthetic_metrics(cut.config, epoch), "time_total_s": 2.0 * (epoch + 1)}
        after.on_trial_result(0, [], cut, cut.last_result)
    complete(after, cut)
    after.on_experiment_end([done, cut])

    client = tracker.client
    children = child_runs(client, experiment_id(client, mlflow_experiment), parent)
    assert sorted(run.data.tags["satscale.trial_id"] for run in children) == ["cut_00001", "done_00000"]
    for run in children:
        assert steps(client, run.info.run_id, "clean_acc") == [0, 1, 2]
        assert run.info.status == "FINISHED" and run.data.tags["satscale.trial_state"] == "finished"
    assert sorted(row.trial_id for row in after.rows) == ["cut_00001", "done_00000"]
    assert after.unlogged == []
    # What the cut trial spent counts both of its runs: 5 s before the driver died, 6 s after the resume.
    assert after.trial_seconds("cut_00001", cut.last_result) == 11.0
    assert next(row.spend for row in after.rows if row.trial_id == "cut_00001") == half_cpu_spend({}, 11.0)
    cut_run = next(run for run in children if run.data.tags["satscale.trial_id"] == "cut_00001")
    assert cut_run.data.metrics["wall_s"] == 11.0


def test_trials_are_finished_by_their_own_epochs_and_one_without_a_config_is_still_accounted_for(
        tracker: StudyTracker, mlflow_experiment: str):
    """Searched epochs: a 2-epoch trial of a study whose longest trials run 3 finished, it was not stopped early.
    Tune can restore a trial without its config (it failed before it started): a row, a run, no crash."""
    parent = tracker.start_study("study-epochs", "/studies/study-epochs")
    callback = MLflowStudyCallback(tracker, parent, all_params, trial_cost, max_epochs=3, retry_interval_s=0)
    short = FakeTrial("short_00000", {**study_config(), "epochs": 2}, {"training_iteration": 2, "done": True},
                      "TERMINATED")
    cut = FakeTrial("cut_00001", {**study_config(), "epochs": 3}, {"training_iteration": 1, "done": True},
                    "TERMINATED")
    interrupted = FakeTrial("cut_00003", {**study_config(), "epochs": 3}, {"training_iteration": 1}, "TERMINATED")
    restored = FakeTrial("old_00004", {**study_config(), "epochs": 3}, {"training_iteration": 3}, "TERMINATED")
    callback.on_trial_start(0, [], interrupted)  # started in this session; `restored` ended in an earlier one
    lost = FakeTrial("lost_00002", None, {}, "ERROR")
    callback.on_experiment_end([short, cut, lost, interrupted, restored])
    # Tune marks the last result done when a trial completes or a scheduler stops it, not when it stops
    # trials because the study is being interrupted.
    assert {row.trial_id: row.state for row in callback.rows} == {
        "short_00000": "finished", "cut_00001": "stopped_early", "lost_00002": "failed",
        "cut_00003": "interrupted", "old_00004": "finished"}
    runs = {run.data.tags["satscale.trial_id"]: run
            for run in child_runs(tracker.client, experiment_id(tracker.client, mlflow_experiment), parent)}
    assert (runs["short_00000"].info.status, runs["cut_00001"].info.status) == ("FINISHED", "KILLED")
    assert runs["lost_00002"].info.status == "FAILED" and runs["lost_00002"].info.run_name == "lost_00002"


def test_a_best_checkpoint_that_cannot_be_loaded_leaves_the_study_finished_with_its_reports(
        tracker: StudyTracker, tmp_path: Path, capsys):
    from types import SimpleNamespace

    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    from orchestrator.runner import _log_study_end
    from search_spaces.study import TrackingSettings

    parent = tracker.start_study("study-lost-checkpoint", "/studies/study-lost-checkpoint")
    rows = [StudyRow("t_00000", study_config(), "finished", 0.8, 0.4, 1e9, 3)]
    results = [SimpleNamespace(metrics={"trial_id": "t_00000", CHECKPOINT_PATH_KEY: str(tmp_path / "deleted")})]
    study = SimpleNamespace(name="study-lost-checkpoint", tracking=TrackingSettings())
    assert _log_study_end(tracker, parent, study, rows, results, str(tmp_path)) is None
    assert "a trial's last checkpoint could not be loaded" in capsys.readouterr().err
    run = tracker.client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert {item.path for item in tracker.client.list_artifacts(parent, "reports")}  # the reports are logged


# --- (c) reports ----------------------------------------------------------------------------------------------------
def hand_made_rows() -> list[StudyRow]:
    def row(trial_id, activation, clean, robust, state="finished", cost=1e9, reason=None, epochs=3):
        return StudyRow(trial_id, {**study_config(activation), "width_mult": 1.0}, state, clean, robust, cost, epochs,
                        reason)

    return [row("t0", "relu", 0.70, 0.30),                       # dominated by t1
            row("t1", "softplus", 0.72, 0.35, cost=2e9),
            row("t2", "silu", 0.68, 0.38, cost=4e9),               # frontier: most robust
            row("t3", "gelu", 0.80, 0.20),                         # frontier: most accurate
            row("t4", "elu", 0.60, 0.10, state="stopped_early", epochs=1),
            row("t5", "relu", 0.95, 0.90, state="failed", reason="ValueError: diverged", epochs=2)]


def test_leaderboard_orders_by_robust_accuracy_with_failed_trials_last(tmp_path: Path):
    rows = hand_made_rows()
    assert [row.trial_id for row in leaderboard(rows)] == ["t2", "t1", "t0", "t3", "t4", "t5"]
    csv_lines = write_leaderboard_csv(rows, tmp_path / "board.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,trial_id,state,clean_acc,robust_acc,cost_flops,epochs,failure_reason,")
    assert csv_lines[1].startswith("1,t2,finished,0.68,0.38,4000000000.0,3,,")
    assert csv_lines[-1].startswith("6,t5,failed,0.95,0.9,1000000000.0,2,ValueError: diverged,")

    table = leaderboard_markdown(rows).splitlines()
    assert table[0] == ("| Rank | Activation | Scale (arch, depth, width, res) | Clean acc (%) | PGD robust acc (%) "
                        "| Device-hours | Notes |")
    assert table[2] == "| 1 | silu | resnet18, 0.5, 1.0, 32 | 68.0 | 38.0 | – |  |"
    assert table[6] == "| 5 | elu | resnet18, 0.5, 1.0, 32 | 60.0 | 10.0 | – | stopped early after 1 epoch(s) |"
    assert table[7] == "| 6 | relu | resnet18, 0.5, 1.0, 32 | 95.0 | 90.0 | – | failed: ValueError: diverged |"
    assert len(table) == 8  # no spend recorded: no total line


def test_reports_say_what_each_trial_and_the_study_spent(tmp_path: Path):
    def spent(row: StudyRow, gpu_hours: float, usd: float) -> StudyRow:
        return dataclasses.replace(row, spend=Spend(3600 * gpu_hours, 8 * gpu_hours, gpu_hours, usd))

    t0, t1, t2, t3, t4, t5 = hand_made_rows()
    rows = [spent(t0, 2.0, 2.4), spent(t1, 1.0, 1.2), spent(t2, 4.0, 4.8), spent(t3, 0.5, 0.6), t4,
            spent(t5, 0.25, 0.3)]
    csv_lines = write_leaderboard_csv(rows, tmp_path / "board.csv").read_text().splitlines()
    assert csv_lines[0].split(",")[9:13] == ["wall_s", "cpu_hours", "gpu_hours", "cost_usd"]
    assert csv_lines[1].split(",")[9:13] == ["14400.0", "32.0", "4.0", "4.8"]  # t2 ranks first
    table = leaderboard_markdown(rows).splitlines()
    assert table[2] == "| 1 | silu | resnet18, 0.5, 1.0, 32 | 68.0 | 38.0 | 4 GPU-h |  |"
    assert table[-1] == ("Spent: 62 CPU-hours, 7.75 GPU-hours, est. $9.3 (wall time x the trials' workers' "
                         "resources; dollars at the cost block's node prices).")
    # The frontier of robust accuracy against GPU-hours: t0 (2 h, 30 %) is beaten by t1 (1 h, 35 %); the
    # failed trial takes no part.
    assert [row.trial_id for row in cost_front(rows, lambda spend: spend.gpu_hours)] == ["t3", "t1", "t2"]
    written = write_reports(rows, tmp_path / "reports")
    assert tmp_path / "reports" / "pareto_cost.png" in written
    assert (tmp_path / "reports" / "pareto_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_groups_average_each_configuration_over_its_seeds(tmp_path: Path):
    def row(trial_id, activation, seed, robust, **extra):
        params = {**study_config(activation), "width_mult": 1.0, "seed": seed, **extra}
        return StudyRow(trial_id, params, "finished", 0.8, robust, None, 3)

    rows = [row("a0", "relu", 0, 0.30), row("a1", "relu", 1, 0.34), row("a2", "relu", 2, 0.32),
            row("b0", "relu_smooth_backward", 0, 0.40, **{"activation.smooth_backward_in": "attack"}),
            row("b1", "relu_smooth_backward", 1, 0.44, **{"activation.smooth_backward_in": "attack"}),
            row("c0", "relu_smooth_backward", 0, 0.50, **{"activation.smooth_backward_in": "both"}),
            StudyRow("f0", {**study_config("relu"), "width_mult": 1.0, "seed": 3}, "failed", None, None, None, 1)]
    groups = seed_groups((row.params, {"robust_acc": row.robust_acc}) for row in rows)
    assert [(group.label, group.seeds) for group in groups] == [
        ("relu", (0, 1, 2, 3)), ("relu_smooth_backward(smooth_backward_in=attack)", (0, 1)),
        ("relu_smooth_backward(smooth_backward_in=both)", (0,))]
    assert groups[0].mean["robust_acc"] == pytest.approx(0.32) and groups[0].std["robust_acc"] == pytest.approx(0.02)
    assert groups[2].std["robust_acc"] == 0.0
    table = seed_groups_markdown(groups, {"robust_acc": "PGD robust acc"}).splitlines()
    assert table[0] == "| Configuration | Seeds | PGD robust acc (%) |"
    assert table[2] == "| relu | 4 | 32.0 ± 2.0 |" and table[3].endswith("| 2 | 42.0 ± 2.8 |")

    written = write_reports(rows, tmp_path)
    assert tmp_path / "seeds.md" in written  # failed trials take no part in the averages
    assert "| relu | 3 |" in (tmp_path / "seeds.md").read_text()
    assert tmp_path / "seeds.md" not in write_reports(rows[:1] + rows[3:4], tmp_path / "single")


def test_pareto_front_keeps_only_non_dominated_results():
    rows = hand_made_rows()
    assert [row.trial_id for row in pareto_front(rows)] == ["t2", "t1", "t3"]
    twin = StudyRow("t6", {}, "finished", 0.68, 0.38, None, 3)
    assert [row.trial_id for row in pareto_front([*rows, twin])] == ["t2", "t6", "t1", "t3"]  # equal: both stay
    assert pareto_front([rows[-1]]) == []


def test_reports_are_logged_on_the_parent_run_and_stored_in_s3(tracker: StudyTracker, mlflow_artifact_bucket: str,
                                                               tmp_path: Path):
    import boto3
    from PIL import Image

    paths = write_reports(hand_made_rows(), tmp_path / "reports")
    assert [path.name for path in paths] == ["leaderboard.csv", "leaderboard.md", "pareto.png"]
    png = tmp_path / "reports" / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (840, 600)
        # Not a blank canvas: markers and the frontier line draw many colours.
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20

    parent = tracker.start_study("study-e", "/studies/study-e")
    tracker.log_reports(parent, tmp_path / "reports")
    listed = {Path(info.path).name: info.file_size for info in tracker.client.list_artifacts(parent, "reports")}
    assert set(listed) == {"leaderboard.csv", "leaderboard.md", "pareto.png"}
    assert listed["pareto.png"] == png.stat().st_size
    downloaded = tracker.client.download_artifacts(parent, "reports/leaderboard.md", str(tmp_path / "back"))
    assert Path(downloaded).read_text() == (tmp_path / "reports" / "leaderboard.md").read_text()
    stored = boto3.session.Session().client("s3").list_objects_v2(Bucket=mlflow_artifact_bucket,
                                                                 Prefix="mlartifacts/")
    keys = [entry["Key"] for entry in stored.get("Contents", [])]
    for name in listed:
        assert any(key.endswith(f"/{parent}/artifacts/reports/{name}") for key in keys), (name, keys)


# --- (d) an unreachable or hanging server never blocks or crashes the study --------------------------------------
def test_unreachable_server_queues_calls_returns_promptly_and_warns():
    dead_uri = f"http://127.0.0.1:{free_loopback_port()}"
    tracker = StudyTracker(dead_uri, "unreachable", request_timeout_s=1, max_retries=1)
    callback = MLflowStudyCallback(tracker, "0" * 32, all_params, max_epochs=MAX_EPOCHS, retry_interval_s=0.5)
    trial = FakeTrial("t_00000", study_config())
    started = time.monotonic()
    callback.on_trial_start(0, [trial], trial)
    for epoch in range(MAX_EPOCHS):
        trial.last_result = synthetic_metrics(trial.config, epoch)
        callback.on_trial_result(0, [trial], trial, trial.last_result)
    complete(callback, trial)
    assert time.monotonic() - started < 0.5  # Tune's events never wait for MLflow
    with pytest.warns(RuntimeWarning, match=r"5 MLflow call\(s\) could not be logged"):
        callback.on_experiment_end([trial])
    assert time.monotonic() - started < 10
    assert callback.unlogged == ["run of trial t_00000", "epoch 0 metrics of trial t_00000",
                                 "epoch 1 metrics of trial t_00000", "epoch 2 metrics of trial t_00000",
                                 "state 'finished' of trial t_00000"]
    assert [row.state for row in callback.rows] == ["finished"]  # the reports do not need MLflow


def test_a_hanging_server_costs_one_timeout_per_retry_interval_and_never_holds_up_tune():
    connections = []
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)

        def accept_forever() -> None:
            with contextlib.suppress(OSError):  # the socket closed at the end of the test
                while True:
                    connections.append(silent.accept()[0])

        threading.Thread(target=accept_forever, daemon=True).start()
        tracker = StudyTracker(f"http://127.0.0.1:{silent.getsockname()[1]}", "hanging", request_timeout_s=1,
                               max_retries=0)
        callback = MLflowStudyCallback(tracker, "0" * 32, all_params, max_epochs=MAX_EPOCHS, retry_interval_s=60)
        trial = FakeTrial("t_00000", study_config())
        started = time.monotonic()
        callback.on_trial_start(0, [trial], trial)
        trial.last_result = synthetic_metrics(trial.config, 0)
        callback.on_trial_result(0, [trial], trial, trial.last_result)
        events_s = time.monotonic() - started
        time.sleep(3)  # the first call timed out after 1 s; the next try waits for the retry interval
        tried_in_interval = len(connections)
        flush_started = time.monotonic()
        assert not callback.flush()  # the end of a study tries once more, at once
        flush_s = time.monotonic() - flush_started
        for connection in connections:
            connection.close()
    assert events_s < 0.5  # Tune's events never wait for MLflow
    assert tried_in_interval == 1  # one timeout per retry interval, not one per event
    assert len(connections) == 2 and 0.9 < flush_s < 5  # the 1 s timeout, not MLflow's 120 s with 7 retries
    assert len(callback.unlogged) == 2


class _Forwarder(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def forwarding_proxy(port: int, upstream_port: int) -> _Forwarder:
    """A TCP relay from `port` to `upstream_port`: the MLflow server 'coming back' on a known address."""
    class Relay(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with socket.create_connection(("127.0.0.1", upstream_port)) as upstream:
                peers = {self.request: upstream, upstream: self.request}
                while True:
                    readable, _, _ = select.select(list(peers), [], [], 10)
                    for source in readable:
                        data = source.recv(1 << 16)
                        if not data:
                            return
                        peers[source].sendall(data)
                    if not readable:
                        return

    proxy = _Forwarder(("127.0.0.1", port), Relay)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    return proxy


def test_queued_calls_reach_the_server_once_it_is_back(mlflow_server: str, mlflow_experiment: str):
    port = free_loopback_port()
    tracker = StudyTracker(f"http://127.0.0.1:{port}", mlflow_experiment, request_timeout_s=2, max_retries=0)
    parent = StudyTracker(mlflow_server, mlflow_experiment).start_study("study-g", "/studies/study-g")
    callback = MLflowStudyCallback(tracker, parent, all_params, max_epochs=MAX_EPOCHS, retry_interval_s=0.5)
    trial = FakeTrial("t_00000", study_config())
    callback.on_trial_start(0, [trial], trial)
    trial.last_result = synthetic_metrics(trial.config, 0)
    callback.on_trial_result(0, [trial], trial, trial.last_result)
    time.sleep(1)
    assert len(callback.unlogged) == 2

    proxy = forwarding_proxy(port, int(mlflow_server.rsplit(":", 1)[1]))
    try:
        trial.last_result = synthetic_metrics(trial.config, 1)
        callback.on_trial_result(0, [trial], trial, trial.last_result)
        # The sender tries again on its own after the retry interval.
        wait_until(lambda: not callback.unlogged, 15, "the queued calls to be sent", interval_s=0.1)
        client = tracker.client
        (child,) = child_runs(client, experiment_id(client, mlflow_experiment), parent)
        assert steps(client, child.info.run_id, "clean_acc") == [0, 1]
    finally:
        proxy.shutdown()
        proxy.server_close()


# --- (e) no credential reaches MLflow -----------------------------------------------------------------------------
def test_redact_masks_credentials_by_name_by_shape_and_by_environment_value(planted_env_token):
    redacted = redact({"AWS_SECRET_ACCESS_KEY": FAKE_SECRET, "aws_access_key_id": FAKE_KEY_ID, "db_password": "pw",
                       "hf_token": "x", "owner": f"key {FAKE_KEY_ID}", "uri": f"s3://me:{FAKE_SECRET}@bucket/x",
                       "note": f"token={FAKE_TOKEN}", "width_mult": 2.0, "steps": 3, "arch": "resnet50"})
    assert redacted == {"AWS_SECRET_ACCESS_KEY": REDACTED, "aws_access_key_id": REDACTED, "db_password": REDACTED,
                        "hf_token": REDACTED, "owner": f"key {REDACTED}", "uri": f"s3://{REDACTED}@bucket/x",
                        "note": f"token={REDACTED}", "width_mult": 2.0, "steps": 3, "arch": "resnet50"}
    assert scrub("moto's key is testing") == "moto's key is testing"  # short env values are not masked


def test_no_credential_in_any_param_or_tag(tracker: StudyTracker, mlflow_experiment: str, planted_env_token):
    parent = tracker.start_study("study-h", "/studies/study-h", params={"AWS_ACCESS_KEY_ID": FAKE_KEY_ID, "storage": f"t={FAKE_TOKEN}"},
                                 tags={"aws_session_token": FAKE_TOKEN, "owner": FAKE_KEY_ID})
    child = tracker.trial_run(parent, "t_00000", {**study_config(), "secret_key": FAKE_SECRET, "who": FAKE_KEY_ID})
    tracker.finish_trial(child, "failed", f"ClientError: token {FAKE_TOKEN} expired for {FAKE_KEY_ID}")
    run = tracker.client.get_run(child)
    assert run.data.tags["satscale.failure_reason"] == f"ClientError: token {REDACTED} expired for {REDACTED}"
    assert_no_secrets(tracker.client, experiment_id(tracker.client, mlflow_experiment))


def test_tracking_uri_resolution(monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///runs/study.db") == f"sqlite:///{tmp_path.resolve()}/runs/study.db"
    assert resolve_tracking_uri("mlruns") == (tmp_path / "mlruns").resolve().as_uri()
    # A database file named as a path is SQLite (MLflow would make a file store folder called mlflow.db).
    assert resolve_tracking_uri("mlflow.db") == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("runs/study.sqlite") == f"sqlite:///{tmp_path.resolve()}/runs/study.sqlite"


def test_failure_reason_falls_back_to_the_text_trace(tmp_path: Path, planted_env_token):
    trace = tmp_path / "error.txt"
    trace.write_text("Failure # 1 (occurred at 2026-01-01_00-00-00)\nTraceback (most recent call last):\n"
                     '  File "train.py", line 3, in loop\nbotocore.exceptions.NoCredentialsError: token '
                     f"{FAKE_TOKEN} rejected\n\n")
    reason = trial_failure_reason(FakeTrial("t_00000", {}, error_file=str(trace)))
    assert reason == f"botocore.exceptions.NoCredentialsError: token {REDACTED} rejected"
