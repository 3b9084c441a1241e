"""A table of runs beside the documented figures, as markdown and CSV.

    python -m kcifar.report runs/a runs/b ... [--out experiments/results/table]

prints the table as markdown, or with ``--out`` writes ``table.md`` and ``table.csv`` (the path plus
each suffix).
Each run directory gives ``metrics.json`` (written by kcifar.train) and
``recipe.toml``, whose ``[documented]`` table, if present, holds the figure
the documents report (``accuracy``, a fraction, and ``source``).

"ours - documented" uses the pixel-exact test figure where the run has one
(the rebuilt CIFAR-10 test set is bit-exact only on images 0-999; the other
9,000 passed through JPEG and cost accuracy), else the figure on all test
images; the table says which. A figure documented on another data set
(``documented.dataset``, e.g. CIFAR-100's beside a CIFAR-10 run) is shown but
never subtracted: such rows say "no CIFAR-10 figure documented".
"""

import os
import shlex
import sys
import time
from pathlib import Path

from kcifar.errors import KcifarError
from kcifar import cli as kcli, fileio, tables
from kcifar.fileio import write_text
from kcifar.machine import code_version

from kcifar.rundir import read_metrics, read_recipe

COLUMNS = ["run", "model", "dataset", "finished", "epochs", "best_epoch", "val_top1_pct", "test_top1_all_pct",
           "test_top1_exact_pct", "test_exact_n", "wall_time_s", "train_images_per_s", "documented_pct",
           "documented_source", "compared_with", "difference_pp", "machine", "code"]
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _compact(value):
    """A metrics.json entry such as ``machine`` on one line: ``k=v, k=v`` (never the host's
    kernel string, which older runs recorded as ``platform``)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if k != "platform")
    return None if value is None else str(value)


def shown_path(path) -> str:
    """``path`` relative to the current folder (the repository root) when inside it, else
    ``.../<parent>/<name>``: no folder above the checkout goes into a results file."""
    relative = os.path.relpath(Path(path).resolve())
    return relative if not relative.startswith("..") else f".../{Path(path).resolve().parent.name}/{Path(path).name}"


def _pct(fraction):
    return None if fraction is None else round(100 * float(fraction), 2)


def table_row(run_dir) -> dict:
    """One table row (the COLUMNS) from a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise KcifarError(f"{run_dir} is not a run directory; pass folders written by kcifar.train (runs/NAME)")
    metrics = read_metrics(run_dir)
    if metrics is None:
        raise KcifarError(f"{run_dir} has no metrics.json; has the run finished training?")
    recipe = read_recipe(run_dir)
    test, exact = metrics.get("test") or {}, metrics.get("test_exact") or {}
    documented = recipe.get("documented", {})
    if not documented.get("accuracy"):  # resolved recipes carry accuracy 0.0, source "" when nothing is documented
        documented = {}
    row = {
        "run": metrics.get("run", run_dir.name),
        "model": metrics.get("model", recipe.get("model")),
        "dataset": metrics.get("dataset", recipe.get("dataset")),
        "finished": bool(metrics.get("finished", False)),
        "epochs": metrics.get("epochs_run"),
        "best_epoch": metrics.get("best_epoch"),
        "val_top1_pct": _pct(metrics.get("best_val_accuracy")),
        "test_top1_all_pct": _pct(test.get("top1")),
        "test_top1_exact_pct": _pct(exact.get("top1")),
        "test_exact_n": exact.get("n"),
        "wall_time_s": metrics.get("wall_time_s"),
        "train_images_per_s": metrics.get("train_images_per_s"),
        "documented_pct": _pct(documented.get("accuracy")),
        "documented_source": documented.get("source"),
        "compared_with": None,
        "difference_pp": None,
        "machine": _compact(metrics.get("machine")),
        "code": metrics.get("code"),
    }
    return {**row, **compare(row, documented.get("dataset") or row["dataset"])}


def compare(row: dict, documented_dataset: str) -> dict:
    """``compared_with`` and ``difference_pp``: ours (pixel-exact where there is a figure)
    minus the documented figure, never across data sets."""
    if documented_dataset != row["dataset"]:
        return {"compared_with": f"no {DATASET_NAMES.get(row['dataset'], row['dataset'])} figure documented"}
    ours = "exact" if row["test_top1_exact_pct"] is not None else "all"
    if row["documented_pct"] is None or row[f"test_top1_{ours}_pct"] is None:
        return {}
    return {"compared_with": "pixel-exact test" if ours == "exact" else "all test",
            "difference_pp": round(row[f"test_top1_{ours}_pct"] - row["documented_pct"], 2)}


