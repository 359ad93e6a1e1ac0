"""Scoring merge candidates: one inference pass per candidate and task, heads refitted on its features.

A candidate is a merged delta (``{module: ΔW}``), or ``None`` for no delta at all: the frozen backbone,
the baseline every merge is measured against. :class:`Scorer` scores it per member task on that task's
:class:`TaskRows`: the pooled features of the buffer rows (when heads are refitted) and of the held-out
rows come from one pass through the candidate; a refitted head is fitted on the buffer features
(:func:`cmtl.training.probe.refit_head`) and applied to the held-out features. Held-out rows are split
once into a *selection* part, which chooses the knobs, and a *report* part, whose scores are recorded,
so a reported score is never the best of several tries on the same rows.

:func:`rungs` plans successive halving (Jamieson & Talwalkar 2016): every candidate is first scored on a
small seeded share of the buffer and selection rows, the best third goes on to three times the rows, and
so on, until one is left and scored on all rows, where it must beat no delta at all. When the adapters
leave the bottom layers untouched (``AdapterConfig.layers``), those layers run once for every row
(:mod:`cmtl.training.caching`) and each candidate runs only the layers above.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import torch

from cmtl.continual.updates import take_whole
from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import Backbone
from cmtl.core.heads import TaskHead
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, seeded_order
from cmtl.errors import DataError
from cmtl.merging.methods import to_lora_state
from cmtl.training.caching import maybe_cache
from cmtl.training.evaluation import compute_metrics, primary_metric
from cmtl.training.probe import pooled_features, refit_head

#: Successive halving keeps the best 1/ETA of the candidates at each rung and gives them ETA times the rows.
ETA = 3
#: Fewest buffer or selection rows per task a rung scores on (all of them when a task has fewer).
MIN_ROWS = 32

Delta = dict[str, torch.Tensor]


@dataclass
class TaskRows:
    """A member task's rows: ``buffer`` to refit its head on (``None`` keeps ``head``, the member's), the
    held-out rows that choose the knobs (``select``) and those whose scores are reported (``report``).
    Buffer and selection rows are in a seeded random order, so each prefix is a random sample.
    ``frozen``: the frozen backbone's pooled features of a part's rows, where known (by part name),
    so that scoring no delta need not run them."""

    spec: TaskSpec
    head: TaskHead
    buffer: Encoded | None
    select: Encoded | None
    report: Encoded | None
    frozen: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclass
class Evaluation:
    """What one candidate scored: ``scores[part][task]`` (part ``"select"`` or ``"report"``), the heads
    it scored with, and how many rows of each part (and ``"buffer"``) per task it used."""

    scores: dict[str, dict[str, float]]
    heads: dict[str, TaskHead]
    rows: dict[str, dict[str, int]]


def split_holdout(held: Encoded, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows of ``held`` that choose a merge's knobs and the disjoint rows that report its scores: about a
    seeded ``fraction`` (at least one row each way), each in its seeded order. Copies of one input (same token
    ids) stay on one side (:func:`~cmtl.continual.updates.take_whole`), so no reported row was seen by the
    choice, unless every row is one input; with distinct inputs, ``seeded_order`` cut at the fraction."""
    if len(held) < 2:
        raise DataError(f"Choosing a merge's knobs on held-out rows and reporting on others needs at least 2 "
                        f"held-out rows per task; a member has {len(held)}. Add the task with more validation "
                        "data, or merge without search.")
    order = seeded_order(len(held), seed)
    n = min(max(1, round(fraction * len(held))), len(held) - 1)
    types = held.token_type_ids or [None] * len(held)
    keys = [(tuple(ids), None if t is None else tuple(t)) for ids, t in zip(held.input_ids, types)]
    chosen = set(take_whole(keys, n, seed)) if len(set(keys)) > 1 else set(order[:n])
    return [i for i in order if i in chosen], [i for i in order if i not in chosen]


def rungs(candidates: int, eta: int = ETA) -> list[tuple[int, float]]:
    """Successive halving's plan: (candidates scored, share of the rows) per rung, down to the one
    candidate the last rung scores on every row."""
    kept = [candidates]
    while kept[-1] > 1:
        kept.append(math.ceil(kept[-1] / eta))
    return [(n, float(eta) ** -(len(kept) - 1 - i)) for i, n in enumerate(kept)]


