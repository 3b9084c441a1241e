"""The OpenCV transforms of the offline augmentation and how images are augmented.

S1 step 15 says only that augmented images were made with OpenCV and saved;
the ops, their ranges and the order below are assumed (common CIFAR choices),
and each is a parameter. Each op has one magnitude ``m`` (``name:m`` on the
command line) that bounds the parameters it draws for an image (see ``OPS``).
An image copy applies each listed op with probability ``prob``, in a fixed
order whatever order the ops were listed in: one affine warp for the
geometric ops (flip, then rotate and scale about the image centre, then
shift; bilinear; border reflected as ``cv2.BORDER_REFLECT_101``:
``gfedcb|abcdefgh|gfedcba``), then brightness, contrast, hsv, blur, noise,
cutout. Each photometric step rounds and saturates to uint8. Images are
assumed RGB, as ``kcifar.data`` gives them.

Randomness: copy ``c`` of source image ``i`` draws from a Philox4x64
generator keyed by ``(seed, i * 2**32 + c)``, a counter-based generator made
for independent keyed streams, so an image's result depends on nothing else
(not its shard, the worker, nor the other ops' outcomes). It draws one
uniform per op (the op applies when ``u < prob``), then one per parameter of
every op, applied or not. Noise pixels are a window of a table of 2**20
standard normals made once from ``seed`` (drawing 3,072 normals per image
would cost more than all other ops together); the window starts at a drawn
offset, so within an image the noise is i.i.d. Gaussian, and two images
share a pattern only when their offsets coincide.
"""

import dataclasses
import functools
import math

import cv2
import numpy as np

from kcifar.errors import KcifarError

CUTOUT_FILL = 128  # assumed: mid-grey, close to the CIFAR mean; the documents give no fill
NOISE_TABLE_SIZE = 2**20
IMAGE_SHAPE = (32, 32, 3)
IMAGE_SIZE = 32 * 32 * 3
CHUNK = 256  # images per batch step: float copies stay in the CPU cache
WHOLE_PARAMS = {"cutout.cx", "cutout.cy", "noise.start"}  # floored to whole numbers


@dataclasses.dataclass(frozen=True)
class Op:
    """``ranges(m)`` gives each parameter's [low, high]; a parameter is low + (high - low) * u."""

    name: str
    default: float
    limits: tuple      # (low, high) allowed for the magnitude m
    meaning: str       # what one image draws, in terms of m
    params: tuple      # parameter names, recorded per image
    ranges: object     # m -> ((low, high), ...) per parameter
    geometric: bool = False


OPS = {op.name: op for op in (
    Op("flip", 0.0, (0, 0), "mirror left-right (takes no magnitude)", ("flip",),
       lambda m: ((1, 1),), geometric=True),
    Op("rotate", 15.0, (0, 180), "angle ~ U[-m, m] degrees (counter-clockwise)", ("angle",),
       lambda m: ((-m, m),), geometric=True),
    Op("scale", 0.1, (0, 0.9), "zoom ~ U[1-m, 1+m]", ("zoom",),
       lambda m: ((1 - m, 1 + m),), geometric=True),
    Op("shift", 0.1, (0, 0.5), "dx, dy ~ U[-m, m] x image side", ("dx", "dy"),
       lambda m: ((-m, m), (-m, m)), geometric=True),
    Op("brightness", 32.0, (0, 255), "add ~ U[-m, m] to every pixel (0..255 scale)", ("add",),
       lambda m: ((-m, m),)),
    Op("contrast", 0.2, (0, 1), "x -> mean + c (x - mean), c ~ U[1-m, 1+m], mean over the image", ("factor",),
       lambda m: ((1 - m, 1 + m),)),
    Op("hsv", 0.1, (0, 1), "hue += U[-m, m] x 180 degrees, saturation x U[1-m, 1+m]", ("hue_deg", "saturation"),
       lambda m: ((-180 * m, 180 * m), (1 - m, 1 + m))),
    Op("blur", 1.0, (0.1, 5), "Gaussian blur, sigma ~ U[m/2, m] px, kernel side 2*ceil(2m)+1", ("sigma",),
       lambda m: ((m / 2, m),)),
    Op("noise", 8.0, (0, 128), "add Gaussian noise, sigma ~ U[0, m] (0..255 scale), its pixels read from "
       "the noise table at a drawn whole offset start", ("sigma", "start"),
       lambda m: ((0, m), (0, NOISE_TABLE_SIZE - IMAGE_SIZE + 1))),
    Op("cutout", 8.0, (1, 32), f"m x m square (m whole px) filled with {CUTOUT_FILL}, centre (cx, cy) "
       "a whole pixel uniform over 0..31, clipped at the border", ("cx", "cy"),
       lambda m: ((0, 32), (0, 32))),
)}
DEFAULT_OPS = "flip,rotate,shift,scale,brightness,contrast,hsv,blur,noise,cutout"


