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
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3
from botocore.exceptions import ClientError

from trainers.data.s3 import S3Uri, upload_file

BACKUP_PERIOD_S = 300


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


def serve(db: Path, backup_uri: str, artifacts: str, port: int, period_s: float = BACKUP_PERIOD_S) -> int:
    """Restore, run `mlflow server`, back up every `period_s` and when stopped. A second start on a head that
    already serves (a repeated `ray up`) leaves the running server alone."""
    if healthy(f"http://127.0.0.1:{port}"):
        print(f"an MLflow server already answers on port {port}", flush=True)
        return 0
    if restore(db, backup_uri):
        print(f"restored {db} from {backup_uri}", flush=True)
    db.parent.mkdir(parents=True, exist_ok=True)
    # Every interface, so that every node of the cluster reaches it; the security group keeps others out.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{db.resolve()}", "--artifacts-destination", artifacts,
                               "--host", "0.0.0.0", "--port", str(port), "--workers", "2"], start_new_session=True)
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
            backup(db, backup_uri)
            next_backup = time.monotonic() + period_s
    if server.poll() is None:
        server.terminate()
        server.wait(timeout=60)
    if db.exists():
        backup(db, backup_uri)
    return 0 if stopping else server.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.mlflow_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, required=True, help="the SQLite database (backend store)")
    parser.add_argument("--backup", required=True, metavar="s3://BUCKET/KEY", help="where the database is copied")
    parser.add_argument("--artifacts", metavar="s3://BUCKET/PREFIX", help="artifact store (to serve)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--backup-now", action="store_true", help="copy the database to --backup and exit")
    args = parser.parse_args(argv)
    db = args.db.expanduser()
    if args.backup_now:
        print(backup(db, args.backup))
        return 0
    if not args.artifacts:
        parser.error("--artifacts is required to serve")
    return serve(db, args.backup, args.artifacts, args.port)


if __name__ == "__main__":
    sys.exit(main())
