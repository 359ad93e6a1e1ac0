"""User data in, padded tensor batches out.

Training and evaluation data may be a ``datasets.Dataset``, a pandas
DataFrame, a path to a CSV/TSV/JSONL/JSON/Parquet file, or a list of dicts.
:func:`read_examples` checks it against a :class:`~cmtl.tasks.TaskSpec` and
:func:`encode` tokenizes it once; :func:`batches` pads each batch only to its
own longest row (dynamic padding).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from cmtl.errors import DataError
from cmtl.tasks import TaskSpec


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


@dataclass
class Encoded:
    """Tokenized examples: token ids per row (unpadded), targets (N, ...) if labelled,
    optionally a group (head) index per row (N,) for batches that mix tasks, and optionally
    the frozen backbone's hidden states after its first ``prefix_layers`` layers per row
    ((T_i, H) each; see :mod:`cmtl.caching`), which :func:`batches` then yields instead of
    token ids."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    targets: torch.Tensor | None
    groups: torch.Tensor | None = None
    prefix: list[torch.Tensor] | None = None
    prefix_layers: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @staticmethod
    def concat(parts: Sequence["Encoded"]) -> "Encoded":
        """Rows of several encodings, in order; targets must share their trailing shape.
        The result carries a prefix only if every part has one from the same layer."""
        cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)  # noqa: E731
        join = lambda xs: None if any(x is None for x in xs) else [v for x in xs for v in x]  # noqa: E731
        layers = {p.prefix_layers for p in parts}
        prefix = join([p.prefix for p in parts]) if len(layers) == 1 else None
        return Encoded(
            [ids for p in parts for ids in p.input_ids],
            join([p.token_type_ids for p in parts]),
            cat([p.targets for p in parts]),
            cat([p.groups for p in parts]),
            prefix,
            layers.pop() if prefix is not None else 0,
        )

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


def _columns_of(data: Any) -> tuple[list[str], Any, int]:
    """(column names, a function from column name to a list, number of rows)."""
    import pandas as pd

    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None

    if isinstance(data, (str, Path)):
        data = read_file(Path(data))
    if datasets is not None and isinstance(data, datasets.DatasetDict):
        raise DataError(
            f"Got a DatasetDict with splits {list(data)}; pass one split, e.g. data['train']."
        )
    if datasets is not None and isinstance(data, datasets.Dataset):
        return list(data.column_names), lambda c: data[c], len(data)
    if isinstance(data, pd.DataFrame):
        return [str(c) for c in data.columns], lambda c: data[c].tolist(), len(data)
    if isinstance(data, (list, tuple)):
        if data and not all(isinstance(row, dict) for row in data):
            raise DataError("A list of examples must hold dicts like {'text': ..., 'label': ...}.")
        cols = sorted({k for row in data for k in row}) if data else []
        return cols, lambda c: [row.get(c) for row in data], len(data)
    raise DataError(
        f"Unsupported data type {type(data).__name__}. Pass a datasets.Dataset, a pandas DataFrame, "
        "a path to a .csv/.tsv/.jsonl/.json/.parquet file, or a list of dicts."
    )


