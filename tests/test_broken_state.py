"""Broken state in a run directory (issue 18, item 3): a damaged backup copy, history.csv,
best model or feature cache is detected, never silently used and never a traceback. A
backup has two copies (the latest and the previous epoch's): one damaged copy resumes from
the other; anything else is one line naming the file and --overwrite."""

import errno
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import one_line_error, own_stderr_lines, stop_after_epoch, write_cifar10
from soak import differences

from kcifar import callbacks as kcallbacks, features, rundir, train

ARGS = ["--epochs", "4", "--val-size", "20", "--batch-size", "16", "--name", "r", "--quiet"]


@pytest.fixture
def stopped_run(tiny_cifar10, tmp_path, monkeypatch):
    """A run of 4 epochs stopped after its third: backups of epochs 2 (previous) and 3 (latest)."""
    runs = tmp_path / "runs"
    recipe = train.recipe_from_args(train.parse_args(ARGS))
    make_callbacks = kcallbacks.make_callbacks
    monkeypatch.setattr(kcallbacks, "make_callbacks", lambda *a, **k: make_callbacks(*a, **k) + [stop_after_epoch(2)])
    with pytest.raises(KeyboardInterrupt):
        train.train(recipe, runs, verbose=0)
    monkeypatch.setattr(kcallbacks, "make_callbacks", make_callbacks)
    return runs / "r"


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def test_a_damaged_latest_backup_resumes_from_the_previous_copy(stopped_run, capsys):
    backup = stopped_run / "backup"
    assert rundir.resume_epoch(stopped_run) == 3 and (backup / "latest.weights.h5.bkp").exists()
    _flip_a_byte(backup / "latest.weights.h5")  # a bit of the weights: only the digest can tell
    assert rundir.resume_epoch(stopped_run) == 2
    train.main([*ARGS, "--runs-dir", str(stopped_run.parent)])
    err = capsys.readouterr().err
    assert f"resuming {stopped_run} at epoch 3" in err
    epochs = [line.split(",")[0] for line in (stopped_run / "history.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1", "2", "3"]  # epoch 2 (counted from 0) trained again from its start, not twice logged
    assert rundir.is_finished(stopped_run)


def test_weights_newer_than_their_metadata_are_not_used(stopped_run):
    """A kill between the two atomic writes of a backup: the latest weights are new, the
    metadata still the previous epoch's. The previous copy is the whole pair."""
    backup = stopped_run / "backup"
    (backup / "training_metadata.json").write_bytes((backup / "training_metadata.json.bkp").read_bytes())
    assert rundir.backup_pair(backup) == (backup / "latest.weights.h5.bkp", rundir.read_json(backup / "training_metadata.json.bkp"))


@pytest.mark.parametrize("damage, named", [
    (lambda r: [_truncate(r / "backup" / name) for name in ("latest.weights.h5", "latest.weights.h5.bkp")],
     "backup holds no whole backup (latest.weights.h5 is damaged"),
    (lambda r: _truncate(r / "history.csv", keep=0.7), "history.csv is damaged (it lacks whole rows of the 3 epochs"),
    (lambda r: (r / "history.csv").unlink(), "history.csv is damaged (No such file or directory)"),
    (lambda r: _truncate(r / "best.keras"), "best.keras is damaged (not a whole Keras file"),
    (lambda r: _flip_a_byte(r / "best.keras"), "best.keras is damaged (not a whole Keras file"),
    (lambda r: (r / "best.keras").unlink(), "best.keras is damaged (it is missing)"),
])
def test_damaged_state_is_one_line_naming_the_file_and_overwrite(stopped_run, capsys, damage, named):
    damage(stopped_run)
    err = one_line_error(train.main, [*ARGS, "--runs-dir", str(stopped_run.parent)], capsys)
    assert named in err and err.endswith(rundir.AGAIN)
    train.main([*ARGS, "--runs-dir", str(stopped_run.parent), "--overwrite"])
    assert rundir.is_finished(stopped_run)


@pytest.mark.parametrize("damage", [_flip_a_byte, _truncate, lambda path: path.write_bytes(b"")])
def test_a_damaged_feature_cache_is_computed_again(tmp_path, capsys, damage):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    x = np.random.default_rng(0).integers(0, 256, (50, 4)).astype("uint8")
    path = tmp_path / "train.npy"
    first = np.array(features.cached_features(model, x, path))
    assert (tmp_path / "train.npy.sha256").exists()
    damage(path)
    again = np.array(features.cached_features(model, x, path))
    np.testing.assert_array_equal(again, first)
    assert f"feature cache {path} is damaged" in capsys.readouterr().err
    np.testing.assert_array_equal(features.read_cached(path), first)  # and whole again on disk


def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_space(tiny_cifar10, tmp_path, capsys, monkeypatch):
    """Keras' own writer (CSVLogger) meets a full disk in the second epoch: one line, exit 2;
    the same command, once there is space, finishes the run from its last backup."""
    argv = [*ARGS, "--runs-dir", str(tmp_path / "runs")]
    write_row = keras.callbacks.CSVLogger.on_epoch_end

    def full_disk(self, epoch, logs=None):
        if epoch == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "r" / "history.csv"))
        write_row(self, epoch, logs)

    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_epoch_end", full_disk)
    err = one_line_error(train.main, argv, capsys)
    assert "history.csv: no space left on device; free some space and run the same command again" in err
    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_epoch_end", write_row)
    train.main(argv)
    assert f"resuming {tmp_path / 'runs' / 'r'} at epoch 2" in capsys.readouterr().err
    assert rundir.is_finished(tmp_path / "runs" / "r") and len(rundir.read_history(tmp_path / "runs" / "r")["epoch"]) == 4


