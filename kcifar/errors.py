"""User-facing errors: one clear line, exit code 2, never a bare traceback."""

import functools
import sys


class KcifarError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""


def cli(main):
    """Wrap a command-line ``main`` so a KcifarError prints one line and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KcifarError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
