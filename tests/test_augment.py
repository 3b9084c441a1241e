"""kcifar.augment: both engines keep shapes and labels, are seeded, and draw the same transforms;
the tf engine agrees with Keras' own RandomRotation, RandomZoom, MixUp and CutMix where they overlap."""


import keras
import matplotlib.image
import numpy as np
import pytest

from kcifar.augment import PRESETS, AugmentConfig, Geometry, IdgDataset, eval_dataset, train_dataset
from kcifar.augment.idg import image_data_generator, random_warp_params
from kcifar.augment.tf_ops import augment_batch, warp, warp_transforms
from kcifar.errors import KcifarError

ENGINES = ["tf", "idg"]
# Every batch below has 32 images (one XLA compilation per preset), except in the fit test.
pytestmark = pytest.mark.filterwarnings("ignore:Please import `affine_transform`:DeprecationWarning")


def one_epoch(ds):
    """All (images, labels) of one epoch as NumPy arrays, whatever the engine."""
    if isinstance(ds, IdgDataset):
        batches = [ds[i] for i in range(len(ds))]
        ds.on_epoch_end()
    else:
        batches = list(ds.as_numpy_iterator())
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def copies(image, n, cfg, seed=0, batch_size=32):
    """n augmented versions of one image."""
    images, _ = one_epoch(train_dataset(np.repeat(image[None], n, 0), np.zeros(n, int), 10, batch_size, cfg, seed))
    return images


def random_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def bar_image():
    """Black image with an off-centre bright bar: its centroid and orientation are easy to measure."""
    image = np.zeros((32, 32, 3), np.uint8)
    image[10:14, 9:23] = 255
    return image


def centroids_and_angles(images):
    """Intensity centroid (x, y) and orientation (degrees) of each image."""
    weights = images.mean(axis=-1)
    rows, cols = np.mgrid[:32, :32]
    total = weights.sum(axis=(1, 2))
    cx, cy = (weights * cols).sum(axis=(1, 2)) / total, (weights * rows).sum(axis=(1, 2)) / total
    dx, dy = cols[None] - cx[:, None, None], rows[None] - cy[:, None, None]
    mxx, myy, mxy = ((weights * d).sum(axis=(1, 2)) / total for d in (dx * dx, dy * dy, dx * dy))
    return cx, cy, np.degrees(0.5 * np.arctan2(2 * mxy, mxx - myy))


@pytest.fixture
def extra_presets(monkeypatch):
    """Single-transform presets, to test one transform at a time."""
    monkeypatch.setitem(PRESETS, "flip_only", Geometry(hflip=True))
    monkeypatch.setitem(PRESETS, "shift_px", Geometry(shift=4, fill="constant"))
    monkeypatch.setitem(PRESETS, "shift_fraction", Geometry(shift=0.1, fill="constant"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shapes_dtypes_range_and_labels_kept(engine, preset):
    x, y = random_images(64)
    images, labels = one_epoch(train_dataset(x, y, 10, 32, AugmentConfig(preset=preset, engine=engine)))
    assert images.shape == (64, 32, 32, 3) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 255
    assert labels.dtype == np.float32 and set(np.unique(labels)) == {0.0, 1.0}
    assert sorted(labels.argmax(axis=1)) == sorted(y)  # shuffled, but the same labels


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_cutmix_labels_are_the_pixel_shares(engine, mixup, cutmix):
    # Each class has its own flat grey, so an image's mean grey is its label-weighted mix.
    y = np.arange(64) % 10
    x = np.repeat((y * 25).astype(np.uint8)[:, None, None, None], 32, axis=1).repeat(32, 2).repeat(3, 3)
    cfg = AugmentConfig(engine=engine, mixup=mixup, cutmix=cutmix)
    images, labels = one_epoch(train_dataset(x, y, 10, 32, cfg))
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    assert labels.min() >= 0 and (labels > 1e-6).sum(axis=1).max() <= 2
    assert (labels.max(axis=1) < 0.999).mean() > 0.5  # most samples really mixed
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), labels @ (np.arange(10) * 25.0), atol=0.05)


@pytest.mark.parametrize("engine", ENGINES)
def test_cutout_blacks_out_at_most_one_square(engine):
    x = np.full((64, 32, 32, 3), 200, np.uint8)
    images, _ = one_epoch(train_dataset(x, np.zeros(64, int), 10, 32, AugmentConfig(engine=engine, cutout=8)))
    black = (images == 0).all(axis=-1).sum(axis=(1, 2))
    assert black.max() == 64 and black.min() >= 16  # a whole 8x8 square, or at least a quarter of it
    assert set(np.unique(images)) == {0.0, 200.0}