class Scorer:
    """Scores candidate deltas on the members' rows; see the module docstring.

    Args:
        backbone: Where candidates run.
        bank: The backbone's adapters (a candidate is loaded into it, or disables it, while it is scored).
        base: The members' adapter config (modules and layers the delta covers).
        tasks: Each member task's rows.
        rank: Rank a candidate's delta is stored at (``MergeConfig.rank``). A fixed rank truncates, so every
            candidate is scored truncated; ``"auto"`` (within ``tolerance``) and ``None`` (exact) score
            the exact delta, and only ``stored`` evaluations load the LoRA form.
        cache_mb: Largest frozen-layer cache, in MiB (0: none).
        tolerance: ``MergeConfig.rank_tolerance``.
    """

    def __init__(self, backbone: Backbone, bank: AdapterBank, base: AdapterConfig, tasks: dict[str, TaskRows],
                 rank: int | str | None, cache_mb: float, tolerance: float):
        self.backbone, self.bank, self.base, self.rank, self.tolerance = backbone, bank, base, rank, tolerance
        parts = [(t, p) for t, rows in tasks.items() for p in ("buffer", "select", "report")
                 if getattr(rows, p) is not None]
        with bank.disabled():  # the frozen layers' own outputs, not those of whichever adapter was used last
            cached = maybe_cache([getattr(tasks[t], p) for t, p in parts], backbone, base, cache_mb)
        self.tasks = {t: dataclasses.replace(rows) for t, rows in tasks.items()}
        for (t, p), encoded in zip(parts, cached):
            setattr(self.tasks[t], p, encoded)

    def evaluate(self, delta: Delta | None, *, share: float = 1.0, parts: tuple[str, ...] = ("select",),
                 heads: dict[str, TaskHead] | None = None, stored: bool = False) -> Evaluation:
        """Scores of ``delta`` (``None``: the frozen backbone) on ``parts`` of every task's held-out rows, with
        the heads refitted on the first ``share`` of the buffer rows (or the given ``heads``, or the members'
        when there is no buffer); ``share`` also takes that prefix of the selection rows. ``stored`` runs
        the delta as the LoRA adapter a merged entry stores (what serving computes); otherwise an exact
        delta is added to the weights, which gives the same scores up to float rounding at less cost."""
        scores: dict[str, dict[str, float]] = {p: {} for p in parts}
        fitted: dict[str, TaskHead] = {}
        used: dict[str, dict[str, int]] = {p: {} for p in ("buffer", *parts)}
        with self._through(delta, stored or isinstance(self.rank, int)):
            for t, rows in self.tasks.items():
                buffer = rows.buffer if heads is None else None
                pieces = {"buffer": _prefix(buffer, share)} | {
                    p: _prefix(getattr(rows, p), share if p == "select" else 1.0) for p in parts}
                pieces = {p: e for p, e in pieces.items() if e is not None and len(e)}
                if not pieces:
                    fitted[t] = rows.head if heads is None else heads[t]
                    continue
                known = {p: rows.frozen[p][: len(e)] for p, e in pieces.items() if delta is None and p in rows.frozen}
                run = [p for p in pieces if p not in known]
                features = pooled_features(self.backbone, Encoded.concat(
                    [dataclasses.replace(pieces[p], targets=None) for p in run])) if run else None
                by_part = known | ({} if features is None else dict(zip(run, features.split(
                    [len(pieces[p]) for p in run]))))
                if heads is not None:
                    fitted[t] = heads[t]
                elif "buffer" in by_part:
                    fitted[t] = refit_head(rows.head, by_part["buffer"], pieces["buffer"].targets,
                                           rows.spec.loss).eval()
                else:
                    fitted[t] = rows.head
                for p, e in pieces.items():
                    used[p][t] = len(e)
                with torch.no_grad():
                    for p in parts:
                        if p in by_part:
                            logits = fitted[t](by_part[p].to(self.backbone.device)).float().cpu()
                            scores[p][t] = primary_score(rows.spec, logits, pieces[p].targets)
        return Evaluation(scores, fitted, used)

    @contextlib.contextmanager
    def _through(self, delta: Delta | None, as_lora: bool):
        """Forward passes inside the block go through ``delta``: loaded as a temporary LoRA adapter at the
        stored rank (``as_lora``) or added to the weights; through no adapter at all when it is ``None``."""
        if delta is None:
            with self.bank.disabled():
                yield
            return
        if not as_lora:
            with self.bank.added(delta):
                yield
            return
        lora_state, r, _ = to_lora_state(delta, self.rank, self.tolerance)
        key = "_merge_candidate"
        self.bank.load(key, AdapterConfig.from_dict({**self.base.to_dict(), "r": r, "alpha": float(r),
                                                      "dropout": 0.0}), lora_state)
        try:
            self.bank.activate(key)
            yield
        finally:
            self.bank.remove(key)


def primary_score(spec: TaskSpec, logits: torch.Tensor, targets: torch.Tensor) -> float:
    """``spec``'s primary metric (accuracy, micro-F1 or MSE) of ``logits`` against ``targets``."""
    metric, _ = primary_metric(spec)
    return float(compute_metrics(spec, logits, targets)[metric])


def _prefix(encoded: Encoded | None, share: float) -> Encoded | None:
    """The first ``share`` of ``encoded``'s rows (at least :data:`MIN_ROWS`, at most all)."""
    if encoded is None or share >= 1:
        return encoded
    n = min(len(encoded), max(MIN_ROWS, math.ceil(share * len(encoded))))
    return encoded.select(range(n))
