"""Time per SAT training step: clean vs PGD-k adversarial training, ReLU vs smooth activations.

SAT's claim: a smooth activation costs nothing extra. PGD-k AT should cost about (k + 1)x a clean step
(k forward + input-backward passes, then one forward + backward update). Everything is measured in one run on
one machine, with batches of pre-decoded tensors already on the device (the model/attack part alone; the FFCV
loader's rate is measured by loader_throughput.py).

    python benchmarks/at_step_time.py                      # CPU, fp32
    python benchmarks/at_step_time.py --device cuda --amp bf16 --channels-last --compile
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from trainers.attacks import AttackConfig
from trainers.models import build_model
from trainers.training import (OptimizerConfig, TrainConfig, build_optimizer, build_scheduler,
                               optimize_for_device, seed_everything, train_one_epoch)

RESULTS = Path(__file__).parent / "results" / "at_step_time.json"
EPS = 4 / 255


def time_steps(activation: str, attack_steps: int, args: argparse.Namespace) -> float:
    """Median seconds per training step (attack + update) over `args.steps` timed steps."""
    seed_everything(0)
    device = torch.device(args.device)
    model = build_model(args.arch, 10, activation=activation, width_mult=args.width_mult,
                        resolution=args.resolution).to(device)
    attack = (AttackConfig(eps=EPS, step_size=EPS / max(attack_steps // 2, 1), steps=attack_steps)
              if attack_steps else None)
    config = TrainConfig(epochs=1, optimizer=OptimizerConfig(lr=0.01, schedule="constant"), train_attack=attack,
                         eval_attack=None, amp=args.amp, channels_last=args.channels_last, compile=args.compile)
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=10**6)
    runnable = optimize_for_device(model, config)
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    one_step = [(images, labels)]
    for _ in range(args.warmup):  # includes compilation when --compile
        train_one_epoch(runnable, one_step, optimizer, scheduler, config, device)
    durations = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_one_epoch(runnable, one_step, optimizer, scheduler, config, device)  # syncs on its metrics
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width-mult", type=float, default=0.25)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attack-steps", type=int, nargs="+", default=[0, 1, 2, 5, 10])
    parser.add_argument("--activations", nargs="+", default=["relu", "silu", "gelu", "softplus"])
    args = parser.parse_args()

    seconds = {(activation, k): time_steps(activation, k, args)
               for activation in args.activations for k in args.attack_steps}
    clean_relu = seconds[("relu", 0)] if ("relu", 0) in seconds else min(seconds.values())
    rows = [{"activation": activation, "attack_steps": k, "seconds_per_step": round(s, 5),
             "vs_clean_relu": round(s / clean_relu, 3),
             "vs_relu_same_k": round(s / seconds[("relu", k)], 3) if ("relu", k) in seconds else None}
            for (activation, k), s in seconds.items()]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    record = {
        "benchmark": "at_step_time", "date": datetime.date.today().isoformat(),
        "machine": {"device": args.device, "device_name": device_name or platform.machine(),
                    "cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "settings": {k: v for k, v in vars(args).items() if k not in ("attack_steps", "activations")},
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[args.device.split(":")[0]] = record  # one record per device kind: CPU and GPU side by side
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"{'activation':<12}{'k':>4}{'s/step':>10}{'vs clean relu':>15}{'vs relu same k':>16}")
    for row in rows:
        print(f"{row['activation']:<12}{row['attack_steps']:>4}{row['seconds_per_step']:>10.4f}"
              f"{row['vs_clean_relu']:>15.2f}{row['vs_relu_same_k'] or float('nan'):>16.2f}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
