"""One command-line convention: the flags the commands share, defined once, the ``kcifar`` command,
and the plumbing every command's ``main`` has (``command``: one line and exit 2 for a user error;
``start_command``: the process settings made before TensorFlow loads; ``run_worker``).

``kcifar train ...`` is ``python -m kcifar.train ...``; likewise every command in ``COMMANDS``. A shared
flag (``--data-dir``, ``--runs-dir``, ``--overwrite``, ``--seed``, ``--quiet`` / ``--verbose``) means the
same in every command that takes it, and ``--help`` shows each option's default and choices.
"""

import argparse
import functools
import importlib
import os
import subprocess
import sys
import warnings

from kcifar import fileio
from kcifar.errors import KcifarError

COMMANDS = {  # kcifar <name> -> the module whose main() it runs
    "train": "kcifar.train", "finetune": "kcifar.finetune", "evaluate": "kcifar.evaluate",
    "predict": "kcifar.predict", "export": "kcifar.export", "sweep": "kcifar.sweep.__main__",
    "report": "kcifar.report", "models": "kcifar.models.__main__", "data": "kcifar.data",
    "augment": "kcifar.augment.__main__",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default (those that say nothing, None and False, left out)."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], argparse.SUPPRESS) or action.dest == "log":
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, description: str, shared=(), log_default="epochs") -> argparse.ArgumentParser:
    """An ArgumentParser for ``python -m kcifar.<prog>`` with the ``shared`` flags: any of ``data_dir``,
    ``runs_dir``, ``overwrite``, ``seed`` and ``log`` (``--quiet`` / ``--verbose``, default ``log_default``:
    "epochs" logs each epoch, "quiet" nothing; read it with ``keras_verbosity``)."""
    made = argparse.ArgumentParser(prog=f"python -m kcifar.{prog}", description=description,
                                   formatter_class=HelpFormatter)
    unknown = set(shared) - set(_SHARED)
    if unknown:
        raise ValueError(f"unknown shared flags {unknown}")
    for name in shared:
        _SHARED[name](made, log_default)
    return made


def _log_flags(made, default):
    group = made.add_mutually_exclusive_group()
    group.add_argument("--quiet", "-q", dest="log", action="store_const", const="quiet", default=default,
                       help="no per-epoch log" + (" (the default)" if default == "quiet" else ""))
    group.add_argument("--verbose", "-v", dest="log", action="store_const", const="epochs",
                       help="Keras' per-epoch log" + (" (the default)" if default == "epochs" else ""))


_SHARED = {
    "data_dir": lambda p, _: p.add_argument(
        "--data-dir", help="folder holding the CIFAR data (default: $KCIFAR_DATA_DIR, then the Keras cache)"),
    "runs_dir": lambda p, _: p.add_argument("--runs-dir", default="runs", help="where run directories go"),
    "overwrite": lambda p, _: p.add_argument("--overwrite", action="store_true",
                                             help="replace a finished run (or output) of the same name"),
    "seed": lambda p, _: p.add_argument("--seed", type=int, help="random seed (sets the recipe's seed, default 0)"),
    "log": _log_flags,
}


def keras_verbosity(args) -> int:
    """Keras' ``verbose`` for ``args.log``: 0 when quiet, a live bar on a terminal, else a line per epoch."""
    return 0 if args.log == "quiet" else (1 if sys.stdout.isatty() else 2)


def main(argv=None):
    """``kcifar COMMAND [ARGS]``: the command's own ``main`` with ARGS, after the commands' start-up settings."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=out)
        print("usage: kcifar COMMAND [ARGS]   (kcifar COMMAND --help for its options)\ncommands: "
              + ", ".join(COMMANDS), file=out)
        raise SystemExit(0 if out is sys.stdout else 2)
    start_command()  # before TensorFlow loads, as python -m kcifar.<command> does
    module = importlib.import_module(COMMANDS[argv[0]])
    sys.argv[0] = f"kcifar {argv[0]}"
    return module.main(argv[1:])


def command(main):
    """Wrap a command-line ``main`` so a KcifarError, or a full disk anywhere (Keras' own
    writers included), prints one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
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
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no output")
        raise KcifarError(f"{what} failed (exit {result.returncode}): {last.removeprefix('error: ')}")
    return result.stdout
