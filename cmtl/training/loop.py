"""The training loop for one adapter and head on a frozen backbone.

It reads top to bottom: learning rate -> evaluate / early-stop -> forward ->
loss check -> backward -> clip -> step. Only the parameters it is given
train; everything it needs arrives as arguments, so the same loop serves
new tasks, updates (their EWC or LwF penalty arrives as ``extra_loss``; replayed
rows are part of the data) and the benchmark learners.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, batches, length_grouped
from cmtl.errors import TrainingDivergedError
from cmtl.training.config import EVAL_EVERY_MAX, TrainConfig  # noqa: F401  (re-exported)
from cmtl.training.distributed import all_reduce_gradients, any_rank, is_main, shard
from cmtl.training.evaluation import Forward, compute_metrics, paired_gain, predict_logits, primary_metric

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run did: steps, time, the kept evaluation and the history.

    ``validation_logits`` are the kept state's logits on the validation rows, in
    row order (``None`` without validation data), so callers need not rerun them.
    ``start_features`` are the pooled features of the ``"train"`` and ``"validation"`` rows (row
    order) through the adapter as it was before training, where the linear probe computed them
    (:func:`cmtl.training.trainee.fit`); for a fresh adapter, the frozen backbone's.
    ``candidate_gain``: with a step-0 candidate, how many standard errors of the paired per-row
    difference the best trained state scored above it on validation
    (:func:`cmtl.training.evaluation.paired_gain`), whichever of the two was kept; ``None`` otherwise.
    ``candidate_metrics``: the step-0 candidate's validation metrics (``None`` without a candidate), so a
    caller can say what training bought over it. ``best_averaged``: the kept state is the running average of
    ``TrainConfig.ema_decay``, not the parameters as trained at ``best_step``.
    """

    steps: int
    seconds: float
    examples_seen: int
    best_step: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    validation_logits: torch.Tensor | None = None
    start_features: dict[str, torch.Tensor] = field(default_factory=dict)
    candidate_gain: float | None = None
    candidate_metrics: dict[str, float] | None = None
    best_averaged: bool = False

    @property
    def samples_per_second(self) -> float:
        return self.examples_seen / max(self.seconds, 1e-9)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block from a fixed RNG state (initialisation, dropout) and restore the caller's state after."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def assign(params: list[torch.Tensor] | list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    """Copy ``values`` into ``params`` in place, in order (one value per parameter)."""
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)


def clip_gradients(params: list[torch.nn.Parameter], grad_clip: float | None) -> torch.Tensor:
    """Clip the gradients of ``params`` to norm ``grad_clip`` (``None``: scale them by exactly 1) and return
    their norm before clipping, which the caller checks: a finite loss can still have a gradient that is not
    (a float16 backward that overflows), and the step would write NaN into the parameters."""
    return torch.nn.utils.clip_grad_norm_(params, math.inf if grad_clip is None else grad_clip)


def diverged(params: list[torch.nn.Parameter], initial: list[torch.Tensor], who: str, step: int,
             what: str) -> TrainingDivergedError:
    """Put ``params`` back to ``initial`` and return the error to raise: ``who`` ("Training of task 'x'")
    diverged at ``step``, ``what`` saying how."""
    assign(params, initial)
    return TrainingDivergedError(f"{who} diverged at step {step}: {what}. Nothing was saved. Lower the learning "
                                 "rate or check the data for extreme values.")


