"""Bad data files and bad texts give a DataError that names the problem and the fix, never a raw
UnicodeDecodeError, EmptyDataError, KeyError or TypeError."""

from __future__ import annotations

import csv
import re

import pytest

from cmtl import DataError, TaskSpec
from cmtl.data import as_texts, read_examples, read_file

SPEC = TaskSpec("x", labels=["a", "b"])


# --- file encodings -----------------------------------------------------------------


def test_latin1_csv_names_file_offset_and_fix(tmp_path):
    path = tmp_path / "latin.csv"
    head = b"text,label\nplain,a\n"
    path.write_bytes(head + "café au lait,b\n".encode("latin-1"))
    offset = len(head) + len(b"caf")
    with pytest.raises(DataError, match=rf"latin\.csv.*not valid UTF-8.*byte {offset}.*encoding='latin-1'.*--encoding"):
        read_examples(path, SPEC)
    assert read_examples(path, SPEC, encoding="latin-1").texts == ["plain", "café au lait"]
    assert read_file(path, encoding="latin-1")["text"].tolist() == ["plain", "café au lait"]


def test_latin1_offset_past_pandas_first_chunk(tmp_path):
    path = tmp_path / "late.tsv"
    head = b"text\tlabel\n" + b"plain row\ta\n" * 20_000  # past pandas' first read
    path.write_bytes(head + "naïve\tb\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"byte {len(head) + 2}\b"):
        read_file(path)


def test_latin1_jsonl_is_a_data_error(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "café", "label": "a"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.jsonl.*not valid UTF-8.*byte 13"):
        read_examples(path, SPEC)
    assert read_examples(path, SPEC, encoding="latin-1").texts == ["café"]


def test_unknown_encoding_and_encoding_for_parquet_are_refused(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\nx,a\n")
    with pytest.raises(DataError, match="Unknown encoding 'klingon'"):
        read_file(csv, encoding="klingon")
    import pandas as pd

    pd.DataFrame({"text": ["x"], "label": ["a"]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(DataError, match="Parquet stores text as UTF-8"):
        read_file(tmp_path / "d.parquet", encoding="latin-1")


@pytest.mark.parametrize("codec", ["rot13", "hex", "base64", "zlib"])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_codec_that_is_not_a_text_encoding_is_refused(tmp_path, codec, suffix):
    import pandas as pd

    path = tmp_path / f"d{suffix}"
    frame = pd.DataFrame({"text": ["x"], "label": ["a"]})
    frame.to_parquet(path) if suffix == ".parquet" else path.write_text("text,label\nx,a\n" if suffix == ".csv"
                                                                         else '{"text": "x", "label": "a"}\n')
    with pytest.raises(DataError, match=rf"{codec!r} is not a text encoding.*'utf-8', 'latin-1'"):
        read_examples(path, SPEC, encoding=codec)


def test_read_file_takes_a_string_path(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nx,a\n")
    assert read_file(str(tmp_path / "d.csv"))["label"].tolist() == ["a"]


@pytest.mark.parametrize("suffix, body", [
    (".csv", "text,label\nx,a\n"), (".tsv", "text\tlabel\nx\ta\n"),
    (".jsonl", '{"text": "x", "label": "a"}\n'), (".json", '[{"text": "x", "label": "a"}]'),
])
@pytest.mark.parametrize("encoding", [None, "utf-8"])
def test_a_utf8_byte_order_mark_is_read_from_every_text_format(tmp_path, suffix, body, encoding):
    """Windows tools write one; CSV/TSV read it, but JSON lines and JSON failed with 'Expected object or value'."""
    path = tmp_path / f"d{suffix}"
    path.write_text(body, encoding="utf-8-sig")
    examples = read_examples(path, SPEC, encoding=encoding)
    assert (examples.texts, examples.labels) == (["x"], ["a"])


# --- empty files and missing columns ---------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_zero_byte_file_names_the_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=rf"empty{suffix}.*is empty"):
        read_examples(path, SPEC)


@pytest.mark.parametrize("header, kwargs, field", [
    ("text,category", {}, "label_column"),
    ("text,label", {"text_column": "body"}, "text_column"),
])
def test_missing_column_names_it_the_columns_and_the_fix(tmp_path, header, kwargs, field):
    path = tmp_path / "d.csv"
    path.write_text(f"{header}\nhello,a\n")
    spec = TaskSpec("x", labels=["a", "b"], **kwargs)
    missing = getattr(spec, field)
    present = re.escape(str(header.split(",")))
    with pytest.raises(DataError, match=rf"Column\(s\) \['{missing}'\] not found.*Columns present: {present}"
                                        rf".*TaskSpec\(\.\.\., {field}=\.\.\.\)"):
        read_examples(path, spec)


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_rows_with_a_field_more_than_the_header_are_refused(tmp_path, suffix, sep):
    """pandas takes the first field of such rows as the row index: texts with an unquoted comma (a tab) in every
    row lost their first part, silently ('Dear John, thanks' was read as ' thanks')."""
    path = tmp_path / f"d{suffix}"
    path.write_text(f"text{sep}label\nDear John{sep} thanks{sep}a\nHi Mary{sep} no way{sep}b\n")
    with pytest.raises(DataError, match=rf"d{suffix}.*have 3 fields but its header has 2 column names"):
        read_examples(path, SPEC)
    indexed = tmp_path / f"indexed{suffix}"  # an index column with an empty name in the header is a column
    indexed.write_text(f"{sep}text{sep}label\n0{sep}hello{sep}a\n")
    assert read_examples(indexed, SPEC).texts == ["hello"]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_a_row_with_fewer_fields_than_the_header_is_refused(tmp_path, suffix, sep):
    """pandas fills a missing last field with an empty string: a row that lost its text trained as an empty text,
    silently. An empty field that is there (``a,``) stays an empty value, and blank lines are skipped, as before."""
    path = tmp_path / f"d{suffix}"
    path.write_text(f"label{sep}text\na{sep}fine\n\nb\na{sep}also fine\n")
    with pytest.raises(DataError, match=rf"d{suffix}.*line 4 has 1 field but its header has 2 column names "
                                        rf"\['label', 'text'\]"):
        read_examples(path, SPEC)
    quoted = tmp_path / f"quoted{suffix}"  # a quoted line break is one field (CSV), so the row is whole
    quoted.write_text(f'label{sep}text\na{sep}"two\nlines"\nb{sep}\n' if suffix == ".csv" else
                      f"label{sep}text\na{sep}one\nb{sep}\n")
    examples = read_examples(quoted, SPEC, labelled=True)
    assert examples.texts == (["two\nlines", ""] if suffix == ".csv" else ["one", ""])
    long = tmp_path / f"long{suffix}"  # longer than the csv module's default field limit (128 KiB)
    long.write_text(f"label{sep}text\na{sep}{'word ' * 40_000}\n")
    assert len(read_examples(long, SPEC).texts[0]) == 200_000
    assert csv.field_size_limit() == 131072  # the check put the module's limit back


# --- texts that are not valid Unicode ---------------------------------------------------


def test_lone_surrogate_in_texts_names_the_row():
    with pytest.raises(DataError, match=r"row 1 .*not valid Unicode.*lone surrogate"):
        as_texts(["fine", "bad \ud800 text"])
    with pytest.raises(DataError, match=r"row 0 .*not valid Unicode"):
        as_texts("\udfff")
    rows = [{"text": "a", "label": "a"}, {"text": "b", "label": "a"}, {"text": "\ud83d", "label": "b"}]
    with pytest.raises(DataError, match=r"Column 'text'.*row 2 .*not valid Unicode"):
        read_examples(rows, SPEC)


def test_lone_surrogate_through_the_registry_is_a_data_error(sentiment_registry):
    from cmtl import Registry

    reg = Registry.open(sentiment_registry, device="cpu")
    for call in (lambda: reg.predict("sentiment", ["ok", "\ud800"]),
                 lambda: reg.predict_proba("sentiment", "\ud800"),
                 lambda: reg.embed(["\ud800"]),
                 lambda: reg.evaluate("sentiment", [{"text": "\ud800", "label": "pos"}])):
        with pytest.raises(DataError, match="not valid Unicode"):
            call()
