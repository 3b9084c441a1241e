"""The model zoo: every name builds, exact parameter counts, the documented layer
sequences, .keras round trips, FLOPs, and clear errors for bad names and options."""

import functools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from kcifar import models
from kcifar.errors import KcifarError
from kcifar.models import parts, registry
from kcifar.models.__main__ import main

BATCH = np.random.default_rng(0).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)




@functools.cache
def built(name, num_classes=10):
    """Each zoo model is built once per class count and shared by the tests that only read it."""
    return models.build(name, num_classes)


# ------------------------------------------------------------ every model


@pytest.mark.parametrize("name", models.names())
def test_every_model_maps_uint8_images_to_logits(name):
    for num_classes in (10, 100):
        model = built(name, num_classes)
        logits = np.asarray(model(BATCH, training=False))
        assert logits.shape == (2, num_classes) and logits.dtype == np.float32
        assert np.isfinite(logits).all()
        assert model.layers[1].name == "normalize"
        assert model.layers[-1].name == "predictions"
        # logits, no softmax (S2's notebook heads have no Dense: the pooled channels are the logits)
        assert getattr(model.layers[-1], "activation", keras.activations.linear) is keras.activations.linear


def test_registry_holds_every_documented_name():
    documented = {"s0_base", *(f"s0_model{i}" for i in range(1, 6)),
                  *(f"s1_step{i:02d}" for i in (1, 2, 3, 4, 5, 7, 8, 9, 10, 12)),
                  "s2_fc", "s2_gap", "s2_gap_dropout", "s3_tutorial",
                  "vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet56"}
    assert documented <= set(models.names())
    for name in documented:
        assert models.entry(name).source and models.entry(name).description


@pytest.mark.parametrize("name, params", [
    ("s3_tutorial", 62_006), ("vgg11", 9_231_114), ("vgg13", 9_416_010),
    ("vgg16", 14_728_266), ("vgg19", 20_040_522), ("resnet20", 273_066), ("resnet56", 857_706),
    # S2's notebook: its seven nn.Conv2d (3x3, with bias) and, for model1, nn.Linear(1024, 1024), (1024, 10)
    ("s2_notebook_fc", 2_190_122), ("s2_notebook_gap", 1_130_272), ("s2_notebook_dropout", 1_130_272),
])
def test_exact_trainable_parameter_counts(name, params):
    assert registry.trainable_params(built(name)) == params


def test_s3_forward_flops_from_layer_shapes():
    macs = (28 * 28 * 6 * 5 * 5 * 3 + 10 * 10 * 16 * 5 * 5 * 6   # two valid 5x5 convs
            + 400 * 120 + 120 * 84 + 84 * 10)                     # three dense layers
    assert registry.forward_flops(built("s3_tutorial")) == 2 * macs


# ------------------------------------------------------------ documented layer sequences

LAYER_TYPES = {"Conv": "Conv2D", "BN": "BatchNormalization", "ReLU": "Activation", "Act": "Activation",
               "Pool": "MaxPooling2D", "Drop": "Dropout", "Flatten": "Flatten", "GAP": "GlobalAveragePooling2D",
               "FC": "Dense", "Dense": "Dense", "Add": "Add"}


def expand(spec):
    """'(Conv-BN-ReLU-Pool) x2, FC' -> the Keras layer class names in order."""
    spec = re.sub(r"\(([^()]*)\) x(\d+)", lambda m: ", ".join([m.group(1)] * int(m.group(2))), spec)
    return [LAYER_TYPES[token] for item in spec.split(", ") for token in item.split("-")]


def layer_types(model, skip="shortcut"):
    """Class names of the layers after ``normalize``, leaving out shortcut branches."""
    return [type(layer).__name__ for layer in model.layers[2:] if skip not in layer.name]


# S0's depth table: conv channels (P = block ends with a max-pool) and the classifier.
S0_TABLE = {
    "s0_base": ("16P, 32P", "FC-ReLU, FC-ReLU, FC"),
    "s0_model1": ("16P, 32P, 32P", "FC-ReLU, FC-ReLU, FC"),
    "s0_model2": ("16P, 32P, 64P", "FC-ReLU, FC-ReLU, FC"),
    "s0_model3": ("32, 32P, 64, 64P, 128, 128P", "(FC-BN-ReLU) x3, FC"),
    "s0_model4": ("32, 32P, 64, 64P, 128, 128P", "(FC-ReLU) x3, FC"),
    "s0_model5": ("32, 32P, 64, 64, 64P, 128, 128, 128P", "(FC-BN-ReLU) x3, FC"),
}


