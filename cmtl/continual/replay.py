"""Replay buffers: a budget of labelled examples kept from a stream of tasks.

Every buffer is a set of *groups*, each an Algorithm R reservoir (Vitter 1985)
with a quota; the kinds differ only in what a group is: :class:`ReservoirBuffer`
one group, :class:`ClassBalancedBuffer` one per (task, class),
:class:`TaskBalancedBuffer` one per task. Quotas split the budget evenly over the
groups seen so far; a new group shrinks the others by a uniformly random subset.
A buffer is saved as one parquet file: a row per item (labels JSON-encoded), the
RNG state and counters as JSON metadata, so a buffer loaded in another process
continues exactly as if it had never been saved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import numbers
import random
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import KW_ONLY, asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

from cmtl._io import write_bytes_atomic
from cmtl._version import __version__
from cmtl.continual.config import BufferKind
from cmtl.core.tasks import TaskSpec
from cmtl.data import Examples
from cmtl.errors import DataError, ReplayBufferError, TaskNotFoundError

Label = str | int | float | tuple[str, ...] | tuple[float, ...]
FORMAT = 1
REGRESSION_CLASS = "<regression>"  # the one class of all regression targets of a task
NO_LABEL_CLASS = "<none>"  # the class of multi-label items with no label on
_META_KEY = b"cmtl.replay"  # on-disk format: the module's name in cmtl 0.1, kept
_STATE_KEYS = {"format", "kind", "budget", "seed", "rng", "samples", "tasks", "groups", "items"}


@dataclass(frozen=True)
class ReplayItem:
    """One labelled example of one task, checked on creation.

    Args:
        text: The input text.
        label: A label name or index (single-label), a list of label names (multi-label), or a number
            or list of numbers (regression). Lists are stored as tuples so items stay immutable.
        task: The task the example belongs to.
        text_pair: The second text of pair tasks, else ``None``.
        domain: Free-form domain tag, e.g. ``"reviews"``.
        source: Where the example came from, e.g. a data version.

    Raises:
        DataError: a non-string text, task, domain or source, an empty task, or an unusable label.
    """

    text: str
    label: Label
    task: str
    _: KW_ONLY
    text_pair: str | None = None
    domain: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("text", "task", "text_pair", "domain", "source"):
            v = getattr(self, key)
            if not isinstance(v, str) and not (key == "text_pair" and v is None):
                raise DataError(f"{key}={v!r} is a {type(v).__name__}, but {key} must be a string. Convert it "
                                "with str() or drop the example.")
        if not self.task:
            raise DataError("task is empty: name the task the example belongs to.")
        object.__setattr__(self, "label", _check_label(self.label))

    def label_class(self) -> str:
        """The class balanced on: the label (or index), the first of several, or one class for regression."""
        label = self.label
        if isinstance(label, tuple):
            if not label:
                return NO_LABEL_CLASS
            return label[0] if isinstance(label[0], str) else REGRESSION_CLASS
        return REGRESSION_CLASS if isinstance(label, float) else str(label)


_FIELDS = tuple(f.name for f in fields(ReplayItem))  # also the file's columns


def _check_label(label: Any) -> Label:
    def scalar(v: Any) -> str | int | float | None:
        if isinstance(v, str) or isinstance(v, bool):
            return v if isinstance(v, str) else None
        if isinstance(v, numbers.Integral):
            return int(v)
        return float(v) if isinstance(v, numbers.Real) and math.isfinite(v) else None

    many = isinstance(label, (list, tuple))
    checked = [scalar(v) for v in (label if many else [label])]
    if None in checked or len({isinstance(v, str) for v in checked}) > 1:
        raise DataError(f"label={label!r} is not usable. Use a label name or index, a list of label names "
                        "(multi-label), or finite numbers (regression).")
    return tuple(checked) if many else checked[0]


def _as_item(value: Any, position: int) -> ReplayItem:
    if isinstance(value, ReplayItem):
        return value
    if not isinstance(value, Mapping):
        raise DataError(f"Replay item {position} is a {type(value).__name__}; pass a ReplayItem or a dict "
                        "like {'text': ..., 'label': ..., 'task': ...}.")
    unknown = sorted(set(value) - set(_FIELDS), key=str)
    missing = [k for k in ("text", "label", "task") if value.get(k) is None]
    if unknown or missing:
        raise DataError(f"Replay item {position} has {f'unknown keys {unknown}' if unknown else f'no {missing}'}. "
                        f"Items take the keys {list(_FIELDS)}; text, label and task are required.")
    try:
        return ReplayItem(**value)
    except DataError as exc:
        raise DataError(f"Replay item {position}: {exc}") from None


class ReplayBuffer(ABC):
    """A fixed budget of :class:`ReplayItem` kept from a stream, one reservoir per group.

    Args:
        budget: The most items held, at least 1.
        seed: Seeds every random choice: the same seed and stream give the same buffer.
    """

    kind: ClassVar[str]

    def __init__(self, *, budget: int, seed: int = 0) -> None:
        for name, value, low in (("budget", budget, 1), ("seed", seed, 0)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
                raise ReplayBufferError(f"The {name!r} of a replay buffer must be an integer >= {low}. "
                                        f"Got {value!r} instead.")
        self.budget, self.seed = int(budget), int(seed)
        self._rng = random.Random(self.seed)
        self._samples = 0  # sample() calls without a seed so far
        # INVARIANT: groups keep the order in which they were first seen; that order decides who
        # gets the remainder of the budget, so it is part of the state.
        self._groups: dict[tuple[str, ...], list[ReplayItem]] = {}
        self._seen: dict[tuple[str, ...], int] = {}
        self._quota: dict[tuple[str, ...], int] = {}
        self._task_seen: dict[str, int] = {}  # items offered per task, whether or not still held

    @abstractmethod
    def group_of(self, item: ReplayItem) -> tuple[str, ...]:
        """The group an item counts against: ``()``, ``(task,)`` or ``(task, class)``."""

    # --- adding ------------------------------------------------------------------

    def add(self, items: Iterable[ReplayItem | Mapping[str, Any]]) -> None:
        """Offer items from the stream; call as often as data arrives. All are checked before any is added.

        Raises:
            DataError: an item that is not a :class:`ReplayItem` or a dict of its fields, or not usable.
        """
        for item in [_as_item(v, i) for i, v in enumerate(items)]:
            self._offer(item)

    def add_examples(self, examples: Examples, task: str, source: str = "", *, domain: str = "") -> None:
        """Offer labelled :class:`~cmtl.data.examples.Examples` of one task."""
        if examples.labels is None:
            raise DataError(f"The examples for task {task!r} have no labels; replay needs labelled examples.")
        pairs = examples.pairs or [None] * len(examples)
        self.add({"text": t, "text_pair": p, "label": y, "task": task, "domain": domain, "source": source}
                 for t, p, y in zip(examples.texts, pairs, examples.labels))

    def _offer(self, item: ReplayItem) -> None:
        key = self.group_of(item)
        if key not in self._groups:
            self._new_group(key)
        self._seen[key] += 1
        self._task_seen[item.task] = self._task_seen.get(item.task, 0) + 1
        slots, quota = self._groups[key], self._quota[key]
        # INVARIANT: each group holds a uniform random min(seen, quota)-subset of the items of that group
        # offered so far (Algorithm R: the n-th item replaces a random slot with probability quota / n).
        # Quotas never grow, so a group below its quota still holds every item it was offered.
        if len(slots) < quota:
            slots.append(item)
        else:
            j = self._rng.randrange(self._seen[key])
            if j < quota:
                slots[j] = item

    def _new_group(self, key: tuple[str, ...]) -> None:
        self._groups[key], self._seen[key] = [], 0
        # INVARIANT: quotas sum to the budget (or less, with more groups than budget) and differ by at
        # most 1, so len(self) <= budget and full groups are balanced.
        base, extra = divmod(self.budget, len(self._groups))
        self._quota = {k: base + (i < extra) for i, k in enumerate(self._groups)}
        # A uniform subset of a uniform sample is a uniform sample: groups stay reservoirs.
        for k, slots in self._groups.items():
            if len(slots) > self._quota[k]:
                self._groups[k] = [slots[i] for i in sorted(self._rng.sample(range(len(slots)), self._quota[k]))]

    # --- reading -----------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(slots) for slots in self._groups.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget}, seed={self.seed}, size={len(self)}, seen={self.seen})"

    @property
    def seen(self) -> int:
        """How many items were offered in all."""
        return sum(self._task_seen.values())

    def items(self) -> list[ReplayItem]:
        """The items held, group by group in the order groups were first seen."""
        return [item for slots in self._groups.values() for item in slots]

    def sample(self, n: int, *, seed: int | None = None) -> list[ReplayItem]:
        """Draw ``min(n, len(self))`` distinct items.

        Without ``seed``, each call draws afresh from a sequence fixed by the buffer's seed (saved with
        it); with ``seed``, the draw depends only on that seed and the items held. Adding is unaffected.
        """
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise ReplayBufferError(f"sample() needs a number of items n >= 0. Got {n!r} instead.")
        if seed is None:
            rng, self._samples = random.Random(f"cmtl.replay:{self.seed}:{self._samples}"), self._samples + 1
        else:
            rng = random.Random(seed)
        items = self.items()
        return rng.sample(items, min(int(n), len(items)))

    def to_examples(self, task: str | None = None) -> Examples:
        """The items held (of ``task``, or all) as :class:`~cmtl.data.examples.Examples`, to train on; empty for
        a task whose items were all replaced.

        Raises:
            TaskNotFoundError: ``task`` was never offered to this buffer.
            ReplayBufferError: some items have a second text and others not; pass ``task``.
        """
        if task is not None and task not in self._task_seen:
            raise TaskNotFoundError(f"Task {task!r} was never added to this buffer. "
                                    f"Tasks added: {list(self._task_seen)}.")
        items = [it for it in self.items() if task is None or it.task == task]
        has_pair = {it.text_pair is not None for it in items}
        if len(has_pair) > 1:
            raise ReplayBufferError("Some items have a text_pair and others not; call to_examples(task=...) "
                                    "for one task at a time.")
        labels = [list(it.label) if isinstance(it.label, tuple) else it.label for it in items]
        pairs = [it.text_pair for it in items] if has_pair == {True} else None
        return Examples([it.text for it in items], pairs, labels)

    def stats(self) -> dict[str, Any]:
        """Counts held (``per_task``, ``per_label``: task -> class as in :meth:`ReplayItem.label_class`) and offered."""
        per_label: dict[str, Counter[str]] = {}
        for it in self.items():
            per_label.setdefault(it.task, Counter())[it.label_class()] += 1
        return {"kind": self.kind, "budget": self.budget, "size": len(self), "seen": self.seen,
                "seen_per_task": dict(self._task_seen), "per_task": {t: c.total() for t, c in per_label.items()},
                "per_label": {t: dict(c) for t, c in per_label.items()}}

    # --- persistence ---------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything needed to continue this buffer, as plain JSON-compatible values."""
        version, internal, gauss = self._rng.getstate()
        # Labels as JSON text: str, int, float and tuples of them share one column and come back exactly.
        rows = [{**asdict(it), "label": json.dumps(it.label)} for it in self.items()]
        return {"format": FORMAT, "kind": self.kind, "budget": self.budget, "seed": self.seed,
                "rng": [version, list(internal), gauss], "samples": self._samples,
                "tasks": [[t, n] for t, n in self._task_seen.items()],  # a list: JSON keeps its order
                "groups": [[list(key), self._seen[key]] for key in self._groups], "items": rows}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ReplayBuffer:
        """Inverse of :meth:`state`; unknown keys (from a newer cmtl) warn and are ignored.

        Raises:
            ReplayBufferError: a state that is malformed or of another kind than ``cls``.
        """
        if extra := sorted(set(state) - _STATE_KEYS):
            warnings.warn(f"Ignoring unknown replay buffer keys {extra} (written by a newer cmtl?).", stacklevel=2)
        if state.get("format") != FORMAT:
            raise ReplayBufferError(f"Replay buffer format {state.get('format')!r} is not readable by this cmtl "
                                    f"({__version__}), which reads format {FORMAT}.")
        kind = state.get("kind")
        if kind not in BUFFERS or not issubclass(BUFFERS[kind], cls):
            raise ReplayBufferError(f"The state holds a {kind!r} buffer, not a {cls.__name__}: load it with "
                                    f"ReplayBuffer.load or ReplayBuffer.from_state. Known kinds: {list(BUFFERS)}.")
        try:
            buffer = BUFFERS[kind](budget=state["budget"], seed=state["seed"])
            for key, seen in state["groups"]:
                buffer._new_group(tuple(key))  # empty groups: nothing to shrink, no random draw
                buffer._seen[tuple(key)] = int(seen)
            version, internal, gauss = state["rng"]
            buffer._rng.setstate((version, tuple(internal), gauss))
            buffer._samples = int(state["samples"])
            buffer._task_seen = {str(t): int(n) for t, n in state["tasks"]}
            for row in state["items"]:
                item = ReplayItem(**{**row, "label": json.loads(row["label"])})
                buffer._groups[buffer.group_of(item)].append(item)
            if over := [k for k, v in buffer._groups.items() if len(v) > min(buffer._quota[k], buffer._seen[k])]:
                raise ValueError(f"groups {over} hold more items than their quota or than they were offered")
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplayBufferError(f"Malformed replay buffer state: {type(exc).__name__}: {exc}.") from exc
        return buffer

    def to_bytes(self) -> bytes:
        """The buffer as one parquet file: items as rows, the rest as JSON metadata."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = self.state()
        rows = meta.pop("items")
        meta.update(items_sha256=_digest(rows), cmtl_version=__version__)
        table = pa.table({name: pa.array([r[name] for r in rows], pa.string()) for name in _FIELDS})
        sink = io.BytesIO()
        pq.write_table(table.replace_schema_metadata({_META_KEY: json.dumps(meta, sort_keys=True)}), sink)
        return sink.getvalue()

    def save(self, path: str | Path) -> None:
        """Write :meth:`to_bytes` atomically to ``path``."""
        write_bytes_atomic(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> ReplayBuffer:
        """Read a buffer written by :meth:`save`; call on :class:`ReplayBuffer` to load any kind.

        Raises:
            ReplayBufferError: the file is missing, truncated, corrupt, or not a replay buffer.
        """
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise ReplayBufferError(f"Replay buffer file {str(path)!r} does not exist. Save a buffer there first "
                                    "with buffer.save(path).") from exc
        return cls.from_bytes(data, where=f"Replay buffer file {str(path)!r}")

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "Replay buffer") -> ReplayBuffer:
        """Inverse of :meth:`to_bytes`; ``where`` names the source in error messages.

        Raises:
            ReplayBufferError: the data is truncated, corrupt, or not a replay buffer.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as exc:
            raise ReplayBufferError(f"{where} is truncated or corrupt ({exc}). Restore it from a backup or rebuild "
                                    "the buffer.") from exc
        meta = (table.schema.metadata or {}).get(_META_KEY)
        if meta is None or set(_FIELDS) - set(table.column_names):
            raise ReplayBufferError(f"{where} is parquet but not a cmtl replay buffer: it lacks the "
                                    f"{_META_KEY.decode()!r} metadata or the columns {list(_FIELDS)}.")
        try:
            state = json.loads(meta)
            rows = table.select(list(_FIELDS)).to_pylist()
            if state.pop("items_sha256") != _digest(rows):
                raise ValueError("its items do not match the checksum stored with them")
        except (KeyError, ValueError, AttributeError) as exc:
            raise ReplayBufferError(f"{where} is corrupt: {exc}. Restore it from a backup or rebuild the buffer.") \
                from exc
        state.pop("cmtl_version", None)
        return cls.from_state({**state, "items": rows})


