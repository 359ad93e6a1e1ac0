"""Continual-learning strategies, compared on one scenario with one backbone and budget.

* ``adapters`` — cmtl: a registry with one LoRA adapter + head per experience.
  Without a task id at test time (domain- and class-incremental) each text goes
  to the adapter whose head is most confident.
* ``adapters-routed`` — ``adapters``, but without a task id each text goes to the
  adapter of the experience whose training rows it most resembles on the frozen
  backbone's features (:class:`cmtl.continual.routing.FeatureRouter`).
* ``seq-ft`` — one shared LoRA adapter fine-tuned experience after experience, with a fresh
  optimiser for each (Avalanche's ``Naive`` keeps AdamW's state across experiences and forgets less;
  ``cmtl bench --avl-reset-optimizer`` runs it our way).
* ``replay`` — ``seq-ft`` plus a task-balanced buffer of earlier examples mixed
  into each experience's training data (Chaudhry et al., 2019, "On Tiny
  Episodic Memories in Continual Learning").
* ``ewc`` — ``seq-ft`` plus (λ/2) Σ F (θ − θ*)² per earlier experience
  (Kirkpatrick et al., 2017).
* ``lwf`` — ``seq-ft`` plus λ T² KL(old ‖ new) on earlier heads' outputs for
  the new data (Li & Hoiem, 2017).
* ``joint`` — a shared adapter retrained from scratch on every experience
  seen so far (the offline upper bound at each step).
* ``single`` — task-incremental only: an independent, fully fine-tuned copy
  of the backbone per task (the status quo cmtl replaces).
* ``grow`` — class-incremental only: cmtl's registry path for a task whose
  classes grow: one task, created on the first experience and updated on each
  later one with its new labels (``update_task(labels=...)``), replaying from
  the class-balanced buffer as many rows per old label as the new data has per
  new label.
* ``grow-analytic`` — the same registry path with an analytic head
  (``add_task(head=AnalyticConfig())``): each update adds its rows to the
  task's stored class statistics and trains nothing.
* ``analytic`` — no training: a head computed in closed form from running class
  statistics of the frozen backbone's features (:mod:`cmtl.continual.analytic`;
  RanPAC's random projection and ridge by default), updated exactly on each
  experience, so the head forgets nothing and stores no examples.

Shared strategies keep one head per task (task-incremental), one head for the
one task (domain-incremental), or one head over every class whose unseen
classes are masked (class-incremental). Each experience trains the adapter and
the head of its task (the stream's one head, when it shares one); an earlier
task's own head, reached by replayed rows, stays as its experience left it.
A head for an experience not trained yet is a fresh head drawn from a fixed
seed (per experience when each has its own head, the first experience's when
the stream shares one), so ``b`` and FWT compare like with like across strategies.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import math
import numbers
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cmtl._config import plain_numbers
from cmtl.benchmarks.metrics import ContinualReport
from cmtl.benchmarks.scenarios import Experience, Kind
from cmtl.continual.analytic import AnalyticConfig, AnalyticHead
from cmtl.continual.penalties import Anchor, distillation_loss, ewc_term, fisher_diagonal
from cmtl.continual.replay import make_buffer
from cmtl.continual.routing import FeatureRouter
from cmtl.continual.updates import MemoryConfig, UpdateConfig
from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import Backbone, BackboneConfig, load_backbone
from cmtl.core.heads import TaskHead, route_to_heads
from cmtl.core.tasks import MASKED_LOGIT, TaskSpec, answers, unanswered
from cmtl.data import Encoded, Examples, encode
from cmtl.errors import InvalidParameterError, bad_param
from cmtl.registry.facade import Registry
from cmtl.registry.reader import scale_note
from cmtl.training.caching import maybe_cache, prefix_megabytes
from cmtl.training.evaluation import predict_logits
from cmtl.training.loop import TrainConfig, seeded, train
from cmtl.training.probe import pooled_features
from cmtl.training import transfer
from cmtl.training.trainee import Trainee

STRATEGIES = ("adapters", "adapters-auto", "adapters-routed", "seq-ft", "replay", "ewc", "lwf", "joint", "single",
              "analytic", "grow", "grow-analytic")


@dataclass(kw_only=True, frozen=True)
class StrategyConfig:
    """The budget every strategy shares, and each strategy's own knobs.

    Args:
        adapter: LoRA settings of every adapter.
        training: Loop settings for every experience: by default the library's budget rule (at most
            10 epochs, validation after each, stop after 2 without improvement, best state kept), which
            Avalanche's strategies get too (:func:`cmtl.integrations.avalanche.best_epoch_plugin`).
        replay_budget: Examples the replay buffer of ``replay`` and ``avl-replay`` keeps, over all
            experiences. ``grow`` replays from its registry task's own buffer instead, as a user's task
            would: ``MemoryConfig()``'s (1,000 rows, class-balanced, seed 0), named in its notes.
        ewc_lambda: Weight of the EWC penalty.
        fisher_examples: Training examples used to estimate each Fisher diagonal.
        lwf_lambda: Weight of the LwF distillation term.
        lwf_temperature: Softmax temperature of the distillation.
        single_learning_rate: Peak learning rate of full fine-tuning (``single``).
        analytic: The closed-form head of ``analytic``.
        avalanche_reset_optimizer: Avalanche's strategies (``avl-*``) only: start every experience with
            fresh AdamW state, as cmtl's strategies always do
            (:attr:`cmtl.integrations.avalanche.AvalancheConfig.reset_optimizer_state`); ``False`` keeps
            Avalanche's default, which carries it over.
        init_scale: ``adapters-auto`` only: the share of the chosen source's change each start keeps
            (``add_task``'s ``init_scale``; 1: a full copy).
    """

    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    training: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    replay_budget: int = 500
    ewc_lambda: float = 1000.0
    fisher_examples: int = 256
    lwf_lambda: float = 1.0
    lwf_temperature: float = 2.0
    single_learning_rate: float = 5e-5
    analytic: AnalyticConfig = field(default_factory=AnalyticConfig)
    avalanche_reset_optimizer: bool = False
    init_scale: float = 1.0

    def __post_init__(self):
        plain_numbers(self)
        transfer.check_scale(self.init_scale, "auto", owner="StrategyConfig")
        for key in ("replay_budget", "fisher_examples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(bad_param(key, "StrategyConfig", "be a positive integer", value))
        for key in ("ewc_lambda", "lwf_lambda"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value)
                                                                                       and value >= 0):
                raise InvalidParameterError(bad_param(key, "StrategyConfig", "be a finite number >= 0", value))
        for key in ("lwf_temperature", "single_learning_rate"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
                raise InvalidParameterError(bad_param(key, "StrategyConfig", "be > 0", value))


def fresh_head(hidden: int, n_out: int, dropout: float, seed: int, j: int) -> TaskHead:
    """The untrained head every strategy gives head ``j`` of a stream trained under ``seed`` (``avl-*``
    included), so that ``b`` is one row for every strategy."""
    with seeded(seed * 1009 + j):
        return TaskHead(hidden, n_out, dropout)


class Learner(abc.ABC):
    """One strategy on one stream: ``fit`` each experience in turn, ``predict`` any of them."""

    def __init__(self, experiences: list[Experience], kind: Kind, backbone: Backbone, config: StrategyConfig):
        self.experiences = experiences
        self.kind = kind
        self.backbone = backbone
        self.config = config
        self.device = backbone.device
        self.pad_id = backbone.pad_id
        self.trainable_parameters: list[int] = []  # added per experience
        self.notes: list[str] = []  # what each fit chose, when there is something to say
        self.bytes_added: list[int] = []

    @abc.abstractmethod
    def fit(self, i: int) -> None:
        """Learn experience ``i`` (experiences ``< i`` were fit before)."""

    @abc.abstractmethod
    def predict(self, j: int, n_seen: int) -> list[str | None]:
        """Predicted label names for experience ``j``'s test texts after ``n_seen`` experiences (``None`` for a
        text the model gives no answer for: NaN outputs, scored as wrong)."""

    def _fresh_head(self, n_out: int, dropout: float, j: int) -> TaskHead:
        return fresh_head(self.backbone.hidden_size, n_out, dropout, self.config.training.seed, j)

    def _fresh_head_answers(self, j: int, features: torch.Tensor) -> list[str | None]:
        """Experience ``j`` before anything was learnt for it: a fresh seeded head on the plain backbone's
        pooled ``features`` of its test texts (a class-incremental model may answer any class of the stream).
        The head is the one the shared strategies start from: experience ``j``'s own on a task-incremental
        stream, the stream's one head (seed of experience 0) otherwise, so ``b`` is one row for every strategy."""
        labels = tuple(self.experiences[j].spec.labels)
        if self.kind == "class-incremental":
            labels = tuple(dict.fromkeys(x for e in self.experiences for x in e.spec.labels))
        head = self._fresh_head(len(labels), 0.0, j if self.kind == "task-incremental" else 0)
        with torch.inference_mode():
            logits = head(features)
        return answers(labels, logits)

    def _encode(self, examples: Examples, spec: TaskSpec, group: int, with_targets: bool = True) -> Encoded:
        enc = encode(examples, spec, self.backbone.tokenize, with_targets=with_targets)
        enc.groups = torch.full((len(enc),), group, dtype=torch.long)
        return enc


