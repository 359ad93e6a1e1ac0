"""Every public verb of Registry and its bad inputs: an unknown task or merge, a version it does not
hold, a bad or taken name, empty or mislabelled data, version= with merge=. Each is refused with its
typed error, the message names what was given and what is there, and a refused write leaves the
registry as it was. (A bad input a verb once accepted was a strict xfail here until it was refused.)

The registry is ``served``: tasks sentiment, topic, upper (each at v1) and the merge 'both'.
"""

from __future__ import annotations

import shutil

import pytest

from cmtl import DataError, InvalidParameterError, Registry, TaskExistsError, TaskNotFoundError, TaskSpec, TrainConfig
from cmtl.registry.store import MANIFEST
from tests.conftest import TOPICS, toy_sentiment, toy_topics

S = toy_sentiment(8)
T = toy_topics(9)
LABELS = ["neg", "pos"]
KNOWN_TASKS = r"\['sentiment', 'topic', 'upper'\]"
STEP = TrainConfig(max_steps=1, progress=False)
MISLABELLED = [{"text": "a film", "label": "maybe"}]


@pytest.fixture(scope="module")
def reader(tmp_path_factory, served) -> Registry:
    """One registry object for the verbs that only read (a copy: nothing here may write to ``served``)."""
    root = tmp_path_factory.mktemp("verbs") / "reg"
    shutil.copytree(served, root)
    return Registry.open(root, device="cpu")


@pytest.fixture
def writer(tmp_path, served) -> Registry:
    shutil.copytree(served, tmp_path / "reg")
    return Registry.open(tmp_path / "reg", device="cpu")


def refused_and_unchanged(reg: Registry, call, error, match: str) -> None:
    """``call(reg)`` raises ``error`` matching ``match`` and writes nothing."""
    before = (reg.root / MANIFEST).read_bytes()
    files = sorted(p.relative_to(reg.root) for p in reg.root.rglob("*") if p.name != ".lock")
    with pytest.raises(error, match=match):
        call(reg)
    assert (reg.root / MANIFEST).read_bytes() == before
    assert sorted(p.relative_to(reg.root) for p in reg.root.rglob("*") if p.name != ".lock") == files


# --- an unknown task: TaskNotFoundError naming the known tasks --------------------------------------

READ_UNKNOWN = {
    "predict": lambda r: r.predict("nope", ["a film"]),
    "predict_proba": lambda r: r.predict_proba("nope", ["a film"]),
    "evaluate": lambda r: r.evaluate("nope", S),
    "embed": lambda r: r.embed(["a film"], "nope"),
    "monitor": lambda r: r.monitor("nope", ["a film"] * 30),
    "buffer": lambda r: r.buffer("nope"),
    "holdout": lambda r: r.holdout("nope"),
    "versions": lambda r: r.versions("nope"),
    "current": lambda r: r.current("nope"),
    "spec": lambda r: r.spec("nope"),
    "adapter_state": lambda r: r.adapter_state("nope"),
    "head_state": lambda r: r.head_state("nope"),
}
WRITE_UNKNOWN = {
    "update_task": lambda r: r.update_task("nope", S, training=STEP),
    "merge": lambda r: r.merge(["nope", "sentiment"], "m"),
    "train_group": lambda r: r.train_group("g", {"nope": (S, None), "sentiment": (S, None)}, training=STEP),
    "rollback": lambda r: r.rollback("nope", 1),
    "remove_task": lambda r: r.remove_task("nope"),
}


@pytest.mark.parametrize("verb", READ_UNKNOWN)
def test_an_unknown_task_is_named_with_the_known_ones(reader, verb):
    with pytest.raises(TaskNotFoundError, match=rf"'nope'.*{KNOWN_TASKS}"):
        READ_UNKNOWN[verb](reader)


@pytest.mark.parametrize("verb", WRITE_UNKNOWN)
def test_a_write_naming_an_unknown_task_is_refused_and_writes_nothing(writer, verb):
    refused_and_unchanged(writer, WRITE_UNKNOWN[verb], TaskNotFoundError, rf"'nope'.*{KNOWN_TASKS}")


def test_task_not_found_is_a_key_error_too(reader):
    with pytest.raises(KeyError):
        reader.predict("nope", ["a film"])


# --- an unknown merge: TaskNotFoundError naming the merges ------------------------------------------

UNKNOWN_MERGE = {
    "predict": lambda r: r.predict("sentiment", ["a film"], merge="nope"),
    "predict_proba": lambda r: r.predict_proba("sentiment", ["a film"], merge="nope"),
    "evaluate": lambda r: r.evaluate("sentiment", S, merge="nope"),
    "spec": lambda r: r.spec("sentiment", merge="nope"),
    "merge_info": lambda r: r.merge_info("nope"),
    "adapter_state": lambda r: r.adapter_state("sentiment", merge="nope"),
    "head_state": lambda r: r.head_state("sentiment", merge="nope"),
}


