"""Batched inference and per-task metrics.

Inference runs under ``torch.inference_mode`` on length-sorted batches (little
padding) and returns rows in their original order.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from cmtl.core.tasks import PRIMARY_METRIC, TaskSpec
from cmtl.data import Encoded, batches, length_sorted

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@torch.inference_mode()
def predict_logits(
    forward: Forward, encoded: Encoded, *, batch_size: int, pad_id: int, device: torch.device
) -> torch.Tensor:
    """Logits (N, L) for every row of ``encoded``, in row order, on CPU."""
    order = length_sorted(encoded)
    out: torch.Tensor | None = None
    unlabelled = dataclasses.replace(encoded, targets=None)
    for idx, inputs, _ in batches(unlabelled, order, batch_size, pad_id, device):
        logits = forward(inputs).float().cpu()
        if out is None:
            out = torch.empty((len(encoded), logits.shape[-1]))
        out[idx] = logits
    assert out is not None  # encoded is never empty: read_examples refuses empty data
    return out


def primary_metric(spec: TaskSpec) -> tuple[str, bool]:
    """(metric name, higher is better) used for early stopping and gating."""
    return PRIMARY_METRIC[spec.problem_type]


def compute_metrics(spec: TaskSpec, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Metrics of logits (N, L) against encoded targets.

    Single-label: accuracy, macro-F1, loss. Multi-label: micro-F1, macro-F1,
    exact match (subset accuracy), loss, over the cells that hold an answer (not NaN). Regression: MSE, MAE,
    Pearson r (mean over targets), loss. A row whose logits give no answer (a NaN; see
    :meth:`TaskSpec.unanswered`) counts as wrong, never as the first label.
    """
    n = int(targets.shape[0])
    metrics: dict[str, float] = {"n": n, "loss": float(spec.loss(logits, targets))}
    if spec.problem_type == "single_label":
        pred, unanswered = logits.argmax(-1), spec.unanswered(logits)
        metrics["accuracy"] = float(((pred == targets) & ~unanswered).float().mean())
        metrics["macro_f1"] = _macro_f1(
            torch.nn.functional.one_hot(pred, spec.num_outputs).bool() & ~unanswered[:, None],  # predicts no label
            torch.nn.functional.one_hot(targets, spec.num_outputs).bool(),
            present_only=True,
        )
    elif spec.problem_type == "multi_label":
        pred, truth = _decided(spec, logits, targets)
        tp = (pred & truth).sum().item()
        fp = (pred & ~truth).sum().item()
        fn = (~pred & truth).sum().item()
        metrics["micro_f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
        answered = ~targets.isnan().all(0)  # a label no row holds an answer for (all added after them) is no label
        metrics["macro_f1"] = _macro_f1(pred[:, answered], truth[:, answered], present_only=False)
        metrics["exact_match"] = float((pred == truth).all(-1).float().mean())
    else:
        err = logits - targets
        metrics["mse"] = float((err**2).mean())
        metrics["mae"] = float(err.abs().mean())
        metrics["pearson"] = _pearson(logits, targets)
    return metrics


def row_scores(spec: TaskSpec, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One score per row (N,), higher better, whose mean is the primary metric (negated for MSE): correct or
    not (single-label), minus the squared error averaged over targets (regression), and for multi-label
    micro-F1 linearised per row (the delta method: F1 + N · (2·tp_i − F1 · (2·tp_i + fp_i + fn_i)) / Σ(2·tp + fp
    + fn)), since micro-F1 is no mean of per-row scores; the share of labels decided right, used before,
    could rank two states against their micro-F1."""
    if spec.problem_type == "single_label":
        return ((logits.argmax(-1) == targets) & ~spec.unanswered(logits)).float()
    if spec.problem_type == "multi_label":
        pred, truth = _decided(spec, logits, targets)
        tp = (pred & truth).sum(-1).double()
        counted = (pred | truth).sum(-1).double() + tp  # 2·tp + fp + fn per row
        total = counted.sum().clamp_min(1)  # no label true or predicted anywhere: micro-F1 0, as compute_metrics
        f1 = 2 * tp.sum() / total
        return (f1 + len(tp) * (2 * tp - f1 * counted) / total).float()
    return -((logits - targets) ** 2).mean(-1)


def _decided(spec: TaskSpec, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A multi-label task's decisions and answers, boolean (N, L). A cell whose target is NaN (no answer: an
    update's old row and a label added since) is false in both, so it counts nowhere; a row whose logits give
    no answer (a NaN) has every decision wrong, so it scores as the worst row, not as one with its labels off."""
    known, truth = ~targets.isnan(), targets.nan_to_num(0.0).bool()
    pred = torch.where(spec.unanswered(logits)[:, None], ~truth, logits.sigmoid() >= spec.threshold)
    return pred & known, truth


def paired_gain(spec: TaskSpec, logits: torch.Tensor, baseline: torch.Tensor, targets: torch.Tensor) -> float:
    """How many standard errors of the paired per-row difference (:func:`row_scores`) ``logits`` score
    above ``baseline`` on the same rows (:func:`paired_z`)."""
    return paired_z(row_scores(spec, logits, targets) - row_scores(spec, baseline, targets))


def paired_z(diff: torch.Tensor) -> float:
    """A paired per-row difference (N,) in standard errors of its mean: mean / (sd / sqrt(n)). 0 where the
    mean is 0 or undefined, or below two rows; where every row differs by the same amount, ±sqrt(n) (the
    sign test's z when all n rows agree); ±inf where a side is infinite (a diverged run)."""
    d = diff.double()
    mean = float(d.mean())
    if mean == 0.0 or math.isnan(mean) or len(d) < 2:
        return 0.0
    if math.isinf(mean):
        return mean
    se = paired_se(d)
    return mean / se if se > 0 else math.copysign(len(d) ** 0.5, mean)


def paired_se(diff: torch.Tensor) -> float:
    """Standard error of the mean of a paired per-row difference (N,): sd / sqrt(n); inf below two rows."""
    return float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else math.inf


def _macro_f1(pred: torch.Tensor, truth: torch.Tensor, *, present_only: bool) -> float:
    """Mean F1 over labels (columns) of boolean (N, L) matrices."""
    tp = (pred & truth).sum(0).float()
    fp = (pred & ~truth).sum(0).float()
    fn = (~pred & truth).sum(0).float()
    f1 = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
    keep = (truth.sum(0) > 0) | (pred.sum(0) > 0) if present_only else torch.ones_like(tp, dtype=torch.bool)
    return float(f1[keep].mean()) if keep.any() else 0.0


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    denom = (x.norm(dim=0) * y.norm(dim=0)).clamp_min(1e-12)
    return float(((x * y).sum(0) / denom).mean())
