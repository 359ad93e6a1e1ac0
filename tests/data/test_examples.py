"""cmtl.data.examples: reading user data into Examples, and the Examples helpers."""

from __future__ import annotations

import pytest

from cmtl import DataError, TaskSpec
from cmtl.data import Examples, as_texts, read_examples


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


def test_pairs_and_unlabelled_reading():
    spec = TaskSpec("nli", labels=["no", "yes"], text_pair_column="hypothesis")
    rows = [{"text": "a cat", "hypothesis": "an animal", "label": "yes"}, {"text": "a car", "hypothesis": "a fish"}]
    unlabelled = read_examples(rows, spec, labelled=False)
    assert (unlabelled.texts, unlabelled.pairs, unlabelled.labels) == (["a cat", "a car"], ["an animal", "a fish"],
                                                                       None)
    with pytest.raises(DataError, match=r"Column 'label' has missing labels at rows \[1\]"):
        read_examples(rows, spec)


def test_examples_in_are_checked_like_any_other_source():
    spec = TaskSpec("t", labels=["a", "b"])
    index = TaskSpec("i", labels=["a", "b"], label_encoding="index")
    assert read_examples(Examples(["x", "y"], None, [0, "b"]), index).labels == ["a", "b"]  # the spec's label rule
    with pytest.raises(DataError, match="Integer labels in the data of task 't'"):
        read_examples(Examples(["x"], None, [0]), spec)
    with pytest.raises(DataError, match="is empty"):
        read_examples(Examples([]), spec)
    with pytest.raises(DataError, match="carry no labels"):
        read_examples(Examples(["x"]), spec)
    with pytest.raises(DataError, match="does not take text pairs"):
        read_examples(Examples(["x"], ["y"], ["a"]), spec)


def test_examples_whose_pairs_or_labels_do_not_match_the_texts_are_refused():
    """Examples with a label more than texts (a text dropped, its label kept) trained silently: the held-out split
    selects rows by text index, so every label after the dropped text went to the text after its own."""
    spec = TaskSpec("t", labels=["a", "b"])
    with pytest.raises(DataError, match=r"2 texts but 3 labels"):
        read_examples(Examples(["x", "y"], None, ["a", "b", "a"]), spec)
    with pytest.raises(DataError, match=r"3 texts but 2 labels"):
        read_examples(Examples(["x", "y", "z"], None, ["a", "b"]), spec)
    pairs = TaskSpec("p", labels=["a", "b"], text_pair_column="h")
    with pytest.raises(DataError, match=r"2 texts but 1 text pairs"):
        read_examples(Examples(["x", "y"], ["p"], ["a", "b"]), pairs, labelled=False)


def test_select_concat_and_fingerprint():
    ex = Examples(["a", "b", "c"], ["p", "q", "r"], ["x", "y", "x"])
    assert ex.select([2, 0]) == Examples(["c", "a"], ["r", "p"], ["x", "x"])
    assert Examples.concat([ex.select([0]), Examples([]), ex.select([1, 2])]) == ex  # empty parts are skipped
    assert Examples.concat([]) == Examples([])
    assert Examples.concat([ex, Examples(["d"])]).pairs is None  # all or none carry pairs
    assert ex.fingerprint() == Examples(list(ex.texts), list(ex.pairs), list(ex.labels)).fingerprint()
    assert ex.fingerprint() != ex.select([1, 0, 2]).fingerprint()  # row order counts
    assert ex.fingerprint() != Examples(ex.texts, ex.pairs, ["x", "y", "y"]).fingerprint()


def test_as_texts():
    assert as_texts("one") == ["one"] and as_texts(("a", "b")) == ["a", "b"]
    with pytest.raises(DataError, match="No texts given"):
        as_texts([])
    with pytest.raises(DataError, match=r"Column 'texts' must hold strings; rows \[1\] hold \['int'\]"):
        as_texts(["ok", 3])


def test_a_table_is_refused_as_texts_not_read_as_its_column_names():
    """Iterating a DataFrame (or a dict) gives its column names: ``predict(task, df)`` answered for the strings
    'text' and 'label' instead of the rows."""
    import pandas as pd

    df = pd.DataFrame({"text": ["good", "bad", "fine"], "label": ["pos", "neg", "pos"]})
    for table in (df, df[["text"]], {"text": ["good", "bad"]}):
        with pytest.raises(DataError, match=r"got a (DataFrame|dict).*pass its text column, e.g. data\['text'\]"):
            as_texts(table)
    assert as_texts(df["text"]) == ["good", "bad", "fine"]  # a column is a sequence of texts


def test_a_tsv_file_is_read_without_quoting(tmp_path):
    """TSV corpora (GLUE's among them) do not quote: a text opening with a quotation mark was read as a quoted field
    that swallowed the rows after it (6 rows came back as 3, one text holding four rows and the last label)."""
    rows = [('"awful" he said, and left', "neg"), ("nasty acting", "neg"), ("the plot was lovely", "pos"),
            ('a "superb" story', "pos"), ("really nasty acting", "neg"), ('quite superb story, lovely"', "pos")]
    path = tmp_path / "data.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    examples = read_examples(path, TaskSpec("s", labels=["neg", "pos"]))
    assert list(zip(examples.texts, examples.labels)) == rows
