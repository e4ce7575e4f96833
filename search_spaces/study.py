"""A study: the settings every trial shares (`base`), what is searched (`search`), how Tune runs it (`tune`) and
where the data comes from (`dataset`).

A study file is validated in full before anything starts: its structure (unknown keys answered with the
accepted ones), every distribution, and every searched value in a complete trial config (`TrialConfig`), so a
bad value surfaces at load time with its path in the file, e.g. `search.activations[1].params.beta`.

Back from a sampled Tune config (search_spaces.space builds Tune's space from this schema), the trial it
describes is `study.trial_config(config)`: `base` with the sampled values set in place.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, create_model, field_validator,
                      model_validator)

from cluster.pricing import NODE_PRICES_USD_PER_HOUR, aws_node_types
from search_spaces.distributions import Distribution, Grid, parse_distribution
from search_spaces.paths import set_path
from trainers.activations import ACTIVATIONS, build_activation
from trainers.attacks import AttackConfig
from trainers.data.sources import SOURCE_FORMATS
from trainers.errors import ConfigError, one_of, validated
from trainers.models.efficientnet import ALPHA, BETA, COMPOUND_RULES, GAMMA
from trainers.trial import TrialConfig
from trainers.training import OBJECTIVES, OptimizerConfig, objectives

PRESETS_DIR = Path(__file__).parent / "presets"
# EfficientNet's compound-scaling constraint: doubling FLOPs per unit of phi (alpha * beta**2 * gamma**2 = 2).
FLOPS_GROWTH, FLOPS_GROWTH_TOLERANCE = 2.0, 0.1

_STRICT = ConfigDict(extra="forbid", frozen=True)

# A sampled Tune config's keys (flat and readable, see search_spaces.space) -> where they go in a TrialConfig.
ACTIVATION_KEY = "activation"
TRIAL_PATHS = {
    "train_attack": "train.train_attack", "eval_attack": "train.eval_attack", "optimizer": "train.optimizer",
    "epochs": "train.epochs", "seed": "train.seed",
    "depth_mult": "model.depth_mult", "width_mult": "model.width_mult", "resolution": "model.resolution",
    "compound_phi": "model.compound_phi", "compound_alpha": "model.compound_alpha",
    "compound_beta": "model.compound_beta", "compound_gamma": "model.compound_gamma",
}
COMPOUND_COEFFICIENTS = ("compound_alpha", "compound_beta", "compound_gamma")

# A study-file value: fixed, or a distribution (see search_spaces.distributions); dumps back to file syntax.
Param = Annotated[Distribution, PlainValidator(parse_distribution), PlainSerializer(lambda value: value.to_spec())]


@dataclass(frozen=True)
class Searched:
    """One searched setting: its Tune config key, its path in the study file, and its distribution."""

    key: str
    path: str
    distribution: Distribution


class _Space(BaseModel):
    model_config = _STRICT

    def given(self) -> dict[str, Distribution]:
        """The settings this block sets, in field order."""
        return {name: value for name in type(self).model_fields
                if isinstance(value := getattr(self, name), Distribution)}


def _space_of(config: type[BaseModel]) -> type[_Space]:
    """A block accepting any field of `config`, each a value or a distribution (checked against `config`
    once the block is merged with `base`)."""
    fields: dict[str, Any] = {name: (Param | None, None) for name in config.model_fields}
    return create_model(f"{config.__name__.removesuffix('Config')}Space", __base__=_Space, **fields)


AttackSpace = _space_of(AttackConfig)
OptimizerSpace = _space_of(OptimizerConfig)


class ActivationEntry(BaseModel):
    """One activation of the search (`relu` is short for `{name: relu}`), with parameters where it takes them."""

    model_config = _STRICT

    name: str
    params: dict[str, Param] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return one_of(name, ACTIVATIONS, "activation")

    def value(self, pick: Callable[[Distribution, str], Any]) -> dict[str, Any]:
        """The config value of this entry, each parameter resolved by `pick(distribution, name)`."""
        return {"name": self.name, "params": {name: pick(value, name) for name, value in self.params.items()}}

    @field_validator("params")
    @classmethod
    def _no_grid(cls, params: dict[str, Distribution]) -> dict[str, Distribution]:
        # The activation list is itself the grid (or choice); a grid nested inside would make the trial count
        # depend on which activation is drawn.
        grids = sorted(name for name, value in params.items() if isinstance(value, Grid))
        if grids:
            raise ValueError(f"grid is not available for activation params {grids}: list the activation once "
                             "per value instead, or use choice/uniform/...")
        return params


SCALING_FIELDS = {"compound": ("phi", "rule", "alpha", "beta", "gamma"),
                  "direct": ("depth_mult", "width_mult", "resolution")}


class ScalingSpace(_Space):
    """`compound`: EfficientNet's phi, with a named `rule` (EfficientNet's, or depth, width or resolution
    alone at the same FLOPs growth) or the study's own alpha, beta, gamma; `direct`: the multipliers and
    resolution themselves (ResNets: depth and width)."""

    mode: Literal["compound", "direct"]
    phi: Param | None = None
    rule: Param | None = None
    alpha: Param | None = None
    beta: Param | None = None
    gamma: Param | None = None
    depth_mult: Param | None = None
    width_mult: Param | None = None
    resolution: Param | None = None

    @model_validator(mode="after")
    def _fields_match_mode(self) -> ScalingSpace:
        accepted = SCALING_FIELDS[self.mode]
        misplaced = sorted(set(self.given()) - set(accepted))
        if misplaced:
            raise ValueError(f"mode {self.mode!r} takes {list(accepted)}; remove {misplaced}")
        if self.mode == "compound" and self.phi is None:
            raise ValueError("mode 'compound' needs phi")
        if self.mode == "direct" and not self.given():
            raise ValueError(f"mode 'direct' needs at least one of {list(accepted)}")
        if self.mode == "compound":
            if self.rule is not None:
                _check_rules(self.rule, given=[name for name in ("alpha", "beta", "gamma") if getattr(self, name)])
            _check_flops_growth(self.alpha, self.beta, self.gamma)
        return self


def _check_rules(rule: Distribution, given: list[str]) -> None:
    if given:
        raise ValueError(f"rule sets alpha, beta and gamma; remove {given} or remove rule")
    for name in rule.candidates():
        if name not in COMPOUND_RULES:
            raise ValueError(f"rule {name!r} is unknown; use one of {sorted(COMPOUND_RULES)}")


def _check_flops_growth(*given: Distribution | None) -> None:
    """alpha * beta**2 * gamma**2 within 10% of 2 for every combination of candidate values. The product grows
    with each factor, so checking the ends of each range covers everything in between."""
    if all(value is None for value in given):
        return
    options = [value.candidates() if value else (default,) for value, default in zip(given, (ALPHA, BETA, GAMMA))]
    for alpha, beta, gamma in itertools.product(*options):
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in (alpha, beta, gamma)):
            raise ValueError(f"alpha, beta and gamma must be positive numbers; got {alpha!r}, {beta!r}, {gamma!r}")
        growth = alpha * beta**2 * gamma**2
        if abs(growth - FLOPS_GROWTH) > FLOPS_GROWTH_TOLERANCE * FLOPS_GROWTH:
            raise ValueError(
                f"alpha * beta**2 * gamma**2 must be within {FLOPS_GROWTH_TOLERANCE:.0%} of {FLOPS_GROWTH} "
                f"(EfficientNet's constraint, accepted: {FLOPS_GROWTH * (1 - FLOPS_GROWTH_TOLERANCE):g} to "
                f"{FLOPS_GROWTH * (1 + FLOPS_GROWTH_TOLERANCE):g}); alpha={alpha}, beta={beta}, gamma={gamma} "
                f"give {growth:.3g}")


class SearchSpace(_Space):
    """What varies between trials. Every block is optional; each setting is a value or a distribution."""

    activations: list[ActivationEntry] | None = Field(None, min_length=1)
    # grid: every activation (times the other grids); choice: one drawn per trial.
    activation_sampling: Literal["grid", "choice"] = "grid"
    scaling: ScalingSpace | None = None
    train_attack: AttackSpace | None = None  # type: ignore[valid-type]
    eval_attack: AttackSpace | None = None  # type: ignore[valid-type]
    optimizer: OptimizerSpace | None = None  # type: ignore[valid-type]
    epochs: Param | None = None
    seed: Param | None = None

    def searched(self) -> list[Searched]:
        """Every setting except the activation, keyed as in the Tune config (flat, readable keys)."""
        found = [Searched(name, f"search.{name}", value) for name, value in self.given().items()]  # epochs, seed
        if self.scaling:
            prefix = "compound_" if self.scaling.mode == "compound" else ""
            found += [Searched(f"{prefix}{name}", f"search.scaling.{name}", value)
                      for name, value in self.scaling.given().items()]
        for block in ("train_attack", "eval_attack", "optimizer"):
            space: _Space | None = getattr(self, block)
            found += [Searched(f"{block}.{name}", f"search.{block}.{name}", value)
                      for name, value in (space.given() if space else {}).items()]
        return found


class AshaSettings(BaseModel):
    """ASHA's rungs, in epochs (one result per epoch). Unset values follow the trial's epochs."""

    model_config = _STRICT

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="default: the largest number of epochs a trial can run")


class TuneSettings(BaseModel):
    model_config = _STRICT

    num_samples: int = Field(1, ge=1, description="samples per grid point")
    metric: str = Field("robust_acc", min_length=1)
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaSettings = AshaSettings()
    searcher: Literal["random", "optuna"] = "random"
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the cluster fits")
    seed: int = Field(0, ge=0, description="seed of the searcher's sampling (random and Optuna)")


class CostSettings(BaseModel):
    """How a study's spend is priced (`orchestrator.costs`): per node type, cluster/aws.yaml's by default."""

    model_config = _STRICT

    node_prices_usd_per_hour: dict[str, float] = Field(
        default_factory=dict, description="USD per node-hour for any of cluster/aws.yaml's node types, over the "
        "defaults in cluster/pricing.py")
    node_type: str | None = Field(None, description="the node type whose price trials pay (default: gpu_1x for "
                                  "GPU trials, gpu_8x for A100 ones, cpu for CPU trials)")

    @field_validator("node_prices_usd_per_hour")
    @classmethod
    def _known_priced_types(cls, prices: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(prices) - set(NODE_PRICES_USD_PER_HOUR))
        if unknown:
            raise ValueError(f"unknown node type(s) {', '.join(unknown)}; accepted (cluster/aws.yaml): "
                             f"{', '.join(sorted(NODE_PRICES_USD_PER_HOUR))}")
        for name, price in prices.items():
            if not (math.isfinite(price) and price >= 0):
                raise ValueError(f"{name}: a price is a finite number of USD per hour >= 0, got {price}")
        return prices

    @field_validator("node_type")
    @classmethod
    def _known_node_type(cls, node_type: str | None) -> str | None:
        if node_type is None:
            return None
        trial_nodes = [name for name, node in aws_node_types().items() if node.trains]
        return one_of(node_type, trial_nodes, "node type that runs trials (cluster/aws.yaml)")

    def prices(self) -> dict[str, float]:
        return {**NODE_PRICES_USD_PER_HOUR, **self.node_prices_usd_per_hour}


class BudgetSettings(BaseModel):
    """What a study may spend (`orchestrator.budget`); any cap reached ends the session resumably. Free to change
    at --resume: a larger budget continues where the last one stopped."""

    model_config = _STRICT

    cpu_hours: float | None = Field(None, gt=0, description="CPU-hours of all trials, all sessions")
    gpu_hours: float | None = Field(None, gt=0, description="GPU-hours of all trials, all sessions")
    usd: float | None = Field(None, gt=0, description="estimated dollars of all trials (the cost block's prices)")
    wall_hours: float | None = Field(None, gt=0, description="wall time of this session (each run or --resume)")

    @property
    def capped(self) -> bool:
        return any(value is not None for value in (self.cpu_hours, self.gpu_hours, self.usd, self.wall_hours))


class TrackingSettings(BaseModel):
    """What a study leaves in MLflow besides its runs, metrics and reports."""

    model_config = _STRICT

    models: Literal["best", "finished", "none"] = Field(
        "best", description="best: the best trial's final model as an MLflow Model under the study's parent run, "
        "registered under the study's name (alias best); finished: also every trial that ended without error, its "
        "final model under its own run; none: no model (large models, slow uploads)")


@dataclass(frozen=True)
class Conversion:
    """One `trainers.data.convert.convert(source, path, input_dir=..., split=..., limit=...)` call."""

    source: str
    split: str
    input_dir: str | None
    limit: int | None
    path: str


class DatasetSpec(BaseModel):
    """Data the orchestrator converts to .beton once, before the study (skipped when the files exist).
    Without this block, `base.data` names existing .beton files (or s3:// URIs) itself."""

    model_config = _STRICT

    source: str
    input_dir: str | None = Field(None, description="default: where the source's data lies (Fashion-MNIST: "
                                  "Debian's folder; digits: bundled)")
    eval_input_dir: str | None = Field(None, description="default: input_dir; image-folder needs its own")
    train_split: str | None = Field(None, description="default: the source's first split")
    eval_split: str | None = Field(None, description="default: 'test' where the source has one")
    # A seeded, class-balanced subset of N samples of each split (convert's `limit`): small, fast studies.
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    cache_dir: str = "satscale_data"

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        return one_of(source, SOURCE_FORMATS, "source")

    @field_validator("input_dir", "eval_input_dir", "cache_dir")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        # Trials run in other working directories (Ray changes them): resolve against the loader's.
        return None if path is None else str(Path(path).expanduser().resolve())

    @model_validator(mode="after")
    def _splits_exist(self) -> DatasetSpec:
        splits = SOURCE_FORMATS[self.source].splits
        train, evaluation = self.conversions()
        for name, conversion in (("train_split", train), ("eval_split", evaluation)):
            if conversion.split not in splits:
                raise ValueError(f"{name}: {self.source} has no split {conversion.split!r}; accepted: {list(splits)}")
        if (train.split, train.input_dir) == (evaluation.split, evaluation.input_dir):
            raise ValueError(f"train and eval would read the same data ({self.source} split {train.split!r}); "
                             "set eval_split or eval_input_dir")
        return self

    def conversions(self) -> tuple[Conversion, Conversion]:
        """The train and eval conversions, with the .beton paths the trials read."""
        splits = SOURCE_FORMATS[self.source].splits
        eval_split = self.eval_split or ("test" if "test" in splits else splits[0])
        return (self._conversion(self.train_split or splits[0], self.input_dir, self.max_train_samples),
                self._conversion(eval_split, self.eval_input_dir or self.input_dir, self.max_eval_samples))

    def _conversion(self, split: str, input_dir: str | None, limit: int | None) -> Conversion:
        # The name tells apart subsets and input folders, so studies can share a cache_dir.
        parts = [self.source, split, *([f"balanced{limit}"] if limit else []),
                 *([hashlib.sha1(input_dir.encode()).hexdigest()[:8]] if input_dir else [])]
        return Conversion(self.source, split, input_dir, limit, str(Path(self.cache_dir) / f"{'-'.join(parts)}.beton"))


class StudyConfig(BaseModel):
    """A whole study. Build it with `load_study` or `StudyConfig.parse` (which also check it against trials)."""

    model_config = _STRICT

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the Tune and MLflow experiments")
    description: str = ""
    base: dict[str, Any] = Field(description="a TrialConfig, partial where dataset and search fill it in")
    search: SearchSpace = SearchSpace()
    tune: TuneSettings = TuneSettings()
    tracking: TrackingSettings = TrackingSettings()
    cost: CostSettings = CostSettings()
    budget: BudgetSettings = BudgetSettings()
    dataset: DatasetSpec | None = None

    @model_validator(mode="after")
    def _one_data_source(self) -> StudyConfig:
        given = sorted(set(self.base.get("data") or {}) & {"train_path", "eval_path"})
        if self.dataset and given:
            raise ValueError(f"base.data: {given} and the dataset block both say where the data is; keep one")
        return self

    @classmethod
    def parse(cls, values: dict[str, Any]) -> StudyConfig:
        """Validate a study dict; ConfigError naming the path of the first bad setting."""
        study = validated(cls, values)
        _check_tune(study, _check_trials(study))
        return study

    def base_values(self) -> dict[str, Any]:
        """`base` as a complete TrialConfig dict (every default filled in, the dataset's paths set)."""
        base = {**self.base}
        if self.dataset:
            train, evaluation = self.dataset.conversions()
            base["data"] = {**(base.get("data") or {}), "train_path": train.path, "eval_path": evaluation.path}
        return validated(TrialConfig, base, prefix="base").model_dump(mode="json")

    def max_epochs(self) -> int:
        """The most epochs any trial runs (ASHA's default max_t)."""
        epochs = self.search.epochs
        return max(epochs.candidates()) if epochs else self.base_values()["train"]["epochs"]

    def asha_settings(self) -> AshaSettings:
        """`tune.asha` with max_t filled in."""
        asha = self.tune.asha
        return asha if asha.max_t else asha.model_copy(update={"max_t": self.max_epochs()})

    def representative_sample(self) -> dict[str, Any]:
        """A resolved Tune config: the first candidate of everything (the trial `--dry-run` shows)."""
        sample = {item.key: item.distribution.candidates()[0] for item in self.search.searched()}
        if self.search.activations:
            first = self.search.activations[0]
            sample[ACTIVATION_KEY] = first.value(lambda distribution, _: distribution.candidates()[0])
        return sample

    def trial_config(self, sampled: dict[str, Any]) -> TrialConfig:
        """The trial a resolved Tune config describes: `base` with the sampled values in place. Other keys (a
        searcher's bookkeeping, the orchestrator's own) are ignored."""
        values = self.base_values()
        for key, value in sampled.items():
            head, _, rest = key.partition(".")
            if head in TRIAL_PATHS:
                set_path(values, f"{TRIAL_PATHS[head]}.{rest}" if rest else TRIAL_PATHS[head], value)
        model = values["model"]
        if "compound_rule" in sampled:
            model.update(zip(COMPOUND_COEFFICIENTS, COMPOUND_RULES[sampled["compound_rule"]]))
        if "compound_phi" in sampled and model["resolution"]:
            # With phi searched, the base's resolution is the size phi grows, not a fixed one.
            model.update(base_resolution=model["resolution"], resolution=None)
        activation = sampled.get(ACTIVATION_KEY)
        if activation:
            model.update(activation=activation["name"], activation_params=dict(activation.get("params", {})))
        return validated(TrialConfig, values)


def _check_trials(study: StudyConfig) -> list[tuple[str, TrialConfig]]:
    """Every activation's parameters, then every searched value, then every combination of them (rules between
    fields, e.g. warm-up below epochs), each tried in a complete trial config. The activations come first: the
    trials that check the other values use the first one, so its errors must already read
    `search.activations[i]`. Returns the combinations' trials, each with the searched values that made it."""
    study.base_values()  # the base alone first, so its errors read `base.<path>`
    for index, entry in enumerate(study.search.activations or ()):
        first = {name: value.candidates()[0] for name, value in entry.params.items()}
        for name, value in entry.params.items():
            for candidate in value.candidates():
                try:
                    build_activation(entry.name, **{**first, name: candidate})
                except (TypeError, ValueError) as error:  # ConfigError is a ValueError
                    raise ConfigError(f"search.activations[{index}].params.{name}: {error}") from None
        if not entry.params:
            build_activation(entry.name)  # e.g. relu_smooth_backward's defaults
    sample = study.representative_sample()
    for searched in study.search.searched():
        for value in searched.distribution.candidates():
            try:
                study.trial_config({**sample, searched.key: value})
            except ConfigError as error:
                raise ConfigError(f"{searched.path}: {value!r} makes an invalid trial:\n{error}"
                                  + _FLOAT_HINT * searched.distribution.draws_floats) from None
    trials = []
    for combination in _value_combinations(_searched_values(study)):
        together = " with ".join(f"{path}={value!r}" for path, _key, value in combination)
        sampled = {key: value for _path, key, value in combination}
        try:
            trials.append((together, study.trial_config({**sample, **sampled})))
        except ConfigError as error:
            raise ConfigError(f"search: {together} makes an invalid trial:\n{error}\nevery combination the "
                              "search can draw must make a valid trial; narrow one of these ranges") from None
    return trials


_FLOAT_HINT = ("\n(uniform, loguniform and quniform draw floats; for a whole-number setting use "
               "{randint: [lo, hi]} or {choice: [...]})")
# Up to this many, every combination of the searched values is tried; beyond, every pair of them (all rules
# between two settings), at a few ms per thousand trial configs.
_MAX_COMBINATIONS = 4096


def _searched_values(study: StudyConfig) -> list[list[tuple[str, str, Any]]]:
    """Per searched setting, its candidate values as (path, config key, value); the activation is one setting
    whose values are each entry with each combination of its parameters' candidates."""
    settings = [[(item.path, item.key, value) for value in item.distribution.candidates()]
                for item in study.search.searched()]
    activations = []
    for index, entry in enumerate(study.search.activations or ()):
        names = list(entry.params)
        for values in itertools.product(*(entry.params[name].candidates() for name in names)):
            chosen = dict(zip(names, values))
            activations.append((f"search.activations[{index}]", ACTIVATION_KEY,
                                entry.value(lambda _distribution, name: chosen[name])))
    return [values for values in (*settings, activations) if len(values) > 1]


def _value_combinations(settings: list[list[tuple[str, str, Any]]]):
    if math.prod(len(values) for values in settings) <= _MAX_COMBINATIONS:
        yield from itertools.product(*settings)
        return
    for first, second in itertools.combinations(settings, 2):
        yield from itertools.product(first, second)


def _check_tune(study: StudyConfig, trials: list[tuple[str, TrialConfig]]) -> None:
    """Tune's settings against the study and the `trials` its search can make (`_check_trials`)."""
    _check_metric(study, trials)
    asha = study.asha_settings()
    if study.tune.scheduler == "asha" and asha.grace_period > asha.max_t:
        raise ConfigError(f"tune.asha.grace_period: {asha.grace_period} exceeds max_t ({asha.max_t} epochs); "
                          "lower it or use scheduler: fifo")
    if study.tune.scheduler == "asha" and asha.max_t < study.max_epochs():
        raise ConfigError(f"tune.asha.max_t: {asha.max_t} is below the {study.max_epochs()} epochs trials can run, "
                          f"so ASHA would stop every longer trial at epoch {asha.max_t}; remove max_t (it follows "
                          "the epochs) or lower the epochs")
    if study.tune.searcher == "optuna":
        _check_optuna(study)


def _check_metric(study: StudyConfig, trials: list[tuple[str, TrialConfig]]) -> None:
    """Tune ranks trials by a metric every epoch reports, in the direction in which it is better (a missing one
    would only fail inside Tune, after trials ran)."""
    metric, mode = study.tune.metric, study.tune.mode
    if metric not in OBJECTIVES:
        raise ConfigError(f"tune.metric: {metric!r} is not a metric trials report to rank them by; accepted: "
                          f"{', '.join(OBJECTIVES)}")
    if mode != OBJECTIVES[metric]:
        raise ConfigError(f"tune.mode: {mode!r} would rank the trials with the worst {metric} first; set mode: "
                          f"{OBJECTIVES[metric]}")
    for searched, trial in trials:
        if metric not in objectives(trial.train):
            where = f" with {searched}" if searched else ""
            raise ConfigError(f"tune.metric: {metric!r} needs an eval attack, but trials{where} have none "
                              "(train.eval_attack is null); set train.eval_attack or tune.metric: clean_acc")


def _check_optuna(study: StudyConfig) -> None:
    search = study.search
    if search.activations and len(search.activations) > 1 and search.activation_sampling == "grid":
        raise ConfigError("search.activation_sampling: Optuna cannot enumerate a grid; accepted with searcher "
                          "optuna: choice")
    distributions = [(item.path, item.distribution) for item in search.searched()] + [
        (f"search.activations[{index}].params.{name}", value)
        for index, entry in enumerate(search.activations or ()) for name, value in entry.params.items()]
    for path, distribution in distributions:
        problem = getattr(distribution, "optuna_problem", lambda: None)()
        if problem:
            raise ConfigError(f"{path}: {problem} (tune.searcher is optuna)")
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("tune.searcher: optuna is not installed (pip install optuna); accepted without it: random")


# ------------------------------------------------------------------------------------------------ loading

def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS_DIR.glob("*.yaml"))


