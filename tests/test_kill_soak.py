"""Kill soak (issue 18): ``kcifar.train``, ``kcifar.finetune`` and ``kcifar.sweep`` killed with
SIGKILL at chosen moments (each named by the files the process writes, tests/soak.py), the
same command started again after each kill; the end equals the same command never stopped:
best.keras weights exactly, history.csv (but its timing columns), the test scores and
evaluation.json. No epoch a backup held is trained again, and no temporary file is left.
The uninterrupted run goes on in parallel with the killed one."""

import os

import pytest
from conftest import tiny_backbone, write_cifar10
from soak import (backup_epoch, backup_writing, differences, kept_rows_lost, soak, stages, start, temporaries,
                  writing, mid_epoch)


@pytest.fixture
def data(tmp_path):
    """A synthetic CIFAR-10 of 1,000 training and 200 test images: epochs long enough to kill inside."""
    write_cifar10(tmp_path / "data", per_batch=200, n_test=200)
    return {"KCIFAR_DATA_DIR": str(tmp_path / "data")}


def _pngs(run_dir):
    return lambda: run_dir.exists() and any(name.endswith(".png") for name in os.listdir(run_dir))


EPOCHS = 7  # a retried kill moves the run on: enough epochs left for "mid-epoch" (two ends + half) on a busy CPU
TRAIN = ["--deterministic", "--epochs", str(EPOCHS), "--val-size", "100", "--batch-size", "50", "--augment", "crop_flip",
         "--schedule", "cosine", "--set", "model_args.dropout=0.2", "--set", "model_args.head_dropout=0.2",
         "--name", "r", "--quiet"]  # dropout: its random-number state must resume too


def test_train_killed_at_five_moments_ends_as_if_never_stopped(tmp_path, data):
    whole = start("kcifar.train", [*TRAIN, "--runs-dir", tmp_path / "whole"], data, tmp_path / "whole.log")
    run_dir = tmp_path / "killed" / "r"
    moments = [
        ("best-model save", lambda: lambda: writing(run_dir, "best"), "best-model save"),
        ("backup write", lambda: lambda: backup_epoch(run_dir) is not None and backup_writing(run_dir), "backup write"),
        ("mid-epoch", lambda: mid_epoch(run_dir), "epoch "),
        ("final test scoring", lambda: lambda: backup_epoch(run_dir) == EPOCHS, "final test scoring"),
        ("figure writing", lambda: _pngs(run_dir), "figure writing"),
    ]
    kills = soak("kcifar.train", [*TRAIN, "--runs-dir", run_dir.parent], data, run_dir, moments, EPOCHS, tmp_path / "killed.log")
    assert whole.wait() == 0, (tmp_path / "whole.log").read_text()
    print(*(f"{kill['label']}: {kill['phase']}" for kill in kills), sep="\n")
    assert differences(tmp_path / "whole" / "r", run_dir) == []
    assert kept_rows_lost(kills) == [] and temporaries(run_dir.parent) == []


def test_finetune_killed_in_its_feature_cache_and_both_stages_ends_as_if_never_stopped(tmp_path, data):
    args = ["--backbone", tiny_backbone(tmp_path / "backbone"), "--quiet",
            *(f"--set={s}" for s in ("name=f", "data.val_size=100", "train.batch_size=50", "train.deterministic=true",
                                     "early_stopping.enabled=false", "finetune.unfreeze_blocks=1",
                                     "finetune.stage1_epochs=3", "finetune.stage2_epochs=2"))]
    whole = start("kcifar.finetune", [*args, "--runs-dir", tmp_path / "whole"],
                  {**data, "KERAS_HOME": str(tmp_path / "keras_whole")}, tmp_path / "whole.log")
    run_dir, features = tmp_path / "killed" / "f", tmp_path / "keras_killed" / "kcifar" / "features"
    moments = [
        ("feature cache", lambda: lambda: any(features.glob("*/val.npy.sha256")), "feature caching"),
        ("stage 1 best-model save", lambda: lambda: writing(run_dir, "stage1"), "best-model save"),
        ("stage 1 backup write", lambda: lambda: backup_epoch(run_dir) is not None and backup_writing(run_dir),
         "backup write"),  # resumed inside stage 1: its data must go on where it was
        ("stage 2 backup write", lambda: lambda: stages(run_dir) == ["1"] and backup_epoch(run_dir) == 3
         and backup_writing(run_dir), "backup write"),
    ]
    kills = soak("kcifar.finetune", [*args, "--runs-dir", run_dir.parent], {**data, "KERAS_HOME": str(features.parents[1])},
                 run_dir, moments, 5, tmp_path / "killed.log", features=features)
    assert whole.wait() == 0, (tmp_path / "whole.log").read_text()
    print(*(f"{kill['label']}: {kill['phase']}" for kill in kills), sep="\n")
    assert differences(tmp_path / "whole" / "f", run_dir) == []
    assert kept_rows_lost(kills) == [] and temporaries(run_dir.parent) == []


STUDY = """description = "kill soak"
seeds = [0]
[base]
data.val_size = 100
train.epochs = 3
train.batch_size = 50
train.deterministic = true
early_stopping.enabled = false
[grid]
"optimizer.learning_rate" = [0.001, 0.003]
"""


def test_sweep_killed_in_each_cell_ends_as_if_never_stopped(tmp_path, data):
    from kcifar.sweep.study import load_study

    (tmp_path / "soak.toml").write_text(STUDY)
    names = [recipe["name"] for _, _, recipe in load_study(tmp_path / "soak.toml").runs()]
    whole = start("kcifar.sweep", [tmp_path / "soak.toml", "--runs-dir", tmp_path / "whole"], data, tmp_path / "whole.log")
    first, second = (tmp_path / "killed" / "soak" / name for name in names)
    moments = [
        ("cell 1 backup write", lambda: lambda: backup_epoch(first) is not None and backup_writing(first), "backup write"),
        ("cell 2 best-model save", lambda: lambda: writing(second, "best"), "best-model save"),
    ]
    training = lambda: next((cell for cell in (first, second) if not (cell / "metrics.json").exists()), second)  # noqa: E731
    kills = soak("kcifar.sweep", [tmp_path / "soak.toml", "--runs-dir", tmp_path / "killed"], data, training, moments, 3,
                 tmp_path / "killed.log")
    assert whole.wait() == 0, (tmp_path / "whole.log").read_text()
    print(*(f"{kill['label']}: {kill['phase']}" for kill in kills), sep="\n")
    for name, killed in zip(names, (first, second)):
        assert differences(tmp_path / "whole" / "soak" / name, killed) == [], name
    assert kept_rows_lost(kills) == [] and temporaries(tmp_path / "killed") == []
