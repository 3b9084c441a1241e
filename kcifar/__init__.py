"""kcifar: documented CIFAR-10/100 CNN baselines in Keras 3, reproduced and improved.

The data flows through the modules in this order, each importing only from
those before it: data -> augment -> models -> train -> evaluate -> report.
"""

__version__ = "0.1.0"
