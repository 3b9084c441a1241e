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
import time
from pathlib import Path

import numpy as np

from kcifar import __version__, data as kdata, fileio, recipe as krecipe
from kcifar.errors import KcifarError

import keras  # noqa: E402  (after kcifar imports so TF's start-up noise follows our errors)
import tensorflow as tf  # noqa: E402

from kcifar import optim  # noqa: E402

BACKUP_DIR = "backup"


# ------------------------------------------------------------ devices


def _is_gpu_machine():
    return bool(tf.config.list_physical_devices("GPU"))


def make_strategy(name: str):
    """auto: MirroredStrategy over all GPUs when there are several, else the default.

    multiworker is refused with a clear message: Keras 3's ``model.fit`` fails
    under MultiWorkerMirroredStrategy (measured here with TF 2.21 / Keras 3.15:
    "Attempt to convert a value (PerReplica ...)"; upstream keras-team/keras#20585).
    """
    if name == "multiworker":
        raise KcifarError("strategy 'multiworker' does not work with Keras 3's model.fit yet "
                          "(keras-team/keras#20585); use 'mirrored' for several GPUs of one machine")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)


def set_precision(precision: str):
    """float32 on CPU (measured faster here); mixed_float16 on GPU, for 'auto'."""
    if precision == "auto":
        precision = "mixed_float16" if _is_gpu_machine() else "float32"
    keras.mixed_precision.set_global_policy(precision)
    return precision


def jit_enabled(jit: str) -> bool:
    """XLA on GPU only, for 'auto' (measured slower on this CPU)."""
    return _is_gpu_machine() if jit == "auto" else jit == "on"


def seed_everything(seed: int, deterministic: bool):
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


# ------------------------------------------------------------ data and model


def load_data(recipe: dict, data_dir=None):
    """The recipe's splits; ``train_subset`` keeps a stratified part of the training split."""
    spec = recipe["data"]
    data = kdata.load_cifar(recipe["dataset"], data_dir, spec["label_mode"], spec["val_size"], recipe["seed"])
    train = data.train
    if spec["train_subset"]:
        train = kdata.stratified_subset(train, spec["train_subset"], recipe["seed"])
    if spec["offline_aug"]:
        train = add_offline_augmented(data, train, spec["offline_aug"])
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


def compile_model(model, recipe: dict, steps_per_epoch: int, jit: bool):
    """One-hot labels throughout, so label smoothing, mixup and cutmix share one loss."""
    epochs = recipe["train"]["epochs"]
    lr = optim.make_schedule(recipe["schedule"], recipe["optimizer"]["learning_rate"], epochs, steps_per_epoch)
    model.compile(
        optimizer=optim.make_optimizer(recipe["optimizer"], lr),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=recipe["loss"]["label_smoothing"]),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
        jit_compile=jit,
    )


# ------------------------------------------------------------ callbacks


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


