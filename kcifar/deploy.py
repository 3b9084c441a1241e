"""Exported models: a Keras model written as a SavedModel, ONNX or LiteRT file (float, or
LiteRT int8) with a manifest beside it, and each run back in its own runtime.

Keras 3 does the conversion (``model.export``: TensorFlow's SavedModel writer,
tf2onnx, TensorFlow's LiteRT converter); kcifar adds the manifest, int8's
representative images, a check of every export against the Keras logits
before it is kept, and one way to run each format. It exports the model with
its input normalisation folded into the first convolution where that is exact
(``fold_input_normalization``). An export is a folder::

    OUT/manifest.json                 class names, input contract, source run, sha256 of each file
    OUT/saved_model/ | OUT/model.onnx | OUT/model.tflite

The input contract is the one of ``best.keras``: float32 (N, 32, 32, 3) RGB
pixels on the 0..255 scale, normalised inside the model, any batch size N;
the output is float32 logits (N, classes). Every export computes in float32,
whatever precision the model was trained in (Keras' ONNX export requires it;
the moving statistics of batch norm fold into the convolutions).

int8 (LiteRT only), two post-training quantisations by TensorFlow's converter,
float32 input and output kept either way, so the contract above holds:

- ``full``: full-integer, calibrated on training-split images; only int8 builtin
  ops (``TFLITE_BUILTINS_INT8``), the converter quantises the input and
  dequantises the logits; integer pixels 0..255 quantise exactly (scale 1). The
  fastest, and what integer-only accelerators need; its rounding adds up over the
  layers and flips near-ties.
- ``dynamic``: int8 weights (those of 1,024 values or more: the converter's rule);
  each layer quantises its input per image at run time
  (TensorFlow's dynamic-range quantisation, no calibration) and hands on float32.
  Closer to Keras, slower than ``full``. Measured: ``experiments/results/int8_airbench94.md``.
"""

import importlib.util
import json
import os
import shutil
import secrets
from pathlib import Path

import numpy as np

from kcifar import __version__, fileio
from kcifar.errors import KcifarError

EXTRA = 'pip install -e ".[export]"'
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# format: (Keras' format name, artifact inside OUT, packages to export, packages to run)
FORMATS = {
    "savedmodel": ("tf_saved_model", "saved_model", (), ()),
    "onnx": ("onnx", "model.onnx", (("tf2onnx", "tf2onnx"), ("onnx", "onnx")), (("onnxruntime", "onnxruntime"),)),
    "litert": ("litert", "model.tflite", (), (("ai_edge_litert", "ai-edge-litert"),)),
}
# Float exports must give the Keras logits within this, relative to the largest logit's size
# (max |export - keras| <= FLOAT_TOLERANCE * max(1, max |keras|)): a margin over float32 rounding.
FLOAT_TOLERANCE = 1e-4
CHECK_IMAGES = 256  # random images every float export is checked on before it is kept
REPRESENTATIVE_IMAGES = 500  # training-split images that calibrate int8 (TensorFlow suggests 100-500)
INT8_MODES = ("full", "dynamic")
INPUT_SHAPE = (32, 32, 3)
BATCH = 256


# ---------------------------------------------------------------- what is installed


def require(fmt: str, purpose: str):
    """A one-line error unless the packages to ``purpose`` ("export" or "run") ``fmt`` are installed."""
    if fmt not in FORMATS:
        raise KcifarError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    needed = FORMATS[fmt][2] + FORMATS[fmt][3] if purpose == "export" else FORMATS[fmt][3]
    missing = [package for module, package in needed if importlib.util.find_spec(module) is None]
    if missing:
        raise KcifarError(f"to {purpose} {fmt} models kcifar needs {', '.join(missing)}, which is not installed; "
                          f"install the export extra: {EXTRA}")


def file_hashes(folder: Path, artifact: str) -> dict:
    """{path relative to ``folder``: sha256} of the artifact's files (a SavedModel is a folder)."""
    root = folder / artifact
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return {p.relative_to(folder).as_posix(): fileio.file_sha256(p) for p in files}


# ---------------------------------------------------------------- exporting


def gelu_erf(x):
    """The exact GELU, 0.5 x (1 + erf(x / sqrt 2)). TensorFlow's own computes it with erfc, an
    op tf2onnx copies into the ONNX graph unconverted (ONNX has no Erfc: the file does not load)."""
    import keras

    return 0.5 * x * (1.0 + keras.ops.erf(x * 0.7071067811865476))


