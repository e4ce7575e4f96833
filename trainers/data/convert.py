"""Write a source data set to an FFCV .beton file plus its manifest; also the ``satscale-convert`` CLI.

The .beton is written to a temporary file in the output folder and renamed into place only after every
sample was written and checked, so a failure never leaves a half-written .beton under the output name.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainers.data import importing_ffcv

with importing_ffcv():  # torch's thread count kept, no numba compile at import (trainers/data)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import encode_jpeg, resizer
    from ffcv.reader import Reader
    from ffcv.writer import DatasetWriter

from trainers.data.errors import DataError, SourceError
from trainers.data.manifest import (ImageExtent, Manifest, SourceInfo, manifest_path, partial_path, sha256_file,
                                    write_manifest)
from trainers.data.sources import SOURCE_FORMATS, SourceData, read_source
from trainers.data.subsets import balanced_subset

IMAGE_FIELD, LABEL_FIELD, INDEX_FIELD = "image", "label", "index"
MIN_PAGE_SIZE_BYTES = 1 << 21      # FFCV's smallest page
DEFAULT_PAGE_SIZE_BYTES = 1 << 23  # FFCV's default, for sources whose image sizes are unknown up front


def visible_cpu_count() -> int:
    """Cores this process may run on (cgroups/affinity), not the machine's total."""
    return len(os.sched_getaffinity(0))


