"""S3 staging against a real S3-compatible server on loopback (moto in server mode, see conftest.s3_server)."""
from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import boto3
import pytest

from trainers.data.errors import StagingError
from trainers.data.manifest import manifest_path, read_manifest
from trainers.data.s3 import S3Uri, stage_dataset, upload_dataset, upload_directory, upload_file


def convert_main(argv: list[str]) -> int:
    # Imported on use: the spawned staging workers import this module, and FFCV/torch would cost them seconds.
    from trainers.data.convert import main

    return main(argv)


def s3_client():
    return boto3.session.Session().client("s3")


def object_bytes(bucket: str, key: str) -> bytes:
    return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def cache_entries(cache_dir: Path) -> list[str]:
    return sorted(p.relative_to(cache_dir).as_posix() for p in cache_dir.rglob("*") if p.is_file())


@pytest.fixture
def uploaded_digits(digits_betons, s3_bucket) -> str:
    return upload_dataset(digits_betons["test"], f"s3://{s3_bucket}/datasets/digits-test.beton")


def test_upload_then_stage_downloads_once_and_verifies(uploaded_digits, digits_betons, s3_bucket, tmp_path):
    local = digits_betons["test"]
    assert object_bytes(s3_bucket, "datasets/digits-test.beton") == local.read_bytes()
    assert object_bytes(s3_bucket, "datasets/digits-test.beton.manifest.json") == manifest_path(local).read_bytes()

    first = stage_dataset(uploaded_digits, tmp_path / "cache")
    second = stage_dataset(uploaded_digits, tmp_path / "cache")
    assert first.downloaded and not second.downloaded
    assert first.path == second.path == tmp_path / "cache" / s3_bucket / "datasets" / "digits-test.beton"
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.manifest.sha256 == read_manifest(local).sha256
    assert cache_entries(tmp_path / "cache") == [f"{s3_bucket}/datasets/digits-test.beton",
                                                 f"{s3_bucket}/datasets/digits-test.beton.lock",
                                                 f"{s3_bucket}/datasets/digits-test.beton.manifest.json"]


def _stage_at_once(uri: str, cache_dir: str, start_together, results) -> None:
    start_together.wait()
    staged = stage_dataset(uri, Path(cache_dir))
    results.put((str(staged.path), staged.downloaded, hashlib.sha256(staged.path.read_bytes()).hexdigest()))


