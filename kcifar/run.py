"""The run library: what ``kcifar.train`` and ``kcifar.finetune`` share.

A run's lifecycle, one function each: set up the process (strategy,
precision, seed: ``kcifar.machine``) -> load the recipe's data -> open
``runs/<name>/`` (new, resumed or replaced) -> compile -> ``model.fit`` with
``kcifar.callbacks`` -> ``summarize`` into ``metrics.json``. Readers of a run
directory (``read_recipe``, ``read_history``, ``read_state``) live here too, so
every command reads a run the same way.

A run lives in ``runs/<name>/``: ``recipe.toml``, ``classes.txt``,
``history.csv``, ``best.keras``, ``backup/`` (BackupAndRestore),
``segments.json`` (which process ran which epochs, on which CPU),
``metrics.json`` and ``evaluation.json``.
"""

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

try:
    import fcntl  # POSIX; elsewhere runs are not locked
except ImportError:
    fcntl = None

import numpy as np

from kcifar import data as kdata, fileio, recipe as krecipe
from kcifar.errors import KcifarError

import keras  # noqa: E402  (after kcifar imports so TF's start-up noise follows our errors)
import tensorflow as tf  # noqa: E402

from kcifar import callbacks as kcallbacks, machine, multiworker, optim  # noqa: E402
from kcifar.callbacks import BACKUP_DIR  # noqa: E402


def progress_verbosity(quiet: bool) -> int:
    """Keras' ``verbose``: 0 when quiet, a live progress bar on a terminal, else one line per epoch."""
    return 0 if quiet else (1 if sys.stdout.isatty() else 2)


def seed_everything(seed: int, deterministic: bool):
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def set_up(recipe: dict):
    """Seed, precision and the ``tf.distribute`` strategy of ``recipe["train"]``; returns the strategy."""
    spec = recipe["train"]
    strategy = machine.make_strategy(spec["strategy"])
    seed_everything(recipe["seed"], spec["deterministic"])
    machine.set_precision(spec["precision"])
    return strategy


# ------------------------------------------------------------ data and model


def load_data(recipe: dict, data_dir=None):
    """The recipe's splits; ``train_subset`` keeps a stratified part of the training split.
    Checks what only the data can refuse (a batch larger than the split), before any run
    directory is touched."""
    spec = recipe["data"]
    data = kdata.load_cifar(recipe["dataset"], data_dir=data_dir, label_mode=spec["label_mode"],
                            val_size=spec["val_size"], seed=recipe["seed"])
    train = data.train
    if spec["train_subset"]:
        train = kdata.stratified_subset(train, spec["train_subset"], recipe["seed"])
    if spec["offline_aug"]:
        train = add_offline_augmented(data, train, spec["offline_aug"])
    batch_size = recipe["train"]["batch_size"]
    if batch_size > len(train):
        raise KcifarError(f"train.batch_size {batch_size} is larger than the training split ({len(train)} images); "
                          "choose a smaller batch size or a larger data.train_subset")
    return data, train


def add_offline_augmented(data, train: kdata.Split, folder: str):
    """The training split plus the copies ``augment_offline`` made of this very split
    (a set made from another split is refused: it could hold validation images)."""
    import augment_offline

    x, y, manifest = augment_offline.load_augmented(folder, train=(data.train.x, data.train.y))
    if manifest["augment"]["originals"]:  # stored originals come first; ``train`` has them already
        count = manifest["source"]["count"]
        x, y = x[count:], y[count:]
    return kdata.Split(np.concatenate([train.x, x]), np.concatenate([train.y, y]))


# Steps one call into the compiled training function runs (Keras' steps_per_execution): fewer
# round trips through Python, which small models feel (experiments/results/speed_xeon_amx.md);
# the results are the same, step by step.
MAX_STEPS_PER_EXECUTION = 16


def steps_per_execution(steps_per_epoch: int) -> int:
    """The largest divisor of ``steps_per_epoch`` up to MAX_STEPS_PER_EXECUTION (Keras rounds
    an epoch up to a whole number of executions, which would change the recipe's epochs);
    1 under a ``tf.distribute`` strategy, where Keras 3.15's multi-step loop fails on the
    distributed iterator (InvalidArgumentError in ``has_next``, seen with MirroredStrategy)."""
    if tf.distribute.has_strategy():
        return 1
    return max(d for d in range(1, MAX_STEPS_PER_EXECUTION + 1) if steps_per_epoch % d == 0)


