"""The command line's plumbing: one clear line and exit code 2 for a user error,
never a bare traceback; the process settings a command makes at start-up."""

import functools
import glob
import os
import sys
import warnings


class KcifarError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""


def cli(main):
    """Wrap a command-line ``main`` so a KcifarError, or a full disk anywhere (Keras' own
    writers included), prints one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from kcifar import fileio

        try:
            return main(*args, **kwargs)
        except KcifarError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as error:
            if not fileio.is_full_disk(error):
                raise
            print(f"error: {fileio.write_error(error.filename or 'a file', error)}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def has_nvidia_device() -> bool:
    """Whether the kernel shows an NVIDIA GPU (asked before TensorFlow loads, so not TensorFlow)."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def start_command():
    """Process settings of a ``python -m kcifar.<command>``, made before TensorFlow loads.

    TensorFlow's oneDNN CPU kernels (``TF_ENABLE_ONEDNN_OPTS=1``, unless set): TensorFlow
    enables them by itself only on CPUs with AVX-512 VNNI or newer; on our 2-core AVX2
    machine they made training 1.7-2.0x and EfficientNet-Lite0 inference 2.7x as fast
    (experiments/results/onednn.md). TensorFlow reads the variable once, when imported.
    One operation at a time on a machine without an NVIDIA GPU (``TF_NUM_INTEROP_THREADS=1``,
    unless set; Intel's advice for oneDNN on one socket): each oneDNN kernel already uses
    every core, and TensorFlow's default ran a layer's two backward convolutions side by side,
    each at half speed with twice the threads. airbench94's bfloat16 step on a 2-core AVX512_BF16
    EPYC: 2,929 -> 2,412 ms (experiments/results/profile_onednn_airbench94_epyc_bf16*.md).
    And the deprecation warning Keras' legacy ImageDataGenerator triggers in SciPy once
    per image is silenced.
    """
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if not has_nvidia_device():
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    warnings.filterwarnings("ignore", message="Please import `affine_transform`", category=DeprecationWarning)
