"""The fast CIFAR-10 network of airbench94 (Jordan 2024), written for Keras from its public write-up.

A frozen 2x2 patch-whitening convolution, three blocks conv -> max-pool -> BN -> GELU ->
conv -> BN -> GELU (64 / 256 / 256), a final 3x3 max-pool and a linear head scaled by 1/9.
The whitening kernel is data-dependent: ``init_whitening`` sets it from training patches
before ``fit`` (``kcifar.train`` does it when the model has a ``PatchWhitening`` layer).
"""

import keras
import numpy as np
from keras import ops

from kcifar.errors import KcifarError
from kcifar.models import parts as B
from kcifar.models.registry import register

WIDTHS = (64, 256, 256)
PATCH = 2
# PyTorch's default conv/linear initialisation, uniform(+-1/sqrt(fan_in)), which the write-up keeps.
TORCH_INIT = dict(scale=1 / 3, mode="fan_in", distribution="uniform")


@keras.saving.register_keras_serializable(package="kcifar")
class PartialDirac(keras.initializers.VarianceScaling):
    """PyTorch's default kernel initialisation, then the first ``in_channels`` filters set to the
    identity (a 1 at the centre of their own input channel): each conv starts passing its input on."""

    def __init__(self, seed=None):
        super().__init__(**TORCH_INIT, seed=seed)

    def __call__(self, shape, dtype=None):
        kernel = super().__call__(shape, dtype)
        height, width, in_channels, out_channels = shape
        n = min(in_channels, out_channels)
        identity = np.zeros(shape, np.float32)
        identity[height // 2, width // 2, np.arange(n), np.arange(n)] = 1
        keep = np.ones(shape, np.float32)
        keep[..., :n] = 0
        return kernel * ops.cast(keep, kernel.dtype) + ops.cast(identity, kernel.dtype)

    def get_config(self):
        return {"seed": self.seed}


@keras.saving.register_keras_serializable(package="kcifar")
class PatchWhitening(keras.layers.Layer):
    """A 2x2 'valid' convolution whose kernel is never trained (``init_whitening`` sets it) and
    whose bias is trainable until ``kcifar.callbacks.FreezeWhiteningBias`` sets ``trainable = False``.

    ``filters`` = 2 x the patch dimension (2*2*channels): each whitened direction and its negative.
    """

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters

    def build(self, input_shape):
        shape = (PATCH, PATCH, input_shape[-1], self.filters)
        self.kernel = self.add_weight(name="kernel", shape=shape, initializer=keras.initializers.VarianceScaling(
            **TORCH_INIT), trainable=False)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, inputs):
        return ops.conv(inputs, ops.cast(self.kernel, inputs.dtype), padding="valid") + ops.cast(self.bias, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[1] - PATCH + 1, input_shape[2] - PATCH + 1, self.filters)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="kcifar")
def gelu_tanh(x):
    """GELU by its tanh approximation (PyTorch's ``GELU(approximate="tanh")``): within 1e-3 of the
    exact GELU everywhere, below bfloat16's resolution, and cheaper than ``erf`` on a CPU."""
    return keras.activations.gelu(x, approximate=True)


def whitening_kernel(images, epsilon=5e-4):
    """The (2, 2, c, 4c) kernel that whitens the 2x2 patches of ``images`` (N, h, w, c, as the layer
    sees them): eigenvectors of the patches' (uncentred) covariance scaled by 1/sqrt(eigenvalue +
    epsilon), then the same filters negated. ``epsilon`` keeps the smallest directions bounded."""
    images = np.asarray(images, np.float64)
    n, height, width, channels = images.shape
    patches = np.stack([images[:, i:height - PATCH + 1 + i, j:width - PATCH + 1 + j]
                        for i in range(PATCH) for j in range(PATCH)], axis=3)  # (n, h', w', 4, c)
    patches = patches.reshape(-1, PATCH * PATCH * channels)
    covariance = patches.T @ patches / (len(patches) - 1)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    filters = eigenvectors / np.sqrt(eigenvalues + epsilon)  # one filter per column
    kernel = filters.reshape(PATCH, PATCH, channels, -1)
    return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def whitening_layers(model) -> list:
    return [layer for layer in model._flatten_layers() if isinstance(layer, PatchWhitening)]