def float32_model(model, fmt=None):
    """``model`` computing in float32 (a mixed-precision model is cloned with its weights), its
    ``Normalization`` layers holding their mean and variance as numpy arrays (changed in place:
    the same values, the same results in Keras). For ``fmt="onnx"`` the exact GELU is also
    written with erf (``gelu_erf``; the same function, in ONNX's ops).

    Why the arrays: Keras' Normalization keeps given statistics as eager tensors; a traced
    function captures them as extra inputs, and tf2onnx 1.17 turns those into ONNX graph
    inputs without values (the model then asks for them at run time). Arrays become
    constants of the traced graph, in every format alike.
    """
    import keras

    def exportable(layer):
        config = {**layer.get_config(), "dtype": "float32"}
        if fmt == "onnx" and config.get("activation") == "gelu":
            config["activation"] = gelu_erf
        return layer.__class__.from_config(config)

    if any(layer.dtype_policy.name != "float32" or (fmt == "onnx" and layer.get_config().get("activation") == "gelu")
           for layer in model.layers):
        clone = keras.models.clone_model(model, clone_function=exportable)
        clone.set_weights(model.get_weights())
        model = clone
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization) and not layer.invert and layer.input_mean is not None:
            layer.mean = keras.ops.convert_to_numpy(layer.mean)
            layer.variance = keras.ops.convert_to_numpy(layer.variance)
    model(np.zeros((1, *INPUT_SHAPE), np.float32))  # Keras exports only a model that was called once
    return model


def fold_input_normalization(model):
    """A copy of ``model`` whose input ``Normalization`` is folded into the convolution it feeds, when
    that is exact; otherwise ``model`` itself. The same function: conv((x - m) / s; W, b) =
    conv(x; W / s, b - sum(W m / s)). Exact only when that convolution is the normalisation's one
    consumer and pads nothing ('valid'): 'same' pads the normalised image with zeros, which are the
    mean in pixel space, not zero. Of the zoo, s3_tutorial's first convolution qualifies.

    Only a per-channel (or single) mean and variance fold. Why fold: LiteRT int8 runs the
    normalisation (its SUB and MUL on the full-size image) slowly (measured:
    ``experiments/results/inference_epyc_avx512bf16.md``), and folded, the int8 model takes the
    raw pixels, which its input quantises exactly.
    """
    import keras

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.Normalization) and not layer.invert]
    if len(norms) != 1:
        return model
    norm = norms[0]
    users = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)
             and any(t is norm.output for t in keras.tree.flatten(layer.input))]
    conv = users[0] if len(users) == 1 else None
    if not (isinstance(conv, keras.layers.Conv2D) and conv.padding == "valid" and conv.groups == 1):
        return model
    channels = conv.kernel.shape[2]
    mean, variance = (np.reshape(keras.ops.convert_to_numpy(v), -1) for v in (norm.mean, norm.variance))
    if not {mean.size, variance.size} <= {1, channels}:
        return model
    std = np.maximum(np.sqrt(np.broadcast_to(variance, channels)), keras.backend.epsilon())
    kernel, *bias = conv.get_weights()
    kernel = kernel / std[:, None]
    bias = (bias[0] if bias else 0.0) - np.einsum("hwio,i->o", kernel, np.broadcast_to(mean, channels))

    def clone(layer):
        if layer is norm:
            return keras.layers.Identity(name=layer.name)
        return layer.__class__.from_config({**layer.get_config(), **({"use_bias": True} if layer is conv else {})})

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer is conv:
            folded.get_layer(layer.name).set_weights([kernel, bias.astype(np.float32)])
        elif layer is not norm:
            folded.get_layer(layer.name).set_weights(layer.get_weights())
    folded(np.zeros((1, *INPUT_SHAPE), np.float32))  # Keras exports only a model that was called once
    return folded


def _converter_options(fmt: str, int8_mode=None, representative=None) -> dict:
    """``model.export`` keyword arguments: LiteRT's converter settings (TFLiteConverter attributes)."""
    if fmt != "litert":
        return {}
    import tensorflow as tf

    builtins = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}  # runs in plain LiteRT
    if int8_mode is None:
        return builtins
    if int8_mode == "dynamic":  # no representative data set: weights int8, activations at run time
        return {**builtins, "optimizations": [tf.lite.Optimize.DEFAULT]}

    def images():
        for image in representative:
            yield [image[None].astype(np.float32)]

    return {"optimizations": [tf.lite.Optimize.DEFAULT], "representative_dataset": images,
            "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
            "inference_input_type": tf.float32, "inference_output_type": tf.float32}


