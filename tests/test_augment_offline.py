"""augment_offline: byte-identical shards whatever the workers, resume after SIGKILL,
damaged or mismatched sets refused, each op within its range, labels kept, and a
training run on an offline-augmented set."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from augment_offline import Augmenter, build, load_augmented, parse_ops, read_manifest, read_shard
from augment_offline.__main__ import main as cli_main
from augment_offline.ops import CUTOUT_FILL, DEFAULT_OPS, param_names, param_ranges
from kcifar.errors import KcifarError

ROOT = Path(__file__).resolve().parents[1]


def smooth_images(n, seed=0):
    """Synthetic photos: random 4x4 colour fields upsampled, so warps and blur act as on real images."""
    coarse = np.random.default_rng(seed).integers(30, 226, size=(n, 4, 4, 3)).astype(np.float32)
    fine = [cv2.resize(c, (32, 32), interpolation=cv2.INTER_CUBIC) for c in coarse]
    return np.clip(np.stack(fine), 0, 255).astype(np.uint8)


def make(out, x, y, **overrides):
    args = dict(ops=parse_ops(DEFAULT_OPS), copies=2, seed=3, shard_size=64, workers=1, progress=False)
    return build(x, y, out, **{**args, **overrides})


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def source():
    x = smooth_images(150)
    return x, np.arange(150) % 10


# ------------------------------------------------------------ determinism


def test_same_bytes_whatever_the_workers_and_shard_size(source, tmp_path):
    x, y = source
    make(tmp_path / "one", x, y, workers=1)
    make(tmp_path / "two", x, y, workers=2)
    make(tmp_path / "three", x, y, workers=3)
    reference = folder_bytes(tmp_path / "one")
    assert len(reference) == 1 + 5  # manifest + ceil(300 / 64) shards
    assert folder_bytes(tmp_path / "two") == reference == folder_bytes(tmp_path / "three")
    # each image depends only on (seed, source, copy): other shard sizes hold the same images
    make(tmp_path / "other_shards", x, y, shard_size=41)
    assert np.array_equal(load_augmented(tmp_path / "other_shards")[0], load_augmented(tmp_path / "one")[0])
    make(tmp_path / "other_seed", x, y, seed=4)
    assert not np.array_equal(load_augmented(tmp_path / "other_seed")[0], load_augmented(tmp_path / "one")[0])


KILLABLE = textwrap.dedent("""
    import sys
    import numpy as np
    from augment_offline import build, parse_ops
    x = np.load(sys.argv[2])
    build(x, np.arange(len(x)) % 10, sys.argv[1], ops=parse_ops("rotate,hsv,blur,noise"), copies=3, seed=1,
          prob=1.0, shard_size=100, workers=2, progress=False)
