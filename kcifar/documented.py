"""Every finding the five write-ups report (``BASELINES``), beside what ``experiments/results/`` holds, with a verdict.

``write_report()`` (``python -m kcifar.report --documented``) writes ``experiments/REPORT.md``:
one row per documented finding of S0..S4 (restated in English in BASELINES.md beside the
checkout) with the documented scale beside ours, our test top-1 on the pixel-exact test images
and on all of them, *ours − documented* with its standard error, and a verdict with its reason.
It reads only the recorded results, never ``runs/``:

- a study's ``experiments/results/<study>/<study>.csv`` (kcifar.sweep.summary) and the recorded
  ``recipe.toml`` of its runs beside it (the model, the validation images);
- ``experiments/results/finetune_lite0.md`` (the transfer-learning run, recorded before the sweep existed).

No cell is chosen on the test set: where a finding names no cell, the row shows the cell best on
validation, and says so; a study without a validation figure has no chosen cell. The verdict
follows from the data alone (each finding's documented scale and kind in ``BASELINES``, the
recorded results), so a study re-run at the documented scale changes it without a code change.
"""

import csv
import datetime
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kcifar import plots, tables
from kcifar.errors import KcifarError
from kcifar.fileio import write_text
from kcifar.machine import short_cpu
from kcifar.recipe import read_toml

C10, C100 = "cifar10", "cifar100"
NAMES = {C10: "CIFAR-10", C100: "CIFAR-100"}
HOLDS, FAILS, NOISY = "holds", "does not hold", "within noise"
UNTESTABLE, UNMEASURED = "not testable here", "not measured yet"
ORDERS = ("above", "best")  # findings that one cell beats another: a difference within noise confirms nothing
MIN_PASSES = 0.5  # below this share of the documented image passes (epochs x training images) nothing is judged
NOISE = 2.0  # standard errors: a shortfall beyond this many does not hold; a difference within it is noise
TEST_IMAGES = 10_000  # CIFAR-10's and CIFAR-100's test sets
FINETUNE = "finetune_lite0"


@dataclass(frozen=True)
class Scale:
    """The documented setting of a finding; None where the write-up gives none and none is assumed."""
    epochs: int | None
    train_images: int | None
    model: str
    models: tuple = ()  # our model names that are the documented model (empty: not checked)
    seeds: int = 1  # the write-ups report one run each
    up_to: bool = False  # ``epochs`` is a maximum (EarlyStopping ended the run somewhere before)
    assumed: str = ""  # what was assumed where the write-up is silent


@dataclass(frozen=True)
class Documented:
    """One finding. ``kind`` says how it is judged:

    - ``figure``: ``fraction``, compared with ``cell``'s pixel-exact test top-1 (same data set only);
    - ``best``: ``cell`` is the documented winner, compared on validation with the cell best there, by
      ``criterion``: ``top1`` (validation top-1) or ``loss`` (the lowest validation loss over the epochs,
      for a write-up that judged by overfitting; the top-1 comparison is then given beside it);
    - ``above``: ``cell`` documented above ``other`` (test top-1 on all test images);
    - ``no_gain``: ``cell`` documented as no gain over ``other`` (the same figures);
    - ``reading``: ``reading`` = (verdict, reason), read by hand from the study's curves;
    - ``none``: nothing to compare with (no figure documented).
    """
    source: str  # S0..S4
    what: str  # the experiment, in a few words
    figure: str  # as documented
    dataset: str  # the documented data set
    scale: Scale
    kind: str = "none"
    fraction: float | None = None
    study: str | None = None  # experiments/results/<study>/<study>.csv
    cell: str | None = None  # None: the study's best cell on validation
    other: str | None = None
    reading: tuple | None = None
    note: str = ""
    fallback: tuple = ()  # (study, cell, note[, other]) tried in order while ``study``'s ``cell`` has no finished seed
    beside: tuple | None = None  # (study, cell, label): another measurement shown next to ours
    criterion: str = "top1"  # of a ``best`` finding: "top1" or "loss" (see above)


def _s0(what, figure, model, study="s0_depth", **kw):
    depth = "" if study == "s0_study1" else "; the depth study's epochs not given: study 1's 8"
    return Documented("S0", what, figure, C100, Scale(8, 50_000, model, assumed="all 50,000 training images" + depth),
                      study=study, **kw)


def _s1(step, figure, kind="figure", fraction=None, cell=None, what=None, **kw):
    """A step of S1. Its documented figure is CIFAR-100's (``fraction``, drawn in the progression figure), so on
    the CIFAR-10 stand-in a step is judged by what the write-up says it did to the step before (``other``): a
    gain (``above``) or none (``no_gain``), by its direction on our test set."""
    late = step >= 6
    scale = Scale(200 if late else 100, 50_000, f"step {step}'s network", up_to=late,
                  assumed="EarlyStopping from step 6: the epoch it stopped at is not given" if late else "")
    return Documented("S1", what or f"step {step}", figure, C100, scale, kind, fraction, "s1_steps",
                      cell or f"s1_step{step:02d}", **kw)


