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
    fill: "nearest" (repeat the edge) or "constant" (black) outside the image.
    """

    rotation: float = 0.0
    shift: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    hflip: bool = False
    fill: str = "nearest"

    @property
    def warps(self):
        return bool(self.rotation or self.shift or self.shear or self.zoom)

    @property
    def whole_pixels(self):
        """True when every warp moves pixels by whole pixels (integer shifts, mirror): no interpolation."""
        return not (self.rotation or self.shear or self.zoom) and (self.shift == 0 or self.shift >= 1)


PRESETS = {
    "none": Geometry(),
    # S1 only says "ImageDataGenerator"; these ranges are assumed (common CIFAR
    # settings), with the generator's default fill "nearest".
    "idg_s1": Geometry(rotation=15, shift=0.1, zoom=0.1, hflip=True, fill="nearest"),
    # S4 names RandomRotation + RandomAffine + RandomHorizontalFlip without
    # values; assumed: 15 degrees, translate 0.1, scale 0.9..1.1, shear 10
    # degrees, torchvision's default black fill. One warp instead of two
    # resamplings, and x/y scale drawn independently as ImageDataGenerator does.
    "s4": Geometry(rotation=15, shift=0.1, shear=10, zoom=0.1, hflip=True, fill="constant"),
    # Standard CIFAR recipe: zero-pad 4, random 32x32 crop = integer shift of
    # -4..4 pixels with black fill, plus horizontal flip.
    "crop_flip": Geometry(shift=4, hflip=True, fill="constant"),
}
ENGINES = ("tf", "idg")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What to augment with: a preset, an engine and optional extras.

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

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise KcifarError(f"unknown augment preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        if self.engine not in ENGINES:
            raise KcifarError(f"unknown augment engine {self.engine!r}; choose one of {list(ENGINES)}")
        if self.cutout < 0 or self.mixup < 0 or self.cutmix < 0:
            raise KcifarError("augment cutout, mixup and cutmix must be >= 0 (0 = off)")
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
