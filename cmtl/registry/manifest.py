"""The rules a registry's manifest (``registry.json``) obeys, checked on every read.

Names in the manifest become folder names (``tasks/<task>/v<N>``, ``merges/<name>``), so a
name read from the file is held to the same rule as a new one (:data:`cmtl.core.tasks._NAME`:
letters, digits, ``_`` and ``-``, no ``/`` or ``..``). The structure is what loading,
updating, merging and serving need: a bad value is reported by where it is in the file,
never as a KeyError or StopIteration deep inside a load.

Recorded configurations (a version's ``training`` and ``adapter``, a merged entry's ``adapter``,
a task's ``memory``, the ``backbone``) must be ones their classes accept, and their values of the
types those classes declare; a version record holds what :class:`cmtl.registry.reader.VersionInfo`
requires, of its declared types. Keys this cmtl does not know (written by a newer one) are
accepted: the classes' ``from_dict`` ignore them where the value is used. The check is a few
``isinstance`` tests per value, cheap enough for every read (the server polls the manifest).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable

from cmtl.core.tasks import _NAME, TaskSpec
from cmtl.errors import ManifestError

#: Files every task version and every merged entry must have (loading reads them).
VERSION_FILES = ("adapter.safetensors", "head.safetensors")
ENTRY_FILES = ("adapter.safetensors", "heads.safetensors")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NAME_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit"
#: The largest version number a manifest may hold (``v<N>`` is a folder name; 10**300 is not one).
MAX_VERSION = 10**9


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


def _version_number(value: Any) -> bool:
    return _positive_int(value) and value <= MAX_VERSION


#: The hashes (and the model config) a ``backbone`` record holds beside its config's fields
#: (:meth:`cmtl.core.backbone.Backbone.check_matches`; a record written before cmtl hashed the tokenizer has no
#: ``tokenizer_sha256``, one written before it recorded the model config no ``model_config``).
_HASHES = {"sha256": "weights hash", "tokenizer_sha256": "tokenizer hash", "model_config": "model config"}


def backbone_changes(known: dict[str, Any], recorded: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> list[str]:
    """How a manifest's ``backbone`` record differs from the ``known`` one, one phrase per field
    (``ignore``: fields that may differ); empty when they describe the same backbone."""
    return [f"{_HASHES[k]} {str(known.get(k))[:12]}… -> {str(recorded.get(k))[:12]}…" if k in _HASHES else
            f"{k} {known.get(k)!r} -> {recorded.get(k)!r}"
            for k in sorted(set(known) | set(recorded)) if k not in ignore and known.get(k) != recorded.get(k)]


def backbone_config(recorded: dict[str, Any], **overrides: Any):
    """The :class:`cmtl.core.config.BackboneConfig` a manifest's ``backbone`` record describes (with
    ``overrides``); keys this cmtl does not know (written by a newer one) warn and are ignored. A record
    without ``dtype`` (written before cmtl recorded one) loads the checkpoint's own precision, as it was."""
    from cmtl.core.config import BackboneConfig

    known = {f.name for f in dataclasses.fields(BackboneConfig)}
    extra = sorted(k for k in recorded if k not in known and k not in _HASHES)
    if extra:
        warnings.warn(f"Ignoring unknown backbone keys {extra} (written by a newer cmtl?).", stacklevel=2)
    return BackboneConfig(**{"dtype": "auto", **{k: v for k, v in recorded.items() if k in known}, **overrides})


def refuse_other_settings(recorded: dict[str, Any], given: Any, where: str) -> None:
    """Refuse a :class:`~cmtl.core.config.BackboneConfig` (``given``) that would make other features than
    the ``recorded`` backbone did on the same weights: another pooling, length, layer cut or precision
    (the folder may differ; a record without a dtype pins none, its weights' hash does).

    Raises:
        BackboneMismatchError: naming each setting, recorded -> given.
    """
    from cmtl.errors import BackboneMismatchError

    ignore = ("name_or_path",) if "dtype" in recorded else ("name_or_path", "dtype")
    changes = backbone_changes(backbone_config(recorded).to_dict(), given.to_dict(), ignore=ignore)
    if changes:
        raise BackboneMismatchError(
            f"{where} was built with other backbone settings than given ({', '.join(changes)}; recorded -> given): "
            "its heads read features made the recorded way and would answer wrongly. Open it without a "
            "BackboneConfig, or with the recorded settings.")


