"""Unit checks of the pieces under the registry: task specs, data reading, backbone, adapters, training loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cmtl import DataError, TaskSpec, TrainConfig
from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import BackboneConfig, load_backbone
from cmtl.core.tasks import MASKED_LOGIT, TaskHead, route_to_heads
from cmtl.data import Encoded, batches, read_examples
from cmtl.errors import BackboneNotFoundError
from cmtl.training.loop import get_lr


def test_encode_and_decode_labels():
    spec = TaskSpec("t", labels=["a", "b", "c"], label_encoding="index")
    assert spec.encode_labels(["a", "c", 1]).tolist() == [0, 2, 1]
    logits = torch.tensor([[0.0, 5.0, 0.0], [9.0, 0.0, 0.0]])
    assert spec.decode(logits) == ["b", "a"]
    multi = TaskSpec("m", labels=["x", "y"], problem_type="multi_label")
    assert multi.encode_labels([["x", "y"], ["y"], "x"]).tolist() == [[1, 1], [0, 1], [1, 0]]
    assert multi.decode(torch.tensor([[3.0, -3.0]])) == [["x"]]
    with pytest.raises(DataError, match="'z'"):
        multi.encode_labels([["z"]])
    reg = TaskSpec("r", problem_type="regression")
    assert reg.labels == ("score",) and reg.decode(torch.tensor([[0.5]])) == [0.5]
    with pytest.raises(DataError, match="must be numbers"):
        reg.encode_labels(["high"])


def test_spec_round_trip_warns_on_unknown_keys():
    spec = TaskSpec("t", labels=["a", "b"], text_pair_column="b2", description="d")
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    with pytest.warns(UserWarning, match=r"unknown TaskSpec keys \['future_field'\]"):
        TaskSpec.from_dict({**spec.to_dict(), "future_field": 1})


def test_read_examples_errors(tmp_path):
    spec = TaskSpec("t", labels=["a", "b"])
    (tmp_path / "x.xlsx").write_bytes(b"")
    with pytest.raises(DataError, match="Unsupported data file"):
        read_examples(tmp_path / "x.xlsx", spec)
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "x.csv", spec)
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "x", "label": "a"}])})
    with pytest.raises(DataError, match=r"pass one split, e.g. data\['train'\]"):
        read_examples(dd, spec)
    with pytest.raises(DataError, match="missing labels at rows \\[1\\]"):
        read_examples([{"text": "x", "label": "a"}, {"text": "y", "label": None}], spec)


def test_route_to_heads_sends_each_row_through_its_own_head():
    torch.manual_seed(0)
    heads = [TaskHead(4, 2, dropout=0.0), TaskHead(4, 3, dropout=0.0)]
    pooled = torch.randn(5, 4)
    groups = torch.tensor([1, 0, 1, 1, 0])
    out = route_to_heads(pooled, groups, heads.__getitem__, width=3)
    for b, g in enumerate(groups.tolist()):
        expected = heads[g](pooled[b : b + 1])[0]
        assert torch.allclose(out[b, : len(expected)], expected)
        assert (out[b, len(expected) :] == MASKED_LOGIT).all()  # task 0's missing third column


def test_dynamic_padding():
    enc = Encoded([[1, 2, 3], [4], [5, 6]], None, torch.tensor([0, 1, 0]))
    shapes = [inputs["input_ids"].shape for _, inputs, _ in batches(enc, [1, 2, 0], 2, 0, torch.device("cpu"))]
    assert shapes == [(2, 2), (1, 3)]


def test_lr_schedule():
    config = TrainConfig(learning_rate=1.0, warmup_ratio=0.1)
    lrs = [get_lr(s, 100, config) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == pytest.approx(1 / 90)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    constant = dataclasses.replace(config, lr_schedule="constant")
    assert [get_lr(s, 100, constant) for s in range(10)] == lrs[:10]  # the same warm-up
    assert all(get_lr(s, 100, constant) == 1.0 for s in range(10, 100))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")


def test_backbone_is_frozen_and_pools(tiny_backbone):
    bb = load_backbone(BackboneConfig(name_or_path=tiny_backbone, pooling="mean"), device="cpu")
    assert not bb.encoder.training and not any(p.requires_grad for p in bb.encoder.parameters())
    hidden = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(bb.pool(hidden, mask), hidden[:, :2].mean(1))
    cls = load_backbone(BackboneConfig(name_or_path=tiny_backbone, pooling="cls"), device="cpu")
    torch.testing.assert_close(cls.pool(hidden, mask), hidden[:, 0])
    assert bb.sha256 == cls.sha256  # pooling does not change the weights


def test_backbone_never_downloads(tmp_path):
    with pytest.raises(BackboneNotFoundError, match="never downloads"):
        load_backbone("some-org/some-model-that-is-not-local", device="cpu")
    with pytest.raises(ValueError, match="Unknown embedded backbone"):
        load_backbone("embedded:bert-large", device="cpu")


def test_adapter_bank(tiny_backbone):
    bb = load_backbone(BackboneConfig(name_or_path=tiny_backbone), device="cpu")
    ids = {"input_ids": torch.tensor([[101, 2307, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    plain = bb.embed(**ids)
    bank = AdapterBank(bb.encoder)
    resolved = bank.add("first", AdapterConfig(r=2, layers=(1,)))
    assert resolved.target_modules == ("query", "value")
    params = bank.parameters("first")
    assert bank.num_parameters("first") == sum(p.numel() for p in params) == 2 * (2 * 32 * 2)  # 1 layer, q+v, A+B
    with torch.no_grad():
        for p in params:
            p.add_(0.5)
    bank.activate("first")
    assert not torch.allclose(bb.embed(**ids), plain)
    with bank.disabled():
        torch.testing.assert_close(bb.embed(**ids), plain)
    state = bank.state_dict("first")
    bank.load("second", resolved, state)
    bank.activate("second")
    out_b = bb.embed(**ids)
    bank.activate("first")
    torch.testing.assert_close(bb.embed(**ids), out_b)
    bank.remove("first")
    bank.remove("second")
    assert bank.names == []
    torch.testing.assert_close(bb.embed(**ids), plain)


def _bias_model():
    """A 'model' that is only a learnable pair of logits: training pulls it toward the train labels."""
    bias = torch.nn.Parameter(torch.tensor([0.0, 0.1]))
    forward = lambda inputs: bias.expand(inputs["input_ids"].shape[0], 2)  # noqa: E731
    return bias, forward


def test_early_stopping_keeps_the_best_state():
    from cmtl.training.loop import train

    spec = TaskSpec("t", labels=["a", "b"])
    ids = [[1, 2]] * 16
    train_data = Encoded(ids, None, torch.zeros(16, dtype=torch.long))  # all "a"
    validation = Encoded(ids, None, torch.ones(16, dtype=torch.long))  # all "b": training makes it worse
    config = TrainConfig(epochs=50, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, eval_every=1,
                         patience=3, progress=False)
    bias, forward = _bias_model()
    result = train(forward, [bias], lambda _: None, spec, train_data, validation, config, pad_id=0,
                   device=torch.device("cpu"))
    assert result.stopped_early and result.best_step == 1 and result.steps == 4
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    # The kept state's validation logits come back with it (the last evaluation's would differ).
    torch.testing.assert_close(result.validation_logits, forward({"input_ids": torch.tensor(ids)}).detach())

    again, forward = _bias_model()
    train(forward, [again], lambda _: None, spec, train_data, None,
          TrainConfig(epochs=50, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, max_steps=1, progress=False),
          pad_id=0, device=torch.device("cpu"))
    torch.testing.assert_close(bias.detach(), again.detach())  # restored to the state after step 1
