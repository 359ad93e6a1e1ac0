"""On-disk layout of a registry, and the atomic writes that keep it readable.

::

    <root>/registry.json                 the manifest: the only source of truth
    <root>/.lock                         held (flock) by a writer
    <root>/tasks/<task>/v<N>/adapter.safetensors
    <root>/tasks/<task>/v<N>/head.safetensors
    <root>/tasks/<task>/v<N>/replay.parquet      replay buffer after training this version (optional)
    <root>/tasks/<task>/v<N>/holdout.parquet     sample of this version's validation data (optional)
    <root>/tasks/<task>/v<N>/features.safetensors  what training computed on those rows, for merges
                                                   (optional; :mod:`cmtl.registry.features`)
    <root>/merges/<name>/adapter.safetensors     a merged adapter
    <root>/merges/<name>/heads.safetensors       the heads of the tasks it serves

A version's files are written into a staging folder, fsynced and renamed into
place; only then is the manifest replaced (temp file + ``os.replace``). A
crash at any point therefore leaves the previous manifest, which names only
complete files. The next writer removes what such a crash (or a removal) left,
and nothing else (:func:`remove_unreferenced`): staging folders, the manifest's
temp files, version folders ``tasks/<task>/v<N>`` the manifest does not name,
and folders under ``merges/`` it does not name that hold only a merged entry's
files. Anything else a user puts into the registry (``v1.bak``, an export, a
registry) is left alone.
Tensors are safetensors, everything else parquet or JSON: loading never
unpickles. Each file's SHA-256 is in the manifest and checked on load.

The manifest is checked on every read (:mod:`cmtl.registry.manifest`): its names obey
the same rule as new names, so none can point outside the registry. Every
path a writer creates or deletes is checked to lie inside the root with no
symbolic link on the way; a link is never followed when deleting (a leftover
link is unlinked, a link the registry needs is refused with an error naming
it). A file where the layout has a folder (or a folder where it has a file,
``.lock`` included) is a RegistryError naming it, for readers and writers alike.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from cmtl._io import fsync_dir, settle_dir, sha256_bytes, write_bytes_atomic
from cmtl._version import __version__
from cmtl.errors import CorruptFileError, RegistryError, TaskNotFoundError
from cmtl.registry import manifest as rules

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MANIFEST = "registry.json"
FORMAT = 1
#: Names of the manifest's temp files (see :func:`write_bytes_atomic`); a crash can leave one behind.
_MANIFEST_TMP = re.compile(rf"^\.{re.escape(MANIFEST)}\.[0-9a-f]{{32}}\.tmp$")
#: The names cmtl writes under ``tasks/<task>/`` and ``merges/`` (see :func:`write_folder`): the sweep deletes no other.
_VERSION = re.compile(r"^v[0-9]+$")
_STAGING = re.compile(r"^\.staging-.+-[0-9a-f]{32}$")
#: The files of a merged or joint entry (:func:`cmtl.registry.commit.entry_files`).
_ENTRY_FILES = frozenset(rules.ENTRY_FILES + ("task_adapters.safetensors",))


def read_checked(path: Path, expected_sha256: str) -> bytes:
    """A file's bytes, after checking them against the manifest's checksum.

    Raises:
        CorruptFileError: the file is missing or its SHA-256 differs.
        TaskNotFoundError, RegistryError: the manifest on disk no longer names this file: another
            writer removed or replaced its task version or merged entry after the caller read the manifest.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        _raise_if_stale(path, expected_sha256)
        raise CorruptFileError(f"File {str(path)!r} named in the manifest is missing.") from exc
    except (NotADirectoryError, IsADirectoryError) as exc:
        root = next((p for p in path.parents if (p / MANIFEST).is_file()), path.parent)
        raise (wrong_kind(root, path) or RegistryError(f"Cannot read {str(path)!r}: {exc}.")) from None
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        _raise_if_stale(path, expected_sha256)
        raise CorruptFileError(
            f"File {str(path)!r} is corrupt or truncated: SHA-256 {actual[:12]}… does not match the manifest's "
            f"{expected_sha256[:12]}…. Roll the task back to another version or retrain it."
        )
    return data


