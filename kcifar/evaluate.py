"""Measure a trained model: top-1/top-5, per-class accuracy, confusion matrix, figures.

    python -m kcifar.evaluate runs/NAME                 # rebuilds the run's splits from recipe.toml
    python -m kcifar.evaluate model.keras --dataset cifar10 [--out DIR]
    python -m kcifar.evaluate runs/NAME --split val --subset-mask FILE.npy
    python -m kcifar.evaluate runs/NAME --tta flip_translate   # test-time augmentation

Writes ``evaluation.json`` (``evaluation_val.json`` for ``--split val``) and
PNGs into the run directory. All metrics are computed with numpy from the
model's logits. When the data carries a pixel-exactness mask (the rebuilt
CIFAR-10 test set here: only images 0-999 are bit-exact), the test figures
are reported twice, on all images and on the exact subset, each labelled.

Assumed where the documents are silent: the loss reported is plain
cross-entropy without label smoothing; per-class accuracy and the confusion
matrix use the whole split; ``best.keras`` is the epoch that is best by the
recipe's ``early_stopping.monitor`` (as kcifar.train saves it).
"""

from pathlib import Path

import numpy as np
from scipy.special import log_softmax, softmax

from kcifar import cli as kcli, fileio, rundir
from kcifar.data import Split, load_cifar, superclass_groups
from kcifar.errors import KcifarError

TOP_K = 5
MOST_CONFUSED = 10
GRID_IMAGES = 32


# ---------------------------------------------------------------- metrics from logits


def confusion_matrix(y_true, y_pred, num_classes):
    """Counts, rows = true class, columns = predicted class."""
    pairs = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def summary_metrics(logits, y, label):
    """Top-1, top-k (k = 5, or the class count if smaller) and mean cross-entropy."""
    logits, y = np.asarray(logits), np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return {"label": label, "n": 0, "top1": None, "top5": None, "loss": None}
    k = min(TOP_K, logits.shape[1])
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return {
        "label": label,
        "n": int(len(y)),
        "top1": float(np.mean(top_k[:, 0] == y)),
        "top5": float(np.mean((top_k == y[:, None]).any(axis=1))),
        "loss": float(-np.mean(log_softmax(logits.astype(np.float64), axis=1)[np.arange(len(y)), y])),
    }


def metrics_from_logits(logits, y, class_names, mask=None, all_label=None, mask_label=None) -> dict:
    """Every number of ``evaluation.json`` from logits (N, C) and true labels (N,).

    ``mask`` (bool, N) adds a ``subset`` entry measured on the images it marks.
    """
    logits, y = np.asarray(logits), np.asarray(y, dtype=np.int64)
    num_classes = len(class_names)
    if logits.ndim != 2 or logits.shape != (len(y), num_classes):
        raise KcifarError(f"the model gives logits of shape {logits.shape} for {len(y)} images of "
                          f"{num_classes} classes; was it trained on this data set?")
    confusion = confusion_matrix(y, logits.argmax(axis=1), num_classes)
    per_class_n = confusion.sum(axis=1)
    per_class = [{"class": name, "n": int(n), "correct": int(confusion[i, i]),
                  "accuracy": float(confusion[i, i] / n) if n else None}
                 for i, (name, n) in enumerate(zip(class_names, per_class_n))]
    off_diagonal = confusion - np.diag(np.diag(confusion))
    worst = np.argsort(-off_diagonal, axis=None, kind="stable")[:MOST_CONFUSED]
    most_confused = [{"true": class_names[t], "predicted": class_names[p], "count": int(off_diagonal[t, p])}
                     for t, p in zip(*np.unravel_index(worst, confusion.shape)) if off_diagonal[t, p] > 0]
    subset = None
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != y.shape:
            raise KcifarError(f"the subset mask is {mask.dtype} {mask.shape}; it must be bool {y.shape}")
        subset = summary_metrics(logits[mask], y[mask], mask_label or f"subset of {int(mask.sum()):,}")
    return {
        "all": summary_metrics(logits, y, all_label or f"all {len(y):,}"),
        "subset": subset,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "most_confused": most_confused,
    }


