"""Forward transfer: which existing adapter a new task should start from.

A new task's adapter can start from another task's adapter (or a merge) instead of from zero
(``Registry.add_task(..., init=...)``). :func:`probe_losses` measures how useful each candidate's
features are for the new task, cheaply: a linear probe (:func:`cmtl.training.probe.refit_head`) fitted
on a few hundred training rows through the candidate and scored by its loss on held-out rows. The
bare backbone (``None``) is scored the same way; it is what a fresh adapter starts from, so a
candidate helps only when its probe loss is lower than the backbone's (:func:`pick_source`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import Backbone
from cmtl.core.heads import TaskHead
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded
from cmtl.errors import InvalidParameterError, bad_param
from cmtl.training.probe import pooled_features, refit_head

#: Rows of the new task's data each candidate is probed on: training rows, held-out rows.
PROBE_TRAIN_ROWS = 512
PROBE_HELD_ROWS = 256


def probe_rows(train: Encoded, validation: Encoded | None, seed: int) -> tuple[Encoded, Encoded]:
    """The rows to probe on: up to :data:`PROBE_TRAIN_ROWS` training rows and up to :data:`PROBE_HELD_ROWS`
    validation rows (seeded samples); without validation data, a fifth of the sampled training rows is
    held out instead."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=generator).tolist()
    if validation is None:
        take = order[:PROBE_TRAIN_ROWS + PROBE_HELD_ROWS]
        held = max(1, len(take) // 5)
        return train.select(sorted(take[held:])), train.select(sorted(take[:held]))
    val_order = torch.randperm(len(validation), generator=generator).tolist()
    return train.select(sorted(order[:PROBE_TRAIN_ROWS])), validation.select(sorted(val_order[:PROBE_HELD_ROWS]))


def probe_losses(backbone: Backbone, bank: AdapterBank, candidates: Sequence[str | None], spec: TaskSpec,
                 train: Encoded, held: Encoded, *, batch_size: int = 64) -> dict[str | None, float]:
    """Held-out loss of a linear probe on each candidate adapter's pooled features (``None``: the bare
    backbone). Lower is better; the probe's head starts from zero, so every candidate is fitted alike."""
    losses: dict[str | None, float] = {}
    for key in candidates:
        if key is None:
            with bank.disabled():
                features = [pooled_features(backbone, part, batch_size) for part in (train, held)]
        else:
            bank.activate(key)
            features = [pooled_features(backbone, part, batch_size) for part in (train, held)]
        head = TaskHead(backbone.hidden_size, spec.num_outputs, 0.0).to(backbone.device)
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
        head = refit_head(head, features[0], train.targets, spec.loss)
        with torch.no_grad():
            loss = float(spec.loss(head(features[1].to(backbone.device)), held.targets.to(backbone.device)))
        losses[key] = loss if math.isfinite(loss) else math.inf
    return losses


def pick_source(losses: dict[str | None, float]) -> str | None:
    """The candidate with the lowest probe loss when it is lower than the bare backbone's, else ``None``."""
    best = min((k for k in losses if k is not None), key=lambda k: losses[k], default=None)
    if best is None or not losses[best] < losses.get(None, math.inf):
        return None
    return best


def parse_init(init: object) -> tuple[str, str | None, int | None] | None:
    """``add_task``'s ``init`` as (kind, name, version): ``None``; ``"auto"`` -> ("auto", None, None);
    ``"spam"`` or ``"task:spam"`` -> ("task", "spam", None); ``"task:spam@2"`` -> ("task", "spam", 2);
    ``"merge:all"`` -> ("merge", "all", None). Raises InvalidParameterError on anything else."""
    if init is None:
        return None
    how = ("be None, 'auto', a task name ('spam', 'task:spam' or 'task:spam@2' for version 2) or "
           "'merge:NAME' (a stored merge)")
    if not isinstance(init, str) or not init:
        raise InvalidParameterError(bad_param("init", "add_task", how, init))
    if init == "auto":
        return ("auto", None, None)
    kind, _, name = init.rpartition(":")
    kind = kind or "task"
    version = None
    if kind == "task" and "@" in name:
        name, _, number = name.partition("@")
        if not number.isdigit() or int(number) < 1:
            raise InvalidParameterError(bad_param("init", "add_task", how, init))
        version = int(number)
    if kind not in ("task", "merge") or not name or ":" in name or "@" in name:
        raise InvalidParameterError(bad_param("init", "add_task", how, init))
    return (kind, name, version)


def compatible(requested: AdapterConfig | None, source: AdapterConfig) -> str | None:
    """Why an adapter of config ``source`` cannot start an adapter configured as ``requested``, or
    ``None`` when it can (``requested=None`` takes the source's settings)."""
    if requested is None:
        return None
    diffs = [f"{k}={getattr(requested, k)!r} where the source has {getattr(source, k)!r}"
             for k in ("r", "alpha", "layers") if getattr(requested, k) != getattr(source, k)]
    if requested.target_modules is not None and requested.target_modules != source.target_modules:
        diffs.append(f"target_modules={requested.target_modules!r} where the source has {source.target_modules!r}")
    return "; ".join(diffs) or None
