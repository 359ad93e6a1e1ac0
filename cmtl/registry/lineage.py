"""Manifest-only operations: a registry's records, and moving a task's current version, without loading
its backbone. ``cmtl ls``, ``versions`` and ``rollback`` use them (no torch is imported), and so does
:meth:`Registry.rollback`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        InvalidParameterError: ``version`` is not an int.
    """
    version = RegistryReader(root, manifest)._version_record(task, version)["version"]  # the stored int
    manifest["tasks"][task]["current"] = version
    store.remove_unreferenced(root, manifest)
    store.write_manifest(root, manifest)
    return version


def rollback(root: str | Path, task: str, version: int) -> VersionInfo:
    """:meth:`Registry.rollback` on the registry at ``root``, without opening it: the manifest is read
    under the writer lock, so a concurrent writer is waited for, not overwritten."""
    root = Path(root)
    with store.writer_lock(root):
        manifest = store.read_manifest(root)
        set_current(root, manifest, task, version)
    return RegistryReader(root, manifest).current(task)
