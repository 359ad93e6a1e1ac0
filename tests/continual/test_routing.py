"""FeatureRouter: texts go to the task whose rows they resemble; adding rows is exact."""

from __future__ import annotations

import pytest
import torch

from cmtl.continual.routing import FeatureRouter
from cmtl.errors import DataError
from tests.continual.test_analytic import blobs


def test_routes_rows_to_the_task_they_came_from():
    x, y = blobs(60, 3, seed=7)
    test_x, test_y = blobs(30, 3, seed=8)
    router = FeatureRouter(16)
    for task in range(3):
        router.add(f"t{task}", x[y == task])
    routed = router.route(test_x)
    assert sum(r == f"t{t}" for r, t in zip(routed, test_y.tolist())) / len(routed) >= 0.95


def test_rows_added_in_parts_route_as_rows_added_at_once():
    x, y = blobs(40, 2, seed=9)
    once, parts = FeatureRouter(16), FeatureRouter(16)
    for task in range(2):
        once.add(f"t{task}", x[y == task])
        for chunk in x[y == task].split(7):
            parts.add(f"t{task}", chunk)
    torch.testing.assert_close(parts.scores(x), once.scores(x), rtol=1e-6, atol=1e-6)


def test_one_task_takes_every_row_and_no_task_is_an_error():
    router = FeatureRouter(16)
    with pytest.raises(DataError, match="no task yet"):
        router.route(torch.zeros(2, 16))
    router.add("only", torch.randn(5, 16))
    assert router.route(torch.randn(3, 16)) == ["only"] * 3
    with pytest.raises(DataError, match="No rows"):
        router.add("empty", torch.zeros(0, 16))


def test_rows_refused_for_a_new_task_leave_the_router_as_it_was():
    """The task was listed (and the head grown) before its rows were checked: after the error, a router of one
    such task sent every text to a task with no rows."""
    router = FeatureRouter(16)
    bad = torch.randn(4, 16)
    bad[2, 3] = float("nan")
    for rows, match in ((torch.randn(4, 8), r"shape \(N, 16\)"), (bad, "row 2 of the features is not finite")):
        with pytest.raises(DataError, match=match):
            router.add("a", rows)
        assert router.tasks == []
        with pytest.raises(DataError, match="no task yet"):
            router.route(torch.zeros(1, 16))
    router.add("b", torch.randn(5, 16))
    with pytest.raises(DataError):
        router.add("a", bad)
    assert router.tasks == ["b"] and router.scores(torch.zeros(2, 16)).shape == (2, 1)
