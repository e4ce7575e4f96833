"""FFCV loaders for a trial: any square resolution from one .beton, optionally growing with the epoch.

Batch contract with the training loop: ``(images, labels)`` where images is a contiguous uint8 tensor
``(N, 3, H, W)`` in [0, 255] (the loop divides by 255; models normalize internally) and labels is int64
``(N,)``, also when N == 1. ``with_indices=True`` appends the int64 ``(N,)`` sample indices.

FFCV 1.0.2 traps handled here:
- batches are views into a ring of reused buffers: clone anything kept past the step;
- ``NormalizeImage`` after ``ToTensor`` hangs the constructor on CPU, so no normalization happens here;
- ``Squeeze()`` turns a final batch of one into a 0-d tensor, so labels use ``Squeeze(1)``;
- QUASI_RANDOM order raises NotImplementedError with ``distributed=True``: rejected when the config is made;
- ``num_workers`` above the visible cores fails, and the Loader sets torch's intra-op thread count to it when
  built and at every epoch: restored here (``trainers.data.torch_threads_kept``), so the caller's thread count,
  and a trial's kernels, stay its own;
- its random crops and flips ignore ``seed=``: the training augmentations here are ``trainers.data.augment``'s
  seeded ones, so a loader's batches are a function of (file, config, epoch);
- an epoch's ``close()`` (also from ``__del__``) frees the batch memory without waiting for the epoch's daemon
  thread, which may still be filling a batch, and a process that exits mid-epoch tears down under that thread
  (seen as SIGABRT/SIGSEGV at exit): an epoch left early is stopped here, thread joined before memory is freed,
  and any epoch still running at exit is stopped the same way (``stop_epoch``, ``atexit``).
"""
from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed

from trainers.data import importing_ffcv, torch_threads_kept

with importing_ffcv():  # torch's thread count kept, no numba compile at import (trainers/data)
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, ResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.loader.epoch_iterator import EpochIterator
    from ffcv.reader import Reader
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

from trainers.data.augment import EpochKey, SeededHorizontalFlip, SeededRandomResizedCropDecoder
from trainers.data.convert import IMAGE_FIELD, INDEX_FIELD, LABEL_FIELD, visible_cpu_count
from trainers.data.errors import LoaderConfigError, ManifestError
from trainers.data.loader_config import LoaderConfig
from trainers.data.manifest import Manifest, read_manifest, verify_file
from trainers.data.s3 import check_remote_dataset, is_s3_uri, stage_dataset
from trainers.data.subsets import balanced_subset

# The epoch thread notices a stop when its output queue is full, every 0.5 s, after at most batches_ahead batches.
_EPOCH_STOP_TIMEOUT_S = 30.0


def stop_epoch(epoch: EpochIterator) -> None:
    """Stop an FFCV epoch's thread, then free its memory (FFCV's own close() frees it under the thread)."""
    epoch.terminate_event.set()
    if epoch.is_alive() and epoch is not threading.current_thread():
        epoch.join(_EPOCH_STOP_TIMEOUT_S)
    epoch.close()


@atexit.register
def _stop_running_epochs() -> None:
    for thread in threading.enumerate():
        if isinstance(thread, EpochIterator):
            stop_epoch(thread)


_ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
           "sequential": OrderOption.SEQUENTIAL}


def _whole_image(height: int, width: int, _scale: object, _ratio: object) -> tuple[int, int, int, int]:
    return 0, 0, height, width


class ResizeRGBImageDecoder(ResizedCropRGBImageDecoder):
    """Resize the whole image to ``output_size`` (no crop; the aspect ratio follows the output)."""

    def __init__(self, output_size: tuple[int, int]) -> None:
        super().__init__(output_size)
        self.scale = None
        self.ratio = None

    @property
    def get_crop_generator(self) -> Callable[..., tuple[int, int, int, int]]:
        return _whole_image


_DECODERS: Mapping[str, Callable[[tuple[int, int], LoaderConfig, EpochKey], ResizedCropRGBImageDecoder]] = {
    "random_resized_crop": lambda size, config, key: SeededRandomResizedCropDecoder(
        size, key, scale=config.crop_scale, ratio=config.crop_ratio),
    "center_crop": lambda size, config, _key: CenterCropRGBImageDecoder(size, ratio=config.center_crop_ratio),
    "resize": lambda size, _config, _key: ResizeRGBImageDecoder(size),
}


