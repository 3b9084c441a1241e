"""kcifar.export: every format run back in its runtime against the Keras logits, predict from
each, int8 on a briefly trained model, and bad input.

A ResNet-20 (FusedBatchNorm, Normalization, residual adds) with random weights and random
batch-norm statistics is exported once per format for the module; the statistics are set
so that folding batch norm into the convolutions matters."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import one_line_error
from test_predict import write_photo

from kcifar import deploy, export, fileio, models, predict, rundir
from kcifar.data import CIFAR10_CLASSES, load_cifar
from kcifar.errors import KcifarError

FLOAT_FORMATS = ["savedmodel", "onnx", "litert"]
TEST_TOP1 = 0.4321  # the fake run's metrics.json


def fake_run(run_dir: Path, model) -> Path:
    """A finished run directory as kcifar.train leaves it, around ``model``."""
    run_dir.mkdir(parents=True)
    model.save(run_dir / "best.keras")
    (run_dir / "recipe.toml").write_text(f'name = "{run_dir.name}"\ndataset = "cifar10"\nseed = 0\n'
                                         '[data]\nval_size = 5000\nlabel_mode = "fine"\n')
    rundir.write_class_names(run_dir, CIFAR10_CLASSES)
    (run_dir / "metrics.json").write_text(json.dumps({"run": run_dir.name, "dataset": "cifar10", "finished": True,
                                                      "test": {"top1": TEST_TOP1}, "test_exact": None}))
    return run_dir


def resnet20():
    keras.utils.set_random_seed(1)
    model = models.build("resnet20", num_classes=10)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, channels).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 3, channels).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.2, channels).astype("float32"))
    return model


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("runs") / "resnet20_run", resnet20())


@pytest.fixture(scope="module")
def exports(bn_run, tmp_path_factory):
    """{format: export folder} of the ResNet-20 run, written by the command."""
    out = tmp_path_factory.mktemp("exports")
    for fmt in FLOAT_FORMATS:
        export.main([str(bn_run), "--format", fmt, "--out", str(out / fmt)])
    return {fmt: out / fmt for fmt in FLOAT_FORMATS}


@pytest.fixture(scope="module")
def bn_model(bn_run):
    return models.load(bn_run / "best.keras")


def max_logit_error(exported, expected, images) -> float:
    """max |export - Keras| over the logits, relative to the tolerance's scale."""
    return float(np.max(np.abs(exported.logits(images) - expected))) / max(1.0, float(np.max(np.abs(expected))))


@pytest.mark.parametrize("fmt", FLOAT_FORMATS)
def test_float_export_writes_its_manifest_and_matches_keras(exports, bn_run, bn_model, fmt):
    folder = exports[fmt]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == fmt and manifest["int8"] is False
    assert manifest["class_names"] == CIFAR10_CLASSES
    assert manifest["input"]["shape"] == [None, 32, 32, 3] and manifest["input"]["dtype"] == "float32"
    assert manifest["source"]["run"] == "resnet20_run" and manifest["source"]["test_top1"] == TEST_TOP1
    assert manifest["source"]["sha256"] == fileio.file_sha256(bn_run / "best.keras")
    assert manifest["versions"]["kcifar"] and manifest["files"]
    assert all(fileio.file_sha256(folder / name) == digest for name, digest in manifest["files"].items())
    assert manifest["check"]["max_abs_logit_difference"] <= manifest["check"]["tolerance"]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # no staging left
    exported = deploy.load(folder)
    images = np.random.default_rng(5).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    assert max_logit_error(exported, bn_model.predict(images, verbose=0), images) <= deploy.FLOAT_TOLERANCE
    # a dynamic batch: one image, then a batch of another size, give the same rows
    one, rest = exported.logits(images[:1]), exported.logits(images[1:])
    np.testing.assert_allclose(np.concatenate([one, rest]), exported.logits(images), rtol=0, atol=1e-4)


def test_float_exports_match_keras_on_256_real_test_images(exports, bn_model, real_cifar10):
    images = real_cifar10.test.x[:256]
    expected = bn_model.predict(images, verbose=0)
    errors = {fmt: max_logit_error(deploy.load(folder), expected, images) for fmt, folder in exports.items()}
    assert max(errors.values()) <= deploy.FLOAT_TOLERANCE, errors