def init_whitening(model, images, epsilon=5e-4):
    """Set every ``PatchWhitening`` kernel of ``model`` from raw 0..255 ``images`` (what the model
    takes), fed through the layers before it; returns how many layers were set."""
    layers = whitening_layers(model)
    for layer in layers:
        if len(images) == 0:
            raise KcifarError(f"{model.name} has a whitening layer to set from training images: set whitening.images > 0")
        inputs = keras.Model(model.inputs, layer.input).predict(np.asarray(images, np.float32), batch_size=500, verbose=0)
        layer.kernel.assign(whitening_kernel(inputs, epsilon))
    return len(layers)


def conv_group(x, filters, prefix, bn_momentum, identity_init=True, gelu="gelu"):
    """Conv3x3 -> MaxPool2 -> BN -> GELU -> Conv3x3 -> BN -> GELU, no conv biases, BN without scale."""
    for index in (1, 2):
        init = PartialDirac() if identity_init else keras.initializers.VarianceScaling(**TORCH_INIT)
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init,
                                name=f"{prefix}_conv{index}")(x)
        if index == 1:
            x = keras.layers.MaxPooling2D(2, name=f"{prefix}_pool")(x)
        x = B.batch_norm(x, f"{prefix}_bn{index}", momentum=bn_momentum, scale=False)
        x = keras.layers.Activation(gelu, name=f"{prefix}_act{index}")(x)
    return x


@register("airbench94", "Jordan 2024 (airbench94)",
          "frozen 2x2 whitening, 3 conv groups 64/256/256, GELU, BN without scale, head x 1/9")
def airbench94(x, num_classes, *, widths=WIDTHS, whitening=True, identity_init=True, bn_momentum=0.6,
               head_scale=1 / 9, gelu_approximate=False):
    """The airbench94 network: 1,971,352 trainable parameters for 10 classes (+ 288 frozen whitening ones).

    Source: K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU" (2024) and its public
    airbench94 description. ``whiten`` (``PatchWhitening``): Conv2x2 'valid' 3 -> 24 channels, 32 -> 31
    pixels, kernel set from the data and frozen, bias trainable (for the recipe's first epochs), then
    GELU. Three ``conv_group`` blocks of ``widths`` (31 -> 15 -> 7 -> 3 pixels), whose convs start as
    the identity in their first input-channels filters (``PartialDirac``), MaxPool3 (3 -> 1), Flatten,
    Dense(classes, no bias) times ``head_scale``. Ablations: ``whitening=False`` makes ``whiten``
    an ordinary trainable Conv2D with bias; ``identity_init=False`` leaves the convs at PyTorch's
    default initialisation; ``gelu_approximate=True`` uses GELU's tanh approximation (``gelu_tanh``).
    The whitening layer computes in float32 under any precision policy (as the ``normalize`` layer
    before it): its filters scale the smallest patch directions up by 1/sqrt(eigenvalue), which
    would magnify bfloat16's rounding of the inputs (experiments/check_whitening_precision.py).
    Assumed: BN epsilon 1e-5 (the write-up's 1e-12 is below what TensorFlow's fused kernel
    accepts); ``bn_momentum`` 0.6 in Keras' convention (the running statistics keep 0.6 of themselves
    per step): the write-up's 0.6 is that convention too, handed to PyTorch as ``momentum=1 - 0.6``.
    """
    filters = 2 * PATCH * PATCH * x.shape[-1]
    if whitening:
        x = PatchWhitening(filters, name="whiten", dtype="float32")(x)
    else:
        x = keras.layers.Conv2D(filters, PATCH, kernel_initializer=keras.initializers.VarianceScaling(**TORCH_INIT),
                                name="whiten", dtype="float32")(x)
    gelu = gelu_tanh if gelu_approximate else "gelu"
    x = keras.layers.Activation(gelu, name="whiten_act")(x)
    for index, width in enumerate(widths, start=1):
        x = conv_group(x, width, f"block{index}", bn_momentum, identity_init, gelu)
    x = keras.layers.MaxPooling2D(3, name="final_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Rescaling(head_scale, name="head_scale")(x)  # scaling the features = scaling the logits
    return keras.layers.Dense(num_classes, use_bias=False, dtype="float32",
                              kernel_initializer=keras.initializers.VarianceScaling(**TORCH_INIT), name="predictions")(x)
