"""Bad input across every command (issue 18, item 5): each case goes through the command's
``main`` as a user types it and must end with a non-zero exit and one line saying what to
do, leaving every file as it was (no partial output, nothing earlier overwritten).

Bad inputs tested elsewhere, not repeated here: damaged CIFAR copies through the library
(test_data: missing batch, truncated pickle, wrong shape, wrong labels, a pickle that runs
code, an archive that is not CIFAR), unknown model / recipe key / optimizer, a wrong type,
a missing recipe file, bad model_args, multiworker (test_train), damaged metrics.json and
backup metadata (test_train), unknown finetune keys (test_finetune), a missing run, a run
without best.keras, a file that is not a model, contradicting flags and bad masks
(test_evaluate), a broken or missing run (test_report), bad ops (test_augment_offline),
a bad sweep file (test_sweep), and in predict: no classes.txt, a class count that does not
fit, a missing or junk model, an empty folder, --top-k 0 (test_predict).
"""

import hashlib
import os
import pickle
import subprocess
import sys
import zipfile

import cv2
import numpy as np
import pytest
from conftest import one_line_error, own_stderr_lines, write_cifar10
from PIL import Image
from test_evaluate import colour_model, red_level, write_run
from test_predict import write_photo

import augment_offline.__main__ as augment_offline_cli
import kcifar.augment.__main__ as augment_cli
from kcifar import data, evaluate, finetune, predict, recipe as krecipe, report, train
from kcifar.data import CIFAR10_CLASSES
from kcifar.machine import REPOSITORY