def test_concurrent_workers_on_one_node_download_once(uploaded_digits, tmp_path):
    workers = 4
    context = multiprocessing.get_context("spawn")  # not fork: the moto server runs in a thread of this process
    start_together, results = context.Barrier(workers), context.Queue()
    processes = [context.Process(target=_stage_at_once,
                                 args=(uploaded_digits, str(tmp_path / "cache"), start_together, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    paths, downloaded, digests = zip(*outcomes)
    assert sum(downloaded) == 1, outcomes  # one download; the other three waited on the lock, then hit the cache
    assert len(set(paths)) == 1 and len(set(digests)) == 1
    assert digests[0] == stage_dataset(uploaded_digits, tmp_path / "cache").manifest.sha256
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_leftover_partial_download_is_never_used(uploaded_digits, s3_bucket, tmp_path):
    folder = tmp_path / "cache" / s3_bucket / "datasets"
    folder.mkdir(parents=True)
    leftover = folder / ".digits-test.beton.12345-deadbeef.partial"  # a process died mid-download
    leftover.write_bytes(b"half a file")
    staged = stage_dataset(uploaded_digits, tmp_path / "cache")
    assert staged.downloaded and not leftover.exists()
    assert hashlib.sha256(staged.path.read_bytes()).hexdigest() == staged.manifest.sha256


def test_changed_dataset_on_s3_is_downloaded_again(uploaded_digits, digits_betons, tmp_path):
    first = stage_dataset(uploaded_digits, tmp_path / "cache")
    upload_dataset(digits_betons["train"], uploaded_digits)  # same key, new content and manifest
    second = stage_dataset(uploaded_digits, tmp_path / "cache")
    assert second.downloaded and second.manifest.sha256 != first.manifest.sha256
    assert second.path.read_bytes() == digits_betons["train"].read_bytes()


@pytest.mark.parametrize(("corruption", "pattern"), [
    ("flip a byte", r"sha256 .* but its manifest says .*corrupted"),
    ("truncate", r"bytes but its manifest says .*truncated"),
])
def test_corrupted_object_is_detected_and_not_cached(uploaded_digits, digits_betons, s3_bucket, tmp_path,
                                                     corruption, pattern):
    payload = bytearray(digits_betons["test"].read_bytes())
    if corruption == "flip a byte":
        payload[len(payload) // 2] ^= 0xFF
    else:
        del payload[-100:]
    s3_client().put_object(Bucket=s3_bucket, Key="datasets/digits-test.beton", Body=bytes(payload))
    with pytest.raises(StagingError, match=pattern) as raised:
        stage_dataset(uploaded_digits, tmp_path / "cache")
    assert "re-upload" in str(raised.value) and uploaded_digits in str(raised.value)
    assert cache_entries(tmp_path / "cache") == [f"{s3_bucket}/datasets/digits-test.beton.lock"]


def test_missing_bucket_or_key_gives_a_clear_error(uploaded_digits, s3_bucket, tmp_path):
    with pytest.raises(StagingError, match=r"bucket 'no-such-bucket' does not exist at the configured endpoint"):
        stage_dataset("s3://no-such-bucket/digits.beton", tmp_path)
    with pytest.raises(StagingError, match=rf"s3://{s3_bucket}/absent.beton.manifest.json: no such object"
                                           r".*upload both with upload_dataset\(\)"):
        stage_dataset(f"s3://{s3_bucket}/absent.beton", tmp_path)
    s3_client().delete_object(Bucket=s3_bucket, Key="datasets/digits-test.beton")  # manifest left behind
    with pytest.raises(StagingError, match=rf"downloading {uploaded_digits}: no such object"):
        stage_dataset(uploaded_digits, tmp_path)
    with pytest.raises(StagingError, match="not an S3 object URI"):
        stage_dataset(f"s3://{s3_bucket}/", tmp_path)


def test_artifact_uploads_land_where_asked(s3_bucket, tmp_path):
    report = tmp_path / "report.md"
    report.write_text("# robust accuracy 0.42\n")
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "nested").mkdir(parents=True)
    (checkpoint / "model.pt").write_bytes(b"weights")
    (checkpoint / "nested" / "state.json").write_text("{}")

    assert upload_file(report, f"s3://{s3_bucket}/reports/trial-1.md") == f"s3://{s3_bucket}/reports/trial-1.md"
    written = upload_directory(checkpoint, f"s3://{s3_bucket}/runs/trial-1/checkpoint_000/")
    assert written == [f"s3://{s3_bucket}/runs/trial-1/checkpoint_000/model.pt",
                       f"s3://{s3_bucket}/runs/trial-1/checkpoint_000/nested/state.json"]
    assert object_bytes(s3_bucket, "reports/trial-1.md") == report.read_bytes()
    assert object_bytes(s3_bucket, "runs/trial-1/checkpoint_000/nested/state.json") == b"{}"

    with pytest.raises(StagingError, match="bucket 'missing-bucket' does not exist"):
        upload_file(report, "s3://missing-bucket/report.md")
    with pytest.raises(StagingError, match="local file .*absent.md does not exist"):
        upload_file(tmp_path / "absent.md", f"s3://{s3_bucket}/absent.md")


def test_upload_refuses_a_beton_that_does_not_match_its_manifest(digits_betons, s3_bucket, tmp_path):
    tampered = tmp_path / "digits.beton"
    tampered.write_bytes(digits_betons["test"].read_bytes()[:-1] + b"\x01")
    manifest_path(tampered).write_bytes(manifest_path(digits_betons["test"]).read_bytes())
    with pytest.raises(Exception, match="corrupted"):
        upload_dataset(tampered, f"s3://{s3_bucket}/digits.beton")
    assert "Contents" not in s3_client().list_objects_v2(Bucket=s3_bucket)


def test_cli_converts_and_uploads(s3_bucket, tmp_path, capsys):
    uri = f"s3://{s3_bucket}/cli/digits.beton"
    assert convert_main(["digits", "--output", str(tmp_path / "d.beton"), "--limit", "40", "--workers", "1",
                         "--upload", uri]) == 0
    capsys.readouterr()
    assert object_bytes(s3_bucket, "cli/digits.beton") == (tmp_path / "d.beton").read_bytes()
    assert stage_dataset(uri, tmp_path / "cache").manifest.num_samples == 40


def test_credentials_are_never_echoed(s3_server, digits_betons, tmp_path, monkeypatch, capsys, caplog):
    secret = "SENTINEL-secret-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any key pair
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "SENTINEL-key-id")
    messages = []
    for action in (lambda: stage_dataset("s3://nope-bucket/x.beton", tmp_path),
                   lambda: upload_file(digits_betons["test"], "s3://nope-bucket/x.beton"),
                   lambda: upload_dataset(digits_betons["test"], "s3://nope-bucket/x.beton")):
        with pytest.raises(StagingError) as raised:
            action()
        messages.append(str(raised.value))
    assert convert_main(["digits", "--output", str(tmp_path / "d.beton"), "--limit", "10", "--workers", "1",
                         "--upload", "s3://nope-bucket/d.beton"]) == 2
    captured = capsys.readouterr()
    everything = "\n".join([*messages, captured.out, captured.err, caplog.text])
    assert "nope-bucket" in everything and "AWS_ENDPOINT_URL" in everything  # errors say where to look...
    assert secret not in everything and "SENTINEL-key-id" not in everything  # ...never what the keys are


def test_s3_uri_parsing():
    assert S3Uri.parse("s3://bucket/a/b.beton") == S3Uri("bucket", "a/b.beton")
    assert str(S3Uri("bucket", "a/b.beton").manifest()) == "s3://bucket/a/b.beton.manifest.json"
    for bad in ("bucket/a.beton", "s3://bucket", "s3:///key", "gs://bucket/key"):
        with pytest.raises(StagingError, match="expected s3://BUCKET/KEY"):
            S3Uri.parse(bad)
