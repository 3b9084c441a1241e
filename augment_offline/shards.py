"""The augmented set on disk: the resumable builder and the checked reader.

Layout of an output directory::

    manifest.json        what was made and how (see ``build``), with every shard's sha256
    shard-00000.npz ...  uncompressed .npz, items [start, stop) of the set:
                         x uint8 (n, 32, 32, 3), y int64 (n,), source int64 (n,)
                         (index into the training split), copy int64 (n,)
                         (0 = the original, 1.. = augmented copies), params
                         float32 (n, P) (each op's parameters as used, NaN =
                         not applied; column names in the manifest)

Item ``k`` is copy ``k // N`` of source image ``k % N`` (N training images),
counting the original as copy 0 when it is included: copies are the outer
loop, so any prefix of shards holds whole passes over the training split.
The .npz members carry a fixed time stamp, so the same arguments give
byte-identical files whatever the number of workers.
"""

import hashlib
import io
import json
import multiprocessing
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np

from augment_offline.ops import Augmenter, param_names
from kcifar.errors import KcifarError
from kcifar.fileio import write_bytes, write_json

FORMAT = "kcifar-augment-offline"
VERSION = 1
MANIFEST = "manifest.json"


def build(x, y, out_dir, *, ops, copies: int, seed: int = 0, prob: float = 0.5, originals: bool = False,
          shard_size: int = 5000, workers: int = 1, source=None, progress: bool = True) -> dict:
    """Write ``copies`` augmented copies of every training image (``x`` uint8 NHWC, ``y`` labels) to ``out_dir``.

    ``ops`` comes from ``ops.parse_ops``; ``originals`` adds the unchanged
    images as copy 0. ``source`` (dataset, label_mode, val_size, seed of the
    split) goes into the manifest beside the images' count and sha256.
    Resumes a run killed with the same arguments (finished shards are kept)
    and refuses a directory made with other ones. Returns the manifest.
    """
    _check_arguments(x, y, copies=copies, seed=seed, prob=prob, shard_size=shard_size, workers=workers)
    plan = _plan(x, y, ops=ops, copies=copies, seed=seed, prob=prob, originals=originals, shard_size=shard_size,
                 source=source or {})
    out_dir = Path(out_dir)
    manifest = _start(out_dir, plan)
    todo = [i for i, shard in enumerate(manifest["shards"]) if not _finished(out_dir, shard)]
    if progress and len(todo) < len(manifest["shards"]):
        print(f"augment_offline: resuming, {len(manifest['shards']) - len(todo)} of "
              f"{len(manifest['shards'])} shards already done", file=sys.stderr)
    sizes = [shard["stop"] - shard["start"] for shard in manifest["shards"]]
    meter = _Progress(manifest["count"], manifest["count"] - sum(sizes[i] for i in todo), progress)
    job = (x, y, Augmenter(ops, prob, seed), originals, out_dir, manifest["shards"])
    for index, digest in _run(job, todo, workers):
        manifest["shards"][index]["sha256"] = digest
        write_json(out_dir / MANIFEST, manifest)
        meter.update(sizes[index])
    manifest["complete"] = True
    write_json(out_dir / MANIFEST, manifest)
    meter.finish()
    return manifest


def _check_arguments(x, y, *, copies, seed, prob, shard_size, workers):
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(y) != len(x) or not len(x):
        raise KcifarError(f"need uint8 images (n, 32, 32, 3) and n labels, got {x.dtype} {x.shape}, {len(y)} labels")
    if copies < 1 or shard_size < 1 or workers < 1:
        raise KcifarError(f"--copies, --shard-size and --workers must be >= 1 (got {copies}, {shard_size}, {workers})")
    if not 0 <= seed < 2**63:
        raise KcifarError(f"--seed must be in [0, 2**63), got {seed}")
    if not 0.0 <= prob <= 1.0:
        raise KcifarError(f"--prob is a probability in [0, 1], got {prob}")
    if len(x) >= 2**32:
        raise KcifarError("more than 2**32 source images; split the data set")


