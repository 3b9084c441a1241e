"""`--strategy multiworker`: two worker processes on localhost ports (CPU, the 62k-parameter
s3_tutorial, a tiny synthetic CIFAR-10, 2 epochs of 5 steps, fixed seeds).

One scenario, run once: both workers start; worker 1 is killed (kill -9) once the chief
has backed up an epoch; the chief must end with one clear line; both are started again
and must resume and finish. A single-process run of the same recipe is the reference.
Every worker process has a deadline and is killed at the end."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import own_stderr_lines, write_cifar10

from kcifar import multiworker, recipe as krecipe, rundir
from kcifar.errors import KcifarError
from kcifar.train import train

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses kill -9 and localhost ports")

OVERRIDES = ["model=s3_tutorial", "train.epochs=2", "train.batch_size=16", "data.val_size=20",
             "train.precision=float32", "name=mw"]  # 80 training images: 5 global batches of 16 (8 a worker)
DEADLINE_S = 240  # per round of worker processes

# kcifar.train's command, which also saves the kept model's weights of this worker for the test
WORKER = textwrap.dedent("""
    import sys
    from kcifar.cli import start_command
    start_command()
    import numpy as np
    from kcifar import train
    trained = train.train
    def train_and_keep_weights(*args, **kwargs):
        result = trained(*args, **kwargs)
        np.savez(sys.argv[1], *result.model.get_weights())
        return result
    train.train = train_and_keep_weights
    train.main(sys.argv[2:])
