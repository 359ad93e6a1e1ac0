"""A group of tasks trained as one entry: one shared adapter, a fresh head per task, and optionally
a small LoRA of each task's own (what :meth:`cmtl.Registry.train_group` stores beside the merges)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from cmtl.core.adapters import AdapterBank, AdapterConfig, TaskLoRA, lora_shapes
from cmtl.core.backbone import Backbone
from cmtl.core.heads import TaskHead
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded
from cmtl.multitask.config import MultiTaskConfig, MultiTaskResult
from cmtl.multitask.joint import grouped_forward, train_multitask
from cmtl.training.loop import TrainConfig
from cmtl.training.trainee import Trainee

logger = logging.getLogger(__name__)

@dataclass
class Group:
    """A trained group: the shared adapter's resolved config, the heads in task order, the run's
    result, and each task's own factors (``None`` without per-task adapters)."""

    adapter: AdapterConfig
    heads: list[TaskHead]
    result: MultiTaskResult
    own: dict[str, dict[str, torch.Tensor]] | None
    own_config: dict[str, Any] | None  # {"r", "alpha"} of the per-task factors


def train_group(backbone: Backbone, bank: AdapterBank, key: str, tasks: list[str], specs: list[TaskSpec],
                train: list[Encoded], validation: list[Encoded | None], *, adapter: AdapterConfig,
                task_adapter: AdapterConfig | None, config: MultiTaskConfig, training: TrainConfig) -> Group:
    """Add adapter ``key`` to ``bank`` and train it jointly with a head per task (and per-task factors
    when ``task_adapter`` is given) with :func:`~cmtl.multitask.train_multitask`. The caller removes
    ``key`` from the bank if anything after this fails."""
    if task_adapter is not None:
        unused = {k: v for k, v in (("target_modules", task_adapter.target_modules), ("layers", task_adapter.layers))
                  if v is not None}
        if unused:
            raise ValueError(f"task_adapter sets {unused}, but per-task factors take only r and alpha from it: they "
                             "sit on the shared adapter's modules and layers. Set those on adapter=AdapterConfig(...).")
    resolved = bank.add(key, adapter)
    heads = [TaskHead(backbone.hidden_size, s.num_outputs, training.head_dropout).to(backbone.device) for s in specs]
    trainee = Trainee(grouped_forward(backbone.embed, heads), heads, bank=bank, key=key)
    forward, own = trainee.forward, None
    try:
        if task_adapter is not None:
            own = TaskLoRA(lora_shapes(bank.state_dict(key)), len(tasks), task_adapter.r, task_adapter.alpha
                           ).to(backbone.device)
            own.attach(bank.modules(key))
            forward = own.wrap(forward)
        trainee.activate()
        shared = bank.parameters(key)
        per_task = [p for h in heads for p in h.parameters()] + (list(own.parameters()) if own else [])
        # Per-task factors are gathered by forward hooks that know the batch's rows only during the forward
        # pass, not when a checkpointed layer is recomputed in the backward pass.
        checkpoint = training.gradient_checkpointing and own is None
        if training.gradient_checkpointing and own is not None:
            logger.warning("Gradient checkpointing is off for this group: per-task adapters cannot be recomputed.")
        with backbone.checkpointed(checkpoint):
            result = train_multitask(forward, shared, per_task, trainee.set_training, specs, train, validation,
                                     config, training, pad_id=backbone.pad_id, device=backbone.device,
                                     task_heads=[p for h in heads for p in h.parameters()])
        for p in shared:
            p.requires_grad_(False)
        own_states = None if own is None else {t: own.state(i) for i, t in enumerate(tasks)}
        own_config = None if own is None else {"r": own.r, "alpha": own.alpha}
        return Group(resolved, heads, result, own_states, own_config)
    finally:
        if own is not None:
            own.detach()
