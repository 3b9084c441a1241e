"""The few pieces every builder of the zoo stacks: input normalisation,
conv-BN-act, pooling, dropout placement and classifier heads.

Layer names come from the ``prefix`` a piece is given (``block2`` ->
``block2_conv1``, ``block2_bn1``, ``block2_act1``, ``block2_pool``), so
weights load by name and ``model.summary()`` reads like the documents' tables.

Assumed everywhere the documents are silent:
- convolutions and dense layers keep their bias (the PyTorch and Keras default
  the documents used; S4's exact parameter counts need it);
- BatchNormalization uses PyTorch's momentum 0.1 and epsilon 1e-5 (Keras:
  ``momentum=0.9, epsilon=1e-5``), since four of the five documents are PyTorch;
- Keras' default initialisers (glorot-uniform kernels, zero biases) unless a
  builder says otherwise, or PyTorch's with ``build(..., init="torch")``.
"""

import math
import types

import keras
import tensorflow as tf

from kcifar.errors import KcifarError

# CIFAR-10 training-set channel statistics on the 0..255 scale.
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)
NORMALIZATIONS = ("meanstd", "minus1_1", "unit", "none")
POOLS = ("max2", "overlap3")
DROPOUT_POSITIONS = ("before_pool", "after_pool")
HEADS = ("flatten", "gap", "gap_logits")
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
INITS = ("keras", "torch")


def torch_default_init(model):
    """Draw every Conv2D and Dense kernel and bias afresh as PyTorch's ``nn.Conv2d`` and
    ``nn.Linear`` start them: uniform in +-1/sqrt(fan_in) (``kaiming_uniform_(a=sqrt(5))`` for the
    kernel), fan_in = kernel height x width x input channels (or the Dense inputs). Batch norm
    starts at gamma 1, beta 0 in both frameworks. Seeded by Keras' global seed."""
    for layer in model._flatten_layers():
        if type(layer) not in (keras.layers.Conv2D, keras.layers.Dense):
            continue
        bound = 1 / math.sqrt(math.prod(layer.kernel.shape[:-1]))
        for weight in (layer.kernel, layer.bias):
            if weight is not None:
                weight.assign(keras.random.uniform(weight.shape, -bound, bound, dtype=weight.dtype))


def check_choice(option, value, choices):
    """Raise a KcifarError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise KcifarError(f"{option}={value!r} is not valid; use one of {', '.join(map(repr, choices))}")


def normalize(x, normalization="meanstd", mean=None, std=None):
    """The model's first layer, named ``normalize``: raw 0..255 pixels in.

    ``meanstd``: (x - mean) / std per channel (default: CIFAR-10 train stats);
    ``minus1_1``: x / 127.5 - 1 (S3's mean 0.5, std 0.5); ``unit``: x / 255;
    ``none``: identity.
    Computed in float32 whatever the precision policy: rounding the normalised pixels to bfloat16
    (8 bits of mantissa) adds noise that a whitening first layer amplifies (airbench94); the
    layer is one multiply-add per pixel, and the next layer casts to its own compute dtype.
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    if normalization != "meanstd" and (mean is not None or std is not None):
        raise KcifarError(f"mean/std only apply to normalization='meanstd', not {normalization!r}")
    if normalization == "meanstd":
        mean = [float(m) for m in (CIFAR10_MEAN if mean is None else mean)]
        std = [float(s) for s in (CIFAR10_STD if std is None else std)]
        if len(mean) != x.shape[-1] or len(std) != x.shape[-1] or min(std) <= 0:
            raise KcifarError(f"mean and std need one value per channel ({x.shape[-1]}) and std > 0; got {mean}, {std}")
        layer = keras.layers.Normalization(mean=mean, variance=[s * s for s in std], name="normalize", dtype="float32")
    elif normalization == "minus1_1":
        layer = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="normalize", dtype="float32")
    elif normalization == "unit":
        layer = keras.layers.Rescaling(1 / 255, name="normalize", dtype="float32")
    else:
        layer = keras.layers.Identity(name="normalize", dtype="float32")
    return layer(x)