def compile_model(model, recipe: dict, steps_per_epoch: int, jit: bool) -> int:
    """One-hot labels throughout, so label smoothing, mixup and cutmix share one loss. Returns how
    many convolutions take their kernel gradient as matmuls (``train.conv_grad``). Called under the
    run's ``tf.distribute`` strategy, which may refuse the recipe's weight averaging."""
    epochs, spec = recipe["train"]["epochs"], recipe["optimizer"]
    if spec["ema_momentum"] and steps_per_epoch % spec["ema_overwrite_frequency"]:
        raise KcifarError(f"optimizer.ema_overwrite_frequency={spec['ema_overwrite_frequency']} does not divide the "
                          f"{steps_per_epoch} steps of an epoch: choose a divisor, so that each epoch ends on the "
                          "averaged weights (those are validated, saved and resumed)")
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if spec["ema_momentum"] and replicas > 1:
        raise KcifarError(f"optimizer.ema_momentum cannot train over the {replicas} replicas of this strategy: Keras 3 "
                          "sets the weights to their average inside a conditional, which tf.distribute's "
                          "synchronisation cannot cross; use train.strategy='default' (one device) or ema_momentum=0")
    from kcifar.models import parts

    parts.use_fused_batch_norm(model)
    scale_bn_bias_learning_rate(model, spec["bn_bias_lr_scale"])
    routed = parts.use_matmul_kernel_grads(model, *machine.matmul_kernel_grad_rule(recipe["train"]["conv_grad"]))
    lr = optim.make_schedule(recipe["schedule"], spec["learning_rate"], epochs, steps_per_epoch)
    model.compile(
        optimizer=optim.make_optimizer(spec, lr, epochs * steps_per_epoch, fused=spec["fused"] and not jit),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=recipe["loss"]["label_smoothing"]),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
        jit_compile=jit,
        steps_per_execution=steps_per_execution(steps_per_epoch),
    )
    return routed


def scale_bn_bias_learning_rate(model, scale: float):
    """Give the biases of every batch norm of ``model`` ``scale`` times the learning rate (SGD), by the
    fused layers' ``bias_lr_scale`` (``parts.fused_batch_norm_call``); set after ``use_fused_batch_norm``,
    before the first trace of the training step."""
    if scale == 1:
        return
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.bias_lr_scale = float(scale)


def init_from_data(model, recipe: dict, train: kdata.Split) -> int:
    """The recipe's data-dependent initialisation, before ``fit``: the ``PatchWhitening`` kernels
    from the 2x2 patches of the first ``whitening.images`` training images. Returns the layers set."""
    from kcifar.models import airbench

    spec = recipe["whitening"]
    return airbench.init_whitening(model, train.x[:spec["images"]], spec["epsilon"])


# ------------------------------------------------------------ callbacks


# ------------------------------------------------------------ the run directory


def read_recipe(run_dir) -> dict:
    path = Path(run_dir) / "recipe.toml"
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


def read_history(run_dir) -> dict:
    """``run_dir/history.csv`` (Keras CSVLogger) as {column: float array}, one row per epoch.

    A resumed run can log an epoch twice; the later row wins. Empty and "NA" cells (Keras writes
    NA in the val_ columns of a run without validation) are NaN. No file: {}.
    """
    path = Path(run_dir) / "history.csv"
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


CLASSES_FILE = "classes.txt"


def write_class_names(run_dir: Path, class_names):
    """``classes.txt``: the class names of the model's outputs, one per line, in order."""
    fileio.write_text(Path(run_dir) / CLASSES_FILE, "".join(f"{name}\n" for name in class_names))


def read_class_names(path) -> list:
    """Class names from a file with one name per line (a run's ``classes.txt``)."""
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise KcifarError(f"cannot read class names from {path} ({error}); "
                          "pass a text file with one class name per line") from None


def load_model(path):
    """A Keras model from a .keras file, without its optimizer (not needed to predict)."""
    path = Path(path)
    if not path.is_file():
        raise KcifarError(f"{path} does not exist; pass a run directory (runs/NAME) or a .keras model file")
    if path.suffix != ".keras":
        raise KcifarError(f"{path} is not a .keras file; pass a model saved by Keras 3 (model.save('x.keras'))")
    from kcifar.models import parts  # noqa: F401  (registers kcifar's own layers with Keras)

    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a damaged or foreign file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise KcifarError(f"{path} is not a loadable Keras model ({reason[:200]}); save it again") from None


