"""Scaling curves across evaluated studies: strong robust accuracy against FLOPs per image, one curve per
configuration (e.g. activation) and scaled dimension, each from the common base model.

evaluate_study.py draws these for one study whose trials differ in scale. Comparing scaling rules needs the
phi=0 model once, not once per rule, so the compound_scaling preset runs it as a study of its own; this script
puts the evaluations of both (or any number of studies) on one table and one plot:

    python orchestrator/scaling_report.py satscale_eval/compound_scaling satscale_eval/compound_scaling_phi0 \\
        --out satscale_eval/compound_scaling_all
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run as a script: see scale_study.py

from orchestrator.evaluate_study import read_evaluation  # noqa: E402
from orchestrator.reports import SCALE_DIMENSIONS, plot_scaling, scale_points, scaling_markdown  # noqa: E402
from trainers.errors import ConfigError  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scaling_report.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", type=Path,
                        help="evaluate_study.py output folders (or their evaluation.csv files)")
    parser.add_argument("--metric", default="pgd_acc", choices=("pgd_acc", "clean_acc", "autoattack_acc"),
                        help="the accuracy to plot (default: pgd_acc, the strong PGD evaluation)")
    parser.add_argument("--out", type=Path, required=True, help="folder for scaling.md and scaling.png")
    return parser.parse_args(argv)


def evaluation_csv(path: Path) -> Path:
    csv_path = path / "evaluation.csv" if path.is_dir() else path
    if not csv_path.is_file():
        raise ConfigError(f"evaluations: {csv_path} does not exist; give an evaluate_study.py --out folder "
                          "(default ./satscale_eval/<study>) or its evaluation.csv")
    return csv_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = [record for path in args.evaluations for record in read_evaluation(evaluation_csv(path))]
        if not records:
            raise ConfigError("evaluations: no trial in " + ", ".join(map(str, args.evaluations))
                              + " (only a header); give the folders of evaluate_study.py runs that evaluated trials")
        if any("cost_flops" not in metrics for _params, metrics in records):
            raise ConfigError("evaluations: some trials have no cost_flops (an evaluation.csv from an older "
                              "evaluate_study.py); evaluate those studies again")
        missing = sorted({name for params, _metrics in records for name in SCALE_DIMENSIONS if name not in params})
        if missing:
            raise ConfigError(f"evaluations: some trials have no {', '.join(missing)} column; give evaluation.csv "
                              "files as evaluate_study.py writes them")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    header = {"pgd_acc": "PGD", "clean_acc": "Clean", "autoattack_acc": "AutoAttack"}[args.metric]
    points = scale_points(records)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.md").write_text(scaling_markdown(points, args.metric, header))
    plot_scaling(points, args.metric, header, args.out / "scaling.png")
    print(f"{len(points)} configurations at {len({point.scale for point in points})} scales: {args.out}/scaling.md, "
          f"{args.out}/scaling.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
