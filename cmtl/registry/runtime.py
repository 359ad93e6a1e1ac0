"""The adapters and heads a registry object has loaded: read from the files its manifest names,
checked, kept while those files stay the same, and run for prediction."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from cmtl.core.adapters import AdapterBank, AdapterConfig, check_adapter_state, stack_lora, unchanged
from cmtl.core.backbone import Backbone
from cmtl.core.heads import TaskHead, check_head_state
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, as_texts, batches, length_sorted
from cmtl.errors import STORED_FILE_FIX, CorruptFileError, DataError, InvalidParameterError, bad_param
from cmtl.registry import heads, store
from cmtl.registry.reader import Owner, RegistryReader, check_one_answerer, head_key, merge_key, source_label
from cmtl.training import transfer
from cmtl.training.config import TrainConfig
from cmtl.training.evaluation import predict_logits
from cmtl.training.trainee import Trainee

State = dict[str, torch.Tensor]


def _finite(value: float) -> float | None:
    """``value`` for a JSON record: ``None`` where it is NaN or infinite."""
    return value if math.isfinite(value) else None


class Runtime:
    """Loaded adapters (one bank on the backbone) and heads, by key, with what each was read from.

    A key's source is its owner (see :data:`~cmtl.registry.reader.Owner`) and the files' SHA-256 and
    specs the manifest named (:func:`~cmtl.registry.reader.source`); a key whose owner the manifest
    now describes otherwise is stale: unloaded, and loaded afresh when asked for.
    """

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.bank = AdapterBank(backbone.encoder)
        self.heads: dict[str, nn.Module] = {}  # TaskHead or AnalyticHead (cmtl.registry.heads)
        self.sources: dict[str, tuple[Owner, str | None]] = {}
        # One active adapter at a time: forward passes of different tasks must not interleave.
        self.lock = threading.RLock()

    def adopt(self, reader: RegistryReader) -> None:
        """Unload every adapter and head loaded from files ``reader``'s manifest no longer names."""
        for key, (owner, source) in list(self.sources.items()):
            if reader._source(owner) != source:
                self.unload([key])

    def unload(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.bank.remove(key)
            self.heads.pop(key, None)
            self.sources.pop(key, None)

    def unload_owned(self, owner: Owner, keys: Sequence[str] = ()) -> None:
        """Drop what ``owner`` loaded, and ``keys``: by exact key, so a task whose name looks like a
        merge key keeps its own."""
        self.unload([k for k, (o, _) in self.sources.items() if o == owner] + list(keys))

    def unload_task(self, task: str, versions: Sequence[int]) -> None:
        """Drop every adapter and head of ``task``'s ``versions`` (and any other version this object loaded)."""
        self.unload([k for k, (owner, _) in self.sources.items() if owner[:2] == ("task", task)]
                    + [head_key(task, v) for v in versions])

    def num_parameters(self, key: str, head: nn.Module) -> int:
        """Trainable parameters of adapter ``key`` and ``head``."""
        return self.bank.num_parameters(key) + sum(v.numel() for v in head.state_dict().values())

    def keep(self, key: str, head: nn.Module | None, owner: Owner, reader: RegistryReader) -> None:
        """Record a just-written adapter (and head) under ``key`` as loaded from ``owner``'s files."""
        if head is not None:
            self.heads[key] = head
        self.sources[key] = (owner, reader._source(owner))

    def trainee(self, key: str, head: nn.Module | None = None) -> Trainee:
        """Adapter ``key`` with ``head`` (default: the head loaded under ``key``)."""
        return Trainee.adapter(self.backbone, self.bank, key, self.heads[key] if head is None else head)

    def new_head(self, spec: TaskSpec, dropout: float = 0.0) -> TaskHead:
        return TaskHead(self.backbone.hidden_size, spec.num_outputs, dropout).to(self.backbone.device)

    # --- forward transfer -------------------------------------------------------

    def start_from(self, reader: RegistryReader, start: tuple[str, str | None, int | None],
                   requested: AdapterConfig | None, adapter: AdapterConfig, spec: TaskSpec, train: Encoded,
                   validation: Encoded | None, training: TrainConfig, scale: float = 1.0
                   ) -> tuple[State | None, AdapterConfig, dict[str, Any]]:
        """``add_task``'s ``init`` (as :func:`~cmtl.training.transfer.parse_init` reads it): the LoRA weights
        to start from (a copy; ``None``: a fresh adapter configured as ``adapter``), their config, and the
        lineage record. The config is the source's rank, alpha, modules and layers with ``adapter``'s dropout
        (a merge's rank can be larger than its members'). ``"auto"`` probes every current task version and
        every merge whose adapter fits ``requested`` and tries the best of them against a fresh start with
        ``training``'s settings (:mod:`cmtl.training.transfer`); a candidate that cannot be loaded, or whose
        adapter never moved from the backbone (a fresh start by another name), is skipped and named in the
        record; running out of memory is not skipped but raised, for the caller to decide. Candidates loaded
        only for the choice are unloaded again, whatever happens. ``scale`` shrinks the start
        (:func:`~cmtl.training.transfer.scaled`; ``"auto"``'s trial tries the shrunk starts, its probe ranks
        the sources as they are). The record has ``scale`` where a source was used, and the trial's record
        the scale it tried."""
        kind, name, version = start
        scale = float(scale)
        if kind == "auto":
            members = [("task", t, None) for t in reader.tasks()] + [("merge", m, None) for m in reader.merges()]
        else:
            members = [start]
        loaded_before = set(self.sources)
        sources: dict[str, tuple[AdapterConfig, dict[str, Any]]] = {}  # loaded key -> (config, lineage label)
        states: dict[str, State] = {}  # loaded key -> a copy of its LoRA weights, read once
        skipped: dict[str, str] = {}
        try:  # whatever happens, the candidates loaded only for the choice are unloaded again
            for k, n, v in members:
                try:
                    key, config, label = self._source_adapter(reader, k, n, v)
                except torch.OutOfMemoryError:  # not the candidate's fault: the caller decides (auto keeps fresh)
                    raise
                except Exception as error:  # noqa: BLE001 - "auto" skips what it cannot use; a named source raises
                    if kind != "auto":
                        raise
                    skipped[f"{k}:{n}"] = f"{type(error).__name__}: {error}"
                    continue
                mismatch = transfer.compatible(requested, config)
                if mismatch and kind != "auto":
                    raise InvalidParameterError(bad_param(
                        "init", "add_task", "name an adapter that adapter= can continue", f"{k}:{n}",
                        f"Its settings differ: {mismatch}. Leave adapter=None to take the source's settings."))
                if mismatch:
                    skipped[source_label(label)] = f"adapter= differs: {mismatch}"
                    continue
                states[key] = self.bank.state_dict(key)
                if kind == "auto" and unchanged(states[key]):
                    del states[key]
                    skipped[source_label(label)] = ("its adapter never moved (B · A = 0: its training kept the step-0 "
                                                   "probe), so it is the fresh start the trial already tries")
                    continue
                sources[key] = (dataclasses.replace(config, dropout=adapter.dropout), label)
            if kind != "auto":
                (key, (config, label)), = sources.items()
                return transfer.scaled(states[key], scale), config, {**label, "chosen": "named", "scale": scale}
            lineage: dict[str, Any] = {"chosen": "auto"}
            if skipped:
                lineage["skipped"] = skipped
            probe_train, probe_held = transfer.probe_rows(train, validation, training.seed)
            if not len(probe_train) or not len(probe_held):
                return None, adapter, {**lineage, "probe_losses": None, "note": "too few rows to probe; fresh start"}
            losses = transfer.probe_losses(self.backbone, self.bank, [None, *sources], spec, probe_train, probe_held,
                                           batch_size=training.eval_batch_size)
            label = {k: source_label(sources[k][1]) if k is not None else "backbone" for k in losses}
            lineage["probe_losses"] = {label[k]: _finite(v) for k, v in losses.items()}
            tried = transfer.shortlist(losses)
            if not tried:
                return None, adapter, lineage
            starts = {None: (adapter, None), **{k: (sources[k][0], transfer.scaled(states[k], scale)) for k in tried}}
            trials = transfer.trial_losses(self.backbone, self.bank, starts, spec, probe_train, probe_held, training)
            best, scores = transfer.pick_trial(trials)
            lineage["trial"] = {"steps": transfer.TRIAL_STEPS, "z": transfer.TRIAL_Z, "scale": scale,
                                "losses": {("fresh" if k is None else label[k]): _finite(float(v.mean()))
                                           for k, v in trials.items()},
                                "gain_z": {label[k]: _finite(v) for k, v in scores.items()}}
            if best is None:
                return None, adapter, lineage
            config, source = sources[best]
            return starts[best][1], config, {**source, **lineage, "scale": scale}
        finally:
            self.unload([k for k in self.sources if k not in loaded_before])

    def _source_adapter(self, reader: RegistryReader, kind: str, name: str, version: int | None
                        ) -> tuple[str, AdapterConfig, dict[str, Any]]:
        """A task version's or merge's adapter, loaded: (key, config, lineage label)."""
        if kind == "task":
            version = reader._version(name, version)
            config = AdapterConfig.from_dict(reader._version_record(name, version)["adapter"])
            return self.task(reader, name, version), config, {"task": name, "version": version}
        record = reader.merge_info(name)
        if record.get("task_adapter"):
            raise InvalidParameterError(bad_param(
                "init", "add_task", "name a merge with one shared adapter", f"merge:{name}",
                f"Joint entry {name!r} keeps an adapter per task; start from one of its tasks instead."))
        alive = [t for t in record["tasks"] if t in reader.tasks()] or record["tasks"]
        key, _ = self.merge(reader, name, alive[0])
        return key, AdapterConfig.from_dict(record["adapter"]), {"merge": name}

    # --- loading ------------------------------------------------------------------

    def task(self, reader: RegistryReader, task: str, version: int) -> str:
        """Key of ``task`` v``version``'s adapter and head, loaded from the files the manifest names now."""
        key = head_key(task, version)
        record = reader._version_record(task, version)
        owner = ("task", task, version)
        source = (owner, reader._source(owner))
        if key in self.heads and self.sources.get(key) == source:
            return key
        self.unload([key])  # loaded from other files: the task was removed and added again under its name
        folder = store.version_dir(reader.root, task, version)
        adapter_state = store.read_tensors(folder / "adapter.safetensors", record["files"]["adapter.safetensors"])
        head_state = store.read_tensors(folder / "head.safetensors", record["files"]["head.safetensors"])
        # Loaded parameters must be ordinary tensors whatever mode the caller runs in: one created
        # under inference_mode could never be trained from again (an update) in this process.
        with torch.inference_mode(False):
            head = heads.build(self.backbone.hidden_size, reader.spec(task, version=version), record, head_state,
                               folder / "head.safetensors", self.backbone.device)
            self._load_adapter(key, AdapterConfig.from_dict(record["adapter"]), adapter_state,
                               folder / "adapter.safetensors")
        self.heads[key] = head
        self.sources[key] = source
        return key

    def merge(self, reader: RegistryReader, name: str, task: str) -> tuple[str, str]:
        """Keys of the adapter and head that answer ``task`` through merged entry ``name``, loaded from
        the entry's own files: a merge never needs its member tasks' entries."""
        spec = reader.spec(task, merge=name)
        record = reader.merge_info(name)
        folder = store.merge_dir(reader.root, name)
        # A joint entry with per-task adapters answers each task through its own stacked adapter.
        adapter_key = merge_key(name, task if record.get("task_adapter") else None)
        head = merge_key(name, task)
        owner = ("merge", name, None)
        source = (owner, reader._source(owner))
        if any(loaded != source for loaded in self.sources.values() if loaded[0] == owner) or (
                head in self.heads and self.sources.get(head) != source):
            # Loaded from other files: the entry was removed and made again under its name.
            self.unload_merge(name, record["tasks"])
        with torch.inference_mode(False):  # as in task()
            if head not in self.heads:  # the entry's heads load together, once
                stored = store.read_tensors(folder / "heads.safetensors", record["files"]["heads.safetensors"])
                for t in record["tasks"]:
                    spec_t = spec if t == task else reader._merge_spec(record, t)
                    if spec_t is not None:  # None: an older entry's removed task, refused when asked for
                        state = {k[len(t) + 1:]: v for k, v in stored.items() if k.startswith(f"{t}.")}
                        self.heads[merge_key(name, t)] = heads.build(self.backbone.hidden_size, spec_t, None, state,
                                                                     folder / "heads.safetensors", self.backbone.device)
                        self.sources[merge_key(name, t)] = source
            if adapter_key not in self.bank:  # the entry's adapters load together, once
                for which, (state, config) in entry_adapters(reader.root, record).items():
                    if merge_key(name, which) not in self.bank:
                        path = folder / ("adapter.safetensors" if which is None else
                                         "adapter.safetensors + task_adapters.safetensors")
                        self._load_adapter(merge_key(name, which), config, state, path)
                        self.sources[merge_key(name, which)] = source
        return adapter_key, head

    def unload_merge(self, name: str, tasks: list[str]) -> None:
        """Drop merged entry ``name``'s adapters and heads."""
        self.unload_owned(("merge", name, None), [merge_key(name)] + [merge_key(name, t) for t in tasks])

    def _load_adapter(self, key: str, config: AdapterConfig, state: dict[str, torch.Tensor], path: Path) -> None:
        """Put stored LoRA weights into the bank as ``key``, checked against their recorded config first."""
        check_adapter_state(state, config, self.backbone.encoder, path)
        try:
            self.bank.load(key, config, state)
        except DataError as exc:  # tensors missing for some adapted module
            raise CorruptFileError(
                f"File {str(path)!r} does not fit its recorded adapter: {exc} {STORED_FILE_FIX}") from exc

    def keys(self, reader: RegistryReader, task: str, version: int | None, merge: str | None) -> tuple[str, str]:
        """Keys of the adapter and head that answer ``task`` (loaded): a version of it, or through ``merge``."""
        if merge is None:
            key = self.task(reader, task, reader._version(task, version))
            return key, key
        check_one_answerer(version, merge)
        return self.merge(reader, merge, task)

    def members(self, reader: RegistryReader, members: list[tuple[str, int]], specs: dict[str, TaskSpec]
                ) -> tuple[list[State], list[AdapterConfig], dict[str, list[State]]]:
        """The stored LoRA factors, adapter configs and head weights (by task) of merge ``members``, each
        checked against its record and this backbone."""
        states, adapters, head_states = [], [], {}
        for t, v in members:
            folder, record = store.version_dir(reader.root, t, v), reader._version_record(t, v)
            state = store.read_tensors(folder / "adapter.safetensors", record["files"]["adapter.safetensors"])
            adapter = AdapterConfig.from_dict(record["adapter"])
            check_adapter_state(state, adapter, self.backbone.encoder, folder / "adapter.safetensors")
            states.append(state)
            adapters.append(adapter)
        for t, v in members:
            folder, record = store.version_dir(reader.root, t, v), reader._version_record(t, v)
            head = store.read_tensors(folder / "head.safetensors", record["files"]["head.safetensors"])
            check_head_state(head, TaskHead(self.backbone.hidden_size, specs[t].num_outputs), specs[t],
                             folder / "head.safetensors")
            head_states.setdefault(t, []).append(head)
        return states, adapters, head_states

    # --- running ------------------------------------------------------------------

    def predict(self, reader: RegistryReader, task: str, encoded: Encoded, version: int | None,
                merge: str | None) -> torch.Tensor:
        """Logits of ``encoded`` through ``task``'s version (current by default) or through ``merge``."""
        key, head = self.keys(reader, task, version, merge)
        batch_size = 64 if merge is not None else int(
            reader._version_record(task, reader._version(task, version))["training"].get("eval_batch_size", 64))
        return self.logits(key, head, encoded, batch_size)

    def logits(self, key: str, head: str, encoded: Encoded, batch_size: int = 64) -> torch.Tensor:
        """Logits of every row of ``encoded`` through adapter ``key`` and the head loaded as ``head``."""
        self.bank.activate(key)
        forward = self.trainee(key, self.heads[head]).forward
        return predict_logits(forward, encoded, batch_size=batch_size, pad_id=self.backbone.pad_id,
                              device=self.backbone.device)

    def embed(self, texts, key: str | None, batch_size: int = 64, pairs: list[str] | None = None) -> torch.Tensor:
        """Pooled embeddings (N, H) through adapter ``key``, or the plain backbone if ``None``; with ``pairs``,
        of each text read with its pair."""
        enc = self.backbone.tokenize(as_texts(texts), pairs)
        encoded = Encoded(enc["input_ids"], enc.get("token_type_ids") if pairs is not None else None, None)
        out = torch.empty((len(encoded), self.backbone.hidden_size))
        if key is None:
            context = self.bank.disabled()
        else:
            self.bank.activate(key)
            context = contextlib.nullcontext()
        with context, torch.inference_mode():
            for idx, inputs, _ in batches(encoded, length_sorted(encoded), batch_size, self.backbone.pad_id,
                                          self.backbone.device):
                out[idx] = self.backbone.embed(**inputs).float().cpu()
        return out


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
