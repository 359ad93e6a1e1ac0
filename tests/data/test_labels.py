"""How raw label values become label names: ClassLabel names, integers by value or as indices,
and the same answer from every data source."""

from __future__ import annotations

import dataclasses
import json
import warnings

import datasets
import pandas as pd
import pytest

from cmtl import DataError, TaskSpec
from cmtl.data import Examples, read_examples, spec_for_data

TEXTS = ["a", "b", "c", "d"]


def _classlabel_dataset(values, names):
    ds = datasets.Dataset.from_dict({"text": TEXTS[: len(values)], "label": values})
    return ds.cast_column("label", datasets.ClassLabel(names=names))


# --- ClassLabel: the names are the truth ---------------------------------------------


def test_classlabel_maps_by_name_not_position():
    ds = _classlabel_dataset([0, 1, 0, 1], ["ham", "spam"])
    spec = TaskSpec("x", labels=["spam", "ham"])  # the other order than the ClassLabel's
    examples = read_examples(ds, spec)
    assert examples.labels == ["ham", "spam", "ham", "spam"]
    assert spec.encode_labels(examples.labels).tolist() == [1, 0, 1, 0]


def test_classlabel_names_become_the_labels_of_a_spec_without_labels():
    ds = _classlabel_dataset([1, 0, 2, 1], ["sport", "food", "music"])
    spec = spec_for_data(TaskSpec("x"), ds)
    assert spec.labels == ("sport", "food", "music")  # ClassLabel order, not sorted
    assert read_examples(ds, spec).labels == ["food", "sport", "music", "food"]
    given = TaskSpec("y", labels=["a", "b"])
    assert spec_for_data(given, ds) is given  # labels given: nothing to fill in


def test_spec_without_labels_and_no_classlabel_is_refused():
    with pytest.raises(ValueError, match=r"needs a list of label names, e.g. TaskSpec\('x', labels="):
        spec_for_data(TaskSpec("x"), [{"text": "a", "label": "pos"}])
    with pytest.raises(ValueError, match="has no labels yet"):
        TaskSpec("x").num_outputs


def test_spec_that_disagrees_with_classlabel_is_refused():
    ds = _classlabel_dataset([0, 1], ["ham", "spam"])
    with pytest.raises(DataError, match=r"\['ham', 'spam'\].*\['ham', 'eggs'\]"):
        read_examples(ds, TaskSpec("x", labels=["ham", "eggs"]))


def test_classlabel_wins_over_label_encoding():
    ds = _classlabel_dataset([0, 1], ["1", "0"])  # names that look like indices, in reverse
    for encoding in ("value", "index"):
        spec = TaskSpec("x", labels=["0", "1"], label_encoding=encoding)
        assert read_examples(ds, spec).labels == ["1", "0"]


def test_multi_label_sequence_of_classlabel_maps_by_name():
    ds = datasets.Dataset.from_dict({"text": ["a", "b"], "label": [[0, 1], [1]]})
    ds = ds.cast_column("label", datasets.Sequence(datasets.ClassLabel(names=["x", "y"])))
    spec = TaskSpec("m", labels=["y", "x"], problem_type="multi_label")
    examples = read_examples(ds, spec)
    assert examples.labels == [["x", "y"], ["y"]]
    assert spec.encode_labels(examples.labels).tolist() == [[1, 1], [1, 0]]
    assert spec_for_data(TaskSpec("m", problem_type="multi_label"), ds).labels == ("x", "y")


# --- multi-label rows: lists of distinct labels, never multi-hot vectors ---------------


