"""kcifar: documented CIFAR-10/100 CNN baselines in Keras 3, reproduced and improved.

The data flows through the modules in this order, each importing only from
those before it: data -> augment -> models -> recipe, optim -> run ->
evaluate -> train, finetune -> predict, report (the tour: docs/CODE.md).

From Python: ``kcifar.api`` (train with your own callbacks, evaluate, predict, load a run, build a model).

Importing kcifar changes nothing in the process: the settings a command wants
(TensorFlow's oneDNN kernels, warning filters) are made by the command at its
start-up, ``kcifar.cli.start_command``, and by importing ``kcifar.api``.
"""

__version__ = "0.1.0"
