"""A trial is a pure function of its config, and trials that differ only in what is searched share their
randomness (the paired design): real FFCV loaders over the digits .beton, real Ray Train runs on the session's
local Ray cluster."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from orchestrator.runner import run_study
from search_spaces.study import StudyConfig
from tests.conftest import DIGITS_RESOLUTION
from tests.test_distributed import EPS, _kill_a_worker_during_epoch, digits_trial
from trainers.attacks import AttackConfig, PGDAttacker
from trainers.checkpoint import load_training_state
from trainers.data.loaders import build_eval_loader, build_train_loader
from trainers.distributed import build_trainer
from trainers.models import build_model, build_model_from_config
from trainers.seeding import derive_seed, stream_generator
from trainers.training import iter_outcomes

PER_EPOCH = ("epoch", "train_loss", "train_robust_acc", "clean_acc", "robust_acc", "lr")


def reproducible_trial(betons, activation="silu", epochs=2):
    """One worker, augmentations on (seeded random-resized crops and flips), a 2-step training attack with
    random and clean starts, dropout-free ResNet: every random source the loop has."""
    return digits_trial(betons, epochs=epochs, num_workers=1, max_failures=2,
                        model={"activation": activation},
                        train={"train_attack": {"eps": EPS, "step_size": EPS / 2, "steps": 2,
                                                "clean_start_prob": 0.2}},
                        data={"loader_options": {"train_crop": "random_resized_crop", "crop_scale": [0.6, 1.0],
                                                 "flip_probability": 0.5}})


def study(name: str, trial, activations: list[str], concurrent: int) -> StudyConfig:
    base = trial.model_dump(mode="json")
    base["model"].pop("activation")
    return StudyConfig.parse({"name": name, "base": base, "search": {"activations": activations},
                              "tune": {"scheduler": "fifo", "max_concurrent_trials": concurrent}})


def study_trial(storage: Path, name: str, activation: str) -> tuple[list[tuple], dict[str, torch.Tensor]]:
    """A study's trial of `activation`: its per-epoch results as Ray Train registered them, its final weights."""
    for run_dir in storage.glob(f"{name}-train-*"):
        registered = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]
        last = load_training_state(run_dir / registered[-1]["checkpoint_dir_name"])
        if last["trial"]["model"]["activation"] == activation:
            return [tuple(entry["metrics"][key] for key in PER_EPOCH) for entry in registered], last["model"]
    raise AssertionError(f"no {activation} trial in study {name}")


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_a_trial_gives_identical_results_beside_others_in_a_study_and_alone_after_a_kill(
        ray_cluster, mlflow_server, digits_betons, tmp_path):
    trial = reproducible_trial(digits_betons)
    storage = tmp_path / "storage"
    # A study runs the SiLU trial beside a ReLU one on the same 2 cores.
    run_study(study("pure-a", trial, ["relu", "silu"], concurrent=2), str(storage), mlflow_server)
    beside, beside_weights = study_trial(storage, "pure-a", "silu")
    assert [epoch[0] for epoch in beside] == [0, 1]
    relu, _ = study_trial(storage, "pure-a", "relu")
    assert relu != beside  # a different activation does differ

    # The same trial alone, killed during epoch 1 and resumed from epoch 0's checkpoint: bit-identical, every epoch,
    # to the one that ran beside another and was never interrupted.
    outcome: dict = {}
    killed_storage = tmp_path / "killed-storage"  # the killer waits for the first checkpoint under it
    killer = threading.Thread(target=_kill_a_worker_during_epoch, args=(killed_storage, 1.0, outcome),
                              daemon=True)
    killer.start()
    killed = build_trainer(trial, str(killed_storage), "killed").fit()
    killer.join(timeout=5)
    assert "killed" in outcome, f"no worker was killed, so no resume was exercised: {outcome}"
    assert killed.error is None
    assert killed.return_value["replicas_in_sync"]  # both DDP replicas resumed onto the same weights
    frame = killed.metrics_dataframe.sort_values("epoch")
    assert [tuple(row[key] for key in PER_EPOCH) for row in frame.to_dict("records")] == beside
    with killed.checkpoint.as_directory() as directory:
        assert_same_weights(load_training_state(Path(directory))["model"], beside_weights)