@pytest.mark.parametrize("verb", UNKNOWN_MERGE)
def test_an_unknown_merge_is_named_with_the_known_ones(reader, verb):
    with pytest.raises(TaskNotFoundError, match=r"'nope'.*\['both'\]"):
        UNKNOWN_MERGE[verb](reader)


def test_removing_an_unknown_merge_is_refused_and_writes_nothing(writer):
    refused_and_unchanged(writer, lambda r: r.remove_merge("nope"), TaskNotFoundError, r"'nope'.*\['both'\]")


@pytest.mark.parametrize("verb", ["predict", "adapter_state", "head_state"])
def test_a_task_the_merge_does_not_hold_is_named_with_the_ones_it_holds(reader, verb):
    call = {"predict": lambda: reader.predict("upper", ["a film"], merge="both"),
            "adapter_state": lambda: reader.adapter_state("upper", merge="both"),
            "head_state": lambda: reader.head_state("upper", merge="both")}[verb]
    with pytest.raises(TaskNotFoundError, match=r"'upper'.*\['sentiment', 'topic'\]"):
        call()


# --- a version the task does not have: TaskNotFoundError naming its versions -------------------------

WRONG_VERSION = {
    "predict": lambda r: r.predict("sentiment", ["a film"], version=99),
    "predict_proba": lambda r: r.predict_proba("sentiment", ["a film"], version=99),
    "evaluate": lambda r: r.evaluate("sentiment", S, version=99),
    "embed": lambda r: r.embed(["a film"], "sentiment", version=99),
    "buffer": lambda r: r.buffer("sentiment", 99),
    "holdout": lambda r: r.holdout("sentiment", 99),
    "adapter_state": lambda r: r.adapter_state("sentiment", 99),
    "head_state": lambda r: r.head_state("sentiment", 99),
    "predict, version 0": lambda r: r.predict("sentiment", ["a film"], version=0),
}


@pytest.mark.parametrize("verb", WRONG_VERSION)
def test_a_version_the_task_does_not_have_is_named_with_its_versions(reader, verb):
    with pytest.raises(TaskNotFoundError, match=r"'sentiment'.*(\b99\b|\b0\b).*\[1\]"):
        WRONG_VERSION[verb](reader)


@pytest.mark.parametrize("verb", ["merge", "rollback"])
def test_a_write_naming_a_missing_version_is_refused_and_writes_nothing(writer, verb):
    call = {"merge": lambda r: r.merge([("sentiment", 99), "topic"], "m"),
            "rollback": lambda r: r.rollback("sentiment", 99)}[verb]
    refused_and_unchanged(writer, call, TaskNotFoundError, r"'sentiment'.*99.*\[1\]")


# --- a bad or taken name ---------------------------------------------------------------------------

