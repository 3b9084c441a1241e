"""How fast is online augmentation on this machine, and does it slow training down?

1. Pipeline: images/s that `train_dataset` delivers for every preset on both
   engines (and one config with cutout + mixup + cutmix), consumed the way
   `model.fit` consumes it: the tf engine's `tf.data.Dataset` directly, the idg
   engine's `PyDataset` through Keras' own adapter (the `tf.data` wrapper fit
   uses), with each worker setting: 1 (fit's generator thread), 2 threads,
   2 processes. tf / idg compares with the fastest idg setting. The first
   epoch (XLA compilation, worker start) is not timed; the fastest of the
   next 3 counts, since other jobs share the CPU.
2. Training: `model.fit` images/s for `s0_model3` and `vgg16` without
   augmentation (preset none) and with preset s4 on each engine (idg: default
   1 worker, and 2 processes). One model per network; the four configs take
   turns in short blocks of steps (A B C D A B C D ..., `--rounds` blocks
   each, first steps of each block untimed), so that the speed of this
   shared machine, which drifts by 10-20 % over minutes, affects all alike;
   the ratio to no augmentation is taken per round. Compiled like
   `kcifar.train` on a CPU machine: Adam, one-hot
   CategoricalCrossentropy(from_logits=True), no XLA for the model.

Targets (issue 5): tf engine >= 10x idg per preset; fit with tf augmentation
>= 95 % of fit without.

    KCIFAR_DATA_DIR=FOLDER python experiments/bench_augment.py --out experiments/results/bench_augment.md
"""

import argparse
import dataclasses
import os
import platform
import time

from kcifar.cli import start_command

start_command()  # kcifar's TensorFlow defaults (oneDNN on), set before TensorFlow loads

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import tensorflow as tf  # noqa: E402
from common import StepClock, publish  # noqa: E402
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter  # noqa: E402

from kcifar import models  # noqa: E402
from kcifar.augment import PRESETS, AugmentConfig, IdgDataset, train_dataset  # noqa: E402
from kcifar.data import load_cifar  # noqa: E402
from kcifar.machine import load, provenance  # noqa: E402

BATCH = 64
EXTRAS = dict(cutout=16, mixup=0.2, cutmix=1.0)
PIPELINE_EPOCHS = 3  # best of: other jobs share the CPU
SKIP_STEPS = 2  # untimed steps at the start of every fit call (iterator and worker start)


IDG_WORKERS = {"1 worker": dict(workers=1), "2 threads": dict(workers=2),
               "2 processes": dict(workers=2, use_multiprocessing=True)}


def pipeline_rate(x, y, cfg, **workers):
    """Images/s of the fastest of PIPELINE_EPOCHS epochs over x, after one untimed epoch."""
    ds = train_dataset(x, y, 10, BATCH, cfg, seed=0, **workers)
    if isinstance(ds, IdgDataset):
        adapter = PyDatasetAdapter(ds)

        def epoch():
            adapter.on_epoch_begin()
            count = sum(len(images) for images, _ in adapter.get_tf_dataset())
            adapter.on_epoch_end()
            return count
    else:
        def epoch():
            return sum(len(images) for images, _ in ds)
    epoch()
    rates = []
    for _ in range(PIPELINE_EPOCHS):
        start = time.perf_counter()
        rates.append(epoch() / (time.perf_counter() - start))
    return max(rates)


def pipeline_table(x_tf, x_idg, y_tf, y_idg):
    configs = [AugmentConfig(preset=p) for p in PRESETS] + [AugmentConfig(preset="s4", **EXTRAS)]
    rows = ["| preset | tf engine | idg, " + " | idg, ".join(IDG_WORKERS) + " | tf / fastest idg |",
            "|---|---:|" + "---:|" * len(IDG_WORKERS) + "---:|"]
    for cfg in configs:
        tf_rate = pipeline_rate(x_tf, y_tf, cfg)
        idg_rates = [pipeline_rate(x_idg, y_idg, dataclasses.replace(cfg, engine="idg"), **workers)
                     if not (cfg.extras and workers.get("use_multiprocessing")) else None
                     for workers in IDG_WORKERS.values()]
        name = cfg.preset + (" + cutout 16, mixup 0.2, cutmix 1.0" if cfg.extras else "")
        cells = " | ".join(f"{rate:,.0f}" if rate else "n/a (TF ops)" for rate in idg_rates)
        rows.append(f"| {name} | {tf_rate:,.0f} | {cells} | {tf_rate / max(r for r in idg_rates if r):.1f}x |")
        print(rows[-1], flush=True)
    return rows


