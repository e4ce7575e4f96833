"""S3 transfers against a server that restarts in the middle of them (tests/fixtures/restartable_s3.py: moto's S3
app on loopback; a restart closes the listening socket and every open connection, in-flight requests included,
and the stored objects survive it)."""
from __future__ import annotations

import hashlib
import os
import time

import boto3
import pytest

from trainers.data.errors import StagingError
from trainers.data.manifest import read_manifest, sha256_file, write_manifest
from trainers.data.s3 import RetryPolicy, stage_dataset, upload_dataset, upload_file

# Big enough for three multipart parts (boto3 uploads and downloads 8 MiB parts), so the restart cuts a
# transfer that has begun and has more to go.
OBJECT_BYTES = 17 << 20
DOWNTIME_S = 1.5
QUICK_RETRY = RetryPolicy(attempts=4, first_delay_s=0.5, max_delay_s=2)


@pytest.fixture
def bucket(restartable_s3) -> str:
    name = f"faults-{os.urandom(4).hex()}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def big_dataset(digits_betons, tmp_path):
    """A 17 MiB stand-in .beton (random bytes: staging checks size and sha256, it does not parse the file) with a
    manifest that vouches for it."""
    path = tmp_path / "big.beton"
    path.write_bytes(os.urandom(OBJECT_BYTES))
    manifest = read_manifest(digits_betons["test"]).model_copy(
        update={"file_name": path.name, "size_bytes": OBJECT_BYTES, "sha256": sha256_file(path)})
    write_manifest(path, manifest)
    return path


def stored_sha256(bucket: str, key: str) -> str:
    body = boto3.session.Session().client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    return hashlib.sha256(body).hexdigest()


def test_upload_survives_a_server_restart_mid_transfer(restartable_s3, bucket, big_dataset):
    restartable_s3.restart_during("PUT", "/big.beton", DOWNTIME_S)
    started = time.monotonic()
    upload_file(big_dataset, f"s3://{bucket}/big.beton", retry=QUICK_RETRY)
    elapsed = time.monotonic() - started
    assert restartable_s3.restarts == 1 and restartable_s3.connections_cut >= 1  # a part upload was cut
    assert elapsed > DOWNTIME_S  # it waited for the server rather than giving up
    assert stored_sha256(bucket, "big.beton") == sha256_file(big_dataset)


def test_download_survives_a_server_restart_mid_transfer(restartable_s3, bucket, big_dataset, tmp_path):
    uri = upload_dataset(big_dataset, f"s3://{bucket}/data/big.beton", retry=QUICK_RETRY)
    restartable_s3.restart_during("GET", "/data/big.beton", DOWNTIME_S)  # half a response body, then cut
    staged = stage_dataset(uri, tmp_path / "cache", retry=QUICK_RETRY)
    assert restartable_s3.restarts == 1 and restartable_s3.connections_cut >= 1
    assert staged.downloaded
    assert sha256_file(staged.path) == sha256_file(big_dataset) == staged.manifest.sha256  # nothing torn kept
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_a_server_that_stays_down_fails_clearly_once_retries_run_out(restartable_s3, bucket, digits_betons,
                                                                     tmp_path, monkeypatch):
    uri = upload_dataset(digits_betons["test"], f"s3://{bucket}/data/digits.beton", retry=QUICK_RETRY)
    restartable_s3.stop()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's own per-request attempts
    retry = RetryPolicy(attempts=3, first_delay_s=0.2, max_delay_s=0.5)
    started = time.monotonic()
    with pytest.raises(StagingError, match=rf"reading the manifest s3://{bucket}/data/digits.beton.manifest.json: "
                                           r"Could not connect to the endpoint URL.*AWS_ENDPOINT_URL.*"
                                           r"gave up after 3 attempts over [\d.]+ s"):
        stage_dataset(uri, tmp_path / "cache", retry=retry)
    assert not [path for path in (tmp_path / "cache").rglob("*") if path.suffix in (".beton", ".partial")]
    with pytest.raises(StagingError, match=rf"uploading to s3://{bucket}/again.beton.*gave up after 3 attempts"):
        upload_file(digits_betons["test"], f"s3://{bucket}/again.beton", retry=retry)
    assert time.monotonic() - started < 30  # bounded: nothing waits forever on a dead server

    # A permanent error is not retried: a missing object fails at once, naming it.
    restartable_s3.start()
    with pytest.raises(StagingError, match=rf"s3://{bucket}/absent.beton.manifest.json: no such object") as raised:
        stage_dataset(f"s3://{bucket}/absent.beton", tmp_path / "cache", retry=retry)
    assert "attempts" not in str(raised.value)
