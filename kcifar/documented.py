"""Every figure the five write-ups report (``BASELINES``), beside what ``experiments/results/`` holds.

``write_report()`` (``python -m kcifar.report --documented``) writes
``experiments/REPORT.md``: one row per documented figure of the baselines
(S0..S4, see ../shared/BASELINES.md beside the checkout), with ours, the scale it was measured
at, and the command, CPU, date and commit that measured it. It reads only the
recorded results in the repository, never ``runs/``:

- a study's ``experiments/results/<study>/<study>.csv`` (written by
  ``python -m kcifar.sweep ... --out experiments/results/<study>``), one cell;
- a few results recorded before the sweep existed (``results/runs.csv``,
  ``results/finetune_lite0.md``), each named in its row.

Ours is the mean over the seeds of the test top-1 on the pixel-exact test
images where the data has them (the figure to compare with published ones),
else on all test images. A figure documented on one data set is compared only
with a result on the same data set: CIFAR-100 is not on our machine, so its
rows show the CIFAR-10 stand-in and leave the difference empty.
"""

import csv
import datetime
import re
from dataclasses import dataclass
from pathlib import Path

from kcifar import plots
from kcifar.fileio import write_text

C10, C100 = "cifar10", "cifar100"


@dataclass(frozen=True)
class Documented:
    source: str  # S0..S4
    what: str  # the experiment, in a few words
    figure: str  # as documented: "39 %", "0.57 -> 0.59", "GAP slightly above FC"
    dataset: str  # the documented data set
    fraction: float | None = None  # the single figure to compare with, if there is one
    study: str | None = None  # experiments/results/<study>/<study>.csv ...
    cell: str | None = None  # ... its row (None: the study's best cell)
    note: str = ""
    earlier: str | None = None  # a run of results/runs.csv to show while the study is not recorded


def _s1(step, figure, fraction, cell=None, note=""):
    return Documented("S1", f"step {step}", figure, C100, fraction, "s1_steps", cell or f"s1_step{step:02d}", note)


BASELINES = [
    Documented("S0", "study 1: channels (6, 16) -> (16, 32) -> (32, 64)", "gain up to ~9 points", C100,
               study="s0_study1", note="ours: the study's best cell; every cell in its table"),
    Documented("S0", "study 1 best: channels (16, 32), batch 64, 8 epochs", "39 %", C100, 0.39, "s0_study1",
               "blocks-16x32_batch_size-64_epochs-8"),
    *[Documented("S0", f"depth study: {model}", f"{pct} %", C100, pct / 100, "s0_depth", f"s0_{model}")
      for model, pct in [("base", 39), ("model1", 41), ("model2", 44), ("model3", 51), ("model4", 41),
                         ("model5", 51)]],
    Documented("S0", "learning-rate adjustment (values not given)", "no figure", C100, study="s0_lr",
               note="ours: the best of Adam 1e-4 / 3e-4 / 1e-3 / 3e-3 on model3"),
    _s1(1, "0.30", 0.30),
    _s1(2, "small gain over step 1", None),
    _s1(3, "0.35", 0.35),
    _s1(4, "0.42", 0.42),
    _s1(5, "0.46", 0.46),
    _s1(6, "0.48", 0.48, "s1_step05", "ours: step 5's run; under our epoch cap the two are one"),
    _s1(7, "0.48 (doubling the filters: 0.46)", 0.48),
    _s1(8, "0.52", 0.52),
    _s1(9, "0.56", 0.56),
    _s1(10, "0.57 -> 0.58 -> 0.59", 0.59),
    _s1(11, "0.62", 0.62),
    _s1(12, "0.5x-0.6x (no gain)", None),
    Documented("S1", "step 13: filter-count study", "no figure", C100, study="s1_step13",
               note="ours: step 11's recipe with 8-16-32 ... 64-128-256 filters; every cell in its table"),
    _s1(14, "0.65, 0.67", 0.65),
    Documented("S1", "step 16: transfer learning (target)", "0.78", C100, 0.78, "finetune_lite0",
               note="ours: EfficientNet-Lite0 (ImageNet) fine-tuned, results/finetune_lite0.md"),
    Documented("S2", "FC vs GAP head", "GAP slightly above FC", C10, study="s2_models", cell="s2_gap",
               note="ours: the GAP cell; FC's beside it and each finding's verdict in the study's table"),
    Documented("S2", "FC and GAP overfit; dropout model lowest test loss after ~20 epochs", "curves", C10,
               study="s2_models", note="ours: the study's best cell; the curves and each finding's verdict "
                                       "in the study's table"),
    Documented("S3", "tutorial classifier, SGD", "no figure", C10, study="s3_per_class", cell="sgd",
               earlier="s3_tutorial_sgd"),
    Documented("S3", "Adam with amsgrad", "61 %", C10, 0.61, "s3_per_class", "adam_amsgrad", earlier="s3_tutorial_adam"),
    Documented("S3", "accuracy per class", "per-class table (values in pictures)", C10, study="s3_per_class",
               cell="adam_amsgrad", note="ours: the per-class table of results/s3_per_class/s3_per_class.md"),
    Documented("S4", "VGG11 / 16 / 19, 20 epochs", "train loss falls, val loss rises", C10, study="s4_vgg_20ep"),
    Documented("S4", "remedies: augmentation, L2, dropout", "augmentation and L2 best", C10, study="s4_remedies"),
    Documented("S4", "optimizers: Adam, RMSprop, SGD momentum", "Adam", C10, study="s4_optimizers"),
    Documented("S4", "four LR schedulers", "CosineAnnealingLR", C10, study="s4_schedulers"),
    Documented("S4", "batch sizes 16 to 128", "64", C10, study="s4_batch"),
    Documented("S4", "final: VGG16, 50 epochs, augmentation, L2, Adam, cosine", "92.28 %", C10, 0.9228, "s4_final"),
]


