"""Analytic heads: streamed statistics equal one-shot ones, and the heads computed from them agree."""

from __future__ import annotations

import math

import pytest
import torch

from cmtl.continual.analytic import AnalyticConfig, AnalyticHead, ClassStatistics
from cmtl.errors import DataError, InvalidParameterError


def blobs(n_per_class: int, classes: int, dim: int = 16, seed: int = 0, spread: float = 1.0):
    """Gaussian blobs with well separated means: (features, targets)."""
    g = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    x = torch.cat([means[c] + spread * torch.randn(n_per_class, dim, generator=g) for c in range(classes)])
    y = torch.arange(classes).repeat_interleave(n_per_class)
    order = torch.randperm(len(y), generator=g)
    return x[order].float(), y[order]


@pytest.mark.parametrize("kind", ["slda", "ridge"])
def test_streamed_updates_equal_one_fit_on_all_rows(kind):
    x, y = blobs(40, 4)
    config = AnalyticConfig(kind=kind, projection=64)
    once = AnalyticHead(16, 4, config).update(x, y).solve(1e-2)
    streamed = AnalyticHead(16, 4, config)
    for chunk in torch.arange(len(y)).split(23):
        streamed.update(x[chunk], y[chunk])
    streamed.solve(1e-2)
    for key in ("counts", "sums", "gram"):
        torch.testing.assert_close(streamed.stats.state_dict()[key], once.stats.state_dict()[key], rtol=1e-10,
                                   atol=1e-8)
    torch.testing.assert_close(streamed(x), once(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["slda", "ridge"])
def test_classes_added_later_equal_all_classes_at_once(kind):
    """Class-incremental: classes 0-1, then 2-3 after grow(2), as if all four had been there from the start."""
    x, y = blobs(30, 4, seed=1)
    config = AnalyticConfig(kind=kind, projection=64)
    once = AnalyticHead(16, 4, config).update(x, y).solve(1e-2)
    grown = AnalyticHead(16, 2, config)
    first = y < 2
    grown.update(x[first], y[first]).solve(1e-2)
    assert grown(x[~first]).argmax(-1).lt(2).all()  # only the classes seen so far can be predicted
    grown.grow(2).update(x[~first], y[~first]).solve(1e-2)
    torch.testing.assert_close(grown(x), once(x), rtol=1e-5, atol=1e-5)
    assert (grown(x).argmax(-1) == y).float().mean() > 0.95


def test_a_class_without_rows_is_never_predicted():
    x, y = blobs(20, 3, seed=2)
    head = AnalyticHead(16, 4, AnalyticConfig(kind="slda")).update(x, y).solve()
    assert head.bias[3] == -math.inf
    assert not head(x).argmax(-1).eq(3).any()


def test_statistics_round_trip_through_their_state_dict():
    x, y = blobs(10, 3, seed=3)
    stats = ClassStatistics(16, 3).update(x, y)
    again = ClassStatistics.from_state_dict(stats.state_dict())
    x2, y2 = blobs(5, 3, seed=4)
    stats.update(x2, y2), again.update(x2, y2)
    for key, value in stats.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


def test_choose_ridge_picks_the_validation_best_lambda():
    x, y = blobs(30, 3, seed=5, spread=3.0)
    xv, yv = blobs(30, 3, seed=6, spread=3.0)
    head = AnalyticHead(16, 3, AnalyticConfig(kind="ridge", projection=128)).update(x, y)
    grid = (1e-6, 1.0, 1e3)
    chosen = head.choose_ridge(xv, yv, grid=grid)
    scores = {}
    for lam in grid:
        head.solve(lam)
        scores[lam] = (head(xv).argmax(-1) == yv).float().mean().item()
    assert scores[chosen] == max(scores.values())
    head.choose_ridge(xv, yv, grid=grid)
    assert head.ridge == chosen


def test_projection_depends_on_the_seed_alone():
    a = AnalyticHead(16, 2, AnalyticConfig(seed=3, projection=32))
    torch.manual_seed(123)
    b = AnalyticHead(16, 2, AnalyticConfig(seed=3, projection=32))
    torch.testing.assert_close(a.projection, b.projection)
    assert not torch.equal(a.projection, AnalyticHead(16, 2, AnalyticConfig(seed=4, projection=32)).projection)


def test_bad_input_is_a_clear_error():
    head = AnalyticHead(16, 2, AnalyticConfig(kind="slda"))
    with pytest.raises(DataError, match="at least one labelled row"):
        head.solve()
    with pytest.raises(DataError, match=r"Class indices must lie in 0\.\.1.*Grow"):
        head.update(torch.zeros(3, 16), torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match=r"shape \(N, 16\)"):
        head.update(torch.zeros(3, 8), torch.tensor([0, 1, 1]))
    with pytest.raises(DataError, match="2 targets for 3 rows"):
        head.update(torch.zeros(3, 16), torch.tensor([0, 1]))
    # A NaN or inf row made every statistic NaN for good: each later update added to them, nothing recovered.
    bad = torch.zeros(3, 16)
    bad[1, 4] = math.inf
    with pytest.raises(DataError, match=r"row 1 of the features is not finite"):
        head.update(bad, torch.tensor([0, 1, 1]))
    assert head.stats.rows == 0 and torch.isfinite(head.stats.gram).all()
    with pytest.raises(InvalidParameterError, match="kind"):
        AnalyticConfig(kind="lda")
    with pytest.raises(InvalidParameterError, match="projection"):
        AnalyticConfig(projection=0)
    for shrinkage in (0.0, True, 1.5):  # 0 leaves the covariance singular with fewer rows than dimensions
        with pytest.raises(InvalidParameterError, match=r"shrinkage.*\(0, 1\]"):
            AnalyticConfig(kind="slda", shrinkage=shrinkage)
    with pytest.raises(InvalidParameterError, match="grow"):
        head.grow(-1)