def read_state(path: Path):
    """A JSON state file of a run directory; a damaged one is a one-line error saying what to do."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise KcifarError(f"{path} is damaged (not valid JSON); pass --overwrite to train this run "
                          "again from the start, or delete the file if you know what it held") from None


def resume_epoch(run_dir: Path) -> int:
    """The epoch an interrupted run continues at: its backup's, else the end of its
    last finished stage (0 for a new run)."""
    pair = kcallbacks.backup_pair(run_dir / BACKUP_DIR)
    if pair is not None:
        return int(pair[1]["epoch"])
    return sum(stage["epochs"] for stage in finished_stages(run_dir).values())


STAGES_FILE = "stages.json"


def finished_stages(run_dir: Path) -> dict:
    """{stage: {"epochs", "best"}} of the stages a run in stages (finetune) has finished;
    each stage's best model is ``stage<N>.keras``."""
    path = run_dir / STAGES_FILE
    return read_state(path) if path.exists() else {}


def record_stage(run_dir: Path, stage: int, epochs: int, best):
    fileio.write_json(run_dir / STAGES_FILE, {**finished_stages(run_dir), str(stage): {"epochs": epochs, "best": best}})


def start_clock(history: dict, entered: float) -> tuple:
    """(the run's wall-time origin, the set-up's seconds), called just before training. The origin
    is ``entered`` (``time.perf_counter()`` when the training call began, so data loading, model
    build, data-dependent init and compile count) less the training time of the epochs an
    interrupted run already logged (a resumed run counts this start's set-up only)."""
    return entered - float(np.nansum(history.get("epoch_time_s", []))), time.perf_counter() - entered


def _trim_history(run_dir: Path, epochs_done: int):
    """Drop history rows of epochs the backup does not hold (killed between the two writes);
    refuse a history that lacks whole rows of the epochs done."""
    path = run_dir / "history.csv"
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


def damaged(path, why: str) -> str:
    """The one line for a damaged file of a run directory."""
    return f"{path} is damaged ({why}); pass --overwrite to train this run again from the start"


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


_HELD_LOCKS = {}  # lock file -> its open handle: the runs this process trains


def lock_run(run_dir: Path):
    """Refuse a second process training ``run_dir`` at the same time (two terminals, one
    command): an exclusive ``flock`` on ``.<name>.lock`` beside it, held until ``finish``.
    The OS drops it when its holder dies, even by ``kill -9``, so it never stays stuck.
    Re-entrant within one process (a sweep or a notebook resuming its own run)."""
    path = (run_dir.parent / f".{run_dir.name}.lock").resolve()
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


def unlock_run(run_dir: Path):
    handle = _HELD_LOCKS.pop((run_dir.parent / f".{run_dir.name}.lock").resolve(), None)
    if handle:
        handle.close()  # closing the last descriptor releases the flock


def check_run_dir(run_dir: Path, recipe: dict, overwrite: bool):
    """Refuse, writing nothing, a ``run_dir`` that ``recipe`` cannot start or resume in: a finished
    run, another recipe's interrupted run, or a folder that is no run (unless ``overwrite``).
    Cheap: a command asks before it reads the data or compiles the model."""
    if overwrite or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    saved = run_dir / "recipe.toml"
    if is_finished(run_dir):
        raise KcifarError(f"{run_dir} holds a finished run; pass --overwrite to replace it or --name to start another")
    if not saved.exists():
        raise KcifarError(f"{run_dir} exists and is not a kcifar run; choose another --name or --runs-dir")
    if krecipe.with_defaults(krecipe.read_toml(saved)) != recipe:
        raise KcifarError(f"{run_dir} holds an interrupted run of a different recipe; "
                          "rerun with the same recipe to resume, or pass --overwrite or another --name")


def open_run_dir(runs_dir, recipe: dict, overwrite: bool, class_names=(), strategy=None) -> Path:
    """Lock, then create, resume or (with ``overwrite``) replace ``runs_dir/<name>``; write
    the recipe and the class names. Under ``strategy`` with several workers, a worker other
    than the chief gets a temporary copy instead (kcifar.multiworker), and every worker
    must resume at the same epoch."""
    run_dir = Path(runs_dir) / recipe["name"]
    if strategy is not None and not multiworker.is_chief(strategy):
        run_dir = multiworker.worker_copy(run_dir, overwrite)
    lock_run(run_dir)
    if run_dir.is_dir():
        fileio.remove_temporaries(run_dir)  # a kill while a file was written leaves its temporary
    saved = run_dir / "recipe.toml"
    check_run_dir(run_dir, recipe, overwrite)
    if overwrite and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    epochs_done = resume_epoch(run_dir)
    _trim_history(run_dir, epochs_done)
    check_models(run_dir)
    fileio.write_text(saved, krecipe.to_toml(recipe))
    write_class_names(run_dir, class_names)
    record_segment(run_dir, epochs_done)
    if strategy is not None:
        multiworker.check_same_on_every_worker(strategy, epochs_done)
    return run_dir


SEGMENTS_FILE = "segments.json"