class EpochLoader:
    """An FFCV Loader whose output resolution follows ``resolution_at(epoch)``.

    Iterating runs the loader's next epoch (0, 1, ... unless ``set_epoch`` said otherwise, e.g. on resume);
    the epoch picks the resolution, the augmentations' key and, like DistributedSampler.set_epoch, the
    shuffle. Changing the decoder's ``output_size`` between epochs needs no recompilation: FFCV allocates
    buffers per epoch."""

    def __init__(self, loader: Loader, decoder: ResizedCropRGBImageDecoder,
                 resolution_at: Callable[[int], int], manifest: Manifest, augment_key: EpochKey) -> None:
        self.loader = loader
        self.decoder = decoder
        self.resolution_at = resolution_at
        self.manifest = manifest
        self.augment_key = augment_key

    @property
    def next_epoch(self) -> int:
        return self.loader.next_epoch

    @property
    def resolution(self) -> int:
        """Side length of the images the next epoch yields."""
        return self.resolution_at(self.loader.next_epoch)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.decoder.output_size = (self.resolution, self.resolution)
        self.augment_key.set_epoch(self.loader.next_epoch)
        with torch_threads_kept():
            epoch = iter(self.loader)
        return self._batches(epoch)

    @staticmethod
    def _batches(epoch: EpochIterator) -> Iterator[tuple[torch.Tensor, ...]]:
        try:
            yield from epoch
        finally:  # also when the consumer leaves early (break, max_batches) and the generator is closed
            stop_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)


@dataclass(frozen=True)
class TrialLoaders:
    train: EpochLoader
    eval: EpochLoader
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def open_dataset(path: str | Path, cache_dir: Path | None = None) -> tuple[Path, Manifest]:
    """A local .beton with its manifest: ``s3://`` paths are staged (downloaded once per node, sha256-checked);
    local files are checked against their manifest's size (hashing large files on every start is too slow)."""
    if is_s3_uri(path):
        staged = stage_dataset(str(path), cache_dir)
        return staged.path, staged.manifest
    local = Path(path)
    return local, _local_manifest(local, check_sha256=False)


def _local_manifest(local: Path, *, check_sha256: bool) -> Manifest:
    if not local.is_file():
        raise ManifestError(f"dataset {local} does not exist; write it with satscale-convert or fix the path")
    manifest = read_manifest(local)
    verify_file(local, manifest, check_sha256=check_sha256)
    missing = {IMAGE_FIELD, LABEL_FIELD, INDEX_FIELD} - set(manifest.fields)
    if missing:
        raise ManifestError(f"{local} lacks fields {sorted(missing)}; re-convert it with satscale-convert")
    return manifest


def check_dataset(path: str | Path) -> Manifest:
    """A dataset checked before a study starts, writing nothing (no download, no cache): a local .beton in full
    (manifest, size, sha256, every label within the manifest's classes); an s3:// object's manifest and size
    (its sha256 is checked when a node stages it)."""
    if is_s3_uri(path):
        return check_remote_dataset(str(path))
    local = Path(path)
    manifest = _local_manifest(local, check_sha256=True)
    labels = read_labels(local)
    out_of_range = np.flatnonzero((labels < 0) | (labels >= manifest.num_classes))
    if out_of_range.size:
        first = int(out_of_range[0])
        raise ManifestError(f"{local}: {out_of_range.size} labels are outside [0, {manifest.num_classes}) for the "
                            f"manifest's {manifest.num_classes} classes, e.g. sample {first} has label "
                            f"{int(labels[first])}; re-convert the data set with satscale-convert")
    return manifest


def read_labels(local: Path) -> np.ndarray:
    """Every sample's label; IntField values live in the file's metadata table, so no image is decoded."""
    reader = Reader(str(local))
    return reader.metadata[f"f{reader.field_names.index(LABEL_FIELD)}"]


