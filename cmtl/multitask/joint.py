"""Joint multi-task training of one shared adapter with a head per task; MT2ST schedules; TAG affinities.

Every step draws a mixed batch: each row's task is sampled with the sampler's probabilities
(:func:`sampling_probabilities`, or a ``sampling_schedule``'s for that step; or every task gets a
full batch, ``"per_task"``), the row is the next example of that task's shuffled stream, and the
batch goes through the backbone and the shared adapter in length-sorted passes
(``pass_overhead``); each row then goes through its task's head. The loss is
Σ_t w_t(step) · L_t over the tasks present, with w_t from static weights, uncertainty weighting
(Kendall et al., 2018) or an MT2ST schedule for auxiliary tasks (Liu & Yu, 2024: Diminish
γ_k(t) = γ_k,0 · exp(−η_k · t^ν_k), or Switch, fixed or adaptive). Every ``tag_every`` steps,
TAG (Fifty et al., 2021) takes, for each task i, a lookahead step of the shared parameters on
task i's loss alone (on a copy, with the AdamW update rule and state) and records
Z_{i→j} = 1 − L_j(θ') / L_j(θ) on the same batch; :func:`select_groups` turns the averaged
matrix into task groups.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn

from cmtl.core.tasks import TaskHead, route_to_heads
from cmtl.data import Encoded, batches, padding_chunks
from cmtl.training import distributed
from cmtl.training.evaluation import compute_metrics, predict_logits

Sampler = Literal["uniform", "proportional", "temperature", "per_task"]
Weighting = Literal["static", "uncertainty"]
Schedule = Literal["none", "diminish", "switch", "adaptive_switch"]


# --- samplers and loss weights ----------------------------------------------------------


def sampling_probabilities(sizes: Sequence[int], kind: Sampler = "temperature", temperature: float = 2.0,
                           cap: int | None = None) -> np.ndarray:
    """Task probabilities: uniform 1/T; proportional n_t / Σn; temperature ∝ min(n_t, cap)^(1/temperature).

    ``"per_task"`` draws nothing: every step takes a full batch of each task (MT2ST's
    L_primary + Σ_k γ_k L_aux,k, each loss on its own batch), so each task's share of the rows is 1/T.
    """
    n = np.asarray(sizes, dtype=float)
    if len(n) == 0 or (n <= 0).any():
        raise ValueError(f"Every task needs at least one example; sizes are {list(sizes)}.")
    if cap is not None:
        if cap < 1:
            raise ValueError(f"The size cap must be >= 1. Got {cap}.")
        n = np.minimum(n, cap)
    if kind in ("uniform", "per_task"):
        p = np.ones_like(n)
    elif kind == "proportional":
        p = n
    elif kind == "temperature":
        if not temperature > 0:
            raise ValueError(f"The sampling temperature must be > 0. Got {temperature}.")
        p = n ** (1.0 / temperature)
    else:
        raise ValueError(f"Unknown sampler {kind!r}. Choose 'uniform', 'proportional', 'temperature' or 'per_task'.")
    return p / p.sum()


def diminish(step: float, gamma0: float, eta: float, nu: float) -> float:
    """MT2ST Diminish: γ(t) = γ0 · exp(−η · t^ν)."""
    return gamma0 * math.exp(-eta * step**nu)


def switch(step: float, gamma0: float, switch_step: float) -> float:
    """MT2ST Switch: γ0 before ``switch_step``, 0 from then on."""
    return gamma0 if step < switch_step else 0.0


class UncertaintyWeighting(nn.Module):
    """Kendall et al. (2018): L = Σ_t exp(−s_t) · L_t + s_t with learned s_t = log σ_t² (no factor ½ or 2)."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.log_var = nn.Parameter(torch.zeros(num_tasks))

    def forward(self, losses: torch.Tensor, present: torch.Tensor, ranks: int = 1) -> torch.Tensor:
        """``losses`` (T,) per task, ``present`` (T,) bool: tasks with rows in this batch. Under
        data parallelism each of ``ranks`` ranks passes its share of the losses and ``s_t / ranks``,
        so the terms summed over ranks are the whole batch's."""
        s = self.log_var[present]
        return (torch.exp(-s) * losses[present] + s / ranks).sum()


