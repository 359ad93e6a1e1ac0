"""Real text, real backbone: SMS spam on a 2-layer cut of the embedded all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest

from cmtl import BackboneConfig, Registry, TaskSpec, TrainConfig
from cmtl.corpora import corpus_info, load_corpus


@pytest.mark.slow
def test_sms_spam_on_minilm_cut(tmp_path):
    data = load_corpus("sms_spam", seed=0)
    train = data["train"].shuffle(seed=0).select(range(2000))
    reg = Registry.create(tmp_path / "reg", BackboneConfig(num_hidden_layers=2), device="cpu")
    info = reg.add_task(TaskSpec("spam", labels=corpus_info("sms_spam").labels), train=train,
                        validation=data["validation"], training=TrainConfig(epochs=2, progress=False))
    metrics = Registry.open(tmp_path / "reg", device="cpu").evaluate("spam", data["test"])
    assert metrics["n"] == len(data["test"]) == 452
    assert metrics["accuracy"] >= 0.95, metrics
    assert info.metrics["validation_accuracy"] >= 0.95
    assert reg.predict("spam", ["WINNER!! Claim your free prize now, call 09061701461",
                                "ok see you at home later"]) == ["spam", "ham"]
