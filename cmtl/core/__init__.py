"""The frozen backbone, tasks and their heads, LoRA adapters: what every phase builds on."""

from cmtl.core.adapters import (
    AdapterBank,
    AdapterConfig,
    TaskLoRA,
    add_row_lora,
    hook_row_lora,
    lora_factors,
    lora_shapes,
    lora_state,
)
from cmtl.core.backbone import DEFAULT_BACKBONE, Backbone, BackboneConfig, load_backbone
from cmtl.core.tasks import TaskHead, TaskSpec

__all__ = ["AdapterBank", "AdapterConfig", "Backbone", "BackboneConfig", "DEFAULT_BACKBONE", "TaskHead", "TaskLoRA",
           "TaskSpec", "add_row_lora", "hook_row_lora", "load_backbone", "lora_factors", "lora_shapes", "lora_state"]