def parse_ops(text: str) -> tuple:
    """``"flip,rotate:15"`` -> ``((OPS["flip"], 0.0), (OPS["rotate"], 15.0))``, in the fixed order."""
    chosen = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition(":")
        if name not in OPS:
            raise KcifarError(f"unknown op {name!r}; choose from {', '.join(OPS)}")
        if name in chosen:
            raise KcifarError(f"op {name!r} is listed twice in --ops; list each op once")
        chosen[name] = _magnitude(OPS[name], value)
    if not chosen:
        raise KcifarError("--ops is empty; list at least one op, e.g. --ops flip,rotate:15")
    return tuple((op, chosen[op.name]) for op in OPS.values() if op.name in chosen)


def _magnitude(op: Op, value: str) -> float:
    if not value:
        return op.default
    if op.name == "flip":
        raise KcifarError("flip takes no magnitude; write just 'flip' (--prob sets how often)")
    try:
        m = float(value)
    except ValueError:
        raise KcifarError(f"{op.name}:{value}: the magnitude must be a number") from None
    low, high = op.limits
    if not low <= m <= high or (op.name == "cutout" and m != int(m)):
        raise KcifarError(f"{op.name}:{value} is out of range; {op.name} takes m in [{low}, {high}]: {op.meaning}")
    return m


def param_names(ops) -> list:
    """Column names of the per-image parameter record, e.g. ``rotate.angle``."""
    return [f"{op.name}.{p}" for op, _ in ops for p in op.params]


def param_ranges(ops) -> np.ndarray:
    """(P, 2) float64: each recorded parameter's [low, high]."""
    return np.array([r for op, m in ops for r in op.ranges(m)], dtype=np.float64).reshape(-1, 2)


def image_rng(seed: int, source: int, copy: int, generator=None) -> np.random.Generator:
    """The generator of copy ``copy`` of source image ``source`` (see the module doc).

    Re-keys ``generator`` when one is given: several times cheaper than a new one.
    """
    generator = generator or np.random.Generator(np.random.Philox(0))
    generator.bit_generator.state = {
        "bit_generator": "Philox",
        "state": {"counter": np.zeros(4, np.uint64), "key": np.array([seed, (source << 32) | copy], np.uint64)},
        "buffer": np.zeros(4, np.uint64), "buffer_pos": 4, "has_uint32": 0, "uinteger": 0}
    return generator


@functools.lru_cache(maxsize=4)
def noise_table(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x6E6F697365]).standard_normal(NOISE_TABLE_SIZE, dtype=np.float32)


class Augmenter:
    """One op set at one ``prob`` and ``seed``: draws each image's parameters and applies them.

    Works a batch at a time, op by op (each op on the images it applies to),
    which gives the same images as one image at a time, only faster.
    """

    def __init__(self, ops, prob: float, seed: int):
        self.ops, self.prob, self.seed = ops, prob, seed
        self.slots = [len(op.params) for op, _ in ops]
        ends = np.cumsum(self.slots).tolist()
        self.columns = {op.name: slice(end - len(op.params), end) for (op, _), end in zip(ops, ends)}
        ranges = param_ranges(ops)
        self.low, self.span = ranges[:, 0], ranges[:, 1] - ranges[:, 0]
        self.whole = [i for i, name in enumerate(param_names(ops)) if name in WHOLE_PARAMS]
        self.noise = noise_table(seed) if "noise" in self.columns else None

    def augment(self, images: np.ndarray, sources, copies):
        """Copies of uint8 (n, 32, 32, 3) ``images`` -> (uint8 images, float32 (n, P) record, NaN = not applied)."""
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
            raise KcifarError(f"augment_offline needs uint8 images of shape (n, 32, 32, 3), got {images.dtype} "
                              f"{images.shape}; pass CIFAR images as kcifar.data loads them")
        applied, params = self.draw(np.asarray(sources), np.asarray(copies))
        out = images.copy()
        for start in range(0, len(out), CHUNK):
            part = slice(start, start + CHUNK)
            out[part] = self.apply(out[part], applied[part], params[part])
        record = np.where(np.repeat(applied, self.slots, axis=1), params, np.nan)
        return out, record.astype(np.float32)

    def apply(self, images, applied, params):
        """The drawn ops on a batch of images (changed in place), each op on the rows it applies to."""
        images = _warp(images, applied, params, self)
        for j, (op, m) in enumerate(self.ops):
            rows = np.flatnonzero(applied[:, j])
            if not op.geometric and len(rows):
                images[rows] = PHOTOMETRIC[op.name](images[rows], m, params[rows, self.columns[op.name]], self)
        return images

    def draw(self, sources, copies):
        """(applied bool (n, ops), parameters float64 (n, P)), each row from its image's own generator."""
        draws = np.empty((len(sources), len(self.ops) + len(self.low)))
        generator = np.random.Generator(np.random.Philox(0))
        for row, source, copy in zip(draws, sources.tolist(), copies.tolist()):
            image_rng(self.seed, source, copy, generator).random(out=row)
        params = self.low + self.span * draws[:, len(self.ops):]
        params[:, self.whole] = np.floor(params[:, self.whole])
        return draws[:, :len(self.ops)] < self.prob, params

    def value(self, applied, params, name, index=0, identity=0.0):
        """Parameter ``index`` of op ``name`` per image, ``identity`` where the op is off or not listed."""
        if name not in self.columns:
            return np.full(len(params), identity)
        on = applied[:, [op.name for op, _ in self.ops].index(name)]
        return np.where(on, params[:, self.columns[name]][:, index], identity)


