"""Presets and the augmentation config: one parameter set read by both engines."""

import dataclasses

from kcifar.errors import KcifarError


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Ranges of the random warp, in `ImageDataGenerator`'s terms.

    rotation: degrees, uniform in [-rotation, rotation].
    shift: fraction of the side, uniform in [-shift, shift], when < 1;
        whole pixels, uniform integers in [-shift, shift], when >= 1.
    shear: degrees, uniform in [-shear, shear].
    zoom: x and y scale drawn independently, uniform in [1 - zoom, 1 + zoom].
    hflip: mirror left-right with probability 1/2.
    fill: outside the image, "nearest" (repeat the edge), "constant" (black) or "reflect"
        (mirrored at the edge, the edge pixel repeated: SciPy's and the generator's "reflect").
    interpolation: "bilinear" (the generator's default) or "nearest" (torchvision's default for
        RandomRotation and RandomAffine); "nearest" also rounds a fractional shift to whole
        pixels, as torchvision's RandomAffine rounds its translation.
    """

    rotation: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    hflip: bool = False
    fill: str = "nearest"
    interpolation: str = "bilinear"

    @property
    def warps(self):
        return bool(self.rotation or self.shift or self.shear or self.zoom)

    @property
    def nearest_sampling(self):
        """True when each output pixel reads one input pixel: nearest interpolation, or warps that
        move whole pixels only (integer shifts, mirror), where bilinear reads the same pixels."""
        return self.interpolation == "nearest" or (
            not (self.rotation or self.shear or self.zoom) and (self.shift == 0 or self.shift >= 1))

    @property
    def rounds_shift(self):
        """True when a fractional shift is rounded to whole pixels (torchvision's RandomAffine)."""
        return self.interpolation == "nearest" and 0 < self.shift < 1


PRESETS = {
    "none": Geometry(),
    # S1 only says "ImageDataGenerator"; these ranges are assumed (common CIFAR
    # settings), with the generator's default fill "nearest".
    "idg_s1": Geometry(rotation=15, shift=0.1, zoom=0.1, hflip=True, fill="nearest"),
    # S4's notebook (VGG_Final.ipynb of sozign/cifar10-classification-challenge): RandomRotation(15),
    # RandomAffine(0, translate=(0.1, 0.1)), RandomHorizontalFlip(), torchvision's nearest sampling
    # and black fill. One warp instead of two resamplings gives the same pixels, since the
    # translation is whole pixels. Not torchvision's: the black edge follows SciPy's rule (a point
    # outside the image before rounding), PIL's blacks a half-pixel narrower band.
    "s4": Geometry(rotation=15, shift=0.1, hflip=True, fill="constant", interpolation="nearest"),
    # Standard CIFAR recipe: zero-pad 4, random 32x32 crop = integer shift of
    # -4..4 pixels with black fill, plus horizontal flip.
    "crop_flip": Geometry(shift=4, hflip=True, fill="constant"),
    # airbench94's: pad 2 by reflection, random 32x32 crop (integer shift of -2..2 pixels), flip.
    # Assumed: the generator's reflection, which repeats the edge pixel (PyTorch's does not).
    "crop2_flip": Geometry(shift=2, hflip=True, fill="reflect"),
    "flip": Geometry(hflip=True),  # mirror only (fast94's ablation of the translation)
}
FILLS = ("nearest", "constant", "reflect")
ENGINES = ("tf", "idg")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What to augment with: a preset, an engine and optional extras.

    alternate_flip: instead of the preset's random flip, each image is mirrored on every other
        epoch: at random in the first (a fixed bit per image and seed), the opposite in the next
        (airbench94). Needs a preset with hflip, and epoch-keyed data (``first_epoch``).
    cutout: side in pixels of one square set to black (0 = off); its centre is
        uniform over the image, so it may be partly outside (DeVries & Taylor).
    mixup, cutmix: Beta(alpha, alpha) parameter (0 = off). Each sample is mixed
        with its neighbour in the batch; with both on, each sample picks one
        at random (assumed, as in timm).
    """

    preset: str = "none"
    engine: str = "tf"
    cutout: int = 0
    mixup: float = 0.0
    cutmix: float = 0.0
    alternate_flip: bool = False

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise KcifarError(f"unknown augment preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.engine not in ENGINES:
            raise KcifarError(f"unknown augment engine {self.engine!r}; choose one of {list(ENGINES)}")
        if self.cutout < 0 or self.mixup < 0 or self.cutmix < 0:
            raise KcifarError("augment cutout, mixup and cutmix must be >= 0 (0 = off)")
        if self.alternate_flip and not self.geometry.hflip:
            raise KcifarError(f"augment alternate_flip replaces a preset's random flip; {self.preset!r} has none: "
                              f"choose one with a flip ({', '.join(n for n, g in PRESETS.items() if g.hflip)})")
        if self.cutout != int(self.cutout):
            raise KcifarError(f"augment cutout is a square side in whole pixels, got {self.cutout}")

    @property
    def geometry(self):
        return PRESETS[self.preset]

    @property
    def extras(self):
        return bool(self.cutout or self.mixup or self.cutmix)


def batch_seed(epoch, index):
    """The seed of batch ``index`` of ``epoch`` (ints or tensors): one formula for both engines,
    so a batch's draws depend on (seed, epoch, index) alone."""
    return epoch * 1_000_003 + index


def alternate_flips(indices, epoch, seed):
    """Whether each image (by its index in the training set) is mirrored in ``epoch`` under
    ``alternate_flip``: a fixed pseudo-random bit per (image, seed), flipped every epoch. NumPy
    arrays or int64 tensors alike, so both engines flip the same images."""
    bit = ((indices + seed * 40503) * 2654435761) % 2**32 // 2**31  # Knuth's multiplicative hash, top bit
    return (bit + epoch) % 2 == 1
