"""kcifar.run and the pieces under it (kcifar.callbacks, kcifar.machine): which epoch is best, the saver,
the Keras home, and an import that changes nothing in the process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from kcifar import callbacks as kcallbacks, data, machine, models, run, rundir
from kcifar.errors import KcifarError
from kcifar.models import pretrained


def test_best_index_is_the_first_best_by_the_monitors_direction():
    assert rundir.best_index([0.2, 0.5, 0.5, 0.3], "val_accuracy") == 1
    assert rundir.best_index([2.0, 1.0, 1.0, 1.5], "val_loss") == 1
    assert rundir.best_index([np.nan, 0.4, np.nan], "val_accuracy") == 1
    assert rundir.best_index([], "val_loss") is None and rundir.best_index(None, "val_loss") is None


def test_best_so_far_counts_patience_from_history():
    assert rundir.best_so_far({"val_accuracy": np.array([0.2, 0.5, 0.4, 0.3])}, "val_accuracy") == (0.5, 2)
    assert rundir.best_so_far({"val_loss": np.array([2.0, 1.0])}, "val_loss") == (1.0, 0)
    assert rundir.best_so_far({}, "val_loss") == (None, 0)


@pytest.mark.parametrize("patience", [0, 1, 3])
def test_stopped_early_agrees_with_keras_early_stopping(patience):
    """A run killed after EarlyStopping stopped it (while it was being scored) trains no more
    epochs when resumed: ``stopped_early`` reads from the history where Keras' own callback stopped."""
    recipe = {"early_stopping": {"enabled": True, "monitor": "val_accuracy", "patience": patience}}
    for seed in range(20):
        values = np.round(np.random.default_rng(seed).uniform(0, 1, 12), 1)  # ties included
        stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=patience)
        model = keras.Sequential()
        model.stop_training = False  # as model.fit sets it
        stop.set_model(model)
        stop.on_train_begin()
        stopped = None
        for epoch, value in enumerate(values):
            stop.on_epoch_end(epoch, {"val_accuracy": value})
            if stop.model.stop_training:
                stopped = epoch
                break
        for epoch in range(len(values) if stopped is None else stopped + 1):  # the epochs a run logs
            history = {"epoch": np.arange(epoch + 1), "val_accuracy": values[:epoch + 1]}
            assert rundir.stopped_early(recipe, history) is (epoch == stopped), (values, epoch, stopped)
    assert not rundir.stopped_early({"early_stopping": {**recipe["early_stopping"], "enabled": False}},
                                 {"epoch": np.arange(3), "val_accuracy": np.array([0.5, 0.1, 0.1])})


def test_best_model_saver_keeps_the_best_epoch_and_leaves_no_temporaries(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    saver = kcallbacks.BestModelSaver(tmp_path / "best.keras", "val_accuracy", best=0.5)
    saver.set_model(model)
    saved = []
    for epoch, accuracy in enumerate([0.4, 0.6, 0.55, 0.7]):
        model.layers[0].set_weights([np.full((2, 1), epoch, np.float32), np.zeros(1, np.float32)])
        saver.on_epoch_end(epoch, {"val_accuracy": accuracy})
        saved.append(keras.models.load_model(tmp_path / "best.keras").layers[-1].get_weights()[0][0, 0]
                     if (tmp_path / "best.keras").exists() else None)
    assert saved == [None, 1, 1, 3]  # 0.4 does not beat the resumed run's 0.5
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]


def test_history_resumed_by_code_that_logs_other_columns_keeps_its_header(tmp_path):
    """A run started before a column existed (val_loss_sd) and resumed after: the rows keep the
    header's columns (NA where a column is not logged, new columns left out), never shifted."""
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,top5,val_loss\n0,2.0,0.5,1.9\n")
    logger = kcallbacks.HistoryLogger(str(path), append=True)
    logger.on_train_begin()
    logger.on_epoch_end(1, {"loss": 1.5, "loss_sd": 0.7, "val_loss": 1.4, "val_loss_sd": 0.8})
    logger.on_train_end()
    assert path.read_text().splitlines() == ["epoch,loss,top5,val_loss", "0,2.0,0.5,1.9", "1,1.5,NA,1.4"]
    rundir.trim_history(tmp_path, 2)  # a whole history, as resuming checks it
    fresh = kcallbacks.HistoryLogger(str(tmp_path / "new.csv"), append=True)
    fresh.on_train_begin()
    fresh.on_epoch_end(0, {"loss": 1.5, "val_loss_sd": 0.8})
    fresh.on_train_end()
    assert (tmp_path / "new.csv").read_text().splitlines()[0] == "epoch,loss,val_loss_sd"


