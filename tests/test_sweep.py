"""kcifar.sweep: study files, skip / resume / budget on a tiny synthetic grid, summaries, dry-run, bad input."""

import csv
import json
import statistics
import time

import numpy as np
import pytest
from conftest import one_line_error

from kcifar import recipe as krecipe
from kcifar.sweep import estimate, runner, summary
from kcifar.sweep.__main__ import main
from kcifar.sweep.study import load_study

TINY_BASE = """
[base]
data.val_size = 20
train.epochs = 2
train.batch_size = 16
early_stopping.enabled = false
"""


def write_study(folder, body, name="tiny"):
    path = folder / f"{name}.toml"
    path.write_text(body)
    return path


def tiny_grid(folder, seeds="[0, 1]"):
    return write_study(folder, f'description = "tiny"\nseeds = {seeds}\n{TINY_BASE}\n'
                               '[grid]\n"optimizer.learning_rate" = [0.001, 0.003]\n')


# ------------------------------------------------------------ study files (no training)


def test_grid_expands_into_named_cells_with_seeded_recipes(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.toml").write_text('model = "s0_base"\n[train]\nepochs = 8\n')
    path = write_study(tmp_path, 'recipe = "recipes/base.toml"\nseeds = [3, 4]\n[base]\ndataset = "cifar10"\n'
                                 '[grid]\n"model_args.blocks" = [[6, 16], [16, 32]]\n"train.batch_size" = [32, 64]\n'
                                 '"train.epochs" = [4]\n')
    study = load_study(path)
    assert study.name == "tiny" and study.keys == ["model_args.blocks", "train.batch_size"]
    assert not study.training_curves  # the curves show validation only unless the study asks
    assert load_study(write_study(tmp_path, 'training_curves = true\n' + path.read_text(), "t2")).training_curves
    assert [c.name for c in study.cells] == ["blocks-6x16_batch_size-32", "blocks-6x16_batch_size-64",
                                             "blocks-16x32_batch_size-32", "blocks-16x32_batch_size-64"]
    order = [r["name"] for _, _, r in study.runs()]  # seed by seed: every cell's seed 3 before any seed 4
    assert order[3:5] == ["blocks-16x32_batch_size-64-s3", "blocks-6x16_batch_size-32-s4"] and len(order) == 8
    cell, seed, recipe = list(study.runs())[-1]
    assert (seed, recipe["seed"], recipe["name"]) == (4, 4, "blocks-16x32_batch_size-64-s4")
    assert recipe["model"] == "s0_base" and recipe["dataset"] == "cifar10"
    assert recipe["model_args"] == {"blocks": [16, 32]} and recipe["train"] == {**recipe["train"], "batch_size": 64,
                                                                                 "epochs": 4}


def test_cell_list_takes_each_cells_recipe_and_name(tmp_path):
    for step, epochs in (("a", 3), ("b", 5)):
        (tmp_path / f"step_{step}.toml").write_text(f"[train]\nepochs = {epochs}\n")
    path = write_study(tmp_path, 'seeds = [0]\n[base]\ndataset = "cifar10"\n'
                                 '[[cells]]\nrecipe = "step_a.toml"\n'
                                 '[[cells]]\nrecipe = "step_b.toml"\n'
                                 '[[cells]]\nname = "b_capped"\nrecipe = "step_b.toml"\ntrain.epochs = 2\n')
    study = load_study(path)
    assert [c.name for c in study.cells] == ["step_a", "step_b", "b_capped"]
    assert [c.recipes[0]["train"]["epochs"] for c in study.cells] == [3, 5, 2]


def test_a_cell_may_give_its_own_seeds_which_run_after_every_cells_first(tmp_path):
    (tmp_path / "step.toml").write_text("[train]\nepochs = 3\n")
    path = write_study(tmp_path, 'seeds = [0]\n[[cells]]\nname = "a"\nrecipe = "step.toml"\n'
                                 '[[cells]]\nname = "b"\nrecipe = "step.toml"\nseeds = [0, 5]\n'
                                 '[[cells]]\nname = "c"\nrecipe = "step.toml"\n')
    study = load_study(path)
    assert [c.seeds for c in study.cells] == [(0,), (0, 5), (0,)]
    assert [r["name"] for _, _, r in study.runs()] == ["a-s0", "b-s0", "c-s0", "b-s5"]
    assert study.cells[1].recipes[1]["seed"] == 5
    assert study.seeds_text() == "seeds [0] (b: [0, 5])"
    fake_run(tmp_path / "runs" / "tiny", study.cells[1].recipes[0], 0.60)
    summary.write_summary(study, tmp_path / "runs")
    rows = {r["cell"]: r for r in csv.DictReader((tmp_path / "runs" / "tiny" / "tiny.csv").open())}
    assert [(rows[c]["seeds_done"], rows[c]["seeds"]) for c in "abc"] == [("0", "1"), ("1", "2"), ("0", "1")]
    assert "seeds [0] (b: [0, 5]), 3 cells; 1 of 4 runs finished" in (tmp_path / "runs" / "tiny" / "tiny.md").read_text()
    bad = write_study(tmp_path, 'seeds = [0]\n[[cells]]\nrecipe = "step.toml"\nseeds = [1, 1]\n', "bad")
    with pytest.raises(Exception, match="seeds must be a non-empty list of distinct integers"):
        load_study(bad)


@pytest.mark.parametrize("body, message", [
    ('seeds = [0]\n[grid]\n"optimizer.lr" = [0.1, 0.2]\n', "unknown recipe key 'optimizer.lr'"),
    ("seeds = [0]\n[grid]\n", "[grid] must map recipe keys to non-empty lists"),
    ('seeds = [0]\n[grid]\n"train.epochs" = []\n', "[grid] must map recipe keys to non-empty lists"),
    ('recipe = "missing.toml"\nseeds = [0]\n[grid]\n"train.epochs" = [1, 2]\n', "base recipe"),
    ('seeds = []\n[grid]\n"train.epochs" = [1, 2]\n', "seeds must be a non-empty list"),
    ('seeds = [0]\n[grid]\nseed = [1, 2]\n', "the sweep sets seed itself"),
    ('seeds = [0]\n[grid]\n"train.epochs" = [0, 1]\n', "train.epochs must be at least 1"),
    ('seeds = [0]\n', "give either a [grid] table or a [[cells]] list"),
    ('seeds = [0]\ngrid_typo = 1\n', "unknown key grid_typo"),
    ('seeds = [0]\ntraining_curves = "yes"\n[grid]\n"train.epochs" = [1, 2]\n', "training_curves must be true or false"),
])
def test_bad_study_is_one_line_and_writes_nothing(tmp_path, capsys, body, message):
    path = write_study(tmp_path, body)
    err = one_line_error(main, [str(path), "--runs-dir", str(tmp_path / "runs")], capsys)
    assert message in err
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    err = one_line_error(main, [str(tiny_grid(tmp_path)), "--runs-dir", str(tmp_path / "runs"),
                                "--out", str(tmp_path / "file" / "results")], capsys)
    assert "cannot write" in err and not (tmp_path / "runs").exists()


# ------------------------------------------------------------ running: skip, resume, budget


def _interrupt_second_epoch(monkeypatch):
    """Make the next training raise KeyboardInterrupt at the end of its second epoch (after the
    first epoch's backup), as a Ctrl-C there would."""
    from kcifar import callbacks as kcallbacks

    original = kcallbacks.EpochStats.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, epoch, logs)

    monkeypatch.setattr(kcallbacks.EpochStats, "on_epoch_end", on_epoch_end)
    return lambda: monkeypatch.setattr(kcallbacks.EpochStats, "on_epoch_end", original)