def _digest(rows: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps([[r[c] for c in _FIELDS] for r in rows]).encode()).hexdigest()


class ReservoirBuffer(ReplayBuffer):
    """Reservoir sampling, Algorithm R (Vitter 1985, "Random Sampling with a Reservoir").

    Every item offered so far is held with the same probability ``budget / seen``, whatever its task or
    class: the buffer mirrors the stream's mix, including its imbalance.
    """

    kind = "reservoir"

    def group_of(self, item: ReplayItem) -> tuple[str, ...]:
        return ()


class ClassBalancedBuffer(ReplayBuffer):
    """An equal share of the budget per (task, class), a reservoir within each.

    The class-balanced memory of Chaudhry et al. 2019 ("On Tiny Episodic Memories in Continual
    Learning") and GDumb (Prabhu et al. 2020), kept by reservoir sampling. Each class seen holds at most
    ``budget // classes`` (the first ``budget % classes`` classes one more); a new class shrinks the
    others. Multi-label items count for their first label, regression items form one class per task.
    With more classes than budget, the classes seen last get no slot.
    """

    kind = "class_balanced"

    def group_of(self, item: ReplayItem) -> tuple[str, ...]:
        return (item.task, item.label_class())


class TaskBalancedBuffer(ReplayBuffer):
    """An equal share of the budget per task, a reservoir within each (classes as the stream mixes them).

    The per-task episodic memory of GEM (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory for
    Continual Learning"), without knowing the number of tasks in advance: a new task shrinks the others.
    """

    kind = "task_balanced"

    def group_of(self, item: ReplayItem) -> tuple[str, ...]:
        return (item.task,)


BUFFERS: dict[str, type[ReplayBuffer]] = {
    cls.kind: cls for cls in (ReservoirBuffer, ClassBalancedBuffer, TaskBalancedBuffer)
}


def make_buffer(kind: BufferKind, budget: int, seed: int = 0) -> ReplayBuffer:
    """A new, empty buffer of ``kind``: ``"reservoir"``, ``"class_balanced"`` or ``"task_balanced"``."""
    if kind not in BUFFERS:
        raise ReplayBufferError(f"The 'kind' of a replay buffer must be one of {list(BUFFERS)}. Got {kind!r} instead.")
    return BUFFERS[kind](budget=budget, seed=seed)


def stored(spec: TaskSpec, examples: Examples) -> Examples:
    """Examples read back from a stored buffer, with their label names. Buffers and held-out samples
    that earlier releases wrote from integer-labelled data hold positions in ``spec.labels`` (the
    rule then); names pass unchanged."""
    if spec.problem_type == "regression" or examples.labels is None:
        return examples
    names = dataclasses.replace(spec, label_encoding="index").label_names(examples.labels, stored=True)
    return dataclasses.replace(examples, labels=names)
