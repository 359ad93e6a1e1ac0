"""Registry read paths under hostile conditions: inference mode, removed merge members, swapped
files with rewritten checksums, and names that look like internal keys."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

from cmtl import (
    AdapterConfig,
    BackboneConfig,
    CorruptFileError,
    InvalidParameterError,
    Registry,
    RegistryError,
    TaskNotFoundError,
    TaskSpec,
    TrainConfig,
)
from cmtl.registry import commit as registry_commit
from cmtl.registry.store import MANIFEST, sha256_bytes
from tests.conftest import toy_sentiment, toy_topics

#: No probe candidate: a 3-step run may not beat it, and a kept probe leaves the adapter at zero, which would
#: make the merges below no different from their members' bare heads.
QUICK = TrainConfig(max_steps=3, batch_size=8, progress=False, probe_init=False)
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
    from cmtl.serving.engine import InferenceEngine

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


def test_version_and_merge_together_are_refused_by_spec_as_by_predict(root):
    """``spec(task, version=1, merge=m)`` answered with the merge's spec and ignored the version, while
    ``predict`` with both raised: the labels a caller read could belong to another answerer than asked."""
    reg = open_reg(root)
    for call in (lambda: reg.spec("a", version=1, merge="both"),
                 lambda: reg.predict("a", TEXTS, version=1, merge="both"),
                 lambda: reg.adapter_state("a", 1, merge="both")):
        with pytest.raises(InvalidParameterError, match="version= or merge=, not both"):
            call()


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
    from cmtl.serving.engine import InferenceEngine

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
    # Damage x__merged's files: from here on only the adapter and head this object has loaded can answer
    # for it (a loaded key is not read again while the manifest names the same files).
    for name in ("adapter.safetensors", "head.safetensors"):
        path = root / "tasks" / "x__merged" / "v1" / name
        path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorruptFileError):
        open_reg(root).predict("x__merged", TEXTS)  # a reader that has to read them
    torch.testing.assert_close(torch.tensor(reg.predict_proba("x__merged", TEXTS)), torch.tensor(expected))
    reg.remove_merge("x")  # unloads merge x's keys ('x__merged', 'x__merged:a', ...) by exact key only
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


# --- round 2: what a long-lived object has loaded follows the files the manifest names ----------


def assert_answers_like_a_fresh_open(reg, root, task, merge=None) -> None:
    expected = open_reg(root).predict_proba(task, TEXTS, merge=merge)
    torch.testing.assert_close(torch.tensor(reg.predict_proba(task, TEXTS, merge=merge)), torch.tensor(expected))


def readd_a(root) -> None:
    """Another writer removes task 'a' and adds it again (its versions restart at 1) with other weights
    and the opposite label order."""
    writer = open_reg(root)
    writer.remove_task("a")
    writer.add_task(TaskSpec("a", labels=["pos", "neg"]), toy_sentiment(24, 7), training=QUICK)


def test_reader_serves_a_task_removed_and_added_again_after_reload(root):
    reader = open_reg(root)
    old = reader.predict_proba("a", TEXTS)  # loads a v1
    readd_a(root)
    assert reader.reload() and reader.current("a").version == 1
    assert reader.spec("a").labels == ("pos", "neg")
    assert not torch.allclose(torch.tensor(open_reg(root).predict_proba("a", TEXTS)), torch.tensor(old))
    assert_answers_like_a_fresh_open(reader, root, "a")
    assert reader.embed(TEXTS, task="a").shape == (3, 32)


def test_a_write_that_rereads_the_manifest_also_unloads_what_changed(root):
    reader = open_reg(root)
    reader.predict_proba("a", TEXTS)
    readd_a(root)
    reader.add_task(TaskSpec("d", labels=["neg", "pos"]), toy_sentiment(16, 8), training=QUICK)  # re-reads
    assert_answers_like_a_fresh_open(reader, root, "a")
    # An update of the re-added task starts from the new v1, not the old one still in memory.
    reader.update_task("a", toy_sentiment(16, 9), training=QUICK, promote=True)
    assert_answers_like_a_fresh_open(reader, root, "a")


def test_reader_serves_a_merge_removed_and_made_again_under_the_same_name(root):
    from cmtl import MergeConfig

    reader = open_reg(root)
    old = reader.predict_proba("a", TEXTS, merge="both")  # loads the merge's adapter and heads
    writer = open_reg(root)
    writer.remove_merge("both")
    writer.merge(["b", "c"], "both", config=MergeConfig(method="linear", scale=2.0))
    assert reader.reload()
    assert not torch.allclose(torch.tensor(open_reg(root).predict_proba("b", TEXTS, merge="both")),
                              torch.tensor(reader.predict_proba("b", TEXTS)))  # a meaningful change
    assert_answers_like_a_fresh_open(reader, root, "b", merge="both")
    assert_answers_like_a_fresh_open(reader, root, "c", merge="both")
    with pytest.raises(TaskNotFoundError, match="a"):
        reader.predict("a", TEXTS, merge="both")
    assert old.shape == (3, 2)


def test_a_merge_made_again_is_reloaded_after_a_write_by_the_reader(root):
    from cmtl import MergeConfig

    reader = open_reg(root)
    reader.predict_proba("a", TEXTS, merge="both")
    writer = open_reg(root)
    writer.remove_merge("both")
    writer.merge(["a", "b"], "both", config=MergeConfig(method="linear", scale=3.0))
    reader.rollback("c", 1)  # any write re-reads the manifest
    assert_answers_like_a_fresh_open(reader, root, "a", merge="both")
    assert_answers_like_a_fresh_open(reader, root, "b", merge="both")


# --- round 2: reload() sees any change of the manifest, and refuses another backbone -------------


def recreate(root, backbone, generation) -> None:
    """Delete the registry and create another at the same path, whose manifest reaches ``generation``."""
    shutil.rmtree(root)
    reg = Registry.create(root, BackboneConfig(name_or_path=backbone, max_length=64), device="cpu")
    reg.add_task(TaskSpec("a", labels=["pos", "neg"]), toy_sentiment(24, 7), training=QUICK)
    edit_manifest(root, lambda m: m.__setitem__("generation", generation))


def test_reload_sees_a_registry_made_again_at_the_same_generation(root, tiny_backbone):
    reader = open_reg(root)
    reader.predict_proba("a", TEXTS)
    recreate(root, tiny_backbone, json.loads((root / MANIFEST).read_text())["generation"])
    assert reader.reload()
    assert reader.tasks() == ["a"] and reader.merges() == []
    assert_answers_like_a_fresh_open(reader, root, "a")
    assert not reader.reload()


def test_reload_refuses_a_registry_made_again_on_another_backbone(root, other_tiny_backbone):
    from cmtl import BackboneMismatchError

    reader = open_reg(root)
    expected = reader.predict_proba("a", TEXTS)
    recreate(root, other_tiny_backbone, json.loads((root / MANIFEST).read_text())["generation"] + 5)
    with pytest.raises(BackboneMismatchError, match=r"(?s)registry .*reg.*weights hash.*Registry.open"):
        reader.reload()
    # Nothing of the other registry was taken in: the object still answers from what it had.
    torch.testing.assert_close(torch.tensor(reader.predict_proba("a", TEXTS)), torch.tensor(expected))


# --- round 2: a write never lands in a task or merge member that changed while it trained --------


def test_update_racing_a_remove_and_add_writes_nothing(root, monkeypatch):
    a = open_reg(root)
    write = registry_commit.write_version

    def other_writer_meanwhile(*args, **kwargs):  # process B, while A trains (timing simulated)
        monkeypatch.setattr(registry_commit, "write_version", write)  # B itself writes as usual
        readd_a(root)
        return write(*args, **kwargs)

    monkeypatch.setattr(registry_commit, "write_version", other_writer_meanwhile)
    with pytest.raises(RegistryError, match=r"Task 'a' was removed and added again by another writer while this "
                                            r"update ran: its v1.*now holds other files. Nothing was written. Reopen"):
        a.update_task("a", toy_sentiment(16, 9), training=QUICK, promote=True)
    fresh = open_reg(root)
    assert [v.version for v in fresh.versions("a")] == [1] and fresh.spec("a").labels == ("pos", "neg")
    assert sorted(p.name for p in (root / "tasks" / "a").iterdir()) == ["v1"]


def test_update_still_commits_when_another_writer_only_rolled_back(root, monkeypatch):
    a = open_reg(root)
    a.update_task("a", toy_sentiment(16, 4), training=QUICK, promote=True)
    write = registry_commit.write_version

    def other_writer_meanwhile(*args, **kwargs):
        monkeypatch.setattr(registry_commit, "write_version", write)
        open_reg(root).rollback("a", 1)
        return write(*args, **kwargs)

    monkeypatch.setattr(registry_commit, "write_version", other_writer_meanwhile)
    result = a.update_task("a", toy_sentiment(16, 5), training=QUICK, promote=True)
    fresh = open_reg(root)
    assert [v.version for v in fresh.versions("a")] == [1, 2, 3]
    # v3 grew from v2, which the rollback moved away from: it is stored, not made current over the rollback
    # (before, it silently undid it). The result and the record say so.
    assert fresh.current("a").version == 1 and a.current("a").version == 1
    assert not result.promoted and "moved from v2 to v1 while this update ran" in result.reason
    assert not fresh.versions("a")[2].promoted and "rollback('a', 3)" in fresh.versions("a")[2].note


def test_merge_racing_a_member_remove_and_add_writes_nothing(root, monkeypatch):
    reg = open_reg(root)
    write = registry_commit.write_entry

    def other_writer_meanwhile(*args, **kwargs):
        monkeypatch.setattr(registry_commit, "write_entry", write)
        readd_a(root)
        return write(*args, **kwargs)

    monkeypatch.setattr(registry_commit, "write_entry", other_writer_meanwhile)
    with pytest.raises(RegistryError, match=r"Task 'a' was removed and added again by another writer while this "
                                            r"merge ran: its v1.*Nothing was written"):
        reg.merge(["a", "b"], "again", method="linear")
    assert open_reg(root).merges() == ["both"] and not (root / "merges" / "again").exists()


# --- an answer and its labels come from one version ----------------------------------------------

@pytest.mark.parametrize("call", ["predict", "evaluate"])
def test_a_rollback_racing_a_call_cannot_name_one_versions_outputs_with_anothers_labels(root, monkeypatch, call):
    """predict (and evaluate) read the task's labels, then ran its head: a rollback by another thread in between
    named version 2's outputs with version 3's labels. v2 and v3 both grew a third label from v1 ('mixed' and
    'great'), so the wrong name is a valid label and nothing failed."""
    reg = open_reg(root)
    tagged = lambda label, seed: [{"text": f"{row['text']} {label}", "label": label}  # noqa: E731
                                  for row in toy_sentiment(16, seed)]
    reg.update_task("a", tagged("mixed", 4), labels=["neg", "pos", "mixed"], training=QUICK, promote=True)
    reg.rollback("a", 1)
    reg.update_task("a", tagged("great", 5), labels=["neg", "pos", "great"], training=QUICK, promote=True)
    assert reg.current("a").version == 3 and reg.current("a").parent == 1

    # Whatever the heads learned, each version answers with one column on top: v2 'mixed', v3 'neg'.
    top = {2: 2, 3: 0}
    real_predict, real_spec = reg._runtime.predict, reg.spec

    def predict(registry, task, encoded, version, merge):
        logits = real_predict(registry, task, encoded, version, merge)
        return torch.nn.functional.one_hot(torch.full((len(logits),), top[registry._version(task, version)]),
                                           logits.shape[1]).float() * 10

    labels_read, rolled_back = threading.Event(), threading.Event()

    def spec(*args, **kwargs):
        answer = real_spec(*args, **kwargs)
        labels_read.set()
        rolled_back.wait(2)  # the rollback gets this long to slip in
        return answer

    monkeypatch.setattr(reg._runtime, "predict", predict)
    monkeypatch.setattr(reg, "spec", spec)
    other = threading.Thread(target=lambda: labels_read.wait(10) and (reg.rollback("a", 2), rolled_back.set()))
    other.start()
    texts = ["a great film", "an awful film"]
    # The call began with v3 current, so v3 answers it whole; the rollback waits for it.
    if call == "predict":
        assert reg.predict("a", texts) == ["neg", "neg"]  # not ['great', 'great']: v2's top column, v3's name
    else:  # the rows' label 'great' is v3's third column, v2's 'mixed'
        assert reg.evaluate("a", [{"text": t, "label": "great"} for t in texts])["accuracy"] == 0.0
    other.join(10)
    assert reg.current("a").version == 2



# --- a failed manifest write changes nothing; a rollback needs its version's files ---------------


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("operation", ["rollback", "remove_task", "remove_merge"])
def test_a_write_that_fails_leaves_the_object_as_it_was(root, monkeypatch, operation):
    """rollback, remove_task and remove_merge changed the object's own manifest before writing it: when the
    write failed, the object served a version that was not current on disk, or forgot a task still there."""
    from cmtl.registry import store

    reg = open_reg(root)
    reg.update_task("a", toy_sentiment(16, 4), training=QUICK, promote=True)
    expected = reg.predict_proba("a", TEXTS)
    monkeypatch.setattr(store, "write_bytes_atomic", no_space)
    with pytest.raises(OSError, match="No space left"):
        {"rollback": lambda: reg.rollback("a", 1), "remove_task": lambda: reg.remove_task("a"),
         "remove_merge": lambda: reg.remove_merge("both")}[operation]()
    monkeypatch.undo()
    assert reg.current("a").version == 2 and reg.tasks() == ["a", "b", "c"] and reg.merges() == ["both"]
    torch.testing.assert_close(reg.predict_proba("a", TEXTS), expected)
    assert reg.predict("a", TEXTS, merge="both")[0] in ("neg", "pos")
    assert open_reg(root).current("a").version == 2
    reg.rollback("a", 1)  # and the next write goes through
    assert open_reg(root).current("a").version == 1


@pytest.mark.parametrize("damage", ["deleted", "changed"])
def test_a_rollback_to_a_version_whose_files_are_gone_is_refused(root, damage):
    """Before, the rollback succeeded and every later predict failed."""
    from cmtl.registry import lineage

    reg = open_reg(root)
    reg.update_task("a", toy_sentiment(16, 4), training=QUICK, promote=True)
    if damage == "deleted":
        shutil.rmtree(root / "tasks" / "a" / "v1")
    else:
        (root / "tasks" / "a" / "v1" / "head.safetensors").write_bytes(b"not a head")
    before = (root / MANIFEST).read_text()
    for rollback in (lambda: reg.rollback("a", 1), lambda: lineage.rollback(root, "a", 1)):  # API and CLI
        with pytest.raises(CorruptFileError, match=r"Task 'a' v1 cannot be made current.*Nothing was written"):
            rollback()
    assert (root / MANIFEST).read_text() == before and reg.current("a").version == 2
    assert reg.predict("a", TEXTS)[0] in ("neg", "pos")


def test_an_old_merge_keeps_its_labels_when_its_task_is_removed_and_added_again(root):
    """A merge written before merges recorded their members' specs answers with the task's current spec.
    Removing the task and adding it again with the labels in the other order flipped every answer through
    the merge, silently; removing it now records, in such merges, the spec they answered with."""
    edit_manifest(root, lambda m: m["merges"]["both"].pop("specs", None))  # as an older cmtl wrote it
    reg = open_reg(root)
    before = reg.predict_proba("b", TEXTS, merge="both")
    reg.remove_task("b")
    reg.add_task(TaskSpec("b", labels=["pos", "neg"]), toy_sentiment(24, 2), training=QUICK)
    for reader in (reg, open_reg(root)):
        assert reader.spec("b").labels == ("pos", "neg")
        torch.testing.assert_close(reader.predict_proba("b", TEXTS, merge="both"), before)
        assert reader.predict("b", TEXTS, merge="both") == [("neg", "pos")[i] for i in before.argmax(1).tolist()]


def test_an_old_merge_answers_with_its_members_labels_after_an_update_adds_one(root):
    """A merge written before merges recorded their members' specs took the labels of the task's current version:
    once an update added a label, it named three labels for its two-column head (a fresh open called the merged
    heads file damaged). It answers with the labels of the version it merged."""
    edit_manifest(root, lambda m: m["merges"]["both"].pop("specs", None))  # as an older cmtl wrote it
    reg = open_reg(root)
    before = reg.predict_proba("a", TEXTS, merge="both")
    grown = toy_sentiment(16, 5) + [{"text": "the plot was mid", "label": "mid"}] * 4
    reg.update_task("a", grown, grown[-8:], training=QUICK, promote=True, labels=["neg", "pos", "mid"])
    assert reg.spec("a").labels == ("neg", "pos", "mid")
    for reader in (reg, open_reg(root)):
        assert reader.spec("a", merge="both").labels == ("neg", "pos")
        torch.testing.assert_close(reader.predict_proba("a", TEXTS, merge="both"), before)
    from cmtl.serving.engine import InferenceEngine  # the server answers the same (it failed to start before)

    served = InferenceEngine(root, device="cpu").logits(["a"] * 3, TEXTS, merges=["both"] * 3)
    torch.testing.assert_close(torch.stack(served).softmax(-1).numpy(), before, atol=1e-5, rtol=0)


def test_one_loaded_backbone_serves_one_registry(tmp_path, tiny_backbone):
    """Each registry puts its adapters into its backbone's encoder: a second registry on the same loaded
    backbone overwrote the first one's adapters of the same name, and the first then answered with them."""
    import gc

    from cmtl import InvalidParameterError
    from cmtl.core.backbone import load_backbone

    loaded = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    first = Registry.create(tmp_path / "first", loaded)
    with pytest.raises(InvalidParameterError, match=r"already serves the registry .*first.*load_backbone"):
        Registry.create(tmp_path / "second", loaded)
    assert not (tmp_path / "second").exists()
    del first
    gc.collect()
    Registry.create(tmp_path / "second", loaded)  # once the first registry object is gone, it may be reused