def test_budget_stop_interrupt_resume_skip_and_summary(tiny_cifar10, tmp_path, monkeypatch):
    study = load_study(tiny_grid(tmp_path))
    runs = tmp_path / "runs"
    names = [recipe["name"] for _, _, recipe in study.runs()]

    clock = iter([0.0, 0.0] + [3600.0] * len(names))  # the first run starts at once, then an hour has passed
    monkeypatch.setattr(runner, "monotonic", lambda: next(clock))
    first = runner.run_study(study, runs, budget_min=1, log=lambda line: None)
    monkeypatch.setattr(runner, "monotonic", time.monotonic)
    assert first.ran == names[:1] and first.left == names[1:] and first.skipped == []
    finished_metrics = (runs / "tiny" / names[0] / "metrics.json").read_text()

    restore = _interrupt_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        runner.run_study(study, runs, log=lambda line: None)
    restore()
    interrupted = runs / "tiny" / names[1]
    assert not (interrupted / "metrics.json").exists() and (interrupted / "backup").is_dir()

    lines = []
    last = runner.run_study(study, runs, command="python -m kcifar.sweep tiny.toml", log=lines.append)
    assert last.skipped == names[:1] and last.ran == names[1:] and last.left == []
    assert f"[2/4] {names[1]}: training (resuming)" in lines
    assert (runs / "tiny" / names[0] / "metrics.json").read_text() == finished_metrics  # skipped, untouched
    history = list(csv.DictReader((interrupted / "history.csv").open()))
    assert [row["epoch"] for row in history] == ["0", "1"]  # resumed at epoch 2, no epoch twice
    for name in names:
        run = runs / "tiny" / name
        assert {"metrics.json", "evaluation.json", "provenance.json", "learning_curves.png"} <= {p.name for p in run.iterdir()}
    assert json.loads((runs / "tiny" / names[1] / "provenance.json").read_text())["command"].endswith("tiny.toml")

    out = tmp_path / "results" / "tiny"
    written = summary.write_summary(study, runs, out, command=f"python -m kcifar.sweep {tmp_path}/tiny.toml")
    assert [p.name for p in written] == ["tiny.md", "tiny.csv", "tiny_top1.png", "tiny_curves.png"]
    rows = list(csv.DictReader((out / "tiny.csv").open()))
    assert [r["cell"] for r in rows] == ["learning_rate-0.001", "learning_rate-0.003"]
    for row, cell in zip(rows, study.cells):
        metrics = [json.loads((runs / "tiny" / r["name"] / "metrics.json").read_text()) for r in cell.recipes]
        top1 = [100 * m["test"]["top1"] for m in metrics]
        assert float(row["test_all_top1_mean"]) == pytest.approx(statistics.fmean(top1), abs=0.005)
        assert float(row["test_all_top1_std"]) == pytest.approx(statistics.stdev(top1), abs=0.005)
        assert float(row["val_top1_mean"]) == pytest.approx(
            statistics.fmean(100 * m["best_val_accuracy"] for m in metrics), abs=0.005)
        assert row["seeds_done"] == "2" and row["epochs_mean"] == "2.0" and row["test_exact_top1_mean"] == ""

    recorded = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert f"{names[0]}/metrics.json" in recorded and f"{names[0]}/learning_curves.png" in recorded
    assert not [p for p in recorded if p.endswith(".keras") or "backup" in p or "confusion" in p]
    for path in out.rglob("*"):
        if path.suffix in (".json", ".csv", ".md", ".toml"):
            assert str(tmp_path) not in path.read_text(), f"{path} names a folder of this machine"
    text = (out / "tiny.md").read_text()
    assert "| learning_rate-0.001 | 0.001 | 2/2 |" in text and "## Test top-1 per class" in text


