"""S3 staging with boto3: datasets are downloaded once per node into a local cache and verified; artifacts
(checkpoints, reports) are uploaded.

Endpoint, region and credentials come only from the standard AWS environment and config files
(``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``~/.aws/...``); nothing here takes them as
arguments or prints them.
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from trainers.data.errors import ManifestError, StagingError
from trainers.data.manifest import (MANIFEST_SUFFIX, Manifest, manifest_path, parse_manifest, partial_path,
                                    read_manifest, verify_file, write_manifest)

S3_SCHEME = "s3://"
CACHE_DIR_VARIABLE = "SATSCALE_CACHE_DIR"
_AWS_SETTINGS_HINT = ("endpoint, region and credentials come from the AWS environment/config "
                      "(AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
        if not uri.startswith(S3_SCHEME) or not bucket or not key or key.endswith("/"):
            raise StagingError(f"'{uri}' is not an S3 object URI; expected s3://BUCKET/KEY")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"

    def manifest(self) -> S3Uri:
        return S3Uri(self.bucket, self.key + MANIFEST_SUFFIX)


@dataclass(frozen=True)
class StagedDataset:
    path: Path             # the verified local copy
    manifest: Manifest
    downloaded: bool       # False when a verified copy was already in the cache


def is_s3_uri(path: str | Path) -> bool:
    return str(path).startswith(S3_SCHEME)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_VARIABLE, "~/.cache/satscale")).expanduser() / "datasets"


def _client():  # -> S3Client; a fresh session per call, since boto3's default session is not thread-safe
    return boto3.session.Session().client("s3")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


def _missing_bucket(action: str, uri: S3Uri) -> StagingError:
    return StagingError(f"{action} {uri}: bucket '{uri.bucket}' does not exist at the configured endpoint; "
                        f"create it or fix the bucket name ({_AWS_SETTINGS_HINT})")


def _staging_error(exc: ClientError | BotoCoreError, action: str, uri: S3Uri) -> StagingError:
    """Translate a boto3 failure into a message naming the object and the fix (never the credentials)."""
    if isinstance(exc, NoCredentialsError):
        return StagingError(f"{action} {uri}: no AWS credentials found; {_AWS_SETTINGS_HINT}")
    if isinstance(exc, BotoCoreError):
        return StagingError(f"{action} {uri}: {exc}; {_AWS_SETTINGS_HINT}")
    code = _error_code(exc)
    if code == "NoSuchBucket":
        return _missing_bucket(action, uri)
    if code in ("NoSuchKey", "404", "NotFound"):
        return StagingError(f"{action} {uri}: no such object in bucket '{uri.bucket}'; check the key or "
                            "upload it first")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StagingError(f"{action} {uri}: access denied ({code}); check the credentials ({_AWS_SETTINGS_HINT})")
    return StagingError(f"{action} {uri}: S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}")


def _fetch_manifest(client, uri: S3Uri) -> Manifest:
    manifest_uri = uri.manifest()
    try:
        body = client.get_object(Bucket=manifest_uri.bucket, Key=manifest_uri.key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        error = _staging_error(exc, "reading the manifest", manifest_uri)
        raise StagingError(f"{error}; a dataset is staged only with its manifest: upload both with "
                           "upload_dataset() or `satscale-convert ... --upload`") from exc
    return parse_manifest(body.decode(), str(manifest_uri))


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock: the first process downloads, the others on this node wait and then find the
    verified copy. The lock file stays (deleting it would race with a process about to lock it)."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cached_copy_matches(local: Path, manifest: Manifest) -> bool:
    # Only verified downloads are renamed into place, so matching manifests and size mean the bytes match.
    if not (local.is_file() and manifest_path(local).is_file()):
        return False
    try:
        cached_manifest = read_manifest(local)
    except ManifestError:
        return False
    return cached_manifest.sha256 == manifest.sha256 and local.stat().st_size == manifest.size_bytes


def stage_dataset(uri: str, cache_dir: Path | None = None) -> StagedDataset:
    """Make ``s3://bucket/key.beton`` available locally, downloading it at most once per node.

    The file lands in ``cache_dir/bucket/key`` (default ``$SATSCALE_CACHE_DIR/datasets`` or
    ``~/.cache/satscale/datasets``; it must be node-local for the lock to mean anything). The download goes
    to a temporary file that is checked against the manifest's size and sha256 before it is renamed into
    place, so no process ever opens a partial or corrupted file."""
    source = S3Uri.parse(uri)
    local = (cache_dir or default_cache_dir()) / source.bucket / source.key
    local.parent.mkdir(parents=True, exist_ok=True)
    client = _client()
    with _exclusive_lock(local.with_name(local.name + ".lock")):
        manifest = _fetch_manifest(client, source)
        if _cached_copy_matches(local, manifest):
            return StagedDataset(local, manifest, downloaded=False)
        for leftover in local.parent.glob(f".{local.name}.*.partial"):
            leftover.unlink()  # from a process that died mid-download; we hold the lock, nobody writes it
        temporary = partial_path(local)
        try:
            client.download_file(source.bucket, source.key, str(temporary))
            verify_file(temporary, manifest, check_sha256=True)
            manifest_path(local).unlink(missing_ok=True)
            os.replace(temporary, local)
            write_manifest(local, manifest)
        except (ClientError, BotoCoreError) as exc:
            raise _staging_error(exc, "downloading", source) from exc
        except ManifestError as exc:
            raise StagingError(f"downloading {source}: the object does not match its manifest "
                               f"({exc}); re-upload the dataset with upload_dataset()") from exc
        finally:
            temporary.unlink(missing_ok=True)
    return StagedDataset(local, manifest, downloaded=True)


def _require_bucket(client, target: S3Uri) -> None:
    # boto3's managed upload reports a missing bucket as an opaque S3UploadFailedError; ask first.
    try:
        client.head_bucket(Bucket=target.bucket)
    except ClientError as exc:
        if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            raise _missing_bucket("uploading to", target) from exc
        raise _staging_error(exc, "uploading to", target) from exc
    except BotoCoreError as exc:
        raise _staging_error(exc, "uploading to", target) from exc


def _upload(client, local: Path, uri: S3Uri) -> None:
    if not local.is_file():
        raise StagingError(f"uploading to {uri}: local file {local} does not exist")
    try:
        client.upload_file(str(local), uri.bucket, uri.key)
    except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
        raise StagingError(f"uploading {local} to {uri} failed: {exc}") from exc


def upload_file(local: Path, uri: str) -> str:
    """Upload one artifact (a report, a checkpoint archive) to ``s3://bucket/key``; returns the URI."""
    target = S3Uri.parse(uri)
    client = _client()
    _require_bucket(client, target)
    _upload(client, Path(local), target)
    return str(target)


