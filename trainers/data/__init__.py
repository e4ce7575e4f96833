"""Data: converters to FFCV .beton files, seeded augmentations and loaders, S3 staging.

FFCV changes torch's intra-op thread count for the whole calling thread: to 1 when it is first imported
(`ffcv.pipeline.compiler`), to a Loader's `num_workers` when one is built and at every epoch. Every FFCV import
and Loader here runs under `torch_threads_kept()`, so a process keeps the thread count it chose.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's intra-op thread count, as it was, when the block ends."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def set_jit_opt_level(level: int) -> None:
    """numba's optimisation level for what FFCV compiles in this process. numba fixes it when it sets up its code
    generator, at the first compilation (FFCV's import makes one): call this before importing FFCV."""
    os.environ["NUMBA_OPT"] = str(level)
    if "numba.core.config" in sys.modules:  # numba read the variable at its import: set what it read
        config = sys.modules["numba.core.config"]
        config.OPT = config._process_opt_level(str(level))
