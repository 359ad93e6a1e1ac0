"""Exception types raised by cmtl.

Each subclasses the built-in a caller would catch anyway, so ``except KeyError``
keeps working, while ``except cmtl.CmtlError`` catches everything of ours.
"""

from __future__ import annotations

import pickle


class CmtlError(Exception):
    """Base class of every error cmtl raises on purpose."""


class _LookupKeyError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message quoted, as a key
        return str(self.args[0]) if self.args else ""


class TaskNotFoundError(CmtlError, _LookupKeyError):
    """A task (or version) name that the registry does not hold."""


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


class CorpusNotFoundError(CmtlError, _LookupKeyError):
    """A corpus name that :data:`cmtl.benchmarks.corpora.CORPORA` does not hold."""


class CorpusSourceError(CmtlError, RuntimeError):
    """The package holding a corpus is neither installed at its pinned version nor downloadable."""


class UnsafePickleError(CmtlError, pickle.UnpicklingError):
    """A third-party pickle that names something other than the data classes we allow."""


class ReplayBufferError(CmtlError, ValueError):
    """A bad buffer setting, or a buffer file that is missing, corrupt or not a buffer."""


class ManifestError(RegistryError):
    """A registry.json that parses but breaks the manifest's rules (a bad name, a missing or mistyped field)."""


#: The way out of a stored file that passed its checksum but does not fit what it claims to be.
STORED_FILE_FIX = ("The file was replaced or damaged (and its checksum rewritten); roll the task back to another "
                   "version, or retrain it (remove_merge and merge again for a merged entry).")
