"""Drift monitoring: do incoming texts still look like the data a task was validated on?

The test is a kernel two-sample test (Gretton et al. 2012): the unbiased MMD²
between L2-normalised backbone embeddings of a reference sample and of the
incoming texts, with a Gaussian kernel whose bandwidth is the median pairwise
distance of the pooled sample, and a permutation p-value. Beside it the
report shows what the shift does to the task's predictions: mean confidence
and the predicted label distribution on both samples.

:meth:`cmtl.Registry.monitor` uses the held-out sample the registry keeps
with each version as the reference; :class:`DriftMonitor` works on any texts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from cmtl._config import check_seed, plain_numbers
from cmtl.data import as_texts, seeded_order
from cmtl.errors import DataError, InvalidParameterError, bad_param


@dataclass(kw_only=True, frozen=True)
class MonitorConfig:
    """Settings of the drift test.

    Args:
        alpha: Significance level: drift is reported when the p-value is below it.
        permutations: Permutations for the p-value (the smallest possible p is 1 / (permutations + 1)).
        min_samples: Fewest incoming texts (and reference texts) the test accepts.
        max_samples: Larger samples are subsampled (seeded) to this size.
        seed: Seeds subsampling and permutations.
    """

    alpha: float = 0.01
    permutations: int = 500
    min_samples: int = 20
    max_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        plain_numbers(self)
        if not 0 < self.alpha < 1:
            raise InvalidParameterError(bad_param("alpha", "MonitorConfig", "be in (0, 1)", self.alpha))
        if not isinstance(self.permutations, int) or self.permutations < 1 / self.alpha:
            raise InvalidParameterError(bad_param(
                "permutations", "MonitorConfig", f"be an integer >= 1/alpha = {math.ceil(1 / self.alpha)} "
                "for the p-value to reach below alpha", self.permutations))
        if not isinstance(self.min_samples, int) or self.min_samples < 5:
            raise InvalidParameterError(bad_param("min_samples", "MonitorConfig", "be an integer >= 5",
                                                  self.min_samples))
        check_seed(self.seed, "MonitorConfig")
        if not isinstance(self.max_samples, int) or self.max_samples < self.min_samples:
            raise InvalidParameterError(bad_param("max_samples", "MonitorConfig",
                                                  f"be an integer >= min_samples = {self.min_samples!r}",
                                                  self.max_samples))


@dataclass(frozen=True)
class DriftReport:
    """The outcome of a drift test.

    ``mmd2`` is the effect size (0 when both samples come from one
    distribution; larger is further apart), ``p_value`` its significance.
    Confidence and label fields are ``None`` when no task model was given.
    """

    n_reference: int
    n_new: int
    mmd2: float
    p_value: float
    alpha: float
    drift: bool
    bandwidth: float
    confidence_reference: float | None = None
    confidence_new: float | None = None
    labels_reference: dict[str, float] | None = None
    labels_new: dict[str, float] | None = None
    label_shift: float | None = None
    task: str | None = None

    @property
    def confidence_shift(self) -> float | None:
        if self.confidence_new is None or self.confidence_reference is None:
            return None
        return self.confidence_new - self.confidence_reference

    @property
    def verdict(self) -> str:
        what = f"task {self.task!r}: " if self.task else ""
        stats = f"MMD² = {self.mmd2:.4f}, p = {self.p_value:.4f} (alpha {self.alpha}), n = {self.n_new}"
        if self.confidence_shift is not None:
            stats += f", confidence {self.confidence_reference:.3f} -> {self.confidence_new:.3f}"
        if self.label_shift is not None:
            stats += f", predicted-label shift (total variation) {self.label_shift:.3f}"
        if self.drift:
            todo = f"cmtl update {self.task} --data <labelled new data>" if self.task else "an update"
            return f"{what}DRIFT: the incoming texts differ from the reference ({stats}). Label some and run {todo}."
        return f"{what}no drift detected ({stats})."

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "confidence_shift": self.confidence_shift, "verdict": self.verdict}


def mmd_test(x: torch.Tensor, y: torch.Tensor, *, permutations: int, seed: int) -> tuple[float, float, float]:
    """(unbiased MMD², permutation p-value, bandwidth) of samples ``x`` (n, d) and ``y`` (m, d).

    Raises:
        DataError: fewer than 2 rows in a sample, or a row that is not finite: every statistic would be NaN,
            and the p-value the smallest.
    """
    for name, sample in (("x", x), ("y", y)):
        if len(sample) < 2:
            raise DataError(f"mmd_test: {name} has {len(sample)} row(s); the unbiased MMD² needs at least 2 in "
                            "each sample. Pass more rows.")
        bad = (~torch.isfinite(sample).reshape(len(sample), -1).all(1)).nonzero().flatten().tolist()
        if bad:
            raise DataError(f"mmd_test: row {bad[0]} of {name} is not finite (NaN or inf; rows {bad[:10]}): "
                            "drop those rows or fix what produced them.")
    z = torch.cat([x, y]).double()
    n, total = len(x), len(x) + len(y)
    d2 = torch.cdist(z, z).pow(2)
    off_diag = d2[~torch.eye(total, dtype=torch.bool)]
    bandwidth = float(off_diag.median().sqrt().clamp_min(1e-6))
    k = torch.exp(-d2 / (2 * bandwidth**2))
    k.fill_diagonal_(0.0)  # the unbiased estimate leaves out i == j terms

    generator = torch.Generator().manual_seed(seed)
    labels = torch.zeros(permutations + 1, total, dtype=torch.float64)  # row 0: the observed split
    labels[0, :n] = 1.0
    for p in range(1, permutations + 1):
        labels[p, torch.randperm(total, generator=generator)[:n]] = 1.0
    in_x, in_y = labels, 1.0 - labels
    kx = in_x @ k  # (P + 1, N)
    ky = in_y @ k
    m = total - n
    xx = (kx * in_x).sum(1) / (n * (n - 1))
    yy = (ky * in_y).sum(1) / (m * (m - 1))
    xy = (kx * in_y).sum(1) / (n * m)
    stats = xx + yy - 2 * xy
    observed = stats[0]
    p_value = (1 + int((stats[1:] >= observed).sum())) / (permutations + 1)  # in Python: a tensor divides in float32
    return float(observed), p_value, bandwidth


class DriftMonitor:
    """A two-sample drift test against a fixed reference sample.

    Args:
        embed: Texts -> embeddings (N, H); e.g. ``registry.embed``. With ``reference_pairs``,
            ``embed(texts, pairs)``: each text embedded with its pair, as the task reads them.
        reference: The texts that define "no drift".
        reference_pairs: For a task on text pairs, the second text of each reference row; then
            :meth:`check` needs ``pairs`` too, and the test compares the pairs, not the first texts alone.
        config: Test settings.
        predict_proba: Optional texts (and pairs) -> class probabilities (N, L) of the task
            model, to report confidence and label shifts.
        labels: Label names for ``predict_proba``'s columns.
        task: Task name, for the verdict.

    Raises:
        DataError: fewer reference texts than ``config.min_samples``, pairs that do not match the texts in
            number, or a text whose embedding is not finite.
        InvalidParameterError: ``labels`` that are not one name per column of ``predict_proba``.
    """

    def __init__(self, embed: Callable[..., torch.Tensor], reference: Sequence[str], *,
                 reference_pairs: Sequence[str] | None = None, config: MonitorConfig | None = None,
                 predict_proba: Callable[..., np.ndarray] | None = None,
                 labels: Sequence[str] | None = None, task: str | None = None):
        self.config = config or MonitorConfig()
        self.task = task
        self._embed = embed
        self._proba = predict_proba
        self.labels = list(labels) if labels is not None else None
        self.paired = reference_pairs is not None
        self.reference, self.reference_pairs, rows = self._rows(reference, reference_pairs, "reference",
                                                                self.config.seed)
        self._ref_emb = self._embedded(self.reference, self.reference_pairs, rows, "reference")
        self._ref_proba = self._probabilities(self.reference, self.reference_pairs)
        if self._ref_proba is not None and self.labels is not None and len(self.labels) != self._ref_proba.shape[1]:
            raise InvalidParameterError(bad_param(
                "labels", "DriftMonitor", "name each column of predict_proba", self.labels,
                f"Got {len(self.labels)} label names for {self._ref_proba.shape[1]} probability columns; pass the "
                "task's labels in the model's column order, or leave labels out to report columns by index."))

    def check(self, texts: Sequence[str], *, pairs: Sequence[str] | None = None,
              seed: int | None = None) -> DriftReport:
        """Test ``texts`` (with their ``pairs``, when the reference has pairs) against the reference.

        Raises:
            DataError: fewer than ``config.min_samples`` texts: a p-value from so few would mean little;
                pairs given or missing against the reference, or not one per text; a text whose embedding
                is not finite.
        """
        if (pairs is not None) != self.paired:
            raise DataError("The reference holds text pairs: pass pairs=[...], the second text of each row."
                            if self.paired else "The reference holds single texts: leave pairs out.")
        seed = self.config.seed if seed is None else seed
        texts, pairs, rows = self._rows(texts, pairs, "incoming", seed + 1)
        new_emb = self._embedded(texts, pairs, rows, "incoming")
        mmd2, p, bandwidth = mmd_test(self._ref_emb, new_emb, permutations=self.config.permutations, seed=seed)
        extra: dict[str, Any] = {}
        if self._proba is not None:
            new_proba = self._probabilities(texts, pairs)
            extra = dict(confidence_reference=float(self._ref_proba.max(1).mean()),
                         confidence_new=float(new_proba.max(1).mean()))
            ref_dist, new_dist = _label_distribution(self._ref_proba), _label_distribution(new_proba)
            names = self.labels or [str(i) for i in range(len(ref_dist))]
            extra.update(labels_reference=dict(zip(names, ref_dist.tolist())),
                         labels_new=dict(zip(names, new_dist.tolist())),
                         label_shift=float(0.5 * np.abs(ref_dist - new_dist).sum()))
        return DriftReport(n_reference=len(self.reference), n_new=len(texts), mmd2=mmd2, p_value=p,
                           alpha=self.config.alpha, drift=p < self.config.alpha, bandwidth=bandwidth,
                           task=self.task, **extra)

    def _rows(self, texts: Sequence[str], pairs: Sequence[str] | None, what: str, seed: int
              ) -> tuple[list[str], list[str] | None, list[int]]:
        """The texts (and pairs) the test uses, and their rows among those given: see :meth:`_sample`."""
        texts = as_texts(texts)
        if pairs is not None:
            pairs = as_texts(pairs)
            if len(pairs) != len(texts):
                raise DataError(f"Got {len(texts)} {what} texts but {len(pairs)} pairs: one pair per text.")
        rows = self._sample(len(texts), what, seed)
        return [texts[i] for i in rows], None if pairs is None else [pairs[i] for i in rows], rows

    def _probabilities(self, texts: list[str], pairs: list[str] | None) -> np.ndarray | None:
        if self._proba is None:
            return None
        return self._proba(texts) if pairs is None else self._proba(texts, pairs)

    def _sample(self, n: int, what: str, seed: int) -> list[int]:
        """The rows of ``n`` texts the test uses: all, or ``config.max_samples`` of them (seeded), in order."""
        if n < self.config.min_samples:
            raise DataError(f"The drift test needs at least {self.config.min_samples} {what} texts; got {n}. "
                            "A p-value from fewer would mean little: collect more texts first.")
        if n <= self.config.max_samples:
            return list(range(n))
        return sorted(seeded_order(n, seed)[: self.config.max_samples])

    def _embedded(self, texts: list[str], pairs: list[str] | None, rows: list[int], what: str) -> torch.Tensor:
        """L2-normalised embeddings of ``texts`` (with ``pairs``; ``rows`` of the texts given).

        Raises:
            DataError: an embedding that is not finite (NaN or inf; e.g. a half-precision backbone that
                overflowed), which would make the test report drift whatever the texts.
        """
        embeddings = self._embed(texts) if pairs is None else self._embed(texts, pairs)
        bad = (~torch.isfinite(embeddings).all(-1)).nonzero().flatten().tolist()
        if bad:
            raise DataError(
                f"The embedding of {what} text {rows[bad[0]]} ({texts[bad[0]][:80]!r}) is not finite (NaN or inf; "
                f"{len(bad)} such text(s)), so the drift test cannot run: its statistics would be NaN. Drop those "
                "texts, or load the backbone in float32 (BackboneConfig(dtype='float32')) if it overflowed."
            )
        return _normalise(embeddings)


def _normalise(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.float(), dim=-1)


def _label_distribution(proba: np.ndarray) -> np.ndarray:
    """Share of each predicted (argmax) label."""
    counts = np.bincount(proba.argmax(1), minlength=proba.shape[1])
    return counts / counts.sum()