def test_loss_spread_is_the_standard_deviation_of_the_per_image_loss_over_batches():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(100, 10)).astype("float32")
    labels = np.eye(10, dtype="float32")[rng.integers(0, 10, 100)]
    spread = run.LossSpread(label_smoothing=0.1)
    spread.update_state(labels[:37], logits[:37])
    spread.update_state(labels[37:], logits[37:])
    per_image = keras.losses.categorical_crossentropy(labels, logits, from_logits=True, label_smoothing=0.1)
    assert float(spread.result()) == pytest.approx(float(np.std(per_image)), rel=1e-5)


def test_one_keras_home_when_the_variable_is_empty(monkeypatch):
    monkeypatch.setenv("KERAS_HOME", "")
    assert data.keras_cache_dir() == Path.home() / ".keras" / "datasets"
    assert pretrained.cache_dir() == Path.home() / ".keras" / "kcifar"


IMPORT_EVERYTHING = """
import os, sys, warnings
filters = list(warnings.filters)
import kcifar, kcifar.train, kcifar.finetune, kcifar.evaluate, kcifar.predict, kcifar.report
import kcifar.augment.preview, kcifar.augment.__main__
assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ, "import set TF_ENABLE_ONEDNN_OPTS"
assert not any("affine_transform" in str(f[1]) for f in warnings.filters), "import added a warning filter"
import matplotlib
assert matplotlib.get_backend() == "svg", "import chose another matplotlib backend"
print("clean")
"""


def test_importing_kcifar_changes_nothing_in_the_process():
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True,
                         env={**env, "TF_CPP_MIN_LOG_LEVEL": "2", "MPLBACKEND": "svg"}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr[-2000:]


