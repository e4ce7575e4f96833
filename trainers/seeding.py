"""Where every random number of a trial comes from: named streams derived from the trial's seed.

A trial is a pure function of its config. Instead of one global RNG whose state depends on everything that ran
before (other trials in the process, how many batches an earlier epoch had, a resume), each consumer draws from
its own stream, derived from (seed, stream name, rank, epoch, ...) by hashing:

- `init`: the initial weights (`build_model(..., seed=...)`). Models whose parameter shapes agree (an
  activation-only difference) start from identical weights;
- `train` / `train_attack` / `eval_attack` per (rank, epoch): dropout and other global-RNG users, the training
  attack's random starts and clean-start choices, the evaluation attack's starts;
- the data order and augmentations per (epoch, sample index) (`trainers.data.augment`), the same on any rank
  count and thread count.

Trials that differ only in what is searched therefore share their randomness per seed (common random numbers):
the same batches, augmentations and attack starts; seed k of every configuration forms one pair. A resume from
an epoch checkpoint re-derives the same streams, so resumed equals uninterrupted.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

SEED_BITS = 63  # torch.manual_seed takes a signed 64-bit value


def derive_seed(seed: int, *stream: str | int) -> int:
    """A 63-bit seed for the named `stream` of `seed`: distinct streams are independent, and the same names
    always give the same seed (any process, any machine)."""
    text = repr((int(seed), *stream)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> (64 - SEED_BITS)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stream_generator(seed: int, *stream: str | int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` for one named stream (attack random starts draw from these)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *stream))
    return generator


@contextlib.contextmanager
def seeded(seed: int, *stream: str | int) -> Iterator[None]:
    """Run the block on the global CPU RNGs seeded from `stream`, restoring their previous states afterwards
    (building a model under it leaves the caller's random state as it was)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(derive_seed(seed, *stream))
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def seed_epoch(seed: int, rank: int, epoch: int) -> None:
    """Seed the global RNGs for one rank's epoch (dropout, drop-path and anything else drawing from them)."""
    seed_everything(derive_seed(seed, "train", rank, epoch))


# cuBLAS needs a fixed workspace for deterministic GEMMs (CUDA >= 10.2); set before the first cuBLAS call.
CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_algorithms(enabled: bool) -> None:
    """The `deterministic` setting: on CUDA, deterministic cuDNN/cuBLAS kernels only (an op without one raises)
    and no cuDNN autotuning, whose choice can differ from run to run. CPU kernels are deterministic for a fixed
    thread count without it; the setting only adds the check."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False
