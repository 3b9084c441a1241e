"""The tf engine: batched TensorFlow ops, warps compiled with XLA, stateless random draws."""

import functools
import math

import tensorflow as tf


def augment_batch(images, labels, cfg, seed, flips=None):
    """Augment one batch with TF ops: warp + flip, then cutout, then mixup/cutmix.

    images: float32 (n, h, w, c); labels: float32 (n, classes); seed: int (2,);
    flips: bool (n,) mirror decisions replacing the random ones (``alternate_flip``), or None.
    Two XLA clusters: in one, XLA would recompute the warp for the mixing partner.
    """
    warp_seed, mix_seed, mixup_seed, cutmix_seed = tf.unstack(tf.random.split(tf.cast(seed, tf.int64), 4))
    if cfg.geometry.warps or cfg.geometry.hflip or cfg.cutout:
        images = warp_and_cutout(images, cfg.geometry, int(cfg.cutout), warp_seed, flips)
    if cfg.mixup or cfg.cutmix:  # XLA has no kernel for the Gamma draws behind Beta: draw them outside
        n = tf.shape(images)[0]
        images, labels = mix(images, labels, _beta(n, cfg.mixup, mixup_seed) if cfg.mixup else None,
                             _beta(n, cfg.cutmix, cutmix_seed) if cfg.cutmix else None, mix_seed)
    return images, labels


def _uniforms(rows, n, seed):
    """(rows, n) uniforms in [0, 1) from one op: XLA compiles each random op slowly."""
    return tf.random.stateless_uniform([rows, n], seed, alg="threefry")


@functools.partial(tf.function, jit_compile=True)
def warp_and_cutout(images, geometry, cutout_side, seed, flips=None):
    """Random warps, then cutout; compiled with XLA, which runs them faster than plain TF ops."""
    u = _uniforms(9, tf.shape(images)[0], seed)
    if geometry.warps or geometry.hflip:
        images = warp(images, random_warps(geometry, tf.shape(images), u[:7], flips), geometry.fill,
                      bilinear=not geometry.nearest_sampling)
    if cutout_side:
        images = cutout(images, cutout_side, u[7:])
    return images


def random_warps(geometry, shape, u, flips=None):
    """(n, 8) projective transforms with parameters drawn as `ImageDataGenerator` does.

    u: (7, n) uniforms in [0, 1), one row per parameter; flips: given mirror decisions, or None."""
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

    def symmetric(row, bound):  # uniform in [-bound, bound]
        return (2 * u[row] - 1) * bound

    if geometry.shift >= 1:  # whole pixels, uniform in -shift..shift
        tx, ty = (tf.floor(u[row] * (2 * int(geometry.shift) + 1)) - int(geometry.shift) for row in (1, 2))
    else:  # as the generator: tx (along x) scaled by the height
        tx, ty = symmetric(1, geometry.shift) * height, symmetric(2, geometry.shift) * width
        if geometry.rounds_shift:
            tx, ty = tf.round(tx), tf.round(ty)
    params = dict(theta=symmetric(0, geometry.rotation), tx=tx, ty=ty, shear=symmetric(3, geometry.shear),
                  zx=1 + symmetric(4, geometry.zoom), zy=1 + symmetric(5, geometry.zoom),
                  flip_horizontal=u[6] < (0.5 if geometry.hflip else 0.0) if flips is None else flips)
    return warp_transforms(params, height, width)


def warp_transforms(params, height, width):
    """(n, 8) projective transforms from `ImageDataGenerator` warp parameters.

    params: (n,) tensors under the generator's keys (theta and shear in
    degrees; tx moves along x = columns, as the generator does). Each
    transform maps an output pixel (x, y) to the input point it samples, like
    SciPy's affine_transform in the generator: rotation @ shift @ shear @ zoom
    about the image centre, then the mirror the generator applies afterwards.
    """
    theta, shear = (tf.cast(params[key], tf.float32) * (math.pi / 180) for key in ("theta", "shear"))
    tx, ty, zx, zy = (tf.cast(params[key], tf.float32) for key in ("tx", "ty", "zx", "zy"))
    # The product written out (few elementwise ops: XLA compiles them far faster than 3x3 matmuls).
    a00, a01 = tf.cos(theta) * zx, -tf.sin(theta + shear) * zy
    a10, a11 = tf.sin(theta) * zx, tf.cos(theta + shear) * zy
    cx, cy = (width - 1) / 2, (height - 1) / 2  # rotate and scale about the centre
    b0 = tf.cos(theta) * tx - tf.sin(theta) * ty + cx - a00 * cx - a01 * cy
    b1 = tf.sin(theta) * tx + tf.cos(theta) * ty + cy - a10 * cx - a11 * cy
    flip = tf.cast(params["flip_horizontal"], tf.bool)  # output x -> width - 1 - x
    sign, offset = tf.where(flip, -1.0, 1.0), tf.where(flip, width - 1, 0.0)
    zeros = tf.zeros_like(a00)
    return tf.stack([a00 * sign, a01, b0 + a00 * offset, a10 * sign, a11, b1 + a10 * offset, zeros, zeros], axis=1)


