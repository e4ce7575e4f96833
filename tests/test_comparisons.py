"""Intervals with known answers, the paired design against the unpaired one, and the reports evaluate_study writes
from per-image outcomes (tables, CSV columns, no ± for one seed)."""
from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest

from orchestrator.comparisons import accuracy, paired_difference, unpaired_difference
from orchestrator.evaluate_study import TrialEvaluation, read_evaluation, write_evaluation
from orchestrator.reports import SeedGroup, seed_groups_markdown


def test_identical_configurations_differ_by_exactly_zero():
    outcomes = np.random.default_rng(0).random((3, 500)) < 0.6
    difference = paired_difference(outcomes, outcomes.copy())
    assert (difference.value, difference.low, difference.high, difference.detectable) == (0.0, 0.0, 0.0, 0.0)


def test_all_right_against_all_wrong_is_a_difference_of_one():
    difference = paired_difference(np.ones((2, 100)), np.zeros((2, 100)))
    assert difference.value == 1.0
    assert difference.low == pytest.approx(1.0) and difference.high == pytest.approx(1.0)


def test_one_seed_accuracy_interval_is_the_binomial_one():
    # 5000 of 10000 correct: the normal approximation is exact enough, 0.5 ± 1.96 * 0.005.
    outcomes = np.zeros(10_000)
    outcomes[::2] = 1
    estimate = accuracy(outcomes)
    assert estimate.value == 0.5 and (estimate.seeds, estimate.images) == (1, 10_000)
    assert estimate.low == pytest.approx(0.5 - 0.0098, abs=0.0015)
    assert estimate.high == pytest.approx(0.5 + 0.0098, abs=0.0015)
    assert estimate.std_error == pytest.approx(0.005, rel=0.08)


def test_a_fixed_table_of_outcomes():
    # 100 images: the baseline gets 50 right; the configuration gets the same 50 and 10 more. The paired
    # difference is 10 discordant images out of 100: 0.10 with SE sqrt(0.1 * 0.9 / 100) = 0.03.
    baseline = np.zeros((1, 100))
    baseline[0, :50] = 1
    configuration = baseline.copy()
    configuration[0, 50:60] = 1
    paired = paired_difference(configuration, baseline, seed=3)
    assert paired.value == pytest.approx(0.10)
    assert paired.std_error == pytest.approx(0.03, rel=0.1)
    assert paired.low == pytest.approx(0.05, abs=0.015) and paired.high == pytest.approx(0.16, abs=0.015)
    assert paired.excludes_zero and paired.detectable == pytest.approx(2.80 * paired.std_error, rel=1e-3)
    # Unpaired, the same numbers carry both accuracies' full binomial noise: about 0.07 SE.
    unpaired = unpaired_difference(configuration, baseline, seed=3)
    assert unpaired.value == pytest.approx(0.10)
    assert unpaired.std_error == pytest.approx(np.sqrt(0.5 * 0.5 / 100 + 0.6 * 0.4 / 100), rel=0.1)
    assert not unpaired.excludes_zero
    # Deterministic for a seed.
    assert paired_difference(configuration, baseline, seed=3) == paired


def test_seeds_widen_the_interval_when_they_disagree():
    rng = np.random.default_rng(1)
    # Three seeds whose accuracies differ by much more than image sampling explains.
    outcomes = np.stack([rng.random(2000) < p for p in (0.50, 0.60, 0.70)])
    spread = accuracy(outcomes)
    one_seed_like = accuracy(outcomes.reshape(1, -1))  # the same 6000 outcomes as one seed
    assert spread.high - spread.low > 3 * (one_seed_like.high - one_seed_like.low)


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="same seeds and images"):
        paired_difference(np.ones((2, 10)), np.ones((3, 10)))


def test_one_seed_shows_no_spread_in_the_seed_table():
    groups = [SeedGroup("relu", {}, (0,), {"pgd_acc": 0.5}, {"pgd_acc": 0.0}),
              SeedGroup("silu", {}, (0, 1), {"pgd_acc": 0.6}, {"pgd_acc": 0.02})]
    table = seed_groups_markdown(groups, {"pgd_acc": "PGD"}).splitlines()
    assert table[2] == "| relu | 1 | 50.0 |" and table[3] == "| silu | 2 | 60.0 ± 2.0 |"


