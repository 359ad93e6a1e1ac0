"""cmtl.training.loop: the learning-rate schedule, seeding, early stopping, divergence, what train() returns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cmtl import TaskSpec, TrainConfig
from cmtl.data import Encoded
from cmtl.errors import TrainingDivergedError
from cmtl.training.loop import get_lr, seeded, train

CPU = torch.device("cpu")
SPEC = TaskSpec("t", labels=["a", "b"])
IDS = [[1, 2]] * 16
ALL_A = Encoded(IDS, None, torch.zeros(16, dtype=torch.long))
ALL_B = Encoded(IDS, None, torch.ones(16, dtype=torch.long))


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


def test_seeded_fixes_the_block_and_restores_the_callers_rng():
    torch.manual_seed(123)
    expected_after = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        first = torch.rand(3)
    with seeded(7):
        torch.testing.assert_close(torch.rand(3), first)
    torch.testing.assert_close(torch.rand(3), expected_after)  # as if the blocks never drew


def _bias_model():
    """A 'model' that is only a learnable pair of logits: training pulls it toward the train labels."""
    bias = torch.nn.Parameter(torch.tensor([0.0, 0.1]))
    forward = lambda inputs: bias.expand(inputs["input_ids"].shape[0], 2)  # noqa: E731
    return bias, forward


def test_early_stopping_keeps_the_best_state():
    validation = ALL_B  # training on all "a" makes it worse at every step
    config = TrainConfig(epochs=50, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, eval_every=1,
                         patience=3, progress=False)
    bias, forward = _bias_model()
    result = train(forward, [bias], lambda _: None, SPEC, ALL_A, validation, config, pad_id=0, device=CPU)
    assert result.stopped_early and result.best_step == 1 and result.steps == 4
    assert [h["step"] for h in result.history] == [1, 2, 3, 4]
    # The kept state's validation logits come back with it (the last evaluation's would differ).
    torch.testing.assert_close(result.validation_logits, forward({"input_ids": torch.tensor(IDS)}).detach())

    again, forward = _bias_model()
    train(forward, [again], lambda _: None, SPEC, ALL_A, None,
          TrainConfig(epochs=50, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, max_steps=1, progress=False),
          pad_id=0, device=CPU)
    torch.testing.assert_close(bias.detach(), again.detach())  # restored to the state after step 1


def test_without_validation_the_last_state_is_kept():
    config = TrainConfig(epochs=1, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, progress=False)
    bias, forward = _bias_model()
    result = train(forward, [bias], lambda _: None, SPEC, ALL_A, None, config, pad_id=0, device=CPU)
    assert (result.steps, result.best_step, result.examples_seen) == (4, 4, 16)
    assert result.history == [] and result.validation_logits is None and not result.stopped_early
    assert bias[0] > bias[1]  # trained toward "a" all four steps


def test_a_diverging_loss_raises_and_restores_the_parameters():
    bias, plain = _bias_model()
    calls = []

    def forward(inputs):  # finite for two steps, then an infinite logit
        calls.append(1)
        return plain(inputs) * (float("inf") if len(calls) == 3 else 1.0)

    modes = []
    config = TrainConfig(epochs=5, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, progress=False)
    with pytest.raises(TrainingDivergedError, match=r"Training of task 't' diverged at step 2: loss is nan\. "
                                                    r"Nothing was saved"):
        train(forward, [bias], modes.append, SPEC, ALL_A, None, config, pad_id=0, device=CPU)
    torch.testing.assert_close(bias.detach(), torch.tensor([0.0, 0.1]))  # as before training, not after step 2
    assert modes == [True, False]  # dropout off again on the way out


def test_extra_loss_sees_the_batch_rows_and_counts():
    bias, forward = _bias_model()
    seen = []

    def pull_to_b(inputs, logits, rows):
        seen.extend(rows)
        return -logits[:, 1].mean() * 10  # outweighs the data, which says "a"

    config = TrainConfig(epochs=2, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, progress=False)
    train(forward, [bias], lambda _: None, SPEC, ALL_A, None, config, pad_id=0, device=CPU, extra_loss=pull_to_b)
    assert sorted(seen) == sorted(list(range(16)) * 2)  # every row, once an epoch
    assert bias[1] > bias[0]
