"""experiments/REPORT.md: every documented figure, ours from recorded study summaries, CIFAR-100 never compared."""

import pytest
from conftest import one_line_error
from test_sweep import fake_run, write_study

from kcifar import documented, report
from kcifar.sweep import summary
from kcifar.sweep.study import load_study


def record_study(tmp_path, name, cells, dataset, top1s, exacts=None):
    """A study summary recorded under tmp_path/results/<name>/, as kcifar.sweep --out writes it."""
    body = f'seeds = [0, 1]\n[base]\ndataset = "{dataset}"\n' + "".join(
        f'[[cells]]\nname = "{cell}"\nmodel = "s3_tutorial"\n"optimizer.learning_rate" = {0.001 * (i + 1)}\n'
        for i, cell in enumerate(cells))
    study = load_study(write_study(tmp_path, body, name))
    for cell in study.cells:
        if isinstance(top1s, dict) and cell.name not in top1s:
            continue  # a cell not run yet
        cell_top1s, cell_exacts = (top1s[cell.name], exacts[cell.name]) if isinstance(top1s, dict) else (top1s, exacts)
        for recipe, top1, exact in zip(cell.recipes, cell_top1s, cell_exacts or [None, None]):
            fake_run(tmp_path / "runs" / name, recipe, top1, exact)
    summary.write_summary(study, tmp_path / "runs", tmp_path / "results" / name)


def rows_by_what(text):
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| S")]
    return {(r[0].strip("| "), r[1].split(" (ours:")[0]): r for r in rows}  # the experiment, without its note


def test_every_documented_figure_has_a_row_and_unmeasured_ones_say_so(tmp_path):
    path = documented.write_report(tmp_path / "results", tmp_path / "REPORT.md")
    rows = rows_by_what(path.read_text())
    assert len(rows) == len(documented.BASELINES) == 35
    assert {source for source, _ in rows} == {"S0", "S1", "S2", "S3", "S4"}
    assert sum(what.startswith("step ") for source, what in rows if source == "S1") == 15  # steps 1-14 and 16
    assert all(row[4] == "not measured yet" for row in rows.values())


def test_cifar100_figure_shows_the_cifar10_stand_in_without_a_difference(tmp_path):
    record_study(tmp_path, "s0_depth", ["s0_base", "s0_model3"], "cifar10", [0.60, 0.70], [0.62, 0.64])
    record_study(tmp_path, "s3_per_class", ["sgd", "adam_amsgrad"], "cifar10", [0.55, 0.57], [0.58, 0.60])
    text = documented.write_report(tmp_path / "results", tmp_path / "REPORT.md").read_text()
    rows = rows_by_what(text)
    model3 = rows[("S0", "depth study: model3")]
    assert model3[4] == ("CIFAR-100 not available here; CIFAR-10 stand-in: "
                         "[63.00 ± 1.41 % (pixel-exact 1000)](results/s0_depth/s0_depth.md)")
    assert model3[5] == "" and "3.0 of max 10 epochs, 45000 training images, 2/2 seeds" == model3[6]
    adam = rows[("S3", "Adam with amsgrad")]
    assert adam[4].startswith("[59.00 ± 1.41 % (pixel-exact 1000)]") and adam[5] == "-2.00 pp"
    assert rows[("S0", "depth study: model5")][4] == "not measured yet"


def test_a_result_on_the_documented_data_set_is_compared(tmp_path):
    record_study(tmp_path, "s0_depth", ["s0_model3"], "cifar100", [0.50, 0.54])
    rows = rows_by_what(documented.write_report(tmp_path / "results", tmp_path / "REPORT.md").read_text())
    assert rows[("S0", "depth study: model3")][4].startswith("[52.00 ± 2.83 % (all test images)]")
    assert rows[("S0", "depth study: model3")][5] == "+1.00 pp"


def test_a_study_row_shows_the_best_cell_on_all_test_images(tmp_path):
    """The best cell is picked on all 10,000 test images (ten times the pixel-exact 1,000's
    images, so less noisy), whichever is better on the 1,000, and the row says so."""
    record_study(tmp_path, "s4_vgg_20ep", ["vgg11", "vgg16"], "cifar10", {"vgg11": [0.71, 0.70], "vgg16": [0.70, 0.70]},
                 {"vgg11": [0.72, 0.72], "vgg16": [0.76, 0.75]})
    rows = rows_by_what(documented.write_report(tmp_path / "results", tmp_path / "REPORT.md").read_text())
    assert rows[("S4", "VGG11 / 16 / 19, 20 epochs")][4].startswith(
        "[best cell on all test images, vgg11: 72.00 ± 0.00 % (pixel-exact 1000)]")


def test_a_study_with_cells_not_run_yet_says_how_many_were(tmp_path):
    record_study(tmp_path, "s2_models", ["s2_fc", "s2_gap", "s2_gap_dropout"], "cifar10",
                 {"s2_fc": [0.74, 0.75]}, {"s2_fc": [0.79, 0.80]})
    rows = rows_by_what(documented.write_report(tmp_path / "results", tmp_path / "REPORT.md").read_text())
    overfit = ("S2", "FC and GAP overfit; dropout model lowest test loss after ~20 epochs")
    assert rows[overfit][4].startswith(
        "[best of the 1 of 3 cells run so far on all test images, s2_fc: 79.50 ± 0.71 % (pixel-exact 1000)]")
    assert rows[("S2", "FC vs GAP head")][4] == "not measured yet"  # its cell, s2_gap, has not run


def test_report_command_writes_experiments_report(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    report.main(["--documented"])
    assert "python -m kcifar.report --documented" in (tmp_path / "experiments" / "REPORT.md").read_text()
    assert capsys.readouterr().out.strip() == "wrote experiments/REPORT.md"
    assert "no runs given" in one_line_error(report.main, [], capsys)


@pytest.mark.parametrize("figure", [f for f in documented.BASELINES if f.dataset == "cifar100"])
def test_no_cifar100_figure_is_ever_subtracted_from_a_cifar10_result(figure):
    ours = {"pct": 50.0, "text": "50 %", "dataset": "cifar10", "scale": "", "command": "", "cpu": "", "date": "",
            "commit": "", "link": "x", "cell": None}
    assert documented.report_row(figure, ours)[5] == ""


def test_s1_progression_figure_beside_the_report_once_a_step_is_measured(tmp_path):
    report_path = tmp_path / "REPORT.md"
    figure = tmp_path / "REPORT_s1_progression.png"
    documented.write_report(tmp_path / "results", report_path)
    assert not figure.exists() and "s1_progression" not in report_path.read_text()
    record_study(tmp_path, "s1_steps", ["s1_step01", "s1_step04"], "cifar10", [0.40, 0.44], [0.41, 0.45])
    text = documented.write_report(tmp_path / "results", report_path).read_text()
    assert "![S1: the documented progression beside ours](REPORT_s1_progression.png)" in text
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    step4 = documented.measured(next(f for f in documented.BASELINES if f.what == "step 4"), tmp_path / "results")
    assert (step4["pct"], round(step4["std"], 2)) == (43.0, 2.83)