def _cell(value, unit=""):
    return "–" if value is None else f"{value:.2f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def _duration(seconds):
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _markdown_row(r) -> list:
    exact = "–" if r["test_top1_exact_pct"] is None else f"{r['test_top1_exact_pct']:.2f} % (n={r['test_exact_n']})"
    documented = "–" if r["documented_pct"] is None else f"{r['documented_pct']:.2f} % ({r['documented_source']})"
    difference = (f"{r['difference_pp']:+.2f} pp ({r['compared_with']})" if r["difference_pp"] is not None
                  else r["compared_with"] or "–")
    speed = "–" if r["train_images_per_s"] is None else f"{r['train_images_per_s']:.0f}"
    return [r["run"] + ("" if r["finished"] else " (unfinished)"), str(r["model"]), str(r["dataset"]),
            f"{_cell(r['epochs'])} ({_cell(r['best_epoch'])})", _cell(r["val_top1_pct"], " %"),
            _cell(r["test_top1_all_pct"], " %"), exact, _duration(r["wall_time_s"]), speed, documented, difference]


def to_markdown(rows, command) -> str:
    header = ["run", "model", "data", "epochs (best)", "val top-1", "test top-1, all", "test top-1, pixel-exact",
              "wall time h:mm:ss", "train images/s", "documented", "ours − documented"]
    lines = tables.markdown(header, [_markdown_row(r) for r in rows])
    intro = [
        "# Results", "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')} from each run's metrics.json "
        f"(kcifar.report at commit {code_version()}).",
        "Top-1 accuracy in percent. *val*: best epoch on the validation split carved from the training set. "
        "*test, all*: every test image. *test, pixel-exact*: only the test images that are bit-exact copies "
        "of the official ones (on the rebuilt CIFAR-10 here: images 0-999; the others passed through JPEG). "
        "*ours − documented* compares the pixel-exact figure where there is one, in percentage points.", "",
    ]
    machines = ["", "Machines and the commit of the training code (from metrics.json):", ""] + [
        f"- {r['run']}: {r['machine'] or 'not recorded'}; code: {r['code'] or 'not recorded'}" for r in rows]
    return "\n".join(intro + lines + machines) + "\n"


def to_csv(rows) -> str:
    return tables.csv_text(rows, COLUMNS)


def runs_table(run_dirs, command=None) -> tuple:
    """(rows, markdown) of the runs, in the order given."""
    if not run_dirs:
        raise KcifarError("no runs given; pass run directories such as runs/NAME")
    rows = [table_row(d) for d in run_dirs]
    command = command or "python -m kcifar.report " + " ".join(shlex.quote(shown_path(d)) for d in run_dirs)
    return rows, to_markdown(rows, command)


def write_report(run_dirs, out, command=None):
    """Write ``<out>.md`` and ``<out>.csv`` for the runs, in the order given; returns both paths."""
    if not run_dirs:
        raise KcifarError("no runs given; pass run directories such as runs/NAME")
    fileio.check_writable(Path(out).parent, "--out")
    rows, markdown = runs_table(run_dirs, command)
    out = Path(out)
    md, csv_path = out.with_name(out.name + ".md"), out.with_name(out.name + ".csv")
    write_text(md, markdown)
    write_text(csv_path, to_csv(rows))
    return md, csv_path


@kcli.command
def main(argv=None):
    parser = kcli.parser("report", __doc__.split("\n")[0])
    parser.add_argument("runs", nargs="*", help="run directories (runs/NAME)")
    parser.add_argument("--out", help="path prefix of a .md and a .csv to write (default: print the markdown); "
                        "with --documented, the report's .md file")
    parser.add_argument("--documented", action="store_true",
                        help="write experiments/REPORT.md instead: every documented figure beside experiments/results/")
    args = parser.parse_args(argv)
    shown = [shown_path(a) if Path(a).exists() else a for a in (argv if argv is not None else sys.argv[1:])]
    command = "python -m kcifar.report " + " ".join(shlex.quote(a) for a in shown)
    if args.documented:
        from kcifar import documented

        if args.runs:
            raise KcifarError("--documented reads experiments/results/, not run directories; pass one or the other")
        print(f"wrote {documented.write_report(path=args.out or documented.REPORT, command=command)}")
        return
    if not args.out:
        print(runs_table(args.runs, command)[1], end="")
        return
    for path in write_report(args.runs, args.out, command):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
