"""The command line's plumbing: one clear line and exit code 2 for a user error,
never a bare traceback; the process settings a command makes at start-up."""

import functools
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


def start_command():
    """Process settings of a ``python -m kcifar.<command>``, made before TensorFlow loads.

    TensorFlow's oneDNN CPU kernels (``TF_ENABLE_ONEDNN_OPTS=1``, unless set): TensorFlow
    enables them by itself only on CPUs with AVX-512 VNNI or newer, and they are faster on the
    AVX2 CPUs too (measured: experiments/results/onednn.md). TensorFlow reads the variable once,
    when imported.
    And the deprecation warning Keras' legacy ImageDataGenerator triggers in SciPy once
    per image is silenced.
    """
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    warnings.filterwarnings("ignore", message="Please import `affine_transform`", category=DeprecationWarning)


def run_worker(command: list, env: dict, what: str) -> str:
    """A benchmark's worker process run to its end; its stdout. A worker that fails becomes one
    line naming ``what`` it was and the worker's own last line of stderr (its error), not a traceback."""
    import subprocess

    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no output")
        raise KcifarError(f"{what} failed (exit {result.returncode}): {last.removeprefix('error: ')}")
    return result.stdout
