"""Readers for the source formats the converter accepts, one function per format and one table naming them.

Every reader returns a :class:`SourceData`: uint8 images (each ``(H, W)`` grayscale or ``(H, W, 3)`` RGB),
int64 labels and the class names, already checked for consistency, so the writer never meets a bad sample
halfway through a file.
"""
from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from trainers.data.errors import SourceError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


class ImageSequence(Protocol):
    """Indexable images: a uint8 numpy array ``(N, H, W[, C])`` or a lazy list of files."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class SourceData:
    images: ImageSequence       # uint8, each (H, W) or (H, W, 3)
    labels: np.ndarray          # int64, shape (N,), each in [0, len(class_names))
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class SourceFormat:
    read: Callable[[Path | None, str], SourceData]
    splits: tuple[str, ...]     # the first is the default
    default_root: Path | None   # where the data lies when no input folder is given
    summary: str


# ---------------------------------------------------------------------------------------------- idx (MNIST-style)

_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_UBYTE = 0x08


def _require_dir(root: Path | None, what: str) -> Path:
    if root is None:
        raise SourceError(f"{what}: no input folder given; pass --input DIR (the folder holding the files)")
    if not root.is_dir():
        raise SourceError(f"{what}: input folder {root} does not exist or is not a folder")
    return root


def _find_idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise SourceError(f"idx: {root} has neither {stem} nor {stem}.gz; the folder must hold the four standard "
                      "idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-..., optionally .gz)")


def _read_idx_array(path: Path) -> np.ndarray:
    opener: Callable[..., BinaryIO] = gzip.open if path.suffix == ".gz" else open  # type: ignore[assignment]
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as exc:
        raise SourceError(f"idx: cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise SourceError(f"idx: {path} does not start with an idx magic number; is it an idx file?")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != _IDX_UBYTE:
        raise SourceError(f"idx: {path} holds type code {dtype_code:#04x}; only unsigned bytes (0x08) are supported")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise SourceError(f"idx: {path} is truncated inside its header")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header_end], dtype=">u4"))
    expected = int(np.prod(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header_end)
    if data.size != expected:
        raise SourceError(f"idx: {path} is truncated or padded: header says {dims} ({expected} bytes), "
                          f"found {data.size}")
    return data.reshape(dims)


def read_idx(root: Path | None, split: str, class_names: tuple[str, ...] | None = None) -> SourceData:
    """MNIST-style idx(.gz) files. Without ``class_names`` the classes are named "0".."max label"."""
    folder = _require_dir(root, "idx")
    images_stem, labels_stem = _IDX_STEMS[split]
    images_path, labels_path = _find_idx_file(folder, images_stem), _find_idx_file(folder, labels_stem)
    images, labels = _read_idx_array(images_path), _read_idx_array(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise SourceError(f"idx: expected images (N, H, W) and labels (N,), got {images.shape} from {images_path} "
                          f"and {labels.shape} from {labels_path}")
    labels = labels.astype(np.int64)
    names = class_names or tuple(str(i) for i in range(int(labels.max(initial=0)) + 1))
    return SourceData(images=images, labels=labels, class_names=names)


# ---------------------------------------------------------------------------------------------- scikit-learn digits

def read_digits(root: Path | None, split: str) -> SourceData:
    """scikit-learn's bundled 8x8 digits (values 0..16, rescaled to 0..255). ``root`` is unused: the data ships
    with the wheel. Deterministic split: every fifth sample is in "test", the rest in "train"."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn is only needed for this source

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    in_test = np.arange(len(labels)) % 5 == 0
    chosen = {"train": ~in_test, "test": in_test, "all": np.ones_like(in_test)}[split]
    return SourceData(images=images[chosen], labels=labels[chosen],
                      class_names=tuple(str(i) for i in range(10)))


# ---------------------------------------------------------------------------------------------- CIFAR pickles