def _write_artifact(model, fmt: str, path: Path, int8_mode=None, representative=None):
    """``model.export`` into ``path``; a converter's failure is a one-line error."""
    options = _converter_options(fmt, int8_mode, representative)
    try:
        model.export(str(path), format=FORMATS[fmt][0], verbose=False, **options)
    except Exception as error:  # the converters raise many types
        raise KcifarError(f"the {fmt} converter failed on this model ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    """An exception's first non-empty line, at most 200 characters (the converters' and runtimes'
    messages run to pages)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)[:200]


def _load_fresh(folder: Path, manifest: dict) -> "Exported":
    """The export just written, loaded in its runtime; a runtime refusing it is a one-line error."""
    try:
        return Exported(folder, manifest)
    except Exception as error:  # the runtimes raise many types
        raise KcifarError(f"the {manifest['format']} export of this model does not load in its runtime "
                          f"({_first_line(error)}); nothing was written") from None


def check_float(model, exported) -> dict:
    """Keras' logits against the export's on CHECK_IMAGES seeded random images; error beyond tolerance."""
    x = np.random.default_rng(0).integers(0, 256, (CHECK_IMAGES, *INPUT_SHAPE)).astype(np.float32)
    expected = model.predict(x, batch_size=BATCH, verbose=0)
    worst = float(np.max(np.abs(exported.logits(x) - expected)))
    bound = FLOAT_TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
    if not worst <= bound:
        raise KcifarError(f"the exported model's logits differ from Keras' by up to {worst:.3g} (allowed "
                          f"{bound:.3g}); it was not written. Report this model and format as a bug")
    return {"images": f"{CHECK_IMAGES} random", "max_abs_logit_difference": worst, "tolerance": bound}


def check_int8(model, exported, test) -> dict:
    """Top-1 of Keras and of the int8 export on the test split, and how often they agree."""
    expected = model.predict(test.x, batch_size=BATCH, verbose=0).argmax(axis=1)
    got = exported.logits(test.x).argmax(axis=1)
    keras_top1, int8_top1 = float(np.mean(expected == test.y)), float(np.mean(got == test.y))
    return {"images": f"test split, {len(test.y)}", "top1_agreement": float(np.mean(got == expected)),
            "test_top1_keras": keras_top1, "test_top1_int8": int8_top1, "test_top1_change": int8_top1 - keras_top1}


def _staging(out: Path, overwrite: bool) -> Path:
    """A new hidden folder beside ``out``, renamed to ``out`` once the export is complete."""
    if out.exists() and not overwrite:
        raise KcifarError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not (out / MANIFEST).is_file():
        raise KcifarError(f"{out} exists and is not a kcifar export; --overwrite replaces only an export, "
                          "choose another --out")
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}")
    try:
        tmp.mkdir(parents=True)
    except OSError as error:
        raise KcifarError(f"cannot write {out}: {error.strerror}; choose a writable --out") from None
    return tmp


def _move_into_place(tmp: Path, out: Path):
    """Replace ``out`` (if any) by ``tmp``; the old export is removed only after the new is in place."""
    old = out.with_name(f".{out.name}.old.{secrets.token_hex(4)}") if out.exists() else None
    if old:
        out.rename(old)
    tmp.rename(out)
    if old:
        shutil.rmtree(old)


def export(model, fmt: str, out, class_names, source: dict, int8_data=None, int8_mode="full",
           overwrite=False) -> dict:
    """Write ``model`` as ``fmt`` into the folder ``out`` with its manifest; returns the manifest.

    ``int8_data`` (a ``kcifar.data.CifarData``; LiteRT only) quantises to int8 as ``int8_mode``
    says (one of INT8_MODES; ``full`` is calibrated on REPRESENTATIVE_IMAGES of its training
    split) and measures top-1 on its test split. Nothing is left at ``out`` unless the export
    was checked against the Keras logits.
    """
    require(fmt, "export")
    if int8_data is not None and fmt != "litert":
        raise KcifarError(f"int8 applies to the litert format only, not {fmt}")
    if int8_mode not in INT8_MODES:
        raise KcifarError(f"unknown int8 mode {int8_mode!r}; choose one of: {', '.join(INT8_MODES)}")
    outputs = model.output_shape[-1]
    if outputs != len(class_names):
        raise KcifarError(f"the model has {outputs} outputs but {len(class_names)} class names were given; "
                          "pass the --classes the model was trained on")
    out = Path(out)
    tmp = _staging(out, overwrite)
    try:
        model = float32_model(model, fmt)  # the reference every export is checked against
        artifact = FORMATS[fmt][1]
        mode = int8_mode if int8_data is not None else None
        representative = _representative(int8_data) if mode == "full" else None
        _write_artifact(fold_input_normalization(model), fmt, tmp / artifact, mode, representative)
        manifest = {
            "kcifar_export": MANIFEST_VERSION, "format": fmt, "int8": int8_data is not None, "artifact": artifact,
            "files": file_hashes(tmp, artifact), "class_names": list(class_names),
            "input": {"shape": [None, *INPUT_SHAPE], "dtype": "float32", "layout": "NHWC",
                      "pixels": "RGB on the 0..255 scale, not normalised (the model normalises)"},
            "output": {"shape": [None, outputs], "dtype": "float32", "values": "logits (softmax: probabilities)"},
            "source": source, "versions": versions(),
        }
        exported = _load_fresh(tmp, manifest)
        if mode is None:
            manifest["check"] = check_float(model, exported)
        else:
            manifest["quantization"] = _quantization_record(mode, representative)
            manifest["check"] = check_int8(model, exported, int8_data.test)
        fileio.write_json(tmp / MANIFEST, manifest)
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _representative(data):
    """REPRESENTATIVE_IMAGES of ``data``'s training split (stratified, seed 0): int8's calibration."""
    from kcifar.data import stratified_subset

    return stratified_subset(data.train, min(REPRESENTATIVE_IMAGES, len(data.train)), seed=0).x