S2 = Scale(100, 50_000, "the notebook's 7-conv CNN, no BN", ("s2_notebook_fc", "s2_notebook_gap", "s2_notebook_dropout"),
           assumed="the layer table is a picture: the networks and the 100 epochs of the write-up's notebook "
                   "(docs/SOURCES.md); its curves are test curves")
S3 = Scale(2, 50_000, "tutorial CNN (62,006 parameters)", ("s3_tutorial",),
           assumed="epochs are only in pictures: the tutorial's 2; all 50,000 training images")


def _s3_before(cell):
    """The fallback of S3's rows while s3_budget is not recorded: the study made before it."""
    return (("s3_per_class", cell, "Keras' initialisation and Adam epsilon; s3_budget, with the tutorial's, "
                                   "not recorded yet"),)


VGGS = ("vgg11", "vgg16", "vgg19")
S4_STEPS = "epochs not given: step 1's 20; all 50,000 training images"

BASELINES = [
    _s0("study 1: channels (6, 16) -> (16, 32) -> (32, 64)", "gain up to ~9 points", "S0 base, channels varied",
        "s0_study1", kind="above", cell="blocks-32x64_batch_size-64_epochs-8",
        other="blocks-6x16_batch_size-64_epochs-8"),
    _s0("study 1 best: channels (16, 32), batch 64, 8 epochs", "39 %", "S0 base", "s0_study1", kind="figure",
        fraction=0.39, cell="blocks-16x32_batch_size-64_epochs-8"),
    *[_s0(f"depth study: {model}", f"{pct} %", f"S0 {model}", kind="figure", fraction=pct / 100, cell=f"s0_{model}")
      for model, pct in [("base", 39), ("model1", 41), ("model2", 44), ("model3", 51), ("model4", 41),
                         ("model5", 51)]],
    _s0("learning-rate adjustment (values not given)", "no figure", "S0 model3", "s0_lr",
        note="ours: Adam 1e-4 / 3e-4 / 1e-3 / 3e-3 on model3"),
    _s1(1, "0.30", fraction=0.30),
    _s1(2, "small gain over step 1", "above", other="s1_step01"),
    _s1(3, "0.35, up from ~0.30 (step 2)", "above", 0.35, other="s1_step02"),
    _s1(4, "0.42, up from 0.35", "above", 0.42, other="s1_step03"),
    _s1(5, "0.46, up from 0.42", "above", 0.46, other="s1_step04"),
    _s1(6, "0.48, up from 0.46", "above", 0.48, other="s1_step05"),
    _s1(7, "0.48, as step 6 (doubling the filters: 0.46)", "no_gain", 0.48, other="s1_step06"),
    _s1(7, "0.46, down from two convolutions' 0.48", "above", what="step 7: doubling the filters",
        other="s1_step07_double_filters"),
    _s1(8, "0.52, up from 0.48", "above", 0.52, other="s1_step07"),
    _s1(9, "0.56, up from 0.52", "above", 0.56, other="s1_step08"),
    _s1(10, "0.57 -> 0.58 -> 0.59, up from 0.56", "above", 0.59, other="s1_step09"),
    _s1(11, "0.62, up from 0.59", "above", 0.62, other="s1_step10"),
    _s1(12, "0.5x-0.6x (no gain)", "no_gain", other="s1_step11"),
    Documented("S1", "step 13: filter-count study", "no figure", C100,
               Scale(200, 50_000, "step 11's network, filters varied", up_to=True), study="s1_step13",
               note="ours: step 11's recipe with 8-16-32 ... 64-128-256 filters"),
    _s1(14, "0.65, 0.67, up from 0.62 (step 11)", "above", 0.65, other="s1_step11"),
    Documented("S1", "step 16: transfer learning (text cut off)", "target 0.78", C100,
               Scale(None, 50_000, "not given"), "reading", study=FINETUNE,
               reading=(UNTESTABLE, "a target, not a result; ours is another task: an ImageNet EfficientNet-Lite0 "
                                    "fine-tuned at 224 pixels")),
    Documented("S2", "FC vs GAP head", "GAP slightly above FC", C10, S2, "above", study="s2_notebook",
               cell="s2_notebook_gap", other="s2_notebook_fc",
               fallback=(("s2_models", "s2_gap", "the first study, on VGG-style models assumed before the notebook "
                                                 "was found", "s2_fc"),)),
    # A reading by hand of s2_models' curves (another model: not testable); read s2_notebook's once it is recorded.
    Documented("S2", "FC and GAP overfit; the dropout model starts higher and has the lowest test loss after "
                     "~20 epochs", "curves", C10, S2, "reading", study="s2_models", cell="s2_gap_dropout",
               reading=(HOLDS, "both seeds: FC's and GAP's validation loss lowest at epoch 3-7, then rising while "
                               "training loss falls below 0.1; the dropout model's the highest after epoch 1 and the "
                               "lowest of the three from epoch 8 to 40 (a reading of the curves: the study's "
                               "verdict table)")),
    Documented("S3", "tutorial classifier, SGD", "no figure", C10, S3, study="s3_budget", cell="sgd_epochs-2",
               fallback=_s3_before("sgd")),
    Documented("S3", "Adam with amsgrad", "61 %", C10, S3, "figure", 0.61, "s3_budget", "adam_amsgrad_epochs-2",
               note="the study's reading: 61 % is reached at 5 epochs, where SGD is as close",
               fallback=_s3_before("adam_amsgrad")),
    Documented("S3", "Adam with amsgrad improves on SGD", "'improved up to 61 %'", C10, S3, "above",
               study="s3_budget", cell="adam_amsgrad_epochs-2", other="sgd_epochs-2"),
    Documented("S3", "accuracy per class", "per-class table", C10, S3, "reading", study="s3_budget",
               cell="adam_amsgrad_epochs-2", reading=(UNTESTABLE, "the documented values are pictures, not text; "
                                                                  "ours are in the study's per-class table"),
               fallback=_s3_before("adam_amsgrad")),
    Documented("S4", "VGG11 / 16 / 19, 20 epochs", "train loss falls, val loss rises", C10,
               Scale(20, 50_000, "VGG11, VGG16, VGG19", VGGS, assumed="all 50,000 training images"), "reading",
               study="s4_vgg_20ep", cell="vgg16", note="ours: VGG16's cell; all three in the study",
               fallback=(("s4_vgg_20ep", "vgg11", "VGG11's cell: VGG16 and VGG19 not run yet at this scale"),),
               reading=(UNMEASURED, "VGG16 and VGG19 not run yet at this scale; VGG11 shows it: training loss "
                                    "1.35 -> 0.002 while validation loss is lowest at epoch 6 (0.63) and rises to "
                                    "1.09 at epoch 20")),
    Documented("S4", "remedies: augmentation, L2, dropout", "augmentation and L2 best", C10,
               Scale(20, 50_000, "VGG11, VGG16, VGG19", VGGS, assumed=S4_STEPS), "best", study="s4_remedies",
               cell="augmentation_l2", criterion="loss"),
    Documented("S4", "optimizers: Adam, RMSprop, SGD momentum", "Adam", C10,
               Scale(20, 50_000, "VGG16", ("vgg16",), assumed=S4_STEPS), "best", study="s4_optimizers", cell="adam"),
    Documented("S4", "four LR schedulers", "CosineAnnealingLR", C10,
               Scale(20, 50_000, "VGG16", ("vgg16",), assumed=S4_STEPS), "best", study="s4_schedulers",
               cell="cosine"),
    Documented("S4", "batch sizes 16 to 128", "64", C10, Scale(20, 50_000, "VGG16", ("vgg16",), assumed=S4_STEPS),
               "best", study="s4_batch", cell="batch_size-64"),
    Documented("S4", "final: VGG16, 50 epochs, augmentation, L2, Adam, cosine", "92.28 %", C10,
               Scale(50, 50_000, "VGG16", ("vgg16",), assumed="the third augmentation is cut off in the write-up: "
                                                              "a horizontal flip; all 50,000 training images, the "
                                                              "last epoch (its notebook)"),
               "figure", 0.9228, "s4_final_writeup", "writeup",
               fallback=(("s4_final", "vgg16_final", "an older recipe: Keras' initialisation, meanstd input, Adam "
                                                     "eps 1e-7, cosine stepped per batch; 45,000 training images + "
                                                     "5,000 validation, kept epoch on validation, one seed; the "
                                                     "write-up's own setting is s4_final_writeup, not finished yet"),),
               beside=("s4_final_holdout", "holdout", "45,000 + 5,000 validation, kept epoch on validation")),
]


