"""Every CUDA path of satscale in one command: environment, the AT step (activations x models x precision x
compile, against its analytic bound), MadryLab `robustness` side by side, the training loop with checkpoints,
DDP and the deterministic setting, fp16/bf16/fp32 attack strength on the same weights, and how many FFCV loader
cores one GPU consumes.

Built for the GPU machine this project is lent now and then (PyTorch with CUDA, no Ray, MLflow or FFCV, no
package registry, ~15 minutes in all): it needs torch, numpy and pydantic (carried as wheels: `make
gpu-check-bundle`), and `robustness` for its section. Each section runs under its own time cap, in the order of
SECTIONS; a section that fails or reaches its cap is recorded with its error and the next one runs. The JSON
under --out is rewritten after every section, so a run cut short still returns what it measured.

    python benchmarks/gpu_check.py --out results/                 # CUDA, real sizes, ~7 minutes on one H200
    python benchmarks/gpu_check.py --smoke --out /tmp/check      # CPU, toy sizes, the same code paths (~20 s)
    python benchmarks/gpu_check.py --sections environment at_step --cap at_step=60

`--smoke` runs every section on CPU at toy sizes; what needs CUDA (NCCL, the GPU's figures) falls back to the
CPU's code path (gloo) or is skipped with the reason recorded. Its test (tests/test_gpu_check.py) keeps the
script from rotting where no GPU exists.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]  # trainers, and the benchmarks beside us

# Deterministic cuBLAS needs its workspace fixed before the first cuBLAS call, which an earlier section makes.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import at_step_time  # noqa: E402
from orchestrator.comparisons import paired_difference  # noqa: E402
from trainers.attacks import AttackConfig  # noqa: E402
from trainers.checkpoint import load_model, load_training_state, save_model, save_training_state  # noqa: E402
from trainers.models import build_model  # noqa: E402
from trainers.seeding import use_deterministic_algorithms  # noqa: E402
from trainers.training import (AMP_DTYPES, OptimizerConfig, TrainConfig, build_optimizer,  # noqa: E402
                               build_scheduler, fit, iter_outcomes, native_bf16, optimize_for_device,
                               train_one_epoch)

RESULT_FILE = "gpu_check.json"
ACTIVATIONS = ("relu", "silu", "gelu", "softplus", "parametric_softplus")
SAT_COST_CLAIM = 1.02  # SAT: a smooth activation's AT step costs at most ~2 % more than ReLU's
EPS = "4/255"
# Loader rates measured on CPU (benchmarks/loader_throughput.py): images/s of one FFCV worker per resolution.
LOADER_RESULTS = Path(__file__).parent / "results" / "loader_throughput.json"


class SectionTimeout(Exception):
    """A section reached its time cap."""


class Skipped(Exception):
    """A section that cannot run here; the message says why."""


@dataclass(frozen=True)
class ModelSize:
    arch: str
    width_mult: float
    depth_mult: float
    resolution: int
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.arch} x{self.width_mult:g}w x{self.depth_mult:g}d @{self.resolution}px, batch {self.batch_size}"


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and --smoke."""

    models: tuple[ModelSize, ...]
    attack_steps: tuple[int, ...]  # PGD-k for the AT step (k = 0, the clean step, is always measured)
    warmup: int
    rounds: int
    train: ModelSize  # the training loop's model, trained on in-memory data
    train_images: int
    eval_images: int
    train_epochs: int
    peer: ModelSize  # robustness side by side
    loader_resolutions: tuple[int, ...]
    caps_s: dict[str, float] = field(default_factory=dict)


FULL = Sizes(
    models=(ModelSize("resnet50", 1.0, 1.0, 224, 256), ModelSize("efficientnet_b0", 1.0, 1.0, 224, 256)),
    attack_steps=(1, 10), warmup=2, rounds=5,
    train=ModelSize("resnet18", 1.0, 1.0, 32, 256), train_images=8192, eval_images=1024, train_epochs=3,
    peer=ModelSize("resnet50", 1.0, 1.0, 224, 128), loader_resolutions=(64, 128, 224),
    # Seconds per section; 420 in all, the GPU machine's ~15 minutes hold its start-up and a re-run of one part.
    caps_s={"environment": 15, "training": 45, "attack_precision": 25, "at_step": 170, "robustness": 50,
            "loader_cores": 40, "compile": 75},
)
SMOKE = Sizes(
    models=(ModelSize("resnet18", 0.25, 0.5, 16, 8), ModelSize("efficientnet_b0", 0.25, 0.25, 16, 8)),
    attack_steps=(1, 2), warmup=0, rounds=1,
    train=ModelSize("resnet18", 0.25, 0.5, 16, 32), train_images=128, eval_images=64, train_epochs=1,
    peer=ModelSize("resnet18", 0.25, 0.5, 16, 8), loader_resolutions=(16, 32),
    caps_s={"environment": 15, "training": 60, "attack_precision": 30, "at_step": 90, "robustness": 30,
            "loader_cores": 30, "compile": 30},
)


