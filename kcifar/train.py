"""``python -m kcifar.train``: train a zoo model from a recipe, honestly evaluated.

The flow, on the run library (``kcifar.run``): resolve the recipe -> load the
data (validation split carved from training) -> build and compile the model
under a ``tf.distribute`` strategy -> ``model.fit`` with Keras callbacks ->
measure the test set once (``kcifar.evaluate``, with the recipe's test-time
augmentation ``train.tta``), with the model that scored best on validation ->
``evaluation.json``, figures and ``metrics.json``.

Starting the same command again resumes an interrupted run from its last
finished epoch; a finished run is kept unless ``--overwrite``.
"""

if __name__ == "__main__":  # before TensorFlow loads, which reads its oneDNN switch once
    from kcifar.cli import start_command

    start_command()

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kcifar import callbacks as kcallbacks, cli as kcli, data as kdata, evaluate, fileio, machine, models, multiworker, recipe as krecipe, run, rundir
from kcifar.augment import AugmentConfig, eval_dataset, train_dataset
from kcifar.errors import KcifarError

import keras  # noqa: E402  (after kcifar imports so TF's start-up noise follows our errors)


def build_model(recipe: dict, data, train: kdata.Split):
    """The zoo model, normalising inside with statistics of the training split."""
    normalization = recipe["data"]["normalization"]
    stats = dict(zip(("mean", "std"), kdata.channel_stats(train.x))) if normalization == "meanstd" else {}
    return models.build(recipe["model"], num_classes=data.num_classes, normalization=normalization,
                        **stats, **recipe["model_args"])


# ------------------------------------------------------------ the whole run


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    model: keras.Model  # with the kept (best validation) weights
    data: kdata.CifarData
    evaluation: dict | None = None  # kcifar.evaluate.evaluate_run's result on the test split
    chief: bool = True  # False: a worker of several whose run_dir was a temporary copy, now gone