def test_a_task_started_from_a_source_replaced_meanwhile_writes_nothing(root):
    """add_task(init=SOURCE) on an object that loaded the source before another writer removed it and added
    it again: it trained from the old adapter, and its lineage would name the new files. Before, it committed."""
    reg = open_reg(root)
    reg.predict_proba("a", TEXTS)  # a v1 loaded (cached) by this object
    readd_a(root)
    with pytest.raises(RegistryError, match=r"Task 'a' was removed and added again by another writer while this "
                                            r"add_task ran: its v1.*Nothing was written"):
        reg.add_task(TaskSpec("from-a", labels=["neg", "pos"]), toy_sentiment(16, 9), training=QUICK, init="a")
    assert "from-a" not in open_reg(root).tasks() and not (root / "tasks" / "from-a").exists()


def test_a_task_started_from_a_merge_made_again_meanwhile_writes_nothing(root):
    """add_task(init="merge:both") on an object that loaded the merge before another writer removed it and made
    another under its name: it trained from the old merged adapter, and its lineage would name the new entry."""
    reg = open_reg(root)
    reg.predict_proba("a", TEXTS, merge="both")  # the merge loaded (cached) by this object
    writer = open_reg(root)
    writer.remove_merge("both")
    writer.merge(["a", "c"], "both", method="linear")
    with pytest.raises(RegistryError, match=r"Merge 'both' was removed and made again by another writer while this "
                                            r"add_task ran.*Nothing was written"):
        reg.add_task(TaskSpec("from-m", labels=["neg", "pos"]), toy_sentiment(16, 9), training=QUICK,
                     init="merge:both")
    writer.remove_merge("both")
    with pytest.raises(TaskNotFoundError, match=r"Merge 'both' was removed by another writer while this add_task"):
        reg.add_task(TaskSpec("from-m", labels=["neg", "pos"]), toy_sentiment(16, 9), training=QUICK,
                     init="merge:both")
    assert "from-m" not in open_reg(root).tasks() and not (root / "tasks" / "from-m").exists()


