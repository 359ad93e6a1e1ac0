"""cmtl: continual multi-task learning for text.

One frozen pretrained transformer, and a registry that grows one LoRA adapter
and head per task::

    from cmtl import Registry, TaskSpec
    reg = Registry.create("runs/reg")
    reg.add_task(TaskSpec("spam", labels=["ham", "spam"]), train=train, validation=val)
    reg.predict("spam", ["WIN a free phone now!!!"])
"""

from cmtl._version import __version__
from cmtl.adapters import AdapterConfig
from cmtl.backbone import BackboneConfig
from cmtl.errors import (
    BackboneMismatchError,
    CmtlError,
    CorruptFileError,
    DataError,
    ManifestError,
    RegistryError,
    ReplayBufferError,
    TaskExistsError,
    TaskNotFoundError,
    TrainingDivergedError,
)
from cmtl.merging import MergeConfig
from cmtl.metrics import ContinualReport, acc, bwt, forgetting, fwt
from cmtl.monitor import DriftMonitor, DriftReport, MonitorConfig
from cmtl.registry import Registry, UpdateResult, VersionInfo
from cmtl.replay import ClassBalancedBuffer, ReplayBuffer, ReservoirBuffer, TaskBalancedBuffer, make_buffer
from cmtl.tasks import TaskSpec
from cmtl.training import TrainConfig
from cmtl.updates import MemoryConfig, UpdateConfig

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
    "ManifestError",
    "MemoryConfig",
    "MergeConfig",
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
    "__version__",
    "acc",
    "bwt",
    "forgetting",
    "fwt",
    "make_buffer",
]