@pytest.mark.parametrize("name", S0_TABLE)
def test_s0_models_follow_the_depth_table(name):
    convs, classifier = S0_TABLE[name]
    blocks = ", ".join("Conv-BN-ReLU" + ("-Pool" if c.endswith("P") else "") for c in convs.split(", "))
    model = built(name, 100)
    assert layer_types(model) == expand(f"{blocks}, Flatten, {classifier}")
    widths = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert widths == [int(c.rstrip("P")) for c in convs.split(", ")]
    assert all(p.pool_size == (2, 2) and p.strides == (2, 2)
               for p in model.layers if isinstance(p, keras.layers.MaxPooling2D))


S1_STEPS = {
    "s1_step01": "(Conv-ReLU-Pool) x2, Conv-ReLU, Flatten, Dense-ReLU, Dense",
    "s1_step02": "(Conv-BN-ReLU-Pool) x2, Conv-BN-ReLU, Flatten, Dense-ReLU, Dense",
    "s1_step03": "(Conv-BN-ReLU-Pool) x3, Conv-BN-ReLU, Flatten, Dense-ReLU, Dense",
    "s1_step04": "(Conv-BN-ReLU-Pool) x4, Flatten, Dense-ReLU, Dense",
    "s1_step05": "(Conv-BN-ReLU-Drop-Pool) x4, Flatten, Dense-ReLU-Drop, Dense",
    "s1_step07": "(Conv-BN-ReLU-Conv-BN-ReLU-Drop-Pool) x4, Flatten, Dense-ReLU-Drop, Dense",
    "s1_step08": "(Conv-BN-ReLU-Conv-BN-ReLU-Pool-Drop) x4, Flatten, Dense-ReLU-Drop, Dense",
    "s1_step09": "(Conv-BN-ReLU-Conv-BN-ReLU-Pool-Drop) x3, Flatten, Dense-ReLU-Drop, Dense",
    "s1_step10": "(Conv-BN-ReLU-Conv-BN-ReLU-Pool-Drop) x3, Flatten-Drop, Dense",
    "s1_step12": "(Conv-BN-ReLU-Conv-BN-Add-ReLU-Pool-Drop) x3, Flatten-Drop, Dense",
}


@pytest.mark.parametrize("name", S1_STEPS)
def test_s1_steps_follow_the_progression(name):
    model = built(name, 100)
    assert layer_types(model) == expand(S1_STEPS[name])
    pools = [p for p in model.layers if isinstance(p, keras.layers.MaxPooling2D)]
    assert {p.pool_size for p in pools} == ({(2, 2)} if name == "s1_step01" else {(3, 3)})  # AlexNet's from step 2


def test_s1_step12_shortcuts_feed_every_add():
    model = built("s1_step12")
    for block in (1, 2, 3):
        sources = {t._keras_history.operation.name for t in model.get_layer(f"block{block}_add").input}
        assert sources == {f"block{block}_bn2", f"block{block}_shortcut_bn"}


def test_overrides_change_the_architecture():
    model = models.build("s0_base", 100, blocks=[6, 16], kernel_size=5)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [(c.filters, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert layer_types(models.build("vgg11", dropout=0.5))[-2:] == ["Dropout", "Dense"]
    assert len([layer for layer in models.build("resnet20", depth=32).layers if "_add" in layer.name]) == 15


# ------------------------------------------------------------ normalisation and saving


def normalized(model, images):
    return np.asarray(keras.Model(model.input, model.get_layer("normalize").output)(images))


def test_normalization_modes():
    black_and_white = np.stack([np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8)])
    expected = {
        "minus1_1": [[-1.0] * 3, [1.0] * 3],
        "unit": [[0.0] * 3, [1.0] * 3],
        "none": [[0.0] * 3, [255.0] * 3],
        "meanstd": (np.array([[0.0], [255.0]]) - [125.307, 122.950, 113.865]) / [62.993, 62.089, 66.705],
    }
    for mode, pixels in expected.items():
        out = normalized(models.build("s3_tutorial", normalization=mode), black_and_white)
        np.testing.assert_allclose(out[:, 5, 7], pixels, rtol=1e-5, atol=1e-6)


def test_saved_and_reloaded_model_gives_identical_logits(tmp_path):
    model = models.build("s3_tutorial", 100, mean=(100, 110, 120), std=(50, 60, 70))
    path = tmp_path / "s3.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(model(BATCH)), np.asarray(reloaded(BATCH)))
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in model.layers]


