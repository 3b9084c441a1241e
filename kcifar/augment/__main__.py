"""``python -m kcifar.augment --preset s4 --out grid.png``: a grid of CIFAR-10 training
images (one per class) beside several augmented draws of each, to look at."""

from pathlib import Path

from kcifar import cli as kcli, fileio
from kcifar.augment import ENGINES, PRESETS, AugmentConfig
from kcifar.errors import KcifarError


@kcli.command
def main(argv=None):
    parser = kcli.parser("augment", __doc__, shared=("data_dir", "seed"))
    parser.add_argument("--preset", default="s4", choices=sorted(PRESETS))
    parser.add_argument("--engine", default="tf", choices=ENGINES)
    parser.add_argument("--cutout", type=int, default=0, help="cutout square side in pixels (0 = off)")
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha (0 = off)")
    parser.add_argument("--cutmix", type=float, default=0.0, help="cutmix Beta alpha (0 = off)")
    parser.add_argument("--images", type=int, default=6, help="rows: one image of each of the first N classes")
    parser.add_argument("--copies", type=int, default=7, help="augmented draws per image")
    parser.add_argument("--out", default="augment_preview.png", help="PNG to write")
    args = parser.parse_args(argv)
    if args.images < 1 or args.copies < 1:
        raise KcifarError(f"--images and --copies must be at least 1, got {args.images} and {args.copies}")
    if Path(args.out).suffix.lower() != ".png" or Path(args.out).is_dir():
        raise KcifarError(f"--out {args.out} is not a .png file name; pass one such as grid.png")
    fileio.check_writable(Path(args.out).parent, "--out")
    cfg = AugmentConfig(preset=args.preset, engine=args.engine, cutout=args.cutout, mixup=args.mixup,
                        cutmix=args.cutmix)

    from kcifar.augment.preview import one_per_class, preview
    from kcifar.data import load_cifar

    data = load_cifar("cifar10", data_dir=args.data_dir, val_size=0)
    chosen = one_per_class(data.train.y, args.images)
    path = preview(data.train.x[chosen], data.train.y[chosen], data.class_names, cfg, args.out,
                   copies=args.copies, seed=args.seed or 0)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
