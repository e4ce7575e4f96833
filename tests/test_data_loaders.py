"""Loaders: several resolutions from one .beton, the epoch schedule, DDP sharding, and FFCV's traps."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.transforms import NormalizeImage
from pydantic import ValidationError

from trainers.data.errors import LoaderConfigError, ManifestError
from trainers.data.loader_config import LoaderConfig, ProgressiveResizing, resolution_for_epoch
from trainers.data.loaders import build_eval_loader, build_loaders, build_train_loader
from trainers.data.manifest import manifest_path, read_manifest, write_manifest
from trainers.data.s3 import upload_dataset
from trainers.errors import ConfigError

# numba's dispatcher finalizer raises a harmless KeyError when FFCV's per-loader compiled closures are
# garbage-collected (numba 0.68); it is not about the code under test.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("restore_torch_threads")]

SMALL = LoaderConfig(batch_size=100, resolution=16, num_workers=1)


def digits_source(split: str) -> tuple[np.ndarray, np.ndarray]:
    """What the digits .beton should hold, from scikit-learn directly: (N, 3, 8, 8) uint8 and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    in_test = np.arange(len(digits.target)) % 5 == 0
    chosen = in_test if split == "test" else ~in_test
    images = np.rint(digits.images[chosen] * 255 / 16).astype(np.uint8)
    return np.repeat(images[:, None], 3, axis=1), digits.target[chosen]


# ------------------------------------------------------------------------------------------- the schedule

@pytest.mark.parametrize(("epoch", "expected"), [(0, 160), (65, 160), (70, 160), (72, 192), (76, 192), (90, 192)])
def test_resolution_for_epoch_follows_ffcv_imagenet(epoch, expected):
    # ffcv-imagenet's ResNet-50 schedule: 160 px until epoch 65, 192 px from epoch 76, multiples of 32.
    assert resolution_for_epoch(epoch, 160, 192, start_ramp=65, end_ramp=76) == expected


def test_resolution_for_epoch_supports_small_images_and_stays_in_range():
    assert [resolution_for_epoch(e, 16, 32, 0, 2, multiple=8) for e in range(4)] == [16, 24, 32, 32]
    # Rounding 10 px to a multiple of 32 gives 0; the result is kept within [min_res, max_res].
    assert resolution_for_epoch(1, 8, 16, start_ramp=0, end_ramp=4) == 8
    with pytest.raises(ValueError, match="min_res <= max_res"):
        resolution_for_epoch(0, 64, 32, 0, 4)
    with pytest.raises(ValueError, match="start_ramp < end_ramp"):
        resolution_for_epoch(0, 16, 32, 4, 4)


def test_loader_config_rejects_inconsistent_settings():
    with pytest.raises(ValidationError, match="quasi_random.*not available with distributed=True"):
        LoaderConfig(batch_size=8, resolution=32, order="quasi_random", distributed=True)
    with pytest.raises(ValidationError, match=r"progressive.min_res \(64\) exceeds resolution \(32\)"):
        LoaderConfig(batch_size=8, resolution=32, progressive=ProgressiveResizing(min_res=64, start_ramp=0,
                                                                                  end_ramp=3))
    with pytest.raises(ValidationError, match="crop_scale"):
        LoaderConfig(batch_size=8, resolution=32, crop_scale=(1.0, 0.5))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        LoaderConfig(batch_size=8, resolution=32, normalize=True)


# ------------------------------------------------------------------------------------------- resolutions

def test_one_file_serves_several_resolutions(digits_betons):
    config = LoaderConfig(batch_size=128, resolution=32, drop_last=False, num_workers=1, eval_resolution=48,
                          progressive=ProgressiveResizing(min_res=16, start_ramp=0, end_ramp=2, multiple=8))
    train = build_train_loader(digits_betons["train"], config, with_indices=True)
    _, source_labels = digits_source("train")
    for epoch, expected_size in enumerate([16, 24, 32]):
        assert train.next_epoch == epoch and train.resolution == expected_size
        indices = []
        for images, labels, batch_indices in train:
            assert images.shape[1:] == (3, expected_size, expected_size) and images.dtype == torch.uint8
            assert labels.dtype == torch.int64 and labels.shape == (len(images),)
            np.testing.assert_array_equal(labels.numpy(), source_labels[batch_indices.numpy()])
            indices.append(batch_indices.clone())
        assert sorted(torch.cat(indices).tolist()) == list(range(len(source_labels)))  # each sample once

    for crop in ("center_crop", "resize"):
        evaluation = build_eval_loader(digits_betons["test"], config.model_copy(update={"eval_crop": crop}))
        shapes = {tuple(images.shape[1:]) for images, _ in evaluation}
        assert shapes == {(3, 48, 48)}