@dataclass
class Context:
    """What sections share: settings, and what earlier sections produced (the trained model, AT rates)."""

    args: Namespace
    sizes: Sizes
    device: torch.device
    trained: torch.nn.Module | None = None
    eval_batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ---- sections ----

def environment(context: Context) -> dict:
    """GPU, driver, CUDA/cuDNN/NCCL, torch and package versions."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "packages": {name: _version(name) for name in ("numpy", "pydantic", "triton", "robustness")}}
    info["native_bf16"] = native_bf16(context.device)  # what `amp: auto` picks on this device
    if context.cuda:
        properties = torch.cuda.get_device_properties(context.device)
        info.update({
            "gpu": properties.name, "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
            "compute_capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count, "driver": _nvidia_smi("driver_version"),
            "cudnn": torch.backends.cudnn.version(), "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        })
    else:
        info["gpu"] = None
    return info


def training(context: Context) -> dict:
    """`fit` for an epoch of in-memory data (bf16, channels_last), twice under `deterministic`; checkpoint save
    and load; one epoch through DistributedDataParallel (NCCL on CUDA, gloo on CPU) at world size 1."""
    sizes, device = context.sizes, context.device
    train, evaluation, data = in_memory_data(context.args.data, sizes, device)
    context.eval_batches = evaluation
    config = TrainConfig(epochs=sizes.train_epochs, optimizer=OptimizerConfig(lr=0.1, warmup_epochs=0.3),
                         eval_attack=AttackConfig(eps=EPS, step_size="1/255", steps=10), amp="bf16",
                         channels_last=True, deterministic=True, seed=0)

    def one_fit() -> tuple[torch.nn.Module, list[dict], float]:
        model = _model(sizes.train, "silu", num_classes=10).to(device)
        at_step_time.synchronize(device)
        start = time.perf_counter()
        history = fit(model, train, evaluation, config, device)
        at_step_time.synchronize(device)
        return model, history, time.perf_counter() - start

    try:
        model, history, seconds = one_fit()
        again, history_again, _ = one_fit()
    finally:
        use_deterministic_algorithms(False)  # fit turned it on for the process; the timings need the fast kernels
    same_weights = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    same_metrics = [_without_timing(epoch) for epoch in history] == [_without_timing(epoch) for epoch in history_again]
    context.trained = model
    result = {"data": data, "model": sizes.train.label, "activation": "silu", "train_images": sizes.train_images,
              "epochs": sizes.train_epochs, "history": history, "fit_seconds": round(seconds, 2),
              "deterministic": {"same_metrics": same_metrics, "same_weights": same_weights},
              "checkpoint": checkpoint_round_trip(model, config, device, evaluation[0][0]),
              "ddp": ddp_epoch(sizes, device, train)}
    return result


def attack_precision(context: Context) -> dict:
    """PGD-10 under fp32, bf16 and fp16 autocast on the trained model's weights: robust accuracy per precision
    and each one's paired difference from fp32 (same images, same random starts) with its 95 % interval."""
    if context.trained is None:
        raise Skipped("needs the model the training section trains; it did not finish")
    attack = AttackConfig(eps=EPS, step_size="1/255", steps=10)
    outcomes = {}
    for amp in ("off", "bf16", "fp16"):
        generator = torch.Generator(context.device).manual_seed(0)
        dtype = AMP_DTYPES[amp]
        robust = [r.cpu() for _clean, r in iter_outcomes(context.trained, context.eval_batches, attack,
                                                         context.device, dtype, channels_last=True,
                                                         generator=generator)]
        outcomes[amp] = torch.cat(robust).numpy().astype(np.float64)
    rows = {}
    for amp, values in outcomes.items():
        row = {"robust_acc": round(float(values.mean()), 4), "images": int(values.size)}
        if amp != "off":
            difference = paired_difference(values, outcomes["off"])
            row["minus_fp32"] = {"value": round(difference.value, 4), "low": round(difference.low, 4),
                                 "high": round(difference.high, 4)}
            row["outcomes_differing_from_fp32"] = int((values != outcomes["off"]).sum())
        rows[amp] = row
    return {"attack": attack.model_dump(), "precisions": rows}