def test_predict_gives_the_same_top_k_from_every_export(exports, bn_run, tmp_path, capsys):
    photos = [str(write_photo(tmp_path / f"p{k}.png", k, size=(40 + k, 50))) for k in range(4)]

    def top_k(model):
        predict.main([str(model), *photos, "--top-k", "3", "--json"])
        return [p["top"] for p in json.loads(capsys.readouterr().out)["predictions"]]

    expected = top_k(bn_run / "best.keras")
    for fmt, folder in exports.items():
        path = folder / deploy.FORMATS[fmt][1] if fmt == "onnx" else folder  # the model inside, or its folder
        got = top_k(path)
        assert [[t["class"] for t in row] for row in got] == [[t["class"] for t in row] for row in expected], fmt
        np.testing.assert_allclose([[t["probability"] for t in row] for row in got],
                                   [[t["probability"] for t in row] for row in expected], atol=1e-5)


def test_mixed_precision_model_exports_in_float32(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = models.build("s3_tutorial", num_classes=10, batch_norm=True)  # BN under bfloat16
    keras.mixed_precision.set_global_policy("float32")
    clone = deploy.float32_model(model)
    assert {layer.dtype_policy.name for layer in clone.layers} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(clone.get_weights(), model.get_weights()))
    manifest = deploy.export(model, "onnx", tmp_path / "onnx", CIFAR10_CLASSES, {})
    assert manifest["check"]["max_abs_logit_difference"] <= manifest["check"]["tolerance"]


def test_input_normalization_folds_into_the_valid_convolution_after_it(tmp_path):
    """s3_tutorial's first convolution pads nothing: the export folds the Normalization into it
    (the same logits, no normalisation left in the LiteRT file, the model itself untouched);
    ResNet-20's first convolution pads ('same'): nothing is folded."""
    from ai_edge_litert.interpreter import Interpreter

    keras.utils.set_random_seed(0)
    model = models.build("s3_tutorial", num_classes=10)
    weights = model.get_weights()
    folded = deploy.fold_input_normalization(model)
    assert [type(layer) for layer in folded.layers if isinstance(layer, keras.layers.Normalization)] == []
    images = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(folded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=0, atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), weights))
    deploy.export(model, "litert", tmp_path / "litert", CIFAR10_CLASSES, {})
    names = [t["name"] for t in Interpreter(model_path=str(tmp_path / "litert" / "model.tflite")).get_tensor_details()]
    assert any("block1_conv1" in name for name in names) and not any("normalize" in name for name in names)
    same_padded = resnet20()
    assert deploy.fold_input_normalization(same_padded) is same_padded
    sequential = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Normalization(mean=[120, 110, 100],
                                   variance=[3000, 2500, 2800]), keras.layers.Conv2D(4, 3, use_bias=False),
                                   keras.layers.Flatten(), keras.layers.Dense(10)])  # a user's model, no bias to fold into
    folded = deploy.fold_input_normalization(sequential)
    assert [type(layer) for layer in folded.layers if isinstance(layer, keras.layers.Normalization)] == []
    np.testing.assert_allclose(folded.predict(images, verbose=0), sequential.predict(images, verbose=0), rtol=0, atol=1e-5)
    per_pixel = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Normalization(
        axis=(1, 2, 3), mean=np.full((32, 32, 3), 120.0), variance=np.full((32, 32, 3), 3000.0)), keras.layers.Conv2D(4, 3)])
    assert deploy.fold_input_normalization(per_pixel) is per_pixel  # a mean per pixel does not fold into a kernel


def test_exact_gelu_exports_to_onnx(tmp_path):
    """TensorFlow computes the exact GELU with erfc, which tf2onnx leaves unconverted (the file
    then does not load in ONNX Runtime); the export writes it with erf instead."""
    keras.utils.set_random_seed(0)
    model = models.build("airbench94", num_classes=10, widths=(8, 16, 16))  # exact GELU by default
    assert any(layer.get_config().get("activation") == "gelu" for layer in model.layers)
    manifest = deploy.export(model, "onnx", tmp_path / "onnx", CIFAR10_CLASSES, {})
    assert manifest["check"]["max_abs_logit_difference"] <= manifest["check"]["tolerance"]