# ------------------------------------------------------------ what we measured


def _num(text):
    return float(text) if text not in (None, "") else None


def _stat(row, name):
    """(mean, std) in percent of a summary column pair, or None when the mean is empty."""
    mean = _num(row.get(f"{name}_mean"))
    return None if mean is None else (mean, _num(row.get(f"{name}_std")))


def _loss_stat(row):
    """(mean, std) of the lowest validation loss over the epochs, or None (not in older summaries)."""
    mean = _num(row.get("val_loss_min_mean"))
    return None if mean is None else (mean, _num(row.get("val_loss_min_std")))


def _recorded_recipe(folder: Path, cell: str) -> dict:
    """The recipe.toml recorded with the cell's first run (``<cell>-s<seed>/``), or {}."""
    runs = sorted(p for p in folder.glob("*/recipe.toml") if re.fullmatch(re.escape(cell) + r"-s\d+", p.parent.name))
    return read_toml(runs[0]) if runs else {}


def _cell(folder: Path, study: str, row: dict) -> dict:
    recipe = _recorded_recipe(folder, row["cell"])
    return {"study": study, "cell": row["cell"], "dataset": row["dataset"], "model": recipe.get("model"),
            "seeds": int(row["seeds_done"] or 0), "seeds_planned": int(row["seeds"]),
            "val": _stat(row, "val_top1"), "val_images": recipe.get("data", {}).get("val_size"),
            "val_loss": _loss_stat(row), "val_loss_sd": _num(row.get("val_loss_min_sd_mean")),
            "exact": _stat(row, "test_exact_top1"), "exact_images": _num(row.get("test_exact_n")),
            "all": _stat(row, "test_all_top1"), "epochs": _num(row["epochs_mean"]),
            "max_epochs": _num(row["max_epochs"]), "train_images": _num(row["train_images"]), "cpu": row["cpu"],
            "command": row["command"], "commit": row.get("commit") or "", "link": f"results/{study}/{study}.md"}


