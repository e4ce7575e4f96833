"""Seeded FFCV augmentations: each image's random crop and flip are a function of (seed, epoch, sample index).

FFCV 1.0.2's RandomResizedCropRGBImageDecoder and RandomHorizontalFlip draw from numba's per-thread RNG, which
`Loader(seed=...)` does not seed (that fixes the order only; libffcv/ffcv issues 392 and 300), so the same trial
saw other crops and flips on every run. Here every random draw is a counter-based hash of (the epoch's key,
the sample's index, the draw's number): no RNG state, so the result does not depend on which thread decodes
which image, on how many ranks share the data, or on what ran before. Trials with the same seed see the same
augmented images (the paired design of `trainers.seeding`).

The epoch's key lives in a one-element array that the compiled pipeline reads through its address at run time:
numba freezes arrays captured by a compiled function as constants, and recompiling the pipeline every epoch
would cost seconds.
"""
from __future__ import annotations

from dataclasses import replace

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from trainers.data import importing_ffcv
from trainers.seeding import derive_seed

with importing_ffcv():  # torch's thread count kept, no numba compile at import (trainers/data)
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

# Draw numbers: each random quantity of an image has its own, so they are independent.
_FLIP_DRAW = 0
_CROP_DRAWS_PER_TRY, _CROP_TRIES = 4, 10


class EpochKey:
    """The current epoch's augmentation key, derived from the loader's seed, in memory a pipeline reads."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cell = np.zeros(1, dtype=np.uint64)
        self.set_epoch(0)

    @property
    def address(self) -> int:
        return self.cell.ctypes.data

    def set_epoch(self, epoch: int) -> None:
        self.cell[0] = derive_seed(self.seed, "augment", epoch)


@intrinsic
def _read_key(typingctx, address):
    """The uint64 stored at `address` (an EpochKey's cell), read when the compiled code runs."""
    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], context.get_value_type(types.uint64).as_pointer())
        return builder.load(pointer)

    return types.uint64(address), codegen


@numba.njit(inline="always")
def _mix(value):
    """splitmix64's finaliser: a bijection on uint64 whose outputs look independent for nearby inputs."""
    value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return value ^ (value >> np.uint64(31))


@numba.njit
def uniform_draw(key, sample, draw):
    """A uniform float in [0, 1) for (epoch key, sample index, draw number)."""
    mixed = _mix(key ^ _mix(np.uint64(sample) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(draw)))
    return np.float64(mixed >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit
def random_resized_crop(height, width, scale, log_ratio, key, sample):
    """torchvision's RandomResizedCrop box (i, j, h, w) with its 10 tries and centre-crop fallback, every draw
    from `uniform_draw`."""
    area = height * width
    for attempt in range(_CROP_TRIES):
        draw = attempt * _CROP_DRAWS_PER_TRY + 1
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform_draw(key, sample, draw))
        aspect_ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform_draw(key, sample, draw + 1))
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform_draw(key, sample, draw + 2) * (height - h + 1))
            j = int(uniform_draw(key, sample, draw + 3) * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < np.exp(log_ratio[0]):
        w = width
        h = int(round(w / np.exp(log_ratio[0])))
    elif in_ratio > np.exp(log_ratio[1]):
        h = height
        w = int(round(h * np.exp(log_ratio[1])))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
    """FFCV's random-resized-crop decoder with each image's box from (epoch key, sample index)."""

    def __init__(self, output_size: tuple[int, int], key: EpochKey, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__(output_size)
        self.key, self.scale, self.ratio = key, scale, ratio

    @property
    def get_crop_generator(self):  # the abstract hook; this decoder draws its crops in generate_code
        return random_resized_crop

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        scale, log_ratio = np.array(self.scale, dtype=np.float64), np.log(np.array(self.ratio, dtype=np.float64))
        key_address = self.key.address

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            key = _read_key(key_address)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = random_resized_crop(height, width, scale, log_ratio, key, source_ix)
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class SeededHorizontalFlip(Operation):
    """Flip each (H, W, C) image with probability `flip_prob`, decided by (epoch key, sample index)."""

    def __init__(self, flip_prob: float, key: EpochKey) -> None:
        super().__init__()
        self.flip_prob, self.key = flip_prob, key

    def generate_code(self):
        my_range = Compiler.get_iterator()
        flip_prob, key_address = self.flip_prob, self.key.address

        # Element by element: an array assignment (dst[i] = images[i, :, ::-1]) makes numba compile its
        # shape-mismatch error message, unicode formatting included: 1.9 of the 2.2 s this function took to compile
        # in every trial, before its first batch (benchmarks/README.md).
        def flip(images, dst, indices):
            key = _read_key(key_address)
            _, height, width, channels = images.shape
            for i in my_range(images.shape[0]):
                mirrored = uniform_draw(key, indices[i], _FLIP_DRAW) < flip_prob
                for row in range(height):
                    source_row, destination_row = images[i, row], dst[i, row]  # views: cheaper 2-D indexing
                    for column in range(width):
                        source = width - 1 - column if mirrored else column
                        for channel in range(channels):
                            destination_row[column, channel] = source_row[source, channel]
            return dst

        flip.is_parallel = True
        flip.with_indices = True  # FFCV passes the batch's sample indices as a third argument
        return flip

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)
