"""The merge of stored task adapters, from their weights to a merged entry's contents.

The registry reads the members (LoRA factors, heads, held-out samples, buffers) and commits the
result; in between, :func:`merge_members` combines the members' deltas (:mod:`cmtl.merging.methods`
or peft's ``add_weighted_adapter``), scores candidates on the held-out samples through a temporary
adapter, optionally refits the heads, and picks the knobs when asked to search.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from cmtl.continual.replay import ReplayBuffer, stored
from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import Backbone
from cmtl.core.tasks import TaskHead, TaskSpec
from cmtl.data import Encoded, Examples
from cmtl.errors import DataError
from cmtl.merging.methods import MergeConfig, lora_deltas, merge_deltas, refit_head, to_lora_state
from cmtl.training.evaluation import compute_metrics, predict_logits, primary_metric
from cmtl.training.loop import seeded
from cmtl.training.trainee import Trainee

Member = tuple[str, int]  # (task, version)


@dataclass
class Merged:
    """What a merge produced: the knobs used, the merged adapter (LoRA factors of ``rank``, with each
    module's reconstruction error), the heads, the scores on the held-out samples, the search trials."""

    config: MergeConfig
    lora_state: dict[str, torch.Tensor]
    rank: int
    errors: dict[str, float]
    heads: dict[str, TaskHead]
    scores: dict[str, float]
    trials: list[dict[str, Any]]


def check_mergeable(members: list[Member], adapters: list[AdapterConfig]) -> None:
    """Only adapters on the same modules and layers merge."""
    base = adapters[0]
    for (t, v), other in zip(members[1:], adapters[1:]):
        if (other.target_modules, other.layers) != (base.target_modules, base.layers):
            raise ValueError(f"{t} v{v} adapts {other.target_modules} in layers {other.layers or 'all'}, but "
                             f"{members[0][0]} v{members[0][1]} adapts {base.target_modules} in layers "
                             f"{base.layers or 'all'}: only adapters on the same modules merge.")


def refit_data(buffers: dict[str, tuple[int, ReplayBuffer | None]], specs: dict[str, TaskSpec],
               encode: Callable[[Examples, TaskSpec], Encoded]) -> dict[str, Encoded]:
    """Each task's replay buffer (``{task: (version, buffer)}``), encoded, to refit its head on."""
    out = {}
    for t, (v, buffer) in buffers.items():
        if buffer is None or len(buffer) == 0:
            raise DataError(f"refit_heads needs a replay buffer, and {t} v{v} has none (it was trained with "
                            "fill_buffer=False). Merge without refit_heads, or update the task with a buffer.")
        out[t] = encode(stored(specs[t], buffer.to_examples()), specs[t])
    return out


def soup_heads(states: dict[str, list[dict[str, torch.Tensor]]], specs: dict[str, TaskSpec],
               backbone: Backbone) -> dict[str, TaskHead]:
    """One head per member task: the mean of a task's heads when several of its versions merge (a soup)."""
    out = {}
    for t, parts in states.items():
        head = TaskHead(backbone.hidden_size, specs[t].num_outputs)
        head.load_state_dict({k: torch.stack([s[k] for s in parts]).mean(0) for k in parts[0]})
        out[t] = head.to(backbone.device).eval()
    return out


def score(trainee: Trainee, spec: TaskSpec, encoded: Encoded, backbone: Backbone) -> float:
    """Primary metric of ``spec`` on ``encoded`` through ``trainee``."""
    metric, _ = primary_metric(spec)
    logits = trainee.logits(encoded, pad_id=backbone.pad_id, device=backbone.device)
    return float(compute_metrics(spec, logits, encoded.targets)[metric])


def merge_members(backbone: Backbone, bank: AdapterBank, members: list[Member], states: list[dict[str, torch.Tensor]],
                  adapters: list[AdapterConfig], member_keys: Callable[[], list[str]], heads: dict[str, TaskHead],
                  specs: dict[str, TaskSpec], held: dict[str, Encoded | None], individual: dict[str, float],
                  buffers: dict[str, Encoded] | None, config: MergeConfig, search: bool) -> Merged:
    """Merge the members' adapters (``states``, configured as ``adapters``) as ``config`` says, or, with
    ``search``, with the knobs that maximise the normalised held-out score (``individual``: each
    task's own score). ``member_keys()`` loads the members into ``bank`` (peft's methods need them)."""
    deltas = [lora_deltas(state, adapter.scaling) for state, adapter in zip(states, adapters)]
    base = adapters[0]
    run = _Run(backbone, bank, members, deltas, member_keys, base, specs, held, buffers, config.rank)
    trials, best = [], None
    if search:
        for candidate in search_grid(config) if individual else []:
            merged = run.combine(candidate)
            scores, fitted = run.score(merged, heads)
            trials.append({**{k: getattr(candidate, k) for k in ("scale", "density", "drop")},
                           "scores": scores, "normalised": normalised(scores, individual)})
            norm = trials[-1]["normalised"]
            if norm is not None and (best is None or norm > best[0]["normalised"]):
                best = (trials[-1], candidate, merged, fitted)
        if best is None:
            raise DataError("search=True needs held-out samples of the members (add them with validation data).")
        config, merged, scores, heads = best[1], best[2], best[0]["scores"], best[3]  # the winner, not redone
    else:
        merged = run.combine(config)
        if individual or buffers:
            scores, heads = run.score(merged, heads)
        else:
            scores = {}
    lora_state, rank, errors = to_lora_state(merged, config.rank)
    return Merged(config, lora_state, rank, errors, heads, scores, trials)


@dataclass
class _Run:
    """The fixed inputs of one merge, shared by its candidates."""

    backbone: Backbone
    bank: AdapterBank
    members: list[Member]
    deltas: list[dict[str, torch.Tensor]]
    member_keys: Callable[[], list[str]]
    base: AdapterConfig
    specs: dict[str, TaskSpec]
    held: dict[str, Encoded | None]
    buffers: dict[str, Encoded] | None
    rank: int | None

    def combine(self, config: MergeConfig) -> dict[str, torch.Tensor]:
        """Merged per-module deltas: cmtl's methods on exact deltas, or peft's ``add_weighted_adapter``."""
        if not config.method.startswith("peft_"):
            return merge_deltas(self.deltas, config)
        kind = config.method.removeprefix("peft_")
        density = 1.0 - config.drop if kind.startswith("dare") else config.density if "ties" in kind else None
        keys = self.member_keys()
        name = "_peft_merge"
        with seeded(config.seed, self.backbone.device):  # peft's DARE draws from the global RNG
            self.bank.peft_merge(name, keys, [config.resolved_scale(len(self.members))] * len(self.members), kind,
                                 density)
            try:
                return lora_deltas(self.bank.state_dict(name), self.bank.scaling(name))
            finally:
                self.bank.remove(name)

    def score(self, merged: dict[str, torch.Tensor], heads: dict[str, TaskHead]
              ) -> tuple[dict[str, float], dict[str, TaskHead]]:
        """Primary metric of each task with a held-out sample, through a merged delta (loaded
        temporarily), and the heads that scored it: refitted on the buffers when there are any."""
        lora_state, r, _ = to_lora_state(merged, self.rank)
        key = "_merge_candidate"
        self.bank.load(key, AdapterConfig.from_dict({**self.base.to_dict(), "r": r, "alpha": float(r),
                                                      "dropout": 0.0}), lora_state)
        backbone = self.backbone
        try:
            if self.buffers:
                self.bank.activate(key)
                heads = dict(heads)
                for t, encoded in self.buffers.items():
                    features = predict_logits(lambda inputs: backbone.embed(**inputs), encoded, batch_size=64,
                                              pad_id=backbone.pad_id, device=backbone.device)
                    heads[t] = refit_head(heads[t], features, encoded.targets, self.specs[t].loss).eval()
            scores = {t: score(Trainee.adapter(backbone, self.bank, key, heads[t]), self.specs[t], self.held[t],
                               backbone) for t in heads if self.held.get(t) is not None}
            return scores, heads
        finally:
            self.bank.remove(key)


def search_grid(config: MergeConfig) -> list[MergeConfig]:
    """λ (and density / drop) candidates around the papers' defaults."""
    method = config.method.removeprefix("peft_")
    if method in ("linear", "dare"):
        scales = [0.2, 0.4, 0.6, 0.8, 1.0]
    else:
        scales = [0.6, 1.0, 1.5, 2.0]
    densities = [0.1, 0.2, 0.5] if method in ("ties", "ties_svd") or config.method == "dare_ties" else [config.density]
    drops = [0.5, 0.9] if method in ("dare", "dare_ties") else [config.drop]
    return [dataclasses.replace(config, scale=s, density=k, drop=p) for s in scales for k in densities for p in drops]


def normalised(scores: dict[str, float], individual: dict[str, float]) -> float | None:
    """Mean over tasks of merged / individual score (None without scores)."""
    ratios = [scores[t] / individual[t] for t in scores if t in individual and individual[t] > 0]
    return float(np.mean(ratios)) if ratios else None
