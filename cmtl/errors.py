"""Exception types raised by cmtl.

Each subclasses the built-in a caller would catch anyway, so ``except KeyError``
keeps working, while ``except cmtl.CmtlError`` catches everything of ours.
"""

from __future__ import annotations


class CmtlError(Exception):
    """Base class of every error cmtl raises on purpose."""


class TaskNotFoundError(CmtlError, KeyError):
    """A task (or version) name that the registry does not hold."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class TaskExistsError(CmtlError, ValueError):
    """Adding a task whose name is already taken."""


class DataError(CmtlError, ValueError):
    """Training or evaluation data that cannot be used as given."""


class BackboneMismatchError(CmtlError, ValueError):
    """A registry opened with another backbone than the one it was built on."""


class BackboneNotFoundError(CmtlError, FileNotFoundError):
    """A backbone that cannot be loaded from local files."""


class RegistryError(CmtlError, RuntimeError):
    """A registry folder that is missing, locked, or not a registry."""


class CorruptFileError(CmtlError, OSError):
    """A stored file whose checksum does not match the manifest."""


class TrainingDivergedError(CmtlError, FloatingPointError):
    """Training produced a non-finite loss; nothing was written."""
