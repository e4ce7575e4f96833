"""MLflow's own UI, in a real headless browser (Debian's chromium, which `make test` installs), on the session's
real MLflow server: the link a study prints opens its experiment on the training runs, and the runs carry names a
person knows."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

from orchestrator.tracking import StudyTracker, ui_url

CHROMIUM = shutil.which("chromium")
# The UI is a single-page app: the browser renders it, runs its requests to the server and settles within this
# much virtual time (the budget waits for pending requests) before the DOM is dumped.
RENDER_BUDGET_MS = 30_000


def rendered_text(url: str, profile: Path) -> str:
    """The page's visible text after MLflow's UI has rendered it in headless Chromium (a fresh browser profile:
    a first-time visitor, no remembered choices)."""
    assert CHROMIUM, "chromium is missing: `make test` installs it (the Makefile's TEST_SYSTEM_PACKAGES)"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={profile}", f"--virtual-time-budget={RENDER_BUDGET_MS}",
               "--window-size=1600,1000", "--dump-dom", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    page = re.sub(r"<(style|script)\b.*?</\1>", " ", result.stdout, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page)))


def test_the_study_link_opens_its_training_runs_named_by_activation_scale_and_seed(
        mlflow_server: str, mlflow_experiment: str, tmp_path: Path):
    tracker = StudyTracker(mlflow_server, mlflow_experiment)
    parent = tracker.start_study(mlflow_experiment, f"/studies/{mlflow_experiment}-run2", params={"max_epochs": 2})
    children = {}
    for index, activation in enumerate(("relu", "silu")):
        children[activation] = tracker.trial_run(parent, f"4f2a1_0000{index}", {
            "activation": activation, "arch": "resnet18", "depth_mult": 0.5, "width_mult": 0.25, "resolution": 32,
            "seed": 0})
        tracker.log_epoch(children[activation], {"clean_acc": 0.8, "robust_acc": 0.5}, 0)
        tracker.finish_trial(children[activation], "finished")
    tracker.finish_study(parent)
    experiment = tracker.experiment_id
    assert tracker.client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"

    # The experiment's page as the study's last screen links it: its training runs (the parent, named after the
    # run's folder; its children fold under it), not the GenAI overview MLflow 3 opens by default.
    page = rendered_text(ui_url(mlflow_server, experiment), tmp_path / "experiment")
    assert f"Runs - Experiment {experiment} - MLflow" in page and "Run Name" in page, page[:600]
    assert f"{mlflow_experiment}-run2" in page and "matching runs" in page, page[:1500]
    assert "Token Usage" not in page  # the GenAI overview's panels
    # Each trial's page, by the name the study gave it.
    for activation, run_id in children.items():
        page = rendered_text(ui_url(mlflow_server, experiment, run_id), tmp_path / activation)
        assert f"{activation} resnet18 d0.5 w0.25 32px seed 0" in page, page[:1500]