TTA = ("none", "flip", "flip_translate")


def tta_views(x, tta="none"):
    """[(weight, images)] whose weighted logits ``predict_logits`` sums (the weights sum to 1).

    ``flip``: the images and their mirror, 1/2 each. ``flip_translate`` (airbench94's TTA): those
    two at 1/4 each, plus both, shifted one pixel down-right and one pixel up-left (padded by
    reflection, edge not repeated), at 1/8 each.
    """
    if tta not in TTA:
        raise KcifarError(f"unknown tta {tta!r}; choose one of {', '.join(TTA)}")
    if tta == "none":
        return [(1.0, x)]

    def with_mirror(images, weight):
        return [(weight / 2, images), (weight / 2, images[:, :, ::-1])]

    if tta == "flip":
        return with_mirror(x, 1.0)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    height, width = x.shape[1:3]
    shifted = [padded[:, :height, :width], padded[:, 2:, 2:]]
    return with_mirror(x, 0.5) + [view for images in shifted for view in with_mirror(images, 0.25)]


def predict_logits(model, x, batch_size=500, tta="none"):
    """The model's logits for uint8 images (N, 32, 32, 3), as float32 (N, C), averaged over the
    ``tta_views`` of the images (``tta``: none, flip or flip_translate): any model."""
    if len(x) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    logits = sum(weight * np.asarray(model.predict(np.ascontiguousarray(images), batch_size=batch_size, verbose=0),
                                     dtype=np.float64)
                 for weight, images in tta_views(np.asarray(x), tta))
    return logits.astype(np.float32)


def evaluate_model(model, split: Split, class_names, mask=None, all_label=None, mask_label=None) -> dict:
    """``metrics_from_logits`` for a Keras model on one split."""
    return metrics_from_logits(predict_logits(model, split.x), split.y, class_names, mask, all_label, mask_label)


# ---------------------------------------------------------------- inputs


def load_mask(path, n: int):
    """A boolean mask of ``n`` images from a .npy file."""
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise KcifarError(f"cannot read subset mask {path} ({error}); pass a .npy file of booleans") from None
    if mask.dtype != bool or mask.shape != (n,):
        raise KcifarError(f"subset mask {path} is {mask.dtype} {mask.shape}; the split needs bool ({n},)")
    return mask


def resolve_target(target):
    """(run directory or None, model file) for a run directory or a .keras file.

    A .keras file inside a run directory (beside recipe.toml) counts as that run.
    """
    target = Path(target)
    if target.is_dir():
        if not (target / rundir.BEST_MODEL).is_file():
            raise KcifarError(f"{target} has no best.keras; pass a finished run directory or a .keras file")
        run_dir, model = target, target / rundir.BEST_MODEL
    elif not target.exists():
        raise KcifarError(f"{target} does not exist; pass a run directory (runs/NAME) or a .keras model file")
    else:
        run_dir, model = (target.parent if (target.parent / rundir.RECIPE).is_file() else None), target
    if run_dir is not None:
        rundir.read_recipe(run_dir)
        if not rundir.is_finished(run_dir):  # its best.keras may still change, and its files are training's
            raise KcifarError(f"{run_dir} is an unfinished run; run the command that started it again to finish "
                              "it, then evaluate")
    return run_dir, model


# ---------------------------------------------------------------- writing results


