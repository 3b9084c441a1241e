"""Online augmentation for training: named presets, two engines, one parameter set.

Every preset is one `Geometry` (the ranges of one random affine warp and a
horizontal flip). Both engines read the same `Geometry` and draw the warp the
way Keras' `ImageDataGenerator` does (rotation, shift, shear, independent x/y
zoom, flip), so switching engines changes the speed, not the augmentation:

- `idg`: the documented way (S1). Keras' legacy `ImageDataGenerator` draws and
  applies each warp in NumPy/SciPy, one image at a time, inside a
  `keras.utils.PyDataset` (Keras' workers: threads or processes).
- `tf`: the same draws and the same bilinear warp (SciPy's edge rules, so for
  equal parameters the pixels agree to ~1e-3) as batched TensorFlow ops,
  compiled with XLA, inside a `tf.data` pipeline with stateless random ops,
  parallel map and prefetch.

Cutout, mixup and cutmix are options on top of any preset; they run as
TensorFlow ops in both engines (one implementation).

Both `train_dataset` results are finite: one pass is one epoch of
ceil(N / batch_size) batches, shuffled anew each epoch, so `model.fit` needs
no `steps_per_epoch`. Images are float32 on the 0..255 scale, labels float32
one-hot (soft with mixup/cutmix).
"""

import numpy as np
import tensorflow as tf

from kcifar.augment.config import ENGINES, PRESETS, AugmentConfig, Geometry, alternate_flips, batch_seed
from kcifar.augment.idg import IdgDataset
from kcifar.augment.tf_ops import augment_batch
from kcifar.errors import KcifarError

__all__ = ["AugmentConfig", "ENGINES", "Geometry", "IdgDataset", "PRESETS", "augment_once", "eval_dataset",
           "train_dataset"]


def train_dataset(x, y, num_classes, batch_size, cfg, seed=0, workers=1, use_multiprocessing=False,
                  first_epoch=None):
    """Shuffled, augmented training batches of (float32 0..255 images, float32 labels).

    Returns a `tf.data.Dataset` for engine "tf" and an `IdgDataset` (a
    `keras.utils.PyDataset`; `workers` and `use_multiprocessing` are its
    Keras worker settings) for engine "idg". Both are one epoch long and
    reshuffle and redraw each epoch; a seed fixes every epoch.

    With `first_epoch` (for resumable training), epoch `e`'s order and draws
    depend only on (seed, e), and the data starts at epoch `first_epoch`, so
    a run resumed there sees exactly what an uninterrupted run would. The
    tf dataset is then endless: pass `steps_per_epoch` to `fit`.
    """
    x, y = _check_arrays(x, y, num_classes, batch_size)
    if cfg.engine == "idg":
        return IdgDataset(x, y, num_classes, batch_size, cfg, seed=seed, workers=workers,
                          use_multiprocessing=use_multiprocessing, first_epoch=first_epoch or 0)
    if first_epoch is None:
        if cfg.alternate_flip:
            raise KcifarError("augment alternate_flip flips by epoch: pass first_epoch (0 for a new run)")
        indices = tf.data.Dataset.range(len(x)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        batch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        batches = tf.data.Dataset.zip(indices.batch(batch_size), batch_seeds)
    else:
        epochs = tf.data.Dataset.range(first_epoch, 2**62)
        batches = epochs.flat_map(lambda epoch: _epoch_batches(len(x), batch_size, seed, epoch))
    x, y = tf.constant(x), tf.constant(y)

    def load_and_augment(batch_indices, batch_seed, epoch=None):
        images = tf.cast(tf.gather(x, batch_indices), tf.float32)
        labels = tf.one_hot(tf.gather(y, batch_indices), num_classes)
        flips = alternate_flips(batch_indices, epoch, seed) if cfg.alternate_flip else None
        return augment_batch(images, labels, cfg, tf.stack([tf.constant(seed, tf.int64), batch_seed]), flips)

    return batches.map(load_and_augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _epoch_batches(n, batch_size, seed, epoch):
    """(indices, seed, epoch) of every batch of one epoch, a function of (seed, epoch) alone."""
    order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=tf.stack([seed, epoch]))
    batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size).enumerate()
    return batches.map(lambda i, indices: (indices, batch_seed(epoch, i), epoch))


def augment_once(x, y, num_classes, cfg, seed=0):
    """All of x augmented once, in order, as one NumPy batch (images, labels): for previews."""
    x, y = _check_arrays(x, y, num_classes, len(x))
    if cfg.engine == "idg":
        return IdgDataset(x, y, num_classes, len(x), cfg, seed, workers=1, shuffle=False)[0]
    flips = alternate_flips(tf.range(len(x), dtype=tf.int64), 0, seed) if cfg.alternate_flip else None
    images, labels = augment_batch(tf.cast(x, tf.float32), tf.one_hot(y, num_classes), cfg,
                                   tf.constant([seed, 0], tf.int64), flips)
    return images.numpy(), labels.numpy()


def eval_dataset(x, y, num_classes, batch_size):
    """Ordered, unaugmented batches of (float32 0..255 images, float32 one-hot labels)."""
    x, y = _check_arrays(x, y, num_classes, batch_size)

    def to_float(images, labels):
        return tf.cast(images, tf.float32), tf.one_hot(labels, num_classes)

    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return batches.map(to_float, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _check_arrays(x, y, num_classes, batch_size):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise KcifarError(f"images must be (N, height, width, channels), got shape {x.shape}")
    if y.ndim != 1 or len(y) != len(x) or len(x) == 0:
        raise KcifarError(f"need one integer label per image: {len(x)} images, labels shape {y.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise KcifarError(f"labels must lie in 0..{num_classes - 1}, found {y.min()}..{y.max()}")
    if int(batch_size) < 1:
        raise KcifarError(f"batch_size must be >= 1, got {batch_size}")
    return x, y.astype(np.int64)
