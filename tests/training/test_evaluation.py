"""cmtl.training.evaluation: batched inference in row order, the primary metric, metrics by hand."""

from __future__ import annotations

import math

import pytest
import torch

from cmtl import TaskSpec
from cmtl.data import Encoded
from cmtl.training.evaluation import compute_metrics, paired_gain, predict_logits, primary_metric, row_scores


def test_predict_logits_returns_rows_in_their_order_in_inference_mode():
    enc = Encoded([[5, 5, 5], [1], [2, 2], [7, 7, 7, 7]], None, torch.tensor([0, 1, 0, 1]))
    widths, modes = [], []

    def forward(inputs):  # logits (B, 2): the row's first id and its length
        widths.append(inputs["input_ids"].shape[1])
        modes.append(torch.is_inference_mode_enabled())
        assert "targets" not in inputs
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        return torch.stack([ids[:, 0].float(), mask.sum(1).float()], dim=1)

    out = predict_logits(forward, enc, batch_size=2, pad_id=0, device=torch.device("cpu"))
    assert out.tolist() == [[5, 3], [1, 1], [2, 2], [7, 4]]
    assert widths == [2, 4] and all(modes)  # length-sorted batches: short rows together


def test_primary_metric_per_problem_type():
    assert primary_metric(TaskSpec("s", labels=["a", "b"])) == ("accuracy", True)
    assert primary_metric(TaskSpec("m", labels=["a", "b"], problem_type="multi_label")) == ("micro_f1", True)
    assert primary_metric(TaskSpec("r", problem_type="regression")) == ("mse", False)


def test_single_label_metrics_by_hand():
    spec = TaskSpec("s", labels=["a", "b", "c"])
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0], [0, 0, 5.0]])  # predicts a b b c
    m = compute_metrics(spec, logits, torch.tensor([0, 1, 2, 2]))
    assert m["n"] == 4 and m["accuracy"] == 0.75
    # F1 per label: a 1, b 2/3 (tp 1, fp 1), c 2/3 (tp 1, fn 1)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["loss"] == pytest.approx(float(spec.loss(logits, torch.tensor([0, 1, 2, 2]))))
    # A label neither predicted nor present does not pull macro-F1 down.
    assert compute_metrics(spec, logits[:2], torch.tensor([0, 1]))["macro_f1"] == 1.0


