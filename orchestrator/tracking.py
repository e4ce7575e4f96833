"""MLflow tracking of a study: one experiment per study, a parent run per study, a nested child run per trial.

Everything goes through an explicit `MlflowClient` (the fluent API keeps global, cwd-dependent state that is
not thread-safe). Every write is idempotent, so a resumed study reuses its parent run, a restored trial its
child run, and a replayed epoch is not logged twice. The Tune callback never lets MLflow stop the study:
its calls are sent by a background thread, and calls that fail while the server is unreachable wait in its
queue and are retried after an interval and at the end of the study. Nothing logged (params, tags, reasons)
carries a credential: see `redact`.
"""
from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import re
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray import cloudpickle
from ray.tune import Callback, ResultGrid
from ray.tune.experiment import Trial

from orchestrator.costs import Spend
from orchestrator.environment import environment_variables
from orchestrator.model_registry import log_sat_model
from orchestrator.reports import StudyRow, TrialState, trial_label
from trainers.errors import REDACTED, ConfigError, first_line, mask_url_credentials
from trainers.models import SATModel

logger = logging.getLogger(__name__)

TAG_ROLE = "satscale.role"
TAG_STUDY = "satscale.study"
TAG_TRIAL_ID = "satscale.trial_id"
TAG_TRIAL_STATE = "satscale.trial_state"
TAG_FAILURE_REASON = "satscale.failure_reason"
TAG_STUDY_STATE = "satscale.study_state"  # finished, interrupted (resumable) or failed
TAG_RESULTS = "satscale.results"  # the Tune experiment of a study's run: tells its parent run from other runs'
# The experiment's kind, as MLflow's API and UI selector show it: model training, not a GenAI app.
TAG_EXPERIMENT_KIND, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
# MLflow 3.17's UI opens an experiment by its workflow switch (this URL parameter, else the browser's last choice,
# GenAI's overview at first), not by the kind tag: satscale's links carry it, so they open on the training runs.
UI_WORKFLOW_PARAMETER = "workflowType=machine_learning"
# Where `mlflow ui` serves a local store by default.
MLFLOW_UI_DEFAULT_URL = "http://127.0.0.1:5000"


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment's training runs (or of one run): on the tracking server itself, or
    where `mlflow ui` serves a local store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI_DEFAULT_URL
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{mask_url_credentials(base)}/#/experiments/{experiment_id}/{page}?{UI_WORKFLOW_PARAMETER}"

RUN_STATUS: dict[TrialState, str] = {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED",
                                     "interrupted": "KILLED", "budget": "KILLED"}
# How a study ended -> its parent run's status.
# budget_spent: ended by its budget, resumable with a larger one (the reports say what ran).
STUDY_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED", "budget_spent": "FINISHED"}
# What the callback logs per epoch from a trial's result, when present.
EPOCH_METRICS = ("clean_acc", "robust_acc", "train_loss", "train_robust_acc", "images_per_s", "lr", "resolution")

_SECRET_NAME = re.compile(r"secret|token|password|passwd|credential|access_key|api_key|private_key", re.IGNORECASE)
_AWS_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
# Shorter environment values (e.g. moto's "testing") are too common as plain words to mask in free text.
_MIN_MASKED_SECRET_LENGTH = 8
_MAX_REASON_LENGTH = 300


# MLflow's tracking stores (`postgresql+psycopg2://...` counts as postgresql).
TRACKING_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")  # a local store given as a file: SQLite, not a file store folder
_REACH_TIMEOUT_S = 10