def test_a_failing_run_is_reported_and_the_others_go_on(tiny_cifar10, tmp_path):
    study = load_study(write_study(tmp_path, f'seeds = [0, 1]\n{TINY_BASE}\n[grid]\n"model_args.widthh" = [1, 2]\n'))
    lines = []
    progress = runner.run_study(study, tmp_path / "runs", log=lines.append)
    assert [name for name, _ in progress.failed] == ["widthh-1-s0", "widthh-2-s0", "widthh-1-s1", "widthh-2-s1"]
    assert all("has no option widthh" in message for _, message in progress.failed) and progress.ran == []
    assert lines[-1] == "tiny: 0 run(s) trained now, 0 finished before, 4 failed, 0 left for later"


# ------------------------------------------------------------ summary numbers and dry-run (no training)


HISTORY = "epoch,accuracy,loss,val_accuracy,val_loss\n0,0.3,2.0,0.4,1.8\n1,0.5,1.5,0.5,1.6\n"


def fake_run(folder, recipe, top1, exact=None, val=0.5, cpu="test cpu", speed=1000.0, precision=None, epochs=3,
             train_images=45000, history=HISTORY):
    run = folder / recipe["name"]
    run.mkdir(parents=True)
    (run / "recipe.toml").write_text(krecipe.to_toml(recipe))
    metrics = {"run": recipe["name"], "model": recipe["model"], "finished": True, "best_val_accuracy": val,
               "epochs_run": epochs, "test": {"top1": top1, "n": 10000},
               "test_exact": None if exact is None else {"top1": exact, "n": 1000}, "wall_time_s": 60.0,
               "train_images_per_s": speed, "train_images": train_images, "machine": {"cpu": cpu}}
    if precision:
        metrics["precision"] = precision
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "history.csv").write_text(history)
    return run


