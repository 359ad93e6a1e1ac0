"""Registry.update_task(labels=...): a task gains labels in a new version; old ones are kept."""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
import sys
import textwrap

import pytest

from cmtl import DataError, InvalidParameterError, ManifestError, Registry, TaskSpec, TrainConfig, UpdateConfig
from cmtl.continual.updates import grown_spec
from cmtl.registry.store import MANIFEST
from cmtl.serving import InferenceEngine
from tests.conftest import FILLER, toy_sentiment

MIXED = ["okay", "average", "mediocre", "middling", "passable", "so-so"]
GROWN = ["neg", "pos", "mixed"]
TRAINING = TrainConfig(epochs=8, batch_size=16, learning_rate=1e-2, progress=False, patience=None)


def mixed(n: int, seed: int = 0) -> list[dict]:
    """Rows of the new label: a lukewarm word among the filler words."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.sample(FILLER, 5) + [rng.choice(MIXED)]), "label": "mixed"} for _ in range(n)]


@pytest.fixture
def reg(tmp_path, sentiment_registry):
    shutil.copytree(sentiment_registry, tmp_path / "reg")
    return Registry.open(tmp_path / "reg", device="cpu")


def grow(reg, replay_ratio: float = 2.0, promote: bool | None = True, training: TrainConfig = TRAINING):
    # Two old labels, one new: two replayed rows per new one give each label as many training rows.
    return reg.update_task("sentiment", mixed(48), validation=mixed(16, 1) + toy_sentiment(16, 2), labels=GROWN,
                           training=training, config=UpdateConfig(replay_ratio=replay_ratio), promote=promote)


def old_accuracy(reg, version: int) -> float:
    """Accuracy on rows of the old labels, the new version choosing among all of its labels."""
    return reg.evaluate("sentiment", toy_sentiment(32, 1), version=version)["accuracy"]


def test_grown_version_appends_labels_and_keeps_the_old_ones(reg):
    texts = [r["text"] for r in toy_sentiment(8, 3)]
    before = reg.predict_proba("sentiment", texts)
    result = grow(reg)
    info = result.version
    assert info.labels == ("neg", "pos", "mixed") and reg.versions("sentiment")[0].labels == ("neg", "pos")
    assert reg.spec("sentiment").labels == ("neg", "pos", "mixed")
    assert reg.spec("sentiment", version=1).labels == ("neg", "pos")
    # Old label strings and column order stay: the new label is the last column.
    proba = reg.predict_proba("sentiment", texts)
    assert proba.shape == (8, 3)
    assert reg.predict_proba("sentiment", texts, version=1).shape == (8, 2)
    assert (reg.predict_proba("sentiment", texts, version=1) == before).all()
    assert set(reg.predict("sentiment", texts + [r["text"] for r in mixed(8, 4)])) <= set(GROWN)
    both = reg.evaluate("sentiment", mixed(16, 5) + toy_sentiment(16, 6))["accuracy"]
    assert both >= 0.6, both  # chance: 1/3; the tiny random backbone separates these words only so far
    # The head grew one row; the parent's rows were its starting point.
    assert reg.head_state("sentiment")["linear.weight"].shape[0] == 3
    assert info.metrics["new_accuracy"] > info.metrics["parent_new_accuracy"]


def test_replay_protects_the_old_labels_and_its_absence_loses_them(reg):
    # Scored once, at the end: the kept state is the last one, so what protects the old labels is replay
    # alone (otherwise early stopping on the lineage's held-out rows also keeps an earlier state).
    last = dataclasses.replace(TRAINING, eval_every=10_000)
    protected = grow(reg, replay_ratio=2.0, promote=False, training=last).version.version
    unprotected = grow(reg, replay_ratio=0.0, promote=False, training=last).version.version
    with_replay, without = old_accuracy(reg, protected), old_accuracy(reg, unprotected)
    assert with_replay >= 0.8, with_replay
    assert without <= 0.6, without  # trained on the new label alone, the head forgets the old ones
    assert with_replay >= without + 0.3


def test_rollback_across_a_label_change_in_a_new_process(reg):
    grow(reg)
    reg.rollback("sentiment", 1)
    code = textwrap.dedent(f"""
        from cmtl import Registry
        reg = Registry.open({str(reg.root)!r}, device="cpu")
        assert reg.spec("sentiment").labels == ("neg", "pos"), reg.spec("sentiment")
        assert reg.predict_proba("sentiment", ["a lovely film"]).shape == (1, 2)
        assert set(reg.predict("sentiment", ["a lovely film", "an okay film"])) <= {{"neg", "pos"}}
        reg.rollback("sentiment", 2)
        again = Registry.open({str(reg.root)!r}, device="cpu")
        assert again.spec("sentiment").labels == ("neg", "pos", "mixed")
        assert again.predict_proba("sentiment", ["an okay film"]).shape == (1, 3)
        print("ok")
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout


