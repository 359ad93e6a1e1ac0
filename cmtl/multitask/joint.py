"""Joint multi-task training of one shared adapter with a head per task.

Every step draws a mixed batch: each row's task is sampled with the sampler's probabilities
(:func:`~cmtl.multitask.schedules.sampling_probabilities`, or a ``sampling_schedule``'s for that
step; or every task gets a full batch, ``"per_task"``), the row is the next example of that task's
shuffled stream, and the batch goes through the backbone and the shared adapter in length-sorted
passes (``pass_overhead``); each row then goes through its task's head. The loss is
Σ_t w_t(step) · L_t over the tasks present, with w_t from static weights, uncertainty weighting
(Kendall et al., 2018) or an MT2ST schedule for auxiliary tasks (Liu & Yu, 2024; see
:mod:`cmtl.multitask.schedules`). Every ``tag_every`` steps TAG (Fifty et al., 2021) measures the
lookahead affinities of the tasks on that step's batch (:mod:`cmtl.multitask.affinity`).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cmtl.core.heads import TaskHead, route_to_heads
from cmtl.data import Encoded, batches, padding_chunks
from cmtl.multitask.affinity import lookahead_affinity, task_gradients
from cmtl.multitask.config import MultiTaskConfig, MultiTaskResult
from cmtl.multitask.schedules import UncertaintyWeighting, sampling_probabilities, scheduled_probabilities
from cmtl.training import distributed
from cmtl.training.evaluation import compute_metrics, predict_logits


def grouped_forward(embed: Callable[..., torch.Tensor], heads: Sequence[TaskHead]
                    ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """The ``forward`` :func:`train_multitask` expects: ``embed(**inputs)`` once for the batch, then row b
    through ``heads[inputs["groups"][b]]``; logits (B, widest head), columns past a head's outputs masked."""
    width = max(h.linear.out_features for h in heads)

    def forward(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = dict(inputs)
        groups = inputs.pop("groups")
        return route_to_heads(embed(**inputs), groups, heads.__getitem__, width)

    return forward


def train_multitask(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    shared: list[nn.Parameter],
    heads: list[nn.Parameter],
    set_training: Callable[[bool], None],
    specs: Sequence,
    train_data: Sequence[Encoded],
    validation: Sequence[Encoded | None],
    config: MultiTaskConfig,
    training,
    *,
    pad_id: int,
    device: torch.device,
    task_heads: Sequence[nn.Parameter] | None = None,
) -> MultiTaskResult:
    """Train ``shared`` (adapter) and ``heads`` on several tasks at once; keep the best evaluated state.

    ``forward(inputs)`` returns logits (B, width) where row b went through the head of task
    ``inputs["groups"][b]``; columns past a task's labels are masked. ``train_data[t]`` and
    ``validation[t]`` are task t's encodings (their ``groups`` are ignored and set to t).
    ``training`` (a :class:`~cmtl.training.config.TrainConfig`) supplies batch size, learning rate,
    warm-up, clipping, seed and evaluation batch size. ``heads`` holds every per-task parameter (heads,
    per-task adapter factors); those in ``task_heads`` (all of ``heads`` when ``None``) train at
    ``training.head_learning_rate`` when it is set.

    Raises:
        TrainingDivergedError: the loss or the gradient became NaN or infinite; the parameters are left as
            they were before training.
    """
    from cmtl.training.loop import adamw, clip_gradients, diverged, set_lr

    names = [s.name for s in specs]
    T = len(names)
    if T < 1 or len(train_data) != T or len(validation) != T:
        raise ValueError(f"Joint training needs one training and one validation entry per task; got {T} tasks, "
                         f"{len(train_data)} training and {len(validation)} validation entries.")
    if any(s.problem_type != "single_label" for s in specs):
        raise ValueError("Joint training mixes tasks in one batch and supports single-label tasks only; got "
                         f"{[(s.name, s.problem_type) for s in specs if s.problem_type != 'single_label']}.")
    sizes = [len(d) for d in train_data]
    probs = sampling_probabilities(sizes, config.sampler, config.temperature, config.size_cap)
    if config.primary is not None and config.primary not in names:
        raise ValueError(f"Primary task {config.primary!r} is not among {names}.")
    if config.schedule == "adaptive_switch" and validation[names.index(config.primary)] is None:
        raise ValueError(f"schedule='adaptive_switch' stops the auxiliaries when the primary's validation accuracy "
                         f"stops improving, but the primary task {config.primary!r} has no validation data (it would "
                         "follow the other tasks' scores, or never switch). Give it validation rows, or use "
                         "schedule='switch' with a switch_step.")
    for knob in ("weights", "gamma0", "eta", "nu"):  # a misspelt task would train at the default silently
        value = getattr(config, knob)
        unknown = sorted(set(value) - set(names)) if isinstance(value, dict) else []
        if unknown:
            raise ValueError(f"MultiTaskConfig.{knob} names {unknown}, which are not among the tasks {names}.")
    reference = sizes[names.index(config.primary)] if config.primary else max(sizes)
    total = config.steps or max(1, math.ceil(reference / training.batch_size) * config.epochs)
    if config.schedule == "switch" and config.switch_step >= total:
        raise ValueError(f"switch_step={config.switch_step} is not before the end of this run of {total} steps: the "
                         "auxiliaries would never stop. Pick a switch_step below it, or schedule='none'.")
    eval_every = config.eval_every or max(1, total // 10)
    data = [Encoded(d.input_ids, d.token_type_ids, d.targets, torch.full((len(d),), t, dtype=torch.long))
            for t, d in enumerate(train_data)]
    uncertainty = UncertaintyWeighting(T).to(device) if config.weighting == "uncertainty" else None
    params = list(shared) + list(heads) + (list(uncertainty.parameters()) if uncertainty else [])
    # The shared adapter's group comes first: TAG's lookahead reads its rate.
    optimizer = adamw(params, training.learning_rate, training.weight_decay,
                      heads=heads if task_heads is None else task_heads, head_learning_rate=training.head_learning_rate)
    generator = torch.Generator().manual_seed(training.seed)
    streams = [iter(()) for _ in range(T)]

    def next_row(t: int) -> int:
        nonlocal streams
        try:
            return next(streams[t])
        except StopIteration:
            streams[t] = iter(torch.randperm(sizes[t], generator=generator).tolist())
            return next(streams[t])

    # TAG: each pair's affinity summed over the steps that measured it, and their count
    affinity, measured, seen = np.zeros((T, T)), np.zeros((T, T)), torch.zeros(T, dtype=torch.long)
    initial = [p.detach().clone() for p in params]
    best_score, best = -math.inf, initial
    result = MultiTaskResult(steps=0, seconds=0.0)
    has_validation = any(v is not None for v in validation)
    bad_evals, switched = 0, False
    started = time.perf_counter()
    set_training(True)
    try:
        for step in range(total):
            set_lr(optimizer, step, total, training)
            weights = [config.gamma(n, step, switched) for n in names]
            # A task whose weight has reached 0 (Switch) leaves the batch: from then on it costs nothing.
            active = [t for t in range(T) if weights[t] > 0] or list(range(T))
            if config.sampler == "per_task":
                picks = [t for t in active for _ in range(training.batch_size)]
            else:
                now = probs if config.sampling_schedule is None else scheduled_probabilities(
                    config.sampling_schedule, step, total, names)
                mix = torch.as_tensor(now) * torch.tensor([float(t in active) for t in range(T)], dtype=torch.float64)
                if not mix.sum() > 0:
                    raise ValueError(f"At step {step} the sampling schedule gives weight only to tasks whose loss "
                                     f"weight is 0 (active: {[names[t] for t in active]}); give an active task a "
                                     "weight > 0.")
                picks = torch.multinomial(mix, training.batch_size, replacement=True, generator=generator).tolist()
            drawn = torch.bincount(torch.tensor(picks), minlength=T)  # rows per task, whole batch
            seen += drawn
            rows = [(t, next_row(t)) for t in picks]  # the same on every rank
            counts = drawn.to(device)
            present = counts > 0
            local = distributed.shard(rows)  # this rank's rows (all of them without a process group)
            if local:
                batch = Encoded.concat([_select(data[t], [i]) for t, i in local])
                passes = _passes(batch, config.pass_overhead, pad_id, device)
                targets = torch.cat([p[1] for p in passes])
                groups = torch.cat([p[0]["groups"] for p in passes])

                def logits_of(passes=passes) -> torch.Tensor:  # rows in pass order, like targets and groups
                    return torch.cat([forward(inputs) for inputs, _ in passes])

                # Each task's loss summed over this rank's rows / its rows in the whole batch: summed over
                # ranks, the mean over the whole batch.
                losses = _task_losses(specs, logits_of(), targets, groups, T, counts)
            else:
                logits_of = None
                losses = sum(p.sum() for p in params) * 0.0 + torch.zeros(T, device=device)
            if uncertainty is not None:
                loss = uncertainty(losses, present, distributed.world()[1])
            else:
                loss = (torch.tensor(weights, device=device) * losses)[present].sum()
            if distributed.any_rank(not torch.isfinite(loss), device):  # every rank stops together
                raise diverged(params, initial, "Joint training", step, f"loss is {loss.item()}")
            tag = bool(config.tag_every) and step % config.tag_every == 0 and T > 1
            if tag:  # per-task gradients of the shared parameters, before the step changes anything
                tag_started = time.perf_counter()
                task_grads = task_gradients(losses, present, shared)
                result.tag_seconds += time.perf_counter() - tag_started
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_gradients(params)
            if tag:
                tag_started = time.perf_counter()

                def batch_losses() -> torch.Tensor:  # this rank's (T,) task losses at the current parameters
                    if logits_of is None:
                        return torch.zeros(T, device=counts.device)
                    return _task_losses(specs, logits_of(), targets, groups, T, counts)

                set_training(False)
                Z = lookahead_affinity(batch_losses, shared, optimizer, task_grads, T)
                set_training(True)
                affinity += np.nan_to_num(Z, nan=0.0)
                measured += ~np.isnan(Z)
                result.tag_seconds += time.perf_counter() - tag_started
            norm = clip_gradients(params, training.grad_clip)
            if distributed.any_rank(not torch.isfinite(norm), device):
                optimizer.zero_grad(set_to_none=True)
                raise diverged(params, initial, "Joint training", step, f"the gradient norm is {norm.item()}")
            optimizer.step()
            result.steps = step + 1
            if has_validation and ((step + 1) % eval_every == 0 or step + 1 == total):
                set_training(False)
                metrics = _evaluate(forward, specs, validation, training, pad_id, device)
                set_training(True)
                scores = [metrics[n]["accuracy"] for n in names if n in metrics]
                score = (metrics[config.primary]["accuracy"] if config.primary in metrics
                         else float(np.mean(scores)))
                result.history.append({"step": step + 1, "seconds": time.perf_counter() - started,
                                       **{f"{n}_accuracy": m["accuracy"] for n, m in metrics.items()}})
                if score > best_score:
                    best_score, bad_evals = score, 0
                    best = [p.detach().clone() for p in params]
                    result.best_step, result.best_metrics = step + 1, {n: m["accuracy"] for n, m in metrics.items()}
                else:
                    bad_evals += 1
                    if config.schedule == "adaptive_switch" and not switched and bad_evals >= config.switch_patience:
                        switched, result.switched_at, bad_evals = True, step + 1, 0
    finally:
        set_training(False)
    if has_validation:
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
    else:  # the last state is kept
        result.best_step = result.steps
    result.seconds = time.perf_counter() - started
    result.rows_per_task = dict(zip(names, seen.tolist()))
    if measured.any():  # a pair never measured (its tasks never shared a TAG step's batch) reads 0
        result.affinity = (affinity / np.maximum(measured, 1)).tolist()
    if uncertainty is not None:
        result.task_weights = dict(zip(names, torch.exp(-uncertainty.log_var.detach()).tolist()))
    return result


def _select(d: Encoded, idx: list[int]) -> Encoded:
    return Encoded([d.input_ids[i] for i in idx],
                   None if d.token_type_ids is None else [d.token_type_ids[i] for i in idx],
                   None if d.targets is None else d.targets[idx], d.groups[idx])


def _passes(batch: Encoded, overhead: int | None, pad_id: int, device: torch.device
            ) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """(padded inputs, targets) of each backbone pass over ``batch``: its length chunks, or all rows at once."""
    chunks = [list(range(len(batch)))] if overhead is None else padding_chunks(batch.lengths(), overhead)
    return [next(batches(batch, chunk, len(chunk), pad_id, device))[1:] for chunk in chunks]


def _task_losses(specs, logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, T: int,
                 counts: torch.Tensor) -> torch.Tensor:
    """(T,): each task's loss summed over these rows, divided by ``counts[t]``, its rows in the
    whole (all-rank) batch; 0 where these rows hold none of a task."""
    out = []
    for t in range(T):
        rows = groups == t
        if rows.any():
            mean = specs[t].loss(logits[rows, : specs[t].num_outputs], targets[rows])
            out.append(mean * rows.sum() / counts[t])
        else:
            out.append(logits.new_zeros(()))
    return torch.stack(out)


def _evaluate(forward, specs, validation, training, pad_id, device) -> dict[str, dict[str, float]]:
    out = {}
    for t, (spec, data) in enumerate(zip(specs, validation)):
        if data is None:
            continue
        enc = Encoded(data.input_ids, data.token_type_ids, data.targets, torch.full((len(data),), t, dtype=torch.long))
        logits = predict_logits(forward, enc, batch_size=training.eval_batch_size, pad_id=pad_id, device=device)
        out[spec.name] = compute_metrics(spec, logits[:, : spec.num_outputs], enc.targets)
    return out