def test_summary_is_mean_and_sample_std_of_the_runs_and_marks_missing_seeds(tmp_path):
    study = load_study(write_study(tmp_path, 'seeds = [0, 1, 2]\n[grid]\n"train.epochs" = [3, 4]\n'))
    first, second = study.cells
    for recipe, top1, exact in zip(first.recipes, (0.50, 0.60, 0.70), (0.52, 0.62, 0.75)):
        fake_run(tmp_path / "runs" / "tiny", recipe, top1, exact)
    fake_run(tmp_path / "runs" / "tiny", second.recipes[0], 0.40)  # one seed of three done
    summary.write_summary(study, tmp_path / "runs")
    rows = list(csv.DictReader((tmp_path / "runs" / "tiny" / "tiny.csv").open()))
    assert (rows[0]["test_all_top1_mean"], rows[0]["test_all_top1_std"]) == ("60.0", "10.0")
    assert (rows[0]["test_exact_top1_mean"], rows[0]["test_exact_top1_std"]) == ("63.0", "11.53")
    assert (rows[1]["seeds_done"], rows[1]["test_all_top1_mean"], rows[1]["test_all_top1_std"]) == ("1", "40.0", "")
    assert rows[0]["cpu"] == "test cpu" and rows[0]["commit"] == ""  # no provenance.json: not recorded
    text = (tmp_path / "runs" / "tiny" / "tiny.md").read_text()
    assert ("| epochs-3 | 3 | 3/3 | 50.00 ± 0.00 % | 60.00 ± 10.00 % | 63.00 ± 11.53 % | 1.600 ± 0.000 (2) | 1.600 | "
            "3 (3) | 45,000 (5,000) |") in text
    assert "| epochs-4 | 4 | 1/3 | 50.00 % | 40.00 % | – |" in text and "not recorded" in text


def test_where_a_cell_ran_names_every_cpu_precision_and_commit_that_trained_it(tmp_path):
    """A run stopped on one CPU and resumed on another (S4's 50-epoch runs across working periods):
    the summary shows each segment's CPU, precision and commit, not only the last process's."""
    study = load_study(write_study(tmp_path, 'seeds = [0]\n[grid]\n"train.epochs" = [3]\n'))
    run = fake_run(tmp_path / "runs" / "tiny", study.cells[0].recipes[0], 0.60, cpu="cpu B", precision="mixed_bfloat16")
    metrics = json.loads((run / "metrics.json").read_text())
    segments = [{"first_epoch": 1, "cpu": "cpu A", "precision": "float32", "code": "aaa1111"},
                {"first_epoch": 3, "cpu": "cpu B", "precision": "mixed_bfloat16"}]  # older: no code recorded
    (run / "metrics.json").write_text(json.dumps({**metrics, "code": "bbb2222", "segments": segments}))
    summary.write_summary(study, tmp_path / "runs")
    row, = csv.DictReader((tmp_path / "runs" / "tiny" / "tiny.csv").open())
    assert (row["cpu"], row["precision"], row["commit"]) == ("cpu A; cpu B", "float32; mixed_bfloat16",
                                                             "aaa1111; bbb2222")
    assert "| cpu A; cpu B | float32; mixed_bfloat16 | aaa1111; bbb2222 |" in (tmp_path / "runs" / "tiny" / "tiny.md").read_text()


def test_the_lowest_validation_loss_its_epoch_its_spread_and_the_last_one():
    """Read from the history: the overfitting a write-up judges by (validation loss rising after its low)."""
    history = {"val_loss": np.array([1.0, 0.6, 0.8, np.nan]), "val_loss_sd": np.array([0.9, 0.7, 0.8, np.nan])}
    assert summary.lowest_val_loss(history) == {"loss": 0.6, "epoch": 2, "sd": 0.7, "last": 0.8}
    assert summary.lowest_val_loss({"val_loss": np.array([1.0, 0.6])})["sd"] is None  # logged before the column
    assert summary.lowest_val_loss({"val_loss": np.array([np.nan, np.nan])}) is None  # no validation split
    assert summary.lowest_val_loss({"loss": np.array([1.0])}) is None


