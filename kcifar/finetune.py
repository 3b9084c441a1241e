"""Transfer learning: fine-tune an ImageNet-pretrained backbone on CIFAR.

    python -m kcifar.finetune experiments/recipes/finetune_lite0_r192.toml

The backbone sees the CIFAR image upscaled inside the model (``resolution``).
Stage 1 trains a new head (dropout + dense) on the frozen backbone, whose
BatchNorm layers stay in inference mode; stage 2 unfreezes the top
``unfreeze_blocks`` blocks and trains them with the head at a lower learning
rate. Both stages stop early on the validation split.

Fast path (``cache_features``): the frozen part of the network is computed
once per image and kept on disk (``kcifar.features``: ``$KERAS_HOME/kcifar/features/``, shared by
runs with the same backbone weights, resolution, split and ``unfreeze_blocks``); stage 1
trains the head on pooled features, stage 2 trains the unfrozen top on the
cached activations. Only horizontal flips augment there (both versions of each
training image are cached when ``flip = true``). Without the fast path, the
whole model trains on images with the ``[augment]`` preset (slow on a CPU).

Backbones: see ``kcifar.models.backbones`` (the zoo's EfficientNet-Lite with
ImageNet weights, four ``keras.applications`` models, or a kcifar run directory).
A stopped fine-tune resumes: finished stages are kept, the stage in progress
continues at its last finished epoch (``kcifar.run``).
"""

if __name__ == "__main__":  # before TensorFlow loads, which reads its oneDNN switch once
    from kcifar.cli import start_command

    start_command()

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from kcifar import callbacks as kcallbacks, cli as kcli, evaluate, features, fileio, machine, recipe as krecipe, run, rundir
from kcifar.augment import AugmentConfig, eval_dataset, train_dataset
from kcifar.errors import KcifarError
from kcifar.models.backbones import backbone_names, load_backbone, split_backbone, unfreeze_top


# ------------------------------------------------------------ the recipe


def resolve_recipe(path=None, overrides=()) -> dict:
    """``kcifar.recipe.resolve`` with the ``[finetune]`` table (``kcifar.recipe.COMMAND_TABLES``);
    ``model`` becomes the backbone's name."""
    layers = ([krecipe.read_toml(path)] if path else []) + [
        krecipe.parse_override(o) if isinstance(o, str) else o for o in overrides]
    recipe = krecipe.resolve(None, layers, tables=("finetune",))
    if not any("name" in layer for layer in layers):
        recipe["name"] = Path(path).stem if path else f"finetune_{Path(recipe['finetune']['backbone']).name}"
    recipe["model"] = Path(recipe["finetune"]["backbone"]).name
    return recipe


def stage_recipe(recipe, stage) -> dict:
    """The recipe with ``train.epochs`` and the learning rate of stage 1 or 2."""
    spec = copy.deepcopy(recipe)
    spec["train"]["epochs"] = recipe["finetune"][f"stage{stage}_epochs"]
    spec["optimizer"]["learning_rate"] = recipe["finetune"][f"stage{stage}_lr"]
    return spec


# ------------------------------------------------------------ models


def new_head(num_classes, dropout):
    """The layers put on the pooled features: dropout, then ``predictions`` (logits)."""
    return [keras.layers.Dropout(dropout, name="head_dropout"),
            keras.layers.Dense(num_classes, dtype="float32", name="predictions")]


def stack(inputs, layers, name):
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name=name)


# ------------------------------------------------------------ the two stages


@dataclass
class Stage:
    """What one stage fits: ``model`` on ``train_data(e)`` (the training batches from the stage's
    epoch ``e`` on, what an uninterrupted stage sees there), validated on ``val_data``."""
    model: keras.Model
    train_data: Callable
    val_data: object = None


def two_stages(recipe, first: Stage, second, steps, run_dir, verbose) -> tuple:
    """Stage 1 fits ``first``. Then, unless ``second`` is None, ``second()`` unfreezes the top
    blocks and returns stage 2's Stage; stage 2's weights are kept only if its best validation
    score beats stage 1's, else its model gets its stage-1 weights back. Returns the epochs run
    per stage."""
    epochs1, best1 = fit_stage(recipe, 1, first, steps, run_dir, verbose)
    if second is None:
        return epochs1, 0
    stage = second()
    saved = stage.model.get_weights()
    epochs2, best2 = fit_stage(recipe, 2, stage, steps, run_dir, verbose)
    monitor = recipe["early_stopping"]["monitor"]
    if best2 is not None and best1 is not None and not rundir.improves(best2, best1, monitor):
        stage.model.set_weights(saved)
        print(f"stage 2 did not beat stage 1 on {monitor}; keeping the stage-1 model", file=sys.stderr)
    return epochs1, epochs2


