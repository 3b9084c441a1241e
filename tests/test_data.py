import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import CIFAR10_NAMES, make_archive, write_cifar10, write_cifar100

from kcifar.data import channel_stats, load_cifar, stratified_indices
from kcifar.errors import KcifarError

# ------------------------------------------------------------ the real CIFAR-10


def test_real_cifar10_sizes_and_classes(real_cifar10):
    data = real_cifar10
    assert data.class_names == CIFAR10_NAMES
    assert len(data.train) + len(data.val) == 50000 and len(data.test) == 10000
    assert data.train.x.shape[1:] == (32, 32, 3) and data.train.x.dtype == np.uint8
    all_train_labels = np.concatenate([data.train.y, data.val.y])
    assert np.bincount(all_train_labels).tolist() == [5000] * 10
    assert np.bincount(data.test.y).tolist() == [1000] * 10


def test_rebuilt_copy_marks_its_pixel_exact_test_images(real_cifar10):
    if real_cifar10.test_exact_mask is None:
        pytest.skip("no cifar10_test_exact_mask.npy beside this CIFAR-10 copy (an official copy is exact throughout)")
    assert int(real_cifar10.test_exact_mask.sum()) == 1000


def test_real_cifar10_channel_means(real_cifar10):
    x = np.concatenate([real_cifar10.train.x, real_cifar10.val.x])
    mean, std = channel_stats(x)
    np.testing.assert_allclose(mean / 255, [0.4914, 0.4822, 0.4465], atol=1e-3)
    np.testing.assert_allclose(std / 255, [0.2470, 0.2435, 0.2616], atol=1e-3)


def test_real_validation_split_is_stratified_and_disjoint(real_cifar10_dir):
    data = load_cifar("cifar10", data_dir=real_cifar10_dir, val_size=5000, seed=3)
    assert np.bincount(data.val.y).tolist() == [500] * 10
    train_rows = {row.tobytes() for row in data.train.x.reshape(len(data.train), -1)}
    assert not any(row.tobytes() in train_rows for row in data.val.x.reshape(len(data.val), -1))


# ------------------------------------------------------------ splitting


def test_validation_split_is_seeded():
    y = np.arange(1000) % 10
    assert np.array_equal(stratified_indices(y, 100, seed=1), stratified_indices(y, 100, seed=1))
    assert not np.array_equal(stratified_indices(y, 100, seed=1), stratified_indices(y, 100, seed=2))
    assert np.bincount(y[stratified_indices(y, 100, seed=1)]).tolist() == [10] * 10


def test_validation_size_zero_keeps_all_training_images(tmp_path):
    write_cifar10(tmp_path)
    data = load_cifar("cifar10", data_dir=tmp_path, val_size=0)
    assert len(data.train) == 100 and len(data.val) == 0


# ------------------------------------------------------------ synthetic layouts


def test_synthetic_cifar10_images_are_decoded_channels_last(tmp_path):
    folder = write_cifar10(tmp_path)
    raw = pickle.loads((folder / "data_batch_1").read_bytes())
    data = load_cifar("cifar10", data_dir=tmp_path, val_size=0)
    first = raw[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(data.train.x[0], first)
    assert data.test_exact_mask is None


def test_cifar100_fine_and_coarse(tmp_path):
    write_cifar100(tmp_path)
    fine = load_cifar("cifar100", data_dir=tmp_path, val_size=100)
    coarse = load_cifar("cifar100", data_dir=tmp_path, label_mode="coarse", val_size=100)
    assert fine.num_classes == 100 and fine.class_names[3] == "fine3"
    assert coarse.num_classes == 20 and coarse.class_names[3] == "coarse3"
    assert len(fine.train) == 100 and len(fine.test) == 100
    assert coarse.test.y.max() == 19


def test_tar_gz_archive_is_read(tmp_path):
    folder = write_cifar100(tmp_path)
    archive = make_archive(folder)
    from_folder = load_cifar("cifar100", data_dir=tmp_path, val_size=0)
    from_archive = load_cifar("cifar100", data_dir=archive.parent, val_size=0)
    assert np.array_equal(from_folder.train.x, from_archive.train.x)
    assert from_archive.source.endswith(".tar.gz")


def test_env_var_and_explicit_folder(tmp_path, monkeypatch):
    folder = write_cifar10(tmp_path / "env")
    monkeypatch.setenv("KCIFAR_DATA_DIR", str(tmp_path / "env"))
    assert load_cifar("cifar10", val_size=0).source == str(folder)
    assert load_cifar("cifar10", data_dir=folder, val_size=0).source == str(folder)


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "data_batch_3").unlink(), "data_batch_3 is missing"),
        (lambda f: (f / "test_batch").write_bytes((f / "test_batch").read_bytes()[:5000]), "not a readable CIFAR pickle"),
        (lambda f: (f / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})), "expected uint8 (N, 3072)"),
        (lambda f: (f / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})), "labels span 0..10"),
        (lambda f: (f / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})), "2 images but 1 labels"),
    ],
)
def test_damaged_copies_give_one_clear_message(tmp_path, damage, message):
    damage(write_cifar10(tmp_path))
    with pytest.raises(KcifarError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_cifar("cifar10", data_dir=tmp_path)


def test_pickles_cannot_run_code(tmp_path):
    folder = write_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(KcifarError, match="refusing to load builtins.print"):
        load_cifar("cifar10", data_dir=tmp_path)


def test_archive_that_is_not_cifar(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not an archive at all")
    with pytest.raises(KcifarError, match="not a readable CIFAR archive"):
        load_cifar("cifar10", data_dir=tmp_path)


def test_folder_without_data_and_bad_names(tmp_path):
    with pytest.raises(KcifarError, match="holds neither cifar-10-batches-py/"):
        load_cifar("cifar10", data_dir=tmp_path)
    with pytest.raises(KcifarError, match="unknown dataset 'cifar1000'"):
        load_cifar("cifar1000", data_dir=tmp_path)
    with pytest.raises(KcifarError, match="label_mode 'coarse' does not apply to cifar10"):
        load_cifar("cifar10", data_dir=tmp_path, label_mode="coarse")
    write_cifar10(tmp_path)
    with pytest.raises(KcifarError, match="cannot take 500 of 100"):
        load_cifar("cifar10", data_dir=tmp_path, val_size=500)


def test_offline_without_a_copy_says_where_to_put_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv("KCIFAR_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    import keras

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(KcifarError, match="could not be downloaded.*KCIFAR_DATA_DIR"):
        load_cifar("cifar100")


def test_keras_cache_is_searched(tmp_path, monkeypatch):
    monkeypatch.delenv("KCIFAR_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    folder = write_cifar10(tmp_path / "datasets" / "cifar-10-batches-py-target")
    assert load_cifar("cifar10", val_size=0).source == str(folder)


def test_info_command(tiny_cifar10):
    out = subprocess.run([sys.executable, "-m", "kcifar.data", "info", "--val-size", "10"],
                         capture_output=True, text=True, check=True).stdout
    assert "train 90  val 10  test 20" in out and "truck" in out


def test_info_command_bad_folder_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kcifar.data", "info", "--data-dir", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