def _quantization_record(mode: str, representative) -> dict:
    """The manifest's account of an int8 export."""
    if mode == "full":
        return {"mode": "full", "representative_images": f"{len(representative)} of the training split "
                "(stratified, seed 0)", "internals": "int8",
                "input_output": "float32 (quantised and dequantised inside)"}
    return {"mode": "dynamic", "representative_images": None, "input_output": "float32",
            "internals": "int8 weights (of 1,024 values or more); each layer quantises its input per image "
                         "at run time, float32 between layers"}


def versions() -> dict:
    import keras
    import tensorflow as tf

    found = {"kcifar": __version__, "tensorflow": tf.__version__, "keras": keras.__version__}
    for module in ("tf2onnx", "onnx", "onnxruntime", "ai_edge_litert"):
        if importlib.util.find_spec(module) is not None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                found[module] = version(module.replace("_", "-"))
            except PackageNotFoundError:
                pass
    return found


# ---------------------------------------------------------------- running an export


def manifest_path(path) -> Path | None:
    """The manifest of an export given as its folder or its artifact; None if ``path`` is not one."""
    path = Path(path)
    return next((folder / MANIFEST for folder in (path, path.parent) if (folder / MANIFEST).is_file()), None)


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise KcifarError(f"cannot read {path} ({error}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("kcifar_export") != MANIFEST_VERSION \
            or manifest.get("format") not in FORMATS:
        raise KcifarError(f"{path} is not a kcifar export manifest (version {MANIFEST_VERSION}); export the model again")
    return manifest


def load(path) -> "Exported":
    """The export at ``path`` (its folder or its artifact), checked against its manifest's sha256."""
    found = manifest_path(path)
    if found is None:
        raise KcifarError(f"{path} is not a kcifar export (no {MANIFEST} beside it); export it with kcifar.export")
    manifest = read_manifest(found)
    folder = found.parent
    require(manifest["format"], "run")
    for name, digest in manifest["files"].items():
        if not (folder / name).is_file() or fileio.file_sha256(folder / name) != digest:
            raise KcifarError(f"{folder / name} is missing or differs from its manifest's sha256; export the model again")
    return Exported(folder, manifest)


class Exported:
    """An exported model run by its format's runtime: ``logits(images)`` for (N, 32, 32, 3) pixels."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder, self.manifest = Path(folder), manifest
        self.num_classes = manifest["output"]["shape"][-1]
        path = self.folder / manifest["artifact"]
        self._run = {"savedmodel": _savedmodel, "onnx": _onnx_runtime, "litert": _litert}[manifest["format"]](path)

    def logits(self, images, batch_size=BATCH) -> np.ndarray:
        """float32 logits (N, classes) of uint8 or float images, ``batch_size`` at a time."""
        x = np.asarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != INPUT_SHAPE:
            raise KcifarError(f"images of shape {x.shape} given; the model takes (N, {', '.join(map(str, INPUT_SHAPE))})")
        parts = [self._run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.num_classes), np.float32)


def _savedmodel(path):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # kept: its variables live as long as it does
    return lambda x: loaded.serve(tf.constant(x)).numpy()


def _onnx_runtime(path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _litert(path):
    """LiteRT's interpreter on every CPU core; the input is resized when the batch size changes."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count())
    source, target = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    shape = [None]

    def run(x):
        if shape[0] != x.shape:
            interpreter.resize_tensor_input(source, x.shape)
            interpreter.allocate_tensors()
            shape[0] = x.shape
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        return interpreter.get_tensor(target).copy()

    return run
