"""kcifar.evaluate: numbers checked by hand, a fake run directory end to end, figures, bad input.

The fake model predicts from the mean red level of an image: logit_j =
(2 c_j r - c_j^2) / SCALE, so the predicted class is the centre c_j nearest
to r. Images filled with red level c_k are therefore predicted as class k.
"""

import json
import pickle

import cv2
import keras
import numpy as np
import pytest
from conftest import one_line_error

from kcifar import evaluate, rundir
from kcifar.data import CIFAR10_CLASSES, CIFAR100_COARSE, CIFAR100_FINE, Split, superclass_groups
from kcifar.errors import KcifarError

CIFAR10 = CIFAR10_CLASSES
SCALE = 100.0


def red_level(k):
    return 20 + 20 * np.asarray(k)


def colour_model(num_classes=10):
    """GAP -> Dense: logits from the mean colour, nearest red-level centre wins."""
    inputs = keras.Input((32, 32, 3))
    mean = keras.layers.GlobalAveragePooling2D(name="mean_colour")(inputs)
    logits = keras.layers.Dense(num_classes, name="logits")(mean)
    model = keras.Model(inputs, logits)
    centres = red_level(np.arange(num_classes)).astype(np.float32)
    kernel = np.zeros((3, num_classes), np.float32)
    kernel[0] = 2 * centres / SCALE
    model.get_layer("logits").set_weights([kernel, -centres**2 / SCALE])
    return model


def images_predicted_as(classes, seed=0):
    """uint8 images whose red channel is the level of the class the model will predict."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(len(classes), 32, 32, 3), dtype=np.uint8)
    x[..., 0] = red_level(classes)[:, None, None]
    return x


def _dump(path, images, labels):
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [int(v) for v in labels]}, protocol=2))


# test labels and what the model will predict for them: three mistakes
TEST_Y = np.arange(20) % 10
TEST_PRED = TEST_Y.copy()
TEST_PRED[[3, 7, 13]] = [5, 1, 5]  # cat->dog (image 3), horse->automobile (7), cat->dog (13)
EXACT = np.arange(20) < 10  # "pixel-exact" = images 0-9: two mistakes (images 3 and 7)


def write_data(root):
    """A CIFAR-10 copy whose test predictions are known, with an exactness mask beside it."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(1, 6):
        y = np.arange(20) % 10
        _dump(folder / f"data_batch_{i}", images_predicted_as(rng.integers(0, 10, 20), seed=i), y)
    _dump(folder / "test_batch", images_predicted_as(TEST_PRED), TEST_Y)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in CIFAR10]}))
    np.save(root / "cifar10_test_exact_mask.npy", EXACT)
    return root


HISTORY = """epoch,accuracy,learning_rate,loss,top5,val_accuracy,val_loss,val_top5
0,0.30,0.001,1.90,0.80,0.35,1.80,0.85
1,0.45,0.001,1.50,0.88,0.44,1.52,0.90
2,0.55,0.001,1.20,0.92,0.50,1.41,0.93
2,0.56,0.001,1.19,0.92,0.52,1.30,0.93
3,0.65,0.0001,1.00,0.95,0.51,1.45,0.94
"""


def write_run(run_dir, val_size=10, monitor="val_loss"):
    run_dir.mkdir(parents=True)
    colour_model().save(run_dir / "best.keras")
    (run_dir / "history.csv").write_text(HISTORY)
    (run_dir / "recipe.toml").write_text(
        f'name = "{run_dir.name}"\nmodel = "colour"\ndataset = "cifar10"\nseed = 3\n'
        f'[data]\nval_size = {val_size}\nlabel_mode = "fine"\n'
        f'[early_stopping]\nmonitor = "{monitor}"\n')
    (run_dir / "metrics.json").write_text('{"finished": true}\n')
    return run_dir


def png_size(path):
    image = cv2.imread(str(path))
    assert image is not None and path.stat().st_size > 5000, f"{path} is not a real PNG"
    return image.shape[1], image.shape[0]


# ------------------------------------------------------------ metrics by hand


