"""What a task remembers of its data (:class:`MemoryConfig`) and how an analytic head is computed
(:class:`AnalyticConfig`): plain dataclasses without torch, so a registry's manifest can be checked
against them without loading a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from cmtl._config import check_seed, known_keys, plain_numbers
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
        plain_numbers(self)
        if self.buffer not in _BUFFER_KINDS:
            raise InvalidParameterError(bad_param("buffer", "MemoryConfig", f"be one of {list(_BUFFER_KINDS)}",
                                                  self.buffer))
        for key in ("budget", "holdout"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(bad_param(key, "MemoryConfig", "be a positive integer", value))
        if not isinstance(self.features, bool):
            raise InvalidParameterError(bad_param("features", "MemoryConfig", "be True or False", self.features))
        check_seed(self.seed, "MemoryConfig")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoryConfig":
        return cls(**known_keys(cls, d))


AnalyticKind = Literal["slda", "ridge"]
_ANALYTIC_KINDS = get_args(AnalyticKind)
AnalyticFeatures = Literal["backbone", "adapter"]
_ANALYTIC_FEATURES = get_args(AnalyticFeatures)


@dataclass(frozen=True)
class AnalyticConfig:
    """How an analytic head turns features into scores (:mod:`cmtl.continual.analytic`).

    Args:
        kind: ``"slda"`` (class means and a shared covariance) or ``"ridge"`` (random projection with
            ReLU, then ridge regression; RanPAC).
        projection: Width M of the random projection (``"ridge"`` only). The statistics keep an M×M
            matrix in float64: 32 MiB per stored version at the default 2,048.
        shrinkage: SLDA's covariance is ``(1 − s)·Σ + s·(tr Σ / d)·I``, with 0 < s ≤ 1.
        seed: Seeds the random projection: a head and its later updates must use the same one.
        features: In a registry (``add_task(..., head=AnalyticConfig())``), what the head reads:
            ``"backbone"``, the frozen backbone's pooled features (no training at all), or ``"adapter"``,
            those of the task's LoRA adapter trained on its first data (with a linear head, as without
            ``head=``) and frozen from then on, so that later updates stay exact.
    """

    kind: AnalyticKind = "ridge"
    projection: int = 2048
    shrinkage: float = 1e-2
    seed: int = 0
    features: AnalyticFeatures = "backbone"

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.kind not in _ANALYTIC_KINDS:
            raise InvalidParameterError(bad_param("kind", "AnalyticConfig", f"be one of {list(_ANALYTIC_KINDS)}",
                                                  self.kind))
        if isinstance(self.projection, bool) or not isinstance(self.projection, int) or self.projection < 1:
            raise InvalidParameterError(bad_param("projection", "AnalyticConfig", "be a positive integer",
                                                  self.projection))
        if isinstance(self.shrinkage, bool) or not isinstance(self.shrinkage, (int, float)) or \
                not 0.0 < self.shrinkage <= 1.0:
            # 0 would leave the covariance singular whenever there are fewer rows than feature dimensions.
            raise InvalidParameterError(bad_param("shrinkage", "AnalyticConfig", "be in (0, 1]", self.shrinkage))
        check_seed(self.seed, "AnalyticConfig")
        if self.features not in _ANALYTIC_FEATURES:
            raise InvalidParameterError(bad_param("features", "AnalyticConfig",
                                                  f"be one of {list(_ANALYTIC_FEATURES)}", self.features))

    def width(self, hidden: int) -> int:
        """Width of the features the statistics are kept on, for pooled features ``hidden`` wide."""
        return self.projection if self.kind == "ridge" else hidden

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AnalyticConfig":
        return cls(**known_keys(cls, d))
