"""Validation that shares inputs with training scores what training memorised: held-out splits keep copies of
one input on one side, and validation data given with rows of the training data is reported."""

from __future__ import annotations

import shutil

import pytest

from cmtl import DataError, Registry, TaskSpec, TrainConfig
from cmtl.continual.updates import halves, split
from cmtl.data import Examples, seeded_order
from cmtl.data.examples import shared_inputs
from tests.conftest import toy_sentiment

QUICK = TrainConfig(max_steps=2, progress=False)


def _rows(texts: list[str], pairs: list[str] | None = None) -> Examples:
    return Examples(texts, pairs, ["pos" if i % 2 else "neg" for i in range(len(texts))])


@pytest.mark.parametrize("seed", range(20))
def test_a_held_out_split_keeps_every_copy_of_an_input_on_one_side(seed):
    texts = [f"text {i % 7}" for i in range(30)] + [f"alone {i}" for i in range(10)]  # 7 inputs 4-5 times each
    train, held = split(_rows(texts), 0.2, seed, "t")
    assert not set(train.texts) & set(held.texts)
    assert len(train) + len(held) == 40 and len(held) >= 8  # at least the share asked for


def test_a_pair_is_one_input_with_its_second_text():
    texts, pairs = ["q"] * 6, ["a", "b", "c", "a", "b", "c"]
    for seed in range(10):
        train, held = split(_rows(texts, pairs), 0.3, seed, "t")
        assert not set(train.pairs) & set(held.pairs)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_distinct_inputs_split_as_before(seed):
    """Without copies the split is the plain seeded one, so every held-out sample measured before is unchanged."""
    examples = _rows([f"text {i}" for i in range(50)])
    order = seeded_order(50, seed)
    train, held = split(examples, 0.2, seed, "t")
    assert held.texts == [examples.texts[i] for i in sorted(order[:10])]
    assert train.texts == [examples.texts[i] for i in sorted(order[10:])]


@pytest.mark.parametrize("seed", range(10))
def test_the_halves_that_choose_and_judge_an_update_keep_copies_together(seed):
    """The gate judges on rows that did not choose the kept state: a copy of a choosing row is one of those."""
    keys = _rows([f"text {i % 5}" for i in range(20)] + [f"alone {i}" for i in range(6)]).inputs()
    select, judge = halves(len(keys), seed, keys)
    assert select and judge and not {keys[i] for i in select} & {keys[i] for i in judge}
    assert sorted(select + judge) == list(range(26))
    distinct = [(f"t{i}", None) for i in range(11)]  # without copies: the plain seeded halves, judge the larger
    assert halves(11, seed, distinct) == halves(11, seed) and len(halves(11, seed)[1]) == 6


def test_halves_of_one_input_in_copies_still_give_both_sides_rows():
    select, judge = halves(4, 0, [("same", None)] * 4)
    assert len(select) == 2 and len(judge) == 2


def test_shared_inputs_counts_validation_rows_seen_in_training():
    train, val = _rows(["a", "b", "c"]), _rows(["b", "d", "b", "a"])
    assert shared_inputs(train, val) == [0, 2, 3]
    assert shared_inputs(_rows(["a"], ["x"]), _rows(["a", "a"], ["y", "x"])) == [1]  # the pair is part of it


def test_add_task_reports_validation_rows_that_are_training_rows(tmp_path, tiny_config):
    reg = Registry.create(tmp_path / "r", tiny_config, device="cpu")
    train = toy_sentiment(24)
    with pytest.warns(UserWarning, match=r"3 of 10 validation rows \(30 %\) are also in the training data"):
        reg.add_task(TaskSpec("t", labels=["neg", "pos"]), train=train, validation=train[:3] + toy_sentiment(7, 1),
                     training=QUICK)


def test_updates_report_validation_and_old_held_out_rows_that_are_training_rows(tmp_path, sentiment_registry):
    shutil.copytree(sentiment_registry, tmp_path / "reg")
    reg = Registry.open(tmp_path / "reg", device="cpu")
    new = toy_sentiment(20, 5)
    with pytest.warns(UserWarning, match=r"2 of 6 validation rows \(33 %\) are also in the training data"):
        reg.update_task("sentiment", new, validation=new[:2] + toy_sentiment(4, 6), training=QUICK)
    old = reg.holdout("sentiment", 1)
    rows = [{"text": t, "label": label} for t, label in zip(old.texts[:3], old.labels[:3])]
    with pytest.warns(UserWarning, match=r"3 of \d+ old held-out rows .* are also in the training data"):
        reg.update_task("sentiment", new + rows, validation=toy_sentiment(6, 7), training=QUICK)


@pytest.mark.parametrize("seed", range(8))
def test_a_split_that_exists_is_found_whatever_the_seed(seed):
    """'a', 'a', 'b': holding 'a' out is a split, but a seed that drew 'b' first took 'a' after it, held out
    every row and refused the data as too uniform."""
    train, held = split(_rows(["a", "a", "b"]), 0.2, seed, "t")
    assert (train.texts, held.texts) == (["b"], ["a", "a"])


@pytest.mark.parametrize("seed", range(8))
def test_a_share_short_of_its_size_takes_the_smallest_inputs_that_complete_it(seed):
    """Six copies of 'x', three of 'y', one 'z', 20 % held out (2 rows): 'z' fits, then the next input in the
    seeded order was taken whole, so some seeds held out 7 of the 10 rows (trained on 3) where 4 would do."""
    train, held = split(_rows(["x"] * 6 + ["y"] * 3 + ["z"]), 0.2, seed, "t")
    assert sorted(held.texts) == ["y", "y", "y", "z"] and train.texts == ["x"] * 6


@pytest.mark.parametrize("texts", [["z"] * 40, ["a"] + ["b"] * 5])
def test_data_no_share_of_which_keeps_its_copies_together_is_refused_in_words(texts):
    with pytest.raises(DataError, match=r"hold only \d distinct input\(s\), and no share of 2 (to 8 )?rows"):
        split(_rows(texts), 0.2, 0, "t")
