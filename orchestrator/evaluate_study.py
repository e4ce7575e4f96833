"""Strong evaluation of a finished study: every trial's final checkpoint under PGD-k with restarts and, for the
best configurations, AutoAttack (torchattacks) as a check against gradient masking.

A study's per-epoch robust accuracy uses a cheap attack (Tune needs it every epoch); the numbers a paper reports
come from here. Each trial's figures go to its MLflow child run (step = its last epoch); the per-configuration
summary (mean ± std over seeds, the AutoAttack gap to PGD) goes to --out and to the parent run's `evaluation/`,
with scaling curves (PGD accuracy against FLOPs) when the trials differ in scale. To draw those curves across
several evaluated studies (e.g. a phi=0 baseline run on its own): orchestrator/scaling_report.py.
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # run as a script: see scale_study.py

from orchestrator.scale_study import add_study_arguments, storage_uri  # noqa: E402
from trainers.errors import ConfigError  # noqa: E402

EXAMPLES = """\
examples:
  python orchestrator/evaluate_study.py --config activation_table --pgd-steps 50 --restarts 2
  python orchestrator/evaluate_study.py --config default --autoattack standard --autoattack-images 200
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate_study.py", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_study_arguments(parser)  # as given to scale_study.py for the study
    parser.add_argument("--pgd-steps", type=_positive_int, default=50, help="PGD steps (default: 50)")
    parser.add_argument("--restarts", type=_positive_int, default=2, help="PGD random restarts (default: 2)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="PGD step size (default: 2.5 * eps / steps, Madry et al.)")
    parser.add_argument("--max-images", type=_positive_int, default=1000,
                        help="test images per trial, the first of the eval set (default: 1000)")
    parser.add_argument("--autoattack", choices=("none", "apgd", "standard"), default="apgd",
                        help="AutoAttack version for the best configurations: apgd = APGD-CE + APGD-T (default), "
                             "standard = the published ensemble (adds FAB-T and Square; slow on a CPU)")
    parser.add_argument("--autoattack-top", type=_positive_int, default=2,
                        help="AutoAttack the best seed of this many best configurations, and of the best ReLU one")
    parser.add_argument("--autoattack-images", type=_positive_int, default=500,
                        help="test images for AutoAttack (and for PGD on the same images; default: 500)")
    parser.add_argument("--out", default=None, help="folder for the reports (default: ./satscale_eval/<study>)")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@dataclass
class TrialEvaluation:
    trial_id: str
    checkpoint_path: str
    params: dict
    cost_flops: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def record(self) -> tuple[dict, dict[str, float]]:
        """(params, metrics with cost_flops): a line of evaluation.csv, as `read_evaluation` gives it back."""
        return self.params, {**self.metrics, "cost_flops": self.cost_flops}


# evaluation.csv's columns before the trial params.
RESULT_COLUMNS = ("trial_id", "clean_acc", "pgd_acc", "pgd_acc_aa_images", "autoattack_acc", "cost_flops")


def finished_trials(experiment_path: str) -> list[tuple[str, str]]:
    """(trial id, last checkpoint) of every trial in the Tune experiment that reported one, in trial order."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    try:
        analysis = ExperimentAnalysis(experiment_path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"no study results in {experiment_path} ({error}); give the study's --config, --set "
                          "name=... and --storage as they were for scale_study.py") from None
    return [(trial.trial_id, trial.last_result[CHECKPOINT_PATH_KEY]) for trial in analysis.trials
            if (trial.last_result or {}).get(CHECKPOINT_PATH_KEY)]


@functools.lru_cache(maxsize=8)
def eval_images(eval_path: str, loader_json: str, max_images: int):
    """The first `max_images` test images as [0, 1] floats and their labels, as the trial's eval loader gives
    them (same resolution and crop)."""
    import torch

    from trainers.data.loader_config import LoaderConfig
    from trainers.data.loaders import build_eval_loader
    from trainers.training import to_device

    threads = torch.get_num_threads()
    loader = build_eval_loader(eval_path, LoaderConfig.model_validate_json(loader_json))
    images, labels, seen = [], [], 0
    for batch_images, batch_labels, *_ in loader:
        # FFCV reuses its batch buffers: keep copies.
        batch_images, batch_labels = to_device(batch_images.clone(), batch_labels.clone(), torch.device("cpu"))
        images.append(batch_images)
        labels.append(batch_labels)
        seen += batch_labels.shape[0]
        if seen >= max_images:
            break
    torch.set_num_threads(threads)  # FFCV's Loader sets the global thread count to its own worker count
    return torch.cat(images)[:max_images], torch.cat(labels)[:max_images]


@dataclass(frozen=True)
class Evaluator:
    """One PGD setting for every trial, on the first images of each trial's own eval set."""

    storage: str
    pgd_steps: int
    restarts: int
    step_size: float | None
    device: object

    @property
    def pgd_name(self) -> str:
        return f"pgd{self.pgd_steps}" + (f"x{self.restarts}" if self.restarts > 1 else "")

    def pgd_attack(self, trial):
        attack = trial.train.eval_attack or trial.train.train_attack
        if attack is None:
            raise ConfigError("the study has neither train.eval_attack nor train.train_attack: nothing gives "
                              "eps and norm to evaluate with")
        return attack.model_copy(update={
            "steps": self.pgd_steps, "restarts": self.restarts, "random_start": True, "keep_best": True,
            "clean_start_prob": 0.0, "step_size": self.step_size or 2.5 * attack.eps / self.pgd_steps})

    def batches(self, trial, max_images: int):
        loader = trial.loader_config().model_copy(update={"distributed": False})
        images, labels = eval_images(trial.data.eval_path, loader.model_dump_json(), max_images)
        return [(images[start:start + loader.batch_size].to(self.device),
                 labels[start:start + loader.batch_size].to(self.device))
                for start in range(0, labels.shape[0], loader.batch_size)]

    def pgd(self, trained, max_images: int) -> dict[str, float]:
        """Clean and PGD accuracy of a loaded trial."""
        from trainers.training import evaluate

        metrics = evaluate(trained.model.to(self.device), self.batches(trained.trial, max_images),
                           self.pgd_attack(trained.trial), self.device)
        return {"clean_acc": float(metrics["clean_acc"]), "pgd_acc": float(metrics["robust_acc"])}

    def autoattack(self, trained, max_images: int, version: str) -> float:
        from trainers.attacks.autoattack import autoattack_accuracy

        attack = self.pgd_attack(trained.trial)
        return autoattack_accuracy(trained.model.to(self.device), self.batches(trained.trial, max_images),
                                   attack.norm, attack.eps, trained.trial.model.num_classes, version, seed=0)


def autoattack_choices(groups, top: int) -> list:
    """The best `top` configurations by mean PGD accuracy, and the best ReLU configuration as the baseline."""
    ranked = sorted(groups, key=lambda group: -group.mean.get("pgd_acc", 0.0))
    chosen = ranked[:top]
    relu = next((group for group in ranked if group.params.get("activation") == "relu"), None)
    if relu is not None and relu not in chosen:
        chosen.append(relu)
    return chosen


def _members(evaluations: list[TrialEvaluation], group) -> list[TrialEvaluation]:
    return [item for item in evaluations
            if all(str(item.params.get(name)) == str(value) for name, value in group.params.items())]


def run(args: argparse.Namespace) -> Path:
    """Evaluate the study's trials; returns the folder with the reports."""
    import torch

    from orchestrator.reports import seed_groups
    from orchestrator.runner import experiment_path, load_trial_model
    from orchestrator.tracking import resolve_tracking_uri
    from search_spaces.space import trial_params
    from search_spaces.study import load_study

    study = load_study(args.config, args.overrides)
    storage = storage_uri(args.storage)
    tracking_uri = resolve_tracking_uri(args.mlflow_uri)
    evaluator = Evaluator(storage, args.pgd_steps, args.restarts, args.step_size,
                          torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    evaluations, stopped_early = [], []
    for trial_id, checkpoint_path in finished_trials(experiment_path(storage, study)):
        trained = load_trial_model(checkpoint_path, storage)
        if trained.epoch + 1 < trained.trial.train.epochs:
            stopped_early.append(trial_id)  # the scheduler cut its budget: not comparable
            continue
        metrics = evaluator.pgd(trained, args.max_images)
        evaluations.append(TrialEvaluation(trial_id, checkpoint_path, trial_params(trained.trial),
                                           float(trained.model.cost().flops), metrics))
        print(f"{trial_id}: clean {metrics['clean_acc']:.3f}, {evaluator.pgd_name} {metrics['pgd_acc']:.3f}",
              flush=True)
    if not evaluations:
        raise ConfigError(f"no trial of study {study.name!r} trained its full budget; nothing to evaluate")

    if args.autoattack != "none":
        for group in autoattack_choices(seed_groups((item.params, item.metrics) for item in evaluations),
                                        args.autoattack_top):
            best = max(_members(evaluations, group), key=lambda item: item.metrics["pgd_acc"])
            trained = load_trial_model(best.checkpoint_path, storage)
            # PGD again on exactly the images AutoAttack sees: the gap is per image, not per sample size.
            same_images = evaluator.pgd(trained, args.autoattack_images)["pgd_acc"]
            accuracy = evaluator.autoattack(trained, args.autoattack_images, args.autoattack)
            best.metrics.update(pgd_acc_aa_images=same_images, autoattack_acc=accuracy)
            print(f"{best.trial_id} ({group.label}): {evaluator.pgd_name} {same_images:.3f}, "
                  f"AutoAttack ({args.autoattack}) {accuracy:.3f}", flush=True)

    out = Path(args.out or Path("satscale_eval") / study.name)
    write_evaluation(out, evaluations, evaluator.pgd_name, args, stopped_early)
    log_evaluation(tracking_uri, study.name, evaluations, evaluator.pgd_name, out)
    return out


def _columns(pgd_name: str, autoattack: str) -> dict[str, str]:
    return {"clean_acc": "Clean", "pgd_acc": pgd_name.upper(), "pgd_acc_aa_images": f"{pgd_name.upper()}, AA images",
            "autoattack_acc": f"AutoAttack ({autoattack})"}


def read_evaluation(path: Path) -> list[tuple[dict, dict[str, float]]]:
    """(params, metrics with cost_flops) per trial from an evaluation.csv this script wrote; empty cells are
    absent values."""
    import csv

    records = []
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            metrics = {name: float(row[name]) for name in RESULT_COLUMNS[1:] if row.get(name) not in (None, "")}
            params = {name: value for name, value in row.items() if name not in RESULT_COLUMNS and value != ""}
            records.append((params, metrics))
    return records


def _differ_in_scale(evaluations: list[TrialEvaluation]) -> bool:
    from orchestrator.reports import SCALE_DIMENSIONS

    return len({tuple(item.params[name] for name in SCALE_DIMENSIONS) for item in evaluations}) > 1


def write_evaluation(out: Path, evaluations: list[TrialEvaluation], pgd_name: str, args: argparse.Namespace,
                     stopped_early: list[str]) -> list[Path]:
    """evaluation.csv (one line per trial), evaluation.md (per configuration, mean ± std over seeds, and the
    AutoAttack gaps) and evaluation.png; scaling.md and scaling.png when the trials differ in scale."""
    import csv

    from orchestrator.reports import (plot_scaling, plot_seed_groups, scale_points, scaling_markdown, seed_groups,
                                      seed_groups_markdown)

    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(pgd_name, args.autoattack)
    table = out / "evaluation.csv"
    param_names = sorted({name for item in evaluations for name in item.params})
    with open(table, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[*RESULT_COLUMNS, *param_names])
        writer.writeheader()
        for item in evaluations:
            params, metrics = item.record
            writer.writerow({**params, "trial_id": item.trial_id, **metrics})
    groups = seed_groups((item.params, item.metrics) for item in evaluations)
    lines = [f"PGD: {args.pgd_steps} steps, {args.restarts} restart(s), first {args.max_images} test images per "
             f"trial; AutoAttack ({args.autoattack}) on the first {args.autoattack_images}.", "",
             seed_groups_markdown(groups, columns)]
    attacked = [item for item in evaluations if "autoattack_acc" in item.metrics]
    if attacked:
        lines += ["", f"| Trial | Configuration | {pgd_name.upper()} (%) | AutoAttack (%) | Gap (points) |",
                  "|---|---|---:|---:|---:|"]
        labels = {id(item): group.label for group in groups for item in _members(evaluations, group)}
        for item in attacked:
            pgd, autoattack = item.metrics["pgd_acc_aa_images"], item.metrics["autoattack_acc"]
            lines.append(f"| {item.trial_id} | {labels[id(item)]} | {100 * pgd:.1f} | {100 * autoattack:.1f} | "
                         f"{100 * (pgd - autoattack):.1f} |")
    if stopped_early:
        lines += ["", f"Not evaluated (stopped early by the scheduler): {', '.join(stopped_early)}."]
    summary = out / "evaluation.md"
    summary.write_text("\n".join(lines) + "\n")
    plot = plot_seed_groups(groups, {"clean_acc": "Clean", "pgd_acc": pgd_name.upper()}, out / "evaluation.png",
                            f"Clean and {pgd_name.upper()} accuracy per configuration")
    written = [table, summary, plot]
    if _differ_in_scale(evaluations):
        points = scale_points(item.record for item in evaluations)
        scaling = out / "scaling.md"
        scaling.write_text(scaling_markdown(points, "pgd_acc", pgd_name.upper()))
        written += [scaling, plot_scaling(points, "pgd_acc", pgd_name.upper(), out / "scaling.png")]
    return written


def log_evaluation(tracking_uri: str, study_name: str, evaluations: list[TrialEvaluation], pgd_name: str,
                   out: Path) -> None:
    """Each trial's numbers to its child run (as `<pgd_name>_acc`, `autoattack_acc`, ...), the reports to the
    parent run's `evaluation/`; skipped when the study was not tracked at this URI."""
    from orchestrator.tracking import StudyTracker

    tracker = StudyTracker(tracking_uri, experiment_name=study_name)
    parent_run_id = tracker.study_run_id(study_name)
    if parent_run_id is None:
        print(f"study {study_name!r} has no MLflow run at {tracking_uri}: reports are in {out} only")
        return
    names = {"clean_acc": "final_clean_acc", "pgd_acc": f"{pgd_name}_acc",
             "pgd_acc_aa_images": f"{pgd_name}_acc_autoattack_images", "autoattack_acc": "autoattack_acc"}
    for item in evaluations:
        run_id = tracker.trial_run(parent_run_id, item.trial_id, item.params, restart=False)
        tracker.log_epoch(run_id, {names[name]: value for name, value in item.metrics.items()},
                          epoch=int(item.params["epochs"]) - 1)
    tracker.log_reports(parent_run_id, out, artifact_path="evaluation")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except ConfigError as error:
        print(f"evaluate_study: {error}", file=sys.stderr)
        return 2
    print((out / "evaluation.md").read_text())
    print(f"reports: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
