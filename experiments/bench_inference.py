"""Inference speed on this CPU: Keras against every kcifar.export format.

For s3_tutorial, resnet20 and vgg16 (random weights: speed does not depend on
them) this times, in one process:

- Keras ``model.predict`` and a direct ``model(x, training=False)`` call;
- the SavedModel (TensorFlow), ONNX (ONNX Runtime), LiteRT float and LiteRT
  int8 exports (``--int8``'s two modes: full integer and dynamic), each run as
  ``kcifar.deploy`` runs them (``kcifar.predict``'s way).

Batch 1: latency p50 and p99 over ``--calls`` calls (after 10 untimed);
batch 256: images/s, median of ``--repeats`` calls (after one untimed).
Every runtime keeps its default threads (LiteRT: one per core). int8 is
calibrated on random images here (speed only; accuracy is kcifar.export's
check on real images). Needs the export extra: ``pip install -e ".[export]"``.

    python experiments/bench_inference.py --out experiments/results/inference_xeon_avx512.md
"""

if __name__ == "__main__":  # TensorFlow's oneDNN switch as kcifar's commands set it, before TensorFlow loads
    from kcifar.cli import start_command

    start_command()

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("s3_tutorial", "resnet20", "vgg16")
EXPORTS = {  # path: (format, int8 mode), exported into the folder path.replace(" ", "_")
    "savedmodel": ("savedmodel", None), "onnx": ("onnx", None), "litert float": ("litert", None),
    "litert int8": ("litert", "full"), "litert int8 dynamic": ("litert", "dynamic")}
PATHS = ("keras predict", "keras model(x)", *EXPORTS)
BIG = 256


def runners(name: str, folder: Path) -> dict:
    """{path: function of a float32 batch -> logits} for zoo model ``name``, exported into ``folder``."""
    import keras

    from kcifar import deploy, models
    from kcifar.data import CifarData, Split

    keras.utils.set_random_seed(0)
    model = models.build(name, num_classes=10)
    rng = np.random.default_rng(0)
    fake = Split(rng.integers(0, 256, (BIG, 32, 32, 3), dtype=np.uint8), np.arange(BIG) % 10)
    data = CifarData("random", "fine", train=fake, val=fake, test=fake, class_names=list(range(10)), source="random")
    names = [str(k) for k in range(10)]
    for path, (fmt, int8_mode) in EXPORTS.items():
        deploy.export(model, fmt, folder / path.replace(" ", "_"), names, {}, int8_data=data if int8_mode else None,
                      int8_mode=int8_mode or "full")
    loaded = {path: deploy.load(folder / path.replace(" ", "_")) for path in EXPORTS}
    return {"keras predict": lambda x: model.predict(x, batch_size=len(x), verbose=0),
            "keras model(x)": lambda x: keras.ops.convert_to_numpy(model(x, training=False)),
            **{path: exported.logits for path, exported in loaded.items()}}


def latency_ms(run, x, calls: int):
    for _ in range(10):
        run(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(x)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def throughput(run, x, repeats: int) -> float:
    run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return len(x) / float(np.median(times))


def measure(name: str, calls: int, repeats: int) -> dict:
    """{path: (p50 ms, p99 ms, images/s at batch 256)}."""
    x = np.random.default_rng(1).integers(0, 256, (BIG, 32, 32, 3)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        results = {}
        for path, run in runners(name, Path(folder)).items():
            results[path] = (*latency_ms(run, x[:1], calls), throughput(run, x, repeats))
            print(f"{name:12} {path:15} p50 {results[path][0]:8.2f} ms  p99 {results[path][1]:8.2f} ms  "
                  f"{results[path][2]:9.1f} images/s", flush=True)
    return results


def table(name: str, results: dict) -> list:
    base, float_speed = results["keras predict"][0], results["litert float"][2]
    rows = [f"### {name}", "", "| path | batch 1 p50 ms | batch 1 p99 ms | batch 1 speed-up vs predict "
            "| batch 256 images/s |", "|---|---:|---:|---:|---:|"]
    for path, (p50, p99, speed) in results.items():
        rows.append(f"| {path} | {p50:.2f} | {p99:.2f} | {base / p50:.1f}x | {speed:,.0f} |")
    fastest = min(EXPORTS, key=lambda path: results[path][0])
    rows += ["", f"Fastest export at batch 1: {fastest}, {base / results[fastest][0]:.1f}x Keras `predict` "
             f"(goal >= 5x); at batch 256 over LiteRT float: LiteRT int8 {results['litert int8'][2] / float_speed:.2f}x "
             f"(goal >= 1.5x), int8 dynamic {results['litert int8 dynamic'][2] / float_speed:.2f}x.", ""]
    return rows



def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="markdown file to write (default: print only)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--calls", type=int, default=200, help="timed batch-1 calls per path")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed batch-256 calls per path (with 5, one slow call moved the median: 2026-12-05)")
    parser.add_argument("--note", default="", help="a line on the conditions, written under the settings")
    args = parser.parse_args()
    from kcifar import deploy
    from kcifar.fileio import check_writable

    if args.out:  # refused before the benchmark's minutes, not after
        check_writable(Path(args.out).parent, "--out")
    from common import publish

    from kcifar.machine import load, provenance

    load_before, head = load(), provenance(cpu_note=f"`uname -m` {platform.machine()}")  # the code that runs
    results = {name: measure(name, args.calls, args.repeats) for name in args.models}

    versions = ", ".join(f"{k} {v}" for k, v in deploy.versions().items())
    report = "\n".join([
        "# Inference speed on this CPU: Keras against the kcifar.export formats", "",
        *head,
        f"- versions: {versions}; TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}",
        f"- settings: batch 1 p50/p99 of {args.calls} calls after 10 untimed; batch 256 median of "
        f"{args.repeats} calls after 1 untimed; random weights and images; default threads",
        f"- load (`uptime`) before: `{load_before}`; after: `{load()}`",
        *([f"- {args.note}"] if args.note else []), "",
        *[row for name, result in results.items() for row in table(name, result)],
    ])
    publish(report, args.out)


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