@pytest.mark.parametrize(("labels", "error", "match"), [
    (["neg", "mixed"], InvalidParameterError, r"must keep every label.*\['pos'\] are missing"),
    (["neg", "pos", "mixed", "mixed"], InvalidParameterError, "duplicate"),
    ("neg,pos,mixed", InvalidParameterError, "list of label names"),
    (["neg", "pos", "mixed", "great"], DataError, r"New labels \['great'\].*no training rows"),
])
def test_bad_labels_are_refused_and_write_nothing(reg, labels, error, match):
    manifest = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(error, match=match):
        reg.update_task("sentiment", mixed(16), labels=labels, training=TRAINING)
    assert (reg.root / MANIFEST).read_bytes() == manifest
    assert not (reg.root / "tasks" / "sentiment" / "v2").exists()


def test_labels_of_unknown_rows_are_still_refused_without_labels(reg):
    with pytest.raises(DataError, match="mixed"):
        reg.update_task("sentiment", mixed(16), training=TRAINING)


def test_regression_has_no_labels_to_grow():
    with pytest.raises(InvalidParameterError, match="regression"):
        grown_spec(TaskSpec("score", problem_type="regression"), ["a"])
    spec = TaskSpec("t", labels=["a", "b"])
    assert grown_spec(spec, None) is spec and grown_spec(spec, ["b", "a"]) is spec
    assert grown_spec(spec, ["c", "b", "a"]).labels == ("a", "b", "c")  # old positions kept, new appended
    # A generator was spent by the type check, then read as empty: "labels ['a', 'b'] are missing".
    assert grown_spec(spec, (x for x in ["a", "b", "c"])).labels == ("a", "b", "c")


def test_a_manifest_whose_version_drops_a_label_is_refused(reg):
    import json

    grow(reg)
    path = reg.root / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["tasks"]["sentiment"]["versions"][1]["labels"] = ["neg", "mixed"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"must start with the labels of its parent v1, \['neg', 'pos'\]"):
        Registry.open(reg.root, device="cpu")


def test_merging_versions_with_different_labels_is_refused(reg):
    grow(reg)
    with pytest.raises(ValueError, match="different labels"):
        reg.merge([("sentiment", 1), ("sentiment", 2)], "both")


def test_engine_serves_the_grown_labels_after_a_hot_swap(reg):
    engine = InferenceEngine(reg.root, device="cpu")
    assert set(engine.predict(["sentiment"], ["an okay film"])[0]["probabilities"]) == {"neg", "pos"}
    grow(reg)
    assert engine.refresh() is True
    row = engine.predict(["sentiment"], ["the film was okay"])[0]
    assert list(row["probabilities"]) == GROWN and row["version"] == 2
    assert row["probabilities"] == pytest.approx(dict(zip(GROWN, reg.predict_proba(
        "sentiment", ["the film was okay"])[0].tolist())), abs=1e-5)


def test_an_index_encoded_task_refuses_its_labels_in_another_order():
    # Integer labels are positions in the grown labels, which keep the current ones first: labels given in another
    # order would make each integer of the user's data mean another label than in their list, silently.
    spec = TaskSpec("t", labels=["neg", "pos"], label_encoding="index")
    with pytest.raises(InvalidParameterError, match=r"positions.*\['neg', 'pos', 'mixed'\]"):
        grown_spec(spec, ["pos", "neg", "mixed"])
    with pytest.raises(InvalidParameterError, match="positions"):
        grown_spec(spec, ["neg", "mixed", "pos"])
    assert grown_spec(spec, ["neg", "pos", "mixed"]).labels == ("neg", "pos", "mixed")
    assert grown_spec(spec, ["neg", "pos"]) is spec


@pytest.mark.parametrize("labels", [["neg", "pos", "Pos"], ["neg", "pos", "neg "], ["neg", "pos", "Mixed", "mixed"],
                                    ["neg", "pos", "ｐｏｓ"]])
def test_a_new_label_that_differs_from_another_only_in_case_or_spaces_is_refused(labels):
    # 'Pos' beside 'pos' would be a class of its own: the rows of one class split between two outputs.
    with pytest.raises(InvalidParameterError, match="only in spaces, case or Unicode form"):
        grown_spec(TaskSpec("t", labels=["neg", "pos"]), labels)
