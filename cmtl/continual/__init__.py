"""Learning without forgetting: replay buffers, penalties (EWC, LwF) and the update of a task."""

from cmtl.continual.replay import ClassBalancedBuffer, ReplayBuffer, ReservoirBuffer, TaskBalancedBuffer, make_buffer
from cmtl.continual.updates import Gate, MemoryConfig, UpdateConfig

__all__ = ["ClassBalancedBuffer", "Gate", "MemoryConfig", "ReplayBuffer", "ReservoirBuffer", "TaskBalancedBuffer",
           "UpdateConfig", "make_buffer"]
