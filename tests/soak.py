"""The kill soak's machinery, shared by tests/test_kill_soak.py and experiments/kill_soak.py.

A kcifar command runs as a process; it is killed with SIGKILL at a moment chosen by the
files it writes (a temporary file of ``kcifar.fileio.atomic_path`` appearing, a backup
epoch, the first figure) or after a delay; the same command is started again. At the end
the run directory is compared with that of the same command never stopped. ``phase`` reads,
after a kill, what the process was doing from the files it left.
"""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kcifar.fileio import TEMPORARY

TIMING = ("epoch_time_s", "train_images_per_s")  # history columns that differ between two equal runs
FIGURES = ("confusion.png", "per_class_accuracy.png", "predictions.png", "learning_curves.png")


# ------------------------------------------------------------ processes


def start(module, args, env, log: Path) -> subprocess.Popen:
    """``python -m module args`` with ``env`` added; stdout and stderr go to ``log``."""
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "-m", module, *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})


def kill_when(process, condition, timeout=600, poll=0.002) -> bool:
    """SIGKILL ``process`` once ``condition()`` holds; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if condition():
            process.kill()
            process.wait()
            return True
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise TimeoutError(f"{process.args} met no kill condition in {timeout} s")
        time.sleep(poll)
    return False


# ------------------------------------------------------------ what a run directory shows


def temporaries(folder: Path) -> list:
    """atomic_path's temporary files under ``folder`` (left by a kill while a file was written)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*") if TEMPORARY.match(p.name))


def writing(folder: Path, stem: str) -> bool:
    """Whether a file ``<stem>.*`` directly in ``folder`` is being written (its temporary exists)."""
    try:
        return any(name.startswith(f".{stem}.") and TEMPORARY.match(name) for name in os.listdir(folder))
    except FileNotFoundError:
        return False


