"""One command-line convention: the flags the commands share, defined once, and the ``kcifar`` command.

``kcifar train ...`` is ``python -m kcifar.train ...``; likewise every command in ``COMMANDS``. A shared
flag (``--data-dir``, ``--runs-dir``, ``--overwrite``, ``--seed``, ``--quiet`` / ``--verbose``) means the
same in every command that takes it, and ``--help`` shows each option's default and choices.
"""

import argparse
import importlib
import sys

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
    from kcifar.errors import start_command

    start_command()  # before TensorFlow loads, as python -m kcifar.<command> does
    module = importlib.import_module(COMMANDS[argv[0]])
    sys.argv[0] = f"kcifar {argv[0]}"
    return module.main(argv[1:])