@pytest.fixture
def small_file_system(tmp_path):
    """A real 8 MiB file system: a tmpfs, else a loop-mounted ext4 image; unmounted at the end.
    Skipped, saying why, where neither can be mounted (not root, no mount in the container)."""
    mount, image, errors = tmp_path / "small", tmp_path / "small.img", []
    mount.mkdir()
    for commands in ([["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mount]],
                     [["truncate", "-s", "8M", image], ["mkfs.ext4", "-q", image], ["mount", "-o", "loop", image, mount]]):
        try:
            for command in commands:
                subprocess.run(command, check=True, capture_output=True, text=True)
            break
        except (OSError, subprocess.CalledProcessError) as error:
            errors.append(f"{commands[-1][:3]}: {getattr(error, 'stderr', '') or error}".strip())
    else:
        pytest.skip(f"cannot mount a small file system here ({'; '.join(errors)})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", mount], capture_output=True)


FULL_DISK_RUN = ["--deterministic", "--epochs", "3", "--val-size", "20", "--batch-size", "16", "--name", "r", "--quiet"]


def _train(runs_dir, data):
    return subprocess.run([sys.executable, "-m", "kcifar.train", *FULL_DISK_RUN, "--runs-dir", str(runs_dir)],
                          capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                                              "KCIFAR_DATA_DIR": str(data)})


@pytest.fixture(scope="module")
def run_with_space(tmp_path_factory):
    """The run of FULL_DISK_RUN on a disk with space: (its data, its run directory)."""
    folder = tmp_path_factory.mktemp("with_space")
    data = write_cifar10(folder / "data").parent
    whole = _train(folder / "runs", data)
    assert whole.returncode == 0, whole.stderr
    return data, folder / "runs" / "r"


# best.keras holds the weights alone, the backup the optimizer's state too (Adam: ~3.5x best.keras)
@pytest.mark.parametrize("room, fails_in", [(0.5, "r/best.keras"), (1.5, "backup/latest.weights.h5"),
                                            (5.0, "r/best.keras")])  # epoch 1's model, its backup; epoch 2's model
def test_a_really_full_file_system_is_one_line_and_the_run_resumes_once_there_is_space(
        small_file_system, run_with_space, room, fails_in):
    """A filler file leaves ``room`` times the size of best.keras free on a real small file
    system, so a write of the run (Keras' own model and HDF5 writers) meets ENOSPC: one line,
    exit 2 (no crash of HDF5 at exit); once the filler is gone the same command finishes the
    run, equal to the one that had space."""
    data, whole = run_with_space
    free = os.statvfs(small_file_system)
    filler = small_file_system / "filler"
    filler.write_bytes(bytes(free.f_bavail * free.f_frsize - int(room * (whole / "best.keras").stat().st_size)))
    full = _train(small_file_system / "runs", data)
    assert full.returncode == 2 and len(own_stderr_lines(full.stderr)) == 1, full.stderr
    assert f"{fails_in}: no space left on device; free some space and run the same command again" in full.stderr
    filler.unlink()
    again = _train(small_file_system / "runs", data)
    assert again.returncode == 0, again.stderr
    assert differences(whole, small_file_system / "runs" / "r") == []
