"""A study as Ray Tune sees it: `param_space(study)` for `Tuner(param_space=...)` (or `OptunaSpace(study)`),
what a trial is as MLflow params (`trial_params`), and the study's summary for `--dry-run`. Back from a sampled
Tune config, the trial it describes is `study.trial_config(config)` (search_spaces.study).

Tune config keys (flat and readable):
    activation                           {"name": ..., "params": {...}}: one entry of search.activations
    compound_phi, compound_rule, compound_alpha, compound_beta, compound_gamma    search.scaling, mode compound
    depth_mult, width_mult, resolution                               search.scaling, mode direct
    train_attack.<field>, eval_attack.<field>, optimizer.<field>, epochs, seed

The activation is a conditional space: a `tune.grid_search`/`tune.choice` over dicts whose params may be
distributions themselves. Tune's BasicVariantGenerator (the default, random/grid search) resolves those;
Optuna needs a define-by-run function instead: `OptunaSpace(study)`.
"""
from __future__ import annotations

import json
import math
from typing import Any

from ray import tune

from search_spaces.study import ACTIVATION_KEY, ActivationEntry, StudyConfig
from trainers.activations import activation_params
from trainers.attacks import AttackConfig
from trainers.trial import TrialConfig


def param_space(study: StudyConfig) -> dict[str, Any]:
    """The `param_space` for `ray.tune.Tuner`: Tune search-space objects and fixed values."""
    space = {item.key: item.distribution.to_tune() for item in study.search.searched()}
    entries = study.search.activations
    if entries:
        options = [entry.value(lambda distribution, _: distribution.to_tune()) for entry in entries]
        sample = tune.grid_search if study.search.activation_sampling == "grid" else tune.choice
        space[ACTIVATION_KEY] = sample(options)
    return space


def trial_params(trial: TrialConfig) -> dict[str, str | float | int]:
    """What a trial is, as flat MLflow params. Scale values are effective (arch x multipliers x compound rule)."""
    model, train = trial.model, trial.train
    scale = model.scale
    accepted = {**activation_params(model.activation), **model.activation_params}
    return {
        "activation": model.activation,
        "arch": model.arch,
        "depth_mult": round(scale.depth_mult, 6),
        "width_mult": round(scale.width_mult, 6),
        "resolution": scale.resolution,
        "compound_phi": model.compound_phi,
        **_attack_params("train", train.train_attack),
        **_attack_params("eval", train.eval_attack),
        "lr": train.optimizer.lr,
        "schedule": train.optimizer.schedule,
        "epochs": train.epochs,
        "seed": train.seed,
        "global_batch_size": trial.global_batch_size,
        **{f"activation.{name}": _loggable(value) for name, value in sorted(accepted.items())},
    }


def _attack_params(prefix: str, attack: AttackConfig | None) -> dict[str, float | int]:
    # No attack (clean training or evaluation) logs as 0 steps, eps 0: the columns stay comparable.
    return {f"{prefix}_attack_steps": attack.steps if attack else 0, f"{prefix}_eps": attack.eps if attack else 0.0,
            f"{prefix}_step_size": attack.step_size if attack else 0.0,
            f"{prefix}_restarts": attack.restarts if attack else 0}


def _loggable(value: Any) -> str | float | int:
    if isinstance(value, (str, int, float)):
        return value
    return json.dumps(value, sort_keys=True)


def count_trials(study: StudyConfig) -> int:
    """How many trials Tune runs: the product of the grids, times num_samples."""
    grids = [item.distribution.grid_size for item in study.search.searched()]
    if study.search.activations and study.search.activation_sampling == "grid":
        grids.append(len(study.search.activations))
    return math.prod(grids) * study.tune.num_samples


def activation_labels(entries: list[ActivationEntry]) -> list[str]:
    """One readable, unique label per activation entry: `softplus(beta=uniform[1, 10])`."""
    labels = []
    for index, entry in enumerate(entries):
        params = ", ".join(f"{name}={value}" for name, value in entry.params.items())
        label = f"{entry.name}({params})" if params else entry.name
        labels.append(f"{label}#{index}" if label in labels else label)
    return labels


class OptunaSpace:
    """The define-by-run space for `OptunaSearch(space=...)`: Optuna cannot take the conditional activation space
    as Tune objects. Called with an Optuna trial, it returns the same config keys as `param_space`; the
    activation's params are asked under `activation.<entry index>.<param>` (extra keys that `trial_config`
    ignores). A plain object, not a closure: Tune saves its searcher's state by pickling it."""

    def __init__(self, study: StudyConfig) -> None:
        self.searched = study.search.searched()
        self.entries = study.search.activations or []
        self.labels = activation_labels(self.entries)

    def __call__(self, trial: Any) -> dict[str, Any]:
        config = {item.key: item.distribution.suggest(trial, item.key) for item in self.searched}
        if self.entries:
            index = self.labels.index(trial.suggest_categorical(ACTIVATION_KEY, self.labels))
            config[ACTIVATION_KEY] = self.entries[index].value(
                lambda distribution, name: distribution.suggest(trial, f"{ACTIVATION_KEY}.{index}.{name}"))
        return config


def describe_space(study: StudyConfig) -> str:
    """A multi-line summary for `--dry-run`: what is searched, the first trial's settings, data, Tune, trials."""
    search, settings = study.search, study.tune
    lines = [f"study {study.name}" + (f": {study.description.strip()}" if study.description else ""), "searched:"]
    if search.activations:
        lines.append(f"  {ACTIVATION_KEY} ({search.activation_sampling} over {len(search.activations)}): "
                     + " | ".join(activation_labels(search.activations)))
    lines += [f"  {item.key} ({item.path}): {item.distribution}" for item in search.searched()]
    if len(lines) == 2:
        lines.append("  nothing (every trial is the base)")
    first = study.trial_config(study.representative_sample())
    lines.append("first trial: " + ", ".join(f"{key}={value}" for key, value in trial_params(first).items()))
    lines.append(f"  data: {first.data.train_path} (train), {first.data.eval_path} (eval)"
                 + (f", converted from {study.dataset.source} before the study" if study.dataset else ""))
    lines.append(f"  workers: {first.workers.num_workers} x {first.workers.resources_per_worker()}, "
                 f"global_batch_size {first.global_batch_size}")
    scheduler = settings.scheduler
    if scheduler == "asha":
        asha = study.asha_settings()
        scheduler += (f" (grace_period {asha.grace_period}, reduction_factor {asha.reduction_factor:g}, "
                      f"max_t {asha.max_t})")
    lines.append(f"tune: {settings.mode} {settings.metric}, scheduler {scheduler}, searcher {settings.searcher}, "
                 f"num_samples {settings.num_samples}, max_concurrent_trials "
                 f"{settings.max_concurrent_trials or 'from the cluster'}")
    lines.append(f"trials: {count_trials(study)}")
    return "\n".join(lines)