@pytest.mark.parametrize("source", ["dicts", "dataframe", "dataset", "examples", "jsonl", "parquet"])
@pytest.mark.parametrize("spec_kwargs, ok, row, label", [
    ({"labels": ["a", "b", "c"], "label_encoding": "index"}, [2], [1, 0, 1], "'b'"),  # read b, a, b: {a, c} meant
    ({"labels": ["0", "1", "2"]}, [2], [1, 0, 1], "'1'"),  # numeric names by value: 1, 0, 1
    ({}, [0], [0, 1, 1], "'1'"),  # no labels yet
    ({"labels": ["a", "b"]}, ["b"], ["a", "b", "a"], "'a'"),
])
def test_a_multi_label_row_naming_a_label_twice_is_refused(tmp_path, source, spec_kwargs, ok, row, label):
    rows = [{"text": "s", "label": ok}, {"text": "t", "label": row}]
    spec = TaskSpec("m", problem_type="multi_label", **spec_kwargs)
    with pytest.raises(DataError, match=rf"Row 1 .*names label {label} twice.*multi-hot 0/1 vectors are not accepted"):
        read_examples(_write(rows, source, tmp_path), spec)


def test_the_multi_hot_error_says_what_the_vector_means():
    spec = TaskSpec("m", labels=["a", "b", "c"], problem_type="multi_label", label_encoding="index")
    meant = r"label names, or their positions.*label_encoding='index'.*\['a', 'c'\], or \[0, 2\]"
    with pytest.raises(DataError, match=meant):
        read_examples([{"text": "t", "label": [1, 0, 1]}], spec)
    with pytest.raises(DataError, match="multi-hot"):
        spec.encode_labels([[1, 0, 1]])
    assert read_examples([{"text": "t", "label": [0, 2]}], spec).labels == [["a", "c"]]  # positions are fine
    assert "multi-hot 0/1 vectors are not accepted" in TaskSpec.__doc__.lower()


@pytest.mark.parametrize("source", ["dicts", "dataframe", "dataset", "examples", "jsonl", "parquet"])
@pytest.mark.parametrize("spec_kwargs", [{"labels": ["a", "b"], "label_encoding": "index"}, {"labels": ["0", "1"]},
                                         {"labels": ["a"], "label_encoding": "index"}])
def test_one_hot_rows_of_a_task_with_one_or_two_labels_are_refused(tmp_path, source, spec_kwargs):
    # With two labels a one-hot row names no label twice: [1, 0] ('a' alone) read as positions 1 and 0, every
    # row named both labels, silently; with one label, [0] ('a' off) read as position 0, 'a' on.
    spec = TaskSpec("m", problem_type="multi_label", **spec_kwargs)
    flags = [[1, 0], [0, 1], [1, 0]] if len(spec.labels) == 2 else [[0], [0], [0]]
    rows = [{"text": t, "label": f} for t, f in zip("stu", flags)]
    with pytest.raises(DataError, match=r"Every row of the data of task 'm' names every label.*3 rows.*multi-hot"):
        read_examples(_write(rows, source, tmp_path), spec)
    # Rows that name a label, both, or none stay as they are; so do rows of names, and a single row.
    ok = [[0], [1], [0, 1], []] if len(spec.labels) == 2 else [[0], [], [0]]
    assert len(read_examples(_write([{"text": t, "label": f} for t, f in zip("stuv", ok)], source, tmp_path),
                             spec)) == len(ok)
    names = [{"text": t, "label": list(spec.labels)} for t in "st"]
    assert read_examples(_write(names, source, tmp_path), spec).labels == [list(spec.labels)] * 2
    assert [sorted(r) for r in read_examples(_write(rows[:1], source, tmp_path), spec).labels] == [list(spec.labels)]


@pytest.mark.parametrize("source", ["dicts", "dataframe", "dataset", "examples", "jsonl", "parquet"])
def test_a_multi_label_row_given_as_label_flags_is_refused(tmp_path, source):
    # {label: on?} read as a list gives its keys: every label on, whatever the flags say.
    rows = [{"text": "s", "label": {"a": 0, "b": 1}}, {"text": "t", "label": {"a": 1, "b": 0}}]
    spec = TaskSpec("m", labels=["a", "b"], problem_type="multi_label")
    with pytest.raises(DataError, match=r"Row 0 of the data of task 'm' is a dict.*not a list of labels.*every key "
                                        r"would be one of its labels.*e\.g\. \[.b.\]"):
        read_examples(_write(rows, source, tmp_path), spec)


