"""Does TensorFlow's oneDNN (TF_ENABLE_ONEDNN_OPTS) speed kcifar up on this CPU?

Each workload runs in a fresh process (the variable is read when TensorFlow
loads) with TF_ENABLE_ONEDNN_OPTS=0 and =1, in turn (0 1 0 1 ...), and the
best of `--repeats` counts, since other jobs may share the CPU:

- `model.fit` training images/s (Adam, batch 64, random images; warm-up steps
  not timed) for s0_model3, resnet20 and vgg16;
- EfficientNet-Lite0 inference images/s at 224 (the frozen part of
  `kcifar.finetune`'s fast path), batch 64.

    python experiments/bench_onednn.py --out experiments/results/onednn.md
"""

import argparse
import os
import platform
import sys
import time

import numpy as np

from kcifar.cli import run_worker

WORKLOADS = {"s0_model3": 60, "resnet20": 40, "vgg16": 12, "lite0_224_inference": 8}  # timed batches
WARMUP, BATCH = 3, 64


def measure(workload: str) -> float:
    """Images/s of `workload` in this process."""
    import keras

    from kcifar import models
    from kcifar.models.backbones import load_backbone

    steps = WORKLOADS[workload]
    x = np.random.default_rng(0).integers(0, 256, (BATCH * (steps + WARMUP), 32, 32, 3)).astype("float32")
    if workload == "lite0_224_inference":
        model = load_backbone("efficientnet_lite0", (32, 32, 3), 224)
        model.predict(x[:BATCH * WARMUP], batch_size=BATCH, verbose=0)
        start = time.perf_counter()
        model.predict(x[BATCH * WARMUP:], batch_size=BATCH, verbose=0)
        return BATCH * steps / (time.perf_counter() - start)
    y = keras.utils.to_categorical(np.arange(len(x)) % 10, 10)
    model = models.build(workload)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.CategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    model.fit(x[:BATCH * WARMUP], y[:BATCH * WARMUP], batch_size=BATCH, verbose=0)
    start = time.perf_counter()
    model.fit(x[BATCH * WARMUP:], y[BATCH * WARMUP:], batch_size=BATCH, verbose=0)
    return BATCH * steps / (time.perf_counter() - start)


def run_child(workload: str, onednn: str) -> float:
    env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=onednn)
    out = run_worker([sys.executable, __file__, "--child", workload], env,
                     f"{workload} with TF_ENABLE_ONEDNN_OPTS={onednn}")
    return float(out.strip().splitlines()[-1])



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="markdown file to write (default: print only)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.child))
        return
    from common import publish

    from kcifar.machine import load, provenance

    head = provenance(cpu_note=f"`uname -m` {platform.machine()}, no GPU")  # the code that runs
    load_before = load()
    rows = ["| workload | timed batches of 64 | oneDNN off (=0) | oneDNN on (=1) | on / off |", "|---|---:|---:|---:|---:|"]
    for workload, steps in WORKLOADS.items():
        best = {"0": 0.0, "1": 0.0}
        for _ in range(args.repeats):
            for onednn in best:
                best[onednn] = max(best[onednn], run_child(workload, onednn))
        rows.append(f"| {workload} | {steps} | {best['0']:,.1f} | {best['1']:,.1f} | {best['1'] / best['0']:.2f}x |")
        print(rows[-1], flush=True)
    import tensorflow as tf

    report = "\n".join([
        "# TensorFlow oneDNN kernels on this CPU: images/s off and on",
        "",
        *head,
        f"- Load (`uptime`) before: `{load_before}`; after: `{load()}`",
        f"- TensorFlow {tf.__version__}, Python {platform.python_version()}; float32, no XLA; "
        f"best of {args.repeats} fresh processes per cell",
        "",
        *rows,
        "",
    ])
    publish(report, args.out)


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
