"""How sure a study's results are: 95 % intervals for accuracies and for paired differences between
configurations, from per-image outcomes over seeds.

A configuration's outcomes are a 0/1 matrix [seeds, images]: row s is its trial with seed s, column i test image
i, the same images in the same order for every trial. Two configurations pair by seed (the paired design of
`trainers.seeding`: seed s of both saw the same batches, augmentations, attack starts and, where shapes agree,
initial weights) and by image (both were evaluated on image i). Their difference is the mean of the
difference matrix, and its uncertainty comes from a two-way bootstrap that resamples seeds and images
independently (both are samples: of training runs and of test images). Pairing removes what the two share, the
images that are hard for every network and the luck of a seed, so a paired interval is narrower than an unpaired
one on the same trials whenever the outcomes are correlated.

With one seed the interval covers test-set sampling only; it says nothing about seed-to-seed variation.

Pure: numpy only, deterministic for a given `seed`.
"""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
# The smallest true difference detected with 80 % power by a two-sided 5 % test: (z_0.975 + z_0.80) x SE.
DETECTABLE_Z = 1.959964 + 0.841621
_CHUNK = 200  # bootstrap replicates per block: bounds memory at _CHUNK x images weights


@dataclass(frozen=True)
class Estimate:
    """A mean (an accuracy or a difference of accuracies, as a fraction) with its bootstrap 95 % interval."""

    value: float
    low: float
    high: float
    std_error: float
    seeds: int
    images: int

    @property
    def detectable(self) -> float:
        """The smallest true effect this design would detect (80 % power, two-sided 5 %)."""
        return DETECTABLE_Z * self.std_error

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def binomial_accuracy(accuracy: float, images: int) -> Estimate:
    """An accuracy measured once on `images` test images, with its Wilson score 95 % interval: test-set sampling
    only (one trial, no seeds), for the study's live reports where no per-image outcomes exist."""
    z = 1.959964
    center = (accuracy + z * z / (2 * images)) / (1 + z * z / images)
    half = z * np.sqrt(accuracy * (1 - accuracy) / images + z * z / (4 * images * images)) / (1 + z * z / images)
    return Estimate(float(accuracy), float(max(0.0, center - half)), float(min(1.0, center + half)),
                    float(np.sqrt(accuracy * (1 - accuracy) / images)), seeds=1, images=images)


def _weights(rng: np.random.Generator, count: int, resamples: int) -> np.ndarray:
    """Bootstrap resampling as weights: [resamples, count], each row how often each unit was drawn / count."""
    if count == 1:
        return np.ones((resamples, 1))
    draws = rng.integers(0, count, size=(resamples, count)) + count * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * count).reshape(resamples, count) / count


