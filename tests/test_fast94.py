"""Issue 17's pieces: the airbench94 net, its whitening initialisation and frozen bias, the BN bias
learning-rate scale, the ramped EMA lookahead, the triangular schedule, alternating flips in both
engines, test-time augmentation, and the fast94 recipe end to end on tiny data."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kcifar import callbacks as kcallbacks, data as kdata, evaluate, models, optim, recipe as krecipe
from kcifar.augment import PRESETS, AugmentConfig, IdgDataset, train_dataset
from kcifar.augment.idg import image_data_generator
from kcifar.augment.tf_ops import warp, warp_transforms
from kcifar.errors import KcifarError
from kcifar.models import airbench, parts, registry
from kcifar.recipe import DEFAULTS

RECIPE = Path(__file__).resolve().parent.parent / "experiments" / "recipes" / "fast94.toml"
MUON_RECIPE = RECIPE.with_name("fast94_muon.toml")
pytestmark = pytest.mark.filterwarnings("ignore:Please import `affine_transform`:DeprecationWarning")


# ------------------------------------------------------------ the network


def test_airbench94_has_the_stated_parameters_and_identity_convs():
    model = models.build("airbench94")
    assert registry.trainable_params(model) == 1_971_352  # as its docstring says
    assert [w.name for w in model.get_layer("whiten").trainable_weights] == ["bias"]  # the kernel never trains
    assert model.get_layer("block1_bn1").scale is False and not model.get_layer("block1_conv1").use_bias
    kernel = model.get_layer("block1_conv1").kernel.numpy()  # 24 -> 64: the first 24 filters pass their channel on
    identity = np.zeros((3, 3, 24, 24), np.float32)
    identity[1, 1, np.arange(24), np.arange(24)] = 1
    np.testing.assert_array_equal(kernel[..., :24], identity)
    assert np.abs(kernel[..., 24:]).max() <= 1 / np.sqrt(3 * 3 * 24) and kernel[..., 24:].std() > 0
    assert model.get_layer("whiten").output.shape[1:] == (31, 31, 24)



def test_under_bfloat16_the_input_stage_computes_in_float32_and_the_rest_in_bfloat16():
    """normalize and whiten stay float32 (bf16 inputs gave the whitened small-eigenvalue channels
    ~5 % noise); everything after them computes in bfloat16, and the logits come out float32."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build("airbench94")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    computes = {layer.name: layer.compute_dtype for layer in model.layers}
    assert computes["normalize"] == computes["whiten"] == "float32"
    assert computes["whiten_act"] == computes["block1_conv1"] == computes["block3_act2"] == "bfloat16"
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    whitened = keras.Model(model.inputs, model.get_layer("whiten").output)(x)
    assert whitened.dtype == "float32" and model(x).dtype == "float32"


def test_gelu_approximate_is_the_tanh_gelu_and_survives_saving(tmp_path):
    exact, tanh = models.build("airbench94"), models.build("airbench94", gelu_approximate=True)
    assert exact.get_layer("block2_act1").activation is keras.activations.gelu
    values = np.linspace(-6, 6, 1001, dtype=np.float32)
    gap = np.abs(np.asarray(airbench.gelu_tanh(values)) - np.asarray(keras.activations.gelu(values)))
    assert 0 < gap.max() < 1e-3  # another function, within the docstring's bound
    tanh.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(tanh(x)))
    assert loaded.get_layer("block2_act1").activation is airbench.gelu_tanh

def test_whitening_kernel_whitens_the_patches():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(12, 12))  # strongly correlated 2x2x3 patches
    images = (rng.normal(size=(200, 8, 8, 12)) @ mixing.T)[..., :3] * 3 + 1
    kernel = airbench.whitening_kernel(images, epsilon=1e-9)
    assert kernel.shape == (2, 2, 3, 24)
    np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])
    outputs = tf.nn.conv2d(images.astype(np.float32), kernel[..., :12], 1, "VALID").numpy().reshape(-1, 12)
    covariance = outputs.T.astype(np.float64) @ outputs / (len(outputs) - 1)
    np.testing.assert_allclose(covariance, np.eye(12), atol=1e-3)


