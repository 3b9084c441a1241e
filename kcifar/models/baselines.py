"""The documents' own networks, S0..S3, as presets of one configurable CNN.

Every preset is a table entry: the options it sets on ``conv_net``. Anything
left out keeps ``conv_net``'s default; every option stays overridable through
``models.build(name, **overrides)``, so S0's channel study is
``build("s0_base", blocks=[6, 16])``, not a new model.
"""

import functools

from kcifar.errors import KcifarError
from kcifar.models import parts as B
from kcifar.models.registry import register


def conv_net(x, num_classes, *, blocks=((32,), (64,)), kernel_size=3, padding="same", batch_norm=True,
             activation="relu", pool="max2", pool_last=True, dropout=0.0, dropout_position="after_pool",
             residual=False, head="flatten", dense_units=(), head_batch_norm=False, head_dropout=0.0):
    """A plain CNN: conv blocks, then a Flatten/GAP head with optional hidden Dense layers.

    Sources: S0 (CIFAR-100 depth study), S1 (CIFAR-100 step by step, Keras),
    S2 (CIFAR-10 custom CNN), S3 (the PyTorch tutorial net); see docs/SOURCES.md.

    ``blocks``: one entry per block, each a list of conv widths (an int = one
    conv); every block ends with a max-pool, except the last when
    ``pool_last=False`` (S1 step 1: Conv-Pool-Conv-Pool-Conv). ``pool``:
    ``max2`` (2x2/2) or ``overlap3`` (3x3/2, padded same). ``dropout`` after
    each block (one rate, or one per block), ``before_pool`` or ``after_pool``. ``residual``: ResNet-style
    shortcut around each block (S1 step 12). ``head``: ``flatten``, ``gap`` or
    ``gap_logits`` (the pooled channels are the logits);
    ``dense_units``: hidden Dense widths, each Dense[-BN]-act;
    ``head_dropout``: dropout before the final Dense.

    Assumed where the documents are silent: 3x3 kernels with ``same`` padding
    (S0, S1; the documents' pictures are missing), ReLU, conv and dense biases
    kept, BN with PyTorch's momentum/epsilon; per-preset choices are listed in
    ``PRESETS`` beside each entry.
    """
    blocks = [[width] if isinstance(width, int) else list(width) for width in blocks]
    rates = [dropout] * len(blocks) if isinstance(dropout, (int, float)) else list(dropout)
    if len(rates) != len(blocks):
        raise KcifarError(f"dropout needs one rate, or one per block ({len(blocks)}); got {dropout!r}")
    for index, (widths, rate) in enumerate(zip(blocks, rates), start=1):
        x = B.conv_block(x, widths, f"block{index}", kernel_size=kernel_size, padding=padding, use_bn=batch_norm,
                         activation=activation, pool_kind=pool, pooled=pool_last or index < len(blocks),
                         dropout_rate=rate, dropout_position=dropout_position, residual=residual)
    return B.head(x, num_classes, kind=head, dense_units=dense_units, use_bn=head_batch_norm, activation=activation,
                  dropout_rate=head_dropout)


# S0 dense widths are not given: 512/256(/128) assumed. Optimizer, learning rate
# and epochs of the depth study are not given either (recipes' business).
S0_FC2 = dict(batch_norm=True, dense_units=(512, 256))
S0_FC3_BN = dict(batch_norm=True, dense_units=(512, 256, 128), head_batch_norm=True)

# S1 widths, dense sizes and dropout rates are not given: step 1 follows the
# Keras/TensorFlow tutorial CNN (32-64-64, Dense 64); later steps double the
# filters per block (32..256), Dense 256, dropout 0.25 in blocks and 0.5 in the head.
S1_STEP02 = dict(blocks=(32, 64, 64), pool_last=False, batch_norm=True, pool="overlap3", dense_units=(64,))
S1_STEP04 = dict(S1_STEP02, blocks=(32, 64, 128, 256), pool_last=True, dense_units=(256,))
S1_STEP05 = dict(S1_STEP04, dropout=0.25, dropout_position="before_pool", head_dropout=0.5)
S1_STEP07 = dict(S1_STEP05, blocks=((32, 32), (64, 64), (128, 128), (256, 256)))
S1_STEP09 = dict(S1_STEP07, blocks=((32, 32), (64, 64), (128, 128)), dropout_position="after_pool")
S1_STEP10 = dict(S1_STEP09, blocks=((64, 64), (128, 128), (256, 256)), dense_units=(), dropout=0.3)