def test_a_multi_label_row_given_as_bytes_is_refused():
    spec = TaskSpec("m", labels=["a", "b", "c"], problem_type="multi_label", label_encoding="index")
    with pytest.raises(DataError, match=r"Row 0 .* is a bytes.*not a list of labels"):
        spec.label_names([b"\x00\x02"])  # iterated, it would be positions 0 and 2


# --- plain integers: by value, or as indices when the spec says so ------------------


def _write(rows: list[dict], source: str, tmp_path):
    """The same rows as the data source ``source``."""
    frame = pd.DataFrame(rows)
    if source == "dicts":
        return rows
    if source == "dataframe":
        return frame
    if source == "dataset":
        return datasets.Dataset.from_list(rows)
    if source == "examples":
        return Examples([r["text"] for r in rows], None, [r["label"] for r in rows])
    path = tmp_path / f"data.{source}"
    if source in ("csv", "tsv"):
        frame.to_csv(path, sep="\t" if source == "tsv" else ",", index=False)
    elif source == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif source == "json":
        path.write_text(json.dumps(rows))
    elif source == "parquet":
        frame.to_parquet(path)
    return path


SOURCES = ["dicts", "dataframe", "dataset", "examples", "csv", "tsv", "jsonl", "json", "parquet"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    "values, spec_kwargs, expected",
    [
        ([1, 2, 1, 2], {"labels": ["1", "2", "3"]}, ["1", "2", "1", "2"]),  # by value, not index
        ([0, 1, 1, 0], {"labels": ["0", "1"]}, ["0", "1", "1", "0"]),
        ([0, 1, 1, 0], {"labels": ["neg", "pos"], "label_encoding": "index"}, ["neg", "pos", "pos", "neg"]),
        ([1, 2, 1, 2], {"labels": ["1", "2", "3"], "label_encoding": "index"}, ["2", "3", "2", "3"]),
        ([0, 1, 1, 0], {}, ["0", "1", "1", "0"]),  # no labels yet: the integers' string form
    ],
)
def test_same_integer_labels_give_same_names_from_every_source(tmp_path, source, values, spec_kwargs, expected):
    rows = [{"text": t, "label": v} for t, v in zip(TEXTS, values)]
    examples = read_examples(_write(rows, source, tmp_path), TaskSpec("x", **spec_kwargs))
    assert examples.labels == expected


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize(
    "values, spec_kwargs, expected",
    [
        ([1.0, 0.0, 1.0, 0.0], {"labels": ["0", "1"]}, ["1", "0", "1", "0"]),  # a float column, as pandas writes it
        ([1.0, 0.0, 1.0, 0.0], {"labels": ["neg", "pos"], "label_encoding": "index"}, ["pos", "neg", "pos", "neg"]),
        ([0.5, 1.5, 0.5, 1.5], {"labels": ["0.5", "1.5"]}, ["0.5", "1.5", "0.5", "1.5"]),
        ([1.0, 2.0, 1.0, 2.0], {"labels": ["1.0", "2.0"]}, ["1.0", "2.0", "1.0", "2.0"]),  # names that are floats
    ],
)
def test_same_float_labels_give_same_names_from_every_source(tmp_path, source, values, spec_kwargs, expected):
    """A CSV of 0.0/1.0 (a pandas column that was float) was read as the names '0.0' and '1.0' and refused for a
    task labelled '0'/'1', while the same DataFrame was accepted."""
    rows = [{"text": t, "label": v} for t, v in zip(TEXTS, values)]
    examples = read_examples(_write(rows, source, tmp_path), TaskSpec("x", **spec_kwargs))
    assert examples.labels == expected