def write_figures(out_dir, split: Split, logits, class_names, split_name="test", history=None,
                  monitor="val_accuracy", title="") -> list:
    """Confusion matrix, per-class accuracy, prediction grid and (with ``history``) learning curves.

    Returns the written file names. Figures of the test split are
    ``confusion.png`` etc.; of another split ``confusion_<split>.png``.
    """
    from kcifar import plots

    out_dir, suffix = Path(out_dir), "" if split_name == "test" else f"_{split_name}"
    label = f"{title} ({split_name}, {len(split.y):,} images)" if title else f"{split_name}, {len(split.y):,} images"
    predicted = np.asarray(logits).argmax(axis=1)
    confusion = confusion_matrix(split.y, predicted, len(class_names))
    probabilities = softmax(np.asarray(logits[:GRID_IMAGES], np.float64), axis=1)
    paths = [
        plots.confusion(confusion, class_names, out_dir / f"confusion{suffix}.png",
                        groups=superclass_groups(class_names), title=f"Confusion matrix: {label}"),
        plots.per_class_accuracy(confusion, class_names, out_dir / f"per_class_accuracy{suffix}.png",
                                 title=f"Accuracy per class: {label}"),
        plots.prediction_grid(split.x[:GRID_IMAGES], split.y[:GRID_IMAGES], probabilities, class_names,
                              out_dir / f"predictions{suffix}.png", title=f"Predictions on the first {min(GRID_IMAGES, len(split.y))} images: {label}"),
    ]
    if history:
        paths.append(plots.learning_curves(history, out_dir / "learning_curves.png",
                                           best_index=rundir.best_index(history.get(monitor), monitor), monitor=monitor,
                                           title=f"Learning curves: {title}" if title else "Learning curves"))
    return [p.name for p in paths]


def evaluate_run(run_dir, model, data, split_name="test", subset_mask=None, subset_label=None, tta="none",
                 out_dir=None) -> dict:
    """Evaluate ``model`` on one split of ``data`` (logits averaged over the ``tta`` views) and
    write evaluation JSON (which records ``tta``) and figures into ``out_dir`` (default ``run_dir``).

    On the test split the data's pixel-exact mask, if any, is the subset
    unless ``subset_mask`` is given. ``history.csv`` and ``recipe.toml`` in
    ``run_dir`` are used when present (learning curves, best epoch, name).
    Returns the dict written to ``evaluation.json``.
    """
    if split_name not in ("test", "val"):
        raise KcifarError(f"unknown split '{split_name}'; choose test or val")
    run_dir = Path(run_dir)
    split = getattr(data, split_name)
    if len(split.y) == 0:
        raise KcifarError(f"the {split_name} split is empty (val_size = 0?); evaluate another split")
    if subset_mask is None and split_name == "test" and data.test_exact_mask is not None:
        subset_mask, subset_label = data.test_exact_mask, f"pixel-exact {int(data.test_exact_mask.sum()):,}"
    recipe = rundir.read_recipe(run_dir) if (run_dir / rundir.RECIPE).is_file() else {}
    monitor = rundir.monitor_of(recipe)
    logits = predict_logits(model, split.x, tta=tta)
    result = {"run": recipe.get("name") or run_dir.name, "dataset": data.name, "label_mode": data.label_mode,
              "data_source": data.source, "split": split_name, "tta": tta}
    result.update(metrics_from_logits(logits, split.y, data.class_names, mask=subset_mask,
                                      all_label=f"all {len(split.y):,}", mask_label=subset_label))
    out_dir = Path(out_dir or run_dir)
    result["figures"] = write_figures(out_dir, split, logits, data.class_names, split_name=split_name,
                                      history=rundir.read_history(run_dir), monitor=monitor, title=result["run"])
    fileio.write_json(out_dir / rundir.evaluation_file(split_name), result)
    return result


def describe(result) -> str:
    """The headline lines a person reads after evaluating."""
    lines = []
    for entry in (result["all"], result["subset"]):
        if entry and entry["n"]:
            lines.append(f"{result['split']} {entry['label']:>18}: top-1 {100 * entry['top1']:6.2f} %  "
                         f"top-5 {100 * entry['top5']:6.2f} %  loss {entry['loss']:.4f}"
                         + (f"  (TTA {result['tta']})" if result.get("tta", "none") != "none" else ""))
    return "\n".join(lines)