# ------------------------------------------------------------ what we measured


def _study_rows(results_dir: Path, study: str) -> list:
    path = results_dir / study / f"{study}.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(text):
    return float(text) if text not in (None, "") else None


def _from_study(row: dict, study: str) -> dict:
    """Ours from one cell of a study summary (see kcifar.sweep.summary)."""
    which = "exact" if _num(row["test_exact_top1_mean"]) is not None else "all"
    mean, std = _num(row[f"test_{which}_top1_mean"]), _num(row[f"test_{which}_top1_std"])
    label = f"pixel-exact {row['test_exact_n']}" if which == "exact" else "all test images"
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" % ({label})"
    return {"pct": mean, "std": std, "text": text, "dataset": row["dataset"],
            "scale": f"{row['epochs_mean']} of max {row['max_epochs']} epochs, {row['train_images']} training images, "
                     f"{row['seeds_done']}/{row['seeds']} seeds",
            "command": row["command"], "cpu": row["cpu"], "date": row["date"], "commit": row["commit"],
            "link": f"results/{study}/{study}.md", "cell": row["cell"]}


def _earlier_run(results_dir: Path, run: str):
    """A single run of results/runs.csv (made by kcifar.report before the sweep existed; one seed)."""
    path = results_dir / "runs.csv"
    rows = list(csv.DictReader(path.open(newline="", encoding="utf-8"))) if path.is_file() else []
    row = next((r for r in rows if r["run"] == run), None)
    if row is None:
        return None
    see = "see results/runs.md and experiments/README.md"
    return {"pct": float(row["test_top1_exact_pct"]), "dataset": row["dataset"],
            "text": f"{float(row['test_top1_exact_pct']):.2f} % (pixel-exact {row['test_exact_n']}; one earlier run)",
            "scale": f"{row['epochs']} epochs, 1 run", "command": f"python -m kcifar.train experiments/recipes/{run}.toml",
            "cpu": see, "date": see, "commit": see,
            "link": "results/runs.md", "cell": None}


def _finetune(results_dir: Path):
    """The 224-pixel EfficientNet-Lite0 fine-tune of results/finetune_lite0.md (its table row)."""
    path = results_dir / "finetune_lite0.md"
    line = next((l for l in path.read_text(encoding="utf-8").splitlines() if l.startswith("| `finetune_lite0_r224`")),
                None) if path.is_file() else None
    exact = re.search(r"\*\*([\d.]+) %\*\*", line or "")
    if not exact:
        return None
    see = "see results/finetune_lite0.md"
    return {"pct": float(exact.group(1)), "dataset": C10, "text": f"{exact.group(1)} % (pixel-exact 1000)",
            "scale": "1 run, see its file", "command": "python -m kcifar.finetune "
            "experiments/recipes/finetune_lite0_r224.toml", "cpu": see, "date": see, "commit": see,
            "link": "results/finetune_lite0.md", "cell": None}


