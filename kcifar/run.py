"""The run library: what ``kcifar.train`` and ``kcifar.finetune`` share.

A run's lifecycle, one function each: set up the process (strategy,
precision, seed) -> load the recipe's data -> open ``runs/<name>/`` (new,
resumed or replaced) -> compile -> ``model.fit`` with the callbacks here ->
``summarize`` into ``metrics.json``. Readers of a run directory
(``read_recipe``, ``read_history``, ``best_index``) live here too, so every
command reads a run the same way.

A run lives in ``runs/<name>/``: ``recipe.toml``, ``classes.txt``,
``history.csv``, ``best.keras``, ``backup/`` (BackupAndRestore),
``metrics.json`` and ``evaluation.json``.
"""

import csv
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

try:
    import fcntl  # POSIX; elsewhere runs are not locked
except ImportError:
    fcntl = None

import numpy as np

from kcifar import __version__, data as kdata, fileio, recipe as krecipe
from kcifar.errors import KcifarError

import keras  # noqa: E402  (after kcifar imports so TF's start-up noise follows our errors)
import tensorflow as tf  # noqa: E402

from kcifar import multiworker, optim  # noqa: E402

BACKUP_DIR = "backup"


# ------------------------------------------------------------ devices


def _is_gpu_machine():
    return bool(tf.config.list_physical_devices("GPU"))


def make_strategy(name: str):
    """auto: MirroredStrategy over all GPUs when there are several, else the default;
    multiworker: MultiWorkerMirroredStrategy over the cluster of ``TF_CONFIG`` (kcifar.multiworker)."""
    if name == "multiworker":
        return multiworker.make_strategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)


# CPU flags of native bfloat16 arithmetic: AMX tiles (Intel Xeon since Sapphire Rapids) or
# AVX512_BF16 (Intel Cooper Lake, AMD Zen 4). Without them bfloat16 is emulated and slower.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def auto_precision() -> str:
    """mixed_float16 on a GPU; on a CPU mixed_bfloat16 where it has native bfloat16, else float32.

    Measured in experiments/results/speed_*.md: faster in bfloat16 on AMX and
    AVX512_BF16 CPUs; slower on AVX2-only CPUs, so those keep float32.
    """
    if _is_gpu_machine():
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_flags() & set(BF16_CPU_FLAGS) else "float32"


def set_precision(precision: str):
    """Keras' global dtype policy; 'auto' is ``auto_precision()``."""
    if precision == "auto":
        precision = auto_precision()
    keras.mixed_precision.set_global_policy(precision)
    return precision


def jit_enabled(jit: str) -> bool:
    """XLA on GPU only, for 'auto' (measured slower on this CPU)."""
    return _is_gpu_machine() if jit == "auto" else jit == "on"


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
    strategy = make_strategy(spec["strategy"])
    seed_everything(recipe["seed"], spec["deterministic"])
    set_precision(spec["precision"])
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
# round trips through Python. Measured on the 2-core AMX Xeon: s3_tutorial a few percent
# faster (experiments/results/speed_xeon_amx.md); the results are the same, step by step.
MAX_STEPS_PER_EXECUTION = 16


def steps_per_execution(steps_per_epoch: int) -> int:
    """The largest divisor of ``steps_per_epoch`` up to MAX_STEPS_PER_EXECUTION (Keras rounds
    an epoch up to a whole number of executions, which would change the recipe's epochs);
    1 under a ``tf.distribute`` strategy, where Keras 3.15's multi-step loop fails on the
    distributed iterator (InvalidArgumentError in ``has_next``, seen with MirroredStrategy)."""
    if tf.distribute.has_strategy():
        return 1
    return max(d for d in range(1, MAX_STEPS_PER_EXECUTION + 1) if steps_per_epoch % d == 0)


def compile_model(model, recipe: dict, steps_per_epoch: int, jit: bool):
    """One-hot labels throughout, so label smoothing, mixup and cutmix share one loss."""
    epochs, spec = recipe["train"]["epochs"], recipe["optimizer"]
    if spec["ema_momentum"] and steps_per_epoch % spec["ema_overwrite_frequency"]:
        raise KcifarError(f"optimizer.ema_overwrite_frequency={spec['ema_overwrite_frequency']} does not divide the "
                          f"{steps_per_epoch} steps of an epoch: choose a divisor, so that each epoch ends on the "
                          "averaged weights (those are validated, saved and resumed)")
    scale_bn_bias_learning_rate(model, spec["bn_bias_lr_scale"])
    lr = optim.make_schedule(recipe["schedule"], spec["learning_rate"], epochs, steps_per_epoch)
    model.compile(
        optimizer=optim.make_optimizer(spec, lr, epochs * steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=recipe["loss"]["label_smoothing"]),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
        jit_compile=jit,
        steps_per_execution=steps_per_execution(steps_per_epoch),
    )


