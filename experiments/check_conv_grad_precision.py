"""Do the matmul kernel gradients (``train.conv_grad``) train a model as TensorFlow's kernel would?

Loads a run's `best.keras` in its saved dtype policies (or, with `--precision
mixed_bfloat16`, a float32 run's weights in bfloat16: what a bfloat16 CPU trains), takes
one training batch (the first 1,024 training images, the recipe's label smoothing,
training mode), and computes the kernel gradient of every 3x3 convolution that
`kcifar.machine.matmul_kernel_grad_rule` routes (`--conv-grad auto`: the rule for this CPU;
`matmul`: every eligible one): with TensorFlow's kernel, with
`kcifar.models.parts.conv3x3_matmul_kernel_grad`, and with TensorFlow's kernel in a float32
copy of the model (`kcifar.deploy.float32_model`). Prints, per layer, the largest
difference between the first two and each one's relative error against float32. On a CPU
without native bfloat16, oneDNN emulates it: the same roundings, slower.

    KCIFAR_DATA_DIR=../shared/datasets python experiments/check_conv_grad_precision.py RUN_DIR
"""

if __name__ == "__main__":
    from kcifar.cli import start_command

    start_command()

import argparse

import keras
import numpy as np
import tensorflow as tf

from kcifar import deploy, machine, models, run, rundir
from kcifar.errors import KcifarError
from kcifar.models import parts


def kernel_gradients(model, layer_names, images, labels, label_smoothing):
    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing)
    kernels = [model.get_layer(name).kernel for name in layer_names]
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, tf.cast(model(images, training=True), tf.float32))
    return [np.asarray(g, np.float64) for g in tape.gradient(loss, kernels)]


def in_policy(model, policy):
    """A copy of ``model`` whose layers compute in ``policy``, with the same weights."""
    clone = keras.models.clone_model(
        model, clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(), "dtype": policy}))
    clone.set_weights(model.get_weights())
    return clone


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (runs/NAME) of a model with 3x3 convolutions")
    parser.add_argument("--precision", choices=["saved", "mixed_bfloat16"], default="saved",
                        help="compute in the saved policies (default) or in mixed_bfloat16")
    parser.add_argument("--conv-grad", choices=["auto", "matmul"], default="auto",
                        help="route auto's rule for this CPU (default) or every eligible convolution")
    args = parser.parse_args()
    run_dir = args.run_dir
    model = models.load(f"{run_dir}/best.keras")
    if args.precision != "saved":
        model = in_policy(model, args.precision)
    recipe = rundir.read_recipe(run_dir)
    policy = next(layer.dtype_policy.name for layer in model._flatten_layers() if parts.input_size(layer))
    keras.mixed_precision.set_global_policy(policy)  # the rule is per CPU and precision
    rule = machine.matmul_kernel_grad_rule(args.conv_grad)
    if rule[0] == 0:
        raise KcifarError(f"train.conv_grad = 'auto' routes no kernel gradient on this CPU in {policy}; "
                          "nothing to compare (--conv-grad matmul routes every eligible convolution)")
    routed = [layer.name for layer in parts.routable_convolutions(model, *rule)]
    data, train = run.load_data(recipe)
    images = train.x[:1024].astype(np.float32)
    labels = keras.utils.to_categorical(train.y[:1024], data.num_classes)
    smoothing = recipe["loss"]["label_smoothing"]
    reference = kernel_gradients(deploy.float32_model(model), routed, images, labels, smoothing)
    native = kernel_gradients(model, routed, images, labels, smoothing)
    parts.use_matmul_kernel_grads(model, *rule)
    taps = kernel_gradients(model, routed, images, labels, smoothing)
    print(f"{run_dir}: {policy}, rule {rule}, {len(routed)} routed layer(s)")
    for name, n, t, r in zip(routed, native, taps, reference):
        error = lambda g: np.linalg.norm(g - r) / np.linalg.norm(r)  # noqa: E731
        print(f"{name} {r.shape}: largest |matmul - TF| {np.abs(t - n).max():.2e} (largest |TF| "
              f"{np.abs(n).max():.2e}); relative error against float32: TF {error(n):.4f}, matmuls {error(t):.4f}")


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