def evaluate_target(target, split="test", tta=None, data_dir=None, out=None, subset_mask=None, **data_flags) -> dict:
    """``python -m kcifar.evaluate``'s work: a finished run directory (its recipe fixes the data, its
    folder is the output) or a .keras file (``data_flags``: dataset, label_mode, val_size, seed; output
    ``out``, default MODEL_evaluation/ beside it). ``tta`` None: the run's ``train.tta``, else none.
    A run measured otherwise than it was trained to be (another ``tta``, a subset mask) is written into
    a folder of the run named for the difference (``evaluation_tta-flip/``), never over the files its
    metrics.json was computed with. Returns evaluate_run's result and, under ``written``, the JSON's path."""
    from kcifar import models  # Keras, only when a model is measured

    run_dir, model_path = resolve_target(target)
    flags = {"--dataset": ("name", data_flags.get("dataset")), "--label-mode": ("label_mode", data_flags.get("label_mode")),
             "--val-size": ("val_size", data_flags.get("val_size")), "--seed": ("seed", data_flags.get("seed")),
             "--out": (None, out)}
    given = {flag: setting for flag, setting in flags.items() if setting[1] is not None}
    if run_dir is not None:
        if given:
            raise KcifarError(f"{' '.join(given)} cannot be used with run {run_dir}: its recipe.toml "
                              "fixes the data and the run directory is the output")
        recipe = rundir.read_recipe(run_dir)
        settings, run_tta = rundir.data_settings(recipe), recipe.get("train", {}).get("tta", "none")
        tta = tta or run_tta
        differences = ([f"tta-{tta}"] if tta != run_tta else []) + ([f"subset-{Path(subset_mask).stem}"]
                                                                     if subset_mask else [])
        out_dir = run_dir / f"evaluation_{'_'.join(differences)}" if differences else run_dir
    else:
        settings = rundir.data_settings({})
        settings.update({key: value for key, value in given.values() if key})
        out_dir = Path(out) if out else model_path.parent / f"{model_path.stem}_evaluation"
        fileio.check_writable(out_dir, "--out")
        tta = tta or "none"
    data = load_cifar(data_dir=data_dir, **settings)
    mask = load_mask(subset_mask, len(getattr(data, split).y)) if subset_mask else None
    result = evaluate_run(run_dir or out_dir, models.load(model_path), data, split, mask,
                          f"subset {Path(subset_mask).name} ({int(mask.sum()):,})" if mask is not None else None,
                          tta=tta, out_dir=out_dir)
    return {**result, "written": str(out_dir / rundir.evaluation_file(split))}


# ---------------------------------------------------------------- command line


@kcli.command
def main(argv=None):
    parser = kcli.parser("evaluate", __doc__.split("\n")[0] + " A run measured otherwise than its recipe says "
                         "(--tta, --subset-mask) writes into evaluation_<difference>/ inside the run.",
                         shared=("data_dir",))
    parser.add_argument("target", help="run directory (runs/NAME) or a .keras model file")
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--subset-mask", help=".npy bool mask over the split; also reports accuracy on it")
    parser.add_argument("--out", help="output folder for a bare model (default: MODEL_evaluation/ beside it)")
    parser.add_argument("--tta", choices=TTA, help="test-time augmentation: average the logits over mirrored "
                        "(flip) and also 1-pixel shifted (flip_translate) copies; default: the run's train.tta, "
                        "else none")
    bare = parser.add_argument_group("for a .keras file outside a run directory (a run's recipe.toml decides otherwise)")
    bare.add_argument("--dataset", choices=["cifar10", "cifar100"])
    bare.add_argument("--label-mode", choices=["fine", "coarse"])
    bare.add_argument("--val-size", type=int)
    bare.add_argument("--seed", type=int, help="random seed of the validation split (default 0)")
    args = parser.parse_args(argv)

    result = evaluate_target(args.target, args.split, args.tta, args.data_dir, args.out, args.subset_mask,
                             dataset=args.dataset, label_mode=args.label_mode, val_size=args.val_size, seed=args.seed)
    print(describe(result))
    print(f"wrote {result['written']} and {', '.join(result['figures'])}")


if __name__ == "__main__":
    main()
