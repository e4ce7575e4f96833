"""The sidecar manifest written next to every .beton: what the file holds and its checksum.

``data.beton`` gets ``data.beton.manifest.json``; on S3 the same suffix is appended to the object key, so
a loader on any node can check that the file it reads is the one that was written.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainers.data.errors import ManifestError

MANIFEST_SUFFIX = ".manifest.json"
_HASH_CHUNK_BYTES = 8 << 20


class ImageExtent(BaseModel):
    """Stored image sizes in pixels; min == max for fixed-size sources."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    min_height: int = Field(ge=1)
    min_width: int = Field(ge=1)
    max_height: int = Field(ge=1)
    max_width: int = Field(ge=1)


class SourceInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    format: str
    split: str
    path: str   # the input folder, or "bundled" for data shipped with a library
    # How the samples were chosen when not all were written, e.g. "balanced 1600 of 60000 (seed 0)".
    subset: str | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    manifest_version: Literal[1] = 1
    file_name: str
    size_bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    num_samples: int = Field(ge=1)
    num_classes: int = Field(ge=1)
    class_names: tuple[str, ...]
    resolution: ImageExtent
    fields: tuple[str, ...]
    write_mode: str
    jpeg_quality: int
    max_resolution: int | None
    source: SourceInfo


def manifest_path(beton_path: Path) -> Path:
    return beton_path.with_name(beton_path.name + MANIFEST_SUFFIX)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def parse_manifest(text: str, origin: str) -> Manifest:
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as exc:
        raise ManifestError(f"{origin} is not a valid dataset manifest ({exc.error_count()} problems: "
                            f"{exc.errors()[0]['loc']} {exc.errors()[0]['msg']}); re-run satscale-convert") from exc


def read_manifest(beton_path: Path) -> Manifest:
    path = manifest_path(beton_path)
    if not path.is_file():
        raise ManifestError(f"{beton_path} has no manifest {path.name}; write the file with satscale-convert "
                            "(or trainers.data.convert.convert) so it can be verified")
    return parse_manifest(path.read_text(), str(path))


def partial_path(path: Path) -> Path:
    """A unique hidden sibling of ``path`` to write into before renaming: same folder, so the rename is atomic."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


def write_atomically(path: Path, payload: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a partial file."""
    temporary = partial_path(path)
    try:
        temporary.write_bytes(payload)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_manifest(beton_path: Path, manifest: Manifest) -> Path:
    path = manifest_path(beton_path)
    write_atomically(path, manifest.model_dump_json(indent=2).encode())
    return path


def verify_file(path: Path, manifest: Manifest, *, check_sha256: bool) -> None:
    """Raise ManifestError unless ``path`` has the manifest's size (and, when asked, its sha256).

    The size check is free; hashing reads the whole file, so loaders skip it for files that were verified
    when they were staged."""
    size = path.stat().st_size
    if size != manifest.size_bytes:
        raise ManifestError(f"{path} is {size} bytes but its manifest says {manifest.size_bytes}; the file is "
                            "truncated or was replaced: re-convert or re-stage it")
    if check_sha256 and (digest := sha256_file(path)) != manifest.sha256:
        raise ManifestError(f"{path} has sha256 {digest} but its manifest says {manifest.sha256}; the file is "
                            "corrupted: delete it and re-convert or re-stage it")
