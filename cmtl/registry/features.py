"""What a task version keeps so that a later merge need not run its rows again: ``features.safetensors``.

Training already computes it. A new task's linear probe runs the frozen backbone over the training and
validation rows (a fresh LoRA adapter changes nothing), and every training run keeps its best state's
logits on the validation rows, which for an update include the lineage's old held-out rows. The
version keeps, as float32:

- ``frozen.buffer``: the frozen backbone's pooled features of its replay buffer's rows (file order),
- ``frozen.holdout``: the same for its own held-out sample's rows,
- ``logits.lineage``: its own logits on the held-out rows of its whole lineage (the rows
  ``Registry.holdout(task, version)`` returns, in that order),

each only when every one of its rows was computed in training. A merge then scores the frozen backbone
and the members from these (:mod:`cmtl.merging.pipeline`) and runs only rows that are missing. Rows are
matched by token ids: a row's pooled features and logits depend on nothing else, so a text that occurs
twice has one entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Hashable

import torch
from safetensors.torch import save

from cmtl.continual.replay import ReplayBuffer, stored
from cmtl.core.tasks import TaskSpec
from cmtl.data import Encoded, Examples
from cmtl.registry.store import load_tensors

if TYPE_CHECKING:
    from cmtl.registry.reader import RegistryReader

Encode = Callable[[Examples], Encoded]

#: The version file's name.
FILE = "features.safetensors"


def _keys(encoded: Encoded) -> list[Hashable]:
    if encoded.token_type_ids is None:
        return [tuple(ids) for ids in encoded.input_ids]
    return [(tuple(ids), tuple(types)) for ids, types in zip(encoded.input_ids, encoded.token_type_ids)]


class RowTable:
    """Vectors by row (its token ids), collected from encodings and the tensors computed on them."""

    def __init__(self) -> None:
        self._rows: dict[Hashable, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, encoded: Encoded | None, values: torch.Tensor | None) -> "RowTable":
        """Remember ``values[i]`` as row ``i`` of ``encoded`` (nothing when either is ``None``)."""
        if encoded is not None and values is not None:
            if len(values) != len(encoded):
                raise ValueError(f"{len(values)} vectors for {len(encoded)} rows.")
            self._rows.update(zip(_keys(encoded), values.detach().float().cpu()))
        return self

    def find(self, encoded: Encoded) -> tuple[torch.Tensor | None, list[int]]:
        """``(values, missing)``: the vectors of ``encoded``'s rows (missing ones zero; ``None`` when none
        is known) and the indices of the rows not in the table."""
        found = [self._rows.get(k) for k in _keys(encoded)]
        missing = [i for i, v in enumerate(found) if v is None]
        known = next((v for v in found if v is not None), None)
        if known is None:
            return None, missing
        return torch.stack([known.new_zeros(known.shape) if v is None else v for v in found]), missing

    def lookup(self, encoded: Encoded | None) -> torch.Tensor | None:
        """The vectors of all of ``encoded``'s rows, or ``None`` unless every row is known."""
        if encoded is None or not len(encoded):
            return None
        values, missing = self.find(encoded)
        return None if missing else values

    def complete(self, encoded: Encoded, compute: Callable[[Encoded], torch.Tensor]) -> torch.Tensor:
        """The vectors of all of ``encoded``'s rows: those in the table, and ``compute`` of the others
        (called once, on just those rows, and only if there are any)."""
        values, missing = self.find(encoded)
        if not missing:
            assert values is not None
            return values
        computed = compute(encoded.select(missing)).float().cpu()
        if values is None:
            return computed
        values[missing] = computed
        return values


def kept(spec: TaskSpec, files: dict[str, bytes], encode: Encode, *, frozen: RowTable, logits: RowTable,
         older: Examples | None) -> dict[str, bytes]:
    """``{FILE: bytes}`` for a version about to be written with ``files`` (its ``replay.parquet`` and
    ``holdout.parquet``), from the rows training computed: ``frozen`` features and the version's
    ``logits``; ``older``: the held-out rows of its parent's lineage. Empty when no part is complete."""
    def rows(name: str) -> Encoded | None:
        if name not in files:
            return None
        return encode(stored(spec, ReplayBuffer.from_bytes(files[name], where=name).to_examples()))

    own = rows("holdout.parquet")
    parts = [p for p in (None if older is None else encode(older), own) if p is not None]
    tensors = {name: values for name, values in (
        ("frozen.buffer", frozen.lookup(rows("replay.parquet"))), ("frozen.holdout", frozen.lookup(own)),
        ("logits.lineage", logits.lookup(Encoded.concat(parts) if parts else None))) if values is not None}
    return {FILE: save({k: v.contiguous() for k, v in tensors.items()})} if tensors else {}


def frozen_rows(reader: "RegistryReader", task: str, version: int, encode: Encode) -> RowTable:
    """The frozen backbone's features kept by ``version`` of ``task`` and its ancestors."""
    table = RowTable()
    v: int | None = version
    while v is not None:
        stored_ = read(reader._read_version_file(task, v, FILE))
        if "frozen.holdout" in stored_:
            table.add(encode(reader.holdout(task, v, lineage=False)), stored_["frozen.holdout"])
        if "frozen.buffer" in stored_:
            buffer = reader.buffer(task, v)
            if buffer is not None:
                table.add(encode(stored(reader.spec(task, version=v), buffer.to_examples())), stored_["frozen.buffer"])
        v = reader._version_record(task, v)["parent"]
    return table


def own_logits(reader: "RegistryReader", task: str, version: int, encode: Encode) -> RowTable:
    """``version``'s logits on its lineage's held-out rows, where it kept them."""
    kept_ = read(reader._read_version_file(task, version, FILE)).get("logits.lineage")
    held = reader.holdout(task, version) if kept_ is not None else None
    return RowTable().add(None if held is None else encode(held), kept_)


def read(data: bytes | None) -> dict[str, torch.Tensor]:
    """The tensors of a version's ``features.safetensors`` (empty without one)."""
    return {} if data is None else load_tensors(data)
