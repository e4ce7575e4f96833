"""Run a study: Ray Tune over trials, each trial a Ray Train job, everything mirrored into MLflow.

study config -> search space (`search_spaces`) -> trial config -> Ray Train loop (`trainers.distributed`)
-> per-epoch reports + checkpoints -> Tune (ASHA / Optuna) -> MLflow (`orchestrator.tracking`) -> reports.

Each Tune trial is a small function trainable (`orchestrator.trial_driver.run_trial`) that drives one
`TorchTrainer` (the Tune + Train pattern of Ray 2.60's Train V2): its Train run is named after the trial id, so
a restored Tune study resumes each unfinished trial from its last Train checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import pickle
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune
from ray.train import Checkpoint
from ray.tune.execution import class_cache
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.search.basic_variant import BasicVariantGenerator

from cluster import TRIAL_DRIVER_RESOURCE
from orchestrator.budget import BudgetedASHA, BudgetedFIFO, BudgetLedger, install_ledger, take_ledger
from orchestrator.console import ConsoleSettings
from orchestrator.costs import Spend, total_spend, trial_spend
from orchestrator.model_registry import model_tags
from orchestrator.preflight import check_study_inputs, cluster_capacity, pending_conversions, save_study
from orchestrator.reports import StudyRow, leaderboard, write_reports
from orchestrator.tracking import MLflowStudyCallback, StudyTracker, is_permanent, study_rows, ui_url
from orchestrator.trial_driver import run_trial
from search_spaces.space import OptunaSpace, count_trials, param_space, trial_params
from search_spaces.study import StudyConfig
from trainers.checkpoint import load_training_state
from trainers.data.convert import convert
from trainers.errors import StudyInterrupted, first_line
from trainers.models import ModelConfig, build_model_from_config
from trainers.trial import TrialConfig

logger = logging.getLogger(__name__)

# A trial's Tune driver only waits on its Train workers, so it holds no CPU: a CPU per driver deadlocks small
# clusters (drivers hold every CPU, no worker group can be placed) and halves concurrency on a laptop. Ray
# needs some non-zero resource per bundle: a token of memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1 << 20}


# Ray Tune copies these from the driver's environment into every trial actor's runtime_env, which Ray logs in
# plain text (runtime_env_agent.log) and keeps in the cluster's task metadata. Nodes use their own AWS
# configuration instead (instance roles, profiles); a local Ray inherits the driver's environment anyway.
CREDENTIAL_VARIABLES = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


def _keep_credentials_out_of_trial_runtime_envs() -> None:
    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - CREDENTIAL_VARIABLES


@dataclass(frozen=True)
class StudyOutcome:
    rows: list[StudyRow]
    parent_run_id: str
    experiment_path: str
    best_model_uri: str | None
    logs_dir: Path | None = None  # where the console view sent Ray's and the libraries' logs
    mlflow_url: str | None = None  # the study's training runs in MLflow's UI
    budget_note: str | None = None  # set when the study's budget ended this session (resumable)


def prepare_datasets(study: StudyConfig) -> None:
    """Convert the study's `dataset` block to .beton files once; later runs reuse files their manifest vouches
    for."""
    for conversion in pending_conversions(study):  # convert replaces a stale or partial file atomically
        print(f"converting {conversion.source}:{conversion.split} -> {conversion.path}", flush=True)
        convert(conversion.source, Path(conversion.path),
                input_dir=Path(conversion.input_dir) if conversion.input_dir else None, split=conversion.split,
                limit=conversion.limit)


def trial_driver_resources(capacity: Mapping[str, float]) -> dict[str, float]:
    """What one trial's Tune driver asks for, given the cluster's resources at its largest: on a cluster that
    offers trial-driver slots, one of them too."""
    if capacity.get(TRIAL_DRIVER_RESOURCE):
        return {**TRIAL_DRIVER_RESOURCES, TRIAL_DRIVER_RESOURCE: 1}
    return dict(TRIAL_DRIVER_RESOURCES)


def max_concurrent_trials(study: StudyConfig, capacity: Mapping[str, float]) -> int:
    """As many trials as the cluster can place at once at its largest (`capacity`: with an autoscaler, its node
    types at their max counts; Tune queues the rest), from each trial's driver slot and worker group."""
    if study.tune.max_concurrent_trials:
        return study.tune.max_concurrent_trials
    workers = TrialConfig.parse(study.base_values()).workers
    per_trial = {name: workers.num_workers * need for name, need in workers.resources_per_worker().items()}
    driver = trial_driver_resources(capacity)
    if TRIAL_DRIVER_RESOURCE in driver:
        per_trial[TRIAL_DRIVER_RESOURCE] = driver[TRIAL_DRIVER_RESOURCE]
    fits = [math.floor(capacity.get(name, 0) / need) for name, need in per_trial.items()]
    return max(1, min(fits))