def test_kcifars_own_layers_are_registered_for_loading():
    """Saved models name these by their registered names (a misplaced decorator once registered a
    function instead of FusedBatchNorm, and no airbench94 or resnet20 could be loaded)."""
    from kcifar.models import airbench

    for obj in (parts.FusedBatchNorm, parts.SurplusClassLogits, airbench.PatchWhitening, airbench.PartialDirac,
                airbench.gelu_tanh):
        assert keras.saving.get_registered_object(f"kcifar>{obj.__name__}") is obj


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_equals_keras_batch_norm(policy):
    """Same outputs, input and weight gradients, and moving statistics as Keras' own layer,
    in training and in inference, in float32 and under mixed bfloat16."""
    x = keras.ops.convert_to_tensor(np.random.default_rng(1).normal(3, 2, size=(8, 5, 5, 4)).astype("float32"))
    keras_bn, fused_bn = (keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, dtype=policy) for _ in range(2))
    parts.fuse(fused_bn)
    weights = np.random.default_rng(2).normal(size=(8, 5, 5, 4)).astype("float32")  # a loss with rich gradients

    def forward_and_grads(layer, training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=training)
            loss = tf.reduce_sum(tf.cast(y, "float32") * weights)
        return (y, *tape.gradient(loss, [x, *layer.trainable_weights]))

    tolerance = 1e-4 if policy == "float32" else 5e-2
    for training in (True, True, False):  # twice: the moving statistics move
        expected, got = forward_and_grads(keras_bn, training), forward_and_grads(fused_bn, training)
        assert got[0].dtype == expected[0].dtype
        for a, b in zip(expected, got):
            np.testing.assert_allclose(np.asarray(a, "float32"), np.asarray(b, "float32"), atol=tolerance)
        for a, b in zip(keras_bn.non_trainable_weights, fused_bn.non_trainable_weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6)