def test_an_export_its_runtime_refuses_is_one_line_and_not_kept(tmp_path, monkeypatch):
    def refuses(path):
        raise RuntimeError("INVALID_GRAPH : No Op registered for Frobnicate\n  at node 7")

    monkeypatch.setattr(deploy, "_savedmodel", refuses)
    with pytest.raises(KcifarError, match=r"savedmodel export of this model does not load in its runtime "
                                          r"\(INVALID_GRAPH : No Op registered for Frobnicate\); nothing was written"):
        deploy.export(models.build("s3_tutorial", num_classes=10), "savedmodel", tmp_path / "sm", CIFAR10_CLASSES, {})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------ int8


def briefly_trained_s3(data, steps=400, batch=64):
    """S3's tutorial network after ``steps`` Adam steps on real training images (~45 % test top-1, ~10 s)."""
    keras.utils.set_random_seed(0)
    model = models.build("s3_tutorial", num_classes=10)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    n = steps * batch
    model.fit(data.train.x[:n], data.train.y[:n], batch_size=batch, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def s3_run(real_cifar10_dir, tmp_path_factory):
    data = load_cifar("cifar10", data_dir=real_cifar10_dir)
    return data, fake_run(tmp_path_factory.mktemp("runs") / "s3_run", briefly_trained_s3(data))


def clear_and_agreeing(model, exported, images):
    """Per image: does Keras' top-1 lead by 10 points of probability or more; does the export agree."""
    expected, got = model.predict(images, verbose=0), exported.logits(images)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(expected))
    second, first = np.sort(probabilities, axis=1)[:, -2:].T
    return first - second >= 0.1, expected.argmax(1) == got.argmax(1)


def int8_tensors(tflite_file) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    tensors = Interpreter(model_path=str(tflite_file)).get_tensor_details()
    return {kind: sum(t["dtype"] == kind for t in tensors) for kind in (np.int8, np.float32)}


def test_int8_litert_agrees_with_keras_on_real_test_images(real_cifar10_dir, s3_run, tmp_path):
    data, run_dir = s3_run
    export.main([str(run_dir), "--format", "litert", "--int8", "--out", str(tmp_path / "int8"),
                 "--data-dir", str(real_cifar10_dir)])
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    check = manifest["check"]
    assert manifest["int8"] and manifest["quantization"]["mode"] == "full"
    assert "500 of the training split" in manifest["quantization"]["representative_images"]
    assert check["images"] == "test split, 10000" and check["test_top1_keras"] > 0.35  # it learnt something
    assert abs(check["test_top1_change"]) <= 0.01
    assert check["top1_agreement"] >= 0.97  # measured 0.978: the disagreements are near-ties, see below

    model = models.load(run_dir / "best.keras")
    clear, agree = clear_and_agreeing(model, deploy.load(tmp_path / "int8"), data.test.x[:256])
    assert agree.mean() >= 0.97 and agree[clear].mean() >= 0.99 and clear.sum() >= 150

    tensors = int8_tensors(tmp_path / "int8" / "model.tflite")
    assert tensors[np.int8] > 10 and tensors[np.float32] <= 2  # int8 inside, float32 at the two ends
    assert (tmp_path / "int8" / "model.tflite").stat().st_size < model.count_params() * 4 / 3  # float32: 4 bytes


def test_dynamic_int8_agrees_with_keras_on_99_percent(real_cifar10_dir, s3_run, tmp_path, capsys):
    """The issue's parity goal (>= 99 % of 256 real test images) on the weakly trained model whose
    full-integer export misses it: int8 weights, activations quantised per image at run time."""
    data, run_dir = s3_run
    export.main([str(run_dir), "--format", "litert", "--int8", "dynamic", "--out", str(tmp_path / "dyn"),
                 "--data-dir", str(real_cifar10_dir)])
    assert "(litert int8 dynamic): top-1 agreement with Keras" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "dyn" / "manifest.json").read_text())
    assert manifest["int8"] and manifest["quantization"]["mode"] == "dynamic"
    assert manifest["quantization"]["representative_images"] is None
    assert manifest["check"]["top1_agreement"] >= 0.985  # measured 0.9932 (full integer: 0.978)
    assert abs(manifest["check"]["test_top1_change"]) <= 0.005

    model = models.load(run_dir / "best.keras")
    exported = deploy.load(tmp_path / "dyn")
    _, agree = clear_and_agreeing(model, exported, data.test.x[:256])
    assert agree.mean() >= 0.99  # measured 255 of 256
    one_by_one = np.concatenate([exported.logits(image[None]) for image in data.test.x[:8]])
    np.testing.assert_array_equal(one_by_one, exported.logits(data.test.x[:8]))  # per image, not per batch

    tensors = int8_tensors(tmp_path / "dyn" / "model.tflite")
    # int8 weights but those under 1,024 values (the converter's rule: s3_tutorial's first conv and last layer)
    assert tensors[np.int8] == 3 and tensors[np.float32] > 10  # float32 activations
    assert (tmp_path / "dyn" / "model.tflite").stat().st_size < model.count_params() * 4 / 3