def train(recipe: dict, runs_dir="runs", data_dir=None, overwrite=False, verbose=2, callbacks=()) -> RunResult:
    """Train ``recipe`` into ``runs_dir/<name>``, resuming it when interrupted; evaluate
    the kept model once on the test set (evaluation.json, figures, metrics.json).
    ``callbacks``: the caller's Keras callbacks, after kcifar's own.

    metrics.json's ``wall_time_s`` runs from this call's start (data loading, model build,
    whitening, compile: ``setup_s``) to the test-set evaluation's end (``evaluation_s``: with its
    TTA views and figures); the interpreter and TensorFlow's import before it are not in it."""
    entered = time.perf_counter()
    if recipe["model"] not in models.names():
        raise KcifarError(f"unknown model '{recipe['model']}'; choose one of: {', '.join(models.names())}")
    augment = AugmentConfig(**recipe["augment"])  # refused here, before the run directory is touched
    fileio.check_writable(runs_dir, "--runs-dir")
    rundir.check_run_dir(Path(runs_dir) / recipe["name"], recipe, overwrite)  # before the data and the compile
    spec = recipe["train"]
    strategy = run.set_up(recipe)
    data, train_split = run.load_data(recipe, data_dir)
    batch_size = spec["batch_size"]
    steps_per_epoch = -(-len(train_split) // batch_size)
    with strategy.scope():
        model = build_model(recipe, data, train_split)
        run.init_from_data(model, recipe, train_split)  # weights BackupAndRestore brings back replace these
        run.check_weight_averaging(recipe, steps_per_epoch)
        matmul_grads = run.prepare_model(model, recipe)
        run.compile_model(model, recipe, steps_per_epoch, machine.jit_enabled(spec["jit"]))
    run_dir = run.open_run_dir(runs_dir, recipe, overwrite, data.class_names, strategy)
    first_epoch = rundir.resume_epoch(run_dir)
    if first_epoch and not (run_dir / rundir.BEST_MODEL).is_file():  # saved at the first epoch's end, before the backup
        raise KcifarError(rundir.damaged(run_dir / rundir.BEST_MODEL, "it is missing"))
    history = rundir.read_history(run_dir)
    epochs = first_epoch if rundir.stopped_early(recipe, history) else spec["epochs"]
    if first_epoch:
        print(f"resuming {run_dir} at epoch {first_epoch + 1}" if first_epoch < epochs else
              f"resuming {run_dir}: its training is done, measuring the test set", file=sys.stderr)
    clock = run.start_clock(history, entered)
    has_val = len(data.val) > 0
    model.fit(
        train_dataset(train_split.x, train_split.y, data.num_classes, batch_size, augment,
                      seed=recipe["seed"], first_epoch=first_epoch),
        validation_data=eval_dataset(data.val.x, data.val.y, data.num_classes, batch_size) if has_val else None,
        epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=verbose, shuffle=False,  # the pipeline shuffles
        callbacks=kcallbacks.make_callbacks(run_dir, recipe, len(train_split), history) + list(callbacks),
    )
    history = rundir.read_history(run_dir)
    if history and not np.isfinite(history["loss"][-1]):
        raise KcifarError(f"training diverged: the loss became NaN in epoch {len(history['loss'])}; "
                          "lower optimizer.learning_rate or add warmup (schedule.name=warmup_cosine)")
    kcallbacks.inference_view(model).load_weights(run_dir / rundir.BEST_MODEL)
    evaluation, metrics = run.evaluate_and_finish(run_dir, recipe, model, data, clock, len(train_split),
                                                  tta=spec["tta"], conv_grad_matmul_layers=matmul_grads)
    return RunResult(run_dir, metrics, model, data, evaluation, multiworker.is_chief(strategy))


# ------------------------------------------------------------ command line

FLAGS = {  # flag -> (recipe key, type)
    "model": ("model", str), "dataset": ("dataset", str), "name": ("name", str),
    "epochs": ("train.epochs", int), "batch_size": ("train.batch_size", int),
    "optimizer": ("optimizer.name", str), "lr": ("optimizer.learning_rate", float),
    "schedule": ("schedule.name", str), "augment": ("augment.preset", str), "aug_engine": ("augment.engine", str),
    "val_size": ("data.val_size", int), "train_subset": ("data.train_subset", int),
    "offline_aug": ("data.offline_aug", str), "strategy": ("train.strategy", str),
    "precision": ("train.precision", str), "jit": ("train.jit", str), "tta": ("train.tta", str),
}
SWITCHES = {"deterministic": "train.deterministic", "tensorboard": "train.tensorboard"}  # flag -> recipe key set true
UNNAMED = {"name", "train.tensorboard"}  # settings that do not name a run: they change no result


def allowed_values(key: str):
    """The values a flag's recipe key takes, for --help (None: any of its type)."""
    if key == "model":
        return models.names()
    if key == "augment.preset":
        from kcifar.augment import PRESETS

        return sorted(PRESETS)
    return krecipe.CHOICES.get(key)


def parse_args(argv=None):
    parser = kcli.parser(
        "train", "Train a kcifar model. Precedence: defaults < RECIPE file < --set < named flags. Without --name a "
        "run is named after its recipe (file name, else model) and the settings its flags change, e.g. "
        "s3_tutorial_epochs-3.", shared=("data_dir", "runs_dir", "overwrite", "seed", "log"))
    parser.add_argument("recipe", nargs="?", help="TOML recipe (see experiments/recipes/); default: the S3 Adam recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any recipe key, e.g. --set optimizer.weight_decay=5e-4")
    for flag, (key, kind) in FLAGS.items():
        values, default = allowed_values(key), krecipe.default_of(key)
        parser.add_argument("--" + flag.replace("_", "-"), type=kind,
                            help=f"sets {key}" + (f": {', '.join(values)}" if values else "")
                            + (f" (default: {default}, or the recipe file's)" if default not in ("", None) else ""))
    parser.add_argument("--deterministic", action="store_true", help="TF op determinism (sets train.deterministic)")
    parser.add_argument("--tensorboard", action="store_true", help="TensorBoard logs in the run directory "
                                                                   "(sets train.tensorboard)")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe (TOML) and train nothing")
    return parser.parse_args(argv)


def named_settings(args) -> dict:
    """What the named flags set (``--epochs``, ``--deterministic``, ``--seed``, ...): dotted recipe key -> value."""
    settings = {key: getattr(args, flag) for flag, (key, _) in FLAGS.items() if getattr(args, flag) is not None}
    settings.update({key: True for flag, key in SWITCHES.items() if getattr(args, flag)})
    if args.seed is not None:
        settings["seed"] = args.seed
    return settings


def recipe_from_args(args) -> dict:
    """The resolved recipe: each --set, then the named flags, each a validated layer over the file. Without
    --name, the run is named after its recipe and the settings the flags change, so that a run set by
    flags never resumes or collides with the recipe's own run."""
    named = named_settings(args)
    recipe = krecipe.resolve(args.recipe, list(args.set) + [krecipe.nested(key, value) for key, value in named.items()])
    settings = {key: value for assignment in args.set
                for key, value in krecipe.flatten(krecipe.parse_override(assignment)).items()} | named
    naming = [key for key in settings if key not in UNNAMED and not (key == "model" and not args.recipe)]
    if "name" not in settings and naming:
        recipe["name"] = f"{recipe['name']}_{krecipe.settings_name(settings, naming)}"
    return recipe


@kcli.command
def main(argv=None):
    args = parse_args(argv)
    recipe = recipe_from_args(args)
    if args.print_recipe:
        print(krecipe.to_toml(recipe), end="")
        return
    if not args.recipe and not args.set and not named_settings(args):
        print(f"no recipe given: training the default ({recipe['model']}, {recipe['optimizer']['name']}, "
              f"{recipe['train']['epochs']} epochs); see experiments/recipes/ for the others", file=sys.stderr)
    with multiworker.lost_workers_are_errors():
        result = train(recipe, args.runs_dir, args.data_dir, args.overwrite, verbose=kcli.keras_verbosity(args))
    print(evaluate.describe(result.evaluation))
    if not result.chief:
        print("done; the chief (worker 0) wrote the run directory")
        return
    print(f"run directory: {result.run_dir} (metrics.json, evaluation.json, {', '.join(result.evaluation['figures'])})")


if __name__ == "__main__":
    main()