# --- the tokenizer is part of the backbone a registry was built on ----------------------------------


def uncased_copy(tiny_backbone, path) -> str:
    """A copy of the tiny backbone whose tokenizer keeps case: the same weights, other token ids."""
    shutil.copytree(tiny_backbone, path)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))
    return str(path)


def test_a_backbone_with_the_same_weights_but_another_tokenizer_is_refused(root, tiny_backbone, tmp_path):
    from cmtl import BackboneMismatchError
    from cmtl.serving.engine import InferenceEngine

    # A copy of the folder it was built on (the tokenizer included) opens and answers the same.
    same = shutil.copytree(tiny_backbone, tmp_path / "moved")
    expected = open_reg(root).predict_proba("a", ["A GREAT Film"])
    torch.testing.assert_close(torch.tensor(Registry.open(root, str(same), device="cpu").predict_proba(
        "a", ["A GREAT Film"])), torch.tensor(expected))
    # The same weights with a tokenizer that keeps case give other token ids: the adapters would answer wrongly.
    other = uncased_copy(tiny_backbone, tmp_path / "cased")
    with pytest.raises(BackboneMismatchError, match="tokenizer"):
        Registry.open(root, other, device="cpu")
    with pytest.raises(BackboneMismatchError, match="tokenizer"):
        InferenceEngine(root, device="cpu", backbone=BackboneConfig(name_or_path=other, max_length=64))


def test_a_registry_that_recorded_no_tokenizer_hash_still_opens(root):
    edit_manifest(root, lambda m: m["backbone"].pop("tokenizer_sha256", None))  # as an older cmtl wrote it
    assert open_reg(root).predict("a", TEXTS)
