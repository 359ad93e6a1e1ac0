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
from cmtl.data import Encoded, batches
from cmtl.training.evaluation import Forward

Anchor = tuple[list[torch.Tensor], list[torch.Tensor]]  # (Fisher diagonal, θ*) per parameter


def fisher_diagonal(
    forward: Forward,
    params: Sequence[torch.nn.Parameter],
    spec: TaskSpec,
    data: Encoded,
    *,
    max_examples: int,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> Anchor:
    """Diagonal empirical Fisher of ``params`` (mean squared minibatch gradient of the task loss) and a copy of them.

    Uses the first ``max_examples`` rows of ``data``. ``params`` must require grad.
    """
    fisher = [torch.zeros_like(p) for p in params]
    order = list(range(min(len(data), max_examples)))
    count = 0
    for _, inputs, targets in batches(data, order, batch_size, pad_id, device):
        loss = spec.loss(forward(inputs), targets)
        for f, g in zip(fisher, torch.autograd.grad(loss, list(params))):
            f += g.detach() ** 2
        count += 1
    return [f / max(count, 1) for f in fisher], [p.detach().clone() for p in params]


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
