"""Tasks: what a task predicts (:class:`TaskSpec`); the head that predicts it is in :mod:`cmtl.core.heads`.

This module imports no torch at import time (the registry's manifest and the CLI's manifest-only
commands read task specs); the methods that build tensors import it when called.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping
from dataclasses import KW_ONLY, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, Sequence

from cmtl._config import plain_numbers
from cmtl.errors import DataError, InvalidParameterError, NonFiniteOutputError, bad_param

if TYPE_CHECKING:
    import torch

ProblemType = Literal["single_label", "multi_label", "regression"]
PROBLEM_TYPES = ("single_label", "multi_label", "regression")
#: Per problem type, the validation metric early stopping and gating rank by, and whether higher is better.
PRIMARY_METRIC = {"single_label": ("accuracy", True), "multi_label": ("micro_f1", True), "regression": ("mse", False)}
LabelEncoding = Literal["value", "index"]
LABEL_ENCODINGS = ("value", "index")
#: Logit given to a class a row may not take (another task's column, an unseen class):
#: never the argmax, and its softmax weight underflows to exactly 0 without NaNs.
MASKED_LOGIT = -1e4
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its name, its outputs and where its data lives.

    How raw label values become label names (one rule for every data source, see
    :func:`cmtl.data.read_examples`):

    * A ``datasets.Dataset`` label column of type ``ClassLabel`` (or a sequence of
      ``ClassLabel`` for multi-label) holds integers whose ClassLabel names are the truth:
      each integer becomes its name, matched to ``labels`` by name. Leave ``labels`` out to
      take them from the ClassLabel, in its order (:func:`cmtl.data.examples.spec_for_data`); labels
      that lack a ClassLabel name are refused.
    * Strings are label names.
    * Other integers (a DataFrame, a list of dicts, JSON, a CSV column of integers, a Dataset
      int column) are matched by value to numeric label names when ``label_encoding`` is
      ``"value"`` (``1`` -> ``'1'``), and are positions in ``labels`` only when it is
      ``"index"`` (``1`` -> ``labels[1]``). Integers with non-numeric label names and
      ``"value"`` are refused, since their meaning is not known.
    * Without ``labels``, integers become their string form (``0`` -> ``'0'``).
    * A multi-label row is a list of distinct labels (names, or positions with
      ``"index"``). Multi-hot 0/1 vectors are not accepted: ``[1, 0, 1]`` would read as
      positions 1, 0, 1 (or values 1, 0, 1), so a row that names a label twice is refused, and
      so is data whose every row names every label by number (one-hot rows of a task with one or
      two labels); nor are mappings of label flags (``{"a": 0, "b": 1}`` would read as both labels).

    Args:
        name: Unique task name: letters, digits, ``_`` and ``-``, at most 64.
        labels: The label names. Single-label data holds one of them per row;
            multi-label data a list of them. For regression, the names of the
            targets (default one target, ``"score"``). ``None`` (single- and
            multi-label): taken from the training data's ClassLabel names when the
            task is added; training without them is refused.
        problem_type: ``"single_label"``, ``"multi_label"`` or ``"regression"``.
        text_column: Column holding the input text.
        text_pair_column: Column holding the second text for pair tasks
            (entailment, similarity); ``None`` for single texts.
        label_column: Column holding the label(s) or target(s).
        label_encoding: What plain integer labels mean: ``"value"`` (default), the
            label whose name is that number; ``"index"``, the label at that position
            in ``labels``. ClassLabel columns and string labels are read by name either way.
        threshold: Multi-label decision threshold on each label's probability (other problem types
            read none: setting one there is refused).
        description: Free text shown in listings.
    """

    name: str
    _: KW_ONLY
    labels: tuple[str, ...] | None = None
    problem_type: ProblemType = "single_label"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_encoding: LabelEncoding = "value"
    threshold: float = 0.5
    description: str = ""

    def __post_init__(self) -> None:
        plain_numbers(self)
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"Task name {self.name!r} is not allowed: use 1-64 letters, digits, '_' or '-', "
                "starting with a letter or digit, e.g. 'spam' or 'topic-v2'."
            )
        owner = f"TaskSpec {self.name!r}"
        if self.problem_type not in PROBLEM_TYPES:
            raise InvalidParameterError(bad_param("problem_type", owner, f"be one of {list(PROBLEM_TYPES)}",
                                                  self.problem_type))
        if self.label_encoding not in LABEL_ENCODINGS:
            raise InvalidParameterError(bad_param(
                "label_encoding", owner, f"be one of {list(LABEL_ENCODINGS)}", self.label_encoding,
                "Use 'value' when integer labels are the label names' numbers, 'index' when they are positions in "
                "labels."))
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold < 1.0:
            raise InvalidParameterError(bad_param("threshold", owner, "be in (0, 1)", threshold))
        object.__setattr__(self, "threshold", float(threshold))  # a numpy float would not write to JSON
        if self.threshold != 0.5 and self.problem_type != "multi_label":
            predicts = "values" if self.problem_type == "regression" else "its most probable label"
            raise InvalidParameterError(bad_param(
                "threshold", owner, "be left out", self.threshold,
                f"It applies to multi-label tasks only (a label is on where its probability reaches it); a "
                f"{self.problem_type} task predicts {predicts}, so it would be ignored."))
        labels = self.labels
        if labels is None and self.problem_type == "regression":
            labels = ("score",)
        if labels is None:  # single/multi-label: filled in from the data's ClassLabel (cmtl.data.examples.spec_for_data)
            return
        if isinstance(labels, str):
            raise InvalidParameterError(bad_param(
                "labels", owner, f"be a list of label names, e.g. TaskSpec({self.name!r}, labels=['neg', 'pos'])",
                labels))
        labels = tuple(str(label) for label in labels)
        if len(set(labels)) != len(labels):
            raise InvalidParameterError(bad_param("labels", owner, "not hold duplicate labels", list(labels)))
        if self.problem_type == "single_label" and len(labels) < 2:
            raise InvalidParameterError(bad_param("labels", owner, "hold at least 2 labels for a single-label "
                                                  "task", list(labels)))
        object.__setattr__(self, "labels", labels)

    @property
    def num_outputs(self) -> int:
        return len(self._known_labels())

    def _known_labels(self) -> tuple[str, ...]:
        if self.labels is None:
            raise ValueError(
                f"Task {self.name!r} has no labels yet. Pass them, e.g. TaskSpec({self.name!r}, "
                "labels=['neg', 'pos']), or take them from a datasets.Dataset whose label column is a ClassLabel: "
                "cmtl.data.examples.spec_for_data(spec, dataset)."
            )
        return self.labels

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = None if self.labels is None else list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        """Inverse of :meth:`to_dict`; unknown keys (from a newer cmtl) warn and are ignored."""
        known = {f.name for f in fields(cls)} - {"_"}
        extra = sorted(set(d) - known)
        if extra:
            warnings.warn(f"Ignoring unknown TaskSpec keys {extra} (written by a newer cmtl?).", stacklevel=2)
        kwargs = {k: v for k, v in d.items() if k in known}
        if kwargs.get("problem_type", "single_label") != "multi_label":  # never read: older records may hold one
            kwargs.pop("threshold", None)
        return cls(kwargs.pop("name"), **kwargs)

    # --- labels -----------------------------------------------------------------

    def label_names(self, values: Sequence[Any], *, class_names: Sequence[str] | None = None,
                    stored: bool = False) -> list:
        """Raw label values -> label names, by the rule in the class docstring.

        Single-label: one name per row. Multi-label: a list of names per row (a lone
        string is a one-label row). Regression: the values, unchanged.

        Args:
            values: One raw label (multi-label: one label or a list of them) per row.
            class_names: The ClassLabel names of the label column, if it is one; its
                integers are then read as those names.
            stored: ``values`` are rows cmtl wrote (a replay buffer, a held-out sample): lists of
                positions, never multi-hot vectors, so rows that all name every label are kept.

        Raises:
            DataError: a value that names no label of the task, integers whose meaning
                is not known, or ClassLabel names the task's labels lack.
        """
        if self.problem_type == "regression":
            return [self._number(v, row) for row, v in enumerate(values)]
        if class_names is not None:
            class_names = [str(n) for n in class_names]
            lacking = [n for n in class_names if self.labels is not None and n not in self.labels]
            if lacking:
                raise DataError(
                    f"Column {self.label_column!r} is a ClassLabel with names {class_names}, but task {self.name!r} "
                    f"has labels {list(self.labels)}, which lack {lacking}. ClassLabel names are matched to the "
                    f"task's labels by name: give labels that include every ClassLabel name, e.g. "
                    f"TaskSpec({self.name!r}, labels={class_names}), or leave labels out to take them from the "
                    "ClassLabel."
                )
        unknown: set[str] = set()
        integers = False
        by_value = self._by_value() if self.labels is not None else {}

        def name_of(v: Any) -> str | None:
            nonlocal integers
            if hasattr(v, "item") and not isinstance(v, str):  # numpy / torch scalars
                v = v.item()
            if isinstance(v, str):
                return v if self.labels is None or v in self.labels else None
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                return None
            integral = isinstance(v, numbers.Integral) or (math.isfinite(v) and float(v).is_integer())
            if class_names is not None:
                return class_names[int(v)] if integral and 0 <= int(v) < len(class_names) else None
            if self.labels is None:
                return str(int(v)) if integral else str(v)
            if self.label_encoding == "index":
                return self.labels[int(v)] if integral and 0 <= int(v) < len(self.labels) else None
            integers = True
            if integral and str(int(v)) in self.labels:
                return str(int(v))
            return by_value.get(float(v))

        out: list = []
        every = 0  # multi-label rows that name every label, each by a number: one-hot rows read as positions?
        for row, v in enumerate(values):
            if self.problem_type == "multi_label":
                self._check_row_type(row, v)
                items = [v] if isinstance(v, str) or not hasattr(v, "__iter__") else list(v)
                names = [name_of(item) for item in items]
                unknown.update(repr(item) for item, n in zip(items, names) if n is None)
                self._check_distinct(row, items, names)
                out.append(names)
                every += (class_names is None and self.labels is not None and len(set(names) - {None}) ==
                          len(self.labels) and not any(isinstance(item, str) for item in items))
            else:
                name = name_of(v)
                if name is None:
                    unknown.add(repr(v.item() if hasattr(v, "item") and not isinstance(v, str) else v))
                out.append(name)
        if integers and not by_value:
            raise DataError(
                f"Integer labels in the data of task {self.name!r}, whose labels {list(self.labels)} are not numbers: "
                "integers are matched to label names by value. Either use the label strings in the data, or, if the "
                f"integers are positions in labels (indices 0..{len(self.labels) - 1}), say so with "
                f"TaskSpec({self.name!r}, labels=..., label_encoding='index')."
            )
        if unknown:
            hint = {
                "index": f"integer labels are indices 0..{len(self._known_labels()) - 1}, label_encoding='index'",
                "value": "integer labels are matched to numeric label names by value",
            }[self.label_encoding] if self.labels is not None else "labels must be strings or integers"
            raise DataError(
                f"Labels {', '.join(sorted(unknown)[:10])} in the data of task {self.name!r} are not in its label set "
                f"{None if self.labels is None else list(self.labels)} ({hint}). Fix the data or declare the labels "
                "in the TaskSpec; to add labels to a task in a registry, update it with the new ones "
                "(update_task(..., labels=[...current labels, ...new ones]), `cmtl update --labels`)."
            )
        if len(out) > 1 and every == len(out) and not stored:
            read = "positions" if self.label_encoding == "index" else "values"
            raise DataError(
                f"Every row of the data of task {self.name!r} names every label {list(self.labels)} ({len(out)} rows), "
                f"by number: the task would have nothing to learn. If the rows are multi-hot 0/1 vectors (with "
                f"{len(self.labels)} label(s) a one-hot row names no label twice), they were read as {read}: give each "
                f"row the list of its label names instead, e.g. [{self.labels[0]!r}] for {self.labels[0]!r} alone."
            )
        return out

    def _check_row_type(self, row: int, value: Any) -> None:
        """Refuse a multi-label row that iterates as something else than its labels: a mapping gives its
        keys (``{'a': 0, 'b': 1}``: every label on, whatever the flags), bytes give integers."""
        if isinstance(value, Mapping):
            read = "every key would be one of its labels, whatever its value"
            example = f"e.g. {[k for k, on in value.items() if on]!r}, the keys whose values are true"
        elif isinstance(value, (bytes, bytearray)):
            read, example = "each byte would be a number", "e.g. ['label_a', 'label_c']"
        else:
            return
        raise DataError(
            f"Row {row} of the data of task {self.name!r} is a {type(value).__name__} ({value!r:.80}), not a list of "
            f"labels: read as one, {read}. A multi-label row is a list of distinct label names ({example}), or of "
            f"their positions in labels with TaskSpec({self.name!r}, ..., label_encoding='index')."
        )

    def _check_distinct(self, row: int, items: list, names: list[str | None]) -> None:
        """Refuse a multi-label row that names a label twice: most likely a multi-hot 0/1 vector,
        whose entries would otherwise be read as positions or values, silently."""
        seen: set[str] = set()
        twice = next((n for n in names if n is not None and (n in seen or seen.add(n))), None)
        if twice is None:
            return
        raw = [v.item() if hasattr(v, "item") and not isinstance(v, str) else v for v in items]
        example = "e.g. ['label_a', 'label_c']"
        if self.labels is not None and len(raw) == len(self.labels) and set(raw) <= {0, 1}:
            meant = [i for i, flag in enumerate(raw) if flag == 1]
            example = f"for this row {[self.labels[i] for i in meant]}, or {meant}"
        raise DataError(
            f"Row {row} of the data of task {self.name!r} names label {twice!r} twice: {raw!r}. A multi-label row is a "
            "list of distinct labels; multi-hot 0/1 vectors are not accepted. Give the list of label names, or their "
            f"positions in labels with TaskSpec({self.name!r}, ..., label_encoding='index') ({example})."
        )

    def _by_value(self) -> dict[float, str]:
        """Numeric label names by their value, e.g. {1.0: '1'}; the first name wins a tie."""
        out: dict[float, str] = {}
        for label in reversed(self._known_labels()):
            try:
                value = float(label)
            except ValueError:
                continue
            if math.isfinite(value):
                out[value] = label
        return out

    def encode_labels(self, values: Sequence[Any]) -> torch.Tensor:
        """Turn raw label values into a target tensor.

        Single-label: a label per row (read by :meth:`label_names`) -> (N,) long.
        Multi-label: a list of labels per row -> (N, L) float multi-hot.
        Regression: a number (or a list of L numbers) per row -> (N, L) float.

        Raises:
            DataError: a value that is not one of the task's labels, or not a number.
        """
        import torch

        if self.problem_type == "single_label":
            index = {label: i for i, label in enumerate(self._known_labels())}
            return torch.tensor([index[name] for name in self.label_names(values)], dtype=torch.long)
        if self.problem_type == "multi_label":
            index = {label: i for i, label in enumerate(self._known_labels())}
            target = torch.zeros(len(values), len(self.labels))
            for row, names in enumerate(self.label_names(values)):
                target[row, [index[name] for name in names]] = 1.0
            return target
        try:
            target = torch.tensor([[float(x) for x in (v if isinstance(v, (list, tuple)) else [v])] for v in values])
        except (TypeError, ValueError) as exc:
            raise DataError(f"Regression targets of task {self.name!r} must be numbers: {exc}.") from exc
        if target.ndim != 2 or target.shape[1] != len(self.labels):
            raise DataError(
                f"Task {self.name!r} has {len(self.labels)} regression target(s) {list(self.labels)}; "
                f"the data has shape {tuple(target.shape)}."
            )
        if not torch.isfinite(target).all():
            raise DataError(f"Regression targets of task {self.name!r} contain NaN or infinite values.")
        return target

    def _number(self, value: Any, row: int) -> float | list[float]:
        """A regression target as a float (a list of floats for several targets), whatever the source
        gave: CSV and TSV give strings, JSON and DataFrames integers or floats."""
        try:
            if isinstance(value, (list, tuple)) or (hasattr(value, "tolist") and getattr(value, "ndim", 0)):
                return [float(x) for x in value]
            if isinstance(value, bool):
                raise ValueError(f"{value!r} is a bool")
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"Regression targets of task {self.name!r} must be numbers: column "
                            f"{self.label_column!r} holds {value!r} at row {row}.") from None

    # --- outputs ----------------------------------------------------------------

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of logits (B, L) against encoded targets. A multi-label target may hold NaN where a row
        has no answer for a label (an update's old rows, annotated before it was added): the mean is over the
        other cells."""
        import torch.nn.functional as F

        if self.problem_type == "single_label":
            return F.cross_entropy(logits, target)
        if self.problem_type == "multi_label":
            known = ~target.isnan()
            if bool(known.all()):
                return F.binary_cross_entropy_with_logits(logits, target)
            return F.binary_cross_entropy_with_logits(logits[known], target[known])
        return F.mse_loss(logits, target)

    def unanswered(self, logits: torch.Tensor) -> torch.Tensor:
        """(N,) bool: rows of logits (N, L) that give no answer (:func:`unanswered`)."""
        return unanswered(logits, self.problem_type)

    def check_answered(self, logits: torch.Tensor, first_row: int = 0) -> None:
        """Raise :class:`~cmtl.errors.NonFiniteOutputError` if a row gives no answer (:meth:`unanswered`), naming
        it as ``first_row`` + its index (the row among the caller's inputs)."""
        if bool(logits.isfinite().all()):  # the usual case, in one pass: the server checks every row it decodes
            return
        rows = self.unanswered(logits).nonzero().flatten().tolist()
        if rows:
            raise NonFiniteOutputError(
                f"The model gave no answer for row {first_row + rows[0]} of these inputs of task {self.name!r}"
                f"{f' ({len(rows)} such rows)' if len(rows) > 1 else ''}: its outputs are NaN or infinite. The "
                "weights answering it, or the backbone, make non-finite numbers: check the version's files (a version "
                "trained by cmtl never stores them) and, on a GPU, run the backbone in float32 (half precision can "
                "overflow).")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax (single-label), per-label sigmoid (multi-label) or the values (regression).

        Raises:
            NonFiniteOutputError: a row gives no answer (:meth:`unanswered`).
        """
        self.check_answered(logits)
        if self.problem_type == "single_label":
            return logits.softmax(-1)
        if self.problem_type == "multi_label":
            return logits.sigmoid()
        return logits

    def decode(self, logits: torch.Tensor) -> list:
        """Human-readable predictions: a label, a list of labels, or a number (or list of numbers).

        Raises:
            NonFiniteOutputError: a row gives no answer (:meth:`unanswered`); before, a NaN row read as the
                first label.
        """
        self.check_answered(logits)
        if self.problem_type == "single_label":
            return [self.labels[i] for i in logits.argmax(-1).tolist()]
        if self.problem_type == "multi_label":
            on = (logits.sigmoid() >= self.threshold).tolist()
            return [[label for label, flag in zip(self.labels, row) if flag] for row in on]
        values = logits.tolist()
        return [row[0] for row in values] if len(self.labels) == 1 else values


def label_key(name: str) -> str:
    """What two label names that a reader would take for one class share: the name without surrounding
    spaces, case or Unicode form differences ('Pos ', 'pos'; 'café' as one code point or as 'e' and a
    combining accent; full-width letters)."""
    import unicodedata

    return unicodedata.normalize("NFKC", name).strip().casefold()


def unanswered(logits: torch.Tensor, problem_type: ProblemType = "single_label") -> torch.Tensor:
    """(N,) bool: rows of logits (N, L) that give no answer: a NaN anywhere; for single-label also an ``inf``
    logit or none finite (softmax is NaN then); for regression any value not finite. A ``-inf`` logit is a
    class never predicted (analytic heads give one to a class without rows)."""
    import torch

    if problem_type == "regression":
        return ~torch.isfinite(logits).all(-1)
    bad = torch.isnan(logits).any(-1)
    if problem_type == "single_label":
        bad |= torch.isposinf(logits).any(-1) | ~torch.isfinite(logits).any(-1)
    return bad


def answers(labels: Sequence[str], logits: torch.Tensor) -> list[str | None]:
    """Single-label answers: each row's label of largest logit, ``None`` for a row that gives no answer
    (:func:`unanswered`), which a comparison with the true label scores as wrong."""
    return [None if bad else labels[k] for k, bad in zip(logits.argmax(-1).tolist(), unanswered(logits).tolist())]


def __getattr__(name: str):
    """The head and its helpers lived here until 0.2; they import torch, so they moved to :mod:`cmtl.core.heads`."""
    if name in ("TaskHead", "route_to_heads", "check_head_state"):
        from cmtl.core import heads

        return getattr(heads, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
