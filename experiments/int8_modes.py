"""Where a LiteRT int8 export loses agreement with Keras, and what the 16x8 mode gives instead.

For a run's best.keras: full-integer int8 (what `kcifar.export --int8` writes) and LiteRT's
16x8 mode (int16 activations, int8 weights), both post-training quantised from the same
stratified training-split images, each against the Keras logits on the first `--images`
test images (top-1 agreement, test top-1), its file size and batch-256 images/s run as
`kcifar.deploy` runs a LiteRT export (one thread per core); then LiteRT's
QuantizationDebugger on the int8 model: each quantised tensor's rms error in units of its
quantisation step (uniform rounding alone gives 0.29).

Two ways to narrow the activation ranges, each against the same Keras logits:
``--percentiles``: LiteRT int8 whose activation ranges are cut to that percentile of the
representative images' values (TensorFlow's calibrate-only conversion, the min/max it
recorded replaced, then quantised as the converter does; private TensorFlow API, a
measurement, not what kcifar.export does); and ONNX Runtime's static int8 (QDQ,
per-channel int8 weights, int8 activations) calibrated by min/max and by the 99.999th
percentile (ONNX Runtime quantises convolutions, matmuls and adds; GELU stays float).

    KCIFAR_DATA_DIR=../shared/datasets python experiments/int8_modes.py RUN_DIR [--images 2048] [--percentiles 99.99]
"""

if __name__ == "__main__":
    from kcifar.cli import start_command

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


def percentile_ranges(calibrated: bytes, tensors, representative, percentile: float) -> dict:
    """{tensor index: (low, high)}: the ``percentile`` range of each of ``tensors`` (indices) over
    the representative images, run through the calibrated float model; both sides include 0."""
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    source = interpreter.get_input_details()[0]["index"]
    tails = {index: ([], [], 0) for index in tensors}  # each tensor's most extreme values, and its count
    for start in range(0, len(representative), 50):
        batch = representative[start:start + 50]
        interpreter.resize_tensor_input(source, batch.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source, batch)
        interpreter.invoke()
        for index in tensors:
            flat = interpreter.get_tensor(index).ravel()
            keep = min(flat.size, int(4 * flat.size * (100 - percentile) / 100) + 1000)  # 4x this batch's share
            lows, highs, count = tails[index]
            lows.append(np.partition(flat, keep - 1)[:keep])
            highs.append(np.partition(flat, flat.size - keep)[-keep:])
            tails[index] = (lows, highs, count + flat.size)
    ranges = {}
    for index, (lows, highs, count) in tails.items():
        low, high = np.sort(np.concatenate(lows)), np.sort(np.concatenate(highs))
        cut = min(int(count * (100 - percentile) / 100), len(low) - 1)  # values left outside on each side
        ranges[index] = (min(float(low[cut]), 0.0), max(float(high[-1 - cut]), 0.0))
    return ranges


def litert_int8_at_percentile(saved, representative, percentile) -> bytes:
    """LiteRT int8 as the converter makes it, but with activation ranges cut to ``percentile``."""
    import tensorflow as tf
    from tensorflow.lite.python import convert
    from tensorflow.lite.tools import flatbuffer_utils

    c = converter(saved, representative, "int8")
    c._experimental_calibrate_only = True
    calibrated = c.convert()
    model = flatbuffer_utils.convert_bytearray_to_object(calibrated)
    tensors = model.subgraphs[0].tensors
    ranged = [i for i, t in enumerate(tensors)
              if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1]
    for index, (low, high) in percentile_ranges(calibrated, ranged, representative, percentile).items():
        q = tensors[index].quantization
        q.min, q.max = [max(low, float(q.min[0]))], [min(high, float(q.max[0]))]
    return convert.mlir_quantize(bytes(flatbuffer_utils.convert_object_to_bytearray(model)),
                                 input_data_type=tf.float32, output_data_type=tf.float32)


