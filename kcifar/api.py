"""kcifar from Python (a notebook, a script): what the commands do, as functions.

    from kcifar.api import build_model, evaluate, load_run, predict, resolve_recipe, train

    recipe = resolve_recipe("experiments/recipes/s4_vgg16_final.toml", epochs=2, train_subset=2000)
    result = train(recipe, runs_dir="runs", callbacks=[my_keras_callback])  # python -m kcifar.train
    scores = evaluate("runs/s4_vgg16_final")                 # python -m kcifar.evaluate
    top = predict("runs/s4_vgg16_final", images)             # python -m kcifar.predict
    run = load_run("runs/s4_vgg16_final")                    # its recipe, history, metrics, model
    model = build_model("resnet20", num_classes=100)         # a zoo model, raw 0..255 images in

Each function writes the same files and raises the same one-line ``KcifarError`` as its command.
Importing this module makes the commands' start-up settings (``kcifar.cli.start_command``:
TensorFlow's oneDNN kernels on, unless ``TF_ENABLE_ONEDNN_OPTS`` is set), which TensorFlow reads once,
when it is imported: import ``kcifar.api`` before TensorFlow, or set the variable yourself.
"""

from kcifar.cli import start_command
from kcifar.errors import KcifarError

start_command()

import dataclasses  # noqa: E402  (after the settings TensorFlow reads at its import)
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from kcifar import evaluate as kevaluate, models, predict as kpredict, recipe as krecipe, rundir  # noqa: E402
from kcifar import train as ktrain  # noqa: E402

__all__ = ["KcifarError", "Run", "build_model", "evaluate", "load_run", "predict", "resolve_recipe", "train"]


def build_model(name: str, num_classes: int = 10, **options):
    """A zoo model (``python -m kcifar.models`` lists them), untrained unless ``weights=`` is given;
    see ``kcifar.models.build`` for ``normalization``, ``init`` and each model's own options."""
    return models.build(name, num_classes=num_classes, **options)


def resolve_recipe(path=None, overrides=(), **flags) -> dict:
    """A validated recipe: the defaults, then the TOML file ``path``, then ``overrides`` (``"key=value"``
    strings or a ``{"dotted.key": value}`` dict, as ``--set``), then ``flags`` named as
    ``python -m kcifar.train``'s flags (``epochs=30``, ``lr=0.01``, ``augment="crop_flip"``, ...)."""
    unknown = sorted(set(flags) - set(ktrain.FLAGS))
    if unknown:
        raise KcifarError(f"unknown recipe flag {', '.join(unknown)}; use one of {', '.join(ktrain.FLAGS)}, "
                          "or overrides={'section.key': value} for any recipe key")
    if isinstance(overrides, dict):
        overrides = [krecipe.nested(key, value) for key, value in overrides.items()]
    flagged = [krecipe.nested(ktrain.FLAGS[flag][0], value) for flag, value in flags.items() if value is not None]
    return krecipe.resolve(path, [*overrides, *flagged])


def train(recipe=None, runs_dir="runs", data_dir=None, overwrite=False, callbacks=(), verbose=2):
    """Train ``recipe`` (a dict from ``resolve_recipe``, or a recipe file's path; default: the default
    recipe) into ``runs_dir/<name>``, resuming it if interrupted; ``callbacks``: your Keras callbacks,
    called after kcifar's own (their batch hooks once per ``steps_per_execution`` batches, as Keras calls
    them: ``kcifar.run.steps_per_execution``). Returns ``kcifar.train.RunResult`` (run_dir, metrics,
    model, data, evaluation)."""
    if recipe is None or isinstance(recipe, (str, Path)):
        recipe = resolve_recipe(recipe)
    return ktrain.train(recipe, runs_dir, data_dir, overwrite, verbose=verbose, callbacks=callbacks)


def evaluate(target, split="test", tta=None, data_dir=None, out=None) -> dict:
    """Measure a finished run (its directory) or a .keras file on ``split``, as ``python -m kcifar.evaluate``:
    writes the evaluation JSON and figures, and returns what it wrote (top-1/5, per class, confusion)."""
    return kevaluate.evaluate_target(target, split=split, tta=tta, data_dir=data_dir, out=out)


def predict(model, images, top_k=5, classes=None) -> list:
    """[[(class name, probability), ...top_k] per image] for uint8 RGB images (N, 32, 32, 3) or image
    files; ``model``: a run directory, a .keras file or a ``kcifar.export`` folder."""
    predictor = kpredict.Predictor(model)
    class_names = kpredict.class_names_of(predictor, classes)
    if isinstance(images, (list, tuple)) and not images:
        raise KcifarError("no images given; pass image files or a uint8 array (N, 32, 32, 3)")
    if isinstance(images, (str, Path)) or (isinstance(images, (list, tuple)) and isinstance(images[0], (str, Path))):
        images = [kpredict.read_image(path) for path in kpredict.image_files(images)]
    return kpredict.predict_images(predictor, np.asarray(images), class_names, min(top_k, len(class_names)))


@dataclasses.dataclass
class Run:
    """A run directory as files: its resolved recipe, history (column -> values), metrics.json
    (None while unfinished) and class names; ``model()`` loads its kept model (``best.keras``)."""

    run_dir: Path
    recipe: dict
    history: dict
    metrics: dict | None
    class_names: list

    def model(self):
        return models.load(self.run_dir / rundir.BEST_MODEL)


def load_run(run_dir) -> Run:
    """The run in ``run_dir`` (finished or not) as a ``Run``."""
    run_dir = Path(run_dir)
    if not (run_dir / rundir.RECIPE).is_file():
        raise KcifarError(f"{run_dir} is not a run directory (no recipe.toml); pass a folder that "
                          "kcifar.train wrote (runs/NAME)")
    classes = run_dir / rundir.CLASSES
    return Run(run_dir, rundir.read_recipe(run_dir), rundir.read_history(run_dir), rundir.read_metrics(run_dir),
               rundir.read_class_names(classes) if classes.is_file() else [])
