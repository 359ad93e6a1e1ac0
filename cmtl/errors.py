"""Exception types raised by cmtl.

Each subclasses the built-in a caller would catch anyway, so ``except KeyError``
keeps working, while ``except cmtl.CmtlError`` catches everything of ours.
"""

from __future__ import annotations

import pickle
from typing import Any


class CmtlError(Exception):
    """Base class of every error cmtl raises on purpose."""


class _LookupKeyError(KeyError):
    def __str__(self) -> str:  # KeyError would print the message quoted, as a key
        return str(self.args[0]) if self.args else ""


class TaskNotFoundError(CmtlError, _LookupKeyError):
    """A task (or version) name that the registry does not hold."""


class TaskExistsError(CmtlError, ValueError):
    """Adding a task whose name is already taken."""


class EntryExistsError(CmtlError, ValueError):
    """Writing a merged or joint entry under a name the registry already holds (or another writer took
    while this one ran)."""


class InvalidParameterError(CmtlError, ValueError):
    """A parameter (of a config, a spec or a call) outside its allowed values; the message is
    :func:`bad_param`'s."""


class DataError(CmtlError, ValueError):
    """Training or evaluation data that cannot be used as given."""


class MergeRefusedError(CmtlError, ValueError):
    """A merge asked to beat the frozen backbone (``MergeConfig(require_gain=True)``) that does not;
    nothing was written."""


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


class NonFiniteOutputError(CmtlError, FloatingPointError):
    """A model gave outputs that answer nothing (NaN, or an infinite logit that makes softmax NaN) for some
    inputs; no prediction is returned for them."""


class CorpusNotFoundError(CmtlError, _LookupKeyError):
    """A corpus name that :data:`cmtl.benchmarks.corpora.CORPORA` does not hold."""


class CorpusSourceError(CmtlError, RuntimeError):
    """The package holding a corpus is neither installed at its pinned version nor downloadable."""


class UnsafePickleError(CmtlError, pickle.UnpicklingError):
    """A third-party pickle that names something other than the data classes we allow."""


class ReplayBufferError(CmtlError, ValueError):
    """A bad buffer setting, or a buffer file that is missing, corrupt or not a buffer."""


class MissingExtraError(CmtlError, ImportError):
    """A feature needs a package that cmtl's core install leaves out; the message names the extra."""


class ManifestError(RegistryError):
    """A registry.json that parses but breaks the manifest's rules (a bad name, a missing or mistyped field)."""


class WriteConflictError(RegistryError):
    """Another writer changed what this write started from (wrote the same version, or removed a task and
    added it again) while it ran; nothing was written. Reopen the registry and retry."""


def bad_param(name: str, owner: str, must: str, got: Any, fix: str = "") -> str:
    """The message for a parameter that breaks its rule, in one style:
    ``The 'name' parameter of owner must <must>; got <repr(got)> instead. <fix>``.

    Args:
        name: The parameter, e.g. ``"epochs"``.
        owner: What takes it, e.g. ``"TrainConfig"`` or ``"TaskSpec 'spam'"``.
        must: The rule, starting with its verb: ``"be a positive integer"``, ``"hold distinct labels"``.
        got: The value given; shown with ``repr``.
        fix: Optional sentence on how to fix it, appended as is.
    """
    message = f"The {name!r} parameter of {owner} must {must}; got {got!r} instead."
    return f"{message} {fix}" if fix else message


#: The way out of a stored file that passed its checksum but does not fit what it claims to be.
STORED_FILE_FIX = ("The file was replaced or damaged (and its checksum rewritten); roll the task back to another "
                   "version, or retrain it (remove_merge and merge again for a merged entry).")
