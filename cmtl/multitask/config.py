"""What a joint multi-task run is told (:class:`MultiTaskConfig`) and what it reports (:class:`MultiTaskResult`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

from cmtl._config import plain_numbers, refuse_unread, set_fields
from cmtl.errors import InvalidParameterError, bad_param
from cmtl.multitask.schedules import Sampler, diminish, switch

Weighting = Literal["static", "uncertainty"]
Schedule = Literal["none", "diminish", "switch", "adaptive_switch"]


@dataclass(kw_only=True, frozen=True)
class MultiTaskConfig:
    """How a group of tasks trains together.

    Args:
        sampler: How rows of a mixed batch pick their task (see
            :func:`~cmtl.multitask.schedules.sampling_probabilities`); ``"per_task"``: every step
            holds ``batch_size`` rows of each task whose weight is not 0 (after a Switch, a step is
            a single-task step).
        temperature: Temperature of the ``"temperature"`` sampler (refused beside another).
        size_cap: Cap on task sizes before sampling (``"proportional"``, ``"temperature"``); ``None`` no cap.
        sampling_schedule: A time-dependent sampler: ``f(step, total_steps)`` returns a weight
            >= 0 per task (in task order), normalised into that step's probabilities; it replaces
            the fixed probabilities of ``sampler`` (which must then draw, i.e. not be
            ``"per_task"``). Registry records store its name.
        weighting: ``"static"`` (``weights``, default 1 each) or ``"uncertainty"``.
        weights: Static loss weight per task name, finite and >= 0 (0 leaves the task out of the batches;
            with a ``schedule``, of the primary only; not with uncertainty weighting).
        primary: MT2ST: the primary task; the others are auxiliary and weighted by ``schedule``.
        schedule: ``"none"``, ``"diminish"``, ``"switch"`` (at ``switch_step``) or
            ``"adaptive_switch"`` (auxiliaries stop when the primary validation metric has not
            improved for ``switch_patience`` evaluations; needs the primary's validation data).
        gamma0: Initial auxiliary weight γ_k,0 (Diminish, Switch), per task name or one value for all.
        eta: Diminish decay rate η_k, per task name or one value. A task a dict leaves out gets the
            knob's default (gamma0 1, eta 0.01, nu 1).
        nu: Diminish curvature ν_k, per task name or one value.
        switch_step: Step at which Switch drops the auxiliaries.
        switch_patience: Evaluations without improvement before the adaptive switch fires.
        tag_every: Measure TAG lookahead affinities every this many steps; ``None`` never.
        steps: Optimiser steps; ``None``: epochs of the primary task (or of the largest task).
        epochs: Used when ``steps`` is ``None`` (refused beside ``steps``).
        eval_every: Evaluate every task's validation data every this many steps; ``None``: 10 times.
        pass_overhead: Each mixed batch runs through the backbone in length-sorted sub-batches
            that minimise padded tokens plus this many tokens per pass (its fixed cost; see
            :func:`~cmtl.data.examples.padding_chunks`), so a few long texts of one task do not pad the
            short texts of the others; ``None``: one pass per batch. Same loss and gradients up
            to float rounding (adapter dropout draws differ).
    """

    sampler: Sampler = "temperature"
    temperature: float = 2.0
    size_cap: int | None = None
    sampling_schedule: Callable[[int, int], Sequence[float]] | None = None
    weighting: Weighting = "static"
    weights: dict[str, float] | None = None
    primary: str | None = None
    schedule: Schedule = "none"
    gamma0: float | dict[str, float] = 1.0
    eta: float | dict[str, float] = 0.01
    nu: float | dict[str, float] = 1.0
    switch_step: int | None = None
    switch_patience: int = 2
    tag_every: int | None = None
    steps: int | None = None
    epochs: int = 3
    eval_every: int | None = None
    pass_overhead: int | None = 512

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.schedule != "none" and self.primary is None:
            raise ValueError(f"schedule={self.schedule!r} needs a primary task: set MultiTaskConfig.primary.")
        if self.schedule == "switch" and self.switch_step is None:
            raise ValueError("schedule='switch' needs switch_step (the step at which auxiliaries stop).")
        if self.sampling_schedule is not None:
            if not callable(self.sampling_schedule):
                raise InvalidParameterError(bad_param(
                    "sampling_schedule", "MultiTaskConfig", "be a function (step, total_steps) -> weights per task",
                    self.sampling_schedule))
            if self.sampler == "per_task":
                raise ValueError("sampler='per_task' takes a full batch of every task each step, so there is nothing "
                                 "for sampling_schedule to weigh: use sampler='uniform' (or another drawing sampler) "
                                 "with a schedule.")
        if self.weighting == "uncertainty" and self.schedule != "none":
            raise ValueError("Uncertainty weighting learns every task's weight; it cannot run with an MT2ST schedule.")
        if self.weights and self.weighting == "uncertainty":
            raise ValueError(f"weights={self.weights} would be ignored: uncertainty weighting learns every task's "
                             "weight. Drop weights, or use weighting='static'.")
        ignored = sorted(set(self.weights or {}) - {self.primary}) if self.schedule != "none" else []
        if ignored:
            raise ValueError(f"weights names auxiliary tasks {ignored}, whose weight the {self.schedule!r} schedule "
                             "sets (gamma0 · schedule): it would be ignored. Set their initial weight with "
                             "gamma0={task: value}; weights applies to the primary only.")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise InvalidParameterError(bad_param("temperature", "MultiTaskConfig", "be a finite number > 0", t))
        for key in ("steps", "tag_every", "eval_every", "switch_step", "size_cap"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidParameterError(bad_param(key, "MultiTaskConfig", "be a positive integer or None", value))
        for key in ("switch_patience", "epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(bad_param(key, "MultiTaskConfig", "be a positive integer", value))
        if self.steps is not None and self.epochs != self.__dataclass_fields__["epochs"].default:
            raise ValueError(f"epochs={self.epochs} set beside steps={self.steps}, which fixes the run's length: "
                             "epochs would be ignored. Set one of them.")
        self._check_knobs()
        if self.pass_overhead is not None and (not isinstance(self.pass_overhead, int) or self.pass_overhead < 0):
            raise InvalidParameterError(bad_param("pass_overhead", "MultiTaskConfig",
                                                  "be an integer >= 0 (tokens) or None", self.pass_overhead))

    def to_dict(self) -> dict:
        out = asdict(self)
        f = self.sampling_schedule
        if f is not None:  # a function is not JSON: record which one it was
            out["sampling_schedule"] = f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', repr(f))}"
        return out

    def _check_knobs(self) -> None:
        """Refuse static weights and MT2ST knobs out of range, and knobs set away from their default that the
        schedule or the sampler never reads."""
        if self.weights is not None and not isinstance(self.weights, dict):
            raise InvalidParameterError(bad_param("weights", "MultiTaskConfig", "map task names to values",
                                                  self.weights))
        for knob, positive in (("weights", False), ("gamma0", False), ("eta", False), ("nu", True)):
            value = getattr(self, knob)
            entries = value.items() if isinstance(value, dict) else [] if value is None else [(None, value)]
            for task, v in entries:
                if task is not None and not isinstance(task, str):
                    raise InvalidParameterError(bad_param(knob, "MultiTaskConfig", "map task names to values", value))
                name = knob if task is None else f"{knob}[{task!r}]"
                must = "be a finite number > 0" if positive else "be a finite number >= 0"
                if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                        or v < 0 or (positive and v == 0)):
                    raise InvalidParameterError(bad_param(name, "MultiTaskConfig", must, v))
        if self.sampling_schedule is not None:
            ignored = set_fields(self, ("temperature", "size_cap"))
            if ignored:
                raise ValueError(f"{ignored} set beside sampling_schedule, which replaces the sampler's fixed "
                                 "probabilities: they would be ignored. Fold them into the schedule's weights.")
        refuse_unread(self, "sampler", {"temperature": ("temperature",), "size_cap": ("proportional", "temperature")})
        refuse_unread(self, "schedule", {"gamma0": ("diminish", "switch", "adaptive_switch"), "eta": ("diminish",),
                                         "nu": ("diminish",), "switch_step": ("switch",),
                                         "switch_patience": ("adaptive_switch",)})

    def _per_task(self, name: str, knob: str) -> float:
        """Knob ``knob`` (gamma0, eta, nu) for task ``name``: its dict's entry, else the knob's default."""
        value = getattr(self, knob)
        if isinstance(value, dict):
            return float(value.get(name, self.__dataclass_fields__[knob].default))
        return float(value)

    def gamma(self, task: str, step: int, switched: bool) -> float:
        """Loss weight of ``task`` at ``step`` under the static weights or the MT2ST schedule."""
        static = (self.weights or {}).get(task, 1.0)
        if self.schedule == "none" or task == self.primary:
            return static
        g0 = self._per_task(task, "gamma0")
        if self.schedule == "diminish":
            return diminish(step, g0, self._per_task(task, "eta"), self._per_task(task, "nu"))
        if self.schedule == "switch":
            return switch(step, g0, self.switch_step)
        return 0.0 if switched else g0  # adaptive_switch


@dataclass
class MultiTaskResult:
    """What :func:`~cmtl.multitask.joint.train_multitask` did: steps, time, rows trained per task, per-task validation
    history, TAG affinities."""

    steps: int
    seconds: float
    rows_per_task: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    affinity: list[list[float]] | None = None
    tag_seconds: float = 0.0
    switched_at: int | None = None
    task_weights: dict[str, float] = field(default_factory=dict)
