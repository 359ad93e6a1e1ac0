"""The merge of stored task adapters, from their weights to a merged entry's contents.

The registry reads the members (LoRA factors, heads, held-out samples, buffers) and commits the
result; in between, :func:`merge_members` combines the members' deltas (:mod:`cmtl.merging.methods`
or peft's ``add_weighted_adapter``), scores them and the frozen backbone (no delta, the baseline) on the
held-out samples (:mod:`cmtl.merging.scoring`), optionally refits the heads, and, asked to search, picks
the knobs by successive halving on one part of the held-out rows and reports on the other.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from cmtl.continual.replay import ReplayBuffer, stored
from cmtl.core.adapters import AdapterBank, AdapterConfig, lora_factors
from cmtl.core.backbone import Backbone
from cmtl.core.heads import TaskHead
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, Examples, seeded_order
from cmtl.errors import DataError, MergeRefusedError
from cmtl.merging.methods import READS, MergeConfig, lora_deltas, merge_deltas, to_lora_state
from cmtl.merging.scoring import Evaluation, Scorer, TaskRows, primary_score, rungs, split_holdout
from cmtl.training.evaluation import primary_metric
from cmtl.training.loop import seeded
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

Member = tuple[str, int]  # (task, version)


@dataclass
class Merged:
    """What a merge produced: the knobs used, the merged adapter (LoRA factors of ``rank``, with each
    module's reconstruction error), the heads, and per task the held-out scores of the merge, of the
    members (``individual``) and of the frozen backbone (``baseline``), each as ``{part: {task: score}}``
    with part ``"select"`` (rows that chose the knobs; empty without search) or ``"report"`` (the others);
    ``rows`` counts each part's rows per task; ``trials`` lists the search's candidates; ``lower`` names
    the tasks whose score is lower-is-better (regression's MSE)."""

    config: MergeConfig
    lora_state: dict[str, torch.Tensor]
    rank: int
    errors: dict[str, float]
    heads: dict[str, TaskHead]
    scores: dict[str, dict[str, float]]
    individual: dict[str, dict[str, float]]
    baseline: dict[str, dict[str, float]]
    rows: dict[str, dict[str, int]]
    trials: list[dict[str, Any]]

    lower: frozenset[str] = frozenset()

    def below_baseline(self) -> list[str]:
        """Tasks whose reported merged score is worse than the frozen backbone's (none without a baseline)."""
        merged, base = self.scores["report"], self.baseline.get("report", {})
        return [t for t in merged if t in base and (merged[t] > base[t] if t in self.lower else merged[t] < base[t])]


def check_mergeable(members: list[Member], adapters: list[AdapterConfig],
                    states: list[dict[str, torch.Tensor]]) -> None:
    """Only adapters on the same modules merge: the modules their stored factors adapt (configs that name them
    differently, such as ``layers=None`` and a list of every layer, are the same)."""
    base, modules = adapters[0], set(lora_factors(states[0]))
    for (t, v), other, state in zip(members[1:], adapters[1:], states[1:]):
        if set(lora_factors(state)) != modules:
            raise ValueError(f"{t} v{v} adapts {other.target_modules} in layers {other.layers or 'all'}, but "
                             f"{members[0][0]} v{members[0][1]} adapts {base.target_modules} in layers "
                             f"{base.layers or 'all'}: only adapters on the same modules merge. Train the odd "
                             f"one out as a task with add_task(..., adapter=AdapterConfig(target_modules=..., "
                             f"layers=...)) set to the others' modules. (Versions trained before BERT's default "
                             f"became all four attention projections adapt query and value.)")


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


def merge_members(backbone: Backbone, bank: AdapterBank, members: list[Member], states: list[dict[str, torch.Tensor]],
                  adapters: list[AdapterConfig], member_keys: Callable[[], list[str]], heads: dict[str, TaskHead],
                  specs: dict[str, TaskSpec], held: dict[str, Encoded | None], individual: dict[str, torch.Tensor],
                  buffers: dict[str, Encoded] | None, config: MergeConfig, search: bool, *,
                  frozen: dict[str, dict[str, torch.Tensor]] | None = None) -> Merged:
    """Merge the members' adapters (``states``, configured as ``adapters``) as ``config`` says, or, with
    ``search``, with the knobs that maximise the mean merged / individual score on the selection part of
    the held-out samples ``held``, no delta at all (λ = 0) being one of the candidates. ``individual``
    holds each member's own logits on its task's ``held`` rows; ``buffers`` the rows heads are refitted
    on (``None``: keep the members' heads); ``frozen[task]`` the frozen backbone's pooled features of the
    task's ``"held"`` and ``"buffer"`` rows where the caller has them (the baseline then runs none of
    them). ``member_keys()`` loads the members into ``bank`` (peft's methods need them). Raises
    :class:`~cmtl.errors.MergeRefusedError` when ``config.require_gain`` and the merge does not beat the
    frozen backbone."""
    ranks = [a.r for a in adapters]
    if config.method in ("peft_linear", "peft_ties", "peft_dare_ties") and len(set(ranks)) > 1:
        found = ", ".join(f"{t} v{v} {'has rank ' if i == 0 else 'rank '}{r}" for i, ((t, v), r)
                          in enumerate(zip(members, ranks)))
        raise ValueError(f"{config.method} combines the members' A and B factors separately (peft's "
                         f"add_weighted_adapter), so they must have the same rank; {found}. Merge them with cmtl's "
                         f"'{config.method.removeprefix('peft_')}' (exact deltas, any ranks) or with 'peft_ties_svd'.")
    deltas = [lora_deltas(state, adapter.scaling) for state, adapter in zip(states, adapters)]
    combine = _Combiner(backbone, bank, members, deltas, member_keys)
    unscored = [t for t in specs if t not in individual]
    if unscored and (search or config.require_gain):
        what = ("search=True chooses the knobs" if search else
                "require_gain=True compares the merge with the frozen backbone")
        raise DataError(f"{what} on the members' held-out samples, and {unscored} have none: the merge would be "
                        "judged without them. Update those tasks with validation data, or merge without "
                        f"{'search' if search else 'require_gain'}.")
    rows, own, own_select = _task_rows(specs, heads, held, individual, buffers, frozen or {}, config, search)
    scorer = Scorer(backbone, bank, adapters[0], rows, config.rank, config.cache_frozen_mb, config.rank_tolerance)
    parts = ("select", "report") if search else ("report",)
    grid = search_grid(config) if search else []
    plan = rungs(len(grid)) if config.halving else [(len(grid), 1.0)]
    total = bool(individual) + sum(n for n, _ in plan) + (bool(individual) or bool(buffers))
    with tqdm(total=total, desc=f"merge {config.method}", disable=not config.progress, leave=False,
              dynamic_ncols=True) as bar:
        baseline = scorer.evaluate(None, parts=parts) if individual else None
        bar.update(bool(individual))
        trials: list[dict[str, Any]] = []
        if search:
            assert baseline is not None
            chosen, config, delta = _search(scorer, combine, grid, plan, baseline, own_select, trials, bar)
            if chosen is baseline:
                report = baseline.scores["report"]
            else:
                report = scorer.evaluate(delta, parts=("report",), heads=chosen.heads, stored=True).scores["report"]
            heads, select = chosen.heads, chosen.scores["select"]
        else:
            delta = combine(config)
            chosen = scorer.evaluate(delta, parts=parts, stored=True) if individual or buffers else None
            heads = heads if chosen is None else chosen.heads
            report, select = ({} if chosen is None else chosen.scores["report"]), {}
        bar.update(total - bar.n)
    lora_state, rank, errors = to_lora_state(delta, 1 if config.scale == 0 else config.rank, config.rank_tolerance)
    merged = Merged(config, lora_state, rank, errors, heads, {"select": select, "report": report}, own,
                    {} if baseline is None else baseline.scores,
                    {p: {t: len(getattr(r, p)) for t, r in rows.items() if getattr(r, p) is not None}
                     for p in ("select", "report")}, trials, lower_is_better(specs))
    _judge(merged, config, search)
    return merged


def _task_rows(specs: dict[str, TaskSpec], heads: dict[str, TaskHead], held: dict[str, Encoded | None],
               individual: dict[str, torch.Tensor], buffers: dict[str, Encoded] | None,
               frozen: dict[str, dict[str, torch.Tensor]], config: MergeConfig, search: bool
               ) -> tuple[dict[str, TaskRows], dict[str, dict[str, float]], "_Own"]:
    """Each task's rows (held-out rows split into selection and report parts when searching, with their
    frozen features where known), the members' own scores on each part, and their logits on the
    selection rows."""
    rows, own, chosen = {}, {"select": {}, "report": {}}, _Own({})
    for t, spec in specs.items():
        buffer, known = None, frozen.get(t, {})
        rows_frozen: dict[str, torch.Tensor] = {}
        if buffers:
            order = seeded_order(len(buffers[t]), config.seed)
            buffer = buffers[t].select(order)
            if "buffer" in known:
                rows_frozen["buffer"] = known["buffer"][order]
        encoded = held.get(t) if t in individual else None
        if encoded is None:
            rows[t] = TaskRows(spec, heads[t], buffer, None, None, rows_frozen)
            continue
        pick, report = (split_holdout(encoded, config.selection_fraction, config.seed) if search
                        else ([], list(range(len(encoded)))))
        for part, idx in (("select", pick), ("report", report)):
            if idx:
                own[part][t] = primary_score(spec, individual[t][idx], encoded.targets[idx])
        if pick:
            chosen.select[t] = (spec, individual[t][pick], encoded.targets[pick])
        if "held" in known:
            rows_frozen |= {part: known["held"][idx] for part, idx in (("select", pick), ("report", report)) if idx}
        rows[t] = TaskRows(spec, heads[t], buffer, encoded.select(pick) if pick else None, encoded.select(report),
                           rows_frozen)
    return rows, own, chosen


@dataclass
class _Own:
    """The members' logits and targets on their selection rows, to score a prefix of them."""

    select: dict[str, tuple[TaskSpec, torch.Tensor, torch.Tensor]]

    def normalised(self, scores: dict[str, float], rows: dict[str, int]) -> float | None:
        """:func:`normalised` against the members' own scores, each on its first ``rows[task]`` selection rows."""
        return normalised(scores, {t: primary_score(spec, logits[: rows[t]], targets[: rows[t]])
                                   for t, (spec, logits, targets) in self.select.items() if t in rows},
                          lower_is_better({t: spec for t, (spec, _, _) in self.select.items()}))


def _search(scorer: Scorer, combine: "_Combiner", grid: list[MergeConfig], plan: list[tuple[int, float]],
            baseline: Evaluation, own: _Own, trials: list[dict[str, Any]], bar
            ) -> tuple[Evaluation, MergeConfig, dict[str, torch.Tensor]]:
    """Successive halving over ``grid`` on the selection rows (``plan`` from :func:`rungs`), then the best
    candidate against no delta at all (``baseline``): the winner's evaluation, knobs and merged delta."""
    floor = own.normalised(baseline.scores["select"], baseline.rows["select"])
    rank = lambda value: -math.inf if value is None else value  # noqa: E731  (no score ranks last)
    trials.append({"scale": 0.0, "density": None, "drop": None, "share": 1.0, "scores": baseline.scores["select"],
                   "normalised": floor})
    alive, best = list(range(len(grid))), None
    for rung, (keep, share) in enumerate(plan):
        ranked = []
        for i in alive[:keep]:
            delta = combine(grid[i])
            ev = scorer.evaluate(delta, share=share)
            ranked.append((own.normalised(ev.scores["select"], ev.rows["select"]), i, ev, delta))
            trials.append({**{k: getattr(grid[i], k) for k in ("scale", "density", "drop")}, "share": share,
                           "scores": ev.scores["select"], "normalised": ranked[-1][0]})
            bar.update(1)
            bar.set_postfix_str(f"rung {rung + 1}/{len(plan)} on {share:.0%} of the rows, best "
                                f"{max(rank(r[0]) for r in ranked):.4f} (no delta {rank(floor):.4f})")
        ranked.sort(key=lambda r: -rank(r[0]))
        alive, best = [r[1] for r in ranked], ranked[0]
    assert best is not None
    if rank(best[0]) > rank(floor):
        return best[2], grid[best[1]], best[3]
    zero = {m: torch.zeros_like(d) for m, d in best[3].items()}
    return baseline, dataclasses.replace(grid[best[1]], scale=0.0), zero


def _judge(merged: Merged, config: MergeConfig, searched: bool) -> None:
    """Log (and with ``require_gain`` refuse) a merge that does not beat the frozen backbone."""
    if not merged.baseline:  # no member has held-out rows (merge_members refused that with require_gain)
        return
    below = merged.below_baseline()
    mean = normalised(merged.scores["report"], merged.individual["report"], merged.lower)
    floor = normalised(merged.baseline["report"], merged.individual["report"], merged.lower)
    if searched and config.scale == 0:
        heads = "heads refitted on the buffers" if config.refit_heads else "the members' heads"
        message = f"the search chose no delta (λ = 0): no merged delta beat the frozen backbone with {heads}"
    elif below or (mean is not None and floor is not None and mean <= floor):
        message = (f"the merge scores below the frozen backbone on {below} (normalised {mean:.4f} against "
                   f"{floor:.4f})" if below else f"the merge does not beat the frozen backbone on average "
                   f"(normalised {mean:.4f} against {floor:.4f})")
    else:
        return
    if config.require_gain:
        raise MergeRefusedError(f"Merge refused (require_gain=True): {message}. Serve the tasks' own adapters, "
                                "or merge fewer or more related tasks.")
    logger.warning("Merge: %s.", message)


@dataclass
class _Combiner:
    """Merged per-module deltas of the members: cmtl's methods on exact deltas, or peft's
    ``add_weighted_adapter`` on the members loaded into ``bank``."""

    backbone: Backbone
    bank: AdapterBank
    members: list[Member]
    deltas: list[dict[str, torch.Tensor]]
    member_keys: Callable[[], list[str]]

    def __call__(self, config: MergeConfig) -> dict[str, torch.Tensor]:
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


def search_grid(config: MergeConfig) -> list[MergeConfig]:
    """λ (and density / drop) candidates around the papers' defaults."""
    method = config.method.removeprefix("peft_")
    if method in ("linear", "dare"):
        scales = [0.2, 0.4, 0.6, 0.8, 1.0]
    else:
        scales = [0.6, 1.0, 1.5, 2.0]
    densities = [0.1, 0.2, 0.5] if config.method in READS["density"] else [config.density]
    drops = [0.5, 0.9] if config.method in READS["drop"] else [config.drop]
    return [dataclasses.replace(config, scale=s, density=k, drop=p) for s in scales for k in densities for p in drops]


def normalised(scores: dict[str, float], individual: dict[str, float], lower: Collection[str] = ()) -> float | None:
    """Mean over tasks of the score as a share of the member's own: merged / individual, or individual /
    merged for the tasks in ``lower`` (lower is better: MSE). 1 is the member's level, less is worse. A task
    whose member scores 0 has no share to take and is left out; None when no task is left."""
    ratios = [individual[t] / max(scores[t], 1e-12) if t in lower else scores[t] / individual[t]
              for t in scores if t in individual and individual[t] > 0]
    return float(np.mean(ratios)) if ratios else None


def lower_is_better(specs: dict[str, TaskSpec]) -> frozenset[str]:
    """The tasks whose primary score (:func:`~cmtl.merging.scoring.primary_score`) is lower-is-better."""
    return frozenset(t for t, spec in specs.items() if not primary_metric(spec)[1])
