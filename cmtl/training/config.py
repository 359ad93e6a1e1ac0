"""How one adapter and head train (:class:`TrainConfig`): a plain dataclass without torch, so a
registry's manifest can be checked against it without loading a model."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from cmtl._config import check_seed, known_keys, plain_numbers, set_fields
from cmtl.errors import InvalidParameterError, bad_param

#: Default evaluation interval on long epochs (steps): convergence is checked at least this often.
EVAL_EVERY_MAX = 250


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """How to train an adapter and head.

    The budget is set by convergence, not by a fixed epoch count: with validation data the loop
    evaluates every ``eval_every`` steps, keeps the best state and stops after ``patience``
    evaluations without improvement; ``epochs`` and ``max_steps`` only cap it. ``Registry.add_task``
    without validation data holds out ``validation_fraction`` of the training data for this; with
    no validation rows at all, training runs the whole cap.

    Args:
        epochs: At most this many passes over the training data (the cap; the learning rate decays
            over it). With validation data, early stopping usually ends training sooner.
        batch_size: Examples per optimiser step.
        learning_rate: Peak AdamW learning rate (LoRA and head tolerate ~1e-3).
        head_learning_rate: Peak learning rate of the task heads (the linear layers on the pooled
            features), when it should differ from ``learning_rate``, which then drives the adapter
            (or, in full fine-tuning, the encoder) only; both follow the same warm-up and decay.
            ``None``: the heads train at ``learning_rate`` too.
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of steps with linear warm-up.
        lr_schedule: After the warm-up, ``"linear"`` decays the rate to 0 at the last
            step; ``"constant"`` keeps the peak rate (Avalanche's default loop).
        max_steps: Stop after this many steps (overrides ``epochs`` when smaller).
        eval_every: Evaluate on validation every N steps; ``None``: once per epoch, or every
            :data:`EVAL_EVERY_MAX` steps when an epoch is longer.
        patience: Stop after this many evaluations without improvement;
            ``None`` never stops early. The best evaluated state is kept.
        grad_clip: Max global gradient norm (> 0); ``None`` disables clipping.
        head_dropout: Dropout before the task head.
        eval_batch_size: Batch size for evaluation and prediction.
        length_grouping: Sort examples by length within windows of this many
            batches (then shuffle the batches), so batches hold rows of similar
            length and carry less padding; 0 keeps plain shuffled batches.
            Changes which rows share a batch, so results differ slightly.
        cache_frozen_mb: When the adapter leaves the bottom layers untouched
            (``AdapterConfig.layers``), run them once per example and reuse
            their outputs for every epoch and validation pass, if the cache
            fits in this many MiB; 0 never caches. Results are unchanged.
        gradient_checkpointing: Recompute each backbone layer's activations in the backward pass
            instead of keeping them (:meth:`cmtl.core.backbone.Backbone.checkpointed`): only each layer's
            input is kept, at the price of one more forward pass per step; for long texts on deep
            backbones. Results are unchanged. ``train_group`` with per-task adapters runs without it.
        validation_fraction: ``Registry.add_task`` without validation data holds out this fraction of
            the training data (seeded) to stop on, to choose between the trained states and the
            probe, and to keep as the task's held-out sample; 0 trains on all of it for the whole
            ``epochs`` cap. 0.2 measured better than 0.1 at 1,000 examples (docs/results.md).
        probe_init: For a new task's head (``Registry.add_task``, so also the benchmarks' ``adapters``
            strategy): first fit a linear probe on the features the untrained adapter gives (the
            frozen backbone's, or the ``init`` source's) and score it on validation as step 0;
            early stopping returns it when no trained state reaches its score, so a new task never
            ends below the probe on validation. Costs one inference pass over (up to 20,000 of)
            the training rows. Skipped without validation data (unless ``probe_start``). Updates
            warm-start from their parent's head and do not probe.
        probe_margin: With ``probe_init``, the trained adapter replaces the probe only when it beats it
            on validation by more than this many standard errors of the paired per-row difference
            in the primary metric (each row right or wrong for single-label tasks; see
            :func:`cmtl.training.evaluation.row_scores`), so a gain the validation rows cannot tell from
            noise keeps the simpler probe (the one-standard-error rule). 0 (the default) takes any
            gain. The version records the gain as ``training.probe_gain``. Refused (like ``probe_start``)
            beside ``probe_init=False``, which skips the probe it applies to.
        probe_start: With ``probe_init``, also start training from the probe's head (LP-FT, Kumar
            et al. 2022) instead of a fresh one. Off by default: measured less accurate at these
            budgets (docs/results.md, "Defaults of add_task").
        ema_decay: With validation data, also keep an exponential moving average of the trained
            parameters (Polyak averaging; this decay per step, bias-corrected so that it averages only
            the states visited; 0.98 has a half-life of 34 steps) and score it beside them at every
            evaluation: whichever of the two scores higher is the evaluation's candidate for the best
            state. ``None`` (the default) scores the trained parameters only. Costs one more validation
            pass per evaluation. Measured at 0.98 on six corpora with 200 held-out rows: it stops a little
            sooner and scores a little lower (the extra candidate is one more chance for a small validation
            set to choose badly; docs/results.md, "Defaults of add_task").
        seed: Seeds initialisation and data order; same seed, same adapter.
        progress: Show a tqdm bar with the running loss.
    """

    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    head_learning_rate: float | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    lr_schedule: Literal["linear", "constant"] = "linear"
    max_steps: int | None = None
    eval_every: int | None = None
    patience: int | None = 2
    grad_clip: float | None = 1.0
    head_dropout: float = 0.1
    eval_batch_size: int = 64
    length_grouping: int = 0
    cache_frozen_mb: int = 2048
    gradient_checkpointing: bool = False
    validation_fraction: float = 0.2
    probe_init: bool = True
    probe_margin: float = 0.0
    probe_start: bool = False
    ema_decay: float | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        plain_numbers(self)
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        for key in ("max_steps", "eval_every", "patience"):
            if getattr(self, key) is not None:
                positive[key] = getattr(self, key)
        for key, value in positive.items():  # a bool is an int to Python (epochs=True): refused as well
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(bad_param(key, "TrainConfig", "be a positive integer", value))
        for key in ("length_grouping", "cache_frozen_mb"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidParameterError(bad_param(key, "TrainConfig", "be an integer >= 0", value))
        for key in ("probe_init", "probe_start", "gradient_checkpointing"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidParameterError(bad_param(key, "TrainConfig", "be True or False", getattr(self, key)))
        check_seed(self.seed, "TrainConfig")
        if not self.learning_rate > 0:
            raise InvalidParameterError(bad_param("learning_rate", "TrainConfig", "be > 0", self.learning_rate))
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise InvalidParameterError(bad_param("head_learning_rate", "TrainConfig", "be > 0 or None",
                                                  self.head_learning_rate))
        if self.lr_schedule not in ("linear", "constant"):
            raise InvalidParameterError(bad_param("lr_schedule", "TrainConfig", "be one of ['linear', 'constant']",
                                                  self.lr_schedule))
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise InvalidParameterError(bad_param("warmup_ratio", "TrainConfig", "be in [0, 1)", self.warmup_ratio))
        if not isinstance(self.validation_fraction, (int, float)) or not 0.0 <= self.validation_fraction < 1.0:
            raise InvalidParameterError(bad_param("validation_fraction", "TrainConfig", "be in [0, 1)",
                                                  self.validation_fraction))
        margin = self.probe_margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin < math.inf:
            raise InvalidParameterError(bad_param("probe_margin", "TrainConfig", "be a finite number >= 0",
                                                  self.probe_margin))
        decay = self.ema_decay
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float))
                                  or not 0.0 < decay < 1.0):
            raise InvalidParameterError(bad_param("ema_decay", "TrainConfig", "be in (0, 1) or None", decay))
        clip = self.grad_clip  # clip_grad_norm_ scales by clip / norm: 0 would zero every step, < 0 reverse it
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise InvalidParameterError(bad_param("grad_clip", "TrainConfig", "be a number > 0 (the largest "
                                                  "gradient norm) or None (no clipping)", clip))
        unread = set_fields(self, ("probe_margin", "probe_start"))
        if unread and not self.probe_init:
            raise InvalidParameterError(bad_param(
                unread[0], "TrainConfig", "keep its default without probe_init", getattr(self, unread[0]),
                f"{' and '.join(unread)} only apply to the step-0 linear probe, which probe_init=False skips: they "
                "would be ignored. Leave them out, or set probe_init=True."))
        if not 0.0 <= self.head_dropout < 1.0:
            raise InvalidParameterError(bad_param("head_dropout", "TrainConfig", "be in [0, 1)", self.head_dropout))

    def unread_without_validation(self) -> list[str]:
        """The fields set away from their defaults that only validation rows are read with (early stopping,
        the running average, the probe's margin), leaving out ``patience=None`` (no early stopping)."""
        return [k for k in set_fields(self, ("eval_every", "patience", "ema_decay", "probe_margin"))
                if getattr(self, k) is not None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        kwargs = known_keys(cls, d)
        if kwargs.get("probe_init") is False:  # a record written before the check: these were never read
            kwargs.pop("probe_margin", None)
            kwargs.pop("probe_start", None)
        return cls(**kwargs)
