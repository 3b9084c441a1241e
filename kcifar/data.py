"""CIFAR-10/100: find a copy, read it safely, split it honestly.

Where the data comes from, first match wins: an explicit ``data_dir``, the
``KCIFAR_DATA_DIR`` environment variable, the Keras cache
(``$KERAS_HOME/datasets`` or ``~/.keras/datasets``), and last a download
through ``keras.utils.get_file`` (needs internet). A copy may be the extracted
folder (``cifar-10-batches-py/``, ``cifar-100-python/``), the official
``.tar.gz`` beside it, or the folder itself.

A local copy is checked by shape, dtype, label range and counts, never by the
official checksum (rebuilt copies differ in metadata). The pickles are
untrusted input and go through a restricted unpickler.

The validation split is carved from the training set, stratified by class and
seeded; the test set is only ever used for the final measurement.
"""

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kcifar import cli as kcli
from kcifar.errors import KcifarError
from kcifar.fileio import keras_home

IMAGE_SHAPE = (32, 32, 3)
EXACT_MASK_FILE = "cifar10_test_exact_mask.npy"


@dataclass(frozen=True)
class _Layout:
    folder: str
    archive: str
    url: str
    sha256: str
    train_files: tuple
    test_file: str
    meta_file: str


LAYOUTS = {
    "cifar10": _Layout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
    ),
    "cifar100": _Layout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
    ),
}
NUM_CLASSES = {("cifar10", "fine"): 10, ("cifar100", "fine"): 100, ("cifar100", "coarse"): 20}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# The official CIFAR-100 super-classes (coarse labels) and their five fine
# classes; both official name lists are these names in alphabetical order.
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
CIFAR100_FINE = sorted(name for group in CIFAR100_SUPERCLASSES.values() for name in group)
CIFAR100_COARSE = sorted(CIFAR100_SUPERCLASSES)


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, 32, 32, 3) and integer labels (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self):
        return len(self.y)


@dataclass(frozen=True)
class CifarData:
    name: str
    label_mode: str
    train: Split
    val: Split
    test: Split
    class_names: list
    source: str
    test_exact_mask: np.ndarray | None = None  # True = pixel-exact test image

    @property
    def num_classes(self):
        return len(self.class_names)


# ---------------------------------------------------------------- class names


def class_names_for(dataset: str, label_mode: str = "fine") -> list:
    """Official class names of a data set without reading it (``predict --classes``)."""
    names = {("cifar10", "fine"): CIFAR10_CLASSES, ("cifar100", "fine"): CIFAR100_FINE,
             ("cifar100", "coarse"): CIFAR100_COARSE}
    if (dataset, label_mode) not in names:
        raise KcifarError(f"no class names for dataset '{dataset}' with label_mode '{label_mode}'; "
                          "use cifar10, or cifar100 with fine or coarse labels")
    return list(names[(dataset, label_mode)])


def superclass_groups(class_names):
    """[(super-class, [class indices])] when the classes are CIFAR-100's fine ones, else None."""
    index = {name: i for i, name in enumerate(class_names)}
    if sorted(index) != CIFAR100_FINE:
        return None
    return [(coarse, [index[fine] for fine in fines]) for coarse, fines in CIFAR100_SUPERCLASSES.items()]


# ---------------------------------------------------------------- reading