def test_resize_at_the_stored_resolution_returns_the_stored_pixels(digits_betons):
    config = LoaderConfig(batch_size=100, resolution=8, eval_crop="resize", num_workers=1)
    expected_images, expected_labels = digits_source("test")
    batches = list((images.clone(), labels.clone()) for images, labels in build_eval_loader(digits_betons["test"],
                                                                                            config))
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), expected_images)
    np.testing.assert_array_equal(torch.cat([b[1] for b in batches]).numpy(), expected_labels)


def test_flips_mirror_whole_images_chosen_by_seed(digits_betons):
    """Each training image is its stored pixels or their left-right mirror, decided per (seed, epoch, sample)."""
    config = LoaderConfig(batch_size=100, resolution=8, train_crop="resize", num_workers=1, drop_last=False,
                          flip_probability=0.5, seed=5)
    source_images, _ = digits_source("train")

    def mirrored_per_sample() -> dict[int, bool]:
        mirrored = {}
        for images, _, batch_indices in build_train_loader(digits_betons["train"], config, with_indices=True):
            for image, index in zip(images.numpy(), batch_indices.tolist()):
                stored = source_images[index]
                assert (image == stored).all() or (image == stored[:, :, ::-1]).all()
                mirrored[index] = bool((image != stored).any())
        return mirrored

    first = mirrored_per_sample()
    assert len(first) == len(source_images) and 0.4 < np.mean(list(first.values())) < 0.6
    assert mirrored_per_sample() == first  # same seed, same flips


def test_set_epoch_picks_the_shuffle_and_the_resolution(digits_betons):
    config = LoaderConfig(batch_size=500, resolution=16, num_workers=1, flip_probability=0.0, seed=7,
                          progressive=ProgressiveResizing(min_res=8, start_ramp=0, end_ramp=1, multiple=8))
    train = build_train_loader(digits_betons["train"], config, with_indices=True)

    def one_epoch() -> tuple[list[int], int]:
        batches = [(indices.clone(), images.shape[-1]) for images, _, indices in train]
        return torch.cat([b[0] for b in batches]).tolist(), batches[0][1]

    first_order, first_size = one_epoch()
    second_order, second_size = one_epoch()
    train.set_epoch(0)  # e.g. resuming from a checkpoint taken after epoch 0... replays epoch 0
    replayed_order, replayed_size = one_epoch()
    assert (first_size, second_size, replayed_size) == (8, 16, 8)
    assert first_order != second_order and replayed_order == first_order
    assert len(first_order) == 1000  # drop_last=True: 1437 // 500 = 2 full batches


# ------------------------------------------------------------------------------------------- FFCV traps

def test_batches_are_reused_buffers_so_kept_batches_must_be_cloned(digits_betons):
    config = LoaderConfig(batch_size=64, resolution=8, eval_crop="resize", num_workers=1, batches_ahead=2)
    expected_images, _ = digits_source("train")
    iterator = iter(build_eval_loader(digits_betons["train"], config))
    first_view, _ = next(iterator)
    first_copy = first_view.clone()
    for _ in iterator:  # 22 more batches cycle through the 4 buffer slots
        pass
    np.testing.assert_array_equal(first_copy.numpy(), expected_images[:64])
    assert not torch.equal(first_view, first_copy), "FFCV no longer reuses buffers: the clone is unnecessary"


def test_final_batch_of_one_keeps_its_batch_dimension(digits_betons):
    config = LoaderConfig(batch_size=359, resolution=12, num_workers=1)  # 360 test samples: 359 + 1
    batches = [(images.shape, labels.shape, labels.clone()) for images, labels in
               build_eval_loader(digits_betons["test"], config)]
    assert [b[0] for b in batches] == [(359, 3, 12, 12), (1, 3, 12, 12)]
    assert [b[1] for b in batches] == [(359,), (1,)]
    assert batches[-1][2].item() == digits_source("test")[1][-1]