class SharedLearner(Learner):
    """One shared adapter; ``mode`` picks seq-ft, replay, ewc, lwf or joint."""

    def __init__(self, experiences, kind, backbone, config, mode: str):
        super().__init__(experiences, kind, backbone, config)
        self.mode = mode
        self.bank = AdapterBank(backbone.encoder)
        self._fresh_adapter()
        if kind == "task-incremental":
            self.head_keys = [e.spec.name for e in experiences]
            self.head_specs = [e.spec for e in experiences]
        else:  # one head: the shared label set, or every class of a class-incremental stream
            labels = tuple(dict.fromkeys(label for e in experiences for label in e.spec.labels))
            self.head_keys = [experiences[0].spec.name if kind == "domain-incremental" else "classes"]
            self.head_specs = [TaskSpec(self.head_keys[0], labels=labels)]
        self.width = max(s.num_outputs for s in self.head_specs)
        self.heads: dict[int, TaskHead] = {}
        for g in range(len(self.head_specs)):  # eagerly: a head first built under inference_mode cannot train
            self._head(g)
        self.allowed: torch.Tensor | None = None  # class-incremental: classes seen so far
        self.buffer = make_buffer("task_balanced", config.replay_budget, config.training.seed)
        self.ewc: list[Anchor] = []  # (Fisher, θ*) per experience
        self.last_pooled: torch.Tensor | None = None
        # Each experience's splits, encoded once, with the frozen layers below the shared adapter run once
        # (every adapter this learner switches in adapts the same layers): joint training re-reads every
        # earlier experience, and every test set is read after each experience.
        self._splits: dict[tuple[int, str], Encoded] = {}
        self._cached_mb = 0.0

    # --- model ------------------------------------------------------------------

    def _fresh_adapter(self) -> None:
        if "shared" in self.bank:
            self.bank.remove("shared")
        with seeded(self.config.training.seed):
            self.bank.add("shared", self.config.adapter)
        self.bank.activate("shared")

    def _group(self, j: int) -> int:
        return j if self.kind == "task-incremental" else 0

    def _head(self, g: int) -> TaskHead:
        if g not in self.heads:
            self.heads[g] = self._fresh_head(self.head_specs[g].num_outputs, self.config.training.head_dropout,
                                             g).to(self.device)
            self.heads[g].eval()
        return self.heads[g]

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (B, width): each row through its group's head; masked columns at a large negative."""
        inputs = dict(inputs)
        groups = inputs.pop("groups")
        pooled = self.backbone.embed(**inputs)  # (B, H)
        self.last_pooled = pooled
        logits = route_to_heads(pooled, groups, self._head, self.width)
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed, MASKED_LOGIT)
        return logits

    # --- learning ---------------------------------------------------------------

    def _split(self, j: int, split: str) -> Encoded:
        """Experience ``j``'s ``split`` ("train", "validation", "test") encoded for its head, with the
        frozen-layer prefix when the adapter leaves bottom layers frozen; computed once."""
        if (j, split) not in self._splits:
            g = self._group(j)
            enc = self._encode(getattr(self.experiences[j], split), self.head_specs[g], g,
                               with_targets=split != "test")
            self._splits[(j, split)] = self._with_prefix(enc, held=True)
        return self._splits[(j, split)]

    def _with_prefix(self, enc: Encoded, *, held: bool) -> Encoded:
        """``enc`` with its frozen-layer prefix (:func:`~cmtl.training.caching.maybe_cache`) if it fits in
        ``TrainConfig.cache_frozen_mb`` beside the prefixes this learner holds; ``enc`` itself otherwise.
        ``held``: the result is kept for the whole stream (its prefix counts against the budget)."""
        budget = self.config.training.cache_frozen_mb - self._cached_mb
        (out,) = maybe_cache([enc], self.backbone, self.config.adapter, budget,
                             batch_size=self.config.training.eval_batch_size)
        if held and out.prefix is not None:
            self._cached_mb += prefix_megabytes(out, self.backbone)
        return out

    def _training_data(self, i: int, exp: Experience, split: str) -> Encoded:
        parts = [self._split(i, split)]
        if self.mode == "joint":
            parts = [self._split(j, split) for j in range(i + 1)]
        elif self.mode == "replay" and split == "train" and len(self.buffer):
            for j, e in enumerate(self.experiences[:i]):
                old = self.buffer.to_examples(task=e.name)
                if len(old):  # the buffer changes after every experience: encoded anew
                    g = self._group(j)
                    parts.append(self._with_prefix(self._encode(old, self.head_specs[g], g), held=False))
        return Encoded.concat(parts)

    def fit(self, i: int) -> None:
        exp = self.experiences[i]
        if self.mode == "joint":
            self._fresh_adapter()
            self.heads.clear()
            for g in range(len(self.head_specs)):
                self._head(g)
        if self.kind == "class-incremental":
            seen = {label for e in self.experiences[: i + 1] for label in e.spec.labels}
            self.allowed = torch.tensor([label in seen for label in self.head_specs[0].labels], device=self.device)
        train_data = self._training_data(i, exp, "train")
        validation = self._training_data(i, exp, "validation")
        groups = sorted(set(train_data.groups.tolist()))
        heads = [self._head(g) for g in groups]
        old_heads = {g: copy.deepcopy(h) for g, h in self.heads.items()} if self.mode == "lwf" else None
        if self.mode == "lwf" and i > 0:
            if "previous" in self.bank:
                self.bank.remove("previous")
            self.bank.load("previous", self.config.adapter, self.bank.state_dict("shared"))
            self.bank.activate("shared")
        # An earlier experience's own head, trained in its fit, stays frozen when replayed rows pass through
        # it (passed to the loop, it gets no gradient). The head of this experience's group always trains:
        # the one head of a domain- or class-incremental stream learns on every experience, as Avalanche's
        # strategies' heads do (before 2026-12-07 it learnt on the first only, so the columns of classes
        # that arrive later kept their random start).
        current = self._group(i)
        frozen = [p for g, h in zip(groups, heads) if g != current for p in h.parameters() if not p.requires_grad]
        trainee = Trainee(self.forward, heads, bank=self.bank, key="shared")
        with trainee.unfrozen() as params:
            for p in frozen:
                p.requires_grad_(False)
            trained = sum(p.numel() for p in params if p.requires_grad)  # a frozen old head is not trained
            # Loss over rows of every group: targets index the group's own labels.
            spec = TaskSpec("stream", labels=[f"c{k}" for k in range(max(self.width, 2))])
            extra = self._penalty(i, old_heads)
            train(trainee.forward, params, trainee.set_training, spec, train_data, validation, self.config.training,
                  pad_id=self.pad_id, device=self.device, extra_loss=extra, desc=f"{self.mode}:{exp.name}",
                  heads=[p for h in heads for p in h.parameters()])
        if self.mode == "replay":
            self.buffer.add_examples(exp.train, task=exp.name)
        if self.mode == "ewc":
            self.ewc.append(self._fisher(train_data, spec))
        self.trainable_parameters.append(trained)
        # Stored state grows by the new head (and by the one shared adapter, once).
        new_head = self.kind == "task-incremental" or i == 0
        added = (self.bank.num_parameters("shared") if i == 0 else 0) + (
            sum(p.numel() for p in self._head(self._group(i)).parameters()) if new_head else 0)
        self.bytes_added.append(4 * added)  # float32

    def _penalty(self, i: int, old_heads) -> Callable | None:
        if self.mode == "ewc" and self.ewc:
            return ewc_term(self._shared(), self.ewc, self.config.ewc_lambda)
        if self.mode == "lwf" and i > 0:
            lam, T = self.config.lwf_lambda, self.config.lwf_temperature
            old_groups = sorted({self._group(j) for j in range(i)})
            if self.kind == "class-incremental":
                old_cols = torch.tensor([label in {x for e in self.experiences[:i] for x in e.spec.labels}
                                         for label in self.head_specs[0].labels], device=self.device)

            def lwf_penalty(inputs, logits, rows):
                pooled_new = self.last_pooled
                model_inputs = {k: v for k, v in inputs.items() if k != "groups"}
                with torch.no_grad():
                    self.bank.activate("previous")
                    pooled_old = self.backbone.embed(**model_inputs)
                    self.bank.activate("shared")
                total = logits.new_zeros(())
                for g in old_groups:
                    old, new = old_heads[g](pooled_old), self.heads[g](pooled_new)
                    if self.kind == "class-incremental":
                        old, new = old[:, old_cols], new[:, old_cols]
                    total = total + distillation_loss(new, old, T)
                return lam * total / len(old_groups)

            return lwf_penalty
        return None

    def _shared(self) -> list[torch.nn.Parameter]:
        """What every experience trains, so what EWC anchors: the adapter, and the stream's one head when
        the stream shares one (a task-incremental stream's heads are each their own experience's)."""
        shared = self.bank.parameters("shared")
        if self.kind != "task-incremental":
            shared += [p.requires_grad_(True) for p in self._head(0).parameters()]
        return shared

    def _fisher(self, data: Encoded, spec: TaskSpec) -> Anchor:
        shared = self._shared()
        anchor = fisher_diagonal(self.forward, shared, spec, data, max_examples=self.config.fisher_examples,
                                 pad_id=self.pad_id, device=self.device, seed=self.config.training.seed)
        for p in shared:
            p.requires_grad_(False)
        return anchor

    # --- inference --------------------------------------------------------------

    def predict(self, j: int, n_seen: int) -> list[str | None]:
        spec = self.head_specs[self._group(j)]
        enc = self._split(j, "test")
        logits = predict_logits(self.forward, enc, batch_size=self.config.training.eval_batch_size,
                                pad_id=self.pad_id, device=self.device)
        return answers(spec.labels, logits[:, : spec.num_outputs])


