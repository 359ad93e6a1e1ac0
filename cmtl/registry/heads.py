"""A version's stored head: a trained linear :class:`~cmtl.core.heads.TaskHead`, or an
:class:`~cmtl.continual.analytic.AnalyticHead` computed from class statistics. The version's record
says which (``record["head"]["type"] == "analytic"``; a record without ``"head"`` is linear), so the
registry and the server build the same module from the same files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmtl.continual.analytic import AnalyticConfig, AnalyticHead
from cmtl.core.heads import TaskHead, check_head_state
from cmtl.core.tasks import TaskSpec
from cmtl.errors import STORED_FILE_FIX, CorruptFileError, InvalidParameterError

#: The file of an analytic version's class statistics (counts, sums, Gram matrix; float64).
STATISTICS = "statistics.safetensors"


def analytic_config(record: dict[str, Any] | None) -> AnalyticConfig | None:
    """The analytic head's config a version record names, or ``None`` for a trained linear head."""
    head = (record or {}).get("head")
    return AnalyticConfig.from_dict(head["config"]) if head and head.get("type") == "analytic" else None


def build(hidden: int, spec: TaskSpec, record: dict[str, Any] | None, state: dict[str, torch.Tensor], path: Path,
          device: torch.device | str = "cpu") -> nn.Module:
    """The head ``record`` describes, with the stored ``state`` checked against ``spec``'s labels first
    (an analytic head stays on the CPU in float64 and answers on the features' device).

    Raises:
        CorruptFileError: the tensors do not fit the head, or an analytic head's random projection,
            drawn again from its seed, differs from the one it was fitted with.
    """
    config = analytic_config(record)
    if config is None:
        head = TaskHead(hidden, spec.num_outputs)
        check_head_state(state, head, spec, path)
        head.load_state_dict(state)
        return head.to(device).eval()
    head = AnalyticHead(hidden, spec.num_outputs, config, statistics=False)  # predicts only: no Gram matrix
    check_head_state(state, head, spec, path)
    head.load(state, record["head"].get("ridge"))
    expected = record["head"].get("projection_sha256")
    if expected is not None and head.record()["projection_sha256"] != expected:
        raise CorruptFileError(
            f"The analytic head in {str(path)!r} was fitted on a random projection that this torch no longer "
            f"draws from seed {config.seed} (checksums differ): its weights do not fit. Use the torch the task was "
            "added with, or add the task again here.")
    return head.eval()


def check_statistics(state: dict[str, torch.Tensor], record: dict[str, Any], spec: TaskSpec, hidden: int,
                     path: Path) -> None:
    """Stored class statistics fit the version's analytic head: one count and sum per label, sums and
    Gram matrix as wide as the head's features.

    Raises:
        CorruptFileError: names the file and the shapes.
    """
    config = analytic_config(record)
    width = config.width(hidden)
    classes = spec.num_outputs
    expected = {"counts": (classes,), "sums": (classes, width), "gram": (width, width)}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        raise CorruptFileError(f"File {str(path)!r} does not fit the analytic head of task {spec.name!r} ({classes} "
                               f"labels, features {width} wide): expected {expected}, found {found}. "
                               f"{STORED_FILE_FIX}")


def refuse_analytic(record: dict[str, Any], task: str, version: int, what: str) -> None:
    """Refuse ``what`` (a merge, an export) for a version whose head is analytic.

    Raises:
        InvalidParameterError: names the version and what to do instead.
    """
    if analytic_config(record) is not None:
        raise InvalidParameterError(
            f"Task {task!r} v{version} has an analytic head (computed from class statistics of its features), "
            f"which {what} cannot take: it holds no trained linear head. Use a version with a trained head, or "
            "add the task again without head=.")
