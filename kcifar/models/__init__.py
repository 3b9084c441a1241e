"""The model zoo: every documented baseline by name, built with the functional API.

    from kcifar import models
    model = models.build("vgg16", num_classes=10)   # raw 0..255 images in, logits out
    models.names()                                  # every registered name
    models.entry("vgg16")                           # source, description, options()
    models.build("efficientnet_lite0", num_classes=10, weights="imagenet")   # pretrained, new head
    model = models.load("runs/NAME/best.keras")    # a saved model, kcifar's layers known

Each family module registers its builders when imported; a new family is one
module that uses ``registry.register`` and one import line here.
"""

from kcifar.models import airbench, baselines, efficientnet_lite, resnet, vgg  # noqa: F401  (they register their models)
from kcifar.models import pretrained  # noqa: F401, I001  (after the families: ImageNet weights of the Lite entries)
from kcifar.models.registry import build, entry, load, names, register

__all__ = ["build", "entry", "load", "names", "register"]
