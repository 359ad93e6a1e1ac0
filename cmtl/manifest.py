"""The rules a registry's manifest (``registry.json``) obeys, checked on every read.

Names in the manifest become folder names (``tasks/<task>/v<N>``, ``merges/<name>``), so a
name read from the file is held to the same rule as a new one (:data:`cmtl.tasks._NAME`:
letters, digits, ``_`` and ``-``, no ``/`` or ``..``). The structure is what loading,
updating, merging and serving need: a bad value is reported by where it is in the file,
never as a KeyError or StopIteration deep inside a load.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from cmtl.errors import ManifestError
from cmtl.tasks import _NAME, TaskSpec

#: Files every task version and every merged entry must have (loading reads them).
VERSION_FILES = ("adapter.safetensors", "head.safetensors")
ENTRY_FILES = ("adapter.safetensors", "heads.safetensors")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NAME_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"


def valid_name(name: Any) -> bool:
    """Whether ``name`` may name a task or merged entry (and so a folder of the registry)."""
    return isinstance(name, str) and bool(_NAME.match(name))


def validate(manifest: Any, path: Path) -> None:
    """Check a parsed manifest's names and structure.

    Raises:
        ManifestError: names the first bad key or value, what is allowed, and how to fix it.
    """
    _Check(path).manifest(manifest)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else repr(value)


def _where(keys: tuple) -> str:
    return keys[0] + "".join(f"[{k!r}]" for k in keys[1:])


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class _Check:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, problem: str) -> ManifestError:
        return ManifestError(
            f"The manifest {str(self.path)!r} is damaged: {problem}. cmtl replaces registry.json whole on every "
            "write, so it was changed by hand or by another tool: put back a good copy (from a backup or version "
            "control), or edit that value, then retry."
        )

    def obj(self, value: Any, keys: tuple) -> dict:
        if not isinstance(value, dict):
            raise self.fail(f"{_where(keys)} must be an object, got {_kind(value)}")
        return value

    def field(self, record: dict, key: str, keys: tuple) -> Any:
        if key not in record:
            raise self.fail(f"{_where(keys)} has no {key!r}")
        return record[key]

    def name(self, name: Any, what: str, where: str) -> None:
        if not valid_name(name):
            raise self.fail(f"{what} name {name!r} ({where}) is not allowed: use {NAME_RULE}")

    def files(self, files: Any, required: tuple[str, ...], keys: tuple) -> None:
        self.obj(files, keys)
        for file, sha in files.items():
            if not isinstance(file, str) or not _FILE_NAME.match(file) or ".." in file:
                raise self.fail(f"file name {file!r} in {_where(keys)} is not a plain file name (letters, digits, "
                                "'_', '-', '.'; no '/' or '..')")
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise self.fail(f"{_where((*keys, file))} must be a SHA-256 (64 lowercase hex digits), got "
                                f"{_kind(sha)}")
        missing = [f for f in required if f not in files]
        if missing:
            raise self.fail(f"{_where(keys)} lacks {missing[0]!r}, which loading reads")

    # --- the file -------------------------------------------------------------------

    def manifest(self, m: Any) -> None:
        if not isinstance(m, dict):
            raise self.fail(f"registry.json must hold a JSON object, got {_kind(m)}")
        top = ("the manifest",)
        backbone = self.obj(self.field(m, "backbone", top), ("backbone",))
        for key in ("sha256", "name_or_path"):
            if not isinstance(self.field(backbone, key, ("backbone",)), str):
                raise self.fail(f"{_where(('backbone', key))} must be a string, got {_kind(backbone[key])}")
        generation = m.get("generation", 0)
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise self.fail(f"'generation' must be a non-negative integer, got {_kind(generation)}")
        tasks = self.field(m, "tasks", top)
        if not isinstance(tasks, dict):
            raise self.fail(f"'tasks' must be an object (task name -> entry), got {_kind(tasks)}")
        for task, entry in tasks.items():
            self.task(task, entry)
        merges = m.get("merges", {})
        if not isinstance(merges, dict):
            raise self.fail(f"'merges' must be an object (entry name -> record), got {_kind(merges)}")
        for name, record in merges.items():
            self.merge(name, record)

    def task(self, task: Any, entry: Any) -> None:
        self.name(task, "task", "a key of 'tasks'")
        keys = ("tasks", task)
        self.obj(entry, keys)
        self.spec(self.field(entry, "spec", keys), task, (*keys, "spec"))
        versions = self.field(entry, "versions", keys)
        if not isinstance(versions, list) or not versions:
            raise self.fail(f"{_where((*keys, 'versions'))} must be a non-empty list of version records, got "
                            f"{_kind(versions)}")
        numbers: list[int] = []
        for i, record in enumerate(versions):
            rkeys = (*keys, "versions", i)
            self.obj(record, rkeys)
            number = self.field(record, "version", rkeys)
            if not _positive_int(number):
                raise self.fail(f"{_where((*rkeys, 'version'))} must be a positive integer, got {_kind(number)}")
            if number in numbers:
                raise self.fail(f"{_where(keys)} lists version {number} twice")
            numbers.append(number)
        for i, record in enumerate(versions):
            rkeys = (*keys, "versions", i)
            parent = record.get("parent")
            if parent is not None and not (_positive_int(parent) and parent in numbers and parent < record["version"]):
                raise self.fail(f"{_where((*rkeys, 'parent'))} is {parent!r}; it must be null or an earlier version "
                                f"of {task!r} (versions: {sorted(numbers)})")
            self.files(self.field(record, "files", rkeys), VERSION_FILES, (*rkeys, "files"))
            for key in ("adapter", "training"):
                self.obj(self.field(record, key, rkeys), (*rkeys, key))
        current = self.field(entry, "current", keys)
        if current not in numbers or isinstance(current, bool):
            raise self.fail(f"{_where((*keys, 'current'))} is {current!r}, which names no version of {task!r} "
                            f"(versions: {sorted(numbers)})")
        if "memory" in entry:
            self.obj(entry["memory"], (*keys, "memory"))

    def spec(self, spec: Any, task: str, keys: tuple) -> None:
        self.obj(spec, keys)
        if spec.get("name") != task:
            raise self.fail(f"{_where((*keys, 'name'))} is {spec.get('name')!r}, but it is the spec of {task!r}; "
                            "they must be equal")
        try:
            with warnings.catch_warnings():  # unknown keys warn where the spec is used, not on every read
                warnings.simplefilter("ignore")
                TaskSpec.from_dict(spec)
        except (TypeError, ValueError) as exc:
            raise self.fail(f"{_where(keys)} is not a valid task spec ({exc})") from None

    def merge(self, name: Any, record: Any) -> None:
        self.name(name, "merge", "a key of 'merges'")
        keys = ("merges", name)
        self.obj(record, keys)
        if record.get("name") != name:
            raise self.fail(f"{_where((*keys, 'name'))} is {record.get('name')!r}, but the entry is under {name!r}; "
                            "they must be equal")
        tasks = self.field(record, "tasks", keys)
        if not isinstance(tasks, list) or not tasks:
            raise self.fail(f"{_where((*keys, 'tasks'))} must be a non-empty list of task names, got {_kind(tasks)}")
        for i, task in enumerate(tasks):
            self.name(task, "task", _where((*keys, "tasks", i)))
        specs = record.get("specs", {})  # absent in entries written before merges recorded their specs
        if not isinstance(specs, dict):
            raise self.fail(f"{_where((*keys, 'specs'))} must be an object (task -> spec), got {_kind(specs)}")
        for task, spec in specs.items():
            if task not in tasks:
                raise self.fail(f"{_where((*keys, 'specs'))} has a spec for {task!r}, which is not one of the "
                                f"entry's tasks {tasks}")
            self.spec(spec, task, (*keys, "specs", task))
        members = record.get("members", [])
        if not isinstance(members, list):
            raise self.fail(f"{_where((*keys, 'members'))} must be a list, got {_kind(members)}")
        for i, member in enumerate(members):
            if not (isinstance(member, dict) and valid_name(member.get("task"))
                    and _positive_int(member.get("version"))):
                raise self.fail(f"{_where((*keys, 'members', i))} must be an object with a task name and a positive "
                                f"integer version, got {member!r}")
        own = record.get("task_adapter")
        if own is not None and not (isinstance(own, dict) and _positive_int(own.get("r"))
                                    and isinstance(own.get("alpha"), (int, float))
                                    and not isinstance(own.get("alpha"), bool)):
            raise self.fail(f"{_where((*keys, 'task_adapter'))} must be null or an object with an integer 'r' >= 1 "
                            f"and a number 'alpha', got {own!r}")
        required = ENTRY_FILES + (("task_adapters.safetensors",) if own else ())
        self.files(self.field(record, "files", keys), required, (*keys, "files"))
        self.obj(self.field(record, "adapter", keys), (*keys, "adapter"))
