"""Shared fixtures: the real CIFAR-10 when KCIFAR_DATA_DIR points at it, and
tiny synthetic copies in the official layouts for everything else."""

import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


TF_STARTUP_NOISE = re.compile(r"^(WARNING: All log messages before absl|[IWE]\d{4} \d\d:\d\d:\d\d)")


def own_stderr_lines(stderr: str) -> list:
    """stderr without the lines TensorFlow's C++ runtime prints at start-up, whatever the log level."""
    return [line for line in stderr.strip().splitlines() if not TF_STARTUP_NOISE.match(line)]


def _record(rng, n, label_keys, num_classes):
    record = {b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), b"batch_label": b"synthetic"}
    for key, k in zip(label_keys, num_classes):
        record[key] = [int(v) for v in np.arange(n) % k]
    record[b"filenames"] = [f"img_{i}.png".encode() for i in range(n)]
    return record


def _dump(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_cifar10(root, per_batch=20, n_test=20, seed=0) -> Path:
    """A tiny CIFAR-10 in the layout of the official python archive; returns its folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        _dump(folder / f"data_batch_{i}", _record(rng, per_batch, [b"labels"], [10]))
    _dump(folder / "test_batch", _record(rng, n_test, [b"labels"], [10]))
    _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch})
    return folder


def write_cifar100(root, n_train=200, n_test=100, seed=0) -> Path:
    """A tiny CIFAR-100 (fine and coarse labels) in the official layout; returns its folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    keys = [b"fine_labels", b"coarse_labels"]
    _dump(folder / "train", _record(rng, n_train, keys, [100, 20]))
    _dump(folder / "test", _record(rng, n_test, keys, [100, 20]))
    _dump(folder / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return folder


def make_archive(folder: Path) -> Path:
    """The official-style .tar.gz of a copy written above, beside a new folder."""
    archive = folder.parent / "archive" / ("cifar-10-python.tar.gz" if "10-" in folder.name else "cifar-100-python.tar.gz")
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


@pytest.fixture(autouse=True)
def float32_policy_after_each_test():
    """Training sets Keras' global dtype policy (bfloat16 on some CPUs): no test leaks it to the next."""
    yield
    import keras

    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture
def tiny_cifar10(tmp_path, monkeypatch):
    """A tiny synthetic CIFAR-10 that kcifar finds through KCIFAR_DATA_DIR."""
    write_cifar10(tmp_path)
    monkeypatch.setenv("KCIFAR_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def real_cifar10_dir():
    """The real CIFAR-10 folder; skipped with a reason when KCIFAR_DATA_DIR is unset."""
    folder = os.environ.get("KCIFAR_DATA_DIR")
    if not folder or not (Path(folder) / "cifar-10-batches-py").is_dir():
        pytest.skip("real CIFAR-10 not available: set KCIFAR_DATA_DIR to the folder holding cifar-10-batches-py/")
    return Path(folder)


@pytest.fixture(scope="session")
def real_cifar10(real_cifar10_dir):
    from kcifar.data import load_cifar

    return load_cifar("cifar10", data_dir=real_cifar10_dir)


def stop_after_epoch(epoch):
    """A Keras callback that stops the process's work the way a kill would, once the backup
    of ``epoch`` (counted from 0) is written."""
    import keras

    class StopAfterEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, done, logs=None):
            if done == epoch:
                raise KeyboardInterrupt

    return StopAfterEpoch()


def tiny_backbone(folder) -> Path:
    """A tiny fine-tune backbone: an untrained s3_tutorial saved as a run directory ``folder``."""
    from kcifar import models

    folder = Path(folder)
    folder.mkdir(parents=True)
    models.build("s3_tutorial").save(folder / "best.keras")
    return folder


def one_line_error(main, argv, capsys) -> str:
    """Run a kcifar command's ``main``; assert it fails with exit 2 and a single ``error:`` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err
    return err
