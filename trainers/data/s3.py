"""S3 staging with boto3: datasets are downloaded once per node into a local cache and verified; artifacts
(checkpoints, reports) are uploaded.

Endpoint, region and credentials come only from the standard AWS environment and config files
(``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``~/.aws/...``); nothing here takes them as
arguments or prints them.

Transfers survive a restarting or briefly unreachable server: botocore retries each request (standard mode;
``AWS_MAX_ATTEMPTS``, ``AWS_RETRY_MODE``), and a whole transfer cut short is started again after a backoff
(`RetryPolicy`). Nothing torn is ever accepted: downloads are checked against the manifest's sha256 before they
are renamed into place, uploads carry SHA256 checksums (S3 verifies each part) and are checked against the
local file's afterwards. When the retries run out, the error names the object and the attempts made.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ChecksumError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from botocore.exceptions import NoCredentialsError
from s3transfer.utils import ChunksizeAdjuster

from trainers.data.errors import ManifestError, StagingError
from trainers.data.manifest import (MANIFEST_SUFFIX, Manifest, manifest_path, parse_manifest, partial_path,
                                    read_manifest, verify_file, write_manifest)

S3_SCHEME = "s3://"
CACHE_DIR_VARIABLE = "SATSCALE_CACHE_DIR"
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_AWS_SETTINGS_HINT = ("endpoint, region and credentials come from the AWS environment/config "
                      "(AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")


@dataclass(frozen=True)
class RetryPolicy:
    """Whole-transfer retries on top of botocore's per-request ones: a transfer cut short (a restarted server,
    a dropped connection, an aborted multipart upload) starts over, up to `attempts` times in all."""

    attempts: int = 4
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay_s(self, failed_attempts: int) -> float:
        """The wait after `failed_attempts` failures: doubling from first_delay_s up to max_delay_s, with jitter
        so that the workers of a cluster do not all retry at once."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** (failed_attempts - 1)) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()
# Fixed (not boto3's defaults, which may change): S3's SHA256 of a multipart upload depends on the part size.
_TRANSFER = TransferConfig()
# S3 error codes worth another try; any 5xx counts too.
_TRANSIENT_CODES = frozenset({"RequestTimeout", "SlowDown", "Throttling", "ThrottlingException",
                              "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable"})