class _CifarUnpickler(pickle.Unpickler):
    """Accepts only what CIFAR pickles hold: dicts, lists, bytes, numpy uint8 arrays."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # truncated, not a pickle, or a refused object
        raise KcifarError(
            f"{where} is not a readable CIFAR pickle ({error}); re-download or copy the data again"
        ) from None
    if not isinstance(obj, dict):
        raise KcifarError(f"{where} does not hold a CIFAR dict; is this a CIFAR copy?")
    return obj


def _get(record: dict, key: str, where: str):
    for candidate in (key.encode(), key):
        if candidate in record:
            return record[candidate]
    raise KcifarError(f"{where} has no '{key}' entry; it is not a CIFAR file of the expected layout")


def _images_and_labels(record, label_key, where):
    data = np.asarray(_get(record, "data", where))
    labels = np.asarray(_get(record, label_key, where), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise KcifarError(
            f"{where}: images are {data.dtype} {data.shape}, expected uint8 (N, 3072); not a CIFAR file"
        )
    if labels.shape != (len(data),):
        raise KcifarError(f"{where}: {len(data)} images but {labels.size} labels; the file is damaged")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _names(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


class _Reader:
    """Reads member files of one CIFAR copy, from a folder or a .tar.gz."""

    def __init__(self, path: Path, layout: _Layout):
        self.path, self.layout = path, layout
        self._tar = None
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")
            except (tarfile.TarError, OSError) as error:
                raise KcifarError(f"{path} is not a readable CIFAR archive ({error}); download it again") from None

    def read(self, member: str) -> dict:
        where = f"{self.path}/{self.layout.folder}/{member}" if self._tar else str(self.path / member)
        if self._tar is None:
            try:
                raw = (self.path / member).read_bytes()
            except FileNotFoundError:
                raise KcifarError(f"{where} is missing; the copy is incomplete, copy all files again") from None
        else:
            try:
                raw = self._tar.extractfile(f"{self.layout.folder}/{member}").read()
            except (KeyError, AttributeError):
                raise KcifarError(f"{self.path} has no {self.layout.folder}/{member}; it is not a CIFAR archive") from None
            except (tarfile.TarError, OSError, EOFError) as error:
                raise KcifarError(f"{self.path} is damaged ({error}); download it again") from None
        return _unpickle(raw, where)


def _read_copy(reader: _Reader, name: str, label_mode: str):
    layout = reader.layout
    label_key = "labels" if name == "cifar10" else f"{label_mode}_labels"
    parts = [_images_and_labels(reader.read(f), label_key, f) for f in layout.train_files]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _images_and_labels(reader.read(layout.test_file), label_key, layout.test_file)
    meta = reader.read(layout.meta_file)
    names_key = "label_names" if name == "cifar10" else f"{label_mode}_label_names"
    class_names = _names(_get(meta, names_key, layout.meta_file))
    _check_counts(name, label_mode, (x_train, y_train), (x_test, y_test), class_names, reader.path)
    return Split(x_train, y_train), Split(x_test, y_test), class_names


def _check_counts(name, label_mode, train, test, class_names, where):
    num_classes = NUM_CLASSES[(name, label_mode)]
    if len(class_names) != num_classes:
        raise KcifarError(f"{where}: {len(class_names)} class names, {name} has {num_classes}; wrong data set?")
    for split_name, (x, y) in (("train", train), ("test", test)):
        if len(y) == 0:
            raise KcifarError(f"{where}: the {split_name} split is empty; the copy is damaged")
        if y.min() < 0 or y.max() >= num_classes:
            raise KcifarError(
                f"{where}: {split_name} labels span {y.min()}..{y.max()}, expected 0..{num_classes - 1}; wrong data set?"
            )
    missing = sorted(set(range(num_classes)) - set(np.unique(train[1]).tolist()))
    if missing:
        raise KcifarError(f"{where}: no training images for classes {missing}; the copy is incomplete")


# ---------------------------------------------------------------- locating


def keras_cache_dir() -> Path:
    return keras_home() / "datasets"


def _find_in(root: Path, layout: _Layout):
    """The CIFAR copy inside ``root`` (folder or archive), or None."""
    candidates = [root if root.name == layout.folder else None, root / layout.folder,
                  root / f"{layout.folder}-target" / layout.folder, root / layout.archive,
                  root if root.name == layout.archive else None]
    for path in candidates:
        if path is None:
            continue
        if path.is_dir() and (path / layout.meta_file).exists():
            return path
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
            return path
    return None


def _download(layout: _Layout, name: str) -> Path:
    import keras

    try:
        return Path(keras.utils.get_file(layout.archive, layout.url, file_hash=layout.sha256))
    except Exception as error:
        raise KcifarError(
            f"{name} is not on this machine and could not be downloaded ({type(error).__name__}). "
            f"Put {layout.folder}/ or {layout.archive} in a folder and pass --data-dir FOLDER "
            f"or set KCIFAR_DATA_DIR=FOLDER"
        ) from None


def locate(name: str, data_dir=None) -> Path:
    """Path of the CIFAR copy to read, following the documented search order."""
    layout = _layout(name)
    explicit = [("data_dir", data_dir), ("KCIFAR_DATA_DIR", os.environ.get("KCIFAR_DATA_DIR"))]
    for label, folder in explicit:
        if folder:
            folder = Path(folder).expanduser()
            if not folder.exists():
                raise KcifarError(f"{label} {folder} does not exist; point it at the folder holding {layout.folder}/")
            found = _find_in(folder, layout)
            if found is None:
                raise KcifarError(
                    f"{label} {folder} holds neither {layout.folder}/ nor {layout.archive}; "
                    f"put the {name} data there or point {label} elsewhere"
                )
            return found
    return _find_in(keras_cache_dir(), layout) or _download(layout, name)


def _layout(name):
    if name not in LAYOUTS:
        raise KcifarError(f"unknown dataset '{name}'; choose one of: {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _exact_mask(path: Path, test_count: int):
    """The pixel-exactness mask shipped beside a rebuilt copy, if any."""
    for folder in (path.parent, path):
        file = folder / EXACT_MASK_FILE
        if file.is_file():
            mask = np.load(file, allow_pickle=False)
            if mask.dtype != bool or mask.shape != (test_count,):
                raise KcifarError(f"{file} is not a bool mask of {test_count} test images; remove or fix it")
            return mask
    return None


# ---------------------------------------------------------------- splitting


def stratified_indices(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of ``n`` items drawn per class in proportion to the class sizes."""
    if not 0 <= n <= len(y):
        raise KcifarError(f"cannot take {n} of {len(y)} images; choose a size from 0 to {len(y)}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * n / len(y)
    take = np.floor(exact).astype(int)
    remainder = n - take.sum()
    take[np.argsort(-(exact - take), kind="stable")[:remainder]] += 1
    chosen = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def take(split: Split, indices) -> Split:
    return Split(split.x[indices], split.y[indices])


def stratified_subset(split: Split, n: int, seed: int = 0) -> Split:
    return take(split, stratified_indices(split.y, n, seed))


def carve_validation(train: Split, val_size: int, seed: int):
    """(train, val): ``val_size`` images per class in proportion, held out of training."""
    val_idx = stratified_indices(train.y, val_size, seed)
    keep = np.ones(len(train), dtype=bool)
    keep[val_idx] = False
    return take(train, keep), take(train, val_idx)


def channel_stats(x: np.ndarray):
    """Per-channel mean and std of uint8 images, on the 0..255 scale (float32, shape (3,))."""
    pixels = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return pixels.mean(axis=0).astype(np.float32), pixels.std(axis=0).astype(np.float32)


# ---------------------------------------------------------------- the entry point


def load_cifar(name="cifar10", data_dir=None, label_mode="fine", val_size=5000, seed=0) -> CifarData:
    """Train / validation / test splits of CIFAR-10 or CIFAR-100.

    ``label_mode`` "fine" (100 classes) or "coarse" (20 super-classes) applies
    to CIFAR-100 only. ``val_size`` images (0 allowed) are held out of the
    training set, stratified by class with ``seed``.
    """
    layout = _layout(name)
    if (name, label_mode) not in NUM_CLASSES:
        modes = sorted(m for n, m in NUM_CLASSES if n == name)
        raise KcifarError(f"label_mode '{label_mode}' does not apply to {name}; choose one of: {', '.join(modes)}")
    path = locate(name, data_dir)
    full_train, test, class_names = _read_copy(_Reader(path, layout), name, label_mode)
    train, val = carve_validation(full_train, int(val_size), seed)
    return CifarData(name, label_mode, train=train, val=val, test=test, class_names=class_names, source=str(path),
                     test_exact_mask=_exact_mask(path, len(test)))


# ---------------------------------------------------------------- command line


def describe(data: CifarData) -> str:
    lines = [f"{data.name} ({data.label_mode} labels, {data.num_classes} classes) from {data.source}",
             f"train {len(data.train)}  val {len(data.val)}  test {len(data.test)}"]
    if data.test_exact_mask is not None:
        lines.append(f"pixel-exact test images: {int(data.test_exact_mask.sum())} of {len(data.test)}")
    lines.append(f"{'class':<16}{'train':>7}{'val':>7}{'test':>7}")
    counts = [np.bincount(s.y, minlength=data.num_classes) for s in (data.train, data.val, data.test)]
    for i, class_name in enumerate(data.class_names):
        lines.append(f"{class_name:<16}" + "".join(f"{c[i]:>7}" for c in counts))
    return "\n".join(lines)


@kcli.command
def main(argv=None):
    from kcifar import cli as kcli

    parser = kcli.parser("data", "Show where CIFAR was found and its splits.", shared=("data_dir", "seed"))
    parser.add_argument("command", choices=["info"])
    parser.add_argument("--dataset", default="cifar10", choices=sorted(LAYOUTS))
    parser.add_argument("--label-mode", default="fine", choices=["fine", "coarse"])
    parser.add_argument("--val-size", type=int, default=5000)
    args = parser.parse_args(argv)
    print(describe(load_cifar(args.dataset, data_dir=args.data_dir, label_mode=args.label_mode, val_size=args.val_size,
                              seed=args.seed or 0)))


if __name__ == "__main__":
    main()