def upload_directory(local_dir: Path, prefix_uri: str) -> list[str]:
    """Upload every file under ``local_dir`` (a checkpoint folder) below ``s3://bucket/prefix/``, keeping
    relative paths; returns the URIs written, sorted."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StagingError(f"uploading to {prefix_uri}: {local_dir} is not a folder")
    bucket, _, prefix = prefix_uri.removeprefix(S3_SCHEME).partition("/")
    if not prefix_uri.startswith(S3_SCHEME) or not bucket:
        raise StagingError(f"'{prefix_uri}' is not an S3 prefix; expected s3://BUCKET/PREFIX/")
    destination = S3Uri(bucket, prefix.strip("/") + "/" if prefix.strip("/") else "")
    client = _client()
    _require_bucket(client, destination)
    written = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        target = S3Uri(bucket, destination.key + path.relative_to(local_dir).as_posix())
        _upload(client, path, target)
        written.append(str(target))
    return written


def upload_dataset(beton_path: Path, uri: str) -> str:
    """Upload a .beton and its manifest after checking they agree. The manifest goes last, so its presence
    on S3 means the data object is complete."""
    beton_path = Path(beton_path)
    target = S3Uri.parse(uri)
    manifest = read_manifest(beton_path)
    verify_file(beton_path, manifest, check_sha256=True)
    client = _client()
    _require_bucket(client, target)
    _upload(client, beton_path, target)
    _upload(client, manifest_path(beton_path), target.manifest())
    return str(target)
