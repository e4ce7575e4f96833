"""Is the trainer ever starved? The FFCV training loader's rate against the rate PGD-k adversarial training
consumes images, at several resolutions.

Per resolution, in one process:
- loader alone: images/s of the satscale training loader (FFCV, random-resized crop + flip, uint8 batches),
  after an untimed warm-up epoch (numba JIT), as `loader_throughput.py` measures it;
- AT from memory: `train_one_epoch` (attack + update, what the Ray Train worker runs) over the same batches,
  decoded once and held in memory;
- AT fed by FFCV: the same `train_one_epoch` reading the FFCV loader directly.
The two AT passes alternate, `--repeats` times each. The loader keeps up when "fed" runs as fast as "from
memory"; `stall` is the fraction of the step time lost to waiting for data (1 - fed / from memory).

On a CPU machine the loader's threads and the model's compete for the same cores, so "loader alone" (which has
them all) overstates what the loader leaves the trainer; the fed/from-memory ratio is the answer there. On a GPU
the model runs on the device and the loader on the host, and the loader-alone rate is the ceiling.

    python benchmarks/loader_vs_at.py                        # 32, 64 and 128 px, PGD-1 (the default study's)
    python benchmarks/loader_vs_at.py --device cuda --attack-steps 1 7 --resolutions 32 64 128 224
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from at_step_time import add_model_arguments, machine, pgd, seeded_model, synchronize, train_config
from loader_throughput import images_per_second
from trainers.data.convert import WriteOptions, convert, visible_cpu_count
from trainers.data.loader_config import LoaderConfig
from trainers.data.loaders import build_train_loader
from trainers.training import build_optimizer, build_scheduler, optimize_for_device, train_one_epoch

RESULTS = Path(__file__).parent / "results" / "loader_vs_at.json"


def measure_resolution(beton: Path, resolution: int, attack_steps: int, args: argparse.Namespace,
                       cores: int) -> dict:
    device = torch.device(args.device)
    loader = build_train_loader(beton, LoaderConfig(batch_size=args.batch_size, resolution=resolution,
                                                    num_workers=cores, drop_last=True))
    torch.set_num_threads(args.threads or cores)  # FFCV's Loader sets torch's threads to its worker count
    loader_rate, loader_warm_up = images_per_second(loader, args.loader_epochs)
    in_memory = [(images.clone().to(device), labels.clone().to(device)) for images, labels in loader]
    images_per_epoch = sum(len(labels) for _images, labels in in_memory)

    model = seeded_model(args.activation, args, resolution)
    config = train_config(pgd(attack_steps), args)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=10**6)
    runnable = optimize_for_device(model, config)

    def epoch_rate(batches) -> float:
        synchronize(device)
        start = time.perf_counter()
        train_one_epoch(runnable, batches, optimizer, scheduler, config, device)
        synchronize(device)
        return images_per_epoch / (time.perf_counter() - start)

    epoch_rate(in_memory)  # warm-up: allocator, kernels (and compilation with --compile)
    fed, from_memory = [], []
    for _ in range(args.repeats):
        fed.append(epoch_rate(loader))
        from_memory.append(epoch_rate(in_memory))
    fed_rate, memory_rate = statistics.median(fed), statistics.median(from_memory)
    return {"resolution": resolution, "attack_steps": attack_steps, "loader_alone_images_per_s": round(loader_rate),
            "loader_warm_up_s": round(loader_warm_up, 2), "at_from_memory_images_per_s": round(memory_rate, 1),
            "at_fed_by_ffcv_images_per_s": round(fed_rate, 1),
            "loader_over_consumption": round(loader_rate / memory_rate, 1),
            "stall": round(max(0.0, 1 - fed_rate / memory_rate), 3), "images_per_epoch": images_per_epoch}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, depth_mult=0.5, batch_size=128)
    parser.add_argument("--samples", type=int, default=2048, help="Fashion-MNIST training images in the .beton")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--attack-steps", type=int, nargs="+", default=[1])
    parser.add_argument("--activation", default="silu")
    parser.add_argument("--loader-epochs", type=int, default=2, help="timed loader-alone epochs")
    parser.add_argument("--repeats", type=int, default=2, help="timed AT epochs each, fed and from memory")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cores = visible_cpu_count()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        beton = Path(folder) / "fashion-mnist-train.beton"
        convert("fashion-mnist", beton, split="train", limit=args.samples, options=WriteOptions(num_workers=cores))
        for resolution in args.resolutions:
            for attack_steps in args.attack_steps:
                rows.append(measure_resolution(beton, resolution, attack_steps, args, cores))
                print(json.dumps(rows[-1]), flush=True)
    record = {
        "benchmark": "loader_vs_at", "date": datetime.date.today().isoformat(),
        "machine": {**machine(args.device), "visible_cores": cores},
        "settings": {k: v for k, v in vars(args).items() if k not in ("resolutions", "attack_steps")},
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[args.device.split(":")[0]] = record  # one record per device kind
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