@dataclass(kw_only=True, frozen=True)
class MultiTaskConfig:
    """How a group of tasks trains together.

    Args:
        sampler: How rows of a mixed batch pick their task (see :func:`sampling_probabilities`);
            ``"per_task"``: every step holds ``batch_size`` rows of each task whose weight is
            not 0 (after a Switch, a step is a single-task step).
        temperature: Temperature of the ``"temperature"`` sampler.
        size_cap: Cap on task sizes before sampling; ``None`` no cap.
        sampling_schedule: A time-dependent sampler: ``f(step, total_steps)`` returns a weight
            >= 0 per task (in task order), normalised into that step's probabilities; it replaces
            the fixed probabilities of ``sampler`` (which must then draw, i.e. not be
            ``"per_task"``). Registry records store its name.
        weighting: ``"static"`` (``weights``, default 1 each) or ``"uncertainty"``.
        weights: Static loss weight per task name.
        primary: MT2ST: the primary task; the others are auxiliary and weighted by ``schedule``.
        schedule: ``"none"``, ``"diminish"``, ``"switch"`` (at ``switch_step``) or
            ``"adaptive_switch"`` (auxiliaries stop when the primary validation metric has not
            improved for ``switch_patience`` evaluations).
        gamma0: Initial auxiliary weight γ_k,0 (Diminish, Switch), per task name or one value for all.
        eta: Diminish decay rate η_k, per task name or one value.
        nu: Diminish curvature ν_k, per task name or one value.
        switch_step: Step at which Switch drops the auxiliaries.
        switch_patience: Evaluations without improvement before the adaptive switch fires.
        tag_every: Measure TAG lookahead affinities every this many steps; ``None`` never.
        steps: Optimiser steps; ``None``: epochs of the primary task (or of the largest task).
        epochs: Used when ``steps`` is ``None``.
        eval_every: Evaluate every task's validation data every this many steps; ``None``: 10 times.
        pass_overhead: Each mixed batch runs through the backbone in length-sorted sub-batches
            that minimise padded tokens plus this many tokens per pass (its fixed cost; see
            :func:`~cmtl.data.examples.padding_chunks`), so a few long texts of one task do not pad the
            short texts of the others; ``None``: one pass per batch. Same loss and gradients up
            to float rounding (adapter dropout draws differ).
    """

    sampler: Sampler = "temperature"
    temperature: float = 2.0
    size_cap: int | None = None
    sampling_schedule: Callable[[int, int], Sequence[float]] | None = None
    weighting: Weighting = "static"
    weights: dict[str, float] | None = None
    primary: str | None = None
    schedule: Schedule = "none"
    gamma0: float | dict[str, float] = 1.0
    eta: float | dict[str, float] = 0.01
    nu: float | dict[str, float] = 1.0
    switch_step: int | None = None
    switch_patience: int = 2
    tag_every: int | None = None
    steps: int | None = None
    epochs: int = 3
    eval_every: int | None = None
    pass_overhead: int | None = 512

    def __post_init__(self) -> None:
        if self.schedule != "none" and self.primary is None:
            raise ValueError(f"schedule={self.schedule!r} needs a primary task: set MultiTaskConfig.primary.")
        if self.schedule == "switch" and self.switch_step is None:
            raise ValueError("schedule='switch' needs switch_step (the step at which auxiliaries stop).")
        if self.sampling_schedule is not None:
            if not callable(self.sampling_schedule):
                raise ValueError("MultiTaskConfig.sampling_schedule must be a function (step, total_steps) -> "
                                 f"weights per task. Got {self.sampling_schedule!r}.")
            if self.sampler == "per_task":
                raise ValueError("sampler='per_task' takes a full batch of every task each step, so there is nothing "
                                 "for sampling_schedule to weigh: use sampler='uniform' (or another drawing sampler) "
                                 "with a schedule.")
        if self.weighting == "uncertainty" and self.schedule != "none":
            raise ValueError("Uncertainty weighting learns every task's weight; it cannot run with an MT2ST schedule.")
        for key in ("steps", "tag_every", "eval_every"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MultiTaskConfig.{key} must be a positive integer or None. Got {value!r}.")
        if self.pass_overhead is not None and (not isinstance(self.pass_overhead, int) or self.pass_overhead < 0):
            raise ValueError(f"MultiTaskConfig.pass_overhead must be an integer >= 0 (tokens) or None. "
                             f"Got {self.pass_overhead!r}.")

    def to_dict(self) -> dict:
        out = asdict(self)
        f = self.sampling_schedule
        if f is not None:  # a function is not JSON: record which one it was
            out["sampling_schedule"] = f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', repr(f))}"
        return out

    def _per_task(self, name: str, value: float | dict[str, float]) -> float:
        return float(value.get(name, 1.0) if isinstance(value, dict) else value)

    def gamma(self, task: str, step: int, switched: bool) -> float:
        """Loss weight of ``task`` at ``step`` under the static weights or the MT2ST schedule."""
        static = (self.weights or {}).get(task, 1.0)
        if self.schedule == "none" or task == self.primary:
            return static
        g0 = self._per_task(task, self.gamma0)
        if self.schedule == "diminish":
            return diminish(step, g0, self._per_task(task, self.eta), self._per_task(task, self.nu))
        if self.schedule == "switch":
            return switch(step, g0, self.switch_step)
        return 0.0 if switched else g0  # adaptive_switch


# --- TAG group selection ------------------------------------------------------------------


def group_score(Z: np.ndarray, group: Sequence[int], j: int) -> float:
    """Mean over i ∈ group, i ≠ j of Z[i, j]; 0 for a task alone (no other member helps it)."""
    others = [i for i in group if i != j]
    return float(np.mean([Z[i, j] for i in others])) if others else 0.0


def select_groups(Z: np.ndarray, max_groups: int, *, exact_limit: int = 2_000_000
                  ) -> tuple[list[tuple[int, ...]], float]:
    """At most ``max_groups`` groups (they may overlap) covering every task, maximising
    Σ_j max over chosen groups S ∋ j of :func:`group_score` (Fifty et al., 2021).

    Exhaustive over all combinations of non-empty subsets while their number stays under
    ``exact_limit`` (n ≤ 7 tasks for 3 groups, n ≤ 10 for 2); beyond, a greedy search adds the
    subset with the best gain until ``max_groups``, then a local search swaps single groups
    while that helps (an approximation; the result says which ran via its score only).

    Returns:
        (groups as sorted tuples of task indices, total score).
    """
    Z = np.asarray(Z, dtype=float)
    n = Z.shape[0]
    if Z.shape != (n, n) or n == 0:
        raise ValueError(f"The affinity matrix must be square and non-empty. Got shape {Z.shape}.")
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1. Got {max_groups}.")
    subsets = [s for r in range(1, n + 1) for s in itertools.combinations(range(n), r)]
    scores = np.array([[group_score(Z, s, j) if j in s else -np.inf for j in range(n)] for s in subsets])

    def total(chosen: Sequence[int]) -> float:
        best = scores[list(chosen)].max(0)
        return float(best.sum()) if np.isfinite(best).all() else -np.inf

    g = min(max_groups, n)
    count = sum(math.comb(len(subsets), k) for k in range(1, g + 1))
    if count <= exact_limit:
        best_combo, best = None, -np.inf
        for k in range(1, g + 1):
            for combo in itertools.combinations(range(len(subsets)), k):
                value = total(combo)
                if value > best + 1e-12:
                    best_combo, best = combo, value
        return [subsets[i] for i in best_combo], best
    chosen = [len(subsets) - 1]  # all tasks together covers everyone
    while len(chosen) < g:
        gains = [(total(chosen + [i]), i) for i in range(len(subsets)) if i not in chosen]
        value, i = max(gains)
        if value <= total(chosen) + 1e-12:
            break
        chosen.append(i)
    improved = True
    while improved:
        improved = False
        for pos in range(len(chosen)):
            for i in range(len(subsets)):
                trial = chosen[:pos] + [i] + chosen[pos + 1:]
                if i not in chosen and total(trial) > total(chosen) + 1e-12:
                    chosen, improved = trial, True
    return [subsets[i] for i in chosen], total(chosen)


# --- training -----------------------------------------------------------------------------


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


@dataclass
class MultiTaskResult:
    """What :func:`train_multitask` did: steps, time, rows trained per task, per-task validation
    history, TAG affinities."""

    steps: int
    seconds: float
    rows_per_task: dict[str, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    affinity: list[list[float]] | None = None
    tag_seconds: float = 0.0
    switched_at: int | None = None
    task_weights: dict[str, float] = field(default_factory=dict)


def _adamw_lookahead(params: list[nn.Parameter], grads: Sequence[torch.Tensor], optimizer: torch.optim.AdamW
                     ) -> list[torch.Tensor]:
    """The parameters one AdamW step on ``grads`` would give, from the optimiser's state (untouched)."""
    group = optimizer.param_groups[0]
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    out = []
    for p, g in zip(params, grads):
        state = optimizer.state.get(p, {})
        step = float(state["step"]) + 1 if "step" in state else 1.0
        m = state["exp_avg"] * b1 + (1 - b1) * g if "exp_avg" in state else (1 - b1) * g
        v = state["exp_avg_sq"] * b2 + (1 - b2) * g * g if "exp_avg_sq" in state else (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**step), v / (1 - b2**step)
        out.append(p.detach() * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps))
    return out


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
) -> MultiTaskResult:
    """Train ``shared`` (adapter) and ``heads`` on several tasks at once; keep the best evaluated state.

    ``forward(inputs)`` returns logits (B, width) where row b went through the head of task
    ``inputs["groups"][b]``; columns past a task's labels are masked. ``train_data[t]`` and
    ``validation[t]`` are task t's encodings (their ``groups`` are ignored and set to t).
    ``training`` (a :class:`~cmtl.training.loop.TrainConfig`) supplies batch size, learning rate,
    warm-up, clipping, seed and evaluation batch size.
    """
    from cmtl.training.loop import get_lr

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
    reference = sizes[names.index(config.primary)] if config.primary else max(sizes)
    total = config.steps or max(1, math.ceil(reference / training.batch_size) * config.epochs)
    eval_every = config.eval_every or max(1, total // 10)
    data = [Encoded(d.input_ids, d.token_type_ids, d.targets, torch.full((len(d),), t, dtype=torch.long))
            for t, d in enumerate(train_data)]
    uncertainty = UncertaintyWeighting(T).to(device) if config.weighting == "uncertainty" else None
    params = list(shared) + list(heads) + (list(uncertainty.parameters()) if uncertainty else [])
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    generator = torch.Generator().manual_seed(training.seed)
    streams = [iter(()) for _ in range(T)]

    def next_row(t: int) -> int:
        nonlocal streams
        try:
            return next(streams[t])
        except StopIteration:
            streams[t] = iter(torch.randperm(sizes[t], generator=generator).tolist())
            return next(streams[t])

    affinity, measured, seen = np.zeros((T, T)), 0, torch.zeros(T, dtype=torch.long)
    best_score, best = -math.inf, [p.detach().clone() for p in params]
    result = MultiTaskResult(steps=0, seconds=0.0)
    has_validation = any(v is not None for v in validation)
    bad_evals, switched = 0, False
    started = time.perf_counter()
    set_training(True)
    try:
        for step in range(total):
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, total, training)
            weights = [config.gamma(n, step, switched) for n in names]
            # A task whose weight has reached 0 (Switch) leaves the batch: from then on it costs nothing.
            active = [t for t in range(T) if weights[t] > 0] or list(range(T))
            if config.sampler == "per_task":
                picks = [t for t in active for _ in range(training.batch_size)]
            else:
                now = probs if config.sampling_schedule is None else _scheduled(config.sampling_schedule, step,
                                                                                 total, names)
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
            tag = bool(config.tag_every) and step % config.tag_every == 0 and T > 1
            if tag:  # per-task gradients of the shared parameters, before the step changes anything
                tag_started = time.perf_counter()
                task_grads = {i: _summed(torch.autograd.grad(losses[i], shared, retain_graph=True,
                                                             allow_unused=True), shared)
                              for i in range(T) if bool(present[i])}
                result.tag_seconds += time.perf_counter() - tag_started
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_gradients(params)
            if tag:
                tag_started = time.perf_counter()
                set_training(False)
                affinity += _tag_step(logits_of, targets if local else None, groups if local else None,
                                      specs, shared, optimizer, task_grads, T, counts)
                set_training(True)
                measured += 1
                result.tag_seconds += time.perf_counter() - tag_started
            if training.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, training.grad_clip)
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
    result.seconds = time.perf_counter() - started
    result.rows_per_task = dict(zip(names, seen.tolist()))
    if measured:
        result.affinity = (affinity / measured).tolist()
    if uncertainty is not None:
        result.task_weights = dict(zip(names, torch.exp(-uncertainty.log_var.detach()).tolist()))
    return result


