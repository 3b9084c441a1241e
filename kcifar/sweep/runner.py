"""Run a study's cells one after another, so that the same command continues it after any stop.

A finished run (``metrics.json`` says ``finished``) is skipped and left as
kcifar.train wrote it (a run trained by ``kcifar.train`` and copied into the
runs folder counts, with its own evaluation), an interrupted one resumes where
kcifar.train's backup left it, and with a budget no new run
starts once the budget is spent (the one running is finished, not cut). A run
that fails with a KcifarError (a diverged loss, a run folder of another
recipe) is reported and the others go on; the next call tries it again. A run
whose recipe and seed another study of the runs folder has already finished
(S4's remedies "none" is step 1's VGG16, say) is copied from there under its
own name, not trained again; its ``provenance.json`` says where it came from.
kcifar.train evaluates each run (``evaluation.json``, per-class accuracy,
learning-curve PNG, with the recipe's TTA); a run this sweep trained then gets
``provenance.json``: when it finished, on which CPU, at which git commit, by
which command.
"""

import datetime
import sys
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic

from kcifar import fileio
from kcifar.errors import KcifarError
from kcifar.recipe import with_defaults
from kcifar.rundir import PROVENANCE, copy_finished, is_finished, read_recipe


@dataclass
class Progress:
    ran: list = field(default_factory=list)  # run names trained (or finished) by this call
    skipped: list = field(default_factory=list)  # already finished before
    copied: list = field(default_factory=list)  # finished in another study with the same recipe: copied
    left: list = field(default_factory=list)  # not started: the budget was spent
    failed: list = field(default_factory=list)  # (run name, error message): tried again next time


def provenance(command: str) -> dict:
    from kcifar.machine import code_version, cpu_description

    return {"finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu_description(), "commit": code_version(), "command": command}


def run_study(study, runs_dir="runs", data_dir=None, budget_min=None, command="", verbose=0, log=None) -> Progress:
    """Train every unfinished run of ``study`` under ``runs_dir/<study>/``; returns what happened."""
    if any(recipe["train"]["strategy"] == "multiworker" for _, _, recipe in study.runs()):
        raise KcifarError("a sweep trains on one machine; strategy 'multiworker' is for kcifar.train")
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    folder, progress, started = Path(runs_dir) / study.name, Progress(), monotonic()
    total = sum(len(cell.seeds) for cell in study.cells)
    for index, (cell, seed, recipe) in enumerate(study.runs(), 1):
        run_dir = folder / recipe["name"]
        if is_finished(run_dir):
            progress.skipped.append(recipe["name"])
            continue
        twin = None if run_dir.exists() else finished_twin(Path(runs_dir), study.name, recipe)
        if twin is not None:
            copy_finished(twin, run_dir, recipe)
            log(f"[{index}/{total}] {recipe['name']}: same recipe and seed as {twin.parent.name}/{twin.name}, "
                "finished: copied, not trained again")
            progress.copied.append(recipe["name"])
            continue
        if budget_min is not None and monotonic() - started >= 60 * budget_min:
            progress.left.append(recipe["name"])
            continue
        log(f"[{index}/{total}] {recipe['name']}: training" + (" (resuming)" if run_dir.exists() else ""))
        try:
            run_one(recipe, folder, data_dir, command, verbose)
            progress.ran.append(recipe["name"])
        except KcifarError as error:  # e.g. diverged: the other runs go on
            log(f"[{index}/{total}] {recipe['name']} failed: {error}")
            progress.failed.append((recipe["name"], str(error)))
    log(f"{study.name}: {len(progress.ran)} run(s) trained now, {len(progress.skipped)} finished before, "
        + (f"{len(progress.copied)} copied from other studies, " if progress.copied else "")
        + f"{len(progress.failed)} failed, {len(progress.left)} left for later"
        + (f" (budget of {budget_min:g} min spent)" if progress.left else ""))
    return progress


def training_settings(recipe: dict) -> dict:
    """What decides how a run trains: the recipe but its name and the documented figure beside it."""
    return {key: value for key, value in with_defaults(recipe).items() if key not in ("name", "documented")}


def finished_twin(runs_dir: Path, study_name: str, recipe: dict):
    """A finished run of another study under ``runs_dir`` that trains exactly as ``recipe`` (same
    settings, same seed), or None."""
    wanted = training_settings(recipe)
    for candidate in sorted(runs_dir.glob(f"*/*-s{recipe['seed']}")):
        if candidate.parent.name == study_name:
            continue
        try:
            if is_finished(candidate) and training_settings(read_recipe(candidate)) == wanted:
                return candidate
        except KcifarError:  # a damaged run folder of another study is not a twin
            continue
    return None


def to_train(runs_dir: Path, study_name: str, recipe: dict) -> bool:
    """Whether ``run_study`` would train the run of ``recipe``: not finished, and no twin to copy."""
    run_dir = runs_dir / study_name / recipe["name"]
    return not is_finished(run_dir) and (run_dir.exists() or finished_twin(runs_dir, study_name, recipe) is None)


def run_one(recipe: dict, folder: Path, data_dir, command: str, verbose: int):
    """Train (or resume) one run (kcifar.train evaluates it too) and write its provenance."""
    import keras

    from kcifar.train import train

    result = train(recipe, folder, data_dir, verbose=verbose)
    fileio.write_json(result.run_dir / PROVENANCE, provenance(command))
    keras.backend.clear_session()  # one process trains many models: free the last one's graph

