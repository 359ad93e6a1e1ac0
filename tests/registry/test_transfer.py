"""Forward transfer: add_task(init=...) starts a new task's adapter from a task's or a merge's, or picks
one by probe loss ("auto"); the source is recorded, and a bad init is refused before anything is written."""

from __future__ import annotations

import pytest
import torch

from cmtl import AdapterConfig, InvalidParameterError, Registry, TaskNotFoundError, TaskSpec, TrainConfig
from cmtl.registry.store import MANIFEST
from cmtl.training.transfer import parse_init, pick_source
from tests.conftest import FAST, TOPICS, toy_sentiment, toy_topics

#: One step at a learning rate that cannot move anything measurably: the adapter as it starts.
STILL = TrainConfig(max_steps=1, learning_rate=1e-12, weight_decay=0.0, probe_init=False, progress=False)
TEXTS = ["a great film", "an awful meal", "the music was loud"]


@pytest.fixture
def reg(tmp_path, tiny_config) -> Registry:
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(64), toy_sentiment(16, 1), training=FAST)
    return reg


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-8, rtol=0)


def test_init_from_a_task_starts_from_its_adapter_and_is_recorded(reg):
    info = reg.add_task(TaskSpec("other", labels=["neg", "pos"]), toy_sentiment(32, 2), toy_sentiment(8, 3),
                        training=STILL, init="sentiment")
    assert info.init == {"task": "sentiment", "version": 1, "chosen": "named"}
    assert info.adapter == reg.current("sentiment").adapter  # the source's rank, modules and layers
    assert_same_adapter(reg.adapter_state("other"), reg.adapter_state("sentiment"))
    torch.testing.assert_close(reg.embed(TEXTS, "other"), reg.embed(TEXTS, "sentiment"), atol=1e-6, rtol=0)
    # The lineage survives a new process.
    assert Registry.open(reg.root, device="cpu").current("other").init == info.init


def test_init_from_a_merge_starts_from_the_merged_adapter(reg):
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(15, 1), training=FAST)
    reg.merge(["sentiment", "topic"], "both", "linear")
    info = reg.add_task(TaskSpec("new", labels=TOPICS), toy_topics(30, 2), toy_topics(9, 3), training=STILL,
                        init="merge:both")
    assert info.init == {"merge": "both", "chosen": "named"}
    assert_same_adapter(reg.adapter_state("new"), reg.adapter_state("topic", merge="both"))


def test_fresh_start_is_the_default_and_differs_from_a_copy(reg):
    info = reg.add_task(TaskSpec("fresh", labels=["neg", "pos"]), toy_sentiment(32, 2), training=STILL)
    assert info.init is None
    assert all(v.abs().max() < 1e-9 for k, v in reg.adapter_state("fresh").items() if "lora_B" in k)  # B starts at 0


def test_auto_picks_the_lowest_probe_loss_and_records_every_candidate(reg):
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(15, 1), training=FAST)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                        training=STILL, init="auto")
    losses = info.init["probe_losses"]
    assert info.init["chosen"] == "auto" and set(losses) == {"backbone", "task:sentiment@1", "task:topic@1"}
    best = min(losses, key=losses.get)
    if best == "backbone":
        assert "task" not in info.init
    else:
        assert f"task:{info.init['task']}@{info.init['version']}" == best
        assert_same_adapter(reg.adapter_state("again"), reg.adapter_state(info.init["task"]))


def test_auto_without_candidates_starts_fresh(tmp_path, tiny_config):
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    info = reg.add_task(TaskSpec("first", labels=["neg", "pos"]), toy_sentiment(32), training=STILL, init="auto")
    assert info.init == {"chosen": "auto", "probe_losses": {"backbone": pytest.approx(info.init["probe_losses"]
                                                                                        ["backbone"])}}


def test_pick_source_needs_a_strictly_lower_loss_than_the_backbone():
    assert pick_source({None: 0.5, "a": 0.4, "b": 0.45}) == "a"
    assert pick_source({None: 0.5, "a": 0.5}) is None
    assert pick_source({None: 0.5}) is None


@pytest.mark.parametrize("init", ["", "merge:", "task:", "other:spam", "task:spam@0", "task:spam@x", 3, ["spam"]])
def test_malformed_init_is_refused(init):
    with pytest.raises(InvalidParameterError, match="init"):
        parse_init(init)


@pytest.mark.parametrize("init, error, match", [
    ("nope", TaskNotFoundError, "nope"),
    ("task:sentiment@7", TaskNotFoundError, "7"),
    ("merge:nope", TaskNotFoundError, "nope"),
    ("merge:", InvalidParameterError, "init"),
])
def test_bad_init_writes_nothing(reg, init, error, match):
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(error, match=match):
        reg.add_task(TaskSpec("new", labels=["neg", "pos"]), toy_sentiment(16), training=STILL, init=init)
    assert (reg.root / MANIFEST).read_bytes() == before
    assert not (reg.root / "tasks" / "new").exists() and "new" not in reg.tasks()


def test_init_whose_adapter_differs_from_adapter_is_refused(reg):
    source = AdapterConfig.from_dict(reg.current("sentiment").adapter)
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(InvalidParameterError, match=r"r=2 where the source has 8.*adapter=None"):
        reg.add_task(TaskSpec("new", labels=["neg", "pos"]), toy_sentiment(16), training=STILL, init="sentiment",
                     adapter=AdapterConfig(r=2))
    assert (reg.root / MANIFEST).read_bytes() == before and "new" not in reg.tasks()
    # Repeating the source's settings is fine.
    info = reg.add_task(TaskSpec("new", labels=["neg", "pos"]), toy_sentiment(16), training=STILL,
                        init="sentiment", adapter=source)
    assert info.init["task"] == "sentiment"


def test_a_copied_adapter_keeps_the_requested_dropout_not_the_sources(reg):
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(15, 1), training=FAST)
    reg.merge(["sentiment", "topic"], "both", "linear")  # merged adapters are stored with dropout 0
    assert reg.merge_info("both")["adapter"]["dropout"] == 0.0
    info = reg.add_task(TaskSpec("new", labels=TOPICS), toy_topics(30, 2), training=STILL, init="merge:both")
    assert info.adapter["dropout"] == AdapterConfig().dropout
    assert info.adapter["r"] == reg.merge_info("both")["adapter"]["r"]


def test_auto_skips_a_candidate_it_cannot_load_and_says_why(reg):
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(15, 1), training=FAST)
    (reg.root / "tasks" / "topic" / "v1" / "adapter.safetensors").write_bytes(b"damaged")
    fresh = Registry.open(reg.root, device="cpu")  # nothing loaded yet
    info = fresh.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                          training=STILL, init="auto")
    assert "CorruptFileError" in info.init["skipped"]["task:topic"]
    assert set(info.init["probe_losses"]) == {"backbone", "task:sentiment@1"}
    assert fresh._runtime.bank.names == ["again__v1"]  # the probed candidates were unloaded again


def test_auto_with_too_few_rows_to_probe_starts_fresh(reg):
    info = reg.add_task(TaskSpec("one", labels=["neg", "pos"]), toy_sentiment(1), training=STILL, init="auto")
    assert info.init["chosen"] == "auto" and "task" not in info.init and "too few rows" in info.init["note"]