def resolve_tracking_uri(cli_uri: str | None) -> str:
    """`--mlflow-uri` wins, then `MLFLOW_TRACKING_URI`, else SQLite in the working directory; local stores
    as absolute URIs (Ray Tune changes workers' working directories)."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    source = "--mlflow-uri" if cli_uri else "MLFLOW_TRACKING_URI"
    if mask_url_credentials(uri) != uri:  # not echoed: it holds a credential
        raise ConfigError(f"{source}: the URI carries credentials, which would be printed and stored with the study; "
                          "remove them and set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
                          "MLFLOW_TRACKING_TOKEN (a database: PGPASSWORD or ~/.pgpass)")
    scheme = uri.partition("://")[0].split("+")[0] if "://" in uri else None
    if scheme is not None and scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{source} {uri!r}: MLflow cannot track to a {scheme!r} URI; accepted: "
                          f"{', '.join(TRACKING_SCHEMES)}, or a local folder")
    if "://" not in uri and Path(uri).suffix in SQLITE_SUFFIXES:  # `mlflow.db` means the database, not a folder
        uri = f"sqlite:///{uri}"
    if uri.startswith("sqlite:///"):
        database = uri.removeprefix("sqlite:///")
        return uri if database.startswith("/") else f"sqlite:///{Path(database).resolve()}"
    if "://" not in uri and not uri.startswith("file:"):
        return Path(uri).resolve().as_uri()
    return uri


def check_tracking_server(uri: str, source: str = "--mlflow-uri") -> None:
    """An MLflow server (http/https) must answer its health check before the study writes anything."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    health = f"{uri.rstrip('/')}/health"
    try:
        response = requests.get(health, timeout=_REACH_TIMEOUT_S)
    except requests.RequestException as error:
        raise ConfigError(f"{source} {mask_url_credentials(uri)}: no MLflow server answers there "
                          f"({type(error).__name__}); start it (mlflow server ...), or fix the URI") from None
    if response.status_code >= 500:
        raise ConfigError(f"{source} {mask_url_credentials(uri)}: the MLflow server is not healthy (HTTP "
                          f"{response.status_code} from /health); check its logs and database")


def _environment_secrets() -> list[str]:
    return [value for name, value in os.environ.items()
            if (_SECRET_NAME.search(name) or name == "AWS_ACCESS_KEY_ID") and len(value) >= _MIN_MASKED_SECRET_LENGTH]


def scrub(text: str) -> str:
    """`text` with AWS access key ids, passwords in URLs and the values of secret environment variables
    masked."""
    for secret in _environment_secrets():
        text = text.replace(secret, REDACTED)
    text = _AWS_ACCESS_KEY_ID.sub(REDACTED, text)
    return mask_url_credentials(text)


