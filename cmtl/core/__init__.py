"""The frozen backbone, tasks and their heads, LoRA adapters: what every phase builds on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmtl import _lazy

_EXPORTS = {
    **dict.fromkeys(("AdapterConfig", "BackboneConfig", "DEFAULT_BACKBONE"), "cmtl.core.config"),
    **dict.fromkeys(("AdapterBank", "TaskLoRA", "add_row_lora", "hook_row_lora", "lora_factors",
                     "lora_shapes", "lora_state"), "cmtl.core.adapters"),
    **dict.fromkeys(("Backbone", "load_backbone"), "cmtl.core.backbone"),
    "TaskHead": "cmtl.core.heads",
    "TaskSpec": "cmtl.core.tasks",
}
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from cmtl.core.adapters import (AdapterBank, TaskLoRA, add_row_lora, hook_row_lora, lora_factors,
                                    lora_shapes, lora_state)
    from cmtl.core.backbone import Backbone, load_backbone
    from cmtl.core.config import DEFAULT_BACKBONE, AdapterConfig, BackboneConfig
    from cmtl.core.heads import TaskHead
    from cmtl.core.tasks import TaskSpec

__all__ = ["AdapterBank", "AdapterConfig", "Backbone", "BackboneConfig", "DEFAULT_BACKBONE", "TaskHead", "TaskLoRA",
           "TaskSpec", "add_row_lora", "hook_row_lora", "load_backbone", "lora_factors", "lora_shapes", "lora_state"]
