"""experiments/REPORT.md: every documented finding with a verdict, the documented scale beside ours,
cells chosen on validation (never on the test set), CIFAR-100 never compared with CIFAR-10."""

import json

import pytest
from conftest import one_line_error
from test_sweep import fake_run, write_study

from kcifar import documented, plots, report
from kcifar.sweep import summary
from kcifar.sweep.study import load_study

COLUMN = {name: i for i, name in enumerate(documented.HEADER)}


def record_study(tmp_path, name, runs, dataset="cifar10", model="s3_tutorial", base="", epochs=3,
                 train_images=45000, command=None, histories=None):
    """A study summary recorded under tmp_path/results/<name>/, as kcifar.sweep --out writes it.
    ``runs`` maps each cell to its seeds' (test top-1 all, pixel-exact, validation) or to None (not run yet);
    ``histories`` a cell to its runs' history.csv text (default: test_sweep's)."""
    seeds = max(len(r) for r in runs.values() if r)
    body = f'seeds = {list(range(seeds))}\n[base]\ndataset = "{dataset}"\n{base}' + "".join(
        f'[[cells]]\nname = "{cell}"\nmodel = "{model}"\n"optimizer.learning_rate" = {0.001 * (i + 1)}\n'
        for i, cell in enumerate(runs))
    study = load_study(write_study(tmp_path, body, name))
    for cell in study.cells:
        for recipe, (top1, exact, val) in zip(cell.recipes, runs[cell.name] or []):
            history = {"history": histories[cell.name]} if histories else {}
            run = fake_run(tmp_path / "runs" / name, recipe, top1, exact, val, epochs=epochs,
                           train_images=train_images, cpu="AMD EPYC; AVX-512: avx512_bf16 avx512f", **history)
            (run / "provenance.json").write_text(json.dumps({"command": command or f"python -m kcifar.sweep {name}"}))
    summary.write_summary(study, tmp_path / "runs", tmp_path / "results" / name)


def report_rows(tmp_path):
    text = documented.write_report(tmp_path / "results", tmp_path / "REPORT.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| S")]
    return text, {(r[0].strip("| "), r[1]): r for r in rows}


def test_every_documented_finding_has_a_row_and_the_counts_say_none_is_measured(tmp_path):
    text, rows = report_rows(tmp_path)
    assert len(rows) == len(documented.BASELINES) == 37
    assert {source for source, _ in rows} == {"S0", "S1", "S2", "S3", "S4"}
    assert sum(what.startswith("step ") for source, what in rows if source == "S1") == 16  # steps 1-14, 16 and step 7's doubled filters
    assert all(row[COLUMN["verdict"]] == "**not measured yet**" for row in rows.values())
    assert "**0** holds, **0** does not hold, **0** within noise, **0** not testable here, **37** not measured yet" in text


def test_a_cifar100_figure_on_the_cifar10_stand_in_is_not_testable_and_not_subtracted(tmp_path):
    record_study(tmp_path, "s0_depth", {"s0_base": [(0.60, 0.62, 0.6), (0.61, 0.64, 0.6)]}, epochs=8)
    row = report_rows(tmp_path)[1][("S0", "depth study: base")]
    assert row[COLUMN["ours: test top-1, pixel-exact 1,000 (mean ± std over seeds)"]].startswith(
        "[63.00 ± 1.41 %](results/s0_depth/s0_depth.md) (`s0_base`")
    assert row[COLUMN["ours: test top-1, all 10,000"]] == "[60.50 ± 0.71 %](results/s0_depth/s0_depth.md)"
    assert row[COLUMN["ours − documented (± standard error)"]] == "–"
    assert row[COLUMN["verdict"]] == "**not testable here**"
    assert row[COLUMN["reason"]] == "CIFAR-10 stand-in for a CIFAR-100 figure"
    assert row[COLUMN["our scale"]] == "CIFAR-10 stand-in, 8 of 10 epochs, 45,000 images, 2/2 seeds, s3_tutorial"
    assert row[COLUMN["image passes, ours / documented"]] == "0.90x"


@pytest.mark.parametrize("exacts, verdict, reason", [
    ([0.59, 0.61], "holds", "ours − documented -1.00 ± 1.84 pp (2 seeds): within noise"),
    ([0.52, 0.54], "does not hold", "ours − documented -8.00 ± 1.87 pp (2 seeds)")])
