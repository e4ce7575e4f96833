"""Scaling curves: which dimensions each trial grew, the table against ReLU, the plot, and the report across two
evaluated studies (a rules study and its phi=0 baseline) through the evaluation.csv files evaluate_study writes."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.evaluate_study import TrialEvaluation, read_evaluation, write_evaluation
from orchestrator.reports import plot_scaling, scale_points, scaling_markdown
from orchestrator.scaling_report import main as scaling_report_main

BASE = (0.5, 0.5, 32)
# (rule, phi, effective depth, width, resolution, MFLOPs): the base, EfficientNet's rule, depth alone.
SCALES = [("base", 0, *BASE, 17.0), ("compound", 1, 0.6, 0.55, 40, 30.0), ("depth", 1, 1.0, 0.5, 32, 31.0),
          ("depth", 2, 2.0, 0.5, 32, 60.0)]


def evaluation(trial_id: str, activation: str, scale: tuple, pgd_acc: float, seed: int = 0) -> TrialEvaluation:
    _rule, phi, depth, width, resolution, mflops = scale
    params = {"activation": activation, "arch": "efficientnet_b0", "compound_phi": float(phi), "depth_mult": depth,
              "width_mult": width, "resolution": resolution, "seed": seed, "epochs": 3}
    if activation == "parametric_softplus":
        params["activation.beta"] = 10.0
    return TrialEvaluation(trial_id, f"/checkpoints/{trial_id}", params, mflops * 1e6,
                           {"clean_acc": 0.8, "pgd_acc": pgd_acc})


def rules_and_baseline() -> tuple[list[TrialEvaluation], list[TrialEvaluation]]:
    """The rules study (phi 1, 2) and the phi=0 study; parametric Softplus is 2 points above ReLU at phi 0 and
    gains 1 point per scale step, ReLU gains nothing."""
    rules, baseline = [], []
    for index, scale in enumerate(SCALES):
        target = baseline if scale[0] == "base" else rules
        step = 0 if scale[0] == "base" else scale[1]
        target += [evaluation(f"r{index}", "relu", scale, 0.50),
                   evaluation(f"p{index}", "parametric_softplus", scale, 0.52 + 0.01 * step)]
    # A second ReLU seed at the base: the point is the mean over seeds.
    baseline.append(evaluation("r0s1", "relu", SCALES[0], 0.46, seed=1))
    return rules, baseline


def records(evaluations: list[TrialEvaluation]):
    return [item.record for item in evaluations]


def test_scale_points_name_the_grown_dimensions_and_average_seeds():
    rules, baseline = rules_and_baseline()
    points = scale_points(records(rules + baseline))
    assert [(point.label, point.grown, point.phi) for point in points] == [
        ("relu", "base", 0.0), ("parametric_softplus(beta=10.0)", "base", 0.0),
        ("relu", "depth", 1.0), ("parametric_softplus(beta=10.0)", "depth", 1.0),
        ("relu", "depth", 2.0), ("parametric_softplus(beta=10.0)", "depth", 2.0),
        ("relu", "depth+width+resolution", 1.0), ("parametric_softplus(beta=10.0)", "depth+width+resolution", 1.0)]
    relu_base = points[0]
    assert relu_base.seeds == 2 and relu_base.mean["pgd_acc"] == pytest.approx(0.48)
    assert relu_base.scale == (0.5, 0.5, 32.0) and relu_base.cost_flops == pytest.approx(17e6)


def test_scaling_table_compares_each_scale_with_relu():
    rules, baseline = rules_and_baseline()
    table = scaling_markdown(scale_points(records(rules + baseline)), "pgd_acc", "PGD-50").splitlines()
    assert table[0] == ("| Scaled | phi | Depth x | Width x | Resolution | MFLOPs | relu: PGD-50 (%) | "
                        "parametric_softplus(beta=10.0): PGD-50 (%) | parametric_softplus(beta=10.0) - relu (points) |")
    assert table[2] == "| base | 0 | 0.50 | 0.50 | 32 | 17.0 | 48.0 | 52.0 | +4.0 |"
    assert table[4] == "| depth | 2 | 2.00 | 0.50 | 32 | 60.0 | 50.0 | 54.0 | +4.0 |"
    assert table[5] == "| depth+width+resolution | 1 | 0.60 | 0.55 | 40 | 30.0 | 50.0 | 53.0 | +3.0 |"


def test_scaling_plot_draws_one_curve_per_configuration_and_rule(tmp_path: Path):
    rules, baseline = rules_and_baseline()
    path = plot_scaling(scale_points(records(rules + baseline)), "pgd_acc", "PGD-50", tmp_path / "scaling.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (960, 660)
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 20


def test_scaling_report_joins_a_rules_study_and_its_baseline_study(tmp_path: Path, capsys):
    rules, baseline = rules_and_baseline()
    settings = argparse.Namespace(pgd_steps=50, restarts=1, max_images=200, autoattack="none", autoattack_images=100)
    written = write_evaluation(tmp_path / "rules", rules, "pgd50", settings, not_evaluated={}).written
    assert {path.name for path in written} >= {"evaluation.csv", "scaling.md", "scaling.png"}  # scales differ
    base = write_evaluation(tmp_path / "base", baseline, "pgd50", settings, not_evaluated={})
    assert "scaling.md" not in {path.name for path in base.written}
    params, metrics = read_evaluation(tmp_path / "base" / "evaluation.csv")[0]
    assert metrics == {"clean_acc": 0.8, "pgd_acc": 0.5, "cost_flops": 17e6}
    assert params["activation"] == "relu" and "activation.beta" not in params  # empty cells are absent

    assert scaling_report_main([str(tmp_path / "rules"), str(tmp_path / "base" / "evaluation.csv"),
                                "--out", str(tmp_path / "all")]) == 0
    assert "8 configurations at 4 scales" in capsys.readouterr().out
    table = (tmp_path / "all" / "scaling.md").read_text()
    assert "| base | 0 | 0.50 | 0.50 | 32 | 17.0 | 48.0 | 52.0 | +4.0 |" in table
    assert (tmp_path / "all" / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_report_names_a_missing_evaluation(tmp_path: Path, capsys):
    assert scaling_report_main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "evaluations:" in error and "evaluation.csv" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_scaling_report_names_the_columns_a_foreign_csv_lacks(tmp_path: Path, capsys):
    table = tmp_path / "evaluation.csv"
    table.write_text("trial_id,clean_acc,pgd_acc,cost_flops,activation,width_mult\nt0,0.8,0.5,1000000,relu,0.5\n")
    assert scaling_report_main([str(table), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "depth_mult, resolution" in error and "Traceback" not in error


def test_scaling_report_names_an_evaluation_without_trials(tmp_path: Path, capsys):
    table = tmp_path / "evaluation.csv"
    table.write_text("trial_id,clean_acc,pgd_acc,cost_flops,activation,arch,depth_mult,width_mult,resolution\n")
    assert scaling_report_main([str(table), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "no trial in" in error and "only a header" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()
