"""Expected errors: bad input, not bugs.

Every error a user can cause (a bad argument, an unreadable file, a training run that
diverges) is a :class:`PatchslimError`; the ``patchslim`` command reports these in one
line on stderr with exit code 2, and lets anything else (a bug) keep its traceback.

This module imports nothing from the package, so that every module can use it.
Subclasses that replace a ``ValueError`` raised before also derive from ``ValueError``,
so that code catching ``ValueError`` keeps working.
"""

from __future__ import annotations


class PatchslimError(Exception):
    """An expected error, reported to the user in one line (exit code 2 from the CLI)."""


class UsageError(PatchslimError, ValueError):
    """A bad argument or option value."""


class CheckpointError(PatchslimError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(PatchslimError, ValueError):
    """Input data that cannot be used: an unreadable image, an empty class folder."""


class ResumeError(PatchslimError, ValueError):
    """A run directory that cannot be resumed from."""


class OutputError(PatchslimError):
    """An output that cannot be written where asked (or would overwrite an input)."""


class NonFiniteError(PatchslimError, FloatingPointError):
    """Training, fine-tuning or slimming produced a NaN or infinite loss, gradient or
    error (usually a learning rate that is too high); nothing is written."""
