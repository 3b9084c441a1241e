"""Feature cache: the frozen part of a network applied once per image, kept on disk
under the Keras home (``$KERAS_HOME/kcifar/features/<hash>/``).

A folder holds one ``.npy`` file per array with its sha256 beside it (``.sha256``)
and ``key.json``, what the arrays depend on (``feature_key``); runs with the same
key share the folder. A damaged file is computed again. ``kcifar.finetune``'s fast
path trains on these arrays.
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from kcifar import fileio
from kcifar.fileio import atomic_path
from kcifar.models.backbones import weights_digest


def extract(model, x, batch_size=64, flip=False, chunk=2048, log=None):
    """``model`` applied to ``x`` in inference mode, as float16, ``chunk`` images
    at a time (horizontally flipped when ``flip``); ``log(done, total)`` after each chunk."""
    parts = []
    for start in range(0, len(x), chunk):
        batch = x[start:start + chunk]
        batch = batch[:, :, ::-1] if flip else batch
        parts.append(model.predict(batch.astype("float32"), batch_size=batch_size, verbose=0).astype("float16"))
        if log:
            log(start + len(batch), len(x))
    return np.concatenate(parts)


def cached_features(model, x, path, flip=False, log=None):
    """``extract(model, x, flip)``, stored at ``path`` (.npy, its sha256 beside it in
    ``.sha256``) and read back on the next call; a damaged file is computed again."""
    path = Path(path)
    if path.exists():
        values = read_cached(path)
        if values is not None and len(values) == len(x):
            return values
    values = extract(model, x, flip=flip, log=log)
    with atomic_path(path) as tmp:
        np.save(tmp, values)
    fileio.write_text(path.with_name(path.name + ".sha256"), fileio.file_sha256(path) + "\n")
    return values


def read_cached(path: Path):
    """The array cached at ``path``, or None (saying so on stderr) when the file is not whole
    or not the one its ``.sha256`` names. A file without a digest (killed between the two
    atomic writes, or cached by an older kcifar) is taken, and its digest written."""
    digest_file = path.with_name(path.name + ".sha256")
    try:
        values = np.load(path, mmap_mode="r")
        digest = fileio.file_sha256(path)
        if digest_file.exists() and digest_file.read_text().strip() != digest:
            raise ValueError("not the file its .sha256 names")
    except (ValueError, OSError, EOFError) as error:
        print(f"feature cache {path} is damaged ({error}); computing it again", file=sys.stderr)
        return None
    if not digest_file.exists():
        fileio.write_text(digest_file, digest + "\n")
    return values


def feature_key(recipe, backbone) -> dict:
    """What cached features depend on; another value invalidates them. The backbone
    counts by its weights' content, not by where they came from (a run retrained with
    --overwrite keeps its path)."""
    ft = recipe["finetune"]
    return {"backbone": Path(ft["backbone"]).name, "weights_sha256": weights_digest(backbone),
            "resolution": ft["resolution"], "unfreeze_blocks": ft["unfreeze_blocks"], "dataset": recipe["dataset"],
            "seed": recipe["seed"], **{k: recipe["data"][k] for k in ("label_mode", "val_size", "train_subset",
                                                                       "offline_aug")}}


def feature_dir(recipe, backbone) -> Path:
    """Where the cached features of ``recipe`` live: ``<Keras home>/kcifar/features/<hash>/``
    (``key.json`` says what they are), shared by runs with the same ``feature_key``."""
    key = json.dumps(feature_key(recipe, backbone), sort_keys=True)
    folder = fileio.cache_dir() / "features" / hashlib.sha256(key.encode()).hexdigest()[:12]
    if not (folder / "key.json").exists():
        fileio.write_text(folder / "key.json", key + "\n")
    return folder


def stage_features(folder: Path, bottom, top, val_x, train_x, flip: bool, log=None) -> tuple:
    """(cut, pooled), each {"val": ..., "train": ...}, cached in ``folder``: ``cut`` is ``bottom``'s
    output (the training images followed by their mirror images when ``flip``), ``pooled`` is
    ``top``'s output of ``cut`` before any training changes ``top`` (``cut`` itself when ``top``
    is None). ``log(done, total)`` follows the extraction from images."""
    cut = {"val": cached_features(bottom, val_x, folder / "val.npy", log=log),
           "train": cached_features(bottom, train_x, folder / "train.npy", log=log)}
    if flip:
        cut["train"] = np.concatenate([cut["train"], cached_features(bottom, train_x, folder / "train_flip.npy",
                                                                     flip=True, log=log)])
    pooled = {k: cached_features(top, v, folder / f"{k}_pooled.npy") if top is not None else v
              for k, v in cut.items()}
    return cut, pooled
