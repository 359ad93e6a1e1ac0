"""probe_init: a new head's linear probe on the untrained adapter's features is the step-0 candidate of
early stopping (a run whose training only hurts returns it); probe_start also trains from it (LP-FT)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cmtl import TaskSpec, TrainConfig, TrainingDivergedError
from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import BackboneConfig, load_backbone
from cmtl.core.heads import TaskHead
from cmtl.data import encode, read_examples
from cmtl.training.evaluation import predict_logits
from cmtl.training.probe import refit_head
from cmtl.training.trainee import Trainee, fit
from tests.conftest import toy_sentiment

SPEC = TaskSpec("sentiment", labels=["neg", "pos"])


@pytest.fixture
def setup(tiny_backbone):
    backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    bank = AdapterBank(backbone.encoder)
    torch.manual_seed(0)
    adapter = bank.add("t", AdapterConfig(r=2, dropout=0.0))
    head = TaskHead(backbone.hidden_size, 2, dropout=0.0)
    data = encode(read_examples(toy_sentiment(48), SPEC), SPEC, backbone.tokenize)
    validation = encode(read_examples(toy_sentiment(16, 1), SPEC), SPEC, backbone.tokenize)
    return backbone, bank, adapter, head, data, validation


def the_probe(backbone, head, data):
    """The head a probe on the bare backbone's features gives (what probe_init must start from)."""
    features = predict_logits(lambda inputs: backbone.embed(**inputs), data, batch_size=64, pad_id=backbone.pad_id,
                              device=backbone.device)
    return refit_head(copy.deepcopy(head), features, data.targets, SPEC.loss)


def test_a_run_whose_training_only_hurts_returns_the_probe(setup):
    backbone, bank, adapter, head, data, validation = setup
    expected = the_probe(backbone, head, data)
    config = TrainConfig(epochs=3, batch_size=8, learning_rate=5e-2, eval_every=2, patience=None, progress=False)

    def wrong(inputs, logits, rows):  # pulls every row toward the other label, hard
        return 20 * F.cross_entropy(logits, 1 - data.targets[rows])

    result = fit(Trainee.adapter(backbone, bank, "t", head), backbone, adapter, SPEC, data, validation, config,
                 extra_loss=wrong, new_head=True)
    assert result.history[0]["step"] == 0 and result.best_step == 0 and result.steps == 18
    assert result.history[-1]["accuracy"] < result.history[0]["accuracy"]  # training did hurt
    for p, q in zip(head.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q)
    assert all(p.abs().max() == 0 for n, p in bank._named("t") if "lora_B" in n)  # the adapter as it started


def test_probe_init_is_only_for_new_heads_and_can_be_turned_off(setup):
    backbone, bank, adapter, head, data, validation = setup
    config = TrainConfig(epochs=1, batch_size=8, probe_init=False, progress=False)
    result = fit(Trainee.adapter(backbone, bank, "t", head), backbone, adapter, SPEC, data, validation, config,
                 new_head=True)
    assert [h["step"] for h in result.history] == [6]  # no step-0 candidate
    assert result.candidate_metrics is None and result.candidate_gain is None
    config = TrainConfig(epochs=1, batch_size=8, progress=False)
    result = fit(Trainee.adapter(backbone, bank, "t", head), backbone, adapter, SPEC, data, validation, config)
    assert [h["step"] for h in result.history] == [6]  # a warm head (an update's) is not probed


def test_step_zero_scores_the_probe(setup):
    backbone, bank, adapter, head, data, validation = setup
    probe = the_probe(backbone, head, data)
    features = predict_logits(lambda inputs: backbone.embed(**inputs), validation, batch_size=64,
                              pad_id=backbone.pad_id, device=backbone.device)
    expected = float((probe(features).argmax(-1) == validation.targets).float().mean())
    config = TrainConfig(epochs=1, batch_size=8, progress=False)
    result = fit(Trainee.adapter(backbone, bank, "t", head), backbone, adapter, SPEC, data, validation, config,
                 new_head=True)
    assert result.history[0]["step"] == 0 and result.history[0]["accuracy"] == pytest.approx(expected)
    assert result.best_metrics["accuracy"] >= expected
    assert {"step": 0, **result.candidate_metrics} == result.history[0]  # recorded as the probe's score


def test_training_starts_from_a_fresh_head_unless_probe_start(setup):
    backbone, bank, adapter, head, data, validation = setup
    fresh = [p.detach().clone() for p in head.parameters()]
    probe = the_probe(backbone, head, data)
    still = TrainConfig(max_steps=1, learning_rate=1e-12, weight_decay=0.0, patience=None, progress=False)
    train_only = encode(read_examples(toy_sentiment(48), SPEC), SPEC, backbone.tokenize)
    fit(Trainee.adapter(backbone, bank, "t", head), backbone, adapter, SPEC, train_only, None, still, new_head=True)
    for p, f in zip(head.parameters(), fresh):  # no validation: nothing scores the probe; the fresh head trained
        torch.testing.assert_close(p, f, atol=1e-9, rtol=0)
    fit(Trainee.adapter(backbone, bank, "t", head), backbone, adapter, SPEC, train_only, None,
        TrainConfig(max_steps=1, learning_rate=1e-12, weight_decay=0.0, probe_start=True, progress=False),
        new_head=True)
    for p, q in zip(head.parameters(), probe.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_probe_on_features_that_overflowed_says_so(value):
    """Non-finite features (an adapter that overflows) cannot be fitted: a clear TrainingDivergedError, not
    L-BFGS's "value cannot be converted to type float without overflow"."""
    features = torch.randn(12, 8)
    features[3, 5] = value
    with pytest.raises(TrainingDivergedError, match="1 of 12 rows have non-finite features"):
        refit_head(TaskHead(8, 2, dropout=0.0), features, torch.randint(0, 2, (12,)), F.cross_entropy)
