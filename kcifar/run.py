"""The run library: what ``kcifar.train`` and ``kcifar.finetune`` share.

A run's lifecycle, one function each: set up the process (strategy,
precision, seed: ``kcifar.machine``) -> load the recipe's data -> check the recipe
against the strategy, prepare the model's layers, compile -> open ``runs/<name>/``
(new, resumed or replaced; its files belong to ``kcifar.rundir``) -> ``model.fit``
with ``kcifar.callbacks`` -> measure the test set once
(``kcifar.evaluate``) and ``summarize`` into ``metrics.json``.
"""

import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from kcifar import data as kdata, fileio, rundir
from kcifar.errors import KcifarError

import keras  # noqa: E402  (after kcifar imports so TF's start-up noise follows our errors)
import tensorflow as tf  # noqa: E402

from kcifar import evaluate, machine, multiworker, optim  # noqa: E402


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


def check_weight_averaging(recipe: dict, steps_per_epoch: int):
    """Refuse the recipe's weight averaging (``optimizer.ema_momentum``) where it cannot work: an
    overwrite frequency that does not divide the epoch's steps, or several replicas. Called under
    the run's ``tf.distribute`` strategy, before ``prepare_model``."""
    spec = recipe["optimizer"]
    if spec["ema_momentum"] and steps_per_epoch % spec["ema_overwrite_frequency"]:
        raise KcifarError(f"optimizer.ema_overwrite_frequency={spec['ema_overwrite_frequency']} does not divide the "
                          f"{steps_per_epoch} steps of an epoch: choose a divisor, so that each epoch ends on the "
                          "averaged weights (those are validated, saved and resumed)")
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if spec["ema_momentum"] and replicas > 1:
        raise KcifarError(f"optimizer.ema_momentum cannot train over the {replicas} replicas of this strategy: Keras 3 "
                          "sets the weights to their average inside a conditional, which tf.distribute's "
                          "synchronisation cannot cross; use train.strategy='default' (one device) or ema_momentum=0")


def prepare_model(model, recipe: dict) -> int:
    """The model's layers as the recipe trains them, before ``compile_model`` (the first trace):
    fused batch norms, their biases' learning-rate scale, and 3x3 kernel gradients as matmuls
    (``train.conv_grad``). Returns how many convolutions take their kernel gradient as matmuls."""
    from kcifar.models import parts

    parts.use_fused_batch_norm(model)
    scale_bn_bias_learning_rate(model, recipe["optimizer"]["bn_bias_lr_scale"])
    return parts.use_matmul_kernel_grads(model, *machine.matmul_kernel_grad_rule(recipe["train"]["conv_grad"]))


def compile_model(model, recipe: dict, steps_per_epoch: int, jit: bool):
    """``model.compile`` with the recipe's optimizer and schedule, one loss on one-hot labels
    (so label smoothing, mixup and cutmix share it), accuracy, top-5 accuracy and the loss's spread."""
    epochs, spec = recipe["train"]["epochs"], recipe["optimizer"]
    lr = optim.make_schedule(recipe["schedule"], spec["learning_rate"], epochs, steps_per_epoch)
    model.compile(
        optimizer=optim.make_optimizer(spec, lr, epochs * steps_per_epoch, fused=spec["fused"] and not jit),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=recipe["loss"]["label_smoothing"]),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.TopKCategoricalAccuracy(5, name="top5"),
                 LossSpread(recipe["loss"]["label_smoothing"])],
        jit_compile=jit,
        steps_per_execution=steps_per_execution(steps_per_epoch),
    )


