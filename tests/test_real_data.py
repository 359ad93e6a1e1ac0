"""Real text, real backbone: SMS spam on a 2-layer cut of the embedded all-MiniLM-L6-v2."""

from __future__ import annotations

import random

import pytest

from cmtl import BackboneConfig, Registry, TaskSpec, TrainConfig
from cmtl.benchmarks.corpora import corpus_info, load_corpus
from cmtl.monitoring.drift import DriftMonitor


@pytest.mark.slow
def test_sms_spam_on_minilm_cut(tmp_path):
    data = load_corpus("sms_spam", seed=0)
    train = data["train"].shuffle(seed=0).select(range(2000))
    reg = Registry.create(tmp_path / "reg", BackboneConfig(num_hidden_layers=2), device="cpu")
    info = reg.add_task(TaskSpec("spam", labels=corpus_info("sms_spam").labels), train=train,
                        validation=data["validation"], training=TrainConfig(epochs=2, progress=False))
    assert info.adapter["target_modules"] == ["attention.output.dense", "key", "query", "value"]  # the default
    metrics = Registry.open(tmp_path / "reg", device="cpu").evaluate("spam", data["test"])
    assert metrics["n"] == len(data["test"]) == 452
    assert metrics["accuracy"] >= 0.95, metrics
    assert info.metrics["validation_accuracy"] >= 0.95
    assert reg.predict("spam", ["WINNER!! Claim your free prize now, call 09061701461",
                                "ok see you at home later"]) == ["spam", "ham"]


@pytest.fixture(scope="module")
def vader():
    return {d: load_corpus(f"vader_{d}", seed=0) for d in ("movies", "tweets", "amazon", "nyt")}


@pytest.mark.slow
def test_update_movies_to_tweets_is_gated_on_real_shift(tmp_path, vader):
    """Sentiment trained on movie snippets, then updated on tweets with replay: promoted only if tweets improve
    and movies lose at most the default one point; the drift monitor sees tweets as a shift, movies not."""
    movies, tweets = vader["movies"], vader["tweets"]
    config = TrainConfig(epochs=2, progress=False)
    reg = Registry.create(tmp_path / "reg", BackboneConfig(num_hidden_layers=2), device="cpu")
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), train=movies["train"].select(range(500)),
                 validation=movies["validation"].select(range(250)), training=config)
    assert reg.monitor("sentiment", movies["test"]["text"][:100]).drift is False
    report = reg.monitor("sentiment", tweets["test"]["text"][:100])
    assert report.drift and report.p_value < 0.01 and report.mmd2 > 0, report.verdict
    assert "cmtl update sentiment" in report.verdict

    test = {d: vader[d]["test"].select(range(300)) for d in ("movies", "tweets")}
    before = {d: reg.evaluate("sentiment", test[d])["accuracy"] for d in test}
    result = reg.update_task("sentiment", tweets["train"].select(range(500)),
                             validation=tweets["validation"], training=config)
    after = {d: reg.evaluate("sentiment", test[d])["accuracy"] for d in test}
    assert result.promoted, result.reason
    assert result.gate.candidate_new > result.gate.parent_new
    assert result.gate.parent_old - result.gate.candidate_old <= 0.01
    assert after["tweets"] > before["tweets"] + 0.02, (before, after)
    assert after["movies"] >= before["movies"] - 0.02, (before, after)


@pytest.mark.slow
def test_drift_monitor_false_alarms_and_detection_on_sentiment4(tmp_path, vader):
    """At the default alpha and n = 50 incoming texts: at most 1 false alarm in 20 draws from the reference's own
    distribution (held-out test split vs validation reference), and every domain change of sentiment4 detected."""
    embed = Registry.create(tmp_path / "reg", BackboneConfig(num_hidden_layers=2), device="cpu").embed
    n, draws = 50, 20

    def sample(domain: str, seed: int) -> list[str]:
        return random.Random(seed).sample(vader[domain]["test"]["text"], n)

    movies = DriftMonitor(embed, vader["movies"]["validation"]["text"])
    alarms = [movies.check(sample("movies", s), seed=s) for s in range(draws)]
    assert sum(r.drift for r in alarms) <= 1, [round(r.p_value, 4) for r in alarms]
    chain = ["movies", "tweets", "amazon", "nyt"]
    for old, new in [("movies", d) for d in chain[1:]] + list(zip(chain[1:], chain[2:])):
        monitor = movies if old == "movies" else DriftMonitor(embed, vader[old]["validation"]["text"])
        reports = [monitor.check(sample(new, s), seed=s) for s in range(5)]
        assert all(r.drift for r in reports), (old, new, [r.p_value for r in reports])
