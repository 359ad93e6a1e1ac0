"""The manifest records a registry writes: a task version, a merged entry, a joint (group) entry."""

from __future__ import annotations

from typing import Any

import numpy as np

from cmtl._version import __version__
from cmtl.core.adapters import AdapterConfig
from cmtl.core.tasks import TaskSpec
from cmtl.data import Examples
from cmtl.merging.pipeline import Merged, normalised
from cmtl.multitask.config import MultiTaskConfig
from cmtl.multitask.group import Group
from cmtl.registry.reader import now
from cmtl.training.loop import TrainConfig, TrainResult


def version_record(version: int, parent: int | None, kind: str, examples: Examples, adapter: AdapterConfig,
                   training: TrainConfig, result: TrainResult) -> dict[str, Any]:
    """A task version trained on ``examples`` (its files, size and parameter count are added at commit)."""
    gain = result.candidate_gain  # standard errors by which training beat the probe on validation
    probe = result.candidate_metrics  # the step-0 probe's validation metrics: what training is measured against
    return {
        "version": version, "parent": parent, "created": now(), "kind": kind,
        "metrics": {f"validation_{k}": v for k, v in result.best_metrics.items()},
        "data_fingerprint": examples.fingerprint(), "adapter": adapter.to_dict(),
        "training": {**training.to_dict(), "steps": result.steps, "best_step": result.best_step,
                     "probe_gain": None if gain is None else round(gain, 3),
                     "probe_metrics": None if probe is None else {f"validation_{k}": v for k, v in probe.items()},
                     "stopped_early": result.stopped_early,
                     **({"best_averaged": result.best_averaged} if training.ema_decay is not None else {}),
                     "examples": len(examples)},
        "train_seconds": round(result.seconds, 3), "cmtl_version": __version__,
    }


def merge_record(name: str, members: list[tuple[str, int]], specs: dict[str, TaskSpec], base: AdapterConfig,
                 merged: Merged, seconds: float) -> dict[str, Any]:
    """A merged entry: its members, knobs, stored adapter, reconstruction errors, the held-out scores of
    the merge, the members and the frozen backbone on the rows that did not choose the knobs, and the
    merge's wall time."""
    config, tasks = merged.config, list(specs)
    report, own, base_scores = merged.scores["report"], merged.individual["report"], merged.baseline.get("report", {})
    return {
        "name": name, "created": now(), "cmtl_version": __version__,
        "members": [{"task": t, "version": v} for t, v in members], "tasks": tasks,
        "specs": {t: specs[t].to_dict() for t in tasks},  # what serving needs: self-contained
        "config": {**config.to_dict(), "scale": config.resolved_scale(len(members))},
        "adapter": {**base.to_dict(), "r": merged.rank, "alpha": float(merged.rank), "dropout": 0.0},
        "reconstruction_error": {"mean": float(np.mean(list(merged.errors.values()))),
                                 "max": max(merged.errors.values())},
        "holdout": {t: {"individual": own.get(t), "merged": report.get(t), "baseline": base_scores.get(t),
                        "rows": merged.rows["report"].get(t), "selection_rows": merged.rows["select"].get(t)}
                    for t in tasks},
        "normalised": normalised(report, own, merged.lower),
        "baseline_normalised": normalised(base_scores, own, merged.lower),
        "below_baseline": merged.below_baseline(),
        "selection": {"individual": merged.individual["select"], "merged": merged.scores["select"],
                      "baseline": merged.baseline.get("select", {}),
                      "normalised": normalised(merged.scores["select"], merged.individual["select"], merged.lower)},
        "search": merged.trials, "seconds": round(seconds, 3),
    }


#: TrainConfig fields joint training (``train_group``) does not read: not recorded with a group.
GROUP_UNUSED_TRAINING = ("epochs", "max_steps", "eval_every", "patience", "length_grouping", "cache_frozen_mb",
                         "validation_fraction", "probe_init", "probe_start", "probe_margin", "ema_decay")


def group_record(name: str, specs: dict[str, TaskSpec], config: MultiTaskConfig, training: TrainConfig,
                 group: Group) -> dict[str, Any]:
    """A joint entry: its tasks, knobs, the run's history and affinities, and the per-task adapters' size."""
    result = group.result
    return {
        "name": name, "kind": "joint", "created": now(), "cmtl_version": __version__, "tasks": list(specs),
        "specs": {t: spec.to_dict() for t, spec in specs.items()},
        "members": [], "config": config.to_dict(),
        "training": {k: v for k, v in training.to_dict().items() if k not in GROUP_UNUSED_TRAINING},
        "adapter": group.adapter.to_dict(), "steps": result.steps, "seconds": round(result.seconds, 3),
        "rows_per_task": result.rows_per_task, "best_step": result.best_step,
        "validation_accuracy": result.best_metrics, "history": result.history,
        "affinity": result.affinity, "tag_seconds": round(result.tag_seconds, 3),
        "switched_at": result.switched_at, "task_weights": result.task_weights,
        "task_adapter": group.own_config,
    }
