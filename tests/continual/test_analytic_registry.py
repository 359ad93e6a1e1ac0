"""A registry task whose head is analytic (add_task(head=AnalyticConfig(...))): computed from class
statistics, stored with them, updated exactly, served like any other head."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from cmtl import (AnalyticConfig, BackboneConfig, CorruptFileError, DataError, InvalidParameterError, Registry,
                  TaskSpec, UpdateConfig)
from cmtl.continual.analytic import AnalyticHead, ClassStatistics
from cmtl.registry import heads
from cmtl.registry.store import MANIFEST, read_tensors, version_dir
from cmtl.serving import InferenceEngine
from tests.conftest import FAST, toy_sentiment
from tests.continual.test_grow_labels import mixed

SMALL = AnalyticConfig(projection=64)  # a narrow projection: the statistics stay small in tests
SPEC = TaskSpec("sentiment", labels=["neg", "pos"])


@pytest.fixture
def reg(tmp_path, tiny_backbone):
    return Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_backbone), device="cpu")


def statistics(reg, task: str, version: int) -> ClassStatistics:
    record = reg._version_record(task, version)
    path = version_dir(reg.root, task, version) / heads.STATISTICS
    return ClassStatistics.from_state_dict(read_tensors(path, record["files"][heads.STATISTICS]))


def solved(reg, task: str, version: int, ridge: float = 1e-2) -> AnalyticHead:
    """The version's stored head, solved again with one λ (so two heads compare whatever λ each chose)."""
    record = reg._version_record(task, version)
    state = reg.head_state(task, version=version)
    head = AnalyticHead.restore(reg.backbone.hidden_size, heads.analytic_config(record), state,
                                read_tensors(version_dir(reg.root, task, version) / heads.STATISTICS,
                                             record["files"][heads.STATISTICS]))
    return head.solve(ridge)


@pytest.mark.parametrize("kind", ["ridge", "slda"])
def test_streamed_updates_equal_one_fit_on_all_the_data(tmp_path, tiny_backbone, kind):
    config = AnalyticConfig(kind=kind, projection=64)
    first, second, third = toy_sentiment(40, 0), toy_sentiment(40, 1), mixed(30, 2)
    val = toy_sentiment(16, 3) + mixed(8, 4)
    streamed = Registry.create(tmp_path / "streamed", BackboneConfig(name_or_path=tiny_backbone), device="cpu")
    streamed.add_task(SPEC, first, validation=toy_sentiment(16, 3), head=config)
    streamed.update_task("sentiment", second, validation=toy_sentiment(16, 3), promote=True)
    streamed.update_task("sentiment", third, validation=val, labels=["neg", "pos", "mixed"], promote=True)
    once = Registry.create(tmp_path / "once", BackboneConfig(name_or_path=tiny_backbone), device="cpu")
    once.add_task(TaskSpec("sentiment", labels=["neg", "pos", "mixed"]), first + second + third, validation=val,
                  head=config)

    a, b = statistics(streamed, "sentiment", 3), statistics(once, "sentiment", 1)
    for name, x, y in [("counts", a.counts, b.counts), ("sums", a.sums, b.sums), ("gram", a.gram, b.gram)]:
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-5 * float(y.abs().max())), name
    assert a.counts.tolist() == [40.0, 40.0, 30.0]
    # Solved with the same λ, the two heads are the same head.
    head_a, head_b = solved(streamed, "sentiment", 3), solved(once, "sentiment", 1)
    assert torch.allclose(head_a.weight, head_b.weight, rtol=1e-5, atol=1e-5 * float(head_b.weight.abs().max()))
    # The adapter never changed: the features the statistics were computed on stay valid.
    for key, value in streamed.adapter_state("sentiment", version=1).items():
        assert torch.equal(value, streamed.adapter_state("sentiment", version=3)[key])


def test_the_update_adds_exactly_its_rows_and_replays_nothing(reg):
    reg.add_task(SPEC, toy_sentiment(40, 0), validation=toy_sentiment(16, 1), head=SMALL)
    result = reg.update_task("sentiment", toy_sentiment(24, 2), validation=toy_sentiment(16, 3),
                             config=UpdateConfig(replay_ratio=5.0), promote=True)
    assert statistics(reg, "sentiment", 2).rows == 40 + 24  # the old rows counted once, from the statistics
    record = reg._version_record("sentiment", 2)
    assert record["training"]["replayed"] == 0 and record["training"]["steps"] == 0
    assert record["head"]["type"] == "analytic" and record["head"]["config"]["projection"] == 64
    assert result.version.metrics["new_accuracy"] == pytest.approx(record["metrics"]["new_accuracy"])


