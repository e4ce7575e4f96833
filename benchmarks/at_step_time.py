"""Time per SAT training step: clean vs PGD-k adversarial training, ReLU vs smooth activations, and each PGD-k
step against its analytic bound.

SAT's claim: a smooth activation costs nothing extra. The bound: a PGD-k AT step costs k attack passes (forward
+ input-only backward, BatchNorm in eval mode, no parameter gradients) plus one training step (forward + backward
+ SGD); the script measures those pieces and reports measured / bound (above 1: the attack loop adds work of its
own; below 1: overlap or cache effects). Everything is measured in one run on one machine, with batches of
pre-decoded tensors already on the device (the model/attack part alone; the FFCV loader's rate is measured by
loader_throughput.py and compared with these rates by loader_vs_at.py). The configurations are timed
round-robin, one step each per round, so load from other processes spreads evenly over them.

    python benchmarks/at_step_time.py                      # CPU, fp32
    python benchmarks/at_step_time.py --device cuda --amp bf16 --channels-last --compile
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path

import torch
import torch.nn.functional as F

from trainers.attacks import AttackConfig
from trainers.attacks.pgd import attack_mode
from trainers.models import build_model
from trainers.training import (OptimizerConfig, TrainConfig, build_optimizer, build_scheduler,
                               optimize_for_device, seed_everything, train_one_epoch)

RESULTS = Path(__file__).parent / "results" / "at_step_time.json"
EPS = 4 / 255


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(steps: dict[Hashable, Callable[[], None]], device: torch.device, warmup: int,
                        rounds: int) -> dict[Hashable, float]:
    """Median seconds of each callable, timed round-robin (one call each per round) after `warmup` rounds."""
    durations: dict[Hashable, list[float]] = {key: [] for key in steps}
    for round_index in range(warmup + rounds):
        for key, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_index >= warmup:
                durations[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in durations.items()}


def pgd(attack_steps: int) -> AttackConfig | None:
    """PGD-k with random start at eps 4/255 (None: clean training)."""
    return (AttackConfig(eps=EPS, step_size=EPS / max(attack_steps // 2, 1), steps=attack_steps)
            if attack_steps else None)


def train_config(attack: AttackConfig | None, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=1, optimizer=OptimizerConfig(lr=0.01, schedule="constant"), train_attack=attack,
                       eval_attack=None, amp=args.amp, channels_last=args.channels_last, compile=args.compile)


def seeded_model(activation: str, args: argparse.Namespace, resolution: int) -> torch.nn.Module:
    """The benchmark's model on `args.device`; the same weights on every call."""
    seed_everything(0)
    return build_model(args.arch, 10, activation=activation, width_mult=args.width_mult,
                       depth_mult=args.depth_mult, resolution=resolution).to(args.device)


def random_batch(args: argparse.Namespace, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of images in [0, 1] and labels on `args.device` (step time does not depend on content)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch_size, 3, resolution, resolution, generator=generator)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator)
    return images.to(args.device), labels.to(args.device)


def at_step(activation: str, attack: AttackConfig | None, args: argparse.Namespace, resolution: int | None = None,
            batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> Callable[[], None]:
    """One training step (attack + update, the functions the Ray Train worker runs) on a fixed batch."""
    resolution = resolution or args.resolution
    images, labels = batch or random_batch(args, resolution)
    model = seeded_model(activation, args, resolution)
    config = train_config(attack, args)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=10**6)
    runnable = optimize_for_device(model, config)
    one_step = [(images, labels)]
    return lambda: train_one_epoch(runnable, one_step, optimizer, scheduler, config, torch.device(args.device))


def attack_pass(activation: str, args: argparse.Namespace) -> Callable[[], None]:
    """One forward + input-only backward pass as PGD runs it: eval-mode BatchNorm, parameters frozen."""
    device = torch.device(args.device)
    images, labels = random_batch(args, args.resolution)
    config = train_config(None, args)
    runnable = optimize_for_device(seeded_model(activation, args, args.resolution), config)

    def run() -> None:
        with attack_mode(runnable):
            inputs = images.clone().requires_grad_(True)
            with torch.autocast(device.type, dtype=config.autocast_dtype or torch.float32,
                                enabled=config.autocast_dtype is not None):
                loss = F.cross_entropy(runnable(inputs).float(), labels, reduction="none").sum()
            torch.autograd.grad(loss, inputs)
    return run