@pytest.mark.parametrize("source", SOURCES)
def test_integer_labels_with_non_numeric_names_are_refused(tmp_path, source):
    rows = [{"text": t, "label": v} for t, v in zip(TEXTS, [0, 1, 0, 1])]
    with pytest.raises(DataError, match=r"Integer labels.*use the label strings.*label_encoding='index'"):
        read_examples(_write(rows, source, tmp_path), TaskSpec("x", labels=["neg", "pos"]))


def test_index_out_of_range_and_unknown_value_are_refused():
    rows = [{"text": "a", "label": 2}]
    with pytest.raises(DataError, match=r"indices 0\.\.1"):
        read_examples(rows, TaskSpec("x", labels=["neg", "pos"], label_encoding="index"))
    with pytest.raises(DataError, match=r"Labels 2 .*not in its label set \['0', '1'\]"):
        read_examples(rows, TaskSpec("x", labels=["0", "1"]))


def test_string_labels_are_names_under_either_encoding():
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    for encoding in ("value", "index"):
        spec = TaskSpec("x", labels=["neg", "pos"], label_encoding=encoding)
        assert read_examples(rows, spec).labels == ["pos", "neg"]


def test_encode_labels_applies_the_same_rule_to_raw_values():
    assert TaskSpec("x", labels=["1", "2", "3"]).encode_labels([1, 2, "3"]).tolist() == [0, 1, 2]
    assert TaskSpec("x", labels=["a", "b"], label_encoding="index").encode_labels([1, "a"]).tolist() == [1, 0]
    with pytest.raises(DataError, match="label_encoding='index'"):
        TaskSpec("x", labels=["a", "b"]).encode_labels([1])


# --- the label_encoding field ---------------------------------------------------------


def test_label_encoding_is_validated():
    with pytest.raises(ValueError, match=r"'label_encoding' parameter of TaskSpec 'x' must be one of "
                                         r"\['value', 'index'\]; got 'idx'"):
        TaskSpec("x", labels=["a", "b"], label_encoding="idx")


def test_label_encoding_round_trips_and_old_manifests_load():
    spec = TaskSpec("x", labels=["a", "b"], label_encoding="index")
    assert TaskSpec.from_dict(spec.to_dict()) == spec
    old = spec.to_dict()
    del old["label_encoding"]  # a manifest written before the field existed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TaskSpec.from_dict(old).label_encoding == "value"
    assert TaskSpec.from_dict(TaskSpec("y").to_dict()) == TaskSpec("y")


# --- through the registry: the repro ------------------------------------------


def _as_classlabel(rows, names):
    ds = datasets.Dataset.from_list(rows)
    return ds.cast_column("label", datasets.ClassLabel(names=names))


def test_classlabel_training_predicts_by_name(registry):
    from tests.conftest import FAST, QV, toy_sentiment

    train = _as_classlabel(toy_sentiment(96), ["neg", "pos"])
    registry.add_task(TaskSpec("s", labels=["pos", "neg"]), train, adapter=QV, training=FAST)  # the other order
    # The training rows with string labels: ~0.97 by name; the old positional mapping scored 0.03.
    assert registry.evaluate("s", toy_sentiment(96))["accuracy"] >= 0.9


def test_spec_without_labels_takes_classlabel_names_in_add_task(registry):
    from tests.conftest import FAST, toy_sentiment

    train = _as_classlabel(toy_sentiment(32), ["pos", "neg"])
    info = registry.add_task(TaskSpec("s"), train, training=FAST)
    assert registry.spec(info.task).labels == ("pos", "neg")


# --- Stored examples of earlier releases -----------------------------------------------