def test_init_whitening_reads_the_normalised_images():
    model = models.build("airbench94")
    images = np.random.default_rng(1).integers(0, 256, (20, 32, 32, 3)).astype(np.uint8)
    assert airbench.init_whitening(model, images) == 1
    normalised = (images - np.array(parts.CIFAR10_MEAN)) / np.array(parts.CIFAR10_STD)
    np.testing.assert_allclose(model.get_layer("whiten").kernel.numpy(), airbench.whitening_kernel(normalised),
                               rtol=1e-3, atol=1e-3)
    with pytest.raises(KcifarError, match="whitening.images"):
        airbench.init_whitening(model, images[:0])
    assert airbench.init_whitening(models.build("airbench94", whitening=False), images) == 0  # the ablation


def test_bn_bias_lr_scale_scales_the_bias_gradient_only():
    x = tf.constant(np.random.default_rng(2).normal(size=(4, 3, 3, 5)).astype(np.float32))
    plain, scaled = (parts.fuse(keras.layers.BatchNormalization(scale=False)) for _ in range(2))
    scaled.bias_lr_scale = 64.0
    results = []
    for layer in (plain, scaled):
        layer.build(x.shape)
        layer.beta.assign(np.arange(5, dtype=np.float32))
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) ** 3)
        results.append([layer(x, training=False), *tape.gradient(loss, [x, layer.beta])])
    np.testing.assert_array_equal(results[0][0], results[1][0])  # same values
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)  # same input gradient
    np.testing.assert_allclose(64 * results[0][2].numpy(), results[1][2].numpy(), rtol=1e-5)
    legacy = parts.FusedBatchNorm(scale=False, bias_lr_scale=64.0)  # the class of files saved before 2026-12-07
    assert parts.FusedBatchNorm.from_config(legacy.get_config()).bias_lr_scale == 64.0


# ------------------------------------------------------------ optimizer and schedule


def test_ramped_ema_with_overwrite_follows_the_formula():
    lr, g, momentum, ramp_steps, every = 0.1, 1.0, 0.5, 4, 2
    sgd = optim.make_optimizer({**DEFAULTS["optimizer"], "name": "sgd", "momentum": 0.0, "ema_momentum": momentum,
                                "ema_overwrite_frequency": every, "ema_ramp_power": 1.0}, lr, total_steps=ramp_steps)
    variable = keras.Variable(np.array([1.0], np.float32))
    w, average, got = 1.0, 1.0, []
    for step in range(6):  # by hand: SGD step, EMA update with the ramped momentum, overwrite
        sgd.apply([keras.ops.convert_to_tensor(np.array([g], np.float32))], [variable])
        got.append(float(variable.numpy()[0]))
        w -= lr * g
        m = 0.0 if step == 0 else momentum * min(step / ramp_steps, 1.0)
        average = m * average + (1 - m) * w
        if (step + 1) % every == 0:
            w = average
        assert got[-1] == pytest.approx(w, rel=1e-6)
    assert len(set(np.round(np.diff(got), 6))) > 1  # the averaging changed the path


def test_triangular_schedule_is_linear_up_then_down():
    spec = {**DEFAULTS["schedule"], "name": "triangular", "pct_start": 0.25, "div_factor": 5.0,
            "final_div_factor": 2.0}
    schedule = optim.make_schedule(spec, 1.0, epochs=10, steps_per_epoch=10)
    lrs = [float(keras.ops.convert_to_numpy(schedule(step))) for step in (0, 10, 25, 50, 100)]
    np.testing.assert_allclose(lrs, [0.2, 0.2 + 0.8 * 10 / 25, 1.0, 1.0 - 0.9 * 25 / 75, 0.1], rtol=1e-5)


# ------------------------------------------------------------ augmentation


def epochs_of(ds, epochs, batches_per_epoch):
    if isinstance(ds, IdgDataset):
        out = []
        for _ in range(epochs):
            out.append(np.concatenate([ds[i][0] for i in range(len(ds))]))
            ds.on_epoch_end()
        return out
    batches = [b[0] for b in ds.take(epochs * batches_per_epoch).as_numpy_iterator()]
    return [np.concatenate(batches[e * batches_per_epoch:(e + 1) * batches_per_epoch]) for e in range(epochs)]