def _scheduled(schedule, step: int, total: int, names: Sequence[str]) -> np.ndarray:
    """This step's task probabilities from a ``sampling_schedule``, checked."""
    w = np.asarray(schedule(step, total), dtype=float)
    if w.shape != (len(names),) or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"sampling_schedule({step}, {total}) must return {len(names)} finite weights >= 0 with a "
                         f"positive sum, one per task in the order {list(names)}. Got {w.tolist()}.")
    return w / w.sum()


def _select(d: Encoded, idx: list[int]) -> Encoded:
    return Encoded([d.input_ids[i] for i in idx], None if d.token_type_ids is None else [d.token_type_ids[i] for i in idx],
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


def _summed(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients (zeros where unused) summed over ranks."""
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return [distributed.all_reduce_sum(g) for g in grads]


def _tag_step(logits_of, targets, groups, specs, shared, optimizer, task_grads, T, counts) -> np.ndarray:
    """Z[i, j] = 1 − L_j(θ'_i) / L_j(θ) on this batch (dropout off), θ'_i = one AdamW step of the
    shared parameters on task i's gradient alone, from the optimiser's current state.
    ``logits_of()`` gives this batch's logits; it is None on a rank without rows in this batch
    (that rank still joins the all-reduces)."""

    def losses() -> torch.Tensor:
        local = (_task_losses(specs, logits_of(), targets, groups, T, counts) if logits_of is not None
                 else torch.zeros(T, device=counts.device))
        return distributed.all_reduce_sum(local)

    Z = np.zeros((T, T))
    originals = [p.detach().clone() for p in shared]
    with torch.no_grad():
        before = losses()
        for i, grads in task_grads.items():
            for p, a in zip(shared, _adamw_lookahead(shared, grads, optimizer)):
                p.copy_(a)
            after = losses()
            for p, o in zip(shared, originals):
                p.copy_(o)
            for j in task_grads:
                if before[j] > 0:
                    Z[i, j] = float(1 - after[j] / before[j])
    return Z


def _evaluate(forward, specs, validation, training, pad_id, device) -> dict[str, dict[str, float]]:
    out = {}
    for t, (spec, data) in enumerate(zip(specs, validation)):
        if data is None:
            continue
        enc = Encoded(data.input_ids, data.token_type_ids, data.targets, torch.full((len(data),), t, dtype=torch.long))
        logits = predict_logits(forward, enc, batch_size=training.eval_batch_size, pad_id=pad_id, device=device)
        out[spec.name] = compute_metrics(spec, logits[:, : spec.num_outputs], enc.targets)
    return out