def load_study(source: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """A validated study from a YAML file or a preset name (see `preset_names()`), with `key.path=value`
    overrides applied first (values parsed as YAML; `train.epochs=5` is short for `base.train.epochs=5`)."""
    raw = _read_yaml(_study_file(source))
    for override in overrides:
        key, value = parse_override(override)
        try:
            set_path(raw, _study_key(key), value)
        except ConfigError as error:
            raise ConfigError(f"override {override!r}: {error}") from None
    return StudyConfig.parse(raw)


def _study_file(source: str | Path) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    if str(source) in preset_names():
        return PRESETS_DIR / f"{source}.yaml"
    raise ConfigError(f"study {str(source)!r}: no such file, and not a preset; presets: {', '.join(preset_names())}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"study file {path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}); save it as UTF-8") from None
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read study file {path}: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {path}: expected a mapping of settings at the top, got {type(raw).__name__}")
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`"search.epochs={grid: [2, 4]}"` -> ("search.epochs", {"grid": [2, 4]})."""
    key, separator, value = text.partition("=")
    key = key.strip()
    if not separator or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected the form key.path=value, e.g. train.epochs=5 or "
                          "search.activations=[relu, silu]")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {error}") from None


def _study_key(key: str) -> str:
    # TrialConfig's fields and the study's do not overlap, so `train.epochs` can only mean the base's.
    head = key.split(".")[0]
    return f"base.{key}" if head in TrialConfig.model_fields and head not in StudyConfig.model_fields else key


__all__ = ["ACTIVATION_KEY", "ActivationEntry", "AshaSettings", "Conversion", "DatasetSpec", "ScalingSpace", "Searched",
           "SearchSpace", "StudyConfig", "TuneSettings", "load_study", "parse_override", "preset_names"]
