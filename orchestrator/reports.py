"""A study's reports from its trials' final results: leaderboard (CSV, Markdown, with what each trial spent), a
Pareto-frontier plot of clean against robust accuracy and one of robust accuracy against device-hours and,
when trials repeat a configuration over seeds, each configuration's mean ± std; and, for trials that differ in
scale, scaling curves (accuracy against FLOPs per image, one curve per configuration and scaled dimension).

Pure: no MLflow, no Ray. The tracker logs the files these functions write.
"""
from __future__ import annotations

import csv
import statistics
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from orchestrator.comparisons import binomial_accuracy
from orchestrator.costs import Spend, total_spend

# budget: paused or never started because the study's budget was spent (resumable with a larger one).
TrialState = Literal["finished", "stopped_early", "failed", "interrupted", "budget"]

# The trial params that name a point of the study in the paper's tables.
SCALE_PARAMS = ("arch", "depth_mult", "width_mult", "resolution")
# The dimensions a scaling rule grows (trial params hold their effective values).
SCALE_DIMENSIONS = ("depth_mult", "width_mult", "resolution")


@dataclass(frozen=True)
class StudyRow:
    trial_id: str
    params: dict[str, Any]
    state: TrialState
    clean_acc: float | None
    robust_acc: float | None
    cost_flops: float | None
    epochs: int
    failure_reason: str | None = None
    eval_images: int | None = None  # how many test images the accuracies count (their interval's width)
    spend: Spend | None = None  # device-hours and dollars (orchestrator.costs)

    @property
    def activation(self) -> str:
        return str(self.params.get("activation", "?"))

    @property
    def has_accuracies(self) -> bool:
        return self.clean_acc is not None and self.robust_acc is not None


def leaderboard(rows: Iterable[StudyRow]) -> list[StudyRow]:
    """Best PGD robust accuracy first (clean accuracy breaks ties); failed trials and trials without
    accuracies last."""
    def rank_key(row: StudyRow) -> tuple[bool, float, float]:
        ranked = row.state != "failed" and row.has_accuracies
        return (not ranked, -(row.robust_acc or 0.0), -(row.clean_acc or 0.0))

    return sorted(rows, key=rank_key)


def write_leaderboard_csv(rows: Iterable[StudyRow], path: Path) -> Path:
    ordered = leaderboard(rows)
    result_columns = ["rank", "trial_id", "state", "clean_acc", "robust_acc", "cost_flops", "epochs",
                      "failure_reason", "eval_images", *SPEND_COLUMNS]
    param_columns = sorted({name for row in ordered for name in row.params} - set(result_columns))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=result_columns + param_columns, extrasaction="ignore")
        writer.writeheader()
        for rank, row in enumerate(ordered, start=1):
            # Results last: a param that happens to share a result column's name cannot overwrite it.
            writer.writerow({**row.params, "rank": rank, "trial_id": row.trial_id, "state": row.state,
                             "clean_acc": row.clean_acc, "robust_acc": row.robust_acc, "cost_flops": row.cost_flops,
                             "epochs": row.epochs, "failure_reason": row.failure_reason or "",
                             "eval_images": row.eval_images or "", **_spend_values(row.spend)})
    return path


SPEND_COLUMNS = ("wall_s", "cpu_hours", "gpu_hours", "cost_usd")


def _spend_values(spend: Spend | None) -> dict[str, float | str]:
    if spend is None:
        return dict.fromkeys(SPEND_COLUMNS, "")
    return {"wall_s": round(spend.wall_s, 1), "cpu_hours": round(spend.cpu_hours, 6),
            "gpu_hours": round(spend.gpu_hours, 6), "cost_usd": round(spend.usd, 6)}


def spend_summary(spend: Spend) -> str:
    """`0.041 CPU-hours, 0 GPU-hours, est. $0.0026`: what a trial or a study spent."""
    return f"{spend.cpu_hours:.3g} CPU-hours, {spend.gpu_hours:.3g} GPU-hours, est. ${spend.usd:.2g}"


def _percent(accuracy: float | None, images: int | None = None) -> str:
    """`78.0`, or with the number of test images it counts, `78.0 (73.7-81.8)`: its 95 % interval."""
    if accuracy is None:
        return "–"
    if not images:
        return f"{100 * accuracy:.1f}"
    estimate = binomial_accuracy(accuracy, images)
    return f"{100 * accuracy:.1f} ({100 * estimate.low:.1f}-{100 * estimate.high:.1f})"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _scale(row: StudyRow) -> str:
    return ", ".join(str(row.params.get(name, "?")) for name in SCALE_PARAMS)