class TornUploadError(Exception):
    """The stored object differs from the file that was uploaded (size or SHA256)."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
        if "@" in bucket:  # s3://KEY:SECRET@bucket/...: not echoed, it holds a credential
            raise StagingError(f"an S3 URI may not carry credentials before '@'; expected s3://BUCKET/KEY ("
                               f"{_AWS_SETTINGS_HINT})")
        if not uri.startswith(S3_SCHEME) or not bucket or not key or key.endswith("/"):
            raise StagingError(f"'{uri}' is not an S3 object URI; expected s3://BUCKET/KEY")
        if not _BUCKET_NAME.fullmatch(bucket):
            raise StagingError(f"'{uri}': '{bucket}' is not a valid S3 bucket name (3-63 lowercase letters, digits, "
                               "dots and hyphens, starting and ending with a letter or digit); expected s3://BUCKET/KEY")
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


def _staging_error(exc: Exception, action: str, uri: S3Uri) -> StagingError:
    """Translate a boto3 failure into a message naming the object and the fix (never the credentials)."""
    if isinstance(exc, NoCredentialsError):
        return StagingError(f"{action} {uri}: no AWS credentials found; {_AWS_SETTINGS_HINT}")
    if isinstance(exc, BotoCoreError):
        return StagingError(f"{action} {uri}: {exc}; {_AWS_SETTINGS_HINT}")
    if not isinstance(exc, ClientError):  # boto3's transfer wrappers, a torn upload, a socket error
        return StagingError(f"{action} {uri} failed: {exc}")
    code = _error_code(exc)
    if code == "NoSuchBucket":
        return _missing_bucket(action, uri)
    if code in ("NoSuchKey", "404", "NotFound"):
        return StagingError(f"{action} {uri}: no such object in bucket '{uri.bucket}'; check the key or "
                            "upload it first")
    if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StagingError(f"{action} {uri}: access denied ({code}); check the credentials ({_AWS_SETTINGS_HINT})")
    return StagingError(f"{action} {uri}: S3 error {code}: {exc.response.get('Error', {}).get('Message', '')}")


def _transient(exc: BaseException) -> bool:
    """Whether the same transfer may succeed later: connection trouble, server errors, throttling, an upload
    that did not arrive intact. Missing buckets or keys, credentials and access are not retried."""
    if isinstance(exc, StagingError) and exc.__cause__ is not None:
        return _transient(exc.__cause__)
    if isinstance(exc, (S3UploadFailedError, RetriesExceededError)):  # boto3's wrappers around the last error
        inner = getattr(exc, "last_exception", None) or exc.__context__
        return inner is not None and _transient(inner)
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return _error_code(exc) in _TRANSIENT_CODES or status >= 500
    return isinstance(exc, (HTTPClientError, BotocoreConnectionError, IncompleteReadError, ChecksumError,
                            TornUploadError, ConnectionError, TimeoutError))


_Result = TypeVar("_Result")


def _retrying(action: str, uri: S3Uri, transfer: Callable[[], _Result], retry: RetryPolicy) -> _Result:
    """`transfer()`, tried again after a backoff while it fails for a transient reason. Its final failure is a
    StagingError naming `uri` and, after retries, how many attempts were made over how long."""
    started = time.monotonic()
    for attempt in range(1, retry.attempts + 1):
        try:
            return transfer()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as a StagingError
            if attempt < retry.attempts and _transient(exc):
                time.sleep(retry.delay_s(attempt))
                continue
            error = exc if isinstance(exc, StagingError) else _staging_error(exc, action, uri)
            if attempt > 1:
                error = StagingError(f"{error} (gave up after {attempt} attempts over "
                                     f"{time.monotonic() - started:.1f} s)")
            raise error from (exc.__cause__ if isinstance(exc, StagingError) else exc)
    raise AssertionError("unreachable: RetryPolicy.attempts >= 1")


def _fetch_manifest(client, uri: S3Uri) -> Manifest:
    manifest_uri = uri.manifest()
    try:
        body = client.get_object(Bucket=manifest_uri.bucket, Key=manifest_uri.key)["Body"].read()
    except (ClientError, BotoCoreError) as exc:
        error = _staging_error(exc, "reading the manifest", manifest_uri)
        raise StagingError(f"{error}; a dataset is staged only with its manifest: upload both with "
                           "upload_dataset() or `satscale-convert ... --upload`") from exc
    return parse_manifest(body.decode(), str(manifest_uri))


def check_remote_dataset(uri: str) -> Manifest:
    """The manifest of ``s3://bucket/key.beton``, once the object is found with the manifest's size; nothing is
    downloaded (staging checks the sha256)."""
    source = S3Uri.parse(uri)
    client = _client()
    manifest = _retrying("reading the manifest of", source, lambda: _fetch_manifest(client, source), DEFAULT_RETRY)
    size = _retrying("checking", source,
                     lambda: client.head_object(Bucket=source.bucket, Key=source.key)["ContentLength"], DEFAULT_RETRY)
    if size != manifest.size_bytes:
        raise StagingError(f"{source} is {size} bytes but its manifest says {manifest.size_bytes}; re-upload the "
                           "dataset with upload_dataset()")
    return manifest


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


def stage_dataset(uri: str, cache_dir: Path | None = None, *, retry: RetryPolicy = DEFAULT_RETRY) -> StagedDataset:
    """Make ``s3://bucket/key.beton`` available locally, downloading it at most once per node.

    The file lands in ``cache_dir/bucket/key`` (default ``$SATSCALE_CACHE_DIR/datasets`` or
    ``~/.cache/satscale/datasets``; it must be node-local for the lock to mean anything). The download goes
    to a temporary file that is checked against the manifest's size and sha256 before it is renamed into
    place, so no process ever opens a partial or corrupted file. A cut transfer is retried (`retry`)."""
    source = S3Uri.parse(uri)
    local = (cache_dir or default_cache_dir()) / source.bucket / source.key
    local.parent.mkdir(parents=True, exist_ok=True)
    client = _client()
    with _exclusive_lock(local.with_name(local.name + ".lock")):
        manifest = _retrying("reading the manifest of", source, lambda: _fetch_manifest(client, source), retry)
        if _cached_copy_matches(local, manifest):
            return StagedDataset(local, manifest, downloaded=False)
        for leftover in local.parent.glob(f".{local.name}.*.partial"):
            leftover.unlink()  # from a process that died mid-download; we hold the lock, nobody writes it
        temporary = partial_path(local)
        try:
            _retrying("downloading", source,
                      lambda: client.download_file(source.bucket, source.key, str(temporary), Config=_TRANSFER), retry)
            verify_file(temporary, manifest, check_sha256=True)
            manifest_path(local).unlink(missing_ok=True)
            os.replace(temporary, local)
            write_manifest(local, manifest)
        except ManifestError as exc:
            raise StagingError(f"downloading {source}: the object does not match its manifest "
                               f"({exc}); re-upload the dataset with upload_dataset()") from exc
        finally:
            temporary.unlink(missing_ok=True)
    return StagedDataset(local, manifest, downloaded=True)


def _require_bucket(client, target: S3Uri, retry: RetryPolicy) -> None:
    # boto3's managed upload reports a missing bucket as an opaque S3UploadFailedError; ask first.
    def head_bucket() -> None:
        try:
            client.head_bucket(Bucket=target.bucket)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise _missing_bucket("uploading to", target) from exc
            raise

    _retrying("uploading to", target, head_bucket, retry)


def _s3_sha256(local: Path) -> str:
    """The base64 SHA256 that S3 reports for `local` uploaded with `_TRANSFER`: of the bytes for a single PUT;
    for a multipart upload, of the parts' digests, suffixed with the part count."""
    size = local.stat().st_size
    if size < _TRANSFER.multipart_threshold:
        return base64.b64encode(hashlib.sha256(local.read_bytes()).digest()).decode()
    part_size = ChunksizeAdjuster().adjust_chunksize(_TRANSFER.multipart_chunksize, size)
    digests = []
    with local.open("rb") as stream:
        while part := stream.read(part_size):
            digests.append(hashlib.sha256(part).digest())
    return f"{base64.b64encode(hashlib.sha256(b''.join(digests)).digest()).decode()}-{len(digests)}"