def test_a_figure_on_its_own_data_set_gets_the_difference_its_error_and_a_verdict(tmp_path, exacts, verdict, reason):
    """S3's 61 %: ours on the pixel-exact 1,000 over 2 seeds; the error adds the binomial error of
    1,000 images (1.55-1.58 pp here) and the seeds' spread (1.41 / √2 pp)."""
    record_study(tmp_path, "s3_per_class", {"adam_amsgrad": [(0.55, e, 0.5) for e in exacts]}, epochs=2)
    row = report_rows(tmp_path)[1][("S3", "Adam with amsgrad")]
    assert row[COLUMN["ours − documented (± standard error)"]] == reason.split(" (")[0].removeprefix(
        "ours − documented ")
    assert (row[COLUMN["verdict"]], row[COLUMN["reason"]]) == (f"**{verdict}**", reason)
    assert row[COLUMN["CPU"]] == "AMD EPYC, AVX512_BF16"


@pytest.mark.parametrize("adam, verdict", [(0.58, "holds"), (0.555, "within noise"), (0.52, "does not hold")])
def test_a_cell_documented_above_another_holds_only_when_it_wins_by_two_standard_errors(tmp_path, adam, verdict):
    """S3's Adam-amsgrad over SGD at 55 %, 2 seeds each on all 10,000 test images (the difference's error
    0.70-0.71 pp): a win of 0.5 pp confirms nothing, where a figure within noise of a documented one holds."""
    record_study(tmp_path, "s3_budget", {"sgd_epochs-2": [(0.55, 0.55, 0.5)] * 2,
                                         "adam_amsgrad_epochs-2": [(adam, 0.55, 0.5)] * 2}, epochs=2)
    row = report_rows(tmp_path)[1][("S3", "Adam with amsgrad improves on SGD")]
    assert row[COLUMN["verdict"]] == f"**{verdict}**"
    assert row[COLUMN["reason"]].startswith(f"`adam_amsgrad_epochs-2` {100 * (adam - 0.55):+.2f} ± 0.7")
    assert row[COLUMN["reason"]].endswith(" pp over `sgd_epochs-2` (all test images)")


def test_standard_error_of_a_single_run_is_the_binomial_error_of_its_test_images():
    assert documented.standard_error((92.0, None), 1, 1000) == pytest.approx(0.858, abs=1e-3)
    assert documented.standard_error((92.0, 1.0), 4, 1000) == pytest.approx((0.858 ** 2 + 0.25) ** 0.5, abs=1e-3)


def test_the_cell_shown_is_the_validation_winner_even_where_the_test_set_orders_the_cells_otherwise(tmp_path):
    """`step` is best on validation, `cosine` (the documented winner) on both test figures:
    the row shows `step`, and judges the documented winner against it on validation."""
    record_study(tmp_path, "s4_schedulers", {"step": [(0.60, 0.62, 0.80)], "cosine": [(0.75, 0.78, 0.70)]},
                 model="vgg16", epochs=20, train_images=50000)
    found = documented.measured(next(f for f in documented.BASELINES if f.study == "s4_schedulers"),
                                tmp_path / "results")
    assert found["shown"]["cell"] == "step"
    row = report_rows(tmp_path)[1][("S4", "four LR schedulers")]
    assert row[COLUMN["ours: test top-1, pixel-exact 1,000 (mean ± std over seeds)"]] == (
        "[62.00 %](results/s4_schedulers/s4_schedulers.md) (`step`; best on validation of 2 cells)")
    assert row[COLUMN["verdict"]] == "**does not hold**"  # 10 points below on 5,000 validation images
    assert row[COLUMN["reason"]].startswith("`step` best on validation; the documented winner `cosine` -10.00 ± ")


@pytest.mark.parametrize("spread, verdict, lead", [(",1.0", "holds", "-0.150 ± 0.020"),
                                                    ("", "not measured yet", "-0.150 (no per-image spread logged")])
