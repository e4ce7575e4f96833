"""PGD-k adversarial-training throughput: satscale versus the MadryLab `robustness` library, side by side.

Both train the same network (satscale's resnet18, the same initial weights) on the same batch of Fashion-MNIST
images with the same attack (L-inf PGD-k with random start, same eps, step size and steps) and batch size:

- satscale: `trainers.training.train_one_epoch` on one batch, the function the Ray Train worker runs
  (PGDAttacker: BatchNorm in eval mode, parameters frozen, input gradients only; then the update);
- robustness 1.2.1: its `AttackerModel` (the library's normalizer in front of the same network, without
  satscale's own normalization layer) called with `make_adv=True` (its `Attacker`: PGD with `LinfStep`, random
  start), then a plain SGD step on the cross-entropy of its output, as its training loop does. It runs once with
  `use_best=False` (the same work as satscale's training attack) and once with `use_best=True`, the default
  of robustness's training CLI (one extra forward per attack).

satscale can take its own switches (`--amp bf16 --channels-last --compile`, what study files set under `train:`);
it then also runs in plain fp32 eager beside them. robustness always runs as its training loop does: fp32, eager,
contiguous tensors (it has no autocast path).

Both use SGD (momentum 0.9, Nesterov, weight decay 5e-4 on weights, lr 0.01) and label smoothing 0.1. The steps
are timed round-robin in one process, one step of each per round, so machine load spreads evenly over them.

robustness lives in its own virtualenv, `benchmarks/.venv-robustness` (torch pinned like the project; robustness
installed with --no-deps, since its declared torchvision/tables/seaborn are not on the attack path and PyPI's
torchvision does not install beside this torch build). The script creates it on the first run and re-runs
itself there:

    python benchmarks/peer_robustness.py                      # CPU here; on a GPU machine it picks CUDA
    python benchmarks/peer_robustness.py --amp bf16 --channels-last --compile --warmup 2   # satscale's fastest
    python benchmarks/peer_robustness.py --device cuda --torch-spec "torch==2.13.0"

robustness hard-codes CUDA (`orig_input.cuda()` in `Attacker.forward`); on CPU the script makes
`Tensor.cuda` return the tensor itself during the library's attack call, and changes nothing else.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import subprocess
import sys
import types
import venv
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(__file__).resolve().parent / ".venv-robustness"
RESULTS = Path(__file__).parent / "results" / "peer_robustness.json"
ROBUSTNESS = "robustness==1.2.1.post2"
# What robustness.attacker imports (attacker -> tools.helpers -> tools.constants -> cox -> tensorboardX), and
# what trainers.models / trainers.training need; the project itself (ray, mlflow, ffcv) is not installed there.
VENV_REQUIREMENTS = ["numpy", "pydantic", "pillow", "dill", "tqdm", "pandas", "cox", "tensorboardX"]


def in_benchmark_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_venv(torch_spec: str) -> Path:
    """The benchmark's virtualenv with robustness installed (created once); returns its python."""
    python = VENV / "bin" / "python"
    marker = VENV / "satscale-ready"
    if not marker.exists():
        print(f"creating {VENV} ({torch_spec}, {ROBUSTNESS} --no-deps)", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, *torch_spec.split(), *VENV_REQUIREMENTS], check=True)
        subprocess.run([*pip, "--no-deps", ROBUSTNESS], check=True)
        marker.write_text(f"{torch_spec}\n{ROBUSTNESS}\n")
    return python


# ---- everything below runs inside the benchmark venv ----

def fashion_mnist_batch(batch_size: int, resolution: int, root: Path | None = None, split: str = "train"):
    """The first `batch_size` Fashion-MNIST images of `split` (idx files under `root`, default Debian's copy) as
    (N, 3, R, R) floats in [0, 1], and labels; uniform noise (recorded as such) where the files are missing,
    e.g. on the GPU machine."""
    import torch
    import torch.nn.functional as F

    from trainers.data.errors import SourceError
    from trainers.data.sources import read_source

    try:
        source = read_source("fashion-mnist", root, split)
    except SourceError:
        generator = torch.Generator().manual_seed(0)
        return (torch.rand(batch_size, 3, resolution, resolution, generator=generator),
                torch.randint(0, 10, (batch_size,), generator=generator), "uniform noise (no Fashion-MNIST here)")
    images = torch.from_numpy(source.images[:batch_size].copy()).float().div(255).unsqueeze(1)
    images = F.interpolate(images, size=resolution, mode="bilinear").clamp(0, 1).repeat(1, 3, 1, 1)
    labels = torch.from_numpy(source.labels[:batch_size].astype("int64"))
    return images.contiguous(), labels, f"Fashion-MNIST {split}, first {batch_size} images, bilinear to {resolution} px"


