"""Regularisers against forgetting: EWC (Kirkpatrick et al. 2017) and LwF distillation (Li & Hoiem 2017).

Both are plain functions of tensors so that the benchmark strategies
(:mod:`cmtl.benchmarks.learners`) and registry updates (:meth:`cmtl.Registry.update_task`)
share one implementation. They plug into :func:`cmtl.training.loop.train` as
``extra_loss`` terms.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, batches, seeded_order
from cmtl.training.evaluation import Forward

Anchor = tuple[list[torch.Tensor], list[torch.Tensor]]  # (Fisher diagonal, θ*) per parameter


def fisher_diagonal(
    forward: Forward,
    params: Sequence[torch.nn.Parameter],
    spec: TaskSpec,
    data: Encoded,
    *,
    max_examples: int,
    pad_id: int,
    device: torch.device,
    seed: int = 0,
    outputs: int | None = None,
) -> Anchor:
    """Diagonal empirical Fisher of ``params`` and a copy of them (METHODS.md, EWC).

    ``F_i = (1/N) Σ_n (∂ℓ_n/∂θ_i)²``: each example's own loss gradient, squared, averaged over a seeded
    sample of ``N = min(len(data), max_examples)`` rows drawn from all of ``data``, not its first rows (a
    class-balanced buffer lists its rows class by class). One example per backward pass: squaring the
    gradients of minibatches instead would shrink ``F``, and λ's effect with it, as the batch grows.
    Run it with dropout off (the caller's ``set_training(False)``); ``params`` must require grad.
    ``outputs``: weigh through the first ``outputs`` outputs only (the parent's labels, where an update added
    some): the rows added for new labels get no Fisher, and the old rows theirs as the parent gave it.
    """
    fisher = [torch.zeros_like(p) for p in params]
    n = min(len(data), max_examples)
    order = seeded_order(len(data), seed)[:n]
    for _, inputs, targets in batches(data, order, 1, pad_id, device):
        logits = forward(inputs)
        if outputs is not None:
            logits, targets = logits[:, :outputs], (targets[:, :outputs] if targets.dim() > 1 else targets)
        loss = spec.loss(logits, targets)
        for f, g in zip(fisher, torch.autograd.grad(loss, list(params))):
            f += g.detach() ** 2
    return [f / max(n, 1) for f in fisher], [p.detach().clone() for p in params]


def ewc_loss(params: Sequence[torch.Tensor], anchors: Sequence[Anchor], weight: float) -> torch.Tensor:
    """(weight / 2) · Σ_anchors Σ F · (θ − θ*)²."""
    total = params[0].new_zeros(())
    for fisher, star in anchors:
        total = total + sum((f * (p - s) ** 2).sum() for f, p, s in zip(fisher, params, star))
    return weight / 2 * total


def distillation_loss(new_logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(old / T) ‖ softmax(new / T)), averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(new_logits / t, -1), F.log_softmax(old_logits / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def ewc_term(params: Sequence[torch.Tensor], anchors: Sequence[Anchor], weight: float) -> Callable:
    """An ``extra_loss`` for :func:`cmtl.training.loop.train` that adds :func:`ewc_loss`."""
    return lambda inputs, logits, rows: ewc_loss(params, anchors, weight)