def record_segment(run_dir: Path, epochs_done: int):
    """Append this process to ``segments.json``: the epoch it starts at, when, on which CPU, in
    which precision, from which commit. A run resumed on another machine (or with ``precision =
    "auto"`` picking another policy there) says which epochs ran where."""
    path = run_dir / SEGMENTS_FILE
    segments = read_state(path) if path.exists() else []
    segments.append({"first_epoch": epochs_done + 1,
                     "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "cpu": machine.cpu_description(), "cpus": os.cpu_count(),
                     "precision": keras.mixed_precision.global_policy().name, "code": machine.code_version()})
    fileio.write_json(path, segments)


def segment_summaries(run_dir: Path, history: dict) -> list:
    """``segments.json`` with each segment's last epoch and its median steady-epoch speed (its
    first epoch dropped: graph tracing); segments that finished no epoch are left out."""
    path = Path(run_dir) / SEGMENTS_FILE
    segments = read_state(path) if path.exists() else []
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


def is_finished(run_dir) -> bool:
    """Whether ``run_dir`` holds a finished run (its metrics.json says so)."""
    path = Path(run_dir) / "metrics.json"
    return path.is_file() and read_state(path).get("finished", False)



# ------------------------------------------------------------ recording


def offline_aug_record(folder: str):
    """Which offline-augmented set a run used: its folder and the sha256 of its manifest."""
    if not folder:
        return None
    manifest = Path(folder) / "manifest.json"
    return {"folder": str(Path(folder).resolve()), "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}


def test_scores(evaluation: dict) -> dict:
    """metrics.json's test fields from ``kcifar.evaluate.evaluate_run``'s result (the one scoring)."""
    def pick(entry):
        return {"top1": entry["top1"], "top5": entry["top5"], "loss": entry["loss"], "n": entry["n"]}

    subset = evaluation.get("subset")
    return {"test": pick(evaluation["all"]), "test_exact": pick(subset) if subset and subset["n"] else None,
            "tta": evaluation.get("tta", "none")}


def summarize(recipe: dict, history: dict, evaluation: dict, wall_time: float, n_train: int) -> dict:
    """metrics.json: the kept model's epoch (best by the early-stopping monitor) and its scores."""
    best = kcallbacks.best_index(history.get(recipe["early_stopping"]["monitor"]), recipe["early_stopping"]["monitor"])
    speeds = [s for s in history.get("train_images_per_s", []) if np.isfinite(s)]
    steady = speeds[1:] or speeds  # the first epoch includes graph tracing
    return {
        "run": recipe["name"], "model": recipe["model"], "dataset": recipe["dataset"], "finished": True,
        "best_val_accuracy": float(history["val_accuracy"][best]) if best is not None else None,  # of the kept model
        "best_epoch": best + 1 if best is not None else None,  # counted from 1
        "epochs_run": len(history.get("epoch", [])),
        **test_scores(evaluation),
        "wall_time_s": round(wall_time, 1),
        "train_images_per_s": round(float(np.median(steady)), 1) if steady else None,
        "seed": recipe["seed"],
        "train_images": n_train,
        "offline_aug": offline_aug_record(recipe["data"]["offline_aug"]),
        "code": machine.code_version(),
        **machine.environment(),
    }


def evaluate_and_finish(run_dir: Path, recipe: dict, model, data, clock: tuple, n_train: int, tta="none",
                        **extra) -> tuple:
    """Measure the test set once (``kcifar.evaluate.evaluate_run``) and ``finish`` the run, timed:
    ``clock`` is ``start_clock``'s (origin, set-up seconds). Returns (evaluation, metrics)."""
    from kcifar import evaluate  # it reads run directories through this module

    started, setup_s = clock
    evaluating = time.perf_counter()
    evaluation = evaluate.evaluate_run(run_dir, model, data, tta=tta)
    ended = time.perf_counter()
    metrics = finish(run_dir, recipe, evaluation, ended - started, n_train, setup_s=round(setup_s, 1),
                     evaluation_s=round(ended - evaluating, 1), **extra)
    return evaluation, metrics


def finish(run_dir: Path, recipe: dict, evaluation: dict, wall_time: float, n_train: int, **extra) -> dict:
    """Write ``metrics.json`` (``summarize`` plus ``extra``), drop the backup and the stages'
    files; returns the metrics."""
    history = read_history(run_dir)
    metrics = {**summarize(recipe, history, evaluation, wall_time, n_train),
               "segments": segment_summaries(run_dir, history), **extra}
    fileio.write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree(run_dir / BACKUP_DIR, ignore_errors=True)
    for path in [run_dir / STAGES_FILE, *run_dir.glob("stage*.keras")]:
        path.unlink(missing_ok=True)
    unlock_run(run_dir)
    return metrics
