"""Forward transfer: which existing adapter a new task should start from.

A new task's adapter can start from another task's adapter (or a merge) instead of from zero
(``Registry.add_task(..., init=...)``). ``init="auto"`` first trains a fresh adapter and looks further
only where that adapter could not beat its step-0 linear probe on validation: with hundreds of examples a
fresh adapter learns its task, and no start measured on text5 improved on it beyond noise, while with too
little data a related adapter can add several points (docs/results.md, forward transfer). There two
measurements choose, both on the new task's own rows:

1. :func:`probe_losses`, cheap: a linear probe (:func:`cmtl.training.probe.refit_head`) fitted on a few
   hundred training rows through each candidate and scored by its loss on held-out rows. It ranks the
   candidates; the best :data:`TRIAL_SOURCES` go on.
2. :func:`trial_losses`, decisive: a short training run (:data:`TRIAL_STEPS` steps of the task's own
   settings, head fresh) from each of those candidates and from a fresh adapter, scored per held-out row.
   :func:`pick_trial` takes a source only when it beats the fresh start by more than
   :data:`TRIAL_Z` standard errors of the paired per-row difference; otherwise the adapter starts fresh.

The probe alone chose badly: features that a linear head reads well are not always features that
fine-tuning builds on (docs/results.md, text5 forward transfer). The trial measures what the start is
for, learning the new task, at the cost of a few dozen training steps per candidate. It measures how fast
a start learns, not where it ends, so the registry trains from the chosen source and keeps that run only
if it scores higher on validation than the fresh adapter (``Registry.add_task``).

A start can be a shrunk copy (``add_task(..., init_scale=s)``): every LoRA ``B`` matrix times ``s``, so
the source's change to each weight, ``B·A``, times ``s``. It follows Ash & Adams 2020 ("shrink and
perturb": warm-start a network from its shrunk weights plus noise), here without the noise and applied
to the adapter's change only, the frozen backbone being the point it shrinks towards. A full copy learns
a related task fastest but, trained to convergence, may end below a fresh start; half of it recovered that
on the pairs tried by hand, but as ``"auto"``'s start it made the trial accept more sources that ended lower,
so the default stays a full copy (docs/results.md, forward transfer from a shrunk start). With ``"auto"``
the trial tries the scaled starts.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import torch

from cmtl.core.adapters import AdapterBank, AdapterConfig, lora_key
from cmtl.core.backbone import Backbone
from cmtl.core.heads import TaskHead
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded
from cmtl.errors import InvalidParameterError, TrainingDivergedError, bad_param
from cmtl.training.config import TrainConfig
from cmtl.training.evaluation import paired_z
from cmtl.training.loop import seeded
from cmtl.training.probe import pooled_features, refit_head
from cmtl.training.trainee import Trainee, fit

#: Rows of the new task's data each candidate is probed and tried on: training rows, held-out rows.
PROBE_TRAIN_ROWS = 512
PROBE_HELD_ROWS = 256
#: Candidates (lowest probe loss first) that get a trial run beside the fresh start.
TRIAL_SOURCES = 2
#: Training steps of each trial run (one pass over the 512 probe rows at batch 16).
TRIAL_STEPS = 32
#: A source must lower the trial's held-out loss below the fresh start's by this many standard errors.
TRIAL_Z = 2.0


def check_scale(scale: object, init: object, owner: str = "add_task") -> None:
    """Raise unless ``scale`` is a real number in (0, 1], and 1 unless there is an ``init`` to scale."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale <= 1:
        raise InvalidParameterError(bad_param("init_scale", owner, "be a number in (0, 1]: the share of the "
                                              "source's change B·A the start keeps (1: an exact copy)", scale))
    if init is None and scale != 1:
        raise InvalidParameterError(bad_param("init_scale", owner, "be 1 without init (a fresh adapter has "
                                              "nothing to scale)", scale, "Name a source with init=."))