@pytest.mark.parametrize("engine", ENGINES)
def test_seeded_run_is_reproducible(engine):
    x, y = random_images(96)
    cfg = AugmentConfig(preset="s4", engine=engine, cutout=8, mixup=0.2)

    def two_epochs(seed):
        ds = train_dataset(x, y, 10, 32, cfg, seed=seed)
        return [one_epoch(ds) for _ in range(2)]

    first, again, other = two_epochs(0), two_epochs(0), two_epochs(1)
    for (a_images, a_labels), (b_images, b_labels) in zip(first, again):
        np.testing.assert_array_equal(a_images, b_images)
        np.testing.assert_array_equal(a_labels, b_labels)
    assert not np.array_equal(first[0][0], first[1][0])  # each epoch draws anew
    assert not np.array_equal(first[0][0], other[0][0])


@pytest.mark.parametrize("engine", ENGINES)
def test_horizontal_flip_mirrors(engine, extra_presets):
    image = random_images(1)[0][0]
    images = copies(image, 64, AugmentConfig(preset="flip_only", engine=engine))
    is_original = (images == image).all(axis=(1, 2, 3))
    is_mirrored = (images == image[:, ::-1]).all(axis=(1, 2, 3))
    assert (is_original | is_mirrored).all()
    assert 10 < is_mirrored.sum() < 54


@pytest.mark.parametrize("engine", ENGINES)
def test_pixel_shift_moves_content_by_whole_pixels_up_to_the_set_amount(engine, extra_presets):
    image = np.zeros((32, 32, 3), np.uint8)
    image[16, 16] = 255
    images = copies(image, 320, AugmentConfig(preset="shift_px", engine=engine))
    assert ((images == 255).all(axis=-1).sum(axis=(1, 2)) == 1).all()  # moved whole, not blurred
    rows, cols = np.nonzero((images == 255).all(axis=-1))[1:]
    assert set(rows - 16) == set(range(-4, 5)) and set(cols - 16) == set(range(-4, 5))


@pytest.mark.parametrize("engine", ENGINES)
def test_fractional_shift_moves_content_up_to_the_set_fraction(engine, extra_presets):
    cx0, cy0, _ = centroids_and_angles(bar_image()[None].astype(np.float32))
    cx, cy, _ = centroids_and_angles(copies(bar_image(), 320, AugmentConfig(preset="shift_fraction", engine=engine)))
    for shift in (cx - cx0, cy - cy0):
        assert np.abs(shift).max() <= 3.2 + 1e-3  # 0.1 of 32 pixels
        assert np.abs(shift).max() > 2.8 and abs(shift.mean()) < 0.4


@pytest.mark.parametrize("engine", ENGINES)
def test_s4_translates_by_torchvisions_whole_pixels(engine, monkeypatch):
    """S4's RandomAffine(0, translate=(0.1, 0.1)) draws round(U(-3.2, 3.2)) pixels: -3..3, the
    outer two less often (0.7 / 6.4 each against 1 / 6.4); nearest sampling keeps a dot whole."""
    monkeypatch.setitem(PRESETS, "s4_shift_only", Geometry(shift=0.1, fill="constant", interpolation="nearest"))
    image = np.zeros((32, 32, 3), np.uint8)
    image[16, 16] = 255
    images = copies(image, 1024, AugmentConfig(preset="s4_shift_only", engine=engine))
    assert ((images == 255).all(axis=-1).sum(axis=(1, 2)) == 1).all()  # moved whole, never blurred
    rows, cols = np.nonzero((images == 255).all(axis=-1))[1:]
    for shifts in (rows - 16, cols - 16):
        counts = np.bincount(shifts + 3, minlength=7) / len(shifts)
        assert set(shifts) == set(range(-3, 4))
        np.testing.assert_allclose(counts, [0.7 / 6.4] + [1 / 6.4] * 5 + [0.7 / 6.4], atol=0.035)


