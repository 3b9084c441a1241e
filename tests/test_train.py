"""The training command: a real short run, kill-and-resume, MirroredStrategy, bad input.

Runs that need process-wide TF settings (op determinism, logical CPU devices)
run in subprocesses."""

import csv
import json
import os
import platform
import signal
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import own_stderr_lines

from kcifar import machine, recipe as krecipe, rundir
from kcifar.errors import KcifarError
from kcifar.train import train

QUICK = ["data.train_subset=3000", "data.val_size=1000", "train.batch_size=64"]


def run_cli(args, runs_dir, env_data_dir=None, extra_env=(), **kwargs):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **dict(extra_env)}
    if env_data_dir:
        env["KCIFAR_DATA_DIR"] = str(env_data_dir)
    return subprocess.run([sys.executable, "-m", "kcifar.train", *args, "--runs-dir", str(runs_dir), "--quiet"],
                          capture_output=True, text=True, env=env, **kwargs)


def test_short_real_run_learns_and_writes_every_file(real_cifar10_dir, tmp_path):
    recipe = krecipe.resolve(None, QUICK + ["train.epochs=3", "name=short"])
    metrics = train(recipe, tmp_path, real_cifar10_dir, verbose=0).metrics
    run = tmp_path / "short"
    assert {"recipe.toml", "history.csv", "best.keras", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert not (run / "backup").exists()  # removed once the run is finished
    assert metrics["best_val_accuracy"] >= 0.30  # chance is 0.10
    assert metrics["test"]["n"] == 10000
    assert metrics["test_exact"] is None or metrics["test_exact"]["n"] == 1000  # only beside our rebuilt copy
    assert metrics["test"]["loss"] > 0  # one scoring: evaluation.json's, loss included
    assert 0.2 < metrics["test"]["top1"] <= metrics["test"]["top5"] <= 1
    assert metrics["epochs_run"] == 3 and metrics["train_images_per_s"] > 0
    epochs_s = sum(float(row["epoch_time_s"]) for row in csv.DictReader((run / "history.csv").open()))
    parts = metrics["setup_s"] + epochs_s + metrics["evaluation_s"]  # set-up counts in the wall time
    assert metrics["setup_s"] > 0 and metrics["evaluation_s"] > 0 and parts <= metrics["wall_time_s"] + 0.2
    assert "AVX-512: " in metrics["machine"]["cpu"]  # speeds differ with the CPU: say which ran
    assert metrics["code"] and "platform" not in metrics["machine"]  # the commit, no host kernel string
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["best_epoch"] == metrics["best_epoch"] and saved["finished"] is True
    assert krecipe.read_toml(run / "recipe.toml") == recipe
    header = (run / "history.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "val_loss_sd"} <= set(header)
    history = rundir.read_history(run)
    assert (history["val_loss_sd"] > 0).all()  # the images' spread of the validation loss, for its standard error
    reloaded = keras.models.load_model(run / "best.keras", compile=False)
    assert reloaded.output_shape == (None, 10)
    plain = subprocess.run([sys.executable, "-c", "import sys, keras; print(keras.models.load_model(sys.argv[1])"
                            ".output_shape)", str(run / "best.keras")], capture_output=True, text=True)
    assert plain.stdout.strip() == "(None, 10)", plain.stderr[-2000:]  # in plain Keras: no kcifar optimizer inside


def test_finished_run_is_not_overwritten(tiny_cifar10, tmp_path):
    args = ["--epochs", "1", "--val-size", "20", "--batch-size", "16", "--name", "tiny"]
    assert run_cli(args, tmp_path / "runs", extra_env={"TF_ENABLE_ONEDNN_OPTS": "0"}).returncode == 0
    before = (tmp_path / "runs" / "tiny" / "metrics.json").read_text()
    assert json.loads(before)["machine"]["onednn"] is False  # what the process ran, not only the variable
    assert json.loads(before)["precision"] == machine.auto_precision()
    again = run_cli(args, tmp_path / "runs")
    assert again.returncode == 2 and "holds a finished run; pass --overwrite" in again.stderr
    assert (tmp_path / "runs" / "tiny" / "metrics.json").read_text() == before
    different = run_cli(args + ["--overwrite", "--lr", "0.01", "--precision", "float32"], tmp_path / "runs",
                        extra_env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert different.returncode == 0
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["precision"] == "float32" and metrics["machine"]["onednn"] is (platform.machine() == "x86_64")
    figures = {p.name for p in (tmp_path / "runs" / "tiny").glob("*.png")}
    assert {"learning_curves.png", "confusion.png", "per_class_accuracy.png", "predictions.png"} <= figures


WORKER = textwrap.dedent("""
    import sys
    from kcifar import recipe, train
    r = recipe.resolve(None, sys.argv[3:])
    train.train(r, sys.argv[1], sys.argv[2], verbose=0)
""")


def _start(runs_dir, data_dir, overrides):
    return subprocess.Popen([sys.executable, "-c", WORKER, str(runs_dir), str(data_dir), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _weights(path):
    return keras.models.load_model(path, compile=False).get_weights()


def test_kill_and_resume_equals_an_uninterrupted_run(real_cifar10_dir, tmp_path):
    overrides = ["data.train_subset=1000", "data.val_size=500", "train.epochs=3", "train.batch_size=50",
                 "train.deterministic=true", "augment.preset=crop_flip", "schedule.name=cosine", "name=r"]
    whole = _start(tmp_path / "whole", real_cifar10_dir, overrides)
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    killed = _start(tmp_path / "resumed", real_cifar10_dir, overrides)
    meta = tmp_path / "resumed" / "r" / "backup" / "training_metadata.json"
    deadline = time.time() + 300
    while not (meta.exists() and meta.read_text().strip()) and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "resumed" / "r" / "metrics.json").exists(), "killed too late: the run had finished"

    resumed = _start(tmp_path / "resumed", real_cifar10_dir, overrides)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming" in err
    history = (tmp_path / "resumed" / "r" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1", "2"]
    for a, b in zip(_weights(tmp_path / "whole" / "r" / "best.keras"), _weights(tmp_path / "resumed" / "r" / "best.keras")):
        np.testing.assert_array_equal(a, b)
    whole_metrics = json.loads((tmp_path / "whole" / "r" / "metrics.json").read_text())
    resumed_metrics = json.loads((tmp_path / "resumed" / "r" / "metrics.json").read_text())
    assert whole_metrics["test"] == resumed_metrics["test"]
    assert [(s["first_epoch"], s["last_epoch"]) for s in whole_metrics["segments"]] == [(1, 3)]
    first, second = resumed_metrics["segments"]  # which process ran which epochs, and where
    assert first["first_epoch"] == 1 and second["first_epoch"] == first["last_epoch"] + 1 and second["last_epoch"] == 3
    assert first["cpu"] == whole_metrics["machine"]["cpu"] and first["precision"] == whole_metrics["precision"]


MIRRORED = textwrap.dedent("""
    import sys, numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from kcifar import machine, models, recipe, run, train
    r = recipe.resolve(None, ["train.batch_size=32"])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 32, 3)).astype("float32")
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, 32)]
    losses = []
    for name in ("default", "mirrored"):
        strategy = machine.make_strategy(name)
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = models.build("s3_tutorial")
            run.check_weight_averaging(r, steps_per_epoch=10)
            run.prepare_model(model, r)
            run.compile_model(model, r, steps_per_epoch=10, jit=False)
        losses.append(float(model.train_on_batch(x, y, return_dict=True)["loss"]))
        print(name, strategy.num_replicas_in_sync, losses[-1])
    r = recipe.resolve(None, ["train.strategy=mirrored", "train.epochs=1", "data.val_size=20", "name=m"])
    metrics = train.train(r, sys.argv[1], verbose=0).metrics
    print("trained", metrics["epochs_run"], metrics["test"]["n"])
""")


def test_mirrored_strategy_on_two_logical_cpus(tiny_cifar10, tmp_path):
    out = subprocess.run([sys.executable, "-c", MIRRORED, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    single_replicas, single_loss = lines["default"].split()
    mirrored_replicas, mirrored_loss = lines["mirrored"].split()
    assert (single_replicas, mirrored_replicas) == ("1", "2")
    assert float(mirrored_loss) == pytest.approx(float(single_loss), rel=1e-5)
    assert lines["trained"] == "1 20"


@pytest.mark.parametrize("args, message", [
    (["--model", "vgg17"], "unknown model 'vgg17'; choose one of:"),
    (["--set", "optimizer.lr=0.1"], "unknown recipe key 'optimizer.lr'"),
    (["--optimizer", "adagrad"], "choose one of: sgd, sgd_muon, adam, adamw, rmsprop"),
    (["--set", "train.epochs=many"], "'train.epochs' must be int"),
    (["missing.toml"], "recipe file missing.toml not found"),
    (["--set", "model_args.widthh=3"], "has no option widthh"),
    (["--strategy", "multiworker"], "reads the cluster from TF_CONFIG, which is not set"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_cifar10, tmp_path, args, message):
    result = run_cli(args + ["--epochs", "1", "--val-size", "20"], tmp_path / "runs")
    assert result.returncode == 2
    assert message in result.stderr and len(own_stderr_lines(result.stderr)) == 1
    assert not (tmp_path / "runs").exists()


def test_unwritable_runs_dir(tiny_cifar10, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    result = run_cli(["--epochs", "1", "--val-size", "20"], tmp_path / "file" / "runs")
    assert result.returncode == 2 and "cannot write" in result.stderr


@pytest.mark.parametrize("damaged", ["metrics.json", "backup/training_metadata.json"])
def test_a_damaged_state_file_is_one_line_naming_it(tiny_cifar10, tmp_path, damaged):
    """A truncated metrics.json or backup metadata is never silently used, nor a traceback."""
    args = ["--epochs", "1", "--val-size", "20", "--batch-size", "16", "--name", "tiny"]
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "backup").mkdir(parents=True)
    (run_dir / "recipe.toml").write_text(krecipe.to_toml(krecipe.resolve(None, [
        "train.epochs=1", "data.val_size=20", "train.batch_size=16", "name='tiny'"])))
    (run_dir / damaged).write_text('{"epoch": 1, "fini')
    result = run_cli(args, tmp_path / "runs")
    lines = own_stderr_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1
    assert damaged.split("/")[-1] in lines[0] and "--overwrite" in lines[0]
    assert run_cli(args + ["--overwrite"], tmp_path / "runs").returncode == 0


HOLD_LOCK = "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"


@pytest.mark.skipif(sys.platform == "win32", reason="run locks use POSIX flock")
def test_a_second_process_on_the_same_run_is_refused_until_the_first_dies(tiny_cifar10, tmp_path):
    """Two terminals, one command: the second refuses with one line and touches nothing;
    once the first is killed (kill -9), its lock is gone and the command runs."""
    runs, args = tmp_path / "runs", ["--epochs", "1", "--val-size", "20", "--batch-size", "16", "--name", "tiny"]
    runs.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(runs / ".tiny.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_cli(args, runs)
        assert refused.returncode == 2 and "another process is training" in refused.stderr
        assert own_stderr_lines(refused.stderr) == [own_stderr_lines(refused.stderr)[-1]]  # one line
        assert not (runs / "tiny").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run_cli(args, runs).returncode == 0
    assert json.loads((runs / "tiny" / "metrics.json").read_text())["finished"] is True


def test_interrupted_run_of_another_recipe_is_refused(tiny_cifar10, tmp_path):
    recipe = krecipe.resolve(None, ["name=x", "data.val_size=20"])
    run = tmp_path / "x"
    run.mkdir()
    (run / "recipe.toml").write_text(krecipe.to_toml({**recipe, "seed": 1}))
    with pytest.raises(KcifarError, match="interrupted run of a different recipe"):
        train(recipe, tmp_path, verbose=0)
