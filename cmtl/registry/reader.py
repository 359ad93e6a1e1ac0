"""The read side of a registry: what its manifest records, and the stored files it names.

:class:`RegistryReader` answers from one manifest (already checked by :mod:`cmtl.registry.manifest`)
and reads files only through the checksums it records; it loads no model. The :class:`Registry`
facade is a reader that can also write.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmtl.core.tasks import _NAME, TaskSpec
from cmtl.errors import EntryExistsError, InvalidParameterError, TaskNotFoundError, bad_param
from cmtl.registry import store

if TYPE_CHECKING:  # imported where used: reading the manifest needs neither torch nor datasets
    from cmtl.continual.replay import ReplayBuffer
    from cmtl.continual.updates import Gate
    from cmtl.data import Examples

#: Who a loaded adapter or head belongs to: ("task", name, version) or ("merge", name, None).
Owner = tuple[str, str, int | None]


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
    init: dict[str, Any] | None = None
    labels: tuple[str, ...] | None = None
    head: dict[str, Any] | None = None  # an analytic head's record (cmtl.registry.heads); None: a trained linear head


@dataclass(frozen=True)
class UpdateResult:
    """What :meth:`Registry.update_task` did: the new version, whether it is current, and why."""

    version: VersionInfo
    promoted: bool
    reason: str
    gate: Gate


class RegistryReader:
    """Tasks, versions, merged entries, buffers and held-out samples of the registry at ``root``,
    as ``manifest`` records them."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self._manifest = manifest

    @property
    def recorded_backbone(self) -> dict[str, Any]:
        """The backbone as the manifest records it: its config's fields, ``sha256`` (its weights' hash) and
        ``tokenizer_sha256`` (its tokenizer's, :func:`cmtl.core.backbone.tokenizer_sha256`; older registries
        lack it)."""
        return dict(self._manifest["backbone"])

    def tasks(self) -> list[str]:
        """Names of all tasks, sorted."""
        return sorted(self._manifest["tasks"])

    def spec(self, task: str, *, version: int | None = None, merge: str | None = None) -> TaskSpec:
        """What ``task`` predicts through ``version`` (default: the current one; an update may have added
        labels, so versions can differ); with ``merge``, as that merged entry recorded it (a merge answers
        with the labels it was made with, also after the task is removed or replaced).

        Raises:
            TaskNotFoundError: no such task or version, or ``merge`` does not hold the task.
            InvalidParameterError: both ``version`` and ``merge`` (a merge fixes its members' versions).
        """
        if merge is None:
            entry = self._entry(task)
            return version_spec(entry, self._version_record(task, self._version(task, version)))
        check_one_answerer(version, merge)
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
        them, that of the newest version of the task it merged (the labels its head was made with; the
        current one's where it names none, as a joint entry does), ``None`` once that task is removed."""
        recorded = record.get("specs", {}).get(task)
        if recorded is not None:
            return TaskSpec.from_dict(recorded)
        entry = self._manifest["tasks"].get(task)
        if entry is None:
            return None
        stored = {r["version"] for r in entry["versions"]}
        merged = [m["version"] for m in record.get("members", []) if m["task"] == task and m["version"] in stored]
        return version_spec(entry, self._version_record(task, max(merged, default=entry["current"])))

    def versions(self, task: str) -> list[VersionInfo]:
        """Every version of ``task``, oldest first."""
        entry = self._entry(task)
        return [self._info(task, v, entry["current"]) for v in entry["versions"]]

    def current(self, task: str) -> VersionInfo:
        """The version of ``task`` that answers predictions."""
        entry = self._entry(task)
        return self._info(task, self._version_record(task, entry["current"]), entry["current"])

    def merges(self) -> list[str]:
        """Names of all merged entries, sorted."""
        return sorted(self._manifest.get("merges", {}))

    def merge_info(self, name: str) -> dict[str, Any]:
        """The record of a merged entry: members, method and knobs, errors, scores."""
        try:
            return self._manifest.get("merges", {})[name]
        except KeyError:
            raise TaskNotFoundError(f"Merge {name!r} not found. Merges: {self.merges()}.") from None

    def buffer(self, task: str, version: int | None = None) -> ReplayBuffer | None:
        """The replay buffer stored with a version of ``task`` (current by default); ``None`` if it has none.

        Raises:
            CorruptFileError, ReplayBufferError: the stored buffer is damaged.
        """
        from cmtl.continual.replay import ReplayBuffer

        data = self._read_version_file(task, version, "replay.parquet")
        if data is None:
            return None
        return ReplayBuffer.from_bytes(data, where=f"Replay buffer of task {task!r}")

    def holdout(self, task: str, version: int | None = None, *, lineage: bool = True) -> Examples | None:
        """Held-out labelled examples kept with ``version`` (current by default) and, with
        ``lineage``, with all its ancestors; ``None`` if none were kept."""
        from cmtl.data import Examples

        parts = [examples for _, examples in self._holdout_parts(task, version, lineage)]
        return Examples.concat(parts) if parts else None

    def _holdout_parts(self, task: str, version: int | None = None, lineage: bool = True
                       ) -> list[tuple[int, Examples]]:
        """(version, the held-out examples it kept) for ``version`` and, with ``lineage``, its ancestors, oldest
        first: :meth:`holdout`'s rows, by the version whose labels they were annotated with."""
        from cmtl.continual.replay import ReplayBuffer, stored

        v = self._entry(task)["current"] if version is None else version
        parts = []
        while v is not None:
            data = self._read_version_file(task, v, "holdout.parquet")
            if data is not None:
                held = ReplayBuffer.from_bytes(data, where=f"Held-out sample of task {task!r} v{v}").to_examples()
                parts.append((v, stored(self.spec(task, version=v), held)))
            v = self._version_record(task, v)["parent"] if lineage else None
        return parts[::-1]

    # --- records ------------------------------------------------------------------

    def _entry(self, task: str) -> dict[str, Any]:
        try:
            return self._manifest["tasks"][task]
        except KeyError:
            raise TaskNotFoundError(f"Task {task!r} not found. Known tasks: {self.tasks()}.") from None

    def _version(self, task: str, version: int | None) -> int:
        """``version``, or the current one of ``task`` when ``None``."""
        return self._entry(task)["current"] if version is None else version

    def _version_record(self, task: str, version: int) -> dict[str, Any]:
        if isinstance(version, bool) or not isinstance(version, numbers.Integral):
            # True == 1 and 1.0 == 1 would match version 1, and a rollback would write them into the manifest.
            known = [r["version"] for r in self._entry(task)["versions"]]
            raise InvalidParameterError(bad_param("version", f"task {task!r}", "be an int", version,
                                                  f"Versions: {known}."))
        for record in self._entry(task)["versions"]:
            if record["version"] == version:
                return record
        known = [r["version"] for r in self._entry(task)["versions"]]
        raise TaskNotFoundError(f"Task {task!r} has no version {version!r}. Versions: {known}.")

    def _info(self, task: str, record: dict[str, Any], current: int) -> VersionInfo:
        fields_ = {k: v for k, v in record.items()
                   if k in VersionInfo.__dataclass_fields__ and k not in ("files", "task", "current", "labels")}
        return VersionInfo(task=task, current=record["version"] == current,
                           labels=version_spec(self._entry(task), record).labels, **fields_)

    def _read_version_file(self, task: str, version: int | None, name: str) -> bytes | None:
        version = self._version(task, version)
        record = self._version_record(task, version)
        if name not in record.get("files", {}):
            return None
        return store.read_checked(store.version_dir(self.root, task, version) / name, record["files"][name])

    def _check_new_entry(self, name: Any, what: str) -> None:
        """Refuse ``name`` for a new merged or joint entry (``what``: "Merge", "Group")."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{what} name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-'.")
        if name in self._manifest.get("merges", {}):
            kind = "A merge" if what == "Merge" else "An entry"
            raise EntryExistsError(f"{kind} named {name!r} exists already; remove_merge it or pick another name.")

    def _source(self, owner: Owner) -> str | None:
        return source(self._manifest, owner)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, tasks={self.tasks()})"


def check_one_answerer(version: int | None, merge: str | None) -> None:
    """Refuse a version and a merge together: a merge fixes its members' versions, so the two name two answerers."""
    if version is not None and merge is not None:
        raise InvalidParameterError(f"Pass version= or merge=, not both (got version={version!r}, merge={merge!r}): "
                                    "a merge answers with the versions it merged. Drop one.")


def version_spec(entry: dict[str, Any], record: dict[str, Any]) -> TaskSpec:
    """The spec of one version of a task: the task's, with the labels of the version when an update
    added some (``record["labels"]``: the parent's labels in their order, then the new ones)."""
    spec = TaskSpec.from_dict(entry["spec"])
    return spec if record.get("labels") is None else dataclasses.replace(spec, labels=tuple(record["labels"]))


def version_source(entry: dict[str, Any], record: dict[str, Any]) -> str:
    """What a task version is loaded from: its files' SHA-256 and its spec (the head's labels)."""
    source = {"files": record.get("files"), "spec": entry.get("spec")}
    if record.get("labels") is not None:
        source["labels"] = record["labels"]
    return json.dumps(source, sort_keys=True)


def source(manifest: dict[str, Any], owner: Owner) -> str | None:
    """The source (see :func:`version_source`) ``manifest`` names for a task version or merged entry
    ``owner``; ``None`` if it names none."""
    kind, name, version = owner
    if kind == "merge":
        record = manifest.get("merges", {}).get(name)
        return None if record is None else json.dumps(
            {k: record.get(k) for k in ("files", "specs", "tasks", "task_adapter")}, sort_keys=True)
    entry = manifest["tasks"].get(name)
    record = next((r for r in entry["versions"] if r["version"] == version), None) if entry else None
    return None if record is None else version_source(entry, record)


def source_label(source: dict[str, Any]) -> str:
    """How an ``init`` record names its source: ``"task:spam@2"`` or ``"merge:NAME"`` (the keys of its
    ``trial`` and ``skipped`` entries)."""
    return f"merge:{source['merge']}" if "merge" in source else f"task:{source['task']}@{source['version']}"


def scale_note(init: dict[str, Any]) -> str:
    """`` scaled by S`` when an ``init`` record's start kept only a share ``S`` of its source's change
    (``add_task``'s ``init_scale``); ``""`` for a full copy (records from before ``init_scale`` have no
    ``scale``: full copies)."""
    scale = init.get("scale", 1.0)
    return "" if scale == 1 else f" scaled by {scale:g}"


def head_key(task: str, version: int) -> str:
    """Key of a task version's adapter and head (adapter names live inside module paths: no dots)."""
    return f"{task}__v{version}"


def merge_key(name: str, task: str | None = None) -> str:
    """Key of merged entry ``name`` in the adapter bank (with ``task``: of that task's own adapter or head).

    Task versions are keyed ``<task>__v<N>`` and names never hold ':', so no merge key equals
    a task key, and a merge's keys are found exactly, never by prefix.
    """
    return f"{name}__merged" if task is None else f"{name}__merged:{task}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
