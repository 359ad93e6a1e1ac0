"""Training one adapter and head: the loop, evaluation, the frozen-layer cache, data-parallel helpers."""

from cmtl.training.loop import TrainConfig, TrainResult, get_lr, seeded, train

__all__ = ["TrainConfig", "TrainResult", "get_lr", "seeded", "train"]
