"""The error a user can fix. A command prints its message as one line and exits 2
(``kcifar.cli.command``), never a bare traceback."""


class KcifarError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""