def warp(images, transforms, fill, bilinear=True):
    """Bilinear affine warp with SciPy's edge rules, as `ImageDataGenerator` applies it.

    fill "nearest" repeats the edge pixels; "constant" makes every point
    outside the image black (SciPy's mode "constant", a hard edge); "reflect"
    mirrors the image at its edges, edge pixel included (SciPy's "reflect"). Written
    with gathers rather than `keras.ops.image.affine_transform` because XLA
    compiles it (faster than plain TF ops) and it gives the idg engine's pixels.
    ``bilinear=False`` reads the nearest pixel (torchvision's default sampling; the same pixels
    as bilinear, and faster, when every transform moves whole pixels: crop_flip). With fill
    "constant" a point is black when it falls outside the image before rounding (SciPy's rule).
    """
    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]
    rows, cols = tf.meshgrid(tf.range(tf.cast(height, tf.float32)), tf.range(tf.cast(width, tf.float32)),
                             indexing="ij")
    t = transforms[:, :, None, None]
    x, y = t[:, 0] * cols + t[:, 1] * rows + t[:, 2], t[:, 3] * cols + t[:, 4] * rows + t[:, 5]
    x_max, y_max = tf.cast(width - 1, tf.float32), tf.cast(height - 1, tf.float32)
    in_frame = (x >= 0) & (x <= x_max) & (y >= 0) & (y <= y_max)
    if not bilinear:
        x, y = tf.round(x), tf.round(y)
    x0, y0 = tf.floor(x), tf.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    pixels = tf.reshape(images, [-1, shape[3]])
    first_pixel = (tf.range(n) * height * width)[:, None, None]

    def inside(index, size):  # the pixel an index outside 0..size-1 reads
        if fill != "reflect":
            return tf.clip_by_value(index, 0, size - 1)
        folded = tf.math.floormod(index, 2 * size)
        return tf.where(folded < size, folded, 2 * size - 1 - folded)

    def corner(dx, dy):
        col = tf.cast(inside(x0 + dx, x_max + 1), tf.int32)
        row = tf.cast(inside(y0 + dy, y_max + 1), tf.int32)
        return tf.gather(pixels, first_pixel + row * width + col)

    warped = corner(0, 0)
    if bilinear:
        bottom = corner(0, 1)
        warped += fx * (corner(1, 0) - warped)
        bottom += fx * (corner(1, 1) - bottom)
        warped += fy * (bottom - warped)
    if fill == "constant":
        warped *= tf.cast(in_frame, warped.dtype)[..., None]
    return warped


def _box_masks(shape, top, left, box_height, box_width):
    """(n, h, w, 1) float masks, 1 inside each sample's box (boxes may overhang)."""
    rows = tf.range(shape[1])[None, :, None]
    cols = tf.range(shape[2])[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + box_height)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + box_width)[:, None, None]))
    return tf.cast(inside, tf.float32)[..., None]


def _box_corners(shape, box_height, box_width, u):
    """Top-left corners of boxes whose centres are uniform over the pixels; u: (2, n) uniforms."""
    cy = tf.cast(u[0] * tf.cast(shape[1], tf.float32), tf.int32)
    cx = tf.cast(u[1] * tf.cast(shape[2], tf.float32), tf.int32)
    return cy - box_height // 2, cx - box_width // 2


def cutout(images, side, u):
    """Black out one `side` x `side` square per image; u: (2, n) uniforms for the centres."""
    shape = tf.shape(images)
    sides = tf.fill([shape[0]], side)
    top, left = _box_corners(shape, sides, sides, u)
    return images * (1 - _box_masks(shape, top, left, sides, sides))


def _beta(n, alpha, seed):
    seeds = tf.unstack(tf.random.split(seed, 2))
    a, b = (tf.random.stateless_gamma([n], s, alpha=alpha) for s in seeds)
    return a / (a + b)


@functools.partial(tf.function, jit_compile=True)
def mix(images, labels, mixup_share, cutmix_share, seed):
    """Mix each sample with its neighbour in the batch by mixup or cutmix (or either, at random).

    mixup_share, cutmix_share: (n,) Beta draws, or None for off. Returns
    images and soft labels whose rows sum to 1: each source's label weight is
    its share of the blend (mixup) or of the pixels (cutmix, after clipping).
    """
    shape = tf.shape(images)
    u = _uniforms(3, shape[0], seed)
    partner_images, partner_labels = tf.roll(images, 1, axis=0), tf.roll(labels, 1, axis=0)
    results = []
    if mixup_share is not None:
        lam = mixup_share[:, None]
        results.append((lam[:, :, None, None] * images + (1 - lam[:, :, None, None]) * partner_images,
                        lam * labels + (1 - lam) * partner_labels))
    if cutmix_share is not None:
        cut = tf.sqrt(1 - cutmix_share)
        box_height = tf.cast(cut * tf.cast(shape[1], tf.float32), tf.int32)
        box_width = tf.cast(cut * tf.cast(shape[2], tf.float32), tf.int32)
        masks = _box_masks(shape, *_box_corners(shape, box_height, box_width, u[:2]), box_height, box_width)
        pasted = tf.reduce_mean(masks, axis=[1, 2])
        results.append((images * (1 - masks) + partner_images * masks,
                        (1 - pasted) * labels + pasted * partner_labels))
    if len(results) == 1:
        return results[0]
    use_mixup = u[2] < 0.5
    return (tf.where(use_mixup[:, None, None, None], results[0][0], results[1][0]),
            tf.where(use_mixup[:, None], results[0][1], results[1][1]))
