"""The registry: one frozen backbone, one LoRA adapter and head per task version.

>>> reg = Registry.create("runs/reg")                      # doctest: +SKIP
>>> reg.add_task(TaskSpec("spam", labels=["ham", "spam"]), train=train, validation=val)
>>> reg.predict("spam", ["WIN a free phone now!!!"])
['spam']

Every task keeps a lineage of versions; one is *current* and answers
``predict``. All state lives on disk (see :mod:`cmtl.registry.store`); a registry object
is a cache of it that loads adapters lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cmtl._io import tensors_to_bytes
from cmtl._version import __version__
from cmtl.continual.penalties import distillation_loss, ewc_term, fisher_diagonal
from cmtl.continual.replay import ReplayBuffer, make_buffer
from cmtl.continual.updates import Gate, MemoryConfig, UpdateConfig
from cmtl.core.adapters import AdapterBank, AdapterConfig, check_adapter_state
from cmtl.core.backbone import Backbone, BackboneConfig, load_backbone
from cmtl.core.tasks import _NAME, TaskHead, TaskSpec, check_head_state
from cmtl.data import Encoded, Examples, as_texts, encode, read_examples, spec_for_data
from cmtl.errors import (
    STORED_FILE_FIX,
    BackboneMismatchError,
    CorruptFileError,
    DataError,
    RegistryError,
    TaskExistsError,
    TaskNotFoundError,
)
from cmtl.merging.methods import MergeConfig, lora_deltas, merge_deltas, refit_head, to_lora_state
from cmtl.monitoring.drift import DriftMonitor, DriftReport, MonitorConfig
from cmtl.multitask.joint import MultiTaskConfig, TaskLoRA, grouped_forward, train_multitask
from cmtl.registry import store
from cmtl.registry.manifest import backbone_changes, backbone_config
from cmtl.registry.runtime import entry_adapters
from cmtl.training import distributed
from cmtl.training.caching import maybe_cache
from cmtl.training.evaluation import compute_metrics, predict_logits, primary_metric
from cmtl.training.loop import TrainConfig, TrainResult, seeded, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    """One trained version of a task, as recorded in the manifest."""

    task: str
    version: int
    parent: int | None
    created: str
    kind: str
    current: bool
    metrics: dict[str, float] = field(default_factory=dict)
    data_fingerprint: str | None = None
    adapter: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    trainable_parameters: int = 0
    bytes_on_disk: int = 0
    train_seconds: float = 0.0
    cmtl_version: str = ""
    note: str = ""
    promoted: bool = True


def _gate_scores(spec: TaskSpec, logits: torch.Tensor, encoded: Encoded, n_new: int) -> tuple[float, float | None]:
    """The primary metric on the first ``n_new`` rows (new validation) and on the rest (old held-out, if any)."""
    metric, _ = primary_metric(spec)

    def score(rows: slice) -> float:
        return float(compute_metrics(spec, logits[rows], encoded.targets[rows])[metric])

    return score(slice(0, n_new)), (score(slice(n_new, None)) if len(encoded) > n_new else None)


def _head_key(task: str, version: int) -> str:
    # Adapter names live inside module paths: no dots.
    return f"{task}__v{version}"


class Registry:
    """A persistent store of task adapters on one frozen backbone.

    Build one with :meth:`create` or :meth:`open`, not the constructor.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], backbone: Backbone):
        self.root = root
        self.backbone = backbone
        self._manifest = manifest
        self._bank = AdapterBank(backbone.encoder)
        self._heads: dict[str, TaskHead] = {}
        # What each loaded adapter / head key was read from: (owner, source), owner ("task", name, version)
        # or ("merge", name, None), source the files' SHA-256 and specs the manifest named (see _source).
        # A key whose owner the manifest now describes otherwise is stale: unloaded, loaded afresh.
        self._sources: dict[str, tuple[tuple[str, str, int | None], str]] = {}
        # One active adapter at a time: forward passes of different tasks must not interleave.
        self._lock = threading.RLock()

    # --- construction -----------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | Path,
        backbone: Backbone | BackboneConfig | str | None = None,
        *,
        device: str = "auto",
    ) -> "Registry":
        """Create an empty registry folder on a backbone (default: the embedded all-MiniLM-L6-v2).

        ``backbone`` may be an already loaded :class:`~cmtl.core.backbone.Backbone`, which the
        registry then owns (it injects adapters into it).

        Raises:
            RegistryError: ``path`` already holds a registry or other files.
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
            return cls._create(root, backbone, device)
        finally:
            distributed.barrier()

    @classmethod
    def _create(cls, root: Path, backbone: Backbone | BackboneConfig | str | None, device: str) -> "Registry":
        loaded = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, device=device)
        root.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": store.FORMAT,
            "created": _now(),
            "backbone": {**loaded.config.to_dict(), "sha256": loaded.sha256},
            "tasks": {},
        }
        with store.writer_lock(root):
            store.write_manifest(root, manifest)
        logger.info("Created registry %s on backbone %s", root, loaded.config.name_or_path)
        return cls(root, manifest, loaded)

    @classmethod
    def open(cls, path: str | Path, backbone: BackboneConfig | str | None = None, *, device: str = "auto") -> "Registry":
        """Open an existing registry.

        Args:
            path: The registry folder.
            backbone: Load this backbone instead of the recorded one (e.g. the
                same weights moved to another folder). Its weights must hash to
                the recorded value.

        Raises:
            RegistryError: no registry at ``path``.
            BackboneMismatchError: the backbone's weights differ from the recorded ones.
        """
        root = Path(path)
        manifest = store.read_manifest(root)
        recorded = manifest["backbone"]
        if backbone is None:
            config = backbone_config(recorded)
        elif isinstance(backbone, str):
            config = backbone_config(recorded, name_or_path=backbone)
        else:
            config = backbone
        loaded = load_backbone(config, device=device)
        loaded.check_matches(recorded["sha256"], f"registry {str(root)!r}")
        return cls(root, manifest, loaded)

    def reload(self) -> bool:
        """Re-read the manifest if another process changed it; return whether it changed.

        Any change counts, not only a new generation (a registry deleted and created again can
        reach the same one). Adapters and heads loaded from files the new manifest no longer
        names (a task or merge removed and added again under its name) are unloaded.

        Raises:
            BackboneMismatchError: the registry on disk now records another backbone (it was
                replaced); this object keeps what it had.
        """
        manifest = self._read_manifest()
        with self._lock:
            if manifest == self._manifest:
                return False
            self._adopt(manifest)
        return True

    def _read_manifest(self) -> dict[str, Any]:
        """The manifest on disk, refused if it records another backbone than this object's manifest."""
        manifest = store.read_manifest(self.root)
        changes = backbone_changes(self._manifest["backbone"], manifest["backbone"])
        if changes:
            raise BackboneMismatchError(
                f"The registry {str(self.root)!r} now records another backbone than this object runs "
                f"({', '.join(changes)}): "
                "it was replaced (deleted and created again?) since this object opened it. Adapters only work on "
                f"the backbone they were trained on, so its manifest was not taken in. Open it anew with "
                f"Registry.open({str(self.root)!r})."
            )
        return manifest

    def _adopt(self, manifest: dict[str, Any]) -> None:
        """Make ``manifest`` this object's, unloading every adapter and head loaded from files it no longer names."""
        self._manifest = manifest
        for key, (owner, source) in list(self._sources.items()):
            if _source(manifest, owner) != source:
                self._unload([key])

    def _unload(self, keys: Sequence[str]) -> None:
        for key in keys:
            self._bank.remove(key)
            self._heads.pop(key, None)
            self._sources.pop(key, None)

    # --- reading ----------------------------------------------------------------

    def tasks(self) -> list[str]:
        """Names of all tasks, sorted."""
        return sorted(self._manifest["tasks"])

    def spec(self, task: str, *, merge: str | None = None) -> TaskSpec:
        """What ``task`` predicts; with ``merge``, as that merged entry recorded it (a merge answers with
        the labels it was made with, also after the task is removed or replaced).

        Raises:
            TaskNotFoundError: no such task, or ``merge`` does not hold it.
        """
        if merge is None:
            return TaskSpec.from_dict(self._entry(task)["spec"])
        record = self.merge_info(merge)
        if task not in record["tasks"]:
            raise TaskNotFoundError(f"Merge {merge!r} does not hold task {task!r}. It holds {record['tasks']}.")
        spec = self._merge_spec(record, task)
        if spec is None:
            raise TaskNotFoundError(
                f"Merge {merge!r} was written by an older cmtl that kept only the task names, and its task {task!r} "
                f"has since been removed, so its labels are unknown. Predict through it for "
                f"{[t for t in record['tasks'] if t != task]}, or remove it with remove_merge({merge!r}).")
        return spec

    def _merge_spec(self, record: dict[str, Any], task: str) -> TaskSpec | None:
        """The spec a merged entry recorded for ``task``; for an entry written before merges recorded
        them, the task's own (``None`` once that task is removed)."""
        recorded = record.get("specs", {}).get(task)
        if recorded is not None:
            return TaskSpec.from_dict(recorded)
        entry = self._manifest["tasks"].get(task)
        return None if entry is None else TaskSpec.from_dict(entry["spec"])

    def versions(self, task: str) -> list[VersionInfo]:
        """Every version of ``task``, oldest first."""
        entry = self._entry(task)
        return [self._info(task, v, entry["current"]) for v in entry["versions"]]

    def current(self, task: str) -> VersionInfo:
        """The version of ``task`` that answers predictions."""
        entry = self._entry(task)
        return self._info(task, self._version_record(task, entry["current"]), entry["current"])

    # --- training ---------------------------------------------------------------

    def add_task(
        self,
        spec: TaskSpec,
        train: Any,
        validation: Any = None,
        *,
        adapter: AdapterConfig | None = None,
        training: TrainConfig | None = None,
        memory: MemoryConfig | None = None,
        fill_buffer: bool = True,
    ) -> VersionInfo:
        """Train a new task's adapter and head on the frozen backbone and store it as version 1.

        Args:
            spec: The task's name, labels and columns.
            train: Training data (Dataset, DataFrame, file path or list of dicts).
            validation: Optional held-out data for early stopping and metrics; a
                sample of it is kept (see ``memory``) to check later updates
                for forgetting and as the drift monitor's reference.
            adapter: LoRA settings (defaults: r=8, alpha=16 on peft's default modules).
            training: Optimiser and loop settings.
            memory: Replay buffer kind and budget and held-out sample size, for
                this task's later updates.
            fill_buffer: Put training examples into the task's replay buffer.

        Raises:
            TaskExistsError: the name is taken.
            DataError: the data does not fit ``spec``.
            TrainingDivergedError: the loss went non-finite; nothing was written.
        """
        if spec.name in self._manifest["tasks"]:
            raise TaskExistsError(
                f"Task {spec.name!r} already exists (current version {self._entry(spec.name)['current']}). "
                "Pick another name, or remove_task it first."
            )
        spec = spec_for_data(spec, train)  # labels from a ClassLabel column when the spec names none
        adapter = adapter or AdapterConfig()
        training = training or TrainConfig()
        memory = memory or MemoryConfig()
        train_ex = read_examples(train, spec)
        val_ex = read_examples(validation, spec) if validation is not None else None
        train_enc = self._encode(train_ex, spec)
        val_enc = self._encode(val_ex, spec) if val_ex is not None else None
        key = _head_key(spec.name, 1)
        # peft draws A, cmtl the head and dropout its masks from the global RNG: seed it, for this call only.
        with self._lock, seeded(training.seed, self.backbone.device):
            self._unload([key])  # one loaded under this name came from a removed task's files
            resolved = self._bank.add(key, adapter)
            head = TaskHead(self.backbone.hidden_size, spec.num_outputs, training.head_dropout).to(self.backbone.device)
            try:
                result = self._train(key, resolved, head, spec, train_enc, val_enc, training)
                record = self._new_record(
                    version=1, parent=None, kind="train", examples=train_ex, adapter=resolved,
                    training=training, result=result, key=key,
                )
                files = self._memory_files(spec.name, 1, memory, train_ex if fill_buffer else None, val_ex, None)
                self._commit(spec, record, key, head, new_task=True, extra_files=files, memory=memory)
            except BaseException:
                self._bank.remove(key)
                raise
            self._heads[key] = head
            self._sources[key] = self._task_source(spec.name, 1)
        return self.current(spec.name)

    def update_task(
        self,
        task: str,
        train: Any,
        validation: Any = None,
        *,
        config: UpdateConfig | None = None,
        training: TrainConfig | None = None,
        promote: bool | None = None,
        fill_buffer: bool = True,
    ) -> "UpdateResult":
        """Train a new version of ``task`` on new data, starting from the current version.

        The candidate warm-starts from the current adapter and head and trains on
        the new data mixed with examples replayed from the current version's
        buffer (``config.replay_ratio``), optionally with an EWC or LwF penalty
        against the current version. It is then scored on the new validation
        data and on the held-out samples of every earlier version in its
        lineage, and becomes current only if the new score improves and the old
        one drops by at most ``config.tolerance`` (see :class:`~cmtl.continual.updates.Gate`).
        It is stored either way, so :meth:`rollback` can still select it.

        Args:
            task: An existing task.
            train: New labelled data, in the task's columns and label set.
            validation: New held-out data; without it ``config.validation_fraction``
                of ``train`` is held out (seeded).
            config: Replay, penalty and promotion settings.
            training: Loop settings; default: those the current version was trained with.
            promote: ``True`` or ``False`` overrides the gate; ``None`` lets it decide.
            fill_buffer: Add the new training examples to the new version's replay buffer.

        Raises:
            TaskNotFoundError: no such task.
            DataError: empty data or labels outside the task's label set.
            CorruptFileError, ReplayBufferError: the current version's files are damaged.
            TrainingDivergedError: the loss went non-finite; nothing was written.
        """
        spec = self.spec(task)
        config = config or UpdateConfig()
        entry = self._entry(task)
        parent = entry["current"]
        parent_record = self._version_record(task, parent)
        started_from = {(task, parent): _version_source(entry, parent_record)}  # checked again at commit
        training = training or TrainConfig.from_dict(parent_record["training"])
        memory = MemoryConfig.from_dict(entry.get("memory", {}))
        if config.penalty == "lwf" and spec.problem_type != "single_label":
            raise ValueError(f"LwF distils class probabilities; task {task!r} is {spec.problem_type}. "
                             "Use penalty='ewc' or 'none'.")
        new_ex = read_examples(train, spec)
        if validation is None:
            new_ex, val_ex = _split(new_ex, config.validation_fraction, training.seed, task)
        else:
            val_ex = read_examples(validation, spec)
        new_enc, val_enc = self._encode(new_ex, spec), self._encode(val_ex, spec)  # DataError on unknown labels
        buffer = self.buffer(task, parent)
        old_holdout = self.holdout(task, parent)
        n_replay = round(config.replay_ratio * len(new_ex))
        replayed = (_stored(spec, buffer.to_examples()).select(_sample_indices(len(buffer), n_replay, training.seed))
                    if buffer is not None and len(buffer) else None)
        replay_enc = self._encode(replayed, spec) if replayed is not None and len(replayed) else None
        train_enc = Encoded.concat([new_enc] + ([replay_enc] if replay_enc is not None else []))
        old_enc = self._encode(old_holdout, spec) if old_holdout is not None else None
        early_stop = Encoded.concat([val_enc] + ([old_enc] if old_enc is not None else []))
        metric, higher = primary_metric(spec)
        version = max(r["version"] for r in entry["versions"]) + 1
        key = _head_key(task, version)

        with self._lock:
            parent_key = self._ensure_loaded(task, parent)  # before seeding: loading may draw random numbers
        with self._lock, seeded(training.seed, self.backbone.device):
            parent_new, parent_old = _gate_scores(spec, self._eval_logits(parent_key, self._heads[parent_key],
                                                                          early_stop), early_stop, len(val_enc))
            adapter = AdapterConfig.from_dict(parent_record["adapter"])
            self._unload([key])  # one loaded under this name came from a removed task's files
            self._bank.load(key, adapter, self._bank.state_dict(parent_key))
            head = TaskHead(self.backbone.hidden_size, spec.num_outputs, training.head_dropout).to(self.backbone.device)
            head.load_state_dict(self._heads[parent_key].state_dict())
            try:
                extra = self._update_penalty(config, key, parent_key, head, spec, train_enc, [replay_enc, old_enc],
                                             training)
                result = self._train(key, adapter, head, spec, train_enc, early_stop, training, extra_loss=extra)
                self._heads[key] = head
                # Training scored its kept state on the same rows (new validation, then old held-out).
                logits = result.validation_logits
                if logits is None:  # no evaluation ever scored (a non-finite metric): score it now
                    logits = self._eval_logits(key, head, early_stop)
                candidate_new, candidate_old = _gate_scores(spec, logits, early_stop, len(val_enc))
                gate = Gate(metric, higher, parent_new, candidate_new, parent_old, candidate_old, config.tolerance)
                promoted, reason = gate.decide()
                if promote is not None:
                    reason = f"{'promoted' if promote else 'not promoted'} by the caller; the gate said: {reason}"
                    promoted = promote
                record = self._new_record(version=version, parent=parent, kind="update", examples=new_ex,
                                          adapter=adapter, training=training, result=result, key=key)
                record["metrics"].update(gate.to_metrics())
                record["training"].update(replayed=0 if replayed is None else len(replayed), update=config.to_dict())
                record.update(promoted=promoted, note=reason)
                files = self._memory_files(task, version, memory, new_ex if fill_buffer else None, val_ex, buffer)
                self._commit(spec, record, key, head, new_task=False, extra_files=files, make_current=promoted,
                             started_from=started_from)
            except BaseException:
                self._bank.remove(key)
                self._heads.pop(key, None)
                raise
        logger.info("Task %s v%d: %s", task, version, reason)
        return UpdateResult(self._info(task, record, self._entry(task)["current"]), promoted, reason, gate)

    def buffer(self, task: str, version: int | None = None) -> ReplayBuffer | None:
        """The replay buffer stored with a version of ``task`` (current by default); ``None`` if it has none.

        Raises:
            CorruptFileError, ReplayBufferError: the stored buffer is damaged.
        """
        data = self._read_version_file(task, version, "replay.parquet")
        if data is None:
            return None
        return ReplayBuffer.from_bytes(data, where=f"Replay buffer of task {task!r}")

    def holdout(self, task: str, version: int | None = None, *, lineage: bool = True) -> Examples | None:
        """Held-out labelled examples kept with ``version`` (current by default) and, with
        ``lineage``, with all its ancestors; ``None`` if none were kept."""
        entry = self._entry(task)
        v = entry["current"] if version is None else version
        parts = []
        while v is not None:
            data = self._read_version_file(task, v, "holdout.parquet")
            if data is not None:
                held = ReplayBuffer.from_bytes(data, where=f"Held-out sample of task {task!r} v{v}").to_examples()
                parts.append(_stored(self.spec(task), held))
            v = self._version_record(task, v)["parent"] if lineage else None
        return Examples.concat(parts[::-1]) if parts else None

    def monitor(self, task: str, texts: Sequence[str], *, reference: Sequence[str] | None = None,
                config: MonitorConfig | None = None) -> DriftReport:
        """Test whether incoming unlabelled ``texts`` for ``task`` have drifted from its reference sample.

        The reference is, unless given, the held-out sample kept with the current
        version (or with its nearest ancestor that kept at least
        ``config.min_samples``): the data the task was last validated on. See :mod:`cmtl.monitoring.drift` for the test.

        Raises:
            DataError: fewer texts than ``config.min_samples``, or no reference sample.
        """
        spec = self.spec(task)
        config = config or MonitorConfig()
        if reference is None:
            v = self._entry(task)["current"]
            while v is not None:
                held = self.holdout(task, v, lineage=False)
                if held is not None and len(held) >= config.min_samples:
                    break
                v = self._version_record(task, v)["parent"]
            if v is None:
                raise DataError(f"No version of task {task!r} in the current one's lineage kept a held-out sample of "
                                f"at least {config.min_samples} texts to compare against. Pass reference=[...] texts.")
            reference = held.texts
        proba = (lambda xs: self.predict_proba(task, xs)) if spec.problem_type == "single_label" else None
        monitor = DriftMonitor(self.embed, reference, config=config, predict_proba=proba,
                               labels=spec.labels, task=task)
        return monitor.check(texts)

    # --- merging ----------------------------------------------------------------

    def merge(self, members: Sequence[str | tuple[str, int]], name: str, method: str | None = None, *,
              config: MergeConfig | None = None, search: bool = False) -> dict[str, Any]:
        """Fold several task adapters into one stored, merged adapter (see :mod:`cmtl.merging.methods`).

        Each member is a task (its current version) or a ``(task, version)`` pair;
        two versions of one task make a soup, whose heads are averaged. The
        merged entry predicts every member task through that task's own head:
        ``predict(task, texts, merge=name)``.

        Args:
            members: At least two distinct task versions.
            name: Name of the merged entry (letters, digits, ``_``, ``-``).
            method: ``"linear"``, ``"ties"``, ``"dare"`` or ``"dare_ties"``; overrides ``config.method``.
            config: Knobs (scale λ, density, drop, rank, seed).
            search: Choose λ (and density / drop) on the members' held-out
                samples, maximising the mean of merged / individual score.

        Returns:
            The merged entry's record (members, knobs, reconstruction error, scores).

        Raises:
            ValueError: fewer than two members, a member twice, a taken or bad name,
                out-of-range knobs, or adapters on different modules.
            TaskNotFoundError: an unknown task or version.
        """
        config = config or MergeConfig()
        if method is not None:
            config = dataclasses.replace(config, method=method)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"Merge name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-'.")
        if name in self._manifest.get("merges", {}):
            raise ValueError(f"A merge named {name!r} exists already; remove_merge it or pick another name.")
        pairs = [(m, self._entry(m)["current"]) if isinstance(m, str) else (m[0], int(m[1])) for m in members]
        if len(pairs) < 2:
            raise ValueError(f"A merge needs at least two task versions; got {pairs}.")
        if len(set(pairs)) < len(pairs):
            raise ValueError(f"Members {pairs} name a task version twice: a version merged with itself is itself.")
        records = [self._version_record(t, v) for t, v in pairs]
        started_from = {(t, v): _version_source(self._entry(t), r) for (t, v), r in zip(pairs, records)}
        deltas = []
        for (t, v), record in zip(pairs, records):
            path = store.version_dir(self.root, t, v) / "adapter.safetensors"
            state = store.read_tensors(path, record["files"]["adapter.safetensors"])
            adapter = AdapterConfig.from_dict(record["adapter"])
            check_adapter_state(state, adapter, self.backbone.encoder, path)
            deltas.append(lora_deltas(state, adapter.scaling))
        base = AdapterConfig.from_dict(records[0]["adapter"])
        for (t, v), record in zip(pairs[1:], records[1:]):
            other = AdapterConfig.from_dict(record["adapter"])
            if (other.target_modules, other.layers) != (base.target_modules, base.layers):
                raise ValueError(f"{t} v{v} adapts {other.target_modules} in layers {other.layers or 'all'}, but "
                                 f"{pairs[0][0]} v{pairs[0][1]} adapts {base.target_modules} in layers "
                                 f"{base.layers or 'all'}: only adapters on the same modules merge.")
        heads = self._merged_heads(pairs)
        tasks = list(heads)
        # Each task is judged on the held-out data of its newest merged version's lineage, against that version.
        newest = {t: max(v for u, v in pairs if u == t) for t in tasks}
        held = {t: self.holdout(t, newest[t]) for t in tasks}
        held = {t: None if ex is None else self._encode(ex, self.spec(t)) for t, ex in held.items()}  # once
        with self._lock:
            keys = {t: self._ensure_loaded(t, newest[t]) for t in tasks}
        individual = {t: self._score(keys[t], self._heads[keys[t]], self.spec(t), held[t])
                      for t in tasks if held[t] is not None}

        buffers = self._refit_data(pairs, tasks) if config.refit_heads else None
        trials, best = [], None
        if search:
            for candidate in _search_grid(config) if individual else []:
                merged = self._combine(pairs, deltas, candidate)
                scores, fitted = self._score_merged(merged, base, heads, held, config.rank, buffers)
                trials.append({**{k: getattr(candidate, k) for k in ("scale", "density", "drop")},
                               "scores": scores, "normalised": _normalised(scores, individual)})
                norm = trials[-1]["normalised"]
                if norm is not None and (best is None or norm > best[0]["normalised"]):
                    best = (trials[-1], candidate, merged, fitted)
            if best is None:
                raise DataError("search=True needs held-out samples of the members (add them with validation data).")
            config, merged, scores, heads = best[1], best[2], best[0]["scores"], best[3]  # the winner, not redone
        else:
            merged = self._combine(pairs, deltas, config)
            if individual or buffers:
                scores, heads = self._score_merged(merged, base, heads, held, config.rank, buffers)
            else:
                scores = {}
        lora_state, rank, errors = to_lora_state(merged, config.rank)
        record = {
            "name": name, "created": _now(), "cmtl_version": __version__,
            "members": [{"task": t, "version": v} for t, v in pairs], "tasks": tasks,
            "specs": {t: self.spec(t).to_dict() for t in tasks},  # what serving needs: self-contained
            "config": {**config.to_dict(), "scale": config.resolved_scale(len(pairs))},
            "adapter": {**base.to_dict(), "r": rank, "alpha": float(rank), "dropout": 0.0},
            "reconstruction_error": {"mean": float(np.mean(list(errors.values()))), "max": max(errors.values())},
            "holdout": {t: {"individual": individual.get(t), "merged": scores.get(t)} for t in tasks},
            "normalised": _normalised(scores, individual), "search": trials,
        }
        with self._lock:
            self._write_entry(record, lora_state, heads, started_from=started_from)
        logger.info("Merged %s into %s (%s): normalised score %s", pairs, name, config.method, record["normalised"])
        return record

    def train_group(self, name: str, data: dict[str, tuple[Any, Any]], *, config: MultiTaskConfig | None = None,
                    adapter: AdapterConfig | None = None, task_adapter: AdapterConfig | None = None,
                    training: TrainConfig | None = None) -> dict[str, Any]:
        """Train ONE adapter jointly on several of the registry's tasks, with a fresh head per task,
        and store it as an entry beside the merges: ``predict(task, texts, merge=name)`` and the
        server answer through it.

        Args:
            name: Name of the entry (letters, digits, ``_``, ``-``), shared with merged entries.
            data: ``{task: (train, validation)}`` for at least two existing single-label tasks.
            config: Sampler, loss weighting, MT2ST schedule, TAG measurement, steps.
            adapter: LoRA settings of the shared adapter (default: the first task's current ones).
            task_adapter: Also give each task a small LoRA of its own (``r`` and ``alpha`` from
                this config; the shared adapter's layers) beside the shared one. Each task then
                answers through shared + own factors, stored as one adapter of rank r_shared + r.
            training: Batch size, learning rate, warm-up, clipping, seed.

        Returns:
            The entry's record: tasks, knobs, per-task validation history and best scores, the TAG
            affinity matrix when measured (``affinity[i][j]`` = Z of task i onto task j).
        """
        config = config or MultiTaskConfig()
        training = training or TrainConfig()
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"Group name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-'.")
        if name in self._manifest.get("merges", {}):
            raise ValueError(f"An entry named {name!r} exists already; remove_merge it or pick another name.")
        tasks = list(data)
        if len(tasks) < 2:
            raise ValueError(f"A group needs at least two tasks; got {tasks}. Use add_task or update_task for one.")
        specs = [self.spec(t) for t in tasks]  # TaskNotFoundError for unknown tasks
        adapter = adapter or AdapterConfig.from_dict(self._version_record(tasks[0], self._entry(tasks[0])["current"])
                                                     ["adapter"])
        train_enc = [self._encode(read_examples(data[t][0], spec), spec) for t, spec in zip(tasks, specs)]
        val_enc = [None if data[t][1] is None else self._encode(read_examples(data[t][1], spec), spec)
                   for t, spec in zip(tasks, specs)]
        key = _merge_key(name)
        with self._lock, seeded(training.seed, self.backbone.device):
            resolved = self._bank.add(key, adapter)
            heads = [TaskHead(self.backbone.hidden_size, s.num_outputs, training.head_dropout).to(self.backbone.device)
                     for s in specs]
            forward = grouped_forward(self.backbone.embed, heads)
            own = None
            if task_adapter is not None:
                state = self._bank.state_dict(key)  # A: (r, in), B: (out, r) per adapted layer
                shapes = {k.rpartition(".lora_A.")[0]: (v.shape[1], state[k.replace(".lora_A.", ".lora_B.")].shape[0])
                          for k, v in state.items() if ".lora_A." in k}
                own = TaskLoRA(shapes, len(tasks), task_adapter.r, task_adapter.alpha).to(self.backbone.device)
                own.attach(self._bank.modules(key))
                forward = own.wrap(forward)

            def set_training(flag: bool) -> None:
                self._bank.set_training(key, flag)
                for h in heads:
                    h.train(flag)

            try:
                self._bank.activate(key)
                shared = self._bank.parameters(key)
                per_task = [p for h in heads for p in h.parameters()] + (list(own.parameters()) if own else [])
                result = train_multitask(forward, shared, per_task, set_training, specs, train_enc, val_enc, config,
                                         training, pad_id=self.backbone.pad_id, device=self.backbone.device)
                for p in shared:
                    p.requires_grad_(False)
                record = {
                    "name": name, "kind": "joint", "created": _now(), "cmtl_version": __version__, "tasks": tasks,
                    "specs": {t: spec.to_dict() for t, spec in zip(tasks, specs)},
                    "members": [], "config": config.to_dict(), "training": training.to_dict(),
                    "adapter": resolved.to_dict(), "steps": result.steps, "seconds": round(result.seconds, 3),
                    "rows_per_task": result.rows_per_task, "best_step": result.best_step,
                    "validation_accuracy": result.best_metrics,
                    "history": result.history, "affinity": result.affinity,
                    "tag_seconds": round(result.tag_seconds, 3), "switched_at": result.switched_at,
                    "task_weights": result.task_weights,
                    "task_adapter": None if own is None else {"r": own.r, "alpha": own.alpha},
                }
                own_states = None if own is None else {t: own.state(i) for i, t in enumerate(tasks)}
                self._write_entry(record, self._bank.state_dict(key), dict(zip(tasks, heads)), own_states)
            except BaseException:
                self._bank.remove(key)
                raise
            finally:
                if own is not None:
                    own.detach()
            if own is None:
                source = (("merge", name, None), _source(self._manifest, ("merge", name, None)))
                self._sources[key] = source
                for t, h in zip(tasks, heads):
                    self._heads[_merge_key(name, t)] = h.eval()
                    self._sources[_merge_key(name, t)] = source
            else:  # each task answers through shared + own factors, loaded per task on first use
                self._bank.remove(key)
        return record

    def _write_entry(self, record: dict[str, Any], adapter_state: dict[str, torch.Tensor],
                     heads: dict[str, TaskHead], task_adapters: dict[str, dict[str, torch.Tensor]] | None = None,
                     *, started_from: dict[tuple[str, int], str] | None = None) -> None:
        """Write a merged or jointly trained entry's adapter, heads (and per-task adapters), then name
        it in the manifest. Under torchrun only rank 0 writes; the other ranks read what it wrote.
        ``started_from``: the member versions it was computed from (see :meth:`_check_started_from`)."""
        name = record["name"]
        if not distributed.is_main():
            distributed.barrier()
            self._adopt(self._read_manifest())
            record.update(self._manifest["merges"][name])
            return
        try:
            self._write_entry_files(record, adapter_state, heads, task_adapters, started_from=started_from)
        finally:
            distributed.barrier()

    def _write_entry_files(self, record: dict[str, Any], adapter_state: dict[str, torch.Tensor],
                           heads: dict[str, TaskHead], task_adapters: dict[str, dict[str, torch.Tensor]] | None,
                           *, started_from: dict[tuple[str, int], str] | None = None) -> None:
        name = record["name"]
        files = {"adapter.safetensors": tensors_to_bytes(adapter_state),
                 "heads.safetensors": tensors_to_bytes(
                     {f"{t}.{k}": v for t, head in heads.items() for k, v in head.state_dict().items()})}
        if task_adapters:
            files["task_adapters.safetensors"] = tensors_to_bytes(
                {f"{t}.{k}": v for t, state in task_adapters.items() for k, v in state.items()})
        with store.writer_lock(self.root):
            manifest = self._read_manifest()
            if name in manifest.get("merges", {}):
                raise ValueError(f"An entry named {name!r} was written by another process meanwhile.")
            _check_started_from(manifest, started_from or {}, "merge")
            store.remove_unreferenced(self.root, manifest)
            record["files"] = store.write_folder(self.root, store.merge_dir(self.root, name), files)
            manifest.setdefault("merges", {})[name] = record
            store.write_manifest(self.root, manifest)
            self._adopt(manifest)

    def merges(self) -> list[str]:
        """Names of all merged entries, sorted."""
        return sorted(self._manifest.get("merges", {}))

    def merge_info(self, name: str) -> dict[str, Any]:
        """The record of a merged entry: members, method and knobs, errors, scores."""
        try:
            return self._manifest.get("merges", {})[name]
        except KeyError:
            raise TaskNotFoundError(f"Merge {name!r} not found. Merges: {self.merges()}.") from None

    def remove_merge(self, name: str) -> None:
        """Delete a merged entry and its files (its member tasks are untouched)."""
        with store.writer_lock(self.root), self._lock:
            manifest = self._reread(merge=name)
            tasks = self.merge_info(name)["tasks"]
            del manifest["merges"][name]
            store.write_manifest(self.root, manifest)
            store.remove_unreferenced(self.root, manifest)  # the entry's folder (a link there is only unlinked)
            self._unload_merge(name, tasks)

    # --- inference --------------------------------------------------------------

    def predict(self, task: str, texts: str | Sequence[str], text_pairs: Sequence[str] | None = None,
                *, version: int | None = None, merge: str | None = None) -> list:
        """Predicted labels (a list of label strings; lists of labels for multi-label; numbers for regression).

        ``version`` picks a stored version (default: current); ``merge`` a merged entry holding ``task``.
        """
        spec = self.spec(task, merge=merge)
        return spec.decode(self._logits(task, spec, texts, text_pairs, version, merge))

    def predict_proba(self, task: str, texts: str | Sequence[str], text_pairs: Sequence[str] | None = None,
                      *, version: int | None = None, merge: str | None = None) -> np.ndarray:
        """Per-label probabilities, shape (N, L), columns in ``spec(task).labels`` order."""
        spec = self.spec(task, merge=merge)
        return spec.probabilities(self._logits(task, spec, texts, text_pairs, version, merge)).numpy()

    def evaluate(self, task: str, data: Any, *, version: int | None = None, merge: str | None = None
                 ) -> dict[str, float]:
        """Metrics of ``task`` (current version unless given, or through ``merge``) on labelled ``data``."""
        spec = self.spec(task, merge=merge)
        examples = read_examples(data, spec)
        encoded = self._encode(examples, spec)
        logits = self._predict_encoded(task, encoded, version, merge)
        return compute_metrics(spec, logits, encoded.targets)

    def embed(self, texts: str | Sequence[str], task: str | None = None, *, version: int | None = None,
              batch_size: int = 64) -> torch.Tensor:
        """Pooled embeddings (N, H) of ``texts``: through ``task``'s adapter, or the plain backbone if ``None``."""
        from cmtl.data import batches, length_sorted

        encoded = Encoded(self.backbone.tokenize(as_texts(texts))["input_ids"], None, None)
        out = torch.empty((len(encoded), self.backbone.hidden_size))
        with self._lock:
            if task is None:
                context = self._bank.disabled()
            else:
                key = self._ensure_loaded(task, self._entry(task)["current"] if version is None else version)
                self._bank.activate(key)
                context = contextlib.nullcontext()
            with context, torch.inference_mode():
                for idx, inputs, _ in batches(encoded, length_sorted(encoded), batch_size, self.backbone.pad_id,
                                              self.backbone.device):
                    out[idx] = self.backbone.embed(**inputs).float().cpu()
        return out

    def adapter_state(self, task: str, version: int | None = None, *, merge: str | None = None
                      ) -> dict[str, torch.Tensor]:
        """The LoRA factors that answer ``task`` (current version unless given, or through ``merge``), as
        loaded: peft's state-dict keys (``….lora_A.weight`` (r, in), ``….lora_B.weight`` (out, r)), CPU copies."""
        with self._lock:
            if merge is None:
                key = self._ensure_loaded(task, self._entry(task)["current"] if version is None else version)
            else:
                if version is not None:
                    raise ValueError("Pass version= or merge=, not both: a merge fixes its members' versions.")
                key, _ = self._ensure_merge_loaded(merge, task)
            return self._bank.state_dict(key)

    def head_state(self, task: str, version: int | None = None, *, merge: str | None = None
                   ) -> dict[str, torch.Tensor]:
        """The weights of the head that answers ``task`` (as :meth:`adapter_state`), copies on the CPU."""
        with self._lock:
            if merge is None:
                key = self._ensure_loaded(task, self._entry(task)["current"] if version is None else version)
            else:
                if version is not None:
                    raise ValueError("Pass version= or merge=, not both: a merge fixes its members' versions.")
                _, key = self._ensure_merge_loaded(merge, task)
            return {k: v.detach().cpu().clone() for k, v in self._heads[key].state_dict().items()}

    # --- lineage ----------------------------------------------------------------

    def rollback(self, task: str, version: int) -> VersionInfo:
        """Make an earlier (or later) stored version of ``task`` the current one."""
        with store.writer_lock(self.root), self._lock:
            manifest = self._reread(task=task)
            self._version_record(task, version)  # raises if unknown
            manifest["tasks"][task]["current"] = version
            store.remove_unreferenced(self.root, manifest)
            store.write_manifest(self.root, manifest)
        logger.info("Task %s: current version is now v%d", task, version)
        return self.current(task)

    def remove_task(self, task: str) -> None:
        """Delete a task, all its versions and their files."""
        with store.writer_lock(self.root), self._lock:
            manifest = self._reread(task=task)
            entry = self._entry(task)
            owned = [k for k, (owner, _) in self._sources.items() if owner[:2] == ("task", task)]
            self._unload(owned + [_head_key(task, v["version"]) for v in entry["versions"]])
            del manifest["tasks"][task]
            store.write_manifest(self.root, manifest)
            store.remove_unreferenced(self.root, manifest)  # the task's folder (a link there is only unlinked)

    # --- internals --------------------------------------------------------------

    def _entry(self, task: str) -> dict[str, Any]:
        try:
            return self._manifest["tasks"][task]
        except KeyError:
            raise TaskNotFoundError(f"Task {task!r} not found. Known tasks: {self.tasks()}.") from None

    def _version_record(self, task: str, version: int) -> dict[str, Any]:
        for record in self._entry(task)["versions"]:
            if record["version"] == version:
                return record
        known = [r["version"] for r in self._entry(task)["versions"]]
        raise TaskNotFoundError(f"Task {task!r} has no version {version!r}. Versions: {known}.")

    def _info(self, task: str, record: dict[str, Any], current: int) -> VersionInfo:
        fields_ = {k: v for k, v in record.items()
                   if k in VersionInfo.__dataclass_fields__ and k not in ("files", "task", "current")}
        return VersionInfo(task=task, current=record["version"] == current, **fields_)

    def _encode(self, examples: Examples, spec: TaskSpec) -> Encoded:
        return encode(examples, spec, self.backbone.tokenize)

    def _train(self, key: str, adapter: AdapterConfig, head: TaskHead, spec: TaskSpec, train_enc: Encoded,
               val_enc: Encoded | None, config: TrainConfig, extra_loss=None) -> TrainResult:
        # Layers below the adapter are frozen for every adapter this run switches in (an update's
        # parent, for LwF, has the same layers): compute their outputs once, for all epochs. Activate
        # first: the prefix must not carry whichever adapter was active before (another task's).
        self._bank.activate(key)
        train_enc, val_enc = maybe_cache([train_enc, val_enc], self.backbone, adapter, config.cache_frozen_mb,
                                         batch_size=config.eval_batch_size)
        params = self._bank.parameters(key) + list(head.parameters())

        def set_training(flag: bool) -> None:
            self._bank.set_training(key, flag)
            head.train(flag)

        try:
            return train(
                lambda inputs: head(self.backbone.embed(**inputs)), params, set_training, spec, train_enc, val_enc,
                config, pad_id=self.backbone.pad_id, device=self.backbone.device, desc=f"{spec.name}",
                extra_loss=extra_loss,
            )
        finally:
            for p in params:
                p.requires_grad_(False)

    def _new_record(self, *, version: int, parent: int | None, kind: str, examples: Examples,
                    adapter: AdapterConfig, training: TrainConfig, result: TrainResult, key: str) -> dict[str, Any]:
        return {
            "version": version,
            "parent": parent,
            "created": _now(),
            "kind": kind,
            "metrics": {f"validation_{k}": v for k, v in result.best_metrics.items()},
            "data_fingerprint": examples.fingerprint(),
            "adapter": adapter.to_dict(),
            "training": {**training.to_dict(), "steps": result.steps, "best_step": result.best_step,
                         "stopped_early": result.stopped_early, "examples": len(examples)},
            "train_seconds": round(result.seconds, 3),
            "cmtl_version": __version__,
        }

    def _commit(self, spec: TaskSpec, record: dict[str, Any], key: str, head: TaskHead, *, new_task: bool,
                extra_files: dict[str, bytes] | None = None, memory: MemoryConfig | None = None,
                make_current: bool = True, started_from: dict[tuple[str, int], str] | None = None) -> None:
        """Write a version's files, then the manifest that names it (and, by default, makes it current).
        ``started_from``: the versions an update trained from, which must still be there unchanged."""
        head_state = head.state_dict()
        files = {
            "adapter.safetensors": tensors_to_bytes(self._bank.state_dict(key)),
            "head.safetensors": tensors_to_bytes(head_state),
            **(extra_files or {}),
        }
        record["trainable_parameters"] = self._bank.num_parameters(key) + sum(v.numel() for v in head_state.values())
        record["bytes_on_disk"] = sum(len(b) for b in files.values())
        if not distributed.is_main():  # under torchrun, rank 0 writes; the others read what it wrote
            distributed.barrier()
            self._adopt(self._read_manifest())
        else:
            try:
                self._write_version(spec, record, files, new_task=new_task, memory=memory,
                                    make_current=make_current, started_from=started_from)
            finally:
                distributed.barrier()
        self._sources[key] = self._task_source(spec.name, record["version"])

    def _reread(self, *, task: str | None = None, merge: str | None = None) -> dict[str, Any]:
        """The manifest on disk, made this object's (call under the writer lock). A ``task`` or ``merge``
        this object knew of but another writer removed since raises a TaskNotFoundError saying so."""
        known, manifest = self._manifest, self._read_manifest()
        self._adopt(manifest)
        if task is not None and task in known["tasks"] and task not in manifest["tasks"]:
            raise store.removed_error(f"Task {task!r}", sorted(manifest["tasks"]))
        if merge is not None and merge in known.get("merges", {}) and merge not in manifest.get("merges", {}):
            raise store.removed_error(f"Merge {merge!r}", sorted(manifest.get("merges", {})))
        return manifest

    def _write_version(self, spec: TaskSpec, record: dict[str, Any], files: dict[str, bytes], *, new_task: bool,
                       memory: MemoryConfig | None, make_current: bool,
                       started_from: dict[tuple[str, int], str] | None = None) -> None:
        with store.writer_lock(self.root):
            manifest = self._read_manifest()
            if new_task and spec.name in manifest["tasks"]:
                raise TaskExistsError(f"Task {spec.name!r} was added by another process meanwhile.")
            if not new_task:
                entry = manifest["tasks"].get(spec.name)
                if entry is None:
                    raise store.removed_error(f"Task {spec.name!r}", sorted(manifest["tasks"]))
                _check_started_from(manifest, started_from or {}, "update")
                if any(r["version"] == record["version"] for r in entry["versions"]):
                    raise RegistryError(f"Task {spec.name!r} v{record['version']} was written by another process "
                                        "meanwhile. Reopen the registry and retry.")
            store.remove_unreferenced(self.root, manifest)
            record["files"] = store.write_version_files(self.root, spec.name, record["version"], files)
            entry = manifest["tasks"].setdefault(spec.name, {"spec": spec.to_dict(), "versions": []})
            if memory is not None:
                entry["memory"] = memory.to_dict()
            entry["versions"].append(record)
            if make_current:
                entry["current"] = record["version"]
            store.write_manifest(self.root, manifest)
            self._adopt(manifest)

    def _memory_files(self, task: str, version: int, memory: MemoryConfig, train_ex: Examples | None,
                      val_ex: Examples | None, parent_buffer: ReplayBuffer | None) -> dict[str, bytes]:
        """replay.parquet (the parent's buffer plus ``train_ex``) and holdout.parquet (a sample of ``val_ex``)."""
        files = {}
        buffer = parent_buffer
        if train_ex is not None:
            buffer = buffer or make_buffer(memory.buffer, memory.budget, memory.seed)
            buffer.add_examples(train_ex, task=task, source=f"v{version}", domain=f"v{version}")
        if buffer is not None:
            files["replay.parquet"] = buffer.to_bytes()
        if val_ex is not None:
            holdout = make_buffer("reservoir", memory.holdout, memory.seed + version)
            holdout.add_examples(val_ex, task=task, source=f"v{version}", domain=f"v{version}")
            files["holdout.parquet"] = holdout.to_bytes()
        return files

    def _read_version_file(self, task: str, version: int | None, name: str) -> bytes | None:
        version = self._entry(task)["current"] if version is None else version
        record = self._version_record(task, version)
        if name not in record.get("files", {}):
            return None
        return store.read_checked(store.version_dir(self.root, task, version) / name, record["files"][name])

    def _eval_logits(self, key: str, head: TaskHead, encoded: Encoded, batch_size: int = 64) -> torch.Tensor:
        """Logits of every row of ``encoded`` through the adapter ``key`` and ``head``, in eval mode."""
        with self._lock:
            self._bank.activate(key)
            head.eval()
            return predict_logits(lambda inputs: head(self.backbone.embed(**inputs)), encoded, batch_size=batch_size,
                                  pad_id=self.backbone.pad_id, device=self.backbone.device)

    def _score(self, key: str, head: TaskHead, spec: TaskSpec, encoded: Encoded) -> float:
        """Primary metric of ``spec`` on ``encoded`` through the adapter ``key`` and ``head``."""
        metric, _ = primary_metric(spec)
        logits = self._eval_logits(key, head, encoded)
        return float(compute_metrics(spec, logits, encoded.targets)[metric])

    def _update_penalty(self, config: UpdateConfig, key: str, parent_key: str, head: TaskHead, spec: TaskSpec,
                        train_enc: Encoded, old_data: list[Encoded | None], training: TrainConfig):
        """The ``extra_loss`` for an update: EWC around the parent's weights (Fisher on ``old_data``: replayed
        and held-out examples), or LwF towards its outputs on the training rows ``train_enc``."""
        if config.penalty == "ewc":
            parts = [e for e in old_data if e is not None]
            if not parts:
                raise DataError(f"EWC needs old data of task {spec.name!r} to weigh the parameters, but its current "
                                "version has no replay buffer or held-out sample. Use penalty='lwf' or 'none'.")
            self._bank.activate(key)
            params = self._bank.parameters(key) + list(head.parameters())
            anchor = fisher_diagonal(lambda inputs: head(self.backbone.embed(**inputs)), params, spec,
                                     Encoded.concat(parts),
                                     max_examples=config.fisher_examples, batch_size=training.batch_size,
                                     pad_id=self.backbone.pad_id, device=self.backbone.device)
            return ewc_term(params, [anchor], config.weight)
        if config.penalty == "lwf":
            # The parent is frozen and runs without dropout, so its outputs on the training rows are fixed:
            # one length-sorted pass here, instead of a second forward on every step of every epoch.
            old_logits = self._eval_logits(parent_key, self._heads[parent_key], train_enc, training.eval_batch_size)
            self._bank.activate(key)
            weight, t = config.weight, config.temperature

            def lwf(inputs, logits, rows):
                return weight * distillation_loss(logits, old_logits[rows].to(logits.device), t)

            return lwf
        return None

    def _task_source(self, task: str, version: int) -> tuple[tuple[str, str, int | None], str]:
        owner = ("task", task, version)
        return owner, _source(self._manifest, owner)

    def _ensure_loaded(self, task: str, version: int) -> str:
        """Key of ``task`` v``version``'s adapter and head, loaded from the files the manifest names now."""
        key = _head_key(task, version)
        record = self._version_record(task, version)
        source = self._task_source(task, version)
        if key in self._heads and self._sources.get(key) == source:
            return key
        self._unload([key])  # loaded from other files: the task was removed and added again under its name
        folder = store.version_dir(self.root, task, version)
        adapter_state = store.read_tensors(folder / "adapter.safetensors", record["files"]["adapter.safetensors"])
        head_state = store.read_tensors(folder / "head.safetensors", record["files"]["head.safetensors"])
        # Loaded parameters must be ordinary tensors whatever mode the caller runs in: one created
        # under inference_mode could never be trained from again (an update) in this process.
        with torch.inference_mode(False):
            head = self._build_head(self.spec(task), head_state, folder / "head.safetensors")
            self._load_adapter(key, AdapterConfig.from_dict(record["adapter"]), adapter_state,
                               folder / "adapter.safetensors")
        self._heads[key] = head
        self._sources[key] = source
        return key

    def _build_head(self, spec: TaskSpec, state: dict[str, torch.Tensor], path: Path) -> TaskHead:
        """``spec``'s head with stored weights, checked against the spec's labels first."""
        head = TaskHead(self.backbone.hidden_size, spec.num_outputs)
        check_head_state(state, head, spec, path)
        head.load_state_dict(state)
        return head.to(self.backbone.device).eval()

    def _load_adapter(self, key: str, config: AdapterConfig, state: dict[str, torch.Tensor], path: Path) -> None:
        """Put stored LoRA weights into the bank as ``key``, checked against their recorded config first."""
        check_adapter_state(state, config, self.backbone.encoder, path)
        try:
            self._bank.load(key, config, state)
        except DataError as exc:  # tensors missing for some adapted module
            raise CorruptFileError(
                f"File {str(path)!r} does not fit its recorded adapter: {exc} {STORED_FILE_FIX}") from exc

    def _predict_encoded(self, task: str, encoded: Encoded, version: int | None, merge: str | None = None
                         ) -> torch.Tensor:
        with self._lock:
            if merge is None:
                version = self._entry(task)["current"] if version is None else version
                key = head_key = self._ensure_loaded(task, version)
                batch_size = int(self._version_record(task, version)["training"].get("eval_batch_size", 64))
            else:
                if version is not None:
                    raise ValueError("Pass version= or merge=, not both: a merge fixes its members' versions.")
                key, head_key = self._ensure_merge_loaded(merge, task)
                batch_size = 64
            self._bank.activate(key)
            head, embed = self._heads[head_key], self.backbone.embed
            return predict_logits(lambda inputs: head(embed(**inputs)), encoded, batch_size=batch_size,
                                  pad_id=self.backbone.pad_id, device=self.backbone.device)

    def _logits(self, task: str, spec: TaskSpec, texts, text_pairs, version: int | None,
                merge: str | None = None) -> torch.Tensor:
        texts = as_texts(texts)
        pairs = None
        if spec.text_pair_column is not None:
            if text_pairs is None:
                raise DataError(f"Task {spec.name!r} takes text pairs: pass text_pairs=[...] as well.")
            pairs = as_texts(text_pairs)
            if len(pairs) != len(texts):
                raise DataError(f"Got {len(texts)} texts but {len(pairs)} text_pairs; they must match.")
        encoded = encode(Examples(texts, pairs), spec, self.backbone.tokenize, with_targets=False)
        return self._predict_encoded(task, encoded, version, merge)

    def _ensure_merge_loaded(self, name: str, task: str) -> tuple[str, str]:
        """Keys of the adapter and head that answer ``task`` through merged entry ``name``, loaded from
        the entry's own files: a merge never needs its member tasks' entries."""
        spec = self.spec(task, merge=name)
        record = self.merge_info(name)
        folder = store.merge_dir(self.root, name)
        # A joint entry with per-task adapters answers each task through its own stacked adapter.
        adapter_key = _merge_key(name, task if record.get("task_adapter") else None)
        head_key = _merge_key(name, task)
        owner = ("merge", name, None)
        source = (owner, _source(self._manifest, owner))
        if any(loaded != source for loaded in self._sources.values() if loaded[0] == owner) or (
                head_key in self._heads and self._sources.get(head_key) != source):
            # Loaded from other files: the entry was removed and made again under its name.
            self._unload_merge(name, record["tasks"])
        with torch.inference_mode(False):  # as in _ensure_loaded
            if head_key not in self._heads:  # the entry's heads load together, once
                heads = store.read_tensors(folder / "heads.safetensors", record["files"]["heads.safetensors"])
                for t in record["tasks"]:
                    spec_t = spec if t == task else self._merge_spec(record, t)
                    if spec_t is not None:  # None: an older entry's removed task, refused when asked for
                        state = {k[len(t) + 1:]: v for k, v in heads.items() if k.startswith(f"{t}.")}
                        self._heads[_merge_key(name, t)] = self._build_head(spec_t, state,
                                                                            folder / "heads.safetensors")
                        self._sources[_merge_key(name, t)] = source
            if adapter_key not in self._bank:  # the entry's adapters load together, once
                for which, (state, config) in entry_adapters(self.root, record).items():
                    if _merge_key(name, which) not in self._bank:
                        path = folder / ("adapter.safetensors" if which is None else
                                         "adapter.safetensors + task_adapters.safetensors")
                        self._load_adapter(_merge_key(name, which), config, state, path)
                        self._sources[_merge_key(name, which)] = source
        return adapter_key, head_key

    def _unload_merge(self, name: str, tasks: list[str]) -> None:
        """Drop merged entry ``name``'s adapters and heads from this object: by exact key, so a task
        whose name looks like a merge key keeps its own."""
        owned = [k for k, (owner, _) in self._sources.items() if owner == ("merge", name, None)]
        self._unload(owned + [_merge_key(name)] + [_merge_key(name, t) for t in tasks])

    def _combine(self, pairs: list[tuple[str, int]], deltas: list[dict[str, torch.Tensor]],
                 config: MergeConfig) -> dict[str, torch.Tensor]:
        """Merged per-module deltas: cmtl's methods on exact deltas, or peft's ``add_weighted_adapter``."""
        if not config.method.startswith("peft_"):
            return merge_deltas(deltas, config)
        kind = config.method.removeprefix("peft_")
        density = 1.0 - config.drop if kind.startswith("dare") else config.density if "ties" in kind else None
        keys = [self._ensure_loaded(t, v) for t, v in pairs]
        name = "_peft_merge"
        with self._lock, seeded(config.seed, self.backbone.device):  # peft's DARE draws from the global RNG
            self._bank.peft_merge(name, keys, [config.resolved_scale(len(pairs))] * len(pairs), kind, density)
            try:
                return lora_deltas(self._bank.state_dict(name), self._bank.scaling(name))
            finally:
                self._bank.remove(name)

    def _merged_heads(self, pairs: list[tuple[str, int]]) -> dict[str, TaskHead]:
        """One head per member task; the mean of a task's heads when several of its versions merge (a soup)."""
        heads: dict[str, list[dict[str, torch.Tensor]]] = {}
        for t, v in pairs:
            path = store.version_dir(self.root, t, v) / "head.safetensors"
            state = store.read_tensors(path, self._version_record(t, v)["files"]["head.safetensors"])
            check_head_state(state, TaskHead(self.backbone.hidden_size, self.spec(t).num_outputs), self.spec(t), path)
            heads.setdefault(t, []).append(state)
        out = {}
        for t, states in heads.items():
            head = TaskHead(self.backbone.hidden_size, self.spec(t).num_outputs)
            head.load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
            out[t] = head.to(self.backbone.device).eval()
        return out

    def _refit_data(self, pairs: list[tuple[str, int]], tasks: list[str]) -> dict[str, Encoded]:
        """Each task's replay buffer (of its newest merged version), encoded, to refit its head on."""
        out = {}
        for t in tasks:
            v = max(v for u, v in pairs if u == t)
            buffer = self.buffer(t, v)
            if buffer is None or len(buffer) == 0:
                raise DataError(f"refit_heads needs a replay buffer, and {t} v{v} has none (it was trained with "
                                "fill_buffer=False). Merge without refit_heads, or update the task with a buffer.")
            out[t] = self._encode(_stored(self.spec(t), buffer.to_examples()), self.spec(t))
        return out

    def _score_merged(self, merged: dict[str, torch.Tensor], base: AdapterConfig, heads: dict[str, TaskHead],
                      held: dict[str, Encoded | None], rank: int | None,
                      buffers: dict[str, Encoded] | None = None) -> tuple[dict[str, float], dict[str, TaskHead]]:
        """Primary metric of each task with a held-out sample, through a merged delta (loaded
        temporarily), and the heads that scored it: refitted on ``buffers`` when given."""
        lora_state, r, _ = to_lora_state(merged, rank)
        key = "_merge_candidate"
        with self._lock:
            self._bank.load(key, AdapterConfig.from_dict({**base.to_dict(), "r": r, "alpha": float(r),
                                                           "dropout": 0.0}), lora_state)
            try:
                if buffers:
                    self._bank.activate(key)
                    heads = dict(heads)
                    for t, encoded in buffers.items():
                        features = predict_logits(lambda inputs: self.backbone.embed(**inputs), encoded,
                                                  batch_size=64, pad_id=self.backbone.pad_id,
                                                  device=self.backbone.device)
                        heads[t] = refit_head(heads[t], features, encoded.targets, self.spec(t).loss).eval()
                scores = {t: self._score(key, heads[t], self.spec(t), held[t]) for t in heads if held.get(t) is not None}
                return scores, heads
            finally:
                self._bank.remove(key)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r}, backbone={self.backbone.config.name_or_path!r}, tasks={self.tasks()})"