def flipped_by_index(x, epoch_images):
    """For each training image (by index): mirrored in this epoch? (found by content)."""
    keys = {image.tobytes(): (i, False) for i, image in enumerate(x)}
    keys.update({image[:, ::-1].tobytes(): (i, True) for i, image in enumerate(x)})
    flips = dict(keys[image.astype(np.uint8).tobytes()] for image in epoch_images)
    return np.array([flips[i] for i in range(len(x))])


def test_alternate_flip_mirrors_each_image_every_other_epoch_in_both_engines():
    x = np.random.default_rng(3).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = np.zeros(64, int)
    flips = {}
    for engine in ("tf", "idg"):
        cfg = AugmentConfig(preset="flip", engine=engine, alternate_flip=True)
        whole = epochs_of(train_dataset(x, y, 10, 32, cfg, seed=5, first_epoch=0), 3, 2)
        flips[engine] = [flipped_by_index(x, images) for images in whole]
        resumed = epochs_of(train_dataset(x, y, 10, 32, cfg, seed=5, first_epoch=2), 1, 2)
        np.testing.assert_array_equal(resumed[0], whole[2])
    for e0, e1, e2 in (flips["tf"], flips["idg"]):
        np.testing.assert_array_equal(e1, ~e0)
        np.testing.assert_array_equal(e2, e0)
        assert 16 < e0.sum() < 48  # at random in the first epoch
    np.testing.assert_array_equal(flips["tf"][0], flips["idg"][0])
    with pytest.raises(KcifarError, match="first_epoch"):
        train_dataset(x, y, 10, 32, AugmentConfig(preset="flip", alternate_flip=True))
    with pytest.raises(KcifarError, match="has none"):
        AugmentConfig(preset="none", alternate_flip=True)


def test_reflect_fill_gives_image_data_generator_pixels():
    generator = image_data_generator(PRESETS["crop2_flip"])
    images = np.random.default_rng(4).integers(0, 256, (8, 32, 32, 3)).astype(np.float32)
    params = [dict(theta=0, tx=tx, ty=ty, shear=0, zx=1, zy=1, flip_horizontal=f)
              for tx, ty, f in [(-2, 2, 0), (2, -2, 1), (1, 0, 0), (0, -1, 1), (-2, -2, 1), (2, 2, 0), (0, 0, 1), (-1, 1, 0)]]
    expected = np.stack([generator.apply_transform(image, p) for image, p in zip(images, params)])
    stacked = {k: np.array([p[k] for p in params], np.float32) for k in params[0]}
    got = warp(images, warp_transforms(stacked, 32.0, 32.0), "reflect", bilinear=False).numpy()
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got[0, :2], np.zeros_like(got[0, :2]))  # the edge is not black


# ------------------------------------------------------------ test-time augmentation


def test_tta_of_a_flip_invariant_model_equals_no_tta():
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(inputs)))
    x = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(evaluate.predict_logits(model, x, tta="flip"), evaluate.predict_logits(model, x),
                               rtol=1e-5, atol=1e-4)


def test_flip_translate_averages_the_six_views_as_stated():
    inputs = keras.Input((32, 32, 3))
    linear = keras.Model(inputs, keras.layers.Dense(10, use_bias=False)(keras.layers.Flatten()(inputs)))
    x = np.random.default_rng(6).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    down_right, up_left = padded[:, :32, :32], padded[:, 2:, 2:]
    assert (down_right[:, 1:, 1:] == x[:, :-1, :-1]).all() and (up_left[:, :-1, :-1] == x[:, 1:, 1:]).all()
    mirror = lambda a: a[:, :, ::-1]  # noqa: E731
    mean_image = (x.astype(np.float64) + mirror(x)) / 4 + (down_right + mirror(down_right) + up_left + mirror(up_left)) / 8
    expected = linear.predict(mean_image.astype(np.float32), verbose=0)  # linear: logits of the mean image
    np.testing.assert_allclose(evaluate.predict_logits(linear, x, tta="flip_translate"), expected, rtol=1e-4, atol=1e-2)
    with pytest.raises(KcifarError, match="unknown tta"):
        evaluate.predict_logits(linear, x, tta="rotate")


# ------------------------------------------------------------ the recipe