# --- the types a dataclass declares, as checks of JSON values ---------------------------------------

_Rule = tuple[str, Callable[[Any], bool]]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SCALARS: dict[str, _Rule] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": ("a number", _number),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
}
_PLURAL = {"int": "integers", "float": "numbers", "str": "strings", "bool": "true or false values"}


def _rule(annotation: str) -> tuple[str, Callable[[Any], bool], Callable[[Any], bool] | None] | None:
    """(what is allowed, a check of the value, a check of each value of an object) for a field's
    annotation, or None where the class's own check decides (``Literal``, aliases, ``Any``)."""
    parts = [part.strip() for part in annotation.split("|")]
    nullable = "None" in parts
    parts = [part for part in parts if part != "None"]
    if len(parts) != 1:
        return None
    part, each = parts[0], None
    if part in _SCALARS:
        what, check = _SCALARS[part]
    elif part.startswith(("tuple[", "list[")) and part[part.index("[") + 1:].split(",")[0].strip() in _SCALARS:
        inner = part[part.index("[") + 1:].split(",")[0].strip()
        element = _SCALARS[inner][1]
        what, check = f"a list of {_PLURAL[inner]}", lambda v: isinstance(v, list) and all(map(element, v))
    elif part.startswith("dict["):
        what, check = "an object", lambda v: isinstance(v, dict)
        if part.split(",")[-1].strip(" ]") == "float":  # an object of numbers (metrics): each may be null
            each = lambda v: v is None or _number(v)  # noqa: E731
    else:
        return None
    if nullable:
        return f"{what} or null", lambda v: v is None or check(v), each
    return what, check, each


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls)) - {"_"}


def _known(cls: type, record: dict) -> dict:
    """``record`` without the keys ``cls`` does not know: checked without the warning ``from_dict`` gives
    for them where the value is used (and without a warnings context per value, which is slow)."""
    names = _field_names(cls)
    return {k: v for k, v in record.items() if k in names}


@functools.cache
def _rules(cls: type) -> dict[str, tuple]:
    return {f.name: rule for f in dataclasses.fields(cls) if (rule := _rule(str(f.type))) is not None}


@functools.cache
def _classes() -> dict[str, type]:
    # Imported on first use: reader imports cmtl.registry.store, which imports this one. The configs'
    # own modules import no torch, so checking a manifest loads no model library.
    from cmtl.continual.config import MemoryConfig
    from cmtl.core.config import AdapterConfig, BackboneConfig
    from cmtl.registry.reader import VersionInfo
    from cmtl.training.config import TrainConfig

    return {"training": TrainConfig, "adapter": AdapterConfig, "backbone": BackboneConfig, "memory": MemoryConfig,
            "version": VersionInfo}