def fit_stage(recipe, number, stage: Stage, steps, run_dir, verbose) -> tuple:
    """Compile and fit stage ``number`` with the run library's callbacks, so a killed stage resumes
    at its last finished epoch and a finished one is not run again. The model ends with the
    stage's best weights (by the early-stopping monitor). Returns (epochs run, best monitor
    value or None)."""
    model = stage.model
    best_path = run_dir / rundir.stage_model(number)
    finished = rundir.finished_stages(run_dir)
    if str(number) in finished:  # finished before the run was stopped
        kcallbacks.inference_view(model).load_weights(best_path)
        return finished[str(number)]["epochs"], finished[str(number)]["best"]
    spec = stage_recipe(recipe, number)
    first = sum(done["epochs"] for done in finished.values())  # the stage's first epoch, counted over stages
    run.check_weight_averaging(spec, steps)
    run.prepare_model(model, spec)
    run.compile_model(model, spec, steps, machine.jit_enabled(spec["train"]["jit"]))
    logged = {column: values[first:] for column, values in rundir.read_history(run_dir).items()}
    epochs = len(logged.get("epoch", [])) if rundir.stopped_early(spec, logged) else spec["train"]["epochs"]
    model.fit(stage.train_data(max(rundir.resume_epoch(run_dir) - first, 0)), validation_data=stage.val_data,
              epochs=first + epochs, initial_epoch=first, steps_per_epoch=steps, verbose=verbose,
              callbacks=kcallbacks.make_callbacks(run_dir, spec, steps * spec["train"]["batch_size"], logged, best_path, first))
    kcallbacks.inference_view(model).load_weights(best_path)
    logged = {column: values[first:] for column, values in rundir.read_history(run_dir).items()}
    monitor = spec["early_stopping"]["monitor"]
    best = rundir.best_index(logged.get(monitor), monitor)
    result = len(logged["epoch"]), None if best is None else float(logged[monitor][best])
    rundir.record_stage(run_dir, number, *result)
    return result


# ------------------------------------------------------------ what the stages fit, by path


def array_dataset(x, y, num_classes, batch_size, shuffle=False, seed=0, skip_batches=0):
    """(float32 x, one-hot y) batches from arrays; repeating and shuffled for training.
    Shuffled as indices over all rows (a full buffer), so each epoch draws from every row;
    the first ``skip_batches`` batches left out (a resumed stage starts where it was)."""
    import tensorflow as tf

    x, y = tf.constant(x), tf.constant(y)
    rows = tf.data.Dataset.range(len(y))
    if shuffle:
        rows = rows.shuffle(len(y), seed=seed, reshuffle_each_iteration=True).repeat().skip(skip_batches * batch_size)
    return rows.batch(batch_size).map(
        lambda i: (tf.cast(tf.gather(x, i), "float32"), tf.one_hot(tf.gather(y, i), num_classes))).prefetch(2)


def feature_stages(recipe, data, train_split, backbone, steps, verbose) -> tuple:
    """The fast path: (head layers, stage 1, stage 2's maker or None). The frozen part's outputs
    are cached (``kcifar.features``); stage 1 fits the head on the pooled features, stage 2 the
    unfrozen top blocks with the head on those blocks' cached input."""
    ft, batch, classes = recipe["finetune"], recipe["train"]["batch_size"], data.num_classes
    bottom, top = split_backbone(backbone, ft["unfreeze_blocks"])

    def log(done, total):
        if verbose:
            print(f"  features {done}/{total}", file=sys.stderr, flush=True)

    cut, pooled = features.stage_features(features.feature_dir(recipe, backbone), bottom, top, data.val.x,
                                          train_split.x, ft["flip"], log)
    train_y = np.concatenate([train_split.y, train_split.y]) if ft["flip"] else train_split.y
    head = new_head(classes, ft["head_dropout"])

    def on(arrays, layers, name) -> Stage:
        def train_data(epoch):
            return array_dataset(arrays["train"], train_y, classes, batch, shuffle=True, seed=recipe["seed"],
                                 skip_batches=epoch * steps)

        model = stack(keras.Input(arrays["train"].shape[1:]), layers, name)
        return Stage(model, train_data, array_dataset(arrays["val"], data.val.y, classes, batch) if len(data.val) else None)

    def second():
        unfreeze_top(backbone, ft["unfreeze_blocks"])
        return on(cut, [top] + head, "top_and_head")

    first = on(pooled, head, "head")
    return head, first, second if top is not None and ft["stage2_epochs"] > 0 else None