@dataclass(frozen=True)
class UpdateResult:
    """What :meth:`Registry.update_task` did: the new version, whether it is current, and why."""

    version: VersionInfo
    promoted: bool
    reason: str
    gate: Gate


def _stored(spec: TaskSpec, examples: Examples) -> Examples:
    """Stored examples with their label names. Buffers and held-out samples that earlier
    releases wrote from integer-labelled data hold positions in ``spec.labels`` (the rule
    then); names pass unchanged."""
    if spec.problem_type == "regression" or examples.labels is None:
        return examples
    names = dataclasses.replace(spec, label_encoding="index").label_names(examples.labels)
    return dataclasses.replace(examples, labels=names)


def _version_source(entry: dict[str, Any], record: dict[str, Any]) -> str:
    """What a task version is loaded from: its files' SHA-256 and the task's spec (the head's labels)."""
    return json.dumps({"files": record.get("files"), "spec": entry.get("spec")}, sort_keys=True)


def _source(manifest: dict[str, Any], owner: tuple[str, str, int | None]) -> str | None:
    """The source (see :func:`_version_source`) ``manifest`` names for a task version or merged entry
    ``owner``; ``None`` if it names none."""
    kind, name, version = owner
    if kind == "merge":
        record = manifest.get("merges", {}).get(name)
        return None if record is None else json.dumps(
            {k: record.get(k) for k in ("files", "specs", "tasks", "task_adapter")}, sort_keys=True)
    entry = manifest["tasks"].get(name)
    record = next((r for r in entry["versions"] if r["version"] == version), None) if entry else None
    return None if record is None else _version_source(entry, record)