def scaled(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A LoRA state with every ``lora_B`` tensor times ``scale`` (so ``B·A`` times ``scale``); ``A`` as it was."""
    if scale == 1:
        return state
    return {k: v * scale if (lora_key(k) or ("", ""))[1] == "B" else v for k, v in state.items()}


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
    backbone). Lower is better; the probe's head starts from zero, so every candidate is fitted alike. A
    candidate whose features are not finite scores ``inf``."""
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
        try:
            head = refit_head(head, features[0], train.targets, spec.loss)
        except TrainingDivergedError:  # features that overflowed: ranked last, never tried
            losses[key] = math.inf
            continue
        with torch.no_grad():
            loss = float(spec.loss(head(features[1].to(backbone.device)), held.targets.to(backbone.device)))
        losses[key] = loss if math.isfinite(loss) else math.inf
    return losses


def shortlist(losses: dict[str | None, float], k: int = TRIAL_SOURCES) -> list[str]:
    """The ``k`` candidates (not the backbone, ``None``) with the lowest finite probe loss, best first."""
    return sorted((key for key in losses if key is not None and math.isfinite(losses[key])),
                  key=lambda key: losses[key])[:k]


def row_losses(spec: TaskSpec, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``spec.loss`` of each row on its own, shape (N,)."""
    return torch.stack([spec.loss(logits[i:i + 1], targets[i:i + 1]) for i in range(len(targets))])


def trial_losses(backbone: Backbone, bank: AdapterBank, starts: dict[str | None, tuple[AdapterConfig, dict | None]],
                 spec: TaskSpec, train: Encoded, held: Encoded, config: TrainConfig, *, steps: int = TRIAL_STEPS
                 ) -> dict[str | None, torch.Tensor]:
    """Per-row losses on ``held`` after ``steps`` training steps on ``train`` from each start.

    ``starts``: key -> (AdapterConfig, LoRA state to copy, or ``None`` for a fresh adapter). Each run
    trains a temporary adapter (removed afterwards) and a fresh head with ``config``'s optimiser settings,
    its step budget replaced by ``steps`` (no evaluation, no probe), all from ``config.seed``: the runs
    differ only in where the adapter starts, and nothing outside this call sees their random numbers.
    A run whose loss diverges scores infinite losses."""
    per_epoch = math.ceil(len(train) / config.batch_size)
    short = dataclasses.replace(config, max_steps=steps, epochs=math.ceil(steps / per_epoch), probe_init=False,
                                probe_start=False, probe_margin=0.0, eval_every=None, patience=None, progress=False)
    out: dict[str | None, torch.Tensor] = {}
    for i, (key, (adapter, state)) in enumerate(starts.items()):
        name = f"__cmtl_trial_{i}__"
        try:
            with seeded(config.seed, backbone.device):
                if state is None:
                    bank.add(name, adapter)
                else:
                    bank.load(name, adapter, state)
                head = TaskHead(backbone.hidden_size, spec.num_outputs, config.head_dropout).to(backbone.device)
                trainee = Trainee.adapter(backbone, bank, name, head)
                try:
                    fit(trainee, backbone, adapter, spec, train, None, short)
                except TrainingDivergedError:  # a start that diverges is never chosen
                    out[key] = torch.full((len(held),), math.inf)
                    continue
            logits = trainee.logits(held, pad_id=backbone.pad_id, device=backbone.device,
                                    batch_size=config.eval_batch_size)
            with torch.no_grad():
                out[key] = row_losses(spec, logits, held.targets.to(logits.device)).float().cpu()
        finally:
            if name in bank:
                bank.remove(name)
    return out


def pick_trial(losses: dict[str | None, torch.Tensor], z: float = TRIAL_Z) -> tuple[str | None, dict[str, float]]:
    """The tried source whose held-out loss beats the fresh start's (``None``) by more than ``z`` standard
    errors of the paired per-row difference, the lowest mean loss first; ``None`` when none does.
    Also returns each source's gain over the fresh start in standard errors (:func:`paired_z`)."""
    fresh = losses[None]
    scores: dict[str, float] = {}
    for key, mine in losses.items():
        if key is None:
            continue
        scores[key] = paired_z(fresh - mine)  # positive: the source's start learns the new task faster
    good = [k for k in scores if math.isfinite(float(losses[k].mean())) and scores[k] > z]
    best = min(good, key=lambda k: float(losses[k].mean()), default=None)
    return best, scores


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
