"""Updating a task on new data: the settings, the algorithm and the promotion rule.

:meth:`cmtl.Registry.update_task` reads the data (:func:`update_data`) and trains a candidate
version from the current one (:func:`train_candidate`); :meth:`Gate.decide` says whether it
becomes current. The registry keeps, per version, a replay buffer of training examples and a
held-out sample of that version's validation data (:class:`MemoryConfig`); the held-out samples
of a version's lineage are the "old distribution" a candidate must not forget.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Hashable, Iterable, Literal, Sequence

import torch

from cmtl._config import plain_numbers, refuse_unread
from cmtl.continual.analytic import AnalyticHead, fit_head
from cmtl.continual.config import MemoryConfig  # noqa: F401  (re-exported)
from cmtl.continual.penalties import distillation_loss, ewc_term, fisher_diagonal
from cmtl.continual.replay import ReplayBuffer, make_buffer, stored
from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import Backbone
from cmtl.core.heads import TaskHead
from cmtl.core.tasks import MASKED_LOGIT, TaskSpec, label_key
from cmtl.data import Encoded, Examples, read_examples, seeded_order
from cmtl.data.examples import warn_shared
from cmtl.errors import DataError, InvalidParameterError, bad_param
from cmtl.training.evaluation import compute_metrics, primary_metric
from cmtl.training.loop import TrainConfig, TrainResult
from cmtl.training.trainee import Trainee, fit

Penalty = Literal["none", "ewc", "lwf"]


@dataclass(kw_only=True, frozen=True)
class UpdateConfig:
    """How :meth:`cmtl.Registry.update_task` trains and judges a candidate version.

    Args:
        replay_ratio: Replayed buffer examples per new training example
            (0 trains on the new data only).
        penalty: ``"ewc"`` (quadratic pull towards the previous version,
            weighted by its Fisher diagonal on replayed/held-out old data) or
            ``"lwf"`` (distil the previous version's outputs on every training row: the new data
            and, with replay, the replayed rows; Li & Hoiem distil on the new data alone);
            ``"none"`` for neither.
        penalty_weight: λ of the penalty; ``None`` uses 1000 for EWC and 1 for LwF.
        temperature: LwF softmax temperature.
        fisher_examples: Old examples used to estimate the EWC Fisher diagonal.
        tolerance: Largest drop of the primary metric on the old distribution
            that still allows promotion (0.01 = one accuracy point).
        validation_fraction: Share of the new data held out for validation when
            no validation data is given.
    """

    replay_ratio: float = 1.0
    penalty: Penalty = "none"
    penalty_weight: float | None = None
    temperature: float = 2.0
    fisher_examples: int = 256
    tolerance: float = 0.01
    validation_fraction: float = 0.1

    def __post_init__(self) -> None:
        plain_numbers(self)
        if not 0 <= self.replay_ratio < math.inf:
            raise InvalidParameterError(bad_param("replay_ratio", "UpdateConfig", "be finite and >= 0",
                                                  self.replay_ratio))
        if self.penalty not in ("none", "ewc", "lwf"):
            raise InvalidParameterError(bad_param("penalty", "UpdateConfig", "be one of ['none', 'ewc', 'lwf']",
                                                  self.penalty))
        if self.penalty_weight is not None and not 0 <= self.penalty_weight < math.inf:
            raise InvalidParameterError(bad_param("penalty_weight", "UpdateConfig", "be finite and >= 0, or None",
                                                  self.penalty_weight))
        if not 0 < self.temperature < math.inf:
            raise InvalidParameterError(bad_param("temperature", "UpdateConfig", "be finite and > 0",
                                                  self.temperature))
        if isinstance(self.fisher_examples, bool) or not isinstance(self.fisher_examples, int) or \
                self.fisher_examples < 1:
            raise InvalidParameterError(bad_param("fisher_examples", "UpdateConfig", "be a positive integer",
                                                  self.fisher_examples))
        if not self.tolerance >= 0:
            raise InvalidParameterError(bad_param("tolerance", "UpdateConfig", "be >= 0", self.tolerance))
        if not 0 < self.validation_fraction < 1:
            raise InvalidParameterError(bad_param("validation_fraction", "UpdateConfig", "be in (0, 1)",
                                                  self.validation_fraction))
        refuse_unread(self, "penalty", {"penalty_weight": ("ewc", "lwf"), "temperature": ("lwf",),
                                        "fisher_examples": ("ewc",)})

    @property
    def weight(self) -> float:
        if self.penalty_weight is not None:
            return self.penalty_weight
        return 1000.0 if self.penalty == "ewc" else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """The evidence for (or against) promoting a candidate version.

    ``*_old`` are scores on the held-out data of the versions so far, ``*_new``
    on the new validation data; ``None`` where there is no such data. ``require_gain``: the new score
    must improve (a trained candidate); without it, it must only not get worse (an exact update of an
    analytic head's statistics, which adds data rather than searching for a better model).
    """

    metric: str
    higher_is_better: bool
    parent_new: float
    candidate_new: float
    parent_old: float | None
    candidate_old: float | None
    tolerance: float
    require_gain: bool = True

    def decide(self) -> tuple[bool, str]:
        """(promote?, the reason in one sentence)."""
        sign = 1.0 if self.higher_is_better else -1.0
        gain = sign * (self.candidate_new - self.parent_new)
        m = self.metric
        if gain < 0 or (gain == 0 and self.require_gain):
            return False, (f"not promoted: {m} on the new data did not improve "
                           f"({self.parent_new:.4f} -> {self.candidate_new:.4f})")
        if self.parent_old is None or self.candidate_old is None:
            return True, (f"promoted: {m} on the new data {self.parent_new:.4f} -> {self.candidate_new:.4f}; "
                          "no held-out data of earlier versions to check forgetting against")
        drop = sign * (self.parent_old - self.candidate_old)
        # Scores are rounded binary fractions: 0.90 - 0.89 is 0.010000000000000009, a drop the tolerance 0.01 allows.
        if drop > self.tolerance and not math.isclose(drop, self.tolerance, rel_tol=1e-9, abs_tol=1e-12):
            return False, (f"not promoted: {m} on earlier data dropped by {drop:.4f} "
                           f"({self.parent_old:.4f} -> {self.candidate_old:.4f}), more than the tolerance "
                           f"{self.tolerance:.4f}")
        return True, (f"promoted: {m} on the new data {self.parent_new:.4f} -> {self.candidate_new:.4f}, "
                      f"on earlier data {self.parent_old:.4f} -> {self.candidate_old:.4f} "
                      f"(tolerance {self.tolerance:.4f})")

    def to_metrics(self) -> dict[str, float]:
        out = {f"parent_new_{self.metric}": self.parent_new, f"new_{self.metric}": self.candidate_new}
        if self.parent_old is not None and self.candidate_old is not None:
            out.update({f"parent_old_{self.metric}": self.parent_old, f"old_{self.metric}": self.candidate_old})
        return out


def memory_files(task: str, version: int, memory: MemoryConfig, train: Examples | None, validation: Examples | None,
                 parent_buffer: ReplayBuffer | None) -> dict[str, bytes]:
    """A version's ``replay.parquet`` (the parent's buffer plus ``train``) and ``holdout.parquet``
    (a sample of ``validation``), as bytes."""
    files = {}
    buffer = parent_buffer
    if train is not None:
        buffer = buffer or make_buffer(memory.buffer, memory.budget, memory.seed)
        buffer.add_examples(train, task=task, source=f"v{version}", domain=f"v{version}")
    if buffer is not None:
        files["replay.parquet"] = buffer.to_bytes()
    if validation is not None:
        holdout = make_buffer("reservoir", memory.holdout, memory.seed + version)
        holdout.add_examples(validation, task=task, source=f"v{version}", domain=f"v{version}")
        files["holdout.parquet"] = holdout.to_bytes()
    return files


@dataclass
class UpdateData:
    """An update's data: new examples (and the held-out part of them), replayed old examples, and
    the encoded rows it trains on, chooses its kept state on (``select``) and is judged on (``judge``).

    ``select`` and ``judge`` are disjoint halves of the new validation rows and of the lineage's held-out
    rows (each: new rows first, then old). A candidate scored on the rows that chose its kept state would
    be favoured over its parent, which is scored once: the best of several noisy scores beats one.
    """

    new: Examples
    validation: Examples
    replayed: Examples | None
    train: Encoded
    select: Encoded
    judge: Encoded
    n_new: int  # rows of ``judge`` that are new validation data
    old: list[Encoded | None]  # replayed and old held-out rows: EWC's Fisher data

    @property
    def held(self) -> Encoded:
        """Every held-out row: ``select``'s, then ``judge``'s."""
        return Encoded.concat([self.select, self.judge])


def update_data(spec: TaskSpec, train: Any, validation: Any, *, config: UpdateConfig, training: TrainConfig,
                buffer: ReplayBuffer | None, held: Examples | None, encode: Callable[[Examples], Encoded],
                buffer_labels: Sequence[int] | None = None, held_labels: Sequence[int] | None = None
                ) -> UpdateData:
    """Read and encode an update's data; replay ``config.replay_ratio`` examples per new one from the
    parent's ``buffer`` (seeded); ``held``: the old held-out examples of the parent's lineage.

    ``buffer_labels`` and ``held_labels``: for each row of ``buffer`` (in :meth:`ReplayBuffer.items` order) and
    of ``held``, how many of ``spec``'s labels it was annotated for, those of the version that kept it (``None``:
    all). A multi-label row holds no answer for the labels added after it (NaN targets, which the loss and the
    metrics leave out); a single-label row's one label excludes them."""
    new = read_examples(train, spec)
    if validation is None:
        new, val = split(new, config.validation_fraction, training.seed, spec.name)
    else:
        val = read_examples(validation, spec)
        if len(val) < 2:
            raise DataError(f"Task {spec.name!r}: an update needs at least 2 validation examples, got {len(val)}: "
                            "half choose the candidate's kept state, the other half judge it against the current "
                            "version. Pass more validation data, or none to hold out a share of the new data.")
        warn_shared(new, val, "validation rows", spec.name, "the kept state and the gate's new-data score are",
                    stacklevel=4)  # the user's update_task
    if held is not None and len(held):
        warn_shared(new, held, "old held-out rows", spec.name, "the gate's check that earlier data did not drop is",
                    stacklevel=4)
    new_enc, val_enc = encode(new), encode(val)  # DataError on unknown labels
    n_replay = round(config.replay_ratio * len(new))
    replayed, replay_enc = None, None
    if buffer is not None and len(buffer):
        rows = sample_indices(len(buffer), n_replay, training.seed)
        replayed = stored(spec, buffer.to_examples()).select(rows)
        if len(replayed):
            replay_enc = mask_later_labels(spec, encode(replayed), None if buffer_labels is None else
                                           [buffer_labels[i] for i in rows])
    train_enc = Encoded.concat([new_enc] + ([replay_enc] if replay_enc is not None else []))
    old_enc = mask_later_labels(spec, encode(held), held_labels) if held is not None else None
    parts = [(val_enc, val)] + ([(old_enc, held)] if old_enc is not None and len(old_enc) else [])
    split_parts = [[part.select(rows) for rows in halves(len(part), training.seed + k, rows_of.inputs())]
                   for k, (part, rows_of) in enumerate(parts)]
    select = Encoded.concat([s for s, _ in split_parts if len(s)])
    judge = Encoded.concat([j for _, j in split_parts])
    return UpdateData(new, val, replayed, train_enc, select, judge, len(split_parts[0][1]), [replay_enc, old_enc])


