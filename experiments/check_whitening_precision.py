"""How much noise does a trained airbench94's whitening layer carry in its precision?

Loads a run's `best.keras`, computes the `whiten` layer's output on the first
256 test images as the model computes it (its saved dtype policies) and in a
float32 copy of the same model (`kcifar.deploy.float32_model`), and prints the
rms of the difference relative to the rms of the float32 output, per channel.
A model trained with the whole net in bfloat16 (before commit a4a325a) shows
the noise; a newer one computes `normalize` and `whiten` in float32 and shows none.

    KCIFAR_DATA_DIR=../shared/datasets python experiments/check_whitening_precision.py RUN_DIR
"""

if __name__ == "__main__":
    from kcifar.cli import start_command

    start_command()

import argparse

import keras
import numpy as np

from kcifar import deploy, models, run, rundir


def whitened(model, images):
    return np.asarray(keras.Model(model.inputs, model.get_layer("whiten").output)(images), np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a fast94 run directory (runs/NAME)")
    run_dir = parser.parse_args().run_dir
    model = models.load(f"{run_dir}/best.keras")
    data, _ = run.load_data(rundir.read_recipe(run_dir))
    images = data.test.x[:256].astype(np.float32)
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers[:3]}
    as_trained, reference = whitened(model, images), whitened(deploy.float32_model(model), images)
    channels = reference.shape[-1]
    noise = np.sqrt(((as_trained - reference) ** 2).reshape(-1, channels).mean(0))
    signal = np.sqrt((reference ** 2).reshape(-1, channels).mean(0))
    print(f"{run_dir}: dtype policies {policies}")
    print("rms noise / rms signal per whitening channel, %:", " ".join(f"{v:.1f}" for v in 100 * noise / signal))


if __name__ == "__main__":  # a bad input is one line, not a traceback
    from kcifar.cli import command

    command(main)()
