"""Wall time of the embedded default study (`python orchestrator/scale_study.py`, no arguments), end to end:
local Ray start, Fashion-MNIST conversion, 8 trials under ASHA, reports and MLflow logging.

Runs in a fresh temporary folder (so the data conversion is included, as on a first run) and records the
figure in benchmarks/results/embedded_default.json.

    python benchmarks/embedded_default.py
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "embedded_default.json"
TARGET_SECONDS = 300


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="satscale-demo-") as folder:
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(ROOT / "orchestrator" / "scale_study.py")], cwd=folder,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(f"the default study failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    leaderboard = [line for line in run.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    record = {
        "benchmark": "embedded_default", "date": datetime.date.today().isoformat(),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "wall_seconds": round(seconds, 1), "target_seconds": TARGET_SECONDS,
        "within_target": seconds < TARGET_SECONDS, "trials": len(leaderboard), "leaderboard": leaderboard,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print("\n".join(leaderboard))
    print(f"embedded default: {seconds:.0f} s wall for {len(leaderboard)} trials "
          f"(target {TARGET_SECONDS} s) -> {RESULTS}")


if __name__ == "__main__":
    main()