def _check_started_from(manifest: dict[str, Any], started_from: dict[tuple[str, int], str], what: str) -> None:
    """Refuse to commit an ``what`` ("update", "merge") computed from task versions that ``manifest`` (read
    under the writer lock) no longer holds unchanged: another writer removed the task (and added it again,
    its versions restarting at 1) while it ran. Committing would attach it to another task's data."""
    for (task, version), source in started_from.items():
        if _source(manifest, ("task", task, version)) == source:
            continue
        again = (f"Reopen the registry (or call reload()) to see what it holds now, and {what} again if that is "
                 "still what you want.")
        if task not in manifest["tasks"]:
            raise TaskNotFoundError(f"Task {task!r} was removed by another writer while this {what} ran, from its "
                                    f"v{version}. Nothing was written. {again}")
        now = "holds other files" if _source(manifest, ("task", task, version)) else "is gone"
        raise RegistryError(f"Task {task!r} was removed and added again by another writer while this {what} ran: "
                            f"its v{version}, which the {what} started from, now {now}. Nothing was written. {again}")


def _merge_key(name: str, task: str | None = None) -> str:
    """Key of merged entry ``name`` in the adapter bank (with ``task``: of that task's own adapter or head).

    Task versions are keyed ``<task>__v<N>`` and names never hold ':', so no merge key equals
    a task key, and a merge's keys are found exactly, never by prefix.
    """
    return f"{name}__merged" if task is None else f"{name}__merged:{task}"


