"""The idg engine: Keras' ImageDataGenerator inside a `keras.utils.PyDataset`."""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from kcifar.augment.config import alternate_flips, batch_seed
from kcifar.augment.tf_ops import augment_batch
from kcifar.errors import KcifarError


def image_data_generator(geometry):
    """Keras' `ImageDataGenerator` configured with a preset's `Geometry`."""
    if geometry.shift >= 1:  # an array of whole pixels: the generator draws one of them
        shift = list(range(-int(geometry.shift), int(geometry.shift) + 1))
    else:
        shift = geometry.shift
    return tf.keras.preprocessing.image.ImageDataGenerator(
        rotation_range=geometry.rotation, width_shift_range=shift, height_shift_range=shift,
        shear_range=geometry.shear, zoom_range=geometry.zoom, horizontal_flip=geometry.hflip,
        fill_mode=geometry.fill, cval=0.0, interpolation_order=0 if geometry.interpolation == "nearest" else 1)


def random_warp_params(geometry, count, height, width, rng):
    """`count` warps in the format of `ImageDataGenerator.get_random_transform`, drawn
    the way it draws them, but from `rng` instead of NumPy's global generator:
    global state is shared by worker threads and can be left locked in forked
    worker processes (which then hang). A shift that ``geometry.rounds_shift`` is rounded to whole
    pixels, which the generator itself does not do."""
    def uniform(bound):
        return rng.uniform(-bound, bound, count) if bound else np.zeros(count)

    if geometry.shift >= 1:  # whole pixels, as the generator draws from a list of integers
        tx, ty = (rng.integers(-int(geometry.shift), int(geometry.shift) + 1, count) for _ in range(2))
    else:  # the generator scales its x shift (tx) by the height
        tx, ty = uniform(geometry.shift) * height, uniform(geometry.shift) * width
        if geometry.rounds_shift:
            tx, ty = np.round(tx), np.round(ty)
    theta, shear = uniform(geometry.rotation), uniform(geometry.shear)
    zx, zy = 1 + uniform(geometry.zoom), 1 + uniform(geometry.zoom)
    flips = rng.random(count) < (0.5 if geometry.hflip else 0.0)
    return [dict(theta=theta[i], tx=tx[i], ty=ty[i], shear=shear[i], zx=zx[i], zy=zy[i], flip_horizontal=flips[i])
            for i in range(count)]


class IdgDataset(keras.utils.PyDataset):
    """Batches warped by Keras' `ImageDataGenerator`, as a `keras.utils.PyDataset`.

    Batch `i` of epoch `e` depends only on (seed, e, i), so the result does not
    depend on which worker builds it. `on_epoch_end` (called by `fit`) moves to
    the next epoch: new order (unless shuffle=False), new warps.

    workers, use_multiprocessing: Keras' PyDataset workers. Default 1: `fit`
    then builds batches in one background thread while it trains; more threads gain
    nothing, SciPy's warp holding the GIL, and processes only with spare cores
    (experiments/results/bench_augment.md). The extras run TF ops,
    which TF does not support in forked processes, so they need threads.
    """

    def __init__(self, x, y, num_classes, batch_size, cfg, seed=0, workers=1, use_multiprocessing=False,
                 shuffle=True, first_epoch=0):
        if use_multiprocessing and cfg.extras:
            raise KcifarError("the idg engine runs cutout/mixup/cutmix as TF ops, which cannot run in forked "
                              "worker processes; use threads (use_multiprocessing=False) or the tf engine")
        super().__init__(workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=4 * workers)
        self.x, self.y, self.num_classes = x, y, num_classes
        self.batch_size, self.cfg, self.seed, self.shuffle = int(batch_size), cfg, seed, shuffle
        self.generator = image_data_generator(cfg.geometry)
        self.epoch = first_epoch
        self.order = self._order()

    def _order(self):
        if not self.shuffle:
            return np.arange(len(self.x))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.x))

    def __len__(self):
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range 0..{len(self) - 1}")
        batch = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images = self.x[batch].astype(np.float32)
        labels = np.eye(self.num_classes, dtype=np.float32)[self.y[batch]]
        if self.cfg.geometry.warps or self.cfg.geometry.hflip:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            warps = random_warp_params(self.cfg.geometry, len(images), *images.shape[1:3], rng)
            if self.cfg.alternate_flip:
                for warp, flip in zip(warps, alternate_flips(batch, self.epoch, self.seed)):
                    warp["flip_horizontal"] = bool(flip)
            images = np.stack([self.generator.apply_transform(image, w) for image, w in zip(images, warps)])
        if self.cfg.extras:
            seed = tf.constant([self.seed, batch_seed(self.epoch, index)], tf.int64)
            images, labels = (np.asarray(t) for t in augment_batch(
                images, labels, dataclasses.replace(self.cfg, preset="none"), seed))
        return images, labels

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self._order()
