"""Committing to a registry: a new task version or merged entry is written under the writer lock,
against the manifest on disk (never a stale copy), and only if what it was computed from is still
there unchanged. Under torchrun only rank 0 writes; the other ranks read what it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from cmtl._io import tensors_to_bytes
from cmtl.core.tasks import TaskSpec
from cmtl.errors import (BackboneMismatchError, EntryExistsError, RegistryError, TaskExistsError, TaskNotFoundError,
                         WriteConflictError)
from cmtl.registry import store
from cmtl.registry.manifest import backbone_changes
from cmtl.registry.reader import now, source
from cmtl.training import distributed

Manifest = dict[str, Any]
#: The task versions an update or merge was computed from, and their sources (reader.version_source); an add_task
#: started from a merged entry names it as ``("merge", name, None)`` (its source: reader.source).
StartedFrom = dict[tuple[str, int] | tuple[str, str, None], str]


def read_manifest(root: Path, backbone: dict[str, Any]) -> Manifest:
    """The manifest on disk, refused if it records another backbone than ``backbone`` (the record of
    the manifest the caller opened)."""
    manifest = store.read_manifest(root)
    changes = backbone_changes(backbone, manifest["backbone"])
    if changes:
        raise BackboneMismatchError(
            f"The registry {str(root)!r} now records another backbone than this object runs "
            f"({', '.join(changes)}): "
            "it was replaced (deleted and created again?) since this object opened it. Adapters only work on "
            f"the backbone they were trained on, so its manifest was not taken in. Open it anew with "
            f"Registry.open({str(root)!r})."
        )
    return manifest


def create(root: Path, backbone: dict[str, Any]) -> Manifest:
    """Write the manifest of a new, empty registry on ``backbone`` (its record) into ``root``.

    Raises:
        RegistryError: ``root`` holds a registry: another process created it since the caller looked.
    """
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": store.FORMAT, "created": now(), "backbone": backbone, "tasks": {}}
    with store.writer_lock(root):
        if (root / store.MANIFEST).exists():  # checked again under the lock: never replace another's registry
            raise RegistryError(f"{str(root)!r} already holds a registry (another process created it meanwhile). "
                                f"Open it with Registry.open({str(root)!r}), or create one in another folder.")
        store.write_manifest(root, manifest)
    return manifest


def on_main(write: Callable[[], Manifest], read: Callable[[], Manifest]) -> Manifest:
    """``write()`` on rank 0 (every rank when not distributed), ``read()`` on the others once it is done."""
    if not distributed.is_main():
        distributed.barrier()
        return read()
    try:
        return write()
    finally:
        distributed.barrier()


def version_files(adapter_state: dict[str, torch.Tensor], head_state: dict[str, torch.Tensor],
                  extra: dict[str, bytes] | None) -> dict[str, bytes]:
    return {"adapter.safetensors": tensors_to_bytes(adapter_state), "head.safetensors": tensors_to_bytes(head_state),
            **(extra or {})}


def entry_files(adapter_state: dict[str, torch.Tensor], heads: dict[str, dict[str, torch.Tensor]],
                task_adapters: dict[str, dict[str, torch.Tensor]] | None) -> dict[str, bytes]:
    """A merged or joint entry's files: one adapter, the heads (``<task>.<key>``), per-task adapters."""
    files = {"adapter.safetensors": tensors_to_bytes(adapter_state),
             "heads.safetensors": tensors_to_bytes(
                 {f"{t}.{k}": v for t, state in heads.items() for k, v in state.items()})}
    if task_adapters:
        files["task_adapters.safetensors"] = tensors_to_bytes(
            {f"{t}.{k}": v for t, state in task_adapters.items() for k, v in state.items()})
    return files