def conv3x3_matmul_kernel_grad(x, kernel):
    """A 3x3, stride-1, 'same' convolution, NHWC, whose kernel gradient is nine matmuls.

    TensorFlow's own kernel-gradient kernel (oneDNN's older ``jit`` implementation on CPUs
    without AMX) is slow where the images are small and the channels many, where these matmuls
    are faster (measured: experiments/results/conv_grad_layers_*.md, ``bench_conv_layers.py``).
    Here tap (i, j) of the kernel gets the input
    shifted by (i - 1, j - 1), flattened to (positions, in), times the output gradient
    (positions, out). Forward pass and input gradient stay TensorFlow's.
    """
    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            dx = tf.nn.conv2d_transpose(dy, kernel, tf.shape(x), 1, "SAME")
            return dx, kernel_grad_by_taps(x, dy, kernel.shape)

        return tf.nn.conv2d(x, kernel, 1, "SAME"), grad

    return conv(x, tf.convert_to_tensor(kernel))


def kernel_grad_by_taps(x, dy, kernel_shape):
    """The kernel gradient of a 3x3 stride-1 'same' NHWC convolution from its input ``x`` and
    output gradient ``dy``: one (in, positions) x (positions, out) matmul per tap."""
    height, width, channels, filters = x.shape[1], x.shape[2], kernel_shape[2], kernel_shape[3]
    padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    dy = tf.reshape(dy, [-1, filters])
    taps = [tf.matmul(tf.reshape(padded[:, i:i + height, j:j + width], [-1, channels]), dy, transpose_a=True)
            for i in range(3) for j in range(3)]
    return tf.reshape(tf.stack(taps), kernel_shape)


def input_size(layer):
    """(height x width, channels) of the input of a ``keras.layers.Conv2D`` that
    ``conv3x3_matmul_kernel_grad`` can stand in for (3x3, stride 1, 'same', no dilation or groups,
    channels last, called once on a known size); None for any other layer."""
    if not (type(layer) is keras.layers.Conv2D and layer.kernel_size == (3, 3) and layer.strides == (1, 1)
            and layer.padding == "same" and layer.dilation_rate == (1, 1) and layer.groups == 1
            and layer.data_format == "channels_last"):
        return None
    try:
        height, width, channels = layer.input.shape[1:]
    except (AttributeError, ValueError):  # a layer called on several inputs, or not in a functional model
        return None
    return (height * width, channels) if height and width else None


def routable_convolutions(model, max_positions: int, min_channels: int = 0) -> list:
    """The 3x3 convolutions of ``model`` (``input_size``) whose input has at most ``max_positions``
    pixels and at least ``min_channels`` channels."""
    return [layer for layer in model._flatten_layers()
            if (size := input_size(layer)) is not None and size[0] <= max_positions and size[1] >= min_channels]


def use_matmul_kernel_grads(model, max_positions: int, min_channels: int = 0) -> int:
    """Route the kernel gradient of each of ``routable_convolutions(model, ...)`` through
    ``conv3x3_matmul_kernel_grad``; set before the first trace of the training step. The layers,
    their weights and saved files are unchanged (only this model object computes differently).
    Returns how many layers it routed."""
    layers = routable_convolutions(model, max_positions, min_channels)
    for layer in layers:
        layer.convolution_op = conv3x3_matmul_kernel_grad
    return len(layers)


def fused_batch_norm_call(self, inputs, training=None, mask=None):
    """Keras' ``BatchNormalization.call`` computed by TensorFlow's fused kernel: the same results, faster.

    Keras 3 composes batch norm from a dozen float32 element-wise ops (moments, rsqrt, scale, shift
    and their gradients), each a pass over the activations, with casts around them under mixed
    precision. ``FusedBatchNormV3`` does the forward and the backward pass in one kernel each, in the
    input's dtype (bfloat16 included, statistics in float32), and oneDNN fuses it further (measured:
    experiments/results/speed_*.md). Outputs, gradients and moving statistics equal Keras' layer
    (tests/test_models.py); the moving variance is the biased batch variance, as in Keras. 4-D inputs
    on the channel axis; anything else (masks, renorm, other axes) takes Keras' own path.

    A layer's ``bias_lr_scale`` (default 1) multiplies the gradient of the bias (beta) and leaves its
    value alone: with SGD that is a learning rate ``bias_lr_scale`` times the others for the bias,
    PyTorch's parameter group, while weight decay, added by the optimizer, stays as it is.
    """
    if mask is not None or self.renorm or len(inputs.shape) != 4 or self.axis not in (-1, 3):
        return keras.layers.BatchNormalization.call(self, inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    scale = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones([channels])
    offset = tf.convert_to_tensor(self.beta) if self.center else tf.zeros([channels])
    bias_lr_scale = getattr(self, "bias_lr_scale", 1.0)
    if self.center and bias_lr_scale != 1:  # the same value; its gradient times bias_lr_scale
        offset += (bias_lr_scale - 1) * (offset - tf.stop_gradient(offset))
    if not (training and self.trainable):
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, scale, offset, mean=tf.convert_to_tensor(self.moving_mean),
            variance=tf.convert_to_tensor(self.moving_variance), epsilon=self.epsilon, is_training=False)
        return outputs
    outputs, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
        inputs, scale, offset, epsilon=self.epsilon, is_training=True)
    count = tf.cast(tf.size(inputs) // channels, tf.float32)
    variance = unbiased_variance * (count - 1) / count  # the kernel returns Bessel's correction
    self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1 - self.momentum))
    self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1 - self.momentum))
    return outputs