def evaluation(trial_id, activation, seed, clean, robust, width=0.25):
    params = {"activation": activation, "arch": "resnet18", "depth_mult": 0.5, "width_mult": width,
              "resolution": 32, "compound_phi": 0.0, "seed": seed, "epochs": 2}
    item = TrialEvaluation(trial_id, f"/ckpt/{trial_id}", params, 1e6,
                           outcomes={"clean_acc": clean, "pgd_acc": robust})
    item.metrics.update({name: float(values.mean()) for name, values in item.outcomes.items()})
    return item


def test_reports_pair_each_configuration_with_relu_at_its_scale(tmp_path):
    rng = np.random.default_rng(0)
    images = 400
    evaluations = []
    for width in (0.25, 0.5):
        for seed in (0, 1, 2):
            clean = rng.random(images) < 0.8
            relu = clean & (rng.random(images) < 0.6)
            silu = relu.copy()
            silu[rng.choice(np.flatnonzero(clean & ~relu), 20, replace=False)] = True  # SiLU: 20 more, same seed
            evaluations += [evaluation(f"r{width}{seed}", "relu", seed, clean, relu, width),
                            evaluation(f"s{width}{seed}", "silu", seed, clean, silu, width)]
    settings = argparse.Namespace(pgd_steps=50, restarts=2, max_images=None, autoattack="none",
                                  autoattack_images=100, baseline="relu")
    summary = write_evaluation(tmp_path, evaluations, "pgd50x2", settings, not_evaluated={})
    assert {path.name for path in summary.written} >= {"evaluation.csv", "evaluation.md", "comparisons.csv",
                                                       "comparisons.md", "comparisons.png", "outcomes.npz"}
    pgd = [item for item in summary.comparisons if item.metric == "pgd_acc"]
    assert [(item.label, item.baseline) for item in pgd] == [("silu, width_mult=0.25", "relu, width_mult=0.25"),
                                                             ("silu, width_mult=0.5", "relu, width_mult=0.5")]
    for item in pgd:
        assert item.seeds == (0, 1, 2) and item.difference.value == pytest.approx(20 / images)
        assert item.difference.excludes_zero  # every seed gained 20 images: clearly positive
    with open(tmp_path / "comparisons.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert {row["metric"] for row in rows} == {"clean_acc", "pgd_acc"}
    assert all(float(row["low"]) <= float(row["difference"]) <= float(row["high"]) for row in rows)
    report = (tmp_path / "evaluation.md").read_text()
    assert "all 400 test images per trial" in report and "Detectable" in report and "[95 % CI]" in report
    # Per trial: its interval over images, read back as metrics; robust never above clean.
    params, metrics = read_evaluation(tmp_path / "evaluation.csv")[0]
    assert metrics["pgd_acc_low"] <= metrics["pgd_acc"] <= metrics["pgd_acc_high"] <= 1
    assert metrics["pgd_acc"] <= metrics["clean_acc"] and params["seed"] == "0"
    stored = np.load(tmp_path / "outcomes.npz")
    assert np.array_equal(stored["s0.251/pgd_acc"], evaluations[3].outcomes["pgd_acc"])


def test_a_single_seed_study_reports_intervals_without_a_spread(tmp_path):
    rng = np.random.default_rng(2)
    clean = rng.random(300) < 0.9
    evaluations = [evaluation("r", "relu", 0, clean, clean & (rng.random(300) < 0.5)),
                   evaluation("g", "gelu", 0, clean, clean & (rng.random(300) < 0.5))]
    settings = argparse.Namespace(pgd_steps=10, restarts=1, max_images=300, autoattack="none",
                                  autoattack_images=100, baseline="relu")
    write_evaluation(tmp_path, evaluations, "pgd10", settings, not_evaluated={})
    report = (tmp_path / "evaluation.md").read_text()
    relu_line = next(line for line in report.splitlines() if line.startswith("| relu | 1 |"))
    assert "±" not in relu_line and relu_line.endswith("| – |") and "[" in relu_line
    assert "a class-balanced subset of 300" in report and "one seed they cover test-set sampling only" in report
