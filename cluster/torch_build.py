"""Which PyTorch build a machine installs: the CUDA build its NVIDIA driver runs, else the CPU build.

`make setup` (the Makefile's TORCH_SPEC) and the cluster's node set-up (cluster/aws.yaml) print pip's arguments
with it, before any virtualenv exists (standard library only):

    python3 cluster/torch_build.py               # torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
    python3 cluster/torch_build.py --cpu-index   # on a machine without a GPU: the CPU index, not PyPI's build

Without a GPU the plain requirement is printed by default: pip then takes the CPU wheel where one lies on local
disk (this project's CI machines); `--cpu-index` asks PyTorch's CPU index instead (cluster nodes). A driver older
than every CUDA build stops the set-up with a line saying which driver each build needs.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable

TORCH_VERSION = "2.13.0"
INDEX_URL = "https://download.pytorch.org/whl/"
# The CUDA builds published for TORCH_VERSION, newest first, with the oldest Linux driver each runs on (NVIDIA's
# CUDA Toolkit release notes, "CUDA Toolkit and Corresponding Driver Versions": the toolkit's own driver; a
# minor-version-compatible older driver runs it too, but without newer PTX, so the strict bound is kept).
CUDA_BUILDS = (("cu130", "580.65.06"), ("cu128", "570.26"), ("cu126", "560.28.03"))

Runner = Callable[..., subprocess.CompletedProcess]


class DriverTooOld(RuntimeError):
    pass


def driver_version(run: Runner = subprocess.run) -> str | None:
    """The NVIDIA driver's version as `nvidia-smi` prints it, or None where there is no driver or no GPU."""
    try:
        answer = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                     text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = answer.stdout.split() if answer.returncode == 0 else []
    return lines[0] if lines and _parsed(lines[0]) else None


def _parsed(version: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def cuda_build(driver: str | None) -> str | None:
    """The newest CUDA build `driver` runs (None: no GPU, the CPU build)."""
    if driver is None:
        return None
    for tag, oldest_driver in CUDA_BUILDS:
        if _parsed(driver) >= _parsed(oldest_driver):
            return tag
    needs = ", ".join(f"{tag} >= {oldest}" for tag, oldest in CUDA_BUILDS)
    raise DriverTooOld(f"NVIDIA driver {driver} is older than every CUDA build of torch "
                       f"{TORCH_VERSION} ({needs}); update the driver, or set TORCH_SPEC (make setup) to a build "
                       "it runs")


def pip_arguments(driver: str | None, cpu_index: bool = False) -> list[str]:
    tag = cuda_build(driver) or ("cpu" if cpu_index else None)
    return [f"torch=={TORCH_VERSION}", *(["--index-url", INDEX_URL + tag] if tag else [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-index", action="store_true", help="without a GPU: PyTorch's CPU index")
    args = parser.parse_args(argv)
    try:
        print(" ".join(pip_arguments(driver_version(), args.cpu_index)))
    except DriverTooOld as error:
        print(f"torch_build: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