@contextlib.contextmanager
def cuda_calls_stay_on(device) -> Iterator[None]:
    """robustness moves the attack's origin with `.cuda()`; on CPU, let that be a no-op."""
    import torch

    if device.type == "cuda":
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def robustness_step(activation: str, attack, args: argparse.Namespace, batch, use_best: bool) -> Callable[[], None]:
    """One robustness training step: AttackerModel(make_adv=True), then cross-entropy + SGD."""
    import torch
    import torch.nn.functional as F
    from robustness.attacker import AttackerModel

    from at_step_time import seeded_model

    class Network(torch.nn.Module):
        """satscale's network behind robustness's calling convention (it passes latent/ReLU flags)."""

        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, x, with_latent=False, fake_relu=False, no_relu=False):
            return self.network(x)

    device = torch.device(args.device)
    model = seeded_model(activation, args, args.resolution)
    statistics = types.SimpleNamespace(mean=model.normalize.mean.view(-1).cpu(), std=model.normalize.std.view(-1).cpu())
    attacker_model = AttackerModel(Network(model.network), statistics).to(device)
    optimizer = torch.optim.SGD(
        [{"params": [p for p in attacker_model.parameters() if p.dim() > 1], "weight_decay": 5e-4},
         {"params": [p for p in attacker_model.parameters() if p.dim() <= 1], "weight_decay": 0.0}],
        lr=0.01, momentum=0.9, nesterov=True)
    attack_kwargs = {"constraint": "inf", "eps": attack.eps, "step_size": attack.step_size,
                     "iterations": attack.steps, "random_start": attack.random_start, "use_best": use_best}
    images, labels = batch

    def step() -> None:
        attacker_model.train()
        with cuda_calls_stay_on(device):
            logits, _adv = attacker_model(images, labels, make_adv=True, **attack_kwargs)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # as satscale's loop, wait for the step to finish (its finiteness check syncs)
    return step


def measure(args: argparse.Namespace) -> dict:
    import importlib.metadata

    import torch

    from at_step_time import at_step, interleaved_medians, machine
    from trainers.attacks import AttackConfig

    device = torch.device(args.device)
    images, labels, data = fashion_mnist_batch(args.batch_size, args.resolution, args.data_root, args.data_split)
    batch = (images.to(device), labels.to(device))
    # satscale with the switches asked for, and in plain fp32 eager beside it when they differ from that.
    plain = argparse.Namespace(**{**vars(args), "amp": "off", "channels_last": False, "compile": False})
    libraries = ["satscale", *(["satscale fp32 eager"] if vars(plain) != vars(args) else []), "robustness",
                 "robustness use_best"]
    steps: dict[Hashable, Callable[[], None]] = {}
    for k in args.attack_steps:
        attack = AttackConfig(eps=args.eps, step_size=args.step_size, steps=k, random_start=True)
        steps[("satscale", k)] = at_step(args.activation, attack, args, batch=batch)
        if "satscale fp32 eager" in libraries:
            steps[("satscale fp32 eager", k)] = at_step(args.activation, attack, plain, batch=batch)
        steps[("robustness", k)] = robustness_step(args.activation, attack, args, batch, use_best=False)
        steps[("robustness use_best", k)] = robustness_step(args.activation, attack, args, batch, use_best=True)
    seconds = interleaved_medians(steps, device, args.warmup, args.steps)
    rows = []
    for k in args.attack_steps:
        for name in libraries:
            rows.append({"library": name, "attack_steps": k, "seconds_per_step": round(seconds[(name, k)], 5),
                         "images_per_s": round(args.batch_size / seconds[(name, k)], 1),
                         "time_vs_satscale": round(seconds[(name, k)] / seconds[("satscale", k)], 3)})
    return {
        "benchmark": "peer_robustness", "date": datetime.date.today().isoformat(),
        "machine": {**machine(args.device), "robustness": importlib.metadata.version("robustness")},
        "settings": {"activation": args.activation, "arch": args.arch, "width_mult": args.width_mult,
                     "depth_mult": args.depth_mult, "resolution": args.resolution, "batch_size": args.batch_size,
                     "eps": args.eps, "step_size": args.step_size, "timed_rounds": args.steps,
                     "warmup_rounds": args.warmup, "data": data, "threads": args.threads,
                     "satscale": {"amp": args.amp, "channels_last": args.channels_last, "compile": args.compile},
                     "robustness": "fp32, eager, contiguous (its training loop has no autocast)",
                     "cpu_cuda_shim": device.type != "cuda"},
        "rows": rows,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--torch-spec", default="torch==2.13.0",
                        help="pip arguments for torch in the benchmark venv (first run only)")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width-mult", type=float, default=0.25)
    parser.add_argument("--depth-mult", type=float, default=1.0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eps", default="8/255", help="pixel scale, a number or a fraction")
    parser.add_argument("--step-size", default="2/255")
    parser.add_argument("--attack-steps", type=int, nargs="+", default=[1, 7])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each library per round)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    # satscale's own switches (study files: train.amp, train.channels_last, train.compile); robustness stays fp32.
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--data-root", type=Path, default=None, help="Fashion-MNIST idx folder (default: Debian's)")
    parser.add_argument("--data-split", choices=["train", "test"], default="train")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not in_benchmark_venv():
        python = ensure_venv(args.torch_spec)
        os.execv(python, [str(python), __file__, *sys.argv[1:]])
    sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # trainers, and at_step_time beside us
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    record = measure(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    existing[args.device.split(":")[0]] = record  # one record per device kind
    RESULTS.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"{'library':<22}{'k':>4}{'s/step':>10}{'images/s':>10}{'vs satscale':>13}")
    for row in record["rows"]:
        print(f"{row['library']:<22}{row['attack_steps']:>4}{row['seconds_per_step']:>10.4f}"
              f"{row['images_per_s']:>10.1f}{row['time_vs_satscale']:>13.2f}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
