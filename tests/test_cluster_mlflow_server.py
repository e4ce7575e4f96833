"""The head's MLflow database outlives `ray down`: cluster/mlflow_server.py copies it to S3 (the session's real
S3-compatible server on loopback) and a new head starts from the copy."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import uuid

import boto3
from mlflow import MlflowClient

from cluster.mlflow_server import backup, healthy, restore
from tests.fixtures.mlflow_server import SERVER_START_TIMEOUT_S
from tests.fixtures.network import free_loopback_port
from tests.fixtures.waiting import wait_until


def _rows(db) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        return connection.execute("SELECT name, value FROM metrics ORDER BY name").fetchall()


def test_database_backed_up_to_s3_and_restored_on_a_new_head(s3_bucket, tmp_path):
    db = tmp_path / "old-head" / "mlflow.db"
    db.parent.mkdir()
    uri = f"s3://{s3_bucket}/mlflow/mlflow.db"
    new_head = tmp_path / "new-head" / "mlflow.db"
    assert restore(new_head, uri) is False and not new_head.exists()  # first start: nothing backed up yet

    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE metrics (name TEXT, value REAL)")
        connection.executemany("INSERT INTO metrics VALUES (?, ?)", [("clean_acc", 0.9), ("robust_acc", 0.4)])
    writer = sqlite3.connect(db)  # a server still holding the database open while it is copied
    writer.execute("INSERT INTO metrics VALUES ('lr', 0.1)")
    writer.commit()
    assert backup(db, uri) == uri
    writer.close()

    assert restore(new_head, uri) is True
    assert _rows(new_head) == _rows(db) == [("clean_acc", 0.9), ("lr", 0.1), ("robust_acc", 0.4)]
    with sqlite3.connect(new_head) as connection:
        connection.execute("INSERT INTO metrics VALUES ('epoch', 3)")
    assert restore(new_head, uri) is False  # an existing database is never overwritten
    assert ("epoch", 3.0) in _rows(new_head)


def test_server_keeps_serving_when_a_backup_fails_and_backs_up_once_s3_recovers(s3_server, tmp_path):
    """The bucket for the copies is missing at first (a backup fails the way an unreachable S3 does: after the
    upload's retries): the server must stay up, say so, and copy the database once the bucket exists."""
    bucket = f"backups-{uuid.uuid4().hex[:12]}"
    uri = f"s3://{bucket}/mlflow/mlflow.db"
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "manager.log"
    with open(log, "wb") as output:
        manager = subprocess.Popen(
            [sys.executable, "-m", "cluster.mlflow_server", "--db", str(tmp_path / "head" / "mlflow.db"),
             "--backup", uri, "--artifacts", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--backup-period", "2"],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True)
    try:
        def logged(what: str):
            return lambda: f"{what}; the manager's log:\n{log.read_text()[-3000:]}"

        wait_until(lambda: healthy(url), SERVER_START_TIMEOUT_S, logged("the server"), process=manager)
        MlflowClient(url).create_experiment("kept")  # something in the database worth keeping
        wait_until(lambda: "backup of" in log.read_text(), 60, logged("a backup attempt"), process=manager)
        assert manager.poll() is None and healthy(url), log.read_text()[-2000:]
        assert "failed" in log.read_text() and "the next backup retries" in log.read_text()

        s3 = boto3.session.Session().client("s3")
        s3.create_bucket(Bucket=bucket)
        wait_until(lambda: s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) > 0, 60,
                   logged("a backup in the bucket"), process=manager)
        manager.send_signal(signal.SIGTERM)
        assert manager.wait(timeout=90) == 0, log.read_text()[-2000:]
    finally:
        if manager.poll() is None:  # a failed assertion: stop it the way a head does, so the server stops too
            manager.send_signal(signal.SIGTERM)
            manager.wait(timeout=90)
    assert not healthy(url)  # the manager stopped the server it started
    restored = tmp_path / "new-head" / "mlflow.db"
    assert restore(restored, uri) is True
    with sqlite3.connect(restored) as connection:
        assert ("kept",) in connection.execute("SELECT name FROM experiments").fetchall()

