"""Replay buffers: one contract suite over every kind, then each kind's own promise."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmtl.continual.replay import (
    BUFFERS,
    NO_LABEL_CLASS,
    REGRESSION_CLASS,
    ClassBalancedBuffer,
    ReplayBuffer,
    ReplayBufferError,
    ReplayItem,
    ReservoirBuffer,
    TaskBalancedBuffer,
    make_buffer,
)
from cmtl.data import Examples
from cmtl.errors import CmtlError, DataError, TaskNotFoundError

KINDS = sorted(BUFFERS)
# Upper 1e-6 tail of chi-square: scipy.stats.chi2.isf(1e-6, df). Seeds are fixed, so these tests are
# deterministic; the bound is chosen so that any other seeds would pass a correct buffer as well.
CHI2_1E6 = {19: 63.68, 39: 96.13}


def continual_stream(n_per_task: int = 40, tasks=("spam", "topic", "nli")) -> list[ReplayItem]:
    """Tasks one after another (new groups mid-stream), labels cycling within each task."""
    labels = {"spam": ["ham", "spam"], "topic": ["sport", "tech", "arts"], "nli": ["yes", "no", "maybe"]}
    return [ReplayItem(f"{task} example {i}", labels[task][i % len(labels[task])], task,
                       text_pair=f"hypothesis {i}" if task == "nli" else None, source="v1")
            for task in tasks for i in range(n_per_task)]


def filled(kind: str, items, budget: int = 10, seed: int = 0) -> ReplayBuffer:
    buffer = make_buffer(kind, budget, seed)
    buffer.add(items)
    return buffer


def chi_square_uniform(kept: Counter, positions: int, trials: int, k: int) -> float:
    """Pearson's statistic for "each position is kept with probability k / positions".

    Each trial keeps exactly k positions, so counts are negatively correlated; dividing by (1 - p)
    makes the statistic approximately chi-square with positions - 1 degrees of freedom.
    """
    p = k / positions
    expected = trials * p
    return sum((kept[i] - expected) ** 2 / expected for i in range(positions)) / (1 - p)


# --- the contract: every buffer --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_never_over_budget(kind):
    for budget in (1, 2, 10):
        buffer = make_buffer(kind, budget, 0)
        for item in continual_stream():
            buffer.add([item])
            assert len(buffer) <= budget
        assert len(buffer) == budget == buffer.stats()["size"]
        assert buffer.seen == 120


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_buffer_other_seed_other_buffer(kind):
    stream = continual_stream()
    a, b, c = filled(kind, stream, seed=3), filled(kind, stream, seed=3), filled(kind, stream, seed=4)
    assert a.state() == b.state()
    assert a.items() != c.items()


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_in_chunks_equals_one_call(kind):
    stream = continual_stream()
    chunked = make_buffer(kind, 10, 0)
    for start, stop in ((0, 1), (1, 8), (8, 50), (50, 120)):
        chunked.add(stream[start:stop])
    assert chunked.state() == filled(kind, stream).state()


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_continue_equals_never_saved(kind, tmp_path):
    stream = continual_stream()
    first = filled(kind, stream[:50])  # mid-task, before the third task's groups exist
    first.sample(3)
    first.save(tmp_path / "buffer.parquet")
    loaded = ReplayBuffer.load(tmp_path / "buffer.parquet")
    assert type(loaded) is type(first) and loaded.state() == first.state()
    assert list(loaded.stats()["seen_per_task"]) == list(first.stats()["seen_per_task"])  # order kept too
    loaded.add(stream[50:])
    never_saved = filled(kind, stream[:50])
    never_saved.sample(3)
    never_saved.add(stream[50:])
    assert loaded.state() == never_saved.state()
    assert loaded.sample(5) == never_saved.sample(5)  # the seedless sample sequence continues too
    assert type(first).load(tmp_path / "buffer.parquet").state() == first.state()


@pytest.mark.parametrize("kind", KINDS)
def test_sample_is_deterministic_and_without_replacement(kind):
    a, b = filled(kind, continual_stream()), filled(kind, continual_stream())
    assert a.sample(6, seed=1) == b.sample(6, seed=1) == a.sample(6, seed=1)
    assert a.sample(6, seed=1) != a.sample(6, seed=2)
    assert len(set(a.sample(6, seed=1))) == 6
    assert sorted(a.sample(100, seed=1), key=repr) == sorted(a.items(), key=repr)  # n > len: all of them
    assert a.sample(0, seed=1) == []
    draws_a, draws_b = [a.sample(4) for _ in range(3)], [b.sample(4) for _ in range(3)]
    assert draws_a == draws_b and draws_a[0] != draws_a[1]  # fresh draws, one fixed sequence
    with pytest.raises(ReplayBufferError, match=r"n >= 0\. Got -1"):
        a.sample(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_does_not_change_what_is_kept(kind):
    stream = continual_stream()
    sampled = filled(kind, stream[:60])
    sampled.sample(5)
    sampled.sample(5, seed=9)
    sampled.add(stream[60:])
    assert sampled.items() == filled(kind, stream).items()


@pytest.mark.parametrize("kind", KINDS)
def test_empty_buffer_round_trips(kind, tmp_path):
    make_buffer(kind, 5, 1).save(tmp_path / "empty.parquet")
    loaded = ReplayBuffer.load(tmp_path / "empty.parquet")
    assert len(loaded) == 0 and loaded.state() == make_buffer(kind, 5, 1).state()


@pytest.mark.parametrize("kind", KINDS)
def test_labels_and_texts_round_trip_exactly(kind, tmp_path):
    items = [
        ReplayItem("plain", "pos", "sent"),
        ReplayItem("index label", 1, "sent"),
        ReplayItem("multi\nline ünïcode ✓", ["sport", "tech"], "tags"),
        ReplayItem("no tags on", [], "tags"),
        ReplayItem("", 0.5, "score", text_pair="a pair", domain="news", source="v2"),
        ReplayItem("vector", [1.0, -2.5e-8], "score2"),
        ReplayItem("int targets", [3, 4], "score3"),
    ]
    buffer = filled(kind, items, budget=20)
    buffer.save(tmp_path / "b.parquet")
    loaded = ReplayBuffer.load(tmp_path / "b.parquet").items()
    assert sorted(map(repr, loaded)) == sorted(map(repr, items))  # repr: 1 and 1.0 differ, lists are tuples
    assert {type(it.label) for it in loaded} == {str, int, tuple, float}


@pytest.mark.parametrize("kind", KINDS)
def test_bad_files_raise_a_clear_error(kind, tmp_path):
    path = tmp_path / "b.parquet"
    filled(kind, continual_stream()).save(path)
    data = path.read_bytes()

    def load_error(content: bytes | None) -> str:
        target = tmp_path / "bad.parquet"
        target.unlink(missing_ok=True)
        if content is not None:
            target.write_bytes(content)
        with pytest.raises(ReplayBufferError) as info:
            ReplayBuffer.load(target)
        assert isinstance(info.value, CmtlError) and isinstance(info.value, ValueError)
        return str(info.value)

    assert "does not exist" in load_error(None)
    assert "truncated or corrupt" in load_error(data[: len(data) // 2])
    assert "truncated or corrupt" in load_error(b"")
    assert "truncated or corrupt" in load_error(b"not a parquet file at all" * 10)
    sink = io.BytesIO()
    pq.write_table(pa.table({"text": ["x"]}), sink)
    assert "not a cmtl replay buffer" in load_error(sink.getvalue())

    table = pq.read_table(path)  # one item edited behind the checksum's back
    texts = table.column("text").to_pylist()
    texts[0] = "tampered"
    sink = io.BytesIO()
    pq.write_table(table.set_column(0, "text", pa.array(texts, pa.string())), sink)
    assert "do not match the checksum" in load_error(sink.getvalue())


@pytest.mark.parametrize("kind", KINDS)
def test_to_examples_per_task(kind):
    buffer = filled(kind, continual_stream(), budget=30)
    for task in ("spam", "nli"):
        examples = buffer.to_examples(task)
        held = [it for it in buffer.items() if it.task == task]
        assert examples.texts == [it.text for it in held] and examples.labels == [it.label for it in held]
        assert examples.pairs == ([it.text_pair for it in held] if task == "nli" else None)
    with pytest.raises(TaskNotFoundError, match=r"Task 'ner' was never added to this buffer\. Tasks added: "
                                                r"\['spam', 'topic', 'nli'\]"):
        buffer.to_examples("ner")
    with pytest.raises(ReplayBufferError, match="to_examples\\(task=...\\)"):
        buffer.to_examples()  # nli items have pairs, the others not


@pytest.mark.parametrize("kind", KINDS)
def test_add_examples(kind):
    examples = Examples(["a", "b", "c"], ["x", "y", "z"], [["t1"], ["t2", "t1"], []])
    buffer = make_buffer(kind, 10, 0)
    buffer.add_examples(examples, "tags", source="v3")
    assert buffer.to_examples("tags") == examples
    assert {it.source for it in buffer.items()} == {"v3"}
    with pytest.raises(DataError, match="no labels"):
        buffer.add_examples(Examples(["a"]), "tags")


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, -3, 2.5, True, "10", None])
def test_bad_budget(budget):
    with pytest.raises(ReplayBufferError, match=rf"'budget' of a replay buffer must be an integer >= 1\. "
                                                rf"Got {budget!r}"):
        make_buffer("reservoir", budget, 0)


def test_bad_seed_and_kind():
    with pytest.raises(ReplayBufferError, match=r"'seed' .* integer >= 0\. Got -1"):
        ClassBalancedBuffer(budget=5, seed=-1)
    with pytest.raises(ReplayBufferError, match=r"must be one of \['reservoir', 'class_balanced', 'task_balanced'\]\. "
                                                r"Got 'fifo'"):
        make_buffer("fifo", 5, 0)


@pytest.mark.parametrize(("item", "message"), [
    ({"label": "pos", "task": "t"}, r"Replay item 1 has no \['text'\]"),
    ({"text": "x", "task": "t"}, r"no \['label'\]"),
    ({"text": "x", "label": "pos", "task": "t", "lable": 1}, r"unknown keys \['lable'\]. Items take the keys"),
    ({"text": 7, "label": "pos", "task": "t"}, r"Replay item 1: text=7 is a int, but text must be a string. Convert"),
    ({"text": "x", "label": "pos", "task": "t", "text_pair": 3.0}, r"text_pair=3.0 is a float"),
    ({"text": "x", "label": "pos", "task": ""}, r"task is empty"),
    ({"text": "x", "label": float("nan"), "task": "t"}, r"label=nan is not usable. Use a label name"),
    ({"text": "x", "label": ["a", 1], "task": "t"}, r"label=\['a', 1\] is not usable"),
    ({"text": "x", "label": {"a": 1}, "task": "t"}, r"label=\{'a': 1\} is not usable"),
    ({"text": "x", "label": True, "task": "t"}, r"label=True is not usable"),
    ("just a string", r"Replay item 1 is a str; pass a ReplayItem or a dict"),
])
def test_bad_items_are_named_and_nothing_is_added(item, message):
    buffer = make_buffer("reservoir", 5, 0)
    with pytest.raises(DataError, match=message):
        buffer.add([{"text": "fine", "label": "pos", "task": "t"}, item])
    assert len(buffer) == 0 and buffer.seen == 0


def test_load_as_another_kind_and_unknown_state_keys(tmp_path):
    filled("reservoir", continual_stream()).save(tmp_path / "r.parquet")
    with pytest.raises(ReplayBufferError, match="holds a 'reservoir' buffer, not a TaskBalancedBuffer"):
        TaskBalancedBuffer.load(tmp_path / "r.parquet")
    state = filled("reservoir", continual_stream()).state()
    with pytest.warns(UserWarning, match=r"unknown replay buffer keys \['future'\]"):
        ReplayBuffer.from_state({**state, "future": 1})
    with pytest.raises(ReplayBufferError, match="Malformed replay buffer state"):
        ReplayBuffer.from_state({**state, "items": state["items"] * 2})  # more items than the budget
    with pytest.raises(ReplayBufferError, match="format 99"):
        ReplayBuffer.from_state({**state, "format": 99})


# --- reservoir -------------------------------------------------------------------------------------


def test_reservoir_keeps_each_position_with_probability_budget_over_n():
    n, budget, trials = 20, 5, 2000
    stream = [ReplayItem(str(i), "x" if i % 4 else "y", "t") for i in range(n)]  # labels must not matter
    kept = Counter()
    for seed in range(trials):
        kept.update(int(it.text) for it in filled("reservoir", stream, budget, seed).items())
    assert chi_square_uniform(kept, n, trials, budget) < CHI2_1E6[n - 1]


def test_reservoir_keeps_everything_until_full():
    stream = continual_stream(n_per_task=2)
    buffer = filled("reservoir", stream, budget=6)
    assert buffer.items() == stream


# --- class- and task-balanced ---------------------------------------------------------------------


def test_class_balanced_shrinks_old_classes_when_a_new_one_arrives():
    buffer = ClassBalancedBuffer(budget=10, seed=0)
    counts = lambda: buffer.stats()["per_label"]["t"]  # noqa: E731
    buffer.add(ReplayItem(f"a{i}", "a", "t") for i in range(30))
    assert counts() == {"a": 10}
    buffer.add(ReplayItem(f"b{i}", "b", "t") for i in range(30))
    assert counts() == {"a": 5, "b": 5}
    buffer.add(ReplayItem(f"c{i}", "c", "t") for i in range(30))
    assert counts() == {"a": 4, "b": 3, "c": 3}  # the remainder goes to the class seen first


def test_class_balanced_stays_uniform_within_a_class_after_shrinking():
    n, budget, trials = 20, 8, 1000  # 20 'a' then 20 'b': 'a' holds 8, then shrinks to 4
    stream = [ReplayItem(str(i), "a" if i < n else "b", "t") for i in range(2 * n)]
    kept = Counter()
    for seed in range(trials):
        kept.update(int(it.text) for it in filled("class_balanced", stream, budget, seed).items())
    assert chi_square_uniform(kept, 2 * n, trials, budget) < CHI2_1E6[2 * n - 1]


@pytest.mark.parametrize("kind", ["class_balanced", "task_balanced"])
def test_balanced_whenever_every_group_has_enough(kind):
    import random

    for seed in range(20):
        rng = random.Random(seed)
        budget = rng.randint(5, 40)
        stream = [ReplayItem(f"{i}", rng.choice("abcd"), rng.choice(["t1", "t2", "t3"])) for i in range(400)]
        buffer = filled(kind, stream, budget, seed)
        groups = Counter(buffer.group_of(it) for it in buffer.items())
        offered = Counter(buffer.group_of(it) for it in stream)
        assert len(buffer) <= budget
        if min(offered.values()) >= budget:  # every group could fill any quota
            sizes = [groups[g] for g in offered]  # with more groups than budget, some hold 0
            assert len(buffer) == budget and max(sizes) - min(sizes) <= 1


def test_class_balanced_classes_of_multi_label_and_regression():
    items = [ReplayItem("x", ["b", "a"], "tags"), ReplayItem("y", [], "tags"), ReplayItem("z", 0.3, "score"),
             ReplayItem("w", [0.1, 0.2], "score"), ReplayItem("v", 2, "topic")]
    assert [it.label_class() for it in items] == ["b", NO_LABEL_CLASS, REGRESSION_CLASS, REGRESSION_CLASS, "2"]
    buffer = filled("class_balanced", items, budget=10)
    assert buffer.stats()["per_label"] == {"tags": {"b": 1, NO_LABEL_CLASS: 1}, "score": {REGRESSION_CLASS: 2},
                                           "topic": {"2": 1}}


def test_more_groups_than_budget_gives_the_first_seen_a_slot():
    buffer = ClassBalancedBuffer(budget=2, seed=0)
    buffer.add(ReplayItem(f"{c}{i}", c, "t") for c in "abc" for i in range(5))
    assert buffer.stats()["per_label"] == {"t": {"a": 1, "b": 1}}
    tasks = TaskBalancedBuffer(budget=2, seed=0)
    tasks.add(continual_stream(n_per_task=5))
    assert tasks.stats()["seen_per_task"] == {"spam": 5, "topic": 5, "nli": 5}
    assert tasks.stats()["per_task"] == {"spam": 1, "topic": 1}
    assert tasks.to_examples("nli") == Examples([], None, [])  # offered, none held: empty, not an error


def test_task_balanced_splits_by_task_and_keeps_the_stream_mix_within():
    buffer = TaskBalancedBuffer(budget=9, seed=0)
    buffer.add(continual_stream(n_per_task=30))
    assert buffer.stats()["per_task"] == {"spam": 3, "topic": 3, "nli": 3}
    skewed = [ReplayItem(f"s{i}", "ham" if i % 10 else "spam", "spam") for i in range(300)]
    only = filled("task_balanced", skewed, budget=50)
    assert only.stats()["per_label"]["spam"]["ham"] > 30  # not class-balanced: 90% ham in, mostly ham kept


def test_reservoir_mirrors_the_stream_not_the_tasks():
    buffer = ReservoirBuffer(budget=12, seed=0)
    buffer.add(continual_stream(n_per_task=100, tasks=("spam",)) + continual_stream(n_per_task=20, tasks=("nli",)))
    assert buffer.stats()["per_task"]["spam"] > buffer.stats()["per_task"].get("nli", 0)
    assert json.loads(json.dumps(buffer.stats())) == buffer.stats()
