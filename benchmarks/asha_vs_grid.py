"""ASHA versus the full grid on the same search space: compute spent and the best robust accuracy found.

Runs the embedded default study's space (ReLU, SiLU, GELU, Softplus x two widths on the Fashion-MNIST subset,
PGD adversarial training) twice through `scale_study.py`, each in a fresh folder: once under ASHA (grace period
1 epoch, reduction factor 2) and once FIFO, every trial to the full budget. Compute is counted as trial-epochs
(epochs trained, over all trials) and trial-seconds (each trial's wall time, summed); the best is the highest
final robust accuracy of any trial. Each trial's seed is fixed, but two studies on a shared 2-core machine do
not train a trial bit-identically (benchmarks/README.md): compare the schedulers on compute and on which
configuration wins, not on a point or two of accuracy.

    python benchmarks/asha_vs_grid.py                   # 4 epochs per trial; about 21 minutes on 2 cores
    python benchmarks/asha_vs_grid.py --epochs 6
"""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from embedded_default import StudyRun, machine, run_scale_study, write_record

RESULTS = Path(__file__).parent / "results" / "asha_vs_grid.json"


def summary(run: StudyRun) -> dict:
    finals = [results[-1] for results in run.trials if results]
    best = max(finals, key=lambda result: result["robust_acc"])
    return {
        "wall_seconds": round(run.wall_seconds, 1), "trials": len(finals),
        "trial_epochs": sum(len(results) for results in run.trials),
        "trial_seconds": round(sum(final["time_total_s"] for final in finals), 1),
        "best_robust_acc": best["robust_acc"], "best_clean_acc": best["clean_acc"],
        "best_trial": best["config"], "best_trial_epochs": best["training_iteration"],
        "leaderboard": run.leaderboard,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="the full budget per trial")
    parser.add_argument("--own-ray-head", action="store_true",
                        help="run on a Ray head this script starts (see embedded_default.py)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    host = machine()
    runs = {}
    for scheduler in ("asha", "fifo"):
        runs[scheduler] = summary(run_scale_study(["--set", f"train.epochs={args.epochs}",
                                                   "--set", f"tune.scheduler={scheduler}"],
                                                  own_head=args.own_ray_head))
        print(scheduler, json.dumps({k: v for k, v in runs[scheduler].items() if k != "leaderboard"}), flush=True)
    asha, grid = runs["asha"], runs["fifo"]
    record = {
        "benchmark": "asha_vs_grid", "date": datetime.date.today().isoformat(), "machine": host,
        "settings": {"own_ray_head": args.own_ray_head, "space": "embedded default (search_spaces/presets/default.yaml)", "epochs": args.epochs,
                     "asha": {"grace_period": 1, "reduction_factor": 2}},
        "asha": asha, "grid": grid,
        "asha_over_grid": {"trial_epochs": round(asha["trial_epochs"] / grid["trial_epochs"], 3),
                           "trial_seconds": round(asha["trial_seconds"] / grid["trial_seconds"], 3),
                           "wall_seconds": round(asha["wall_seconds"] / grid["wall_seconds"], 3),
                           "best_robust_acc_difference": round(asha["best_robust_acc"] - grid["best_robust_acc"], 4)},
    }
    write_record(args.output, record)
    print(json.dumps(record["asha_over_grid"]))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