def measured(figure: Documented, results_dir: Path):
    """What experiments/results holds for ``figure``, or None."""
    if figure.study == "finetune_lite0":
        return _finetune(results_dir)
    cells = _study_rows(results_dir, figure.study) if figure.study else []
    rows = [row for row in cells if row.get("seeds_done") not in (None, "", "0")]
    if figure.cell is None and rows:
        best = max(rows, key=lambda r: _num(r["test_all_top1_mean"]) or -1)
        found = _from_study(best, figure.study)
        which = "best cell" if len(rows) == len(cells) else f"best of the {len(rows)} of {len(cells)} cells run so far"
        return {**found, "text": f"{which} on all test images, {best['cell']}: {found['text']}"}
    row = next((r for r in rows if r["cell"] == figure.cell), None)
    if row is not None:
        return _from_study(row, figure.study)
    return _earlier_run(results_dir, figure.earlier) if figure.earlier else None


# ------------------------------------------------------------ the report


NAMES = {C10: "CIFAR-10", C100: "CIFAR-100"}


def report_row(figure: Documented, ours) -> list:
    """[source, experiment, documented, data set, ours, ours − documented, scale, command, CPU, date, commit]."""
    head = [figure.source, figure.what + (f" ({figure.note})" if figure.note else ""), figure.figure,
            NAMES[figure.dataset]]
    if ours is None:
        return head + ["not measured yet"] + ["–"] * 6
    text = f"[{ours['text']}]({ours['link']})"
    difference = "–"
    if ours["dataset"] != figure.dataset:
        text = f"{NAMES[figure.dataset]} not available here; {NAMES[ours['dataset']]} stand-in: {text}"
        difference = ""
    elif figure.fraction is not None:
        difference = f"{ours['pct'] - 100 * figure.fraction:+.2f} pp"
    return head + [text, difference, ours["scale"], f"`{ours['command']}`" if ours["command"] else "not recorded",
                   ours["cpu"] or "not recorded", ours["date"] or "not recorded", ours["commit"] or "not recorded"]


HEADER = ["source", "documented experiment", "documented", "data set", "ours (test top-1, mean ± std over seeds)",
          "ours − documented", "scale", "command", "CPU", "date", "commit"]


def to_markdown(rows, command) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    measured_count = sum(row[4] != "not measured yet" for row in rows)
    lines = ["# What the write-ups report, and what we measured", "",
             f"Generated by `{command}` on {now} from the results recorded in `experiments/results/` "
             f"({measured_count} of {len(rows)} documented figures have a measurement of ours). "
             "One row per figure of the five write-ups (S0..S4, restated in English in BASELINES.md). *Ours* is "
             "the test top-1 on the pixel-exact test images where the data has them (our CIFAR-10 copy: images "
             "0-999; the others passed through JPEG), else on all test images, as the mean ± sample standard "
             "deviation over the seeds; each links to its study's table. A CIFAR-100 figure is never compared with "
             "a CIFAR-10 result: CIFAR-100 is not on our machine, so those rows show the CIFAR-10 stand-in and "
             "leave *ours − documented* empty. *Scale*: epochs run (mean) of the recipe's maximum, training images, "
             "seeds finished.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def s1_progression(results_dir: Path, path: Path):
    """Figure of S1's documented progression (CIFAR-100) beside ours; None while no step is measured."""
    steps = [f for f in BASELINES if f.source == "S1" and f.study == "s1_steps"]
    ours = [measured(f, results_dir) for f in steps]
    if not any(ours):
        return None
    scale = next(o["scale"] for o in ours if o)
    return plots.progression([f.what.removeprefix("step ") for f in steps], [f.fraction for f in steps],
                             [(o["pct"], o["std"]) if o else None for o in ours], path,
                             title="S1 steps: documented progression beside ours",
                             documented_label="documented (CIFAR-100, 100-200 epochs)",
                             ours_label=f"ours ({NAMES[next(o['dataset'] for o in ours if o)]}; {scale})")


def write_report(results_dir="experiments/results", path="experiments/REPORT.md",
                 command="python -m kcifar.report --documented") -> Path:
    """Write REPORT.md (and the S1 progression figure beside it) from the recorded results."""
    results_dir, path = Path(results_dir), Path(path)
    rows = [report_row(figure, measured(figure, results_dir)) for figure in BASELINES]
    figure = s1_progression(results_dir, path.with_name(path.stem + "_s1_progression.png"))
    text = to_markdown(rows, command)
    if figure is not None:
        text += f"\n![S1: the documented progression beside ours]({figure.name})\n"
    write_text(path, text)
    return path
