"""kcifar: documented CIFAR-10/100 CNN baselines in Keras 3, reproduced and improved.

The data flows through the modules in this order, each importing only from
those before it: data -> augment -> models -> train -> evaluate -> report.

Importing kcifar turns on TensorFlow's oneDNN CPU kernels
(``TF_ENABLE_ONEDNN_OPTS=1``) unless the variable is already set: TensorFlow
enables them by itself only on CPUs with AVX-512 VNNI or newer, and on our
2-core AVX2 machine they train about twice as fast
(experiments/results/onednn.md). It only takes effect when kcifar is imported
before TensorFlow, as ``python -m kcifar.<command>`` does.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