def trial_label(params: Mapping[str, Any]) -> str:
    """A trial as a person names it, e.g. `softplus(beta=10) resnet18 d0.5 w0.25 32px seed 0` (MLflow run names,
    the console); parts its params lack are left out."""
    activation_params = [f"{name.split('.', 1)[1]}={value}" for name, value in sorted(params.items())
                         if name.startswith("activation.")]
    parts = [str(params.get("activation", "?")) + (f"({', '.join(activation_params)})" if activation_params else "")]
    for name, text in (("arch", "{}"), ("depth_mult", "d{}"), ("width_mult", "w{}"), ("resolution", "{}px"),
                       ("seed", "seed {}")):
        if params.get(name) not in (None, ""):
            parts.append(text.format(params[name]))
    return " ".join(parts)


def _notes(row: StudyRow) -> str:
    if row.state == "failed":
        return f"failed: {row.failure_reason or 'unknown error'}"
    if row.state == "stopped_early":
        return f"stopped early after {row.epochs} epoch(s)"
    if row.state == "budget":
        return f"stopped: budget, after {row.epochs} epoch(s)" if row.epochs else "not run: budget"
    return ""


def leaderboard_markdown(rows: Iterable[StudyRow]) -> str:
    """The paper's table (activation × clean × PGD robust, accuracies in %, with their 95 % intervals over the
    test images where the rows say how many), one line per trial, best first; Notes says which trials were
    stopped early or failed."""
    rows = list(rows)
    lines = ["| Rank | Activation | Scale (arch, depth, width, res) | Clean acc (%) | PGD robust acc (%) | "
             "Device-hours | Notes |", "|---:|---|---|---:|---:|---:|---|"]
    for rank, row in enumerate(leaderboard(rows), start=1):
        cells = [rank, row.activation, _scale(row), _percent(row.clean_acc, row.eval_images),
                 _percent(row.robust_acc, row.eval_images), _device_hours(row.spend), _notes(row)]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    if any(row.spend for row in rows):
        lines.append(f"\nSpent: {spend_summary(total_spend(row.spend for row in rows))} "
                     "(wall time x the trials' workers' resources; dollars at the cost block's node prices).")
    return "\n".join(lines) + "\n"


def _device_hours(spend: Spend | None) -> str:
    if spend is None:
        return "–"
    return f"{spend.gpu_hours:.3g} GPU-h" if spend.gpu_hours else f"{spend.cpu_hours:.3g} CPU-h"


def _non_dominated(candidates: Sequence[StudyRow], objectives: Callable[[StudyRow], tuple[float, ...]]
                   ) -> list[StudyRow]:
    """The candidates no other one matches or beats on every objective (higher is better) while differing."""
    points = [(row, objectives(row)) for row in candidates]
    return [row for row, point in points
            if not any(other != point and all(mine <= theirs for mine, theirs in zip(point, other))
                       for _, other in points)]


def pareto_front(rows: Iterable[StudyRow]) -> list[StudyRow]:
    """Trials no other trial beats on both clean and robust accuracy, by increasing clean accuracy. Failed
    trials' last numbers are not results, so they take no part."""
    candidates = [row for row in rows if row.state != "failed" and row.has_accuracies]
    return sorted(_non_dominated(candidates, lambda row: (row.clean_acc, row.robust_acc)),
                  key=lambda row: (row.clean_acc, row.robust_acc))


def _marker_sizes(points: Sequence[StudyRow]) -> list[float]:
    """Marker areas proportional to cost; all alike when no trial has a cost."""
    costs = [row.cost_flops for row in points]
    largest = max((cost for cost in costs if cost), default=None)
    if largest is None:
        return [80.0] * len(points)
    return [30.0 + 600.0 * (cost or 0.0) / largest for cost in costs]