def mask_later_labels(spec: TaskSpec, encoded: Encoded, annotated: Sequence[int] | None) -> Encoded:
    """``encoded`` (old rows) with NaN targets in each row for the multi-label labels after the first
    ``annotated[row]``."""
    if spec.problem_type != "multi_label" or annotated is None or min(annotated, default=spec.num_outputs) >= \
            spec.num_outputs:
        return encoded
    later = torch.arange(spec.num_outputs)[None, :] >= torch.as_tensor(list(annotated))[:, None]  # (N, L)
    return dataclasses.replace(encoded, targets=encoded.targets.masked_fill(later, math.nan))


def halves(n: int, seed: int, keys: Sequence[Hashable] | None = None) -> tuple[list[int], list[int]]:
    """(select, judge): a seeded split of ``range(n)`` in two, ``judge`` the larger half when ``n`` is odd;
    each in order. With ``keys`` (each row's input, :meth:`Examples.inputs`), copies of one input stay on one
    side (:func:`take_whole`), unless the rows hold a single input. ``update_task`` splits the new validation
    rows with ``training.seed`` and the lineage's held-out rows with ``training.seed + 1``."""
    chosen = take_whole(keys if keys is not None else range(n), n // 2, seed)
    if keys is not None and (not chosen or len(chosen) == n):  # one input in copies: no split can part them
        chosen = take_whole(range(n), n // 2, seed)
    out = set(chosen)
    return chosen, [i for i in range(n) if i not in out]


def take_whole(keys: Sequence[Hashable], n_take: int, seed: int) -> list[int]:
    """About ``n_take`` of the rows (in order), each input (``keys``: one per row) taken with all its copies,
    and never every row. Inputs are drawn in a seeded order while their copies fit in ``n_take``; if that falls
    short, the smallest inputs left complete it, whole, as long as a row stays untaken. With distinct keys:
    ``sorted(seeded_order(len(keys), seed)[:n_take])``."""
    copies: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        copies.setdefault(key, []).append(i)
    groups, order = list(copies.values()), seeded_order(len(copies), seed)
    taken: list[int] = []
    used: set[int] = set()
    for g in order:
        if len(taken) + len(groups[g]) <= n_take:
            taken += groups[g]
            used.add(g)
    # The smallest inputs overshoot least; the next ones in the order could take most of the rows.
    for g in sorted(order, key=lambda g: len(groups[g])):  # stable: the seeded order among inputs of one size
        if len(taken) < n_take and g not in used and len(taken) + len(groups[g]) < len(keys):
            taken += groups[g]
            used.add(g)
    return sorted(taken)


def grown_spec(spec: TaskSpec, labels: Sequence[str] | None) -> TaskSpec:
    """``spec`` with the labels of ``labels`` it lacks appended, in their order (its own labels keep their
    positions, so the parent's head rows, buffers and held-out samples stay valid). ``None``: ``spec``.

    Raises:
        InvalidParameterError: not a list of names, duplicates, a regression task, a label of ``spec`` left
            out (labels cannot be removed), a new label that differs from another only in spaces, case or
            Unicode form, or, for a task that reads integer labels as positions (``label_encoding="index"``),
            the current labels in another order (an integer would mean another label than in the list given).
    """
    if labels is None:
        return spec
    owner = f"update_task of {spec.name!r}"
    if not isinstance(labels, str) and isinstance(labels, Iterable):
        labels = list(labels)  # read once: the checks below would spend a generator
    if isinstance(labels, str) or not all(isinstance(x, str) and x for x in labels):
        raise InvalidParameterError(bad_param("labels", owner, "be a list of label names, e.g. "
                                              f"{[*spec.labels, 'new-label']}", labels))
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise InvalidParameterError(bad_param("labels", owner, "not hold duplicate labels", labels))
    if spec.problem_type == "regression":
        raise InvalidParameterError(f"Task {spec.name!r} is a regression task: it has no labels to add.")
    removed = [x for x in spec.labels if x not in labels]
    if removed:
        raise InvalidParameterError(
            f"labels of update_task must keep every label of task {spec.name!r}; {removed} are missing. Labels "
            f"can be added, not removed: pass {[*spec.labels, *[x for x in labels if x not in spec.labels]]}, or "
            "add a new task for the smaller label set.")
    added = [x for x in labels if x not in spec.labels]
    grown = [*spec.labels, *added]
    if spec.label_encoding == "index" and labels != grown:
        raise InvalidParameterError(
            f"Task {spec.name!r} reads integer labels as positions in its labels, and labels {labels} put them "
            f"in another order than the task's {grown}: an integer in the data would mean another label than in "
            f"the list given. Pass {grown} (the current labels in their order, then the new ones), and write the "
            "data's integers as positions in it.")
    seen = {label_key(x): x for x in spec.labels}
    for x in added:
        other = seen.setdefault(label_key(x), x)
        if other != x:
            raise InvalidParameterError(
                f"New label {ascii(x)} of task {spec.name!r} differs from label {ascii(other)} only in spaces, case "
                "or Unicode form: it would be a class of its own, and the rows of one class would be split between "
                "two outputs. Name the class one way (in labels and in the data), or pick a distinct name.")
    return dataclasses.replace(spec, labels=tuple(grown)) if added else spec


def check_added_labels(parent: TaskSpec, spec: TaskSpec, train: Examples) -> None:
    """Every label ``spec`` adds to ``parent`` has at least one training row in ``train``.

    Raises:
        DataError: names the labels without rows.
    """
    added = spec.labels[len(parent.labels):]
    if not added:
        return
    seen = {x for row in train.labels for x in (row if isinstance(row, (list, tuple)) else [row])}
    missing = [x for x in added if x not in seen]
    if missing:
        raise DataError(f"New labels {missing} of task {spec.name!r} have no training rows in the update's data "
                        f"({len(train)} rows): a head cannot learn a label it never sees. Add rows for them or "
                        "leave them out of labels.")


def widen(logits: torch.Tensor, width: int) -> torch.Tensor:
    """``logits`` (N, L) padded to (N, ``width``) with :data:`MASKED_LOGIT`: a parent's outputs scored
    against a label set that grew (it never predicts the labels it lacks)."""
    if logits.shape[1] >= width:
        return logits
    return torch.cat([logits, logits.new_full((len(logits), width - logits.shape[1]), MASKED_LOGIT)], dim=1)


def grown_head(parent: TaskHead, num_outputs: int, dropout: float) -> TaskHead:
    """A head of ``num_outputs`` whose first rows are ``parent``'s; the rest start as a fresh head's
    (draws from the current random state)."""
    head = TaskHead(parent.linear.in_features, num_outputs, dropout).to(parent.linear.weight.device)
    old = parent.linear.out_features
    with torch.no_grad():
        head.linear.weight[:old] = parent.linear.weight
        head.linear.bias[:old] = parent.linear.bias
    return head


def train_candidate(backbone: Backbone, bank: AdapterBank, parent: Trainee, key: str, spec: TaskSpec,
                    adapter: AdapterConfig, data: UpdateData, config: UpdateConfig, training: TrainConfig,
                    promote: bool | None) -> tuple[Trainee, TrainResult, Gate, bool, str]:
    """Train adapter ``key`` of ``bank`` (and a head) from ``parent``'s weights on ``data``, keeping the state
    that scores best on ``data.select``, and judge it against ``parent`` on ``data.judge``. Returns the
    candidate, its training result (its ``validation_logits`` on ``data.held``), the gate, promoted?, and why."""
    device = backbone.device
    parent_scores = _parent_scores(backbone, parent, spec, data)
    bank.load(key, adapter, bank.state_dict(parent.key))
    head = grown_head(parent.modules[0], spec.num_outputs, training.head_dropout)  # the parent's head, grown
    candidate = Trainee.adapter(backbone, bank, key, head)
    extra = penalty(config, candidate, parent, spec, data, training, backbone)
    result = fit(candidate, backbone, adapter, spec, data.train, data.select, training, extra_loss=extra)
    logits = candidate.logits(data.judge, pad_id=backbone.pad_id, device=device)  # rows that chose nothing
    gate = _gate(spec, parent_scores, logits, data, config.tolerance)
    return candidate, _on_held(result, logits), gate, *_decide(gate, promote)


def analytic_candidate(backbone: Backbone, bank: AdapterBank, parent: Trainee, key: str, spec: TaskSpec,
                       adapter: AdapterConfig, data: UpdateData, statistics: dict[str, torch.Tensor],
                       config: UpdateConfig, training: TrainConfig, promote: bool | None
                       ) -> tuple[Trainee, TrainResult, Gate, bool, str]:
    """The update of a version whose head is analytic (:class:`~cmtl.continual.analytic.AnalyticHead`):
    adapter ``key`` is ``parent``'s, copied unchanged (the features the statistics hold stay valid); the
    head is the parent's ``statistics`` plus ``data.train``'s rows (one class more per label the update
    adds), solved with λ and scale chosen on ``data.select``. Nothing is trained, so nothing old is
    forgotten but what competition from new classes costs. The gate promotes it unless the new data's
    score falls or the old data's drops by more than the tolerance (a tie on the new data is promoted:
    the statistics are exact, and a rejected version's rows are not in the next one's)."""
    parent_scores = _parent_scores(backbone, parent, spec, data)
    bank.load(key, adapter, bank.state_dict(parent.key))
    old = parent.modules[0]
    head = AnalyticHead.restore(old.hidden, old.config, old.state_dict(), statistics)
    head.grow(spec.num_outputs - head.num_classes)
    bank.activate(key)
    result = fit_head(head, backbone, spec, data.train, data.select, batch_size=training.eval_batch_size)
    candidate = Trainee.adapter(backbone, bank, key, head)
    logits = candidate.logits(data.judge, pad_id=backbone.pad_id, device=backbone.device)
    gate = _gate(spec, parent_scores, logits, data, config.tolerance, require_gain=False)
    return candidate, _on_held(result, logits), gate, *_decide(gate, promote)


def _on_held(result: TrainResult, judged: torch.Tensor) -> TrainResult:
    """``result`` with its ``validation_logits`` (on ``select``) followed by ``judged`` (on ``judge``): the
    kept state's logits on every held-out row, ``None`` if training kept none."""
    kept = result.validation_logits
    return dataclasses.replace(result, validation_logits=None if kept is None else torch.cat([kept, judged.to(kept)]))


def _parent_scores(backbone: Backbone, parent: Trainee, spec: TaskSpec, data: UpdateData
                   ) -> tuple[float, float | None, int]:
    """The parent's gate scores on ``data.judge`` (new validation, old held-out), and how many labels it
    answers: the labels its lineage's rows were annotated for. A parent with fewer labels (the update adds
    some) never predicts the new ones."""
    logits = parent.logits(data.judge, pad_id=backbone.pad_id, device=backbone.device)
    width = logits.shape[1]
    return *gate_scores(spec, widen(logits, spec.num_outputs), data.judge, data.n_new, old_labels=width), width


def _gate(spec: TaskSpec, parent_scores: tuple[float, float | None, int], logits: torch.Tensor, data: UpdateData,
          tolerance: float, *, require_gain: bool = True) -> Gate:
    """The gate between the parent's scores (:func:`_parent_scores`) and the candidate's ``logits`` on
    ``data.judge``."""
    metric, higher = primary_metric(spec)
    candidate_new, candidate_old = gate_scores(spec, logits, data.judge, data.n_new, old_labels=parent_scores[2])
    return Gate(metric, higher, parent_scores[0], candidate_new, parent_scores[1], candidate_old, tolerance,
                require_gain=require_gain)


def _decide(gate: Gate, promote: bool | None) -> tuple[bool, str]:
    """The gate's decision, unless the caller overrides it (``promote`` True or False)."""
    promoted, reason = gate.decide()
    if promote is not None:
        reason = f"{'promoted' if promote else 'not promoted'} by the caller; the gate said: {reason}"
        promoted = promote
    return promoted, reason


def penalty(config: UpdateConfig, candidate: Trainee, parent: Trainee, spec: TaskSpec, data: UpdateData,
            training: TrainConfig, backbone: Backbone):
    """The ``extra_loss`` of an update: EWC around the parent's weights (Fisher on the replayed and
    held-out old rows, through the parent's outputs: a row added for a new label is not held), or LwF
    towards the parent's outputs on the training rows; ``None`` for neither."""
    if config.penalty == "ewc":
        parts = [e for e in data.old if e is not None]
        if not parts:
            raise DataError(f"EWC needs old data of task {spec.name!r} to weigh the parameters, but its current "
                            "version has no replay buffer or held-out sample. Use penalty='lwf' or 'none'.")
        candidate.activate()
        candidate.set_training(False)  # the Fisher at the parent's weights, without dropout draws
        params = candidate.parameters()
        old = parent.modules[0].linear.out_features  # the parent's outputs: rows added for new labels had no weights
        anchor = fisher_diagonal(candidate.forward, params, spec, Encoded.concat(parts),
                                 max_examples=config.fisher_examples, pad_id=backbone.pad_id, device=backbone.device,
                                 seed=training.seed, outputs=old)
        return ewc_term(params, [anchor], config.weight)
    if config.penalty == "lwf":
        # The parent is frozen and runs without dropout, so its outputs on the training rows are fixed:
        # one length-sorted pass here, instead of a second forward on every step of every epoch.
        old_logits = parent.logits(data.train, pad_id=backbone.pad_id, device=backbone.device,
                                   batch_size=training.eval_batch_size)
        candidate.activate()
        weight, t = config.weight, config.temperature

        old = old_logits.shape[1]  # the parent's labels: added ones have no old outputs to keep

        def lwf(inputs, logits, rows):
            return weight * distillation_loss(logits[:, :old], old_logits[rows].to(logits.device), t)

        return lwf
    return None


def gate_scores(spec: TaskSpec, logits: torch.Tensor, encoded: Encoded, n_new: int, *,
                old_labels: int | None = None) -> tuple[float, float | None]:
    """The primary metric on the first ``n_new`` rows (new validation) and on the rest (old held-out, if any).

    ``old_labels``: how many of ``spec``'s labels the old rows were annotated for (the parent's). A multi-label
    task's old rows are scored on those alone: they hold no answer for a label added since (its column is 0,
    whatever the text), and whether the old labels are still found is what forgetting means. A single-label
    row holds its one label, which a new class predicted there displaces: it is scored on every label."""
    metric, _ = primary_metric(spec)
    width = old_labels if spec.problem_type == "multi_label" else None

    def score(rows: slice, columns: int | None = None) -> float:
        scored, targets = logits[rows], encoded.targets[rows]
        if columns is not None:
            scored, targets = scored[:, :columns], targets[:, :columns]
        return float(compute_metrics(spec, scored, targets)[metric])

    return score(slice(0, n_new)), (score(slice(n_new, None), width) if len(encoded) > n_new else None)


def split(examples: Examples, fraction: float, seed: int, task: str) -> tuple[Examples, Examples]:
    """(train, held out): ``fraction`` of ``examples`` held out (at least 2 rows: see :func:`halves`), seeded;
    order kept within each part. Copies of one input (text and second text) stay on one side
    (:func:`take_whole`), so validation never scores what training saw; without copies this is the plain
    seeded split."""
    n_val = max(2, round(len(examples) * fraction))
    if len(examples) - n_val < 1:
        raise DataError(f"Task {task!r}: {len(examples)} new example(s) are too few to hold 2 out for "
                        "validation (half choose the kept state, half judge it); pass validation=... or more data.")
    keys = examples.inputs()
    held = take_whole(keys, n_val, seed)
    if len(held) < 2:  # e.g. 'a', 'a', 'b' with 'b' drawn first: 'a' alone fits the share
        distinct, counts = list(dict.fromkeys(keys)), Counter(keys)
        alone = next((distinct[g] for g in seeded_order(len(distinct), seed) if 2 <= counts[distinct[g]] <= n_val),
                     None)
        held = [i for i, key in enumerate(keys) if alone is not None and key == alone]
    if len(held) < 2:
        size = "2 rows" if n_val == 2 else f"2 to {n_val} rows"
        raise DataError(f"Task {task!r}: the {len(examples)} example(s) hold only {len(set(keys))} distinct "
                        f"input(s), and no share of {size} (validation needs 2; {fraction:.0%} asked for) holds "
                        "every copy of its inputs, so none can be held out without its copies staying in "
                        "training; pass validation=... or more varied data.")
    out = set(held)
    return examples.select([i for i in range(len(examples)) if i not in out]), examples.select(held)


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """``min(n, k)`` of ``range(n)``, seeded, in order."""
    order = seeded_order(n, seed)
    return sorted(order[: min(n, k)])
