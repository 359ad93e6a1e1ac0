"""The inference engine: mixed-task batches equal one-task-at-a-time predictions, merged entries
are served, and a registry change is picked up without disturbing the old snapshot."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cmtl import Registry
from cmtl.errors import DataError, TaskNotFoundError
from cmtl.serving.engine import InferenceEngine
from tests.conftest import FAST, TOPICS, toy_sentiment

TEXTS = ["the movie was great", "a goal and the day", "an awful plot", "song and band tonight", "it was superb",
         "the film was really quite dreadful and the acting was poor and the story nasty"]


def test_mixed_batches_equal_one_task_at_a_time(served):
    engine = InferenceEngine(served, device="cpu", max_batch_size=4)
    reg = Registry.open(served, device="cpu")
    tasks = ["sentiment", "topic", "upper", "topic", "sentiment", "upper"] * 2
    texts = TEXTS + TEXTS[::-1]
    mixed = engine.logits(tasks, texts)
    for task in {"sentiment", "topic", "upper"}:
        rows = [i for i, t in enumerate(tasks) if t == task]
        alone = reg.predict_proba(task, [texts[i] for i in rows])
        got = torch.stack([mixed[i] for i in rows]).softmax(-1).numpy()
        np.testing.assert_allclose(got, alone, atol=1e-5)
    predictions = engine.predict(tasks, texts)
    assert [p["label"] for p, t in zip(predictions, tasks) if t == "topic"] == \
        reg.predict("topic", [x for x, t in zip(texts, tasks) if t == "topic"])
    assert set(predictions[1]["probabilities"]) == set(TOPICS)


def test_merged_entries_are_served_like_tasks(served):
    engine = InferenceEngine(served, device="cpu")
    reg = Registry.open(served, device="cpu")
    assert engine.snapshot.merges == {"both": ["sentiment", "topic"]}
    mixed = engine.logits(["sentiment", "sentiment", "topic"], TEXTS[:3], merges=["both", None, "both"])
    np.testing.assert_allclose(mixed[0].softmax(-1).numpy(), reg.predict_proba("sentiment", TEXTS[:1], merge="both")[0],
                               atol=1e-5)
    np.testing.assert_allclose(mixed[2].softmax(-1).numpy(), reg.predict_proba("topic", TEXTS[2:3], merge="both")[0],
                               atol=1e-5)
    np.testing.assert_allclose(mixed[1].softmax(-1).numpy(), reg.predict_proba("sentiment", TEXTS[1:2])[0], atol=1e-5)


def test_predict_all_gives_every_task(served):
    engine = InferenceEngine(served, device="cpu")
    out = engine.predict_all(TEXTS[:2])
    assert list(out) == ["sentiment", "topic", "upper"] and all(len(v) == 2 for v in out.values())
    assert out["topic"][1]["label"] == engine.predict(["topic"], TEXTS[1:2])[0]["label"]


def test_a_row_without_an_answer_is_refused_naming_its_position(served):
    """NaN outputs were served as the first label with NaN probabilities; now the request fails and says which
    text (its place in the request, also in predict_all's flat batch)."""
    from cmtl import NonFiniteOutputError

    engine = InferenceEngine(served, device="cpu")
    with torch.no_grad():
        for route in engine.snapshot.routes.values():
            if route.task == "topic" and route.merge is None:
                for p in route.head.parameters():
                    p.fill_(float("nan"))
    assert engine.predict(["sentiment"], TEXTS[:1])[0]["label"] in ("neg", "pos")
    with pytest.raises(NonFiniteOutputError, match=r"row 1 of these inputs of task 'topic'"):
        engine.predict(["sentiment", "topic"], TEXTS[:2])
    with pytest.raises(NonFiniteOutputError, match=r"row 0 of these inputs of task 'topic'"):
        engine.predict_all(TEXTS[:2])


def test_bad_requests_raise_before_running(served):
    engine = InferenceEngine(served, device="cpu")
    with pytest.raises(TaskNotFoundError, match=r"No task 'nope'.*\['sentiment', 'topic', 'upper'\]"):
        engine.predict(["sentiment", "nope"], ["a", "b"])
    with pytest.raises(TaskNotFoundError, match="No merged entry 'gone'"):
        engine.predict(["sentiment"], ["a"], merges=["gone"])
    with pytest.raises(TaskNotFoundError, match="No task 'upper' in merge 'both'"):
        engine.predict(["upper"], ["a"], merges=["both"])
    with pytest.raises(DataError, match="one per row"):
        engine.predict(["sentiment"], ["a", "b"])
    with pytest.raises(DataError, match="string"):
        engine.predict(["sentiment"], [3])
    assert engine.predict([], []) == []


def test_refresh_picks_up_a_new_version_and_keeps_the_old_snapshot(served, tmp_path):
    root = tmp_path / "reg"
    shutil.copytree(served, root)
    engine = InferenceEngine(root, device="cpu")
    old = engine.snapshot
    before = engine.logits(["sentiment"], TEXTS[:1])[0]
    assert engine.refresh() is False
    reg = Registry.open(root, device="cpu")
    reg.update_task("sentiment", toy_sentiment(32, 5, positive=["grand"], negative=["bleak"]),
                    validation=toy_sentiment(16, 6, positive=["grand"], negative=["bleak"]), training=FAST,
                    promote=True)
    assert engine.refresh() is True and engine.snapshot is not old
    assert engine.snapshot.route("sentiment").version == 2
    after = engine.logits(["sentiment"], TEXTS[:1])[0]
    np.testing.assert_allclose(after.softmax(-1).numpy(), reg.predict_proba("sentiment", TEXTS[:1])[0], atol=1e-5)
    assert not torch.allclose(before, after)
    assert old.route("sentiment").version == 1  # a batch holding the old snapshot still sees v1
    reg.remove_task("upper")
    engine.refresh()
    with pytest.raises(TaskNotFoundError):
        engine.predict(["upper"], ["x"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_batches_on_cuda_equal_the_registry_on_the_cpu(served):
    # Each batch's largest rank was read by indexing the snapshot's CPU ranks with the batch's slots, which
    # live on the backbone's device: on CUDA every request would fail. No GPU here; run where one is lent.
    engine = InferenceEngine(served, device="cuda", max_batch_size=4)
    reg = Registry.open(served, device="cpu")
    tasks = ["sentiment", "topic", "upper"] * 2
    mixed = engine.logits(tasks, TEXTS)
    for task in set(tasks):
        rows = [i for i, t in enumerate(tasks) if t == task]
        got = torch.stack([mixed[i] for i in rows]).softmax(-1).numpy()
        np.testing.assert_allclose(got, reg.predict_proba(task, [TEXTS[i] for i in rows]), atol=1e-4)