def test_a_run_recorded_by_an_older_version_of_the_study_is_left_out(tmp_path):
    """S4 step 1 went from 10,000 training images to all of them under the same study and run names:
    the summary counts the new scale's run, never the old one's still in the results folder."""
    old = load_study(write_study(tmp_path, 'seeds = [0]\n[[cells]]\nname = "vgg"\ndata.train_subset = 10000\n'
                                           '[[cells]]\nname = "other"\n'))
    new = load_study(write_study(tmp_path, 'seeds = [0]\n[[cells]]\nname = "vgg"\n[[cells]]\nname = "other"\n'))
    out = tmp_path / "results"
    fake_run(out, old.cells[0].recipes[0], 0.70)  # recorded by the old study file
    fake_run(out, old.cells[1].recipes[0], 0.75)  # the same training in both versions
    summary.write_summary(new, tmp_path / "runs", out)
    rows = {r["cell"]: r for r in csv.DictReader((out / "tiny.csv").open())}
    assert (rows["vgg"]["seeds_done"], rows["vgg"]["test_all_top1_mean"]) == ("0", "")
    assert (rows["other"]["seeds_done"], rows["other"]["test_all_top1_mean"]) == ("1", "75.0")
    fake_run(tmp_path / "runs" / "tiny", new.cells[0].recipes[0], 0.80)  # the new scale's run finishes
    summary.write_summary(new, tmp_path / "runs", out)
    rows = {r["cell"]: r for r in csv.DictReader((out / "tiny.csv").open())}
    assert (rows["vgg"]["seeds_done"], rows["vgg"]["test_all_top1_mean"]) == ("1", "80.0")


def test_a_run_trained_outside_the_sweep_counts_as_it_was_written(tmp_path):
    """A kcifar.train run copied into the runs folder (seed 0 first, the sweep for the rest):
    skipped untouched (its TTA evaluation too, no provenance made up), its own commit shown."""
    study = load_study(write_study(tmp_path, 'seeds = [0]\n[grid]\n"train.tta" = ["flip"]\n'))
    run = fake_run(tmp_path / "runs" / "tiny", study.cells[0].recipes[0], 0.60)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "code": "abc1234", "tta": "flip"}))
    per_class = [{"class": "cat", "n": 5000, "accuracy": 0.6}, {"class": "dog", "n": 5000, "accuracy": 0.6}]
    evaluation = json.dumps({"tta": "flip", "all": {"top1": 0.60, "n": 10000}, "per_class": per_class})
    (run / "evaluation.json").write_text(evaluation)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    progress = runner.run_study(study, tmp_path / "runs", command="python -m kcifar.sweep tiny.toml",
                                log=lambda line: None)
    assert progress.skipped == [run.name] and progress.ran == []
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    summary.write_summary(study, tmp_path / "runs")
    assert list(csv.DictReader((tmp_path / "runs" / "tiny" / "tiny.csv").open()))[0]["commit"] == "abc1234"


def test_a_run_another_study_finished_with_the_same_recipe_is_copied_not_trained(tmp_path, monkeypatch):
    """S4's remedies "none" is step 1's VGG16: the second study copies it under its own name (its
    provenance says from where, the command that trained it kept) and trains only what is new."""
    first = load_study(write_study(tmp_path, 'seeds = [0]\n[grid]\n"train.epochs" = [3]\n', name="step1"))
    second = load_study(write_study(tmp_path, 'seeds = [0]\n[base]\ndocumented.accuracy = 0.9\n'
                                              '[[cells]]\nname = "none"\ntrain.epochs = 3\n'
                                              '[[cells]]\nname = "longer"\ntrain.epochs = 4\n', name="step2"))
    twin = fake_run(tmp_path / "runs" / "step1", first.cells[0].recipes[0], 0.60)
    (twin / "provenance.json").write_text(json.dumps({"command": "python -m kcifar.sweep step1.toml"}))
    trained = []
    monkeypatch.setattr(runner, "run_one", lambda recipe, *args: trained.append(recipe["name"]))
    assert [r["runs_left"] for r in estimate.estimate(second, tmp_path / "runs", tmp_path / "none")] == [0, 1]
    assert runner.finished_twin(tmp_path / "runs", "step1", first.cells[0].recipes[0]) is None  # not itself

    lines = []
    progress = runner.run_study(second, tmp_path / "runs", log=lines.append)
    copy = tmp_path / "runs" / "step2" / "none-s0"
    assert progress.copied == ["none-s0"] and trained == ["longer-s0"]
    assert "same recipe and seed as step1/epochs-3-s0" in lines[0] and "1 copied from other studies" in lines[-1]
    assert krecipe.with_defaults(krecipe.read_toml(copy / "recipe.toml")) == second.cells[0].recipes[0]
    metrics = json.loads((copy / "metrics.json").read_text())
    assert (metrics["run"], metrics["test"]["top1"]) == ("none-s0", 0.60)
    assert json.loads((copy / "provenance.json").read_text()) == {
        "command": "python -m kcifar.sweep step1.toml", "copied_from": "step1/epochs-3-s0"}
    assert (copy / "history.csv").read_bytes() == (twin / "history.csv").read_bytes()


