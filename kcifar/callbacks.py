"""The Keras callbacks of a resumable run, and which epoch they keep.

``make_callbacks`` assembles them for ``kcifar.train`` and ``kcifar.finetune``: epoch
statistics, TerminateOnNaN, EarlyStopping and the best-model file (both continuing from
the epochs logged before an interruption), CSVLogger, the atomic backup and, as the
recipe asks, ReduceLROnPlateau, the whitening-bias freeze and TensorBoard. Which epoch is
best by a monitor, as these callbacks decide it, is ``kcifar.rundir.best_index``.
"""

import csv
import os
import time
from pathlib import Path

from kcifar import fileio, rundir
from kcifar.errors import KcifarError

import keras  # noqa: E402  (after kcifar imports so TF's start-up noise follows our errors)

from kcifar import optim  # noqa: E402

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


class HistoryLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger that, appending to a history with a header, keeps the header's columns: a run
    resumed by a kcifar that logs other columns writes NA where it lacks one and leaves out the
    new ones, where CSVLogger would write its own columns under the old header."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.append and not self.append_header:
            with open(self.filename, newline="", encoding="utf-8") as f:
                self.keys = next(csv.reader(f))[1:]


def inference_view(model) -> keras.Model:
    """``model``'s layers as an uncompiled functional model: saved, it holds the architecture and the
    weights without the optimizer's state or the compile settings (whose kcifar optimizers, schedules
    and metrics plain Keras could not load); loading weights into it sets ``model``'s."""
    return keras.Model(model.inputs, model.outputs, name=model.name)


class BestModelSaver(keras.callbacks.ModelCheckpoint):
    """Keras' ModelCheckpoint (the model for inference, ``inference_view``: resuming takes the
    optimizer's state from the backup; best epoch only when ``monitor`` is given) whose file is
    replaced atomically: a kill never leaves half a file. ``best``: the monitor's best value
    before a resumed run."""

    def __init__(self, path, monitor=None, best=None):
        super().__init__(str(path), monitor=monitor or "loss", mode=rundir.mode(monitor or "loss"),
                         save_best_only=monitor is not None, initial_value_threshold=best)

    def _save_model(self, epoch, batch, logs):
        if self._should_save_model(epoch, batch, logs, self.filepath):
            with fileio.atomic_path(self.filepath) as tmp:
                inference_view(self.model).save(tmp)


class RunBackup(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore (weights, optimizer state and epoch, two copies) whose every
    file is replaced atomically, each metadata file naming the sha256 of its weights file:
    a kill at any moment leaves at least one whole, matching pair, and a damaged or
    mismatched copy is detected (``rundir.backup_pair``) and the other one used.

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
        pair = rundir.backup_pair(Path(self.backup_dir))
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


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that continues counting patience from an earlier, interrupted run."""

    def __init__(self, *args, resume_best=None, resume_wait=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_best, self.resume_wait = resume_best, resume_wait

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.resume_best is not None:
            self.best, self.wait = self.resume_best, self.resume_wait


def make_callbacks(run_dir: Path, recipe: dict, images_per_epoch: int, history: dict, best_path=None, first_epoch=0):
    """Keras callbacks of a resumable run (or stage from ``first_epoch``): EarlyStopping and the
    best-model file (``best_path``, default ``best.keras``) continue from ``history``, the rows logged so far."""
    stop = recipe["early_stopping"]
    has_val = recipe["data"]["val_size"] > 0
    monitor = stop["monitor"]
    best, wait = rundir.best_so_far(history, monitor)
    callbacks = [
        EpochStats(images_per_epoch),
        keras.callbacks.TerminateOnNaN(),
        BestModelSaver(best_path or run_dir / rundir.BEST_MODEL, monitor if has_val else None, best),
        HistoryLogger(str(run_dir / rundir.HISTORY), append=True),
        RunBackup(run_dir / rundir.BACKUP_DIR, first_epoch),
    ]
    if stop["enabled"]:
        callbacks.insert(2, ResumableEarlyStopping(monitor=monitor, mode=rundir.mode(monitor), patience=stop["patience"],
                                                   verbose=1, resume_best=best, resume_wait=wait))
    plateau = optim.plateau_callback(recipe["schedule"], "val_loss" if has_val else "loss")
    if plateau:
        callbacks.append(plateau)
    if recipe["whitening"]["bias_epochs"]:
        callbacks.insert(0, FreezeWhiteningBias(recipe["whitening"]["bias_epochs"]))
    if recipe["train"]["tensorboard"]:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / rundir.TENSORBOARD)))
    return callbacks

