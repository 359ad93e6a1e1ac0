"""User data in: examples with label names.

Training and evaluation data may be a ``datasets.Dataset``, a pandas
DataFrame, a path to a CSV/TSV/JSONL/JSON/Parquet file, or a list of dicts.
:func:`read_examples` checks it against a :class:`~cmtl.core.tasks.TaskSpec` and
turns its labels into label names (one rule for every source, see
:class:`~cmtl.core.tasks.TaskSpec`). :mod:`cmtl.data.batching` takes them on to tensors.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from cmtl.core.tasks import TaskSpec
from cmtl.errors import DataError


@dataclass
class Examples:
    """Texts (and optional second texts and raw labels) read from user data."""

    texts: list[str]
    pairs: list[str] | None = None
    labels: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def fingerprint(self) -> str:
        """SHA-256 of the rows in order: identifies the data a version was trained on."""
        h = hashlib.sha256()
        for i, text in enumerate(self.texts):
            row = [text, self.pairs[i] if self.pairs else None, self.labels[i] if self.labels else None]
            h.update(json.dumps(row, default=str).encode())
            h.update(b"\n")
        return h.hexdigest()

    @staticmethod
    def concat(parts: Sequence["Examples"]) -> "Examples":
        """Rows of several example sets, in order; all or none must carry pairs (and labels)."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return Examples([])
        join = lambda xs: None if any(x is None for x in xs) else [v for x in xs for v in x]  # noqa: E731
        return Examples(join([p.texts for p in parts]), join([p.pairs for p in parts]),
                        join([p.labels for p in parts]))

    def select(self, indices: Sequence[int]) -> "Examples":
        pick = lambda xs: None if xs is None else [xs[i] for i in indices]  # noqa: E731
        return Examples([self.texts[i] for i in indices], pick(self.pairs), pick(self.labels))

    def inputs(self) -> list[tuple[str, str | None]]:
        """What the model reads of each row: its text and second text (``None`` without pairs)."""
        return list(zip(self.texts, self.pairs if self.pairs is not None else [None] * len(self.texts)))


def shared_inputs(train: Examples, other: Examples) -> list[int]:
    """Rows of ``other`` whose input (text, and second text of a pair) is also an input of ``train``."""
    seen = set(train.inputs())
    return [i for i, key in enumerate(other.inputs()) if key in seen]


def warn_shared(train: Examples, other: Examples, what: str, task: str, consequence: str, *, stacklevel: int = 3
                ) -> None:
    """Warn when rows of ``other`` (``what``: e.g. "validation rows") are inputs of ``train`` as well: scored
    there, the model is asked what it was trained on, and the score is optimistic. ``stacklevel``: that of
    the user's call (3 when the caller of this function is the public method)."""
    rows = shared_inputs(train, other)
    if rows:
        warnings.warn(f"Task {task!r}: {len(rows)} of {len(other)} {what} ({100 * len(rows) / len(other):.0f} %) "
                      f"are also in the training data, e.g. {other.texts[rows[0]][:60]!r}: scores on them measure "
                      f"what training memorised, so {consequence} optimistic. Remove them from one side.",
                      UserWarning, stacklevel=stacklevel)


@dataclass
class _Table:
    """A data source seen as columns."""

    columns: list[str]
    column: Callable[[str], list]  # column name -> its values, one per row
    rows: int
    features: dict[str, Any]  # a datasets.Dataset's column types; empty for other sources
    untyped: bool = False  # values are text as a CSV/TSV stores them


SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


def _table(data: Any, encoding: str | None = None) -> _Table:
    import pandas as pd

    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None

    untyped = False
    if isinstance(data, (str, Path)):
        untyped = Path(data).suffix.lower() in (".csv", ".tsv")
        data = read_file(data, encoding=encoding)
    elif encoding is not None:
        raise DataError(f"encoding={encoding!r} applies to a data file path; got a {type(data).__name__}. "
                        "Leave it out.")
    if datasets is not None and isinstance(data, datasets.DatasetDict):
        raise DataError(
            f"Got a DatasetDict with splits {list(data)}; pass one split, e.g. data['train']."
        )
    if datasets is not None and isinstance(data, datasets.Dataset):
        return _Table(list(data.column_names), lambda c: list(data[c]), len(data), dict(data.features))
    if isinstance(data, pd.DataFrame):
        return _Table([str(c) for c in data.columns], lambda c: data[c].tolist(), len(data), {}, untyped)
    if isinstance(data, (list, tuple)):
        if data and not all(isinstance(row, dict) for row in data):
            raise DataError("A list of examples must hold dicts like {'text': ..., 'label': ...}.")
        cols = sorted({k for row in data for k in row}) if data else []
        return _Table(cols, lambda c: [row.get(c) for row in data], len(data), {})
    raise DataError(
        f"Unsupported data type {type(data).__name__}. Pass a datasets.Dataset, a pandas DataFrame, "
        "a path to a .csv/.tsv/.jsonl/.json/.parquet file, or a list of dicts."
    )


