"""benchmarks/gpu_check.py in --smoke mode: every section's code path on CPU at toy sizes, so the check that
runs on a lent GPU machine cannot rot where none exists (CI never has one). What needs CUDA is replaced by its
CPU path (gloo for NCCL) or skipped with the reason recorded."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run_check(out: Path, *arguments: str) -> tuple[subprocess.CompletedProcess, dict]:
    completed = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *arguments],
                               capture_output=True, text=True, timeout=240, cwd=ROOT)
    return completed, json.loads((out / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    return run_check(tmp_path_factory.mktemp("gpu_check"))


def test_the_smoke_check_runs_every_section_and_exits_cleanly(smoke):
    completed, record = smoke
    assert completed.returncode == 0, completed.stdout + completed.stderr
    sections = record["sections"]
    assert list(sections) == ["environment", "training", "attack_precision", "at_step", "robustness",
                              "loader_cores", "compile"]
    assert record["mode"] == "smoke"
    assert sections["environment"]["result"]["torch"]
    assert sections["compile"]["status"] == "skipped" and "--smoke" in sections["compile"]["reason"]
    # robustness lives in its own virtualenv here; the check says how to get it where it is missing.
    robustness = sections["robustness"]
    assert robustness["status"] == "ok" or "make gpu-check-bundle" in robustness["reason"]


def test_the_training_loop_is_deterministic_and_checkpoints_round_trip(smoke):
    training = smoke[1]["sections"]["training"]
    assert training["status"] == "ok", training
    result = training["result"]
    assert result["deterministic"] == {"same_metrics": True, "same_weights": True}
    assert result["checkpoint"] == {"state_equal": True, "on_device": True, "model_logits_equal": True}
    assert result["ddp"]["backend"] == "gloo" and math.isfinite(result["ddp"]["train_loss"])
    assert "Fashion-MNIST test" in result["data"]  # Debian's copy is installed by the test set-up
    assert 0 <= result["history"][-1]["robust_acc"] <= result["history"][-1]["clean_acc"] <= 1


def test_attack_strength_is_compared_across_precisions_on_the_same_weights(smoke):
    precision = smoke[1]["sections"]["attack_precision"]
    assert precision["status"] == "ok", precision
    rows = precision["result"]["precisions"]
    assert set(rows) == {"off", "bf16", "fp16"}
    for amp in ("bf16", "fp16"):
        difference = rows[amp]["minus_fp32"]
        assert difference["low"] <= difference["value"] <= difference["high"]
        assert difference["value"] == pytest.approx(rows[amp]["robust_acc"] - rows["off"]["robust_acc"], abs=1e-3)


def test_every_activation_is_timed_against_relu_and_its_bound(smoke):
    at_step = smoke[1]["sections"]["at_step"]
    assert at_step["status"] == "ok", at_step
    groups = at_step["result"]["groups"]
    assert {(group["amp"], group["model"].split()[0]) for group in groups} >= {
        (amp, arch) for amp in ("bf16", "off") for arch in ("resnet18", "efficientnet_b0")}
    full = groups[0]
    assert {row["activation"] for row in full["rows"]} == {"relu", "silu", "gelu", "softplus",
                                                          "parametric_softplus"}
    for row in full["rows"]:
        assert row["seconds_per_step"] > 0 and row["bound_s"] > 0 and row["vs_relu_same_k"] > 0
    assert full["sat_claim_holds"] == (full["smooth_vs_relu_max"] <= 1.02)
    cores = smoke[1]["sections"]["loader_cores"]["result"]["rows"]
    assert [row["resolution"] for row in cores] == [16, 32] and all(row["at_images_per_s"] > 0 for row in cores)


def test_a_section_past_its_cap_is_recorded_and_the_next_one_still_runs(tmp_path):
    completed, record = run_check(tmp_path, "--sections", "loader_cores", "at_step", "--cap", "at_step=0.05")
    assert completed.returncode == 1
    sections = record["sections"]
    assert list(sections) == ["at_step", "loader_cores"]  # the check's own order, whatever the command's
    assert sections["at_step"]["status"] == "timed_out" and "0.05 s" in sections["at_step"]["error"]
    assert sections["loader_cores"]["status"] == "ok"


def test_a_bad_cap_names_the_sections(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    with pytest.raises(SystemExit, match="at_step"):
        gpu_check.parse_args(["--smoke", "--out", "unused", "--cap", "at_stp=5"])