def get_lr(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak rate, then linear decay to zero (or the peak rate, ``constant``)."""
    warmup = int(total * config.warmup_ratio)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.learning_rate
    return config.learning_rate * max(0.0, (total - step) / max(1, total - warmup))


def adamw(params: Sequence[torch.nn.Parameter], learning_rate: float, weight_decay: float, *,
          heads: Sequence[torch.nn.Parameter] = (), head_learning_rate: float | None = None) -> torch.optim.AdamW:
    """AdamW over ``params``. With ``head_learning_rate`` the parameters also in ``heads`` (by identity)
    form a second group at that rate, the rest (the first group) at ``learning_rate``; :func:`set_lr`
    moves both along a schedule in proportion."""
    head_ids = {id(p) for p in heads} if head_learning_rate is not None else set()
    rest = [p for p in params if id(p) not in head_ids]
    own = [p for p in params if id(p) in head_ids]
    scale = (head_learning_rate or learning_rate) / learning_rate
    groups = [{"params": g, "lr": learning_rate * s, "lr_scale": s} for g, s in ((rest, 1.0), (own, scale)) if g]
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, step: int, total: int, config: TrainConfig) -> None:
    """Set every group of an :func:`adamw` optimiser to its rate at ``step`` of ``total``."""
    lr = get_lr(step, total, config)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def train(
    forward: Forward,
    params: list[torch.nn.Parameter],
    set_training: Callable[[bool], None],
    spec: TaskSpec,
    train_data: Encoded,
    validation: Encoded | None,
    config: TrainConfig,
    *,
    pad_id: int,
    device: torch.device,
    extra_loss: Callable[[dict[str, torch.Tensor], torch.Tensor, list[int]], torch.Tensor] | None = None,
    desc: str = "train",
    candidate: list[torch.Tensor] | None = None,
    candidate_logits: torch.Tensor | None = None,
    heads: Sequence[torch.nn.Parameter] = (),
) -> TrainResult:
    """Train ``params`` to minimise ``spec.loss(forward(batch))`` (+ ``extra_loss``).

    On return the parameters hold the best state seen on ``validation`` (or the
    last state without validation data). ``extra_loss(inputs, logits, rows)``
    gets the batch's inputs, its logits and the indices of its rows in
    ``train_data`` (so a penalty can look up values it computed once per row).
    ``candidate``: values for ``params`` (in order) scored as step 0 before training starts from the
    parameters as given; they are returned when no later evaluation reaches their score (the linear
    probe of :func:`cmtl.training.trainee.fit`), or, with ``config.probe_margin`` > 0, when the best
    trained state beats them by no more than that many standard errors of the paired per-row
    difference on ``validation``. Patience counts from the trained states only, so a
    strong candidate does not stop training before it has had its chance. ``candidate_logits``: the
    candidate's logits on ``validation`` when the caller has them (no forward pass is then run for it).
    ``heads``: those of ``params`` that belong to task heads; they train at ``config.head_learning_rate``
    when it is set (:func:`adamw`).

    Raises:
        TrainingDivergedError: the loss or the gradient became NaN or infinite, or no evaluation
            on ``validation`` gave a finite score. The parameters are left as they were before training.
    """
    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    eval_every = config.eval_every or min(steps_per_epoch, EVAL_EVERY_MAX)
    metric, higher = primary_metric(spec)
    optimizer = adamw(params, config.learning_rate, config.weight_decay, heads=heads,
                      head_learning_rate=config.head_learning_rate)
    initial = [p.detach().clone() for p in params]
    who = f"Training of task {spec.name!r}"  # what diverged, in the error
    best = [p.detach().clone() for p in params]
    best_score, best_step, best_metrics, best_logits, bad_evals = -math.inf, 0, {}, None, 0
    best_averaged = False
    history: list[dict[str, float]] = []
    # Exponential moving average of the parameters (Polyak averaging), scored beside them at each evaluation.
    average = ([torch.zeros_like(p, dtype=torch.float32) for p in params]
               if config.ema_decay is not None and validation is not None else None)
    generator = torch.Generator().manual_seed(config.seed)
    lengths = train_data.lengths()
    step, seen, stopped_early = 0, 0, False
    started = time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not (config.progress and is_main()), leave=False, dynamic_ncols=True)

    def logits_now() -> torch.Tensor:
        set_training(False)
        logits_val = predict_logits(forward, validation, batch_size=config.eval_batch_size, pad_id=pad_id,
                                    device=device)
        set_training(True)
        return logits_val

    def score(logits_val: torch.Tensor, averaged: bool = False) -> tuple[float, dict[str, float], torch.Tensor]:
        metrics = compute_metrics(spec, logits_val, validation.targets)
        history.append({"step": step, **metrics, **({"averaged": 1.0} if averaged else {})})
        logger.info("%s step %d: %s=%.4f", desc, step, metric, metrics[metric])
        return (metrics[metric] if higher else -metrics[metric]), metrics, logits_val

    def evaluate() -> bool:
        """Score the current parameters (and, with ``config.ema_decay``, their running average) on
        ``validation``; keep the better if best so far. True when it is time to stop."""
        nonlocal best_score, best_step, best_metrics, best_logits, bad_evals, best, best_averaged
        improved = False
        for state in ("trained", "averaged") if average is not None else ("trained",):
            if state == "averaged":
                current = [p.detach().clone() for p in params]
                # The average starts at zero: dividing by the weight it has gathered makes it the weighted mean
                # of the states visited (the bias correction of Adam's moments).
                assign(params, [a / (1.0 - config.ema_decay ** step) for a in average])
            value, metrics, logits_val = score(logits_now(), averaged=state == "averaged")
            if value > best_score:
                best_score, best_step, best_metrics, best_logits, improved = value, step, metrics, logits_val, True
                best, best_averaged = [p.detach().clone() for p in params], state == "averaged"
            if state == "averaged":
                assign(params, current)
        if improved:
            bad_evals = 0
            return False
        bad_evals += 1
        return config.patience is not None and bad_evals >= config.patience

    fallback = None  # the candidate's (score, metrics, logits): kept only if training never reaches it
    set_training(True)
    try:
        if candidate is not None and validation is not None:
            if candidate_logits is None:
                given = [p.detach().clone() for p in params]
                assign(params, candidate)
                candidate_logits = logits_now()
                assign(params, given)
            fallback = score(candidate_logits)  # not what patience counts from: training must get its chance
        while step < total and not stopped_early:
            order = torch.randperm(len(train_data), generator=generator).tolist()
            if config.length_grouping:
                order = length_grouped(order, lengths, config.batch_size, config.length_grouping, generator)
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                local = shard(batch)  # the whole batch without a process group
                set_lr(optimizer, step, total, config)
                if local:
                    _, inputs, targets = next(batches(train_data, local, len(local), pad_id, device))
                    logits = forward(inputs)
                    loss = spec.loss(logits, targets)
                    if extra_loss is not None:
                        loss = loss + extra_loss(inputs, logits, local)
                else:  # fewer rows than ranks in the last batch: this rank adds zero gradient
                    loss = sum(p.sum() for p in params) * 0.0
                if any_rank(not torch.isfinite(loss), device):  # every rank stops together
                    raise diverged(params, initial, who, step, f"loss is {loss.item()}")
                # Weight by this rank's share so the summed gradients equal the global batch's mean.
                (loss * (len(local) / len(batch))).backward()
                all_reduce_gradients(params)
                norm = clip_gradients(params, config.grad_clip)  # a NaN written on the last step goes unseen
                if any_rank(not torch.isfinite(norm), device):
                    optimizer.zero_grad(set_to_none=True)
                    raise diverged(params, initial, who, step, f"the gradient norm is {norm.item()}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if average is not None:
                    with torch.no_grad():
                        for a, p in zip(average, params):
                            a.lerp_(p.detach().to(a.dtype), 1.0 - config.ema_decay)  # kept in float32
                step += 1
                seen += len(batch)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

                if validation is not None and (step % eval_every == 0 or step == total):
                    stopped_early = evaluate() and step < total  # patience out at the cap's end stops nothing
                if step >= total or stopped_early:
                    break
    finally:
        set_training(False)
        bar.close()
    gain = None
    if validation is not None:
        if fallback is not None:
            if best_logits is not None:
                gain = paired_gain(spec, best_logits, fallback[2], validation.targets)
            if fallback[0] > best_score or (config.probe_margin > 0 and gain is not None
                                            and gain <= config.probe_margin):
                best_score, best_metrics, best_logits = fallback
                best_step, best, best_averaged = 0, candidate, False
        if best_logits is None:  # no evaluation scored a finite value: no state to keep, none known to be good
            raise diverged(params, initial, who, step, f"validation {metric} was {history[-1][metric]} at every "
                           "evaluation")
        # Keep the best evaluated state, not the last one (early stopping).
        assign(params, best)
    else:
        best_step = step
    return TrainResult(
        steps=step,
        seconds=time.perf_counter() - started,
        examples_seen=seen,
        best_step=best_step,
        best_metrics=best_metrics,
        history=history,
        stopped_early=stopped_early,
        validation_logits=best_logits,
        candidate_gain=gain,
        candidate_metrics=None if fallback is None else fallback[1],
        best_averaged=best_averaged,
    )