def fuse(layer):
    """``layer`` (a Keras BatchNormalization) computing by ``fused_batch_norm_call`` from now on; its
    class, weights and saved file stay Keras' own. Returns the layer."""
    layer.call = types.MethodType(fused_batch_norm_call, layer)
    return layer


def use_fused_batch_norm(model) -> int:
    """Fuse every batch norm of ``model`` for training (``fuse``), before the first trace of the
    training step; the model still saves, and loads, as plain Keras. Returns how many it fused."""
    layers = [layer for layer in model._flatten_layers()
              if isinstance(layer, keras.layers.BatchNormalization) and not isinstance(layer, FusedBatchNorm)]
    for layer in layers:
        fuse(layer)
    return len(layers)


@keras.saving.register_keras_serializable(package="kcifar")
class FusedBatchNorm(keras.layers.BatchNormalization):
    """The batch norm zoo models held until 2026-12-07 (``fused_batch_norm_call`` as a class): kept
    so that their saved files still load. New models hold Keras' own layer, fused for training."""

    call = fused_batch_norm_call

    def __init__(self, *args, bias_lr_scale=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bias_lr_scale = float(bias_lr_scale)

    def get_config(self):
        return {**super().get_config(), "bias_lr_scale": self.bias_lr_scale}


def batch_norm(x, name, momentum=BN_MOMENTUM, scale=True):
    """Keras' batch normalisation with the zoo's PyTorch-matching momentum and epsilon (training
    fuses it: ``use_fused_batch_norm``); ``scale=False``: no learnable scale (gamma fixed at 1)."""
    return keras.layers.BatchNormalization(momentum=momentum, epsilon=BN_EPSILON, scale=scale, name=name)(x)


def conv_bn_act(x, filters, prefix, suffix="", kernel_size=3, strides=1, padding="same",
                use_bn=True, activation="relu", kernel_initializer="glorot_uniform"):
    """Conv2D [-> BN] [-> activation] named ``{prefix}_conv{suffix}``, ``_bn``, ``_act``.

    ``activation=None`` leaves the activation to the caller (residual blocks
    add the shortcut first).
    """
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding,
                            kernel_initializer=kernel_initializer, name=f"{prefix}_conv{suffix}")(x)
    if use_bn:
        x = batch_norm(x, f"{prefix}_bn{suffix}")
    if activation:
        x = keras.layers.Activation(activation, name=f"{prefix}_act{suffix}")(x)
    return x


def pool(x, kind, name):
    """Max-pool: ``max2`` = 2x2 stride 2; ``overlap3`` = AlexNet's overlapping 3x3
    stride 2, padded ``same`` (assumed) so both kinds halve the size alike."""
    check_choice("pool", kind, POOLS)
    if kind == "max2":
        return keras.layers.MaxPooling2D(2, strides=2, name=name)(x)
    return keras.layers.MaxPooling2D(3, strides=2, padding="same", name=name)(x)


def dropout(x, rate, name):
    """Dropout at ``rate``; no layer at all when the rate is 0."""
    return keras.layers.Dropout(rate, name=name)(x) if rate else x


