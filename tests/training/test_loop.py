"""cmtl.training.loop: the learning-rate schedule, seeding, early stopping, divergence, what train() returns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cmtl import TaskSpec, TrainConfig
from cmtl.data import Encoded
from cmtl.errors import TrainingDivergedError
from cmtl.training.loop import adamw, get_lr, seeded, set_lr, train

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


@pytest.mark.parametrize("data, validation", [(ALL_A, None), (ALL_B, ALL_A)])
@pytest.mark.parametrize("clip", [1.0, None])
def test_a_gradient_that_is_not_finite_raises_and_restores_the_parameters(data, validation, clip):
    # The last step's loss is finite but its gradient is not (a float16 backward that overflows): the step wrote
    # NaN into the parameters and no later loss was checked, so the NaN state was returned without a word, or
    # kept as the best (argmax of NaN logits says "a", which this validation wants and training moved away from).
    bias, plain = _bias_model()
    calls = []

    def forward(inputs):
        calls.append(torch.is_grad_enabled())
        logits = plain(inputs)
        if sum(calls) == 4 and calls[-1]:  # the last step: value unchanged, gradient NaN (0 * inf)
            logits = logits + (bias - bias.detach()).abs().sqrt()
        return logits

    config = TrainConfig(epochs=1, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, grad_clip=clip,
                         eval_every=2, patience=None, progress=False)
    with pytest.raises(TrainingDivergedError, match=r"at step 3: the gradient norm is nan\. Nothing was saved"):
        train(forward, [bias], lambda _: None, SPEC, data, validation, config, pad_id=0, device=CPU)
    torch.testing.assert_close(bias.detach(), torch.tensor([0.0, 0.1]))
    assert bias.grad is None


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


REG = TaskSpec("r", problem_type="regression")
ONES = Encoded(IDS, None, torch.ones(16, 1))


def _scalar_model(start: float):
    """A 'model' that is one learnable output: its validation MSE against 1.0 is the curve the loop sees."""
    value = torch.nn.Parameter(torch.tensor([start]))
    forward = lambda inputs: value.expand(inputs["input_ids"].shape[0], 1)  # noqa: E731
    return value, forward


def test_convergence_stops_patience_evaluations_after_the_best():
    # Train toward 0 while validation wants 1: from 0.5 the MSE rises at every step, so the best is the
    # first evaluation and training stops `patience` evaluations later, far below the epoch cap.
    zeros = Encoded(IDS, None, torch.zeros(16, 1))
    config = TrainConfig(epochs=100, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, eval_every=2,
                         patience=3, lr_schedule="constant", progress=False)
    value, forward = _scalar_model(0.5)
    result = train(forward, [value], lambda _: None, REG, zeros, ONES, config, pad_id=0, device=CPU)
    assert [h["step"] for h in result.history] == [2, 4, 6, 8]
    assert result.stopped_early and result.best_step == 2 and result.steps == 8


def test_default_evaluation_interval_is_an_epoch_capped_in_steps(monkeypatch):
    from cmtl.training import loop

    monkeypatch.setattr(loop, "EVAL_EVERY_MAX", 3)
    value, forward = _scalar_model(0.0)
    config = TrainConfig(epochs=1, batch_size=2, patience=None, progress=False)  # 8 steps per epoch
    result = train(forward, [value], lambda _: None, REG, ONES, ONES, config, pad_id=0, device=CPU)
    assert [h["step"] for h in result.history] == [3, 6, 8]
    monkeypatch.setattr(loop, "EVAL_EVERY_MAX", 250)
    result = train(forward, [value], lambda _: None, REG, ONES, ONES, config, pad_id=0, device=CPU)
    assert [h["step"] for h in result.history] == [8]


def test_a_candidate_does_not_use_up_patience_and_is_kept_only_if_never_reached():
    # The candidate (0.9: MSE 0.01) beats the first trained evaluations; training toward 1 reaches it later.
    config = TrainConfig(epochs=100, batch_size=4, learning_rate=0.02, warmup_ratio=0.0, eval_every=1,
                         patience=2, lr_schedule="constant", progress=False)
    value, forward = _scalar_model(0.0)
    result = train(forward, [value], lambda _: None, REG, ONES, ONES, config, pad_id=0, device=CPU,
                   candidate=[torch.tensor([0.9])])
    assert result.history[0]["step"] == 0 and result.history[0]["mse"] == pytest.approx(0.01)
    assert result.history[1]["mse"] > 0.01 and result.best_step > 2  # patience 2 did not stop it at step 2
    assert result.best_metrics["mse"] <= 0.01 and value.item() != pytest.approx(0.9)
    # Training that never reaches the candidate returns it, with its scores.
    value, forward = _scalar_model(0.0)
    result = train(forward, [value], lambda _: None, REG, ONES, ONES,
                   dataclasses.replace(config, max_steps=3), pad_id=0, device=CPU, candidate=[torch.tensor([0.9])])
    assert result.best_step == 0 and value.item() == pytest.approx(0.9)
    assert result.best_metrics["mse"] == pytest.approx(0.01)
    torch.testing.assert_close(result.validation_logits, torch.full((16, 1), 0.9))


def _adapter_and_head():
    """Logits = adapter + head, two learnable pairs: one Adam step moves each coordinate by about its rate."""
    adapter = torch.nn.Parameter(torch.zeros(2))
    head = torch.nn.Parameter(torch.zeros(2))
    forward = lambda inputs: (adapter + head).expand(inputs["input_ids"].shape[0], 2)  # noqa: E731
    return adapter, head, forward


@pytest.mark.parametrize("head_lr, named, expected", [(None, True, 0.01), (0.1, True, 0.1), (0.1, False, 0.01)])
def test_head_learning_rate_drives_only_the_parameters_named_as_heads(head_lr, named, expected):
    config = TrainConfig(epochs=1, batch_size=16, learning_rate=0.01, head_learning_rate=head_lr, warmup_ratio=0.0,
                         weight_decay=0.0, lr_schedule="constant", progress=False)
    adapter, head, forward = _adapter_and_head()
    train(forward, [adapter, head], lambda _: None, SPEC, ALL_A, None, config, pad_id=0, device=CPU,
          heads=[head] if named else ())
    # One step toward "a": Adam's first step is the rate times the gradient's sign.
    torch.testing.assert_close(adapter.detach(), torch.tensor([0.01, -0.01]), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(head.detach(), torch.tensor([expected, -expected]), rtol=1e-3, atol=1e-6)


def test_both_groups_follow_the_schedule_in_proportion():
    config = TrainConfig(learning_rate=1e-3, head_learning_rate=3e-3, warmup_ratio=0.1)
    adapter, head, _ = _adapter_and_head()
    optimizer = adamw([adapter, head], config.learning_rate, config.weight_decay, heads=[head],
                      head_learning_rate=config.head_learning_rate)
    assert [g["params"] for g in optimizer.param_groups] == [[adapter], [head]]  # the adapter's group first
    for step in (0, 5, 50, 99):
        set_lr(optimizer, step, 100, config)
        rates = [g["lr"] for g in optimizer.param_groups]
        assert rates == pytest.approx([get_lr(step, 100, config), 3 * get_lr(step, 100, config)])
    one = adamw([adapter, head], 1e-3, 0.01, heads=[head])  # no head rate: one group
    assert len(one.param_groups) == 1 and one.param_groups[0]["params"] == [adapter, head]
    for bad in (0.0, -1e-3):
        with pytest.raises(ValueError, match="'head_learning_rate' parameter of TrainConfig must be > 0 or None"):
            TrainConfig(head_learning_rate=bad)


def _row_model(n: int):
    """A 'model' with its own learnable pair of logits per row (row i is token i + 1): training moves each row."""
    table = torch.nn.Parameter(torch.zeros(n + 1, 2))
    forward = lambda inputs: table[inputs["input_ids"][:, 0]]  # noqa: E731
    return table, forward


@pytest.mark.parametrize("margin, kept", [(0.0, "trained"), (1.0, "trained"), (2.0, "probe")])
def test_probe_margin_keeps_the_candidate_unless_training_beats_it_beyond_noise(margin, kept):
    # 100 validation rows, all labelled "b". The candidate gets 98 right; a few steps on the same rows get all
    # 100: two rows better, a paired gain of 0.02 / (0.141 / 10) = 1.42 standard errors.
    n = 100
    rows = Encoded([[i + 1] for i in range(n)], None, torch.ones(n, dtype=torch.long))
    candidate = torch.zeros(n + 1, 2)
    candidate[:, 1] = 1.0
    candidate[1:3] = torch.tensor([1.0, 0.0])  # rows 0 and 1 wrong
    config = TrainConfig(epochs=3, batch_size=n, learning_rate=0.5, warmup_ratio=0.0, lr_schedule="constant",
                         probe_margin=margin, progress=False)
    table, forward = _row_model(n)
    result = train(forward, [table], lambda _: None, SPEC, rows, rows, config, pad_id=0, device=CPU,
                   candidate=[candidate])
    assert result.history[0]["accuracy"] == pytest.approx(0.98) and result.history[-1]["accuracy"] == 1.0
    assert result.candidate_gain == pytest.approx(0.02 / (torch.tensor([1.0] * 2 + [0.0] * 98).std().item() / 10))
    if kept == "probe":
        assert result.best_step == 0 and result.best_metrics["accuracy"] == pytest.approx(0.98)
        torch.testing.assert_close(table.detach(), candidate)
    else:
        assert result.best_step > 0 and result.best_metrics["accuracy"] == 1.0


def test_without_a_candidate_there_is_no_gain_to_report():
    bias, forward = _bias_model()
    config = TrainConfig(epochs=1, batch_size=4, probe_margin=3.0, progress=False)
    result = train(forward, [bias], lambda _: None, SPEC, ALL_A, ALL_A, config, pad_id=0, device=CPU)
    assert result.candidate_gain is None and result.best_step > 0


@pytest.mark.parametrize("case", ["jumping", "climbing"])
def test_a_running_average_is_scored_beside_the_trained_state_and_kept_when_better(case):
    # jumping: training rows alternate between targets 0 and 2 and validation wants 1; at a high constant rate
    # the value keeps jumping around 1, and the average of the states it visits ends closer to 1 than it does.
    # climbing: every target is 1 and the value climbs to it from 0 at a low rate; the average lags behind.
    if case == "jumping":
        targets, start, rate = Encoded(IDS, None, torch.tensor([[0.0], [2.0]] * 8)), 1.0, 0.3
    else:
        targets, start, rate = ONES, 0.0, 0.05
    config = TrainConfig(epochs=3, batch_size=4, learning_rate=rate, warmup_ratio=0.0, lr_schedule="constant",
                         eval_every=12, patience=None, progress=False)
    value, plain = _scalar_model(start)
    visited = []

    def forward(inputs):
        if torch.is_grad_enabled():  # a training step: the state it starts from
            visited.append(value.item())
        return plain(inputs)

    plain_result = train(forward, [value], lambda _: None, REG, targets, ONES, config, pad_id=0, device=CPU)
    assert not plain_result.best_averaged and all("averaged" not in h for h in plain_result.history)
    states = visited[1:] + [value.item()]  # after steps 1..12
    last_mse = (states[-1] - 1.0) ** 2
    assert plain_result.best_metrics["mse"] == pytest.approx(last_mse)

    visited.clear()
    value.data.fill_(start)
    result = train(forward, [value], lambda _: None, REG, targets, ONES,
                   dataclasses.replace(config, ema_decay=0.9), pad_id=0, device=CPU)
    assert visited[1:] + [states[-1]] == pytest.approx(states)  # averaging does not change how it trains
    weights = [0.1 * 0.9 ** (len(states) - 1 - t) for t in range(len(states))]
    average = sum(w * s for w, s in zip(weights, states)) / (1 - 0.9 ** len(states))
    assert [(h["step"], "averaged" in h) for h in result.history] == [(12, False), (12, True)]
    assert result.history[0]["mse"] == pytest.approx(last_mse)
    assert result.history[1]["mse"] == pytest.approx((average - 1.0) ** 2)
    assert result.best_step == 12
    if case == "jumping":
        assert result.history[1]["mse"] < last_mse / 10
        assert result.best_averaged and value.item() == pytest.approx(average)
    else:
        assert result.history[1]["mse"] > last_mse * 2
        assert not result.best_averaged and value.item() == pytest.approx(states[-1])


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, True, "0.9"])
def test_ema_decay_must_lie_between_zero_and_one(bad):
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=bad)


def test_the_running_average_of_half_precision_parameters_is_kept_in_float32():
    value = torch.nn.Parameter(torch.tensor([0.0], dtype=torch.bfloat16))
    forward = lambda inputs: value.float().expand(inputs["input_ids"].shape[0], 1)  # noqa: E731
    config = TrainConfig(epochs=2, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, eval_every=4, patience=None,
                         ema_decay=0.9, progress=False)
    result = train(forward, [value], lambda _: None, REG, ONES, ONES, config, pad_id=0, device=CPU)
    assert [("averaged" in h) for h in result.history] == [False, True, False, True]
    assert value.dtype == torch.bfloat16 and 0.0 < value.item() < 1.0


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan"), True, "1"])
def test_a_grad_clip_that_is_no_positive_norm_is_refused(clip):
    # clip_grad_norm_ scales every gradient by clip / norm: 0 trained nothing, a negative value turned each
    # step into gradient ascent, silently.
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=clip)
    assert TrainConfig(grad_clip=None).grad_clip is None and TrainConfig(grad_clip=2).grad_clip == 2


def test_a_run_that_ends_at_its_cap_did_not_stop_early():
    # Patience running out at the last step's evaluation stops nothing: every step of the cap ran, and the
    # record (and `cmtl add-task`'s "stopped early") must not say otherwise.
    config = TrainConfig(epochs=1, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, eval_every=2, patience=1,
                         progress=False)
    bias, forward = _bias_model()
    result = train(forward, [bias], lambda _: None, SPEC, ALL_A, ALL_B, config, pad_id=0, device=CPU)
    assert [h["step"] for h in result.history] == [2, 4] and result.best_step == 2 and result.steps == 4
    assert not result.stopped_early
    longer = dataclasses.replace(config, epochs=2)  # patience runs out at step 4 of 8: that is stopping early
    bias, forward = _bias_model()
    result = train(forward, [bias], lambda _: None, SPEC, ALL_A, ALL_B, longer, pad_id=0, device=CPU)
    assert result.stopped_early and result.steps == 4


@pytest.mark.parametrize("knob", [{"probe_margin": 2.0}, {"probe_start": True}])
def test_probe_knobs_without_the_probe_are_refused(knob):
    # probe_init=False skips the step-0 probe, so probe_margin and probe_start were ignored, silently (cmtl add-task
    # --no-probe-init --probe-margin 2 trained as if the margin were 0).
    with pytest.raises(ValueError, match=f"{next(iter(knob))}.*probe_init"):
        TrainConfig(probe_init=False, **knob)
    assert TrainConfig(**knob) != TrainConfig()  # with the probe they apply
    # A record written before the check still reads back; the knobs it held were never read.
    stored = {**TrainConfig(probe_init=False).to_dict(), **knob}
    assert TrainConfig.from_dict(stored) == TrainConfig(probe_init=False)


def test_probe_margin_on_a_multi_label_task_judges_the_primary_metric():
    # 20 rows with one label of five each. The candidate predicts no label (micro-F1 0); the trained state
    # (started where it ends: the rate is negligible) predicts every label (micro-F1 1/3). The margin tested
    # the share of label decisions right instead (0.8 against 0.2), and kept the candidate at micro-F1 0.
    spec = TaskSpec("m", labels=list("abcde"), problem_type="multi_label")
    n = 20
    rows = Encoded([[i + 1] for i in range(n)], None, torch.nn.functional.one_hot(torch.arange(n) % 5, 5).float())
    table = torch.nn.Parameter(torch.full((n + 1, 5), 3.0))
    forward = lambda inputs: table[inputs["input_ids"][:, 0]]  # noqa: E731
    config = TrainConfig(epochs=1, batch_size=n, learning_rate=1e-9, warmup_ratio=0.0, weight_decay=0.0,
                         probe_margin=1.0, progress=False)
    result = train(forward, [table], lambda _: None, spec, rows, rows, config, pad_id=0, device=CPU,
                   candidate=[torch.full((n + 1, 5), -3.0)])
    assert result.history[0]["micro_f1"] == 0.0 and result.history[1]["micro_f1"] == pytest.approx(1 / 3)
    assert result.candidate_gain > 1.0
    assert result.best_step == 1 and result.best_metrics["micro_f1"] == pytest.approx(1 / 3)
    assert table.detach().min() > 2.9


@pytest.mark.parametrize("candidate", [None, [torch.tensor([0.9])]])
def test_a_validation_score_that_is_never_finite_raises_instead_of_returning_the_untrained_state(candidate):
    # A validation target whose square overflows float32 makes every state's MSE inf (a validation row that
    # overflows a float16 backbone makes it NaN): no evaluation counted as an improvement, so the parameters
    # as they were before training came back, with best_metrics {}, and were saved as the trained task.
    huge = Encoded(IDS, None, torch.tensor([[1.0]] * 15 + [[1e20]]))
    config = TrainConfig(epochs=2, batch_size=4, learning_rate=0.05, warmup_ratio=0.0, eval_every=2, patience=None,
                         progress=False)
    value, forward = _scalar_model(0.0)
    with pytest.raises(TrainingDivergedError, match=r"validation mse was inf at every evaluation\. Nothing was saved"):
        train(forward, [value], lambda _: None, REG, ONES, huge, config, pad_id=0, device=CPU, candidate=candidate)
    assert value.item() == 0.0
