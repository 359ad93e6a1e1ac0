"""The registry: one frozen backbone, one LoRA adapter and head per task version.

>>> reg = Registry.create("runs/reg")                      # doctest: +SKIP
>>> reg.add_task(TaskSpec("spam", labels=["ham", "spam"]), train=train, validation=val)
>>> reg.predict("spam", ["WIN a free phone now!!!"])
['spam']

Every task keeps a lineage of versions; one is *current* and answers ``predict``. All state lives
on disk (see :mod:`cmtl.registry.store`); a registry object is a cache of it that loads adapters
lazily (:mod:`cmtl.registry.runtime`). Each verb checks its input, reads what it needs
(:mod:`cmtl.registry.reader`), calls its phase's function (training, :mod:`cmtl.continual.updates`,
:mod:`cmtl.merging.pipeline`, :mod:`cmtl.multitask.group`) and commits (:mod:`cmtl.registry.commit`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from cmtl._config import set_fields
from cmtl._io import tensors_to_bytes
from cmtl.continual import analytic, updates
from cmtl.continual.config import AnalyticConfig
from cmtl.continual.updates import MemoryConfig, UpdateConfig
from cmtl.core.adapters import AdapterConfig, existing_layers
from cmtl.core.backbone import Backbone, BackboneConfig, load_backbone
from cmtl.core.heads import TaskHead
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, Examples, read_examples, spec_for_data
from cmtl.data.examples import warn_shared
from cmtl.errors import (STORED_FILE_FIX, CorruptFileError, InvalidParameterError, RegistryError,
                         TaskExistsError, TrainingDivergedError, bad_param)
from cmtl.merging import pipeline
from cmtl.merging.methods import MergeConfig
from cmtl.multitask.config import MultiTaskConfig
from cmtl.multitask.group import train_group
from cmtl.registry import commit, entries, features, heads, lineage, store
from cmtl.registry.inference import LoadedRegistry, check_free
from cmtl.registry.reader import (UpdateResult, VersionInfo, head_key, merge_key, source_label, version_source,
                                  version_spec)
from cmtl.training import distributed
from cmtl.training.evaluation import primary_metric
from cmtl.training.transfer import check_scale, parse_init
from cmtl.training.loop import TrainConfig, TrainResult, seeded
from cmtl.training.probe import pooled_features
from cmtl.training.trainee import fit

__all__ = ["Registry", "UpdateResult", "VersionInfo"]

logger = logging.getLogger(__name__)


class Registry(LoadedRegistry):
    """A persistent store of task adapters on one frozen backbone.

    Build one with :meth:`create` or :meth:`open`, not the constructor. The verbs that read the
    manifest (``tasks``, ``spec``, ``versions``, ``current``, ``merges``, ``merge_info``, ``buffer``,
    ``holdout``) are :class:`~cmtl.registry.reader.RegistryReader`'s; those that answer through loaded
    adapters (``predict``, ``predict_proba``, ``evaluate``, ``embed``, ``monitor``, ``adapter_state``,
    ``head_state``) are :class:`~cmtl.registry.inference.LoadedRegistry`'s.
    """

    @classmethod
    def create(cls, path: str | Path, backbone: Backbone | BackboneConfig | str | None = None, *,
               device: str = "auto") -> "Registry":
        """Create an empty registry folder on a backbone (default: the embedded all-MiniLM-L6-v2).

        ``backbone`` may be an already loaded :class:`~cmtl.core.backbone.Backbone`, which the
        registry then owns (it injects adapters into it): one that another live registry object owns
        is refused.

        Raises:
            RegistryError: ``path`` already holds a registry or other files.
            InvalidParameterError: ``backbone`` is loaded and serves another registry object.
        """
        root = Path(path)
        if not distributed.is_main():  # under torchrun, rank 0 creates it; the other ranks open what it wrote
            distributed.barrier()
            return cls.open(root, backbone if isinstance(backbone, (BackboneConfig, str)) else None, device=device)
        try:
            if (root / store.MANIFEST).exists():
                raise RegistryError(f"{str(root)!r} already holds a registry. Open it with "
                                    f"Registry.open({str(root)!r}).")
            if root.exists() and any(root.iterdir()):
                raise RegistryError(f"{str(root)!r} exists and is not empty; choose a new folder for the registry.")
            if isinstance(backbone, Backbone):
                check_free(backbone, root)  # before anything is written
            loaded = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, device=device)
            manifest = commit.create(root, {**loaded.config.to_dict(), "sha256": loaded.sha256,
                                              "tokenizer_sha256": loaded.tokenizer_sha256,
                                              "model_config": loaded.model_config})
            logger.info("Created registry %s on backbone %s", root, loaded.config.name_or_path)
            return cls(root, manifest, loaded)
        finally:
            distributed.barrier()

    # --- training -----------------------------------------------------------------

    def add_task(self, spec: TaskSpec, train: Any, validation: Any = None, *, adapter: AdapterConfig | None = None,
                 training: TrainConfig | None = None, memory: MemoryConfig | None = None,
                 fill_buffer: bool = True, init: str | None = None, init_scale: float = 1.0,
                 head: AnalyticConfig | None = None) -> VersionInfo:
        """Add a task as version 1: train its adapter and head on the frozen backbone (or compute an
        analytic head, see ``head``).

        Args:
            spec: The task's name, labels and columns.
            train: Training data (Dataset, DataFrame, file path or list of dicts).
            validation: Held-out data for early stopping and metrics; a sample of it is kept (see
                ``memory``) to check later updates for forgetting and as the drift monitor's reference.
                Without it, ``training.validation_fraction`` of ``train`` is held out (seeded) instead.
            adapter: LoRA settings (defaults: r=8, alpha=16 on the family's default modules).
            training: Optimiser and loop settings.
            memory: Replay buffer kind and budget and held-out sample size, for this task's later updates.
            fill_buffer: Put training examples into the task's replay buffer.
            init: Where the adapter starts (forward transfer): ``None``, from zero (the frozen backbone);
                a task name (``"spam"``, ``"task:spam"``, ``"task:spam@2"`` for version 2) or ``"merge:NAME"``,
                from a copy of that adapter (its rank, modules and layers, which ``adapter`` may then
                only repeat); ``"auto"``: a fresh adapter trains first, exactly as with ``None``. Where it
                cannot beat its step-0 linear probe on validation (too little data for a fresh adapter) and
                that probe is not already perfect there, the current task adapters and merges are ranked
                by a linear probe on the new task's rows, the best two are tried for a few dozen steps of
                ``training`` beside a fresh adapter, a source whose trial beats the fresh one's held-out
                loss beyond noise is trained from (as naming it would), and that run is kept only if it
                scores higher on validation, judged by the head the version answers with
                (:mod:`cmtl.training.transfer`; needs ``training.probe_init``). Running out of GPU memory
                (``torch.OutOfMemoryError``) in that search keeps the fresh adapter, with a
                ``RuntimeWarning``. The source and the measurements are recorded as ``init`` in the
                version's record.
            init_scale: The share of the source's change to the backbone (LoRA's ``B·A``) the start keeps,
                in (0, 1]: every ``B`` matrix is scaled by it; 1, an exact copy. With ``"auto"`` the trial
                tries the scaled starts. A full copy learns a related task fastest but may end below a
                fresh start; 0.5 recovered that on pairs tried by hand, but under ``"auto"`` it ended lower
                on average (docs/results.md, forward transfer). Recorded as ``init["scale"]``.
            head: ``None`` trains a linear head with the adapter. An
                :class:`~cmtl.continual.config.AnalyticConfig` computes the head in closed form from class
                statistics of the features instead (:mod:`cmtl.continual.analytic`): of the frozen
                backbone (``features="backbone"``: no training, the adapter stays zero) or of the adapter
                trained here first and then frozen (``features="adapter"``). Its λ and softmax scale are
                chosen on the validation rows; the statistics are stored (``statistics.safetensors``),
                so each ``update_task`` adds the new rows to them exactly and the head forgets nothing.
                Single-label tasks only.

        Raises:
            TaskExistsError: the name is taken.
            TaskNotFoundError: ``init`` names a task, version or merge that does not exist.
            InvalidParameterError: ``init`` is malformed, or its adapter does not match ``adapter``, or is
                ``"auto"`` with ``training.probe_init=False``;
                ``init_scale`` is outside (0, 1], or not 1 without ``init``;
                ``head`` is not an AnalyticConfig, is given for a regression or multi-label task, or
                reads the backbone's features while ``init`` names an adapter to start from.
            DataError: the data does not fit ``spec``; with an analytic ``head``, a label has no training rows.
            TrainingDivergedError: the loss went non-finite, or the features a probe or an analytic head is fitted
                on did (an ``init`` source or a backbone that overflows); nothing was written.
        """
        if not isinstance(spec, TaskSpec):
            raise InvalidParameterError(bad_param("spec", "add_task", "be a TaskSpec, e.g. TaskSpec(\"spam\", "
                                                  "labels=[\"ham\", \"spam\"])", spec))
        self._check_new_task(spec.name)
        spec = spec_for_data(spec, train)  # labels from a ClassLabel column when the spec names none
        start = parse_init(init)
        check_scale(init_scale, init)
        if head is not None:
            if not isinstance(head, AnalyticConfig):
                raise InvalidParameterError(bad_param("head", "add_task", "be None (a trained linear head) or an "
                                                      "AnalyticConfig", head))
            analytic.check_task(spec)
            if head.features == "backbone" and start is not None:
                raise InvalidParameterError(bad_param(
                    "init", "add_task", "be None when the analytic head reads the frozen backbone", init,
                    "Pass head=AnalyticConfig(features='adapter') to train an adapter from that source first."))
        requested = adapter
        adapter, training, memory = adapter or AdapterConfig(), training or TrainConfig(), memory or MemoryConfig()
        train_ex = read_examples(train, spec)
        val_ex = read_examples(validation, spec) if validation is not None else None
        if val_ex is not None:
            warn_shared(train_ex, val_ex, "validation rows", spec.name, "early stopping's choice and the "
                        "version's validation scores are")
        if val_ex is None and training.validation_fraction > 0 and len(train_ex) > 1:
            train_ex, val_ex = updates.split(train_ex, training.validation_fraction, training.seed, spec.name)
        unread = training.unread_without_validation() if val_ex is None else []
        if unread:
            raise InvalidParameterError(bad_param(
                unread[0], "TrainConfig", "keep its default when the task has no validation rows",
                getattr(training, unread[0]),
                f"{' and '.join(unread)} are read only on validation rows, and task {spec.name!r} has none "
                f"(no validation data, validation_fraction={training.validation_fraction}, {len(train_ex)} "
                "training rows): they would be ignored. Pass validation data, set validation_fraction > 0, or "
                "leave them out."))
        train_enc = self._encode(train_ex, spec)
        val_enc = self._encode(val_ex, spec) if val_ex is not None else None
        if head is not None:
            analytic.check_classes(spec, train_enc)
        key, rt = head_key(spec.name, 1), self._runtime
        source, lineage = None, None
        auto = start is not None and start[0] == "auto"
        if auto and not training.probe_init:
            raise InvalidParameterError(bad_param(
                "init", "add_task", "be None or a named source when training.probe_init is False: 'auto' "
                "tries earlier adapters only where a fresh one cannot beat the step-0 linear probe", init,
                "Keep TrainConfig(probe_init=True) (the default), or name the source, e.g. init='spam'."))
        if start is not None and not auto:  # before seeding: loading a source may draw random numbers
            with self._lock, seeded(training.seed, self.backbone.device):
                source, adapter, lineage = rt.start_from(self, start, requested, adapter, spec, train_enc,
                                                         val_enc, training, init_scale)
        # peft draws A, cmtl the head and dropout its masks from the global RNG: seed it, for this call only.
        with self._lock, seeded(training.seed, self.backbone.device):
            rt.unload([key])  # one loaded under this name came from a removed task's files
            if source is None:
                resolved = rt.bank.add(key, adapter)
            else:
                rt.bank.load(key, adapter, source)
                resolved = adapter
            linear = rt.new_head(spec, training.head_dropout)

            def answering(trained_head: TaskHead, trained: TrainResult | None) -> tuple[Any, TrainResult | None]:
                """The head the version answers with, and its result: the trained linear head, or an analytic
                head computed from the features of the adapter now under ``key`` (then frozen)."""
                if head is None:
                    return trained_head, trained
                rt.bank.activate(key)
                return analytic.computed_head(head, self.backbone, spec, train_enc, val_enc, trained=trained,
                                              batch_size=training.eval_batch_size)

            try:
                result = None
                if head is None or head.features == "adapter":
                    result = fit(rt.trainee(key, linear), self.backbone, resolved, spec, train_enc, val_enc, training,
                                 new_head=True)
                final, result = answering(linear, result)
                if auto:
                    source, resolved, final, result, lineage = self._rescue(
                        key, start, requested, resolved, final, result, spec, train_enc, val_enc, training,
                        init_scale, answering)
                record = entries.version_record(1, None, "train", train_ex, resolved, training, result)
                record["init"] = lineage
                files = updates.memory_files(spec.name, 1, memory, train_ex if fill_buffer else None, val_ex, None)
                if head is not None:
                    record["head"] = final.record()
                    files[heads.STATISTICS] = tensors_to_bytes(final.stats.state_dict())
                elif memory.features:  # merges use them; a version with an analytic head cannot be merged
                    # A fresh adapter changes nothing: the probe's features are the frozen backbone's.
                    frozen = features.RowTable()
                    if source is None:
                        frozen.add(train_enc, result.start_features.get("train"))
                        frozen.add(val_enc, result.start_features.get("validation"))
                    files |= features.kept(spec, files, lambda ex: self._encode(ex, spec), frozen=frozen,
                                           logits=features.RowTable().add(val_enc, result.validation_logits),
                                           older=None)
                # The source task version, as this object loaded it: checked again at commit.
                source_task = (lineage["task"], lineage["version"]) if lineage and "task" in lineage else None
                started = {} if source_task is None else {
                    source_task: version_source(self._entry(source_task[0]), self._version_record(*source_task))}
                if lineage and "merge" in lineage:  # a merged entry, as this object loaded it
                    started[("merge", lineage["merge"], None)] = self._source(("merge", lineage["merge"], None))
                self._commit(spec, record, key, final, new_task=True, extra_files=files, memory=memory,
                             started_from=started)
            except BaseException:
                rt.bank.remove(key)
                raise
        return self.current(spec.name)

    def _rescue(self, key: str, start: tuple[str, str | None, int | None], requested: AdapterConfig | None,
                adapter: AdapterConfig, head: Any, result: TrainResult | None, spec: TaskSpec, train: Encoded,
                validation: Encoded | None, training: TrainConfig, scale: float,
                answering: Callable[[TaskHead, TrainResult | None], tuple[Any, TrainResult | None]]
                ) -> tuple[dict[str, torch.Tensor] | None, AdapterConfig, Any, TrainResult | None, dict[str, Any]]:
        """``init="auto"`` after the fresh adapter under ``key`` has trained: where it kept its step-0 linear
        probe (it could not beat the frozen backbone on validation), the earlier adapters are probed and
        tried (:meth:`Runtime.start_from`), the chosen source trains under the same seed (as
        ``init=<source>`` would) and is kept only if it scores higher on validation. ``head`` and ``result``
        are the fresh run's, as ``answering`` turned them into the head the version answers with (an
        analytic head, if asked for); the source's run is turned and judged the same way. Running out of
        GPU memory while searching or in the source's run keeps the fresh adapter, with a warning and the error
        in the record: the search only looks for something better than what is already trained. Returns
        (source state or ``None``, adapter config, head, training result, lineage record) of the adapter kept."""
        rt = self._runtime
        lineage: dict[str, Any] = {"chosen": "auto"}
        if result is None or validation is None or result.candidate_metrics is None:
            return None, adapter, head, result, {**lineage, "note": "no validation rows to judge a fresh adapter by"}
        if result.best_step != 0:
            return None, adapter, head, result, {**lineage, "fresh": "beat the probe"}
        metric, higher = primary_metric(spec)
        if result.best_metrics[metric] == (1.0 if higher else 0.0):  # accuracy or F1 1, MSE 0: none can beat it
            return None, adapter, head, result, {**lineage, "fresh": "kept a perfect probe"}
        try:
            source, config, found = rt.start_from(self, start, requested, adapter, spec, train, validation, training,
                                                  scale)
        except torch.OutOfMemoryError as error:  # the search's own adapters are gone; the fresh one is intact
            failed = _short_of_memory(error)
        else:
            failed = None
        if failed:  # past the except block: the failed run's tensors are no longer held by its traceback
            _release_cached_memory()
            return None, adapter, head, result, {**lineage, "fresh": "kept the probe", "error": failed}
        lineage = {**found, "fresh": "kept the probe"}
        if source is None:
            return None, adapter, head, result, lineage
        sign = 1.0 if higher else -1.0
        fresh_state = rt.bank.state_dict(key)
        rt.bank.remove(key)
        try:
            with seeded(training.seed, self.backbone.device):  # as init=<source> would train it
                rt.bank.load(key, config, source)
                other = rt.new_head(spec, training.head_dropout)
                tried = fit(rt.trainee(key, other), self.backbone, config, spec, train, validation, training,
                            new_head=True)
            other, tried = answering(other, tried)
            why = None
        except TrainingDivergedError as error:
            tried, why = None, f"{type(error).__name__}: {error}"
        except torch.OutOfMemoryError as error:
            tried, why = None, _short_of_memory(error)
        scores = {"fresh": result.best_metrics[metric], "source": None if tried is None else tried.best_metrics[metric]}
        lineage["validation"] = {"metric": metric, **scores}
        if tried is not None and sign * scores["source"] > sign * scores["fresh"]:
            return source, config, other, tried, lineage
        rt.bank.remove(key)  # the source's run, if it got that far
        if why is not None:
            _release_cached_memory()
        rt.bank.load(key, adapter, fresh_state)
        drop = ("task", "version", "merge", "scale")  # the record names the start the adapter kept: fresh
        lineage = {k: v for k, v in lineage.items() if k not in drop}
        lineage["rejected"] = {"source": source_label(found), **({"error": why} if why else {})}
        return None, adapter, head, result, lineage

    def update_task(self, task: str, train: Any, validation: Any = None, *, config: UpdateConfig | None = None,
                    training: TrainConfig | None = None, promote: bool | None = None,
                    fill_buffer: bool = True, labels: Sequence[str] | None = None) -> UpdateResult:
        """Train a new version of ``task`` on new data, starting from the current version.

        The candidate warm-starts from the current adapter and head and trains on the new data mixed with
        examples replayed from the current version's buffer (``config.replay_ratio``), optionally with an
        EWC or LwF penalty against the current version. The new validation rows and the held-out samples
        of every earlier version in its lineage are each split in two halves (seeded): training keeps the
        state that scores best on one, and the gate scores that state and the current version on the other,
        so the candidate is not judged on the rows that chose it. It becomes current only if the new score
        improves and the old one drops by at most ``config.tolerance`` (see
        :class:`~cmtl.continual.updates.Gate`). It is stored either way, so :meth:`rollback` can still select it.

        Args:
            task: An existing task.
            train: New labelled data, in the task's columns and label set.
            validation: New held-out data, at least 2 rows; without it ``config.validation_fraction`` of
                ``train`` (at least 2 rows) is held out (seeded).
            config: Replay, penalty and promotion settings.
            training: Loop settings; default: those the current version was trained with.
            promote: ``True`` or ``False`` overrides the gate; ``None`` lets it decide.
            fill_buffer: Add the new training examples to the new version's replay buffer.
            labels: Grow the label set: the current labels, then the new ones in the order given (the
                current ones keep their positions whatever order they are given in; a task that reads integer
                labels as positions takes them in their order only). The head gains one
                row per new label; the old rows start from the parent's. Old classes are kept by the
                replay buffer (class-balanced by default) and, with ``config.penalty="lwf"``, by
                distillation on the old labels' outputs; the gate scores the new version on the new
                validation data (all labels) and on the lineage's held-out rows (a multi-label task's on the old
                labels alone: those rows hold no answer for the new ones, and replayed rows do not train them as
                absent). Rollback brings back
                the old label set; each version answers with its own (``versions(task)[i].labels``).

        A task whose head is analytic (``add_task(..., head=AnalyticConfig())``) trains nothing here: the
        new version keeps the current adapter and adds the new training rows (not the validation rows,
        which choose λ and the scale and judge it) to the current version's class statistics, one class
        more per added label; nothing is replayed (``config.replay_ratio`` does not apply) and no penalty
        is allowed. Its gate promotes it unless the new score falls or the old one drops by more than
        ``config.tolerance`` (a tie is promoted). A version that is not promoted keeps its rows in its
        own statistics only: the next update starts from the current version.

        Raises:
            TaskNotFoundError: no such task.
            DataError: empty data, labels outside the task's label set, or an added label without
                training rows.
            InvalidParameterError: ``labels`` leaves out a current label (labels cannot be removed),
                repeats one, adds one that differs from another only in spaces, case or Unicode form, or
                reorders the current ones of a task with ``label_encoding="index"``, or the task is a
                regression; a penalty for a task whose head is analytic.
            CorruptFileError, ReplayBufferError: the current version's files are damaged.
            TrainingDivergedError: the loss went non-finite, or the features an analytic head adds did; nothing
                was written.
        """
        config = config or UpdateConfig()
        entry = self._entry(task)
        parent = entry["current"]
        parent_record = self._version_record(task, parent)
        parent_spec = self.spec(task, version=parent)
        spec = updates.grown_spec(parent_spec, labels)
        started_from = {(task, parent): version_source(entry, parent_record)}  # checked again at commit
        training = training or TrainConfig.from_dict(parent_record["training"])
        memory = MemoryConfig.from_dict(entry.get("memory", {}))
        if promote is not None and not isinstance(promote, bool):
            raise InvalidParameterError(bad_param("promote", "update_task", "be True, False or None", promote))
        if config.penalty == "lwf" and spec.problem_type != "single_label":
            raise ValueError(f"LwF distils class probabilities; task {task!r} is {spec.problem_type}. "
                             "Use penalty='ewc' or 'none'.")
        computed = heads.analytic_config(parent_record) is not None
        if computed and config.penalty != "none":
            raise InvalidParameterError(bad_param(
                "penalty", "UpdateConfig", "be 'none' for a task whose head is analytic", config.penalty,
                f"Task {task!r} v{parent} computes its head from class statistics: an update adds the new rows to "
                "them exactly and trains nothing that a penalty could hold back."))
        buffer = self.buffer(task, parent)
        held, held_labels = self._held_rows(task, parent)
        # An analytic head's statistics already hold every old row: replaying some would count them twice.
        data = updates.update_data(spec, train, validation, config=config, training=training,
                                   buffer=None if computed else buffer, held=held,
                                   encode=lambda ex: self._encode(ex, spec),
                                   buffer_labels=self._buffer_labels(task, parent, buffer), held_labels=held_labels)
        updates.check_added_labels(parent_spec, spec, data.new)
        statistics = self._statistics(task, parent, parent_spec) if computed else None
        version = max(r["version"] for r in entry["versions"]) + 1
        key, rt, adapter = head_key(task, version), self._runtime, AdapterConfig.from_dict(parent_record["adapter"])
        with self._lock:
            parent_key = rt.task(self, task, parent)  # before seeding: loading may draw random numbers
        with self._lock, seeded(training.seed, self.backbone.device):
            rt.unload([key])  # one loaded under this name came from a removed task's files
            try:
                if statistics is None:
                    candidate, result, gate, promoted, reason = updates.train_candidate(
                        self.backbone, rt.bank, rt.trainee(parent_key), key, spec, adapter, data, config, training,
                        promote)
                else:
                    candidate, result, gate, promoted, reason = updates.analytic_candidate(
                        self.backbone, rt.bank, rt.trainee(parent_key), key, spec, adapter, data, statistics, config,
                        training, promote)
                record = entries.version_record(version, parent, "update", data.new, adapter, training, result)
                record["metrics"].update(gate.to_metrics())
                done = config if statistics is None else dataclasses.replace(config, replay_ratio=0.0)
                record["training"].update(replayed=0 if data.replayed is None else len(data.replayed),
                                          update=done.to_dict())
                record.update(promoted=promoted, note=reason)
                if spec.labels != TaskSpec.from_dict(entry["spec"]).labels:
                    record["labels"] = list(spec.labels)
                files = updates.memory_files(task, version, memory, data.new if fill_buffer else None,
                                             data.validation, buffer)
                head = candidate.modules[0]
                if statistics is not None:
                    record["head"] = head.record()
                    files[heads.STATISTICS] = tensors_to_bytes(head.stats.state_dict())
                elif memory.features:  # the candidate was scored on the new and the lineage's held-out rows
                    files |= features.kept(spec, files, lambda ex: self._encode(ex, spec), frozen=features.RowTable(),
                                           logits=features.RowTable().add(data.held, result.validation_logits),
                                           older=self.holdout(task, parent))
                self._commit(spec, record, key, head, new_task=False, extra_files=files,
                             make_current=promoted, started_from=started_from)
            except BaseException:
                rt.unload([key])
                raise
        record = self._version_record(task, version)  # as stored: the commit does not promote over a rollback
        promoted, reason = record["promoted"], record["note"]
        logger.info("Task %s v%d: %s", task, version, reason)
        return UpdateResult(self._info(task, record, self._entry(task)["current"]), promoted, reason, gate)

    # --- PEFT folders ---------------------------------------------------------------

    def export_peft(self, task: str, path: str | Path, *, version: int | None = None,
                    overwrite: bool = False) -> Path:
        """Write ``task``'s version (current by default) as a standard PEFT adapter folder:
        ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), path)`` (with ``num_hidden_layers=N`` on a
        cut backbone, as the folder's card writes it) computes the same pooled features as this registry; the
        head, the task and the backbone record go beside it, with a model card
        (:mod:`cmtl.integrations.peft_folder`). Returns ``path``.

        ``overwrite`` replaces only an earlier export (:func:`~cmtl.integrations.peft_folder.write_folder`).

        Raises:
            FileExistsError: ``path`` is not empty, and is not an earlier export or ``overwrite`` is not set.
            InvalidParameterError: ``path`` is the registry's folder, lies inside it or holds it; the version's
                head is analytic.
        """
        from cmtl.core.adapters import peft_layout
        from cmtl.core.backbone import resolve_path
        from cmtl.integrations.peft_folder import write_folder

        self._check_export_path(path)
        version = self._version(task, version)
        record = self._version_record(task, version)
        heads.refuse_analytic(record, task, version, "a PEFT folder (whose head is one linear layer)")
        folder = store.version_dir(self.root, task, version)
        state = store.read_tensors(folder / "adapter.safetensors", record["files"]["adapter.safetensors"])
        head = store.read_tensors(folder / "head.safetensors", record["files"]["head.safetensors"])
        backbone = self._manifest["backbone"]
        return write_folder(path, adapter=AdapterConfig.from_dict(record["adapter"]), state=state,
                            base_model=resolve_path(backbone["name_or_path"]), spec=self.spec(task, version=version),
                            head=head, backbone=backbone, overwrite=overwrite,
                            layout=peft_layout(AdapterConfig.from_dict(record["adapter"]), self.backbone.encoder),
                            source={"task": task, "version": version, "metrics": record.get("metrics", {}),
                                    "registry": str(self.root)})

    def import_peft(self, path: str | Path, spec: TaskSpec | None = None, train: Any = None,
                    validation: Any = None, *, name: str | None = None, memory: MemoryConfig | None = None,
                    training: TrainConfig | None = None) -> VersionInfo:
        """Add a task whose adapter is the LoRA adapter of a PEFT folder, as version 1.

        A folder ``export_peft`` wrote brings its task and head (``name`` imports it under another name);
        it must come from a registry on the same backbone weights. Its head answers only for the task it
        was exported with: a ``spec`` that differs from it in what the head answers (labels, problem type,
        threshold, text pairs or not; not the name, columns, label encoding or description) needs labelled
        ``train`` data, and gets a new head. Any other PEFT LoRA folder for this backbone needs ``spec``
        and ``train``: the head is then fitted as a linear probe on the adapter's features (the adapter
        is kept as it is; ``update_task`` trains it further); one trained on the task model around the
        backbone (a decoder's causal LM) adapts the same layers of it. ``train`` and ``validation`` also
        fill the version's replay buffer and held-out sample, and ``validation`` gives its metrics.

        Raises:
            TaskExistsError: the name is taken.
            BackboneMismatchError: the folder records other backbone weights or model config, or (its head to
                answer, no ``train`` data) another pooling than this registry's.
            DataError: not a PEFT LoRA folder, LoRA settings cmtl cannot reproduce, an adapter that does
                not fit this backbone, or no head for ``spec`` and no ``train`` data to fit one.
            TrainingDivergedError: the imported adapter's features, which a head is fitted on, are not finite;
                nothing was written.
        """
        from cmtl.core.adapters import bare_model_state, check_adapter_state, state_layers, state_targets
        from cmtl.core.backbone import config_changes
        from cmtl.errors import BackboneMismatchError, CorruptFileError, DataError
        from cmtl.core.heads import check_head_state
        from cmtl.integrations.peft_folder import HEAD, TASK, read_folder, spec_differences
        from cmtl.training.evaluation import compute_metrics
        from cmtl.training.loop import TrainResult
        from cmtl.training.probe import probe_head

        started = time.perf_counter()
        folder = read_folder(path)
        folder.state = bare_model_state(folder.state, self.backbone.encoder)  # trained on the causal LM around it
        recorded = (folder.backbone or {}).get("sha256")
        if recorded is not None and recorded != self.backbone.sha256:
            raise BackboneMismatchError(
                f"{str(path)!r} was exported from a registry on backbone {folder.backbone.get('name_or_path')!r} "
                f"(weights {recorded[:12]}…); this registry's backbone has weights {self.backbone.sha256[:12]}…. "
                "Import it into a registry on the same backbone.")
        tokenizer = (folder.backbone or {}).get("tokenizer_sha256")
        if tokenizer is not None and tokenizer != self.backbone.tokenizer_sha256:
            raise BackboneMismatchError(
                f"{str(path)!r} was exported from a registry whose backbone has these weights but another tokenizer "
                f"(tokenizer hash {tokenizer[:12]}…, here {self.backbone.tokenizer_sha256[:12]}…): its adapter was "
                "trained on other token ids. Import it into a registry on the same backbone folder.")
        # Only where the weights were recorded (and match): a folder of other weights is told so by its shapes.
        changed = [] if recorded is None else config_changes(folder.backbone.get("model_config") or {},
                                                             self.backbone.model_config)
        if changed:
            raise BackboneMismatchError(
                f"{str(path)!r} was exported from a registry whose backbone has these weights but another model "
                f"config ({'; '.join(changed)}; exported -> here): its adapter was trained on other features. "
                "Import it into a registry on the same backbone folder.")
        if spec is not None and name is not None:
            raise InvalidParameterError(bad_param("name", "import_peft", "be left out when spec is given (the "
                                                  "spec names the task)", name))
        if spec is None and folder.spec is None:
            raise DataError(f"{str(path)!r} holds no cmtl task (no {TASK}): pass spec=TaskSpec(...) and labelled "
                            "train data to fit its head.")
        if spec is None:
            spec = folder.spec if name is None else TaskSpec.from_dict({**folder.spec.to_dict(), "name": name})
        differs = spec_differences(folder.spec, spec) if folder.spec is not None else []
        # The head reads features pooled as the exporting registry's backbone pooled them (another max_length
        # only truncates long texts elsewhere: the same kind of features).
        settings = [f"{k} {folder.backbone[k]!r} -> {self._manifest['backbone'].get(k)!r}"
                    for k in ("pooling",) if folder.backbone and k in folder.backbone
                    and folder.backbone[k] != self._manifest["backbone"].get(k)]
        use_head = folder.head is not None and not differs and not settings
        if not use_head and train is None and (differs or not settings):
            if folder.head is None:
                raise DataError(f"{str(path)!r} has no head for task {spec.name!r}: pass labelled train data to "
                                "fit one on the adapter's features.")
            raise DataError(f"The head in {str(path)!r} answers as the exported task {folder.spec.name!r}, and the "
                            f"spec differs from it in {'; '.join(differs)}. To import that task under another name, "
                            f"pass name={spec.name!r} instead of a spec; to use the adapter for this spec, pass "
                            "labelled train data to fit a new head on its features.")
        if folder.head is not None and (differs or settings):
            logger.info("Import %s: the exported head answers as task %r, not as this spec on this backbone (%s); "
                        "fitting a new head on the adapter's features", path, folder.spec.name,
                        "; ".join(differs + settings))
        self._check_new_task(spec.name)
        if folder.adapter.target_modules is None:  # peft's default for the model, or a pattern: the weights say which
            folder.adapter = dataclasses.replace(folder.adapter, target_modules=state_targets(
                folder.state, self.backbone.encoder))
        if folder.pattern is not None:  # and in which layers (all of them: None)
            folder.adapter = dataclasses.replace(folder.adapter, layers=state_layers(folder.state,
                                                                                     self.backbone.encoder))
        try:
            check_adapter_state(folder.state, folder.adapter, self.backbone.encoder, Path(path))
        except CorruptFileError as exc:
            raise DataError(f"The adapter in {str(path)!r} does not fit this registry's backbone "
                            f"{self.backbone.config.name_or_path!r} (its base model: {folder.base_model!r}): "
                            f"{exc}") from None
        if use_head:
            try:
                check_head_state(folder.head, TaskHead(self.backbone.hidden_size, spec.num_outputs), spec,
                                 Path(path) / HEAD)
            except CorruptFileError as exc:
                raise DataError(f"{str(exc).removesuffix(' ' + STORED_FILE_FIX)} Put back the exported {TASK}, or "
                                "pass a spec and labelled train data to fit a new head on the adapter's "
                                "features.") from None
        if settings and train is None:
            raise BackboneMismatchError(
                f"The head in {str(path)!r} reads features made with other backbone settings than this registry's "
                f"({', '.join(settings)}; exported -> here), so it would answer wrongly. Import it into a registry "
                "created with the exported settings, or pass a spec and labelled train data to fit a new head on "
                "the adapter's features here.")
        training, memory = training or TrainConfig(), memory or MemoryConfig()
        train_ex = None if train is None else read_examples(train, spec)
        val_ex = None if validation is None else read_examples(validation, spec)
        if not use_head and val_ex is not None:  # the head is fitted on train_ex, then scored on val_ex
            warn_shared(train_ex, val_ex, "validation rows", spec.name, "the version's validation scores are")
        key, rt = head_key(spec.name, 1), self._runtime
        with self._lock, seeded(training.seed, self.backbone.device):
            rt.unload([key])
            rt.bank.load(key, folder.adapter, folder.state)
            try:
                head = rt.new_head(spec, training.head_dropout).train(False)  # it answers; nothing trains it
                if use_head:
                    head.load_state_dict(folder.head)
                else:
                    rt.bank.activate(key)
                    probe_head(head, self.backbone, spec, self._encode(train_ex, spec),
                               batch_size=training.eval_batch_size, seed=training.seed)
                metrics = {}
                if val_ex is not None:
                    val_enc = self._encode(val_ex, spec)
                    logits = rt.trainee(key, head).logits(val_enc, pad_id=self.backbone.pad_id,
                                                          device=self.backbone.device)
                    metrics = compute_metrics(spec, logits, val_enc.targets)
                result = TrainResult(steps=0, seconds=time.perf_counter() - started, examples_seen=0, best_step=0,
                                     best_metrics=metrics)
                record = entries.version_record(1, None, "import", train_ex or Examples([]), folder.adapter,
                                                training, result)
                record["init"] = {"peft": str(Path(path).resolve()), **(
                    {"task": folder.source.get("task"), "version": folder.source.get("version")}
                    if folder.source else {})}
                files = updates.memory_files(spec.name, 1, memory, train_ex, val_ex, None)
                self._commit(spec, record, key, head, new_task=True, extra_files=files, memory=memory)
            except BaseException:
                rt.bank.remove(key)
                raise
        return self.current(spec.name)

    # --- merged and joint entries -------------------------------------------------

    def merge(self, members: Sequence[str | tuple[str, int]], name: str, method: str | None = None, *,
              config: MergeConfig | None = None, search: bool = False) -> dict[str, Any]:
        """Fold several task adapters into one stored, merged adapter (see :mod:`cmtl.merging`).

        Each member is a task (its current version) or a ``(task, version)`` pair; two versions of one
        task make a soup, whose heads are averaged. The merged entry predicts every member task through
        that task's own head: ``predict(task, texts, merge=name)``.

        Args:
            members: At least two distinct task versions.
            name: Name of the merged entry (letters, digits, ``_``, ``-``).
            method: One of :data:`cmtl.merging.METHODS` or :data:`cmtl.merging.PEFT_METHODS`; overrides
                ``config.method``.
            config: Knobs (scale λ, density, drop, rank, seed, head refitting, how to search).
            search: Choose λ (and density / drop) on one part of the members' held-out samples
                (``config.selection_fraction``), maximising the mean of merged / individual score, with
                no delta at all (λ = 0, the frozen backbone) as a candidate; scores are reported on
                the other part. Every member needs held-out rows.

        Every merge with held-out samples is also scored against the frozen backbone (no adapter; heads
        refitted on the same buffers with ``refit_heads``, else the members' heads): the record's
        ``holdout[task]["baseline"]``, ``baseline_normalised`` and ``below_baseline``; a merge below it
        is logged, or refused with ``MergeConfig(require_gain=True)``.

        Returns:
            The merged entry's record (members, knobs, reconstruction error, scores, search trials).

        Raises:
            ValueError: fewer than two members, a member twice, a taken or bad name, out-of-range knobs, a
                knob the method never reads or (with ``search``) one the search would choose, or adapters on
                different modules.
            TaskNotFoundError: an unknown task or version.
            MergeRefusedError: ``require_gain`` and the merge does not beat the frozen backbone.
            DataError: ``search`` or ``require_gain`` with a member that has no held-out rows.
            TrainingDivergedError: the merged adapter's features, which ``refit_heads`` fits heads on, are not
                finite (members that overflow when added); nothing was written.
        """
        if isinstance(members, str):
            raise InvalidParameterError(bad_param("members", "merge", "be a list of tasks (or (task, version) "
                                                  "pairs), e.g. ['spam', 'topic']", members))
        started = time.perf_counter()
        config = config or MergeConfig()
        if method is not None:
            config = dataclasses.replace(config, method=method)
        if search:
            config.refuse_searched()
        self._check_new_entry(name, "Merge")
        pairs = [(m, self._entry(m)["current"]) if isinstance(m, str) else (m[0], m[1]) for m in members]
        if len(pairs) < 2:
            raise ValueError(f"A merge needs at least two task versions; got {pairs}.")
        records = [self._version_record(t, v) for t, v in pairs]  # refuses a version that is not an int
        pairs = [(t, r["version"]) for (t, _), r in zip(pairs, records)]  # the stored ints
        if len(set(pairs)) < len(pairs):
            raise ValueError(f"Members {pairs} name a task version twice: a version merged with itself is itself.")
        for (t, v), r in zip(pairs, records):
            heads.refuse_analytic(r, t, v, "a merge (it averages trained heads and moves the features)")
        started_from = {(t, v): version_source(self._entry(t), r) for (t, v), r in zip(pairs, records)}
        tasks = list(dict.fromkeys(t for t, _ in pairs))
        # Each task answers with the labels of its newest merged version, and is judged on the held-out
        # data of that version's lineage, against that version.
        newest = {t: max(v for u, v in pairs if u == t) for t in tasks}
        specs, rt = {t: self.spec(t, version=newest[t]) for t in tasks}, self._runtime
        for t, v in pairs:
            if self.spec(t, version=v).labels != specs[t].labels:
                raise ValueError(f"Members {t!r} v{v} and v{newest[t]} have different labels ("
                                 f"{list(self.spec(t, version=v).labels)} and {list(specs[t].labels)}): their "
                                 "heads cannot be averaged. Merge versions with the same labels.")
        states, adapters, head_states = rt.members(self, pairs, specs)
        pipeline.check_mergeable(pairs, adapters, states)
        soup = pipeline.soup_heads(head_states, specs, self.backbone)
        held = {t: self._held_rows(t, newest[t]) for t in tasks}
        encode = {t: (lambda ex, spec=specs[t]: self._encode(ex, spec)) for t in tasks}
        # Encoded once; a multi-label row's cells for labels added after it was kept hold no answer (NaN).
        held = {t: None if ex is None else updates.mask_later_labels(specs[t], encode[t](ex), labels)
                for t, (ex, labels) in held.items()}
        buffers = None
        if config.refit_heads:
            kept = {t: (v, self.buffer(t, v)) for t, v in newest.items()}
            buffers = {t: updates.mask_later_labels(specs[t], rows, self._buffer_labels(t, kept[t][0], kept[t][1]))
                       for t, rows in pipeline.refit_data(kept, specs, self._encode).items()}
        # What training kept (features.safetensors) spares running those rows again; the rest run here.
        frozen: dict[str, dict[str, torch.Tensor]] = {}
        with self._lock:
            keys = {t: rt.task(self, t, newest[t]) for t in tasks}
            individual = {t: features.own_logits(self, t, newest[t], encode[t]).complete(
                held[t], lambda rows, t=t: rt.trainee(keys[t]).logits(rows, pad_id=self.backbone.pad_id,
                                                                      device=self.backbone.device))
                for t in tasks if held[t] is not None}
            with rt.bank.disabled():
                for t in individual:
                    table = features.frozen_rows(self, t, newest[t], encode[t])
                    run = lambda rows: pooled_features(self.backbone, rows)  # noqa: E731
                    frozen[t] = {"held": table.complete(held[t], run)}
                    if buffers is not None:
                        frozen[t]["buffer"] = table.complete(buffers[t], run)
            merged = pipeline.merge_members(
                self.backbone, rt.bank, pairs, states, adapters, lambda: [rt.task(self, t, v) for t, v in pairs],
                soup, specs, held, individual, buffers, config, search, frozen=frozen)
        record = entries.merge_record(name, pairs, specs, adapters[0], merged, time.perf_counter() - started)
        with self._lock:
            self._write_entry(record, merged.lora_state, merged.heads, started_from=started_from)
        logger.info("Merged %s into %s (%s): normalised score %s (frozen backbone %s) in %.1f s", pairs, name,
                    merged.config.method, record["normalised"], record["baseline_normalised"], record["seconds"])
        return record

    def train_group(self, name: str, data: dict[str, tuple[Any, Any]], *, config: MultiTaskConfig | None = None,
                    adapter: AdapterConfig | None = None, task_adapter: AdapterConfig | None = None,
                    training: TrainConfig | None = None) -> dict[str, Any]:
        """Train ONE adapter jointly on several of the registry's tasks, with a fresh head per task, and
        store it as an entry beside the merges: ``predict(task, texts, merge=name)`` and the server answer
        through it.

        Args:
            name: Name of the entry (letters, digits, ``_``, ``-``), shared with merged entries.
            data: ``{task: (train, validation)}`` for at least two existing single-label tasks.
            config: Sampler, loss weighting, MT2ST schedule, TAG measurement, steps.
            adapter: LoRA settings of the shared adapter (default: the first task's current ones).
            task_adapter: Also give each task a small LoRA of its own (``r`` and ``alpha`` from this
                config; the shared adapter's layers) beside the shared one. Each task then answers through
                shared + own factors, stored as one adapter of rank r_shared + r.
            training: Batch size, learning rate, weight decay, warm-up and schedule, clipping, head
                dropout, evaluation batch size, gradient checkpointing, seed. Its budget fields do not apply
                (``config.steps``/``epochs``/``eval_every`` set it; the best evaluated state is kept, with no
                early stopping): set away from their defaults, they are logged as unused and left out of
                the record.

        Returns:
            The entry's record: tasks, knobs, per-task validation history and best scores, the TAG
            affinity matrix when measured (``affinity[i][j]`` = Z of task i onto task j).

        Raises:
            TrainingDivergedError: the loss or the gradient became NaN or infinite; nothing was written.
        """
        config, training = config or MultiTaskConfig(), training or TrainConfig()
        unused = {k: getattr(training, k) for k in set_fields(training, entries.GROUP_UNUSED_TRAINING)}
        if unused:
            logger.warning("Group %s: %s do not apply to joint training (MultiTaskConfig sets its steps and "
                           "evaluations; the best evaluated state is kept).",
                           name, ", ".join(f"TrainConfig.{k}={v!r}" for k, v in unused.items()))
        self._check_new_entry(name, "Group")
        tasks = list(data)
        if len(tasks) < 2:
            raise ValueError(f"A group needs at least two tasks; got {tasks}. Use add_task or update_task for one.")
        specs = [self.spec(t) for t in tasks]  # TaskNotFoundError for unknown tasks
        if adapter is None:  # the first task's, as its current version ran (an earlier cmtl's may list cut layers)
            stored = self._version_record(tasks[0], self._entry(tasks[0])["current"])["adapter"]
            adapter = existing_layers(AdapterConfig.from_dict(stored), self.backbone.encoder)
        train_ex = [read_examples(data[t][0], spec) for t, spec in zip(tasks, specs)]
        val_ex = [None if data[t][1] is None else read_examples(data[t][1], spec) for t, spec in zip(tasks, specs)]
        for examples, held, spec in zip(train_ex, val_ex, specs):
            if held is not None:
                warn_shared(examples, held, "validation rows", spec.name, "the group's kept state and validation "
                            "scores are")
        train_enc = [self._encode(ex, spec) for ex, spec in zip(train_ex, specs)]
        val_enc = [None if ex is None else self._encode(ex, spec) for ex, spec in zip(val_ex, specs)]
        key, rt = merge_key(name), self._runtime
        with self._lock, seeded(training.seed, self.backbone.device):
            self._check_new_entry(name, "Group")  # again: a call under the same name may have written meanwhile
            try:
                group = train_group(self.backbone, rt.bank, key, tasks, specs, train_enc, val_enc, adapter=adapter,
                                    task_adapter=task_adapter, config=config, training=training)
                record = entries.group_record(name, dict(zip(tasks, specs)), config, training, group)
                self._write_entry(record, rt.bank.state_dict(key), dict(zip(tasks, group.heads)), group.own)
            except BaseException:
                rt.bank.remove(key)
                raise
            if group.own is None:
                owner = ("merge", name, None)
                rt.keep(key, None, owner, self)
                for t, h in zip(tasks, group.heads):
                    rt.keep(merge_key(name, t), h.eval(), owner, self)
            else:  # each task answers through shared + own factors, loaded per task on first use
                rt.bank.remove(key)
        return record

    def remove_merge(self, name: str) -> None:
        """Delete a merged entry and its files (its member tasks are untouched)."""
        with store.writer_lock(self.root), self._lock:
            manifest = self._reread(merge=name)
            tasks = self.merge_info(name)["tasks"]
            files = sorted(manifest["merges"].pop(name)["files"])
            store.write_manifest(self.root, manifest)
            self._adopt(manifest)
            store.remove_unreferenced(self.root, manifest)  # the entry's folder (a link there is only unlinked)
            store.remove_entry_files(self.root, name, files)  # its files, where a user's file kept the folder
            self._runtime.unload_merge(name, tasks)

    # --- lineage ------------------------------------------------------------------

    def rollback(self, task: str, version: int) -> VersionInfo:
        """Make an earlier (or later) stored version of ``task`` the current one."""
        with store.writer_lock(self.root), self._lock:
            manifest = self._reread(task=task)
            version = lineage.set_current(self.root, manifest, task, version)
            self._adopt(manifest)
        logger.info("Task %s: current version is now v%d", task, version)
        return self.current(task)

    def remove_task(self, task: str) -> None:
        """Delete a task, all its versions and their files."""
        with store.writer_lock(self.root), self._lock:
            manifest = self._reread(task=task)
            entry = self._entry(task)
            lineage.keep_merge_specs(self.root, manifest, task)
            del manifest["tasks"][task]
            store.write_manifest(self.root, manifest)
            self._runtime.unload_task(task, [v["version"] for v in entry["versions"]])
            self._adopt(manifest)
            store.remove_unreferenced(self.root, manifest)  # the task's folder (a link there is only unlinked)

    # --- internals ----------------------------------------------------------------

    def _held_rows(self, task: str, version: int) -> tuple[Examples | None, list[int]]:
        """:meth:`holdout` of ``version``'s lineage, and per row how many labels it was annotated with: those of
        the version that kept it (a multi-label row holds no answer for labels added since)."""
        parts = self._holdout_parts(task, version)
        held = Examples.concat([ex for _, ex in parts]) if parts else None
        return held, [n for v, ex in parts for n in [len(self.spec(task, version=v).labels)] * len(ex)]

    def _buffer_labels(self, task: str, version: int, buffer: Any) -> list[int] | None:
        """Per row of ``version``'s replay ``buffer`` (in ``items()`` order), how many labels it was annotated
        with: those of the version that kept it (its source, ``vN``); ``version``'s where that names none."""
        if buffer is None:
            return None
        entry = self._entry(task)
        kept_by = {f"v{r['version']}": len(version_spec(entry, r).labels) for r in entry["versions"]}
        own = kept_by[f"v{version}"]
        return [kept_by.get(item.source, own) for item in buffer.items()]

    def _statistics(self, task: str, version: int, spec: TaskSpec) -> dict[str, torch.Tensor]:
        """The class statistics of an analytic version, checked against the manifest's checksum and
        against the head's width and ``spec``'s labels."""
        record = self._version_record(task, version)
        path = store.version_dir(self.root, task, version) / heads.STATISTICS
        if heads.STATISTICS not in record["files"]:
            raise CorruptFileError(f"Task {task!r} v{version} has an analytic head but its record names no "
                                   f"{heads.STATISTICS}: the manifest was edited. {STORED_FILE_FIX}")
        state = store.read_tensors(path, record["files"][heads.STATISTICS])
        heads.check_statistics(state, record, spec, self.backbone.hidden_size, path)
        return state

    def _check_export_path(self, path: str | Path) -> None:
        """Refuse an export ``path`` that is the registry's folder, lies inside it or holds it (links resolved):
        writing or replacing it would damage or delete the registry."""
        target, root = os.path.realpath(path), os.path.realpath(self.root)
        if os.path.commonpath([target, root]) in (target, root):
            raise InvalidParameterError(bad_param(
                "path", "export_peft", f"lie outside the registry {str(self.root)!r} (not be its folder, a folder "
                "inside it or one that holds it)", str(path), "Export to a folder outside the registry, e.g. beside "
                "it."))

    def _check_new_task(self, name: str) -> None:
        if name in self._manifest["tasks"]:
            raise TaskExistsError(f"Task {name!r} already exists (current version {self._entry(name)['current']}). "
                                  "Pick another name, or remove_task it first.")

    def _reread(self, *, task: str | None = None, merge: str | None = None) -> dict[str, Any]:
        """The manifest on disk, made this object's, and a copy of it for the caller to change, write and
        then adopt: a write that fails leaves the object as the disk is (call under the writer lock; see
        commit.check_not_removed)."""
        known = self._manifest
        manifest = commit.read_manifest(self.root, known["backbone"])
        self._adopt(manifest)
        commit.check_not_removed(known, manifest, task=task, merge=merge)
        return copy.deepcopy(manifest)

    def _commit(self, spec: TaskSpec, record: dict[str, Any], key: str, head: torch.nn.Module, *, new_task: bool,
                extra_files: dict[str, bytes] | None = None, memory: MemoryConfig | None = None,
                make_current: bool = True, started_from: dict[tuple[str, int], str] | None = None) -> None:
        """Write a version's files, then the manifest that names it (and, by default, makes it current).
        ``started_from``: the versions an update trained from, which must still be there unchanged."""
        rt = self._runtime
        files = commit.version_files(rt.bank.state_dict(key), head.state_dict(), extra_files)
        record["trainable_parameters"] = rt.num_parameters(key, head)
        if heads.analytic_config(record) is not None and not record["training"]["steps"]:
            # Nothing trained: the adapter is zero or its parent's, the head computed (its weights count).
            record["trainable_parameters"] = head.weight.numel() + head.bias.numel()
        record["bytes_on_disk"] = sum(len(b) for b in files.values())
        self._adopt(commit.on_main(
            lambda: commit.write_version(self.root, self._manifest["backbone"], spec, record, files, new_task=new_task,
                                         memory=None if memory is None else memory.to_dict(),
                                         make_current=make_current, started_from=started_from),
            lambda: commit.read_manifest(self.root, self._manifest["backbone"])))
        rt.keep(key, head, ("task", spec.name, record["version"]), self)

    def _write_entry(self, record: dict[str, Any], adapter_state: dict[str, torch.Tensor],
                     entry_heads: dict[str, TaskHead], task_adapters: dict[str, dict[str, torch.Tensor]] | None = None,
                     *, started_from: dict[tuple[str, int], str] | None = None) -> None:
        """Write a merged or joint entry, then name it in the manifest (``record`` gains what was written).
        ``started_from``: the member versions it was computed from."""
        files = commit.entry_files(adapter_state, {t: h.state_dict() for t, h in entry_heads.items()}, task_adapters)
        self._adopt(commit.on_main(
            lambda: commit.write_entry(self.root, self._manifest["backbone"], record, files, started_from),
            lambda: commit.read_manifest(self.root, self._manifest["backbone"])))
        record.update(self._manifest["merges"][record["name"]])


def _short_of_memory(error: torch.OutOfMemoryError) -> str:
    """``init="auto"`` ran out of GPU memory looking for a better start than its fresh adapter: warn that
    the fresh adapter is kept, and return the error as recorded."""
    why = f"{type(error).__name__}: {error}"
    warnings.warn(f"init='auto' ran out of GPU memory while probing, trying or training from earlier adapters "
                  f"({why}); it keeps the fresh adapter, as init=None would. To let it search, free memory or "
                  "lower TrainConfig.batch_size and eval_batch_size.", RuntimeWarning, stacklevel=4)
    return why


def _release_cached_memory() -> None:
    """Hand the blocks a failed run left in CUDA's caching allocator back to the device."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