def test_a_grown_analytic_task_keeps_its_old_classes(reg):
    reg.add_task(SPEC, toy_sentiment(60, 0), validation=toy_sentiment(20, 1), head=SMALL)
    before = reg.evaluate("sentiment", toy_sentiment(40, 5))["accuracy"]
    result = reg.update_task("sentiment", mixed(40, 2), validation=mixed(12, 3) + toy_sentiment(12, 4),
                             labels=["neg", "pos", "mixed"])
    assert result.version.labels == ("neg", "pos", "mixed")
    old = reg.evaluate("sentiment", toy_sentiment(40, 5), version=2)["accuracy"]
    new = reg.evaluate("sentiment", mixed(20, 6), version=2)["accuracy"]
    assert before >= 0.8, before
    assert old >= before - 0.1, (before, old)  # no old row was shown again: the statistics remembered them
    assert new >= 0.8, new
    proba = reg.predict_proba("sentiment", [r["text"] for r in mixed(4, 7)], version=2)
    assert proba.shape == (4, 3) and proba.sum(1) == pytest.approx([1.0] * 4, abs=1e-5)


def test_features_from_a_trained_adapter_then_frozen(reg):
    config = AnalyticConfig(projection=64, features="adapter")
    info = reg.add_task(SPEC, toy_sentiment(48, 0), validation=toy_sentiment(16, 1), head=config, training=FAST)
    record = reg._version_record("sentiment", 1)
    assert record["training"]["steps"] > 0  # the adapter trained, with a linear head, before the statistics
    assert "validation_accuracy_linear_head" in record["metrics"]
    assert info.metrics["validation_accuracy"] == record["metrics"]["validation_accuracy"]
    assert any(float(v.abs().max()) > 0 for k, v in reg.adapter_state("sentiment").items() if "lora_B" in k)
    reg.update_task("sentiment", toy_sentiment(24, 2), validation=toy_sentiment(16, 3), promote=True)
    for key, value in reg.adapter_state("sentiment", version=1).items():
        assert torch.equal(value, reg.adapter_state("sentiment", version=2)[key])
    assert statistics(reg, "sentiment", 2).rows == 48 + 24