def _plan(x, y, *, ops, copies, seed, prob, originals, shard_size, source) -> dict:
    """What decides the shards' bytes, as the manifest records it; a resumed run must match it exactly."""
    augment = {"ops": [{"name": op.name, "magnitude": m, "meaning": op.meaning} for op, m in ops],
               "prob": prob, "seed": seed, "copies": copies, "originals": originals, "shard_size": shard_size,
               "params": param_names(ops), "versions": {"numpy": np.__version__, "opencv": cv2.__version__}}
    plan = {"source": dict(source, count=len(x), sha256=source_digest(x, y)), "augment": augment}
    return json.loads(json.dumps(plan))  # as it reads back from disk


def source_digest(x, y) -> str:
    """sha256 of the training images and their labels (as int64)."""
    digest = hashlib.sha256(np.ascontiguousarray(x).data)
    digest.update(np.ascontiguousarray(y, dtype=np.int64).data)
    return digest.hexdigest()


def _start(out_dir: Path, plan: dict) -> dict:
    """The manifest to continue: the one on disk if it was made with the same plan, else a new one."""
    path = out_dir / MANIFEST
    if path.exists():
        manifest = read_manifest(out_dir, require_complete=False)
        if any(manifest.get(part) != plan[part] for part in plan):
            old = {part: manifest.get(part) or {} for part in plan}
            differs = sorted(f"{part}.{key}" for part in plan for key in plan[part].keys() | old[part].keys()
                             if plan[part].get(key) != old[part].get(key))
            raise KcifarError(f"{out_dir} already holds an augmented set made with other arguments (differs in: "
                              f"{', '.join(differs)}); re-run with the arguments in {path} or choose a new --out")
        for stale in [*out_dir.glob(".shard-*"), *out_dir.glob(".manifest.*")]:
            stale.unlink(missing_ok=True)  # temporary files of a killed run
        return manifest
    augment = plan["augment"]
    count = plan["source"]["count"] * (augment["copies"] + augment["originals"])
    size = augment["shard_size"]
    shards = [{"file": f"shard-{i:05d}.npz", "start": start, "stop": min(start + size, count), "sha256": None}
              for i, start in enumerate(range(0, count, size))]
    manifest = {"format": FORMAT, "version": VERSION, **plan, "count": count, "complete": False, "shards": shards}
    write_json(path, manifest)
    return manifest


