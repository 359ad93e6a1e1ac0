"""Multi-task inference: one backbone forward for a batch that mixes tasks.

An :class:`InferenceEngine` reads a registry's current task versions and merged entries
into one immutable :class:`Snapshot`: every adapter's LoRA factors stacked per adapted
module (``A`` (K, R, in) and ``B`` (K, out, R), scaling folded into ``B``, smaller ranks
zero-padded) and every task head. A forward hook on each adapted linear layer adds, for
row ``b`` served by adapter ``k_b``, the low-rank term ``x_b · A_{k_b}ᵀ · B_{k_b}ᵀ``, as two
batched matrix products over gathered factors (no loop over rows or adapters). Each row's
pooled vector then goes through its own task's head (one call per task present).

:meth:`InferenceEngine.refresh` builds a new snapshot when the registry's manifest
changes (an update, rollback, merge; any byte of it, not only its generation: a registry
deleted and re-created at the same path reaches the same generation with other content)
and swaps it in with one assignment: a batch that started on the old snapshot finishes on
it, so hot swaps never fail a request. A manifest that records another backbone than the
one loaded is refused (its adapters only fit their own backbone); the old snapshot stays.
A caller that must answer from one generation across several calls (a server request
queued for a later batch) takes ``engine.snapshot`` once and passes it as ``snapshot=``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from cmtl.core.adapters import (PEFT_PREFIX, AdapterConfig, check_adapter_state, hook_row_lora, linear_dims,
                                lora_factors)
from cmtl.core.backbone import Backbone, BackboneConfig, load_backbone
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, as_texts, batches, token_budget_chunks
from cmtl.errors import BackboneMismatchError, DataError, ManifestError, TaskNotFoundError
from cmtl.registry import heads, store
from cmtl.registry.manifest import backbone_changes, backbone_config, refuse_other_settings
from cmtl.registry.reader import RegistryReader, version_spec
from cmtl.registry.runtime import entry_adapters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where requests for one (task, merge) go: adapter slot and head."""

    task: str
    merge: str | None
    version: int | None
    slot: int
    spec: TaskSpec
    head: nn.Module  # TaskHead or AnalyticHead


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of a registry generation, ready to serve."""

    generation: Any
    routes: dict[tuple[str, str | None], Route]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (K, R, in), B (K, out, R))
    ranks: torch.Tensor  # (K,) rank of each slot
    manifest_sha256: str = ""  # of the manifest it was built from: any change to it means a new snapshot

    @property
    def tasks(self) -> list[str]:
        return sorted({t for t, m in self.routes if m is None})

    @property
    def merges(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for task, merge in self.routes:
            if merge is not None:
                out.setdefault(merge, []).append(task)
        return {m: sorted(ts) for m, ts in sorted(out.items())}

    def route(self, task: str, merge: str | None = None) -> Route:
        found = self.routes.get((task, merge))
        if found is None:
            if merge is not None and merge not in self.merges:
                raise TaskNotFoundError(f"No merged entry {merge!r}. Merges: {sorted(self.merges)}.")
            where = f"merge {merge!r}" if merge else "this registry"
            have = self.merges[merge] if merge else self.tasks
            raise TaskNotFoundError(f"No task {task!r} in {where}. Tasks: {have}.")
        return found


class InferenceEngine:
    """Serves every task (and merged entry) of a registry with one copy of the backbone.

    Args:
        registry: The registry folder.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        max_batch_size: Rows per backbone forward, at most.
        max_batch_tokens: Padded tokens (rows × longest row) per backbone forward, at most: a
            call's rows are sorted by length and cut so that long texts do not pad short ones.
        backbone: Load this backbone instead of the recorded one (its weights must match).
    """

    def __init__(self, registry: str | Path, *, device: str = "auto", max_batch_size: int = 64,
                 max_batch_tokens: int = 4096, backbone: BackboneConfig | None = None):
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch_size and max_batch_tokens must be >= 1. Got {max_batch_size} and "
                             f"{max_batch_tokens}.")
        self.root = Path(registry)
        manifest = store.read_manifest(self.root)
        recorded = manifest["backbone"]
        config = backbone or backbone_config(recorded)
        self.backbone: Backbone = load_backbone(config, device=device)
        refuse_other_settings(recorded, self.backbone.config, f"Registry {str(self.root)!r}")
        self.backbone.check_matches(recorded["sha256"], f"registry {str(self.root)!r}",
                                    tokenizer_sha256=recorded.get("tokenizer_sha256"),
                                    model_config=recorded.get("model_config"))
        self._recorded_backbone = dict(recorded)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self._hooked: set[str] = set()
        self._batch: tuple[Snapshot, torch.Tensor, int] | None = None  # set only during a forward
        self._forward_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self.snapshot = self._build(manifest)

    # --- registry changes ------------------------------------------------------------

    def refresh(self) -> bool:
        """Load the registry's newest state if its manifest changed; return whether it did.

        Any change of the manifest counts, not only a new generation (a registry deleted and
        re-created at the same path can reach the old generation with other content). On an
        error (e.g. a file removed by a concurrent change) the old snapshot stays and the
        error propagates; the next call tries again.

        Raises:
            BackboneMismatchError: the manifest now records another backbone (weights or
                settings) than the one this engine loaded.
        """
        with self._refresh_lock:
            manifest = store.read_manifest(self.root)
            if _manifest_sha256(manifest) == self.snapshot.manifest_sha256:
                return False
            self._check_backbone(manifest["backbone"])
            snapshot = self._build(manifest)
            self.snapshot = snapshot  # one assignment: in-flight batches keep their own reference
            logger.info("Serving registry generation %s: %d tasks, %d merges", snapshot.generation,
                        len(snapshot.tasks), len(snapshot.merges))
            return True

    def _check_backbone(self, recorded: dict[str, Any]) -> None:
        """Refuse a manifest whose backbone is not the one loaded: its adapters and heads were
        trained on other weights (or another pooling, max_length), and would answer wrongly."""
        # The folder may differ (the engine may load the same weights from elsewhere); the hash is checked.
        changes = backbone_changes(self._recorded_backbone, recorded, ignore=("name_or_path",))
        if not changes:
            return
        raise BackboneMismatchError(
            f"Registry {str(self.root)!r} now records backbone {recorded.get('name_or_path')!r} "
            f"({', '.join(changes)}, from the one this engine loaded): it was replaced by a registry built on "
            f"another backbone. Still serving generation "
            f"{self.snapshot.generation!r}; restore the registry, or start a new InferenceEngine (restart the "
            "server) to serve the new one."
        )

    def _build(self, manifest: dict[str, Any]) -> Snapshot:
        adapters: list[tuple[dict[str, torch.Tensor], float]] = []
        routes: dict[tuple[str, str | None], Route] = {}
        specs = {name: version_spec(entry, _current_record(name, entry)) for name, entry in manifest["tasks"].items()}
        for task, entry in sorted(manifest["tasks"].items()):
            record = _current_record(task, entry)
            folder = store.version_dir(self.root, task, record["version"])
            state = store.read_tensors(folder / "adapter.safetensors", record["files"]["adapter.safetensors"])
            head_state = store.read_tensors(folder / "head.safetensors", record["files"]["head.safetensors"])
            config = AdapterConfig.from_dict(record["adapter"])
            check_adapter_state(state, config, self.backbone.encoder, folder / "adapter.safetensors")
            adapters.append((state, config.scaling))
            routes[(task, None)] = Route(task, None, record["version"], len(adapters) - 1, specs[task],
                                         self._head(specs[task], record, head_state, folder / "head.safetensors"))
        reader = RegistryReader(self.root, manifest)
        for name, record in sorted(manifest.get("merges", {}).items()):
            folder = store.merge_dir(self.root, name)
            stored = store.read_tensors(folder / "heads.safetensors", record["files"]["heads.safetensors"])
            # One shared adapter (key None), or one per task for a joint entry with per-task adapters.
            adapters_of = entry_adapters(self.root, record)
            for state, config in adapters_of.values():
                check_adapter_state(state, config, self.backbone.encoder, folder / "adapter.safetensors")
            if None in adapters_of:
                state, config = adapters_of[None]
                adapters.append((state, config.scaling))
            for task in record["tasks"]:
                spec = reader._merge_spec(record, task)  # recorded; an older entry's: its merged version's
                if spec is None:  # an older merge whose task was removed since: its head has no spec
                    continue
                if task in adapters_of:
                    state, config = adapters_of[task]
                    adapters.append((state, config.scaling))
                head_state = {k[len(task) + 1:]: v for k, v in stored.items() if k.startswith(f"{task}.")}
                routes[(task, name)] = Route(task, name, None, len(adapters) - 1, spec,
                                             self._head(spec, None, head_state, folder / "heads.safetensors"))
        factors, ranks = self._stack(adapters)
        new = [m for m in factors if m not in self._hooked]
        if new:
            with self._forward_lock:  # no forward runs while hooks are added (refresh runs beside serving)
                for module in new:
                    self._hook(module)
        return Snapshot(manifest.get("generation"), routes, factors, ranks, _manifest_sha256(manifest))

    def _head(self, spec: TaskSpec, record: dict[str, Any] | None, state: dict[str, torch.Tensor],
              path: Path) -> nn.Module:
        """A task version's head (``record``: its version record; ``None`` for a merged entry's linear heads)."""
        return heads.build(self.backbone.hidden_size, spec, record, state, path, self.backbone.device)

    def _stack(self, adapters: list[tuple[dict[str, torch.Tensor], float]]):
        """Per module: A (K, R, in) and scaling · B (K, out, R), zero for slots that do not adapt it."""
        parts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # encoder path -> slot -> (A, B)
        for slot, (state, _) in enumerate(adapters):
            for module, ab in lora_factors(state).items():
                parts.setdefault(module.removeprefix(PEFT_PREFIX), {})[slot] = ab
        ranks = torch.zeros(len(adapters), dtype=torch.long)
        for slots in parts.values():
            for slot, (a_slot, _) in slots.items():
                ranks[slot] = max(int(ranks[slot]), a_slot.shape[0])
        R, K = max(int(ranks.max()) if len(ranks) else 0, 1), max(len(adapters), 1)
        device = self.backbone.device
        factors = {}
        for module, slots in parts.items():
            any_a, any_b = next(iter(slots.values()))
            a = torch.zeros(K, R, any_a.shape[1])
            b = torch.zeros(K, any_b.shape[0], R)
            for slot, (a_slot, b_slot) in slots.items():
                r = a_slot.shape[0]
                a[slot, :r] = a_slot
                b[slot, :, :r] = b_slot * adapters[slot][1]
            factors[module] = (a.to(device), b.to(device))
        return factors, ranks

    def _hook(self, module_name: str) -> None:
        if module_name in self._hooked:
            return
        try:
            module = self.backbone.encoder.get_submodule(module_name)
        except AttributeError as exc:
            raise DataError(f"An adapter in {str(self.root)!r} targets {module_name!r}, which the backbone lacks.") from exc
        if linear_dims(module) is None:
            raise DataError(f"An adapter targets {module_name!r}, a {type(module).__name__}; only linear layers "
                            "(nn.Linear, transformers' Conv1D) are served.")
        hook_row_lora(module, lambda: self._rows(module_name))
        self._hooked.add(module_name)

    def _rows(self, module_name: str) -> tuple[torch.Tensor, torch.Tensor, None] | None:
        """The batch's per-row factors of ``module_name`` (scaling folded into B), or None outside a batch."""
        if self._batch is None:
            return None
        snapshot, rows, rank = self._batch
        factors = snapshot.factors.get(module_name)
        if factors is None:
            return None
        return factors[0][rows, :rank], factors[1][rows, :, :rank], None  # (B, r, in), (B, out, r)

    # --- inference -------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, tasks: Sequence[str], texts: Sequence[str], *, merges: Sequence[str | None] | None = None,
               pairs: Sequence[str | None] | None = None, snapshot: Snapshot | None = None) -> list[torch.Tensor]:
        """Logits of row ``i`` of ``texts`` for ``tasks[i]`` (through ``merges[i]`` if given), in order,
        from ``snapshot`` (default: the newest one loaded).

        Raises:
            TaskNotFoundError: an unknown task or merge (nothing runs).
            DataError: lengths differ, or a text is not a string or not valid Unicode.
        """
        return self._infer(tasks, texts, merges, pairs, snapshot)[1]

    def _infer(self, tasks, texts, merges, pairs, snapshot: Snapshot | None = None
               ) -> tuple[list[Route], list[torch.Tensor]]:
        n = len(texts)
        merges = list(merges) if merges is not None else [None] * n
        if len(tasks) != n or len(merges) != n or (pairs is not None and len(pairs) != n):
            raise DataError(f"Got {n} texts, {len(tasks)} tasks, {len(merges)} merges"
                            + (f", {len(pairs)} pairs" if pairs is not None else "") + ": one per row.")
        texts = as_texts(texts) if n else []  # strings, valid Unicode (what the tokenizer needs)
        if pairs is not None and any(p is not None for p in pairs):
            as_texts([p for p in pairs if p is not None])
        snapshot = snapshot or self.snapshot  # one call runs on one snapshot, whatever refresh() does meanwhile
        routes = [snapshot.route(t, m) for t, m in zip(tasks, merges)]
        for i, route in enumerate(routes):
            needs_pair = route.spec.text_pair_column is not None
            has_pair = pairs is not None and pairs[i] is not None
            if needs_pair != has_pair:
                raise DataError(f"Row {i}: task {route.task!r} {'needs' if needs_pair else 'takes no'} text pair.")
        out: list[torch.Tensor | None] = [None] * n
        with_pairs = [i for i in range(n) if pairs is not None and pairs[i] is not None]
        without = [i for i in range(n) if not (pairs is not None and pairs[i] is not None)]
        for group in (without, with_pairs):
            if group:
                self._run(snapshot, [routes[i] for i in group], [texts[i] for i in group],
                          [pairs[i] for i in group] if group is with_pairs else None, group, out)
        return routes, out  # type: ignore[return-value]

    def _run(self, snapshot: Snapshot, routes: list[Route], texts: list[str], pairs: list[str] | None,
             positions: list[int], out: list) -> None:
        enc = self.backbone.tokenize(texts, pairs)
        types = enc.get("token_type_ids") if pairs is not None else None
        encoded = Encoded(list(enc["input_ids"]), types, None, torch.tensor([r.slot for r in routes]))
        device = self.backbone.device
        for chunk in token_budget_chunks(encoded, self.max_batch_size, self.max_batch_tokens):
            idx, inputs, _ = next(batches(encoded, chunk, len(chunk), self.backbone.pad_id, device))
            slots = inputs.pop("groups")
            with self._forward_lock:
                self._batch = (snapshot, slots, max(int(snapshot.ranks[slots.cpu()].max()), 1))  # ranks stay on the CPU
                try:
                    pooled = self.backbone.embed(**inputs)  # (B, H)
                finally:
                    self._batch = None
            rows = [routes[i] for i in idx]
            for key in {(r.task, r.merge) for r in rows}:
                picked = [j for j, r in enumerate(rows) if (r.task, r.merge) == key]
                logits = snapshot.routes[key].head(pooled[picked]).float().cpu()
                for j, row_logits in zip(picked, logits):
                    out[positions[idx[j]]] = row_logits

    def predict(self, tasks: Sequence[str], texts: Sequence[str], *, merges: Sequence[str | None] | None = None,
                pairs: Sequence[str | None] | None = None, snapshot: Snapshot | None = None) -> list[dict[str, Any]]:
        """Per row: ``{"task", "version", "merge", "label", "probabilities": {label: p}}``
        (``"value"`` instead of label and probabilities for regression), from ``snapshot``
        (default: the newest one loaded)."""
        routes, rows = self._infer(tasks, texts, merges, pairs, snapshot)
        return [self._decode(route, logits, i) for i, (route, logits) in enumerate(zip(routes, rows))]

    def predict_all(self, texts: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """Every task's prediction for every text (tasks without text pairs), as one mixed batch."""
        snapshot = self.snapshot
        tasks = [t for t in snapshot.tasks if snapshot.route(t).spec.text_pair_column is None]
        routes, rows = self._infer([t for t in tasks for _ in texts], [x for _ in tasks for x in texts], None, None,
                                   snapshot)
        flat = [self._decode(route, logits, i % len(texts)) for i, (route, logits) in enumerate(zip(routes, rows))]
        return {t: flat[i * len(texts):(i + 1) * len(texts)] for i, t in enumerate(tasks)}

    @staticmethod
    def _decode(route: Route, logits: torch.Tensor, index: int) -> dict[str, Any]:
        """Row ``index`` of the request, answered through ``route``."""
        spec = route.spec
        row = logits.unsqueeze(0)
        spec.check_answered(row, first_row=index)
        served = {"task": route.task, "version": route.version, "merge": route.merge}
        if spec.problem_type == "regression":
            return {**served, "value": spec.decode(row)[0]}
        probs = spec.probabilities(row)[0].tolist()
        return {**served, "label": spec.decode(row)[0], "probabilities": dict(zip(spec.labels, probs))}


def _manifest_sha256(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _current_record(task: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The version record ``entry["current"]`` names.

    Raises:
        ManifestError: the manifest names a current version the task does not hold.
    """
    for record in entry["versions"]:
        if record["version"] == entry["current"]:
            return record
    raise ManifestError(
        f"Task {task!r}: the manifest's current version {entry['current']!r} is not among its versions "
        f"{[r['version'] for r in entry['versions']]}. Set it to one of them, or restore registry.json from a "
        "backup."
    )
