"""What each Tune trial actor runs: one trial as a Ray Train job, its reports flowing back to Tune.

Kept apart from `orchestrator.runner` because every trial actor imports this module to run `run_trial`: it
imports only what planning a trial needs (no converters, no FFCV, no MLflow); the data is read by the Train
workers.
"""
from __future__ import annotations

from typing import Any

from ray import tune
from ray.train.v2.api.exceptions import TrainingFailedError
from ray.tune.integration.ray_train import TuneReportCallback

from search_spaces.study import StudyConfig
from trainers.distributed import build_trainer


class TrialFailedError(RuntimeError):
    """A trial's Ray Train run failed; the message is the worker's error, not Ray's wrapper."""


def run_trial(config: dict[str, Any], study_values: dict[str, Any], storage_path: str) -> None:
    """Tune function trainable: one trial as a Ray Train job whose reports flow back to Tune."""
    study = StudyConfig.parse(study_values)
    trial = study.trial_config(config)
    name = f"{study.name}-train-{tune.get_context().get_trial_id()}"
    try:
        build_trainer(trial, storage_path, name, callbacks=[TuneReportCallback()]).fit()
    except TrainingFailedError as error:
        raise TrialFailedError(_root_cause(error)) from None


def _root_cause(error: BaseException) -> str:
    """The failing worker's own exception, type and first line (Ray wraps it: a WorkerGroupError holding each
    rank's failure, each a RayTaskError whose `cause` is the user's exception)."""
    prefix = ""
    worker_failures = getattr(error, "worker_failures", None)
    if worker_failures:
        rank, error = min(worker_failures.items(), key=lambda item: item[0])
        prefix = f"rank {rank}: "
    while (cause := getattr(error, "cause", None) or error.__cause__) is not None:
        error = cause
    message = str(error).strip().splitlines()
    return f"{prefix}{type(error).__name__}: {message[0] if message else ''}"
