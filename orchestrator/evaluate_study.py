"""Strong evaluation of a finished study: every trial's final checkpoint under PGD-k with restarts and, for the
best configurations, AutoAttack (torchattacks) as a check against gradient masking.

A study's per-epoch robust accuracy uses a cheap attack (Tune needs it every epoch); the numbers a paper reports
come from here. Every trial is evaluated on the whole test split (or, with --max-images, a seeded class-balanced
subset that is the same for every trial), through its true gradient whatever its activation; an image counts
as robust only if it is also classified correctly clean. Every accuracy gets a 95 % interval and every
configuration its paired difference to its baseline (ReLU at the same scale, or --baseline) with a 95 % interval
and the smallest difference the study could detect (orchestrator/comparisons.py: a two-way bootstrap over seeds
and images). Each trial's figures go to its MLflow child run (step = its last epoch); the reports go to --out and
to the parent run's `evaluation/`, with scaling curves (PGD accuracy against FLOPs) when the trials differ in
scale. To draw those curves across several evaluated studies (e.g. a phi=0 baseline run on its own):
orchestrator/scaling_report.py.
"""
from __future__ import annotations

import argparse
import functools
import re
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
    parser.add_argument("--max-images", type=_positive_int, default=None,
                        help="evaluate a seeded, class-balanced subset of this many test images, the same for "
                             "every trial (default: the whole test split)")
    parser.add_argument("--autoattack", choices=("none", "apgd", "standard"), default="apgd",
                        help="AutoAttack version for the best configurations: apgd = APGD-CE + APGD-T (default), "
                             "standard = the published ensemble (adds FAB-T and Square; slow on a CPU)")
    parser.add_argument("--autoattack-top", type=_positive_int, default=2,
                        help="AutoAttack the best seed of this many best configurations, and of the best ReLU one")
    parser.add_argument("--autoattack-images", type=_positive_int, default=500,
                        help="a class-balanced subset of the evaluated images for AutoAttack (and for PGD on the "
                             "same images; default: 500)")
    parser.add_argument("--baseline", default="relu",
                        help="what every configuration is compared with: an activation name (the one at the same "
                             "scale and settings) or a configuration's full label (default: relu)")
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
    # Per evaluated image, 1 where it was classified correctly: "clean_acc" and "pgd_acc" over the evaluated
    # images; "pgd_acc_aa_images" and "autoattack_acc" over AutoAttack's subset of them.
    outcomes: dict[str, object] = field(default_factory=dict)

    @property
    def record(self) -> tuple[dict, dict[str, float]]:
        """(params, metrics with cost_flops): a line of evaluation.csv, as `read_evaluation` gives it back."""
        return self.params, {**self.metrics, "cost_flops": self.cost_flops}


# evaluation.csv's columns before the trial params (the intervals are each trial's, over its images).
RESULT_COLUMNS = ("trial_id", "clean_acc", "clean_acc_low", "clean_acc_high", "pgd_acc", "pgd_acc_low",
                  "pgd_acc_high", "pgd_acc_aa_images", "autoattack_acc", "cost_flops")
OUTCOMES_FILE = "outcomes.npz"


@dataclass(frozen=True)
class StudyTrial:
    """A trial of the study's Tune experiment: its last checkpoint, and why it is not evaluated (None: it is)."""

    trial_id: str
    checkpoint_path: str | None
    excluded: str | None