def study_cells(results_dir: Path, study: str) -> list:
    """Every cell of a recorded study summary (finished or not), as dicts; [] when not recorded."""
    path = results_dir / study / f"{study}.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        try:
            return [_cell(path.parent, study, row) for row in csv.DictReader(f)]
        except (KeyError, TypeError, ValueError) as error:
            raise KcifarError(f"{path} is not a study summary kcifar can read ({error!r}); write it again with "
                              f"python -m kcifar.sweep experiments/sweeps/{study}.toml --out {path.parent} "
                              "--summarize") from None


def _finetune(results_dir: Path):
    """The 224-pixel EfficientNet-Lite0 fine-tune, from its table row in experiments/results/finetune_lite0.md."""
    path = results_dir / f"{FINETUNE}.md"
    line = next((l for l in path.read_text(encoding="utf-8").splitlines() if l.startswith("| `finetune_lite0_r224`")),
                None) if path.is_file() else None
    figures = [float(x) for x in re.findall(r"([\d.]+) %", line or "")]
    if len(figures) < 3:
        return None
    every, exact, val = figures[:3]
    cell = {"study": FINETUNE, "cell": "finetune_lite0_r224", "dataset": C10, "model": "efficientnet_lite0",
            "seeds": 1, "seeds_planned": 1, "val": (val, None), "val_images": 5000, "exact": (exact, None),
            "exact_images": 1000, "all": (every, None), "epochs": None, "max_epochs": None, "train_images": 45_000,
            "cpu": "AMD EPYC; AVX-512: avx512_bf16", "command": "", "link": f"results/{FINETUNE}.md"}
    return {"shown": cell, "cells": [cell], "chosen": "", "note": "", "beside": None}


CRITERIA = {"top1": ("val", 1, "best on validation"), "loss": ("val_loss", -1, "lowest validation loss")}


def _best_on_validation(cells, criterion="top1"):
    """(the finished cell best on validation by ``criterion``, how it was chosen); a lone cell needs no choice."""
    key, sign, words = CRITERIA[criterion]
    done = [c for c in cells if c["seeds"]]
    if len(done) == 1 and len(cells) == 1:
        return done[0], ""
    scored = [c for c in done if c[key]]
    if not scored and criterion != "top1" and any(c["val"] for c in done):  # a summary older than its column
        shown, chosen = _best_on_validation(cells)
        return shown, f"{chosen} (top-1: the summary has no {words})"
    if not scored:
        return None, "no validation figure: no cell chosen" if done else ""
    of = f"{len(cells)} cells" if len(done) == len(cells) else f"the {len(done)} of {len(cells)} cells run so far"
    return max(scored, key=lambda c: sign * c[key][0]), f"{words} of {of}"


def _finished(cells, name):
    return next((c for c in cells if c["cell"] == name and c["seeds"]), None)


def measured(figure: Documented, results_dir: Path):
    """What the recorded results hold for ``figure``: {shown: the cell the row shows (or None), cells: its
    study's cells, chosen: how the shown cell was chosen, note, beside}; None when nothing is recorded."""
    if figure.study == FINETUNE:
        return _finetune(results_dir)
    options = []
    for study, cell, note, *other in ((figure.study, figure.cell, figure.note, figure.other), *figure.fallback):
        cells = study_cells(results_dir, study)
        if cells:
            shown, chosen = (_best_on_validation(cells, figure.criterion) if figure.kind == "best" or cell is None
                             else (_finished(cells, cell), ""))
            options.append({"shown": shown, "cells": cells, "chosen": chosen, "note": note, "beside": None,
                            "pair": (cell, other[0] if other else figure.other)})
    found = next((o for o in options if o["shown"] or o["chosen"]), options[0] if options else None)
    if found and figure.beside:
        found["beside"] = _finished(study_cells(results_dir, figure.beside[0]), figure.beside[1])
    return found


# ------------------------------------------------------------ judging a finding


def standard_error(stat, seeds: int, images) -> float:
    """Of a mean top-1 (percent) over ``seeds`` runs scored on ``images`` images: the binomial error
    of the images and the seeds' spread (std / √seeds; unmeasured with one seed) in quadrature."""
    mean, std = stat
    binomial = 100 * math.sqrt(mean / 100 * (1 - mean / 100) / images) if images else 0.0
    return math.hypot(binomial, (std or 0.0) / math.sqrt(seeds))