class WriteOptions(BaseModel):
    """How images are stored. ``raw`` round-trips exactly; ``jpg`` is smaller and lossy; ``proportion``
    JPEG-compresses a random ``compress_probability`` share of the images."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    write_mode: Literal["raw", "jpg", "proportion"] = "raw"
    max_resolution: int | None = Field(default=None, ge=1, description="longest side; larger images are shrunk")
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    compress_probability: float = Field(default=0.5, ge=0.0, le=1.0)
    num_workers: int = Field(default_factory=visible_cpu_count, ge=1)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Grayscale ``(H, W)`` or ``(H, W, 1)`` becomes ``(H, W, 3)``; RGB passes through. Always C-contiguous."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise SourceError(f"image of shape {image.shape} is neither grayscale nor RGB")
    return np.ascontiguousarray(np.broadcast_to(image, (*image.shape[:2], 3)))


class _WriterSamples:
    """The indexable object DatasetWriter's worker processes read from.

    ffcv 1.0.2's writer waits forever on a progress counter when a worker raises, so a failing sample is
    recorded in shared memory and replaced by a placeholder; ``convert`` re-raises it after the writer returns.
    """

    _placeholder = np.zeros((1, 1, 3), dtype=np.uint8)

    def __init__(self, data: SourceData, chosen: np.ndarray, options: WriteOptions, page_size: int) -> None:
        self.data = data
        self.chosen = chosen  # the source samples to write, in order; sample i of the .beton is chosen[i]
        self.options = options
        self.page_size = page_size
        self.first_failure = multiprocessing.Value("q", -1)

    def __len__(self) -> int:
        return len(self.chosen)

    def sample(self, index: int) -> tuple[np.ndarray, int, int]:
        """(RGB image as it will be stored, label, index); raises on a bad sample."""
        source_index = int(self.chosen[index])
        image = resizer(as_rgb(np.asarray(self.data.images[source_index])), self.options.max_resolution)
        if image.dtype != np.uint8:
            raise SourceError(f"sample {source_index} is {image.dtype}; images must be uint8")
        if image.nbytes > self.page_size and (self.options.write_mode != "jpg" or
                                              encode_jpeg(image, self.options.jpeg_quality).nbytes > self.page_size):
            # FFCV's writer would fail inside a worker process (and hang, see the class docstring).
            raise SourceError(f"sample {source_index} is {image.shape[1]}x{image.shape[0]}, too large for a "
                              f"{self.page_size >> 20} MiB page in {self.options.write_mode} mode; "
                              "set max_resolution")
        return image, int(self.data.labels[source_index]), index

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        try:
            return self.sample(index)
        except Exception:  # re-raised with its own message by convert(), see the class docstring
            with self.first_failure.get_lock():
                if self.first_failure.value < 0:
                    self.first_failure.value = index
            return self._placeholder, 0, index

    def raise_recorded_failure(self, origin: str) -> None:
        index = self.first_failure.value
        if index < 0:
            return
        try:
            self.sample(index)
        except SourceError as exc:
            raise SourceError(f"{origin}: {exc}") from exc
        except Exception as exc:
            raise SourceError(f"{origin}: sample {index} cannot be written: {exc}") from exc
        raise SourceError(f"{origin}: sample {index} failed in a writer process but not when retried; "
                          "check the input files for intermittent read errors")


def page_size_for(images: object, max_resolution: int | None) -> int:
    """FFCV pads the header to one page and gives each writer process whole pages, so small data sets want
    small pages; a page must still hold the largest stored image (room for twice its raw size, since a
    JPEG of a tiny or noisy image can exceed it)."""
    bounds = [max_resolution * max_resolution * 3] if max_resolution else []
    if isinstance(images, np.ndarray):
        bounds.append(images.shape[1] * images.shape[2] * 3)
    if not bounds:
        return DEFAULT_PAGE_SIZE_BYTES
    return max(MIN_PAGE_SIZE_BYTES, 1 << (2 * min(bounds) - 1).bit_length())


def _stored_extent(beton_path: Path) -> ImageExtent:
    reader = Reader(str(beton_path))
    image_metadata = reader.metadata[f"f{reader.field_names.index(IMAGE_FIELD)}"]
    heights, widths = image_metadata["height"], image_metadata["width"]
    return ImageExtent(min_height=int(heights.min()), min_width=int(widths.min()),
                       max_height=int(heights.max()), max_width=int(widths.max()))


def convert(source_format: str, output: Path, *, input_dir: Path | None = None, split: str | None = None,
            options: WriteOptions | None = None, limit: int | None = None) -> Manifest:
    """Write ``source_format``'s ``split`` to ``output`` and its manifest next to it; returns the manifest. With
    ``limit``, a class-balanced subset of that many samples, seeded (``subsets.balanced_subset``, seed 0), in
    source order. Raises SourceError on bad input, leaving no file behind."""
    options = options or WriteOptions()
    output = Path(output)
    data = read_source(source_format, input_dir, split)
    chosen_split = split or SOURCE_FORMATS[source_format].splits[0]
    origin = f"{source_format}:{chosen_split}"
    if limit is not None and limit < 1:
        raise SourceError(f"{origin}: limit must be at least 1, got {limit}")
    page_size = page_size_for(data.images, options.max_resolution)
    chosen = balanced_subset(data.labels, limit) if limit else np.arange(len(data.labels))
    samples = _WriterSamples(data, chosen, options, page_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(output)
    try:
        fields = {
            # Images were already shrunk to max_resolution by _WriterSamples, with FFCV's own resizer.
            IMAGE_FIELD: RGBImageField(write_mode=options.write_mode, jpeg_quality=options.jpeg_quality,
                                       compress_probability=options.compress_probability),
            LABEL_FIELD: IntField(),
            INDEX_FIELD: IntField(),
        }
        DatasetWriter(str(temporary), fields, page_size=page_size,
                      num_workers=options.num_workers).from_indexed_dataset(samples)
        samples.raise_recorded_failure(origin)
        manifest = Manifest(
            file_name=output.name, size_bytes=temporary.stat().st_size, sha256=sha256_file(temporary),
            num_samples=len(samples), num_classes=len(data.class_names), class_names=data.class_names,
            resolution=_stored_extent(temporary), fields=tuple(fields), write_mode=options.write_mode,
            jpeg_quality=options.jpeg_quality, max_resolution=options.max_resolution,
            source=SourceInfo(format=source_format, split=chosen_split,
                              path=str(input_dir or SOURCE_FORMATS[source_format].default_root or "bundled"),
                              subset=f"balanced {len(chosen)} of {len(data.labels)} (seed 0)" if limit else None))
        # An old manifest must never describe the new file, even if we die between the two renames.
        manifest_path(output).unlink(missing_ok=True)
        os.replace(temporary, output)
        write_manifest(output, manifest)
        return manifest
    finally:
        temporary.unlink(missing_ok=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="satscale-convert",
                                     description="Write a data set to an FFCV .beton file with a sidecar manifest.")
    formats = parser.add_subparsers(dest="source_format", required=True, metavar="FORMAT")
    for name, source_format in SOURCE_FORMATS.items():
        sub = formats.add_parser(name, help=source_format.summary, description=source_format.summary)
        sub.add_argument("--output", type=Path, required=True, help="the .beton file to write")
        sub.add_argument("--input", type=Path, default=source_format.default_root,
                         help=f"source folder (default: {source_format.default_root})")
        sub.add_argument("--split", choices=source_format.splits, default=source_format.splits[0])
        sub.add_argument("--write-mode", choices=("raw", "jpg", "proportion"), default="raw")
        sub.add_argument("--max-resolution", type=int, default=None, help="shrink images to this longest side")
        sub.add_argument("--jpeg-quality", type=int, default=90)
        sub.add_argument("--compress-probability", type=float, default=0.5, help="share JPEG-compressed "
                         "with --write-mode proportion")
        sub.add_argument("--limit", type=int, default=None, help="write a class-balanced subset of N samples (seeded)")
        sub.add_argument("--workers", type=int, default=visible_cpu_count())
        sub.add_argument("--upload", default=None, metavar="s3://BUCKET/KEY.beton",
                         help="then upload the file and its manifest (endpoint and credentials: AWS environment)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        options = WriteOptions(write_mode=args.write_mode, max_resolution=args.max_resolution,
                               jpeg_quality=args.jpeg_quality, compress_probability=args.compress_probability,
                               num_workers=args.workers)
        manifest = convert(args.source_format, args.output, input_dir=args.input, split=args.split,
                           options=options, limit=args.limit)
        if args.upload:
            from trainers.data.s3 import upload_dataset  # deferred: boto3 is only needed to upload

            upload_dataset(args.output, args.upload)
    except (DataError, ValidationError) as exc:
        print(f"satscale-convert: error: {exc}", file=sys.stderr)
        return 2
    print(manifest.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
