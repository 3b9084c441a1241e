"""TensorFlow's inter-op threads, default against one: `model.fit` images/s of a zoo model, A/B.

Two kcifar workers of `bench_speed.py` (the recipe's model.fit as kcifar.train runs it), one
started with TF_NUM_INTEROP_THREADS=0 (TensorFlow's default: independent operations side by
side) and one with 1 (one operation at a time, Intel's advice for oneDNN on one socket), take
turns in blocks of `--seconds` for `--rounds` rounds, so the drift of a shared machine touches
both alike; the ratio is taken per round.

    KCIFAR_DATA_DIR=../shared/datasets python experiments/ab_interop.py --models airbench94,vgg16
"""

if __name__ == "__main__":
    from kcifar.cli import start_command

    start_command()

import argparse
import os
import statistics

from bench_speed import Worker, take_turns


def compare(model, precision, rounds, seconds):
    workers = {}
    for threads in ("0", "1"):
        os.environ["TF_NUM_INTEROP_THREADS"] = threads  # the worker process inherits it
        workers[threads] = Worker("kcifar", model, precision)
    return take_turns(workers, rounds, seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="airbench94,vgg16")
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    from kcifar import machine

    print("\n".join(machine.provenance()), end="\n\n")
    print("| model | precision | images/s, inter-op default (0) | images/s, inter-op 1 | 1 / default, per round (median) |")
    print("|---|---|---|---|---|")
    for model in args.models.split(","):
        speeds = compare(model, args.precision, args.rounds, args.seconds)
        ratios = [b / a for a, b in zip(speeds["0"], speeds["1"])]
        print(f"| {model} | {args.precision} | {', '.join(f'{v:,.0f}' for v in speeds['0'])} | "
              f"{', '.join(f'{v:,.0f}' for v in speeds['1'])} | {statistics.median(ratios):.2f} |", flush=True)


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