def test_the_remedies_are_judged_by_the_lowest_validation_loss_with_top1_beside(tmp_path, spread, verdict, lead):
    """S4 step 2's write-up judged the remedies by overfitting: the row shows the cell whose validation loss
    went lowest (augmentation_l2, though `none` has the better top-1) and its lead over the runner-up in
    standard errors of the loss (per-image spread / √5,000 images, both cells: 0.020); a history without
    the spread gives no verdict."""
    def history(low):
        rows = [(0.5, low + 0.2), (0.6, low), (0.6, low + 0.3)]
        return "epoch,val_accuracy,val_loss" + ",val_loss_sd" * bool(spread) + "\n" + "".join(
            f"{i},{accuracy},{loss}{spread}\n" for i, (accuracy, loss) in enumerate(rows))
    record_study(tmp_path, "s4_remedies", {"none": [(0.75, 0.76, 0.80)], "augmentation_l2": [(0.74, 0.75, 0.78)]},
                 model="vgg16", epochs=20, train_images=50000,
                 histories={"none": history(0.60), "augmentation_l2": history(0.45)})
    row = report_rows(tmp_path)[1][("S4", "remedies: augmentation, L2, dropout")]
    assert row[COLUMN["ours: test top-1, pixel-exact 1,000 (mean ± std over seeds)"]] == (
        "[75.00 %](results/s4_remedies/s4_remedies.md) (`augmentation_l2`; lowest validation loss of 2 cells)")
    assert row[COLUMN["verdict"]] == f"**{verdict}**"
    assert row[COLUMN["reason"]].startswith("by validation loss (the write-up's criterion): `augmentation_l2` lowest "
                                            f"validation loss, validation loss {lead}")
    assert " over `none`; by validation top-1: `none` best on validation; the documented winner `augmentation_l2` " \
           "-2.00 ± " in row[COLUMN["reason"]]


def test_an_s1_step_is_judged_on_the_stand_in_by_its_gain_over_the_step_before(tmp_path):
    """Step 8 (documented 0.52, up from step 7's 0.48, CIFAR-100) on CIFAR-10: its direction against step 7,
    and a run EarlyStopping ended at 40 of up to 200 epochs had the documented budget. Step 4 was documented
    at 100 epochs without EarlyStopping: 40 epochs are 1/3 of its image passes."""
    record_study(tmp_path, "s1_steps", {"s1_step03": [(0.70, 0.71, 0.7)], "s1_step04": [(0.75, 0.76, 0.75)],
                                        "s1_step07": [(0.70, 0.71, 0.7)], "s1_step08": [(0.75, 0.76, 0.75)]},
                 base="train = { epochs = 200 }\n", epochs=40)
    rows = report_rows(tmp_path)[1]
    step8, step4 = rows[("S1", "step 8")], rows[("S1", "step 4")]
    assert step8[COLUMN["image passes, ours / documented"]] == "0.90x"
    assert step8[COLUMN["verdict"]] == "**holds**"
    assert step8[COLUMN["reason"]].startswith("CIFAR-10 stand-in, only the direction is judged: `s1_step08` +5.00 ± ")
    assert step8[COLUMN["reason"]].endswith(" pp over `s1_step07` (all test images)")
    assert step4[COLUMN["verdict"]] == "**not testable here**"
    assert step4[COLUMN["reason"]].startswith("1/3 of the documented image passes (40 epochs on 45,000 images "
                                              "against 100 on 50,000)")


def test_a_capped_study_shows_the_factor_and_is_not_testable(tmp_path):
    """S4 step 1 is documented at 20 epochs on 50,000 images; a study capped (by its recipe's
    train_subset) to 10,000 images and 3 epochs made 1/33 of those image passes."""
    record_study(tmp_path, "s4_vgg_20ep", {"vgg16": [(0.70, 0.72, 0.7)]}, model="vgg16",
                 base="data = { train_subset = 10000, val_size = 2000 }\n", train_images=10000)
    row = report_rows(tmp_path)[1][("S4", "VGG11 / 16 / 19, 20 epochs")]
    assert row[COLUMN["image passes, ours / documented"]] == "1/33"
    assert row[COLUMN["verdict"]] == "**not testable here**"
    assert row[COLUMN["reason"]].startswith("1/33 of the documented image passes (3 epochs on 10,000 images "
                                            "against 20 on 50,000); the study's reading: VGG16 and VGG19 not run")
    assert row[COLUMN["documented scale"]].startswith("CIFAR-10, 20 epochs, 50,000 images, 1 seed, VGG11, VGG16, "
                                                      "VGG19; *assumed*: ")


def test_the_s4_final_row_takes_the_writeup_study_once_it_has_a_seed_and_the_holdout_beside_it(tmp_path):
    record_study(tmp_path, "s4_final", {"vgg16_final": [(0.82, 0.91, 0.91)]}, model="vgg16", epochs=50)
    final = ("S4", "final: VGG16, 50 epochs, augmentation, L2, Adam, cosine")
    row = report_rows(tmp_path)[1][final]
    assert "(`vgg16_final`; an older recipe: " in row[COLUMN["ours: test top-1, pixel-exact 1,000 (mean ± std over seeds)"]]
    no_validation = "data = { val_size = 0 }\nearly_stopping = { enabled = false }\n"
    record_study(tmp_path, "s4_final_writeup", {"writeup": [(0.83, 0.92, None), (0.83, 0.93, None)]},
                 model="vgg16", epochs=50, train_images=50000, base=no_validation)
    record_study(tmp_path, "s4_final_holdout", {"holdout": [(0.82, 0.90, 0.91)]}, model="vgg16", epochs=50)
    row = report_rows(tmp_path)[1][final]
    assert row[COLUMN["ours: test top-1, pixel-exact 1,000 (mean ± std over seeds)"]] == (
        "[92.50 ± 0.71 %](results/s4_final_writeup/s4_final_writeup.md) (`writeup`); beside it, `holdout`: "
        "[90.00 %](results/s4_final_holdout/s4_final_holdout.md)")
    assert row[COLUMN["image passes, ours / documented"]] == "1.00x"
    assert row[COLUMN["verdict"]] == "**holds**" and row[COLUMN["ours − documented (± standard error)"]].startswith("+0.22 ± ")