def scale_bn_bias_learning_rate(model, scale: float):
    """Give the biases of every batch norm of ``model`` ``scale`` times the learning rate (SGD), by
    ``FusedBatchNorm.bias_lr_scale``; set before the first trace of the training step."""
    if scale == 1:
        return
    from kcifar.models.parts import FusedBatchNorm

    layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    if not all(isinstance(layer, FusedBatchNorm) for layer in layers):
        raise KcifarError(f"optimizer.bn_bias_lr_scale needs kcifar's FusedBatchNorm layers; {model.name} has "
                          "Keras' own BatchNormalization: leave the scale at 1")
    for layer in layers:
        layer.bias_lr_scale = float(scale)


def init_from_data(model, recipe: dict, train: kdata.Split) -> int:
    """The recipe's data-dependent initialisation, before ``fit``: the ``PatchWhitening`` kernels
    from the 2x2 patches of the first ``whitening.images`` training images. Returns the layers set."""
    from kcifar.models import airbench

    spec = recipe["whitening"]
    return airbench.init_whitening(model, train.x[:spec["images"]], spec["epsilon"])


# ------------------------------------------------------------ callbacks


class FreezeWhiteningBias(keras.callbacks.Callback):
    """From epoch ``epochs`` on (counted from 0) every ``PatchWhitening`` layer is frozen, its
    bias no longer trained: no gradient, momentum or decay, as PyTorch's ``requires_grad=False``.

    Keras reads ``trainable`` when it traces the training step, so the step is traced once
    more (``make_train_function(force=True)``); no recompile, the optimizer keeps its state.
    Checked at every epoch start, so a run resumed after that epoch starts frozen.
    """

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        from kcifar.models import airbench

        layers = [layer for layer in airbench.whitening_layers(self.model) if layer.trainable]
        if self.epochs and epoch >= self.epochs and layers:
            for layer in layers:
                layer.trainable = False
            self.model.make_train_function(force=True)


class EpochStats(keras.callbacks.Callback):
    """Adds ``learning_rate`` (at the epoch's end), ``epoch_time_s`` and ``train_images_per_s``
    (training part, validation excluded) to the epoch logs, so history.csv has them."""

    def __init__(self, images_per_epoch: int):
        super().__init__()
        self.images_per_epoch = images_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.start, self.validation_start = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        self.validation_start = self.validation_start or time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = time.perf_counter()
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["epoch_time_s"] = end - self.start
        logs["train_images_per_s"] = self.images_per_epoch / ((self.validation_start or end) - self.start)


class BestModelSaver(keras.callbacks.ModelCheckpoint):
    """Keras' ModelCheckpoint (whole model, best epoch only when ``monitor`` is
    given) whose file is replaced atomically: a kill never leaves half a file.
    ``best``: the monitor's best value before a resumed run."""

    def __init__(self, path, monitor=None, best=None):
        super().__init__(str(path), monitor=monitor or "loss", mode=mode(monitor or "loss"),
                         save_best_only=monitor is not None, initial_value_threshold=best)

    def _save_model(self, epoch, batch, logs):
        if self._should_save_model(epoch, batch, logs, self.filepath):
            with fileio.atomic_path(self.filepath) as tmp:
                self.model.save(tmp)