# ------------------------------------------------------------ bad input


def _error(argv, capsys):
    return one_line_error(export.main, argv, capsys)


def hidden_entries(folder: Path) -> list:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_bad_input_is_one_line_and_writes_nothing(bn_run, exports, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert "unknown format 'tflite'" in _error([str(bn_run), "--format", "tflite", "--out", str(out)], capsys)
    assert "--int8 applies to --format litert" in _error([str(bn_run), "--format", "onnx", "--int8", "--out",
                                                          str(out)], capsys)
    with pytest.raises(KcifarError, match="unknown int8 mode 'half'; choose one of: full, dynamic"):
        deploy.export(None, "litert", out, CIFAR10_CLASSES, {}, int8_data=object(), int8_mode="half")  # before the model
    (tmp_path / "no_model").mkdir()
    assert "has no best.keras" in _error([str(tmp_path / "no_model"), "--format", "onnx", "--out", str(out)], capsys)
    (tmp_path / "a_file").write_text("")
    assert "cannot write" in _error([str(bn_run), "--format", "onnx", "--out", str(tmp_path / "a_file" / "x")], capsys)
    assert "exists; pass --overwrite" in _error([str(bn_run), "--format", "onnx", "--out", str(exports["onnx"])],
                                                capsys)
    (tmp_path / "mine").mkdir()
    assert "is not a kcifar export" in _error([str(bn_run), "--format", "onnx", "--out", str(tmp_path / "mine"),
                                               "--overwrite"], capsys)

    real_find_spec = deploy.importlib.util.find_spec
    monkeypatch.setattr(deploy.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tf2onnx" else real_find_spec(name, *a))
    assert 'needs tf2onnx, which is not installed; install the export extra: pip install -e ".[export]"' in \
        _error([str(bn_run), "--format", "onnx", "--out", str(out)], capsys)
    monkeypatch.undo()

    def broken_converter(*args, **kwargs):
        raise ValueError("no kernel for op Frobnicate\nat line 3")

    monkeypatch.setattr(keras.Model, "export", broken_converter)
    assert "converter failed on this model (no kernel for op Frobnicate)" in \
        _error([str(bn_run), "--format", "litert", "--out", str(out)], capsys)
    monkeypatch.undo()
    assert not out.exists() and hidden_entries(tmp_path) == []  # nothing half-written


def test_an_export_off_its_keras_logits_is_not_kept(tmp_path, monkeypatch):
    real_logits = deploy.Exported.logits
    monkeypatch.setattr(deploy.Exported, "logits", lambda self, x, **kw: real_logits(self, x, **kw) + 0.1)
    with pytest.raises(KcifarError, match="differ from Keras' by up to 0.1"):
        deploy.export(models.build("s3_tutorial", num_classes=10), "savedmodel", tmp_path / "sm", CIFAR10_CLASSES, {})
    assert list(tmp_path.iterdir()) == []


def test_damaged_export_is_refused_by_predict(exports, tmp_path, capsys):
    copy = tmp_path / "onnx"
    copy.mkdir()
    (copy / "manifest.json").write_text((exports["onnx"] / "manifest.json").read_text())
    (copy / "model.onnx").write_bytes((exports["onnx"] / "model.onnx").read_bytes()[:-10])
    photo = write_photo(tmp_path / "x.png", 1)
    assert "differs from its manifest's sha256" in one_line_error(predict.main, [str(copy), str(photo)], capsys)
    (copy / "manifest.json").write_text("{}")
    assert "is not a kcifar export manifest" in one_line_error(predict.main, [str(copy), str(photo)], capsys)