def step_time(model, data, steps):
    """Mean seconds per training step of one `fit` call, after SKIP_STEPS untimed steps."""
    clock = StepClock()
    model.fit(data, steps_per_epoch=steps + SKIP_STEPS, epochs=1, verbose=0, callbacks=[clock])
    return (clock.times[-1] - clock.times[SKIP_STEPS - 1]) / steps


def fit_rates(name, x, y, configs, block_steps, rounds):
    """Per config, the training step times of `rounds` blocks of `block_steps`
    steps, the configs taking turns on one model (A B C D A B C D ...)."""
    keras.utils.set_random_seed(0)
    model = models.build(name)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")], jit_compile=False)
    data = {label: train_dataset(x, y, 10, BATCH, cfg, seed=0, **workers)
            for label, (cfg, workers) in configs.items()}
    for label in configs:  # tracing, XLA compilation, first worker start: not timed
        step_time(model, data[label], 1)
    times = {label: [] for label in configs}
    for _ in range(rounds):
        for label in configs:
            times[label].append(step_time(model, data[label], block_steps))
    return {label: np.array(t) for label, t in times.items()}


def fit_table(x, y, model_steps, rounds):
    idg = AugmentConfig(preset="s4", engine="idg")
    configs = {"none": (AugmentConfig(), {}), "s4 tf": (AugmentConfig(preset="s4"), {}),
               "s4 idg": (idg, {}), "s4 idg 2 processes": (idg, IDG_WORKERS["2 processes"])}
    rows = ["| model | rounds x steps | no augmentation | s4, tf engine | s4, idg 1 worker | s4, idg 2 processes |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, block_steps in model_steps.items():
        n = BATCH * (block_steps + SKIP_STEPS) * 4  # every fit call starts a new, reshuffled epoch of these
        times = fit_rates(name, x[:n], y[:n], configs, block_steps, rounds)
        base = times["none"]

        def cell(label):
            ratio = base / times[label]  # per round: speed with augmentation / without
            return (f"{BATCH / np.median(times[label]):,.1f} ({np.median(ratio):.0%}; "
                    f"{ratio.min():.0%}-{ratio.max():.0%})")
        rows.append(f"| {name} | {rounds} x {block_steps} | {BATCH / np.median(base):,.1f} | "
                    + " | ".join(cell(label) for label in list(configs)[1:]) + " |")
        print(rows[-1], flush=True)
    return rows



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="markdown file to write (default: print only)")
    parser.add_argument("--tf-images", type=int, default=12800, help="images per timed tf-engine epoch")
    parser.add_argument("--idg-images", type=int, default=3200, help="images per timed idg-engine epoch")
    parser.add_argument("--s0-steps", type=int, default=20, help="timed steps per block, s0_model3")
    parser.add_argument("--vgg-steps", type=int, default=8, help="timed steps per block, vgg16")
    parser.add_argument("--rounds", type=int, default=8, help="blocks per config, taken in turn")
    parser.add_argument("--skip-fit", action="store_true")
    args = parser.parse_args()

    head = provenance(cpu_note=f"`uname -m` {platform.machine()}, no GPU")  # the code that runs
    load_before = load()
    data = load_cifar("cifar10", val_size=5000)
    x, y = data.train.x, data.train.y
    print("pipeline", flush=True)
    pipeline = pipeline_table(x[:args.tf_images], x[:args.idg_images], y[:args.tf_images], y[:args.idg_images])
    fit = []
    if not args.skip_fit:
        print("fit", flush=True)
        fit = fit_table(x, y, {"s0_model3": args.s0_steps, "vgg16": args.vgg_steps}, args.rounds)
    load_after = load()
    report = "\n".join([
        "# Online augmentation speed: tf engine vs ImageDataGenerator engine",
        "",
        *head,
        "- run from the repository root, with KCIFAR_DATA_DIR pointing at the CIFAR-10 folder",
        f"- Load (`uptime`) before: `{load_before}`",
        f"- Load (`uptime`) after: `{load_after}`",
        f"- oneDNN: TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')} (kcifar's default: 1)",
        f"- Versions: TensorFlow {tf.__version__}, Keras {keras.__version__}, SciPy {scipy.__version__}, "
        f"NumPy {np.__version__}, Python {platform.python_version()}",
        f"- Batch {BATCH}; CIFAR-10 training images (first N of the 45,000 left after a 5,000 validation split).",
        "",
        f"## Pipeline images/s (tf: {args.tf_images} images per epoch; idg: {args.idg_images}; "
        f"fastest of {PIPELINE_EPOCHS} epochs)",
        "",
        "idg worker settings are Keras PyDataset workers; processes cannot run the extras (TF ops after fork).",
        "",
        *pipeline,
        "",
        *(["## model.fit training images/s (median over rounds; in brackets: speed with augmentation / without, "
            "median and range of the per-round ratios)", "", *fit, ""]
          if fit else []),
    ])
    publish(report, args.out)


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
