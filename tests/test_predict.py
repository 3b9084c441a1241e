"""kcifar.predict on real PNG/JPEG files of other sizes, written here with OpenCV."""

import json

import cv2
import numpy as np
import pytest
from conftest import one_line_error
from test_evaluate import colour_model, red_level

from kcifar import predict, rundir
from kcifar.data import CIFAR10_CLASSES
from kcifar.errors import KcifarError


def write_photo(path, predicted_class, size=(48, 64)):
    """A BGR image file of ``size`` whose red level makes the colour model predict ``predicted_class``.

    Blue gets a different level: if red and blue were swapped the prediction would change.
    """
    image = np.zeros((*size, 3), np.uint8)
    image[..., 2] = red_level(predicted_class)  # OpenCV order: index 2 is red
    image[..., 0] = red_level(9 - predicted_class)
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m.keras"
    colour_model().save(path)
    return path


@pytest.fixture(scope="module")
def run_model(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "colour_run"
    run_dir.mkdir()
    colour_model().save(run_dir / "best.keras")
    (run_dir / "recipe.toml").write_text('name = "colour_run"\ndataset = "cifar10"\n[data]\nlabel_mode = "fine"\n')
    rundir.write_class_names(run_dir, CIFAR10_CLASSES)
    return run_dir / "best.keras"


def test_class_names_come_from_the_run_directory(tmp_path, run_model):
    own = tmp_path / "own_classes"
    own.mkdir()
    (own / "best.keras").write_bytes(run_model.read_bytes())
    rundir.write_class_names(own, [f"thing{i}" for i in range(10)])  # not CIFAR-10's: no table can give them
    (own / "recipe.toml").write_text(run_model.with_name("recipe.toml").read_text())
    assert predict.class_names_for_model(own / "best.keras") == [f"thing{i}" for i in range(10)]
    (own / "classes.txt").unlink()
    with pytest.raises(KcifarError, match="no classes.txt beside it"):
        predict.class_names_for_model(own / "best.keras")


def test_png_and_jpeg_of_any_size_read_as_rgb(tmp_path, run_model, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    write_photo(photos / "a_cat.png", 3, size=(300, 200))
    write_photo(photos / "b_ship.jpg", 8, size=(20, 45))
    (photos / "notes.txt").write_text("not an image; skipped in folders")
    truck = write_photo(tmp_path / "truck.jpeg", 9)
    predict.main([str(run_model), str(photos), str(truck), "--top-k", "3", "--json"])
    output = json.loads(capsys.readouterr().out)
    top = {p["file"].rsplit("/", 1)[-1]: p["top"] for p in output["predictions"]}
    assert list(top) == ["a_cat.png", "b_ship.jpg", "truck.jpeg"] and output["errors"] == []
    assert [t[0]["class"] for t in top.values()] == ["cat", "ship", "truck"]
    assert all(len(t) == 3 and t[0]["probability"] > 0.9 for t in top.values())
    assert {t["class"] for t in top["a_cat.png"][1:]} == {"bird", "deer"}  # the neighbouring red levels


def test_image_is_resized_with_area_averaging(tmp_path):
    stripes = np.zeros((128, 128, 3), np.uint8)
    stripes[:, ::4] = 200  # one column in four: area averaging gives 50; bilinear or nearest give 0 or 200
    cv2.imwrite(str(tmp_path / "stripes.png"), stripes)
    image = predict.read_image(tmp_path / "stripes.png")
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert np.all(image == 50)


def test_unreadable_file_costs_one_line_and_exit_1(tmp_path, model_file, capsys):
    good = write_photo(tmp_path / "dog.png", 5)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    predict.main([str(model_file), str(good), "--classes", "cifar10"])  # all good: no exit
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(model_file), str(tmp_path / "broken.png"), str(good), str(tmp_path / "missing.jpg"),
                      "--classes", "cifar10"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1
    assert captured.out.startswith(f"{good}: dog ")
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and "broken.png: not an image" in errors[0] and "missing.jpg" in errors[1]


def test_class_names_from_flag_or_file(tmp_path, model_file):
    assert predict.class_names_for_model(model_file, "cifar100")[:2] == ["apple", "aquarium_fish"]
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"thing{i}" for i in range(10)) + "\n")
    assert predict.class_names_for_model(model_file, str(names))[-1] == "thing9"


def _one_line_error(argv, capsys):
    return one_line_error(predict.main, argv, capsys)


def test_bad_input(tmp_path, model_file, capsys):
    photo = write_photo(tmp_path / "x.png", 1)
    assert "no classes.txt beside it" in _one_line_error([str(model_file), str(photo)], capsys)
    assert "100 class names" in _one_line_error([str(model_file), str(photo), "--classes", "cifar100"], capsys)
    assert "does not exist" in _one_line_error([str(tmp_path / "no.keras"), str(photo), "--classes", "cifar10"], capsys)
    (tmp_path / "bad.keras").write_text("junk")
    assert "not a loadable" in _one_line_error([str(tmp_path / "bad.keras"), str(photo), "--classes", "cifar10"], capsys)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(model_file), str(tmp_path / "empty"), "--classes", "cifar10"])
    assert exit_info.value.code == 1 and "empty holds no image files" in capsys.readouterr().err
    with pytest.raises(KcifarError, match="not a positive number"):
        predict.main.__wrapped__([str(model_file), str(photo), "--classes", "cifar10", "--top-k", "0"])