class BestModelSaver(keras.callbacks.Callback):
    """Saves the whole model to ``path`` when ``monitor`` improves, atomically (a kill
    never leaves half a file, which Keras' ModelCheckpoint does not promise).
    Without a validation split the monitor is absent and every epoch is saved."""

    def __init__(self, path, monitor: str, best=None):
        super().__init__()
        self.path, self.monitor, self.best = Path(path), monitor, best
        self.better = np.less if monitor.endswith("loss") else np.greater

    def on_epoch_end(self, epoch, logs=None):
        value = logs.get(self.monitor)
        if value is None or self.best is None or self.better(value, self.best):
            self.best = value
            with fileio.atomic_path(self.path) as tmp:
                self.model.save(tmp)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that continues counting patience from an earlier, interrupted run."""

    def __init__(self, *args, resume_best=None, resume_wait=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_best, self.resume_wait = resume_best, resume_wait

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.resume_best is not None:
            self.best, self.wait = self.resume_best, self.resume_wait


def best_so_far(history: list, monitor: str):
    """(best value, epochs since it) from earlier history rows, or (None, 0)."""
    values = [float(row[monitor]) for row in history if row.get(monitor) not in (None, "")]
    if not values:
        return None, 0
    best_index = int(np.argmin(values) if monitor.endswith("loss") else np.argmax(values))
    return values[best_index], len(values) - 1 - best_index


def make_callbacks(run_dir: Path, recipe: dict, images_per_epoch: int, history: list):
    stop = recipe["early_stopping"]
    has_val = recipe["data"]["val_size"] > 0
    monitor = stop["monitor"]
    best, wait = best_so_far(history, monitor)
    callbacks = [
        EpochStats(images_per_epoch),
        keras.callbacks.TerminateOnNaN(),
        BestModelSaver(run_dir / "best.keras", monitor if has_val else "(no validation split)", best),
        keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
        keras.callbacks.BackupAndRestore(str(run_dir / BACKUP_DIR), double_checkpoint=True),
    ]
    if stop["enabled"]:
        callbacks.insert(2, ResumableEarlyStopping(monitor=monitor, patience=stop["patience"], verbose=1,
                                                   resume_best=best, resume_wait=wait))
    plateau = optim.plateau_callback(recipe["schedule"], "val_loss" if has_val else "loss")
    if plateau:
        callbacks.append(plateau)
    if recipe["train"]["tensorboard"]:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard")))
    return callbacks


# ------------------------------------------------------------ the run directory


def read_history(run_dir: Path) -> list:
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def resume_epoch(run_dir: Path) -> int:
    """The epoch an interrupted run continues at (0 for a new run)."""
    meta = run_dir / BACKUP_DIR / "training_metadata.json"
    return int(json.loads(meta.read_text())["epoch"]) if meta.exists() else 0


def _trim_history(run_dir: Path, epochs_done: int):
    """Drop history rows of epochs the backup does not hold (killed between the two writes)."""
    path = run_dir / "history.csv"
    if path.exists() and not epochs_done:
        path.unlink()
    elif path.exists():
        fileio.write_text(path, "".join(path.read_text().splitlines(keepends=True)[: 1 + epochs_done]))


def open_run_dir(runs_dir, recipe: dict, overwrite: bool) -> Path:
    """Create, resume or (with ``overwrite``) replace ``runs_dir/<name>``; write the recipe."""
    run_dir = Path(runs_dir) / recipe["name"]
    saved = run_dir / "recipe.toml"
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            shutil.rmtree(run_dir)
        elif _finished(run_dir):
            raise KcifarError(f"{run_dir} holds a finished run; pass --overwrite to replace it or --name to start another")
        elif not saved.exists():
            raise KcifarError(f"{run_dir} exists and is not a kcifar run; choose another --name or --runs-dir")
        elif krecipe.read_toml(saved) != recipe:
            raise KcifarError(f"{run_dir} holds an interrupted run of a different recipe; "
                              "rerun with the same recipe to resume, or pass --overwrite or another --name")
    fileio.write_text(saved, krecipe.to_toml(recipe))
    _trim_history(run_dir, resume_epoch(run_dir))
    return run_dir


def _finished(run_dir: Path) -> bool:
    path = run_dir / "metrics.json"
    return path.exists() and json.loads(path.read_text()).get("finished", False)



# ------------------------------------------------------------ recording


def cpu_description() -> str:
    """The CPU's model name and its AVX-512 flags (speed figures depend on both), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or 'unknown'}; AVX-512: unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    avx512 = sorted({flag for flag in info.split() if flag.startswith("avx512")})
    return f"{model}; AVX-512: {' '.join(avx512) if avx512 else 'none'}"


def environment() -> dict:
    return {
        "versions": {"kcifar": __version__, "python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": keras.__version__, "numpy": np.__version__},
        "machine": {"platform": platform.platform(), "arch": platform.machine(), "cpus": os.cpu_count(),
                    "cpu": cpu_description(),
                    "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
                    "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS")},
    }


def offline_aug_record(folder: str):
    """Which offline-augmented set a run used: its folder and the sha256 of its manifest."""
    if not folder:
        return None
    manifest = Path(folder) / "manifest.json"
    return {"folder": str(Path(folder).resolve()), "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()}


def summarize(recipe: dict, history: list, test: dict, wall_time: float, n_train: int) -> dict:
    """metrics.json: the kept model's epoch (best by the early-stopping monitor) and its scores."""
    monitor = recipe["early_stopping"]["monitor"]
    scores = [float(r[monitor]) for r in history if r.get(monitor)]
    best = (int(np.argmin(scores)) if monitor.endswith("loss") else int(np.argmax(scores))) if scores else None
    speeds = [float(r["train_images_per_s"]) for r in history if r.get("train_images_per_s")]
    steady = speeds[1:] or speeds  # the first epoch includes graph tracing
    return {
        "run": recipe["name"], "model": recipe["model"], "dataset": recipe["dataset"], "finished": True,
        "best_val_accuracy": float(history[best]["val_accuracy"]) if scores else None,  # of the kept model
        "best_epoch": best + 1 if scores else None,  # counted from 1
        "epochs_run": len(history),
        **test,
        "wall_time_s": round(wall_time, 1),
        "train_images_per_s": round(float(np.median(steady)), 1) if steady else None,
        "seed": recipe["seed"],
        "train_images": n_train,
        "offline_aug": offline_aug_record(recipe["data"]["offline_aug"]),
        **environment(),
    }