def _store_with_positions(root, task, version, name):
    """Rewrite a stored buffer as earlier releases wrote integer-labelled data: label positions."""
    import hashlib

    from cmtl.continual.replay import ReplayBuffer

    path = root / "tasks" / task / f"v{version}" / name
    stored = ReplayBuffer.from_bytes(path.read_bytes())
    old = type(stored)(budget=stored.budget, seed=stored.seed)
    old.add(dataclasses.replace(item, label=("neg", "pos").index(item.label)) for item in stored.items())
    data = old.to_bytes()
    path.write_bytes(data)
    manifest = json.loads((root / "registry.json").read_text())
    record = next(r for r in manifest["tasks"][task]["versions"] if r["version"] == version)
    record["files"][name] = hashlib.sha256(data).hexdigest()
    (root / "registry.json").write_text(json.dumps(manifest))


def test_positions_stored_by_earlier_releases_read_as_label_names(tmp_path, sentiment_registry):
    """A buffer and held-out sample holding label positions (the old rule) are read by position,
    not by value, and an update on them trains."""
    import shutil

    from cmtl import Registry, UpdateConfig
    from tests.conftest import FAST, toy_sentiment

    root = tmp_path / "reg"
    shutil.copytree(sentiment_registry, root)
    names = Registry.open(root, device="cpu").holdout("sentiment").labels
    _store_with_positions(root, "sentiment", 1, "replay.parquet")
    _store_with_positions(root, "sentiment", 1, "holdout.parquet")
    reg = Registry.open(root, device="cpu")
    assert reg.holdout("sentiment").labels == names
    result = reg.update_task("sentiment", toy_sentiment(32, 5), validation=toy_sentiment(16, 6), training=FAST,
                             config=UpdateConfig(replay_ratio=1.0))
    assert result.version.version == 2


@pytest.mark.parametrize("source", SOURCES)
def test_regression_targets_are_the_same_numbers_from_every_source(tmp_path, source):
    """A CSV/TSV kept regression targets as strings ('0.137'): the class-balanced replay buffer then made each
    distinct value its own class and kept the first rows it saw instead of a sample of the stream."""
    from cmtl.continual.replay import REGRESSION_CLASS, ReplayItem

    rows = [{"text": t, "label": v} for t, v in zip(TEXTS, [0.137, 2, -1.5, 3])]
    examples = read_examples(_write(rows, source, tmp_path), TaskSpec("x", problem_type="regression"))
    assert examples.labels == [0.137, 2.0, -1.5, 3.0] and all(type(v) is float for v in examples.labels)
    assert {ReplayItem(t, v, "x").label_class() for t, v in zip(examples.texts, examples.labels)} == {REGRESSION_CLASS}


def test_regression_targets_that_are_not_numbers_are_refused(tmp_path):
    rows = [{"text": "a", "label": 0.5}, {"text": "b", "label": "high"}]
    with pytest.raises(DataError, match=r"Regression targets of task 'x' must be numbers.*'high'.*row 1"):
        read_examples(_write(rows, "csv", tmp_path), TaskSpec("x", problem_type="regression"))


@pytest.mark.parametrize("sep, suffix", [(",", "csv"), ("\t", "tsv")])
@pytest.mark.parametrize(
    "written, spec_kwargs",
    [
        (["1.1", "1.10", "1.2", "1.10"], {"labels": ["1.1", "1.10", "1.2"]}),  # section codes: equal as numbers
        (["1.0", "2.0", "3.0", "1.0"], {"labels": ["1.0", "2.0", "3.0"], "label_encoding": "index"}),
        (["2.50", "2.5", "2.50", "2.5"], {"labels": ["2.5", "2.50"]}),
    ],
)
def test_a_text_file_naming_its_labels_as_written_keeps_those_names(tmp_path, sep, suffix, written, spec_kwargs):
    """Float-looking label names written as they are in a CSV/TSV were read as numbers: '1.10' became the
    value 1.1 and was taken for the label '1.1', and with label_encoding='index' '1.0' became the position 1
    ('2.0'), silently."""
    path = tmp_path / f"data.{suffix}"
    path.write_text("text" + sep + "label\n" + "".join(f"{t}{sep}{v}\n" for t, v in zip(TEXTS, written)))
    assert read_examples(path, TaskSpec("x", **spec_kwargs)).labels == written