def _finished(out_dir: Path, shard: dict) -> bool:
    path = out_dir / shard["file"]
    return bool(shard["sha256"]) and path.exists() and _sha256(path.read_bytes()) == shard["sha256"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_JOB = None  # (x, y, augmenter, originals, out_dir, shards) in each worker


def _run(job, todo, workers):
    """Yield (shard index, sha256) as shards are written, by ``workers`` forked processes."""
    global _JOB
    if workers == 1 or len(todo) <= 1:
        threads = cv2.getNumThreads()
        _set_job(job)
        try:
            yield from map(_write_shard, todo)
        finally:
            _JOB = None
            cv2.setNumThreads(threads)
        return
    with multiprocessing.get_context("fork").Pool(workers, initializer=_set_job, initargs=(job,)) as pool:
        yield from pool.imap_unordered(_write_shard, todo)


def _set_job(job):
    global _JOB
    _JOB = job
    cv2.setNumThreads(1)  # one image is too small to split; threads only add waiting


def _write_shard(index: int):
    x, y, augmenter, originals, out_dir, shards = _JOB
    shard = shards[index]
    items = np.arange(shard["start"], shard["stop"])
    sources, copies = items % len(x), items // len(x) + (0 if originals else 1)
    images = x[sources]
    params = np.full((len(items), len(augmenter.low)), np.nan, dtype=np.float32)
    made = copies > 0
    images[made], params[made] = augmenter.augment(images[made], sources[made], copies[made])
    data = npz_bytes({"x": images, "y": y[sources].astype(np.int64), "source": sources,
                      "copy": copies.astype(np.int64), "params": params})
    write_bytes(out_dir / shard["file"], data)
    return index, _sha256(data)


def npz_bytes(arrays: dict) -> bytes:
    """An uncompressed .npz that ``np.load`` reads, with no time stamp: same arrays, same bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buffer.getvalue()


class _Progress:
    """One line on stderr, rewritten in place: images done, shards, images/s of this run."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.enabled, self.made, self.start = total, done, enabled, 0, time.perf_counter()

    def update(self, n: int):
        self.done += n
        self.made += n
        if self.enabled:
            print(f"\raugment_offline: {self.done:,}/{self.total:,} images, {self.rate():,.0f} images/s",
                  end="", file=sys.stderr, flush=True)

    def rate(self) -> float:
        return self.made / max(time.perf_counter() - self.start, 1e-9)

    def finish(self):
        if self.enabled:
            print(f"\raugment_offline: {self.done:,}/{self.total:,} images, {self.made:,} made now "
                  f"at {self.rate():,.0f} images/s", file=sys.stderr, flush=True)


def read_manifest(directory, require_complete: bool = True) -> dict:
    """The manifest of an augmented set, checked for format and completeness."""
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise KcifarError(f"{path} not found; make the set with python -m augment_offline --out {directory}") from None
    except (OSError, ValueError) as error:
        raise KcifarError(f"{path} is unreadable ({error}); delete {directory} and make the set again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise KcifarError(f"{path} is not a {FORMAT} version {VERSION} manifest; make the set again with this kcifar")
    if require_complete and not manifest.get("complete"):
        raise KcifarError(f"{directory} is unfinished; re-run the same python -m augment_offline command to finish it")
    return manifest


def load_augmented(directory, train=None):
    """(x uint8 (n, 32, 32, 3), y int64 (n,), manifest) of a finished set; every shard's checksum verified.

    The items are the augmented copies (and the originals first when the set
    was made with ``--originals``: ``manifest["augment"]["originals"]``).
    ``train=(x, y)``: the training split this run uses; the set is refused
    unless it was made from it (its first ``manifest["source"]["count"]``
    images and labels, by sha256), so no validation image leaks in.
    """
    manifest = read_manifest(directory)
    if train is not None:
        check_source(manifest, *train, directory=directory)
    x = np.empty((manifest["count"], 32, 32, 3), dtype=np.uint8)
    y = np.empty(manifest["count"], dtype=np.int64)
    for shard in manifest["shards"]:
        arrays = read_shard(directory, shard)
        x[shard["start"]:shard["stop"]] = arrays["x"]
        y[shard["start"]:shard["stop"]] = arrays["y"]
    return x, y, manifest


def check_source(manifest: dict, x_train, y_train, directory="the offline-augmented set"):
    """Refuse a set made from another training split than ``x_train, y_train``."""
    source = manifest["source"]
    n = source["count"]
    if len(x_train) < n or source_digest(x_train[:n], y_train[:n]) != source["sha256"]:
        settings = {k: v for k, v in source.items() if k not in ("count", "sha256")}
        raise KcifarError(f"{directory} was made from another training split ({settings}, {n} images) than this "
                          f"run's ({len(x_train)} images); augmenting another split can leak validation images "
                          "into training: make it again with this run's data settings")


def read_shard(directory, shard: dict) -> dict:
    """The arrays of one shard, refused unless its bytes match the manifest's sha256."""
    path = Path(directory) / shard["file"]
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KcifarError(f"{path} is missing or unreadable ({error.strerror}); re-run the same "
                          "python -m augment_offline command to remake it") from None
    if _sha256(data) != shard["sha256"]:
        raise KcifarError(f"{path} is damaged (its sha256 does not match {MANIFEST}); delete it and re-run "
                          "the same python -m augment_offline command to remake it")
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    n = shard["stop"] - shard["start"]
    if arrays["x"].shape != (n, 32, 32, 3) or arrays["x"].dtype != np.uint8 or arrays["y"].shape != (n,):
        raise KcifarError(f"{path} holds {arrays['x'].dtype} {arrays['x'].shape}, not the {n} images "
                          f"{MANIFEST} lists; make the set again")
    return arrays
