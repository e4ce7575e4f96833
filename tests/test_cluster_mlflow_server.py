"""The head's MLflow database outlives `ray down`: cluster/mlflow_server.py copies it to S3 (the session's real
S3-compatible server on loopback) and a new head starts from the copy."""
from __future__ import annotations

import sqlite3

from cluster.mlflow_server import backup, restore


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
