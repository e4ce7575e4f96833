"""What the terminal shows while a study runs, and when it ends.

One line per trial event (started, each epoch with its accuracies, finished / stopped early / failed) and a
study progress line (trials and epochs done, elapsed time, an estimate of the rest). On a terminal the progress
line stays at the bottom and redraws in place; elsewhere (`ray job submit`, a pipe, a log file) it is a plain
line after each trial ends, with no escape codes. A failed trial's reason is printed at once, to stderr.

Ray's, Tune's and the libraries' own output goes to log files in the study's folder instead (`send_logs_to`);
`scale_study.py --verbose` leaves it all on the console.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback
from ray.tune.experiment import Trial

from orchestrator.comparisons import binomial_accuracy
from orchestrator.reports import StudyRow, leaderboard, leaderboard_markdown, trial_label
from orchestrator.tracking import trial_failure_reason
from search_spaces.space import count_trials
from search_spaces.study import StudyConfig
from trainers.trial import TrialConfig

_ENDED = (Trial.TERMINATED, Trial.ERROR)
_BAR_WIDTH = 20


def clock(seconds: float) -> str:
    """`M:SS`, or `H:MM:SS` from an hour on."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _percent(value: Any) -> str:
    return f"{100 * float(value):5.1f} %" if isinstance(value, (int, float)) else "    – "


def _epochs_done(trial: Trial) -> int:
    return int((trial.last_result or {}).get("training_iteration", 0))


def progress_line(study_name: str, trials: Sequence[Trial], expected_trials: int, planned_epochs: Callable[[Trial], int],
                  max_epochs: int, elapsed_s: float, epochs_this_session: int, ended: Trial | None = None) -> str:
    """`study NAME [#####-----] 3/8 trials ended, 2 running, 9/16 epochs, 1:12 elapsed, about 1:30 left`.

    Ended trials count the epochs they ran (a stopped trial runs no more); trials not created yet count
    `max_epochs`. The estimate is the remaining epochs at this session's pace so far: an upper bound where the
    scheduler may still stop trials early. `ended`: a trial Tune is ending now (its status still says running)."""
    def has_ended(trial: Trial) -> bool:
        return trial.status in _ENDED or trial is ended

    finished = [trial for trial in trials if has_ended(trial)]
    running = sum(trial.status == Trial.RUNNING and not has_ended(trial) for trial in trials)
    done = sum(_epochs_done(trial) for trial in trials)
    total = (sum(_epochs_done(trial) if has_ended(trial) else planned_epochs(trial) for trial in trials)
             + max(0, expected_trials - len(trials)) * max_epochs)
    total = max(total, done, 1)
    filled = round(_BAR_WIDTH * done / total)
    line = (f"study {study_name} [{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] "
            f"{len(finished)}/{max(expected_trials, len(trials))} trials ended, {running} running, "
            f"{done}/{total} epochs, {clock(elapsed_s)} elapsed")
    if epochs_this_session and done < total:
        line += f", about {clock(elapsed_s / epochs_this_session * (total - done))} left"
    return line