def onnx_int8(float_onnx: Path, representative, method) -> Path:
    """ONNX Runtime's static int8 of the float ONNX file (QDQ, per-channel), calibrated by
    ``method``; written beside it."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = float_onnx.parent  # ONNX's own shape inference: the symbolic one needs sympy, not in the extra
    quant_pre_process(str(float_onnx), str(folder / "pre.onnx"), skip_symbolic_shape=True)
    name = onnx.load(str(folder / "pre.onnx")).graph.input[0].name

    class Images(CalibrationDataReader):
        def __init__(self):
            self.images = iter(representative)

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {name: image[None]}

    percentile = method == "percentile"
    out = folder / f"int8_{'percentile' if percentile else 'minmax'}.onnx"
    quantize_static(str(folder / "pre.onnx"), str(out), Images(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.Percentile if percentile else CalibrationMethod.MinMax,
                    extra_options={"CalibPercentile": 99.999} if percentile else {})
    return out


def run_onnx(path, x):
    """(logits of ``x``, batch-256 images/s) in ONNX Runtime, as kcifar.deploy runs an ONNX export."""
    from bench_inference import BIG, throughput

    from kcifar import deploy

    run = deploy._onnx_runtime(path)
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
    parser.add_argument("--percentiles", default="99.99", help="comma-separated: LiteRT int8 rows with activation "
                        "ranges cut to these percentiles (empty: none)")
    args = parser.parse_args()
    import keras

    import kcifar.models  # noqa: F401  (registers the zoo's layers)
    from kcifar import deploy, machine, rundir
    from kcifar.data import load_cifar, stratified_subset

    model = deploy.float32_model(keras.models.load_model(f"{args.run_dir}/best.keras", compile=False))
    data = load_cifar(**rundir.data_settings(rundir.read_recipe(args.run_dir)))
    representative = stratified_subset(data.train, args.representative, seed=0).x.astype(np.float32)
    x, y = data.test.x[:args.images].astype(np.float32), data.test.y[:args.images]
    expected = model.predict(x, batch_size=256, verbose=0).argmax(1)
    saved = tempfile.mkdtemp()
    model.export(saved, format="tf_saved_model", verbose=False)
    print("\n".join(machine.provenance()), end="\n\n")
    print(f"Keras test top-1 on the first {len(x):,} test images: {np.mean(expected == y):.2%}\n")
    print("| LiteRT mode | size, MB | top-1 agreement with Keras | test top-1 | batch-256 images/s |")
    print("|---|---:|---:|---:|---:|")
    def row(mode, content_size, logits, speed):
        got = logits.argmax(1)
        print(f"| {mode} | {content_size / 1e6:.2f} | {np.mean(got == expected):.2%} | {np.mean(got == y):.2%} | "
              f"{speed:,.0f} |", flush=True)

    for mode in ("float", *MODES):
        content = converter(saved, representative, mode).convert()
        row(mode, len(content), *run_litert(content, x, tempfile.mkdtemp()))
    for percentile in [float(p) for p in args.percentiles.split(",") if p]:
        content = litert_int8_at_percentile(saved, representative, percentile)
        row(f"int8, ranges at the {percentile:g}th percentile", len(content), *run_litert(content, x, tempfile.mkdtemp()))
    float_onnx = Path(tempfile.mkdtemp()) / "float.onnx"
    deploy.float32_model(model, "onnx").export(str(float_onnx), format="onnx", verbose=False)
    for method in ("min/max", "percentile"):
        path = onnx_int8(float_onnx, representative, method)
        label = "min/max" if method == "min/max" else "99.999th percentile"
        row(f"ONNX Runtime int8 (QDQ), {label}", path.stat().st_size, *run_onnx(path, x))
    row("ONNX Runtime float", float_onnx.stat().st_size, *run_onnx(float_onnx, x))
    worst, count = layer_errors(converter(saved, representative, "int8"), representative)
    print(f"\nint8's {len(worst)} worst of {count} quantised tensors (rms error / quantisation step, 100 images):\n")
    print("| error / step | op | tensor |\n|---:|---|---|")
    for ratio, op, tensor in worst:
        print(f"| {ratio:.3f} | {op} | `{tensor}` |")


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
