"""What a version keeps for later merges (features.safetensors): equal to what a merge would compute, and
a merge that uses it scores exactly what one that runs every row scores, running fewer rows."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from cmtl import MemoryConfig, Registry, TaskSpec
from cmtl.core.backbone import Backbone
from cmtl.errors import InvalidParameterError
from cmtl.merging import MergeConfig
from cmtl.registry import features, store
from tests.conftest import FAST, toy_sentiment
from tests.continual.test_updates import shifted_sentiment


PROBED = dataclasses.replace(FAST, probe_init=True)  # the probe runs the frozen backbone over the rows


@pytest.fixture(scope="module")
def probed_registry(tmp_path_factory, tiny_backbone):
    from cmtl import BackboneConfig

    root = tmp_path_factory.mktemp("kept") / "reg"
    reg = Registry.create(root, BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    reg.add_task(TaskSpec("a", labels=["neg", "pos"]), toy_sentiment(96), toy_sentiment(32, 1), training=PROBED)
    reg.add_task(TaskSpec("b", labels=["neg", "pos"]), shifted_sentiment(96), shifted_sentiment(32, 1),
                 training=PROBED)
    return root


@pytest.fixture
def reg(tmp_path, probed_registry):
    shutil.copytree(probed_registry, tmp_path / "reg")
    return Registry.open(tmp_path / "reg", device="cpu")


def kept(reg: Registry, task: str, version: int) -> dict[str, torch.Tensor]:
    return features.read(reg._read_version_file(task, version, features.FILE))


def own_logits(reg: Registry, task: str, version: int, rows) -> torch.Tensor:
    rt = reg._runtime
    key = rt.task(reg, task, version)
    return rt.trainee(key).logits(reg._encode(rows, reg.spec(task)), pad_id=reg.backbone.pad_id,
                                  device=reg.backbone.device)


def test_a_new_task_keeps_the_frozen_features_and_its_logits(reg):
    for task in ("a", "b"):
        stored_ = kept(reg, task, 1)
        assert set(stored_) == {"frozen.buffer", "frozen.holdout", "logits.lineage"}
        held, buffer = reg.holdout(task), reg.buffer(task).to_examples()
        # The probe's features, kept from training: the bare backbone's, computed here independently.
        torch.testing.assert_close(stored_["frozen.holdout"], reg.embed(held.texts), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored_["frozen.buffer"], reg.embed(buffer.texts), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored_["logits.lineage"], own_logits(reg, task, 1, held), atol=1e-5, rtol=1e-5)
        record = reg._version_record(task, 1)
        assert features.FILE in record["files"]  # checksummed like every other file of the version


def test_an_update_keeps_its_logits_on_the_whole_lineage(reg):
    result = reg.update_task("a", toy_sentiment(64, 5), toy_sentiment(24, 6), training=FAST, promote=True)
    v = result.version.version
    stored_ = kept(reg, "a", v)
    # An update starts from its parent's adapter: its features were never the frozen backbone's.
    assert set(stored_) == {"logits.lineage"}
    lineage = reg.holdout("a", v)
    assert len(stored_["logits.lineage"]) == len(lineage) > len(reg.holdout("a", v, lineage=False))
    torch.testing.assert_close(stored_["logits.lineage"], own_logits(reg, "a", v, lineage), atol=1e-5, rtol=1e-5)


class RowCounter:
    """Counts the rows that go through the backbone."""

    def __init__(self, monkeypatch):
        self.rows = 0
        embed = Backbone.embed

        def counting(backbone, *args, **kwargs):
            out = embed(backbone, *args, **kwargs)
            self.rows += len(out)
            return out

        monkeypatch.setattr(Backbone, "embed", counting)


@pytest.mark.parametrize("search", [False, True])
def test_a_merge_from_kept_features_scores_what_running_every_row_scores(reg, monkeypatch, search):
    # Task a gains a version (so its lineage mixes kept and missing frozen features), b is as trained.
    reg.update_task("a", toy_sentiment(64, 5), toy_sentiment(24, 6), training=FAST, promote=True)
    config = MergeConfig(refit_heads=True)
    counter = RowCounter(monkeypatch)
    fast = reg.merge(["a", "b"], "kept", "ties", search=search, config=config)
    fast_rows, counter.rows = counter.rows, 0
    monkeypatch.setattr(features, "read", lambda data: {})  # as a registry written before features were kept
    slow = reg.merge(["a", "b"], "run", "ties", search=search, config=config)
    for key in ("normalised", "baseline_normalised", "below_baseline"):
        assert fast[key] == pytest.approx(slow[key], abs=1e-6)
    assert fast["config"] == slow["config"]
    for t in ("a", "b"):
        for key in ("merged", "baseline", "individual"):
            assert fast["holdout"][t][key] == pytest.approx(slow["holdout"][t][key], abs=1e-6)
    for mine, theirs in zip(fast["search"], slow["search"], strict=True):
        assert mine["normalised"] == pytest.approx(theirs["normalised"], abs=1e-6)
    # Spared: task b's held-out rows twice (its own logits, the baseline) and its buffer (the baseline);
    # task a's logits on its lineage (the update kept them) and the frozen features of its first version.
    held_b, buffer_b = len(reg.holdout("b")), len(reg.buffer("b"))
    held_a1, held_a = len(reg.holdout("a", 1)), len(reg.holdout("a"))
    assert counter.rows - fast_rows >= 2 * held_b + buffer_b + held_a + held_a1 > 0


def test_memory_config_can_turn_kept_features_off(tmp_path, tiny_config):
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    reg.add_task(TaskSpec("a", labels=["neg", "pos"]), toy_sentiment(48), toy_sentiment(16, 1), training=PROBED,
                 memory=MemoryConfig(features=False))
    assert features.FILE not in reg._version_record("a", 1)["files"]
    assert not (store.version_dir(reg.root, "a", 1) / features.FILE).exists()
    with pytest.raises(InvalidParameterError, match="features"):
        MemoryConfig(features="yes")