def _verify_upload(client, local: Path, uri: S3Uri, size: int, sha256: str) -> None:
    """Raise TornUploadError unless the stored object has the local file's size and SHA256 (a store that keeps
    no checksums is checked on size alone)."""
    stored = client.head_object(Bucket=uri.bucket, Key=uri.key, ChecksumMode="ENABLED")
    stored_sha256 = stored.get("ChecksumSHA256")
    # Some S3 implementations leave the part count off a multipart checksum.
    if stored["ContentLength"] != size or (stored_sha256 and stored_sha256.split("-")[0] != sha256.split("-")[0]):
        raise TornUploadError(f"{uri} holds {stored['ContentLength']} bytes with SHA256 {stored_sha256} but {local} "
                              f"has {size} bytes with SHA256 {sha256}")


def _upload(client, local: Path, uri: S3Uri, retry: RetryPolicy) -> None:
    if not local.is_file():
        raise StagingError(f"uploading to {uri}: local file {local} does not exist")
    size, sha256 = local.stat().st_size, _s3_sha256(local)

    def upload_and_verify() -> None:
        client.upload_file(str(local), uri.bucket, uri.key, ExtraArgs={"ChecksumAlgorithm": "SHA256"},
                           Config=_TRANSFER)
        _verify_upload(client, local, uri, size, sha256)

    _retrying(f"uploading {local} to", uri, upload_and_verify, retry)


def upload_file(local: Path, uri: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> str:
    """Upload one artifact (a report, a checkpoint archive) to ``s3://bucket/key``; returns the URI."""
    target = S3Uri.parse(uri)
    client = _client()
    _require_bucket(client, target, retry)
    _upload(client, Path(local), target, retry)
    return str(target)


def upload_directory(local_dir: Path, prefix_uri: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> list[str]:
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
    _require_bucket(client, destination, retry)
    written = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        target = S3Uri(bucket, destination.key + path.relative_to(local_dir).as_posix())
        _upload(client, path, target, retry)
        written.append(str(target))
    return written


def upload_dataset(beton_path: Path, uri: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> str:
    """Upload a .beton and its manifest after checking they agree. The manifest goes last, so its presence
    on S3 means the data object is complete."""
    beton_path = Path(beton_path)
    target = S3Uri.parse(uri)
    manifest = read_manifest(beton_path)
    verify_file(beton_path, manifest, check_sha256=True)
    client = _client()
    _require_bucket(client, target, retry)
    _upload(client, beton_path, target, retry)
    _upload(client, manifest_path(beton_path), target.manifest(), retry)
    return str(target)
