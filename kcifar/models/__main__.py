"""``python -m kcifar.models``: the zoo as a table (parameters and FLOPs per model)."""


from kcifar import cli as kcli
from kcifar.models.registry import FLOPS_COUNTED, table


@kcli.command
def main(argv=None):
    parser = kcli.parser("models", __doc__)
    parser.add_argument("--num-classes", type=int, default=10, help="classifier width")
    args = parser.parse_args(argv)
    rows = table(args.num_classes)
    print(f"{'name':<16} {'source':<16} {'params':>11} {'MFLOPs':>9}  description")
    for row in rows:
        print(f"{row['name']:<16} {row['source']:<16} {row['params']:>11,} {row['mflops']:>9.1f}  {row['description']}")
    print(f"\n{len(rows)} models, {args.num_classes} classes, 32x32x3 input; {FLOPS_COUNTED}.")


if __name__ == "__main__":
    main()