def test_multi_label_metrics_by_hand():
    spec = TaskSpec("m", labels=["x", "y"], problem_type="multi_label")
    logits = torch.tensor([[3.0, -3.0], [3.0, 3.0]])  # predicts {x}, {x, y}
    m = compute_metrics(spec, logits, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert m["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))  # tp 2, fp 1
    assert m["exact_match"] == 0.5
    assert m["macro_f1"] == pytest.approx((1.0 + 0.0) / 2)  # x: F1 1; y: never true, predicted once: 0


def test_regression_metrics_by_hand():
    spec = TaskSpec("r", problem_type="regression")
    m = compute_metrics(spec, torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([[1.0], [3.0], [5.0]]))
    assert m["mse"] == pytest.approx(2 / 3) and m["mae"] == pytest.approx(2 / 3)
    assert m["pearson"] == pytest.approx(0.9819805, abs=1e-6)


def test_row_scores_move_with_each_primary_metric():
    single = TaskSpec("s", labels=["a", "b"])
    logits = torch.tensor([[2.0, 0], [0, 2.0], [2.0, 0]])
    assert row_scores(single, logits, torch.tensor([0, 0, 0])).tolist() == [1, 0, 1]
    multi = TaskSpec("m", labels=["x", "y"], problem_type="multi_label")
    logits, targets = torch.tensor([[3.0, -3.0], [3.0, 3.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # micro-F1 (tp 2, fp 1: 0.8) linearised per row: 0.8 + n · (2 tp_i - 0.8 (2 tp_i + fp_i + fn_i)) / 5
    assert row_scores(multi, logits, targets).tolist() == pytest.approx([0.96, 0.64])
    reg = TaskSpec("r", problem_type="regression")
    assert row_scores(reg, torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [4.0]])).tolist() == [0.0, -4.0]


def test_paired_gain_by_hand():
    spec = TaskSpec("s", labels=["a", "b"])
    right, wrong = [0.0, 1.0], [1.0, 0.0]
    targets = torch.ones(4, dtype=torch.long)
    base = torch.tensor([right, wrong, wrong, right])
    # Differences +1, +1, 0, -1: mean 0.25, sd sqrt(11/12), se sd / 2.
    better = torch.tensor([right, right, right, wrong])
    assert paired_gain(spec, better, base, targets) == pytest.approx(0.25 / ((11 / 12) ** 0.5 / 2))
    assert paired_gain(spec, base, better, targets) == pytest.approx(-0.25 / ((11 / 12) ** 0.5 / 2))
    assert paired_gain(spec, base, base, targets) == 0.0
    # Every row one better: no spread, so the sign test's z for n agreeing rows.
    assert paired_gain(spec, torch.tensor([right] * 4), torch.tensor([wrong] * 4), targets) == pytest.approx(2.0)


def test_multi_label_row_scores_average_to_micro_f1_and_rank_as_it_does():
    # Labels are rare: predicting none is right on most label decisions (Hamming accuracy 0.8) but finds no
    # label (micro-F1 0); predicting every label finds them all (micro-F1 1/3) at Hamming accuracy 0.2. The
    # paired gain judged the primary metric's winner 4.5 standard errors worse, so probe_margin kept a
    # micro-F1 of 0 over 1/3.
    spec = TaskSpec("m", labels=list("abcde"), problem_type="multi_label")
    targets = torch.nn.functional.one_hot(torch.arange(20) % 5, 5).float()
    none, every = torch.full((20, 5), -3.0), torch.full((20, 5), 3.0)
    for logits in (none, every, torch.where(targets.bool(), 3.0, -3.0), torch.randn(20, 5, generator=torch.Generator(
            ).manual_seed(0))):
        expected = compute_metrics(spec, logits, targets)["micro_f1"]
        assert float(row_scores(spec, logits, targets).mean()) == pytest.approx(expected)
    assert compute_metrics(spec, every, targets)["micro_f1"] > compute_metrics(spec, none, targets)["micro_f1"]
    assert paired_gain(spec, every, none, targets) > 0
    # No positive label anywhere and none predicted: micro-F1 0 (as compute_metrics says), every row 0.
    assert row_scores(spec, none, torch.zeros(20, 5)).tolist() == [0.0] * 20


def test_metrics_agree_with_scikit_learn_on_ties_empty_classes_and_negative_rows():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, labels = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(2, 6, (1,), generator=g))
        names = [f"l{i}" for i in range(labels)]
        logits = torch.randint(0, 3, (n, labels), generator=g).float()  # ties: argmax takes the first
        targets = torch.randint(0, labels, (n,), generator=g)  # some classes absent
        m = compute_metrics(TaskSpec("s", labels=names), logits, targets)
        pred = logits.argmax(-1).numpy()
        assert m["accuracy"] == pytest.approx(metrics.accuracy_score(targets.numpy(), pred))
        assert m["macro_f1"] == pytest.approx(metrics.f1_score(targets.numpy(), pred, average="macro"))
        multi = (torch.rand(n, labels, generator=g) < 0.2).float()  # rows with no label at all
        scores = torch.randn(n, labels, generator=g)
        m = compute_metrics(TaskSpec("m", labels=names, problem_type="multi_label"), scores, multi)
        on = (scores.sigmoid() >= 0.5).int().numpy()
        for average in ("micro", "macro"):
            expected = metrics.f1_score(multi.int().numpy(), on, average=average, zero_division=0)
            assert m[f"{average}_f1"] == pytest.approx(expected)
        assert m["exact_match"] == pytest.approx(metrics.accuracy_score(multi.int().numpy(), on))


def test_rows_without_an_answer_score_as_wrong_not_as_the_first_label():
    """NaN logits scored as label 0 (argmax of NaNs), so a broken model looked right on every row of the
    first class; now such a row counts as wrong in every metric and in ``row_scores``."""
    nan = float("nan")
    spec = TaskSpec("s", labels=["a", "b"])
    logits = torch.tensor([[nan, nan], [nan, nan], [0.0, 5.0]])
    targets = torch.tensor([0, 0, 1])
    m = compute_metrics(spec, logits, targets)
    assert m["accuracy"] == pytest.approx(1 / 3)
    assert m["macro_f1"] == pytest.approx((0.0 + 1.0) / 2)  # a: two missed, never predicted; b: right
    assert row_scores(spec, logits, targets).tolist() == [0.0, 0.0, 1.0]
    multi = TaskSpec("m", labels=["x", "y"], problem_type="multi_label")
    mlogits = torch.tensor([[nan, -3.0], [3.0, -3.0]])
    mtargets = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    mm = compute_metrics(multi, mlogits, mtargets)
    assert mm["exact_match"] == 0.5  # row 0 read "nothing on" before: right by accident
    assert mm["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 0))  # row 0: every decision wrong (fp 2)
    assert row_scores(multi, mlogits, mtargets).mean().item() == pytest.approx(mm["micro_f1"])


def test_multi_label_cells_without_an_answer_are_left_out_of_every_metric():
    """An update's old rows hold NaN for a label added after they were annotated. NaN read as true made every
    such cell a label the model missed (or found): micro-F1, macro-F1, exact match and the per-row scores counted
    answers the rows never gave."""
    spec = TaskSpec("m", labels=["x", "y", "z"], problem_type="multi_label")
    nan = float("nan")
    targets = torch.tensor([[1.0, 0.0, nan], [0.0, 1.0, nan], [1.0, 0.0, 1.0]])
    logits = torch.tensor([[3.0, -3.0, 3.0], [-3.0, 3.0, -3.0], [3.0, -3.0, 3.0]])  # right wherever answered
    m = compute_metrics(spec, logits, targets)
    assert (m["micro_f1"], m["macro_f1"], m["exact_match"]) == (1.0, 1.0, 1.0)
    assert math.isfinite(m["loss"])
    torch.testing.assert_close(row_scores(spec, logits, targets), torch.ones(3))
    # Against the same rows with those cells dropped (the third label scored on the third row alone):
    wrong = logits.clone()
    wrong[2, 2] = -3.0
    assert compute_metrics(spec, wrong, targets)["micro_f1"] == 2 * 3 / (2 * 3 + 1)


def test_a_multi_label_column_without_any_answer_is_not_a_label_scored_zero():
    """Rows that all predate a label hold no answer for it: macro-F1 averaged an F1 of 0 for that label into the
    mean (a label that no row could show), though every answer given was right."""
    spec = TaskSpec("m", labels=["x", "y", "z"], problem_type="multi_label")
    nan = float("nan")
    targets = torch.tensor([[1.0, 0.0, nan], [0.0, 1.0, nan]])
    logits = torch.tensor([[3.0, -3.0, 3.0], [-3.0, 3.0, -3.0]])
    m = compute_metrics(spec, logits, targets)
    assert (m["micro_f1"], m["macro_f1"], m["exact_match"]) == (1.0, 1.0, 1.0)
