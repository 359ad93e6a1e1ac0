"""Task-free routing: which task's adapter should answer a text when no task id comes with it.

:class:`FeatureRouter` keeps, per task, the running statistics of the frozen backbone's pooled
features of its training rows, and sends a text to the task whose rows it most resembles: a
Gaussian per task with one covariance shared by all (shrunk), i.e. the smallest Mahalanobis distance
to the task's mean, less the log of its share of rows. It is an analytic head whose classes are tasks
(:class:`~cmtl.continual.analytic.AnalyticHead` with ``kind="slda"``), so adding a task or more rows
of one is an exact update, and no example is stored.
"""

from __future__ import annotations

import torch

from cmtl.continual.analytic import AnalyticConfig, AnalyticHead, check_features
from cmtl.errors import DataError


class FeatureRouter:
    """Routes pooled features (N, ``dim``) to one of the tasks added so far.

    Args:
        dim: Width of the pooled features.
        shrinkage: Shrinkage of the shared covariance towards a scaled identity (see
            :class:`~cmtl.continual.analytic.AnalyticConfig`).
    """

    def __init__(self, dim: int, shrinkage: float = 1e-1):
        self.dim = dim
        self.config = AnalyticConfig(kind="slda", shrinkage=shrinkage)
        self.tasks: list[str] = []
        self._head: AnalyticHead | None = None

    def add(self, task: str, features: torch.Tensor) -> "FeatureRouter":
        """Add training rows' features of ``task`` (a new task, or more rows of a known one)."""
        if not len(features):
            raise DataError(f"No rows to route to task {task!r}.")
        check_features(features, self.dim)  # before the task is listed: a refused one leaves no trace
        if task not in self.tasks:
            self.tasks.append(task)
            if self._head is None:
                self._head = AnalyticHead(self.dim, 1, self.config)
            else:
                self._head.grow(1)
        index = self.tasks.index(task)
        self._head.update(features, torch.full((len(features),), index, dtype=torch.long))
        self._head.solve()
        return self

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Per-row, per-task scores (N, tasks): higher is closer; with the log prior of each task's rows."""
        if self._head is None:
            raise DataError("The router has no task yet: add one first.")
        prior = torch.log(self._head.stats.counts / self._head.stats.counts.sum())
        if len(self.tasks) == 1:
            return torch.zeros(len(features), 1, dtype=torch.float64)
        return self._head(features.double()).double() + prior

    def route(self, features: torch.Tensor) -> list[str]:
        """The task each row goes to."""
        return [self.tasks[k] for k in self.scores(features).argmax(-1).tolist()]