def at_step(context: Context) -> dict:
    """The AT step per model and precision, every activation timed round-robin in one group: seconds and
    images/s, each smooth/ReLU ratio (SAT's claim: <= 1.02) and each step against k attack passes + one
    training step. Groups run most important first, so a cap loses the least."""
    groups = []
    for amp in ("bf16", "off"):
        for size in context.sizes.models:
            groups.append((size, amp, True, ACTIVATIONS))
    groups.append((context.sizes.models[0], "bf16", False, ("relu", "silu")))  # what channels_last buys
    return {"groups": [_record_group(context, *group, compiled=False) for group in groups]}


def compile_section(context: Context) -> dict:
    """The first model's bf16 channels_last PGD-1 step compiled (ReLU and SiLU), against eager in the same
    group, and the compiled model's logits against eager on the same weights."""
    if context.args.smoke:
        raise Skipped("--smoke skips torch.compile (inductor takes ~40 s per model on 2 CPU cores); "
                      "tests/test_training.py checks the compiled path's numerics on CPU")
    size = context.sizes.models[0]
    sizes = replace(context.sizes, attack_steps=(1,))
    group = _record_group(replace(context, sizes=sizes), size, "bf16", True, ("relu", "silu"), compiled=True)
    return {"group": group, "logits_vs_eager": compiled_numerics(size, context.device)}


def robustness_side_by_side(context: Context) -> dict:
    """satscale (bf16 channels_last, and fp32 eager) and robustness 1.2.1 (fp32, as its training loop runs) on the
    same network, initial weights, batch and PGD-k, in one process."""
    try:
        import robustness.attacker  # noqa: F401
    except ImportError as error:
        raise Skipped(f"robustness is not importable here ({error}); carry its wheels (make gpu-check-bundle) or "
                      "run benchmarks/peer_robustness.py, which builds its own virtualenv") from error
    import peer_robustness

    size = context.sizes.peer
    args = Namespace(device=str(context.device), activation="relu", arch=size.arch, width_mult=size.width_mult,
                     depth_mult=size.depth_mult, resolution=size.resolution, batch_size=size.batch_size,
                     eps="8/255", step_size="2/255", attack_steps=[1, 7], steps=context.sizes.rounds,
                     warmup=max(context.sizes.warmup, 1), amp="bf16", channels_last=True, compile=False,
                     threads=None, data_root=context.args.data, data_split="test")
    record = peer_robustness.measure(args)
    return {"settings": record["settings"], "rows": record["rows"]}


def loader_cores(context: Context) -> dict:
    """Images/s one GPU consumes in PGD-1 AT (the first model, bf16, channels_last, SiLU) at each resolution,
    against one FFCV loader core's rate measured on CPU: how many loader cores keep one GPU fed."""
    per_core = _loader_rate_per_core()
    size = context.sizes.models[0]
    pgd_1 = replace(context, sizes=replace(context.sizes, attack_steps=(1,)))
    rows = []
    for resolution in context.sizes.loader_resolutions:
        group = _measure_group(pgd_1, replace(size, resolution=resolution), "bf16", True, ("silu",), compiled=False)
        consumed = next(row["images_per_s"] for row in group["rows"] if row["attack_steps"] == 1)
        loader_rate = per_core.get(resolution)
        rows.append({"resolution": resolution, "at_images_per_s": consumed,
                     "loader_images_per_s_per_core": loader_rate,
                     "loader_cores_needed": float(f"{consumed / loader_rate:.3g}") if loader_rate else None})
    return {"model": size.arch, "attack": "PGD-1", "loader_source": str(LOADER_RESULTS.relative_to(ROOT)),
            "rows": rows}


# The order they run in: what later sections need (the trained model) first, compile (slowest to warm) last.
SECTIONS: dict[str, Callable[[Context], dict]] = {
    "environment": environment, "training": training, "attack_precision": attack_precision, "at_step": at_step,
    "robustness": robustness_side_by_side, "loader_cores": loader_cores, "compile": compile_section,
}


# ---- pieces ----