def conv_block(x, filters, prefix, kernel_size=3, padding="same", use_bn=True, activation="relu",
               pool_kind="max2", pooled=True, dropout_rate=0.0, dropout_position="after_pool",
               residual=False):
    """One block: a conv-BN-act per entry of ``filters``, then pool and dropout.

    ``dropout_position``: ``before_pool`` = Conv-BN-Act-Dropout-Pool,
    ``after_pool`` = Conv-BN-Act-Pool-Dropout (S1 step 8). With ``residual``,
    the block input is added before the last activation (ResNet v1 style), through
    a 1x1 conv (``{prefix}_shortcut``, + BN when ``use_bn``) when channels differ.
    """
    check_choice("dropout_position", dropout_position, DROPOUT_POSITIONS)
    shortcut = x
    for index, width in enumerate(filters, start=1):
        last = index == len(filters)
        x = conv_bn_act(x, width, prefix, suffix=index, kernel_size=kernel_size, padding=padding, use_bn=use_bn,
                        activation=None if (residual and last) else activation)
    if residual:
        if shortcut.shape[-1] != x.shape[-1]:
            shortcut = keras.layers.Conv2D(x.shape[-1], 1, name=f"{prefix}_shortcut")(shortcut)
            if use_bn:
                shortcut = batch_norm(shortcut, f"{prefix}_shortcut_bn")
        x = keras.layers.Add(name=f"{prefix}_add")([x, shortcut])
        x = keras.layers.Activation(activation, name=f"{prefix}_act{len(filters)}")(x)
    if dropout_position == "before_pool":
        x = dropout(x, dropout_rate, f"{prefix}_drop")
    if pooled:
        x = pool(x, pool_kind, f"{prefix}_pool")
    if dropout_position == "after_pool":
        x = dropout(x, dropout_rate, f"{prefix}_drop")
    return x


def head(x, num_classes, kind="flatten", dense_units=(), use_bn=False, activation="relu", dropout_rate=0.0):
    """Classifier: Flatten or GlobalAveragePooling, hidden Dense [-BN] -act layers
    (``head_dense{k}``), dropout before the last Dense, and ``predictions`` (logits).
    ``gap_logits``: no Dense at all, the pooled channels are the logits (``SurplusClassLogits``).

    ``predictions`` computes in float32 so logits stay float32 under mixed precision.
    """
    check_choice("head", kind, HEADS)
    if kind == "flatten":
        x = keras.layers.Flatten(name="flatten")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if kind == "gap_logits":
        if dense_units or dropout_rate:
            raise KcifarError("head='gap_logits' has no Dense layer: leave dense_units and head_dropout unset")
        return SurplusClassLogits(num_classes, name="predictions")(x)
    for index, units in enumerate(dense_units, start=1):
        x = keras.layers.Dense(units, name=f"head_dense{index}")(x)
        if use_bn:
            x = batch_norm(x, f"head_bn{index}")
        x = keras.layers.Activation(activation, name=f"head_act{index}")(x)
    x = dropout(x, dropout_rate, "head_drop")
    return keras.layers.Dense(num_classes, dtype="float32", name="predictions")(x)


@keras.saving.register_keras_serializable(package="kcifar")
class SurplusClassLogits(keras.layers.Layer):
    """Values of C' >= C channels as the logits of C classes, trained as PyTorch trains C' outputs
    with C'-way cross-entropy on labels 0..C-1 (S2's notebook: 256 pooled channels, 10 classes).

    Outputs the first C values; the other C' - C are classes no image has, and what they add to the
    C'-way cross-entropy, the same for every label, is added as this layer's loss:
    CE_C'(z, y) = CE_C(z[:C], y) + softplus(logsumexp(z[C:]) - logsumexp(z[:C])), so loss and gradients
    are the notebook's. *Differs*: the prediction is the argmax over the C classes (the notebook's
    can fall on a surplus class and count as wrong).
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.num_classes = int(num_classes)

    def build(self, input_shape):
        if input_shape[-1] < self.num_classes:
            raise KcifarError(f"head='gap_logits' needs at least one channel per class: "
                              f"{input_shape[-1]} channels, {self.num_classes} classes")

    def call(self, values):
        logits, surplus = values[:, :self.num_classes], values[:, self.num_classes:]
        if surplus.shape[-1]:
            lead = keras.ops.logsumexp(surplus, axis=-1) - keras.ops.logsumexp(logits, axis=-1)
            self.add_loss(keras.ops.mean(keras.ops.softplus(lead)))
        return logits

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_classes)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}