def _headline(cell):
    """(figure, its images): the pixel-exact test top-1 where the data has one, else all test images."""
    return (cell["exact"], cell["exact_images"]) if cell["exact"] else (cell["all"], TEST_IMAGES)


def _our_epochs(scale: Scale, cell):
    """The epochs our budget is counted in: against a documented maximum (EarlyStopping) our maximum, where
    EarlyStopping may have ended the run sooner, as it may have the documented one; else the epochs run."""
    return cell["max_epochs"] if scale.up_to and cell["max_epochs"] else cell["epochs"]


def _passes_ratio(scale: Scale, cell):
    """Our image passes per run (epochs x training images) over the documented; None where either is unknown."""
    ours, documented = ((a or 0) * (b or 0) for a, b in ((_our_epochs(scale, cell), cell["train_images"]),
                                                          (scale.epochs, scale.train_images)))
    return ours / documented if ours and documented else None


def _ratio(ratio) -> str:
    return "–" if ratio is None else f"{ratio:.2f}x" if ratio >= MIN_PASSES else f"1/{1 / ratio:.0f}"


def _pair(a, b, key, images):
    """(a − b, its standard error) of two cells' figures (errors added as if independent: conservative)."""
    difference = a[key][0] - b[key][0]
    return difference, math.hypot(standard_error(a[key], a["seeds"], images(a)),
                                   standard_error(b[key], b["seeds"], images(b)))


def _pm(difference, error):
    return f"{difference:+.2f} ± {error:.2f} pp"


def _loss_error(cell):
    """Standard error of a cell's lowest validation loss: the images' spread (per-image sd / √images, as
    logged at that epoch) and the seeds' (std / √seeds) in quadrature; None where the spread was not logged."""
    if cell["val_loss_sd"] is None or not cell["val_images"]:
        return None
    return math.hypot(cell["val_loss_sd"] / math.sqrt(cell["val_images"]), (cell["val_loss"][1] or 0.0) /
                      math.sqrt(cell["seeds"]))


def _ahead(a, b, criterion):
    """(how far ``a`` is ahead of ``b`` on validation by ``criterion``, its standard error (None where
    unknown), the text of a − b: top-1 in percentage points, or the loss)."""
    if criterion == "top1":
        difference, error = _pair(a, b, "val", lambda c: c["val_images"])
        return difference, error, _pm(difference, error)
    errors = [_loss_error(a), _loss_error(b)]
    error = None if None in errors else math.hypot(*errors)
    difference = a["val_loss"][0] - b["val_loss"][0]
    spread = " (no per-image spread logged: no noise rule)" if error is None else f" ± {error:.3f}"
    return -difference, error, f"validation loss {difference:+.3f}{spread}"


def _best_text(found, winner, best, criterion):
    """(ahead, its error, text) of the documented winner against the best cell (or the runner-up) by ``criterion``."""
    key, sign, words = CRITERIA[criterion]
    if not winner[key]:
        what = "validation top-1" if criterion == "top1" else "validation loss (a summary older than its column)"
        return None, None, f"the documented winner's cell, {winner['cell']}, has no {what}"
    if best is winner:
        others = [c for c in found["cells"] if c["seeds"] and c[key] and c is not winner]
        if not others:
            return None, None, f"{winner['cell']} is the only cell run"
        runner = max(others, key=lambda c: sign * c[key][0])
        difference, error, text = _ahead(winner, runner, criterion)
        return _known(difference, error), error, f"`{winner['cell']}` {words}, {text} over `{runner['cell']}`"
    difference, error, text = _ahead(winner, best, criterion)
    return _known(difference, error), error, (f"`{best['cell']}` {words}; the documented winner `{winner['cell']}` "
                                              f"{text} from it")


def _known(difference, error):
    """The difference where its error is known (a verdict needs both), else None."""
    return None if error is None else difference


def _best_comparison(figure, found):
    winner = _finished(found["cells"], figure.cell)
    if winner is None:
        return None, None, f"the documented winner's cell, {figure.cell}, has no finished run"
    difference, error, text = _best_text(found, winner, found["shown"], figure.criterion)
    if figure.criterion == "top1":
        return difference, error, text
    by_top1 = _best_text(found, winner, _best_on_validation(found["cells"])[0], "top1")[2]
    return difference, error, f"by validation loss (the write-up's criterion): {text}; by validation top-1: {by_top1}"


def _order_comparison(figure, found):
    names = found.get("pair", (figure.cell, figure.other))
    higher, lower = (_finished(found["cells"], name) for name in names)
    missing = [name for name, c in zip(names, (higher, lower)) if c is None]
    if missing:
        return None, None, f"{' and '.join(missing)} not run yet"
    difference, error = _pair(higher, lower, "all", lambda c: TEST_IMAGES)
    text = f"`{higher['cell']}` {_pm(difference, error)} over `{lower['cell']}` (all test images)"
    return (difference if figure.kind == "above" else -difference), error, text


