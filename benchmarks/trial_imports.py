"""Import cost of a trial's Ray processes: what each Tune trial actor imports to run its trial (and the Train
controller to unpickle the loop), in fresh interpreters, and whether FFCV comes with it.

The per-trial overhead profile (benchmarks/README.md) found FFCV and its numba compilation imported by processes
that read no data. `--compare-tree` times an older checkout's equivalent in the same run, interleaved (ratios
only mean something within one run):

    python benchmarks/trial_imports.py
    git worktree add /tmp/before 092bb3d && python benchmarks/trial_imports.py --compare-tree /tmp/before \\
        --compare-module orchestrator.runner
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

from embedded_default import machine

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "trial_imports.json"
# The trial actor runs orchestrator.trial_driver.run_trial; the Train controller unpickles the loop from
# trainers.distributed.
TRIAL_MODULES = "orchestrator.trial_driver,trainers.distributed"
PROBE = """
import sys, time
start = time.perf_counter()
for name in sys.argv[1].split(","):
    __import__(name)
print(time.perf_counter() - start, int("ffcv" in sys.modules))
"""


def import_seconds(tree: Path, modules: str) -> tuple[float, bool]:
    """Seconds to import `modules` (comma-separated) in a fresh interpreter run in `tree`, and whether FFCV
    was imported."""
    done = subprocess.run([sys.executable, "-c", PROBE, modules], cwd=tree, capture_output=True, text=True,
                          check=True, timeout=600)
    seconds, ffcv = done.stdout.split()
    return float(seconds), ffcv == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-tree", type=Path, default=None, help="an older checkout to time alongside")
    parser.add_argument("--compare-module", default=TRIAL_MODULES,
                        help="what a trial actor imports in that checkout (comma-separated)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    subjects = {"this tree": (ROOT, TRIAL_MODULES)}
    if args.compare_tree:
        subjects["compared tree"] = (args.compare_tree.resolve(), args.compare_module)
    samples: dict[str, list[float]] = {name: [] for name in subjects}
    ffcv: dict[str, bool] = {}
    for _ in range(args.rounds):
        for name, (tree, modules) in subjects.items():
            seconds, ffcv[name] = import_seconds(tree, modules)
            samples[name].append(seconds)
            print(f"{name}: {seconds:.2f} s (ffcv imported: {ffcv[name]})", flush=True)
    record = {
        "benchmark": "trial_imports", "date": datetime.date.today().isoformat(), "machine": machine(),
        "subjects": {name: {"tree": str(tree), "modules": modules, "median_s": round(statistics.median(samples[name]), 2),
                            "samples_s": [round(value, 2) for value in samples[name]], "ffcv_imported": ffcv[name]}
                     for name, (tree, modules) in subjects.items()},
    }
    if args.compare_tree:
        record["this_over_compared"] = round(record["subjects"]["this tree"]["median_s"]
                                             / record["subjects"]["compared tree"]["median_s"], 3)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record.get("this_over_compared")), f"written to {args.output}")


if __name__ == "__main__":
    main()