@pytest.mark.parametrize("preset", ["idg_s1", "s4", "crop_flip"])
def test_engines_draw_transforms_in_the_same_ranges(preset):
    stats = {engine: centroids_and_angles(copies(bar_image(), 384, AugmentConfig(preset=preset, engine=engine)))
             for engine in ENGINES}
    assert stats["tf"][0].std() > 1  # the bar really moves
    for tf_stat, idg_stat in zip(stats["tf"], stats["idg"]):  # x, y, orientation (none for crop_flip)
        spread = idg_stat.std() + 1e-3
        assert 0.8 < (tf_stat.std() + 1e-3) / spread < 1.25
        assert abs(np.median(tf_stat) - np.median(idg_stat)) < 0.25 * spread
        assert abs(np.ptp(tf_stat) - np.ptp(idg_stat)) < 0.5 * spread


@pytest.mark.parametrize("preset", ["idg_s1", "s4", "crop_flip"])
def test_tf_warp_gives_image_data_generator_pixels_for_the_same_parameters(preset):
    generator = image_data_generator(PRESETS[preset])
    images = random_images(16)[0].astype(np.float32)
    np.random.seed(3)
    params = [generator.get_random_transform(image.shape) for image in images]
    expected = np.stack([generator.apply_transform(image, p) for image, p in zip(images, params)])
    stacked = {key: np.array([p[key] for p in params], np.float32)
               for key in ("theta", "tx", "ty", "shear", "zx", "zy", "flip_horizontal")}
    transforms = warp_transforms(stacked, 32.0, 32.0)
    geometry = PRESETS[preset]
    got = warp(images, transforms, geometry.fill, bilinear=geometry.interpolation == "bilinear").numpy()
    np.testing.assert_allclose(got, expected, atol=0.02)
    assert geometry.nearest_sampling == (preset in ("crop_flip", "s4"))
    if geometry.nearest_sampling:  # one pixel read per output pixel: the same pixels
        np.testing.assert_array_equal(warp(images, transforms, geometry.fill, bilinear=False).numpy(), got)


def test_eval_dataset_is_ordered_one_hot_and_untouched():
    x, y = random_images(50)
    images, labels = one_epoch(eval_dataset(x, y, 10, 16))
    np.testing.assert_array_equal(images, x.astype(np.float32))
    np.testing.assert_array_equal(labels, np.eye(10, dtype=np.float32)[y])


@pytest.mark.parametrize("engine", ENGINES)
def test_fit_consumes_a_whole_epoch_without_steps_per_epoch(engine):
    x, y = random_images(100)  # the last batch holds 4
    ds = train_dataset(x, y, 10, 32, AugmentConfig(preset="crop_flip", engine=engine, mixup=0.2))
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    model.compile("sgd", keras.losses.CategoricalCrossentropy(from_logits=True), jit_compile=False)
    seen = []
    count = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(batch))
    history = model.fit(ds, epochs=2, verbose=0, callbacks=[count])
    assert len(history.history["loss"]) == 2 and seen == [0, 1, 2, 3] * 2
    if engine == "idg":
        assert ds.epoch >= 2  # fit told it each epoch ended (Keras also calls on_epoch_end once before)


def test_idg_engine_in_worker_processes_trains_and_refuses_tf_extras():
    x, y = random_images(96)
    ds = train_dataset(x, y, 10, 32, AugmentConfig(preset="s4", engine="idg"), workers=2, use_multiprocessing=True)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    model.compile("sgd", keras.losses.CategoricalCrossentropy(from_logits=True), jit_compile=False)
    assert len(model.fit(ds, epochs=2, verbose=0).history["loss"]) == 2
    with pytest.raises(KcifarError, match="forked"):
        train_dataset(x, y, 10, 32, AugmentConfig(engine="idg", mixup=0.2), workers=2, use_multiprocessing=True)


@pytest.mark.parametrize("kwargs", [dict(preset="s5"), dict(engine="torch"), dict(cutout=-1), dict(cutout=2.5),
                                    dict(mixup=-0.1)])
def test_bad_config_is_a_user_error(kwargs):
    with pytest.raises(KcifarError):
        AugmentConfig(**kwargs)


@pytest.mark.parametrize("x_shape, y, batch_size", [((4, 32, 32), [0] * 4, 2), ((4, 32, 32, 3), [0] * 3, 2),
                                                    ((4, 32, 32, 3), [0, 1, 2, 10], 2), ((4, 32, 32, 3), [0] * 4, 0)])
def test_bad_arrays_are_a_user_error(x_shape, y, batch_size):
    with pytest.raises(KcifarError):
        train_dataset(np.zeros(x_shape, np.uint8), np.array(y), 10, batch_size, AugmentConfig())


