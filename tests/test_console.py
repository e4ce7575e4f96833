"""The console a study shows: the live view on a terminal, its last screen, and where the libraries' logs go.
(The view's plain-line mode under a real Tune study is tested in test_tracking; the whole CLI in test_study.)"""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from ray.tune.experiment import Trial

from orchestrator.console import StudyConsole, clock, final_screen, findings, progress_line
from orchestrator.costs import Spend
from orchestrator.reports import StudyRow

ROOT = Path(__file__).resolve().parent.parent


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def trial(trial_id: str, activation: str, status: str, epochs_done: int = 0) -> Trial:
    # A real Tune Trial, as the callbacks receive them (a stub: no trainable registered).
    made = Trial("run_trial", config={"activation": activation, "epochs": 4}, trial_id=trial_id, stub=True)
    made.set_status(status)
    if epochs_done:
        made.update_last_result({"training_iteration": epochs_done, "clean_acc": 0.8, "robust_acc": 0.4})
    return made


def params(config: dict) -> dict:
    return {"activation": config["activation"], "arch": "resnet18", "width_mult": 0.25, "seed": 0,
            "epochs": config["epochs"]}


def test_clock_formats_minutes_and_hours():
    assert [clock(seconds) for seconds in (0, 59.6, 61, 3599, 3600, 7322)] == [
        "0:00", "1:00", "1:01", "59:59", "1:00:00", "2:02:02"]


def test_progress_line_counts_ended_trials_epochs_and_estimates_the_rest():
    trials = [trial("a", "relu", Trial.TERMINATED, 1),  # stopped after 1 of 4: runs no more
              trial("b", "silu", Trial.RUNNING, 2), trial("c", "gelu", Trial.PENDING)]

    def planned(item):
        return item.config["epochs"]

    line = progress_line("demo", trials, expected_trials=4, planned_epochs=planned, max_epochs=4,
                         elapsed_s=30, epochs_this_session=3)
    # 1 + 4 + 4 planned, + 4 for the trial not created yet = 13 epochs; 3 done in 30 s: 10 left at 10 s each.
    assert line == "study demo [#####---------------] 1/4 trials ended, 1 running, 3/13 epochs, 0:30 elapsed, about 1:40 left"
    assert "left" not in progress_line("demo", trials, 4, planned, 4, elapsed_s=5, epochs_this_session=0)


def test_on_a_terminal_the_progress_line_stays_at_the_bottom_and_failures_are_loud():
    terminal = Terminal()
    view = StudyConsole("demo", params, expected_trials=2, max_epochs=4, robust_name="PGD-10", stream=terminal)
    relu, silu = trial("a", "relu", Trial.RUNNING), trial("b", "silu", Trial.RUNNING)
    view.on_trial_start(0, [relu, silu], relu)
    relu.update_last_result({"training_iteration": 1, "clean_acc": 0.75, "robust_acc": 0.5})
    view.on_trial_result(0, [relu, silu], relu, relu.last_result)
    silu.set_status(Trial.ERROR)
    view.on_trial_error(0, [relu, silu], silu)
    output = terminal.getvalue()
    assert "started    relu resnet18 w0.25 seed 0\n" in output
    assert "epoch 1/4  relu resnet18 w0.25 seed 0  clean  75.0 %  PGD-10  50.0 %\n" in output
    assert "FAILED     silu resnet18 w0.25 seed 0: unknown error" in output  # a stub trial keeps no error file
    # Each event line first erases the progress line, which is then drawn again under it, with no newline.
    assert output.count("\r\x1b[K") >= 5
    last = output.rsplit("\r\x1b[K", 1)[1]
    assert last.startswith("study demo [") and "1/2 trials ended, 1 running, 1/4 epochs" in last  # the failed trial runs no more
    assert "\n" not in last


def rows() -> list[StudyRow]:
    def row(trial_id, activation, clean, robust, state="finished"):
        return StudyRow(trial_id, {"activation": activation, "arch": "resnet18", "width_mult": 0.25, "seed": 0},
                        state, clean, robust, 1e6, 3, "DivergenceError: nan" if state == "failed" else None, 400,
                        Spend(36.0, 0.01, 0.0, 0.0005))

    return [row("a", "relu", 0.80, 0.50), row("b", "silu", 0.82, 0.55), row("c", "gelu", None, None, "failed")]


def test_findings_state_the_best_trial_with_its_interval_and_what_the_test_set_can_resolve():
    lines = findings(rows(), "PGD-10")
    assert lines[0] == "Best: silu resnet18 w0.25 seed 0: clean 82.0 % (77.9-85.5), PGD-10 55.0 % (50.1-59.8)."
    assert lines[1] == "Best per activation (PGD-10): silu 55.0 %, relu 50.0 %."
    # sqrt(2) x 1.96 x the larger standard error (sqrt(.25/400) = 2.5 points): differences under 7 points.
    assert "400 test images" in lines[2] and "under about 7 points" in lines[2]
    assert lines[3] == "1 trial(s) failed: see the Notes column."
    assert findings(rows()[2:], "PGD-10") == ["No trial produced results (1 failed)."]


def test_final_screen_says_where_to_look_next():
    url = "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    screen = final_screen("demo", rows(), "PGD-10", "abc123", "sqlite:////tmp/x/mlflow.db", url, "/tmp/x/runs/demo",
                          "models:/demo/1", Path("/tmp/x/runs/demo/logs"), "--set train.epochs=3")
    assert "| 1 | silu | resnet18, ?, 0.25, ? | 82.0 (77.9-85.5) | 55.0 (50.1-59.8) | 0.01 CPU-h |  |" in screen
    assert "Spent: 0.03 CPU-hours, 0 GPU-hours, est. $0.0015" in screen  # the failed trial's time counts too
    assert f"mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db, then open {url}" in screen
    assert "python orchestrator/evaluate_study.py --set train.epochs=3" in screen
    assert "/tmp/x/runs/demo/logs" in screen and "models:/demo/1" in screen
    assert "mlflow models serve -m models:/demo@best --env-manager local" in screen


def test_library_logs_and_warnings_go_to_the_log_file_not_the_console(tmp_path: Path):
    script = (
        "import logging, warnings, sys\n"
        "from pathlib import Path\n"
        "from orchestrator.console import send_logs_to\n"
        "logs = send_logs_to(Path(sys.argv[1]))\n"
        "logging.getLogger('ray.tune.tune_controller').error('Trial task failed: traceback here')\n"
        "logging.getLogger('mlflow.store').warning('a store warning')\n"
        "warnings.warn('a library deprecation')\n"
        "print('the view itself')\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "logs")], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the view itself\n" and result.stderr == ""
    log = (tmp_path / "logs" / "driver.log").read_text()
    assert "Trial task failed: traceback here" in log and "a store warning" in log and "a library deprecation" in log
