"""Analytic heads: a classifier computed in closed form from running class statistics of features.

A head fitted by gradient descent forgets what it is not shown again. One computed from sufficient
statistics does not: adding data, or classes, adds to the statistics, and the head computed from them
equals the one computed from all the data at once. Two closed forms over the same statistics:

- ``"slda"`` (streaming LDA, Hayes & Kanan 2020): class means μ_c and one covariance Σ shared by all
  classes, pooled within classes and shrunk towards a scaled identity; class c scores
  ``x·Σ⁻¹μ_c − ½ μ_c·Σ⁻¹μ_c``.
- ``"ridge"`` (RanPAC, McDonnell et al. 2023): the features first go through a fixed random projection
  and a ReLU, ``h = max(0, xP)``; then ridge regression onto one-hot targets,
  ``W = (G + λI)⁻¹ C`` with ``G = Σ h hᵀ`` and ``C[:, c] = Σ_{y=c} h``. λ is chosen on validation
  rows (:meth:`AnalyticHead.choose_ridge`).

:class:`ClassStatistics` is all that is kept: per-class counts and feature sums, and the Gram matrix
of all rows (in float64, so that streamed and one-shot statistics agree to rounding).

In a registry, ``add_task(..., head=AnalyticConfig())`` makes a task's head analytic: :func:`fit_head`
computes it, the version stores its statistics beside the solved weights, and ``update_task`` adds the
new rows to the parent's statistics (:func:`cmtl.continual.updates.analytic_candidate`), with the
adapter that computes the features left as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from typing import Any, Sequence

import torch
from torch import nn

from cmtl.continual.config import AnalyticConfig, AnalyticKind  # noqa: F401  (re-exported)
from cmtl.core.backbone import Backbone
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded
from cmtl.errors import DataError, InvalidParameterError, TrainingDivergedError
from cmtl.training.evaluation import compute_metrics
from cmtl.training.loop import TrainResult
from cmtl.training.probe import pooled_features

#: λ values :meth:`AnalyticHead.choose_ridge` tries, as multiples of the Gram matrix's mean diagonal.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


class ClassStatistics:
    """Counts, feature sums per class, and the Gram matrix of every row seen, for ``dim``-wide features.

    Classes are indices ``0 .. num_classes - 1``; :meth:`grow` adds new ones at the end.
    """

    def __init__(self, dim: int, num_classes: int):
        if dim < 1 or num_classes < 1:
            raise InvalidParameterError(f"ClassStatistics needs dim >= 1 and num_classes >= 1; got {dim}, "
                                        f"{num_classes}.")
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)

    @property
    def dim(self) -> int:
        return self.gram.shape[0]

    @property
    def num_classes(self) -> int:
        return self.counts.shape[0]

    @property
    def rows(self) -> int:
        return int(self.counts.sum().item())

    def update(self, features: torch.Tensor, targets: torch.Tensor) -> "ClassStatistics":
        """Add rows ``features`` (N, dim) with class indices ``targets`` (N,)."""
        x = check_features(features, self.dim)
        targets = torch.as_tensor(targets, dtype=torch.long).flatten()
        if len(targets) != len(features):
            raise DataError(f"{len(targets)} targets for {len(features)} rows.")
        if len(targets) and (targets.min() < 0 or targets.max() >= self.num_classes):
            raise DataError(f"Class indices must lie in 0..{self.num_classes - 1}; got "
                            f"{targets.min().item()}..{targets.max().item()}. Grow the statistics first.")
        self.counts += torch.bincount(targets, minlength=self.num_classes).to(torch.float64)
        self.sums.index_add_(0, targets, x)
        self.gram += x.T @ x
        return self

    def grow(self, new_classes: int) -> "ClassStatistics":
        """Append ``new_classes`` empty classes."""
        if new_classes < 0:
            raise InvalidParameterError(f"Statistics can only grow; got new_classes={new_classes}.")
        self.counts = torch.cat([self.counts, torch.zeros(new_classes, dtype=torch.float64)])
        self.sums = torch.cat([self.sums, torch.zeros(new_classes, self.dim, dtype=torch.float64)])
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts.clone(), "sums": self.sums.clone(), "gram": self.gram.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "ClassStatistics":
        sums = state["sums"]
        stats = cls(sums.shape[1], sums.shape[0])
        stats.counts, stats.sums, stats.gram = (state[k].to(torch.float64).clone() for k in ("counts", "sums", "gram"))
        return stats


def check_features(features: torch.Tensor, dim: int) -> torch.Tensor:
    """``features`` as float64 on the CPU, if they are (N, ``dim``) and every row is finite.

    Raises:
        DataError: another shape, or a NaN or inf row (it would make every statistic, and every later
            update of them, NaN).
    """
    if features.ndim != 2 or features.shape[1] != dim:
        raise DataError(f"Expected features of shape (N, {dim}); got {tuple(features.shape)}.")
    x = features.detach().to("cpu", torch.float64)
    bad = (~torch.isfinite(x).all(1)).nonzero().flatten().tolist()
    if bad:
        raise DataError(f"row {bad[0]} of the features is not finite (NaN or inf; {len(bad)} such rows): drop "
                        "those rows or fix what produced them. Nothing was added.")
    return x


def random_projection(dim: int, width: int, seed: int) -> torch.Tensor:
    """The fixed (dim, width) Gaussian projection of a ``"ridge"`` head, drawn from ``seed`` alone."""
    return torch.randn(dim, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class AnalyticHead(nn.Module):
    """A head whose weights come from :class:`ClassStatistics` in closed form (see the module docstring).

    ``update`` adds rows to the statistics; the scores (``forward``) use the weights of the last
    :meth:`solve`, times ``scale`` (1 until :meth:`calibrate` fits it, which changes no answer, only
    how sure ``predict_proba`` is). Features are whatever the caller pools (the frozen backbone's, or a
    frozen adapter's). The weights live on the CPU in float64; scores come back on the features' device.
    Its ``state_dict`` holds the solved weights, bias and scale; the projection is drawn again from the
    config's seed, and the statistics are ``stats.state_dict()``. ``statistics=False`` makes a head that
    only predicts (``stats`` is ``None``): a loaded version does not hold a Gram matrix it never uses.
    """

    def __init__(self, hidden: int, num_classes: int, config: AnalyticConfig | None = None, *,
                 statistics: bool = True):
        super().__init__()
        self.config = config or AnalyticConfig()
        width = self.config.width(hidden)
        self.hidden = hidden
        self.register_buffer("projection", random_projection(hidden, width, self.config.seed)
                             if self.config.kind == "ridge" else torch.zeros(0, dtype=torch.float64), persistent=False)
        self.stats = ClassStatistics(width, num_classes) if statistics else None
        self.ridge = math.nan  # λ of the last ridge solve
        self.register_buffer("weight", torch.zeros(num_classes, width, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0] if self.stats is None else self.stats.num_classes

    def _kept(self) -> ClassStatistics:
        if self.stats is None:
            raise InvalidParameterError("This analytic head was loaded to predict only, without its statistics: "
                                        "restore it with them (AnalyticHead.restore(..., stats=...)) to update it.")
        return self.stats

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        """The features the statistics are kept on: ``max(0, xP)`` for ``"ridge"``, ``x`` itself for ``"slda"``."""
        x = features.detach().to("cpu", torch.float64)
        return torch.relu(x @ self.projection.cpu()) if self.config.kind == "ridge" else x

    def update(self, features: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> "AnalyticHead":
        """Add labelled rows (pooled features, class indices) to the statistics; :meth:`solve` afterwards."""
        self._kept().update(self.expand(features), _cpu_targets(targets))
        return self

    def grow(self, new_classes: int) -> "AnalyticHead":
        """Add ``new_classes`` classes at the end (their scores stay at minus infinity until they have rows)."""
        self._kept().grow(new_classes)
        return self

    def solve(self, ridge: float | None = None) -> "AnalyticHead":
        """Compute the weights from the statistics. ``ridge``: λ as a multiple of G's mean diagonal
        (``"ridge"`` only; default: the last one chosen, else 1e-2)."""
        stats = self._kept()
        if stats.rows == 0:
            raise DataError("An analytic head needs at least one labelled row before it can be solved.")
        if self.config.kind == "slda":
            weight, bias = _slda(stats, self.config.shrinkage)
        else:
            if ridge is None:
                ridge = 1e-2 if math.isnan(self.ridge) else self.ridge
            weight, bias = _ridge(stats, ridge)
            self.ridge = float(ridge)
        empty = stats.counts == 0
        bias = bias.masked_fill(empty, -math.inf)  # a class with no rows is never predicted
        self.weight, self.bias = weight, bias
        return self

    def choose_ridge(self, features: torch.Tensor, targets: torch.Tensor | Sequence[int],
                     grid: Sequence[float] = RIDGE_GRID) -> float:
        """Solve with each λ of ``grid`` and keep the one most accurate on the validation rows given
        (ties: the larger λ). Returns it. ``"slda"`` has no λ: it solves and returns NaN."""
        if self.config.kind != "ridge":
            self.solve()
            return math.nan
        targets = _cpu_targets(targets)
        h = self.expand(features)
        best, best_acc = None, -1.0
        for lam in sorted(grid, reverse=True):
            self.solve(lam)
            acc = ((h @ self.weight.T + self.bias).argmax(-1) == targets).double().mean().item()
            if acc > best_acc:
                best, best_acc = lam, acc
        self.solve(best)
        return float(best)

    def calibrate(self, features: torch.Tensor, targets: torch.Tensor | Sequence[int]) -> float:
        """Choose ``scale`` (a softmax temperature's inverse, on a log grid from 1/100 to 1,000) that
        minimises the cross-entropy of the solved head on these rows (rows of a class without training rows,
        which it never predicts, are left out). Returns it."""
        targets = _cpu_targets(targets)
        raw = self.expand(features) @ self.weight.T + self.bias
        seen = torch.isfinite(raw.gather(1, targets.unsqueeze(1)).squeeze(1))
        raw, targets = raw[seen], targets[seen]
        best, best_loss = 1.0, math.inf
        if not len(targets):
            self.scale = torch.tensor(best, dtype=torch.float64)
            return best
        for scale in torch.logspace(-2, 3, 51, dtype=torch.float64).tolist():
            loss = nn.functional.cross_entropy(raw * scale, targets).item()
            if loss < best_loss:
                best, best_loss = scale, loss
        self.scale = torch.tensor(best, dtype=torch.float64)
        return best

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scores = (self.expand(features) @ self.weight.cpu().T + self.bias.cpu()) * self.scale.cpu()
        dtype = features.dtype if features.is_floating_point() else torch.float32
        return scores.to(features.device, dtype)

    def record(self) -> dict[str, Any]:
        """What a registry records of this head beside its files: its config, the λ and scale it was
        solved with, and the projection's checksum (a later torch drawing another one is refused)."""
        return {"type": "analytic", "config": self.config.to_dict(),
                "ridge": None if math.isnan(self.ridge) else self.ridge, "scale": float(self.scale),
                "projection_sha256": _sha256(self.projection)}

    @classmethod
    def restore(cls, hidden: int, config: AnalyticConfig, state: dict[str, torch.Tensor],
                stats: dict[str, torch.Tensor] | None = None, ridge: float | None = None) -> "AnalyticHead":
        """A head from its stored ``state`` (weight, bias, scale) and, to update it further, its ``stats``."""
        head = cls(hidden, state["weight"].shape[0], config, statistics=False).load(state, ridge)
        if stats is not None:
            head.stats = ClassStatistics.from_state_dict(stats)
        return head

    def load(self, state: dict[str, torch.Tensor], ridge: float | None = None) -> "AnalyticHead":
        """Put stored solved weights, bias and scale (and the λ they were solved with) into this head."""
        self.load_state_dict({k: v.to(torch.float64) for k, v in state.items()})
        self.ridge = math.nan if ridge is None else float(ridge)
        return self


def _cpu_targets(targets: torch.Tensor | Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(targets).to("cpu", torch.long).flatten()


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


# --- in a registry -------------------------------------------------------------------------------

def check_task(spec: TaskSpec) -> None:
    """An analytic head classifies: one label per row.

    Raises:
        InvalidParameterError: a regression or multi-label task.
    """
    if spec.problem_type != "single_label":
        raise InvalidParameterError(
            f"Task {spec.name!r} is {spec.problem_type}: an analytic head classifies (one label per row, from "
            "class statistics). Leave head= out to train a linear head for it.")


def check_classes(spec: TaskSpec, train: Encoded) -> None:
    """Every label of ``spec`` has training rows in ``train``.

    Raises:
        DataError: names the labels without rows (after any validation split).
    """
    counts = torch.bincount(train.targets.to("cpu", torch.long).flatten(), minlength=spec.num_outputs)
    missing = [label for label, n in zip(spec.labels, counts.tolist()) if n == 0]
    if missing:
        raise DataError(f"Labels {missing} of task {spec.name!r} have no training rows ({len(train)} rows after "
                        "any validation split): an analytic head computes each class from its rows. Add rows for "
                        "them, pass validation= so that no training row is held out, or leave them out of the "
                        "labels and add them later with update_task(labels=...).")


def fit_head(head: AnalyticHead, backbone: Backbone, spec: TaskSpec, train: Encoded, validation: Encoded | None,
             *, batch_size: int = 64) -> TrainResult:
    """Add ``train``'s rows, pooled through the backbone's active adapter, to ``head``'s statistics; solve
    it, choosing λ and the scale on ``validation`` (λ = 1e-2 and scale 1 without). Returns what a
    training run would (no steps; the validation metrics and logits), for the version's record."""
    started = time.perf_counter()
    features = _finite(pooled_features(backbone, train, batch_size), "training")
    head.update(features, train.targets)
    metrics: dict[str, float] = {}
    logits = None
    if validation is not None and len(validation):
        held = _finite(pooled_features(backbone, validation, batch_size), "validation")
        head.choose_ridge(held, validation.targets)
        head.calibrate(held, validation.targets)
        logits = head(held).float()
        metrics = compute_metrics(spec, logits, validation.targets)
    else:
        head.solve()
    return TrainResult(steps=0, seconds=time.perf_counter() - started, examples_seen=len(train), best_step=0,
                       best_metrics=metrics, validation_logits=logits)


def _finite(features: torch.Tensor, what: str) -> torch.Tensor:
    """``features``, if every row is finite.

    Raises:
        TrainingDivergedError: rows that are not (the adapter or backbone they pass through overflows).
    """
    bad = int((~torch.isfinite(features)).flatten(1).any(dim=1).sum())
    if bad:
        raise TrainingDivergedError(
            f"{bad} of {len(features)} {what} rows have non-finite features (inf or nan), so no analytic head can be "
            "computed from them: the adapter or backbone they pass through overflows (load the backbone in float32, "
            "BackboneConfig(dtype='float32'), if it is in half precision).")
    return features


def computed_head(config: AnalyticConfig, backbone: Backbone, spec: TaskSpec, train: Encoded,
                  validation: Encoded | None, *, trained: TrainResult | None = None, batch_size: int = 64
                  ) -> tuple[AnalyticHead, TrainResult]:
    """A new task's analytic head from ``train``'s rows (:func:`fit_head`), and its run's result. After an
    adapter ``trained`` with a linear head (``features="adapter"``), the result is that run's, with the
    analytic head's metrics and the linear head's as ``<metric>_linear_head``."""
    head = AnalyticHead(backbone.hidden_size, spec.num_outputs, config)
    computed = fit_head(head, backbone, spec, train, validation, batch_size=batch_size)
    if trained is None:
        return head, computed
    metrics = {**computed.best_metrics, **{f"{k}_linear_head": v for k, v in trained.best_metrics.items()}}
    return head, dataclasses.replace(trained, best_metrics=metrics, validation_logits=computed.validation_logits,
                                     seconds=trained.seconds + computed.seconds)


def _slda(stats: ClassStatistics, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    counts = stats.counts
    seen = counts > 0
    means = stats.sums / counts.clamp_min(1.0).unsqueeze(1)
    n, classes, d = counts.sum(), int(seen.sum()), stats.dim
    # Within-class scatter: Σ x xᵀ − Σ_c n_c μ_c μ_cᵀ, pooled over the classes seen.
    scatter = stats.gram - (means * counts.unsqueeze(1)).T @ means
    cov = scatter / max(n.item() - classes, 1.0)
    cov = (1.0 - shrinkage) * cov + shrinkage * (torch.trace(cov) / d).clamp_min(1e-12) * torch.eye(d, dtype=cov.dtype)
    precision_means = torch.linalg.solve(cov, means.T)  # (d, C)
    weight = precision_means.T
    bias = -0.5 * (means * weight).sum(1)
    return weight, bias


def _ridge(stats: ClassStatistics, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = stats.gram
    lam = ridge * (torch.trace(g) / g.shape[0]).clamp_min(1e-12)
    weight = torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), stats.sums.T).T  # (C, M)
    return weight, torch.zeros(stats.num_classes, dtype=torch.float64)
