"""Training one adapter and head: the loop, evaluation, the frozen-layer cache, data-parallel helpers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cmtl import _lazy

_EXPORTS = {"TrainConfig": "cmtl.training.config",
            **dict.fromkeys(("TrainResult", "get_lr", "seeded", "train"), "cmtl.training.loop")}
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from cmtl.training.config import TrainConfig
    from cmtl.training.loop import TrainResult, get_lr, seeded, train

__all__ = ["TrainConfig", "TrainResult", "get_lr", "seeded", "train"]