def test_a_study_without_validation_chooses_no_cell_and_a_study_with_cells_not_run_says_how_many_were(tmp_path):
    no_validation = "data = { val_size = 0 }\nearly_stopping = { enabled = false }\n"
    record_study(tmp_path, "s4_batch", {"batch_size-32": [(0.7, 0.7, None)], "batch_size-64": [(0.6, 0.6, None)]},
                 base=no_validation)
    record_study(tmp_path, "s0_lr", {"a": [(0.7, 0.7, 0.6)], "b": [(0.6, 0.6, 0.7)], "c": None})
    rows = report_rows(tmp_path)[1]
    batch = rows[("S4", "batch sizes 16 to 128")]
    assert batch[COLUMN["ours: test top-1, pixel-exact 1,000 (mean ± std over seeds)"]] == (
        "no validation figure: no cell chosen")
    assert (batch[COLUMN["verdict"]], batch[COLUMN["reason"]]) == ("**not testable here**",
                                                                   "no validation figure: no cell chosen")
    lr = rows[("S0", "learning-rate adjustment (values not given)")]
    assert lr[COLUMN["ours: test top-1, pixel-exact 1,000 (mean ± std over seeds)"]].startswith(
        "[60.00 %](results/s0_lr/s0_lr.md) (`b`; best on validation of the 2 of 3 cells run so far; ours: ")


def test_a_row_whose_run_another_study_recorded_says_so(tmp_path):
    record_study(tmp_path, "s4_optimizers", {"adam": [(0.7, 0.7, 0.7)], "sgd_momentum": [(0.6, 0.6, 0.6)]},
                 model="vgg16", command="python -m kcifar.sweep experiments/sweeps/s4_remedies.toml --runs-dir "
                                        "…/runs --out experiments/results/s4_remedies")
    row = report_rows(tmp_path)[1][("S4", "optimizers: Adam, RMSprop, SGD momentum")]
    assert row[COLUMN["ours: test top-1, pixel-exact 1,000 (mean ± std over seeds)"]].endswith(
        "(`adam`; best on validation of 2 cells; its run is study s4_remedies's)")


def test_the_report_names_one_runnable_command_per_study_and_short_cpus(tmp_path):
    record_study(tmp_path, "s0_depth", {"s0_base": [(0.60, 0.62, 0.6)]})
    text, _ = report_rows(tmp_path)
    assert ("- [s0_depth](results/s0_depth/s0_depth.md): `python -m kcifar.sweep experiments/sweeps/s0_depth.toml "
            "--runs-dir runs --out experiments/results/s0_depth`") in text
    assert "…" not in text and "avx512f" not in text


def test_report_command_writes_experiments_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    report.main(["--documented"])
    assert "python -m kcifar.report --documented" in (tmp_path / "experiments" / "REPORT.md").read_text()
    assert capsys.readouterr().out.strip() == "wrote experiments/REPORT.md"
    assert "no runs given" in one_line_error(report.main, [], capsys)
    broken = tmp_path / "experiments" / "results" / "s2_models" / "s2_models.csv"
    broken.parent.mkdir(parents=True)
    broken.write_text("cell,dataset\ns2_fc,cifar10\n")
    assert "s2_models.csv is not a study summary" in one_line_error(report.main, ["--documented"], capsys)