""")


def test_resume_after_sigkill_gives_the_same_bytes(tmp_path):
    x = smooth_images(2000, seed=1)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, str(out), str(tmp_path / "x.npy")], cwd=ROOT,
                               start_new_session=True, stderr=subprocess.PIPE)
    done = _wait_for_some_shards(out / "manifest.json", process)
    os.killpg(process.pid, signal.SIGKILL)  # the builder and its worker processes
    process.wait()
    manifest = read_manifest(out, require_complete=False)
    assert 0 < done < 60 and not manifest["complete"], "the run finished before it could be killed"

    build(x, np.arange(len(x)) % 10, out, ops=parse_ops("rotate,hsv,blur,noise"), copies=3, seed=1,
          prob=1.0, shard_size=100, workers=1, progress=False)
    build(x, np.arange(len(x)) % 10, tmp_path / "whole", ops=parse_ops("rotate,hsv,blur,noise"), copies=3,
          seed=1, prob=1.0, shard_size=100, workers=1, progress=False)
    assert folder_bytes(out) == folder_bytes(tmp_path / "whole")  # no temporary file left either


def _wait_for_some_shards(manifest_path, process, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        try:
            done = sum(bool(s["sha256"]) for s in json.loads(manifest_path.read_text())["shards"])
        except (OSError, ValueError):
            done = 0
        if done >= 3:
            return done
        time.sleep(0.005)
    raise AssertionError("no shard finished in time")


def test_resume_skips_finished_shards_and_remakes_damaged_ones(source, tmp_path, capsys):
    x, y = source
    make(tmp_path / "set", x, y)
    reference = folder_bytes(tmp_path / "set")
    shard = tmp_path / "set" / "shard-00002.npz"
    shard.write_bytes(shard.read_bytes()[:-10])
    make(tmp_path / "set", x, y, progress=True)
    assert "resuming, 4 of 5 shards already done" in capsys.readouterr().err
    assert folder_bytes(tmp_path / "set") == reference


# ------------------------------------------------------------ refusing bad sets


def test_damaged_missing_unfinished_or_mismatched_sets_are_refused(source, tmp_path):
    x, y = source
    out = tmp_path / "set"
    make(out, x, y)
    load_augmented(out, train=(x, y))  # intact: accepted

    shard = out / "shard-00001.npz"
    intact = shard.read_bytes()
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 1  # one pixel bit
    shard.write_bytes(bytes(damaged))
    with pytest.raises(KcifarError, match="shard-00001.npz is damaged"):
        load_augmented(out)
    shard.unlink()
    with pytest.raises(KcifarError, match="shard-00001.npz is missing"):
        load_augmented(out)
    shard.write_bytes(intact)

    other = x.copy()
    other[0, 0, 0, 0] ^= 1
    with pytest.raises(KcifarError, match="another training split"):
        load_augmented(out, train=(other, y))
    with pytest.raises(KcifarError, match="another training split"):
        load_augmented(out, train=(x, (y + 1) % 10))  # other labels (e.g. coarse instead of fine)
    with pytest.raises(KcifarError, match=r"other arguments \(differs in: augment.ops, augment.params\)"):
        make(out, x, y, ops=parse_ops("flip,rotate:10"))
    with pytest.raises(KcifarError, match=r"differs in: augment.seed"):
        make(out, x, y, seed=9)

    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(KcifarError, match="unfinished; re-run the same"):
        load_augmented(out)
    with pytest.raises(KcifarError, match="manifest.json not found"):
        load_augmented(tmp_path / "nothing")


@pytest.mark.parametrize("ops, message", [
    ("flip,twist", "unknown op 'twist'"),
    ("rotate:200", r"rotate:200 is out of range; rotate takes m in \[0, 180\]"),
    ("cutout:4.5", "cutout:4.5 is out of range"),
    ("flip:1", "flip takes no magnitude"),
    ("blur,blur", "listed twice"),
    ("", "--ops is empty"),
])
def test_bad_ops_are_refused(ops, message):
    with pytest.raises(KcifarError, match=message):
        parse_ops(ops)


def test_cli_bad_input_is_one_line_and_exit_2(tiny_cifar10, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--out", str(tmp_path / "set"), "--val-size", "20", "--ops", "flip,rotate:500", "--quiet"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: rotate:500 is out of range; rotate takes m in [0, 180]: angle ~ U[-m, m] degrees (counter-clockwise)"]
    assert not (tmp_path / "set").exists()


# ------------------------------------------------------------ the ops


def hue_steps(image):
    return cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(int)


def check_flip(x, out, p, m):
    assert np.array_equal(out, x[:, :, ::-1])


def resample(image, matrix):
    """The warp ``dst = matrix @ src`` by plain bilinear interpolation, and where its source lies inside."""
    inverse = cv2.invertAffineTransform(matrix)
    rows, cols = np.mgrid[0:32, 0:32].astype(np.float64)
    sx = inverse[0, 0] * cols + inverse[0, 1] * rows + inverse[0, 2]
    sy = inverse[1, 0] * cols + inverse[1, 1] * rows + inverse[1, 2]
    inside = (sx >= 0) & (sx <= 31) & (sy >= 0) & (sy <= 31)
    x0, y0 = np.clip(np.floor(sx), 0, 30).astype(int), np.clip(np.floor(sy), 0, 30).astype(int)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
    im = image.astype(np.float64)
    value = ((im[y0, x0] * (1 - fx) + im[y0, x0 + 1] * fx) * (1 - fy)
             + (im[y0 + 1, x0] * (1 - fx) + im[y0 + 1, x0 + 1] * fx) * fy)
    return value, inside


def check_warps(x, out, matrices):
    for a, b, matrix in zip(x, out, matrices):
        value, inside = resample(a, matrix)
        assert inside.mean() > 0.5 and np.abs(b[inside] - value[inside]).max() <= 1.5


def check_rotate(x, out, p, m):  # counter-clockwise by the angle, about the centre
    check_warps(x, out, [cv2.getRotationMatrix2D((15.5, 15.5), angle, 1.0) for (angle,) in p])


def check_scale(x, out, p, m):
    check_warps(x, out, [cv2.getRotationMatrix2D((15.5, 15.5), 0.0, zoom) for (zoom,) in p])


def check_shift(x, out, p, m):  # the content moves by (dx, dy) x 32 px
    check_warps(x, out, [np.array([[1.0, 0, dx * 32], [0, 1, dy * 32]]) for dx, dy in p])


def check_brightness(x, out, p, m):
    diff = out.astype(int) - x
    for d, image, (add,) in zip(diff, x, p):
        assert np.all(d[(image > 40) & (image < 215)] == np.rint(np.float32(add)))


def check_contrast(x, out, p, m):
    for a, b, (c,) in zip(x, out, p):
        mean = a.mean()
        assert np.abs(b - np.clip(mean + c * (a.astype(float) - mean), 0, 255)).max() <= 1.0


def check_hsv(x, out, p, m):
    for a, b, (hue_deg, saturation) in zip(x, out, p):
        ha, hb = hue_steps(a), hue_steps(b)
        vivid = (ha[..., 1] > 80) & (ha[..., 2] > 80)
        turned = (hb[..., 0] - ha[..., 0] - np.rint(hue_deg / 2)) % 180
        assert np.median(np.minimum(turned, 180 - turned)[vivid]) <= 2
        assert abs(np.median(hb[..., 1][vivid] / ha[..., 1][vivid]) - saturation) < 0.1


def check_blur(x, out, p, m):  # smoother: less difference between neighbours
    assert np.all(np.abs(np.diff(out.astype(int), axis=2)).sum(axis=(1, 2, 3))
                  < np.abs(np.diff(x.astype(int), axis=2)).sum(axis=(1, 2, 3)))


def check_noise(x, out, p, m):
    for a, b, (sigma, _) in zip(x, out, p):
        if sigma > 2:
            assert abs(np.std(b.astype(float) - a) / sigma - 1) < 0.15


def check_cutout(x, out, p, m):
    for a, b, (cx, cy) in zip(x, out, p):
        changed = np.any(a != b, axis=-1)
        assert changed.sum() <= m * m and np.all(b[changed] == CUTOUT_FILL)
        assert b[int(cy), int(cx)].tolist() == [CUTOUT_FILL] * 3  # the square covers its centre


@pytest.mark.parametrize("name", DEFAULT_OPS.split(","))
def test_each_op_changes_images_within_its_range(name):
    x = smooth_images(64, seed=2)
    ops = parse_ops(name)
    out, record = Augmenter(ops, prob=1.0, seed=0).augment(x, np.arange(64), np.ones(64, dtype=np.int64))
    assert out.shape == x.shape and out.dtype == np.uint8
    low, high = param_ranges(ops).T
    assert record.shape == (64, len(param_names(ops))) and np.all((record >= low) & (record <= high))
    assert np.mean(np.any(out != x, axis=(1, 2, 3))) >= 0.9
    globals()[f"check_{name}"](x, out, record.astype(np.float64), ops[0][1])


def test_prob_decides_how_often_each_op_applies():
    x = smooth_images(400, seed=3)
    ops = parse_ops(DEFAULT_OPS)
    out, record = Augmenter(ops, prob=0.3, seed=0).augment(x, np.arange(400), np.ones(400, dtype=np.int64))
    applied = ~np.isnan(record[:, [param_names(ops).index(f"{op.name}.{op.params[0]}") for op, _ in ops]])
    assert np.all(np.abs(applied.mean(axis=0) - 0.3) < 0.1)
    untouched = ~applied.any(axis=1)
    assert np.array_equal(out[untouched], x[untouched])  # no op drawn: the image is kept as it is


# ------------------------------------------------------------ labels and training


def test_labels_and_sources_are_kept(source, tmp_path):
    x, y = source
    make(tmp_path / "set", x, y, copies=3, originals=True)
    xs, ys, manifest = load_augmented(tmp_path / "set", train=(x, y))
    assert manifest["count"] == len(xs) == len(ys) == 4 * len(x) and ys.dtype == np.int64
    arrays = [read_shard(tmp_path / "set", shard) for shard in manifest["shards"]]
    sources = np.concatenate([a["source"] for a in arrays])
    copies = np.concatenate([a["copy"] for a in arrays])
    assert np.array_equal(ys, y[sources])
    assert np.array_equal(np.bincount(sources), np.full(len(x), 4))
    assert np.array_equal(xs[copies == 0], x)  # the originals, unchanged, first
    assert np.array_equal(np.sort(copies), np.repeat([0, 1, 2, 3], len(x)))


def test_cli_then_training_on_the_offline_augmented_set(tiny_cifar10, tmp_path):
    from kcifar import recipe as krecipe
    from kcifar.data import load_cifar
    from kcifar.train import train

    out = tmp_path / "aug"
    cli_main(["--out", str(out), "--val-size", "20", "--copies", "2", "--workers", "2", "--shard-size", "50",
              "--preview", str(tmp_path / "grid.png"), "--quiet"])
    train_split = load_cifar("cifar10", val_size=20).train
    x, y, manifest = load_augmented(out, train=(train_split.x, train_split.y))
    assert len(x) == 2 * len(train_split) == 160 and manifest["source"]["val_size"] == 20
    grid = cv2.imread(str(tmp_path / "grid.png"))
    assert grid.shape == (8 * 34 * 4, 3 * 34 * 4, 3)  # 8 rows: the original and 2 copies, framed, 4x

    recipe = krecipe.resolve(None, ["data.val_size=20", "train.epochs=1", "train.batch_size=32",
                                    f"data.offline_aug={out}", "name=offline"])
    metrics = train(recipe, tmp_path / "runs", verbose=0).metrics
    assert metrics["finished"] and metrics["epochs_run"] == 1
    assert metrics["train_images"] == 3 * len(train_split)  # the originals and both copies
    manifest_bytes = (out / "manifest.json").read_bytes()
    assert metrics["offline_aug"]["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()

    other_split = krecipe.resolve(None, ["data.val_size=30", "train.epochs=1", f"data.offline_aug={out}", "name=o"])
    with pytest.raises(KcifarError, match="another training split|differ|made from"):
        train(other_split, tmp_path / "runs", verbose=0)

    shard = out / manifest["shards"][0]["file"]
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    shard.write_bytes(bytes(damaged))
    broken = krecipe.resolve(None, ["data.val_size=20", "train.epochs=1", f"data.offline_aug={out}", "name=broken"])
    with pytest.raises(KcifarError, match="is damaged"):
        train(broken, tmp_path / "runs", verbose=0)