class RunBackup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore (weights, optimizer state and epoch, two copies) whose every
    file is replaced atomically, each metadata file naming the sha256 of its weights file:
    a kill at any moment leaves at least one whole, matching pair, and a damaged or
    mismatched copy is detected (``backup_pair``) and the other one used.

    The metadata also holds the layers' random-number states (``seed_states``), which Keras'
    weight files leave out: a resumed run draws the dropout masks it would have drawn.
    The backup outlives ``fit`` (``finish`` removes it once ``metrics.json`` is written), so a
    run killed while it is scored resumes there, not at epoch 1. A stage starting at
    ``first_epoch`` takes from a backup of that epoch (an earlier stage's end) only its
    random-number states."""

    def __init__(self, backup_dir, first_epoch=0):
        super().__init__(str(backup_dir), double_checkpoint=True, delete_checkpoint=False)
        self.first_epoch = first_epoch

    def on_train_begin(self, logs=None):
        pair = backup_pair(Path(self.backup_dir))
        if pair is None or pair[1]["epoch"] < self.first_epoch:
            return
        weights, state = pair
        states = seed_states(self.model)
        for name, value in state.get("seed_states", {}).items():
            if name in states:
                states[name].assign(value)
        if state["epoch"] == self.first_epoch:
            return
        if weights.name.endswith(".bkp"):  # the whole copy is the previous one: it becomes the latest again
            _link(weights, self._weights_path)
            fileio.write_json(Path(self._training_metadata_path), state)
            weights = Path(self._weights_path)
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        try:
            self.model.load_weights(weights)
        except Exception as error:  # whole, but not this model's (h5py and Keras raise many types)
            raise KcifarError(f"{weights} does not fit this run's model ({type(error).__name__}); pass --overwrite "
                              "to train this run again from the start") from None
        self.model._initial_epoch = state["epoch"]

    def _save_model(self):
        weights, meta = Path(self._weights_path), Path(self._training_metadata_path)
        for current, previous in ((weights, self._prev_weights_path), (meta, self._prev_training_metadata_path)):
            if current.exists():  # the current copy becomes the previous one
                _link(current, previous)
        with fileio.atomic_path(weights) as tmp:
            self.model.save_weights(tmp)
        fileio.write_json(meta, {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                                 "weights_sha256": fileio.file_sha256(weights),
                                 "seed_states": {name: keras.ops.convert_to_numpy(state).tolist()
                                                 for name, state in seed_states(self.model).items()}})


def seed_states(model) -> dict:
    """{layer name: state variable} of the layers of ``model`` that draw random numbers
    (Dropout's ``SeedGenerator``), by name, so a stage's model finds its layers' states."""
    return {layer.name: layer.seed_generator.state for layer in model._flatten_layers()
            if isinstance(getattr(layer, "seed_generator", None), keras.random.SeedGenerator)}


def _link(source, target):
    """``target`` becomes a hard link to ``source`` (no copying), atomically."""
    with fileio.atomic_path(target) as tmp:
        tmp.unlink()
        os.link(source, tmp)


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
        raise KcifarError(f"{backup_dir} holds no whole backup ({'; '.join(problems)}); pass --overwrite to train "
                          "this run again from the start")
    return None


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that continues counting patience from an earlier, interrupted run."""

    def __init__(self, *args, resume_best=None, resume_wait=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_best, self.resume_wait = resume_best, resume_wait

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.resume_best is not None:
            self.best, self.wait = self.resume_best, self.resume_wait


def mode(monitor: str) -> str:
    """"min" for a loss, else "max": what Keras' callbacks call the direction of ``monitor``."""
    return "min" if monitor.endswith("loss") else "max"


def best_index(values, monitor: str):
    """Index of the first best value of ``monitor`` among ``values`` (NaN ignored), or None.
    The epoch EarlyStopping and BestModelSaver keep."""
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


def make_callbacks(run_dir: Path, recipe: dict, images_per_epoch: int, history: dict, best_path=None, first_epoch=0):
    """Keras callbacks of a resumable run (or stage from ``first_epoch``): EarlyStopping and the
    best-model file (``best_path``, default ``best.keras``) continue from ``history``, the rows logged so far."""
    stop = recipe["early_stopping"]
    has_val = recipe["data"]["val_size"] > 0
    monitor = stop["monitor"]
    best, wait = best_so_far(history, monitor)
    callbacks = [
        EpochStats(images_per_epoch),
        keras.callbacks.TerminateOnNaN(),
        BestModelSaver(best_path or run_dir / "best.keras", monitor if has_val else None, best),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        RunBackup(run_dir / BACKUP_DIR, first_epoch),
    ]
    if stop["enabled"]:
        callbacks.insert(2, ResumableEarlyStopping(monitor=monitor, mode=mode(monitor), patience=stop["patience"],
                                                   verbose=1, resume_best=best, resume_wait=wait))
    plateau = optim.plateau_callback(recipe["schedule"], "val_loss" if has_val else "loss")
    if plateau:
        callbacks.append(plateau)
    if recipe["whitening"]["bias_epochs"]:
        callbacks.insert(0, FreezeWhiteningBias(recipe["whitening"]["bias_epochs"]))
    if recipe["train"]["tensorboard"]:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
    return callbacks


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
    pair = backup_pair(run_dir / BACKUP_DIR)
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


def start_clock(history: dict) -> float:
    """``time.perf_counter()`` less the training time of the epochs an interrupted run already logged."""
    return time.perf_counter() - float(np.nansum(history.get("epoch_time_s", [])))


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
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif is_finished(run_dir):
            raise KcifarError(f"{run_dir} holds a finished run; pass --overwrite to replace it or --name to start another")
        elif not saved.exists():
            raise KcifarError(f"{run_dir} exists and is not a kcifar run; choose another --name or --runs-dir")
        elif krecipe.with_defaults(krecipe.read_toml(saved)) != recipe:
            raise KcifarError(f"{run_dir} holds an interrupted run of a different recipe; "
                              "rerun with the same recipe to resume, or pass --overwrite or another --name")
    epochs_done = resume_epoch(run_dir)
    _trim_history(run_dir, epochs_done)
    check_models(run_dir)
    fileio.write_text(saved, krecipe.to_toml(recipe))
    write_class_names(run_dir, class_names)
    if strategy is not None:
        multiworker.check_same_on_every_worker(strategy, epochs_done)
    return run_dir


def is_finished(run_dir) -> bool:
    """Whether ``run_dir`` holds a finished run (its metrics.json says so)."""
    path = Path(run_dir) / "metrics.json"
    return path.is_file() and read_state(path).get("finished", False)



# ------------------------------------------------------------ recording


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set:
    """The CPU's feature flags (``avx512_bf16``, ``amx_bf16``, ...) from /proc/cpuinfo; empty elsewhere."""
    return set(next((line.split(":", 1)[1].split() for line in _cpuinfo().splitlines()
                     if line.startswith("flags")), []))


def cpu_description() -> str:
    """The CPU's model name and its AVX-512 and AMX flags (speed figures depend on them), from /proc/cpuinfo."""
    info = _cpuinfo()
    if not info:
        return f"{platform.processor() or 'unknown'}; AVX-512: unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = cpu_flags()
    avx512 = sorted(flag for flag in flags if flag.startswith("avx512"))
    amx = sorted(flag for flag in flags if flag.startswith("amx"))
    return f"{model}; AVX-512: {' '.join(avx512) or 'none'}" + (f"; AMX: {' '.join(amx)}" if amx else "")


def onednn_enabled() -> bool:
    """Whether this TensorFlow process really runs oneDNN kernels (not only what the variable asks)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def environment() -> dict:
    return {
        "versions": {"kcifar": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__},
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                    "cpu": cpu_description(),
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
                    "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
                    "TF_NUM_INTRAOP_THREADS": os.environ.get("TF_NUM_INTRAOP_THREADS"),
                    "TF_NUM_INTEROP_THREADS": os.environ.get("TF_NUM_INTEROP_THREADS"),
                    "onednn": onednn_enabled()},
        "precision": keras.mixed_precision.global_policy().name,
    }


REPOSITORY = Path(__file__).resolve().parent.parent


def command_line(argv=None) -> str:
    """This process's command as typed from the repository root, without the interpreter's
    path: ``python -m kcifar.report ...`` or ``python experiments/x.py ...``; ``argv``
    (default ``sys.argv[1:]``) as given."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    program = f"-m {spec.name}" if spec else os.path.relpath(Path(sys.argv[0]).resolve(), REPOSITORY)
    return " ".join(["python", program, *(sys.argv[1:] if argv is None else argv)])


# Written by the commands themselves (results, the report): a change there is not a change of code.
RECORDED_OUTPUT = ("experiments/results", "experiments/REPORT.md", "experiments/REPORT_s1_progression.png")


def code_version() -> str:
    """The commit of the checkout kcifar runs from (``plus uncommitted changes`` when a tracked
    file other than the recorded results differs from it)."""
    root = REPOSITORY
    status = ["status", "--porcelain", "-uno", "--", ".", *(f":(exclude){path}" for path in RECORDED_OUTPUT)]
    try:
        commit, dirty = (subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                                        check=True).stdout.strip()
                         for args in (["rev-parse", "--short", "HEAD"], status))
    except (OSError, subprocess.CalledProcessError):
        return "not recorded (not a git checkout)"
    return commit + (" plus uncommitted changes" if dirty else "")


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
    best = best_index(history.get(recipe["early_stopping"]["monitor"]), recipe["early_stopping"]["monitor"])
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
        "code": code_version(),
        **environment(),
    }


def finish(run_dir: Path, recipe: dict, evaluation: dict, wall_time: float, n_train: int, **extra) -> dict:
    """Write ``metrics.json`` (``summarize`` plus ``extra``), drop the backup and the stages'
    files; returns the metrics."""
    metrics = {**summarize(recipe, read_history(run_dir), evaluation, wall_time, n_train), **extra}
    fileio.write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree(run_dir / BACKUP_DIR, ignore_errors=True)
    for path in [run_dir / STAGES_FILE, *run_dir.glob("stage*.keras")]:
        path.unlink(missing_ok=True)
    unlock_run(run_dir)
    return metrics
