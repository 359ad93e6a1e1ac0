"""Settings and the promotion rule for updating a task on new data.

:meth:`cmtl.Registry.update_task` trains a candidate version from the current
one; :func:`decide` says whether it becomes current. The registry keeps, per
version, a replay buffer of training examples and a held-out sample of that
version's validation data (:class:`MemoryConfig`); the held-out samples of a
version's lineage are the "old distribution" a candidate must not forget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from cmtl.continual.replay import Kind

Penalty = Literal["none", "ewc", "lwf"]
_BUFFER_KINDS = ("reservoir", "class_balanced", "task_balanced")


@dataclass(kw_only=True, frozen=True)
class MemoryConfig:
    """What a task remembers of its data, per version (chosen when the task is added).

    Args:
        buffer: Replay buffer kind: ``"class_balanced"``, ``"reservoir"`` or ``"task_balanced"``.
        budget: Training examples the replay buffer keeps.
        holdout: Validation examples kept per version: the old-distribution
            check of later updates and the drift monitor's reference.
        seed: Seeds which examples are kept.
    """

    buffer: Kind = "class_balanced"
    budget: int = 1000
    holdout: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.buffer not in _BUFFER_KINDS:
            raise ValueError(f"MemoryConfig.buffer must be one of {list(_BUFFER_KINDS)}. Got {self.buffer!r}.")
        for key in ("budget", "holdout"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MemoryConfig.{key} must be a positive integer. Got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MemoryConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(kw_only=True, frozen=True)
class UpdateConfig:
    """How :meth:`cmtl.Registry.update_task` trains and judges a candidate version.

    Args:
        replay_ratio: Replayed buffer examples per new training example
            (0 trains on the new data only).
        penalty: ``"ewc"`` (quadratic pull towards the previous version,
            weighted by its Fisher diagonal on replayed/held-out old data) or
            ``"lwf"`` (distil the previous version's outputs on the new data);
            ``"none"`` for neither.
        penalty_weight: λ of the penalty; ``None`` uses 1000 for EWC and 1 for LwF.
        temperature: LwF softmax temperature.
        fisher_examples: Old examples used to estimate the EWC Fisher diagonal.
        tolerance: Largest drop of the primary metric on the old distribution
            that still allows promotion (0.01 = one accuracy point).
        validation_fraction: Share of the new data held out for validation when
            no validation data is given.
    """

    replay_ratio: float = 1.0
    penalty: Penalty = "none"
    penalty_weight: float | None = None
    temperature: float = 2.0
    fisher_examples: int = 256
    tolerance: float = 0.01
    validation_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not self.replay_ratio >= 0:
            raise ValueError(f"UpdateConfig.replay_ratio must be >= 0. Got {self.replay_ratio!r}.")
        if self.penalty not in ("none", "ewc", "lwf"):
            raise ValueError(f"UpdateConfig.penalty must be 'none', 'ewc' or 'lwf'. Got {self.penalty!r}.")
        if self.penalty_weight is not None and not self.penalty_weight >= 0:
            raise ValueError(f"UpdateConfig.penalty_weight must be >= 0. Got {self.penalty_weight!r}.")
        if not self.temperature > 0:
            raise ValueError(f"UpdateConfig.temperature must be > 0. Got {self.temperature!r}.")
        if not self.tolerance >= 0:
            raise ValueError(f"UpdateConfig.tolerance must be >= 0. Got {self.tolerance!r}.")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"UpdateConfig.validation_fraction must be in (0, 1). Got {self.validation_fraction!r}.")

    @property
    def weight(self) -> float:
        if self.penalty_weight is not None:
            return self.penalty_weight
        return 1000.0 if self.penalty == "ewc" else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """The evidence for (or against) promoting a candidate version.

    ``*_old`` are scores on the held-out data of the versions so far, ``*_new``
    on the new validation data; ``None`` where there is no such data.
    """

    metric: str
    higher_is_better: bool
    parent_new: float
    candidate_new: float
    parent_old: float | None
    candidate_old: float | None
    tolerance: float

    def decide(self) -> tuple[bool, str]:
        """(promote?, the reason in one sentence)."""
        sign = 1.0 if self.higher_is_better else -1.0
        gain = sign * (self.candidate_new - self.parent_new)
        m = self.metric
        if gain <= 0:
            return False, (f"not promoted: {m} on the new data did not improve "
                           f"({self.parent_new:.4f} -> {self.candidate_new:.4f})")
        if self.parent_old is None or self.candidate_old is None:
            return True, (f"promoted: {m} on the new data {self.parent_new:.4f} -> {self.candidate_new:.4f}; "
                          "no held-out data of earlier versions to check forgetting against")
        drop = sign * (self.parent_old - self.candidate_old)
        if drop > self.tolerance:
            return False, (f"not promoted: {m} on earlier data dropped by {drop:.4f} "
                           f"({self.parent_old:.4f} -> {self.candidate_old:.4f}), more than the tolerance "
                           f"{self.tolerance:.4f}")
        return True, (f"promoted: {m} on the new data {self.parent_new:.4f} -> {self.candidate_new:.4f}, "
                      f"on earlier data {self.parent_old:.4f} -> {self.candidate_old:.4f} "
                      f"(tolerance {self.tolerance:.4f})")

    def to_metrics(self) -> dict[str, float]:
        out = {f"parent_new_{self.metric}": self.parent_new, f"new_{self.metric}": self.candidate_new}
        if self.parent_old is not None and self.candidate_old is not None:
            out.update({f"parent_old_{self.metric}": self.parent_old, f"old_{self.metric}": self.candidate_old})
        return out
