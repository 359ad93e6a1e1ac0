"""The speed paths change no result: cached frozen layers give the same adapter as the plain path,
and length-grouped batches are a permutation of the data with less padding."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch

from cmtl import AdapterConfig, Registry, TaskSpec, TrainConfig
from cmtl.core.backbone import load_backbone
from cmtl.data import Encoded, batches, encode, length_grouped, read_examples
from cmtl.training.caching import cache_prefix, frozen_layers, maybe_cache
from tests.conftest import FAST, toy_sentiment

SPEC = TaskSpec("sentiment", labels=["neg", "pos"])


def varied(n: int, seed: int) -> list[dict]:
    """Toy rows of very different lengths, so batches carry padding."""
    rng = random.Random(seed)
    rows = toy_sentiment(n, seed)
    for row in rows:
        row["text"] = " ".join([row["text"]] + ["and it was a film"] * rng.randint(0, 6))
    return rows


@pytest.fixture
def backbone(tiny_config):
    return load_backbone(tiny_config, device="cpu")


def test_run_layers_matches_the_whole_encoder(backbone):
    enc = encode(read_examples(varied(12, 0), SPEC), SPEC, backbone.tokenize)
    _, inputs, _ = next(batches(enc, list(range(12)), 12, backbone.pad_id, torch.device("cpu")))
    with torch.no_grad():
        whole = backbone.encoder(**inputs).last_hidden_state
        split = backbone.run_layers(None, inputs["attention_mask"], stop=1, input_ids=inputs["input_ids"])
        split = backbone.run_layers(split, inputs["attention_mask"], start=1)
    assert inputs["attention_mask"].min() == 0  # the batch is padded
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(split[real], whole[real], atol=1e-5, rtol=1e-5)


def test_cached_prefix_embeds_like_token_ids(backbone):
    enc = encode(read_examples(varied(20, 1), SPEC), SPEC, backbone.tokenize)
    cached = cache_prefix(enc, backbone, 1, batch_size=7)
    assert cached.prefix_layers == 1 and [len(p) for p in cached.prefix] == enc.lengths()
    order = list(range(20))[::-1]
    with torch.no_grad():
        for (_, plain, _), (_, fast, _) in zip(batches(enc, order, 8, backbone.pad_id, torch.device("cpu")),
                                               batches(cached, order, 8, backbone.pad_id, torch.device("cpu"))):
            assert "input_ids" not in fast
            torch.testing.assert_close(backbone.embed(**fast), backbone.embed(**plain), atol=1e-5, rtol=1e-5)


def test_cache_is_skipped_when_it_cannot_help_or_does_not_fit(backbone):
    enc = encode(read_examples(varied(10, 2), SPEC), SPEC, backbone.tokenize)
    assert frozen_layers(AdapterConfig(), backbone) == 0
    assert frozen_layers(AdapterConfig(layers=(1,)), backbone) == 1
    assert maybe_cache([enc, None], backbone, AdapterConfig(), 100)[0] is enc  # every layer adapted
    assert maybe_cache([enc], backbone, AdapterConfig(layers=(1,)), 0)[0] is enc  # turned off
    assert maybe_cache([enc], backbone, AdapterConfig(layers=(1,)), 1e-6)[0] is enc  # too big
    out, none = maybe_cache([enc, None], backbone, AdapterConfig(layers=(1,)), 100)
    assert out.prefix is not None and none is None


def test_concat_keeps_a_prefix_only_when_every_part_has_one(backbone):
    enc = encode(read_examples(varied(6, 3), SPEC), SPEC, backbone.tokenize)
    cached = cache_prefix(enc, backbone, 1)
    both = Encoded.concat([cached, cached])
    assert len(both.prefix) == 12 and both.prefix_layers == 1
    assert Encoded.concat([cached, enc]).prefix is None
    assert Encoded.concat([cached, dataclasses.replace(cached, prefix_layers=2)]).prefix is None


def test_training_with_the_cache_gives_the_same_adapter(tmp_path, tiny_config):
    adapter = AdapterConfig(layers=(1,), dropout=0.0)
    states = []
    for mb in (0, 64):
        reg = Registry.create(tmp_path / f"reg{mb}", tiny_config, device="cpu")
        reg.add_task(SPEC, varied(48, 4), validation=varied(16, 5), adapter=adapter,
                     training=dataclasses.replace(FAST, epochs=3, cache_frozen_mb=mb))
        info = reg.current("sentiment")
        states.append((reg.adapter_state("sentiment", info.version),
                       reg.predict_proba("sentiment", [r["text"] for r in varied(10, 6)]), info.metrics))
    (a, pa, ma), (b, pb, mb_) = states
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(pa), torch.as_tensor(pb), atol=1e-4, rtol=1e-4)
    assert ma["validation_accuracy"] == mb_["validation_accuracy"]


def test_an_lwf_update_on_the_cache_matches_the_plain_update(tmp_path, tiny_config):
    from cmtl import UpdateConfig

    outcomes = []
    for mb in (0, 64):
        training = dataclasses.replace(FAST, cache_frozen_mb=mb)
        reg = Registry.create(tmp_path / f"reg{mb}", tiny_config, device="cpu")
        reg.add_task(SPEC, toy_sentiment(48), validation=toy_sentiment(16, 1),
                     adapter=AdapterConfig(layers=(1,), dropout=0.0), training=training)
        result = reg.update_task("sentiment", varied(32, 7), validation=varied(16, 8),
                                 config=UpdateConfig(penalty="lwf"),
                                 training=dataclasses.replace(training, epochs=2))
        outcomes.append((reg.adapter_state("sentiment", result.version.version), result.gate))
    (a, gate_a), (b, gate_b) = outcomes
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    assert (gate_a.candidate_new, gate_a.candidate_old) == (gate_b.candidate_new, gate_b.candidate_old)


def test_length_grouped_is_a_permutation_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(3, 200) for _ in range(203)]
    order = torch.randperm(203, generator=torch.Generator().manual_seed(0)).tolist()
    grouped = length_grouped(order, lengths, 16, 4, torch.Generator().manual_seed(1))
    assert sorted(grouped) == list(range(203))
    pad = lambda o: sum(max(lengths[i] for i in o[s:s + 16]) * len(o[s:s + 16]) for s in range(0, 203, 16))  # noqa: E731
    assert pad(grouped) < 0.8 * pad(order)
    assert set(grouped[-11:]) == set(order[192:])  # the short batch (203 = 12 * 16 + 11) stays last
    position = {i: p for p, i in enumerate(order)}
    windows = [{position[i] // 64 for i in grouped[s:s + 16]} for s in range(0, 192, 16)]
    assert all(len(w) == 1 for w in windows)  # each batch comes from one window...
    ids = [w.pop() for w in windows]
    assert ids != sorted(ids)  # ...and the batches are shuffled across windows
    again = length_grouped(order, lengths, 16, 4, torch.Generator().manual_seed(1))
    assert grouped == again


def test_length_grouping_trains_as_well(tmp_path, tiny_config):
    accuracies = []
    for window in (0, 4):
        reg = Registry.create(tmp_path / f"reg{window}", tiny_config, device="cpu")
        reg.add_task(SPEC, varied(96, 9), validation=varied(48, 10),
                     training=dataclasses.replace(FAST, length_grouping=window))
        accuracies.append(reg.current("sentiment").metrics["validation_accuracy"])
    assert accuracies[1] >= accuracies[0] - 0.05


@pytest.mark.parametrize("bad", [{"length_grouping": -1}, {"cache_frozen_mb": -5}, {"length_grouping": 1.5}])
def test_train_config_rejects_bad_speed_knobs(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_token_budget_chunks_bound_rows_and_padded_tokens():
    from cmtl.data import token_budget_chunks

    rng = random.Random(1)
    lengths = [rng.randint(3, 120) for _ in range(90)] + [300]
    enc = Encoded([[1] * n for n in lengths], None, None)
    chunks = token_budget_chunks(enc, max_rows=16, max_tokens=512)
    assert sorted(i for c in chunks for i in c) == list(range(91))
    for chunk in chunks:
        longest = max(lengths[i] for i in chunk)
        assert len(chunk) <= 16 and (len(chunk) * longest <= 512 or len(chunk) == 1)
    assert chunks[-1] == [90]  # longer than the budget: alone
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(flat)
    padded = sum(len(c) * max(lengths[i] for i in c) for c in chunks)
    one_batch = sum(16 * max(lengths[i] for i in range(s, min(s + 16, 91))) for s in range(0, 91, 16))
    assert padded < one_batch


def test_padding_chunks_are_the_cheapest_cuts_of_the_sorted_rows():
    from cmtl.data import padding_chunks

    def cost(chunks, lengths, overhead):
        return sum(len(c) * max(lengths[i] for i in c) + overhead for c in chunks)

    rng = random.Random(0)
    for trial in range(30):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 8))]
        overhead = rng.choice([0, 16, 256, 10_000])
        chunks = padding_chunks(lengths, overhead)
        assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))  # every row once
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        assert [i for c in chunks for i in c] == order  # consecutive runs of the length order
        # Brute force: every way of cutting the sorted rows into consecutive runs.
        brute = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], lengths, overhead)
                    for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert cost(chunks, lengths, overhead) == brute
    # Three long texts among thirteen short ones travel apart; equal lengths stay one pass.
    assert [len(c) for c in padding_chunks([256] * 3 + [40] * 13, 256)] == [13, 3]
    assert padding_chunks([30] * 16, 0) == [list(range(16))]
    assert padding_chunks([], 5) == []
    with pytest.raises(ValueError, match=">= 0"):
        padding_chunks([3], -1)
