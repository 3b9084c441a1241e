"""The run directory, ``runs/<name>/``: its files, the one reader and writer of each, and which
epoch is best. Every command asks this module; it imports neither Keras nor TensorFlow, so
``kcifar.report`` and ``kcifar.sweep summary`` read runs without them.

A run holds ``recipe.toml`` (the resolved recipe), ``classes.txt``, ``history.csv`` (Keras'
CSVLogger, one row per epoch), ``best.keras``, ``backup/`` (BackupAndRestore, while training),
``stages.json`` and ``stage<N>.keras`` (a fine-tune's finished stages, while training),
``tensorboard/`` (when asked),
``segments.json`` (which process ran which epochs, where), ``metrics.json`` (written last:
the run is finished), ``evaluation.json`` and figures; a sweep adds ``provenance.json``.
A damaged file is one line naming it and what to do (``damaged``).
"""

import csv
import json
import shutil
from pathlib import Path

try:
    import fcntl  # POSIX; elsewhere runs are not locked
except ImportError:
    fcntl = None

import numpy as np

from kcifar import fileio, recipe as krecipe
from kcifar.errors import KcifarError

RECIPE = "recipe.toml"
CLASSES = "classes.txt"
HISTORY = "history.csv"
BEST_MODEL = "best.keras"
BACKUP_DIR = "backup"
STAGES = "stages.json"
SEGMENTS = "segments.json"
METRICS = "metrics.json"
PROVENANCE = "provenance.json"
TENSORBOARD = "tensorboard"
SMALL_FILES = [METRICS, HISTORY, "evaluation.json", PROVENANCE, RECIPE, "learning_curves.png"]  # what results keep


def stage_model(stage: int) -> str:
    """The best model of a fine-tune's finished ``stage``, kept until the run is finished."""
    return f"stage{stage}.keras"


def evaluation_file(split: str) -> str:
    """``evaluation.json`` for the test split, ``evaluation_<split>.json`` for another."""
    return "evaluation.json" if split == "test" else f"evaluation_{split}.json"


AGAIN = "pass --overwrite to train this run again from the start (in a sweep: delete the run's folder)"


def damaged(path, why: str) -> str:
    """The one line for a damaged file of a run directory (a sweep has no --overwrite: its runs are folders)."""
    return f"{path} is damaged ({why}); {AGAIN}"


def read_json(path, missing=None):
    """A JSON file of a run directory; ``missing`` when there is none; a damaged one is ``damaged``'s line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return missing
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KcifarError(damaged(path, "not valid JSON")) from None


# ------------------------------------------------------------ recipe, classes, history, metrics


def read_recipe(run_dir) -> dict:
    path = Path(run_dir) / RECIPE
    if not path.is_file():
        raise KcifarError(f"{path} is missing; is {run_dir} a run directory written by kcifar.train?")
    return krecipe.read_toml(path)


def _setting(recipe: dict, section: str, key: str):
    """``recipe[section][key]`` (``section`` None: top level), else kcifar.recipe's default."""
    table, default = (recipe, krecipe.DEFAULTS) if section is None else (recipe.get(section, {}),
                                                                          krecipe.DEFAULTS[section])
    return table.get(key, default[key])


def data_settings(recipe: dict) -> dict:
    """The load_cifar arguments a run used."""
    return {"name": _setting(recipe, None, "dataset"), "label_mode": _setting(recipe, "data", "label_mode"),
            "val_size": int(_setting(recipe, "data", "val_size")), "seed": int(_setting(recipe, None, "seed"))}


def monitor_of(recipe: dict) -> str:
    """The early-stopping monitor a run's best epoch was chosen by."""
    return _setting(recipe, "early_stopping", "monitor")


def write_class_names(run_dir, class_names):
    """``classes.txt``: the class names of the model's outputs, one per line, in order."""
    fileio.write_text(Path(run_dir) / CLASSES, "".join(f"{name}\n" for name in class_names))


def read_class_names(path) -> list:
    """Class names from a file with one name per line (a run's ``classes.txt``)."""
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise KcifarError(f"cannot read class names from {path} ({error}); "
                          "pass a text file with one class name per line") from None


