"""kcifar: documented CIFAR-10/100 CNN baselines in Keras 3, reproduced and improved.

The data flows through the modules in this order, each importing only from
those before it: data -> augment -> models -> recipe, optim -> run ->
evaluate -> train, finetune -> predict, report (see README's tour).

Importing kcifar changes nothing in the process: the settings a command wants
(TensorFlow's oneDNN kernels, warning filters) are made by the command at its
start-up, ``kcifar.errors.start_command``.
"""

__version__ = "0.1.0"