class AdapterLearner(Learner):
    """cmtl itself: every experience becomes a task of a registry, with its own adapter and head; with
    ``init="auto"`` (strategy ``adapters-auto``) a task whose fresh adapter cannot beat its step-0 probe
    is trained again from the earlier adapter a short trial picks, and keeps whichever run scores higher
    on validation (forward transfer, :mod:`cmtl.training.transfer`)."""

    def __init__(self, experiences, kind, backbone, config, root: Path, init: str | None = None,
                 routed: bool = False):
        super().__init__(experiences, kind, backbone, config)
        self.registry = Registry.create(root, backbone)
        self.init = init
        # Task-free scenarios: route by feature statistics instead of the most confident head.
        self.router = FeatureRouter(backbone.hidden_size) if routed and kind != "task-incremental" else None
        self.test_features: dict[int, torch.Tensor] = {}
        # Task-incremental: a task's answers depend only on whether it was trained (its adapter and head
        # never change afterwards), so each is computed twice at most, not once per experience.
        self._answers: dict[tuple[int, bool], list[str]] = {}

    def fit(self, i: int) -> None:
        exp = self.experiences[i]
        if self.router is not None:
            self.router.add(exp.name, self.registry.embed(exp.train.texts))
        info = self.registry.add_task(TaskSpec(exp.name, labels=exp.spec.labels), train=exp.train,
                                      validation=exp.validation, adapter=self.config.adapter,
                                      training=self.config.training, init=self.init,
                                      init_scale=self.config.init_scale if self.init is not None else 1.0)
        self.trainable_parameters.append(info.trainable_parameters)
        self.bytes_added.append(info.bytes_on_disk)
        if self.init is not None:
            chosen = info.init or {}
            source = (f"task {chosen['task']}" if "task" in chosen else f"merge {chosen['merge']}" if "merge" in chosen
                      else "fresh")
            if source != "fresh":
                source += scale_note(chosen)
            gains = (chosen.get("trial") or {}).get("gain_z") or {}
            tried = ", ".join(f"{k} {'n/a' if z is None else f'{z:+.1f}'}" for k, z in gains.items())
            left_out = ", ".join(chosen.get("skipped") or {})
            judged = chosen.get("validation")
            versus = ("" if not judged or judged["source"] is None else
                      f"; validation {judged['metric']}: source {judged['source']:.3f}, fresh {judged['fresh']:.3f}")
            fresh = {"beat the probe": "; fresh beat its probe: nothing tried",
                     "kept the probe": "; fresh kept its probe",
                     "kept a perfect probe": "; fresh kept a perfect probe: nothing tried"}.get(chosen.get("fresh"), "")
            failed = ("; search failed: " + chosen["error"] if "error" in chosen else
                      "; source's run failed: " + chosen["rejected"]["error"]
                      if "error" in (chosen.get("rejected") or {}) else "")
            self.notes.append(f"started from {source}" + fresh
                              + (f"; trial gain over fresh in SE: {tried}" if tried else "") + failed
                              + versus + (f"; left out: {left_out}" if left_out else ""))

    def predict(self, j: int, n_seen: int) -> list[str | None]:
        exp = self.experiences[j]
        texts = exp.test.texts
        if self.kind == "task-incremental":
            trained = j < n_seen
            if (j, trained) not in self._answers:
                self._answers[(j, trained)] = (registry_answers(self.registry, exp.name, texts) if trained
                                               else self._untrained(j, texts))
            return self._answers[(j, trained)]
        if n_seen == 0:
            return self._untrained(j, texts)
        if self.router is not None:
            if j not in self.test_features:
                self.test_features[j] = self.registry.embed(texts)
            routes = self.router.route(self.test_features[j])
            out = [""] * len(texts)
            for name in set(routes):
                rows = [k for k, r in enumerate(routes) if r == name]
                for k, label in zip(rows, registry_answers(self.registry, name, [texts[k] for k in rows])):
                    out[k] = label
            return out
        # No task id: every seen adapter answers, the most confident (adapter, label) wins.
        best_p = torch.full((len(texts),), -1.0)
        best = [""] * len(texts)
        for e in self.experiences[:n_seen]:
            logits = registry_logits(self.registry, e.name, texts)  # (N, L_e)
            p, k = logits.softmax(-1).max(-1)
            p[unanswered(logits)] = -1.0  # a row this adapter gives no answer for (NaN): it never wins
            for row in torch.nonzero(p > best_p).flatten().tolist():
                best[row] = e.spec.labels[k[row]]
            best_p = torch.maximum(best_p, p)
        return best

    def _untrained(self, j: int, texts: list[str]) -> list[str]:
        """A task not trained yet: its fresh seeded head on the plain backbone (its adapter starts at B = 0)."""
        return self._fresh_head_answers(j, self.registry.embed(texts))