def _warp(images, applied, params, aug):
    """Flip, rotate, scale and shift as one affine warp per image, about the image centre."""
    geometric = [j for j, (op, _) in enumerate(aug.ops) if op.geometric]
    rows = np.flatnonzero(applied[:, geometric].any(axis=1))
    if not len(rows):
        return images
    h, w = IMAGE_SHAPE[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    f = np.where(aug.value(applied, params, "flip") > 0, -1.0, 1.0)
    theta = np.radians(aug.value(applied, params, "rotate"))
    s = aug.value(applied, params, "scale", identity=1.0)
    tx, ty = aug.value(applied, params, "shift", 0) * w, aug.value(applied, params, "shift", 1) * h
    a, b = s * np.cos(theta), s * np.sin(theta)  # as cv2.getRotationMatrix2D
    matrices = np.stack([np.stack([a * f, b, cx + tx - a * f * cx - b * cy], axis=1),
                         np.stack([-b * f, a, cy + ty + b * f * cx - a * cy], axis=1)], axis=1)
    for i in rows.tolist():
        images[i] = cv2.warpAffine(images[i], matrices[i], (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)
    return images


def _flat(images):
    """(k, 32, 32, 3) -> (k, 3072): per-image values then broadcast along one long axis (fast in numpy)."""
    return images.reshape(len(images), -1)


def _column(values):
    return values.astype(np.float32).reshape(-1, 1)


def _to_uint8(values, shape=None):
    """Round and saturate a float32 array (overwritten) to uint8."""
    values = np.clip(np.rint(values, out=values), 0, 255, out=values).astype(np.uint8)
    return values if shape is None else values.reshape(shape)


def _brightness(images, m, values, aug):
    return _to_uint8(_flat(images) + _column(values[:, 0]), images.shape)


def _contrast(images, m, values, aug):
    mean = _column(_flat(images).mean(axis=1))
    out = _flat(images) - mean
    out *= _column(values[:, 0])
    out += mean
    return _to_uint8(out, images.shape)


def _hsv(images, m, values, aug):
    """OpenCV's uint8 HSV: hue 0..179 (2 degrees a step), saturation 0..255."""
    hsv = cv2.cvtColor(images.reshape(-1, 32, 3), cv2.COLOR_RGB2HSV).reshape(images.shape)
    steps = np.rint(values[:, 0] / 2.0).astype(np.int16).reshape(-1, 1, 1)
    hsv[..., 0] = (hsv[..., 0] + steps) % 180
    hsv[..., 1] = _to_uint8(hsv[..., 1].reshape(len(hsv), -1) * _column(values[:, 1]), hsv.shape[:3])
    return cv2.cvtColor(hsv.reshape(-1, 32, 3), cv2.COLOR_HSV2RGB).reshape(images.shape)


def _blur(images, m, values, aug):
    side = 2 * math.ceil(2 * m) + 1
    return np.stack([cv2.GaussianBlur(image, (side, side), sigma, borderType=cv2.BORDER_REFLECT_101)
                     for image, sigma in zip(images, values[:, 0].tolist())])


def _noise(images, m, values, aug):
    noise = np.lib.stride_tricks.sliding_window_view(aug.noise, IMAGE_SIZE)[values[:, 1].astype(np.int64)]
    noise *= _column(values[:, 0])
    noise += _flat(images)
    return _to_uint8(noise, images.shape)


def _cutout(images, m, values, aug):
    """The square is clipped to the image, so near a border less of it shows."""
    side = int(m)
    for image, (cx, cy) in zip(images, values.astype(np.int64).tolist()):
        x0, y0 = cx - side // 2, cy - side // 2
        image[max(y0, 0):max(y0 + side, 0), max(x0, 0):max(x0 + side, 0)] = CUTOUT_FILL
    return images


PHOTOMETRIC = {"brightness": _brightness, "contrast": _contrast, "hsv": _hsv,
               "blur": _blur, "noise": _noise, "cutout": _cutout}
