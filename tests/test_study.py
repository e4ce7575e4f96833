"""The study end to end: `ray job submit` to a real local head, Tune + Train trials, a real MLflow server."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from orchestrator.evaluate_study import main as evaluate_study_main
from orchestrator.runner import run_study
from orchestrator.scale_study import main as scale_study_main
from search_spaces.study import load_study
from tests.conftest import DIGITS_RESOLUTION
from tests.fixtures.waiting import wait_until
from tests.test_search_spaces import searcher_samples

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "orchestrator" / "scale_study.py"
EPS = 0.1


def write_study(path: Path, betons, name: str, activations: list, search: dict | None = None,
                **tune_settings) -> Path:
    study = {
        "name": name,
        "base": {
            "model": {"arch": "resnet18", "num_classes": 10, "width_mult": 0.125, "depth_mult": 0.25,
                      "resolution": DIGITS_RESOLUTION},
            "train": {"epochs": 2, "optimizer": {"lr": 0.1},
                      "train_attack": {"eps": EPS, "step_size": 1.25 * EPS, "steps": 1},
                      "eval_attack": {"eps": EPS, "step_size": EPS / 4, "steps": 3}, "max_eval_batches": 1},
            "data": {"train_path": str(betons["train"]), "eval_path": str(betons["test"]),
                     "loader_options": {"train_crop": "resize"}},
            "workers": {"num_workers": 1},
            "global_batch_size": 128,
            "reference_batch_size": 128,
        },
        "search": {"activations": activations, **(search or {})},
        "tune": {"scheduler": "fifo", **tune_settings},
    }
    path.write_text(yaml.safe_dump(study))
    return path


def study_runs(tracking_uri: str, name: str):
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [run for run in runs if run.data.tags.get("satscale.role") == "study"]
    children = [run for run in runs if run.data.tags.get("satscale.role") == "trial"]
    return client, parents, children


def metric_steps(client: MlflowClient, run, key: str) -> list[int]:
    return [point.step for point in client.get_metric_history(run.info.run_id, key)]


def test_study_submitted_as_a_ray_job_is_tracked_in_mlflow(ray_cluster, mlflow_server, digits_betons,
                                                           tmp_path):
    # elu with alpha 1e38 overflows float32 at the first step: a real divergence, which must fail only its trial.
    study = write_study(tmp_path / "study.yaml", digits_betons, "job-study",
                        ["relu", "silu", {"name": "elu", "params": {"alpha": 1.0e38}}])
    command = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address",
               ray_cluster.dashboard_url, "--", sys.executable, str(SCRIPT), "--config", str(study),
               "--storage", str(tmp_path / "storage"), "--mlflow-uri", mlflow_server]
    job = subprocess.run(command, capture_output=True, text=True, timeout=900, env=os.environ)  # RAY_AUTH_MODE=token: set by ray_cluster
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "| Rank | Activation" in job.stdout and "succeeded" in job.stdout
    # The console: the live view as plain lines (no terminal under `ray job submit`), the failure's reason at
    # once; Ray's, Tune's and the workers' own output in the log files instead.
    output = job.stdout  # the job's output, inside the `ray job submit` CLI's own (coloured) lines
    view = [line for line in output.splitlines()
            if re.match(r"\s*\d+:\d\d  (started|epoch|finished|stopped|FAILED) ", line) or line.startswith("study job-study [")]
    assert len(view) >= 3 + 4 + 3 and not any("\x1b" in line or "\r" in line for line in view), view
    assert "started    relu resnet18" in output and "finished   silu resnet18" in output
    assert "FAILED     elu(alpha=1e+38) resnet18" in output and "DivergenceError" in output
    for chatter in ("core_worker", "Trial status", "Configuration for experiment", "RayTrainWorker", "(pid="):
        assert chatter not in output, chatter
    logs = Path(next(line for line in output.splitlines() if line.strip().startswith("Logs:")).split(":", 1)[1].strip())
    assert (logs / "driver.log").is_file() and (logs / "ray").is_dir()
    assert "Configuration for experiment" in (logs / "tune.log").read_text()

    client, parents, children = study_runs(mlflow_server, "job-study")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    by_activation = {run.data.params["activation"]: run for run in children}
    assert set(by_activation) == {"relu", "silu", "elu"}
    for run in children:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        for param in ("arch", "depth_mult", "width_mult", "resolution", "train_attack_steps", "train_eps",
                      "train_step_size"):
            assert param in run.data.params, param
    for activation in ("relu", "silu"):
        run = by_activation[activation]
        assert run.data.tags["satscale.trial_state"] == "finished" and run.info.status == "FINISHED"
        for key in ("clean_acc", "robust_acc", "train_loss", "images_per_s"):
            assert metric_steps(client, run, key) == [0, 1], (activation, key)
    diverged = by_activation["elu"]
    assert diverged.data.tags["satscale.trial_state"] == "failed" and diverged.info.status == "FAILED"
    assert "DivergenceError" in diverged.data.tags["satscale.failure_reason"]
    assert "nan" in diverged.data.tags["satscale.failure_reason"]

    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id, "reports")}
    assert {"reports/leaderboard.csv", "reports/leaderboard.md", "reports/pareto.png"} <= artifacts
    leaderboard = Path(client.download_artifacts(parent.info.run_id, "reports/leaderboard.md",
                                                 str(tmp_path))).read_text()
    assert "relu" in leaderboard and "silu" in leaderboard and "failed" in leaderboard
    # The best trial's model: registered under the study's name, from the parent run, tagged with what it is.
    best = client.get_model_version_by_alias("job-study", "best")
    assert best.run_id == parent.info.run_id and best.tags["activation"] in {"relu", "silu"}
    assert best.tags["attack"].startswith("PGD-3 linf") and float(best.tags["robust_acc"]) <= float(
        best.tags["clean_acc"])
    assert parent.data.metrics["total_cpu_hours"] > 0  # what the study spent, the failed trial included

    # The strong evaluation afterwards: every finished trial's last checkpoint under PGD with restarts, AutoAttack
    # on the best configuration and on ReLU's, numbers on the child runs and reports on the parent run.
    report_dir = tmp_path / "evaluation"
    assert evaluate_study_main(["--config", str(study), "--storage", str(tmp_path / "storage"), "--mlflow-uri",
                                mlflow_server, "--pgd-steps", "5", "--restarts", "2", "--max-images", "96",
                                "--autoattack-top", "1", "--autoattack-images", "32", "--out", str(report_dir)]) == 0
    _, _, children = study_runs(mlflow_server, "job-study")
    evaluated = {run.data.params["activation"]: run for run in children if "pgd5x2_acc" in run.data.metrics}
    assert set(evaluated) == {"relu", "silu"}  # the diverged trial left no checkpoint to evaluate
    for run in evaluated.values():
        assert metric_steps(client, run, "pgd5x2_acc") == [1]  # at the trial's last epoch
        assert run.data.metrics["pgd5x2_acc"] <= run.data.metrics["final_clean_acc"]
    attacked = [run for run in evaluated.values() if "autoattack_acc" in run.data.metrics]
    assert 1 <= len(attacked) <= 2 and any(run.data.params["activation"] == "relu" for run in attacked)
    summary = (report_dir / "evaluation.md").read_text()
    assert "| relu | 1 |" in summary and "AutoAttack (apgd)" in summary and "Gap (points) [95 % CI]" in summary
    assert "Paired differences to the baseline (relu" in summary and "| silu | relu | 1 | 96 |" in summary
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert {"evaluation/evaluation.csv", "evaluation/evaluation.md", "evaluation/evaluation.png",
            "evaluation/comparisons.csv", "evaluation/outcomes.npz"} <= artifacts
    silu = evaluated["silu"].data.metrics  # the configuration's paired difference to ReLU, with its interval
    assert silu["pgd5x2_acc_diff_ci_low"] <= silu["pgd5x2_acc_diff"] <= silu["pgd5x2_acc_diff_ci_high"]
    assert silu["pgd5x2_acc_ci_low"] <= silu["pgd5x2_acc"] <= silu["pgd5x2_acc_ci_high"]
    assert "pgd5x2_acc_diff" not in evaluated["relu"].data.metrics  # the baseline is not compared with itself
    parent = client.get_run(parent.info.run_id)
    assert parent.data.metrics["pgd5x2_acc_diff/silu"] == pytest.approx(silu["pgd5x2_acc_diff"])
    assert "(failed)" in summary.rsplit("Not evaluated: ", 1)[1]  # the diverged trial, named with why

    # Evaluated again on other images: MLflow shows the new numbers, those of the new files, not the old.
    assert evaluate_study_main(["--config", str(study), "--storage", str(tmp_path / "storage"), "--mlflow-uri",
                                mlflow_server, "--pgd-steps", "5", "--restarts", "2", "--max-images", "48",
                                "--autoattack", "none", "--out", str(report_dir)]) == 0
    with open(report_dir / "evaluation.csv") as table:
        again = {row["trial_id"]: float(row["pgd_acc"]) for row in csv.DictReader(table)}
    _, _, children = study_runs(mlflow_server, "job-study")
    for run in children:
        if "pgd5x2_acc" in run.data.metrics:
            assert run.data.metrics["pgd5x2_acc"] == pytest.approx(again[run.data.tags["satscale.trial_id"]])
            assert run.info.status == "FINISHED"


def _wait_for_runs(tracking_uri: str, name: str, driver: subprocess.Popen, timeout_s: float, done) -> list:
    """The trial runs `done(runs)` picks, once it picks any, while the driver runs."""
    def picked() -> list:
        try:
            client, _, children = study_runs(tracking_uri, name)
        except AttributeError:  # the experiment does not exist yet
            return []
        return done(client, children) if children else []

    return wait_until(picked, timeout_s, "the study to get there, its driver running", interval_s=1, process=driver)


def _finished(_client, children) -> list:
    # Ended, not only tagged: the tracker tags the state, then ends the run.
    return [run for run in children
            if run.data.tags.get("satscale.trial_state") == "finished" and run.info.end_time is not None]


def _wait_for_saved_termination(experiment_dir: Path, trial_ids: set[str], driver: subprocess.Popen,
                                timeout_s: float, earlier_states: set[Path]) -> None:
    """Until the driver's own experiment state in storage (the state file not among `earlier_states`, those of the
    drivers before it) holds `trial_ids` as TERMINATED and one save more has reached it (a save is uploaded only
    after the one before it, so the searcher's file saved beside that state is whole). MLflow's record of a
    finished trial comes first; a driver killed before Tune's next save restarts the trial. Not the newest file by
    time: every upload rewrites the earlier drivers' files too, in no fixed order."""
    seen_mtime = None  # the driver's state file's mtime when it first held them

    def saved_once_more() -> bool:
        nonlocal seen_mtime
        own = [state for state in experiment_dir.glob("experiment_state-*.json") if state not in earlier_states]
        if not own:
            return False
        (state,) = own  # one driver at a time
        mtime = state.stat().st_mtime_ns
        if seen_mtime is not None:
            return mtime != seen_mtime
        try:
            trials = [json.loads(trial) for trial, _ in json.loads(state.read_text())["trial_data"]]
        except (json.JSONDecodeError, OSError):  # caught mid-upload
            return False
        if trial_ids <= {trial["trial_id"] for trial in trials if trial["status"] == "TERMINATED"}:
            seen_mtime = mtime
        return False

    wait_until(saved_once_more, timeout_s, f"Tune's saved state to show {trial_ids} terminated, its driver running",
               interval_s=0.2, process=driver)


def _trained_an_epoch(client, children) -> list:
    return [run for run in children if metric_steps(client, run, "robust_acc")]


def test_an_optuna_study_paused_killed_and_interrupted_resumes_each_time_and_loses_and_repeats_nothing(
        ray_cluster, mlflow_server, digits_betons, tmp_path):
    """The ways a study's driver stops, one after another on one Optuna study, one trial at a time: its budget
    spent (a pause at an epoch checkpoint, exit-0 outcome), SIGKILL after a trial finished (no chance to say
    anything), Ctrl-C mid-trial (exit 130, MLflow says interrupted), each followed by --resume; the last resume runs
    to the end. The searcher's state comes back with each resume, so the trials are the ones the seeded searcher
    suggests uninterrupted (a searcher started afresh would suggest its first configuration again)."""
    path = write_study(tmp_path / "study.yaml", digits_betons, "resume-study", ["relu", "silu"],
                       search={"activation_sampling": "choice", "optimizer": {"lr": {"uniform": [0.05, 0.2]}}},
                       searcher="optuna", num_samples=2, max_concurrent_trials=1)
    # The first two (activation, lr) pairs the study's seeded Optuna searcher suggests, uninterrupted.
    expected = [(sample["activation"]["name"], sample["optimizer.lr"])
                for sample in searcher_samples(load_study(str(path)), 2)]
    assert expected[0] != expected[1]
    storage = str(tmp_path / "storage")

    # 1. budget.cpu_hours 0.0001 (0.36 CPU-seconds, less than any trial's start-up): the first trial's first epoch
    # reaches it; that trial pauses at the epoch's checkpoint, the second does not start.
    outcome = run_study(load_study(str(path), ["budget.cpu_hours=0.0001"]), storage, mlflow_server)
    assert outcome.budget_note and outcome.budget_note.startswith("Budget spent (cpu_hours: ")
    assert "1 trial(s) stopped at an epoch checkpoint, 1 not run" in outcome.budget_note
    (paused,) = [row for row in outcome.rows if row.epochs]
    assert (paused.state, paused.epochs) == ("budget", 1) and paused.spend.cpu_hours >= 0.0001
    client, parents, children = study_runs(mlflow_server, "resume-study")
    (parent,) = parents
    assert (parent.info.status, parent.data.tags["satscale.study_state"]) == ("FINISHED", "budget_spent")
    (child,) = children
    assert (child.info.status, child.data.tags["satscale.trial_state"]) == ("KILLED", "budget")
    assert metric_steps(client, child, "robust_acc") == [0]
    leaderboard = Path(client.download_artifacts(parent.info.run_id, "reports/leaderboard.md", str(tmp_path)))
    assert "stopped: budget, after 1 epoch(s)" in leaderboard.read_text()
    assert outcome.budget_note in leaderboard.read_text()

    command = [sys.executable, str(SCRIPT), "--config", str(path), "--storage", storage, "--mlflow-uri",
               mlflow_server, "--resume"]
    environment = {**os.environ, "RAY_ADDRESS": ray_cluster.address}

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen(command + list(extra), env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    # 2. A larger budget (free to change at --resume): the paused trial goes on from epoch 0's checkpoint. SIGKILL
    # once it finished.
    experiment_dir = Path(storage, "resume-study")
    earlier_states = set(experiment_dir.glob("experiment_state-*.json"))
    driver = start("--set", "budget.cpu_hours=1")
    try:
        finished_before = _wait_for_runs(mlflow_server, "resume-study", driver, 400, _finished)
        _wait_for_saved_termination(experiment_dir, {run.data.tags["satscale.trial_id"] for run in finished_before},
                                    driver, 60, earlier_states)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.communicate()
    assert [run.info.run_id for run in finished_before] == [child.info.run_id]
    end_times = {run.info.run_id: run.info.end_time for run in finished_before}

    # 3. Ctrl-C, as a terminal sends it (SIGINT to the driver's process group), once the second trial, the one the
    # restored searcher suggests next, trained an epoch.
    driver = start()
    try:
        _wait_for_runs(mlflow_server, "resume-study", driver, 400, lambda client, children: [
            run for run in _trained_an_epoch(client, children) if run.info.run_id not in end_times])
        os.killpg(driver.pid, signal.SIGINT)
        out, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130, out[-3000:] + err[-3000:]
    message = err.strip().splitlines()[-1]
    assert message.startswith("scale_study: interrupted: the study's state is saved in") and "--resume" in message, err
    assert "Traceback" not in err
    _, parents, children = study_runs(mlflow_server, "resume-study")
    assert (parents[0].info.status, parents[0].data.tags["satscale.study_state"]) == ("KILLED", "interrupted")
    (interrupted,) = [run for run in children if run.info.run_id not in end_times]
    assert (interrupted.info.status, interrupted.data.tags["satscale.trial_state"]) == ("KILLED", "interrupted")

    # 4. --resume to the end.
    resumed = run_study(load_study(str(path)), storage, mlflow_server, resume=True)
    assert resumed.budget_note is None and resumed.parent_run_id == parent.info.run_id
    again = next(row for row in resumed.rows if row.trial_id == paused.trial_id)
    assert again.spend.wall_s > paused.spend.wall_s  # both of its runs count
    client, parents, children = study_runs(mlflow_server, "resume-study")
    assert [run.info.run_id for run in parents] == [parent.info.run_id]  # reused each time
    assert (parents[0].info.status, parents[0].data.tags["satscale.study_state"]) == ("FINISHED", "finished")
    assert sorted((run.data.params["activation"], float(run.data.params["lr"])) for run in children) == sorted(
        expected)  # none lost, none repeated, each as the searcher suggested it
    for run in children:
        assert (run.info.status, run.data.tags["satscale.trial_state"]) == ("FINISHED", "finished")
        assert metric_steps(client, run, "robust_acc") == [0, 1]  # no epoch trained or logged twice
    for run in children:  # trials finished before the kill were not run again
        if run.info.run_id in end_times:
            assert run.info.end_time == end_times[run.info.run_id]


@pytest.mark.parametrize("arguments, message", [
    (["--set", "train.epochs=0"], "base.train.epochs"),
    (["--set", "search.activations=[relu, swish]"], "swish"),
    (["--set", "tune.num_samples=0"], "tune.num_samples"),
    (["--set", "train.epochs"], "key.path=value"),
    (["--config", "no_such_preset"], "no_such_preset"),
])
def test_bad_study_input_exits_2_and_writes_nothing(arguments, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert scale_study_main(arguments) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no storage, no converted data


def test_dry_run_prints_the_space_and_trial_count(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert scale_study_main(["--dry-run"]) == 0
    output = capsys.readouterr().out
    assert "trials: 4" in output and "relu" in output and "softplus" in output
    assert list(tmp_path.iterdir()) == []


def test_a_study_run_again_starts_a_new_run_beside_the_earlier_ones(ray_cluster, digits_betons, tmp_path):
    from ray import tune

    from orchestrator.preflight import experiment_path, run_path
    from search_spaces.study import load_study
    from trainers.errors import ConfigError

    study = load_study(str(write_study(tmp_path / "study.yaml", digits_betons, "again", ["relu"])), [])
    storage = str(tmp_path / "storage")
    with pytest.raises(ConfigError, match="nothing to resume"):
        run_path(study, storage, resume=True)
    assert run_path(study, storage, resume=False) == experiment_path(storage, study) == f"{storage}/again"

    def finish_run(path: str) -> None:  # a real (empty) Tune experiment where the study's run would write
        tune.Tuner(lambda config: None, run_config=tune.RunConfig(
            name=path.rsplit("/", 1)[-1], storage_path=storage, verbose=0)).fit()

    finish_run(run_path(study, storage, resume=False))
    assert run_path(study, storage, resume=False) == f"{storage}/again-run2"  # the first run is kept
    assert run_path(study, storage, resume=True) == f"{storage}/again"
    finish_run(run_path(study, storage, resume=False))
    assert run_path(study, storage, resume=True) == experiment_path(storage, study) == f"{storage}/again-run2"
    assert run_path(study, storage, resume=False) == f"{storage}/again-run3"
    assert sorted(path.name for path in Path(storage).iterdir()) == ["again", "again-run2"]


def _trial_that_fails_after_its_last_checkpoint(config: dict) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    tune.report({"epoch": 0, CHECKPOINT_PATH_KEY: f"/checkpoints/{config['activation']}"})
    if config["activation"] == "broken":
        raise RuntimeError("failed after its last checkpoint")


def test_evaluation_takes_only_trials_that_ended_without_error(ray_cluster, tmp_path):
    """A failed trial's last checkpoint can be its last epoch's: it is named, not evaluated as a good one."""
    from ray import tune

    from orchestrator.evaluate_study import study_trials

    tuner = tune.Tuner(tune.with_resources(_trial_that_fails_after_its_last_checkpoint, {"cpu": 0.5}),
                       param_space={"activation": tune.grid_search(["relu", "broken"])},
                       run_config=tune.RunConfig(name="evaluated", storage_path=str(tmp_path), verbose=0))
    tuner.fit()
    trials = {trial.checkpoint_path: trial.excluded for trial in study_trials(str(tmp_path / "evaluated"))}
    assert trials == {"/checkpoints/relu": None, "/checkpoints/broken": "failed"}