class StudyConsole(Callback):
    """The live view: a Tune callback that writes trial events and the study's progress to `stream`.

    `trial_params` maps a trial's config to its MLflow params (`search_spaces.space.trial_params`), which name
    the trial (`reports.trial_label`) and say how many epochs it plans."""

    def __init__(self, study_name: str, trial_params: Callable[[dict], Mapping[str, Any]], expected_trials: int,
                 max_epochs: int, robust_name: str, stream: TextIO | None = None) -> None:
        self._study_name = study_name
        self._trial_params = trial_params
        self._expected_trials = expected_trials
        self._max_epochs = max_epochs
        self._robust_name = robust_name
        self._labels: dict[str, str] = {}
        self._attach(stream)

    def _attach(self, stream: TextIO | None) -> None:
        self._stream = stream or sys.stdout
        self._errors = stream or sys.stderr
        self._live = self._stream.isatty()
        self._started = time.monotonic()
        self._epochs_this_session = 0
        self._status = ""

    # Tune pickles its callbacks with the experiment state and `Tuner.restore` brings back that copy: streams and
    # clocks are the new session's.
    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items()
                if name in ("_study_name", "_trial_params", "_expected_trials", "_max_epochs", "_robust_name",
                            "_labels")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._attach(None)

    def _params(self, trial: Trial) -> dict[str, Any]:
        return self._trial_params(trial.config) if trial.config else {}  # Tune may restore a trial without one

    def _label(self, trial: Trial) -> str:
        if trial.trial_id not in self._labels:
            params = self._params(trial)
            self._labels[trial.trial_id] = trial_label(params) if params else trial.trial_id
        return self._labels[trial.trial_id]

    def _planned_epochs(self, trial: Trial) -> int:
        return int(self._params(trial).get("epochs", self._max_epochs))

    def _accuracies(self, result: Mapping[str, Any]) -> str:
        return f"clean {_percent(result.get('clean_acc'))}  {self._robust_name} {_percent(result.get('robust_acc'))}"

    def _write(self, text: str, stream: TextIO | None = None) -> None:
        stream = stream or self._stream
        if self._live and self._status:
            self._stream.write("\r\x1b[K")  # the progress line makes room, and is drawn again below
        stream.write(f"{clock(time.monotonic() - self._started):>7}  {text}\n")
        stream.flush()
        if self._live and self._status:
            self._stream.write(self._status)
            self._stream.flush()

    def _progress(self, trials: Sequence[Trial], ended: Trial | None = None, force_line: bool = False) -> None:
        status = progress_line(self._study_name, trials, self._expected_trials, self._planned_epochs,
                               self._max_epochs, time.monotonic() - self._started, self._epochs_this_session,
                               ended=ended)
        if self._live:
            self._status = status
            self._stream.write("\r\x1b[K" + status)
            self._stream.flush()
        elif force_line:
            self._stream.write(status + "\n")
            self._stream.flush()

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._write(f"started    {self._label(trial)}")
        self._progress(trials)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        self._epochs_this_session += 1
        epoch = int(result.get("training_iteration", 0))
        self._write(f"epoch {epoch}/{self._planned_epochs(trial)}  {self._label(trial)}  {self._accuracies(result)}")
        self._progress(trials)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        done, planned = _epochs_done(trial), self._planned_epochs(trial)
        verb = "finished " if done >= planned else "stopped  "
        how = (f"{done} epoch{'s' if done != 1 else ''}" if done >= planned
               else f"stopped early by the scheduler after {done} of {planned} epochs")
        self._write(f"{verb}  {self._label(trial)}  {self._accuracies(trial.last_result or {})}  ({how})")
        self._progress(trials, ended=trial, force_line=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._write(f"FAILED     {self._label(trial)}: {trial_failure_reason(trial)}", self._errors)
        self._progress(trials, ended=trial, force_line=True)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self._progress(trials)
        if self._live:
            self._stream.write("\n")
            self._stream.flush()
        self._status = ""


def robust_name(study: StudyConfig) -> str:
    """What the trials' robust accuracy is measured with, e.g. `PGD-10` (`PGD` when the steps are searched)."""
    if any(item.key == "eval_attack.steps" for item in study.search.searched()):
        return "PGD"
    attack = TrialConfig.parse(study.base_values()).train.eval_attack
    return f"PGD-{attack.steps}" if attack else "robust"


def logs_folder(results_path: str) -> Path:
    """The run's own folder for its logs: inside its Tune results when those are local, else under
    ./satscale_logs (a bucket holds no live log files)."""
    if "://" in results_path and not results_path.startswith("file://"):
        return Path("satscale_logs").resolve() / results_path.rstrip("/").rsplit("/", 1)[-1]
    return Path(results_path.removeprefix("file://")) / "logs"


@dataclass(frozen=True)
class ConsoleSettings:
    """How `orchestrator.runner.run_study` shows a study on the terminal: the live view always; with `verbose`
    Ray's, Tune's and the workers' own output too, else that goes to log files."""

    verbose: bool = False
    stream: TextIO | None = None

    @property
    def tune_verbosity(self) -> int | None:
        return None if self.verbose else 0  # None: Tune's own default status tables

    def start(self, study: StudyConfig, results_path: str, trial_params: Callable[[dict], Mapping[str, Any]]
              ) -> tuple[list[Callback], Path | None]:
        """The Tune callbacks of the live view, and the log folder (None with `verbose`), announced once."""
        stream = self.stream or sys.stdout
        logs_dir = None
        if not self.verbose:
            logs_dir = send_logs_to(logs_folder(results_path))
            stream.write(f"Ray's, Tune's and the workers' logs: {logs_dir} (--verbose shows them here)\n")
        stream.write(f"study {study.name}: {count_trials(study)} trial(s), results in {results_path}\n")
        stream.flush()
        view = StudyConsole(study.name, trial_params, count_trials(study), study.max_epochs(), robust_name(study),
                            self.stream)
        return [view], logs_dir

    @contextlib.contextmanager
    def tune_output_to(self, logs_dir: Path | None) -> Iterator[None]:
        """Around `Tuner.fit()`: what Tune prints itself even when silent (its experiment box, where its results
        are, a TensorBoard hint) goes to `logs_dir/tune.log`. The live view keeps the stream it was given."""
        if logs_dir is None:
            yield
            return
        with open(logs_dir / "tune.log", "a") as log, contextlib.redirect_stdout(log):
            yield


# ------------------------------------------------------------------------------------------------ log files

# Library loggers whose records belong in the log file, not on the console (Ray's own `ray` logger does not
# propagate to the root one).
_LIBRARY_LOGGERS = ("", "ray", "mlflow", "alembic", "urllib3", "botocore", "py.warnings")


DRIVER_LOG = "driver.log"


def driver_log() -> str | None:
    """The driver log file `send_logs_to` opened in this process, if any."""
    return next((handler.baseFilename for handler in logging.getLogger().handlers
                 if isinstance(handler, logging.FileHandler) and handler.baseFilename.endswith(f"/{DRIVER_LOG}")),
                None)


def send_logs_to(logs_dir: Path) -> Path:
    """Ray's, Tune's and the libraries' log records and Python warnings from this process go to
    `logs_dir/driver.log` instead of the console; the local Ray's own log folder (every worker's and Ray
    process' output) is linked beside it as `logs_dir/ray`. Returns `logs_dir`."""
    import ray

    logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs_dir / DRIVER_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for old in [old for old in logger.handlers if isinstance(old, logging.StreamHandler)
                    and not isinstance(old, logging.FileHandler)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger().setLevel(logging.INFO)
    logging.captureWarnings(True)
    node = getattr(ray._private.worker, "_global_node", None)
    ray_logs = Path(node.get_logs_dir_path()) if node is not None else None
    link = logs_dir / "ray"
    if ray_logs is not None and ray_logs.is_dir():  # on a cluster, the head's folder when the driver runs there
        link.unlink(missing_ok=True)
        link.symlink_to(ray_logs, target_is_directory=True)
    return logs_dir


# ------------------------------------------------------------------------------------------------ the end

def findings(rows: Sequence[StudyRow], robust_name: str) -> list[str]:
    """What the study found, in a few lines with their uncertainty: the best trial with its 95 % intervals over
    the test images, each activation's best, and how large a difference those images can resolve."""
    ranked = [row for row in leaderboard(rows) if row.state != "failed" and row.has_accuracies]
    failed = [row for row in rows if row.state == "failed"]
    lines = []
    if not ranked:
        return [f"No trial produced results ({len(failed)} failed)."]
    best = ranked[0]

    def accuracy(value: float, row: StudyRow) -> str:
        if not row.eval_images:
            return f"{100 * value:.1f} %"
        estimate = binomial_accuracy(value, row.eval_images)
        return f"{100 * value:.1f} % ({100 * estimate.low:.1f}-{100 * estimate.high:.1f})"

    lines.append(f"Best: {trial_label(best.params)}: clean {accuracy(best.clean_acc, best)}, "
                 f"{robust_name} {accuracy(best.robust_acc, best)}.")
    by_activation: dict[str, StudyRow] = {}
    for row in ranked:
        by_activation.setdefault(row.activation, row)
    if len(by_activation) > 1:
        lines.append("Best per activation (" + robust_name + "): "
                     + ", ".join(f"{name} {100 * row.robust_acc:.1f} %" for name, row in by_activation.items()) + ".")
    if best.eval_images:
        # Two independent trials' accuracies differ by chance with this standard error; 1.96 x it is the half
        # width of an unpaired 95 % interval of their difference.
        spread = max(binomial_accuracy(row.robust_acc, row.eval_images).std_error for row in ranked
                     if row.eval_images)
        resolvable = 100 * 1.959964 * spread * 2 ** 0.5
        lines.append(f"Intervals are 95 % over the {best.eval_images} test images of one training run each: "
                     f"differences under about {resolvable:.0f} points are within that noise, and seeds add "
                     "their own; for paired intervals over seeds and images, evaluate the study.")
    if failed:
        lines.append(f"{len(failed)} trial(s) failed: see the Notes column.")
    return lines


def final_screen(study_name: str, rows: Sequence[StudyRow], robust_name: str, parent_run_id: str,
                 tracking_uri: str, mlflow_url: str, results_path: str, best_model_uri: str | None,
                 logs_dir: Path | None, config_argument: str) -> str:
    """The study's last screen: the leaderboard, what it found, and where to look next."""
    ui = (f"mlflow ui --backend-store-uri {tracking_uri}, then open {mlflow_url}"
          if tracking_uri.startswith(("sqlite:", "file:")) else f"open {mlflow_url}")
    lines = [leaderboard_markdown(rows), *findings(rows, robust_name), "", "Next:",
             f"  MLflow UI:        {ui}",
             f"                    (experiment {study_name!r}, parent run {parent_run_id})",
             f"  Paired intervals: python orchestrator/evaluate_study.py {config_argument}",
             "  Larger studies:   --config activation_table | compound_scaling (search_spaces/presets/)",
             f"  Tune results:     {results_path}"]
    if best_model_uri:
        name = best_model_uri.removeprefix("models:/").split("/")[0]
        lines.append(f"  Best model:       {best_model_uri} (mlflow.pyfunc.load_model; serve it with "
                     f"mlflow models serve -m models:/{name}@best --env-manager local)")
    if logs_dir is not None:
        lines.append(f"  Logs:             {logs_dir}")
    return "\n".join(lines)