def read_history(run_dir) -> dict:
    """``history.csv`` as {column: float array}, one row per epoch; {} when there is none.

    A resumed run can log an epoch twice; the later row wins. Empty and "NA" cells (Keras writes
    NA in the val_ columns of a run without validation) are NaN.
    """
    path = Path(run_dir) / HISTORY
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return {}
    by_epoch = {}
    for row in rows:
        try:
            by_epoch[int(float(row["epoch"]))] = {k: float(v) if v not in ("", "NA", None) else np.nan
                                                  for k, v in row.items() if k}
        except (KeyError, ValueError):
            raise KcifarError(damaged(path, f"not a Keras CSVLogger history: bad row {row}")) from None
    if not by_epoch:
        return {}
    columns = list(next(iter(by_epoch.values())))
    ordered = [by_epoch[e] for e in sorted(by_epoch)]
    return {c: np.array([row.get(c, np.nan) for row in ordered]) for c in columns}


def trim_history(run_dir: Path, epochs_done: int):
    """Drop history rows of epochs the backup does not hold (killed between the two writes);
    refuse a history that lacks whole rows of the epochs done."""
    path = run_dir / HISTORY
    if path.exists() and not epochs_done:
        path.unlink()
    elif path.exists() or epochs_done:
        try:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[: 1 + epochs_done]
        except (OSError, UnicodeDecodeError) as error:
            raise KcifarError(damaged(path, error.strerror if isinstance(error, OSError) else "not text")) from None
        rows = list(csv.reader(lines))
        whole = len(lines) == 1 + epochs_done and all(line.endswith("\n") and len(row) == len(rows[0])
                                                         for line, row in zip(lines, rows))
        if not whole:
            raise KcifarError(damaged(path, f"it lacks whole rows of the {epochs_done} epochs done"))
        fileio.write_text(path, "".join(lines))


def read_metrics(run_dir):
    """``metrics.json`` of a run, or None when it has none (not finished)."""
    return read_json(Path(run_dir) / METRICS)


def is_finished(run_dir) -> bool:
    """Whether ``run_dir`` holds a finished run (its metrics.json says so)."""
    return bool((read_metrics(run_dir) or {}).get("finished", False))


def write_metrics(run_dir: Path, metrics: dict):
    """Write ``metrics.json`` (the run is finished) and drop what only resuming needed: the
    backup, the stages' record and their models."""
    fileio.write_json(run_dir / METRICS, metrics)
    shutil.rmtree(run_dir / BACKUP_DIR, ignore_errors=True)
    for path in [run_dir / STAGES, *run_dir.glob(stage_model("*"))]:
        path.unlink(missing_ok=True)


def copy_finished(source: Path, run_dir: Path, recipe: dict):
    """Copy the finished run ``source`` to ``run_dir`` (absent) as the run of ``recipe``, which trains
    exactly as ``source``'s did under another name: its recipe and run names become ``recipe``'s, and
    ``provenance.json`` (the command that trained it, kept) says where it was copied from. Whole or not
    at all: copied into ``.<name>.copying`` beside ``run_dir``, then renamed."""
    staging = run_dir.with_name(f".{run_dir.name}.copying")
    shutil.rmtree(staging, ignore_errors=True)  # a copy killed half-way
    shutil.copytree(source, staging)
    fileio.write_text(staging / RECIPE, krecipe.to_toml(recipe))
    for path in [staging / METRICS, *staging.glob(evaluation_file("*"))]:
        record = read_json(path)
        if isinstance(record, dict) and "run" in record:
            fileio.write_json(path, {**record, "run": recipe["name"]})
    provenance = read_json(staging / PROVENANCE, missing={})
    fileio.write_json(staging / PROVENANCE, {**provenance, "copied_from": f"{source.parent.name}/{source.name}"})
    staging.replace(run_dir)


# ------------------------------------------------------------ which epoch is best


def mode(monitor: str) -> str:
    """"min" for a loss, else "max": what Keras' callbacks call the direction of ``monitor``."""
    return "min" if monitor.endswith("loss") else "max"


