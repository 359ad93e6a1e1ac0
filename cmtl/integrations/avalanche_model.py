"""The model Avalanche's strategies train in cmtl's bridge (:mod:`cmtl.integrations.avalanche`): the
frozen backbone, ONE LoRA adapter shared by all tasks, a head per task, as an Avalanche
``MultiTaskModule`` (imported inside :func:`model_class`, like all of Avalanche)."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from cmtl._extras import require
from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import Backbone
from cmtl.core.heads import TaskHead, route_to_heads
from cmtl.core.tasks import TaskSpec
from cmtl.training.evaluation import Forward
from cmtl.training.loop import seeded

ADAPTER_NAME = "shared"


def build_model(
    backbone: Backbone,
    specs: Sequence[TaskSpec],
    adapter: AdapterConfig | None = None,
    *,
    head_dropout: float = 0.1,
    seed: int = 0,
) -> nn.Module:
    """A ``TaskIncrementalModel``: ``backbone`` frozen, ONE LoRA adapter shared by all tasks, a head per task.

    The adapter is injected into ``backbone.encoder`` in place, so a backbone serves one
    model (or registry) at a time.

    Raises:
        ValueError: ``backbone`` already carries LoRA layers.
    """
    if any("lora_" in name for name, _ in backbone.encoder.named_parameters()):
        raise ValueError(
            "This backbone already carries LoRA layers (another model or registry uses it). "
            "Load a fresh one with cmtl.core.backbone.load_backbone for each model."
        )
    with seeded(seed):  # peft draws A and cmtl draws the heads from the global RNG
        return model_class()(backbone, list(specs), adapter or AdapterConfig(), head_dropout)


@functools.cache
def import_avalanche() -> None:
    """Import Avalanche (once) without its import-time warning that no QP solver is installed: qpsolvers
    warns on import, and only Avalanche's GEM strategy needs a solver (cmtl runs none). Every cmtl
    function that imports from ``avalanche`` calls this first."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
        require("avalanche", "torchvision", purpose="The Avalanche bridge (cmtl.integrations.avalanche)")


@functools.cache
def model_class() -> type:
    import_avalanche()
    from avalanche.models import MultiTaskModule

    class TaskIncrementalModel(MultiTaskModule):
        """Frozen cmtl backbone + one shared LoRA adapter + one :class:`TaskHead` per task.

        ``forward(x, task_labels)`` takes ``x`` (B, 3, L) as built by :func:`export_benchmark` and
        returns logits (B, max labels); columns beyond a task's labels hold :data:`cmtl.core.tasks.MASKED_LOGIT`.
        """

        def __init__(self, backbone: Backbone, specs: list[TaskSpec], adapter: AdapterConfig, head_dropout: float):
            super().__init__()
            self.specs = specs
            self.backbone = backbone
            self.bank = AdapterBank(backbone.encoder)
            self.adapter = self.bank.add(ADAPTER_NAME, adapter)
            self.bank.activate(ADAPTER_NAME)
            self.bank.parameters(ADAPTER_NAME)  # the adapter trains; the backbone stays frozen
            self.encoder = backbone.encoder  # a submodule, so model.parameters() holds the LoRA tensors
            self.heads = nn.ModuleList(TaskHead(backbone.hidden_size, s.num_outputs, head_dropout) for s in specs)
            self.heads.to(backbone.device)
            self.max_class_label = max(s.num_outputs for s in specs)
            self._token_types = "token_type_ids" in backbone.tokenizer.model_input_names

        @property
        def task_names(self) -> list[str]:
            return [s.name for s in self.specs]

        def train(self, mode: bool = True):
            # The backbone stays in eval() (as in cmtl training): only adapter dropout and heads switch.
            super().train(mode)
            self.encoder.eval()
            self.bank.set_training(ADAPTER_NAME, mode)
            return self

        def adaptation(self, experience) -> None:
            # Heads are fixed at construction; remember trained tasks for forward_all_tasks (LwF).
            if self.training:
                self.known_train_tasks_labels |= set(experience.task_labels)

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            """Pooled embeddings (B, H) of ``x`` (B, 3, L), cut to the batch's longest row."""
            # export_benchmark pads on the right, so the longest row's mask sum is the width.
            width = max(int(x[:, 1].sum(1).max()), 1)
            inputs = {"input_ids": x[:, 0, :width], "attention_mask": x[:, 1, :width]}
            if self._token_types:
                inputs["token_type_ids"] = x[:, 2, :width]
            return self.backbone.embed(**inputs)

        def forward_single_task(self, x: torch.Tensor, task_label: int) -> torch.Tensor:
            return self.heads[task_label](self.embed(x))

        def forward_all_tasks(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
            pooled = self.embed(x)  # the adapter is shared: encode once for every head
            return {t: self.heads[t](pooled) for t in sorted(self.known_train_tasks_labels)}

        def forward(self, x: torch.Tensor, task_labels) -> Any:
            if task_labels is None:
                return self.forward_all_tasks(x)
            if isinstance(task_labels, int):
                return self.forward_single_task(x, task_labels)
            return route_to_heads(self.embed(x), task_labels, self.heads.__getitem__, self.max_class_label)

        def forward_for(self, task: int) -> Forward:
            """Task ``task``'s forward on cmtl's padded batches, for :func:`cmtl.training.evaluation.predict_logits`."""
            head = self.heads[task]
            return lambda inputs: head(self.backbone.embed(**inputs))

        def parameters_added_per_task(self, *, in_bytes: bool = False) -> list[int]:
            """Parameters (or their bytes) each task adds to what is stored; the first brings the shared adapter."""
            size = (lambda p: p.numel() * p.element_size()) if in_bytes else (lambda p: p.numel())
            counts = [sum(size(p) for p in head.parameters()) for head in self.heads]
            counts[0] += sum(size(p) for n, p in self.encoder.named_parameters() if "lora_" in n)
            return counts

        def trainable_parameters_per_task(self) -> list[int]:
            """Parameters trained during each task's experience: the shared adapter and that task's head
            (as cmtl's shared-adapter strategies count them)."""
            lora = sum(p.numel() for n, p in self.encoder.named_parameters() if "lora_" in n)
            return [lora + sum(p.numel() for p in head.parameters()) for head in self.heads]

    TaskIncrementalModel.__module__ = __name__
    TaskIncrementalModel.__qualname__ = "TaskIncrementalModel"
    return TaskIncrementalModel