@functools.cache
def _required_record_keys() -> tuple[str, ...]:
    """What :class:`cmtl.registry.reader.VersionInfo` requires of a version record (task and current are not stored)."""
    return tuple(f.name for f in dataclasses.fields(_classes()["version"])
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                 and f.name not in ("task", "current"))


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

    def typed(self, record: dict, cls: type, keys: tuple, skip: tuple[str, ...] = ()) -> None:
        """Each value of ``record`` that ``cls`` declares is of the declared type (numbers finite)."""
        rules = _rules(cls)
        for key, value in record.items():
            if key not in rules or key in skip:
                continue
            what, check, each = rules[key]
            if not check(value):
                raise self.fail(f"{_where((*keys, key))} must be {what}, got {_kind(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise self.fail(f"{_where((*keys, key))} must be a finite number, got {value!r}")
            for sub, item in (value.items() if each is not None else ()):
                if not each(item):
                    raise self.fail(f"{_where((*keys, key, sub))} must be a number or null, got {_kind(item)}")

    def config(self, record: Any, what: str, keys: tuple) -> Any:
        """``record`` as the ``what`` config class (training, adapter, memory, backbone) it must be."""
        cls = _classes()[what]
        self.typed(self.obj(record, keys), cls, keys)
        try:
            return cls(**_known(cls, record)) if what == "backbone" else cls.from_dict(_known(cls, record))
        except (TypeError, ValueError) as exc:
            where = repr(keys[0]) if len(keys) == 1 else _where(keys)
            raise self.fail(f"{where} is not a valid {what} config ({exc})") from None

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
        if not isinstance(backbone.get("tokenizer_sha256", ""), str):
            raise self.fail(f"{_where(('backbone', 'tokenizer_sha256'))} must be a string, got "
                            f"{_kind(backbone['tokenizer_sha256'])}")
        if not isinstance(backbone.get("model_config", {}), dict):
            raise self.fail(f"{_where(('backbone', 'model_config'))} must be an object, got "
                            f"{_kind(backbone['model_config'])}")
        self.config(backbone, "backbone", ("backbone",))
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
            if not _version_number(number):
                raise self.fail(f"{_where((*rkeys, 'version'))} must be a positive integer up to {MAX_VERSION}, got "
                                f"{_kind(number)}")
            if number in numbers:
                raise self.fail(f"{_where(keys)} lists version {number} twice")
            numbers.append(number)
        for i, record in enumerate(versions):
            rkeys = (*keys, "versions", i)
            for key in _required_record_keys():  # what reg.versions() and `cmtl ls` read
                self.field(record, key, rkeys)
            parent = record["parent"]
            if parent is not None and not (_positive_int(parent) and parent in numbers and parent < record["version"]):
                raise self.fail(f"{_where((*rkeys, 'parent'))} is {parent!r}; it must be null or an earlier version "
                                f"of {task!r} (versions: {sorted(numbers)})")
            self.typed(record, _classes()["version"], rkeys, skip=("version", "parent", "labels"))
            self.files(self.field(record, "files", rkeys), VERSION_FILES, (*rkeys, "files"))
            for key in ("adapter", "training"):
                self.config(self.field(record, key, rkeys), key, (*rkeys, key))
        self.grown_labels(entry, {r["version"]: r for r in versions}, keys)
        current = self.field(entry, "current", keys)
        if not _positive_int(current):
            raise self.fail(f"{_where((*keys, 'current'))} must be a positive integer, got {_kind(current)}")
        if current not in numbers:
            raise self.fail(f"{_where((*keys, 'current'))} is {current!r}, which names no version of {task!r} "
                            f"(versions: {sorted(numbers)})")
        if "memory" in entry:
            self.config(entry["memory"], "memory", (*keys, "memory"))

    def grown_labels(self, entry: dict, records: dict[int, dict], keys: tuple) -> None:
        """A version's ``labels`` (an update that added labels) extend its parent's, which start with the
        task spec's: old labels keep their positions, so stored rows and heads stay valid."""
        def labels_of(number: int) -> list:
            return records[number].get("labels") or list(entry["spec"]["labels"])

        for i, (number, record) in enumerate(records.items()):
            if record.get("labels") is None:
                continue
            where = _where((*keys, "versions", i, "labels"))
            labels = record["labels"]
            if entry["spec"].get("problem_type") == "regression":
                raise self.fail(f"{where} is set, but a regression task has no labels to add")
            if not (isinstance(labels, list) and all(isinstance(x, str) and x for x in labels)
                    and len(set(labels)) == len(labels)):
                raise self.fail(f"{where} must be a list of distinct, non-empty label names, got {_kind(labels)}")
            parent = record["parent"]
            before = list(entry["spec"]["labels"]) if parent is None else labels_of(parent)
            if labels[: len(before)] != before:
                raise self.fail(f"{where} is {labels!r}; it must start with the labels of "
                                f"{'the task' if parent is None else f'its parent v{parent}'}, {before!r}, "
                                "in their order")

    def spec(self, spec: Any, task: str, keys: tuple) -> None:
        self.obj(spec, keys)
        if spec.get("name") != task:
            raise self.fail(f"{_where((*keys, 'name'))} is {spec.get('name')!r}, but it is the spec of {task!r}; "
                            "they must be equal")
        try:
            parsed = TaskSpec.from_dict(_known(TaskSpec, spec))
        except (TypeError, ValueError) as exc:
            raise self.fail(f"{_where(keys)} is not a valid task spec ({exc})") from None
        if parsed.labels is None:  # allowed in memory until a ClassLabel fills it in; a stored spec has them
            raise self.fail(f"{_where((*keys, 'labels'))} is null, but a stored {parsed.problem_type} spec must list "
                            "its labels (the head's outputs, in order)")

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
                    and _version_number(member.get("version"))):
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
        self.config(self.field(record, "adapter", keys), "adapter", (*keys, "adapter"))
