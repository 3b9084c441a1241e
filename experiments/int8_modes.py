"""Where a LiteRT int8 export loses agreement with Keras, and what the 16x8 mode gives instead.

For a run's best.keras: full-integer int8 (what `kcifar.export --int8` writes) and LiteRT's
16x8 mode (int16 activations, int8 weights), both post-training quantised from the same
stratified training-split images, each against the Keras logits on the first `--images`
test images (top-1 agreement, test top-1), its file size and batch-256 images/s run as
`kcifar.deploy` runs a LiteRT export (one thread per core); then LiteRT's
QuantizationDebugger on the int8 model: each quantised tensor's rms error in units of its
quantisation step (uniform rounding alone gives 0.29).

    KCIFAR_DATA_DIR=../shared/datasets python experiments/int8_modes.py RUN_DIR [--images 2048]
"""

if __name__ == "__main__":
    from kcifar.errors import start_command

    start_command()

import argparse
import csv
import io
import tempfile
from pathlib import Path

import numpy as np

MODES = {"int8": "TFLITE_BUILTINS_INT8", "16x8": "EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8"}


def converter(saved, representative, mode):
    import tensorflow as tf

    c = tf.lite.TFLiteConverter.from_saved_model(saved)
    if mode != "float":
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = lambda: ([image[None]] for image in representative)
        c.target_spec.supported_ops = [getattr(tf.lite.OpsSet, MODES[mode])]
        c.inference_input_type = c.inference_output_type = tf.float32
    return c


def run_litert(content, x, folder):
    """(logits of ``x``, batch-256 images/s): the file run as kcifar.deploy runs a LiteRT export
    (one thread per core), timed as bench_inference.py times it."""
    from bench_inference import BIG, throughput

    from kcifar import deploy

    path = Path(folder) / "model.tflite"
    path.write_bytes(content)
    run = deploy._litert(path)
    logits = np.concatenate([run(x[start:start + BIG]) for start in range(0, len(x), BIG)])
    return logits, throughput(run, x[:BIG], repeats=3)


def layer_errors(conv, representative, top=8):
    """[(rms error / quantisation step, op, tensor)] of the int8 model's worst tensors."""
    import tensorflow as tf

    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=conv, debug_dataset=lambda: ([image[None]] for image in representative[:100]))
    debugger.run()
    text = io.StringIO()
    debugger.layer_statistics_dump(text)
    text.seek(0)
    rows = [(float(r["mean_squared_error"]) ** 0.5 / float(r["scale"]), r["op_name"], r["tensor_name"].split(";")[0])
            for r in csv.DictReader(text) if float(r["scale"])]
    return sorted(rows, reverse=True)[:top], len(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=2048, help="test images compared (from image 0)")
    parser.add_argument("--representative", type=int, default=500, help="training-split images that calibrate")
    args = parser.parse_args()
    import keras

    import kcifar.models  # noqa: F401  (registers the zoo's layers)
    from kcifar import deploy, machine, run
    from kcifar.data import load_cifar, stratified_subset

    model = deploy.float32_model(keras.models.load_model(f"{args.run_dir}/best.keras", compile=False))
    data = load_cifar(**run.data_settings(run.read_recipe(args.run_dir)))
    representative = stratified_subset(data.train, args.representative, seed=0).x.astype(np.float32)
    x, y = data.test.x[:args.images].astype(np.float32), data.test.y[:args.images]
    expected = model.predict(x, batch_size=256, verbose=0).argmax(1)
    saved = tempfile.mkdtemp()
    model.export(saved, format="tf_saved_model", verbose=False)
    from kcifar.sweep.summary import scrub_paths

    print(f"command: `{scrub_paths(machine.command_line())}`; CPU: {machine.cpu_description()}; "
          f"commit {machine.code_version()}\n")
    print(f"Keras test top-1 on the first {len(x):,} test images: {np.mean(expected == y):.2%}\n")
    print("| LiteRT mode | size, MB | top-1 agreement with Keras | test top-1 | batch-256 images/s |")
    print("|---|---:|---:|---:|---:|")
    for mode in ("float", *MODES):
        content = converter(saved, representative, mode).convert()
        logits, speed = run_litert(content, x, tempfile.mkdtemp())
        got = logits.argmax(1)
        print(f"| {mode} | {len(content) / 1e6:.2f} | {np.mean(got == expected):.2%} | {np.mean(got == y):.2%} | "
              f"{speed:,.0f} |", flush=True)
    worst, count = layer_errors(converter(saved, representative, "int8"), representative)
    print(f"\nint8's {len(worst)} worst of {count} quantised tensors (rms error / quantisation step, 100 images):\n")
    print("| error / step | op | tensor |\n|---:|---|---|")
    for ratio, op, tensor in worst:
        print(f"| {ratio:.3f} | {op} | `{tensor}` |")


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.errors import cli

    cli(main)()