# S2's layer table is a missing picture: a VGG-style 64-128-256 stack of
# two 3x3 convs per block, no BN (the document never mentions it), Dense 512.
# Kept for the study recorded with it (s2_models); the write-up's notebook, found later, is S2_NOTEBOOK.
S2_STACK = dict(blocks=((64, 64), (128, 128), (256, 256)), batch_norm=False)
# S2's notebook (docs/SOURCES.md): seven 3x3 convs 16, 32P, 64, 128P, 128P, 256, 256P, no BN. Its GAP
# models have no Dense: the 256 pooled channels are the logits; model3 drops out (0.5) after conv 4, 5, 7.
S2_NOTEBOOK = dict(blocks=((16, 32), (64, 128), (128,), (256, 256)), batch_norm=False)

PRESETS = {
    # name: (source, description, conv_net options)
    "s0_base": ("S0", "16P-32P, FC-ReLU x2, FC", dict(S0_FC2, blocks=(16, 32))),
    "s0_model1": ("S0", "16P-32P-32P, FC-ReLU x2, FC", dict(S0_FC2, blocks=(16, 32, 32))),
    "s0_model2": ("S0", "16P-32P-64P, FC-ReLU x2, FC", dict(S0_FC2, blocks=(16, 32, 64))),
    "s0_model3": ("S0", "(32,32)P-(64,64)P-(128,128)P, FC-BN-ReLU x3, FC",
                  dict(S0_FC3_BN, blocks=((32, 32), (64, 64), (128, 128)))),
    "s0_model4": ("S0", "model3 without BN in the head",
                  dict(S0_FC3_BN, blocks=((32, 32), (64, 64), (128, 128)), head_batch_norm=False)),
    "s0_model5": ("S0", "(32,32)P-(64,64,64)P-(128,128,128)P, FC-BN-ReLU x3, FC",
                  dict(S0_FC3_BN, blocks=((32, 32), (64, 64, 64), (128, 128, 128)))),
    "s1_step01": ("S1", "Conv-Pool-Conv-Pool-Conv-Dense-Dense",
                  dict(S1_STEP02, batch_norm=False, pool="max2")),
    "s1_step02": ("S1", "step 1 + BatchNorm, overlapping 3x3/2 pooling", S1_STEP02),
    "s1_step03": ("S1", "step 2 + one Conv-BN-Pool block", dict(S1_STEP02, blocks=(32, 64, 64, 128))),
    "s1_step04": ("S1", "four Conv-BN-Pool blocks, Dense 256", S1_STEP04),
    "s1_step05": ("S1", "step 4 + dropout (Conv-BN-Act-Dropout-Pool)", S1_STEP05),
    "s1_step07": ("S1", "two convs per block", S1_STEP07),
    "s1_step08": ("S1", "dropout after the pool: Conv-BN-Act-Pool-Dropout",
                  dict(S1_STEP07, dropout_position="after_pool")),
    "s1_step09": ("S1", "step 8 with one conv block removed", S1_STEP09),
    "s1_step10": ("S1", "no hidden Dense, filters 64-128-256, dropout 0.3", S1_STEP10),
    "s1_step12": ("S1", "step 10 + residual shortcuts", dict(S1_STEP10, residual=True)),
    "s2_fc": ("S2", "VGG-style 3x3 stack, Dense 512 head", dict(S2_STACK, dense_units=(512,))),
    "s2_gap": ("S2", "VGG-style 3x3 stack, global average pooling head", dict(S2_STACK, head="gap")),
    "s2_gap_dropout": ("S2", "s2_gap + dropout 0.25 after each pool, 0.5 before the classifier",
                       dict(S2_STACK, head="gap", dropout=0.25, head_dropout=0.5)),
    "s2_notebook_fc": ("S2", "the notebook's model1: 7 convs (16-32P-64-128P-128P-256-256P), Dense 1024",
                       dict(S2_NOTEBOOK, dense_units=(1024,))),
    "s2_notebook_gap": ("S2", "the notebook's model2: its 256 pooled channels are the logits",
                        dict(S2_NOTEBOOK, head="gap_logits")),
    "s2_notebook_dropout": ("S2", "the notebook's model3: model2 + dropout 0.5 after conv 4, 5 and 7",
                            dict(S2_NOTEBOOK, head="gap_logits", dropout=(0, 0.5, 0.5, 0.5),
                                 dropout_position="before_pool")),
    "s3_tutorial": ("S3", "PyTorch tutorial net: Conv6 5x5-Pool-Conv16 5x5-Pool-FC120-FC84 (62,006 params)",
                    dict(blocks=(6, 16), kernel_size=5, padding="valid", batch_norm=False, dense_units=(120, 84))),
}

for _name, (_source, _description, _options) in PRESETS.items():
    register(_name, _source, _description)(functools.partial(conv_net, **_options))