def comparison(figure: Documented, found):
    """(signed difference: below −NOISE errors the finding does not hold, its error, text); (None, None, text)
    where there is nothing to compute."""
    shown = found["shown"]
    if figure.kind == "figure":
        if shown["dataset"] != figure.dataset:
            return None, None, ""
        stat, images = _headline(shown)
        if not stat:
            return None, None, "no test figure recorded"
        difference, error = stat[0] - 100 * figure.fraction, standard_error(stat, shown["seeds"], images)
        seeds = "one seed: the binomial error alone" if shown["seeds"] == 1 else f"{shown['seeds']} seeds"
        return difference, error, f"ours − documented {_pm(difference, error)} ({seeds})"
    if figure.kind == "best":
        return _best_comparison(figure, found)
    if figure.kind in ("above", "no_gain"):
        return _order_comparison(figure, found)
    return None, None, figure.reading[1] if figure.reading else ""


def _obstacles(figure: Documented, cell) -> list:
    """Why the measurement cannot judge the finding: another data set for an absolute figure, too few
    image passes, another model."""
    reasons = []
    if cell["dataset"] != figure.dataset and figure.kind in ("figure", "reading"):
        reasons.append(f"{NAMES[cell['dataset']]} stand-in for a {NAMES[figure.dataset]} figure")
    ratio = _passes_ratio(figure.scale, cell)
    if ratio is not None and ratio < MIN_PASSES:
        up_to = "up to " if figure.scale.up_to else ""
        ours = f"{up_to if cell['max_epochs'] else ''}{_our_epochs(figure.scale, cell):g}"
        reasons.append(f"{_ratio(ratio)} of the documented image passes ({ours} epochs on {cell['train_images']:,.0f} "
                       f"images against {up_to}{figure.scale.epochs} on {figure.scale.train_images:,})")
    if figure.scale.models and cell["model"] not in figure.scale.models:
        reasons.append(f"model {cell['model']}, documented {figure.scale.model}")
    return reasons


def judge(figure: Documented, found) -> tuple:
    """(verdict, reason, ours − documented) of a finding given ``measured()``'s answer."""
    if found is None or (found["shown"] is None and not found["chosen"]):
        return UNMEASURED, "no recorded result yet", "–"
    if found["shown"] is None:
        return UNTESTABLE, found["chosen"], "–"
    if figure.kind == "none":
        return UNTESTABLE, "no figure documented", "–"
    obstacles = _obstacles(figure, found["shown"])
    if figure.kind == "reading" and figure.reading[0] == UNTESTABLE:
        return UNTESTABLE, "; ".join([figure.reading[1], *obstacles]), "–"
    difference, error, text = comparison(figure, found)
    shown = "–" if figure.kind != "figure" or difference is None else _pm(difference, error)
    if found["shown"]["dataset"] != figure.dataset and figure.kind not in ("figure", "reading"):
        text = f"{NAMES[found['shown']['dataset']]} stand-in, only the direction is judged: {text}"
    if obstacles:
        what = "the study's reading" if figure.kind == "reading" else "measured"
        return UNTESTABLE, "; ".join(obstacles + ([f"{what}: {text}"] if text else [])), shown
    if figure.kind == "reading":
        verdict, reason = figure.reading
        return verdict, reason, shown
    if difference is None:
        return UNMEASURED, text, shown
    if difference < -NOISE * error:
        return FAILS, text, shown
    if abs(difference) >= NOISE * error:
        return HOLDS, text, shown
    return (NOISY, text, shown) if figure.kind in ORDERS else (HOLDS, text + ": within noise", shown)


# ------------------------------------------------------------ the report


def _figure_text(stat) -> str:
    return "–" if not stat else f"{stat[0]:.2f}" + (f" ± {stat[1]:.2f}" if stat[1] is not None else "") + " %"


def _reused_from(cell):
    """The other studies whose sweep recorded this cell's runs (named in its command), if any."""
    others = dict.fromkeys(re.findall(r"experiments/sweeps/(\w+)\.toml", cell["command"] or ""))
    return [study for study in others if study != cell["study"]]


def _ours(found, key) -> str:
    """The 'ours' text of one test figure (``exact``: with the cell, how it was chosen and whose run it is;
    ``all``: the figure alone), a measurement shown beside it after it."""
    cell = found["shown"]
    if cell is None:
        return (found["chosen"] or UNMEASURED) if key == "exact" else "–"
    text = f"[{_figure_text(cell[key])}]({cell['link']})"
    if key == "exact":
        notes = [f"`{cell['cell']}`", found["chosen"], found["note"]] + [
            f"its run is study {study}'s" for study in _reused_from(cell)]
        text += " (" + "; ".join(filter(None, notes)) + ")"
    beside = found.get("beside")
    if beside:
        text += f"; beside it, `{beside['cell']}`: [{_figure_text(beside[key])}]({beside['link']})"
    return text


