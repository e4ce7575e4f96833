"""Converters: every source format round-trips through a .beton, bad inputs fail clearly and leave nothing."""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from ffcv.reader import Reader
from PIL import Image

from trainers.data.convert import WriteOptions, convert, main, page_size_for
from trainers.data.sources import ImageFiles
from trainers.data.subsets import balanced_subset
from trainers.data.errors import SourceError
from trainers.data.manifest import manifest_path, read_manifest

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
ONE_WORKER = WriteOptions(num_workers=1)


def stored_samples(path: Path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Images, labels and indices as stored, read without trainers.data: FFCV's Reader for the metadata, the
    bytes straight from the file, OpenCV for JPEG."""
    reader = Reader(str(path))
    fields = {name: reader.metadata[f"f{i}"] for i, name in enumerate(reader.field_names)}
    sizes = dict(zip(reader.alloc_table["ptr"].tolist(), reader.alloc_table["size"].tolist()))
    content = np.fromfile(path, dtype=np.uint8)
    images = []
    for entry in fields["image"]:
        ptr, height, width = int(entry["data_ptr"]), int(entry["height"]), int(entry["width"])
        if entry["mode"] == 1:  # raw
            images.append(content[ptr:ptr + height * width * 3].reshape(height, width, 3))
        else:
            bgr = cv2.imdecode(content[ptr:ptr + sizes[ptr]], cv2.IMREAD_COLOR)
            images.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return images, np.asarray(fields["label"]), np.asarray(fields["index"])


def as_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


def smooth_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Low-frequency RGB images (JPEG keeps them close) with a little noise (so no two are equal)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    images = []
    for _ in range(count):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        channels = [127 + 90 * np.sin(2 * np.pi * (rows * rng.uniform(0.3, 1) + cols * rng.uniform(0.3, 1)) + p)
                    for p in phase]
        image = np.stack(channels, axis=-1) + rng.normal(0, 2, size=(height, width, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


def assert_no_output(folder: Path) -> None:
    leftovers = [p.name for p in folder.iterdir() if p.suffix in (".beton", ".partial", ".json")]
    assert leftovers == [], leftovers


# ------------------------------------------------------------------------------------------- source writers

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar(root: Path, variant: str, images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
                protocol: int = 2) -> Path:
    """The official python layout, with bytes keys as the Python 2 originals load."""
    def dump(path: Path, content: dict) -> None:
        path.write_bytes(pickle.dumps(content, protocol=protocol))

    def rows(batch: np.ndarray) -> np.ndarray:  # (N, 32, 32, 3) -> (N, 3072), planar channels
        return batch.transpose(0, 3, 1, 2).reshape(len(batch), -1)

    if variant == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES]})
        for number, chunk in enumerate(np.array_split(np.arange(len(labels["train"])), 5), start=1):
            dump(folder / f"data_batch_{number}", {b"data": rows(images["train"][chunk]),
                                                     b"labels": labels["train"][chunk].tolist()})
        dump(folder / "test_batch", {b"data": rows(images["test"]), b"labels": labels["test"].tolist()})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                               b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
        for split in ("train", "test"):
            dump(folder / split, {b"data": rows(images[split]), b"fine_labels": labels[split].tolist(),
                                  b"coarse_labels": (labels[split] // 5).tolist()})
    return root


@pytest.fixture
def cifar_source(tmp_path):
    """`cifar_source(variant, protocol=2)`: 20 train + 10 test images in the official layout."""
    def make(variant: str, protocol: int = 2):
        num_classes = 10 if variant == "cifar10" else 100
        rng = np.random.default_rng(1)
        images = {"train": smooth_images(20, 32, 32, seed=2), "test": smooth_images(10, 32, 32, seed=3)}
        labels = {split: rng.integers(0, num_classes, size=len(images[split])) for split in images}
        return write_cifar(tmp_path / "src", variant, images, labels, protocol), images, labels
    return make


def write_image_folder(root: Path, classes: dict[str, list[np.ndarray]], suffix: str = ".png") -> Path:
    for class_name, class_images in classes.items():
        (root / class_name).mkdir(parents=True)
        for number, image in enumerate(class_images):
            Image.fromarray(image).save(root / class_name / f"{number:03d}{suffix}", quality=95)
    return root


# ------------------------------------------------------------------------------------------- round trips

def test_digits_round_trip_is_exact_and_manifest_describes_the_file(digits_betons):
    from sklearn.datasets import load_digits

    digits = load_digits()
    in_test = np.arange(len(digits.target)) % 5 == 0
    expected = np.rint(digits.images[in_test] * 255 / 16).astype(np.uint8)
    images, labels, indices = stored_samples(digits_betons["test"])
    np.testing.assert_array_equal(np.stack(images), as_rgb(expected))
    np.testing.assert_array_equal(labels, digits.target[in_test])
    np.testing.assert_array_equal(indices, np.arange(len(labels)))

    path = digits_betons["test"]
    manifest = read_manifest(path)
    assert manifest.num_samples == 360 and manifest.num_classes == 10
    assert manifest.class_names == tuple(str(i) for i in range(10))
    assert (manifest.resolution.max_height, manifest.resolution.max_width) == (8, 8)
    assert manifest.size_bytes == path.stat().st_size
    assert manifest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest.source.format == "digits" and manifest.source.split == "test"
    assert manifest.fields == ("image", "label", "index")


def read_idx_independently(path: Path, header_bytes: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read()[header_bytes:], dtype=np.uint8)


def test_fashion_mnist_round_trip_is_exact(tmp_path):
    manifest = convert("fashion-mnist", tmp_path / "fmnist-test.beton", split="test",
                       options=WriteOptions(num_workers=2))
    expected_images = read_idx_independently(FASHION_MNIST / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    expected_labels = read_idx_independently(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz", 8)
    images, labels, _ = stored_samples(tmp_path / "fmnist-test.beton")
    assert manifest.num_samples == len(images) == 10_000
    assert manifest.class_names[0] == "T-shirt/top" and manifest.num_classes == 10
    np.testing.assert_array_equal(np.stack(images), as_rgb(expected_images))  # grayscale -> 3 equal channels
    np.testing.assert_array_equal(labels, expected_labels)


def test_limit_writes_a_seeded_class_balanced_subset_of_a_class_sorted_source(tmp_path):
    # Image folders come class by class: "the first 7" would be the first class and one image of the second.
    classes = {name: list(smooth_images(6, 12, 12, seed=index)) for index, name in enumerate(["ant", "bee", "cat"])}
    root = write_image_folder(tmp_path / "tree", classes)
    manifest = convert("image-folder", tmp_path / "subset.beton", input_dir=root, options=ONE_WORKER, limit=7)
    images, labels, indices = stored_samples(tmp_path / "subset.beton")
    assert manifest.num_samples == 7 and manifest.source.subset == "balanced 7 of 18 (seed 0)"
    assert sorted(np.bincount(labels, minlength=3)) == [2, 2, 3]  # as even as 7 over 3 classes can be
    assert list(labels) == sorted(labels) and list(indices) == list(range(7))  # source order, positions 0..6
    source = np.concatenate([np.stack(classes[name]) for name in ("ant", "bee", "cat")])
    chosen = [next(k for k in range(18) if np.array_equal(source[k], image)) for image in images]
    assert chosen == sorted(chosen) and len(set(chosen)) == 7  # distinct source images, kept in order
    again = convert("image-folder", tmp_path / "again.beton", input_dir=root, options=ONE_WORKER, limit=7)
    assert again.sha256 == manifest.sha256  # seeded: the same subset every time


@pytest.mark.parametrize(("variant", "protocol"), [("cifar10", 2), ("cifar100", pickle.HIGHEST_PROTOCOL)])
def test_cifar_round_trip_is_exact(cifar_source, tmp_path, variant, protocol):
    root, source_images, source_labels = cifar_source(variant, protocol)
    for split in ("train", "test"):
        output = tmp_path / f"{variant}-{split}.beton"
        manifest = convert(variant, output, input_dir=root, split=split, options=ONE_WORKER)
        images, labels, _ = stored_samples(output)
        np.testing.assert_array_equal(np.stack(images), source_images[split])
        np.testing.assert_array_equal(labels, source_labels[split])
        assert manifest.num_classes == (10 if variant == "cifar10" else 100)
    assert read_manifest(tmp_path / f"{variant}-train.beton").class_names[:2] == (
        ("airplane", "automobile") if variant == "cifar10" else ("fine0", "fine1"))


def test_cifar_jpg_mode_is_close_and_compressed(cifar_source, tmp_path):
    root, source_images, _ = cifar_source("cifar10")
    raw = convert("cifar10", tmp_path / "raw.beton", input_dir=root, options=ONE_WORKER)
    jpg = convert("cifar10", tmp_path / "jpg.beton", input_dir=root,
                  options=WriteOptions(write_mode="jpg", jpeg_quality=95, num_workers=1))
    images, _, _ = stored_samples(tmp_path / "jpg.beton")
    difference = np.abs(np.stack(images).astype(int) - source_images["train"].astype(int))
    assert difference.mean() < 3.0, difference.mean()
    assert set(Reader(str(tmp_path / "jpg.beton")).metadata["f0"]["mode"]) == {0}  # every image stored as JPEG
    assert jpg.sha256 != raw.sha256 and jpg.write_mode == "jpg" and jpg.jpeg_quality == 95


def test_image_folder_round_trip_is_exact_for_png(tmp_path):
    color = smooth_images(4, 20, 24, seed=4)
    gray = smooth_images(3, 20, 24, seed=5)[..., 0]
    root = write_image_folder(tmp_path / "tree", {"cat": list(color), "ant": list(gray)})
    (root / ".DS_Store").write_bytes(b"ignored: hidden bookkeeping file")
    manifest = convert("image-folder", tmp_path / "tree.beton", input_dir=root, options=ONE_WORKER)
    images, labels, _ = stored_samples(tmp_path / "tree.beton")
    assert manifest.class_names == ("ant", "cat")  # sorted folder names
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.stack(images), np.concatenate([as_rgb(gray), color]))
    assert (manifest.resolution.max_height, manifest.resolution.max_width) == (20, 24)


def test_image_folder_jpeg_files_in_jpg_mode_are_close(tmp_path):
    color = smooth_images(5, 40, 40, seed=6)
    root = write_image_folder(tmp_path / "tree", {"a": list(color[:2]), "b": list(color[2:])}, suffix=".JPEG")
    convert("image-folder", tmp_path / "tree.beton", input_dir=root,
            options=WriteOptions(write_mode="jpg", jpeg_quality=90, num_workers=1))
    images, labels, _ = stored_samples(tmp_path / "tree.beton")
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 1])
    assert np.abs(np.stack(images).astype(int) - color.astype(int)).mean() < 4.0


def test_image_folder_max_resolution_shrinks_the_longest_side(tmp_path):
    sources = [smooth_images(1, 40, 30, seed=7)[0], smooth_images(1, 20, 64, seed=8)[0],
               smooth_images(1, 16, 16, seed=9)[0]]
    root = write_image_folder(tmp_path / "tree", {"only": sources})
    manifest = convert("image-folder", tmp_path / "tree.beton", input_dir=root,
                       options=WriteOptions(max_resolution=32, num_workers=1))
    images, _, _ = stored_samples(tmp_path / "tree.beton")
    assert [image.shape[:2] for image in images] == [(32, 24), (10, 32), (16, 16)]
    for stored, source in zip(images, sources):
        if stored.shape != source.shape:
            expected = cv2.resize(source, stored.shape[1::-1], interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(stored, expected)
        else:
            np.testing.assert_array_equal(stored, source)  # small images are not enlarged
    assert manifest.resolution.model_dump() == {"min_height": 10, "min_width": 16, "max_height": 32,
                                                "max_width": 32}
    assert manifest.max_resolution == 32


@pytest.mark.parametrize(("probability", "modes"), [(0.0, {1}), (1.0, {0})])
def test_proportion_mode_compresses_the_requested_share(cifar_source, tmp_path, probability, modes):
    root, _, _ = cifar_source("cifar10")
    convert("cifar10", tmp_path / "mixed.beton", input_dir=root,
            options=WriteOptions(write_mode="proportion", compress_probability=probability, num_workers=1))
    assert set(Reader(str(tmp_path / "mixed.beton")).metadata["f0"]["mode"]) == modes  # 0 jpg, 1 raw


@pytest.mark.parametrize(("images", "max_resolution", "page_mib"), [
    (np.zeros((5, 8, 8), np.uint8), None, 2),              # tiny images: FFCV's smallest page
    (np.zeros((5, 1024, 1024, 3), np.uint8), None, 8),     # 3 MiB raw, with room for a larger JPEG
    (np.zeros((5, 1024, 1024, 3), np.uint8), 256, 2),      # shrunk before writing
    (ImageFiles(()), None, 8),                             # sizes unknown until decoded: FFCV's default
])
def test_page_size_fits_the_largest_stored_image(images, max_resolution, page_mib):
    assert page_size_for(images, max_resolution) == page_mib << 20


def test_small_data_sets_make_small_files(digits_betons):
    # FFCV pads the header to a page, then writes whole pages and the allocation table: a 2 MiB header page
    # plus one 2 MiB data page here, where 8 MiB pages made 16 MiB.
    assert digits_betons["test"].stat().st_size < 5 << 20


# ------------------------------------------------------------------------------------------- CLI

def test_cli_writes_file_and_manifest_and_prints_it(tmp_path, capsys):
    output = tmp_path / "out" / "digits.beton"
    assert main(["digits", "--output", str(output), "--split", "test", "--workers", "1", "--limit", "30"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(manifest_path(output).read_text())
    assert printed["num_samples"] == 30 and output.stat().st_size == printed["size_bytes"]


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["cifar10", "--input", str(missing), "--output", str(tmp_path / "c.beton"), "--workers", "1"]) == 2
    error = capsys.readouterr().err
    assert "satscale-convert: error:" in error and str(missing) in error
    assert main(["digits", "--output", str(tmp_path / "d.beton"), "--jpeg-quality", "0"]) == 2
    assert "jpeg_quality" in capsys.readouterr().err
    assert_no_output(tmp_path)


# ------------------------------------------------------------------------------------------- bad inputs

def _idx_folder(root: Path, *, labels: np.ndarray | None = None, truncate: bool = False, drop: str = "") -> Path:
    root.mkdir()
    images = np.zeros((4, 5, 5), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3], dtype=np.uint8) if labels is None else labels.astype(np.uint8)
    image_bytes = bytes([0, 0, 8, 3]) + np.array([4, 5, 5], dtype=">u4").tobytes() + images.tobytes()
    label_bytes = bytes([0, 0, 8, 1]) + np.array([4], dtype=">u4").tobytes() + labels.tobytes()
    for prefix in ("train", "t10k"):
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(image_bytes[:-7] if truncate
                                                                            else image_bytes))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(label_bytes))
    if drop:
        (root / drop).unlink()
    return root


class _RunsShellCommands:
    def __reduce__(self):
        import os
        return os.system, ("echo this must never run",)


def _bad_cifar(tmp_path: Path, cifar_source, damage: str) -> Path:
    root, _, _ = cifar_source("cifar10")
    folder = root / "cifar-10-batches-py"
    if damage == "missing batch":
        (folder / "data_batch_3").unlink()
    elif damage == "wrong layout":
        (folder / "data_batch_2").write_bytes(pickle.dumps({b"pixels": np.zeros((4, 3072), np.uint8)}))
    elif damage == "wrong shape":
        (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((4, 1024), np.uint8),
                                                            b"labels": [0, 1, 2, 3]}))
    elif damage == "label out of range":
        (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8),
                                                            b"labels": [0, 1, 10, 3]}))
    elif damage == "code in pickle":
        (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": _RunsShellCommands(), b"labels": [0]}))
    return root


BAD_INPUTS = {
    # case: (format, how to build the input, message pattern)
    "idx file missing": ("fashion-mnist", lambda tmp, _: _idx_folder(tmp / "idx", drop="train-labels-idx1-ubyte.gz"),
                         r"train-labels-idx1-ubyte\.gz.*four standard idx files"),
    "idx truncated": ("fashion-mnist", lambda tmp, _: _idx_folder(tmp / "idx", truncate=True),
                      r"train-images-idx3-ubyte\.gz is truncated"),
    "idx label out of range": ("fashion-mnist", lambda tmp, _: _idx_folder(tmp / "idx", labels=np.array([0, 12, 1, 2])),
                               r"outside \[0, 10\).*sample 1 has label 12"),
    "not idx at all": ("idx", lambda tmp, _: _write(_idx_folder(tmp / "idx") / "train-images-idx3-ubyte.gz",
                                                     gzip.compress(b"GIF89a...")) and tmp / "idx", r"magic number"),
    "cifar missing batch": ("cifar10", lambda tmp, c: _bad_cifar(tmp, c, "missing batch"), r"data_batch_3 is missing"),
    "cifar wrong layout": ("cifar10", lambda tmp, c: _bad_cifar(tmp, c, "wrong layout"), r"data_batch_2 has no 'data'"),
    "cifar wrong shape": ("cifar10", lambda tmp, c: _bad_cifar(tmp, c, "wrong shape"), r"expected uint8 \(N, 3072\)"),
    "cifar label out of range": ("cifar10", lambda tmp, c: _bad_cifar(tmp, c, "label out of range"),
                                 r"outside \[0, 10\).*label 10"),
    "cifar pickle runs code": ("cifar10", lambda tmp, c: _bad_cifar(tmp, c, "code in pickle"),
                               r"posix\.system is not allowed"),
    "cifar not a folder": ("cifar10", lambda tmp, _: tmp / "absent", r"absent does not exist"),
    "folder with a text file": ("image-folder", lambda tmp, _: _write(tmp / "tree" / "cat" / "notes.txt", b"hi")
                                and tmp / "tree", r"not \['\.jpeg', '\.jpg', '\.png'\] files.*cat/notes\.txt"),
    "folder with files at the root": ("image-folder", lambda tmp, _: _write(tmp / "tree" / "x.png", b"")
                                      and tmp / "tree", r"x\.png.*next to the class folders"),
    "folder without images": ("image-folder", lambda tmp, _: (tmp / "tree" / "cat").mkdir(parents=True)
                              or tmp / "tree", r"has no images"),
}


def _write(path: Path, payload: bytes) -> bool:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return True


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_clearly_and_leaves_no_file(tmp_path, cifar_source, case):
    source_format, build, pattern = BAD_INPUTS[case]
    input_dir = build(tmp_path, cifar_source)
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    with pytest.raises(SourceError, match=pattern):
        convert(source_format, output_dir / "x.beton", input_dir=input_dir, options=ONE_WORKER)
    assert_no_output(output_dir)


def test_undecodable_image_fails_after_writing_and_keeps_the_previous_file(tmp_path):
    """A corrupt file is only found by the writer's worker processes; the error still names it, and the
    earlier good .beton at the same path survives untouched."""
    good = write_image_folder(tmp_path / "good", {"a": list(smooth_images(3, 12, 12))})
    output = tmp_path / "out" / "tree.beton"
    before = convert("image-folder", output, input_dir=good, options=ONE_WORKER)

    bad = write_image_folder(tmp_path / "bad", {"a": list(smooth_images(3, 12, 12)), "b": []})
    (bad / "b" / "broken.jpg").write_bytes(b"\xff\xd8 this is not really a JPEG")
    with pytest.raises(SourceError, match=r"b/broken\.jpg cannot be decoded as an image"):
        convert("image-folder", output, input_dir=bad, options=WriteOptions(num_workers=2))
    assert read_manifest(output) == before
    assert hashlib.sha256(output.read_bytes()).hexdigest() == before.sha256
    assert sorted(p.name for p in output.parent.iterdir()) == ["tree.beton", "tree.beton.manifest.json"]


def test_image_too_large_for_a_page_fails_instead_of_hanging_the_writer(tmp_path):
    """FFCV's writer hangs when a worker cannot fit a sample in a page; such images are refused up front."""
    rows = np.linspace(0, 255, 1800, dtype=np.uint8)
    huge = np.ascontiguousarray(np.broadcast_to(rows[:, None, None], (1800, 1800, 3)))  # 9.7 MB raw > 8 MiB page
    root = write_image_folder(tmp_path / "tree", {"big": [huge]})
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    with pytest.raises(SourceError, match=r"1800x1800, too large for a 8 MiB page in raw mode; set max_resolution"):
        convert("image-folder", output_dir / "big.beton", input_dir=root, options=ONE_WORKER)
    assert_no_output(output_dir)
    # As a JPEG it fits, and shrinking it works in any mode.
    convert("image-folder", output_dir / "big-jpg.beton", input_dir=root,
            options=WriteOptions(write_mode="jpg", num_workers=1))
    shrunk = convert("image-folder", output_dir / "big-raw.beton", input_dir=root,
                     options=WriteOptions(max_resolution=256, num_workers=1))
    assert shrunk.resolution.max_height == 256


@pytest.mark.parametrize(("source_format", "split", "pattern"), [
    ("mnist-ish", None, r"unknown source format 'mnist-ish'"),
    ("digits", "validation", r"split 'validation' does not exist"),
])
def test_unknown_format_or_split_is_named(tmp_path, source_format, split, pattern):
    with pytest.raises(SourceError, match=pattern):
        convert(source_format, tmp_path / "x.beton", split=split, options=ONE_WORKER)
    assert_no_output(tmp_path)


def test_balanced_subset_is_even_seeded_and_nested():
    labels = np.repeat([0, 1, 2, 3], [50, 30, 5, 15])  # class-sorted and unequal
    subset = balanced_subset(labels, 40, seed=1)
    counts = np.bincount(labels[subset], minlength=4)
    assert counts[2] == 5 and sorted(counts) == [5, 11, 12, 12]  # the small class gives all it has
    assert np.array_equal(subset, np.sort(subset)) and len(set(subset)) == 40
    assert np.array_equal(balanced_subset(labels, 40, seed=1), subset)
    assert not np.array_equal(balanced_subset(labels, 40, seed=2), subset)
    assert set(balanced_subset(labels, 20, seed=1)) <= set(subset)  # a smaller subset is part of a larger one
    assert np.array_equal(balanced_subset(labels, 500), np.arange(100))
