"""cmtl: continual multi-task learning for text.

One frozen pretrained transformer, and a registry that grows one LoRA adapter
and head per task::

    from cmtl import Registry, TaskSpec
    reg = Registry.create("runs/reg")
    reg.add_task(TaskSpec("spam", labels=["ham", "spam"]), train=train, validation=val)
    reg.predict("spam", ["WIN a free phone now!!!"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmtl import _lazy, _moved
from cmtl._version import __version__

#: Public name -> the module that defines it. Imported on first use (PEP 562), so ``import cmtl`` and
#: the CLI's manifest-only commands do not pay for torch, transformers and datasets.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("ContinualReport", "acc", "bwt", "forgetting", "fwt"), "cmtl.benchmarks.metrics"),
    **dict.fromkeys(("ClassBalancedBuffer", "ReplayBuffer", "ReservoirBuffer", "TaskBalancedBuffer", "make_buffer"),
                    "cmtl.continual.replay"),
    **dict.fromkeys(("AnalyticConfig", "MemoryConfig"), "cmtl.continual.config"),
    "UpdateConfig": "cmtl.continual.updates",
    **dict.fromkeys(("AdapterConfig", "BackboneConfig"), "cmtl.core.config"),
    "TaskSpec": "cmtl.core.tasks",
    **dict.fromkeys(("BackboneMismatchError", "CmtlError", "CorruptFileError", "DataError", "EntryExistsError",
                     "InvalidParameterError", "ManifestError", "MergeRefusedError", "NonFiniteOutputError",
                     "RegistryError", "ReplayBufferError", "TaskExistsError", "TaskNotFoundError",
                     "TrainingDivergedError", "WriteConflictError"), "cmtl.errors"),
    "MergeConfig": "cmtl.merging.methods",
    **dict.fromkeys(("DriftMonitor", "DriftReport", "MonitorConfig"), "cmtl.monitoring.drift"),
    **dict.fromkeys(("Registry", "UpdateResult", "VersionInfo"), "cmtl.registry"),
    "TrainConfig": "cmtl.training.config",
}

__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports the lazy ones stand for
    from cmtl.benchmarks.metrics import ContinualReport, acc, bwt, forgetting, fwt
    from cmtl.continual.replay import (ClassBalancedBuffer, ReplayBuffer, ReservoirBuffer, TaskBalancedBuffer,
                                       make_buffer)
    from cmtl.continual.config import AnalyticConfig, MemoryConfig
    from cmtl.continual.updates import UpdateConfig
    from cmtl.core.config import AdapterConfig, BackboneConfig
    from cmtl.core.tasks import TaskSpec
    from cmtl.errors import (BackboneMismatchError, CmtlError, CorruptFileError, DataError, EntryExistsError,
                             InvalidParameterError, ManifestError, MergeRefusedError, NonFiniteOutputError,
                             RegistryError, ReplayBufferError, TaskExistsError, TaskNotFoundError,
                             TrainingDivergedError, WriteConflictError)
    from cmtl.merging.methods import MergeConfig
    from cmtl.monitoring.drift import DriftMonitor, DriftReport, MonitorConfig
    from cmtl.registry import Registry, UpdateResult, VersionInfo
    from cmtl.training.config import TrainConfig

_moved.install()

__all__ = [
    "AdapterConfig",
    "AnalyticConfig",
    "BackboneConfig",
    "BackboneMismatchError",
    "ClassBalancedBuffer",
    "CmtlError",
    "ContinualReport",
    "CorruptFileError",
    "DataError",
    "DriftMonitor",
    "DriftReport",
    "EntryExistsError",
    "InvalidParameterError",
    "ManifestError",
    "MemoryConfig",
    "MergeConfig",
    "MergeRefusedError",
    "MonitorConfig",
    "NonFiniteOutputError",
    "Registry",
    "RegistryError",
    "ReplayBuffer",
    "ReplayBufferError",
    "ReservoirBuffer",
    "TaskBalancedBuffer",
    "TaskExistsError",
    "TaskNotFoundError",
    "TaskSpec",
    "TrainConfig",
    "TrainingDivergedError",
    "UpdateConfig",
    "UpdateResult",
    "VersionInfo",
    "WriteConflictError",
    "__version__",
    "acc",
    "bwt",
    "forgetting",
    "fwt",
    "make_buffer",
]