def test_loader_leaves_normalization_to_the_model(digits_betons):
    loader = build_train_loader(digits_betons["test"], SMALL)
    image_pipeline = loader.loader.pipeline_specs["image"]
    assert not any(isinstance(op, NormalizeImage) for op in [image_pipeline.decoder, *image_pipeline.transforms])
    images, _ = next(iter(loader))
    assert images.dtype == torch.uint8 and images.max() > 200  # [0, 255], not mean/std normalized


def test_quasi_random_order_covers_every_sample_without_distributed(digits_betons):
    config = LoaderConfig(batch_size=100, resolution=8, order="quasi_random", drop_last=False, num_workers=1,
                          os_cache=False)
    indices = [i.clone() for _, _, i in build_train_loader(digits_betons["test"], config, with_indices=True)]
    assert sorted(torch.cat(indices).tolist()) == list(range(360))


def test_loader_refuses_settings_this_process_cannot_run(digits_betons):
    with pytest.raises(LoaderConfigError, match="num_workers=64 but this process sees"):
        build_train_loader(digits_betons["test"], SMALL.model_copy(update={"num_workers": 64}))
    with pytest.raises(LoaderConfigError, match="torch.distributed initialized"):
        build_train_loader(digits_betons["test"], SMALL.model_copy(update={"distributed": True}))
    assert issubclass(LoaderConfigError, ConfigError)


# ------------------------------------------------------------------------------------------- manifests

def test_loader_checks_the_file_against_its_manifest(digits_betons, tmp_path):
    bare = tmp_path / "bare.beton"
    shutil.copy(digits_betons["test"], bare)
    with pytest.raises(ManifestError, match="has no manifest bare.beton.manifest.json"):
        build_eval_loader(bare, SMALL)

    manifest = read_manifest(digits_betons["test"])
    write_manifest(bare, manifest.model_copy(update={"size_bytes": manifest.size_bytes + 1}))
    with pytest.raises(ManifestError, match="truncated or was replaced"):
        build_eval_loader(bare, SMALL)

    write_manifest(bare, manifest.model_copy(update={"num_samples": 361}))
    with pytest.raises(ManifestError, match="holds 360 samples but its manifest says 361"):
        build_eval_loader(bare, SMALL)

    write_manifest(bare, manifest.model_copy(update={"class_names": tuple("abcdefghij")}))
    with pytest.raises(ManifestError, match="name different classes"):
        build_loaders(digits_betons["train"], bare, SMALL)

    with pytest.raises(ManifestError, match="does not exist"):
        build_eval_loader(tmp_path / "absent.beton", SMALL)


def test_build_loaders_gives_a_trial_its_pair(digits_betons):
    loaders = build_loaders(digits_betons["train"], digits_betons["test"], SMALL)
    assert loaders.num_classes == 10 and len(loaders.train) == 14 and len(loaders.eval) == 4


def test_s3_dataset_paths_are_staged_then_loaded(digits_betons, s3_bucket, tmp_path):
    uri = upload_dataset(digits_betons["test"], f"s3://{s3_bucket}/digits/test.beton")
    config = SMALL.model_copy(update={"cache_dir": tmp_path / "cache"})
    loader = build_eval_loader(uri, config)
    assert sum(len(labels) for _, labels in loader) == 360
    cached = tmp_path / "cache" / s3_bucket / "digits" / "test.beton"
    assert cached.read_bytes() == digits_betons["test"].read_bytes()
    assert manifest_path(cached).is_file()


# ------------------------------------------------------------------------------------------- DDP sharding

