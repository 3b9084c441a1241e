"""A study's summary: ``<study>.md`` + ``<study>.csv`` (one row per cell) and two figures.

Each cell's row holds, over the seeds finished, the mean ± sample standard
deviation (n - 1; none with one seed) of the best validation top-1, the test
top-1 on all test images and on the pixel-exact subset (where the data has
one), the epochs run, the wall time and the training images/s, all read from
the runs' own ``metrics.json``; and the lowest validation loss over the epochs, its
epoch, its per-image spread and the last epoch's validation loss, from ``history.csv``.
No documented figure here: a study may run a
recipe on another data set than the documented one (kcifar.documented compares).
The figures: test top-1 (all images: more images, less noise between cells)
against the first varied key, one line per combination of the others; and the
validation curves of every run overlaid.

With an output folder other than the runs' folder the small files of each run
(metrics.json, history.csv, evaluation.json, provenance.json, recipe.toml,
learning_curves.png; never a model) are copied there first, absolute paths of
this machine replaced by ``…/<last part>``, and the summary is made from the
copies: ``experiments/results/<study>/`` then holds everything the report needs.
A reading written by hand below the generated part (from a ``## Reading`` heading on)
is kept each time the summary is written again.
"""

import datetime
import statistics
from pathlib import Path

import numpy as np

from kcifar import fileio, plots, tables
from kcifar.machine import code_version, scrub_paths
from kcifar.errors import KcifarError
from kcifar.rundir import (PROVENANCE, SMALL_FILES, evaluation_file, is_finished, read_history, read_json, read_metrics,
                           read_recipe)
from kcifar.sweep.runner import training_settings
from kcifar.sweep.study import format_value

STATS = [("val_top1", "best val top-1"), ("test_all_top1", "test top-1, all"),
         ("test_exact_top1", "test top-1, pixel-exact")]


def record(study, runs_folder: Path, out: Path):
    """Copy each finished run's small files from ``runs_folder`` into ``out``, paths scrubbed, each file atomically."""
    for _, _, recipe in study.runs():
        source = runs_folder / recipe["name"]
        if not is_finished(source):
            continue
        for name in SMALL_FILES:
            if (source / name).is_file():
                data = (source / name).read_bytes()
                if not name.endswith(".png"):
                    data = scrub_paths(data.decode("utf-8")).encode("utf-8")
                fileio.write_bytes(out / recipe["name"] / name, data)


# ------------------------------------------------------------ reading runs


def finished_run_files(run_dir: Path) -> dict | None:
    """A finished run's files (metrics, history, evaluation, provenance), or None when unfinished."""
    metrics = read_metrics(run_dir)
    if not metrics or not metrics.get("finished"):
        return None
    return {"metrics": metrics, "history": read_history(run_dir), "evaluation": read_json(run_dir / evaluation_file("test")),
            "provenance": read_json(run_dir / PROVENANCE, missing={})}


def read_cells(study, folder: Path) -> list:
    """[(cell, [finished runs' files])] in study order. A run counts only if it trained as the study's
    recipe for it says now: one recorded by an older version of the study file (another scale, say)
    is left out, not summarised beside the new ones."""
    return [(cell, [run for recipe in cell.recipes
                    if trained_as(folder / recipe["name"], recipe) and (run := finished_run_files(folder / recipe["name"]))])
            for cell in study.cells]


def trained_as(run_dir: Path, recipe: dict) -> bool:
    """Whether the run in ``run_dir`` has ``recipe``'s training settings (no readable recipe: no)."""
    try:
        return training_settings(read_recipe(run_dir)) == training_settings(recipe)
    except KcifarError:
        return False


# ------------------------------------------------------------ one row per cell


def mean_std(values):
    """(mean, sample std) in percent of fractions, rounded to 0.01; None where undefined."""
    values = [100 * v for v in values if v is not None]
    if not values:
        return None, None
    return round(statistics.fmean(values), 2), round(statistics.stdev(values), 2) if len(values) > 1 else None


