"""How the tasks of a joint run share the steps: row samplers, MT2ST loss-weight schedules, uncertainty weighting.

Rows of a mixed batch pick their task with :func:`sampling_probabilities` (or a time-dependent
``sampling_schedule``, :func:`scheduled_probabilities`). An auxiliary task's loss weight follows
MT2ST (Liu & Yu, 2024): Diminish γ_k(t) = γ_k,0 · exp(−η_k · t^ν_k) (:func:`diminish`) or Switch
(:func:`switch`); or every task's weight is learned (Kendall et al., 2018; :class:`UncertaintyWeighting`).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

Sampler = Literal["uniform", "proportional", "temperature", "per_task"]


def sampling_probabilities(sizes: Sequence[int], kind: Sampler = "temperature", temperature: float = 2.0,
                           cap: int | None = None) -> np.ndarray:
    """Task probabilities: uniform 1/T; proportional n_t / Σn; temperature ∝ min(n_t, cap)^(1/temperature).

    ``"per_task"`` draws nothing: every step takes a full batch of each task (MT2ST's
    L_primary + Σ_k γ_k L_aux,k, each loss on its own batch), so each task's share of the rows is 1/T.
    """
    n = np.asarray(sizes, dtype=float)
    if len(n) == 0 or (n <= 0).any():
        raise ValueError(f"Every task needs at least one example; sizes are {list(sizes)}.")
    if cap is not None:
        if cap < 1:
            raise ValueError(f"The size cap must be >= 1. Got {cap}.")
        n = np.minimum(n, cap)
    if kind in ("uniform", "per_task"):
        p = np.ones_like(n)
    elif kind == "proportional":
        p = n
    elif kind == "temperature":
        if not temperature > 0:
            raise ValueError(f"The sampling temperature must be > 0. Got {temperature}.")
        p = n ** (1.0 / temperature)
    else:
        raise ValueError(f"Unknown sampler {kind!r}. Choose 'uniform', 'proportional', 'temperature' or 'per_task'.")
    return p / p.sum()


def scheduled_probabilities(schedule: Callable[[int, int], Sequence[float]], step: int, total: int,
                            names: Sequence[str]) -> np.ndarray:
    """This step's task probabilities from a ``sampling_schedule``, checked."""
    w = np.asarray(schedule(step, total), dtype=float)
    if w.shape != (len(names),) or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"sampling_schedule({step}, {total}) must return {len(names)} finite weights >= 0 with a "
                         f"positive sum, one per task in the order {list(names)}. Got {w.tolist()}.")
    return w / w.sum()


def diminish(step: float, gamma0: float, eta: float, nu: float) -> float:
    """MT2ST Diminish: γ(t) = γ0 · exp(−η · t^ν)."""
    return gamma0 * math.exp(-eta * step**nu)


def switch(step: float, gamma0: float, switch_step: float) -> float:
    """MT2ST Switch: γ0 before ``switch_step``, 0 from then on."""
    return gamma0 if step < switch_step else 0.0


class UncertaintyWeighting(nn.Module):
    """Kendall et al. (2018): L = Σ_t exp(−s_t) · L_t + s_t with learned s_t = log σ_t² (no factor ½ or 2)."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(num_tasks))

    def forward(self, losses: torch.Tensor, present: torch.Tensor, ranks: int = 1) -> torch.Tensor:
        """``losses`` (T,) per task, ``present`` (T,) bool: tasks with rows in this batch. Under
        data parallelism each of ``ranks`` ranks passes its share of the losses and ``s_t / ranks``,
        so the terms summed over ranks are the whole batch's."""
        s = self.log_var[present]
        return (torch.exp(-s) * losses[present] + s / ranks).sum()
