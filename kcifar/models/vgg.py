"""VGG for CIFAR (S4): Conv3x3-BN-ReLU blocks, five 2x2/2 max-pools, Linear(512, classes)."""

import functools

from kcifar.models import parts as B
from kcifar.models.registry import register

# Conv widths per block (Simonyan & Zisserman 2015, configurations A, B, D, E).
CONFIGS = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}


def vgg(x, num_classes, *, config="vgg16", dropout=0.0):
    """VGG with batch norm, the CIFAR variant S4 trained (as kuangliu/pytorch-cifar).

    Source: S4 (VGG11/16/19 trained; VGG16 chosen); configurations from
    Simonyan & Zisserman (2015). Five blocks of Conv3x3(same, bias)-BN-ReLU, each
    ending in a 2x2/2 max-pool (32 -> 1), Flatten to 512, Linear(512, classes):
    9,231,114 / 9,416,010 / 14,728,266 / 20,040,522 trainable parameters
    for VGG11/13/16/19 and 10 classes. ``dropout`` (default 0, S4's remedy
    study) sits before the classifier; its rate is not documented.
    Assumed: conv biases kept (PyTorch default; the counts need them).
    """
    B.check_choice("config", config, tuple(CONFIGS))
    for index, widths in enumerate(CONFIGS[config], start=1):
        x = B.conv_block(x, widths, f"block{index}")
    return B.head(x, num_classes, "flatten", dropout_rate=dropout)


for _name in CONFIGS:
    register(_name, "S4", f"{_name.upper()} with BN, five 2x2 pools, Linear(512, classes)")(
        functools.partial(vgg, config=_name))