def image_stages(recipe, data, train_split, backbone, steps, verbose) -> tuple:
    """The plain path: (head layers, stage 1, stage 2's maker or None), both stages fitting the
    whole model on (augmented) images, the backbone frozen, then its top blocks unfrozen."""
    ft, batch, classes = recipe["finetune"], recipe["train"]["batch_size"], data.num_classes
    head = new_head(classes, ft["head_dropout"])
    model = stack(backbone.input, [backbone] + head, "finetune")

    def train_data(epoch):
        return train_dataset(train_split.x, train_split.y, classes, batch, AugmentConfig(**recipe["augment"]),
                             seed=recipe["seed"], first_epoch=epoch)

    stage = Stage(model, train_data, eval_dataset(data.val.x, data.val.y, classes, batch) if len(data.val) else None)
    backbone.trainable = False

    def second():
        unfreeze_top(backbone, ft["unfreeze_blocks"])
        return stage

    return head, stage, second if ft["unfreeze_blocks"] > 0 and ft["stage2_epochs"] > 0 else None


def finetune(recipe, runs_dir="runs", data_dir=None, overwrite=False, verbose=2):
    """Run ``recipe`` (see ``resolve_recipe``) into ``runs_dir/<name>``, under the recipe's
    ``train.strategy``: the run directory, metrics.json and evaluation of ``kcifar.train``.
    Starting it again after a kill resumes it (finished stages are kept, the stage in
    progress continues at its last finished epoch)."""
    entered, ft = time.perf_counter(), recipe["finetune"]
    if recipe["train"]["strategy"] == "multiworker":
        raise KcifarError("kcifar.finetune trains on one machine ('auto', 'default' or 'mirrored'); "
                          "strategy 'multiworker' is for kcifar.train")
    AugmentConfig(**recipe["augment"])  # a bad [augment] is refused before the run directory is touched
    fileio.check_writable(runs_dir, "--runs-dir")
    strategy = run.set_up(recipe)
    data, train_split = run.load_data(recipe, data_dir)
    with strategy.scope():
        backbone = load_backbone(ft["backbone"], (32, 32, 3), ft["resolution"], ft["weights"])  # may refuse
        run_dir = run.open_run_dir(runs_dir, recipe, overwrite, data.class_names)
        if rundir.resume_epoch(run_dir):
            print(f"resuming {run_dir} at epoch {rundir.resume_epoch(run_dir) + 1}", file=sys.stderr)
        clock = run.start_clock(rundir.read_history(run_dir), entered)
        steps = -(-len(train_split) // recipe["train"]["batch_size"])  # an epoch: as many images as the split holds
        make_stages = feature_stages if ft["cache_features"] else image_stages
        head, first, second = make_stages(recipe, data, train_split, backbone, steps, verbose)
        epochs = two_stages(recipe, first, second, steps, run_dir, verbose)
        model = stack(backbone.input, [backbone] + head, f"finetune_{recipe['model']}")
    with fileio.atomic_path(run_dir / rundir.BEST_MODEL) as tmp:
        model.save(tmp)
    evaluation, metrics = run.evaluate_and_finish(run_dir, recipe, model, data, clock, len(train_split),
                                                  resolution=ft["resolution"], backbone=ft["backbone"],
                                                  stage_epochs=list(epochs), fast_path=ft["cache_features"])
    return run_dir, metrics, evaluation


# ------------------------------------------------------------ command line


def parse_args(argv=None):
    parser = kcli.parser("finetune", __doc__.split("\n")[0],
                         shared=("data_dir", "runs_dir", "overwrite", "seed", "log"))
    parser.add_argument("recipe", nargs="?", help="TOML recipe with a [finetune] table (experiments/recipes/finetune_*.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set finetune.resolution=160")
    parser.add_argument("--backbone", help=f"sets finetune.backbone: {', '.join(backbone_names())}")
    parser.add_argument("--weights", help="sets finetune.weights: a local weights file (.pth for Lite, .h5 for Keras)")
    parser.add_argument("--name", help="sets name: the run directory's name (default: the recipe file's)")
    parser.add_argument("--epochs", type=int, help="sets finetune.stage1_epochs (the head's stage; stage 2 has "
                                                   "finetune.stage2_epochs)")
    return parser.parse_args(argv)


def recipe_from_args(args) -> dict:
    """The resolved recipe: the file, then --set, then the named flags."""
    flags = {k: v for k, v in (("backbone", args.backbone), ("weights", args.weights), ("stage1_epochs", args.epochs))
             if v is not None}
    top = {k: v for k, v in (("name", args.name), ("seed", args.seed)) if v is not None}
    return resolve_recipe(args.recipe, list(args.set) + ([{"finetune": flags}] if flags else []) + ([top] if top else []))


@kcli.command
def main(argv=None):
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    run_dir, _, evaluation = finetune(recipe, args.runs_dir, args.data_dir, args.overwrite, kcli.keras_verbosity(args))
    print(evaluate.describe(evaluation))
    print(f"run directory: {run_dir} (metrics.json, evaluation.json, {', '.join(evaluation['figures'])})")


if __name__ == "__main__":
    main()
