"""cmtl: continual multi-task learning for text.

One frozen pretrained transformer, and a registry that grows one LoRA adapter
and head per task::

    from cmtl import Registry, TaskSpec
    reg = Registry.create("runs/reg")
    reg.add_task(TaskSpec("spam", labels=["ham", "spam"]), train=train, validation=val)
    reg.predict("spam", ["WIN a free phone now!!!"])
"""

from cmtl import _moved
from cmtl._version import __version__
from cmtl.benchmarks.metrics import ContinualReport, acc, bwt, forgetting, fwt
from cmtl.continual.replay import ClassBalancedBuffer, ReplayBuffer, ReservoirBuffer, TaskBalancedBuffer, make_buffer
from cmtl.continual.updates import MemoryConfig, UpdateConfig
from cmtl.core.adapters import AdapterConfig
from cmtl.core.backbone import BackboneConfig
from cmtl.core.tasks import TaskSpec
from cmtl.errors import (
    BackboneMismatchError,
    CmtlError,
    CorruptFileError,
    DataError,
    EntryExistsError,
    InvalidParameterError,
    ManifestError,
    MergeRefusedError,
    RegistryError,
    ReplayBufferError,
    TaskExistsError,
    TaskNotFoundError,
    TrainingDivergedError,
    WriteConflictError,
)
from cmtl.merging.methods import MergeConfig
from cmtl.monitoring.drift import DriftMonitor, DriftReport, MonitorConfig
from cmtl.registry import Registry, UpdateResult, VersionInfo
from cmtl.training.loop import TrainConfig

_moved.install()

__all__ = [
    "AdapterConfig",
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