def _conv_net(kinds):
    """A functional net of the given (name, Conv2D kwargs) layers on 6x4 images with 5 channels."""
    inputs = keras.Input((6, 4, 5))
    x = inputs
    for name, kwargs in kinds:
        x = keras.layers.Conv2D(name=name, **kwargs)(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_matmul_kernel_gradients_equal_tensorflows_and_change_nothing_saved(tmp_path):
    """Only eligible 3x3 convs are routed; outputs, input and weight gradients equal TensorFlow's
    (non-square input, bias, 'same' padding at the edges); the saved model is plain Keras."""
    kinds = [("routed1", dict(filters=7, kernel_size=3, padding="same")),
             ("valid", dict(filters=6, kernel_size=3, padding="valid")),  # 4x2
             ("routed2", dict(filters=4, kernel_size=3, padding="same", use_bias=False)),
             ("strided", dict(filters=4, kernel_size=3, strides=2, padding="same")),
             ("dilated", dict(filters=4, kernel_size=3, padding="same", dilation_rate=2)),
             ("pointwise", dict(filters=3, kernel_size=1))]
    native, routed = _conv_net(kinds), _conv_net(kinds)
    routed.set_weights(native.get_weights())
    assert parts.use_matmul_kernel_grads(routed, max_positions=24) == 2
    assert [parts.input_size(routed.get_layer(n)) for n, _ in kinds] == [(24, 5), None, (8, 6), None, None, None]
    x = tf.constant(np.random.default_rng(3).normal(size=(3, 6, 4, 5)).astype("float32"))
    weights = tf.constant(np.random.default_rng(4).normal(size=(3, 3)).astype("float32"))

    def forward_and_grads(model):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(model(x) * weights)
        return (loss, *tape.gradient(loss, [x, *model.trainable_weights]))

    for a, b in zip(forward_and_grads(native), forward_and_grads(routed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert parts.use_matmul_kernel_grads(_conv_net(kinds), max_positions=23) == 1  # 6x4 inputs are 24 pixels
    assert parts.use_matmul_kernel_grads(_conv_net(kinds), max_positions=24, min_channels=6) == 1  # 5 and 6 in
    routed.save(tmp_path / "routed.keras")
    reloaded = keras.models.load_model(tmp_path / "routed.keras")
    assert {type(layer) for layer in reloaded.layers[1:-1]} == {keras.layers.Conv2D}
    assert all("convolution_op" not in vars(layer) for layer in reloaded.layers)


def test_matmul_kernel_gradients_in_bfloat16_stay_within_bfloat16_rounding_of_the_float32_gradient():
    """Under mixed bfloat16 (where conv_grad = "auto" routes), a 256-channel 8x8 conv's kernel gradient
    by matmuls is the float32 gradient to bfloat16's resolution (rms error under 2^-7 of the rms), and no
    further from it than TensorFlow's own (on an AVX2-only CPU, whose bfloat16 is emulated, TensorFlow's
    errs more than the matmuls, so the two do not agree to bfloat16's resolution there)."""
    x = tf.constant(np.random.default_rng(5).normal(size=(32, 8, 8, 256)).astype("float32"))
    weights = tf.constant(np.random.default_rng(6).normal(size=(32, 8, 8, 256)).astype("float32"))

    def kernel_gradient(policy, route):
        keras.mixed_precision.set_global_policy(policy)  # the autouse fixture restores float32
        keras.utils.set_random_seed(1)
        inputs = keras.Input((8, 8, 256))
        model = keras.Model(inputs, keras.layers.Conv2D(256, 3, padding="same", use_bias=False)(inputs))
        if route:
            assert parts.use_matmul_kernel_grads(model, max_positions=64, min_channels=256) == 1
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(model(x), tf.float32) * weights)
        return np.asarray(tape.gradient(loss, model.trainable_weights[0]), np.float64)

    truth = kernel_gradient("float32", route=False)

    def rms_error(gradient):
        return np.sqrt(np.mean((gradient - truth) ** 2) / np.mean(truth ** 2))

    routed, native = (rms_error(kernel_gradient("mixed_bfloat16", route)) for route in (True, False))
    assert routed < 2 ** -7 and routed <= native * 1.1
    assert np.corrcoef(kernel_gradient("mixed_bfloat16", True).ravel(), truth.ravel())[0, 1] > 0.9999  # not transposed


# ------------------------------------------------------------ errors and the registry


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(KcifarError, match=r"unknown model 'vgg17'; valid models: .*resnet20.*vgg16"):
        models.build("vgg17")


def test_unknown_override_lists_the_valid_options():
    with pytest.raises(KcifarError, match=r"'vgg16' has no option width; valid options: config, dropout"):
        models.build("vgg16", width=2)
    with pytest.raises(KcifarError, match=r"no option depht; valid options: depth"):
        models.build("resnet20", depht=32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pool="avg"), r"pool='avg' is not valid; use one of 'max2', 'overlap3'"),
    (dict(head="mlp"), r"head='mlp' is not valid"),
    (dict(dropout_position="middle"), r"dropout_position='middle' is not valid"),
    (dict(normalization="zscore"), r"normalization='zscore' is not valid"),
    (dict(normalization="unit", mean=(1, 2, 3)), r"mean/std only apply to normalization='meanstd'"),
    (dict(std=(1, 0, 1)), r"one value per channel .* std > 0"),
    (dict(num_classes=1), r"num_classes must be an integer >= 2"),
    (dict(dropout=(0.1, 0.2)), r"dropout needs one rate, or one per block \(3\)"),
    (dict(head="gap_logits", dense_units=(8,)), r"head='gap_logits' has no Dense layer"),
    (dict(head="gap_logits", dense_units=(), num_classes=100), r"needs at least one channel per class: 64 channels, 100 classes"),
])
def test_bad_option_values_are_clear_errors(kwargs, message):
    with pytest.raises(KcifarError, match=message):
        models.build("s1_step01", **kwargs)


def test_numpy_integer_class_counts_are_accepted():
    assert models.build("s3_tutorial", np.int64(100)).output.shape == (None, 100)


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(KcifarError, match=r"depth=21 is not 6n\+2"):
        models.build("resnet20", depth=21)