def _mean(values, digits=1):
    values = [v for v in values if v is not None]
    return round(statistics.fmean(values), digits) if values else None


def _joined(values):
    return "; ".join(sorted({v for v in values if v})) or None


def _trained_by(metrics, key: str, default) -> str | None:
    """Every value of ``key`` (cpu, precision, code) among the processes that trained the runs: a run
    stopped and resumed elsewhere has several (metrics.json ``segments``); ``default(m)`` where a run
    or a segment did not record it."""
    return _joined(segment.get(key) or default(m) for m in metrics for segment in m.get("segments") or [{}])


def lowest_val_loss(history: dict) -> dict | None:
    """{loss, epoch (from 1), sd (its per-image spread, None where not logged), last (the last epoch's
    validation loss)} of one run's history; None without validation."""
    losses = history.get("val_loss")
    if losses is None or not np.isfinite(losses).any():
        return None
    best = int(np.nanargmin(losses))
    sd = history.get("val_loss_sd", np.full(len(losses), np.nan))[best]
    return {"loss": float(losses[best]), "epoch": best + 1, "sd": float(sd) if np.isfinite(sd) else None,
            "last": float(losses[np.isfinite(losses)][-1])}


def _loss_columns(runs) -> dict:
    """The lowest validation loss over the epochs: mean and sample std over the seeds, its epoch,
    its per-image spread (mean over the seeds; only where every run logged it), the last epoch's."""
    lowest = [found for run in runs if (found := lowest_val_loss(run["history"]))]
    values = [found["loss"] for found in lowest]
    spreads = [found["sd"] for found in lowest]
    return {"val_loss_min_mean": _mean(values, 4), "val_loss_min_std": round(statistics.stdev(values), 4)
            if len(values) > 1 else None, "val_loss_min_epoch_mean": _mean([f["epoch"] for f in lowest]),
            "val_loss_min_sd_mean": _mean(spreads, 4) if None not in spreads else None,
            "val_loss_last_mean": _mean([f["last"] for f in lowest], 4)}


def cell_row(study, cell, runs) -> dict:
    metrics = [run["metrics"] for run in runs]
    recipe = cell.recipes[0]
    row = {"cell": cell.name, **{key: format_value(cell.settings[key]) if key in cell.settings else ""
                                 for key in study.keys},
           "dataset": recipe["dataset"], "seeds": len(cell.seeds), "seeds_done": len(runs)}
    values = {"val_top1": [m.get("best_val_accuracy") for m in metrics],
              "test_all_top1": [(m.get("test") or {}).get("top1") for m in metrics],
              "test_exact_top1": [(m.get("test_exact") or {}).get("top1") for m in metrics]}
    for stat, _ in STATS:
        row[f"{stat}_mean"], row[f"{stat}_std"] = mean_std(values[stat])
    row.update(_loss_columns(runs))
    dates = sorted(run["provenance"].get("finished_utc") or "" for run in runs if run["provenance"])
    row.update({
        "test_exact_n": next(((m.get("test_exact") or {}).get("n") for m in metrics if m.get("test_exact")), None),
        "epochs_mean": _mean([m.get("epochs_run") for m in metrics]),
        "max_epochs": recipe["train"]["epochs"],
        "train_images": next((m.get("train_images") for m in metrics), None),
        "val_images": recipe["data"]["val_size"],
        "wall_time_s_mean": _mean([m.get("wall_time_s") for m in metrics]),
        "train_images_per_s_mean": _mean([m.get("train_images_per_s") for m in metrics]),
        "cpu": _trained_by(metrics, "cpu", lambda m: m.get("machine", {}).get("cpu")),
        "precision": _trained_by(metrics, "precision", lambda m: m.get("precision")),
        "date": " to ".join(dict.fromkeys([dates[0], dates[-1]])) if dates else None,
        "commit": _trained_by(metrics, "code", lambda m: m.get("code")),  # the code each run trained at
        "command": _joined(run["provenance"].get("command") for run in runs),
    })
    return row


def to_csv(rows) -> str:
    return tables.csv_text(rows, rows[0])


