"""Study files and search spaces: presets, sampling through Tune's variant generator, overrides, Optuna's
define-by-run space, and the errors a bad study gets (with the key's path and the accepted values)."""
from __future__ import annotations

import pickle

import re
import subprocess
import sys
from pathlib import Path

import pytest
from ray import tune
from ray.tune.search.variant_generator import generate_variants

from orchestrator.runner import build_searcher
from search_spaces.study import load_study, preset_names
from search_spaces.space import (OptunaSpace, activation_labels, count_trials, describe_space, param_space,
                                 trial_params)
from trainers.activations import activation_params
from trainers.errors import ConfigError
from trainers.models import ModelConfig
from trainers.models.efficientnet import COMPOUND_RULES
from trainers.trial import TrialConfig

PRESET_TRIALS = {"default": 4, "activation_table": 30, "compound_scaling": 16}


def sampled_configs(study) -> list[dict]:
    """What Tune's default searcher would hand the trials: every grid point, num_samples times."""
    return [config for _ in range(study.tune.num_samples) for _, config in generate_variants(param_space(study))]


def test_presets_are_the_three_documented():
    assert preset_names() == sorted(PRESET_TRIALS)


@pytest.mark.parametrize("preset", sorted(PRESET_TRIALS))
def test_preset_samples_are_valid_trials(preset):
    study = load_study(preset)
    configs = sampled_configs(study)
    assert count_trials(study) == len(configs) == PRESET_TRIALS[preset]
    trials = [study.trial_config(config) for config in configs]
    assert all(isinstance(trial, TrialConfig) for trial in trials)
    for trial in trials:
        # Activation params only where the activation takes them.
        assert set(trial.model.activation_params) <= set(activation_params(trial.model.activation))
    assert describe_space(study).endswith(f"trials: {PRESET_TRIALS[preset]}")


def test_default_preset_compares_four_activations_trained_to_the_end():
    study = load_study("default")
    trials = [study.trial_config(config) for config in sampled_configs(study)]
    assert sorted((trial.model.activation, trial.model.width_mult, trial.train.epochs) for trial in trials) == sorted(
        (activation, 0.125, 3) for activation in ("relu", "silu", "gelu", "softplus"))
    assert {trial.data.train_path.rsplit("/", 1)[1] for trial in trials} == {"fashion-mnist-train-balanced4000.beton"}
    assert study.tune.scheduler == "fifo" and study.tune.metric == "robust_acc"


def test_activation_table_has_the_ablation_and_seeds():
    study = load_study("activation_table")
    trials = [study.trial_config(config) for config in sampled_configs(study)]
    ablation = {trial.model.activation_params["smooth_backward_in"] for trial in trials
                if trial.model.activation == "relu_smooth_backward"}
    assert ablation == {"attack", "update", "both"}
    assert {trial.train.seed for trial in trials} == {0, 1, 2}
    # Tune sees a cheap PGD-10 every epoch; the strong evaluation runs afterwards (orchestrator/evaluate_study.py).
    assert study.tune.scheduler == "fifo" and {trial.train.eval_attack.steps for trial in trials} == {10}
    assert trials[-1].model.activation_params["smooth_params"] == {"beta": 10.0}


