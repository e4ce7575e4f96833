"""Wall time of the embedded default study (`python orchestrator/scale_study.py`, no arguments), end to end:
local Ray start, Fashion-MNIST conversion, its trials, reports and MLflow logging; each trial's overhead, from
the trial's start to its first training batch (`time_to_first_batch_s`, which the Ray Train worker reports with
its first epoch; `time_to_worker_start_s` is the part before the worker's loop begins); what the newcomer sees
(console lines, error-level lines among them); and whether the demo is worth reading (every finished trial's
clean accuracy against 70 %, the best against 75 %).

Runs in a fresh temporary folder (so the data conversion is included, as on a first run) and records the
figures in benchmarks/results/embedded_default.json.

`--own-ray-head` runs the study on a Ray head this script starts on free loopback ports, with RAY_ADDRESS in
its environment, instead of the local Ray that scale_study.py starts (the Ray start is then not in the wall
time). Needed where other Ray instances run on the same machine: Ray Train's PlacementGroupCleaner looks the
cluster up without an address, finds several, fails, and finished trials' placement groups are never freed,
so on 2 CPUs the study hangs after its first two trials (seen with Ray 2.60 on a shared machine).

    python benchmarks/embedded_default.py
    python benchmarks/embedded_default.py --set train.epochs=1 --output /tmp/x.json   # any scale_study --set
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "embedded_default.json"
# Issue 15's targets for the embedded default on 2 quiet cores.
TARGET_SECONDS = 180
START_UP_TARGET_S = 10
CLEAN_FLOOR, BEST_CLEAN_FLOOR = 0.70, 0.75
# What a newcomer reads as "broken": a log record at error level, or a Ray C++ "E" line.
ERROR_LINE = re.compile(r"\bERROR\b|^\[?E\d{4}|\berror\b.*core_worker|Traceback")


@dataclass(frozen=True)
class StudyRun:
    wall_seconds: float
    stdout: str
    stderr: str
    trials: list[list[dict]]  # per trial, Tune's results (one per epoch), in trial order

    @property
    def leaderboard(self) -> list[str]:
        return [line for line in self.stdout.splitlines() if re.match(r"\| \d+ \|", line)]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def own_ray_head(num_cpus: int) -> Iterator[dict[str, str]]:
    """A Ray head on free loopback ports whose processes know its address; yields the study's environment.
    Stops only this head (`ray start --block` stops what it started)."""
    temp_dir = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's socket paths are limited
    ports = {flag: _free_port() for flag in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "dashboard-agent-grpc-port", "metrics-export-port",
                                             "runtime-env-agent-port", "ray-client-server-port")}
    # Ray 2.59+ heads want token authentication; this head gets its own token (as tests/conftest.py's does).
    environment = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                   "RAY_ADDRESS": f"127.0.0.1:{ports['port']}",
                   "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{ports['dashboard-port']}"}
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())],
        env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        probe = [sys.executable, "-c", "import ray; ray.init(); ray.shutdown()"]
        deadline = time.monotonic() + 180
        while subprocess.run(probe, env=environment, capture_output=True).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the benchmark's Ray head did not start")
            time.sleep(2)
        yield environment
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


# The start-up settings satscale changes from Ray's and numba's defaults, as they were before (issue 15): with
# `--startup-defaults` the study runs with these, for a before/after comparison in one session.
STARTUP_DEFAULTS = {"env": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2",
                            "RAY_prestart_worker_first_driver": "1"},
                    "overrides": ["data.jit_opt_level=3"]}


def run_scale_study(arguments: list[str], study_name: str = "default", own_head: bool = False,
                    extra_env: dict[str, str] | None = None) -> StudyRun:
    """`scale_study.py ARGUMENTS` in a fresh folder (default storage and MLflow there), on the local Ray it
    starts or, with `own_head`, on `own_ray_head`."""
    with tempfile.TemporaryDirectory(prefix="satscale-bench-") as folder, \
            (own_ray_head(os.cpu_count() or 2) if own_head else contextlib.nullcontext(None)) as environment:
        environment = {**(environment or os.environ), **(extra_env or {})}
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(ROOT / "orchestrator" / "scale_study.py"), *arguments],
                             cwd=folder, capture_output=True, text=True, env=environment)
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            sys.exit(f"the study failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        result_files = sorted((Path(folder) / "satscale_runs" / study_name).glob("*/result.json"))
        trials = [[json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                  for path in result_files]
    return StudyRun(seconds, run.stdout, run.stderr, trials)


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "n": len(values)} if values else {}


def trial_overheads(run: StudyRun) -> dict:
    """Per-trial start-up figures from each trial's first report, and their share of the trials' time."""
    firsts = [results[0] for results in run.trials if results]
    to_batch = [first["time_to_first_batch_s"] for first in firsts if "time_to_first_batch_s" in first]
    to_worker = [first["time_to_worker_start_s"] for first in firsts if "time_to_worker_start_s" in first]
    trial_seconds = sum(results[-1]["time_total_s"] for results in run.trials if results)
    epoch_seconds = [[round(result["time_this_iter_s"], 1) for result in results] for results in run.trials]
    return {"time_to_first_batch_s": spread(to_batch), "time_to_worker_start_s": spread(to_worker),
            "epoch_seconds_per_trial": epoch_seconds,
            "trial_seconds_total": round(trial_seconds, 1),
            "overhead_share_of_trial_seconds": round(sum(to_batch) / trial_seconds, 3) if trial_seconds else None}


def console_figures(run: StudyRun) -> dict:
    lines = run.stdout.splitlines() + run.stderr.splitlines()
    return {"lines": len(lines), "error_level_lines": [line for line in lines if ERROR_LINE.search(line)][:20]}


def accuracy_figures(run: StudyRun) -> dict:
    """Each finished trial's last clean and robust accuracy, against the demo's floors."""
    finals = [results[-1] for results in run.trials if results]
    clean = [final["clean_acc"] for final in finals if "clean_acc" in final]
    return {"clean_acc": [round(value, 3) for value in clean],
            "robust_acc": [round(final["robust_acc"], 3) for final in finals if "robust_acc" in final],
            "every_trial_at_least": CLEAN_FLOOR, "best_at_least": BEST_CLEAN_FLOOR,
            "within_target": bool(clean) and min(clean) >= CLEAN_FLOOR and max(clean) >= BEST_CLEAN_FLOOR}


def write_record(path: Path, record: dict) -> None:
    """Write `record` to `path`, keeping what was there before under `earlier_runs` (newest first)."""
    earlier: list[dict] = []
    if path.exists():
        previous = json.loads(path.read_text())
        earlier = [{k: v for k, v in previous.items() if k != "earlier_runs"}, *previous.get("earlier_runs", [])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "earlier_runs": earlier}, indent=2) + "\n")


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": [round(value, 1) for value in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to scale_study.py (the record then no longer is the embedded default's)")
    parser.add_argument("--own-ray-head", action="store_true", help="see above: for machines with other Rays")
    parser.add_argument("--startup-defaults", action="store_true",
                        help="run with Ray's and numba's start-up defaults (STARTUP_DEFAULTS): the 'before' figure")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    host = machine()
    if args.startup_defaults:
        args.overrides += STARTUP_DEFAULTS["overrides"]
    run = run_scale_study([argument for override in args.overrides for argument in ("--set", override)],
                          own_head=args.own_ray_head,
                          extra_env=STARTUP_DEFAULTS["env"] if args.startup_defaults else None)
    record = {
        "benchmark": "embedded_default", "date": datetime.date.today().isoformat(), "machine": host,
        "overrides": args.overrides, "startup_defaults": args.startup_defaults, "own_ray_head": args.own_ray_head, "wall_seconds": round(run.wall_seconds, 1), "target_seconds": TARGET_SECONDS,
        "within_target": run.wall_seconds < TARGET_SECONDS, "trials": len(run.leaderboard),
        "per_trial_overhead": trial_overheads(run), "start_up_target_s": START_UP_TARGET_S,
        "accuracy": accuracy_figures(run), "console": console_figures(run), "leaderboard": run.leaderboard,
    }
    write_record(args.output, record)
    print("\n".join(run.leaderboard))
    print(json.dumps(record["per_trial_overhead"]))
    print(f"study: {run.wall_seconds:.0f} s wall for {len(run.leaderboard)} trials "
          f"(target {TARGET_SECONDS} s) -> {args.output}")


if __name__ == "__main__":
    main()