def test_preview_cli_writes_a_grid_of_originals_and_draws(tiny_cifar10, tmp_path, capsys):
    from kcifar.augment.__main__ import main

    out = tmp_path / "grid.png"
    main(["--preset", "s4", "--engine", "idg", "--mixup", "0.4", "--images", "3", "--copies", "2", "--out", str(out)])
    grid = matplotlib.image.imread(out)
    assert grid.shape[0] > 300 and grid.shape[1] > 300
    assert f"wrote {out}" in capsys.readouterr().out


def test_preview_cli_bad_option_exits_2(tiny_cifar10, tmp_path, capsys):
    from kcifar.augment.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--cutout", "-3", "--out", str(tmp_path / "grid.png")])
    assert exit_info.value.code == 2 and "cutout" in capsys.readouterr().err
    assert not (tmp_path / "grid.png").exists()


def test_equal_configs_share_one_compilation():
    from kcifar.augment.tf_ops import mix, warp_and_cutout

    def traces():
        return warp_and_cutout.experimental_get_tracing_count(), mix.experimental_get_tracing_count()

    x, y = random_images(96)
    for engine in ENGINES:  # one trace for tf.data's symbolic batches, one for the idg engine's arrays
        one_epoch(train_dataset(x, y, 10, 32, AugmentConfig(engine=engine, cutout=8, mixup=0.2)))
    before = traces()
    for engine in ENGINES:  # new but equal configs
        one_epoch(train_dataset(x, y, 10, 32, AugmentConfig(engine=engine, cutout=8, mixup=0.2)))
    assert traces() == before


@pytest.mark.parametrize("engine", ENGINES)
def test_a_resumed_epoch_draws_what_an_uninterrupted_run_drew(engine):
    x, y = random_images(64)
    cfg = AugmentConfig(preset="crop_flip", engine=engine)

    def epoch_batches(ds, epochs):
        if isinstance(ds, IdgDataset):
            return [one_epoch(ds)[0] for _ in range(epochs)]
        batches = list(ds.take(2 * epochs).as_numpy_iterator())
        return [np.concatenate([b[0] for b in batches[2 * e:2 * e + 2]]) for e in range(epochs)]

    whole = epoch_batches(train_dataset(x, y, 10, 32, cfg, seed=3, first_epoch=0), 3)
    resumed = epoch_batches(train_dataset(x, y, 10, 32, cfg, seed=3, first_epoch=2), 1)
    np.testing.assert_array_equal(resumed[0], whole[2])
    assert not np.array_equal(whole[1], whole[2])  # each epoch draws anew


def test_idg_engine_leaves_numpys_global_generator_alone():
    # Global state shared with worker threads, and left locked in forked workers, hung the bench once.
    x, y = random_images(32)
    ds = IdgDataset(x, y, 10, 32, AugmentConfig(preset="s4", engine="idg"))
    np.random.seed(5)
    expected = np.random.random()
    np.random.seed(5)
    ds[0]
    assert np.random.random() == expected


@pytest.mark.parametrize("preset", ["idg_s1", "s4", "crop_flip"])
def test_idg_engine_draws_warps_as_image_data_generator_does(preset):
    geometry, n = PRESETS[preset], 4000
    generator = image_data_generator(geometry)
    np.random.seed(0)
    theirs = [generator.get_random_transform((32, 32, 3)) for _ in range(n)]
    ours = random_warp_params(geometry, n, 32, 32, np.random.default_rng(0))
    for key in ("theta", "tx", "ty", "shear", "zx", "zy", "flip_horizontal"):
        a, b = (np.array([w[key] for w in draws], float) for draws in (theirs, ours))
        if geometry.rounds_shift and key in ("tx", "ty"):  # torchvision's whole pixels, not the generator's
            a = np.round(a)
        np.testing.assert_allclose([b.min(), b.max()], [a.min(), a.max()], atol=0.02 * np.ptp(a) + 1e-9)
        np.testing.assert_allclose([b.mean(), b.std()], [a.mean(), a.std()], atol=0.08 * a.std() + 1e-9)
        if preset == "crop_flip" and key in ("tx", "ty"):
            assert set(a) == set(b) == set(range(-4, 5))


# ------------------------------------------------------------ parity with Keras' own augmentation layers