def test_a_hand_written_reading_survives_a_new_summary(tmp_path):
    study = load_study(write_study(tmp_path, 'seeds = [0, 1]\n[grid]\n"train.epochs" = [3]\n'))
    fake_run(tmp_path / "runs" / "tiny", study.cells[0].recipes[0], 0.50)
    summary.write_summary(study, tmp_path / "runs")
    md = tmp_path / "runs" / "tiny" / "tiny.md"
    reading = "\n## Reading (today)\n\nSeed 0 alone: 50 %.\n"
    md.write_text(md.read_text() + reading)
    fake_run(tmp_path / "runs" / "tiny", study.cells[0].recipes[1], 0.70)
    summary.write_summary(study, tmp_path / "runs")
    text = md.read_text()
    assert "| epochs-3 | 3 | 2/2 |" in text and "60.00 ± 14.14 %" in text  # the table is new ...
    assert text.endswith(reading) and text.count("## Reading") == 1  # ... the reading kept, once


def test_dry_run_lists_every_cell_with_a_time_and_where_its_speed_comes_from(tmp_path, capsys, monkeypatch):
    from kcifar.machine import auto_precision, cpu_description

    monkeypatch.chdir(tmp_path)  # no experiments/results/ here: the runs this repository recorded do not count
    study_path = tiny_grid(tmp_path, seeds="[0, 1, 2]")
    study = load_study(study_path)
    main([str(study_path), "--runs-dir", str(tmp_path / "runs"), "--dry-run"])
    out = capsys.readouterr().out
    assert "learning_rate-0.001" in out and "learning_rate-0.003" in out and "runs left: 6" in out
    assert "assumed 50 GFLOPS" in out and not (tmp_path / "runs").exists()

    fake_run(tmp_path / "runs" / "tiny", study.cells[0].recipes[0], 0.5, cpu=cpu_description(), speed=1234.0,
             precision=auto_precision())  # the precision "auto" picks here, as kcifar.train records it
    rows = estimate.estimate(study, tmp_path / "runs", tmp_path / "no_results")
    assert rows[0]["runs_left"] == 2 and rows[0]["images_per_s"] == 1234.0 and rows[0]["source"].startswith("measured")
    assert rows[0]["per_run_s"] == pytest.approx((2 * (50000 - 20 + 20 / 3) + 2 * 10000 / 3) / 1234.0)
    assert rows[1]["images_per_s"] == 1234.0  # another learning rate, same model and batch: same speed


def test_a_run_is_timed_by_its_fastest_segment_on_this_cpu():
    """VGG11 at documented scale ran 8 epochs beside the test suite (86 images/s), then 12 alone (162):
    the estimate takes 162; a segment on another CPU, or none recorded, leaves the run's own figure."""
    metrics = {"train_images_per_s": 103.2, "segments": [{"cpu": "xeon", "train_images_per_s": 85.7},
                                                         {"cpu": "xeon", "train_images_per_s": 162.1},
                                                         {"cpu": "epyc", "train_images_per_s": 210.0}]}
    assert estimate.alone_speed(metrics, "xeon") == 162.1
    assert estimate.alone_speed(metrics, "avx2") == 103.2
    assert estimate.alone_speed({"train_images_per_s": 50.0}, "xeon") == 50.0