""")


def start_workers(tmp, runs_dir, data_dir, round_name):
    """Both workers of a fresh two-worker cluster on localhost."""
    tf_configs = multiworker.local_tf_configs(2)
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KCIFAR_DATA_DIR": str(data_dir),
               "TMPDIR": str(tmp / f"{round_name}_tmp{index}"),
               "TF_CONFIG": tf_configs[index]}
        (tmp / f"{round_name}_tmp{index}").mkdir()
        args = [*(arg for o in OVERRIDES for arg in ("--set", o)), "--strategy", "multiworker", "--runs-dir", str(runs_dir), "--quiet"]
        workers.append(subprocess.Popen([sys.executable, "-c", WORKER, str(tmp / f"{round_name}{index}.npz"), *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return workers


def wait_all(workers, deadline):
    """(return code, stderr) of each worker; kills every one still running at ``deadline``."""
    out = []
    for worker in workers:
        try:
            _, err = worker.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            pytest.fail(f"a worker did not end within {DEADLINE_S} s")
        out.append((worker.returncode, err))
    return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiworker")
    data_dir = tmp / "data"
    write_cifar10(data_dir)
    runs = tmp / "runs"
    workers = start_workers(tmp, runs, data_dir, "killed")
    try:
        meta = runs / "mw" / "backup" / "training_metadata.json"
        deadline = time.time() + DEADLINE_S
        while time.time() < deadline and all(w.poll() is None for w in workers) and not (
                meta.exists() and meta.read_text().strip()):
            time.sleep(0.05)
        workers[1].send_signal(signal.SIGKILL)
        killed = wait_all(workers, deadline)
        finished_before_kill = (runs / "mw" / "metrics.json").exists()
        workers = start_workers(tmp, runs, data_dir, "resumed")
        resumed = wait_all(workers, time.time() + DEADLINE_S)
    finally:
        for worker in workers:
            worker.kill()
    single = train(krecipe.resolve(None, [*OVERRIDES, "train.strategy=default"]),
                   tmp / "single", data_dir, verbose=0)
    return {"tmp": tmp, "runs": runs, "killed": killed, "finished_before_kill": finished_before_kill,
            "resumed": resumed, "single": single}


def _weights(path):
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def test_killing_a_worker_is_one_clear_line_and_rerunning_resumes(scenario):
    assert not scenario["finished_before_kill"], "killed too late: the run had finished"
    (chief_code, chief_err), _ = scenario["killed"]
    assert chief_code == 2, chief_err
    assert own_stderr_lines(chief_err)[-1].startswith("error: a worker of the cluster stopped (/job:worker/")
    assert "start every worker again with the same command" in chief_err
    for code, err in scenario["resumed"]:
        assert code == 0, err
        assert "resuming" in err


def test_both_workers_end_with_identical_weights(scenario):
    chief, other = (_weights(scenario["tmp"] / f"resumed{i}.npz") for i in range(2))
    for a, b in zip(chief, other, strict=True):
        np.testing.assert_array_equal(a, b)


def test_two_workers_equal_one_process_with_the_same_global_batch(scenario):
    two = rundir.read_history(scenario["runs"] / "mw")
    one = rundir.read_history(scenario["single"].run_dir)
    for column in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(two[column], one[column], rtol=1e-4, atol=1e-6)
    single_weights = scenario["single"].model.get_weights()
    for a, b in zip(_weights(scenario["tmp"] / "resumed0.npz"), single_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_only_the_chief_writes_the_run_directory(scenario):
    runs = scenario["runs"]
    assert sorted(p.name for p in runs.iterdir()) == [".mw.lock", "mw"]
    history = (runs / "mw" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1"]  # one writer: one row an epoch
    assert json.loads((runs / "mw" / "metrics.json").read_text())["finished"] is True
    killed_copy, = (scenario["tmp"] / "killed_tmp1").glob("kcifar-worker-*/mw")  # worker 1 trained in a copy,
    assert (killed_copy / "recipe.toml").is_file()  # left behind by kill -9,
    assert not list((scenario["tmp"] / "resumed_tmp1").glob("kcifar-worker-*"))  # removed when it ended


@pytest.mark.parametrize("config, message", [
    (None, "reads the cluster from TF_CONFIG, which is not set"),
    ("{not json", "TF_CONFIG must be JSON like"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}', "is not in its cluster"),
])
def test_a_bad_tf_config_is_one_line(config, message):
    with pytest.raises(KcifarError, match=message):
        multiworker.check_tf_config(config)


def test_local_tf_configs_name_one_cluster_of_distinct_ports_and_each_workers_index():
    configs = multiworker.local_tf_configs(3)
    for config in configs:
        multiworker.check_tf_config(config)
    parsed = [json.loads(config) for config in configs]
    addresses = parsed[0]["cluster"]["worker"]
    assert len(set(addresses)) == 3 and all(p["cluster"]["worker"] == addresses for p in parsed)
    assert [p["task"]["index"] for p in parsed] == [0, 1, 2]


def test_finetune_and_sweep_refuse_multiworker(tmp_path):
    from kcifar import finetune
    from kcifar.sweep.runner import run_study
    from kcifar.sweep.study import load_study

    with pytest.raises(KcifarError, match="'multiworker' is for kcifar.train"):
        finetune.finetune(finetune.resolve_recipe(None, ["train.strategy=multiworker"]), tmp_path / "runs")
    study = tmp_path / "s.toml"
    study.write_text('seeds = [0]\n[base]\ntrain.strategy = "multiworker"\n[grid]\n"train.epochs" = [1]\n')
    with pytest.raises(KcifarError, match="'multiworker' is for kcifar.train"):
        run_study(load_study(study), tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


def test_workers_that_would_resume_at_different_epochs_are_refused():
    import tensorflow as tf

    class TwoWorkers(tf.distribute.MultiWorkerMirroredStrategy):  # gather's answer only: no cluster
        def __init__(self, epochs):
            self.epochs = epochs

        num_replicas_in_sync = 2

        def gather(self, value, axis):
            return tf.constant(self.epochs)

    multiworker.check_same_on_every_worker(TwoWorkers([2, 2]), 2)
    with pytest.raises(KcifarError, match=r"resume at different epochs \[2, 0\].*shared by all machines"):
        multiworker.check_same_on_every_worker(TwoWorkers([2, 0]), 2)