class SingleLearner(Learner):
    """One independent, fully fine-tuned copy of the backbone per task (task-incremental only)."""

    def __init__(self, experiences, kind, backbone, config):
        if kind != "task-incremental":
            raise ValueError("Strategy 'single' trains one model per task and needs a task id at test time: "
                             f"it runs on task-incremental scenarios only, not {kind}.")
        super().__init__(experiences, kind, backbone, config)
        self.models: dict[int, tuple[torch.nn.Module, TaskHead]] = {}

    def _model(self, j: int) -> tuple[torch.nn.Module, TaskHead]:
        if j not in self.models:
            encoder = copy.deepcopy(self.backbone.encoder)
            spec = self.experiences[j].spec
            head = self._fresh_head(spec.num_outputs, self.config.training.head_dropout, j).to(self.device)
            encoder.eval()
            head.eval()
            self.models[j] = (encoder, head)
        return self.models[j]

    def _forward(self, j: int):
        encoder, head = self._model(j)
        pool = self.backbone.pool

        def forward(inputs):
            inputs = {k: v for k, v in inputs.items() if k != "groups"}
            return head(pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"]))

        return forward

    def fit(self, i: int) -> None:
        exp = self.experiences[i]
        trainee = Trainee(self._forward(i), self._model(i))  # the encoder copy and the head, trained whole
        config = TrainConfig.from_dict({**self.config.training.to_dict(),
                                        "learning_rate": self.config.single_learning_rate})
        with trainee.unfrozen() as params:
            train(trainee.forward, params, trainee.set_training, exp.spec, self._encode(exp.train, exp.spec, 0),
                  self._encode(exp.validation, exp.spec, 0), config, pad_id=self.pad_id, device=self.device,
                  desc=f"single:{exp.name}", heads=list(self._model(i)[1].parameters()))
        n = sum(p.numel() for p in params)
        self.trainable_parameters.append(n)
        self.bytes_added.append(4 * n)

    def predict(self, j: int, n_seen: int) -> list[str | None]:
        exp = self.experiences[j]
        enc = self._encode(exp.test, exp.spec, 0, with_targets=False)
        logits = predict_logits(self._forward(j), enc, batch_size=self.config.training.eval_batch_size,
                                pad_id=self.pad_id, device=self.device)
        return answers(exp.spec.labels, logits)


class GrowLearner(Learner):
    """One registry task whose labels grow with each experience of a class-incremental stream; with
    ``head`` (``grow-analytic``), its head is analytic and each update adds to its statistics."""

    def __init__(self, experiences, kind, backbone, config, root: Path, head: AnalyticConfig | None = None):
        if kind != "class-incremental":
            raise ValueError(f"Strategy 'grow' adds each experience's classes to one task: it runs on "
                             f"class-incremental scenarios only, not {kind}.")
        super().__init__(experiences, kind, backbone, config)
        self.registry = Registry.create(root, backbone)
        self.task = "classes"
        self.labels: list[str] = []
        self.head = head

    def fit(self, i: int) -> None:
        exp = self.experiences[i]
        old = list(self.labels)
        self.labels += [x for x in exp.spec.labels if x not in self.labels]
        if i == 0:
            memory = MemoryConfig()  # a user's task's: not --replay-budget, which sizes replay's shared buffer
            info = self.registry.add_task(TaskSpec(self.task, labels=self.labels), train=exp.train,
                                          validation=exp.validation, adapter=self.config.adapter,
                                          training=self.config.training, head=self.head, memory=memory)
            self.bytes_added.append(info.bytes_on_disk)
            self.trainable_parameters.append(info.trainable_parameters)
            self.notes.append(f"task {self.task!r} created with {len(self.labels)} labels; it replays from its "
                              f"own {memory.buffer} buffer of {memory.budget} rows (seed {memory.seed}), not "
                              "--replay-budget's")
            return
        # As many rows per old label as per new one; an analytic head replays nothing (its statistics remember).
        ratio = 0.0 if self.head is not None else len(old) / max(1, len(self.labels) - len(old))
        result = self.registry.update_task(self.task, exp.train, exp.validation, labels=self.labels, promote=True,
                                           training=self.config.training, config=UpdateConfig(replay_ratio=ratio))
        self.bytes_added.append(result.version.bytes_on_disk)
        self.trainable_parameters.append(result.version.trainable_parameters)
        self.notes.append(f"replay ratio {ratio:g}; gate: {result.reason}")

    def predict(self, j: int, n_seen: int) -> list[str | None]:
        texts = self.experiences[j].test.texts
        if n_seen == 0:
            return self._fresh_head_answers(j, self.registry.embed(texts))
        return registry_answers(self.registry, self.task, texts)


class AnalyticLearner(Learner):
    """Closed-form heads on the frozen backbone's pooled features: one per task (task-incremental), one
    over the shared label set (domain-incremental) or over every class seen so far, grown on each
    experience (class-incremental). Each experience adds its training rows to the statistics; the
    ridge λ is chosen on the validation rows seen so far, whose pooled features (not texts) are kept."""

    def __init__(self, experiences, kind, backbone, config):
        super().__init__(experiences, kind, backbone, config)
        if kind == "task-incremental":
            self.labels = [tuple(e.spec.labels) for e in experiences]
        elif kind == "domain-incremental":
            self.labels = [tuple(experiences[0].spec.labels)]
        else:  # grows with each experience's classes
            self.labels = [()]
        self.heads: dict[int, AnalyticHead] = {}
        self.validation: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.test_features: dict[int, torch.Tensor] = {}  # the backbone is frozen: one pass per test set

    def _group(self, j: int) -> int:
        return j if self.kind == "task-incremental" else 0

    def _features(self, examples: Examples, spec: TaskSpec) -> torch.Tensor:
        return pooled_features(self.backbone, encode(examples, spec, self.backbone.tokenize, with_targets=False),
                               batch_size=self.config.training.eval_batch_size).cpu()

    def fit(self, i: int) -> None:
        exp, g = self.experiences[i], self._group(i)
        if self.kind == "class-incremental":
            new = [label for label in exp.spec.labels if label not in self.labels[0]]
            self.labels[0] = self.labels[0] + tuple(new)
        labels = self.labels[g]
        spec = TaskSpec(exp.spec.name, labels=list(labels))
        index = {label: k for k, label in enumerate(labels)}
        head = self.heads.get(g)
        before = _analytic_bytes(head, self.validation.get(g, []))
        weights_before = 0 if head is None else head.weight.numel()
        if head is None:
            head = self.heads[g] = AnalyticHead(self.backbone.hidden_size, len(labels), self.config.analytic)
        elif head.num_classes < len(labels):
            head.grow(len(labels) - head.num_classes)
        head.update(self._features(exp.train, spec), torch.tensor([index[y] for y in exp.train.labels]))
        self.validation.setdefault(g, []).append(
            (self._features(exp.validation, spec), torch.tensor([index[y] for y in exp.validation.labels])))
        held = self.validation[g]
        lam = head.choose_ridge(torch.cat([x for x, _ in held]), torch.cat([y for _, y in held]))
        self.trainable_parameters.append(head.weight.numel() - weights_before)  # computed, not trained
        self.bytes_added.append(_analytic_bytes(head, held) - before)
        self.notes.append(f"{head.stats.rows} rows, {head.num_classes} classes"
                          + ("" if math.isnan(lam) else f", ridge {lam:g}"))

    def predict(self, j: int, n_seen: int) -> list[str | None]:
        exp, g = self.experiences[j], self._group(j)
        if j not in self.test_features:
            self.test_features[j] = self._features(exp.test, exp.spec)
        features = self.test_features[j]
        if g not in self.heads or n_seen == 0 or (self.kind == "task-incremental" and j >= n_seen):
            return self._fresh_head_answers(j, features)
        return answers(self.labels[g], self.heads[g](features))


def registry_logits(registry: Registry, task: str, texts: list[str]) -> torch.Tensor:
    """The logits (N, L) of ``task``'s current version in ``registry`` for ``texts``."""
    spec = registry.spec(task)
    return registry._logits(task, spec, texts, None, None)


def registry_answers(registry: Registry, task: str, texts: list[str]) -> list[str | None]:
    """:meth:`Registry.predict` for a benchmark: ``None`` for a row the model gives no answer for (NaN outputs,
    scored as wrong, as the other strategies score it) where the registry raises NonFiniteOutputError."""
    return answers(registry.spec(task).labels, registry_logits(registry, task, texts))


def _analytic_bytes(head: AnalyticHead | None, held: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """What an analytic learner keeps: the statistics (float64) and the validation rows' features (float32)."""
    if head is None:
        return 0
    stats = sum(t.numel() * 8 for t in head.stats.state_dict().values())
    return stats + sum(x.numel() * 4 + y.numel() * 8 for x, y in held)


def make_learner(strategy: str, experiences: list[Experience], kind: Kind, backbone: Backbone,
                 config: StrategyConfig, workdir: Path) -> Learner:
    """The learner of one strategy name from :data:`STRATEGIES`."""
    if strategy in ("adapters", "adapters-auto", "adapters-routed"):
        return AdapterLearner(experiences, kind, backbone, config, workdir / "registry",
                              init="auto" if strategy == "adapters-auto" else None,
                              routed=strategy == "adapters-routed")
    if strategy == "single":
        return SingleLearner(experiences, kind, backbone, config)
    if strategy == "analytic":
        return AnalyticLearner(experiences, kind, backbone, config)
    if strategy in ("grow", "grow-analytic"):
        return GrowLearner(experiences, kind, backbone, config, workdir / "registry",
                           head=config.analytic if strategy == "grow-analytic" else None)
    if strategy in ("seq-ft", "replay", "ewc", "lwf", "joint"):
        return SharedLearner(experiences, kind, backbone, config, mode=strategy)
    raise ValueError(f"Unknown strategy {strategy!r}. Known strategies: {list(STRATEGIES)}.")


def fit_experience(learner: Learner, i: int, seed: int, device: torch.device) -> float:
    """Train ``learner`` on experience ``i`` under the seed :func:`run_stream` gives it; return the seconds.

    The seed depends on ``i`` alone (dropout masks, fresh heads), so a learner whose every experience starts
    afresh (``joint``) trained on experience ``i`` alone ends where the whole stream's run does after ``i``.
    """
    started = time.perf_counter()
    with seeded(seed * 7919 + i, device):
        learner.fit(i)
    return time.perf_counter() - started


def experience_accuracy(learner: Learner, experiences: list[Experience], j: int, n_seen: int) -> float:
    """Accuracy of ``learner`` on experience ``j``'s test set once it has seen ``n_seen`` experiences."""
    truth = experiences[j].test.labels
    return sum(p == t for p, t in zip(learner.predict(j, n_seen), truth)) / len(truth)


def run_stream(
    strategy: str,
    experiences: list[Experience],
    kind: Kind,
    backbone: BackboneConfig | None = None,
    config: StrategyConfig | None = None,
    *,
    device: str = "auto",
    workdir: str | Path | None = None,
    on_step: Callable[[str], None] | None = None,
) -> ContinualReport:
    """Train ``strategy`` through the stream; measure R, b, time, parameters and bytes per experience.

    Each run loads its own copy of the backbone, so strategies never share adapter state.
    """
    config = config or StrategyConfig()
    loaded = load_backbone(backbone, device=device)
    with tempfile.TemporaryDirectory(prefix="cmtl-bench-") as tmp:
        learner = make_learner(strategy, experiences, kind, loaded, config, Path(workdir or tmp))
        T = len(experiences)

        def accuracy(j: int, n_seen: int) -> float:
            return experience_accuracy(learner, experiences, j, n_seen)

        b = [accuracy(j, 0) for j in range(T)]
        R, seconds = [], []
        for i in range(T):
            seconds.append(fit_experience(learner, i, config.training.seed, loaded.device))
            R.append([accuracy(j, i + 1) for j in range(T)])
            if on_step:
                note = f", {learner.notes[i]}" if len(learner.notes) > i else ""
                on_step(f"{strategy}: after {experiences[i].name} ({seconds[-1]:.0f} s{note}): "
                        + " ".join(f"{experiences[j].name}={R[-1][j]:.3f}" for j in range(T)))
        report = ContinualReport.from_matrix(R, [e.name for e in experiences], b=b, seconds_per_experience=seconds,
                                             trainable_parameters_per_task=learner.trainable_parameters,
                                             bytes_per_task=learner.bytes_added)
    if kind == "class-incremental":
        # Classes not seen yet cannot be predicted, so R[j-1][j] = 0 by construction: FWT says nothing.
        report = dataclasses.replace(report, fwt=None)
    return report