def read_tensors(path: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking it against the manifest's checksum (keys in sorted order)."""
    return load_tensors(read_checked(path, expected_sha256))


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of safetensors ``data``, keys in sorted order: safetensors' ``load`` lists them in a
    different order on every call, and code that iterates a state dict must see one order."""
    from safetensors.torch import load as load_safetensors  # here: the manifest-only CLI never imports torch

    return dict(sorted(load_safetensors(data).items()))


def removed_error(what: str, known: list) -> TaskNotFoundError:
    """The error for a task, version or merged entry (``what``: "Task 'x'", "Task 'x' v2", "Merge 'm'")
    that the caller's copy of the manifest still names but another writer has removed since."""
    return TaskNotFoundError(
        f"{what} was removed (by another writer?) after this registry object read the manifest. "
        f"Reopen the registry (or call reload()) to see what it holds now: {known}."
    )


def _raise_if_stale(path: Path, expected_sha256: str) -> None:
    """Raise :func:`removed_error` (or a RegistryError for a replaced file) when the manifest on disk no
    longer names ``path`` with ``expected_sha256``: the caller read an older manifest."""
    parents = path.parents
    if len(parents) > 3 and parents[2].name == "tasks" and (parents[3] / MANIFEST).is_file():
        root, kind, name = parents[3], "tasks", parents[1].name
    elif len(parents) > 2 and parents[1].name == "merges" and (parents[2] / MANIFEST).is_file():
        root, kind, name = parents[2], "merges", parents[0].name
    else:
        return
    manifest = read_manifest(root)
    if kind == "merges":
        record = manifest.get("merges", {}).get(name)
        if record is None:
            raise removed_error(f"Merge {name!r}", sorted(manifest.get("merges", {})))
    else:
        entry = manifest["tasks"].get(name)
        if entry is None:
            raise removed_error(f"Task {name!r}", sorted(manifest["tasks"]))
        record = next((r for r in entry["versions"] if f"v{r['version']}" == parents[0].name), None)
        if record is None:
            raise removed_error(f"Task {name!r} {parents[0].name}", [r["version"] for r in entry["versions"]])
    if record["files"].get(path.name) != expected_sha256:
        raise RegistryError(
            f"File {str(path)!r} was replaced by another writer after this registry object read the manifest "
            "(its entry was removed and written again?). Reopen the registry and retry."
        )


#: The text of the last manifest that passed the check, by path (a few): the server re-reads an
#: unchanged manifest every poll, and the check costs more than the parse on a large registry.
_CHECKED: dict[str, str] = {}
_CHECKED_MAX = 32


def read_manifest(root: Path) -> dict[str, Any]:
    """The registry's manifest, parsed and checked against :mod:`cmtl.registry.manifest`'s rules (the text
    of a manifest that passed is remembered, so an unchanged one is not checked again).

    Raises:
        RegistryError: no manifest, not JSON, or another format.
        ManifestError: a bad name or structure, naming the key.
    """
    path = root / MANIFEST
    if not path.exists():
        raise RegistryError(
            f"No registry at {str(root)!r}: {MANIFEST} is missing. Create one with Registry.create({str(root)!r})."
        )
    try:
        text = path.read_text()
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"The manifest {str(path)!r} is not valid JSON: {exc}.") from exc
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
        raise RegistryError(
            f"Registry {str(root)!r} has format {manifest.get('format')!r}; this cmtl ({__version__}) reads "
            f"format {FORMAT}."
        )
    key = str(path)
    if _CHECKED.get(key) != text:
        rules.validate(manifest, path)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = text
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
    return write_folder(root, version_dir(root, task, version), files)


def merge_dir(root: Path, name: str) -> Path:
    return root / "merges" / name


# --- paths a writer touches --------------------------------------------------------------------


def _kind_error(root: Path, path: Path, *, want_folder: bool) -> RegistryError:
    rel = str(path.relative_to(root))
    found, want = ("file", "folder") if want_folder else ("folder", "file")
    fix = ("cmtl creates it itself: remove the folder and retry" if rel == ".lock" else
           "it was put there by hand or by another tool: move it out of the registry, put back what cmtl wrote "
           "there (from a backup), or roll back / remove the task or merged entry that needs it, and retry")
    return RegistryError(f"{rel!r} in the registry {str(root)!r} is a {found}, where cmtl keeps a {want}: {fix}.")