def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_smi(query: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _model(size: ModelSize, activation: str, num_classes: int = 10) -> torch.nn.Module:
    return build_model(size.arch, num_classes, seed=0, activation=activation, width_mult=size.width_mult,
                       depth_mult=size.depth_mult, resolution=size.resolution)


def _group_args(context: Context, size: ModelSize, amp: str, channels_last: bool, activations, compiled: bool):
    return Namespace(device=str(context.device), arch=size.arch, width_mult=size.width_mult,
                     depth_mult=size.depth_mult, batch_size=size.batch_size, resolution=size.resolution, amp=amp,
                     channels_last=channels_last, compile=compiled, activations=list(activations),
                     attack_steps=list(context.sizes.attack_steps), warmup=context.sizes.warmup + compiled,
                     steps=context.sizes.rounds)


def _measure_group(context: Context, size: ModelSize, amp: str, channels_last: bool, activations,
                   compiled: bool) -> dict:
    rows, pieces = at_step_time.measure(_group_args(context, size, amp, channels_last, activations, compiled))
    return {"model": size.label, "amp": amp, "channels_last": channels_last, "compile": compiled, "rows": rows,
            "pieces": pieces}


def _record_group(context: Context, size: ModelSize, amp: str, channels_last: bool, activations,
                  compiled: bool) -> dict:
    """One group, with the SAT claim checked on each smooth activation's ratio to ReLU at the same k."""
    group = _measure_group(context, size, amp, channels_last, activations, compiled)
    ratios = [row["vs_relu_same_k"] for row in group["rows"] if row["activation"] != "relu" and row["vs_relu_same_k"]]
    group["smooth_vs_relu_max"] = max(ratios) if ratios else None
    group["sat_claim_holds"] = all(ratio <= SAT_COST_CLAIM for ratio in ratios) if ratios else None
    print(f"  {group['model']} amp={amp} channels_last={channels_last} compile={compiled}: smooth/ReLU max "
          f"{group['smooth_vs_relu_max']}", flush=True)
    return group


def in_memory_data(root: Path | None, sizes: Sizes, device: torch.device):
    """(train batches, eval batches, what the data is) on `device`: Fashion-MNIST's test split (its idx files
    under `root`, or Debian's copy) resized to the training model's resolution; uniform noise with random labels
    (recorded as such) where neither exists, which exercises the same code but trains nothing."""
    images, labels, data = _fashion_mnist(root, sizes.train_images + sizes.eval_images, sizes.train.resolution)
    images, labels = images.to(device), labels.to(device)
    batch = sizes.train.batch_size

    def batches(start: int, stop: int):
        return [(images[i:min(i + batch, stop)], labels[i:min(i + batch, stop)]) for i in range(start, stop, batch)]
    return batches(0, sizes.train_images), batches(sizes.train_images, len(labels)), data


def _fashion_mnist(root: Path | None, count: int, resolution: int):
    import peer_robustness

    return peer_robustness.fashion_mnist_batch(count, resolution, root=root, split="test")


def _without_timing(metrics: dict) -> dict:
    return {name: value for name, value in metrics.items() if name != "images_per_s"}


def checkpoint_round_trip(model: torch.nn.Module, config: TrainConfig, device: torch.device,
                          images: torch.Tensor) -> dict:
    """The training state and the finished model written and read back (onto the device): equal tensors and
    the same logits."""
    optimizer = build_optimizer(model, config.optimizer)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=1)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": 0}
    with tempfile.TemporaryDirectory() as folder:
        save_training_state(Path(folder), state)
        loaded = load_training_state(Path(folder), map_location=device)
        save_model(Path(folder) / "model", model)
        # In the trained model's memory format: channels_last convolutions round differently from contiguous ones.
        reloaded = optimize_for_device(load_model(Path(folder) / "model", map_location=device).to(device), config)
    same_state = all(torch.equal(value, loaded["model"][key]) for key, value in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        same_logits = torch.equal(model(images), reloaded(images))
    return {"state_equal": same_state, "on_device": all(t.device.type == device.type for t in loaded["model"].values()),
            "model_logits_equal": same_logits}


def ddp_epoch(sizes: Sizes, device: torch.device, train) -> dict:
    """One epoch of PGD-1 AT through DistributedDataParallel at world size 1 (the Ray Train workers' wrapper)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = _model(sizes.train, "silu").to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda"
                                                        else None)
        config = TrainConfig(epochs=1, optimizer=OptimizerConfig(lr=0.05), eval_attack=None, amp="bf16")
        optimizer = build_optimizer(model, config.optimizer)
        scheduler = build_scheduler(optimizer, config, steps_per_epoch=len(train))
        metrics = train_one_epoch(ddp, train, optimizer, scheduler, config, device)
    finally:
        torch.distributed.destroy_process_group()
    return {"backend": backend, "world_size": 1, "train_loss": round(metrics["train_loss"], 4),
            "images_per_s": round(metrics["images_per_s"], 1)}


def compiled_numerics(size: ModelSize, device: torch.device) -> dict:
    """Eval-mode logits of the compiled model against eager on the same weights (bf16 and fp32)."""
    model = _model(size, "silu").to(device).eval()
    images = torch.rand(8, 3, size.resolution, size.resolution, generator=torch.Generator().manual_seed(0)).to(device)
    compiled = torch.compile(model)
    result = {}
    for amp in ("off", "bf16"):
        dtype = AMP_DTYPES[amp]
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            eager, graph = model(images).float(), compiled(images).float()
        result[amp] = {"max_abs_diff": float((eager - graph).abs().max()), "logit_scale": float(eager.abs().max()),
                       "same_argmax": bool((eager.argmax(1) == graph.argmax(1)).all())}
    return result


def _loader_rate_per_core() -> dict[int, float]:
    """Images/s of one FFCV worker per resolution, from the CPU loader benchmark's results."""
    if not LOADER_RESULTS.exists():
        return {}
    results = json.loads(LOADER_RESULTS.read_text())["results"]
    return {row["resolution"]: row["images_per_s"] for row in results if row.get("workers") == 1
            and str(row.get("loader", "")).startswith("ffcv")}


@contextlib.contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the block after `seconds` (between Python bytecodes: a running kernel ends first)."""
    def expire(_signum, _frame):
        raise SectionTimeout(f"time cap of {seconds:g} s reached")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(name: str, context: Context, cap_s: float) -> dict:
    """One section under its cap: status ok | skipped | timed_out | failed, its seconds and result or error."""
    start = time.perf_counter()
    entry: dict = {"cap_s": cap_s}
    try:
        with time_cap(cap_s):
            entry["result"] = SECTIONS[name](context)
        entry["status"] = "ok"
    except Skipped as reason:
        entry.update(status="skipped", reason=str(reason))
    except SectionTimeout as error:
        entry.update(status="timed_out", error=str(error))
    except Exception as error:  # recorded, and the next section runs
        entry.update(status="failed", error=f"{type(error).__name__}: {error}",
                     traceback=traceback.format_exc(limit=8))
    finally:
        if context.cuda:
            torch.cuda.empty_cache()
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def write_json(path: Path, record: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(partial, path)


def parse_caps(values: list[str]) -> dict[str, float]:
    caps = {}
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in SECTIONS or not seconds:
            raise SystemExit(f"--cap takes SECTION=SECONDS with SECTION one of {', '.join(SECTIONS)}; got {value!r}")
        caps[name] = float(seconds)
    return caps


def parse_args(argv: list[str] | None = None) -> Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {RESULT_FILE}")
    parser.add_argument("--smoke", action="store_true", help="CPU, toy sizes, the same code paths")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--cap", action="append", default=[], metavar="SECTION=SECONDS",
                        help="override a section's time cap")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder with Fashion-MNIST's t10k idx files (default: Debian's copy, else noise)")
    args = parser.parse_args(argv)
    args.caps = parse_caps(args.cap)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --smoke for the CPU code paths")
    sizes = SMOKE if args.smoke else FULL
    context = Context(args, sizes, torch.device("cpu" if args.smoke else "cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / RESULT_FILE
    record = {"benchmark": "gpu_check", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "mode": "smoke" if args.smoke else "full", "sizes": asdict(sizes), "sections": {}}
    for name in [name for name in SECTIONS if name in args.sections]:  # later sections use earlier ones' work
        cap_s = args.caps.get(name, sizes.caps_s[name])
        print(f"[{name}] (cap {cap_s:g} s)", flush=True)
        entry = run_section(name, context, cap_s)
        record["sections"][name] = entry
        write_json(path, record)
        print(f"[{name}] {entry['status']} in {entry['seconds']} s {entry.get('reason') or entry.get('error') or ''}",
              flush=True)
    print(f"written to {path}")
    return 1 if any(entry["status"] in ("failed", "timed_out") for entry in record["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