def backup_epoch(run_dir: Path):
    """The epoch the latest backup copy holds, or None."""
    try:
        return int(json.loads((Path(run_dir) / "backup" / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return None


def backup_writing(run_dir: Path) -> bool:
    """Whether the backup is being written: its weights' temporary exists, or the previous copy
    was just made a link to the latest one (between the rotation and the new weights)."""
    backup = Path(run_dir) / "backup"
    if writing(backup, "latest"):
        return True
    try:
        return os.stat(backup / "latest.weights.h5").st_ino == os.stat(backup / "latest.weights.h5.bkp").st_ino
    except FileNotFoundError:
        return False


def history_rows(run_dir: Path) -> list:
    try:
        return (Path(run_dir) / "history.csv").read_text().splitlines(keepends=True)[1:]
    except FileNotFoundError:
        return []


def figures(run_dir: Path) -> list:
    return [name for name in FIGURES if (Path(run_dir) / name).exists()]


def stages(run_dir: Path) -> list:
    try:
        return sorted(json.loads((Path(run_dir) / "stages.json").read_text()))
    except (OSError, ValueError):
        return []


def phase(run_dir: Path, epochs: int, features: Path = None) -> str:
    """What a process killed in ``run_dir`` (a run of ``epochs`` epochs) was doing, from the files it left."""
    run_dir = Path(run_dir)
    done, rows, temps = backup_epoch(run_dir), len(history_rows(run_dir)), temporaries(run_dir)
    if not (run_dir / "recipe.toml").exists():
        return "start-up (no run directory yet)"
    if (run_dir / "metrics.json").exists():
        return "after metrics.json"
    if features is not None:
        cached = sorted(p.name for p in Path(features).glob("*/*.npy")) if Path(features).exists() else []
        if len(cached) < 5 and not rows:
            return f"feature caching ({', '.join(cached) or 'no file'} written)"
    if (run_dir / "evaluation.json").exists():
        return "writing metrics.json"
    shown = figures(run_dir)
    if shown or any(t.endswith(".png") for t in temps):
        return f"figure writing ({len(shown)} of {len(FIGURES)} written)"
    if any(Path(t).name.startswith((".best.", ".stage")) for t in temps):
        return f"best-model save of epoch {rows + 1}"
    if backup_writing(run_dir):
        return f"backup write of epoch {rows}"
    if done is not None and done >= epochs:
        return "final test scoring (training done, no figure yet)"
    if done is not None and rows > done:
        return f"end of epoch {rows} (history row written, backup not yet)"
    return f"epoch {(done or 0) + 1} (training or validation)"


# ------------------------------------------------------------ equality


def _history(run_dir: Path) -> list:
    with open(Path(run_dir) / "history.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _weights(path: Path) -> list:
    from kcifar import models

    return models.load(path).get_weights()


SCORES = ("test", "test_exact", "best_val_accuracy", "best_epoch", "epochs_run", "stage_epochs", "finished")


def differences(whole: Path, resumed: Path) -> list:
    """How the run in ``resumed`` differs from the uninterrupted one in ``whole`` (empty: equal):
    best.keras weights (exactly), history.csv (but its timing columns), metrics.json's scores,
    evaluation.json."""
    import numpy as np

    found = []
    a, b = _weights(Path(whole) / "best.keras"), _weights(Path(resumed) / "best.keras")
    if len(a) != len(b) or any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, b)):
        found.append("best.keras weights differ")
    if _history(whole) != _history(resumed):
        found.append("history.csv rows differ")
    ma, mb = (json.loads((Path(d) / "metrics.json").read_text()) for d in (whole, resumed))
    found += [f"metrics.json {key}: {ma.get(key)} != {mb.get(key)}" for key in SCORES if ma.get(key) != mb.get(key)]
    if (Path(whole) / "evaluation.json").read_text() != (Path(resumed) / "evaluation.json").read_text():
        found.append("evaluation.json differs")
    return found


# ------------------------------------------------------------ moments to kill at


def mid_epoch(run_dir: Path, fraction=0.5):
    """A condition: ``fraction`` of an epoch after the second epoch end this process reaches
    (a backup newer than the one there now); an epoch takes the time between the two ends
    (the first epoch of a process also traces the step)."""
    run_dir, before, ends = Path(run_dir), backup_epoch(run_dir), {}

    def condition():
        done = backup_epoch(run_dir)
        if done is not None and done != before:
            ends.setdefault(done, time.monotonic())
        if len(ends) < 2:
            return False
        previous, last = sorted(ends.values())[-2:]
        return time.monotonic() - last >= fraction * (last - previous)

    return condition


def soak(module, args, env, run_dir, moments, epochs, log, features=None, tries=3) -> list:
    """Start ``module args`` and kill it at each of ``moments`` in turn, ``(label, make_condition,
    expected phase prefix)``; a kill that landed outside its phase is tried again (up to ``tries``).
    Then run the command to its end. ``run_dir``: the run directory, or a function giving the one
    being trained (a sweep's). Returns one dict per kill: its label, the phase it hit, the run
    directory and the history rows whose backup existed, which the rerun must keep byte for byte."""
    where = run_dir if callable(run_dir) else (lambda: run_dir)
    kills = []
    for label, make_condition, expected in moments:
        for _ in range(tries):
            if not kill_when(start(module, args, env, log), make_condition()):
                raise AssertionError(f"the command ended before the kill at {label}:\n{Path(log).read_text()[-3000:]}")
            killed = where()
            kills.append({"label": label, "phase": phase(killed, epochs, features), "run_dir": killed,
                          "rows": history_rows(killed)[:backup_epoch(killed) or 0]})
            if kills[-1]["phase"].startswith(expected):
                break
        else:
            raise AssertionError(f"{tries} kills missed the {label}: {[k['phase'] for k in kills[-tries:]]}")
    final = start(module, args, env, log)
    if final.wait() != 0:
        raise AssertionError(f"the rerun after the last kill failed:\n{Path(log).read_text()[-3000:]}")
    return kills


def kept_rows_lost(kills) -> list:
    """The kills after which the rerun trained again an epoch the backup held (empty: none)."""
    return [kill["label"] for kill in kills if history_rows(kill["run_dir"])[:len(kill["rows"])] != kill["rows"]]