def wrong_kind(root: Path, path: Path) -> RegistryError | None:
    """The error for the first thing on the way from ``root`` to the file ``path`` that is a file
    where the layout has a folder, or for ``path`` itself when it is a folder; None when there is none."""
    parts = path.relative_to(root).parts
    for depth in range(1, len(parts) + 1):
        step = root.joinpath(*parts[:depth])
        if not os.path.lexists(step):
            return None
        if depth < len(parts) and not step.is_dir():
            return _kind_error(root, step, want_folder=True)
        if depth == len(parts) and step.is_dir():
            return _kind_error(root, step, want_folder=False)
    return None


def _inside(root: Path, path: Path, *, including: bool = False) -> Path:
    """``path``, after checking that it lies inside ``root`` and that no folder between them (nor
    ``path`` itself, with ``including``) is a symbolic link.

    Raises:
        RegistryError: ``path`` is outside ``root``, or the link (or file where a folder belongs) it
            passes through, named.
    """
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = ()
    outside = RegistryError(f"Refusing to write or delete {str(path)!r}: it is outside the registry {str(root)!r}.")
    if not parts or ".." in parts:
        raise outside
    for depth in range(1, len(parts) + (1 if including else 0)):
        step = root.joinpath(*parts[:depth])
        if step.is_symlink():
            raise RegistryError(
                f"{'/'.join(parts[:depth])!r} in the registry {str(root)!r} is a symbolic link to "
                f"{os.readlink(step)!r}. cmtl never writes or deletes through a link inside a registry, since that "
                "could change files outside it. Replace the link with the folder it points to (or remove it) and "
                "retry."
            )
        if os.path.lexists(step) and not step.is_dir():
            raise _kind_error(root, step, want_folder=True)
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path.parent)]) != real_root:
        raise outside
    return path


def _warn_undeleted(function, path, exc) -> None:
    exc = exc[1] if isinstance(exc, tuple) else exc  # onerror passes exc_info, onexc the exception
    logger.warning("Could not delete %s (%s); the next writer tries again.", path, exc)


def delete(root: Path, path: Path) -> None:
    """Delete a file or folder inside ``root``. A symbolic link is unlinked, never followed; links
    inside a folder are unlinked too (``shutil.rmtree`` works on file descriptors and does not follow
    them). A failure to delete is logged: the next writer removes what is left.

    Raises:
        RegistryError: ``path`` is outside ``root`` or reached through a link.
    """
    _inside(root, path)
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        handler = {"onexc" if sys.version_info >= (3, 12) else "onerror": _warn_undeleted}
        shutil.rmtree(path, **handler)