def write_version(root: Path, backbone: dict[str, Any], spec: TaskSpec, record: dict[str, Any],
                  files: dict[str, bytes], *, new_task: bool, memory: dict[str, Any] | None, make_current: bool,
                  started_from: StartedFrom | None = None) -> Manifest:
    """Write a version's files, then the manifest that names it (and, with ``make_current``, makes it
    current); ``record`` gains the files' checksums. An update whose parent is no longer current (the
    task was rolled back meanwhile) is stored but not made current: ``record``'s ``promoted`` and
    ``note`` say so. Returns the manifest written."""
    with store.writer_lock(root):
        manifest = read_manifest(root, backbone)
        if new_task and spec.name in manifest["tasks"]:
            raise TaskExistsError(f"Task {spec.name!r} was added by another process meanwhile.")
        if new_task:
            check_started_from(manifest, started_from or {}, "add_task")  # the init= source it started from
        else:
            entry = manifest["tasks"].get(spec.name)
            if entry is None:
                raise store.removed_error(f"Task {spec.name!r}", sorted(manifest["tasks"]))
            check_started_from(manifest, started_from or {}, "update")
            if any(r["version"] == record["version"] for r in entry["versions"]):
                raise WriteConflictError(f"Task {spec.name!r} v{record['version']} was written by another process "
                                    "meanwhile. Reopen the registry and retry.")
        store.remove_unreferenced(root, manifest)
        record["files"] = store.write_version_files(root, spec.name, record["version"], files)
        entry = manifest["tasks"].setdefault(spec.name, {"spec": spec.to_dict(), "versions": []})
        if memory is not None:
            entry["memory"] = memory
        if make_current and not new_task and entry["current"] != record["parent"]:
            # A rollback (or another update) moved the task while this update ran from its parent: making this
            # version current would silently undo that. Store it, not current, and say so.
            record["promoted"], make_current = False, False
            record["note"] = (f"{record.get('note') or ''} Not made current: task {spec.name!r} moved from "
                              f"v{record['parent']} to v{entry['current']} while this update ran (a rollback or "
                              f"another update). If it should answer, rollback({spec.name!r}, {record['version']}) "
                              "makes it current.").strip()
        entry["versions"].append(record)
        if make_current:
            entry["current"] = record["version"]
        store.write_manifest(root, manifest)
    return manifest


def write_entry(root: Path, backbone: dict[str, Any], record: dict[str, Any], files: dict[str, bytes],
                started_from: StartedFrom | None = None) -> Manifest:
    """Write a merged or joint entry's files, then name it in the manifest. Returns the manifest written."""
    name = record["name"]
    with store.writer_lock(root):
        manifest = read_manifest(root, backbone)
        if name in manifest.get("merges", {}):
            raise EntryExistsError(f"An entry named {name!r} was written by another process meanwhile.")
        check_started_from(manifest, started_from or {}, "merge")
        store.remove_unreferenced(root, manifest)
        record["files"] = store.write_folder(root, store.merge_dir(root, name), files)
        manifest.setdefault("merges", {})[name] = record
        store.write_manifest(root, manifest)
    return manifest


def check_started_from(manifest: Manifest, started_from: StartedFrom, what: str) -> None:
    """Refuse to commit an ``what`` ("update", "merge", "add_task") computed from task versions that ``manifest`` (read
    under the writer lock) no longer holds unchanged: another writer removed the task (and added it again,
    its versions restarting at 1) while it ran, or removed a merged entry it started from (and made another under the
    name). Committing would attach it to another task's data."""
    for key, expected in started_from.items():
        if len(key) == 3:
            _check_merge_unchanged(manifest, key, expected, what)
            continue
        task, version = key
        if source(manifest, ("task", task, version)) == expected:
            continue
        again = _again(what)
        if task not in manifest["tasks"]:
            raise TaskNotFoundError(f"Task {task!r} was removed by another writer while this {what} ran, from its "
                                    f"v{version}. Nothing was written. {again}")
        now = "holds other files" if source(manifest, ("task", task, version)) else "is gone"
        raise WriteConflictError(f"Task {task!r} was removed and added again by another writer while this {what} ran: "
                            f"its v{version}, which the {what} started from, now {now}. Nothing was written. {again}")


def _again(what: str) -> str:
    """What to do after another writer changed what the ``what`` started from."""
    return (f"Reopen the registry (or call reload()) to see what it holds now, and {what} again if that is still "
            "what you want.")


def _check_merge_unchanged(manifest: Manifest, owner: tuple[str, str, None], expected: str, what: str) -> None:
    """Refuse the ``what`` that started from merged entry ``owner`` if ``manifest`` no longer holds it as it was."""
    if source(manifest, owner) == expected:
        return
    name, again = owner[1], _again(what)
    if name not in manifest.get("merges", {}):
        raise TaskNotFoundError(f"Merge {name!r} was removed by another writer while this {what} ran from it. Nothing "
                                f"was written. {again}")
    raise WriteConflictError(f"Merge {name!r} was removed and made again by another writer while this {what} ran from "
                             f"it: the entry under that name now holds other files. Nothing was written. {again}")


def check_not_removed(known: Manifest, manifest: Manifest, *, task: str | None = None,
                      merge: str | None = None) -> None:
    """A ``task`` or ``merge`` that ``known`` (the caller's copy) holds but ``manifest`` (on disk, read
    under the writer lock) does not: another writer removed it since, a TaskNotFoundError saying so."""
    if task is not None and task in known["tasks"] and task not in manifest["tasks"]:
        raise store.removed_error(f"Task {task!r}", sorted(manifest["tasks"]))
    if merge is not None and merge in known.get("merges", {}) and merge not in manifest.get("merges", {}):
        raise store.removed_error(f"Merge {merge!r}", sorted(manifest.get("merges", {})))