def study_trials(experiment_path: str) -> list[StudyTrial]:
    """Every trial of the Tune experiment, in trial order. Only trials that ended without error are evaluated: a
    failed trial's last checkpoint can be its last epoch's, and a trial that had not ended is still training."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    try:
        analysis = ExperimentAnalysis(experiment_path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"no study results in {experiment_path} ({error}); give the study's --config, --set "
                          "name=... and --storage as they were for scale_study.py") from None
    trials = []
    for trial in analysis.trials:
        last_result = trial.last_result or {}
        checkpoint_path = last_result.get(CHECKPOINT_PATH_KEY)
        if trial.status == Trial.ERROR:
            excluded = "failed"
        elif trial.status != Trial.TERMINATED:  # the saved state (an interrupted study saves its trials RUNNING)
            excluded = "had not ended: resume the study, then evaluate it"
        elif not checkpoint_path:
            excluded = "no checkpoint"
        else:
            excluded = None
        trials.append(StudyTrial(trial.trial_id, checkpoint_path, excluded))
    return trials


@functools.lru_cache(maxsize=8)
def eval_images(eval_path: str, loader_json: str):
    """Every test image as [0, 1] floats and its label, as the trial's eval loader gives them (same resolution
    and crop), in the file's order."""
    import torch

    from trainers.data.loader_config import LoaderConfig
    from trainers.data.loaders import build_eval_loader
    from trainers.training import to_device

    loader = build_eval_loader(eval_path, LoaderConfig.model_validate_json(loader_json))
    images, labels = [], []
    for batch_images, batch_labels, *_ in loader:
        # FFCV reuses its batch buffers: keep copies.
        batch_images, batch_labels = to_device(batch_images.clone(), batch_labels.clone(), torch.device("cpu"))
        images.append(batch_images)
        labels.append(batch_labels)
    return torch.cat(images), torch.cat(labels)


@dataclass(frozen=True)
class Evaluator:
    """One PGD setting for every trial, on the same test images of each trial's own eval set."""

    storage: str
    pgd_steps: int
    restarts: int
    step_size: float | None
    device: object
    max_images: int | None = None
    autoattack_images: int = 500

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

    def batches(self, trial, autoattack: bool = False):
        """The evaluated images in batches: all, or `max_images` of them class-balanced; with `autoattack`,
        `autoattack_images` of those, class-balanced."""
        from trainers.data.subsets import balanced_subset

        loader = trial.loader_config().model_copy(update={"distributed": False, "eval_samples": None})
        images, labels = eval_images(trial.data.eval_path, loader.model_dump_json())
        for count in (self.max_images, self.autoattack_images if autoattack else None):
            if count:
                chosen = balanced_subset(labels.numpy(), count)
                images, labels = images[chosen], labels[chosen]
        return [(images[start:start + loader.batch_size].to(self.device),
                 labels[start:start + loader.batch_size].to(self.device))
                for start in range(0, labels.shape[0], loader.batch_size)]

    def pgd(self, trained, autoattack_images: bool = False) -> dict[str, object]:
        """Per image, correct clean and correct under PGD too (bool arrays), from the trial seed's evaluation
        stream: trials with the same seed get the same random starts."""
        import torch

        from trainers.seeding import stream_generator
        from trainers.training import iter_outcomes

        generator = stream_generator(trained.trial.train.seed, "final_evaluation", device=self.device)
        batches = self.batches(trained.trial, autoattack_images)
        clean, robust = zip(*iter_outcomes(trained.model.to(self.device), batches, self.pgd_attack(trained.trial),
                                           self.device, generator=generator))
        return {"clean_acc": torch.cat(clean).cpu().numpy(), "pgd_acc": torch.cat(robust).cpu().numpy()}

    def autoattack(self, trained, version: str):
        """Per AutoAttack image, correct clean and under AutoAttack (a bool array)."""
        from trainers.attacks.autoattack import autoattack_outcomes

        attack = self.pgd_attack(trained.trial)
        return autoattack_outcomes(trained.model.to(self.device), self.batches(trained.trial, autoattack=True),
                                   attack.norm, attack.eps, trained.trial.model.num_classes, version,
                                   seed=trained.trial.train.seed).cpu().numpy()


def autoattack_choices(groups, top: int, baseline: str = "relu") -> list:
    """The best `top` configurations by mean PGD accuracy, and the best baseline configuration."""
    ranked = sorted(groups, key=lambda group: -group.mean.get("pgd_acc", 0.0))
    chosen = ranked[:top]
    reference = next((group for group in ranked if _is_baseline(group, baseline)), None)
    if reference is not None and reference not in chosen:
        chosen.append(reference)
    return chosen


def _members(evaluations: list[TrialEvaluation], group) -> list[TrialEvaluation]:
    return [item for item in evaluations
            if all(str(item.params.get(name)) == str(value) for name, value in group.params.items())]