def test_a_run_under_way_times_its_model_and_counts_only_its_epochs_left(tmp_path):
    """The S4 final's first seed, 31 of 50 epochs done: its segments time VGG16 alone, the fastest
    run of a model is the estimate (another shared the CPU), and the seed left counts 19 epochs."""
    study = load_study(write_study(tmp_path, f'seeds = [0, 1]\n{TINY_BASE}\n[grid]\n"train.epochs" = [4]\n'))
    first, second = study.cells[0].recipes
    fake_run(tmp_path / "runs" / "other", {**first, "name": "shared-s0"}, 0.5, cpu="xeon", speed=48.0)
    run = tmp_path / "runs" / "tiny" / first["name"]
    run.mkdir(parents=True)
    (run / "recipe.toml").write_text(krecipe.to_toml(first))
    (run / "history.csv").write_text("epoch,loss,train_images_per_s\n0,2.0,60.0\n1,1.5,90.0\n2,1.2,88.0\n")
    (run / "segments.json").write_text(json.dumps([{"first_epoch": 1, "cpu": "xeon", "precision": "float32"},
                                                   {"first_epoch": 2, "cpu": "epyc", "precision": "float32"}]))
    assert estimate.run_speed(run, "xeon") == (estimate.model_key(first, "float32"), 60.0)  # epoch 1 alone there
    assert estimate.run_speed(run, "epyc") == (estimate.model_key(first, "float32"), 88.0)  # its first epoch dropped
    assert estimate.run_speed(run, "avx2") is None
    measured = estimate.measured_runs([tmp_path / "runs"], "xeon")
    assert sorted(speed for _, speed in measured) == [48.0, 60.0]
    assert estimate.speed_for(measured[0][0], measured) == (60.0, "measured: the fastest of 2 run(s) of this model "
                                                                  "and batch on this CPU")
    assert estimate.epochs_done(run) == 3 and estimate.epochs_done(tmp_path / "none") == 0
    assert estimate.run_cost(first, 3) == pytest.approx(1 * (50000 - 20 + 20 / 3) + 2 * 10000 / 3)
    assert estimate.run_cost(first, 9) == pytest.approx(2 * 10000 / 3)  # past the end: the test set alone


def test_speed_of_another_model_comes_from_the_flops_fitted_to_measured_runs():
    measured_key = ("s3_tutorial", "{}", "cifar10", 32, "float32")
    other_batch, other_model = measured_key[:3] + (128, "float32"), ("s0_base", "{}", "cifar10", 32, "float32")
    speed, source = estimate.speed_for(measured_key, [(measured_key, 2000.0)])
    assert speed == 2000.0 and source.startswith("measured")
    for key in (other_batch, other_model):
        speed, source = estimate.speed_for(key, [(measured_key, 2000.0)])
        gflops = estimate.fitted_gflops(measured_key, 2000.0)
        assert "fitted to 1 float32 run(s)" in source and speed == pytest.approx(estimate.step_speed(key, gflops))
    assert estimate.step_speed(measured_key, estimate.fitted_gflops(measured_key, 2000.0)) == pytest.approx(2000.0)
    wide = ("s3_tutorial", '{"dense_units": [256]}', "cifar10", 32, "float32")  # the same model's own run, other args
    measured = [(measured_key, 2000.0), (other_model, 100.0)]
    speed, source = estimate.speed_for(wide, measured)
    assert "fitted to 1 float32 run(s) of this model" in source
    assert speed == pytest.approx(estimate.step_speed(wide, estimate.fitted_gflops(measured_key, 2000.0)))
    step10 = ("s1_step10",) + other_batch[1:]  # 306 MFLOPs: s0_base (6) is nearer than s3_tutorial (1.3)
    speed, source = estimate.speed_for(step10, measured)
    assert "of s0_base, the model nearest in FLOPs" in source
    assert speed == pytest.approx(estimate.step_speed(step10, estimate.fitted_gflops(other_model, 100.0)))
    assert estimate.step_speed(other_model, 50) < estimate.step_speed(measured_key, 50)  # more FLOPs, slower
    overhead_only = ("s3_tutorial", "{}", "cifar10", 4, "float32")  # 4 images in 6.4 ms: the step overhead
    assert "assumed 50 GFLOPS" in estimate.speed_for(other_model, [(overhead_only, 626.0)])[1]
    in_bfloat16 = measured_key[:4] + ("mixed_bfloat16",)  # another precision is another speed: never mixed
    assert "no mixed_bfloat16 run" in estimate.speed_for(in_bfloat16, [(measured_key, 2000.0)])[1]
    assert "no mixed_bfloat16 run" in estimate.speed_for(other_model[:4] + ("mixed_bfloat16",),
                                                          [(measured_key, 2000.0)])[1]