def _scheduler(study: StudyConfig, budget_key: str):
    """FIFO or ASHA, gated by the study's budget (always: a budget may be set at a later --resume)."""
    if study.tune.scheduler == "fifo":
        return BudgetedFIFO(budget_key)
    asha = study.asha_settings()
    # One report per epoch, so Tune's training_iteration counts epochs.
    return BudgetedASHA(budget_key, time_attr="training_iteration", max_t=asha.max_t,
                        grace_period=asha.grace_period, reduction_factor=asha.reduction_factor)


def build_searcher(study: StudyConfig, concurrent: int):
    """The search algorithm, seeded from `tune.seed`: the same study samples the same configurations. Tune's
    own generator takes the concurrency limit itself (Tune ignores max_concurrent_trials beside one)."""
    if study.tune.searcher == "random":
        return BasicVariantGenerator(random_state=study.tune.seed, max_concurrent=concurrent)
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space=OptunaSpace(study), metric=study.tune.metric, mode=study.tune.mode,
                        seed=study.tune.seed)


def _trainable(study: StudyConfig, storage_path: str, capacity: Mapping[str, float]):
    return tune.with_resources(
        tune.with_parameters(run_trial, study_values=study.model_dump(mode="json"), storage_path=storage_path),
        trial_driver_resources(capacity))


