"""cmtl.data.batching: encoding once, dynamically padded batches, joining encodings, length order."""

from __future__ import annotations

import torch

from cmtl import TaskSpec
from cmtl.data import Encoded, Examples, batches, encode, length_sorted

CPU = torch.device("cpu")


def test_dynamic_padding():
    enc = Encoded([[1, 2, 3], [4], [5, 6]], None, torch.tensor([0, 1, 0]))
    shapes = [inputs["input_ids"].shape for _, inputs, _ in batches(enc, [1, 2, 0], 2, 0, CPU)]
    assert shapes == [(2, 2), (1, 3)]


def test_batches_pad_mask_and_carry_rows_targets_types_and_groups():
    enc = Encoded([[7, 8, 9], [5]], [[0, 1, 1], [0]], torch.tensor([1, 0]), groups=torch.tensor([3, 4]))
    [(rows, inputs, targets)] = list(batches(enc, [1, 0], 8, pad_id=-1, device=CPU))
    assert rows == [1, 0]
    assert inputs["input_ids"].tolist() == [[5, -1, -1], [7, 8, 9]]
    assert inputs["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert inputs["token_type_ids"].tolist() == [[0, 0, 0], [0, 1, 1]]
    assert inputs["groups"].tolist() == [4, 3] and targets.tolist() == [0, 1]
    assert "token_type_ids" not in next(batches(Encoded([[1]], None, None), [0], 1, 0, CPU))[1]


def test_batches_yield_a_cached_prefix_instead_of_ids():
    prefix = [torch.ones(2, 4), torch.full((1, 4), 2.0)]
    enc = Encoded([[1, 2], [3]], None, None, prefix=prefix, prefix_layers=1)
    _, inputs, targets = next(batches(enc, [0, 1], 2, 0, CPU))
    assert set(inputs) == {"attention_mask", "prefix", "prefix_layers"} and targets is None
    assert inputs["prefix"].shape == (2, 2, 4) and inputs["prefix_layers"] == 1
    torch.testing.assert_close(inputs["prefix"][1], torch.tensor([[2.0] * 4, [0.0] * 4]))  # zero-padded


def test_concat_keeps_order_targets_and_groups():
    a = Encoded([[1], [2, 2]], None, torch.tensor([0, 1]), groups=torch.tensor([0, 0]))
    b = Encoded([[3, 3, 3]], None, torch.tensor([1]), groups=torch.tensor([1]))
    both = Encoded.concat([a, b])
    assert both.input_ids == [[1], [2, 2], [3, 3, 3]] and both.lengths() == [1, 2, 3]
    assert both.targets.tolist() == [0, 1, 1] and both.groups.tolist() == [0, 0, 1]
    assert Encoded.concat([a, Encoded([[4]], None, None)]).targets is None  # all or none labelled


def test_length_sorted_is_a_stable_order_by_length():
    enc = Encoded([[1, 1, 1], [1], [1, 1], [2]], None, None)
    assert length_sorted(enc) == [1, 3, 2, 0]


def test_encode_tokenizes_once_and_encodes_labels():
    calls = []

    def tokenize(texts, pairs):
        calls.append((texts, pairs))
        return {"input_ids": [[len(t)] for t in texts], "token_type_ids": [[0] for _ in texts]}

    spec = TaskSpec("t", labels=["a", "b"])
    enc = encode(Examples(["xx", "yyy"], None, ["b", "a"]), spec, tokenize)
    assert calls == [(["xx", "yyy"], None)] and enc.input_ids == [[2], [3]]
    assert enc.targets.tolist() == [1, 0] and enc.token_type_ids is None  # no pairs: no type ids
    paired = encode(Examples(["xx"], ["z"], ["a"]), spec, tokenize, with_targets=False)
    assert paired.targets is None and paired.token_type_ids == [[0]]


def test_concat_keeps_a_pairs_segments_beside_single_texts():
    """A joint batch mixing a pair task's rows with a single-text task's lost every token type id (one part had
    none), so the pair task trained with its second text read as segment A, and was served with segments."""
    pairs = Encoded([[1, 2, 3, 4]], [[0, 0, 1, 1]], torch.tensor([1]))
    single = Encoded([[5, 6, 7]], None, torch.tensor([0]))
    mixed = Encoded.concat([single, pairs])
    assert mixed.token_type_ids == [[0, 0, 0], [0, 0, 1, 1]]
    assert Encoded.concat([single, single]).token_type_ids is None
    _, inputs, _ = next(batches(mixed, [0, 1], 2, pad_id=0, device=torch.device("cpu")))
    assert inputs["token_type_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]
