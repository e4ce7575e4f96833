"""The cluster's MLflow tracking server, run on the head by cluster/aws.yaml.

Runs live in a SQLite database on the head's disk and artifacts go to S3 (the server proxies them, so only the
head writes there). The head's disk goes away with `ray down`, so the database is copied to S3 every few minutes
(and on SIGTERM), and a new head starts from the last copy:

    python -m cluster.mlflow_server --db ~/mlflow/mlflow.db --backup s3://BUCKET/mlflow/mlflow.db \\
        --artifacts s3://BUCKET/mlflow-artifacts --port 5000
    python -m cluster.mlflow_server --db ~/mlflow/mlflow.db --backup s3://BUCKET/mlflow/mlflow.db --backup-now

The port is closed to the internet (the cluster's security group admits only its own nodes); reach the UI
through SSH port forwarding: `ray dashboard cluster/aws.yaml --port 5000 --remote-port 5000`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from trainers.data.errors import StagingError
from trainers.data.s3 import S3Uri, upload_file
from trainers.errors import first_line

BACKUP_PERIOD_S = 300
WORKER_HEALTHCHECK_S = 60


def backup(db: Path, uri: str) -> str:
    """A consistent copy of the live database (SQLite's online backup, safe while the server writes) uploaded
    to `uri`; returns the URI."""
    with tempfile.TemporaryDirectory(prefix="mlflow-backup-") as directory:
        copy = Path(directory) / db.name
        with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
            source.backup(target)
        return upload_file(copy, uri)


def restore(db: Path, uri: str) -> bool:
    """Download the last backup to `db` when there is no database yet; True when one was restored."""
    if db.exists():
        return False
    target = S3Uri.parse(uri)
    db.parent.mkdir(parents=True, exist_ok=True)
    partial = db.with_name(db.name + ".partial")
    try:
        boto3.session.Session().client("s3").download_file(target.bucket, target.key, str(partial))
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            return False  # a first start: nothing backed up yet
        raise
    partial.rename(db)
    return True


def healthy(url: str) -> bool:
    """Whether the MLflow server at `url` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def serve(db: Path, backup_uri: str, artifacts: str, port: int, period_s: float = BACKUP_PERIOD_S,
          host: str = "0.0.0.0") -> int:
    """Restore, run `mlflow server`, back up every `period_s` and when stopped. A second start on a head that
    already serves (a repeated `ray up`) leaves the running server alone. Stopped by SIGTERM/SIGINT: 0, or 1
    when the last backup failed."""
    if healthy(f"http://127.0.0.1:{port}"):
        print(f"an MLflow server already answers on port {port}", flush=True)
        return 0
    if restore(db, backup_uri):
        print(f"restored {db} from {backup_uri}", flush=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    # uvicorn's supervisor restarts a worker that misses a 5 s health check: on a busy head (Ray, the study's
    # driver) workers were killed in a loop before serving a request; a minute rides out the load.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{db.resolve()}", "--artifacts-destination", artifacts,
                               "--host", host, "--port", str(port), "--workers", "2",
                               "--uvicorn-opts", f"--timeout-worker-healthcheck {WORKER_HEALTHCHECK_S}"],
                              start_new_session=True)
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    next_backup = time.monotonic() + period_s
    while not stopping and server.poll() is None:
        time.sleep(1)
        if time.monotonic() >= next_backup and db.exists():
            _try_backup(db, backup_uri)  # a failed copy must not take the server down: the next one retries
            next_backup = time.monotonic() + period_s
    stop_process_group(server)
    backed_up = _try_backup(db, backup_uri) if db.exists() else True
    if not stopping:
        return server.returncode
    return 0 if backed_up else 1


def stop_process_group(process: subprocess.Popen, grace_s: float = 30) -> None:
    """End the process group `process` leads (started with start_new_session): SIGTERM, up to `grace_s` for it
    to exit, then SIGKILL for whatever of the group is left. `mlflow server` runs uvicorn and its workers as
    children, and uvicorn waits forever for a worker still starting up: stopping only the CLI process hung, and
    left the workers behind."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone
        return
    process.wait(timeout=5)


def _try_backup(db: Path, uri: str) -> bool:
    """`backup`, reporting a failure (S3 unreachable, a missing bucket) on stderr instead of raising."""
    try:
        backup(db, uri)
    except (StagingError, ClientError, BotoCoreError, sqlite3.Error, OSError) as error:
        print(f"mlflow_server: backup of {db} to {uri} failed ({first_line(error)}); the database is intact "
              "and the next backup retries", file=sys.stderr, flush=True)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.mlflow_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, required=True, help="the SQLite database (backend store)")
    parser.add_argument("--backup", required=True, metavar="s3://BUCKET/KEY", help="where the database is copied")
    parser.add_argument("--artifacts", metavar="s3://BUCKET/PREFIX", help="artifact store (to serve)")
    parser.add_argument("--port", type=int, default=5000)
    # Every interface by default, so that every node of the cluster reaches it; the security group keeps others out.
    parser.add_argument("--host", default="0.0.0.0", help="interface to serve on (default: all)")
    parser.add_argument("--backup-period", type=float, default=BACKUP_PERIOD_S, metavar="SECONDS",
                        help=f"seconds between backups while serving (default: {BACKUP_PERIOD_S})")
    parser.add_argument("--backup-now", action="store_true", help="copy the database to --backup and exit")
    args = parser.parse_args(argv)
    db = args.db.expanduser()
    if args.backup_now:
        print(backup(db, args.backup))
        return 0
    if not args.artifacts:
        parser.error("--artifacts is required to serve")
    return serve(db, args.backup, args.artifacts, args.port, args.backup_period, args.host)


if __name__ == "__main__":
    sys.exit(main())