@keras.saving.register_keras_serializable(package="kcifar")
class LossSpread(keras.metrics.Metric):
    """``loss_sd``: the standard deviation over the images of the per-image cross-entropy (from the
    logits, with the loss's label smoothing), so that a validation loss has its standard error,
    ``val_loss_sd / √images``, in history.csv. Regularisation and layer losses, which ``loss`` may
    include, are not in it; sample weights are ignored (kcifar passes none)."""

    def __init__(self, label_smoothing=0.0, name="loss_sd", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing
        self.count, self.total, self.total_sq = (self.add_variable((), initializer="zeros", name=n)
                                                 for n in ("count", "total", "total_sq"))

    def update_state(self, y_true, y_pred, sample_weight=None):
        losses = keras.losses.categorical_crossentropy(keras.ops.cast(y_true, "float32"), keras.ops.cast(y_pred, "float32"),
                                                       from_logits=True, label_smoothing=self.label_smoothing)
        self.count.assign_add(keras.ops.cast(keras.ops.shape(losses)[0], self.dtype))
        self.total.assign_add(keras.ops.sum(losses))
        self.total_sq.assign_add(keras.ops.sum(keras.ops.square(losses)))

    def result(self):
        count = keras.ops.maximum(self.count, 1.0)
        mean = self.total / count
        return keras.ops.sqrt(keras.ops.maximum(self.total_sq / count - keras.ops.square(mean), 0.0))

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


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


# ------------------------------------------------------------ the run directory (kcifar.rundir owns its files)


def start_clock(history: dict, entered: float) -> tuple:
    """(the run's wall-time origin, the set-up's seconds), called just before training. The origin
    is ``entered`` (``time.perf_counter()`` when the training call began, so data loading, model
    build, data-dependent init and compile count) less the training time of the epochs an
    interrupted run already logged (a resumed run counts this start's set-up only)."""
    return entered - float(np.nansum(history.get("epoch_time_s", []))), time.perf_counter() - entered


def this_process() -> dict:
    """Where and how this process trains: start time, CPU, cores, precision policy, commit."""
    return {"started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": machine.cpu_description(),
            "cpus": os.cpu_count(), "precision": keras.mixed_precision.global_policy().name,
            "code": machine.code_version()}


def open_run_dir(runs_dir, recipe: dict, overwrite: bool, class_names=(), strategy=None) -> Path:
    """Lock, then create, resume or (with ``overwrite``) replace ``runs_dir/<name>`` (``rundir.prepare``),
    and record this process as a segment. Under ``strategy`` with several workers, a worker other
    than the chief gets a temporary copy instead (kcifar.multiworker), and every worker
    must resume at the same epoch."""
    run_dir = Path(runs_dir) / recipe["name"]
    if strategy is not None and not multiworker.is_chief(strategy):
        run_dir = multiworker.worker_copy(run_dir, overwrite)
    rundir.lock(run_dir)
    epochs_done = rundir.prepare(run_dir, recipe, overwrite, class_names)
    rundir.record_segment(run_dir, {"first_epoch": epochs_done + 1, **this_process()})
    if strategy is not None:
        multiworker.check_same_on_every_worker(strategy, epochs_done)
    return run_dir


# ------------------------------------------------------------ recording


def offline_aug_record(folder: str):
    """Which offline-augmented set a run used: its folder and the sha256 of its manifest."""
    if not folder:
        return None
    return {"folder": str(Path(folder).resolve()), "manifest_sha256": fileio.file_sha256(Path(folder) / "manifest.json")}


def test_scores(evaluation: dict) -> dict:
    """metrics.json's test fields from ``kcifar.evaluate.evaluate_run``'s result (the one scoring)."""
    def pick(entry):
        return {"top1": entry["top1"], "top5": entry["top5"], "loss": entry["loss"], "n": entry["n"]}

    subset = evaluation.get("subset")
    return {"test": pick(evaluation["all"]), "test_exact": pick(subset) if subset and subset["n"] else None,
            "tta": evaluation.get("tta", "none")}


def summarize(recipe: dict, history: dict, evaluation: dict, wall_time: float, n_train: int) -> dict:
    """metrics.json: the kept model's epoch (best by the early-stopping monitor) and its scores."""
    best = rundir.best_index(history.get(recipe["early_stopping"]["monitor"]), recipe["early_stopping"]["monitor"])
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
    history = rundir.read_history(run_dir)
    metrics = {**summarize(recipe, history, evaluation, wall_time, n_train),
               "segments": rundir.segment_summaries(run_dir, history), **extra}
    rundir.write_metrics(run_dir, metrics)
    rundir.unlock(run_dir)
    return metrics
