"""Wall time of the embedded default study (`python orchestrator/scale_study.py`, no arguments), end to end:
local Ray start, Fashion-MNIST conversion, 8 trials under ASHA, reports and MLflow logging; and each trial's
overhead, from the trial's start to its first training batch (`time_to_first_batch_s`, which the Ray Train
worker reports with its first epoch; `time_to_worker_start_s` is the part before the worker's loop begins).

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
TARGET_SECONDS = 300


@dataclass(frozen=True)
class StudyRun:
    wall_seconds: float
    stdout: str
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


def run_scale_study(arguments: list[str], study_name: str = "default", own_head: bool = False) -> StudyRun:
    """`scale_study.py ARGUMENTS` in a fresh folder (default storage and MLflow there), on the local Ray it
    starts or, with `own_head`, on `own_ray_head`."""
    with tempfile.TemporaryDirectory(prefix="satscale-bench-") as folder, \
            (own_ray_head(os.cpu_count() or 2) if own_head else contextlib.nullcontext(None)) as environment:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(ROOT / "orchestrator" / "scale_study.py"), *arguments],
                             cwd=folder, capture_output=True, text=True, env=environment)
        seconds = time.perf_counter() - start
        if run.returncode != 0:
            sys.exit(f"the study failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
        result_files = sorted((Path(folder) / "satscale_runs" / study_name).glob("*/result.json"))
        trials = [[json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                  for path in result_files]
    return StudyRun(seconds, run.stdout, trials)


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
            "max": round(max(values), 1), "n": len(values)} if values else {}


def trial_overheads(run: StudyRun) -> dict:
    """Per-trial start-up figures from each trial's first report, and their share of the trials' time."""
    firsts = [results[0] for results in run.trials if results]
    to_batch = [first["time_to_first_batch_s"] for first in firsts if "time_to_first_batch_s" in first]
    to_worker = [first["time_to_worker_start_s"] for first in firsts if "time_to_worker_start_s" in first]
    trial_seconds = sum(results[-1]["time_total_s"] for results in run.trials if results)
    return {"time_to_first_batch_s": spread(to_batch), "time_to_worker_start_s": spread(to_worker),
            "trial_seconds_total": round(trial_seconds, 1),
            "overhead_share_of_trial_seconds": round(sum(to_batch) / trial_seconds, 3) if trial_seconds else None}


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
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    host = machine()
    run = run_scale_study([argument for override in args.overrides for argument in ("--set", override)],
                          own_head=args.own_ray_head)
    record = {
        "benchmark": "embedded_default", "date": datetime.date.today().isoformat(), "machine": host,
        "overrides": args.overrides, "own_ray_head": args.own_ray_head, "wall_seconds": round(run.wall_seconds, 1), "target_seconds": TARGET_SECONDS,
        "within_target": run.wall_seconds < TARGET_SECONDS, "trials": len(run.leaderboard),
        "per_trial_overhead": trial_overheads(run), "leaderboard": run.leaderboard,
    }
    write_record(args.output, record)
    print("\n".join(run.leaderboard))
    print(json.dumps(record["per_trial_overhead"]))
    print(f"study: {run.wall_seconds:.0f} s wall for {len(run.leaderboard)} trials "
          f"(target {TARGET_SECONDS} s) -> {args.output}")


if __name__ == "__main__":
    main()
