"""Registry read paths under hostile conditions: inference mode, removed merge members, swapped
files with rewritten checksums, and names that look like internal keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cmtl import AdapterConfig, BackboneConfig, CorruptFileError, Registry, TaskNotFoundError, TaskSpec, TrainConfig
from cmtl.registry import _head_key
from cmtl.store import MANIFEST, sha256_bytes
from tests.conftest import toy_sentiment, toy_topics

QUICK = TrainConfig(max_steps=3, batch_size=8, progress=False)
TEXTS = ["a great film", "an awful film", "a song and the night"]


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory, tiny_backbone):
    """Tasks a (r=8), b (r=8) and c (r=4, three labels), and a merge 'both' of a and b."""
    root = tmp_path_factory.mktemp("safety") / "reg"
    reg = Registry.create(root, BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    reg.add_task(TaskSpec("a", labels=["neg", "pos"]), toy_sentiment(24), toy_sentiment(8, 1), training=QUICK)
    reg.add_task(TaskSpec("b", labels=["neg", "pos"]), toy_sentiment(24, 2), toy_sentiment(8, 3), training=QUICK)
    reg.add_task(TaskSpec("c", labels=["sport", "food", "music"]), toy_topics(24), training=QUICK,
                 adapter=AdapterConfig(r=4, alpha=8))
    reg.merge(["a", "b"], "both", method="linear")
    return root


@pytest.fixture
def root(tmp_path, three_tasks):
    shutil.copytree(three_tasks, tmp_path / "reg")
    return tmp_path / "reg"


def open_reg(root) -> Registry:
    return Registry.open(root, device="cpu")


def edit_manifest(root, change) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    change(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


# --- item 2: loading under inference mode -------------------------------------------------------


def test_embed_as_first_use_leaves_the_task_usable(root):
    reg = open_reg(root)
    expected = open_reg(root).predict_proba("a", TEXTS)
    reg.embed(["x"], task="a")  # the first call that loads a's adapter and head
    torch.testing.assert_close(torch.tensor(reg.predict_proba("a", TEXTS)), torch.tensor(expected))
    assert reg.evaluate("a", toy_sentiment(8, 1))["n"] == 8
    reg.update_task("a", toy_sentiment(16, 4), training=QUICK, promote=True)  # trains from the loaded parent
    assert reg.current("a").version == 2


def test_a_caller_in_inference_mode_does_not_break_later_calls(root):
    reg = open_reg(root)
    with torch.inference_mode():
        reg.predict("a", TEXTS)
        reg.predict("a", TEXTS, merge="both")
    assert len(reg.predict("a", TEXTS)) == 3 and len(reg.predict("b", TEXTS, merge="both")) == 3
    reg.update_task("a", toy_sentiment(16, 4), training=QUICK, promote=True)
    assert not any(p.requires_grad for p in reg.backbone.encoder.parameters())


# --- item 8: a merge answers without its members' entries ---------------------------------------


def test_merge_answers_after_a_member_task_is_removed(root):
    before = {t: open_reg(root).predict_proba(t, TEXTS, merge="both") for t in ("a", "b")}
    open_reg(root).remove_task("b")
    reg = open_reg(root)
    assert reg.tasks() == ["a", "c"] and reg.merges() == ["both"]
    for t in ("a", "b"):
        torch.testing.assert_close(torch.tensor(reg.predict_proba(t, TEXTS, merge="both")), torch.tensor(before[t]))
    assert reg.predict("b", TEXTS, merge="both")[0] in ("neg", "pos")
    assert reg.evaluate("b", toy_sentiment(8), merge="both")["n"] == 8
    assert reg.spec("b", merge="both").labels == ("neg", "pos")
    with pytest.raises(TaskNotFoundError, match="Task 'b' not found"):
        reg.predict("b", TEXTS)


def test_api_and_engine_answer_the_same_through_a_merge_after_member_removal(root):
    from cmtl.engine import InferenceEngine

    open_reg(root).remove_task("b")
    api = open_reg(root).predict_proba("b", TEXTS, merge="both")
    served = InferenceEngine(root, device="cpu").logits(["b"] * 3, TEXTS, merges=["both"] * 3)
    torch.testing.assert_close(torch.stack(served).softmax(-1), torch.tensor(api), atol=1e-5, rtol=0)


def test_merge_keeps_the_labels_it_was_made_with(root):
    reg = open_reg(root)
    reg.remove_task("b")
    reg.add_task(TaskSpec("b", labels=["sport", "food", "music"]), toy_topics(24), training=QUICK)
    again = open_reg(root)
    assert again.predict("b", TEXTS, merge="both")[0] in ("neg", "pos")  # the merged head's labels
    assert again.predict("b", TEXTS)[0] in ("sport", "food", "music")  # the new task's


def test_old_merge_record_without_specs_names_the_way_out(root):
    edit_manifest(root, lambda m: m["merges"]["both"].pop("specs", None))
    reg = open_reg(root)
    assert reg.predict("b", TEXTS, merge="both")[0] in ("neg", "pos")  # the member's entry still answers
    reg.remove_task("b")
    edit_manifest(root, lambda m: m["merges"]["both"].pop("specs", None))  # as an older cmtl would have left it
    with pytest.raises(TaskNotFoundError, match=r"Merge 'both' .* task 'b'.*remove_merge\('both'\)"):
        open_reg(root).predict("b", TEXTS, merge="both")
    assert open_reg(root).predict("a", TEXTS, merge="both")[0] in ("neg", "pos")


# --- item 13: a swapped file whose checksum was rewritten --------------------------------------


def swap(root, src, dst, record_of) -> None:
    """Copy file ``src`` over ``dst`` and rewrite ``dst``'s checksum in the manifest."""
    data = (root / src).read_bytes()
    (root / dst).write_bytes(data)
    edit_manifest(root, lambda m: record_of(m)["files"].__setitem__(dst.split("/")[-1], sha256_bytes(data)))


