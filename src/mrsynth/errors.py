"""User-facing errors.

Every problem caused by the user's input or environment is raised as an
:class:`MrsynthError`: the CLI prints its message as one paragraph and exits
non-zero without a traceback (unless ``--debug``). Messages say which file,
what is wrong and what to do about it.
"""

from __future__ import annotations


class MrsynthError(Exception):
    """An error the user can act on; ``exit_code`` is what the CLI returns."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class DataError(MrsynthError):
    """Bad or unreadable input data (NIfTI, images, prepared files)."""


class ConfigError(MrsynthError):
    """Unknown preset, bad override, incompatible options."""


class RunError(MrsynthError):
    """A run directory or checkpoint that cannot be used as asked."""


class OutputExistsError(MrsynthError):
    """Refuse to overwrite earlier results unless the user says so."""


class OutputError(MrsynthError):
    """An output path that cannot be created or written (permissions, a file in the way,
    read-only or full file system)."""
