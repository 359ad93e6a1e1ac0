"""The drift test: MMD permutation test properties, DriftMonitor reports, and Registry.monitor."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from cmtl import DataError
from cmtl.monitoring.drift import DriftMonitor, MonitorConfig, mmd_test


def gaussians(n: int, shift: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    x[:, 0] += shift
    return x


def test_mmd_null_is_calibrated_and_shift_is_detected():
    p_null = [mmd_test(gaussians(40, 0, s), gaussians(40, 0, 1000 + s), permutations=200, seed=s)[1]
              for s in range(100)]
    assert 0.01 <= np.mean(np.array(p_null) < 0.05) <= 0.10  # false-alarm rate near alpha
    assert 0.4 <= np.mean(p_null) <= 0.6  # p-values roughly uniform under the null
    mmd2, p, bandwidth = mmd_test(gaussians(40, 0, 1), gaussians(40, 1.5, 2), permutations=200, seed=0)
    assert p == pytest.approx(1 / 201) and mmd2 > 0 and bandwidth > 0


def test_mmd_is_deterministic_and_symmetric_in_its_statistic():
    x, y = gaussians(30, 0, 1), gaussians(25, 0.5, 2)
    assert mmd_test(x, y, permutations=100, seed=3) == mmd_test(x, y, permutations=100, seed=3)
    assert mmd_test(x, y, permutations=100, seed=3)[0] == pytest.approx(mmd_test(y, x, permutations=100, seed=3)[0])


def test_mmd_of_a_sample_under_two_rows_is_refused_not_reported_as_drift():
    """The unbiased MMD² divides by n(n - 1): one row made it NaN, no permutation beat it, and the p-value came
    out as the smallest possible, drift."""
    x, y = gaussians(30, 0, 1), gaussians(30, 0, 2)
    for a, b, what in ((x[:1], y, "x has 1 row"), (x, y[:1], "y has 1 row"), (x[:0], y, "x has 0 row")):
        with pytest.raises(DataError, match=f"mmd_test: {what}"):
            mmd_test(a, b, permutations=100, seed=0)


def test_the_p_value_is_the_exact_fraction_not_a_float32_rounding():
    """p = (1 + k) / (P + 1) was divided in float32: 1/101 came out 0.0099009899, and p = 2/200 = alpha = 0.01 came
    out 0.0099999998 < alpha, reported as drift although drift needs p below alpha."""
    _, p, _ = mmd_test(gaussians(30, 0, 1), gaussians(30, 2.0, 2), permutations=100, seed=0)
    assert p == 1 / 101
    for seed in range(5):
        _, p, _ = mmd_test(gaussians(30, 0, seed), gaussians(30, 0, 100 + seed), permutations=199, seed=seed)
        assert p == round(p * 200) / 200


def hashed_embed(texts: list[str]) -> torch.Tensor:
    """A stand-in encoder: bag of hashed words."""
    out = torch.zeros(len(texts), 64)
    for i, t in enumerate(texts):
        for w in t.split():
            out[i, zlib.crc32(w.encode()) % 64] += 1.0
    return out


def test_drift_monitor_report_and_verdict():
    reference = [f"the film was {w}" for w in ["good", "bad", "fine", "dull"] * 10]
    proba = lambda texts: np.array([[0.9, 0.1] if "good" in t or "fine" in t else [0.2, 0.8] for t in texts])  # noqa
    monitor = DriftMonitor(hashed_embed, reference, predict_proba=proba, labels=["pos", "neg"], task="review")
    same = monitor.check(list(reversed(reference)))
    assert not same.drift and same.p_value > 0.5 and "no drift detected" in same.verdict
    news = [f"stocks fall in city {i} amid fears" for i in range(30)]
    shifted = monitor.check(news)
    assert shifted.drift and shifted.p_value < 0.01 and shifted.mmd2 > same.mmd2
    assert "DRIFT" in shifted.verdict and "cmtl update review" in shifted.verdict
    assert shifted.labels_new == {"pos": 0.0, "neg": 1.0} and shifted.label_shift == pytest.approx(0.5)
    assert shifted.confidence_shift == pytest.approx(0.8 - (0.9 + 0.8) / 2)
    assert set(shifted.to_dict()) >= {"p_value", "mmd2", "drift", "verdict", "confidence_shift"}


@pytest.mark.parametrize("labels", [["pos"], ["pos", "neg", "neutral"]])
def test_label_names_that_do_not_match_the_probability_columns_are_refused(labels):
    """zip() paired names and columns up to the shorter: one label fewer dropped a class from the report, one
    more went missing unnoticed."""
    reference = [f"the film was {w}" for w in ["good", "bad", "fine", "dull"] * 10]
    proba = lambda texts: np.array([[0.9, 0.1] for _ in texts])  # noqa: E731
    with pytest.raises(ValueError, match=rf"{len(labels)} label names for 2 probability columns"):
        DriftMonitor(hashed_embed, reference, predict_proba=proba, labels=labels)


def test_too_few_texts_are_refused():
    monitor = DriftMonitor(hashed_embed, ["a b c"] * 30)
    with pytest.raises(DataError, match="needs at least 20 incoming texts; got 19"):
        monitor.check(["x y"] * 19)
    with pytest.raises(DataError, match="needs at least 20 reference texts; got 3"):
        DriftMonitor(hashed_embed, ["a"] * 3)


def test_non_finite_embeddings_are_refused_not_reported_as_drift():
    """A NaN or inf embedding (a half-precision backbone overflowing on one text) made every MMD² NaN, no
    permutation reached it, and the report said DRIFT at the smallest p-value."""
    def embed(texts: list[str]) -> torch.Tensor:
        out = hashed_embed(texts)
        out[[i for i, t in enumerate(texts) if "overflow" in t], 0] = float("inf")
        return out

    reference = [f"the film was {w}" for w in ["good", "bad", "fine", "dull"] * 10]
    monitor = DriftMonitor(embed, reference)
    with pytest.raises(DataError, match=r"incoming text 3 \('an overflow'\).*not finite"):
        monitor.check(reference[:3] + ["an overflow"] + reference[4:30])
    with pytest.raises(DataError, match=r"reference text 0 .*not finite"):
        DriftMonitor(embed, ["overflow"] + reference)
    x = gaussians(20, 0, 1)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"row 2 of x is not finite"):
        mmd_test(x, gaussians(20, 0, 2), permutations=100, seed=0)


def test_large_samples_are_subsampled():
    monitor = DriftMonitor(hashed_embed, [f"w{i}" for i in range(300)], config=MonitorConfig(max_samples=50))
    assert len(monitor.reference) == 50 and monitor.check([f"w{i}" for i in range(500)]).n_new == 50


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0}, "alpha"), ({"permutations": 10}, "permutations"), ({"min_samples": 2}, "min_samples"),
    ({"max_samples": 10}, "max_samples"),
    # were accepted, then torch refused them in the middle of check() with a raw RuntimeError or overflow
    ({"seed": 1.5}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": True}, "seed"),
])
def test_bad_monitor_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MonitorConfig(**kwargs)


def test_registry_monitor_uses_the_kept_holdout(sentiment_registry):
    from cmtl import Registry
    from tests.conftest import toy_sentiment

    reg = Registry.open(sentiment_registry, device="cpu")
    same = reg.monitor("sentiment", [r["text"] for r in toy_sentiment(40, 9)])
    assert same.n_reference == 32 and same.task == "sentiment" and same.confidence_new is not None
    other = reg.monitor("sentiment", [f"quarterly earnings rose {i} percent in europe" for i in range(40)])
    assert other.drift and not same.drift
    with pytest.raises(DataError, match="reference texts"):
        reg.monitor("sentiment", ["x"] * 40, reference=["y"] * 4)


def test_a_monitor_of_text_pairs_sees_a_shift_in_the_second_texts():
    """A task on text pairs was monitored on its first texts alone: a shift in the second texts went unseen."""
    first = [f"the film was {w}" for w in ["good", "bad", "fine", "dull"] * 10]
    seconds = ["a review of a film"] * 40
    joined = lambda texts, pairs: hashed_embed([f"{t} || {p}" for t, p in zip(texts, pairs)])  # noqa: E731
    monitor = DriftMonitor(joined, first, reference_pairs=seconds)
    assert not monitor.check(first[::-1], pairs=seconds).drift
    assert monitor.check(first, pairs=[f"stocks fall in city {i} amid fears" for i in range(40)]).drift
    with pytest.raises(DataError, match="pass pairs"):
        monitor.check(first)
    with pytest.raises(DataError, match="40 incoming texts but 3 pairs"):
        monitor.check(first, pairs=seconds[:3])
    with pytest.raises(DataError, match="leave pairs out"):
        DriftMonitor(hashed_embed, first).check(first, pairs=seconds)


def test_registry_monitor_of_a_pair_task_uses_the_kept_pairs(tmp_path, tiny_backbone):
    from cmtl import BackboneConfig, Registry, TaskSpec
    from tests.conftest import FAST, toy_sentiment

    reg = Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    rows = [{"a": r["text"], "b": "about the movie", "label": r["label"]} for r in toy_sentiment(48)]
    held = [{"a": r["text"], "b": "about the movie", "label": r["label"]} for r in toy_sentiment(40, 1)]
    reg.add_task(TaskSpec("pair", labels=["neg", "pos"], text_column="a", text_pair_column="b"), rows, held,
                 training=FAST)
    texts = [r["a"] for r in held]
    same = reg.monitor("pair", texts, ["about the movie"] * 40)
    shifted = reg.monitor("pair", texts, [f"quarterly earnings rose {i} percent in europe" for i in range(40)])
    assert not same.drift and shifted.drift and same.confidence_new is not None
    with pytest.raises(DataError, match="takes text pairs"):
        reg.monitor("pair", texts)
    with pytest.raises(DataError, match="reference_pairs"):
        reg.monitor("pair", texts, ["x"] * 40, reference=texts)
    # reference_pairs without reference: the kept sample's pairs silently replaced them.
    with pytest.raises(DataError, match="reference_pairs were given without reference"):
        reg.monitor("pair", texts, ["about the movie"] * 40, reference_pairs=["x y"] * 40)
    given = reg.monitor("pair", texts, ["about the movie"] * 40, reference=texts, reference_pairs=["x y"] * 40)
    assert given.drift and given.n_reference == 40