def _class_names(feature: Any) -> list[str] | None:
    """The names of a ClassLabel feature, or of the ClassLabel inside a sequence feature."""
    import datasets

    inner = getattr(feature, "feature", None)  # Sequence(ClassLabel) / List(ClassLabel)
    for f in (feature, inner):
        if isinstance(f, datasets.ClassLabel):
            return list(f.names)
    return None


def spec_for_data(spec: TaskSpec, data: Any) -> TaskSpec:
    """``spec``, with its labels taken from ``data``'s ClassLabel names (in their order)
    when it has none; ``spec`` itself when it has them.

    Raises:
        DataError: ``spec`` has no labels and the label column of ``data`` is not a
            ``datasets.ClassLabel``, so nothing names them.
    """
    if spec.labels is not None:
        return spec
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    names = None
    if datasets is not None and isinstance(data, datasets.Dataset) and spec.label_column in data.features:
        names = _class_names(data.features[spec.label_column])
    if not names:
        raise DataError(
            f"Task {spec.name!r} needs a list of label names, e.g. TaskSpec({spec.name!r}, labels=['neg', 'pos']). "
            f"Only a datasets.Dataset whose column {spec.label_column!r} is a ClassLabel names them by itself."
        )
    return dataclasses.replace(spec, labels=tuple(names))


