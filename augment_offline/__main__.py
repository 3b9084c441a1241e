"""``python -m augment_offline``: write OpenCV-augmented copies of the training split to a directory.

Example (the default op set, 4 copies per image, 2 worker processes)::

    python -m augment_offline --dataset cifar10 --copies 4 --out data/aug4 --seed 0 --workers 2 --preview grid.png

Only the training split is read (the validation split is carved out first,
with ``--val-size`` and ``--split-seed``, which must match the recipe's
``data.val_size`` and ``seed``). Run the same command again to finish a
killed run. Train on it with ``python -m kcifar.train --offline-aug DIR``.
"""

import argparse
import os

from augment_offline.ops import DEFAULT_OPS, OPS, Augmenter, parse_ops
from augment_offline.preview import write_preview
from augment_offline.shards import build
from kcifar import fileio
from kcifar.data import load_cifar
from kcifar import cli as kcli
from kcifar.errors import KcifarError


def parse_args(argv=None):
    ops_help = "; ".join(f"{op.name}{'' if op.name == 'flip' else f':{op.default:g}'} = {op.meaning}"
                         for op in OPS.values())
    parser = argparse.ArgumentParser(prog="python -m augment_offline", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    parser.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    parser.add_argument("--label-mode", default="fine", choices=["fine", "coarse"])
    parser.add_argument("--val-size", type=int, default=5000, help="validation images held out (as the recipe)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the validation split (the recipe's seed)")
    parser.add_argument("--data-dir", help="folder holding the data; unset: $KCIFAR_DATA_DIR, then the Keras cache")
    parser.add_argument("--limit", type=int, default=0, help="augment only the first N training images (trials)")
    parser.add_argument("--copies", type=int, default=4, help="augmented copies per training image")
    parser.add_argument("--ops", default=DEFAULT_OPS, help=f"comma list, name or name:magnitude. {ops_help}")
    parser.add_argument("--prob", type=float, default=0.5, help="chance that each op applies to a copy")
    parser.add_argument("--seed", type=int, default=0, help="augmentation seed")
    parser.add_argument("--originals", action="store_true", help="also store the unchanged images (as copy 0)")
    parser.add_argument("--shard-size", type=int, default=5000, help="images per shard file")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--preview", help="also write a PNG: originals beside their augmented copies")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser.parse_args(argv)


@kcli.command
def main(argv=None):
    args = parse_args(argv)
    ops = parse_ops(args.ops)
    if args.limit < 0:
        raise KcifarError(f"--limit must be >= 0 (0 = all), got {args.limit}")
    fileio.check_writable(args.out, "--out")
    if args.preview:
        fileio.check_writable(os.path.dirname(os.path.abspath(args.preview)), "--preview")
    data = load_cifar(args.dataset, args.data_dir, args.label_mode, args.val_size, args.split_seed)
    x, y = data.train.x, data.train.y
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    source = {"dataset": data.name, "label_mode": data.label_mode, "val_size": args.val_size, "seed": args.split_seed}
    manifest = build(x, y, args.out, ops=ops, copies=args.copies, seed=args.seed, prob=args.prob,
                     originals=args.originals, shard_size=args.shard_size, workers=args.workers, source=source,
                     progress=not args.quiet)
    if args.preview:
        write_preview(args.preview, x, Augmenter(ops, args.prob, args.seed), args.copies)
    print(f"{manifest['count']:,} images in {len(manifest['shards'])} shards: {args.out}")


if __name__ == "__main__":
    main()
