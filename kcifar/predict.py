"""Top-k classes for image files of any size.

    python -m kcifar.predict runs/NAME/best.keras photo.jpg folder/ [--top-k 5] [--json]
    python -m kcifar.predict model.keras photo.jpg --classes cifar10|cifar100|names.txt
    python -m kcifar.predict EXPORT_DIR photo.jpg     # a kcifar.export folder: SavedModel, ONNX or LiteRT

Images are read with OpenCV, converted from its BGR order to RGB (the order
of the CIFAR arrays the models were trained on) and resized to 32x32 with
``INTER_AREA``: area averaging is the anti-aliased way to shrink, so a large
photo becomes a smooth thumbnail like the CIFAR images (themselves shrunk
from larger photos) instead of an aliased sampling of a few pixels. Assumed:
the whole image is resized, aspect ratio not kept (no crop that could cut the
object away); alpha is dropped and grey images are repeated to three
channels. The model's outputs are logits; probabilities are their softmax.

Class names come from ``--classes``, else from the ``classes.txt`` that
training wrote into the run directory beside the model (an export: from its
manifest, which also names its format and so the runtime that runs it). A file that cannot be read costs one line
on stderr; the others are still predicted and the exit code is 1 at the end.
"""

import json
import sys
from pathlib import Path

import cv2
import numpy as np

from scipy.special import softmax

from kcifar import cli as kcli, deploy
from kcifar.data import class_names_for
from kcifar.errors import KcifarError
from kcifar.rundir import BEST_MODEL, CLASSES, read_class_names

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
SIZE = 32


def image_files(paths) -> list:
    """Files to predict: given files as they are, folders as their image files (sorted, not recursive)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            files.extend(found or [path])  # an empty folder is reported by read_image
        else:
            files.append(path)
    return files


def read_image(path) -> np.ndarray:
    """One image file as RGB uint8 (32, 32, 3)."""
    path = Path(path)
    if path.is_dir():
        raise KcifarError(f"{path} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    try:
        raw = np.fromfile(path, dtype=np.uint8)  # not cv2.imread: it fails silently on non-ASCII paths
    except OSError as error:
        raise KcifarError(f"cannot read {path}: {error.strerror}") from None
    image = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if image is None:
        raise KcifarError(f"cannot read {path}: not an image OpenCV can decode")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def class_names_for_model(model_path, classes=None) -> list:
    """``--classes`` (cifar10, cifar100, cifar100-coarse or a file of one name per line), else the
    ``classes.txt`` that training wrote beside the model."""
    if classes in ("cifar10", "cifar100"):
        return class_names_for(classes)
    if classes == "cifar100-coarse":
        return class_names_for("cifar100", "coarse")
    if classes:
        return read_class_names(classes)
    saved = Path(model_path).parent / CLASSES
    if not saved.is_file():
        raise KcifarError(f"{model_path} has no {CLASSES} beside it (not in a run directory, or one made "
                          "before kcifar wrote it); pass --classes cifar10|cifar100|FILE")
    return read_class_names(saved)


def _load_keras(path):
    from kcifar import models  # Keras and TensorFlow load only for a Keras model, not for an export

    return models.load(path)


class Predictor:
    """A model to predict with: a .keras file or a run directory's best.keras (Keras), or a kcifar
    export (its format's runtime). ``path``: the model file, or the export's folder."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir() and (path / BEST_MODEL).is_file() and not deploy.manifest_path(path):
            path = path / BEST_MODEL
        self.path = path
        self.exported = deploy.load(path) if path.suffix != ".keras" and deploy.manifest_path(path) else None
        self.keras = None if self.exported else _load_keras(path)
        self.num_classes = self.exported.num_classes if self.exported else self.keras.output_shape[-1]

    def logits(self, images) -> np.ndarray:
        if self.exported:
            return self.exported.logits(images)
        return self.keras.predict(np.asarray(images), batch_size=256, verbose=0)


def class_names_of(model, classes=None) -> list:
    """The class of each output of ``model`` (a Predictor): ``classes`` if given (see
    ``class_names_for_model``), else an export's manifest or the classes.txt beside the model file."""
    if model.exported and not classes:
        return model.exported.manifest["class_names"]
    return class_names_for_model(model.path, classes)


def predict_images(model, images, class_names, top_k=5) -> list:
    """[[(class name, probability), ...top_k]] for uint8 RGB images (N, 32, 32, 3); ``model`` a Predictor."""
    if model.num_classes != len(class_names):
        raise KcifarError(f"the model has {model.num_classes} outputs but {len(class_names)} class names were "
                          "given; pass the --classes the model was trained on")
    logits = model.logits(images)
    probabilities = softmax(logits.astype(np.float64), axis=1)
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    return [[(class_names[j], float(p[j])) for j in row] for p, row in zip(probabilities, best)]


def predict_files(model, paths, class_names, top_k=5):
    """(results, errors): results [{"file", "top": [{"class", "probability"}]}], errors [one line per bad file]."""
    images, readable, errors = [], [], []
    for path in image_files(paths):
        try:
            images.append(read_image(path))
            readable.append(path)
        except KcifarError as error:
            errors.append(str(error))
    results = []
    if images:
        for path, top in zip(readable, predict_images(model, np.stack(images), class_names, top_k)):
            results.append({"file": str(path), "top": [{"class": c, "probability": p} for c, p in top]})
    return results, errors


def format_results(results) -> str:
    return "\n".join(f"{r['file']}: " + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"])
                     for r in results)


@kcli.command
def main(argv=None):
    parser = kcli.parser("predict", __doc__.split("\n")[0])
    parser.add_argument("model", help="run directory (its best.keras), .keras model file (inside a run directory, "
                                      "its classes.txt names the classes) or a kcifar.export folder")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    parser.add_argument("--classes", help="cifar10, cifar100, cifar100-coarse or a file with one class name per line")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        raise KcifarError(f"--top-k {args.top_k} is not a positive number of classes")
    model = Predictor(args.model)
    class_names = class_names_of(model, args.classes)
    results, errors = predict_files(model, args.images, class_names, min(args.top_k, len(class_names)))
    print(json.dumps({"predictions": results, "errors": errors}, indent=2) if args.json else format_results(results))
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
