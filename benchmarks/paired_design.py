"""The instrument: how much narrower a paired comparison is than an unpaired one on the same trials, and what
reproducibility costs on this CPU.

1. Interval widths. From an evaluated study (`evaluate_study.py --out DIR`: its evaluation.csv and outcomes.npz),
   every configuration's difference to its baseline (ReLU at the same settings) as the study reports it (paired
   by seed and image) and as if its trials had been run independently (each configuration resampled on its own):
   the 95 % interval widths and their ratio, on the same per-image outcomes.
2. The cost of determinism. (a) The AT step (PGD-1 training attack + update, the activation table's model on
   in-memory data) with `deterministic: true` (torch.use_deterministic_algorithms) against without, interleaved;
   (b) FFCV's training loader (random-resized crop + flip) with satscale's seeded augmentations against FFCV's
   own unseeded ones, interleaved. Ratios from one run on one machine.

    python benchmarks/paired_design.py --evaluation satscale_eval/activation_table
    python benchmarks/paired_design.py --skip-intervals           # the determinism costs only (about 3 minutes)
"""
from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from embedded_default import machine, write_record  # noqa: E402

from orchestrator.comparisons import unpaired_difference  # noqa: E402
from orchestrator.evaluate_study import OUTCOMES_FILE, TrialEvaluation, read_evaluation, summarize  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "paired_design.json"


def interval_widths(folder: Path, baseline: str) -> list[dict]:
    """Per configuration and metric: the paired and the unpaired 95 % interval of its difference to `baseline`."""
    stored = np.load(folder / OUTCOMES_FILE)
    with open(folder / "evaluation.csv", newline="") as file:
        trial_ids = [row["trial_id"] for row in csv.DictReader(file)]
    evaluations = []
    for trial_id, (params, metrics) in zip(trial_ids, read_evaluation(folder / "evaluation.csv")):
        outcomes = {metric: stored[f"{trial_id}/{metric}"] for metric in ("clean_acc", "pgd_acc")}
        evaluations.append(TrialEvaluation(trial_id, "", params, metrics.get("cost_flops", 0.0), dict(metrics),
                                           outcomes))
    summary = summarize(evaluations, baseline)
    rows = []
    for comparison in summary.comparisons:
        paired = comparison.difference
        unpaired = unpaired_difference(*(summary.outcome_matrix(label, comparison.metric, comparison.seeds)
                                         for label in (comparison.label, comparison.baseline)))
        rows.append({"configuration": comparison.label, "baseline": comparison.baseline, "metric": comparison.metric,
                     "seeds": len(comparison.seeds), "images": paired.images, "difference": round(paired.value, 4),
                     "paired": [round(paired.low, 4), round(paired.high, 4)],
                     "unpaired": [round(unpaired.low, 4), round(unpaired.high, 4)],
                     "width_ratio_paired_over_unpaired": round((paired.high - paired.low)
                                                               / (unpaired.high - unpaired.low), 3)})
    return rows


def step_times(deterministic: bool, repeats: int, batches: int) -> list[float]:
    from trainers.attacks import AttackConfig
    from trainers.models import build_model
    from trainers.training import TrainConfig, build_optimizer, build_scheduler, train_one_epoch
    from trainers.seeding import use_deterministic_algorithms

    config = TrainConfig(epochs=1, eval_attack=None,
                         train_attack=AttackConfig(eps=0.1, step_size=0.125, steps=1, clean_start_prob=0.2))
    images, labels = torch.rand(batches * 128, 3, 32, 32), torch.randint(0, 10, (batches * 128,))
    loader = [(images[i:i + 128], labels[i:i + 128]) for i in range(0, len(labels), 128)]
    model = build_model("resnet18", 10, width_mult=0.25, depth_mult=0.5, resolution=32, stem="cifar", seed=0)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=len(loader))
    use_deterministic_algorithms(deterministic)
    try:
        times = []
        for repeat in range(repeats):
            start = time.perf_counter()
            train_one_epoch(model, loader, optimizer, scheduler, config, torch.device("cpu"), epoch=repeat)
            times.append((time.perf_counter() - start) / len(loader))
        return times
    finally:
        use_deterministic_algorithms(False)


def loader_rate(path: Path, seeded: bool, workers: int) -> float:
    from trainers.data.loader_config import LoaderConfig
    from trainers.data.loaders import build_train_loader  # first: FFCV imported the way the workers import it

    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    if seeded:
        loader = build_train_loader(path, LoaderConfig(batch_size=256, resolution=32, num_workers=workers))
    else:
        loader = Loader(str(path), batch_size=256, num_workers=workers, order=OrderOption.RANDOM, drop_last=True,
                        pipelines={"image": [RandomResizedCropRGBImageDecoder((32, 32)), RandomHorizontalFlip(),
                                             ToTensor(), ToTorchImage(channels_last=False)],
                                   "label": [IntDecoder(), ToTensor(), Squeeze(1)], "index": None})
    for _ in loader:  # the first epoch compiles the pipeline
        pass
    start, seen = time.perf_counter(), 0
    for _ in range(3):
        for images, *_ in loader:
            seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def determinism_costs(repeats: int) -> dict:
    torch.set_num_threads(2)
    on, off = [], []
    for _ in range(repeats):  # interleaved, so drift on a shared machine hits both alike
        off += step_times(False, 2, 8)
        on += step_times(True, 2, 8)
    from trainers.data.convert import WriteOptions, convert

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fmnist.beton"
        convert("fashion-mnist", path, split="train", limit=20_000, options=WriteOptions(num_workers=1))
        rates = {"seeded": [], "ffcv": []}
        for _ in range(repeats):
            for name in rates:
                rates[name].append(loader_rate(path, name == "seeded", workers=1))
    step_on, step_off = statistics.median(on), statistics.median(off)
    seeded, ffcv = statistics.median(rates["seeded"]), statistics.median(rates["ffcv"])
    return {"at_step_s": {"deterministic": round(step_on, 5), "default": round(step_off, 5),
                          "ratio": round(step_on / step_off, 3)},
            "loader_images_per_s": {"seeded_augmentations": round(seeded), "ffcv_unseeded": round(ffcv),
                                    "ratio_seeded_over_ffcv": round(seeded / ffcv, 3)},
            "settings": {"model": "resnet18 w0.25 d0.5 32px cifar stem, batch 128, PGD-1 + update, 2 threads",
                         "loader": "Fashion-MNIST 20000 images at 32 px, random-resized crop + flip, 1 thread, "
                                   "batch 256", "repeats": repeats}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluation", type=Path, help="an evaluate_study.py output folder")
    parser.add_argument("--baseline", default="relu")
    parser.add_argument("--skip-intervals", action="store_true")
    parser.add_argument("--skip-costs", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    record = {"benchmark": "paired_design", "date": datetime.date.today().isoformat(), "machine": machine()}
    if not args.skip_intervals:
        if args.evaluation is None:
            parser.error("--evaluation DIR is needed for the interval widths (or --skip-intervals)")
        record["intervals"] = {"evaluation": str(args.evaluation), "rows": interval_widths(args.evaluation,
                                                                                         args.baseline)}
        for row in record["intervals"]["rows"]:
            print(row, flush=True)
    if not args.skip_costs:
        record["determinism"] = determinism_costs(args.repeats)
        print(record["determinism"], flush=True)
    write_record(args.output, record)


if __name__ == "__main__":
    main()