def run(args: argparse.Namespace) -> Path:
    """Evaluate the study's trials; returns the folder with the reports."""
    import torch

    from orchestrator.reports import seed_groups
    from orchestrator.preflight import experiment_path
    from orchestrator.runner import load_trial_model
    from orchestrator.tracking import resolve_tracking_uri
    from search_spaces.space import trial_params
    from search_spaces.study import load_study

    study = load_study(args.config, args.overrides)
    storage = storage_uri(args.storage)
    tracking_uri = resolve_tracking_uri(args.mlflow_uri)
    evaluator = Evaluator(storage, args.pgd_steps, args.restarts, args.step_size,
                          torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.max_images,
                          args.autoattack_images)
    evaluations, not_evaluated = [], {}
    results_path = experiment_path(storage, study)  # the study's latest run
    for study_trial in study_trials(results_path):
        trial_id, checkpoint_path = study_trial.trial_id, study_trial.checkpoint_path
        if study_trial.excluded:
            not_evaluated[trial_id] = study_trial.excluded
            continue
        trained = load_trial_model(checkpoint_path, storage)
        if trained.epoch + 1 < trained.trial.train.epochs:
            not_evaluated[trial_id] = "stopped early by the scheduler"  # a cut budget: not comparable
            continue
        outcomes = evaluator.pgd(trained)
        item = TrialEvaluation(trial_id, checkpoint_path, trial_params(trained.trial),
                               float(trained.model.cost().flops), outcomes=outcomes)
        item.metrics.update({name: float(values.mean()) for name, values in outcomes.items()})
        evaluations.append(item)
        print(f"{trial_id}: clean {item.metrics['clean_acc']:.3f}, {evaluator.pgd_name} "
              f"{item.metrics['pgd_acc']:.3f} ({outcomes['pgd_acc'].shape[0]} images)", flush=True)
    if not evaluations:
        why = "; ".join(f"{trial_id}: {reason}" for trial_id, reason in not_evaluated.items()) or "no trials"
        raise ConfigError(f"no trial of study {study.name!r} ended with its full budget ({why}); nothing to evaluate")

    if args.autoattack != "none":
        for group in autoattack_choices(seed_groups((item.params, item.metrics) for item in evaluations),
                                        args.autoattack_top, args.baseline):
            best = max(_members(evaluations, group), key=lambda item: item.metrics["pgd_acc"])
            trained = load_trial_model(best.checkpoint_path, storage)
            # PGD again on exactly the images AutoAttack sees: the gap is per image, not per sample size.
            best.outcomes.update(pgd_acc_aa_images=evaluator.pgd(trained, autoattack_images=True)["pgd_acc"],
                                 autoattack_acc=evaluator.autoattack(trained, args.autoattack))
            best.metrics.update({name: float(best.outcomes[name].mean())
                                 for name in ("pgd_acc_aa_images", "autoattack_acc")})
            print(f"{best.trial_id} ({group.label}): {evaluator.pgd_name} {best.metrics['pgd_acc_aa_images']:.3f}, "
                  f"AutoAttack ({args.autoattack}) {best.metrics['autoattack_acc']:.3f}", flush=True)

    out = Path(args.out or Path("satscale_eval") / study.name)
    summary = write_evaluation(out, evaluations, evaluator.pgd_name, args, not_evaluated)
    log_evaluation(tracking_uri, study.name, results_path, summary, evaluator.pgd_name, out)
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


# ------------------------------------------------------------------------------------------ uncertainty

COMPARED_METRICS = ("clean_acc", "pgd_acc")


def _is_baseline(group, baseline: str) -> bool:
    return baseline in (group.label, str(group.params.get("activation")))


def _settings(params: dict) -> tuple:
    """Everything that defines a configuration apart from its activation: what a baseline must share."""
    return tuple(sorted((name, str(value)) for name, value in params.items()
                        if name != "activation" and not name.startswith("activation.")))