def _documented_scale(figure) -> str:
    s = figure.scale
    epochs = "epochs not given" if s.epochs is None else f"{'up to ' if s.up_to else ''}{s.epochs} epochs"
    images = "" if s.train_images is None else f", {s.train_images:,} images"
    text = f"{NAMES[figure.dataset]}, {epochs}{images}, {s.seeds} seed{'s' * (s.seeds > 1)}, {s.model}"
    return text + (f"; *assumed*: {s.assumed}" if s.assumed else "")


def _our_scale(figure, cell) -> str:
    if cell is None:
        return "–"
    stand_in = " stand-in" if cell["dataset"] != figure.dataset else ""
    epochs = ("epochs: see its file" if cell["epochs"] is None
              else f"{cell['epochs']:g} of {cell['max_epochs']:g} epochs")
    images = "" if cell["train_images"] is None else f", {cell['train_images']:,.0f} images"
    return (f"{NAMES[cell['dataset']]}{stand_in}, {epochs}{images}, {cell['seeds']}/{cell['seeds_planned']} seeds, "
            f"{cell['model'] or 'model not recorded'}")


def report_row(figure: Documented, found) -> list:
    """The cells of HEADER for one finding."""
    verdict, reason, difference = judge(figure, found)
    cell = found["shown"] if found else None
    ratio = _passes_ratio(figure.scale, cell) if cell else None
    study = f"[{cell['study']}]({cell['link']})" if cell else (f"`{figure.study}`" if figure.study else "–")
    return [figure.source, figure.what, figure.figure, _documented_scale(figure), _our_scale(figure, cell),
            _ratio(ratio), _ours(found, "exact") if found else UNMEASURED, _ours(found, "all") if found else "–",
            difference, f"**{verdict}**", reason, short_cpu(cell["cpu"]) if cell else "–", study]


HEADER = ["source", "documented finding", "documented", "documented scale", "our scale",
          "image passes, ours / documented", "ours: test top-1, pixel-exact 1,000 (mean ± std over seeds)",
          "ours: test top-1, all 10,000", "ours − documented (± standard error)", "verdict", "reason", "CPU",
          "study"]


def study_command(study: str, commits=()) -> str:
    """The command that runs (or continues) a study and records it, as typed from the repository root;
    prefixed with ``git checkout`` of the commit that ran the recorded runs (``commits``, the summary's
    column) when the study's file has changed since (``changed_since``)."""
    if study == FINETUNE:
        return "python -m kcifar.finetune experiments/recipes/finetune_lite0_r224.toml --runs-dir runs"
    command = f"python -m kcifar.sweep experiments/sweeps/{study}.toml --runs-dir runs --out experiments/results/{study}"
    commit = changed_since(study_files(f"experiments/sweeps/{study}.toml"), commits)
    return f"git checkout {commit} && {command}" if commit else command


def study_files(path: str) -> list:
    """A study file and the recipe files it names (relative to the repository root)."""
    full = Path(__file__).resolve().parents[1] / path
    spec = read_toml(full) if full.is_file() else {}
    recipes = [spec.get("recipe")] + [cell.get("recipe") for cell in spec.get("cells", [])]
    return [path] + sorted({str(Path(path).parent / r).replace("sweeps/../", "") for r in recipes if r})


def _git(*args):
    """git's output in the checkout this module is in, or None (no git, not a checkout, unknown commit)."""
    try:
        result = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def changed_since(paths, commits) -> str | None:
    """The newest of ``commits`` (text holding short hashes) at which one of ``paths`` differs from the file
    in the working tree (or the file is gone), or None: the files still are what ran them, or git cannot tell."""
    root = Path(__file__).resolve().parents[1]

    def differs(commit, path):
        then, current = _git("show", f"{commit}:{path}"), root / path
        return then is not None and then != (current.read_text(encoding="utf-8") if current.is_file() else None)

    changed = [c for c in sorted(set(re.findall(r"\b[0-9a-f]{7,40}\b", " ".join(commits))))
               if any(differs(c, path) for path in paths)]
    return max(changed, key=lambda c: int(_git("log", "-1", "--format=%ct", c) or 0), default=None)


def _studies_section(found_rows) -> list:
    studies = {}
    for found in filter(None, found_rows):
        for cell in filter(None, [found["shown"], found.get("beside")]):
            studies.setdefault(cell["study"], [cell["link"], []])[1].append(cell.get("commit", ""))
    lines = ["", "## The studies: one command each", "",
             "Each runs (and after any stop continues) from the repository root with the CIFAR data in "
             "`$KCIFAR_DATA_DIR`; each study's file gives every cell's CPU flags, dates, commits and the command "
             "as it was typed. Where a study's file has changed since its recorded runs (it now holds the study at "
             "the documented scale), the command first checks out the commit that ran them.", ""]
    return lines + [f"- [{study}]({link}): `{study_command(study, commits)}`"
                    for study, (link, commits) in studies.items()]


