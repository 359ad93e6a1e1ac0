"""Linear probes: a head fitted by full-batch L-BFGS on fixed features.

:func:`refit_head` fits a head (dropout + linear) to features computed once; :func:`linear_probe` fits a
new one drawn under a seed (the benchmarks' probe references). :func:`probe_head` fits a
new task's head on the features its adapter gives before training (a fresh LoRA adapter changes
nothing, so these are the frozen backbone's): the "LP" of LP-FT (Kumar et al., 2022, "Fine-Tuning can
Distort Pretrained Features"). :func:`cmtl.training.trainee.fit` scores that state as the step-0
candidate of early stopping, which returns it when training never reaches its validation score.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from cmtl.core.backbone import Backbone
from cmtl.core.heads import TaskHead
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, seeded_order
from cmtl.errors import TrainingDivergedError
from cmtl.training.evaluation import predict_logits
from cmtl.training.loop import seeded

#: L2 weight of the probe (on the head's weights; the loss is a mean over rows).
PROBE_L2 = 1e-3


def refit_head(head: nn.Module, features: torch.Tensor, targets: torch.Tensor,
               loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, l2: float = PROBE_L2,
               max_iter: int = 100) -> nn.Module:
    """A copy of ``head`` (dropout + linear) fitted to ``features`` (N, H) by full-batch L-BFGS
    on ``loss(logits, targets) + l2 · ‖W‖²``, starting from ``head``'s weights. Deterministic.
    Raises TrainingDivergedError when a feature is not finite (the adapter they came through overflows)."""
    bad = int((~torch.isfinite(features)).flatten(1).any(dim=1).sum())
    if bad:
        raise TrainingDivergedError(
            f"{bad} of {len(features)} rows have non-finite features (inf or nan), so no head can be fitted on "
            "them: the adapter or merge they pass through overflows.")
    fitted = copy.deepcopy(head).train(False)
    device = next(fitted.parameters()).device
    # Clones: features computed under inference_mode cannot take part in autograd.
    features, targets = features.to(device).clone(), targets.to(device).clone()
    params = [p.requires_grad_(True) for p in fitted.parameters()]
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    weights = [p for name, p in fitted.named_parameters() if name.endswith("weight")]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss(fitted(features), targets) + l2 * sum(w.pow(2).sum() for w in weights)
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(closure)
    for p in params:
        p.requires_grad_(False)
    return fitted


def linear_probe(spec: TaskSpec, features: torch.Tensor, targets: torch.Tensor, *, seed: int = 0) -> nn.Module:
    """A linear probe for ``spec`` on fixed ``features`` (N, H): a new head drawn under ``seed`` (as a new
    task's head is drawn), fitted by :func:`refit_head` to the encoded ``targets``; in eval mode."""
    with seeded(seed):
        start = TaskHead(features.shape[1], spec.num_outputs).eval()
    return refit_head(start, features, targets, spec.loss)


def pooled_features(backbone: Backbone, data: Encoded, batch_size: int = 64) -> torch.Tensor:
    """Pooled features (N, H) of ``data``'s rows through the backbone's active adapter, in row order."""
    return predict_logits(lambda inputs: backbone.embed(**inputs), data, batch_size=batch_size,
                          pad_id=backbone.pad_id, device=backbone.device)


#: Rows a probe is fitted on at most (a seeded sample beyond that): its cost stays an inference pass over them.
PROBE_MAX_ROWS = 20_000


def probe_head(head: nn.Module, backbone: Backbone, spec: TaskSpec, data: Encoded, *, batch_size: int = 64,
               seed: int = 0) -> torch.Tensor | None:
    """Fit ``head`` in place as a linear probe on ``data``'s pooled features through the backbone's
    active adapter (one inference pass over ``data``, or over a seeded sample of :data:`PROBE_MAX_ROWS`
    of its rows, then :func:`refit_head`). Returns those features (N, H) in row order, or ``None`` when
    the probe saw only a sample."""
    sampled = len(data) > PROBE_MAX_ROWS
    if sampled:
        order = seeded_order(len(data), seed)
        data = data.select(sorted(order[:PROBE_MAX_ROWS]))
    features = pooled_features(backbone, data, batch_size)
    fitted = refit_head(head, features, data.targets, spec.loss)
    head.load_state_dict(fitted.state_dict())
    return None if sampled else features