def warp_params(n, **fixed):
    """ImageDataGenerator warp parameters for n images: identity but for ``fixed``."""
    params = dict(theta=np.zeros(n), tx=np.zeros(n), ty=np.zeros(n), shear=np.zeros(n), zx=np.ones(n),
                  zy=np.ones(n), flip_horizontal=np.zeros(n, bool))
    return {**params, **{key: np.full(n, value) for key, value in fixed.items()}}


def sampled_inside(transform, size=32):
    """Output pixels whose source point and its bilinear neighbours lie inside the image:
    there the edge rules (SciPy's hard edge vs Keras' fill) play no part."""
    rows, cols = np.mgrid[:size, :size].astype(np.float32)
    x = transform[0] * cols + transform[1] * rows + transform[2]
    y = transform[3] * cols + transform[4] * rows + transform[5]
    return (x >= 0) & (x <= size - 2) & (y >= 0) & (y <= size - 2)


@pytest.mark.parametrize("keras_layer, ours", [
    (keras.layers.RandomRotation(factor=(30 / 360, 30 / 360), fill_mode="constant"), dict(theta=30.0)),
    (keras.layers.RandomRotation(factor=(-12 / 360, -12 / 360), fill_mode="constant"), dict(theta=-12.0)),
    (keras.layers.RandomZoom(height_factor=(0.2, 0.2), width_factor=(0.2, 0.2), fill_mode="constant"),
     dict(zx=1.2, zy=1.2)),  # Keras' positive factor zooms out, as ImageDataGenerator's zoom above 1
    (keras.layers.RandomZoom(height_factor=(-0.15, -0.15), width_factor=(-0.1, -0.1), fill_mode="constant"),
     dict(zx=0.9, zy=0.85)),
])
def test_tf_warp_gives_keras_random_rotation_and_zoom_pixels(keras_layer, ours):
    """For the same angle or scale (Keras' factors fixed to one value), the tf engine's warp
    and Keras' RandomRotation / RandomZoom (bilinear) agree wherever the edge rules do not matter."""
    images = random_images(4)[0].astype(np.float32)
    expected = keras.ops.convert_to_numpy(keras_layer(images, training=True))
    transforms = warp_transforms(warp_params(4, **ours), 32.0, 32.0)
    got = warp(images, transforms, "constant").numpy()
    inside = sampled_inside(transforms.numpy()[0])
    assert inside.mean() > 0.5
    np.testing.assert_allclose(got[:, inside], expected[:, inside], atol=2e-3)


def mixing_shares(images, labels, fills):
    """Per image of a mixed batch of flat images (image i filled with fills[i], one-hot label i):
    (share of the image that comes from its partner, label weight of the partner's class)."""
    n = len(fills)
    partner_weight = labels * (1 - np.eye(n))
    partner = partner_weight.argmax(axis=1)
    own, apart = images[..., 0], np.broadcast_to((fills[partner] - fills)[:, None, None], images.shape[:3])
    blended = np.divide(own - fills[:, None, None], apart, out=np.zeros_like(own), where=apart != 0)  # 1 = partner's
    return blended.mean(axis=(1, 2)), partner_weight.max(axis=1)


@pytest.mark.parametrize("keras_layer, cfg, keras_tolerance", [
    (keras.layers.MixUp(alpha=0.4, seed=1), AugmentConfig(mixup=0.4), 1e-4),
    # Keras' CutMix weighs the labels by the box it drew, before rounding and clipping
    # to the image: up to a few points off the pasted pixels; ours by the pasted pixels.
    (keras.layers.CutMix(factor=1.0, seed=1), AugmentConfig(cutmix=1.0), 0.1),
])
def test_mixed_labels_follow_the_pixels_like_keras_mixup_and_cutmix(keras_layer, cfg, keras_tolerance):
    fills = np.arange(32, dtype=np.float32) * 7 + 10
    images = np.broadcast_to(fills[:, None, None, None], (32, 32, 32, 3)).copy()
    labels = np.eye(32, dtype=np.float32)
    theirs = keras_layer({"images": images, "labels": labels}, training=True)
    pixels, weights = mixing_shares(*(keras.ops.convert_to_numpy(theirs[k]) for k in ("images", "labels")), fills)
    assert np.abs(pixels - weights).max() < keras_tolerance and weights.max() > 0.1
    ours = augment_batch(images, labels, cfg, np.array([1, 2]))
    pixels, weights = mixing_shares(*(np.asarray(t) for t in ours), fills)
    assert np.abs(pixels - weights).max() < 1e-4 and weights.max() > 0.1
