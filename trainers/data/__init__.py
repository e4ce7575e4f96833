"""Data: converters to FFCV .beton files, seeded augmentations and loaders, S3 staging.

FFCV changes torch's intra-op thread count for the whole calling thread: to 1 when it is first imported
(`ffcv.pipeline.compiler`), to a Loader's `num_workers` when one is built and at every epoch. Every FFCV import
here runs under `importing_ffcv()` and every Loader under `torch_threads_kept()`, so a process keeps the thread
count it chose.
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


@contextlib.contextmanager
def importing_ffcv() -> Iterator[None]:
    """Import FFCV's modules in this block: torch's thread count kept, and FFCV's one module-level numba typed Dict
    (`ffcv.fields.rgb_image.IMAGE_MODES`, two entries, read only from Python code) built as a plain dict. Building
    a typed Dict with str keys compiles numba's dictionary and unicode code: 2-5 CPU-seconds of every process that
    imports FFCV, every Train worker among them (benchmarks/README.md, trial start-up)."""
    import numba.typed

    numba.typed.Dict = dict  # numba.typed resolves Dict lazily (a module __getattr__): removing ours restores it
    try:
        with torch_threads_kept():
            yield
    finally:
        del numba.typed.Dict


def set_jit_opt_level(level: int) -> None:
    """numba's optimisation level for what FFCV compiles in this process. numba fixes it when it sets up its code
    generator, at its first compilation (a loader's pipeline, or any numba code run earlier in the process): call this
    before importing FFCV."""
    os.environ["NUMBA_OPT"] = str(level)
    if "numba.core.config" in sys.modules:  # numba read the variable at its import: set what it read
        config = sys.modules["numba.core.config"]
        config.OPT = config._process_opt_level(str(level))