def baseline_for(group, groups, baseline: str):
    """The baseline configuration `group` is compared with: `baseline` at the same settings (scale, attack,
    budget), or None (none exists, or `group` is it)."""
    return next((other for other in groups if other is not group and _is_baseline(other, baseline)
                 and (other.label == baseline or _settings(other.params) == _settings(group.params))), None)


@dataclass
class EvaluationSummary:
    """What write_evaluation found, for the reports and the MLflow runs: per trial its interval over its images;
    per configuration its accuracies' intervals and its paired differences to the baseline."""

    evaluations: list[TrialEvaluation]
    groups: list
    trial_accuracies: dict[str, dict] = field(default_factory=dict)  # trial id -> metric -> Estimate
    accuracies: dict[str, dict] = field(default_factory=dict)        # group label -> metric -> Estimate
    comparisons: list = field(default_factory=list)                  # Comparison
    written: list[Path] = field(default_factory=list)                # the report files

    def group_of(self, item: TrialEvaluation):
        return next(group for group in self.groups if item in _members(self.evaluations, group))

    def outcome_matrix(self, label: str, metric: str, seeds):
        """[seeds, images] outcomes of configuration `label`, row k its trial trained with seeds[k]."""
        import numpy as np

        group = next(group for group in self.groups if group.label == label)
        by_seed = {str(item.params.get("seed")): item for item in _members(self.evaluations, group)}
        return np.stack([by_seed[str(seed)].outcomes[metric] for seed in seeds])


def summarize(evaluations: list[TrialEvaluation], baseline: str) -> EvaluationSummary:
    """Intervals per configuration (two-way bootstrap over its seeds and images) and every configuration's
    difference to its baseline, paired by the seeds both ran and by image. Trials without per-image outcomes
    (an evaluation.csv read back) get no interval."""
    from orchestrator.comparisons import Comparison, accuracy, paired_difference
    from orchestrator.reports import seed_groups

    summary = EvaluationSummary(evaluations, seed_groups((item.params, item.metrics) for item in evaluations))
    summary.trial_accuracies = {item.trial_id: {metric: accuracy(item.outcomes[metric])
                                                for metric in COMPARED_METRICS if metric in item.outcomes}
                                for item in evaluations}
    for group in summary.groups:
        if all(metric in item.outcomes for item in _members(evaluations, group) for metric in COMPARED_METRICS):
            summary.accuracies[group.label] = {
                metric: accuracy(summary.outcome_matrix(group.label, metric, group.seeds))
                for metric in COMPARED_METRICS}
    for group in summary.groups:
        reference = baseline_for(group, summary.groups, baseline)
        if reference is None or not {group.label, reference.label} <= set(summary.accuracies):
            continue
        common = tuple(seed for seed in group.seeds if str(seed) in {str(other) for other in reference.seeds})
        for metric in COMPARED_METRICS if common else ():
            summary.comparisons.append(Comparison(group.label, reference.label, metric, common, paired_difference(
                summary.outcome_matrix(group.label, metric, common),
                summary.outcome_matrix(reference.label, metric, common))))
    return summary


def _images_text(args: argparse.Namespace, evaluations: list[TrialEvaluation]) -> str:
    images = next(iter(evaluations[0].outcomes.values())).shape[0] if evaluations[0].outcomes else args.max_images
    chosen = f"a class-balanced subset of {images}" if args.max_images else f"all {images or 'the'}"
    return f"{chosen} test images per trial (the same images for every trial)"


