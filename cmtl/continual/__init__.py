"""Learning without forgetting: replay buffers, penalties (EWC, LwF), analytic heads and the update of a task."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmtl import _lazy

_EXPORTS = {
    **dict.fromkeys(("ClassBalancedBuffer", "ReplayBuffer", "ReservoirBuffer", "TaskBalancedBuffer", "make_buffer"),
                    "cmtl.continual.replay"),
    **dict.fromkeys(("AnalyticConfig", "MemoryConfig"), "cmtl.continual.config"),
    **dict.fromkeys(("Gate", "UpdateConfig"), "cmtl.continual.updates"),
}
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from cmtl.continual.config import AnalyticConfig, MemoryConfig
    from cmtl.continual.replay import (ClassBalancedBuffer, ReplayBuffer, ReservoirBuffer, TaskBalancedBuffer,
                                       make_buffer)
    from cmtl.continual.updates import Gate, UpdateConfig

__all__ = ["AnalyticConfig", "ClassBalancedBuffer", "Gate", "MemoryConfig", "ReplayBuffer", "ReservoirBuffer",
           "TaskBalancedBuffer", "UpdateConfig", "make_buffer"]