def plot_pareto(rows: Iterable[StudyRow], path: Path) -> Path:
    """Clean (x) vs PGD robust (y) accuracy of every trial with results, marker area ∝ cost (FLOPs per
    image), the Pareto frontier as a line, points labelled with their activation."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(rows)
    points = [row for row in rows if row.state != "failed" and row.has_accuracies]
    front = pareto_front(rows)
    figure = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    activations = sorted({row.activation for row in points})
    colors = {name: f"C{index % 10}" for index, name in enumerate(activations)}
    axes.scatter([100 * row.clean_acc for row in points], [100 * row.robust_acc for row in points],
                 s=_marker_sizes(points), c=[colors[row.activation] for row in points], alpha=0.6,
                 edgecolors="black", linewidths=0.5)
    for row in points:
        axes.annotate(row.activation, (100 * row.clean_acc, 100 * row.robust_acc), textcoords="offset points",
                      xytext=(5, 5), fontsize=8)
    if front:
        axes.plot([100 * row.clean_acc for row in front], [100 * row.robust_acc for row in front], "k--",
                  linewidth=1, label="Pareto frontier")
        axes.legend(loc="lower right")
    axes.set_xlabel("Clean accuracy (%)")
    axes.set_ylabel("PGD robust accuracy (%)")
    costed = any(row.cost_flops for row in points)
    axes.set_title("Clean vs robust accuracy" + (" (marker area ∝ FLOPs per image)" if costed else ""))
    axes.grid(True, alpha=0.3)
    figure.savefig(path, format="png")
    return path


def cost_front(rows: Iterable[StudyRow], hours: Callable[[Spend], float]) -> list[StudyRow]:
    """Trials no other trial beats on both robust accuracy and spent `hours`, cheapest first."""
    candidates = [row for row in rows if row.state != "failed" and row.robust_acc is not None and row.spend]
    return sorted(_non_dominated(candidates, lambda row: (-hours(row.spend), row.robust_acc)),
                  key=lambda row: hours(row.spend))


def plot_cost_pareto(rows: Iterable[StudyRow], path: Path) -> Path:
    """PGD robust accuracy (y) against device-hours (x: GPU-hours, or CPU-hours in a study that used no GPU),
    the frontier of what each extra hour bought as a line, points labelled with their activation."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(rows)
    points = [row for row in rows if row.state != "failed" and row.robust_acc is not None and row.spend]
    on_gpus = any(row.spend.gpu_hours for row in points)
    unit = "GPU-hours" if on_gpus else "CPU-hours"

    def hours(spend: Spend) -> float:
        return spend.gpu_hours if on_gpus else spend.cpu_hours

    front = cost_front(points, hours)
    figure = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter([hours(row.spend) for row in points], [100 * row.robust_acc for row in points], s=60,
                 alpha=0.7, edgecolors="black", linewidths=0.5)
    for row in points:
        axes.annotate(row.activation, (hours(row.spend), 100 * row.robust_acc), textcoords="offset points",
                      xytext=(5, 5), fontsize=8)
    if front:
        axes.step([hours(row.spend) for row in front], [100 * row.robust_acc for row in front], "k--",
                  where="post", linewidth=1, label="Pareto frontier")
        axes.legend(loc="lower right")
    axes.set_xlabel(f"{unit} per trial (start-up included)")
    axes.set_ylabel("PGD robust accuracy (%)")
    axes.set_title(f"Robust accuracy vs {unit}")
    axes.grid(True, alpha=0.3)
    figure.savefig(path, format="png")
    return path


@dataclass(frozen=True)
class SeedGroup:
    """Trials that differ only in their seed: each metric's mean and sample standard deviation over them."""

    label: str
    params: dict[str, Any]
    seeds: tuple[Any, ...]
    mean: dict[str, float]
    std: dict[str, float]  # 0 for a single seed


def _group_label(params: Mapping[str, Any], varying: Sequence[str]) -> str:
    """`activation(its varying params), other varying params`: what tells this group from the others."""
    present = [name for name in varying if params.get(name) not in (None, "")]  # CSV rows hold "" for absent
    activation_params = [f"{name.split('.', 1)[1]}={params[name]}" for name in present if name.startswith("activation.")]
    label = str(params.get("activation", "?")) + (f"({', '.join(activation_params)})" if activation_params else "")
    others = [f"{name}={params[name]}" for name in present
              if name != "activation" and not name.startswith("activation.")]
    return ", ".join([label, *others])


def seed_groups(records: Iterable[tuple[Mapping[str, Any], Mapping[str, float | None]]],
                seed_param: str = "seed") -> list[SeedGroup]:
    """Group (params, metrics) records by every param except `seed_param`, in first-seen order. A metric's mean
    and std are over the records that have it."""
    grouped: dict[str, list[tuple[Mapping[str, Any], Mapping[str, float | None]]]] = {}
    for params, metrics in records:
        key = repr(sorted((name, str(value)) for name, value in params.items() if name != seed_param))
        grouped.setdefault(key, []).append((params, metrics))
    shared = [{name: value for name, value in members[0][0].items() if name != seed_param}
              for members in grouped.values()]
    names = sorted({name for params in shared for name in params})
    varying = [name for name in names if len({str(params.get(name)) for params in shared}) > 1]
    groups = []
    for params, members in zip(shared, grouped.values()):
        values: dict[str, list[float]] = {}
        for _, metrics in members:
            for name, value in metrics.items():
                if value is not None:
                    values.setdefault(name, []).append(float(value))
        groups.append(SeedGroup(
            label=_group_label(params, varying), params=params,
            seeds=tuple(member.get(seed_param) for member, _ in members),
            mean={name: statistics.fmean(series) for name, series in values.items()},
            std={name: statistics.stdev(series) if len(series) > 1 else 0.0 for name, series in values.items()}))
    return groups