def best_index(values, monitor: str):
    """Index of the first best value of ``monitor`` among ``values`` (NaN ignored), or None.
    The epoch EarlyStopping and the best-model file keep."""
    values = np.asarray([] if values is None else values, dtype=float)
    if np.all(np.isnan(values)):
        return None
    return int(np.nanargmin(values) if mode(monitor) == "min" else np.nanargmax(values))


def improves(value, best, monitor: str) -> bool:
    """Whether ``value`` of ``monitor`` beats ``best``."""
    return value < best if mode(monitor) == "min" else value > best


def best_so_far(history: dict, monitor: str):
    """(best value, epochs since it) from an earlier run's history, or (None, 0)."""
    values = history.get(monitor)
    best = best_index(values, monitor)
    return (None, 0) if best is None else (float(values[best]), len(values) - 1 - best)


def stopped_early(recipe: dict, history: dict) -> bool:
    """Whether ``history``, the rows logged so far, already spent EarlyStopping's patience
    (as Keras' EarlyStopping decides it): the run stopped there, and resumed it trains no
    further epoch."""
    stop = recipe["early_stopping"]
    _, wait = best_so_far(history, stop["monitor"])
    return stop["enabled"] and len(history.get("epoch", [])) > 1 and wait >= max(stop["patience"], 1)


# ------------------------------------------------------------ resuming


def backup_pair(backup_dir: Path):
    """(weights file, metadata) of the newest whole backup copy in ``backup_dir`` (the latest,
    else the previous one), or None when there is no backup. Copies that exist but none of
    which is whole are a one-line error."""
    problems = []
    for weights, meta in ((backup_dir / "latest.weights.h5", backup_dir / "training_metadata.json"),
                          (backup_dir / "latest.weights.h5.bkp", backup_dir / "training_metadata.json.bkp")):
        if not (weights.exists() or meta.exists()):
            continue
        try:
            state = json.loads(meta.read_text(encoding="utf-8"))
            int(state["epoch"])
        except FileNotFoundError:
            problems.append(f"{meta.name} is missing")
            continue
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            problems.append(f"{meta.name} is damaged (not valid JSON)")
            continue
        if not weights.exists():
            problems.append(f"{weights.name} is missing")
        elif "weights_sha256" in state and fileio.file_sha256(weights) != state["weights_sha256"]:
            problems.append(f"{weights.name} is damaged (not the file {meta.name} names)")
        else:  # a backup written by Keras' own callback names no digest: taken as it is
            return weights, state
    if problems:
        raise KcifarError(f"{backup_dir} holds no whole backup ({'; '.join(problems)}); {AGAIN}")
    return None


def finished_stages(run_dir: Path) -> dict:
    """{stage: {"epochs", "best"}} of the stages a run in stages (finetune) has finished;
    each stage's best model is ``stage<N>.keras``."""
    return read_json(Path(run_dir) / STAGES, missing={})


def record_stage(run_dir: Path, stage: int, epochs: int, best):
    fileio.write_json(run_dir / STAGES, {**finished_stages(run_dir), str(stage): {"epochs": epochs, "best": best}})


def resume_epoch(run_dir: Path) -> int:
    """The epoch an interrupted run continues at: its backup's, else the end of its
    last finished stage (0 for a new run)."""
    pair = backup_pair(Path(run_dir) / BACKUP_DIR)
    if pair is not None:
        return int(pair[1]["epoch"])
    return sum(stage["epochs"] for stage in finished_stages(run_dir).values())


def check_models(run_dir: Path):
    """Refuse a resumed run whose kept models (best.keras, stage<N>.keras) are not whole
    (every member of the zip present, CRCs right): they would be used at the end."""
    import zipfile

    for path in sorted(run_dir.glob("*.keras")):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            bad = str(error) or type(error).__name__
        if bad:
            raise KcifarError(damaged(path, f"not a whole Keras file: {bad}"))