@pytest.mark.parametrize("flags, gpu, expected", [
    ({"avx2", "fma"}, False, "float32"),  # bfloat16 emulated: slower
    ({"avx2", "avx512f", "avx512_bf16"}, False, "mixed_bfloat16"),  # AMD Zen 4, Intel Cooper Lake
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, False, "mixed_bfloat16"),  # Intel Sapphire Rapids and later
    ({"avx2"}, True, "mixed_float16"),
])
def test_auto_precision_is_decided_by_the_device(monkeypatch, flags, gpu, expected):
    monkeypatch.setattr(machine, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(machine, "_is_gpu_machine", lambda: gpu)
    assert machine.auto_precision() == expected
    assert machine.set_precision("auto") == expected and keras.mixed_precision.global_policy().name == expected


def test_cpu_description_names_the_bfloat16_flags(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: "model name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 "
                                                 "amx_bf16 amx_tile\n")
    assert machine.cpu_flags() >= {"avx512_bf16", "amx_bf16"}
    assert machine.cpu_description() == "Some Xeon; AVX-512: avx512_bf16 avx512f; AMX: amx_bf16 amx_tile"


def test_cpu_steal_is_the_eighth_field_of_the_cpu_line_in_seconds(tmp_path):
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK")
    stat.write_text(f"cpu  1039167 0 107567 818936 3825 0 399 {3 * ticks} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert machine.cpu_steal_seconds(stat) == 3.0
    stat.write_text("cpu  1 2 3 4\n")  # a kernel without the field
    assert machine.cpu_steal_seconds(stat) is None and machine.cpu_steal_seconds(tmp_path / "none") is None


@pytest.mark.parametrize("description, expected", [
    ("AMD EPYC; AVX-512: avx512_bf16 avx512f avx512vl", "AMD EPYC, AVX512_BF16"),
    ("Intel(R) Xeon(R) Processor; AVX-512: avx512_bf16 avx512f; AMX: amx_bf16 amx_int8", "Intel Xeon, AMX-BF16"),
    ("Intel(R) Xeon(R) Processor; AVX-512: avx512f avx512vl", "Intel Xeon, AVX-512 (no bf16)"),
    ("AMD EPYC 7B13 64-Core Processor; AVX-512: none", "AMD EPYC, no AVX-512"),
    ("Intel(R) Xeon(R) Processor; AVX-512: avx512f; AMD EPYC; AVX-512: avx512_bf16 avx512f",
     "Intel Xeon, AVX-512 (no bf16) / AMD EPYC, AVX512_BF16"),
    ("", "not recorded")])
def test_short_cpu_names_vendor_family_and_the_flag_that_decides_precision(description, expected):
    assert machine.short_cpu(description) == expected


@pytest.mark.parametrize("steps, expected", [(704, 16), (1407, 7), (11250, 15), (13, 13), (17, 1), (1, 1)])
def test_steps_per_execution_divides_the_epoch(steps, expected):
    assert run.steps_per_execution(steps) == expected


def test_several_steps_per_execution_train_exactly_as_one():
    """Same batches, same schedule: the weights after two epochs agree whatever Keras'
    steps_per_execution (it only changes how often Python is entered)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 8)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, 96)]
    results = []
    for steps in (1, 4):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
        model.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, 24)),
                      loss="categorical_crossentropy", steps_per_execution=steps)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        results.append(model.get_weights())
        assert int(model.optimizer.iterations) == 24  # 12 steps an epoch, not rounded up
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_an_interrupted_run_of_older_code_resumes_when_newer_code_added_recipe_keys(tmp_path):
    from kcifar import recipe as krecipe

    recipe = krecipe.resolve(overrides=["name=old"])
    run_dir = run.open_run_dir(tmp_path, recipe, overwrite=False)
    saved = krecipe.read_toml(run_dir / "recipe.toml")
    del saved["train"]["tta"], saved["augment"]["alternate_flip"]  # keys this run's code did not know yet
    (run_dir / "recipe.toml").write_text(krecipe.to_toml(saved))
    assert run.open_run_dir(tmp_path, recipe, overwrite=False) == run_dir  # no metrics.json: it resumes
    (run_dir / "recipe.toml").write_text(krecipe.to_toml({**saved, "seed": 7}))
    with pytest.raises(KcifarError, match="interrupted run of a different recipe"):
        run.open_run_dir(tmp_path, recipe, overwrite=False)


def test_the_recorded_command_line_runs_again_as_written():
    line = machine.command_line(["--note", "nothing else running", "--out", "a b/x.md", "--repeats", "20"])
    assert line.startswith("python ") and line.endswith(
        "--note 'nothing else running' --out 'a b/x.md' --repeats 20")


def test_a_result_file_opens_with_command_cpu_date_and_commit_and_names_no_local_folder(monkeypatch):
    monkeypatch.setattr(machine.sys, "argv", ["experiments/bench_speed.py", "--out", "/home/me/checkout/speed.md"])
    monkeypatch.setattr(machine, "cpu_description", lambda: "Some EPYC; AVX-512: avx512_bf16")
    monkeypatch.setattr(machine, "code_version", lambda: "abc1234")
    command, cpu, date = machine.provenance(cpu_note="shared with another job")
    assert command.startswith("- command: `python ") and command.endswith(" --out …/speed.md`")
    assert "/home/me" not in command
    assert cpu == f"- CPU: Some EPYC; AVX-512: avx512_bf16; {os.cpu_count()} cores; shared with another job"
    assert re.fullmatch(r"- date: 20\d\d-\d\d-\d\d \d\d:\d\d \(UTC\); commit: abc1234", date)


def test_code_version_counts_code_changes_but_not_the_recorded_results(tmp_path, monkeypatch):
    """A sweep rewrites experiments/results/ while later runs record the commit: that is output,
    not a change of the code the runs use; an edit under kcifar/ is."""
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})

    (tmp_path / "kcifar").mkdir()
    (tmp_path / "experiments" / "results").mkdir(parents=True)
    (tmp_path / "kcifar" / "x.py").write_text("a = 1\n")
    (tmp_path / "experiments" / "results" / "study.md").write_text("old\n")
    (tmp_path / "experiments" / "REPORT.md").write_text("old\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    monkeypatch.setattr(machine, "REPOSITORY", tmp_path)
    (tmp_path / "experiments" / "results" / "study.md").write_text("new\n")
    (tmp_path / "experiments" / "REPORT.md").write_text("new\n")
    assert "uncommitted" not in machine.code_version()
    (tmp_path / "kcifar" / "x.py").write_text("a = 2\n")
    assert machine.code_version().endswith(" plus uncommitted changes")


def test_segments_say_which_epochs_ran_where_and_skip_a_process_that_finished_none(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "cpu_description", lambda: "CPU A")
    rundir.record_segment(tmp_path, {"first_epoch": 1, **run.this_process()})
    rundir.record_segment(tmp_path, {"first_epoch": 3, **run.this_process()})  # killed before its first epoch ended
    monkeypatch.setattr(machine, "cpu_description", lambda: "CPU B")
    rundir.record_segment(tmp_path, {"first_epoch": 3, **run.this_process()})
    history = {"train_images_per_s": np.array([50.0, 100.0, 40.0, 80.0, 90.0])}
    summaries = rundir.segment_summaries(tmp_path, history)
    assert [(s["cpu"], s["first_epoch"], s["last_epoch"], s["train_images_per_s"]) for s in summaries] == [
        ("CPU A", 1, 2, 100.0), ("CPU B", 3, 5, 85.0)]
    assert rundir.segment_summaries(tmp_path / "missing", history) == []


@pytest.mark.parametrize("flags, policy, conv_grad, expected", [
    ({"avx512f", "avx512_bf16"}, "mixed_bfloat16", "auto", (64, 128)),  # measured: results/conv_grad_*.md
    ({"avx512f", "avx512_bf16"}, "float32", "auto", (0, 0)),
    ({"avx512_bf16", "amx_bf16"}, "mixed_bfloat16", "auto", (0, 0)),  # not measured on AMX: TF's kernel
    ({"avx2"}, "float32", "auto", (0, 0)),
    ({"avx512f", "avx512_bf16"}, "mixed_bfloat16", "native", (0, 0)),
    ({"avx2"}, "float32", "matmul", (sys.maxsize, 0)),
])
def test_matmul_kernel_gradients_are_decided_by_cpu_and_precision(monkeypatch, flags, policy, conv_grad, expected):
    monkeypatch.setattr(machine, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(machine, "_is_gpu_machine", lambda: False)
    keras.mixed_precision.set_global_policy(policy)
    assert machine.matmul_kernel_grad_rule(conv_grad) == expected


def test_prepare_model_routes_the_recipes_convolutions():
    from kcifar import recipe as krecipe

    for conv_grad, expected in (("matmul", 8), ("native", 0)):  # VGG11: eight 3x3 'same' convolutions
        r = krecipe.resolve(None, ["model=vgg11", f"train.conv_grad={conv_grad}"])
        model = models.build("vgg11")
        assert run.prepare_model(model, r) == expected
        run.compile_model(model, r, steps_per_epoch=10, jit=False)


def test_weight_averaging_must_end_each_epoch_on_the_average():
    from kcifar import recipe as krecipe

    r = krecipe.resolve(None, ["optimizer.ema_momentum=0.99", "optimizer.ema_overwrite_frequency=3"])
    with pytest.raises(KcifarError, match="ema_overwrite_frequency=3 does not divide the 10 steps of an epoch"):
        run.check_weight_averaging(r, steps_per_epoch=10)
    run.check_weight_averaging(r, steps_per_epoch=9)


@pytest.mark.parametrize("jit, asked, expected", [(False, True, True), (True, True, False), (False, False, False)])
def test_fused_optimizer_updates_only_without_xla_and_when_asked(jit, asked, expected):
    from kcifar import recipe as krecipe

    model = models.build("s3_tutorial")
    run.compile_model(model, krecipe.resolve(None, [f"optimizer.fused={str(asked).lower()}"]), steps_per_epoch=10, jit=jit)
    assert model.optimizer.fused is expected  # TensorFlow's fused training kernels have no XLA version