def build_tuner(study: StudyConfig, storage_path: str, results_path: str, callbacks: list[tune.Callback],
                resume: bool, verbose: int | None = None) -> tune.Tuner:
    """A new Tuner writing to `results_path`, or with `resume` the interrupted one there (finished trials are
    kept, unfinished ones go on; its callbacks and verbosity are the ones saved with it). `verbose`: Tune's own
    output (None: Tune's default, 0: none, as under the live view)."""
    capacity = cluster_capacity().totals
    trainable = _trainable(study, storage_path, capacity)
    if resume:
        return tune.Tuner.restore(results_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    concurrent = max_concurrent_trials(study, capacity)
    searcher = build_searcher(study, concurrent)
    return tune.Tuner(
        trainable,
        # Optuna asks its define-by-run space; the basic generator resolves Tune's param_space.
        param_space={} if study.tune.searcher == "optuna" else param_space(study),
        # Reusing trial actors: a trial after the first in each slot skips its actor's process start and imports.
        tune_config=tune.TuneConfig(metric=study.tune.metric, mode=study.tune.mode,
                                    scheduler=_scheduler(study, results_path), search_alg=searcher,
                                    num_samples=study.tune.num_samples, reuse_actors=True,
                                    max_concurrent_trials=None if study.tune.searcher == "random" else concurrent),
        run_config=tune.RunConfig(name=results_path.rsplit("/", 1)[-1], storage_path=storage_path,
                                  callbacks=callbacks, verbose=verbose),
    )


@functools.lru_cache(maxsize=256)
def _flops_per_image(model_json: str) -> float:
    return float(build_model_from_config(ModelConfig.model_validate_json(model_json)).cost().flops)


def _study_functions(study: StudyConfig):
    """Trial config -> MLflow params, -> cost (FLOPs per image), and (with its wall seconds) -> what it spent,
    as the tracker wants them."""
    def params(config: dict) -> dict[str, Any]:
        return trial_params(study.trial_config(config))

    def cost(config: dict) -> float:
        return _flops_per_image(study.trial_config(config).model.model_dump_json())

    def spend(config: dict, wall_s: float) -> Spend:
        return trial_spend(study.trial_config(config), wall_s, study.cost)

    return params, cost, spend


def _models_to_log(rows: list[StudyRow], results, storage_path: str, which: str
                   ) -> list[tuple[StudyRow, TrainedTrial]]:
    """The final models `tracking.models` asks for, best first: the best trial's, or every trial's that ended
    without error and has accuracies (loaded from its last checkpoint); none when no trial got there. A trial
    the budget paused has not ended: its model is logged when it does."""
    ranked = [row for row in leaderboard(rows) if row.state in ("finished", "stopped_early")
              and row.robust_acc is not None]
    wanted = {"best": ranked[:1], "finished": ranked, "none": []}[which]
    checkpoints = {(result.metrics or {}).get("trial_id"): (result.metrics or {}).get(CHECKPOINT_PATH_KEY)
                   for result in results}
    return [(row, load_trial_model(checkpoints[row.trial_id], storage_path)) for row in wanted
            if checkpoints.get(row.trial_id)]


@dataclass(frozen=True)
class TrainedTrial:
    """A trial's config, its model (eval mode, CPU) and the last epoch it trained, from a Train checkpoint."""

    trial: TrialConfig
    model: Any
    epoch: int


def load_trial_model(checkpoint_path: str, storage_path: str) -> TrainedTrial:
    """The trial saved in one of its Train checkpoints (local, or under s3:// storage)."""
    filesystem = pyarrow.fs.FileSystem.from_uri(storage_path)[0] if "://" in storage_path else None
    with Checkpoint(checkpoint_path, filesystem=filesystem).as_directory() as directory:
        state = load_training_state(Path(directory))
    trial = TrialConfig.parse(state["trial"])
    model = build_model_from_config(trial.model)
    model.load_state_dict(state["model"])
    return TrainedTrial(trial, model.eval(), int(state["epoch"]))


# Tune saves its experiment state at most every 10 s by default; a driver killed inside that window would
# restart trials that had already finished. Saving every second costs little at study scale.
EXPERIMENT_STATE_PERIOD_S = "1"
# Ray Train's controller polls its workers every 2 s by default, so each epoch's report reaches Tune up to 2 s late
# and a trial's end up to 4 s; polling at 0.5 s costs a few small calls per second per trial. Ray propagates the
# variable from this driver to every trial's controller and workers.
TRAIN_POLL_INTERVAL_S = "0.5"


@contextlib.contextmanager
def tune_interruption() -> Iterator[Callable[[], bool]]:
    """Around `Tuner.fit()`: whether Tune was interrupted (Ctrl-C, SIGUSR1), since it then returns normally,
    having saved its state. Tune installs its own SIGINT handler for the fit (main thread only) and, when it
    fires, puts back the one before it; otherwise its handler stays installed, and is taken back out here."""
    watching = threading.current_thread() is threading.main_thread() and not int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    before = signal.getsignal(signal.SIGINT)
    outcome = {"interrupted": False}
    try:
        yield lambda: outcome["interrupted"]
    finally:
        if watching:
            outcome["interrupted"] = signal.getsignal(signal.SIGINT) is before
            signal.signal(signal.SIGINT, before)


class TrackingUnavailableError(RuntimeError):
    """Every trial ended, but MLflow could not take the study's last records (reports, best model, the parent
    run's end) within the tracker's bounded retries. Nothing is lost: the Tune results hold every epoch, and
    `--resume` logs what is missing once MLflow is back."""

    def __init__(self, rows: list[StudyRow], tracking_uri: str, error: Exception, results_path: str) -> None:
        self.rows = rows
        super().__init__(
            f"the study's {len(rows)} trial(s) ended, but MLflow at {tracking_uri} is unreachable "
            f"({first_line(error)}): its "
            f"reports, best model and end were not logged. Every trial's results are in {results_path}; when "
            "MLflow is back, run the same command with --resume to log them (no trial runs again)")


def run_study(study: StudyConfig, storage_path: str, tracking_uri: str, resume: bool = False,
              console: ConsoleSettings | None = None, shared_storage: bool = False) -> StudyOutcome:
    """Run (or with `resume`, continue) `study` on the connected Ray cluster; returns its report rows. With
    `console`, the live view of `orchestrator.console` shows it on the terminal (the command line's way)."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", EXPERIMENT_STATE_PERIOD_S)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_INTERVAL_S)
    # Before anything is converted, tracked or stored.
    results_path = check_study_inputs(study, storage_path, resume, shared_storage)
    _keep_credentials_out_of_trial_runtime_envs()
    params, cost, spend = _study_functions(study)
    callbacks, logs_dir = console.start(study, results_path, params) if console else ([], None)
    prepare_datasets(study)
    if not resume:
        save_study(study, results_path)
    tracker = StudyTracker(tracking_uri, experiment_name=study.name)
    parent_run_id = tracker.start_study(study.name, results_path,
                                        params={"study": study.name, **_study_summary(study)},
                                        tags={"satscale.description": study.description}, resume=resume)
    callback = MLflowStudyCallback(tracker, parent_run_id, params, cost, max_epochs=study.max_epochs(),
                                   trial_spend=spend)
    tuner = build_tuner(study, storage_path, results_path, [callback, *callbacks], resume,
                        verbose=console.tune_verbosity if console else None)
    # A resumed Tuner brought back its own copy of the callback: the one in effect, which counts trial time.
    in_effect = (MLflowStudyCallback.restored(parent_run_id) if resume else None) or callback
    install_ledger(results_path, BudgetLedger(study.budget, spend, in_effect.trial_seconds,
                                              lambda config: study.trial_config(config).train.epochs))
    try:
        with console.tune_output_to(logs_dir) if console else contextlib.nullcontext(), \
                tune_interruption() as interrupted:
            results = tuner.fit()
        ledger = take_ledger(results_path)
        if interrupted() and not (ledger and ledger.ended):  # the budget ends the run through Tune's handler too
            raise StudyInterrupted(results_path)
        rows = study_rows(results, params, cost, study.max_epochs(), spend, in_effect.trial_seconds)
        rows, budget_note = _budget_outcome(study, rows, ledger)
        callback.flush()
        try:
            best_model_uri = _log_study_end(tracker, parent_run_id, study, rows, results, storage_path,
                                            budget_note)
        except Exception as error:
            if is_permanent(error):
                raise
            raise TrackingUnavailableError(rows, tracking_uri, error, results_path) from None
    except TrackingUnavailableError:
        raise
    except BaseException as error:
        _end_parent_after(tracker, parent_run_id, error)
        if isinstance(error, KeyboardInterrupt):
            raise StudyInterrupted(results_path) from None  # a second Ctrl-C, during Tune's last save
        raise
    finally:
        take_ledger(results_path)
    return StudyOutcome(rows, parent_run_id, results_path, best_model_uri, logs_dir,
                        ui_url(tracking_uri, tracker.experiment_id), budget_note)


def _budget_outcome(study: StudyConfig, rows: list[StudyRow], ledger: BudgetLedger | None
                    ) -> tuple[list[StudyRow], str | None]:
    """When the budget ended the session: the trials it left (paused at a checkpoint, or never started) marked
    `budget`, and the line the reports and the console say it with; else the rows as they are and None."""
    if ledger is None or not ledger.ended:
        return rows, None
    rows = [replace(row, state="budget") if row.trial_id in ledger.unfinished else row for row in rows]
    stopped = sum(row.state == "budget" and row.epochs > 0 for row in rows)
    not_run = sum(row.state == "budget" and row.epochs == 0 for row in rows) + max(
        count_trials(study) - len(rows), 0)
    return rows, (f"Budget spent ({ledger.spent_on}): {stopped} trial(s) stopped at an epoch checkpoint, "
                  f"{not_run} not run. Continue with --resume and a larger budget block.")


def _end_parent_after(tracker: StudyTracker, parent_run_id: str, error: BaseException) -> None:
    """The parent run tells the truth when the study stops on an error: interrupted (KILLED, resumable with
    --resume) after Ctrl-C, failed otherwise. Best effort: MLflow may be what failed."""
    try:
        tracker.finish_study(parent_run_id, "interrupted" if isinstance(error, (KeyboardInterrupt, StudyInterrupted))
                             else "failed")
    except Exception as tracking_error:
        logger.warning("could not mark the study's parent run ended: %s", first_line(tracking_error))


def _log_study_end(tracker: StudyTracker, parent_run_id: str, study: StudyConfig, rows: list[StudyRow], results,
                   storage_path: str, budget_note: str | None = None) -> str | None:
    """Reports and the final models to MLflow, then the parent run ends (as `budget_spent` with a budget note);
    returns the best model's URI (its registered version). With `tracking.models: finished` every ended trial's
    model goes to its own run too."""
    with tempfile.TemporaryDirectory(prefix="satscale-reports-") as directory:
        write_reports(rows, Path(directory), [budget_note] if budget_note else [])
        tracker.log_reports(parent_run_id, Path(directory))
    tracker.log_spend(parent_run_id, total_spend(row.spend for row in rows), prefix="total_")
    try:
        models = _models_to_log(rows, results, storage_path, study.tracking.models)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as error:  # every trial is recorded already
        print(f"scale_study: warning: a trial's last checkpoint could not be loaded ({first_line(error)}); "
              "no model is logged", file=sys.stderr, flush=True)
        models = []
    best_model_uri = None
    for rank, (row, trained) in enumerate(models):
        tags = model_tags(study.name, row, trained.trial)
        if rank == 0:
            best_model_uri = tracker.log_model(parent_run_id, trained.model, tags, name="best_model", register=True)
        if study.tracking.models == "finished":
            trial_run_id = tracker.trial_run(parent_run_id, row.trial_id, row.params, restart=False)
            tracker.log_model(trial_run_id, trained.model, tags)
    tracker.finish_study(parent_run_id, "budget_spent" if budget_note else "finished")
    return best_model_uri


def _study_summary(study: StudyConfig) -> dict[str, Any]:
    return {"num_samples": study.tune.num_samples, "scheduler": study.tune.scheduler,
            "searcher": study.tune.searcher, "metric": study.tune.metric, "max_epochs": study.max_epochs()}