def _check_process(config: LoaderConfig) -> None:
    cores = visible_cpu_count()
    if config.num_workers > cores:
        raise LoaderConfigError(f"num_workers={config.num_workers} but this process sees {cores} cores; "
                                "FFCV fails with more workers than cores: lower num_workers")
    if config.distributed and not torch.distributed.is_initialized():
        raise LoaderConfigError("distributed=True needs torch.distributed initialized before the loader is "
                                "built (init_process_group, or build it inside the Ray Train worker)")


def _scalar_pipeline() -> list:
    return [IntDecoder(), ToTensor(), Squeeze(1)]  # Squeeze(1), not Squeeze(): a batch of one stays (1,)


def _build(path: str | Path, config: LoaderConfig, *, crop: str, resolution_at: Callable[[int], int],
           order: OrderOption, flip_probability: float, drop_last: bool, with_indices: bool,
           subset_size: int | None = None) -> EpochLoader:
    _check_process(config)
    local, manifest = open_dataset(path, config.cache_dir)
    size = resolution_at(0)
    key = EpochKey(config.seed)
    decoder = _DECODERS[crop]((size, size), config, key)
    flip = [SeededHorizontalFlip(flip_probability, key)] if flip_probability > 0 else []
    # Seed 0, not the trial's: every trial of a study evaluates the same images, so they pair over images.
    indices = balanced_subset(read_labels(local), subset_size) if subset_size else None
    with torch_threads_kept():
        loader = Loader(str(local), batch_size=config.batch_size, num_workers=config.num_workers, order=order,
                        distributed=config.distributed, seed=config.seed, drop_last=drop_last, indices=indices,
                        batches_ahead=config.batches_ahead, os_cache=config.os_cache,
                        pipelines={IMAGE_FIELD: [decoder, *flip, ToTensor(), ToTorchImage(channels_last=False)],
                                   LABEL_FIELD: _scalar_pipeline(),
                                   INDEX_FIELD: _scalar_pipeline() if with_indices else None})
    if loader.reader.num_samples != manifest.num_samples:
        raise ManifestError(f"{local} holds {loader.reader.num_samples} samples but its manifest says "
                            f"{manifest.num_samples}; re-convert or re-stage it")
    return EpochLoader(loader, decoder, resolution_at, manifest, key)


def build_train_loader(path: str | Path, config: LoaderConfig, *, with_indices: bool = False) -> EpochLoader:
    """Shuffled (``config.order``), cropped or resized to ``config.train_resolution(epoch)``, flipped."""
    return _build(path, config, crop=config.train_crop, resolution_at=config.train_resolution,
                  order=_ORDERS[config.order], flip_probability=config.flip_probability,
                  drop_last=config.drop_last, with_indices=with_indices)


def build_eval_loader(path: str | Path, config: LoaderConfig, *, with_indices: bool = False) -> EpochLoader:
    """Sequential, no flips, at the fixed evaluation resolution: every sample, or with ``config.eval_samples`` a
    class-balanced subset that is the same for every trial. With distributed=True each rank reads its shard,
    padded like DistributedSampler (up to world_size - 1 repeated samples)."""
    resolution = config.eval_resolution or config.resolution
    return _build(path, config, crop=config.eval_crop, resolution_at=lambda _epoch: resolution,
                  order=OrderOption.SEQUENTIAL, flip_probability=0.0, drop_last=False, with_indices=with_indices,
                  subset_size=config.eval_samples)


def build_loaders(train_path: str | Path, eval_path: str | Path, config: LoaderConfig, *,
                  train_indices: bool = False) -> TrialLoaders:
    """Train and eval loaders for one trial; both files must describe the same classes.
    ``train_indices`` adds each sample's index as a third batch element of the train loader."""
    train = build_train_loader(train_path, config, with_indices=train_indices)
    evaluation = build_eval_loader(eval_path, config)
    if train.manifest.class_names != evaluation.manifest.class_names:
        raise ManifestError(f"{train_path} and {eval_path} name different classes "
                            f"({train.manifest.num_classes} vs {evaluation.manifest.num_classes}); convert both "
                            "splits from the same source")
    return TrialLoaders(train=train, eval=evaluation, class_names=train.manifest.class_names)
