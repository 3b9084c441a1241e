"""The model zoo: every documented baseline by name, built with the functional API.

    from kcifar import models
    model = models.build("vgg16", num_classes=10)   # raw 0..255 images in, logits out
    models.names()                                  # every registered name
    models.describe("vgg16")                        # source, description, options()

Each module in ``BUILDER_MODULES`` registers its builders when imported; a new
family is one module that uses ``registry.register`` and one entry here.
"""

import importlib

from kcifar.models.registry import build, describe, names, register

BUILDER_MODULES = ("baselines", "vgg", "resnet", "efficientnet_lite")

for _module in BUILDER_MODULES:
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["build", "describe", "names", "register"]
