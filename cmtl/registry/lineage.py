"""Manifest-only operations: a registry's records, and moving a task's current version, without loading
its backbone. ``cmtl ls``, ``versions`` and ``rollback`` use them (no torch is imported), and so does
:meth:`Registry.rollback`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmtl.errors import CorruptFileError
from cmtl.registry import store
from cmtl.registry.reader import RegistryReader, VersionInfo


def read(root: str | Path) -> RegistryReader:
    """The records of the registry at ``root``, read from its manifest alone.

    Raises:
        RegistryError: no registry at ``root``, or its manifest is damaged.
    """
    root = Path(root)
    return RegistryReader(root, store.read_manifest(root))


def set_current(root: Path, manifest: dict[str, Any], task: str, version: int) -> int:
    """Make ``version`` of ``task`` current in ``manifest``, write it and remove the files no entry names
    any more; returns the stored version number. Call under :func:`cmtl.registry.store.writer_lock`.

    Raises:
        TaskNotFoundError: no such task or version (nothing is written).
        CorruptFileError: a file of that version is missing or differs from its checksum (nothing is
            written).
        InvalidParameterError: ``version`` is not an int.
    """
    record = RegistryReader(root, manifest)._version_record(task, version)
    version = record["version"]  # the stored int
    folder = store.version_dir(root, task, version)
    for name, sha256 in record["files"].items():  # a version that cannot answer must not become current
        try:
            store.read_checked(folder / name, sha256)
        except CorruptFileError as exc:
            raise CorruptFileError(f"Task {task!r} v{version} cannot be made current: {exc} Nothing was "
                                   "written.") from None
    manifest["tasks"][task]["current"] = version
    store.remove_unreferenced(root, manifest)
    store.write_manifest(root, manifest)
    return version


def keep_merge_specs(root: Path, manifest: dict[str, Any], task: str) -> None:
    """Before ``task`` is removed from ``manifest``: write into each merged entry that holds it but was made
    before merges recorded their members' specs the spec it answers with until now (the task's current
    one), so that a task added again under the name cannot relabel the merge's answers."""
    reader = RegistryReader(root, manifest)
    for record in manifest.get("merges", {}).values():
        if task in record["tasks"] and task not in record.get("specs", {}):
            record.setdefault("specs", {})[task] = reader._merge_spec(record, task).to_dict()


def rollback(root: str | Path, task: str, version: int) -> VersionInfo:
    """:meth:`Registry.rollback` on the registry at ``root``, without opening it: the manifest is read
    under the writer lock, so a concurrent writer is waited for, not overwritten."""
    root = Path(root)
    with store.writer_lock(root):
        manifest = store.read_manifest(root)
        set_current(root, manifest, task, version)
    return RegistryReader(root, manifest).current(task)