def test_a_module_registers_a_builder_in_one_decorator(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @models.register("tiny_gap", source="test", description="GAP then Dense")
    def tiny_gap(x, num_classes, *, hidden=()):
        return models.parts.head(x, num_classes, "gap", hidden)

    assert "tiny_gap" in models.names() and models.entry("tiny_gap").options() == {"hidden": ()}
    assert registry.trainable_params(models.build("tiny_gap", 7, hidden=[4])) == 3 * 4 + 4 + 4 * 7 + 7
    with pytest.raises(KcifarError, match="registered twice"):
        models.register("tiny_gap", "test", "again")(tiny_gap)


def test_cli_prints_the_table(monkeypatch, capsys):
    monkeypatch.setattr(registry, "_REGISTRY", {"s3_tutorial": registry._REGISTRY["s3_tutorial"]})
    main(["--num-classes", "10"])
    out = capsys.readouterr().out
    assert re.search(r"s3_tutorial\s+S3\s+62,006\s+1\.3\s+PyTorch tutorial net", out)
    assert "FLOPs" in out and "not counted" in out


def test_torch_init_draws_every_conv_and_dense_as_pytorchs_default():
    """``init="torch"``: kernel and bias uniform in +-1/sqrt(fan_in) (nn.Conv2d, nn.Linear), from Keras'
    seed; the default keeps Keras' glorot kernels and zero biases."""
    def build(init):
        keras.utils.set_random_seed(5)
        return models.build("vgg11", init=init)

    torch_like, again, default = build("torch"), build("torch"), build("keras")
    for name in ("block1_conv1", "block4_conv2", "predictions"):
        kernel, bias = torch_like.get_layer(name).get_weights()
        bound = 1 / np.sqrt(np.prod(kernel.shape[:-1]))
        for weight in (kernel, bias):
            assert np.abs(weight).max() <= bound * (1 + 1e-6)
        assert np.abs(kernel).max() > 0.99 * bound and kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)
        assert np.abs(bias).max() > 0.5 * bound
        np.testing.assert_array_equal(kernel, again.get_layer(name).get_weights()[0])
        assert not default.get_layer(name).get_weights()[1].any()
    with pytest.raises(KcifarError, match="init='pytorch' is not valid; use one of 'keras', 'torch'"):
        models.build("vgg11", init="pytorch")


def test_s2_notebook_models_follow_its_code():
    """Seven 3x3 convs 16, 32P, 64, 128P, 128P, 256, 256P, no BN; model3's dropout after the ReLU of
    conv 4, 5 and 7, before their pools."""
    model = built("s2_notebook_dropout")
    convs = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs == [16, 32, 64, 128, 128, 256, 256]
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    names = [layer.name for layer in model.layers]
    assert [names[names.index(drop) - 1] for drop in names if drop.endswith("_drop")] == [
        "block2_act2", "block3_act1", "block4_act2"]
    assert model.get_layer("gap").output.shape == (None, 256)


def test_surplus_class_logits_train_as_a_wider_cross_entropy():
    """S2's notebook trains its 256 pooled channels with 256-way cross-entropy on labels 0..9: the 10
    logits' cross-entropy plus the layer's loss is that, in value and in gradient."""
    channels = tf.constant(np.random.default_rng(1).normal(0, 3, size=(8, 256)), tf.float32)
    labels = np.arange(8) % 10
    layer = parts.SurplusClassLogits(10)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(channels)
        logits = layer(channels)
        ours = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        ours = tf.reduce_mean(ours) + tf.add_n(layer.losses)
        wide = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, channels, from_logits=True))
    assert logits.shape == (8, 10)
    np.testing.assert_allclose(float(ours), float(wide), rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(ours, channels), tape.gradient(wide, channels), atol=1e-7)


def test_surplus_class_loss_counts_in_fit_and_evaluate():
    """Keras adds the layer's loss to the compiled loss in training and in evaluation."""
    model = models.build("s2_notebook_gap", 10)
    model.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    labels = keras.utils.to_categorical([3, 7], 10)
    evaluated = model.evaluate(BATCH, labels, verbose=0)
    logits = model(BATCH, training=False)
    cross_entropy = float(keras.losses.CategoricalCrossentropy(from_logits=True)(labels, logits))
    assert evaluated == pytest.approx(cross_entropy + float(tf.add_n(model.losses)), rel=1e-5)
    assert float(tf.add_n(model.losses)) > 0.1
