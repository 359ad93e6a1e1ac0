"""Examples to padded tensor batches.

:func:`encode` tokenizes examples once; :func:`batches` pads each batch only to its own longest
row (dynamic padding); the chunking helpers group rows of similar length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from cmtl.core.tasks import TaskSpec
from cmtl.data.examples import Examples


@dataclass
class Encoded:
    """Tokenized examples: token ids per row (unpadded), targets (N, ...) if labelled,
    optionally a group (head) index per row (N,) for batches that mix tasks, and optionally
    the frozen backbone's hidden states after its first ``prefix_layers`` layers per row
    ((T_i, H) each; see :mod:`cmtl.training.caching`), which :func:`batches` then yields instead of
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
        The result carries a prefix only if every part has one from the same layer. When some parts
        carry token type ids (text pairs) and others do not (single texts, segment 0 throughout), the
        others get zeros: a pair's rows keep their segments in a batch shared with single texts."""
        cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)  # noqa: E731
        join = lambda xs: None if any(x is None for x in xs) else [v for x in xs for v in x]  # noqa: E731
        layers = {p.prefix_layers for p in parts}
        prefix = join([p.prefix for p in parts]) if len(layers) == 1 else None
        types = None
        if any(p.token_type_ids is not None for p in parts):
            types = [row for p in parts for row in (p.token_type_ids if p.token_type_ids is not None
                                                     else [[0] * len(ids) for ids in p.input_ids])]
        return Encoded(
            [ids for p in parts for ids in p.input_ids],
            types,
            cat([p.targets for p in parts]),
            cat([p.groups for p in parts]),
            prefix,
            layers.pop() if prefix is not None else 0,
        )

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def select(self, indices: Sequence[int]) -> "Encoded":
        """The rows at ``indices``, in that order."""
        indices = list(indices)
        rows = torch.as_tensor(indices, dtype=torch.long)
        pick = lambda xs: None if xs is None else [xs[i] for i in indices]  # noqa: E731
        return Encoded([self.input_ids[i] for i in indices], pick(self.token_type_ids),
                       None if self.targets is None else self.targets[rows],
                       None if self.groups is None else self.groups[rows], pick(self.prefix), self.prefix_layers)



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


def seeded_order(n: int, seed: int) -> list[int]:
    """The indices ``0 … n-1`` in an order set by ``seed`` alone: its prefixes are seeded random samples,
    and cutting it gives seeded disjoint parts. The samples and splits of rows in updates, the probe, EWC's
    Fisher, drift monitoring and merges draw it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


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