# ------------------------------------------------------------ markdown


def _pm(row, stat):
    mean, std = row[f"{stat}_mean"], row[f"{stat}_std"]
    return "–" if mean is None else f"{mean:.2f}" + ("" if std is None else f" ± {std:.2f}") + " %"


def _minutes(seconds):
    return "–" if seconds is None else f"{seconds / 60:.1f}"


def cells_table(study, rows) -> list:
    header = ["cell", *study.keys, "seeds done", *[label for _, label in STATS], "lowest val loss (epoch)",
              "val loss, last epoch", "epochs (of max)",
              "training images (validation)", "wall time, min", "train images/s"]
    return tables.markdown(header, [_cells_row(study, r) for r in rows])


def _cells_row(study, r) -> list:
    epochs = "–" if r["epochs_mean"] is None else f"{r['epochs_mean']:g} ({r['max_epochs']})"
    images = "–" if r["train_images"] is None else f"{r['train_images']:,} ({r['val_images']:,})"
    speed = "–" if r["train_images_per_s_mean"] is None else f"{r['train_images_per_s_mean']:.0f}"
    return [r["cell"], *[r[k] for k in study.keys], f"{r['seeds_done']}/{r['seeds']}",
            *[_pm(r, stat) for stat, _ in STATS], _lowest_loss(r), _loss(r["val_loss_last_mean"]), epochs, images,
            _minutes(r["wall_time_s_mean"]), speed]