def version_record(task):
    return lambda m: m["tasks"][task]["versions"][0]


def test_swapped_adapter_of_another_rank_is_a_corrupt_file(root):
    swap(root, "tasks/c/v1/adapter.safetensors", "tasks/a/v1/adapter.safetensors", version_record("a"))
    reg = open_reg(root)
    with pytest.raises(CorruptFileError, match=r"tasks/a/v1/adapter.safetensors.*expected.*\(8, 32\).*found.*"
                                               r"\(4, 32\).*[Rr]oll.*back.*retrain"):
        reg.predict("a", TEXTS)
    assert reg.predict("b", TEXTS)[0] in ("neg", "pos")  # nothing half-loaded is left behind
    with pytest.raises(CorruptFileError, match="adapter.safetensors"):
        reg.predict("a", TEXTS)


def test_swapped_head_with_other_labels_is_a_corrupt_file(root):
    swap(root, "tasks/c/v1/head.safetensors", "tasks/a/v1/head.safetensors", version_record("a"))
    with pytest.raises(CorruptFileError, match=r"tasks/a/v1/head.safetensors.*labels \['neg', 'pos'\].*"
                                               r"expected shape \(2, 32\), found \(3, 32\)"):
        open_reg(root).predict("a", TEXTS)


def test_swapped_merged_adapter_is_a_corrupt_file(root):
    swap(root, "tasks/c/v1/adapter.safetensors", "merges/both/adapter.safetensors", lambda m: m["merges"]["both"])
    with pytest.raises(CorruptFileError, match=r"merges/both/adapter.safetensors.*expected.*found"):
        open_reg(root).predict("a", TEXTS, merge="both")


def test_adapter_with_foreign_tensor_names_is_a_corrupt_file(root):
    from safetensors.torch import load, save

    state = load((root / "tasks/a/v1/adapter.safetensors").read_bytes())
    renamed = {k.replace("query", "qwery"): v for k, v in state.items()}
    (root / "tasks/a/v1/adapter.safetensors").write_bytes(save(renamed))
    swap(root, "tasks/a/v1/adapter.safetensors", "tasks/a/v1/adapter.safetensors", version_record("a"))
    with pytest.raises(CorruptFileError, match=r"tasks/a/v1/adapter.safetensors.*qwery"):
        open_reg(root).predict("a", TEXTS)


@pytest.mark.parametrize("src,dst,record_of", [
    ("tasks/c/v1/adapter.safetensors", "tasks/a/v1/adapter.safetensors", version_record("a")),
    ("tasks/c/v1/head.safetensors", "tasks/a/v1/head.safetensors", version_record("a")),
    ("tasks/c/v1/adapter.safetensors", "merges/both/adapter.safetensors", lambda m: m["merges"]["both"]),
], ids=["adapter", "head", "merged-adapter"])
def test_the_engine_refuses_swapped_files_like_the_registry(root, src, dst, record_of):
    """The server's engine reads the same files: a swapped one is a CorruptFileError naming it."""
    from cmtl.engine import InferenceEngine

    swap(root, src, dst, record_of)
    with pytest.raises(CorruptFileError, match=rf"{dst}.*expected.*found"):
        InferenceEngine(root, device="cpu")


# --- item 14: task keys and merge keys never collide --------------------------------------------


def test_removing_merge_x_keeps_task_x__merged_loaded(root):
    reg = open_reg(root)
    reg.add_task(TaskSpec("x__merged", labels=["neg", "pos"]), toy_sentiment(16), training=QUICK)
    reg.merge(["a", "b"], "x", method="linear")
    expected = reg.predict_proba("x__merged", TEXTS)
    reg.predict("a", TEXTS, merge="x")
    key = _head_key("x__merged", 1)
    assert key in reg._bank and key in reg._heads
    reg.remove_merge("x")
    assert key in reg._bank and key in reg._heads, reg._bank.names
    torch.testing.assert_close(torch.tensor(reg.predict_proba("x__merged", TEXTS)), torch.tensor(expected))
    with pytest.raises(TaskNotFoundError, match="Merge 'x' not found"):
        reg.predict("a", TEXTS, merge="x")


def test_merging_a_swapped_member_file_is_refused(root):
    swap(root, "tasks/c/v1/adapter.safetensors", "tasks/b/v1/adapter.safetensors", version_record("b"))
    with pytest.raises(CorruptFileError, match=r"tasks/b/v1/adapter.safetensors.*expected shape \(8, 32\)"):
        open_reg(root).merge(["a", "b"], "again", method="linear")
    swap(root, "tasks/a/v1/adapter.safetensors", "tasks/b/v1/adapter.safetensors", version_record("b"))
    swap(root, "tasks/c/v1/head.safetensors", "tasks/b/v1/head.safetensors", version_record("b"))
    with pytest.raises(CorruptFileError, match=r"tasks/b/v1/head.safetensors.*expected shape \(2, 32\)"):
        open_reg(root).merge(["a", "b"], "again", method="linear")
    assert open_reg(root).merges() == ["both"]
