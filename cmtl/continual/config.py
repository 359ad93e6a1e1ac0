"""What a task remembers of its data (:class:`MemoryConfig`): a plain dataclass without torch, so a
registry's manifest can be checked against it without loading a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from cmtl._config import known_keys
from cmtl.errors import InvalidParameterError, bad_param

BufferKind = Literal["reservoir", "class_balanced", "task_balanced"]
_BUFFER_KINDS = get_args(BufferKind)


@dataclass(kw_only=True, frozen=True)
class MemoryConfig:
    """What a task remembers of its data, per version (chosen when the task is added).

    Args:
        buffer: Replay buffer kind: ``"class_balanced"``, ``"reservoir"`` or ``"task_balanced"``.
        budget: Training examples the replay buffer keeps.
        holdout: Validation examples kept per version: the old-distribution
            check of later updates and the drift monitor's reference.
        seed: Seeds which examples are kept.
        features: Also keep what training computed on those rows (``features.safetensors``: the frozen
            backbone's pooled features of the buffer and held-out rows, the version's logits on its
            lineage's held-out rows; 4 bytes per number), so that merges need not run them again
            (:mod:`cmtl.registry.features`).
    """

    buffer: BufferKind = "class_balanced"
    budget: int = 1000
    holdout: int = 1000
    seed: int = 0
    features: bool = True

    def __post_init__(self) -> None:
        if self.buffer not in _BUFFER_KINDS:
            raise InvalidParameterError(bad_param("buffer", "MemoryConfig", f"be one of {list(_BUFFER_KINDS)}",
                                                  self.buffer))
        for key in ("budget", "holdout"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(bad_param(key, "MemoryConfig", "be a positive integer", value))
        if not isinstance(self.features, bool):
            raise InvalidParameterError(bad_param("features", "MemoryConfig", "be True or False", self.features))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoryConfig":
        return cls(**known_keys(cls, d))