def test_reopened_in_a_new_process_it_answers_the_same(reg):
    reg.add_task(SPEC, toy_sentiment(40, 0), validation=toy_sentiment(16, 1), head=SMALL)
    texts = [r["text"] for r in toy_sentiment(6, 9)]
    expected = reg.predict_proba("sentiment", texts).flatten().tolist()
    code = textwrap.dedent(f"""
        import json
        from cmtl import Registry
        reg = Registry.open({str(reg.root)!r}, device="cpu")
        print(json.dumps(reg.predict_proba("sentiment", {texts!r}).flatten().tolist()))
        """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == pytest.approx(expected, abs=1e-6)


def test_engine_serves_an_analytic_task_and_its_grown_labels_after_a_hot_swap(reg):
    reg.add_task(SPEC, toy_sentiment(40, 0), validation=toy_sentiment(16, 1), head=SMALL)
    engine = InferenceEngine(reg.root, device="cpu")
    texts = ["the film was okay", "a lovely film"]
    rows = engine.predict(["sentiment", "sentiment"], texts)
    assert [list(r["probabilities"]) for r in rows] == [["neg", "pos"]] * 2
    reg.update_task("sentiment", mixed(40, 2), validation=mixed(12, 3) + toy_sentiment(12, 4),
                    labels=["neg", "pos", "mixed"], promote=True)
    assert engine.refresh() is True
    rows = engine.predict(["sentiment", "sentiment"], texts)
    for row, proba in zip(rows, reg.predict_proba("sentiment", texts)):
        assert list(row["probabilities"]) == ["neg", "pos", "mixed"] and row["version"] == 2
        assert list(row["probabilities"].values()) == pytest.approx(proba.tolist(), abs=1e-5)


def test_a_loaded_head_predicts_without_holding_statistics(reg):
    reg.add_task(SPEC, toy_sentiment(40, 0), validation=toy_sentiment(16, 1), head=SMALL)
    again = Registry.open(reg.root, device="cpu")
    again.predict("sentiment", ["a lovely film"])
    loaded = again._runtime.heads[again._runtime.task(again, "sentiment", 1)]
    assert isinstance(loaded, AnalyticHead) and loaded.stats is None  # no Gram matrix it never uses
    with pytest.raises(InvalidParameterError, match="loaded to predict only"):
        loaded.update(torch.zeros(1, reg.backbone.hidden_size), [0])


def test_an_analytic_update_that_ties_on_the_new_data_is_promoted():
    from cmtl.continual.updates import Gate

    tie = dict(metric="accuracy", higher_is_better=True, parent_new=0.9, candidate_new=0.9, parent_old=0.95,
               candidate_old=0.95, tolerance=0.01)
    assert Gate(**tie).decide()[0] is False  # a trained candidate must improve
    assert Gate(**tie, require_gain=False).decide()[0] is True  # added statistics need only not get worse
    assert Gate(**{**tie, "candidate_new": 0.89}, require_gain=False).decide()[0] is False
    assert Gate(**{**tie, "candidate_old": 0.9}, require_gain=False).decide()[0] is False


def test_statistics_that_do_not_fit_the_head_are_refused(reg):
    import hashlib

    from safetensors.torch import save

    reg.add_task(SPEC, toy_sentiment(40, 0), validation=toy_sentiment(16, 1), head=SMALL)
    wrong = save({"counts": torch.zeros(3, dtype=torch.float64), "sums": torch.zeros(3, 64, dtype=torch.float64),
                  "gram": torch.zeros(64, 64, dtype=torch.float64)})
    (version_dir(reg.root, "sentiment", 1) / heads.STATISTICS).write_bytes(wrong)
    manifest = json.loads((reg.root / MANIFEST).read_text())
    manifest["tasks"]["sentiment"]["versions"][0]["files"][heads.STATISTICS] = hashlib.sha256(wrong).hexdigest()
    (reg.root / MANIFEST).write_text(json.dumps(manifest))
    fits = r"does not fit the analytic head of task 'sentiment' \(2 labels, features 64 wide\)"
    with pytest.raises(CorruptFileError, match=fits):
        Registry.open(reg.root, device="cpu").update_task("sentiment", toy_sentiment(16, 2), promote=True)


def test_a_label_without_training_rows_is_refused_and_writes_nothing(reg):
    spec = TaskSpec("sentiment", labels=["neg", "pos", "neutral"])
    with pytest.raises(DataError, match=r"Labels \['neutral'\] of task 'sentiment' have no training rows"):
        reg.add_task(spec, toy_sentiment(24), validation=toy_sentiment(8, 1) + [{"text": "meh", "label": "neutral"}],
                     head=SMALL)
    assert reg.tasks() == [] and not (reg.root / "tasks" / "sentiment").exists()


def test_features_that_overflow_are_refused_and_write_nothing(reg, monkeypatch):
    """Non-finite pooled features (a half-precision backbone that overflows) went into the class statistics: the
    head's weights came out NaN, and the stored statistics poisoned every later exact update."""
    from cmtl.continual import analytic
    from cmtl.errors import TrainingDivergedError

    real = analytic.pooled_features

    def overflowing(backbone, data, batch_size=64):
        features = real(backbone, data, batch_size).clone()
        features[2, 0] = float("inf")
        return features

    monkeypatch.setattr(analytic, "pooled_features", overflowing)
    with pytest.raises(TrainingDivergedError, match="1 of 24 training rows have non-finite features"):
        reg.add_task(SPEC, toy_sentiment(24), validation=toy_sentiment(8, 1), head=SMALL)
    assert reg.tasks() == [] and not (reg.root / "tasks" / "sentiment").exists()


@pytest.mark.parametrize(("spec", "head", "init", "match"), [
    (TaskSpec("score", problem_type="regression"), SMALL, None, "regression: an analytic head classifies"),
    (TaskSpec("tags", labels=["a", "b"], problem_type="multi_label"), SMALL, None, "multi_label"),
    (SPEC, "analytic", None, "'head' parameter of add_task must be None .* or an AnalyticConfig"),
    (SPEC, SMALL, "task:other", "'init' parameter of add_task must be None when the analytic head reads the frozen"),
])
def test_bad_analytic_requests_are_refused_and_write_nothing(reg, spec, head, init, match):
    rows = [{"text": r["text"], "label": 0.5 if spec.problem_type == "regression" else
             (["a"] if spec.problem_type == "multi_label" else r["label"])} for r in toy_sentiment(8)]
    manifest = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(InvalidParameterError, match=match):
        reg.add_task(spec, rows, head=head, init=init)
    assert (reg.root / MANIFEST).read_bytes() == manifest
    assert not (reg.root / "tasks").exists() or not any((reg.root / "tasks").iterdir())


def test_what_an_analytic_version_cannot_do_is_refused_clearly(reg, tmp_path):
    reg.add_task(SPEC, toy_sentiment(40, 0), validation=toy_sentiment(16, 1), head=SMALL)
    reg.add_task(TaskSpec("other", labels=["neg", "pos"]), toy_sentiment(24, 2), training=FAST)
    manifest = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(InvalidParameterError, match="'penalty' parameter of UpdateConfig must be 'none'"):
        reg.update_task("sentiment", toy_sentiment(16, 3), config=UpdateConfig(penalty="ewc"))
    with pytest.raises(InvalidParameterError, match=r"'sentiment' v1 has an analytic head .* a merge"):
        reg.merge(["sentiment", "other"], "both")
    with pytest.raises(InvalidParameterError, match="analytic head .* a PEFT folder"):
        reg.export_peft("sentiment", tmp_path / "peft")
    assert (reg.root / MANIFEST).read_bytes() == manifest
    assert not (tmp_path / "peft").exists()


def test_a_head_drawn_on_another_projection_is_refused(reg):
    reg.add_task(SPEC, toy_sentiment(40, 0), validation=toy_sentiment(16, 1), head=SMALL)
    path = reg.root / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["tasks"]["sentiment"]["versions"][0]["head"]["projection_sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="random projection that this torch no longer draws from seed 0"):
        Registry.open(reg.root, device="cpu").predict("sentiment", ["a lovely film"])