def redact(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` safe to log: credential-named keys masked, other values scrubbed (structured values are
    logged as text anyway, so they are scrubbed as text); numbers and booleans pass unchanged."""
    def safe(name: str, value: Any) -> Any:
        if _SECRET_NAME.search(name):
            return REDACTED
        if value is None or isinstance(value, (bool, numbers.Number)):
            return value
        return scrub(str(value))

    return {name: safe(name, value) for name, value in values.items()}


def _finite_numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)}


def _quoted(value: str) -> str:
    """`value` as a search-filter string literal."""
    if "'" in value:
        raise ValueError(f"names used in MLflow searches may not contain quotes: {value!r}")
    return f"'{value}'"


_Method = TypeVar("_Method", bound=Callable[..., Any])


# MLflow prints a "View run ... at: URL" line whenever a run on a server ends: once per trial. The study's last
# screen gives the link to its runs once instead.
_NO_RUN_LINKS = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def _bounded_http(method: _Method) -> _Method:
    """Run a tracker method under its HTTP limits: MLflow reads them from the environment on every request,
    and its defaults (120 s timeout, 7 retries with exponential backoff) can hold the study for minutes."""
    @functools.wraps(method)
    def bounded(self: StudyTracker, *args: Any, **kwargs: Any) -> Any:
        with environment_variables({**self.http_limits, **_NO_RUN_LINKS}):
            return method(self, *args, **kwargs)

    return bounded  # type: ignore[return-value]


class StudyTracker:
    """A study's MLflow experiment, parent run and trial runs, through one explicit client."""

    def __init__(self, tracking_uri: str, experiment_name: str, *, request_timeout_s: int | None = None,
                 max_retries: int | None = None) -> None:
        """HTTP limits: the arguments, else MLflow's own variables when set, else 10 s and 2 retries."""
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        if request_timeout_s is None:
            request_timeout_s = int(os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", 10))
        if max_retries is None:
            max_retries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", 2))
        self.http_limits = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(request_timeout_s),
                            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
                            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                                                                                 "1")}
        self._client = MlflowClient(tracking_uri)
        self._experiment_id: str | None = None  # looked up on first use: constructing needs no server
        # Steps already logged, per run and metric, loaded from the server once per run (see log_epoch).
        self._logged_steps: dict[str, dict[str, set[int]]] = {}

    @property
    def client(self) -> MlflowClient:
        return self._client

    @property
    def experiment_id(self) -> str:
        return self._experiment()

    def _experiment(self) -> str:
        if self._experiment_id is None:
            experiment = self._client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                self._experiment_id = self._client.create_experiment(
                    self.experiment_name, tags={TAG_EXPERIMENT_KIND: MODEL_TRAINING_KIND})
            else:
                self._experiment_id = experiment.experiment_id
                if TAG_EXPERIMENT_KIND not in experiment.tags:  # made by an earlier satscale, or by hand
                    self._client.set_experiment_tag(self._experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING_KIND)
        return self._experiment_id

    def _runs_tagged(self, tags: Mapping[str, str]):
        query = " and ".join(f"tags.`{name}` = {_quoted(value)}" for name, value in tags.items())
        return self._client.search_runs([self._experiment()], filter_string=query,
                                        order_by=["attributes.start_time DESC"])

    def _log_missing_params(self, run, params: Mapping[str, Any]) -> None:
        """MLflow params are write-once: a reused run only gets the params it does not have yet."""
        missing = {name: value for name, value in redact(params).items() if name not in run.data.params}
        if missing:
            self._client.log_batch(run.info.run_id, params=[Param(name, str(value)) for name, value in missing.items()])

    @_bounded_http
    def start_study(self, study_name: str, results_path: str, params: Mapping[str, Any] | None = None,
                    tags: Mapping[str, Any] | None = None, *, resume: bool = False) -> str:
        """The parent run of the study's run whose Tune results are at `results_path`: with `resume` that run's
        latest parent (marked running again), else a new one named after the results' folder. Parents are found
        by their results, not the study's name alone, so a fresh run never nests under an earlier one."""
        params, tags = params or {}, redact(tags or {})
        study_tags = {TAG_STUDY: study_name, TAG_ROLE: "study", TAG_RESULTS: scrub(results_path)}
        existing = self._runs_tagged(study_tags) if resume else []
        tags = {**tags, TAG_STUDY_STATE: "running"}
        if existing:
            run = existing[0]
            self._client.update_run(run.info.run_id, status="RUNNING")
            self._client.log_batch(run.info.run_id, tags=[RunTag(name, str(value)) for name, value in tags.items()])
        else:
            run = self._client.create_run(self._experiment(), run_name=results_path.rstrip("/").rsplit("/", 1)[-1],
                                          tags={**{name: str(value) for name, value in tags.items()}, **study_tags})
        self._log_missing_params(run, params)
        return run.info.run_id

    @_bounded_http
    def study_run_id(self, study_name: str, results_path: str) -> str | None:
        """The latest parent run of the study's run at `results_path`, left as it is (None when it was never
        tracked here)."""
        runs = self._runs_tagged({TAG_STUDY: study_name, TAG_ROLE: "study", TAG_RESULTS: scrub(results_path)})
        return runs[0].info.run_id if runs else None

    @_bounded_http
    def trial_run(self, parent_run_id: str, trial_id: str, params: Mapping[str, Any], *,
                  restart: bool = True) -> str:
        """The child run of `trial_id` under the parent run, created once and named after what the trial is
        (`reports.trial_label`): a restored trial gets its run back, marked running again with `restart` (a trial
        starting now), left as it is without (a lookup)."""
        trial_tags = {MLFLOW_PARENT_RUN_ID: parent_run_id, TAG_ROLE: "trial", TAG_TRIAL_ID: trial_id}
        existing = self._runs_tagged(trial_tags)
        if existing:
            run = existing[0]
            if restart and run.info.status != "RUNNING":
                self._client.update_run(run.info.run_id, status="RUNNING")
                self._client.set_tag(run.info.run_id, TAG_TRIAL_STATE, "running")
            if restart and TAG_FAILURE_REASON in run.data.tags:
                self._client.delete_tag(run.info.run_id, TAG_FAILURE_REASON)
        else:
            run = self._client.create_run(self._experiment(), run_name=trial_label(redact(params)) if params else trial_id,
                                          tags={**trial_tags, TAG_TRIAL_STATE: "running"})
        self._log_missing_params(run, params)
        return run.info.run_id

    def _steps_logged(self, run_id: str) -> dict[str, set[int]]:
        if run_id not in self._logged_steps:
            history = self._client.get_metric_history
            self._logged_steps[run_id] = {name: {metric.step for metric in history(run_id, name)}
                                          for name in self._client.get_run(run_id).data.metrics}
        return self._logged_steps[run_id]

    @_bounded_http
    def log_epoch(self, run_id: str, metrics: Mapping[str, Any], epoch: int, *, replace: bool = False) -> int:
        """Log the finite numeric `metrics` at step `epoch`, skipping any (metric, epoch) the run already has
        (a resumed trial replays epochs); with `replace`, logging them again: MLflow shows a step's latest value,
        so numbers computed anew (an evaluation run again) supersede the old. Returns how many were logged."""
        logged = self._steps_logged(run_id)
        timestamp = int(time.time() * 1000)
        new = [Metric(name, value, timestamp, epoch) for name, value in _finite_numbers(metrics).items()
               if replace or epoch not in logged.get(name, ())]
        if new:
            try:
                self._client.log_batch(run_id, metrics=new)
            except Exception:
                # The server may have stored the batch before the connection broke: re-read before a retry.
                self._logged_steps.pop(run_id, None)
                raise
            for metric in new:
                logged.setdefault(metric.key, set()).add(epoch)
        return len(new)

    @_bounded_http
    def finish_trial(self, run_id: str, state: TrialState, reason: str | None = None) -> None:
        """Record how the trial ended. A run already ended in `state` is left as it is (its end time stays:
        a resumed study re-announces trials that finished in an earlier session)."""
        run = self._client.get_run(run_id)
        if run.data.tags.get(TAG_TRIAL_STATE) == state and run.info.status == RUN_STATUS[state]:
            return
        tags = [RunTag(TAG_TRIAL_STATE, state)]
        if reason:
            tags.append(RunTag(TAG_FAILURE_REASON, scrub(reason)[:_MAX_REASON_LENGTH]))
        self._client.log_batch(run_id, tags=tags)
        self._client.set_terminated(run_id, status=RUN_STATUS[state])

    @_bounded_http
    def finish_study(self, parent_run_id: str, state: str = "finished") -> None:
        """End the parent run as the study ended (`STUDY_STATUS`: interrupted is KILLED, resumable). A study that
        did not finish also ends its trials' runs still marked running: interrupted with it, or stopped by its
        budget (`--resume` marks them running again)."""
        if state != "finished":
            running = self._runs_tagged({MLFLOW_PARENT_RUN_ID: parent_run_id, TAG_ROLE: "trial",
                                         TAG_TRIAL_STATE: "running"})
            for run in running:
                self.finish_trial(run.info.run_id, "budget" if state == "budget_spent" else "interrupted")
        self._client.set_tag(parent_run_id, TAG_STUDY_STATE, state)
        self._client.set_terminated(parent_run_id, status=STUDY_STATUS[state])

    @_bounded_http
    def log_spend(self, run_id: str, spend: Spend, prefix: str = "") -> None:
        """What a trial (or, with prefix `total_`, a study) spent, as metrics: wall_s, cpu_hours, gpu_hours,
        cost_usd. Logged again when a resumed trial ends: the latest value is the total."""
        values = {"wall_s": spend.wall_s, "cpu_hours": spend.cpu_hours, "gpu_hours": spend.gpu_hours,
                  "cost_usd": spend.usd}
        self._client.log_batch(run_id, metrics=[Metric(prefix + key, value, int(time.time() * 1000), 0)
                                                for key, value in values.items()])

    @_bounded_http
    def log_reports(self, parent_run_id: str, directory: Path, artifact_path: str = "reports") -> None:
        self._client.log_artifacts(parent_run_id, str(directory), artifact_path=artifact_path)

    @_bounded_http
    def log_model(self, run_id: str, model: SATModel, tags: Mapping[str, Any], *, name: str = "model",
                  register: bool = False) -> str:
        """`model` as an MLflow Model of run `run_id` (`orchestrator.model_registry`); with `register`, a new
        version of the registered model named after the study. Returns the URI that loads it."""
        return log_sat_model(self.tracking_uri, run_id, model, name=name, tags=tags,
                             registered_model_name=self.experiment_name if register else None)


def is_permanent(error: Exception) -> bool:
    """Errors a retry cannot fix: MLflow's client errors (4xx: a bad value, a missing run) and bugs.
    Unreachable servers, timeouts and server errors are worth retrying later."""
    if isinstance(error, MlflowException):
        return 400 <= error.get_http_status_code() < 500
    return True


_EXCEPTION_LINE = re.compile(r"^[\w.]+(?:Error|Exception|Interrupt|Exit)\b")


def _trial_exception(trial: Trial) -> BaseException | None:
    # During on_trial_error only the driver's local copy exists (storage is synced later); a trial that
    # ended in an earlier session of a resumed study has only the synced copy.
    if trial.pickled_error_file and Path(trial.pickled_error_file).exists():
        with open(trial.pickled_error_file, "rb") as file:
            return cloudpickle.load(file)
    return trial.get_pickled_error()


def _trial_error_trace(trial: Trial) -> str:
    if trial.error_file and Path(trial.error_file).exists():
        return Path(trial.error_file).read_text()
    return trial.get_error() or ""


def _failure_reason(error: BaseException | str | None) -> str:
    """`Type: first line of its message` for the exception that ended a trial. Tune keeps it pickled, wrapped
    in a RayTaskError whose `cause` is the trainable's exception, or as a text trace when pickling failed."""
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None) or error
        reason = f"{type(cause).__name__}: {first_line(cause)}"
    else:
        lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)),
                      lines[-1] if lines else "unknown error")
    return scrub(reason)[:_MAX_REASON_LENGTH]


def trial_failure_reason(trial: Trial) -> str:
    try:
        return _failure_reason(_trial_exception(trial) or _trial_error_trace(trial))
    except Exception as error:  # an unreadable error file must not fail the callback
        return f"unknown error (its details could not be read: {type(error).__name__})"


def _epochs_done(result: Mapping[str, Any]) -> int:
    if "epoch" in result:
        return int(result["epoch"]) + 1
    return int(result.get("training_iteration", 0))


def _ended_state(last_result: Mapping[str, Any], params: Mapping[str, Any], max_epochs: int) -> TrialState:
    """A trial that ended without error: stopped early (by the scheduler or a stopper) when it trained fewer
    epochs than its own (its `epochs` param; the study's `max_epochs` where its params do not say)."""
    planned = int(params.get("epochs", max_epochs))
    return "stopped_early" if _epochs_done(last_result) < planned else "finished"


SpendFunction = Callable[[dict, float], Spend]  # (trial config, wall seconds) -> what it spent


def _study_row(trial_id: str, params: dict[str, Any], last_result: Mapping[str, Any], state: TrialState,
               reason: str | None, cost_flops: float | None, spend: Spend | None = None) -> StudyRow:
    return StudyRow(trial_id=trial_id, params=params, state=state, clean_acc=last_result.get("clean_acc"),
                    robust_acc=last_result.get("robust_acc"), cost_flops=cost_flops,
                    epochs=_epochs_done(last_result), failure_reason=reason,
                    eval_images=last_result.get("eval_images"), spend=spend)


TrialSeconds = Callable[[str, Mapping[str, Any]], float]  # (trial id, its last result) -> its running seconds


def _this_run_seconds(trial_id: str, last_result: Mapping[str, Any]) -> float:
    return float(last_result.get("time_total_s") or 0.0)


def _trial_spend(trial_spend: SpendFunction | None, config: dict | None, seconds: float) -> Spend | None:
    """What a trial spent in `seconds` of running time (`orchestrator.costs` says what it covers). None without
    a config."""
    if trial_spend is None or not config:
        return None
    return trial_spend(config, seconds)


_TRIAL_FOLDER_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(?:_|$)")


def _trial_id_of_folder(name: str) -> str:
    """A trial's id from its folder's name (Tune's `TRAINABLE_ID_INDEX_PARAMS_DATE`), for a trial without a
    report (it failed first, or never started); the name itself where it holds none."""
    found = _TRIAL_FOLDER_ID.search(name)
    return found.group(1) if found else name


def study_rows(results: ResultGrid, trial_params: Callable[[dict], dict[str, Any]],
               trial_cost: Callable[[dict], float] | None, max_epochs: int,
               trial_spend: SpendFunction | None = None, trial_seconds: TrialSeconds = _this_run_seconds
               ) -> list[StudyRow]:
    """The report rows of every trial in a study's results (`Tuner.fit()`), with redacted params. Use these
    after `Tuner.restore`: the callback in effect then is Tune's unpickled copy, not the driver's object. A
    trial Tune restored without its config (one that failed before it started) has no params or cost.
    `trial_seconds`: a trial's running time (the callback's `trial_seconds` counts every run of a resumed trial;
    the default, Tune's `time_total_s`, only its last)."""
    rows = []
    for result in results:
        last_result = result.metrics or {}
        trial_id = last_result.get("trial_id") or _trial_id_of_folder(Path(result.path).name)
        reason = _failure_reason(result.error) if result.error else None
        params = redact(trial_params(result.config)) if result.config else {}
        state = "failed" if result.error else _ended_state(last_result, params, max_epochs)
        cost = trial_cost(result.config) if trial_cost and result.config else None
        rows.append(_study_row(trial_id, params, last_result, state, reason, cost,
                               _trial_spend(trial_spend, result.config, trial_seconds(trial_id, last_result))))
    return rows


# The callbacks `Tuner.restore` unpickled in this process, by parent run (MLflowStudyCallback.restored).
_RESTORED: dict[str, MLflowStudyCallback] = {}


class MLflowStudyCallback(Callback):
    """Mirrors a Tune study into MLflow (a child run per trial, per-epoch metrics, trial states) and
    collects each trial's final row for the reports (`rows`, complete after the study ends).

    MLflow never holds up Tune: its calls wait in one queue, sent in order by a background thread, so Tune's
    event loop (which hands trials their results) never waits on a slow or absent server. A call that fails for
    a reason a retry can fix stays at the head of the queue and is tried again `retry_interval_s` later (an
    outage costs one failed call per interval, not one per event); at the end of the study the queue is tried
    once more, and whatever still could not be logged is reported in a warning and in `unlogged`.

    `Tuner.restore` brings back the pickled copy of this callback made when the Tuner was built (RunConfig
    is restored, not passed again): it logs to the same parent run, but the driver holds no reference to
    it, so a resumed driver builds its report rows with `study_rows`."""

    def __init__(self, tracker: StudyTracker, parent_run_id: str, trial_params: Callable[[dict], dict[str, Any]],
                 trial_cost: Callable[[dict], float] | None = None, *, max_epochs: int,
                 trial_spend: SpendFunction | None = None, metric_keys: tuple[str, ...] = EPOCH_METRICS,
                 retry_interval_s: float = 30.0) -> None:
        self._tracker = tracker
        self._parent_run_id = parent_run_id
        self._trial_params = trial_params
        self._trial_cost = trial_cost
        self._trial_spend = trial_spend
        self._max_epochs = max_epochs
        self._metric_keys = metric_keys
        self._retry_interval_s = retry_interval_s
        self._run_ids: dict[str, str] = {}
        self._concluded: set[str] = set()
        self._started: set[str] = set()  # trials that started in this session of the study
        self._pending: deque[tuple[str, Callable[[], Any]]] = deque()
        self._dropped: list[str] = []
        # Trial id -> [running seconds of its earlier runs, of its current one]. Tune counts a trial's time
        # (`time_total_s`) from 0 again whenever it restarts it (at --resume, after a failure): our trials report
        # no Tune checkpoint (Ray Train keeps its own), so nothing carries the count over.
        self._running_s: dict[str, list[float]] = {}
        self.rows: list[StudyRow] = []
        self._start_sending()

    def _start_sending(self) -> None:
        self._retry_after = 0.0  # time.monotonic() before which the sender waits after a failure
        self._queue_changed = threading.Condition()
        self._sender: threading.Thread | None = None
        self._sending = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the Tuner: the sender thread and its lock stay with this process.
        with self._queue_changed:
            state = {**self.__dict__, "_pending": deque(self._pending)}
        for name in ("_queue_changed", "_sender", "_sending", "_retry_after"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._start_sending()
        _RESTORED[self._parent_run_id] = self

    @staticmethod
    def restored(parent_run_id: str) -> MLflowStudyCallback | None:
        """The copy `Tuner.restore` unpickled in this process for the study's parent run, if any: the one in
        effect in a resumed study (its state is the latest Tune saved)."""
        return _RESTORED.get(parent_run_id)

    def get_state(self) -> dict[str, Any]:
        """What Tune saves with the experiment (every second, `orchestrator.runner`) and gives back at resume."""
        return {"running_s": {trial_id: list(seconds) for trial_id, seconds in self._running_s.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        self._running_s = {trial_id: list(seconds) for trial_id, seconds in state.get("running_s", {}).items()}

    def _count_running_time(self, trial_id: str, result: Mapping[str, Any]) -> None:
        seconds = result.get("time_total_s")
        if seconds is not None:
            self._running_s[trial_id] = [self.trial_seconds(trial_id, result) - seconds, float(seconds)]

    def trial_seconds(self, trial_id: str, result: Mapping[str, Any]) -> float:
        """A trial's running time over all its runs (the study's sessions, restarts after failures), at
        `result`: its last result, or one just in that the callback has not counted yet (the budget's check)."""
        earlier, current = self._running_s.get(trial_id, [0.0, 0.0])
        seconds = result.get("time_total_s")
        if seconds is None:
            return earlier + current
        if seconds < current:  # Tune restarted the trial (its count began again at 0)
            return earlier + current + float(seconds)
        return earlier + float(seconds)

    @property
    def unlogged(self) -> list[str]:
        """What has not reached MLflow: calls still queued, then calls given up on, each with its reason."""
        with self._queue_changed:
            return [description for description, _ in self._pending] + self._dropped

    def _send_queued(self) -> bool:
        """Send queued calls in order until one fails for a reason a retry may fix (the server is still down:
        stop there, so one pass waits for at most one failed call). True when the queue is empty."""
        while True:
            with self._queue_changed:
                if not self._pending:
                    return True
                description, call = self._pending[0]
            try:
                call()
            except Exception as error:
                if not is_permanent(error):
                    self._retry_after = time.monotonic() + self._retry_interval_s
                    logger.warning("MLflow unavailable (%s); %d call(s) queued for later", first_line(error),
                                   len(self._pending))
                    return False
                self._dropped.append(f"{description}: {first_line(error)}")
                logger.warning("MLflow rejected %s: %s", description, error)
            with self._queue_changed:
                self._pending.popleft()

    def _send_in_background(self) -> None:
        while True:
            with self._queue_changed:
                while self._sending and (not self._pending or time.monotonic() < self._retry_after):
                    self._queue_changed.wait(timeout=max(self._retry_after - time.monotonic(), 0) or None)
                if not self._sending:
                    return
            self._send_queued()

    def flush(self) -> bool:
        """Stop the background sender (after the call it is making) and send what is queued now, once, in
        this thread. True when everything queued reached MLflow."""
        with self._queue_changed:
            self._sending = False
            self._queue_changed.notify_all()
        if self._sender is not None:
            self._sender.join()
            self._sender = None
        return self._send_queued()

    def _submit(self, description: str, call: Callable[[], Any]) -> None:
        with self._queue_changed:
            self._pending.append((description, call))
            if self._sender is None:
                self._sending = True
                self._sender = threading.Thread(target=self._send_in_background, name="satscale-mlflow-sender",
                                                daemon=True)
                self._sender.start()
            self._queue_changed.notify_all()

    def _params(self, trial: Trial) -> dict[str, Any]:
        return redact(self._trial_params(trial.config)) if trial.config else {}

    def _run_id(self, trial: Trial, restart: bool = False) -> str:
        # Resolved when first needed, so calls queued while the server was down still find their run. Only a
        # trial starting in this session marks its run running again; trials that ended in an earlier
        # session are looked up, not restarted.
        if trial.trial_id not in self._run_ids:
            self._run_ids[trial.trial_id] = self._tracker.trial_run(self._parent_run_id, trial.trial_id,
                                                                    self._params(trial), restart=restart)
        return self._run_ids[trial.trial_id]

    def _log_result(self, trial: Trial, result: Mapping[str, Any]) -> None:
        if not result:
            return
        epoch = _epochs_done(result) - 1
        metrics = {key: result[key] for key in self._metric_keys if key in result}
        self._submit(f"epoch {epoch} metrics of trial {trial.trial_id}",
                     lambda: self._tracker.log_epoch(self._run_id(trial), metrics, epoch))

    def _outcome(self, trial: Trial, failed: bool) -> tuple[TrialState, str | None]:
        if failed:
            return "failed", trial_failure_reason(trial)
        if trial.trial_id in self._started and not (trial.last_result or {}).get("done"):
            # Tune marks the last result of a trial that completed or that a scheduler stopped; one of this
            # session's trials it stopped because the study was interrupted goes on at --resume. (A trial restored
            # from an earlier session ended there; its restored last result carries no mark.)
            return "interrupted", None
        return _ended_state(trial.last_result or {}, self._params(trial), self._max_epochs), None

    def _conclude(self, trial: Trial, failed: bool) -> None:
        state, reason = self._outcome(trial, failed)
        self._concluded.add(trial.trial_id)
        seconds = self.trial_seconds(trial.trial_id, trial.last_result or {})
        spend = _trial_spend(self._trial_spend, trial.config, seconds)
        if spend is not None:
            self._submit(f"spend of trial {trial.trial_id}",
                         lambda: self._tracker.log_spend(self._run_id(trial), spend))
        self._submit(f"state {state!r} of trial {trial.trial_id}",
                     lambda: self._tracker.finish_trial(self._run_id(trial), state, reason))

    def _row(self, trial: Trial) -> StudyRow:
        state, reason = self._outcome(trial, trial.status == Trial.ERROR)
        return _study_row(trial.trial_id, self._params(trial), trial.last_result or {}, state, reason,
                          self._trial_cost(trial.config) if self._trial_cost and trial.config else None,
                          _trial_spend(self._trial_spend, trial.config,
                                       self.trial_seconds(trial.trial_id, trial.last_result or {})))

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._started.add(trial.trial_id)
        self._submit(f"run of trial {trial.trial_id}", lambda: self._run_id(trial, restart=True))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        self._count_running_time(trial.trial_id, result)
        self._log_result(trial, result)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._conclude(trial, failed=False)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._conclude(trial, failed=True)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        terminal = [trial for trial in trials if trial.status in (Trial.TERMINATED, Trial.ERROR)]
        # Trials that ended in an earlier session of a resumed study: make sure their runs say so.
        # Their last epoch is the only record left if their calls were lost with the earlier driver (a no-op
        # when it was logged).
        for trial in terminal:
            if trial.trial_id not in self._concluded:
                self._log_result(trial, trial.last_result or {})
                self._conclude(trial, failed=trial.status == Trial.ERROR)
        self.rows = [self._row(trial) for trial in terminal]
        if not self.flush() or self._dropped:
            message = f"{len(self.unlogged)} MLflow call(s) could not be logged: " + "; ".join(self.unlogged)
            logger.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