def test_fast94_recipe_validates_and_bad_values_are_refused():
    recipe = krecipe.resolve(RECIPE)
    assert recipe["model"] == "airbench94" and recipe["train"]["tta"] == "flip_translate"
    for override, message in [("optimizer.ema_momentum=1.0", "ema_momentum"),
                              ("optimizer.ema_overwrite_frequency=0", "ema_overwrite_frequency"),
                              ("optimizer.name=adam", "bn_bias_lr_scale"), ("train.tta=rotate", "choose one of"),
                              ("whitening.epsilon=0.0", "whitening")]:
        with pytest.raises(KcifarError, match=message):
            krecipe.resolve(RECIPE, [override])
    assert krecipe.resolve(MUON_RECIPE)["optimizer"]["name"] == "sgd_muon"
    for override in ["optimizer.muon_momentum=1.0", "optimizer.muon_learning_rate=0.0"]:
        with pytest.raises(KcifarError, match="muon"):
            krecipe.resolve(MUON_RECIPE, [override])


def test_bn_running_statistics_keep_0_6_of_themselves_per_step_as_airbench():
    """airbench's BatchNorm(momentum=0.6) hands PyTorch 1 - 0.6: one training batch moves the
    running mean 0.4 of the way to the batch mean."""
    model = models.build("airbench94", input_shape=(32, 32, 3), num_classes=10, widths=[8, 8, 8])
    bn = model.get_layer("block1_bn1")
    x = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype(np.float32)
    upstream = keras.Model(model.input, bn.input)(x)
    bn(upstream, training=True)
    batch_mean = np.mean(keras.ops.convert_to_numpy(upstream), axis=(0, 1, 2))
    np.testing.assert_allclose(bn.moving_mean.numpy(), 0.4 * batch_mean, rtol=1e-4, atol=1e-5)


def test_tiny_fit_of_the_muon_recipe(tiny_cifar10, tmp_path):
    """fast94_muon, narrower, on 100 synthetic images: the kernels keep the norm Muon sets."""
    from kcifar.train import train

    recipe = krecipe.resolve(MUON_RECIPE, ["train.batch_size=20", "train.epochs=2", "whitening.images=50",
                                           "train.precision=float32", "model_args.widths=[8, 16, 16]"])
    result = train(recipe, tmp_path, verbose=0)
    kernel = result.model.get_layer("block2_conv2").kernel.numpy()
    assert isinstance(result.model.optimizer, optim.SGDMuon)
    assert 0.5 < np.linalg.norm(kernel) / np.sqrt(16) < 1.5  # rescaled to sqrt(filters) before each step
    assert result.metrics["epochs_run"] == 2 and np.all(np.isfinite(kernel))


def test_tiny_fit_with_every_new_option(tiny_cifar10, tmp_path):
    """The fast94 recipe, narrower, on 100 synthetic images (7 steps of 16 an epoch, EMA synced every 7)."""
    from kcifar.train import train

    recipe = krecipe.resolve(RECIPE, ["train.batch_size=16", "train.epochs=2", "whitening.images=50",
                                      "whitening.bias_epochs=1", "train.precision=float32", "model_args.widths=[8, 16, 16]"])
    seen = {}

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = self.model.get_layer("whiten").bias.numpy().copy()

    original = kcallbacks.make_callbacks
    kcallbacks.make_callbacks = lambda *args, **kwargs: original(*args, **kwargs) + [Watch()]
    try:
        result = train(recipe, tmp_path, verbose=0)
    finally:
        kcallbacks.make_callbacks = original
    model = result.model
    assert not model.get_layer("whiten").trainable
    assert not np.array_equal(seen[0], np.zeros_like(seen[0]))  # trained in the first epoch
    # then frozen: no gradient, momentum or decay (the EMA of a constant rounds by an ulp)
    np.testing.assert_allclose(seen[1], seen[0], rtol=1e-6, atol=1e-8)
    mean, std = kdata.channel_stats(result.data.train.x)  # the model normalises with its training split's
    kernel = airbench.whitening_kernel((result.data.train.x[:50] - np.asarray(mean)) / np.asarray(std))
    np.testing.assert_allclose(model.get_layer("whiten").kernel.numpy(), kernel, rtol=1e-3, atol=1e-3)  # never trained
    assert result.metrics["tta"] == "flip_translate" and result.evaluation["tta"] == "flip_translate"
    assert model.get_layer("block2_bn1").bias_lr_scale == 64.0
    assert result.metrics["epochs_run"] == 2 and result.metrics["best_val_accuracy"] is None