def test_confusion_per_class_and_subset_by_hand():
    y = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    logits = np.eye(3)[predicted] * 3.0
    result = evaluate.metrics_from_logits(logits, y, ["a", "b", "c"], mask=np.array([1, 1, 0, 0, 0, 1], bool),
                                          mask_label="exact 3")
    assert result["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert [c["accuracy"] for c in result["per_class"]] == [0.5, 1.0, 0.5]
    assert [c["n"] for c in result["per_class"]] == [2, 2, 2]
    assert result["all"]["top1"] == pytest.approx(4 / 6) and result["all"]["n"] == 6
    assert result["all"]["top5"] == 1.0  # only 3 classes: the true one is always in the top 3
    assert result["subset"] == pytest.approx({"label": "exact 3", "n": 3, "top1": 2 / 3, "top5": 1.0,
                                              "loss": result["subset"]["loss"]})
    assert result["most_confused"] == [{"true": "a", "predicted": "b", "count": 1},
                                       {"true": "c", "predicted": "a", "count": 1}]
    # loss: -log softmax of the true class; right answers have 3 vs 0, 0
    right, wrong = np.log(1 + 2 * np.exp(-3)), 3 + np.log(1 + 2 * np.exp(-3))
    assert result["all"]["loss"] == pytest.approx((4 * right + 2 * wrong) / 6)


def test_top5_misses_a_class_ranked_sixth():
    logits = np.array([[6, 5, 4, 3, 2, 1.0], [1, 2, 3, 4, 5, 6.0]])
    result = evaluate.summary_metrics(logits, np.array([5, 5]), "two")
    assert result["top5"] == 0.5 and result["top1"] == 0.5


def test_class_without_images_has_no_accuracy():
    result = evaluate.metrics_from_logits(np.eye(3)[[0, 0]], np.array([0, 1]), ["a", "b", "c"])
    assert [c["accuracy"] for c in result["per_class"]] == [1.0, 0.0, None]


def test_logits_that_do_not_fit_the_classes_are_refused():
    with pytest.raises(KcifarError, match="logits of shape"):
        evaluate.metrics_from_logits(np.zeros((4, 100)), np.zeros(4, int), CIFAR10)


def test_history_keeps_the_last_row_of_a_repeated_epoch_and_finds_the_best(tmp_path):
    (tmp_path / "history.csv").write_text(HISTORY)
    history = rundir.read_history(tmp_path)
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    assert history["val_loss"].tolist() == [1.80, 1.52, 1.30, 1.45]
    assert rundir.best_index(history["val_loss"], "val_loss") == 2
    assert rundir.best_index(history["val_accuracy"], "val_accuracy") == 2
    assert rundir.best_index(history["val_top5"], "val_top5") == 3
    assert rundir.best_index(history.get("absent"), "val_loss") is None
    assert rundir.read_history(tmp_path / "missing") == {}


def test_cifar100_fine_classes_group_into_twenty_superclasses():
    groups = superclass_groups(CIFAR100_FINE)
    assert len(groups) == 20 and all(len(members) == 5 for _, members in groups)
    assert sorted(i for _, members in groups for i in members) == list(range(100))
    assert CIFAR100_FINE[:3] == ["apple", "aquarium_fish", "baby"] and len(CIFAR100_COARSE) == 20
    assert superclass_groups(CIFAR10) is None


# ------------------------------------------------------------ a run directory end to end


def test_evaluate_run_directory_end_to_end(tmp_path, capsys):
    data_dir = write_data(tmp_path / "data")
    run = write_run(tmp_path / "runs" / "colour_run")
    evaluate.main([str(run), "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert "all 20" in out and "pixel-exact 10" in out

    result = json.loads((run / "evaluation.json").read_text())
    assert result["split"] == "test" and result["run"] == "colour_run"
    assert result["all"]["label"] == "all 20" and result["all"]["top1"] == pytest.approx(17 / 20)
    assert result["subset"]["label"] == "pixel-exact 10" and result["subset"]["n"] == 10
    assert result["subset"]["top1"] == pytest.approx(8 / 10)
    expected = np.zeros((10, 10), int)
    np.add.at(expected, (TEST_Y, TEST_PRED), 1)
    assert result["confusion"] == expected.tolist()
    per_class = {c["class"]: c["accuracy"] for c in result["per_class"]}
    assert per_class["cat"] == 0.0 and per_class["horse"] == 0.5 and per_class["dog"] == 1.0
    assert result["most_confused"][0] == {"true": "cat", "predicted": "dog", "count": 2}

    sizes = {name: png_size(run / name) for name in result["figures"]}
    assert sizes == {"confusion.png": (950, 800), "per_class_accuracy.png": (900, 400),
                     "predictions.png": (1300, 650), "learning_curves.png": (1500, 480)}


def test_tta_flag_is_recorded_and_a_mirror_invariant_model_scores_the_same(tmp_path, capsys):
    data_dir = write_data(tmp_path / "data")
    run = write_run(tmp_path / "runs" / "colour_run")
    with open(run / "recipe.toml", "a") as f:
        f.write('[train]\ntta = "flip"\n')
    evaluate.main([str(run), "--data-dir", str(data_dir)])  # the run's train.tta
    assert "(TTA flip)" in capsys.readouterr().out
    result = json.loads((run / "evaluation.json").read_text())
    assert result["tta"] == "flip" and result["all"]["top1"] == pytest.approx(17 / 20)  # mean colour: mirror-blind
    evaluate.main([str(run), "--data-dir", str(data_dir), "--tta", "none"])  # not the run's: beside its files
    assert json.loads((run / "evaluation_tta-none" / "evaluation.json").read_text())["tta"] == "none"
    assert json.loads((run / "evaluation.json").read_text())["tta"] == "flip"


def test_validation_split_uses_the_recipe_split_and_a_user_mask(tmp_path):
    data_dir = write_data(tmp_path / "data")
    run = write_run(tmp_path / "run", val_size=20)
    mask = np.zeros(20, bool)
    mask[:5] = True
    np.save(tmp_path / "first5.npy", mask)
    evaluate.main([str(run), "--split", "val", "--data-dir", str(data_dir), "--subset-mask", str(tmp_path / "first5.npy")])
    out = run / "evaluation_subset-first5"  # a mask the run was not measured with: beside its files
    result = json.loads((out / "evaluation_val.json").read_text())
    assert result["split"] == "val" and result["all"]["n"] == 20
    assert result["subset"]["n"] == 5 and "first5.npy" in result["subset"]["label"]
    assert (out / "confusion_val.png").is_file() and not (run / "evaluation.json").exists()


def test_bare_model_takes_flags_and_writes_beside_it(tmp_path):
    data_dir = write_data(tmp_path / "data")
    colour_model().save(tmp_path / "m.keras")
    evaluate.main([str(tmp_path / "m.keras"), "--dataset", "cifar10", "--val-size", "10", "--data-dir", str(data_dir)])
    result = json.loads((tmp_path / "m_evaluation" / "evaluation.json").read_text())
    assert result["all"]["top1"] == pytest.approx(17 / 20)
    assert "learning_curves.png" not in result["figures"]  # no history beside a bare model


def test_hundred_class_figures_are_large_enough_to_read(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(300) % 100
    split = Split(rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8), y)
    logits = rng.normal(size=(300, 100)) + 3 * np.eye(100)[y]
    names = evaluate.write_figures(tmp_path, split, logits, CIFAR100_FINE)
    assert {n: png_size(tmp_path / n) for n in names} == {
        "confusion.png": (2400, 2000), "per_class_accuracy.png": (900, 2160), "predictions.png": (1300, 840)}


# ------------------------------------------------------------ bad input: one line, exit 2


def _one_line_error(argv, capsys):
    return one_line_error(evaluate.main, argv, capsys)


def test_missing_run_directory(tmp_path, capsys):
    assert "does not exist" in _one_line_error([str(tmp_path / "nope")], capsys)


def test_run_directory_without_model(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert "no best.keras" in _one_line_error([str(tmp_path / "run")], capsys)


def test_file_that_is_not_a_model(tmp_path, capsys):
    data_dir = write_data(tmp_path / "data")
    (tmp_path / "fake.keras").write_bytes(b"not a zip")
    (tmp_path / "notes.txt").write_text("hello")
    err = _one_line_error([str(tmp_path / "fake.keras"), "--data-dir", str(data_dir), "--val-size", "10"], capsys)
    assert "not a loadable Keras model" in err
    assert "not a .keras file" in _one_line_error([str(tmp_path / "notes.txt"), "--data-dir", str(data_dir),
                                                   "--val-size", "10"], capsys)


def test_flags_that_contradict_the_recipe_and_bad_masks(tmp_path, capsys):
    data_dir = write_data(tmp_path / "data")
    run = write_run(tmp_path / "run")
    assert "--dataset cannot be used" in _one_line_error([str(run), "--dataset", "cifar100"], capsys)
    np.save(tmp_path / "short.npy", np.ones(3, bool))
    err = _one_line_error([str(run), "--data-dir", str(data_dir), "--subset-mask", str(tmp_path / "short.npy")], capsys)
    assert "needs bool (20,)" in err


def test_library_refuses_a_mask_of_the_wrong_length():
    with pytest.raises(KcifarError, match="must be bool"):
        evaluate.metrics_from_logits(np.eye(3), np.arange(3), ["a", "b", "c"], mask=np.ones(4, bool))
