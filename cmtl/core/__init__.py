"""The frozen backbone, tasks and their heads, LoRA adapters: what every phase builds on."""

from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import DEFAULT_BACKBONE, Backbone, BackboneConfig, load_backbone
from cmtl.core.tasks import TaskHead, TaskSpec

__all__ = ["AdapterBank", "AdapterConfig", "Backbone", "BackboneConfig", "DEFAULT_BACKBONE", "TaskHead", "TaskSpec",
           "load_backbone"]