BAD_NAMES = ["bad name", "../up", "", "a/b"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_task_name_is_refused_by_its_spec(name):
    with pytest.raises(ValueError, match=rf"name.*{repr(name).replace('.', '[.]')}"):
        TaskSpec(name, labels=LABELS)


@pytest.mark.parametrize("verb", ["merge", "train_group"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_bad_entry_name_is_refused_and_writes_nothing(writer, verb, name):
    call = {"merge": lambda r: r.merge(["sentiment", "topic"], name),
            "train_group": lambda r: r.train_group(name, {"sentiment": (S, None), "topic": (T, None)},
                                                   training=STEP)}[verb]
    refused_and_unchanged(writer, call, ValueError, rf"name.*{repr(name).replace('.', '[.]')}")


TAKEN = {
    "add_task": (lambda r: r.add_task(TaskSpec("sentiment", labels=LABELS), S, training=STEP), TaskExistsError),
    "merge": (lambda r: r.merge(["sentiment", "topic"], "both"), ValueError),
    "train_group": (lambda r: r.train_group("both", {"sentiment": (S, None), "topic": (T, None)}, training=STEP),
                    ValueError),
}


@pytest.mark.parametrize("verb", TAKEN)
def test_a_taken_name_is_refused_and_writes_nothing(writer, verb):
    call, error = TAKEN[verb]
    refused_and_unchanged(writer, call, error, r"'(sentiment|both)'.*(exists|taken)")


# --- empty or mislabelled data: DataError ----------------------------------------------------------

EMPTY_WRITES = {
    "add_task train": lambda r: r.add_task(TaskSpec("new", labels=LABELS), [], training=STEP),
    "add_task validation": lambda r: r.add_task(TaskSpec("new", labels=LABELS), S, [], training=STEP),
    "update_task train": lambda r: r.update_task("sentiment", [], training=STEP),
    "update_task validation": lambda r: r.update_task("sentiment", S, [], training=STEP),
    "train_group": lambda r: r.train_group("g", {"sentiment": ([], None), "topic": (T, None)}, training=STEP),
}


@pytest.mark.parametrize("verb", EMPTY_WRITES)
def test_empty_training_data_is_refused_and_writes_nothing(writer, verb):
    refused_and_unchanged(writer, EMPTY_WRITES[verb], DataError, r"empty")


EMPTY_READS = {
    "predict": lambda r: r.predict("sentiment", []),
    "predict_proba": lambda r: r.predict_proba("sentiment", []),
    "evaluate": lambda r: r.evaluate("sentiment", []),
    "embed": lambda r: r.embed([]),
    "monitor": lambda r: r.monitor("sentiment", [], reference=["a film"] * 30),
}


@pytest.mark.parametrize("verb", EMPTY_READS)
def test_no_texts_or_rows_is_a_data_error(reader, verb):
    with pytest.raises(DataError, match=r"(?i)empty|no texts"):
        EMPTY_READS[verb](reader)


def test_too_few_texts_to_monitor_is_a_data_error(reader):
    with pytest.raises(DataError, match=r"at least 20 .*got 1"):
        reader.monitor("sentiment", ["a film"], reference=["a film"] * 30)


MISLABELLED_WRITES = {
    "add_task": lambda r: r.add_task(TaskSpec("new", labels=LABELS), MISLABELLED, training=STEP),
    "update_task": lambda r: r.update_task("sentiment", MISLABELLED * 10, training=STEP),
    "train_group": lambda r: r.train_group("g", {"sentiment": (MISLABELLED, None), "topic": (T, None)},
                                           training=STEP),
}


@pytest.mark.parametrize("verb", MISLABELLED_WRITES)
def test_labels_outside_the_label_set_are_refused_and_write_nothing(writer, verb):
    refused_and_unchanged(writer, MISLABELLED_WRITES[verb], DataError, r"'maybe'.*\['neg', 'pos'\]")


def test_evaluating_on_labels_outside_the_label_set_is_a_data_error(reader):
    with pytest.raises(DataError, match=r"'maybe'.*\['neg', 'pos'\]"):
        reader.evaluate("sentiment", MISLABELLED)


# --- arguments that contradict each other, too few members ------------------------------------------

VERSION_AND_MERGE = {
    "predict": lambda r: r.predict("sentiment", ["a film"], version=1, merge="both"),
    "predict_proba": lambda r: r.predict_proba("sentiment", ["a film"], version=1, merge="both"),
    "evaluate": lambda r: r.evaluate("sentiment", S, version=1, merge="both"),
    "adapter_state": lambda r: r.adapter_state("sentiment", 1, merge="both"),
    "head_state": lambda r: r.head_state("sentiment", 1, merge="both"),
}


@pytest.mark.parametrize("verb", VERSION_AND_MERGE)
def test_version_and_merge_together_are_refused(reader, verb):
    with pytest.raises(ValueError, match=r"version.*merge"):
        VERSION_AND_MERGE[verb](reader)


TOO_FEW = {
    "merge, one member": (lambda r: r.merge(["sentiment"], "m"), r"two"),
    "merge, a version twice": (lambda r: r.merge([("sentiment", 1), "sentiment"], "m"), r"twice"),
    "merge, unknown method": (lambda r: r.merge(["sentiment", "topic"], "m", "svd"), r"method.*'svd'"),
    "train_group, one task": (lambda r: r.train_group("g", {"sentiment": (S, None)}, training=STEP), r"two"),
}


@pytest.mark.parametrize("verb", TOO_FEW)
def test_merges_and_groups_need_two_distinct_members(writer, verb):
    call, match = TOO_FEW[verb]
    refused_and_unchanged(writer, call, ValueError, match)


# --- bad inputs that wrote manifests Registry.open refuses (seen failing before the fix) ---------------


@pytest.mark.parametrize("version", [True, 1.0])
def test_rollback_to_a_version_that_is_not_an_int_is_refused(writer, version):
    refused_and_unchanged(writer, lambda r: r.rollback("sentiment", version), (TaskNotFoundError, ValueError),
                          r"version")


def test_update_with_a_promote_that_is_not_a_bool_is_refused(writer):
    refused_and_unchanged(writer, lambda r: r.update_task("sentiment", S, toy_sentiment(8, 3), promote="yes",
                                                          training=STEP), (TypeError, ValueError), r"promote")


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_a_version_that_is_not_an_int_says_so(reader, version):
    with pytest.raises(InvalidParameterError, match=r"'version' parameter of task 'sentiment' must be an int.*\[1\]"):
        reader.predict("sentiment", ["a film"], version=version)


# --- bad inputs accepted today -----------------------------------------------------------------------


def test_text_pairs_for_a_task_without_pairs_are_refused(reader):
    with pytest.raises(DataError, match="pair"):
        reader.predict("sentiment", ["a film"], text_pairs=["a plot"])


def test_embed_with_a_version_but_no_task_is_refused(reader):
    with pytest.raises(ValueError, match="version"):
        reader.embed(["a film"], version=1)


def test_embed_with_batch_size_zero_names_batch_size(reader):
    with pytest.raises(ValueError, match="batch_size"):
        reader.embed(["a film"], batch_size=0)


def test_add_task_with_a_name_instead_of_a_spec_says_so(writer):
    refused_and_unchanged(writer, lambda r: r.add_task("new", S, training=STEP), (TypeError, ValueError),
                          "TaskSpec")


def test_predicting_none_is_a_data_error(reader):
    with pytest.raises(DataError):
        reader.predict("sentiment", None)


@pytest.mark.parametrize("verb", ["predict", "predict_proba", "embed"])
def test_a_table_or_a_dict_given_as_texts_is_refused(reader, verb):
    """A DataFrame (or a dict) iterates over its column names: predict(task, df) answered for the texts
    'text' and 'label', one row per column, without a word."""
    import pandas as pd

    table = pd.DataFrame({"text": ["a great film", "an awful plot", "a song"], "label": ["pos", "neg", "pos"]})
    call = {"predict": lambda t: reader.predict("sentiment", t), "predict_proba": lambda t: reader.predict_proba(
        "sentiment", t), "embed": lambda t: reader.embed(t, "sentiment")}[verb]
    for texts, kind in [(table, "DataFrame"), ({"text": ["a great film"]}, "dict")]:
        with pytest.raises(DataError, match=rf"texts must be a string or a list of strings, got a {kind}\b"):
            call(texts)
    assert len(call(table["text"])) == 3  # a column is a list of strings


def test_examples_whose_columns_differ_in_length_are_refused(reader):
    """Examples(texts, pairs, labels) was taken with columns of different lengths: a regression task's
    evaluate scored every row against the one label given (n=1, no error), the others failed inside torch."""
    from cmtl.data import Examples, read_examples

    texts = ["a great film", "an awful plot", "a song"]
    with pytest.raises(DataError, match=r"3 texts but 1 labels"):
        read_examples(Examples(texts, None, [2.5]), TaskSpec("score", problem_type="regression"))
    with pytest.raises(DataError, match=r"3 texts but 2 text pairs"):
        read_examples(Examples(texts, ["x", "y"], ["pos"] * 3), TaskSpec("pairs", labels=LABELS,
                                                                         text_pair_column="second"))
    with pytest.raises(DataError, match=r"3 texts but 4 labels"):
        reader.evaluate("sentiment", Examples(texts, None, ["pos", "neg", "pos", "neg"]))


def test_merge_members_given_as_one_string_are_named(writer):
    refused_and_unchanged(writer, lambda r: r.merge("sentiment", "m"), (TypeError, ValueError), r"'sentiment'")


def test_the_known_lists_in_these_messages_are_the_registrys(reader):
    """The tables above hard-code the served registry's contents: check them once."""
    assert reader.tasks() == ["sentiment", "topic", "upper"] and reader.merges() == ["both"]
    assert [v.version for v in reader.versions("sentiment")] == [1]
    assert reader.merge_info("both")["tasks"] == ["sentiment", "topic"] and reader.spec("topic").labels == tuple(TOPICS)


@pytest.mark.parametrize("knob", [{"eval_every": 2}, {"patience": 5}, {"ema_decay": 0.9}, {"probe_margin": 1.0}])
def test_validation_knobs_without_validation_rows_are_refused_and_write_nothing(writer, knob):
    # With no validation data and validation_fraction=0 there is nothing to evaluate on: these trained as if unset.
    training = TrainConfig(max_steps=1, progress=False, validation_fraction=0.0, **knob)
    name = next(iter(knob))
    refused_and_unchanged(writer, lambda r: r.add_task(TaskSpec("new", labels=LABELS), S, training=training),
                          InvalidParameterError, rf"'{name}' parameter of TrainConfig must keep its default when "
                          rf"the task has no validation rows.*validation_fraction=0.0, 8 training rows")


def test_training_without_validation_rows_needs_none_of_their_knobs(writer):
    info = writer.add_task(TaskSpec("new", labels=LABELS), S, training=TrainConfig(
        max_steps=1, progress=False, validation_fraction=0.0, patience=None))  # no early stopping: consistent
    assert info.version == 1
