"""cmtl.core.tasks: TaskSpec (labels in and out, the spec's own rules), TaskHead, route_to_heads, check_head_state."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmtl import CorruptFileError, DataError, TaskSpec
from cmtl.core.heads import TaskHead, check_head_state, route_to_heads
from cmtl.core.tasks import MASKED_LOGIT


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


# Each message names the parameter and the value given (matched loosely: the wording may change).
@pytest.mark.parametrize("kwargs, match", [
    ({"name": "no spaces"}, r"name.*'no spaces'"),
    ({"name": "../up"}, r"name.*'\.\./up'"),
    ({"name": 7}, r"name.*\b7\b"),
    ({"problem_type": "ranking"}, r"problem_type.*'ranking'"),
    ({"labels": ["a", "a"]}, r"labels.*\['a', 'a'\]"),
    ({"labels": ["only"]}, r"labels.*\['only'\]"),
    ({"threshold": 1.0}, r"threshold.*1\.0"),
])
def test_bad_specs_name_the_field_and_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskSpec(**{"name": "t", "labels": ["a", "b"], **kwargs})


def test_loss_and_probabilities_follow_the_problem_type():
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.0]])
    single = TaskSpec("s", labels=["a", "b"])
    torch.testing.assert_close(single.probabilities(logits), logits.softmax(-1))
    torch.testing.assert_close(single.loss(logits, torch.tensor([0, 1])),
                               torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])))
    multi = TaskSpec("m", labels=["a", "b"], problem_type="multi_label")
    torch.testing.assert_close(multi.probabilities(logits), logits.sigmoid())
    assert multi.decode(logits) == [["a"], ["a", "b"]]  # sigmoid(0) = 0.5 is on at the default threshold
    assert TaskSpec("m2", labels=["a", "b"], problem_type="multi_label", threshold=0.6).decode(logits) == [["a"], []]
    reg = TaskSpec("r", labels=["x", "y"], problem_type="regression")
    torch.testing.assert_close(reg.probabilities(logits), logits)  # the values themselves
    assert reg.decode(logits) == [[2.0, -1.0], [0.0, 0.0]]  # two targets: a list per row
    torch.testing.assert_close(reg.loss(logits, torch.zeros(2, 2)), (logits**2).mean())


def test_head_starts_small_and_drops_out_only_in_training():
    torch.manual_seed(0)
    head = TaskHead(16, 3, dropout=0.5)
    assert head.linear.bias.abs().sum() == 0 and head.linear.weight.abs().max() < 0.2
    pooled = torch.randn(4, 16)
    head.eval()
    torch.testing.assert_close(head(pooled), head.linear(pooled))
    head.train()
    assert not torch.allclose(head(pooled), head.linear(pooled))


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


def test_check_head_state_names_the_file_and_the_shapes():
    spec = TaskSpec("t", labels=["a", "b", "c"])
    head = TaskHead(8, 3)
    check_head_state(head.state_dict(), head, spec, Path("head.safetensors"))  # its own weights fit
    other = TaskHead(8, 2).state_dict()
    with pytest.raises(CorruptFileError, match=r"'head.safetensors' does not fit the head of task 't' \(3 outputs "
                                               r".*'linear.weight': expected shape \(3, 8\), found \(2, 8\)"):
        check_head_state(other, head, spec, Path("head.safetensors"))
    with pytest.raises(CorruptFileError, match=r"'linear.bias': expected shape \(3,\), found none"):
        check_head_state({"linear.weight": head.linear.weight}, head, spec, Path("head.safetensors"))


def test_outputs_that_answer_nothing_are_refused_not_read_as_the_first_label():
    """A NaN logit row used to decode as the first label (argmax of NaNs is 0) with NaN probabilities: a
    wrong answer given silently. ``-inf`` is a class that is never predicted (analytic heads give it to
    classes without rows) and decodes as before."""
    from cmtl import NonFiniteOutputError

    nan, inf = float("nan"), float("inf")
    single = TaskSpec("s", labels=["a", "b", "c"])
    assert single.decode(torch.tensor([[-inf, 1.0, 0.0]])) == ["b"]
    assert single.probabilities(torch.tensor([[-inf, 0.0, 0.0]]))[0].tolist() == [0.0, 0.5, 0.5]
    for bad in ([nan, nan, nan], [0.0, nan, 1.0], [inf, 0.0, 0.0], [-inf, -inf, -inf]):
        logits = torch.tensor([[0.0, 1.0, 0.0], bad])
        with pytest.raises(NonFiniteOutputError, match=r"row 1 .*task 's'"):
            single.decode(logits)
        with pytest.raises(NonFiniteOutputError, match="row 1"):
            single.probabilities(logits)
    multi = TaskSpec("m", labels=["x", "y"], problem_type="multi_label")
    assert multi.decode(torch.tensor([[inf, -inf]])) == [["x"]]
    with pytest.raises(NonFiniteOutputError, match="row 0"):
        multi.decode(torch.tensor([[nan, 3.0]]))
    reg = TaskSpec("r", problem_type="regression")
    for bad in (nan, inf, -inf):
        with pytest.raises(NonFiniteOutputError, match="row 0"):
            reg.decode(torch.tensor([[bad]]))


@pytest.mark.parametrize("problem_type, labels", [("single_label", ["a", "b"]), ("regression", None),
                                                  ("single_label", None)])
def test_a_threshold_is_refused_where_nothing_reads_it(problem_type, labels):
    # A single-label task predicts the label of highest probability, a regression task values: the threshold
    # was kept and ignored, so TaskSpec("spam", ..., threshold=0.9) still said "spam" at p = 0.51.
    with pytest.raises(ValueError, match=rf"threshold.*0\.9.*multi-label tasks only.*{problem_type}"):
        TaskSpec("t", labels=labels, problem_type=problem_type, threshold=0.9)
    assert TaskSpec("t", labels=labels, problem_type=problem_type, threshold=0.5).threshold == 0.5  # the default
    with pytest.raises(ValueError, match=r"threshold.*\(0, 1\).*1\.5"):  # checked before the labels are known
        TaskSpec("m", problem_type="multi_label", threshold=1.5)


def test_a_stored_spec_with_an_unread_threshold_still_reads():
    # Records written before the threshold was refused where unread: it never applied, so it is dropped.
    stored = {**TaskSpec("t", labels=["a", "b"]).to_dict(), "threshold": 0.9}
    assert TaskSpec.from_dict(stored) == TaskSpec("t", labels=["a", "b"])
    multi = {**TaskSpec("m", labels=["a", "b"], problem_type="multi_label").to_dict(), "threshold": 0.9}
    assert TaskSpec.from_dict(multi).threshold == 0.9


def test_a_numpy_threshold_is_stored_as_a_float():
    # A numpy float32 threshold trained the whole task, then failed to write the manifest (not JSON serialisable).
    spec = TaskSpec("m", labels=["a", "b"], problem_type="multi_label", threshold=np.float32(0.25))
    assert type(spec.threshold) is float and spec.threshold == 0.25
    assert json.loads(json.dumps(spec.to_dict()))["threshold"] == 0.25
    for bad in ("0.3", None):
        with pytest.raises(ValueError, match=rf"threshold.*\(0, 1\).*{bad!r}"):
            TaskSpec("m", labels=["a", "b"], problem_type="multi_label", threshold=bad)


def test_multi_label_loss_leaves_out_cells_without_an_answer():
    # An update's old rows were annotated before a label was added: their cell for it is NaN (no answer), and the
    # loss is the mean over the cells that hold one (it was NaN, and training diverged).
    spec = TaskSpec("m", labels=["a", "b", "c"], problem_type="multi_label")
    logits = torch.tensor([[2.0, -1.0, 3.0], [0.5, 1.0, -2.0]])
    target = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    known = ~target.isnan()
    torch.testing.assert_close(spec.loss(logits, target), torch.nn.functional.binary_cross_entropy_with_logits(
        logits[known], target[known]))
    full = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # every cell answered: the plain mean, as before
    assert spec.loss(logits, full) == torch.nn.functional.binary_cross_entropy_with_logits(logits, full)
