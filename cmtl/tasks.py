"""Tasks: what a task predicts (:class:`TaskSpec`) and the head that predicts it.

Heads are owned by cmtl, not by peft, so that adapters stay plain LoRA weights
that can be merged across tasks while each task keeps its own head.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import KW_ONLY, asdict, dataclass, fields
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cmtl.errors import DataError

ProblemType = Literal["single_label", "multi_label", "regression"]
PROBLEM_TYPES = ("single_label", "multi_label", "regression")
#: Logit given to a class a row may not take (another task's column, an unseen class):
#: never the argmax, and its softmax weight underflows to exactly 0 without NaNs.
MASKED_LOGIT = -1e4
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its name, its outputs and where its data lives.

    Args:
        name: Unique task name: letters, digits, ``_`` and ``-``, at most 64.
        labels: The label names. Single-label data holds one of them per row;
            multi-label data a list of them. For regression, the names of the
            targets (default one target, ``"score"``).
        problem_type: ``"single_label"``, ``"multi_label"`` or ``"regression"``.
        text_column: Column holding the input text.
        text_pair_column: Column holding the second text for pair tasks
            (entailment, similarity); ``None`` for single texts.
        label_column: Column holding the label(s) or target(s).
        threshold: Multi-label decision threshold on each label's probability.
        description: Free text shown in listings.
    """

    name: str
    _: KW_ONLY
    labels: tuple[str, ...] | None = None
    problem_type: ProblemType = "single_label"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    threshold: float = 0.5
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"Task name {self.name!r} is not allowed: use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit, e.g. 'spam' or 'topic-v2'."
            )
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"The 'problem_type' parameter must be one of {list(PROBLEM_TYPES)}. Got {self.problem_type!r} instead."
            )
        labels = self.labels
        if labels is None and self.problem_type == "regression":
            labels = ("score",)
        if labels is None or isinstance(labels, str):
            raise ValueError(
                f"Task {self.name!r} needs a list of label names, e.g. TaskSpec({self.name!r}, "
                f"labels=['neg', 'pos']). Got {labels!r}."
            )
        labels = tuple(str(label) for label in labels)
        if len(set(labels)) != len(labels):
            raise ValueError(f"Task {self.name!r} has duplicate labels: {list(labels)}.")
        if self.problem_type == "single_label" and len(labels) < 2:
            raise ValueError(f"A single-label task needs at least 2 labels. Task {self.name!r} has {list(labels)}.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1). Got {self.threshold}.")
        object.__setattr__(self, "labels", labels)

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        """Inverse of :meth:`to_dict`; unknown keys (from a newer cmtl) warn and are ignored."""
        known = {f.name for f in fields(cls)} - {"_"}
        extra = sorted(set(d) - known)
        if extra:
            warnings.warn(f"Ignoring unknown TaskSpec keys {extra} (written by a newer cmtl?).", stacklevel=2)
        kwargs = {k: v for k, v in d.items() if k in known}
        return cls(kwargs.pop("name"), **kwargs)

    # --- labels -----------------------------------------------------------------

    def encode_labels(self, values: Sequence[Any]) -> torch.Tensor:
        """Turn raw label values into a target tensor.

        Single-label: a label name or its integer index per row -> (N,) long.
        Multi-label: a list of label names per row -> (N, L) float multi-hot.
        Regression: a number (or a list of L numbers) per row -> (N, L) float.

        Raises:
            DataError: a value that is not one of the task's labels, or not a number.
        """
        if self.problem_type == "single_label":
            index = {label: i for i, label in enumerate(self.labels)}
            out, unknown = [], set()
            for v in values:
                if isinstance(v, bool) or v is None:
                    unknown.add(repr(v))
                elif isinstance(v, (int,)) or (hasattr(v, "item") and not isinstance(v, str)):
                    i = int(v)
                    if 0 <= i < len(self.labels):
                        out.append(i)
                    else:
                        unknown.add(repr(v))
                elif str(v) in index:
                    out.append(index[str(v)])
                else:
                    unknown.add(repr(v))
            if unknown:
                raise DataError(
                    f"Labels {', '.join(sorted(unknown)[:10])} in the data of task {self.name!r} are not in its label set "
                    f"{list(self.labels)} (integer labels must be indices 0..{len(self.labels) - 1}). "
                    "Fix the data or declare the labels in the TaskSpec."
                )
            return torch.tensor(out, dtype=torch.long)
        if self.problem_type == "multi_label":
            index = {label: i for i, label in enumerate(self.labels)}
            target = torch.zeros(len(values), len(self.labels))
            unknown = set()
            for row, v in enumerate(values):
                items = [v] if isinstance(v, str) else list(v)
                for item in items:
                    if str(item) in index:
                        target[row, index[str(item)]] = 1.0
                    else:
                        unknown.add(repr(item))
            if unknown:
                raise DataError(
                    f"Labels {', '.join(sorted(unknown)[:10])} in the data of task {self.name!r} are not in its label set "
                    f"{list(self.labels)}. Fix the data or declare the labels in the TaskSpec."
                )
            return target
        try:
            target = torch.tensor([[float(x) for x in (v if isinstance(v, (list, tuple)) else [v])] for v in values])
        except (TypeError, ValueError) as exc:
            raise DataError(f"Regression targets of task {self.name!r} must be numbers: {exc}.") from exc
        if target.ndim != 2 or target.shape[1] != len(self.labels):
            raise DataError(
                f"Task {self.name!r} has {len(self.labels)} regression target(s) {list(self.labels)}; "
                f"the data has shape {tuple(target.shape)}."
            )
        if not torch.isfinite(target).all():
            raise DataError(f"Regression targets of task {self.name!r} contain NaN or infinite values.")
        return target

    # --- outputs ----------------------------------------------------------------

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of logits (B, L) against encoded targets."""
        if self.problem_type == "single_label":
            return F.cross_entropy(logits, target)
        if self.problem_type == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.mse_loss(logits, target)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (single-label), per-label sigmoid (multi-label) or the values (regression)."""
        if self.problem_type == "single_label":
            return logits.softmax(-1)
        if self.problem_type == "multi_label":
            return logits.sigmoid()
        return logits

    def decode(self, logits: torch.Tensor) -> list:
        """Human-readable predictions: a label, a list of labels, or a number (or list of numbers)."""
        if self.problem_type == "single_label":
            return [self.labels[i] for i in logits.argmax(-1).tolist()]
        if self.problem_type == "multi_label":
            on = (logits.sigmoid() >= self.threshold).tolist()
            return [[label for label, flag in zip(self.labels, row) if flag] for row in on]
        values = logits.tolist()
        return [row[0] for row in values] if len(self.labels) == 1 else values


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