def _accuracy_table(summary: EvaluationSummary, columns: dict[str, str]) -> str:
    from orchestrator.comparisons import interval_text

    shown = {metric: columns[metric] for metric in COMPARED_METRICS}
    lines = ["| Configuration | Seeds | " + " | ".join(f"{header} (%) [95 % CI]" for header in shown.values())
             + f" | {shown['pgd_acc']} std over seeds (points) |",
             "|---|---:|" + "---:|" * (len(shown) + 1)]
    for group in summary.groups:
        estimates = summary.accuracies.get(group.label, {})
        cells = [group.label, len(group.seeds),
                 *(interval_text(estimates[metric]) if metric in estimates else f"{100 * group.mean[metric]:.1f}"
                   for metric in shown),
                 f"{100 * group.std['pgd_acc']:.1f}" if len(group.seeds) > 1 else "–"]  # one seed: no spread
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _autoattack_table(summary: EvaluationSummary, columns: dict[str, str]) -> list[str]:
    from orchestrator.comparisons import interval_text, paired_difference

    attacked = [item for item in summary.evaluations if "autoattack_acc" in item.outcomes]
    if not attacked:
        return []
    lines = ["", "AutoAttack as a check against gradient masking (the gap is paired by image):", "",
             f"| Trial | Configuration | Images | {columns['pgd_acc']} (%) | {columns['autoattack_acc']} (%) | "
             "Gap (points) [95 % CI] |",
             "|---|---|---:|---:|---:|---:|"]
    for item in attacked:
        gap = paired_difference(item.outcomes["pgd_acc_aa_images"], item.outcomes["autoattack_acc"])
        lines.append(f"| {item.trial_id} | {summary.group_of(item).label} | {gap.images} | "
                     f"{100 * item.metrics['pgd_acc_aa_images']:.1f} | {100 * item.metrics['autoattack_acc']:.1f} | "
                     f"{interval_text(gap, signed=True)} |")
    return lines


def write_evaluation(out: Path, evaluations: list[TrialEvaluation], pgd_name: str, args: argparse.Namespace,
                     not_evaluated: dict[str, str]) -> EvaluationSummary:
    """evaluation.csv (one line per trial, with its interval over images), outcomes.npz (per trial and image),
    evaluation.md (per configuration: accuracies with 95 % intervals, paired differences to the baseline,
    the AutoAttack gaps), comparisons.csv/.md/.png and evaluation.png; scaling.md and scaling.png when the trials
    differ in scale. Returns the summary, the files in `written`."""
    import csv

    import numpy as np

    from orchestrator.comparisons import RESAMPLES, comparisons_markdown, plot_comparisons, write_comparisons_csv
    from orchestrator.reports import plot_scaling, plot_seed_groups, scale_points, scaling_markdown

    out.mkdir(parents=True, exist_ok=True)
    columns = _columns(pgd_name, args.autoattack)
    baseline = getattr(args, "baseline", "relu")
    summary = summarize(evaluations, baseline)
    table = out / "evaluation.csv"
    param_names = sorted({name for item in evaluations for name in item.params})
    with open(table, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[*RESULT_COLUMNS, *param_names])
        writer.writeheader()
        for item in evaluations:
            params, metrics = item.record
            bounds = {f"{metric}_{end}": getattr(estimate, end) for metric, estimate in
                      summary.trial_accuracies[item.trial_id].items() for end in ("low", "high")}
            writer.writerow({**params, "trial_id": item.trial_id, **metrics, **bounds})
    written = [table]
    if any(item.outcomes for item in evaluations):
        outcomes = out / OUTCOMES_FILE
        np.savez_compressed(outcomes, **{f"{item.trial_id}/{metric}": values for item in evaluations
                                         for metric, values in item.outcomes.items()})
        written.append(outcomes)
    lines = [f"PGD: {args.pgd_steps} steps, {args.restarts} restart(s), on {_images_text(args, evaluations)}; an "
             "image counts as robust only if it is also classified correctly clean.",
             f"Intervals: 95 %, a two-way bootstrap over seeds and test images ({RESAMPLES} resamples); with one "
             "seed they cover test-set sampling only.", "", _accuracy_table(summary, columns)]
    if summary.comparisons:
        lines += [f"Paired differences to the baseline ({baseline} at the same settings), by seed and by image; "
                  "'Detectable' is the smallest true difference this design finds with 80 % power:", "",
                  comparisons_markdown(summary.comparisons, columns)]
        comparison_table = out / "comparisons.md"
        comparison_table.write_text(comparisons_markdown(summary.comparisons, columns))
        written += [comparison_table, write_comparisons_csv(summary.comparisons, out / "comparisons.csv"),
                    plot_comparisons(summary.comparisons, "pgd_acc", columns["pgd_acc"], out / "comparisons.png")]
    lines += _autoattack_table(summary, columns)
    if not_evaluated:
        lines += ["", "Not evaluated: " + ", ".join(f"{trial_id} ({reason})" for trial_id, reason in
                                                   not_evaluated.items()) + "."]
    report = out / "evaluation.md"
    report.write_text("\n".join(lines) + "\n")
    errors = {label: {metric: (estimate.low, estimate.high) for metric, estimate in estimates.items()}
              for label, estimates in summary.accuracies.items()}
    written += [report, plot_seed_groups(summary.groups, {"clean_acc": "Clean", "pgd_acc": pgd_name.upper()},
                                         out / "evaluation.png",
                                         f"Clean and {pgd_name.upper()} accuracy per configuration", errors)]
    if _differ_in_scale(evaluations):
        points = scale_points(item.record for item in evaluations)
        scaling = out / "scaling.md"
        scaling.write_text(scaling_markdown(points, "pgd_acc", pgd_name.upper()))
        written += [scaling, plot_scaling(points, "pgd_acc", pgd_name.upper(), out / "scaling.png")]
    summary.written = written
    return summary