def read_file(path: str | Path, *, encoding: str | None = None):
    """Read a table file into a DataFrame, keeping text as text (no NaN for 'NA').

    Args:
        path: A .csv, .tsv, .jsonl, .json or .parquet file.
        encoding: The text encoding of a CSV/TSV/JSON file (any Python codec name,
            e.g. ``'latin-1'``); ``None`` means UTF-8. Parquet is always UTF-8.

    Raises:
        DataError: a missing, empty, undecodable or unreadable file, or an unknown or
            non-text encoding.
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise DataError(f"Data file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"Unsupported data file {str(path)!r}: use .csv, .tsv, .jsonl, .json or .parquet.")
    if encoding is not None:
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise DataError(
                f"Unknown encoding {encoding!r} for {str(path)!r}: use a Python codec name such as 'utf-8', "
                "'latin-1' or 'cp1252'."
            ) from None
        try:
            "".encode(codec)  # LookupError for bytes-to-bytes or str-to-str codecs (rot13, hex, base64)
        except LookupError:
            raise DataError(
                f"Encoding {encoding!r} is not a text encoding (it does not turn bytes into text), so it cannot "
                f"read {str(path)!r}: use a text encoding such as 'utf-8', 'latin-1' or 'cp1252'."
            ) from None
        if suffix == ".parquet" and codec != "utf-8":
            raise DataError(f"Parquet stores text as UTF-8; encoding={encoding!r} does not apply to {str(path)!r}. "
                            "Leave it out.")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"Data file {str(path)!r} is empty (0 bytes): it needs a header and at least one example.")
    kind = {".csv": "CSV", ".tsv": "TSV", ".jsonl": "JSON lines", ".json": "JSON", ".parquet": "Parquet"}[suffix]
    try:
        table = _read_table(path, suffix, encoding)
    except UnicodeDecodeError as exc:
        raise _decode_error(path, encoding, exc) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"Data file {str(path)!r} is empty: it holds no header row, so no columns.") from exc
    except (pd.errors.ParserError, ValueError, OSError) as exc:  # pyarrow's errors subclass these too
        raise DataError(f"Cannot read {str(path)!r} as {kind}: {exc}") from exc
    if suffix in (".csv", ".tsv"):
        _check_fields(table, path, suffix)
        _check_short_rows(path, suffix, encoding, len(table.columns))
    return table


def _read_table(path: Path, suffix: str, encoding: str | None):
    import pandas as pd

    if suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False, dtype=str, encoding=encoding or "utf-8")
    if suffix == ".tsv":  # TSV has no quoting: a quotation mark is text (GLUE's files rely on it)
        return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype=str,
                           encoding=encoding or "utf-8")
    if suffix in (".jsonl", ".json"):  # pandas' CSV reader skips a UTF-8 byte order mark, its JSON reader does not
        utf8 = codecs.lookup(encoding or "utf-8").name == "utf-8"
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False, encoding="utf-8-sig" if utf8 else encoding)
    return pd.read_parquet(path)


def _check_fields(table, path: Path, suffix: str) -> None:
    """Refuse a CSV/TSV whose rows hold more fields than its header names: pandas takes the extra first fields
    as a row index and drops them, so texts with an unquoted comma (a tab) in every row lost their first part."""
    import pandas as pd

    if isinstance(table.index, pd.RangeIndex):
        return
    separator, fix = {".csv": ("a comma", "quote texts that hold one"),
                      ".tsv": ("a tab", "a TSV text cannot hold one")}[suffix]
    columns = list(table.columns)
    raise DataError(
        f"The rows of {str(path)!r} have {len(columns) + table.index.nlevels} fields but its header has "
        f"{len(columns)} column names {columns}: a text holding {separator} splits its row ({fix}), or the header "
        "lacks a column's name. Fix the file: its first fields would otherwise be dropped as a row index."
    )


def _check_short_rows(path: Path, suffix: str, encoding: str | None, width: int) -> None:
    """Refuse a CSV/TSV row with fewer fields than the header: pandas fills the missing ones with empty strings,
    so a row that lost its text or label would train as an empty one. A second pass with Python's csv module,
    which reads fields as pandas does (quoted line breaks inside one field; TSV without quoting), but says how many
    a row had. Blank lines are skipped, as pandas skips them."""
    utf8 = codecs.lookup(encoding or "utf-8").name == "utf-8"
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {}
    limit = csv.field_size_limit(min(path.stat().st_size + 1, 2**31 - 1))  # a field may be as long as the file
    try:
        with path.open(newline="", encoding="utf-8-sig" if utf8 else encoding) as f:
            rows = csv.reader(f, **options)
            header = next(rows, None)
            for row in rows:
                if row and len(row) < width:
                    fields = f"{len(row)} field{'s' if len(row) != 1 else ''}"
                    raise DataError(
                        f"In {str(path)!r}, line {rows.line_num} has {fields} but its header has {width} column "
                        f"names {header}: pandas would read the missing fields as empty values. Complete the row, or "
                        "write an empty field explicitly (a separator with nothing after it) where a value is meant "
                        "to be empty."
                    )
    finally:
        csv.field_size_limit(limit)


def _decode_error(path: Path, encoding: str | None, exc: UnicodeDecodeError) -> DataError:
    """The error for a file that is not in ``encoding``, naming the first bad byte's offset in
    the file (pandas decodes in chunks, so ``exc`` only knows its offset in a chunk)."""
    codec = encoding or "utf-8"
    decoder = codecs.getincrementaldecoder(codec)()
    offset, start, bad = exc.start, 0, exc.object[exc.start : exc.start + 1]
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as full:
                offset = start - pending + full.start
                bad = full.object[full.start : full.start + 1]
                break
            start += len(chunk)
    name = "UTF-8" if encoding is None else repr(encoding)
    return DataError(
        f"Data file {str(path)!r} is not valid {name}: byte {offset} ({bad!r}) cannot be decoded. If the file is in "
        "another encoding, name it: read_examples(path, spec, encoding='latin-1') or read_file(path, "
        "encoding='latin-1') in Python, `--encoding latin-1` on the command line (or 'cp1252', ...); "
        "or save the file as UTF-8."
    )


_INTEGER = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # what pandas reads as a number


def read_examples(data: Any, spec: TaskSpec, *, labelled: bool = True, encoding: str | None = None) -> Examples:
    """Read texts (and labels) for ``spec`` from any supported data source.

    Labels come out as label names (single-label: one per row; multi-label: a list per
    row; regression: the numbers), by the rule documented on :class:`~cmtl.core.tasks.TaskSpec`:
    a ``datasets.ClassLabel`` column by its names; strings as names; other integers by
    value, or as positions when ``spec.label_encoding == "index"``. A CSV/TSV stores no
    types, so (for a task with labels) a label column that holds only number literals is
    read as numbers, as pandas would read it (``1.0`` is the number 1): the same rows give
    the same labels from every source. A column of decimals that are all label names as
    written (``1.1``, ``1.10``) keeps them as names.

    Args:
        data: A ``datasets.Dataset``, a pandas DataFrame, a path to a .csv/.tsv/.jsonl/
            .json/.parquet file, a list of dicts, or :class:`Examples`.
        spec: The task: its columns, labels and label encoding.
        labelled: Read the label column too.
        encoding: Text encoding of a data file (see :func:`read_file`); ``None`` is UTF-8.

    Raises:
        DataError: empty data, a missing column, texts that are not valid strings,
            labels outside the task's label set, or an unreadable file.
    """
    if isinstance(data, Examples):
        return _check_examples(data, spec, labelled)
    table = _table(data, encoding)
    if table.rows == 0:
        raise DataError(f"The data for task {spec.name!r} is empty: it needs at least one example.")
    wanted = {"text_column": spec.text_column, "text_pair_column": spec.text_pair_column,
              "label_column": spec.label_column if labelled else None}
    missing = {field: c for field, c in wanted.items() if c is not None and c not in table.columns}
    if missing:
        fix = ", ".join(f"{field}=..." for field in missing)
        raise DataError(
            f"Column(s) {list(missing.values())} not found in the data for task {spec.name!r}. Columns present: "
            f"{table.columns}. Rename the columns, or name yours with TaskSpec(..., {fix})."
        )
    texts = _texts(table.column(spec.text_column), spec.text_column)
    pairs = _texts(table.column(spec.text_pair_column), spec.text_pair_column) if spec.text_pair_column else None
    labels = None
    if labelled:
        labels = list(table.column(spec.label_column))
        bad = [i for i, v in enumerate(labels) if v is None or (isinstance(v, float) and math.isnan(v))]
        if bad:
            raise DataError(f"Column {spec.label_column!r} has missing labels at rows {bad[:10]}.")
        if (table.untyped and spec.labels is not None and spec.problem_type == "single_label"
                and all(_NUMBER.fullmatch(v) for v in labels)):
            if all(_INTEGER.fullmatch(v) for v in labels):
                labels = [int(v) for v in labels]
            elif not set(labels) <= set(spec.labels):  # names written as they are stay names: '1.10' is not '1.1'
                labels = [int(v) if _INTEGER.fullmatch(v) else float(v) for v in labels]
        labels = spec.label_names(labels, class_names=_class_names(table.features.get(spec.label_column)))
    return Examples(texts, pairs, labels)


def _check_examples(examples: Examples, spec: TaskSpec, labelled: bool) -> Examples:
    if not len(examples):
        raise DataError(f"The data for task {spec.name!r} is empty: it needs at least one example.")
    if labelled and examples.labels is None:
        raise DataError(f"The examples for task {spec.name!r} carry no labels.")
    if (examples.pairs is None) != (spec.text_pair_column is None):
        raise DataError(f"Task {spec.name!r} {'takes' if spec.text_pair_column else 'does not take'} text pairs.")
    for what, values in (("text pairs", examples.pairs), ("labels", examples.labels if labelled else None)):
        if values is not None and len(values) != len(examples.texts):
            raise DataError(f"The examples for task {spec.name!r} hold {len(examples.texts)} texts but {len(values)} "
                            f"{what}: each row needs one of each. Build them from the same rows.")
    texts = _texts(examples.texts, spec.text_column)
    pairs = _texts(examples.pairs, spec.text_pair_column) if examples.pairs is not None else None
    labels = spec.label_names(examples.labels) if labelled else examples.labels  # same rule as every other source
    return Examples(texts, pairs, labels)


def as_texts(texts: str | Sequence[str]) -> list[str]:
    """Accept one string or a sequence of strings for prediction.

    Raises:
        DataError: no texts, a table (a DataFrame, a dict, a Dataset: iterating one gives
            its column names or rows, not texts), a value that is not a string, or a string
            that is not valid Unicode (a lone surrogate, which UTF-8 cannot encode).
    """
    if texts is None or not (isinstance(texts, str) or hasattr(texts, "__iter__")):
        raise DataError(f"texts must be a string or a list of strings, got {type(texts).__name__}.")
    if isinstance(texts, Mapping) or hasattr(texts, "columns") or hasattr(texts, "column_names"):
        raise DataError(f"texts must be a string or a list of strings, got a {type(texts).__name__}, whose items "
                        "are its column names or rows, not texts: pass its text column, e.g. data['text'].")
    out = _texts([texts] if isinstance(texts, str) else list(texts), "texts")
    if not out:
        raise DataError("No texts given: pass at least one string.")
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")  # the only code points a str holds that UTF-8 cannot encode


def _texts(values: list[Any], column: str) -> list[str]:
    """``values`` as a list of strings, each encodable as UTF-8 (as every tokenizer needs)."""
    values = list(values)
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise DataError(
            f"Column {column!r} must hold strings; rows {bad[:10]} hold "
            f"{sorted({type(values[i]).__name__ for i in bad})}. Fill or drop them first."
        )
    broken = [i for i, v in enumerate(values) if _SURROGATE.search(v)]
    if broken:
        first = _SURROGATE.search(values[broken[0]])
        raise DataError(
            f"Column {column!r}: the text at row {broken[0]} is not valid Unicode: it holds a lone surrogate "
            f"{first.group()!r} at character {first.start()}, which UTF-8 cannot encode (rows with such text: "
            f"{broken[:10]}). Fix or drop them, e.g. text.encode('utf-8', 'replace').decode('utf-8')."
        )
    return values
