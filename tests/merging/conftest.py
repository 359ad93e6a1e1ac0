"""A registry with two small sentiment tasks to merge, copied fresh for each test."""

from __future__ import annotations

import shutil

import pytest

from cmtl import Registry, TaskSpec
from tests.conftest import FAST, toy_sentiment


@pytest.fixture(scope="module")
def two_task_registry(tmp_path_factory, tiny_backbone):
    from cmtl import BackboneConfig
    from tests.continual.test_updates import shifted_sentiment

    root = tmp_path_factory.mktemp("merge") / "reg"
    reg = Registry.create(root, BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    reg.add_task(TaskSpec("a", labels=["neg", "pos"]), toy_sentiment(96), toy_sentiment(32, 1), training=FAST)
    reg.add_task(TaskSpec("b", labels=["neg", "pos"]), shifted_sentiment(96), shifted_sentiment(32, 1), training=FAST)
    return root


@pytest.fixture
def merge_reg(tmp_path, two_task_registry):
    shutil.copytree(two_task_registry, tmp_path / "reg")
    return Registry.open(tmp_path / "reg", device="cpu")