def check_run_dir(run_dir: Path, recipe: dict, overwrite: bool):
    """Refuse, writing nothing, a ``run_dir`` that ``recipe`` cannot start or resume in: a finished
    run, another recipe's interrupted run, or a folder that is no run (unless ``overwrite``).
    Cheap: a command asks before it reads the data or compiles the model."""
    if overwrite or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    saved = run_dir / RECIPE
    if is_finished(run_dir):
        raise KcifarError(f"{run_dir} holds a finished run; pass --overwrite to replace it or --name to start another")
    if not saved.exists():
        raise KcifarError(f"{run_dir} exists and is not a kcifar run; choose another --name or --runs-dir")
    if krecipe.with_defaults(krecipe.read_toml(saved)) != recipe:
        raise KcifarError(f"{run_dir} holds an interrupted run of a different recipe; "
                          "rerun with the same recipe to resume, or pass --overwrite or another --name")


def prepare(run_dir: Path, recipe: dict, overwrite: bool, class_names=()) -> int:
    """Start, resume or (with ``overwrite``) replace the locked ``run_dir``: refuse what ``check_run_dir``
    and the damaged-file checks refuse, write the recipe and the class names. Returns the epochs done."""
    if run_dir.is_dir():
        fileio.remove_temporaries(run_dir)  # a kill while a file was written leaves its temporary
    check_run_dir(run_dir, recipe, overwrite)
    if overwrite and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    epochs_done = resume_epoch(run_dir)
    trim_history(run_dir, epochs_done)
    check_models(run_dir)
    fileio.write_text(run_dir / RECIPE, krecipe.to_toml(recipe))
    write_class_names(run_dir, class_names)
    return epochs_done


# ------------------------------------------------------------ the lock


_HELD_LOCKS = {}  # lock file -> its open handle: the runs this process trains


def _lock_path(run_dir: Path) -> Path:
    return (run_dir.parent / f".{run_dir.name}.lock").resolve()


def lock(run_dir: Path):
    """Refuse a second process training ``run_dir`` at the same time (two terminals, one
    command): an exclusive ``flock`` on ``.<name>.lock`` beside it, held until ``unlock``.
    The OS drops it when its holder dies, even by ``kill -9``, so it never stays stuck.
    Re-entrant within one process (a sweep or a notebook resuming its own run)."""
    path = _lock_path(run_dir)
    if fcntl is None or path in _HELD_LOCKS:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as error:
        raise KcifarError(f"cannot write {path.parent}: {error.strerror}; choose a writable --runs-dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise KcifarError(f"another process is training {run_dir} right now; wait for it to end, "
                          "or pass another --name") from None
    _HELD_LOCKS[path] = handle


def unlock(run_dir: Path):
    handle = _HELD_LOCKS.pop(_lock_path(run_dir), None)
    if handle:
        handle.close()  # closing the last descriptor releases the flock


# ------------------------------------------------------------ segments: which process ran which epochs


def record_segment(run_dir: Path, segment: dict):
    """Append a process to ``segments.json``: ``segment`` says the epoch it starts at (``first_epoch``,
    from 1) and where it ran (``kcifar.run.this_process``), so a run resumed elsewhere says which
    epochs ran where."""
    path = run_dir / SEGMENTS
    fileio.write_json(path, [*read_json(path, missing=[]), segment])


def segment_summaries(run_dir: Path, history: dict) -> list:
    """``segments.json`` with each segment's last epoch and its median steady-epoch speed (its
    first epoch dropped: graph tracing); segments that finished no epoch are left out."""
    segments = read_json(Path(run_dir) / SEGMENTS, missing=[])
    speeds = list(history.get("train_images_per_s", []))
    summaries = []
    for segment, following in zip(segments, [*segments[1:], None]):
        first, last = segment["first_epoch"], following["first_epoch"] - 1 if following else len(speeds)
        if last < first:
            continue
        ran = [s for s in speeds[first - 1:last] if np.isfinite(s)]
        summaries.append({**segment, "last_epoch": last,
                          "train_images_per_s": round(float(np.median(ran[1:] or ran)), 1) if ran else None})
    return summaries