def _replicates(outcomes: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """The matrix's mean under `resamples` two-way bootstrap draws (seeds and images resampled independently)."""
    seeds, images = outcomes.shape
    values = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        seed_weights, image_weights = _weights(rng, seeds, size), _weights(rng, images, size)
        per_seed = outcomes @ image_weights.T  # [seeds, size]: each seed's mean over the resampled images
        values.append(np.einsum("bs,sb->b", seed_weights, per_seed))
    return np.concatenate(values)


def _estimate(value: float, replicates: np.ndarray, shape: tuple[int, int]) -> Estimate:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return Estimate(float(value), float(low), float(high), float(replicates.std(ddof=1)), *shape)


def _matrix(outcomes: np.ndarray) -> np.ndarray:
    matrix = np.asarray(outcomes, dtype=np.float64)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise ValueError(f"outcomes must be a non-empty [seeds, images] matrix, got shape {matrix.shape}")
    return matrix


def accuracy(outcomes: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> Estimate:
    """Mean accuracy of a configuration over its seeds and images, with its 95 % interval."""
    matrix = _matrix(outcomes)
    return _estimate(matrix.mean(), _replicates(matrix, np.random.default_rng(seed), resamples), matrix.shape)


def _pair(outcomes: np.ndarray, baseline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    matrix, reference = _matrix(outcomes), _matrix(baseline)
    if matrix.shape != reference.shape:
        raise ValueError(f"paired outcomes need the same seeds and images; got {matrix.shape} and {reference.shape}")
    return matrix, reference


def paired_difference(outcomes: np.ndarray, baseline: np.ndarray, resamples: int = RESAMPLES,
                      seed: int = 0) -> Estimate:
    """`outcomes` minus `baseline`, row s of each the same seed and column i the same image: the bootstrap draws
    the same seeds and images for both."""
    matrix, reference = _pair(outcomes, baseline)
    difference = matrix - reference
    return _estimate(difference.mean(), _replicates(difference, np.random.default_rng(seed), resamples),
                     difference.shape)


def unpaired_difference(outcomes: np.ndarray, baseline: np.ndarray, resamples: int = RESAMPLES,
                        seed: int = 0) -> Estimate:
    """The same difference as if the two had been run independently: each resampled on its own. For comparing
    designs (benchmarks/paired_design.py), not for reporting a paired study."""
    matrix, reference = _pair(outcomes, baseline)
    rng = np.random.default_rng(seed)
    replicates = _replicates(matrix, rng, resamples) - _replicates(reference, rng, resamples)
    return _estimate(matrix.mean() - reference.mean(), replicates, matrix.shape)


# ------------------------------------------------------------------------------------------------ reports

@dataclass(frozen=True)
class Comparison:
    """One configuration against its baseline on one metric, paired over `seeds`."""

    label: str
    baseline: str
    metric: str
    seeds: tuple
    difference: Estimate


def points(fraction: float) -> str:
    return f"{100 * fraction:.1f}"


def interval_text(estimate: Estimate, signed: bool = False) -> str:
    """`56.0 [54.2, 57.8]` (in %/points); signed differences as `+1.2 [-0.4, +2.8]`."""
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return (f"{fmt.format(100 * estimate.value)} "
            f"[{fmt.format(100 * estimate.low)}, {fmt.format(100 * estimate.high)}]")


def comparisons_markdown(comparisons: Sequence[Comparison], headers: Mapping[str, str]) -> str:
    """One line per configuration: each metric's paired difference to the baseline, its interval, and the
    smallest difference the design could detect."""
    metrics = list(dict.fromkeys(comparison.metric for comparison in comparisons))
    rows: dict[tuple[str, str], dict[str, Comparison]] = {}
    for comparison in comparisons:
        rows.setdefault((comparison.label, comparison.baseline), {})[comparison.metric] = comparison
    lines = ["| Configuration | Baseline | Seeds paired | Images | "
             + " | ".join(f"Δ {headers[metric]} (points) [95 % CI] | Detectable Δ (points)" for metric in metrics)
             + " |", "|---|---|---:|---:|" + "---:|---:|" * len(metrics)]
    for (label, baseline), by_metric in rows.items():
        first = next(iter(by_metric.values()))
        cells = [label, baseline, len(first.seeds), first.difference.images]
        for metric in metrics:
            comparison = by_metric.get(metric)
            cells += ([interval_text(comparison.difference, signed=True), points(comparison.difference.detectable)]
                      if comparison else ["–", "–"])
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparisons_csv(comparisons: Sequence[Comparison], path: Path) -> Path:
    columns = ["configuration", "baseline", "metric", "seeds", "images", "difference", "low", "high",
               "std_error", "detectable"]
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for comparison in comparisons:
            estimate = comparison.difference
            writer.writerow({"configuration": comparison.label, "baseline": comparison.baseline,
                             "metric": comparison.metric, "seeds": " ".join(map(str, comparison.seeds)),
                             "images": estimate.images, "difference": estimate.value, "low": estimate.low,
                             "high": estimate.high, "std_error": estimate.std_error,
                             "detectable": estimate.detectable})
    return path


def plot_comparisons(comparisons: Sequence[Comparison], metric: str, header: str, path: Path) -> Path:
    """A forest plot: each configuration's paired difference to its baseline with its 95 % interval."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [comparison for comparison in comparisons if comparison.metric == metric]
    figure = Figure(figsize=(8, 1.4 + 0.5 * len(shown)), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for row, comparison in enumerate(shown):
        estimate = comparison.difference
        axes.errorbar([100 * estimate.value], [row], xerr=[[100 * (estimate.value - estimate.low)],
                                                           [100 * (estimate.high - estimate.value)]],
                      fmt="o", color="C0" if estimate.excludes_zero else "C7", capsize=4)
    axes.axvline(0, color="black", linewidth=1)
    axes.set_yticks(range(len(shown)), [textwrap.fill(f"{item.label} − {item.baseline}", 44) for item in shown],
                    fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(f"Δ {header} (points), paired by seed and image, 95 % interval")
    axes.set_title(f"{header}: each configuration against its baseline")
    axes.grid(True, axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