def test_compound_scaling_preset_compares_rules_at_equal_flops():
    study = load_study("compound_scaling")
    trials = [study.trial_config(config) for config in sampled_configs(study)]
    assert len(trials) == 16 and {trial.model.activation for trial in trials} == {"relu", "parametric_softplus"}
    scales = {(trial.model.compound_phi, round(trial.model.scale.depth_mult, 4), round(trial.model.scale.width_mult, 4),
               trial.resolution) for trial in trials if trial.model.activation == "relu"}
    assert scales == {
        (1, 1.2, 1.1, 40), (2, 1.44, 1.21, 40),     # EfficientNet's rule: resolution 32 * 1.15**phi
        (1, 2.0, 1.0, 32), (2, 4.0, 1.0, 32),       # depth alone
        (1, 1.0, 1.4142, 32), (2, 1.0, 2.0, 32),    # width alone
        (1, 1.0, 1.0, 48), (2, 1.0, 1.0, 64)}       # resolution alone: 32 * 2**(phi / 2)
    # Every rule has EfficientNet's nominal FLOPs growth of 2 per unit of phi. (Measured FLOPs differ at 32 px:
    # odd feature-map sizes round up at every stride, so the logged cost_flops is what to compare.)
    for alpha, beta, gamma in COMPOUND_RULES.values():
        assert alpha * beta**2 * gamma**2 == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("scaling, message", [
    ("{mode: compound, phi: 1, rule: diagonal}", "rule 'diagonal' is unknown; use one of"),
    ("{mode: compound, phi: 1, rule: depth, alpha: 2.0}", "rule sets alpha, beta and gamma; remove ['alpha']"),
    ("{mode: direct, width_mult: 1.0, rule: depth}", "mode 'direct' takes"),
])
def test_compound_rule_is_checked(scaling, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_study("compound_scaling", [f"search.scaling={scaling}"])


def test_compound_scaling_with_own_coefficients():
    study = load_study("compound_scaling", ["search.scaling={mode: compound, phi: {grid: [2]}, alpha: 1.4, "
                                            "beta: 1.05, gamma: 1.1}"])
    (config,) = sampled_configs(study)[:1]
    trial = study.trial_config(config)
    assert trial.model.compound_phi == 2
    assert trial.model.scale.depth_mult == pytest.approx(1.4**2)
    assert trial.model.scale.width_mult == pytest.approx(1.05**2)
    assert trial.resolution == 40  # 32 * 1.1**2 = 38.7, rounded to a multiple of 8
    params = trial_params(trial)
    assert params["depth_mult"] == pytest.approx(1.96) and params["compound_phi"] == 2
    # The model config carries the rule itself: the multipliers stay the base's, the base's resolution is what
    # phi grows.
    model = trial.model
    assert (model.compound_alpha, model.compound_beta, model.compound_gamma) == (1.4, 1.05, 1.1)
    assert (model.depth_mult, model.width_mult, model.base_resolution, model.resolution) == (1.0, 1.0, 32, None)


def test_trial_configs_stored_before_the_model_carried_its_rule_still_read_the_same():
    """Earlier versions stored a compound trial as EfficientNet's phi plus corrected multipliers and the scaled
    resolution; such a config (from a checkpoint, say) describes the same network today."""
    study = load_study("compound_scaling", ["search.scaling={mode: compound, phi: {grid: [1]}, rule: {grid: [depth]}}"])
    trial = study.trial_config(sampled_configs(study)[0])
    stored = {**trial.model.model_dump(mode="json", exclude={"compound_alpha", "compound_beta", "compound_gamma",
                                                             "base_resolution"}),
              "depth_mult": 2.0 / 1.2, "width_mult": 1.0 / 1.1, "resolution": 32}  # as the old space.py wrote it
    old = ModelConfig.model_validate(stored)
    assert old.scale.depth_mult == pytest.approx(trial.model.scale.depth_mult) == pytest.approx(2.0)
    assert old.scale.width_mult == pytest.approx(trial.model.scale.width_mult) == pytest.approx(1.0)
    assert old.scale.resolution == trial.model.scale.resolution == 32


def test_the_study_schema_does_not_import_the_tune_space():
    """Data flows one way: study config -> search space; search_spaces.study needs nothing of space.py."""
    code = "import sys, search_spaces.study; print('search_spaces.space' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False"


def test_overrides_reach_base_search_and_tune():
    study = load_study("default", ["train.epochs=5", "search.activations=[relu, {name: softplus, params: "
                                   "{beta: {uniform: [2, 8]}}}]", "tune.num_samples=3", "search.seed={grid: [0, 1]}",
                                   "search.scaling={mode: direct, width_mult: {grid: [0.125, 0.25]}}"])
    assert study.base["train"]["epochs"] == 5 and study.asha_settings().max_t == 5
    assert count_trials(study) == 2 * 2 * 2 * 3
    trials = [study.trial_config(config) for config in sampled_configs(study)]
    assert len(trials) == 24 and {trial.train.epochs for trial in trials} == {5}
    assert {trial.model.width_mult for trial in trials} == {0.125, 0.25}
    betas = [trial.model.activation_params.get("beta") for trial in trials if trial.model.activation == "softplus"]
    assert len(betas) == 12 and all(2 <= beta <= 8 for beta in betas)
    assert all(trial.model.activation_params == {} for trial in trials if trial.model.activation == "relu")


def test_list_positions_in_overrides_and_choice_sampling():
    study = load_study("activation_table", ["search.activations.4.params.beta=5.0",
                                            "search.activation_sampling=choice", "search.seed=7"])
    assert study.search.activations[4].params["beta"].value == 5.0
    space = param_space(study)
    assert isinstance(space["activation"], tune.search.sample.Categorical) and space["seed"] == 7
    assert count_trials(study) == 1


def test_study_file_and_fractions(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "name: tiny\n"
        "base: {model: {arch: resnet18, num_classes: 10}, data: {train_path: a.beton, eval_path: b.beton}}\n"
        "search:\n"
        "  train_attack: {eps: {choice: ['2/255', '8/255']}, steps: {randint: [1, 3]}}\n"
        "  optimizer: {lr: {loguniform: [0.01, 0.2]}}\n"
        "  eval_attack: {eps: {uniform: ['1/255', '4/255']}}\n")
    assert count_trials(load_study(path)) == 1
    study = load_study(path, ["tune.num_samples=20"])
    for config in sampled_configs(study):
        trial = study.trial_config(config)
        assert trial.train.train_attack.eps in (pytest.approx(2 / 255), pytest.approx(8 / 255))
        assert 1 <= trial.train.train_attack.steps <= 3 and 0.01 <= trial.train.optimizer.lr <= 0.2
        assert 1 / 255 <= trial.train.eval_attack.eps <= 4 / 255
    params = trial_params(trial)
    assert {"activation", "arch", "depth_mult", "width_mult", "resolution", "train_attack_steps", "train_eps",
            "train_step_size", "eval_attack_steps", "lr", "epochs", "seed", "compound_phi"} <= set(params)
    assert all(isinstance(value, (str, int, float)) for value in params.values())


class RecordingTrial:
    """Stands in for an Optuna trial: answers each suggestion with its first option or lower bound."""

    def __init__(self, pick_last: bool = False):
        self.asked: dict[str, tuple] = {}
        self.pick_last = pick_last

    def suggest_categorical(self, name, choices):
        self.asked[name] = ("categorical", tuple(choices))
        return choices[-1] if self.pick_last else choices[0]

    def suggest_float(self, name, low, high, log=False, step=None):
        self.asked[name] = ("float", low, high, log, step)
        return high if self.pick_last else low

    def suggest_int(self, name, low, high):
        self.asked[name] = ("int", low, high)
        return high if self.pick_last else low


def test_optuna_define_by_run_asks_only_the_drawn_activations_params():
    study = load_study("default", ["search.activation_sampling=choice",
                                   "search.activations=[relu, {name: softplus, params: {beta: {loguniform: [1, 20]}}}]",
                                   "search.scaling={mode: direct, width_mult: {choice: [0.125, 0.25]}}",
                                   "search.optimizer.lr={uniform: [0.05, 0.2]}"])
    # Tune pickles its searcher (and this space with it) whenever it saves the experiment's state.
    define_by_run = pickle.loads(pickle.dumps(OptunaSpace(study)))
    first, last = RecordingTrial(), RecordingTrial(pick_last=True)
    relu_config, softplus_config = define_by_run(first), define_by_run(last)
    assert "activation.1.beta" not in first.asked and last.asked["activation.1.beta"] == ("float", 1, 20, True, None)
    assert first.asked["activation"] == ("categorical", tuple(activation_labels(study.search.activations)))
    assert study.trial_config(relu_config).model.activation == "relu"
    softplus = study.trial_config(softplus_config)
    assert softplus.model.activation_params == {"beta": 20} and softplus.train.optimizer.lr == 0.2


def searcher_samples(study, count: int = 6) -> list[dict]:
    """The first configurations the study's searcher hands Tune, without running them."""
    searcher = build_searcher(study, concurrent=count)
    if study.tune.searcher == "optuna":
        searcher.set_search_properties(study.tune.metric, study.tune.mode, {})
        return [searcher.suggest(f"probe_{index}") for index in range(count)]
    searcher.add_configurations({"probe": {"run": lambda config: None, "config": param_space(study),
                                           "num_samples": study.tune.num_samples}})
    return [trial.config for trial in iter(searcher.next_trial, None)][:count]


@pytest.mark.parametrize("searcher", [[], ["search.activation_sampling=choice", "tune.searcher=optuna"]],
                         ids=["random", "optuna"])
def test_tune_seed_seeds_every_searcher(searcher):
    overrides = [*searcher, "search.optimizer.lr={uniform: [0.05, 0.2]}", "tune.num_samples=2"]
    study, reseeded = load_study("default", overrides), load_study("default", [*overrides, "tune.seed=1"])
    first = searcher_samples(study)
    assert len(first) == 6 and len({sample["optimizer.lr"] for sample in first}) == 6
    assert searcher_samples(study) == first  # the same study samples the same configurations
    assert searcher_samples(reseeded) != first


BAD_STUDIES = [
    # (overrides on the default preset, substrings the error must contain)
    (["bogus=1"], ["bogus: unknown key", "accepted: base, budget, cost, dataset, description, name, search, tracking, tune"]),
    (["search.scaling.phii=1"], ["search.scaling.phii: unknown key", "phi", "width_mult"]),
    (["train.model.widthmult=1"], ["base.train.model: unknown key"]),
    (["model.widthmult=1"], ["base.model.widthmult: unknown key", "width_mult"]),
    (["search.train_attack.epss={choice: [0.1]}"], ["search.train_attack.epss: unknown key", "eps", "step_size"]),
    (["tune.asha.grace=2"], ["tune.asha.grace: unknown key", "grace_period"]),
    (["tune.num_samples=many"], ["tune.num_samples", "valid integer"]),
    (["tune.scheduler=hyperband"], ["tune.scheduler", "'asha' or 'fifo'"]),
    (["search.train_attack.eps={choice: [0.1, -0.2]}"],
     ["search.train_attack.eps", "-0.2", "greater than or equal to 0"]),
    (["search.activations=[relu, swish]"], ["search.activations[1].name", "unknown activation", "silu", "softplus"]),
    (["search.activations=[silu, {name: relu, params: {beta: 2}}]"],
     ["search.activations[1].params.beta", "takes no parameter", "accepted: none"]),
    (["search.activations=[{name: elu, params: {beta: 2}}]"], ["search.activations[0].params.beta", "['alpha']"]),
    (["search.activations=[{name: softplus, params: {beta: {unifrom: [1, 2]}}}]"],
     ["search.activations[0].params.beta", "unknown distribution 'unifrom'", "loguniform", "quniform", "randint"]),
    (["search.optimizer.lr={uniform: [0.5, 0.1]}"], ["search.optimizer.lr", "lo < hi"]),
    (["search.optimizer.lr={loguniform: [0, 0.1]}"], ["search.optimizer.lr", "0 < lo"]),
    (["search.scaling={mode: compound, phi: 1, alpha: 1.5, beta: 1.3}"],
     ["search.scaling", "alpha * beta**2 * gamma**2", "1.8 to 2.2", "3.35"]),
    (["search.scaling={mode: compound, phi: 1, beta: {uniform: [1.0, 1.3]}}"], ["search.scaling", "1.8 to 2.2"]),
    (["search.scaling={mode: direct, phi: 1}"], ["search.scaling", "['depth_mult', 'width_mult', 'resolution']"]),
    (["workers.num_workers=3"], ["base", "global_batch_size (128) must be divisible by workers.num_workers (3)"]),
    (["search.epochs={grid: [2, 0]}"], ["search.epochs", "train.epochs", "greater than or equal to 1"]),
    (["dataset.source=mnist"], ["dataset.source", "fashion-mnist", "image-folder"]),
    (["tune.searcher=optuna"], ["search.activation_sampling", "choice"]),
    (["search.activation_sampling=choice", "tune.searcher=optuna",
      "search.scaling={mode: direct, width_mult: {grid: [0.125, 0.25]}}"], ["search.scaling.width_mult", "grid"]),
    (["data.train_path=x.beton"], ["base.data", "dataset"]),
    (["train.epochs"], ["train.epochs", "key.path=value"]),
    (["=3"], ["key.path=value"]),
    (["search.activations.0.params.beta=3"], ["search.activations.0", "not a mapping"]),
    (["tune.scheduler=asha", "tune.asha.grace_period=5"], ["tune.asha.grace_period", "max_t (3 epochs)"]),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_STUDIES, ids=[" ".join(o) for o, _ in BAD_STUDIES])
def test_bad_study_is_rejected_with_path_and_accepted_values(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        load_study("default", overrides)
    for text in expected:
        assert text in str(caught.value), str(caught.value)


def test_unknown_study_names_the_presets():
    with pytest.raises(ConfigError, match="presets: activation_table, compound_scaling, default"):
        load_study("no_such_study")


def test_dataset_conversions_name_subsets_and_need_separate_eval_data():
    study = load_study("default", ["dataset.max_eval_samples=300"])
    train, evaluation = study.dataset.conversions()
    assert (train.split, train.limit, evaluation.split, evaluation.limit) == ("train", 4000, "test", 300)
    assert evaluation.path.endswith("/fashion-mnist-test-balanced300.beton") and evaluation.path.startswith("/")
    with pytest.raises(ConfigError, match="same data"):
        load_study("default", ["dataset={source: image-folder, input_dir: /images}"])
    both = load_study("default", ["dataset={source: image-folder, input_dir: /a, eval_input_dir: /b}"])
    assert len({conversion.path for conversion in both.dataset.conversions()}) == 2