def forward_pass(activation: str, args: argparse.Namespace) -> Callable[[], None]:
    """One eval-mode forward pass without gradients (how much of an attack pass the backward is)."""
    device = torch.device(args.device)
    images, _labels = random_batch(args, args.resolution)
    config = train_config(None, args)
    runnable = optimize_for_device(seeded_model(activation, args, args.resolution), config).eval()

    def run() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=config.autocast_dtype or torch.float32,
                                             enabled=config.autocast_dtype is not None):
            runnable(images)
    return run


def measure(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(AT step rows per activation and k, with the bound; the measured pieces per activation)."""
    steps: dict[Hashable, Callable[[], None]] = {}
    for activation in args.activations:
        steps[(activation, "forward")] = forward_pass(activation, args)
        steps[(activation, "attack_pass")] = attack_pass(activation, args)
        for k in sorted({0, *args.attack_steps}):  # k = 0 is the training step the bound needs
            steps[(activation, k)] = at_step(activation, pgd(k), args)
    seconds = interleaved_medians(steps, torch.device(args.device), args.warmup, args.steps)
    pieces = [{"activation": activation, "forward_s": round(seconds[(activation, "forward")], 5),
               "attack_pass_s": round(seconds[(activation, "attack_pass")], 5),
               "train_step_s": round(seconds[(activation, 0)], 5)} for activation in args.activations]
    clean_relu = seconds.get(("relu", 0), min(seconds[(a, 0)] for a in args.activations))
    rows = []
    for activation in args.activations:
        for k in args.attack_steps:
            measured = seconds[(activation, k)]
            bound = k * seconds[(activation, "attack_pass")] + seconds[(activation, 0)]
            relu_same_k = seconds.get(("relu", k))
            rows.append({"activation": activation, "attack_steps": k, "seconds_per_step": round(measured, 5),
                         "images_per_s": round(args.batch_size / measured, 1),
                         "vs_clean_relu": round(measured / clean_relu, 3),
                         "vs_relu_same_k": round(measured / relu_same_k, 3) if relu_same_k else None,
                         "bound_s": round(bound, 5), "vs_bound": round(measured / bound, 3)})
    return rows, pieces


def machine(device: str) -> dict:
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
    return {"device": device, "device_name": device_name or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_end": [round(value, 1) for value in os.getloadavg()]}


def add_model_arguments(parser: argparse.ArgumentParser, depth_mult: float, batch_size: int) -> None:
    """The model and device settings the AT benchmarks share: --device, --arch, --width-mult, --depth-mult,
    --batch-size, --amp, --channels-last, --compile, --threads."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width-mult", type=float, default=0.25)
    parser.add_argument("--depth-mult", type=float, default=depth_mult)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the AT passes (default: torch's, one per core); on a "
                             "loaded machine 2 OpenMP threads on 2 shared cores can be several times slower than 1")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, depth_mult=1.0, batch_size=64)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step per configuration each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (compilation with --compile)")
    parser.add_argument("--attack-steps", type=int, nargs="+", default=[0, 1, 2, 5, 10])
    parser.add_argument("--activations", nargs="+", default=["relu", "silu", "gelu", "softplus"])
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, pieces = measure(args)
    record = {
        "benchmark": "at_step_time", "date": datetime.date.today().isoformat(), "machine": machine(args.device),
        "settings": {k: v for k, v in vars(args).items() if k not in ("attack_steps", "activations")},
        "rows": rows, "pieces": pieces,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[args.device.split(":")[0]] = record  # one record per device kind: CPU and GPU side by side
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"{'activation':<12}{'k':>4}{'s/step':>10}{'img/s':>9}{'vs clean relu':>15}{'vs relu same k':>16}"
          f"{'bound s':>10}{'vs bound':>10}")
    for row in rows:
        print(f"{row['activation']:<12}{row['attack_steps']:>4}{row['seconds_per_step']:>10.4f}"
              f"{row['images_per_s']:>9.0f}{row['vs_clean_relu']:>15.2f}{row['vs_relu_same_k'] or float('nan'):>16.2f}"
              f"{row['bound_s']:>10.4f}{row['vs_bound']:>10.2f}")
    for piece in pieces:
        print(f"{piece['activation']}: forward {piece['forward_s']:.4f} s, attack pass {piece['attack_pass_s']:.4f} s,"
              f" train step {piece['train_step_s']:.4f} s")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