def _rank_main(rank: int, world_size: int, init_file: str, beton: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    try:
        config = LoaderConfig(batch_size=128, resolution=8, train_crop="resize", distributed=True,
                              drop_last=False, num_workers=1, seed=11)
        loader = build_train_loader(beton, config, with_indices=True)
        for epoch in range(2):
            seen = [torch.stack([indices, labels]).clone() for _, labels, indices in loader]
            torch.save(torch.cat(seen, dim=1), Path(out_dir) / f"rank{rank}-epoch{epoch}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_see_each_sample_once_per_epoch(digits_betons, tmp_path):
    world_size = 2
    torch.multiprocessing.spawn(_rank_main, nprocs=world_size, join=True,
                                args=(world_size, str(tmp_path / "init"), str(digits_betons["train"]),
                                      str(tmp_path)))
    _, source_labels = digits_source("train")
    num_samples = len(source_labels)  # 1437: DistributedSampler pads one duplicate to make 2 x 719
    padding = -num_samples % world_size
    shards_by_epoch = []
    for epoch in range(2):
        shards = [torch.load(tmp_path / f"rank{rank}-epoch{epoch}.pt") for rank in range(world_size)]
        assert [shard.shape[1] for shard in shards] == [(num_samples + padding) // world_size] * world_size
        everything = torch.cat(shards, dim=1)
        np.testing.assert_array_equal(everything[1].numpy(), source_labels[everything[0].numpy()])
        indices = everything[0].tolist()
        assert set(indices) == set(range(num_samples))
        assert len(indices) - len(set(indices)) == padding
        shards_by_epoch.append([shard[0].tolist() for shard in shards])
    assert shards_by_epoch[0][0] != shards_by_epoch[1][0], "the shards must be reshuffled every epoch"


def test_importing_ffcv_keeps_the_callers_torch_threads_and_compiles_nothing(digits_betons):
    """FFCV sets torch's intra-op threads on import (to 1) and per Loader (to num_workers): evaluation in a fresh
    process ran on one core because of it. Its import also built a numba typed Dict, compiling numba's dictionary
    code (2-5 CPU-seconds per worker): imported here (trainers.data.importing_ffcv), numba compiles nothing until
    a loader's pipeline, and that table is a plain dict the decoders read as before. A new process, so FFCV is
    imported for the first time."""
    code = f"""
import torch
torch.set_num_threads(3)
import orchestrator.runner  # imports the converters, hence FFCV
import numba.typed, numba.typed.typeddict
from ffcv.fields.rgb_image import IMAGE_MODES
compiled = sum(len(getattr(numba.typed.typeddict, name).signatures) for name in ("_make_dict", "_setitem"))
print(compiled, type(IMAGE_MODES).__name__, sorted(IMAGE_MODES.items()), numba.typed.Dict is numba.typed.typeddict.Dict)
from trainers.data.loader_config import LoaderConfig
from trainers.data.loaders import build_train_loader
loader = build_train_loader({str(digits_betons["train"])!r}, LoaderConfig(batch_size=64, resolution=16))
images, labels = next(iter(loader))
print(int(images.float().std() > 0), torch.get_num_threads())
"""
    import_state, after_a_batch = run_python(code).stdout.strip().splitlines()[-2:]
    assert import_state == "0 dict [('jpg', 0), ('raw', 1)] True"  # numba's own Dict is back for everyone else
    assert after_a_batch == "1 3"  # real pixels decoded; the caller's 3 threads


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter at the repo root; a crash fails with what the process printed."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, f"exit status {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def running_epochs() -> list[EpochIterator]:
    return [thread for thread in threading.enumerate() if isinstance(thread, EpochIterator) and thread.is_alive()]


def test_an_epoch_left_early_stops_its_thread_before_its_memory_is_freed(digits_betons):
    """FFCV's close() unmaps an epoch's batches while its thread may still be decoding into them."""
    loader = build_train_loader(digits_betons["train"], LoaderConfig(batch_size=8, resolution=16))
    for batch_index, _batch in enumerate(loader):
        if batch_index == 1:
            break
    assert running_epochs() == []
    assert sum(1 for _ in loader) == len(loader)  # the loader still serves whole epochs


def test_a_process_that_exits_mid_epoch_stops_the_epoch_first(digits_betons):
    """A process exiting mid-epoch tore down under FFCV's daemon thread (SIGABRT at exit, once in CI). atexit
    handlers run last-registered first: the check registered before the loaders runs after their stop."""
    code = f"""
import atexit, threading
def check():
    from ffcv.loader.epoch_iterator import EpochIterator
    alive = [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]
    print("epoch threads at exit:", len(alive))
atexit.register(check)
from trainers.data.loader_config import LoaderConfig
from trainers.data.loaders import build_train_loader
loader = build_train_loader({str(digits_betons["train"])!r}, LoaderConfig(batch_size=8, resolution=16))
batches = iter(loader)
next(batches)
"""
    assert run_python(code).stdout.strip().splitlines()[-1] == "epoch threads at exit: 0"