@dataclass(frozen=True)
class CifarLayout:
    folder: str                          # the folder the official archive extracts to
    batches: Mapping[str, tuple[str, ...]]
    meta: str
    label_key: str
    names_key: str


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout("cifar-10-batches-py",
                           {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
                           "batches.meta", "labels", "label_names"),
    "cifar100": CifarLayout("cifar-100-python", {"train": ("train",), "test": ("test",)},
                            "meta", "fine_labels", "fine_label_names"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickling runs code; CIFAR batches need nothing but dicts, lists, strings and numpy arrays."""

    _allowed = frozenset({
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
        for name in ("_reconstruct", "scalar", "_frombuffer")
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})  # protocol-2 bytes from Python 3

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise SourceError(f"cifar: {path} is missing; the folder must hold the files of the official python "
                          "archive (data_batch_1..5, test_batch, batches.meta for CIFAR-10; train, test, meta "
                          "for CIFAR-100)")
    try:
        loaded = _ArrayOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise SourceError(f"cifar: {path} is not a CIFAR python pickle: {exc}") from exc
    if not isinstance(loaded, dict):
        raise SourceError(f"cifar: {path} holds a {type(loaded).__name__}, expected a dict")
    # The official files were pickled by Python 2: keys load as bytes.
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in loaded.items()}


def _cifar_entry(batch: Mapping[str, object], key: str, path: Path) -> object:
    if key not in batch:
        raise SourceError(f"cifar: {path} has no '{key}' entry (keys: {sorted(batch)}); wrong CIFAR variant?")
    return batch[key]


def read_cifar(root: Path | None, split: str, layout: CifarLayout) -> SourceData:
    """CIFAR-10/100 python batches; ``root`` is the extracted folder or the folder containing it."""
    folder = _require_dir(root, "cifar")
    if (folder / layout.folder).is_dir():
        folder = folder / layout.folder
    meta_path = folder / layout.meta
    class_names = tuple(name.decode() if isinstance(name, bytes) else str(name)
                        for name in _cifar_entry(_load_cifar_pickle(meta_path), layout.names_key, meta_path))
    images, labels = [], []
    for name in layout.batches[split]:
        path = folder / name
        batch = _load_cifar_pickle(path)
        data = np.asarray(_cifar_entry(batch, "data", path))
        batch_labels = np.asarray(_cifar_entry(batch, layout.label_key, path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise SourceError(f"cifar: {path} 'data' is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
        if len(batch_labels) != len(data):
            raise SourceError(f"cifar: {path} has {len(data)} images but {len(batch_labels)} labels")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # stored as planar CHW rows
        labels.append(batch_labels)
    return SourceData(images=np.ascontiguousarray(np.concatenate(images)), labels=np.concatenate(labels),
                      class_names=class_names)


# ---------------------------------------------------------------------------------------------- image folders

@dataclass(frozen=True)
class ImageFiles:
    """Images decoded on demand, so converting an ImageNet-sized tree never holds it in memory."""

    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise SourceError(f"image-folder: {path} cannot be decoded as an image ({exc}); "
                              "remove or replace it") from exc


def _visible_entries(folder: Path) -> list[Path]:
    # Hidden entries (.DS_Store, editor swap files) are bookkeeping, not data.
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def read_image_folder(root: Path | None, split: str) -> SourceData:
    """ImageNet-style tree: ``root/<class name>/<image>.{jpg,jpeg,png}``; classes are the sorted folder names."""
    folder = _require_dir(root, "image-folder")
    entries = _visible_entries(folder)
    stray_files = [entry.name for entry in entries if not entry.is_dir()]
    if stray_files:
        raise SourceError(f"image-folder: {folder} holds files {stray_files[:5]} next to the class folders; "
                          "expected only ROOT/<class>/<image> (move or delete them)")
    class_dirs = [entry for entry in entries if entry.is_dir()]
    paths: list[Path] = []
    labels: list[int] = []
    not_images: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        for entry in _visible_entries(class_dir):
            if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(entry)
                labels.append(label)
            else:
                not_images.append(str(entry.relative_to(folder)))
    if not_images:
        raise SourceError(f"image-folder: {len(not_images)} entries are not {sorted(IMAGE_SUFFIXES)} files, e.g. "
                          f"{not_images[:5]}; remove them or convert them to JPEG/PNG")
    if not paths:
        raise SourceError(f"image-folder: {folder} has no images; expected ROOT/<class>/<image>.jpg|.png")
    return SourceData(images=ImageFiles(tuple(paths)), labels=np.asarray(labels, dtype=np.int64),
                      class_names=tuple(d.name for d in class_dirs))


# ---------------------------------------------------------------------------------------------- the table

SOURCE_FORMATS: Mapping[str, SourceFormat] = {
    "fashion-mnist": SourceFormat(partial(read_idx, class_names=FASHION_MNIST_CLASSES), ("train", "test"),
                                  FASHION_MNIST_DIR, "Fashion-MNIST idx(.gz) files (Debian: dataset-fashion-mnist)"),
    "idx": SourceFormat(read_idx, ("train", "test"), None, "any folder with the four MNIST-style idx(.gz) files"),
    "digits": SourceFormat(read_digits, ("train", "test", "all"), None,
                           "scikit-learn's bundled 8x8 digits (no input folder needed)"),
    "cifar10": SourceFormat(partial(read_cifar, layout=CIFAR_LAYOUTS["cifar10"]), ("train", "test"), None,
                            "CIFAR-10 python pickle batches (cifar-10-batches-py)"),
    "cifar100": SourceFormat(partial(read_cifar, layout=CIFAR_LAYOUTS["cifar100"]), ("train", "test"), None,
                             "CIFAR-100 python pickles (cifar-100-python), fine labels"),
    "image-folder": SourceFormat(read_image_folder, ("all",), None,
                                 "class-per-folder image tree (JPEG/PNG), ImageNet style"),
}


def _validate(data: SourceData, origin: str) -> SourceData:
    num_samples, num_classes = len(data.labels), len(data.class_names)
    if num_samples == 0:
        raise SourceError(f"{origin}: the source holds no samples")
    if len(data.images) != num_samples:
        raise SourceError(f"{origin}: {len(data.images)} images but {num_samples} labels")
    if isinstance(data.images, np.ndarray):
        shape = data.images.shape
        if data.images.dtype != np.uint8 or not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
            raise SourceError(f"{origin}: images are {data.images.dtype} {shape}; expected uint8 (N, H, W) or "
                              "(N, H, W, 1|3)")
    out_of_range = np.flatnonzero((data.labels < 0) | (data.labels >= num_classes))
    if out_of_range.size:
        first = int(out_of_range[0])
        raise SourceError(f"{origin}: {out_of_range.size} labels are outside [0, {num_classes}) for the "
                          f"{num_classes} class names, e.g. sample {first} has label {int(data.labels[first])}; "
                          "fix the labels or the class-name list")
    return data


def read_source(format_name: str, root: Path | None, split: str | None = None) -> SourceData:
    """Read and check one split of a source. ``split=None`` takes the format's default (its first split)."""
    if format_name not in SOURCE_FORMATS:
        raise SourceError(f"unknown source format '{format_name}'; choose one of {sorted(SOURCE_FORMATS)}")
    source_format = SOURCE_FORMATS[format_name]
    chosen_split = split or source_format.splits[0]
    if chosen_split not in source_format.splits:
        raise SourceError(f"{format_name}: split '{chosen_split}' does not exist; choose one of "
                          f"{list(source_format.splits)}")
    data = source_format.read(root or source_format.default_root, chosen_split)
    return _validate(data, f"{format_name}:{chosen_split} from {root or source_format.default_root or 'bundled data'}")
