"""One command-line convention: the shared flags mean the same in every command, --help shows the
defaults and the allowed values, the `kcifar` command dispatches, runs set by flags get their own name,
a collision is refused before the data is read, evaluations never overwrite a run's own, and a sweep
with failed runs exits non-zero."""

import importlib
import json
import re

import numpy as np
import pytest

from kcifar import cli, finetune, train
from kcifar.recipe import DEFAULTS
from kcifar.sweep.__main__ import main as sweep_main

SHARED_HELP = {"--data-dir": "folder holding the CIFAR data", "--runs-dir": "where run directories go",
               "--overwrite": "replace a finished run (or output)", "--quiet": "no per-epoch log",
               "--verbose": "Keras' per-epoch log"}


def help_text(module_name, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module_name).main(["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare on one line


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_gives_each_shared_flag_one_meaning(command, capsys):
    text = help_text(cli.COMMANDS[command], capsys)
    for flag, meaning in SHARED_HELP.items():
        if re.search(rf"{flag}\b", text):
            assert meaning in text, f"{command}: {flag} without its shared meaning"
    for other in ("--quiet", "--verbose"):  # the pair goes together
        assert (re.search(r"--quiet\b", text) is None) == (re.search(r"--verbose\b", text) is None), other


def test_train_help_shows_defaults_and_allowed_values(capsys):
    text = help_text("kcifar.train", capsys)
    assert f"sets train.epochs (default: {DEFAULTS['train']['epochs']}, or the recipe file's)" in text
    assert "sets optimizer.name: sgd, sgd_muon, adam, adamw, rmsprop" in text
    assert "--runs-dir RUNS_DIR where run directories go (default: runs)" in text
    assert "sets model: airbench94," in text and "--tensorboard" in text and "--print-recipe" in text


def test_kcifar_command_dispatches_and_refuses_unknown_commands(capsys):
    cli.main(["models", "--num-classes", "100"])
    assert "vgg16" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["trian"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown command 'trian'" in err and "commands: train," in err


def test_print_recipe_prints_toml_and_trains_nothing(tmp_path, capsys):
    train.main(["--epochs", "3", "--tensorboard", "--runs-dir", str(tmp_path / "runs"), "--print-recipe"])
    out = capsys.readouterr().out
    assert 'name = "s3_tutorial_epochs-3"' in out and "epochs = 3" in out and "tensorboard = true" in out
    assert not (tmp_path / "runs").exists()


def test_a_run_set_by_flags_is_named_after_them():
    def name(*argv):
        return train.recipe_from_args(train.parse_args(list(argv)))["name"]

    assert name() == "s3_tutorial"
    assert name("--model", "resnet20") == "resnet20"
    assert name("--lr", "0.01", "--seed", "2") == "s3_tutorial_learning_rate-0.01_seed-2"
    assert name("experiments/recipes/s4_vgg16_final.toml", "--epochs", "2") == "s4_vgg16_final_epochs-2"
    assert name("--epochs", "2", "--name", "mine") == "mine"
    assert name("--tensorboard") == "s3_tutorial"  # logging changes no result


def test_a_collision_is_refused_before_the_data_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KCIFAR_DATA_DIR", str(tmp_path / "no_data_here"))
    finished = tmp_path / "runs" / "s3_tutorial"
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text(json.dumps({"finished": True}))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--runs-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 2
    assert "holds a finished run; pass --overwrite" in capsys.readouterr().err  # not: the data is missing


def test_finetune_takes_trains_name_epochs_and_seed():
    recipe = finetune.recipe_from_args(finetune.parse_args(["--name", "ft", "--epochs", "4", "--seed", "7"]))
    assert (recipe["name"], recipe["finetune"]["stage1_epochs"], recipe["seed"]) == ("ft", 4, 7)


def test_evaluate_with_other_tta_writes_beside_the_runs_own_files(tiny_cifar10, tmp_path, capsys):
    from kcifar import evaluate

    runs = tmp_path / "runs"
    train.main(["--epochs", "1", "--val-size", "20", "--batch-size", "16", "--name", "tiny", "--runs-dir", str(runs),
                "--quiet"])
    own = (runs / "tiny" / "evaluation.json").read_text()
    evaluate.main([str(runs / "tiny"), "--tta", "flip"])
    assert (runs / "tiny" / "evaluation.json").read_text() == own
    flipped = json.loads((runs / "tiny" / "evaluation_tta-flip" / "evaluation.json").read_text())
    assert flipped["tta"] == "flip" and "evaluation_tta-flip" in capsys.readouterr().out


def test_a_sweep_with_a_failed_run_exits_1_naming_it(tiny_cifar10, tmp_path, capsys):
    study = tmp_path / "study.toml"
    study.write_text('seeds = [0]\n[base.train]\nepochs = 1\nbatch_size = 16\n[base.data]\nval_size = 20\n'
                     '[grid]\n"optimizer.learning_rate" = [0.001, 0.002]\n')
    stray = tmp_path / "runs" / "study" / "learning_rate-0.002-s0"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("not a run")  # this cell cannot start: its folder is no run
    with pytest.raises(SystemExit) as exit_info:
        sweep_main([str(study), "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "error: run learning_rate-0.002-s0 failed:" in err and "1 run(s) of study failed" in err
    assert (tmp_path / "runs" / "study" / "learning_rate-0.001-s0" / "metrics.json").is_file()
    assert np.isfinite(json.loads((tmp_path / "runs" / "study" / "learning_rate-0.001-s0" / "metrics.json")
                                  .read_text())["test"]["top1"])