def _mean_std(group: SeedGroup, metric: str) -> str:
    if metric not in group.mean:
        return "–"
    if len(group.seeds) < 2:  # one seed has no spread to show, not a spread of zero
        return f"{100 * group.mean[metric]:.1f}"
    return f"{100 * group.mean[metric]:.1f} ± {100 * group.std[metric]:.1f}"


def seed_groups_markdown(groups: Iterable[SeedGroup], columns: Mapping[str, str]) -> str:
    """One line per configuration: `columns` maps metric names to headers; values in % as mean ± sample std over
    seeds (the mean alone for a single seed)."""
    lines = ["| Configuration | Seeds | " + " | ".join(f"{header} (%)" for header in columns.values()) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for group in groups:
        cells = [group.label, len(group.seeds), *(_mean_std(group, metric) for metric in columns)]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_seed_groups(groups: Sequence[SeedGroup], columns: Mapping[str, str], path: Path, title: str,
                     intervals: Mapping[str, Mapping[str, tuple[float, float]]]) -> Path:
    """Grouped horizontal bars, one group of bars per configuration (its mean over seeds), error bars its 95 %
    interval (`intervals`: label -> metric -> (low, high)); none where a configuration has none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 1.2 + 0.45 * len(groups) * max(len(columns), 1)), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    height = 0.8 / max(len(columns), 1)
    for index, (metric, header) in enumerate(columns.items()):
        positions = [row + index * height for row in range(len(groups))]
        means = [100 * group.mean.get(metric, 0.0) for group in groups]
        bounds = [intervals.get(group.label, {}).get(metric) for group in groups]
        errors = [[mean - 100 * bound[0] if bound else 0.0 for mean, bound in zip(means, bounds)],
                  [100 * bound[1] - mean if bound else 0.0 for mean, bound in zip(means, bounds)]]
        axes.barh(positions, means, height=height, xerr=errors, capsize=3, label=header, color=f"C{index}")
    axes.set_yticks([row + height * (len(columns) - 1) / 2 for row in range(len(groups))],
                    [textwrap.fill(group.label, 36) for group in groups], fontsize=8)  # long ablation labels
    axes.invert_yaxis()
    axes.set_xlabel("Accuracy (%), mean over seeds with its 95 % interval")
    axes.set_title(title)
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _repeats_seeds(groups: Sequence[SeedGroup]) -> bool:
    return any(len(group.seeds) > 1 for group in groups)


def write_reports(rows: Iterable[StudyRow], directory: Path, notes: Sequence[str] = ()) -> list[Path]:
    """leaderboard.csv, leaderboard.md (`notes` below its table: how the study ended, when not by itself) and
    pareto.png in `directory` (created if needed), pareto_cost.png when the rows say what they spent, and seeds.md
    (each configuration's mean ± std) when trials repeat a configuration over seeds."""
    rows = list(rows)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    markdown = directory / "leaderboard.md"
    markdown.write_text(leaderboard_markdown(rows) + "".join(f"\n{note}\n" for note in notes))
    written = [write_leaderboard_csv(rows, directory / "leaderboard.csv"), markdown,
               plot_pareto(rows, directory / "pareto.png")]
    if any(row.spend for row in rows):
        written.append(plot_cost_pareto(rows, directory / "pareto_cost.png"))
    groups = seed_groups((row.params, {"clean_acc": row.clean_acc, "robust_acc": row.robust_acc})
                         for row in rows if row.state != "failed")
    if _repeats_seeds(groups):
        seeds = directory / "seeds.md"
        seeds.write_text(seed_groups_markdown(groups, {"clean_acc": "Clean acc", "robust_acc": "PGD robust acc"}))
        written.append(seeds)
    return written


@dataclass(frozen=True)
class ScalePoint:
    """One configuration at one scale (its seeds averaged), placed on a scaling curve."""

    label: str  # the configuration apart from its scale, e.g. the activation
    grown: str  # the dimensions larger than the smallest model's: "base", "depth", "width+resolution", ...
    phi: float
    scale: tuple[float, float, float]  # effective depth_mult, width_mult, resolution
    cost_flops: float
    seeds: int
    mean: dict[str, float]


def scale_points(records: Iterable[tuple[Mapping[str, Any], Mapping[str, float | None]]]) -> list[ScalePoint]:
    """(params, metrics) records, each with a `cost_flops` metric, as points of scaling curves. A point's
    `grown` names the dimensions in which it exceeds the smallest value any record has: how a rule scaled it
    from the common base (EfficientNet's compound rule grows all three)."""
    groups = seed_groups(records)
    smallest = [min(float(group.params[name]) for group in groups) for name in SCALE_DIMENSIONS]
    names = sorted({name for group in groups for name in group.params} - {*SCALE_DIMENSIONS, "compound_phi"})
    varying = [name for name in names if len({str(group.params.get(name)) for group in groups}) > 1]
    points = []
    for group in groups:
        scale = tuple(float(group.params[name]) for name in SCALE_DIMENSIONS)
        grown = [name.removesuffix("_mult") for name, value, low in zip(SCALE_DIMENSIONS, scale, smallest)
                 if value > low * (1 + 1e-6)]
        points.append(ScalePoint(label=_group_label(group.params, varying), grown="+".join(grown) or "base",
                                 phi=float(group.params.get("compound_phi") or 0.0), scale=scale,
                                 cost_flops=group.mean["cost_flops"], seeds=len(group.seeds), mean=group.mean))
    return sorted(points, key=lambda point: (point.grown != "base", point.grown, point.cost_flops))


def scaling_markdown(points: Sequence[ScalePoint], metric: str, header: str) -> str:
    """One line per scale: its dimensions and FLOPs, each configuration's `metric` (%) and, against a ReLU
    configuration where there is one, every other configuration's difference in points."""
    labels = list(dict.fromkeys(point.label for point in points))
    baseline = next((label for label in labels if label.split("(")[0] == "relu"), None)
    others = [label for label in labels if label != baseline] if baseline else []
    by_scale: dict[tuple, dict[str, ScalePoint]] = {}
    for point in points:
        by_scale.setdefault((point.grown, point.phi, point.scale), {})[point.label] = point
    lines = ["| Scaled | phi | Depth x | Width x | Resolution | MFLOPs | "
             + " | ".join(f"{label}: {header} (%)" for label in labels)
             + "".join(f" | {label} - {baseline} (points)" for label in others) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(labels) + len(others))]
    for (grown, phi, (depth, width, resolution)), row in by_scale.items():
        flops = statistics.fmean(point.cost_flops for point in row.values())
        cells = [grown, f"{phi:g}", f"{depth:.2f}", f"{width:.2f}", f"{resolution:g}", f"{flops / 1e6:.1f}",
                 *(_percent(row[label].mean.get(metric)) if label in row else "–" for label in labels)]
        for label in others:
            both = label in row and baseline in row and metric in row[label].mean and metric in row[baseline].mean
            cells.append(f"{100 * (row[label].mean[metric] - row[baseline].mean[metric]):+.1f}" if both else "–")
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scaling(points: Sequence[ScalePoint], metric: str, header: str, path: Path) -> Path:
    """`metric` (%) against FLOPs per image (log scale): per configuration (line style) one curve per grown
    dimension (colour), each starting from the configuration's base point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    labels = list(dict.fromkeys(point.label for point in points))
    rules = list(dict.fromkeys(point.grown for point in points if point.grown != "base"))
    styles = ["-", "--", ":", "-."]
    for label_index, label in enumerate(labels):
        mine = [point for point in points if point.label == label and metric in point.mean]
        base = [point for point in mine if point.grown == "base"]
        for rule_index, rule in enumerate(rules):
            curve = base + sorted((point for point in mine if point.grown == rule), key=lambda p: p.cost_flops)
            axes.plot([point.cost_flops / 1e6 for point in curve], [100 * point.mean[metric] for point in curve],
                      linestyle=styles[label_index % len(styles)], marker="o", color=f"C{rule_index % 10}",
                      label=f"{label}, {rule}")
        if base and not rules:
            axes.plot([base[0].cost_flops / 1e6], [100 * base[0].mean[metric]], "ko", label=f"{label}, base")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("MFLOPs per image (log scale)")
    axes.set_ylabel(f"{header} (%)")
    axes.set_title(f"{header} against model cost, by scaled dimension")
    axes.legend(fontsize=7, ncol=2)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