@pytest.mark.parametrize("figure", [f for f in documented.BASELINES if f.dataset == "cifar100"])
def test_no_cifar100_figure_is_ever_subtracted_from_a_cifar10_result(figure):
    cell = {"study": "x", "cell": figure.cell, "dataset": "cifar10", "model": "m", "seeds": 1, "seeds_planned": 1,
            "val": (50.0, None), "val_images": 5000, "exact": (50.0, None), "exact_images": 1000,
            "all": (50.0, None), "epochs": 100, "max_epochs": 100, "train_images": 50000, "cpu": "", "command": "",
            "link": "x"}
    found = {"shown": cell, "cells": [cell, {**cell, "cell": figure.other}], "chosen": "", "note": "", "beside": None}
    row = documented.report_row(figure, found)
    assert row[COLUMN["ours − documented (± standard error)"]] == "–"
    if figure.kind == "figure":
        assert row[COLUMN["verdict"]] == "**not testable here**"


def test_s1_figure_draws_the_documented_and_our_progression_never_on_one_axis(tmp_path, monkeypatch):
    report_path, figure = tmp_path / "REPORT.md", tmp_path / "REPORT_s1_progression.png"
    documented.write_report(tmp_path / "results", report_path)
    assert not figure.exists() and "s1_progression" not in report_path.read_text()
    record_study(tmp_path, "s1_steps", {"s1_step01": [(0.40, 0.41, 0.4), (0.44, 0.45, 0.4)],
                                        "s1_step02": [(0.44, 0.47, 0.4), (0.44, 0.47, 0.4)],
                                        "s1_step04": [(0.44, 0.44, 0.4), (0.44, 0.46, 0.4)]})
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig) or path)
    documented.write_report(tmp_path / "results", report_path)
    (left, right), = [fig.axes for fig in drawn]
    documented_pct = {round(100 * f.fraction, 6) for f in documented.BASELINES
                      if f.study == "s1_steps" and f.fraction is not None}
    ours_pct = {43.0, 47.0, 45.0}  # step 2's documented figure is words: ours is drawn all the same
    values = [{round(float(y), 6) for line in ax.get_lines() for y in line.get_ydata() if y == y} for ax in (left, right)]
    assert values[0] == documented_pct and ours_pct <= values[1] and not values[1] & documented_pct
    steps = [f"{n}" for n in range(1, 15) if n != 13]  # every numbered step; 13 is a study of its own
    assert [t.get_text() for t in left.get_xticklabels()] == [t.get_text() for t in right.get_xticklabels()] == steps
    assert "CIFAR-100" in left.get_title() and "CIFAR-10," in right.get_title() and "CIFAR-100" not in right.get_title()


def test_a_study_whose_files_changed_since_its_runs_is_checked_out_first():
    """The reduced S4 remedies study ran at 60e8832; its study file now holds the documented-scale study."""
    if documented._git("cat-file", "-e", "60e8832^{commit}") is None:
        pytest.skip("needs the repository's history (a shallow clone lacks 60e8832)")
    head = documented._git("rev-parse", "--short", "HEAD").strip()
    remedies = documented.study_files("experiments/sweeps/s4_remedies.toml")
    assert remedies == ["experiments/sweeps/s4_remedies.toml", "experiments/recipes/s4_vgg16_20ep.toml"]
    assert documented.changed_since(remedies, ["60e8832"]) == "60e8832"
    assert documented.study_command("s4_remedies", ["60e8832"]).startswith("git checkout 60e8832 && python -m")
    assert documented.changed_since(remedies, [head, "not a commit"]) is None  # still the file that ran them
    assert documented.study_command("s2_models", [head]).startswith("python -m kcifar.sweep")


def test_s2_rows_judge_only_the_notebooks_networks(tmp_path):
    """S2's first study ran VGG-style models assumed before the write-up's notebook was found: its
    comparison is shown (its own cell names) but not judged; the notebook's study is judged."""
    key = ("S2", "FC vs GAP head")
    record_study(tmp_path, "s2_models", {"s2_fc": [(0.75, 0.80, 0.76)], "s2_gap": [(0.78, 0.82, 0.79)]},
                 model="s2_gap", epochs=100)
    row = report_rows(tmp_path)[1][key]
    assert row[COLUMN["verdict"]] == "**not testable here**"
    assert "model s2_gap, documented the notebook's 7-conv CNN" in row[COLUMN["reason"]]
    assert "`s2_gap` +3.00 ± " in row[COLUMN["reason"]] and "over `s2_fc`" in row[COLUMN["reason"]]
    record_study(tmp_path, "s2_notebook", {"s2_notebook_fc": [(0.70, 0.72, 0.71)],
                                           "s2_notebook_gap": [(0.80, 0.82, 0.81)]},
                 model="s2_notebook_gap", epochs=100)
    row = report_rows(tmp_path)[1][key]
    assert row[COLUMN["verdict"]] == "**holds**"
    assert "`s2_notebook_gap` +10.00 ± " in row[COLUMN["reason"]]
