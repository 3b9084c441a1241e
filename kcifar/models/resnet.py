"""ResNet for CIFAR (He et al. 2016, section 4.2), the published anchors ResNet20/56."""

import functools

import keras

from kcifar.errors import KcifarError
from kcifar.models import parts as B
from kcifar.models.registry import register

WIDTHS = (16, 32, 64)


def residual_block(x, filters, strides, prefix):
    """Conv3x3-BN-ReLU, Conv3x3-BN, + shortcut, ReLU (v1). The shortcut is the
    identity, or a strided 1x1 conv (``{prefix}_shortcut``) when the shape changes."""
    shortcut = x
    x = B.conv_bn_act(x, filters, prefix, 1, strides=strides, kernel_initializer="he_normal")
    x = B.conv_bn_act(x, filters, prefix, 2, activation=None, kernel_initializer="he_normal")
    if strides != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=strides, kernel_initializer="he_normal",
                                       name=f"{prefix}_shortcut")(shortcut)
    x = keras.layers.Add(name=f"{prefix}_add")([x, shortcut])
    return keras.layers.Activation("relu", name=f"{prefix}_out")(x)


def cifar_resnet(x, num_classes, *, depth=20):
    """ResNet-``depth`` v1 for 32x32 images: 6n+2 layers, three stages of n blocks.

    Source: He et al., "Deep Residual Learning for Image Recognition" (2016),
    CIFAR-10 networks, as in the Keras example ``cifar10_resnet`` (v1), the
    published anchors. Stem Conv3x3(16)-BN-ReLU; stages of 16/32/64
    filters, the 2nd and 3rd starting with stride 2; global average pooling;
    Dense(classes). ResNet20 ~0.27 M, ResNet56 ~0.86 M trainable parameters.
    Shortcuts: option B like the Keras example (identity, and a strided 1x1 conv
    with bias and no BN where the shape changes); the paper's CIFAR nets use
    option A (zero padding), 2,656 fewer parameters. Assumed as in the Keras
    example: he-normal conv kernels, conv biases kept; L2 1e-4 is left to the
    recipe's weight decay.
    """
    if depth < 8 or (depth - 2) % 6:
        raise KcifarError(f"depth={depth} is not 6n+2 (20, 32, 44, 56, 110 ...)")
    x = B.conv_bn_act(x, WIDTHS[0], "stem", kernel_initializer="he_normal")
    for stage, filters in enumerate(WIDTHS, start=1):
        for block in range(1, (depth - 2) // 6 + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = residual_block(x, filters, strides, f"stage{stage}_block{block}")
    return B.head(x, num_classes, "gap")


for _depth in (20, 56):
    register(f"resnet{_depth}", "He et al. 2016", f"CIFAR ResNet-{_depth} v1, option-B shortcuts (Keras example)")(
        functools.partial(cifar_resnet, depth=_depth))
