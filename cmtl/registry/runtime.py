"""Adapters and heads of stored entries, loaded for prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cmtl.core.adapters import AdapterConfig, stack_lora
from cmtl.registry import store


def entry_adapters(root: str | Path, record: dict[str, Any]) -> dict[str | None, tuple[dict[str, torch.Tensor],
                                                                                    AdapterConfig]]:
    """The adapter weights and config of a merged or joint entry, each file read once and checked
    against the manifest's checksums: ``{None: ...}`` for one shared adapter, or, for a joint entry
    trained with per-task adapters, ``{task: ...}`` with the shared and the task's own factors
    stacked into one LoRA (rank r_shared + r_task, scaling 1)."""
    folder = store.merge_dir(Path(root), record["name"])
    state = store.read_tensors(folder / "adapter.safetensors", record["files"]["adapter.safetensors"])
    config = AdapterConfig.from_dict(record["adapter"])
    if not record.get("task_adapter"):
        return {None: (state, config)}
    own_all = store.read_tensors(folder / "task_adapters.safetensors", record["files"]["task_adapters.safetensors"])
    own_cfg = record["task_adapter"]
    rank = config.r + int(own_cfg["r"])
    stacked_config = AdapterConfig.from_dict({**config.to_dict(), "r": rank, "alpha": float(rank), "dropout": 0.0})
    out = {}
    for task in record["tasks"]:
        own = {k[len(task) + 1:]: v for k, v in own_all.items() if k.startswith(f"{task}.")}
        out[task] = (stack_lora([(state, config.scaling), (own, own_cfg["alpha"] / own_cfg["r"])]), stacked_config)
    return out
