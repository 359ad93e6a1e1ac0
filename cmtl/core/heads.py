"""Task heads: the small layer from the pooled embedding to a task's logits, and helpers that run or
check heads. Heads are owned by cmtl, not by peft, so that adapters stay plain LoRA weights that can be
merged across tasks while each task keeps its own head."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cmtl.core.tasks import MASKED_LOGIT, TaskSpec
from cmtl.errors import STORED_FILE_FIX, CorruptFileError


class TaskHead(nn.Module):
    """Dropout and a linear layer from the pooled embedding (B, H) to logits (B, L)."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_outputs)
        # Small initial logits keep the first steps from fighting a random head.
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size) * 0.1)
        nn.init.zeros_(self.linear.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(pooled))


def route_to_heads(pooled: torch.Tensor, groups: torch.Tensor, head_of: Callable[[int], nn.Module],
                   width: int) -> torch.Tensor:
    """Logits (B, ``width``) of a mixed batch: row b through ``head_of(groups[b])``; the columns past
    that head's outputs hold :data:`MASKED_LOGIT`. One head call per group present, not per row."""
    out = pooled.new_full((len(pooled), width), MASKED_LOGIT)
    for g in groups.unique().tolist():
        rows = groups == g
        logits = head_of(g)(pooled[rows])
        out[rows, : logits.shape[1]] = logits
    return out


def check_head_state(state: dict[str, torch.Tensor], head: TaskHead, spec: TaskSpec, path: Path) -> None:
    """Check stored head weights against a fresh ``head`` for ``spec`` (one output per label).

    Raises:
        CorruptFileError: missing, extra or differently shaped tensors; names the file and the shapes.
    """
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found == expected:
        return
    wrong = [f"{k!r}: expected shape {expected.get(k, 'none')}, found {found.get(k, 'none')}"
             for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    raise CorruptFileError(f"File {str(path)!r} does not fit the head of task {spec.name!r} ({spec.num_outputs} "
                           f"outputs for labels {list(spec.labels)}): {'; '.join(wrong)}. {STORED_FILE_FIX}")