def log_evaluation(tracking_uri: str, study_name: str, results_path: str, summary: EvaluationSummary,
                   pgd_name: str, out: Path) -> None:
    """Each trial's numbers to its child run (as `<pgd_name>_acc` with `_ci_low`/`_ci_high` over its images,
    `autoattack_acc`, ... and its configuration's paired difference to the baseline, `_diff`, with its interval
    and the detectable difference); every comparison and the reports (`evaluation/`) to the parent run; skipped
    when the study was not tracked at this URI."""
    from orchestrator.tracking import StudyTracker

    tracker = StudyTracker(tracking_uri, experiment_name=study_name)
    parent_run_id = tracker.study_run_id(study_name, results_path)
    if parent_run_id is None:
        print(f"study {study_name!r} ({results_path}) has no MLflow run at {tracking_uri}: reports are in {out} only")
        return
    names = {"clean_acc": "final_clean_acc", "pgd_acc": f"{pgd_name}_acc",
             "pgd_acc_aa_images": f"{pgd_name}_acc_autoattack_images", "autoattack_acc": "autoattack_acc"}
    for item in summary.evaluations:
        metrics = {names[name]: value for name, value in item.metrics.items()}
        for metric, estimate in summary.trial_accuracies[item.trial_id].items():
            metrics.update({f"{names[metric]}_ci_low": estimate.low, f"{names[metric]}_ci_high": estimate.high})
        label = summary.group_of(item).label
        for comparison in summary.comparisons:
            if comparison.label == label:
                name, estimate = f"{names[comparison.metric]}_diff", comparison.difference
                metrics.update({name: estimate.value, f"{name}_ci_low": estimate.low,
                                f"{name}_ci_high": estimate.high, f"{name}_detectable": estimate.detectable})
        run_id = tracker.trial_run(parent_run_id, item.trial_id, item.params, restart=False)
        tracker.log_epoch(run_id, metrics, epoch=int(item.params["epochs"]) - 1, replace=True)
        tracker.finish_trial(run_id, "finished")  # only trials that finished are evaluated; a run made here ends
    # The parent run: every comparison under `<metric>_diff/<configuration>`, so the study's page lists them.
    study_metrics = {}
    for comparison in summary.comparisons:
        key, estimate = f"{names[comparison.metric]}_diff/{_metric_key(comparison.label)}", comparison.difference
        study_metrics.update({key: estimate.value, f"{key}_ci_low": estimate.low, f"{key}_ci_high": estimate.high,
                              f"{key}_detectable": estimate.detectable})
    tracker.log_epoch(parent_run_id, study_metrics, epoch=0, replace=True)
    tracker.log_reports(parent_run_id, out, artifact_path="evaluation")


def _metric_key(label: str) -> str:
    """A configuration's label as MLflow accepts in a metric name (letters, digits, _ - . space /)."""
    return re.sub(r"[^A-Za-z0-9_. -]+", "_", label).strip("_")[:180]


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