def write_folder(root: Path, final: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Write ``files`` into a staging folder beside ``final``, fsync, rename it to ``final``; return SHA-256s.

    ``final`` lies inside ``root`` with no link on the way; a crash leftover at ``final`` (see
    :func:`_leftover`) is replaced (a link there is unlinked). On any error the staging folder is removed.

    Raises:
        RegistryError: something cmtl did not write is at ``final`` (it is kept).
    """
    _inside(root, final)
    entry = final.parent == root / "merges"
    if os.path.lexists(final) and not _leftover(final, entry=entry):
        raise _not_ours(root, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".staging-{final.name}-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        sums = {}
        for name, data in files.items():
            with open(staging / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            sums[name] = sha256_bytes(data)
        fsync_dir(staging)
        if os.path.lexists(final):  # a leftover of a crash: the manifest never named it
            delete(root, final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    settle_dir(final.parent, final)
    return sums


def _not_ours(root: Path, path: Path) -> RegistryError:
    """The error for what cmtl did not write at ``path``, where a write is about to put a folder."""
    if not path.is_dir():
        return _kind_error(root, path, want_folder=True)
    theirs = sorted(p.name for p in path.iterdir() if p.name not in _ENTRY_FILES or not p.is_file() or p.is_symlink())
    return RegistryError(f"{str(path.relative_to(root))!r} in the registry {str(root)!r} holds what cmtl did not write "
                         f"({', '.join(map(repr, theirs))}), so cmtl will not write over it. Move it out of the "
                         "registry (or pick another name) and retry.")


def remove_unreferenced(root: Path, manifest: dict[str, Any]) -> None:
    """Delete what a crashed or removing writer left (see :func:`_leftover`): in every task folder, the version
    folders ``manifest`` does not name and staging folders (a task folder it does not name goes too once nothing
    else is left in it); under ``merges/``, the folders it does not name that hold only an entry's files, and
    staging folders; the manifest's crash-left temp files. Nothing else is deleted: a hand backup
    (``tasks/spam/v1.bak``), an export or a registry put into the folder stays. Call under :func:`writer_lock`.

    Raises:
        RegistryError: ``tasks``, ``merges`` or a named task's folder is a symbolic link (it is named).
    """
    for child in root.iterdir():
        if _MANIFEST_TMP.match(child.name) and child.is_file() and not child.is_symlink():
            child.unlink(missing_ok=True)
    tasks, merges = root / "tasks", root / "merges"
    if os.path.lexists(tasks):
        _inside(root, tasks, including=True)
        for child in tasks.iterdir():
            _sweep_task(root, child, manifest["tasks"].get(child.name))
    if os.path.lexists(merges):
        _inside(root, merges, including=True)
        for child in merges.iterdir():
            if child.name not in manifest.get("merges", {}) and _leftover(child, entry=True):
                delete(root, child)


def remove_entry_files(root: Path, name: str, files: list[str]) -> None:
    """Delete the ``files`` a removed merged entry ``name`` named, then its folder once empty: what else a user put
    into the folder stays (:func:`remove_unreferenced` deletes only a folder of an entry's files alone)."""
    folder = merge_dir(root, name)
    if folder.is_symlink() or not folder.is_dir():
        return
    for file in files:
        if os.path.lexists(folder / file):
            delete(root, folder / file)
    if not any(folder.iterdir()):
        delete(root, folder)


def _sweep_task(root: Path, folder: Path, entry: dict[str, Any] | None) -> None:
    """Delete from the task folder ``folder`` the version folders its manifest ``entry`` does not name (all of
    them when ``entry`` is None) and staging folders; an unnamed folder left empty goes too."""
    if entry is None:
        if folder.is_symlink():
            delete(root, folder)  # only unlinked
            return
        if not folder.is_dir() or not rules.valid_name(folder.name):
            return  # not a folder cmtl makes for a task
    else:
        _inside(root, folder, including=True)
    keep = {f"v{r['version']}" for r in (entry or {}).get("versions", [])}
    for sub in folder.iterdir():
        if sub.name not in keep and _leftover(sub, entry=False):
            delete(root, sub)
    if entry is None and not any(folder.iterdir()):
        delete(root, folder)


def _leftover(path: Path, *, entry: bool) -> bool:
    """Whether ``path``, which the manifest does not name, is something cmtl may have left there: a link (it is
    only unlinked), a staging folder, and in a task's folder a version ``v<N>``, or under ``merges/`` (``entry``)
    a folder holding nothing but a merged entry's files."""
    if path.is_symlink() or _STAGING.match(path.name):
        return True
    if not entry:
        return bool(_VERSION.match(path.name))
    return path.is_dir() and all(p.name in _ENTRY_FILES and p.is_file() and not p.is_symlink()
                                 for p in path.iterdir())


@contextlib.contextmanager
def writer_lock(root: Path, timeout: float = 60.0) -> Iterator[None]:
    """Hold the registry's exclusive write lock (one writer at a time, across processes)."""
    try:  # O_NOFOLLOW: a planted link must not make us create or lock a file elsewhere
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise _kind_error(root, root / ".lock", want_folder=False) from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise RegistryError(f"The registry folder {str(root)!r} is gone (deleted or moved since this registry "
                                "was opened, or never made): nothing was written. Registry.open it where it is "
                                "now, or Registry.create a new one.") from None
        if exc.errno != errno.ELOOP:
            raise
        raise RegistryError(f"'.lock' in the registry {str(root)!r} is a symbolic link to "
                            f"{os.readlink(root / '.lock')!r}; remove the link and retry.") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
