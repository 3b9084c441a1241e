"""Files: atomic writes (a reader sees the old file or the whole new one, never half)
and the Keras home where caches go."""

import contextlib
import hashlib
import errno
import json
import os
import re
import secrets
from pathlib import Path

from kcifar.errors import KcifarError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Use for writers that want a file name (``model.save``, ``savefig``, ``np.savez``).
    The temporary name keeps the target's suffixes so such writers pick the right format.
    A writer that fails may leave its file open (Keras' HDF5 store does, on a full disk):
    the temporary is emptied, so closing it later (at exit, HDF5 flushes it) finds room.
    """
    path = Path(path)
    suffixes = "".join(path.suffixes)  # all of them: Keras wants ``.weights.h5``
    tmp = path.with_name(f".{path.name[:len(path.name) - len(suffixes)]}.{secrets.token_hex(4)}{suffixes}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
    except OSError as error:
        raise KcifarError(f"cannot write {path}: {error.strerror}; choose a writable directory") from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:  # a full disk, or ``path`` is a folder: the old file stays as it was
        with contextlib.suppress(OSError):
            os.truncate(tmp, 0)  # its space back now: the writer may hold it open (see below)
        raise KcifarError(write_error(path, error)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


TEMPORARY = re.compile(r"^\.[^.]+\.[0-9a-f]{8}(\.[^.]+)*$")  # atomic_path's names: .<stem>.<8 hex><suffixes>


def remove_temporaries(folder):
    """Delete the temporary files ``atomic_path`` left under ``folder``, its writer killed while
    writing (a kill skips the clean-up). Only for a folder no other process writes now (a locked run)."""
    for path in Path(folder).rglob(".*"):
        if TEMPORARY.match(path.name) and path.is_file():
            path.unlink()


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def is_full_disk(error: OSError) -> bool:
    """Whether ``error`` says the disk (or the user's quota) is full; h5py's messages carry only the text."""
    return error.errno in FULL_DISK or "No space left on device" in str(error)


def write_error(path, error: OSError) -> str:
    """The one line for a write that failed: what happened and what to do."""
    if is_full_disk(error):
        return (f"cannot write {path}: no space left on device; free some space and run the same command "
                "again (a stopped run resumes at its last finished epoch)")
    return f"cannot write {path}: {error.strerror or error}; choose a writable place"


def check_writable(folder, flag="the output folder"):
    """Refuse, before any work, a folder that cannot be created or written (``flag`` names the option).
    Creates nothing: the nearest existing parent must be a writable folder."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise KcifarError(f"cannot write {folder}: {path} is not a writable folder; choose another {flag}")


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def keras_home() -> Path:
    """Keras' folder for caches: ``$KERAS_HOME`` when set and not empty, else ``~/.keras``."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def cache_dir() -> Path:
    """kcifar's caches (converted weights, fine-tune features): ``<Keras home>/kcifar``."""
    return keras_home() / "kcifar"