def read_file(path: Path):
    """Read a table file into a DataFrame, keeping text as text (no NaN for 'NA')."""
    import pandas as pd

    if not path.exists():
        raise DataError(f"Data file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, dtype=str)
    if suffix in (".jsonl", ".json"):
        try:
            return pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
        except ValueError as exc:
            raise DataError(f"Cannot read {str(path)!r} as {'JSON lines' if suffix == '.jsonl' else 'JSON'}: {exc}") from exc
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise DataError(f"Unsupported data file {str(path)!r}: use .csv, .tsv, .jsonl, .json or .parquet.")


def read_examples(data: Any, spec: TaskSpec, *, labelled: bool = True) -> Examples:
    """Read texts (and labels) for ``spec`` from any supported data source.

    Raises:
        DataError: empty data, a missing column, or non-text inputs.
    """
    if isinstance(data, Examples):
        return _check_examples(data, spec, labelled)
    columns, column, n_rows = _columns_of(data)
    if n_rows == 0:
        raise DataError(f"The data for task {spec.name!r} is empty: it needs at least one example.")
    wanted = [spec.text_column] + ([spec.text_pair_column] if spec.text_pair_column else [])
    if labelled:
        wanted.append(spec.label_column)
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataError(
            f"Column(s) {missing} not found in the data for task {spec.name!r}. Columns present: {columns}. "
            "Rename them or set text_column / text_pair_column / label_column in the TaskSpec."
        )
    texts = _texts(column(spec.text_column), spec.text_column)
    pairs = _texts(column(spec.text_pair_column), spec.text_pair_column) if spec.text_pair_column else None
    labels = list(column(spec.label_column)) if labelled else None
    if labels is not None:
        bad = [i for i, v in enumerate(labels) if v is None or (isinstance(v, float) and math.isnan(v))]
        if bad:
            raise DataError(f"Column {spec.label_column!r} has missing labels at rows {bad[:10]}.")
    return Examples(texts, pairs, labels)


def _check_examples(examples: Examples, spec: TaskSpec, labelled: bool) -> Examples:
    if not len(examples):
        raise DataError(f"The data for task {spec.name!r} is empty: it needs at least one example.")
    if labelled and examples.labels is None:
        raise DataError(f"The examples for task {spec.name!r} carry no labels.")
    if (examples.pairs is None) != (spec.text_pair_column is None):
        raise DataError(f"Task {spec.name!r} {'takes' if spec.text_pair_column else 'does not take'} text pairs.")
    return examples


def as_texts(texts: str | Sequence[str]) -> list[str]:
    """Accept one string or a sequence of strings for prediction."""
    if isinstance(texts, str):
        return [texts]
    out = _texts(list(texts), "texts")
    if not out:
        raise DataError("No texts given: pass at least one string.")
    return out


def _texts(values: list[Any], column: str) -> list[str]:
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise DataError(
            f"Column {column!r} must hold strings; rows {bad[:10]} hold "
            f"{sorted({type(values[i]).__name__ for i in bad})}. Fill or drop them first."
        )
    return list(values)


def encode(examples: Examples, spec: TaskSpec, tokenize, *, with_targets: bool = True) -> Encoded:
    """Tokenize once; ``tokenize(texts, pairs)`` returns the tokenizer's dict of id lists."""
    enc = tokenize(examples.texts, examples.pairs)
    targets = spec.encode_labels(examples.labels) if with_targets and examples.labels is not None else None
    type_ids = enc.get("token_type_ids") if examples.pairs is not None else None
    return Encoded(list(enc["input_ids"]), type_ids, targets)


def batches(
    encoded: Encoded,
    order: Sequence[int],
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], torch.Tensor | None]]:
    """Yield (row indices, padded inputs, targets) for consecutive slices of ``order``."""
    for start in range(0, len(order), batch_size):
        idx = list(order[start : start + batch_size])
        width = max(len(encoded.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded.input_ids[i]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if encoded.prefix is not None:
            hidden = encoded.prefix[idx[0]]
            padded = hidden.new_zeros((len(idx), width, hidden.shape[-1]))  # (B, T, H)
            for row, i in enumerate(idx):
                padded[row, : len(encoded.prefix[i])] = encoded.prefix[i]
            inputs = {"attention_mask": inputs["attention_mask"], "prefix": padded.to(device),
                      "prefix_layers": encoded.prefix_layers}
        elif encoded.token_type_ids is not None:
            types = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = encoded.token_type_ids[i]
                types[row, : len(seq)] = torch.tensor(seq)
            inputs["token_type_ids"] = types.to(device)
        if encoded.groups is not None:
            inputs["groups"] = encoded.groups[idx].to(device)
        targets = None if encoded.targets is None else encoded.targets[idx].to(device)
        yield idx, inputs, targets


def length_grouped(order: Sequence[int], lengths: Sequence[int], batch_size: int, window: int,
                   generator: torch.Generator) -> list[int]:
    """Reorder a shuffled ``order`` so each batch holds rows of similar length (less padding).

    Rows are sorted by length within consecutive windows of ``window`` batches, cut into
    batches, and the batches are shuffled; the last, possibly short, batch stays last.
    """
    span = batch_size * window
    grouped: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        grouped += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    tail = [grouped.pop()] if grouped and len(grouped[-1]) < batch_size else []
    shuffled = [grouped[i] for i in torch.randperm(len(grouped), generator=generator).tolist()] + tail
    return [i for batch in shuffled for i in batch]


def token_budget_chunks(encoded: Encoded, max_rows: int, max_tokens: int) -> list[list[int]]:
    """Rows sorted by length, cut into chunks of at most ``max_rows`` rows and ``max_tokens`` padded
    tokens (rows × longest row): short texts travel in large batches, long ones in small batches,
    and little compute goes to padding. A row longer than ``max_tokens`` travels alone."""
    lengths = encoded.lengths()
    chunks: list[list[int]] = []
    for i in length_sorted(encoded):
        if chunks and len(chunks[-1]) < max_rows and (len(chunks[-1]) + 1) * lengths[i] <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def padding_chunks(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Rows sorted by length and cut into consecutive chunks that minimise
    Σ over chunks (rows × longest row + ``overhead``): the padded tokens of one
    backbone pass per chunk, plus ``overhead`` tokens' worth of fixed cost per pass.

    A batch of short texts stays one chunk; a few long texts among many short ones
    get a chunk of their own instead of padding every row to their length. Exact
    (dynamic programming over the sorted rows, O(rows²)).
    """
    if overhead < 0:
        raise ValueError(f"The per-chunk overhead must be >= 0 tokens. Got {overhead}.")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    best = [0.0] + [math.inf] * n  # best[k]: cost of the k shortest rows
    cut = [0] * (n + 1)
    for k in range(1, n + 1):
        longest = lengths[order[k - 1]]
        for j in range(k):
            cost = best[j] + (k - j) * longest + overhead
            if cost < best[k]:
                best[k], cut[k] = cost, j
    chunks, k = [], n
    while k > 0:
        chunks.append(order[cut[k]:k])
        k = cut[k]
    return chunks[::-1]


def length_sorted(encoded: Encoded) -> list[int]:
    """Row order by token length, for evaluation: little padding, same results."""
    lengths = encoded.lengths()
    return sorted(range(len(lengths)), key=lengths.__getitem__)
