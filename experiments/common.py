"""What the experiment scripts share: the clocks that time ``model.fit`` and the writing of a result.

The scripts run as ``python experiments/X.py``, so this folder is on ``sys.path`` and they
``import common``; import it after ``kcifar.cli.start_command()`` where a script calls it
(this module imports Keras, and TensorFlow reads its settings once, when it is imported).
"""

import time

import keras


class StepClock(keras.callbacks.Callback):
    """The times of one ``fit`` call's training steps (``time.perf_counter``): ``start`` at the start of
    training; at the end of every call of the training function ``times`` gains one, ``end`` is the
    latest and ``steps`` the steps done (``batch``: the call's last step); ``first`` and ``first_steps``
    at the end of the first call (tracing, XLA compilation, its first steps).

    A batch hook turns off Keras' asynchronous dispatch of the batch callbacks, so every call of the
    training function waits for the one before; to time whole epochs of undisturbed training, use
    ``EpochClock``."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_begin(self, logs=None):
        self.start, self.first = time.perf_counter(), None

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # waits for the device: the step is done, not only queued
        self.end, self.steps = time.perf_counter(), batch + 1
        self.times.append(self.end)
        if self.first is None:
            self.first, self.first_steps = self.end, self.steps


class EpochClock(keras.callbacks.Callback):
    """Seconds from the start of the epoch to its end (``seconds``), so that ``fit``'s start-up and teardown
    (iterator set-up, once per epoch in real training) are not counted in a short block. No batch hook:
    Keras keeps dispatching the batch callbacks asynchronously, as in training."""

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start


def publish(text: str, out=None):
    """Print a result and, when ``out`` (``--out``) is given, write it there (kcifar.fileio.write_text:
    replaced whole, never half written), ending in one newline."""
    text = text.rstrip("\n")
    print(text)
    if out:
        from kcifar.fileio import write_text

        write_text(out, text + "\n")
