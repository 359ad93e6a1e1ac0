"""On-disk layout of a registry, and the atomic writes that keep it readable.

::

    <root>/registry.json                 the manifest: the only source of truth
    <root>/.lock                         held (flock) by a writer
    <root>/tasks/<task>/v<N>/adapter.safetensors
    <root>/tasks/<task>/v<N>/head.safetensors
    <root>/tasks/<task>/v<N>/replay.parquet      replay buffer after training this version (optional)
    <root>/tasks/<task>/v<N>/holdout.parquet     sample of this version's validation data (optional)
    <root>/merges/<name>/adapter.safetensors     a merged adapter
    <root>/merges/<name>/heads.safetensors       the heads of the tasks it serves

A version's files are written into a staging folder, fsynced and renamed into
place; only then is the manifest replaced (temp file + ``os.replace``). A
crash at any point therefore leaves the previous manifest, which names only
complete files. Folders the manifest does not name are leftovers of such a
crash and are removed by the next writer. Tensors are safetensors, everything
else parquet or JSON: loading never unpickles. Each file's SHA-256 is in the
manifest and checked on load.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from cmtl._version import __version__
from cmtl.errors import CorruptFileError, RegistryError

MANIFEST = "registry.json"
FORMAT = 1


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def read_checked(path: Path, expected_sha256: str) -> bytes:
    """A file's bytes, after checking them against the manifest's checksum.

    Raises:
        CorruptFileError: the file is missing or its SHA-256 differs.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CorruptFileError(f"File {str(path)!r} named in the manifest is missing.") from exc
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        raise CorruptFileError(
            f"File {str(path)!r} is corrupt or truncated: SHA-256 {actual[:12]}… does not match the manifest's "
            f"{expected_sha256[:12]}…. Roll the task back to another version or retrain it."
        )
    return data


def read_tensors(path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it against the manifest's checksum."""
    return load_safetensors(read_checked(path, expected_sha256))


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.exists():
        raise RegistryError(
            f"No registry at {str(root)!r}: {MANIFEST} is missing. Create one with Registry.create({str(root)!r})."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RegistryError(f"The manifest {str(path)!r} is not valid JSON: {exc}.") from exc
    if manifest.get("format") != FORMAT:
        raise RegistryError(
            f"Registry {str(root)!r} has format {manifest.get('format')!r}; this cmtl ({__version__}) reads "
            f"format {FORMAT}."
        )
    return manifest


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest atomically, bumping its generation counter (readers poll it)."""
    manifest["generation"] = int(manifest.get("generation", 0)) + 1
    manifest["cmtl_version"] = __version__
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_bytes_atomic(root / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def version_dir(root: Path, task: str, version: int) -> Path:
    return root / "tasks" / task / f"v{version}"


def write_version_files(root: Path, task: str, version: int, files: dict[str, bytes]) -> dict[str, str]:
    """Stage, fsync and rename a version's files into place; return their SHA-256 by file name.

    Call under :func:`writer_lock`, before the manifest that names them is written.
    """
    return write_folder(version_dir(root, task, version), files)


def merge_dir(root: Path, name: str) -> Path:
    return root / "merges" / name


def write_folder(final: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Write ``files`` into a staging folder beside ``final``, fsync, rename it to ``final``; return SHA-256s."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".staging-{final.name}-{uuid.uuid4().hex}"
    staging.mkdir()
    sums = {}
    for name, data in files.items():
        with open(staging / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sums[name] = sha256_bytes(data)
    _fsync_dir(staging)
    if final.exists():  # a leftover of a crash: the manifest never named it
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    return sums


def remove_unreferenced(root: Path, manifest: dict[str, Any]) -> None:
    """Delete task versions and merges the manifest does not name (crash leftovers, removed entries)."""
    tasks_root = root / "tasks"
    if tasks_root.exists():
        for task_dir in tasks_root.iterdir():
            entry = manifest["tasks"].get(task_dir.name)
            if entry is None:
                shutil.rmtree(task_dir, ignore_errors=True)
                continue
            keep = {f"v{v['version']}" for v in entry["versions"]}
            for child in task_dir.iterdir():
                if child.name.startswith(".staging-") or (child.name.startswith("v") and child.name not in keep):
                    shutil.rmtree(child, ignore_errors=True)
    merges_root = root / "merges"
    if merges_root.exists():
        for child in merges_root.iterdir():
            if child.name not in manifest.get("merges", {}):
                shutil.rmtree(child, ignore_errors=True)


@contextlib.contextmanager
def writer_lock(root: Path, timeout: float = 60.0) -> Iterator[None]:
    """Hold the registry's exclusive write lock (one writer at a time, across processes)."""
    with open(root / ".lock", "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"Registry {str(root)!r} is locked by another writer for over {timeout:.0f} s."
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