def snapshot(root):
    """Every file under ``root`` with the digest of its bytes (folders as None)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def refused(main, argv, capsys, root, message):
    """``main(argv)`` exits 2 with one line holding ``message``, and no file under ``root`` changed."""
    before = snapshot(root)
    assert message in one_line_error(main, argv, capsys)
    assert snapshot(root) == before


@pytest.fixture
def workspace(tiny_cifar10):
    """The tiny CIFAR-10 (found through KCIFAR_DATA_DIR) and runs/earlier, a finished run that
    no refused command may touch, even with --overwrite."""
    earlier = tiny_cifar10 / "runs" / "earlier"
    earlier.mkdir(parents=True)
    (earlier / "recipe.toml").write_text(krecipe.to_toml(krecipe.resolve(None, ["name=earlier"])))
    (earlier / "metrics.json").write_text('{"finished": true}\n')
    (earlier / "best.keras").write_bytes(b"the earlier model")
    return tiny_cifar10


# ------------------------------------------------------------ kcifar.data


def _truncate(folder):
    (folder / "data_batch_2").write_bytes((folder / "data_batch_2").read_bytes()[:3000])


def _wrong_shape(folder):
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((4, 32, 32), np.uint8), b"labels": [0] * 4}))


def _wrong_labels(folder):
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, -1]}))


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('owned', 'w').write('owned')",))


def _runs_code(folder):
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": RunsCode()}))


DAMAGED_DATA = [
    ("missing", lambda f: (f / "data_batch_4").unlink(), "data_batch_4 is missing; the copy is incomplete"),
    ("truncated", _truncate, "data_batch_2 is not a readable CIFAR pickle"),
    ("wrong shape", _wrong_shape, "expected uint8 (N, 3072); not a CIFAR file"),
    ("wrong labels", _wrong_labels, "labels span -1..9, expected 0..9"),
    ("runs code", _runs_code, "refusing to load builtins.exec"),
]


@pytest.mark.parametrize("damage, message", [case[1:] for case in DAMAGED_DATA], ids=[c[0] for c in DAMAGED_DATA])
def test_damaged_data_through_the_info_command(tmp_path, capsys, damage, message):
    damage(write_cifar10(tmp_path))
    refused(data.main, ["info", "--data-dir", str(tmp_path)], capsys, tmp_path, message)
    assert not (tmp_path / "owned").exists()


# ------------------------------------------------------------ kcifar.train


def _recipe_file(body):
    def make(root):
        (root / "bad.toml").write_text(body)
        return [str(root / "bad.toml")]
    return make


TRAIN_CASES = [
    ("zero learning rate", ["--set", "optimizer.learning_rate=0"], "optimizer.learning_rate must be positive"),
    ("negative learning rate", ["--lr", "-0.1"], "optimizer.learning_rate must be positive"),
    ("NaN learning rate", ["--lr", "nan"], "'optimizer.learning_rate' must be a finite number, got nan"),
    ("NaN in a recipe file", _recipe_file("[loss]\nlabel_smoothing = nan\n"), "'loss.label_smoothing' must be a finite"),
    ("infinite value", ["--set", "schedule.gamma=inf"], "'schedule.gamma' must be a finite number"),
    ("batch size 0", ["--batch-size", "0"], "train.batch_size must be at least 1"),
    ("batch larger than the training split", ["--batch-size", "81"],
     "train.batch_size 81 is larger than the training split (80 images)"),
    ("epochs 0", ["--epochs", "0"], "train.epochs must be at least 1"),
    ("unknown schedule", ["--schedule", "linear"], "'schedule.name' = 'linear'; choose one of"),
    ("unknown augmentation", ["--augment", "sideways"], "unknown augment preset 'sideways'"),
    ("negative cutout", ["--set", "augment.cutout=-4"], "augment cutout, mixup and cutmix must be >= 0"),
    ("unknown table in a recipe file", _recipe_file("[optimiser]\nname = 'sgd'\n"), "unknown recipe key 'optimiser'"),
    ("wrong type in a recipe file", _recipe_file("[train]\nepochs = '10'\n"), "'train.epochs' must be int"),
    ("damaged data", lambda root: _truncate(root / "cifar-10-batches-py") or [], "not a readable CIFAR pickle"),
    ("missing data folder", lambda root: ["--data-dir", str(root / "nowhere")], "does not exist"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_bad_input_and_keeps_the_earlier_run(workspace, capsys, args, message):
    args = args(workspace) if callable(args) else args
    argv = [*args, "--val-size", "20", "--runs-dir", str(workspace / "runs"), "--name", "earlier", "--overwrite"]
    refused(train.main, argv, capsys, workspace, message)


def test_unwritable_runs_dir_fails_before_the_data_is_read(workspace, capsys):
    (workspace / "cifar-10-batches-py" / "test_batch").unlink()  # would fail later, when the data is read
    (workspace / "a_file").write_text("not a folder")
    refused(train.main, ["--epochs", "1", "--runs-dir", str(workspace / "a_file" / "runs")], capsys, workspace,
            "is not a writable folder; choose another --runs-dir")


# ------------------------------------------------------------ kcifar.finetune

FINETUNE_CASES = [
    ("zero stage-1 learning rate", ["--set", "finetune.stage1_lr=0"], "'finetune.stage1_lr' must be > 0"),
    ("NaN stage-2 learning rate", ["--set", "finetune.stage2_lr=nan"], "'finetune.stage2_lr' must be a finite"),
    ("unknown backbone", ["--backbone", "resnet51"], "unknown backbone 'resnet51'"),
    ("batch larger than the training split", ["--set", "train.batch_size=100"], "larger than the training split"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in FINETUNE_CASES], ids=[c[0] for c in FINETUNE_CASES])
def test_finetune_refuses_bad_input_and_keeps_the_earlier_run(workspace, capsys, args, message):
    argv = [*args, "--set", "data.val_size=20", "--set", "name='earlier'", "--runs-dir", str(workspace / "runs"),
            "--overwrite"]
    refused(finetune.main, argv, capsys, workspace, message)


# ------------------------------------------------------------ kcifar.evaluate


def test_evaluate_refuses_an_unfinished_run(workspace, capsys):
    run_dir = write_run(workspace / "runs" / "unfinished")
    (run_dir / "metrics.json").unlink()  # killed before its end: best.keras may still change
    for target in (run_dir, run_dir / "best.keras"):
        refused(evaluate.main, [str(target)], capsys, workspace, "is an unfinished run; run the command that started it")


def test_evaluate_refuses_an_unwritable_out_before_predicting(workspace, capsys):
    colour_model().save(workspace / "m.keras")
    (workspace / "a_file").write_text("not a folder")
    refused(evaluate.main, [str(workspace / "m.keras"), "--val-size", "20", "--out", str(workspace / "a_file" / "x")],
            capsys, workspace, "is not a writable folder; choose another --out")


# ------------------------------------------------------------ kcifar.predict


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.keras"
    colour_model().save(path)
    return path


def _zero_bytes(path):
    path.write_bytes(b"")


def _text(path):
    path.write_text("a shopping list, not a picture\n")


@pytest.mark.parametrize("name, write, message", [
    ("empty.png", _zero_bytes, "empty.png: not an image OpenCV can decode"),
    ("notes.png", _text, "notes.png: not an image OpenCV can decode"),
])
def test_predict_unreadable_image_is_one_line_and_exit_1(tmp_path, model_file, capsys, name, write, message):
    write(tmp_path / name)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(model_file), str(tmp_path / name), "--classes", "cifar10"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 1 and captured.out.strip() == ""
    assert captured.err.strip().splitlines() == [f"error: cannot read {tmp_path / name}: {message.split(': ', 1)[1]}"]
    assert snapshot(tmp_path) == before


def test_predict_folder_without_images_is_one_line(tmp_path, model_file, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no pictures here")
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(model_file), str(tmp_path / "docs"), "--classes", "cifar10"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path / 'docs'} holds no image files "
                                                            f"({', '.join(sorted(predict.IMAGE_SUFFIXES))})"]


def _zip_of_another_program(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("word/document.xml", "<w:document/>")


def _hdf5_of_another_program(path):
    import h5py

    with h5py.File(path, "w") as f:
        f["table"] = np.arange(10)


@pytest.mark.parametrize("name, write, message", [
    ("model.keras", _zip_of_another_program, "is not a loadable Keras model"),
    ("model.h5", _hdf5_of_another_program, "is not a .keras file; pass a model saved by Keras 3"),
])
def test_predict_refuses_a_model_file_of_another_program(tmp_path, capsys, name, write, message):
    write(tmp_path / name)
    photo = write_photo(tmp_path / "x.png", 1)
    refused(predict.main, [str(tmp_path / name), str(photo), "--classes", "cifar10"], capsys, tmp_path, message)


def _sixteen_bit_png(path, level):
    cv2.imwrite(str(path), np.full((40, 30, 3), [0, 0, level * 257], np.uint16))  # BGR: only red


def _grey_png(path, level):
    cv2.imwrite(str(path), np.full((30, 40), level, np.uint8))


def _cmyk_jpeg(path, level):
    Image.new("RGB", (40, 40), (level, 0, 0)).convert("CMYK").save(path, quality=100)


def _huge_png(path, level):
    image = np.zeros((10_000, 10_000, 3), np.uint8)
    image[..., 2] = level
    cv2.imwrite(str(path), image)


@pytest.mark.parametrize("name, write, rgb", [
    ("deep.png", _sixteen_bit_png, "red"),  # 16 bits per channel: scaled to 8, not cut
    ("grey.png", _grey_png, "grey"),  # one channel: repeated to three
    ("print.jpg", _cmyk_jpeg, "red"),  # CMYK: converted to RGB, not read as four channels
    ("huge.png", _huge_png, "red"),  # 10,000 x 10,000: area-averaged down to 32 x 32
])
def test_unusual_images_are_read_as_the_rgb_they_show(tmp_path, name, write, rgb):
    """Not errors: each decodes to the colours a viewer shows, so predictions are honest."""
    level = red_level(7)
    write(tmp_path / name, level)
    image = predict.read_image(tmp_path / name)
    expected = [level, 0, 0] if rgb == "red" else [level] * 3
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    np.testing.assert_allclose(image.reshape(-1, 3).mean(axis=0), expected, atol=2)
    if rgb == "red":
        colour_model().save(tmp_path / "colour.keras")
        predictor = predict.Predictor(tmp_path / "colour.keras")
        assert predict.predict_images(predictor, image[None], CIFAR10_CLASSES, 1)[0][0][0] == "horse"


# ------------------------------------------------------------ kcifar.report


def test_report_on_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(report.main, [], capsys, tmp_path, "no runs given; pass run directories such as runs/NAME")


def test_report_refuses_an_unwritable_out(tmp_path, capsys):
    run_dir = write_run(tmp_path / "runs" / "r")
    (tmp_path / "a_file").write_text("not a folder")
    refused(report.main, [str(run_dir), "--out", str(tmp_path / "a_file" / "table")], capsys, tmp_path,
            "is not a writable folder; choose another --out")


# ------------------------------------------------------------ kcifar.augment and augment_offline


@pytest.mark.parametrize("args, message", [
    (["--images", "0"], "--images and --copies must be at least 1"),
    (["--copies", "-2"], "--images and --copies must be at least 1"),
    (["--out", "{root}/a_file/grid.png"], "is not a writable folder; choose another --out"),
    (["--out", "{root}/a_folder"], "a_folder is not a .png file name"),
    (["--out", "{root}/a_folder.png"], "a_folder.png is not a .png file name"),
])
def test_augment_preview_refuses_bad_input(workspace, capsys, args, message):
    (workspace / "a_file").write_text("not a folder")
    (workspace / "a_folder").mkdir()
    (workspace / "a_folder.png").mkdir()
    args = [a.format(root=workspace) for a in args]
    refused(augment_cli.main, ["--out", str(workspace / "grid.png"), *args], capsys, workspace, message)


@pytest.mark.parametrize("args, message", [
    (["--out", "{root}/a_file/set"], "is not a writable folder; choose another --out"),
    (["--copies", "0"], "--copies, --shard-size and --workers must be >= 1"),
    (["--preview", "{root}/a_file/grid.png"], "choose another --preview"),
])
def test_augment_offline_refuses_bad_input(workspace, capsys, args, message):
    (workspace / "a_file").write_text("not a folder")
    args = [a.format(root=workspace) for a in args]
    refused(augment_offline_cli.main, ["--out", str(workspace / "set"), "--val-size", "20", "--quiet", *args],
            capsys, workspace, message)


def test_augment_offline_refuses_data_that_runs_code(workspace, capsys):
    _runs_code(workspace / "cifar-10-batches-py")
    refused(augment_offline_cli.main, ["--out", str(workspace / "set"), "--val-size", "20", "--quiet"], capsys,
            workspace, "refusing to load builtins.exec")
    assert not (workspace / "owned").exists()


# ------------------------------------------------------------ as a user sees it: a real process


@pytest.mark.parametrize("command, args, message", [
    ("kcifar.train", ["--lr", "nan"], "must be a finite number"),
    ("kcifar.report", [], "no runs given"),
])
def test_a_real_command_prints_one_line_and_exits_2(workspace, command, args, message):
    before = snapshot(workspace)
    result = subprocess.run([sys.executable, "-m", command, *args], capture_output=True, text=True, cwd=workspace,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    lines = own_stderr_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert snapshot(workspace) == before



@pytest.mark.parametrize("script, args, message", [
    ("bench_speed.py", ["--out", "{file}/speed.md"], "choose another --out"),
    ("bench_inference.py", ["--out", "{file}/inference.md"], "choose another --out"),
    ("bench_conv_layers.py", ["--out", "{file}/layers.md"], "choose another --out"),
    ("bench_conv_layers.py", ["--threads", "0"], "give 1 or more"),
    ("bench_conv_layers.py", ["--processes", "0"], "give 1 or more"),
    ("check_whitening_precision.py", ["{missing}"], "does not exist"),
    ("check_conv_grad_precision.py", ["{missing}"], "does not exist"),
])
def test_an_experiment_script_refuses_bad_input_in_one_line_before_any_work(tmp_path, script, args, message):
    """The benchmark scripts check --out before their minutes of timing, not after them."""
    (tmp_path / "a_file").write_text("not a folder")
    args = [a.format(file=tmp_path / "a_file", missing=tmp_path / "no_run") for a in args]
    before = snapshot(tmp_path)
    result = subprocess.run([sys.executable, str(REPOSITORY / "experiments" / script), *args],
                            capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    lines = own_stderr_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert snapshot(tmp_path) == before


def test_an_experiment_scripts_failing_worker_is_one_line_with_the_workers_own_error(tmp_path):
    """profile_onednn.py trains in a worker process: the worker's error (here: no data) reaches the
    user as one line, not as the parent's CalledProcessError traceback."""
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, str(REPOSITORY / "experiments" / "profile_onednn.py"),
                             str(REPOSITORY / "experiments" / "recipes" / "s2_gap.toml")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KCIFAR_DATA_DIR": str(tmp_path / "empty")})
    lines = own_stderr_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the profiled training of ") and "failed (exit 2): KCIFAR_DATA_DIR" in lines[0]
