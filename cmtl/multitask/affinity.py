"""Task Affinity Groupings (Fifty et al., 2021, "Efficiently Identifying Task Groupings for Multi-Task Learning").

During joint training, every ``tag_every`` steps each task i takes a lookahead step of the shared
parameters on its own loss alone (on a copy, with the AdamW update rule and state), and
Z_{i→j} = 1 − L_j(θ'_i) / L_j(θ) is recorded on the same batch (:func:`lookahead_affinity`);
:func:`select_groups` turns the averaged matrix into task groups. The losses come from the caller
(a function of the current parameters), so nothing here knows how the joint run computes them.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cmtl.training import distributed


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


def task_gradients(losses: torch.Tensor, present: torch.Tensor, shared: list[nn.Parameter]
                   ) -> dict[int, list[torch.Tensor]]:
    """{task i: gradient of ``losses[i]`` (T,) with respect to ``shared``, summed over ranks} for each
    task ``present`` in this batch; the graph is kept for the step's own backward pass."""
    return {i: _summed(torch.autograd.grad(losses[i], shared, retain_graph=True, allow_unused=True), shared)
            for i in range(len(present)) if bool(present[i])}


def _summed(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients (zeros where unused) summed over ranks."""
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return [distributed.all_reduce_sum(g) for g in grads]


def lookahead_affinity(task_losses: Callable[[], torch.Tensor], shared: list[nn.Parameter],
                       optimizer: torch.optim.AdamW, task_grads: dict[int, Sequence[torch.Tensor]], T: int
                       ) -> np.ndarray:
    """Z[i, j] = 1 − L_j(θ'_i) / L_j(θ) on one batch, θ'_i = one AdamW step of the shared parameters
    on task i's gradient alone (``task_grads``, :func:`task_gradients`), from the optimiser's
    current state; (T, T), NaN where not measured: outside the tasks of ``task_grads``, and where task
    j's loss before the step is 0.

    ``task_losses()`` gives this rank's (T,) per-task losses on the batch at the current parameters
    (zeros on a rank without rows in it, which still joins the all-reduces); call it with dropout off.
    The shared parameters are restored before this returns or raises.
    """

    def losses() -> torch.Tensor:
        return distributed.all_reduce_sum(task_losses())

    Z = np.full((T, T), np.nan)
    originals = [p.detach().clone() for p in shared]
    with torch.no_grad():
        before = losses()
        for i, grads in task_grads.items():
            try:
                for p, a in zip(shared, _adamw_lookahead(shared, grads, optimizer)):
                    p.copy_(a)
                after = losses()
            finally:  # also on an error (out of memory, an interrupt): the caller may go on training
                for p, o in zip(shared, originals):
                    p.copy_(o)
            for j in task_grads:
                if before[j] > 0:
                    Z[i, j] = float(1 - after[j] / before[j])
    return Z
