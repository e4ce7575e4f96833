"""A study's reports from its trials' final results: leaderboard (CSV, Markdown) and a Pareto-frontier plot.

Pure: no MLflow, no Ray. The tracker logs the files these functions write.
"""
from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

TrialState = Literal["finished", "stopped_early", "failed"]

# The trial params that name a point of the study in the paper's tables.
SCALE_PARAMS = ("arch", "depth_mult", "width_mult", "resolution")


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
                      "failure_reason"]
    param_columns = sorted({name for row in ordered for name in row.params} - set(result_columns))
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=result_columns + param_columns, extrasaction="ignore")
        writer.writeheader()
        for rank, row in enumerate(ordered, start=1):
            # Results last: a param that happens to share a result column's name cannot overwrite it.
            writer.writerow({**row.params, "rank": rank, "trial_id": row.trial_id, "state": row.state,
                             "clean_acc": row.clean_acc, "robust_acc": row.robust_acc, "cost_flops": row.cost_flops,
                             "epochs": row.epochs, "failure_reason": row.failure_reason or ""})
    return path


def _percent(accuracy: float | None) -> str:
    return "–" if accuracy is None else f"{100 * accuracy:.1f}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _scale(row: StudyRow) -> str:
    return ", ".join(str(row.params.get(name, "?")) for name in SCALE_PARAMS)


def _notes(row: StudyRow) -> str:
    if row.state == "failed":
        return f"failed: {row.failure_reason or 'unknown error'}"
    if row.state == "stopped_early":
        return f"stopped early after {row.epochs} epoch(s)"
    return ""


def leaderboard_markdown(rows: Iterable[StudyRow]) -> str:
    """The paper's table (activation × clean × PGD robust, accuracies in %), one line per trial, best first;
    Notes says which trials were stopped early or failed."""
    lines = ["| Rank | Activation | Scale (arch, depth, width, res) | Clean acc (%) | PGD robust acc (%) | Notes |",
             "|---:|---|---|---:|---:|---|"]
    for rank, row in enumerate(leaderboard(rows), start=1):
        cells = [rank, row.activation, _scale(row), _percent(row.clean_acc), _percent(row.robust_acc), _notes(row)]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_front(rows: Iterable[StudyRow]) -> list[StudyRow]:
    """Trials no other trial beats on both clean and robust accuracy, by increasing clean accuracy. Failed
    trials' last numbers are not results, so they take no part."""
    candidates = [row for row in rows if row.state != "failed" and row.has_accuracies]

    def dominated(row: StudyRow) -> bool:
        return any(other.clean_acc >= row.clean_acc and other.robust_acc >= row.robust_acc
                   and (other.clean_acc, other.robust_acc) != (row.clean_acc, row.robust_acc)
                   for other in candidates)

    return sorted((row for row in candidates if not dominated(row)), key=lambda row: (row.clean_acc, row.robust_acc))


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


def write_reports(rows: Iterable[StudyRow], directory: Path) -> list[Path]:
    """leaderboard.csv, leaderboard.md and pareto.png in `directory` (created if needed)."""
    rows = list(rows)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    markdown = directory / "leaderboard.md"
    markdown.write_text(leaderboard_markdown(rows))
    return [write_leaderboard_csv(rows, directory / "leaderboard.csv"), markdown,
            plot_pareto(rows, directory / "pareto.png")]