def _loss(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _lowest_loss(r) -> str:
    if r["val_loss_min_mean"] is None:
        return "–"
    std = "" if r["val_loss_min_std"] is None else f" ± {r['val_loss_min_std']:.3f}"
    return f"{_loss(r['val_loss_min_mean'])}{std} ({r['val_loss_min_epoch_mean']:g})"


def per_class_table(cells) -> list:
    """Test top-1 per class (all test images), mean over the seeds; only for 10 classes or fewer."""
    rows = []
    for cell, runs in cells:
        per_class = [run["evaluation"]["per_class"] for run in runs if run["evaluation"]]
        if per_class and len(per_class[0]) <= 10:
            classes = [entry["class"] for entry in per_class[0]]
            means = [mean_std([seed[i]["accuracy"] for seed in per_class])[0] for i in range(len(classes))]
            rows.append((cell.name, len(per_class), classes, means))
    if not rows:
        return []
    classes = rows[0][2]
    lines = ["", "## Test top-1 per class (all test images), mean over the seeds", "",
             "| cell | seeds | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 2)]
    lines += [f"| {name} | {n} | " + " | ".join("–" if m is None else f"{m:.1f}" for m in means) + " |"
              for name, n, _, means in rows]
    return lines


def to_markdown(study, cells, rows, figures, command) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    done = sum(r["seeds_done"] for r in rows)
    lines = [f"# Study `{study.name}`" + (f": {study.description}" if study.description else ""), "",
             f"Study file `{study.path.name}`, {study.seeds_text()}, {len(rows)} cells; {done} of "
             f"{sum(r['seeds'] for r in rows)} runs finished. Summary written {now} at commit {code_version()} by "
             f"`{scrub_paths(command)}`.", "",
             "Top-1 accuracy in percent, mean ± sample standard deviation over the seeds finished (no ± with one "
             "seed). *best val*: the kept epoch on the validation split carved from training. *test, all*: every "
             "test image; *pixel-exact*: only the test images that are bit-exact copies of the official ones "
             "(this machine's CIFAR-10: images 0-999). *Lowest val loss*: the validation loss (cross-entropy) of "
             "the epoch where it was lowest, mean ± std over the seeds, that epoch (mean) in brackets; beside it "
             "the last epoch's: the rise between the two is the overfitting. Epochs: mean epochs run (EarlyStopping) of the recipe's "
             "maximum. Training images per run (in brackets the validation images held out of the training set): "
             "with the epochs, the scale, which the write-ups' may exceed (experiments/REPORT.md sets the two side "
             "by side). No cell is named best here: the test figures choose nothing. "
             "Wall time per run (metrics.json `wall_time_s`): from loading the data to the end of the "
             "test-set evaluation (runs whose metrics.json has no `setup_s` started their clock after the model was "
             "built and initialised); not the interpreter's start or TensorFlow's import.", ""]
    lines += cells_table(study, rows)
    lines += ["", *[f"![{title}]({name})" for name, title in figures]]
    lines += per_class_table(cells)
    lines += ["", "## Where each cell ran", "", "Every CPU, precision and commit that trained a cell's runs "
              "(a run stopped and resumed elsewhere has several: its metrics.json `segments` says which epochs).",
              "", "| cell | finished (UTC) | CPU | precision | commit | command |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['date'] or '–'} | {r['cpu'] or '–'} | {r['precision'] or '–'} | "
              f"{r['commit'] or 'not recorded'} | "
              f"{'`' + r['command'] + '`' if r['command'] else 'not recorded'} |" for r in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ figures


def draw_figures(study, cells, rows, out: Path) -> list:
    """[(file name, title)] of the figures written (none before the first finished run)."""
    if not any(runs for _, runs in cells):
        return []
    one_axis = study.keys and all(key in cell.settings for cell, _ in cells for key in study.keys)
    x_key = study.keys[0] if one_axis else None  # else each cell sets its own keys (an ablation): by cell
    other_keys = study.keys[1:] if one_axis else []
    x_labels = list(dict.fromkeys(r[x_key] if x_key else r["cell"] for r in rows))
    by_recipe = one_axis and len({cell.recipe_file for cell, _ in cells}) > 1  # S3: SGD's and Adam's epochs
    series = {}
    for (cell, runs), row in zip(cells, rows):
        label = ", ".join(([cell.recipe_file or "defaults"] if by_recipe else [])
                          + [f"{k.rsplit('.', 1)[-1]} {row[k]}" for k in other_keys]) or "test top-1, all"
        values = series.setdefault(label, [[] for _ in x_labels])
        x = x_labels.index(row[x_key] if x_key else row["cell"])
        values[x] += [100 * run["metrics"]["test"]["top1"] for run in runs if run["metrics"].get("test")]
    top1 = plots.sweep_accuracy(x_labels, series, out / f"{study.name}_top1.png", xlabel=x_key or "cell", connect=x_key is not None,
                                title=f"{study.name}: test top-1 on all test images (mean ± std over seeds, dots: seeds)")
    curves = plots.overlaid_curves([(cell.name, [run["history"] for run in runs]) for cell, runs in cells if runs],
                                   out / f"{study.name}_curves.png", title=f"{study.name}: every run's learning curves",
                                   with_training=study.training_curves)
    return [(top1.name, "test top-1 against the swept key"), (curves.name, "learning curves of the cells")]


# ------------------------------------------------------------ the whole summary


READING = "## Reading"


def kept_reading(md: Path) -> str:
    """The hand-written part of an existing summary (from its first ``## Reading`` heading on),
    kept when the summary is written again; "" when there is none."""
    text = md.read_text() if md.is_file() else ""
    start = text.find(f"\n{READING}")
    return "" if start < 0 else text[start:]


def write_summary(study, runs_dir="runs", out=None, command="") -> list:
    """Write the study's summary (and, with ``out``, its recorded copy); returns the paths written."""
    runs_folder = Path(runs_dir) / study.name
    out = Path(out) if out else runs_folder
    fileio.check_writable(out)
    if out.resolve() != runs_folder.resolve():
        record(study, runs_folder, out)
    cells = read_cells(study, out)
    rows = [cell_row(study, cell, runs) for cell, runs in cells]
    figures = draw_figures(study, cells, rows, out)
    md, csv_path = out / f"{study.name}.md", out / f"{study.name}.csv"
    fileio.write_text(csv_path, to_csv(rows))
    fileio.write_text(md, to_markdown(study, cells, rows, figures, command) + kept_reading(md))
    return [md, csv_path] + [out / name for name, _ in figures]
