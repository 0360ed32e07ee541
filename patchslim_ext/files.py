"""Writing a file all at once: a reader sees the old file or the complete new one.

:func:`atomic_write` is the one way the package writes its outputs (checkpoints, ONNX
files, JSON and Markdown reports, a slimming run's state). A process killed in the
middle of a write leaves at most a ``<name>.partial`` file beside the target, never a
truncated target.

This module imports nothing from torch or the rest of the package, so that every
module (and the torch-free command-line parser) can use it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["PARTIAL_SUFFIX", "atomic_write"]

PARTIAL_SUFFIX = ".partial"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(partial)``, which writes the file it is given.

    ``partial`` is ``<name>.partial`` in the same directory (a rename within a
    directory is atomic on POSIX and Windows). Once ``write`` returns, the partial file
    gets the permissions that ``open()`` gives a new file (0644 under umask 022, even
    if the writer made it private, as safetensors does), is flushed to disk (fsync) and
    renamed over ``path``; the rename is then flushed too where the system allows it.
    On any failure, an interrupt included, the partial file is removed, ``path`` is
    left as it was and the exception propagates. Returns ``path`` as a :class:`Path`.
    The directory must exist.
    """
    path = Path(path)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        # Created here, by open(), for the mode a new file gets (the umask applied, a
        # default ACL honoured); the writer may replace it with a private file.
        with open(partial, "wb") as handle:
            mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        write(partial)
        os.chmod(partial, mode)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)
    return path


def _sync_directory(directory: Path) -> None:
    """Flush a directory's entries (the rename) to disk. Best effort: the file is
    complete either way, and some systems (Windows) cannot open a directory."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