def _search_grid(config: MergeConfig) -> list[MergeConfig]:
    """λ (and density / drop) candidates around the papers' defaults."""
    method = config.method.removeprefix("peft_")
    if method in ("linear", "dare"):
        scales = [0.2, 0.4, 0.6, 0.8, 1.0]
    else:
        scales = [0.6, 1.0, 1.5, 2.0]
    densities = [0.1, 0.2, 0.5] if method in ("ties", "ties_svd") or config.method == "dare_ties" else [config.density]
    drops = [0.5, 0.9] if method in ("dare", "dare_ties") else [config.drop]
    return [dataclasses.replace(config, scale=s, density=k, drop=p) for s in scales for k in densities for p in drops]


def _normalised(scores: dict[str, float], individual: dict[str, float]) -> float | None:
    """Mean over tasks of merged / individual score (None without scores)."""
    ratios = [scores[t] / individual[t] for t in scores if t in individual and individual[t] > 0]
    return float(np.mean(ratios)) if ratios else None


def _split(examples: Examples, fraction: float, seed: int, task: str) -> tuple[Examples, Examples]:
    n_val = max(1, round(len(examples) * fraction))
    if len(examples) - n_val < 1:
        raise DataError(f"Task {task!r}: {len(examples)} new example(s) are too few to hold some out for "
                        "validation; pass validation=... or more data.")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return examples.select(sorted(order[n_val:])), examples.select(sorted(order[:n_val]))


def _sample_indices(n: int, k: int, seed: int) -> list[int]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[: min(n, k)])


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