def test_overlaid_curves_show_training_curves_of_runs_without_validation(tmp_path, monkeypatch):
    """fast94 trains on all 50,000 images: its history's val_ columns are NaN, so the figure shows
    its training curves (it was empty before) and labels the axes so."""
    from kcifar import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    nan = float("nan")
    no_val = {"epoch": [0, 1], "accuracy": [0.5, 0.7], "loss": [1.5, 1.0], "val_accuracy": [nan, nan], "val_loss": [nan, nan]}
    with_val = {"epoch": [0, 1], "accuracy": [0.5, 0.7], "loss": [1.5, 1.0], "val_accuracy": [0.4, 0.6], "val_loss": [1.6, 1.2]}
    plots.overlaid_curves([("a", [no_val])], tmp_path / "a.png")
    accuracy_axis = figures[-1].axes[0]
    assert list(accuracy_axis.lines[0].get_ydata()) == [0.5, 0.7]
    assert accuracy_axis.get_ylabel().startswith("training top-1")
    plots.overlaid_curves([("b", [with_val])], tmp_path / "b.png")
    assert list(figures[-1].axes[0].lines[0].get_ydata()) == [0.4, 0.6]
    assert figures[-1].axes[1].get_ylabel().startswith("validation loss")
    assert len(figures[-1].axes[1].lines) == 1  # validation only, unless asked
    plots.overlaid_curves([("b", [with_val])], tmp_path / "c.png", with_training=True)
    validation, training = figures[-1].axes[1].lines  # S2 and S4 show overfitting as the gap between them
    assert list(validation.get_ydata()) == [1.6, 1.2] and list(training.get_ydata()) == [1.5, 1.0]
    assert training.get_linestyle() == "--" and training.get_color() == validation.get_color()
    assert figures[-1].axes[1].get_ylabel().startswith("validation (solid), training (dashed) loss")


def test_an_ablation_plots_each_cell_by_name_and_a_grid_by_its_key(tmp_path, monkeypatch):
    """Cells that each set their own keys (each trick off in turn) have no common axis: the
    figure lists them by name, one series; a grid keeps its key as the axis."""
    from kcifar import plots

    drawn = []
    monkeypatch.setattr(plots, "sweep_accuracy", lambda x_labels, series, path, **kw: drawn.append((x_labels, series, kw)) or path)
    ablation = load_study(write_study(tmp_path, 'seeds = [0]\n[[cells]]\nname = "no_smoothing"\n"loss.label_smoothing" = 0.0\n'
                                                '[[cells]]\nname = "short"\n"train.epochs" = 2\n', "ablation"))
    grid = load_study(write_study(tmp_path, 'seeds = [0]\n[grid]\n"train.epochs" = [3, 4]\n', "grid"))
    for study in (ablation, grid):
        for cell in study.cells:
            fake_run(tmp_path / "runs" / study.name, cell.recipes[0], 0.5)
        summary.write_summary(study, tmp_path / "runs")
    (ablation_labels, ablation_series, ablation_kw), (grid_labels, _, grid_kw) = drawn
    assert ablation_labels == ["no_smoothing", "short"] and list(ablation_series) == ["test top-1, all"]
    assert ablation_kw["xlabel"] == "cell" and not ablation_kw["connect"]
    assert grid_labels == ["3", "4"] and grid_kw["xlabel"] == "train.epochs" and grid_kw["connect"]


def test_cells_of_two_recipes_along_one_key_are_two_series(tmp_path, monkeypatch):
    """s3_budget: SGD's and Adam's recipes at 2 and 5 epochs are two lines, never one mean of both."""
    from kcifar import plots

    drawn = []
    monkeypatch.setattr(plots, "sweep_accuracy", lambda x_labels, series, path, **kw: drawn.append(series) or path)
    for optimizer in ("sgd", "adam"):
        (tmp_path / f"{optimizer}.toml").write_text(f'[optimizer]\nname = "{optimizer}"\n')
    study = load_study(write_study(tmp_path, 'seeds = [0]\n' + "".join(
        f'[[cells]]\nname = "{o}_{e}"\nrecipe = "{o}.toml"\n"train.epochs" = {e}\n'
        for o in ("sgd", "adam") for e in (2, 5))))
    for cell, top1 in zip(study.cells, (0.50, 0.60, 0.55, 0.65)):
        fake_run(tmp_path / "runs" / study.name, cell.recipes[0], top1)
    summary.write_summary(study, tmp_path / "runs")
    assert drawn[0] == {"sgd.toml": [[50.0], [60.0]], "adam.toml": [[pytest.approx(55.0)], [pytest.approx(65.0)]]}
