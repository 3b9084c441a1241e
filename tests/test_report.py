"""kcifar.report on hand-written run directories (metrics.json + recipe.toml)."""

import csv
import json

import pytest

from kcifar import report


def write_run(root, name, metrics, documented=None):
    run = root / name
    run.mkdir(parents=True)
    recipe = f'name = "{name}"\nmodel = "{metrics.get("model", "x")}"\ndataset = "cifar10"\n'
    if documented:
        recipe += f'[documented]\naccuracy = {documented[0]}\nsource = "{documented[1]}"\n'
    (run / "recipe.toml").write_text(recipe)
    (run / "metrics.json").write_text(json.dumps({"run": name, **metrics}))
    return run


def metrics(top1, exact=None, **extra):
    return {"model": "s3_tutorial", "dataset": "cifar10", "finished": True, "best_val_accuracy": 0.6123,
            "best_epoch": 7, "epochs_run": 10, "test": {"top1": top1, "top5": 0.95, "loss": 1.1},
            "test_exact": None if exact is None else {"top1": exact, "top5": 0.96, "n": 1000},
            "wall_time_s": 3725.4, "train_images_per_s": 1534.2,
            "machine": {"arch": "x86_64", "cpus": 2}, **extra}


def test_table_compares_the_exact_figure_with_the_documented_one(tmp_path):
    exact_run = write_run(tmp_path, "s3_adam", metrics(0.60, exact=0.6312), (0.61, "S3: Adam with amsgrad"))
    plain_run = write_run(tmp_path, "s3_sgd", metrics(0.55, finished=False), (0.61, "S3: Adam with amsgrad"))
    bare_run = write_run(tmp_path, "vgg", metrics(0.9), (0.0, ""))  # what a resolved recipe holds when undocumented
    md, csv_path = report.write_report([exact_run, plain_run, bare_run], tmp_path / "out" / "table")

    rows = list(csv.DictReader(csv_path.open()))
    assert [r["run"] for r in rows] == ["s3_adam", "s3_sgd", "vgg"]
    assert rows[0]["test_top1_all_pct"] == "60.0" and rows[0]["test_top1_exact_pct"] == "63.12"
    assert rows[0]["documented_pct"] == "61.0" and rows[0]["difference_pp"] == "2.12"
    assert rows[0]["compared_with"] == "pixel-exact test" and rows[0]["machine"] == "arch=x86_64, cpus=2"
    assert rows[1]["difference_pp"] == "-6.0" and rows[1]["compared_with"] == "all test"
    assert rows[2]["documented_pct"] == "" and rows[2]["difference_pp"] == ""

    text = md.read_text()
    assert "| s3_adam | s3_tutorial | cifar10 | 10 (7) | 61.23 % | 60.00 % | 63.12 % (n=1000) | 1:02:05 | 1534 |" in text
    assert "61.00 % (S3: Adam with amsgrad) | +2.12 pp (pixel-exact test) |" in text
    assert "s3_sgd (unfinished)" in text and "-6.00 pp (all test)" in text
    assert "python -m kcifar.report" in text and "- vgg: arch=x86_64, cpus=2; code: not recorded" in text
    assert "(kcifar.report at commit " in text


def test_a_figure_documented_on_another_data_set_is_not_subtracted(tmp_path):
    run = write_run(tmp_path, "lite0", metrics(0.905, exact=0.96), (0.78, "S1 goal (CIFAR-100, 0.78)"))
    with open(run / "recipe.toml", "a") as f:
        f.write('dataset = "cifar100"\n')  # appended inside [documented]
    row = report.table_row(run)
    assert row["difference_pp"] is None and row["compared_with"] == "no CIFAR-10 figure documented"
    assert "| no CIFAR-10 figure documented |" in report.to_markdown([row], "python -m kcifar.report runs/lite0")


def test_no_path_above_the_checkout_and_no_kernel_string_in_the_table(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    run = write_run(tmp_path / "elsewhere" / "runs", "r", metrics(0.5, machine={"platform": "Linux-6.1-x86_64",
                                                                                 "arch": "x86_64"}))
    report.main([str(run), "--out", "results/t"])
    text = (checkout / "results" / "t.md").read_text() + (checkout / "results" / "t.csv").read_text()
    assert str(tmp_path) not in text and "Linux-6.1" not in text
    assert "python -m kcifar.report .../runs/r --out results/t" in text and "arch=x86_64" in text


def test_cli_writes_both_files_and_leaves_no_temporaries(tmp_path, capsys):
    run = write_run(tmp_path, "r", metrics(0.5))
    report.main([str(run), "--out", str(tmp_path / "results" / "t")])
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["t.csv", "t.md"]
    assert "python -m kcifar.report" in (tmp_path / "results" / "t.md").read_text()
    assert capsys.readouterr().out.count("wrote ") == 2


@pytest.mark.parametrize("breakage, message", [
    (lambda run: (run / "metrics.json").unlink(), "has no metrics.json"),
    (lambda run: (run / "metrics.json").write_text("{oops"), "not valid JSON"),
    (lambda run: (run / "recipe.toml").write_text("name = "), "not valid TOML"),
])
def test_broken_run_gives_one_line(tmp_path, capsys, breakage, message):
    run = write_run(tmp_path, "r", metrics(0.5))
    breakage(run)
    with pytest.raises(SystemExit) as exit_info:
        report.main([str(run), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and "\n" not in err
    assert not (tmp_path / "t.md").exists()


def test_missing_run_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "nope")])
    assert "is not a run directory" in capsys.readouterr().err


def test_without_out_the_table_is_printed_and_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = write_run(tmp_path / "runs", "r", metrics(0.5))
    report.main([str(run)])
    out = capsys.readouterr().out
    assert out.startswith("#") and "| r |" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no experiments/results/table.* appeared
