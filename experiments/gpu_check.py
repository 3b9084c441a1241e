"""Train on this machine's GPUs with kcifar's GPU defaults and in float32: the check for the day
a machine with NVIDIA GPUs is at hand (no machine of ours has one; tests/test_gpu_path.py runs the
same configuration on the CPU, on tiny data).

Each recipe (default: the fast recipe fast94_muon and S4's VGG16) trains one epoch of
``kcifar.train`` on the real CIFAR-10 ($KCIFAR_DATA_DIR), in a worker process per run: with the
GPU defaults (``train.precision``, ``train.jit`` and ``train.strategy`` "auto": mixed float16, XLA
on one GPU, MirroredStrategy without XLA over several), then the same in float32. The report
gives the devices and the TensorFlow build, and for each run: images/s after the first call of
the training step, that first call's seconds (tracing and XLA compilation), the epoch's training
seconds and the test accuracy, under the provenance lines of every results file.

    python experiments/gpu_check.py --out experiments/results/gpu_<device>.md

Without a GPU it stops at once with one line.
"""

if __name__ == "__main__":
    from kcifar.cli import start_command

    start_command()  # kcifar's TensorFlow defaults, before TensorFlow loads

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import keras
import tensorflow as tf
from common import StepClock, publish

from kcifar.cli import run_worker
from kcifar.errors import KcifarError

RECIPES = ("experiments/recipes/fast94_muon.toml", "experiments/recipes/s4_vgg16_final.toml")
PRECISIONS = ("auto", "float32")  # train.precision: the GPU default (mixed_float16), then float32


# ------------------------------------------------------------ the worker: one epoch of kcifar.train


def train_one_epoch(recipe_path: str, precision: str, runs_dir: str, train_subset: str):
    """One epoch of the recipe through ``kcifar.train.train``, timed by ``StepClock``; prints its facts as JSON."""
    from kcifar import callbacks as kcallbacks, recipe as krecipe
    from kcifar.train import train

    recipe = krecipe.resolve(recipe_path, ["train.epochs=1", f"train.precision='{precision}'", "train.jit='auto'",
                                           "train.strategy='auto'", f"data.train_subset={train_subset}",
                                           f"name='{Path(recipe_path).stem}_{precision}'"])
    clock, make_callbacks = StepClock(), kcallbacks.make_callbacks
    kcallbacks.make_callbacks = lambda *args, **kwargs: [*make_callbacks(*args, **kwargs), clock]  # kcifar's, timed
    result = train(recipe, runs_dir, verbose=0)
    batch, steady_steps = recipe["train"]["batch_size"], clock.steps - clock.first_steps
    print(json.dumps({
        "recipe": Path(recipe_path).stem, "precision": keras.mixed_precision.global_policy().name,
        "jit": bool(result.model.jit_compile), "replicas": result.model.distribute_strategy.num_replicas_in_sync,
        "batch": batch, "steps": clock.steps, "first_call_s": clock.first - clock.start,
        "images_per_s": steady_steps * batch / (clock.end - clock.first) if steady_steps else None,
        "training_s": clock.end - clock.start, "top1": result.metrics["test"]["top1"], "tta": result.metrics["tta"]}))


# ------------------------------------------------------------ the report


def require_gpu():
    """Stop with one line on a machine where TensorFlow sees no GPU."""
    if not tf.config.list_physical_devices("GPU"):
        build = "built with CUDA" if tf.test.is_built_with_cuda() else "a build without CUDA"
        raise KcifarError(f"no GPU: TensorFlow {tf.__version__} ({build}) sees none; run this on a machine with an "
                          "NVIDIA GPU and kcifar installed with its gpu extra (pip install -e \".[gpu]\")")


def device_lines() -> list:
    """The GPUs as TensorFlow sees them, its build, and nvidia-smi's view where it is installed."""
    build = tf.sysconfig.get_build_info()
    lines = [f"- TensorFlow {tf.__version__} (CUDA {build.get('cuda_version', '?')}, cuDNN "
             f"{build.get('cudnn_version', '?')}), Keras {keras.__version__}"]
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        lines.append(f"- {gpu.name}: {details.get('device_name', '?')}, compute capability "
                     f"{'.'.join(map(str, details.get('compute_capability', ('?',))))}")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        lines += [f"- nvidia-smi: {line}" for line in smi.splitlines()]
    return lines


def table(results: list) -> list:
    rows = ["| recipe | precision | XLA | replicas | batch | images/s | first call (s) | training (s) | test top-1 |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        speed = f"{r['images_per_s']:,.0f}" if r["images_per_s"] else "n/a (one call)"
        rows.append(f"| {r['recipe']} | {r['precision']} | {'on' if r['jit'] else 'off'} | {r['replicas']} | {r['batch']} "
                    f"| {speed} | {r['first_call_s']:.1f} | {r['training_s']:.1f} | {r['top1']:.4f}"
                    + (f" (TTA {r['tta']})" if r["tta"] != "none" else "") + " |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="recipe files (default: %(default)s)")
    parser.add_argument("--train-subset", type=int, default=0, help="training images per epoch (0: the whole split)")
    parser.add_argument("--out", help="markdown file to write (default: print only)")
    parser.add_argument("--note", default="", help="a line on the conditions, added to the CPU line")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return train_one_epoch(*args.worker)
    if args.out:  # refused before the minutes of training, not after
        from kcifar.fileio import check_writable

        check_writable(Path(args.out).parent, "--out")
    require_gpu()
    from kcifar import machine, recipe as krecipe

    for path in args.recipes:  # a missing or bad recipe is refused now, not in a worker
        krecipe.resolve(path)
    head = machine.provenance(cpu_note=args.note)  # the code that runs
    results = []
    with tempfile.TemporaryDirectory() as runs_dir:
        for path in args.recipes:
            for precision in PRECISIONS:
                out = run_worker([sys.executable, __file__, "--worker", path, precision, runs_dir,
                                  str(args.train_subset)], None, f"one epoch of {path} ({precision})")
                results.append(json.loads(out.strip().splitlines()[-1]))
                print(table(results)[-1], file=sys.stderr, flush=True)
    report = "\n".join([
        "# kcifar on this machine's GPUs: the GPU defaults against float32, one epoch each", "",
        *head, *device_lines(),
        f"- runs: one epoch of `kcifar.train` per recipe on CIFAR-10 "
        f"({f'{args.train_subset:,} training images' if args.train_subset else 'the whole training split'}); "
        "train.precision, jit and strategy 'auto' (the GPU defaults), then train.precision='float32'", "",
        "images/s: training images per second after the first call of the training step; first call: its "
        "seconds from the epoch's start (tracing, XLA compilation, its first steps); training: the epoch without "
        "validation; test top-1: the kept model on the test split, once.", "",
        *table(results), ""])
    publish(report, args.out)


if __name__ == "__main__":  # a bad input, or no GPU, is one line, not a traceback
    from kcifar.cli import command

    command(main)()