def to_markdown(rows, found_rows, command) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    verdicts = [row[HEADER.index("verdict")] for row in rows]
    counts = {v: verdicts.count(f"**{v}**") for v in (HOLDS, FAILS, NOISY, UNTESTABLE, UNMEASURED)}
    lines = ["# What the write-ups report, and whether it holds here", "",
             f"Generated by `{command}` on {now} from the results recorded in `experiments/results/`. "
             f"{len(rows)} documented findings (S0..S4, restated in English in BASELINES.md): "
             + ", ".join(f"**{n}** {v}" for v, n in counts.items()) + ".", "",
             "How to read a row:", "",
             "- *Ours* is the test top-1, mean ± sample standard deviation over the seeds, on the pixel-exact test "
             "images (our CIFAR-10 copy: images 0-999; the others passed through JPEG), the headline, and on all "
             "10,000. The test set is measured once and chooses nothing: where a finding names no cell, the row "
             "shows the cell best on validation (`best val top-1`) and says so.",
             "- *Scale*: the documented setting beside ours (data set, epochs, training images, seeds, model; "
             "*assumed* where the write-up is silent), and our image passes (epochs x training images, per run) "
             "as a share of the documented.",
             "- *ours − documented*, on the same data set only: ± one standard error, the binomial error of the "
             "test images and the spread of the seeds (std / √seeds) in quadrature; one seed has the binomial "
             "error alone. The documented figure's own error (one run) is not given, so not included.",
             f"- *Verdict*, by rule: **{UNTESTABLE}** when the data set differs for an absolute figure (a CIFAR-10 "
             "stand-in for a CIFAR-100 figure: an order between cells is still judged, by its direction only), "
             f"when our image passes are under {MIN_PASSES:.0%} of the documented, when the model differs, or "
             f"when nothing was documented to compare with. Otherwise **{FAILS}** when ours falls short by more "
             f"than {NOISE:g} standard errors and **{HOLDS}** when not (*within noise* when the difference is "
             f"under {NOISE:g} either way: consistent with a documented figure, or with no gain). A finding that "
             f"one cell beats another holds only when it wins by {NOISE:g} standard errors or more; under that, "
             f"either way, it is **{NOISY}**: this scale cannot tell. A single figure: ours against it. A best-of "
             "finding: the documented "
             "winner's cell against the cell best on validation, on validation: by top-1, or, where the write-up "
             "judged by overfitting (S4's remedies), by the lowest validation loss over the epochs (± the per-image "
             "spread of the loss / √images and the seeds' spread), top-1 given beside it. An order between cells: "
             "the two cells on all 10,000 test images (their errors added as if independent); each S1 step is "
             "such an order, against the step before it, the gain (or none) the write-up reports. Against a "
             "documented maximum of epochs (EarlyStopping), our image passes count our maximum. A curve: a "
             "reading of the study's curves, written by hand and said so.", "", *tables.markdown(HEADER, rows)]
    return "\n".join(lines + _studies_section(found_rows)) + "\n"


def s1_progression(results_dir: Path, path: Path):
    """Figure of S1's documented progression (CIFAR-100) and ours, each on its own axis, at every numbered
    step (step 2's and 12's documented figures are words: gaps on the left); None while no step is measured."""
    steps = [f for f in BASELINES if f.study == "s1_steps" and f.what.removeprefix("step ").isdigit()]
    ours = [(measured(f, results_dir) or {}).get("shown") for f in steps]
    measured_cell = next((o for o in ours if o), None)
    if measured_cell is None:
        return None
    return plots.progression(
        [f.what.removeprefix("step ") for f in steps], [f.fraction for f in steps],
        [_headline(o)[0] if o else None for o in ours], path,
        title="S1 steps: the shape of each progression, on its own axis (the data sets differ: no figure compares)",
        documented_label="documented: CIFAR-100, 100-200 epochs on 50,000 images, one run",
        ours_label=f"ours: {NAMES[measured_cell['dataset']]}, {_epochs_range(o for o in ours if o)} epochs on "
                   f"{measured_cell['train_images']:,.0f} images, {measured_cell['seeds']} seeds; pixel-exact test, "
                   "mean ± std")


def _epochs_range(cells) -> str:
    """The mean epochs run of the cells, as "4" or "38-100" (EarlyStopping ends the runs at different epochs)."""
    epochs = sorted({f"{c['epochs']:g}" for c in cells if c["epochs"]}, key=float)
    return "-".join(dict.fromkeys([epochs[0], epochs[-1]])) if epochs else "?"


REPORT = "experiments/REPORT.md"


def write_report(results_dir="experiments/results", path=REPORT,
                 command="python -m kcifar.report --documented") -> Path:
    """Write REPORT.md (and the S1 progression figure beside it) from the recorded results."""
    results_dir, path = Path(results_dir), Path(path)
    found_rows = [measured(figure, results_dir) for figure in BASELINES]
    rows = [report_row(figure, found) for figure, found in zip(BASELINES, found_rows)]
    figure = s1_progression(results_dir, path.with_name(path.stem + "_s1_progression.png"))
    text = to_markdown(rows, found_rows, command)
    if figure is not None:
        text += f"\n![S1: the documented progression and ours, each on its own axis]({figure.name})\n"
    write_text(path, text)
    return path
