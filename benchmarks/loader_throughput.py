"""Loader throughput: the FFCV training loader versus a plain PyTorch DataLoader doing the same work.

Both produce uint8 batches (N, 3, R, R) from the same Fashion-MNIST images: random-resized crop to R, random
horizontal flip, grayscale to 3 channels. FFCV reads a raw .beton written by satscale-convert; the DataLoader
reads the same images from in-memory uint8 arrays and crops/resizes each one with OpenCV's INTER_AREA (what
FFCV's decoder calls). The first epoch of each loader (FFCV's numba JIT, DataLoader worker start-up) is a
warm-up and is not timed.

FFCV parallelizes a batch with numba threads, and numba's threading layer (TBB when libtbb is installed,
else OpenMP) is fixed per process at the first parallel call; each FFCV variant therefore runs in a fresh
process: every visible core with numba's default layer and with NUMBA_THREADING_LAYER=omp, and one worker.

    .venv/bin/python benchmarks/loader_throughput.py   # writes benchmarks/results/loader_throughput.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainers.data.convert import WriteOptions, convert, visible_cpu_count
from trainers.data.loader_config import LoaderConfig
from trainers.data.loaders import build_train_loader
from trainers.data.sources import read_source

RESULTS = Path(__file__).parent / "results" / "loader_throughput.json"
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def random_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision/FFCV RandomResizedCrop box (top, left, h, w), with the same fallback to the whole image."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


class CropResizeFlip(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, resolution: int) -> None:
        self.images, self.labels, self.resolution = images, labels, resolution
        self.rng = np.random.default_rng()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        top, left, h, w = random_crop_box(*image.shape[:2], self.rng)
        resized = cv2.resize(image[top:top + h, left:left + w], (self.resolution, self.resolution),
                             interpolation=cv2.INTER_AREA)
        if self.rng.random() < 0.5:
            resized = resized[:, ::-1]
        rgb = np.repeat(resized[None], 3, axis=0)  # (3, R, R)
        return torch.from_numpy(np.ascontiguousarray(rgb)), int(self.labels[index])


def images_per_second(loader, epochs: int) -> tuple[float, float]:
    """(images/s over `epochs` timed epochs, seconds of the untimed warm-up epoch)."""
    start = time.perf_counter()
    for _ in loader:
        pass
    warm_up = time.perf_counter() - start
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _labels in loader:
            seen += images.shape[0]
    return seen / (time.perf_counter() - start), warm_up


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def measure_ffcv(beton: Path, resolutions: list[int], batch_size: int, workers: int, epochs: int,
                 results: multiprocessing.Queue) -> None:
    import numba

    rates = []
    for resolution in resolutions:
        config = LoaderConfig(batch_size=batch_size, resolution=resolution, num_workers=workers, drop_last=False)
        rates.append(images_per_second(build_train_loader(beton, config), epochs))
    results.put((numba.threading_layer() if workers > 1 else "none (1 worker)", rates))


def ffcv_in_fresh_process(beton: Path, resolutions: list[int], batch_size: int, workers: int, epochs: int,
                          threading_layer: str | None) -> tuple[str, list[tuple[float, float]]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    previous = os.environ.pop("NUMBA_THREADING_LAYER", None)
    if threading_layer:
        os.environ["NUMBA_THREADING_LAYER"] = threading_layer  # the child reads it at its first parallel call
    try:
        process = context.Process(target=measure_ffcv, args=(beton, resolutions, batch_size, workers, epochs, results))
        process.start()
        outcome = results.get()
        process.join()
    finally:
        os.environ.pop("NUMBA_THREADING_LAYER", None)
        if previous is not None:
            os.environ["NUMBA_THREADING_LAYER"] = previous
    return outcome


def run(samples: int, resolutions: list[int], batch_size: int, epochs: int) -> dict:
    cores = visible_cpu_count()
    with tempfile.TemporaryDirectory() as folder:
        beton = Path(folder) / "fashion-mnist-train.beton"
        convert("fashion-mnist", beton, split="train", limit=samples, options=WriteOptions(num_workers=cores))
        source = read_source("fashion-mnist", None, "train")
        images, labels = source.images[:samples], source.labels[:samples]
        variants = {f"ffcv, {cores} workers, default numba layer": (cores, None),
                    f"ffcv, {cores} workers, NUMBA_THREADING_LAYER=omp": (cores, "omp"),
                    "ffcv, 1 worker": (1, None)}
        rows = []
        for name, (workers, layer) in variants.items():
            used_layer, rates = ffcv_in_fresh_process(beton, resolutions, batch_size, workers, epochs, layer)
            rows += [{"loader": name, "numba_layer": used_layer, "workers": workers, "resolution": resolution,
                      "images_per_s": round(rate), "warm_up_s": round(warm_up, 2)}
                     for resolution, (rate, warm_up) in zip(resolutions, rates)]
        for resolution in resolutions:
            torch_loader = DataLoader(CropResizeFlip(images, labels, resolution), batch_size=batch_size,
                                      shuffle=True, num_workers=cores, persistent_workers=True)
            rate, warm_up = images_per_second(torch_loader, epochs)
            rows.append({"loader": f"torch DataLoader, {cores} workers", "numba_layer": None, "workers": cores,
                         "resolution": resolution, "images_per_s": round(rate), "warm_up_s": round(warm_up, 2)})
    for row in rows:
        print(json.dumps(row))
    return {
        "benchmark": "loader_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "visible_cores": cores,
                    "python": platform.python_version(), "torch": torch.__version__, "ffcv": importlib.metadata.version("ffcv"),
                    "numpy": np.__version__, "opencv": cv2.__version__, "gpu": None},
        "setup": {"data": f"Fashion-MNIST train, first {samples} images (28x28 grayscale, raw .beton)",
                  "pipeline": "random-resized crop (scale 0.08-1, ratio 3/4-4/3) + flip + 3 channels, uint8",
                  "batch_size": batch_size, "timed_epochs": epochs},
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loader, after one warm-up")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    report = run(args.samples, args.resolutions, args.batch_size, args.epochs)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
