"""Budget caps: a study stops spending once its `budget` block says so, and `--resume` with a larger one goes on.

Once the trials' spend (`orchestrator.costs`: CPU-hours, GPU-hours, dollars, over every trial of the study and all
its sessions) or this session's wall time reaches a cap:
- no trial starts (the scheduler chooses none),
- each running trial is paused at its next result, i.e. right after its next epoch checkpoint (a trial at its
  last epoch finishes instead),
- once none runs, the Tune run ends the way Ctrl-C ends it, through Tune's SIGUSR1 handler: its state is saved
  with the paused and pending trials unfinished, so `--resume` (with a larger budget: the block may change
  between sessions) continues them from their checkpoints, and the searcher makes the trials not yet started.

Tune restores its scheduler from the pickle made when the study first started, while the budget may differ at a
resume: the scheduler holds only the key of its study's `BudgetLedger`, which each session installs here with
the session's limits.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from orchestrator.costs import SECONDS_PER_HOUR, Spend, total_spend
from search_spaces.study import BudgetSettings


@dataclass
class BudgetLedger:
    """One session's budget and what the study has spent against it."""

    limits: BudgetSettings
    # (trial config, running seconds) -> Spend; (trial id, a result) -> the trial's running seconds over all its
    # runs (MLflowStudyCallback.trial_seconds); (trial config) -> the epochs it is to train.
    spend: Callable[[dict, float], Spend]
    trial_seconds: Callable[[str, Mapping[str, Any]], float]
    planned_epochs: Callable[[dict], int]
    started: float = field(default_factory=time.monotonic)
    # Trial id -> what it spends per running second (a trial's spend is linear in its time): its config is
    # parsed once, not at every scheduler call.
    _rates: dict[str, Spend] = field(default_factory=dict)
    spent_on: str | None = None  # the cap reached, as the reports say it
    ended: bool = False  # the session's Tune run was told to end
    unfinished: set[str] = field(default_factory=set)  # the trials it left for --resume

    def spent(self, trials: Iterable[Trial], current: tuple[Trial, Mapping[str, Any]] | None = None) -> Spend:
        """The spend of `trials`, each at its last result (or, for `current`'s trial, at the result just in)."""
        def result_of(trial: Trial) -> Mapping[str, Any]:
            return current[1] if current and trial is current[0] else (trial.last_result or {})

        def rate(trial: Trial) -> Spend:
            if trial.trial_id not in self._rates:
                self._rates[trial.trial_id] = self.spend(trial.config, 1.0)
            return self._rates[trial.trial_id]

        return total_spend(rate(trial).times(self.trial_seconds(trial.trial_id, result_of(trial)))
                           for trial in trials if trial.config)

    def reached(self, spend: Spend) -> str | None:
        """The first cap `spend` (and this session's wall time) reaches, e.g. `cpu_hours: 0.0123 of 0.01`."""
        session_hours = (time.monotonic() - self.started) / SECONDS_PER_HOUR
        for name, used in (("gpu_hours", spend.gpu_hours), ("cpu_hours", spend.cpu_hours), ("usd", spend.usd),
                           ("wall_hours", session_hours)):
            limit = getattr(self.limits, name)
            if limit is not None and used >= limit:
                return f"{name}: {used:.4g} of {limit:g}"
        return None

    def check(self, trials: Iterable[Trial], current: tuple[Trial, Mapping[str, Any]] | None = None) -> bool:
        """Whether a cap is reached (remembered: once reached, the session spends no more)."""
        if self.spent_on is None and self.limits.capped:
            self.spent_on = self.reached(self.spent(trials, current))
        return self.spent_on is not None


_LEDGERS: dict[str, BudgetLedger] = {}


def install_ledger(key: str, ledger: BudgetLedger) -> None:
    _LEDGERS[key] = ledger


def take_ledger(key: str) -> BudgetLedger | None:
    """The session's ledger, removed (after the Tune run)."""
    return _LEDGERS.pop(key, None)


class _BudgetGate:
    """Mixed into Tune's schedulers: their decisions, until the study's budget is spent."""

    budget_key: str

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        ledger = _LEDGERS.get(self.budget_key)
        if decision != TrialScheduler.CONTINUE or ledger is None:
            return decision
        last_epoch = int(result.get("epoch", -1)) + 1 >= ledger.planned_epochs(trial.config)
        if not last_epoch and ledger.check(tune_controller.get_trials(), (trial, result)):
            return TrialScheduler.PAUSE
        return decision

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        ledger = _LEDGERS.get(self.budget_key)
        trials = tune_controller.get_trials()
        if ledger is None or not ledger.check(trials):
            return super().choose_trial_to_run(tune_controller)  # type: ignore[misc]
        if not ledger.ended and not any(trial.status == Trial.RUNNING for trial in trials):
            ledger.ended = True
            ledger.unfinished = {trial.trial_id for trial in trials
                                 if trial.status not in (Trial.TERMINATED, Trial.ERROR)}
            _end_tune_run()
        return None


def _end_tune_run() -> None:
    """End the Tune run as SIGUSR1 does (state saved, unfinished trials resumable). Tune's handler is installed
    only when the run is driven from the main thread; without it SIGUSR1 would end the process."""
    if callable(signal.getsignal(signal.SIGUSR1)):
        os.kill(os.getpid(), signal.SIGUSR1)
    else:
        raise RuntimeError("the study's budget is spent, but its Tune run cannot be ended resumably from a thread "
                           "other than the main one; run the study from the main thread")


class BudgetedFIFO(_BudgetGate, FIFOScheduler):
    def __init__(self, budget_key: str) -> None:
        super().__init__()
        self.budget_key = budget_key


class BudgetedASHA(_BudgetGate, ASHAScheduler):
    def __init__(self, budget_key: str, **asha: Any) -> None:
        super().__init__(**asha)
        self.budget_key = budget_key