def test_relu_and_silu_with_one_seed_start_alike_and_see_the_same_batches(digits_betons):
    relu, silu = reproducible_trial(digits_betons, "relu"), reproducible_trial(digits_betons, "silu")
    relu_weights = build_model_from_config(relu.model, seed=relu.train.seed).state_dict()
    silu_weights = build_model_from_config(silu.model, seed=silu.train.seed).state_dict()
    assert_same_weights(relu_weights, silu_weights)
    other_seed = build_model_from_config(relu.model, seed=1).state_dict()
    assert not torch.equal(other_seed["network.head.3.weight"], relu_weights["network.head.3.weight"])

    # Seeded building leaves the caller's random state alone.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model("resnet18", 10, seed=0, width_mult=0.125, depth_mult=0.25, resolution=DIGITS_RESOLUTION)
    assert torch.equal(torch.rand(3), expected)

    # The loaders do not depend on the activation; two builds give the same augmented batches, epoch by epoch,
    # on one decoding thread or two.
    assert relu.loader_config() == silu.loader_config()
    config = relu.loader_config()

    def batches(loader_threads: int, epoch: int):
        loader = build_train_loader(relu.data.train_path, config.model_copy(update={"num_workers": loader_threads}),
                                    with_indices=True)
        loader.set_epoch(epoch)
        return [(images.clone(), indices.clone()) for images, _labels, indices in loader]

    first = batches(1, epoch=1)
    for images, other in zip(first, batches(2, epoch=1)):
        assert torch.equal(images[0], other[0]) and torch.equal(images[1], other[1])
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, batches(1, epoch=2)))  # epochs differ


def test_attack_random_starts_are_a_stream_of_seed_rank_and_epoch():
    images = torch.rand(8, 3, 16, 16)
    attacker = PGDAttacker(AttackConfig(eps=EPS, step_size=EPS, steps=1))
    starts = [attacker.threat.random_start(images, stream_generator(3, "train_attack", 0, epoch))
              for epoch in (0, 0, 1)]
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])
    assert derive_seed(3, "train_attack", 0, 1) != derive_seed(3, "train_attack", 1, 0)  # ranks differ too
    assert derive_seed(3, "x") == 2921528907288763622  # stable across processes and machines


def test_an_ablation_model_is_evaluated_through_its_true_gradient(digits_split):
    """Evaluation attacks every arm the same way: a relu_smooth_backward model and a plain ReLU model with the
    same weights get the same adversarial images; only the training attack uses the surrogate gradient."""
    (_, _), (images, labels) = digits_split
    images, labels = images[:64], labels[:64]
    common = {"width_mult": 0.25, "depth_mult": 0.5, "resolution": DIGITS_RESOLUTION, "seed": 0}
    relu = build_model("resnet18", 10, activation="relu", **common).eval()
    ablation = build_model("resnet18", 10, activation="relu_smooth_backward",
                           activation_params={"smooth_backward_in": "both"}, **common).eval()
    ablation.load_state_dict(relu.state_dict())
    attack = AttackConfig(eps=EPS, step_size=EPS / 4, steps=5)

    def adversarial(model, phase):
        return PGDAttacker(attack, phase=phase, generator=stream_generator(0, "eval")).perturb(model, images, labels)

    assert torch.equal(adversarial(ablation, None), adversarial(relu, None))
    assert not torch.equal(adversarial(ablation, "attack"), adversarial(relu, "attack"))  # the surrogate differs


def test_robust_accuracy_never_exceeds_clean_accuracy(digits_betons):
    """An image misclassified clean is not robust, even if the attack's random start happens to fix it."""
    model = build_model("resnet18", 10, width_mult=0.125, depth_mult=0.25, resolution=DIGITS_RESOLUTION,
                        seed=0)  # untrained
    loader = build_eval_loader(digits_betons["test"], digits_trial(digits_betons, num_workers=1).loader_config())
    weak = AttackConfig(eps=0.3, step_size=0.01, steps=1)  # mostly the random start
    fixed_by_noise = 0
    for clean, robust in iter_outcomes(model, loader, weak, torch.device("cpu"), generator=stream_generator(0, "t")):
        assert not (robust & ~clean).any()
        fixed_by_noise += int((~clean).sum())
    assert fixed_by_noise > 0  # there were misclassified images for the rule to apply to


def test_max_eval_batches_evaluates_a_class_balanced_subset(digits_betons):
    trial = digits_trial(digits_betons, train={"max_eval_batches": 1})
    config = trial.loader_config()
    assert config.eval_samples == trial.global_batch_size
    labels = torch.cat([batch_labels.clone() for _images, batch_labels in
                        build_eval_loader(trial.data.eval_path, config.model_copy(update={"distributed": False}))])
    assert labels.shape[0] == 64
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 6 and counts.max() <= 7  # 64 over 10 classes
