"""Store safety: planted symlinks, traversal keys and malformed manifests never make a writer touch
anything outside the registry; crash-left temp files are cleaned; a stale writer says what happened."""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from cmtl import CorruptFileError, Registry, RegistryError, TaskNotFoundError, TaskSpec, TrainConfig
from cmtl.errors import ManifestError
from cmtl.registry.store import MANIFEST, read_manifest
from tests.conftest import toy_sentiment

STEPS = TrainConfig(max_steps=2, progress=False)


@pytest.fixture
def reg_root(tmp_path, served) -> Path:
    """A writable copy of the ``served`` registry: tasks sentiment, topic, upper and the merge 'both'."""
    shutil.copytree(served, tmp_path / "reg")
    return tmp_path / "reg"


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the registry, with subfolders named like versions and merges, that must survive."""
    root = tmp_path / "outside"
    for sub in ("v1", "v2", "v7", "keep"):
        (root / sub).mkdir(parents=True)
        (root / sub / "data.txt").write_text("precious")
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def add_second(root: Path) -> None:
    Registry.open(root, device="cpu").add_task(TaskSpec("second", labels=["neg", "pos"]), train=toy_sentiment(16),
                                               training=STEPS)


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    change(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


# --- item 4: planted symlinks ------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["merges", "tasks"])
def test_symlinked_top_folder_is_refused_and_its_target_kept(reg_root, outside, folder):
    before = snapshot(outside)
    shutil.rmtree(reg_root / folder)
    (reg_root / folder).symlink_to(outside, target_is_directory=True)

    def name_nothing_there(m):  # the manifest names nothing in the linked folder: all of it looks like leftovers
        m.pop("merges")
        if folder == "tasks":
            m["tasks"] = {}

    edit_manifest(reg_root, name_nothing_there)
    manifest = (reg_root / MANIFEST).read_bytes()
    with pytest.raises(RegistryError, match=rf"'{folder}' in the registry .* is a symbolic link to .*outside.*Replace"):
        add_second(reg_root)
    assert snapshot(outside) == before
    assert (reg_root / MANIFEST).read_bytes() == manifest


def test_symlinked_task_folder_is_refused_and_its_target_kept(reg_root, outside):
    shutil.copytree(reg_root / "tasks" / "topic" / "v1", outside / "v1", dirs_exist_ok=True)
    shutil.rmtree(reg_root / "tasks" / "topic")
    (reg_root / "tasks" / "topic").symlink_to(outside, target_is_directory=True)
    before = snapshot(outside)
    with pytest.raises(RegistryError, match=r"'tasks/topic' in the registry .* is a symbolic link to .*outside"):
        add_second(reg_root)
    assert snapshot(outside) == before


def test_unreferenced_symlinks_are_unlinked_not_followed(reg_root, outside):
    before = snapshot(outside)
    (reg_root / "tasks" / "ghost").symlink_to(outside, target_is_directory=True)
    (reg_root / "tasks" / "sentiment" / "v9").symlink_to(outside / "v7", target_is_directory=True)
    (reg_root / "merges" / "old").symlink_to(outside / "keep", target_is_directory=True)
    add_second(reg_root)
    assert snapshot(outside) == before
    for link in ("tasks/ghost", "tasks/sentiment/v9", "merges/old"):
        assert not os.path.lexists(reg_root / link), link


def test_symlinked_new_version_folder_is_replaced_not_followed(reg_root, outside):
    before = snapshot(outside)
    (reg_root / "tasks" / "sentiment" / "v2").symlink_to(outside / "v2", target_is_directory=True)
    reg = Registry.open(reg_root, device="cpu")
    result = reg.update_task("sentiment", toy_sentiment(24, 5), training=STEPS)
    assert result.version.version == 2
    assert snapshot(outside) == before
    v2 = reg_root / "tasks" / "sentiment" / "v2"
    assert v2.is_dir() and not v2.is_symlink() and (v2 / "adapter.safetensors").is_file()
    assert not list(reg_root.rglob(".staging-*"))


@pytest.mark.parametrize("remove", ["task", "merge"])
def test_removing_an_entry_whose_folder_is_a_symlink_unlinks_only_the_link(reg_root, outside, remove):
    before = snapshot(outside)
    folder = reg_root / ("tasks/upper" if remove == "task" else "merges/both")
    shutil.rmtree(folder)
    folder.symlink_to(outside, target_is_directory=True)
    reg = Registry.open(reg_root, device="cpu")
    reg.remove_task("upper") if remove == "task" else reg.remove_merge("both")
    assert snapshot(outside) == before
    assert not os.path.lexists(folder)


def test_symlinked_lock_file_is_refused(reg_root, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("precious")
    (reg_root / ".lock").unlink()
    (reg_root / ".lock").symlink_to(target)
    with pytest.raises(RegistryError, match=r"'\.lock' in the registry .* is a symbolic link to .*target\.txt"):
        Registry.open(reg_root, device="cpu").rollback("sentiment", 1)
    assert target.read_text() == "precious"


@pytest.mark.parametrize("gone", ["deleted", "moved", "a file"])
def test_a_write_to_a_registry_folder_gone_since_open_says_so(reg_root, tmp_path, gone):
    """A bare ``FileNotFoundError`` on '.lock' named neither the registry nor what to do."""
    reg = Registry.open(reg_root, device="cpu")
    shutil.rmtree(reg_root) if gone == "deleted" else reg_root.rename(tmp_path / "elsewhere")
    if gone == "a file":
        reg_root.write_text("not a registry")
    with pytest.raises(RegistryError, match=r"registry folder .*reg' is gone .*Registry.open"):
        reg.rollback("sentiment", 1)
    assert not (tmp_path / "reg").is_dir()


# --- the sweep deletes only what cmtl may have left -------------------------------------------------

HEX = "0123456789abcdef" * 2


def plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


#: What users put into a registry by hand (backups, exports, another registry): no writer may delete it.
THEIRS = {"tasks/sentiment/notes.txt": "mine", "tasks/sentiment/v1-good/adapter.safetensors": "backup",
          "tasks/my-export/adapter_config.json": "{}", "tasks/my-export/adapter_model.safetensors": "peft",
          "tasks/old-registry/registry.json": "{}", "tasks/old-registry/tasks/spam/v1/adapter.safetensors": "old",
          "tasks/notes.txt": "mine", "tasks/has space/v1/adapter.safetensors": "mine",
          "merges/my-export/adapter_config.json": "{}", "merges/my-export/adapter_model.safetensors": "peft",
          "merges/both-copy/adapter.safetensors": "copy", "merges/both-copy/heads.safetensors": "copy",
          "merges/both-copy/notes.txt": "why I kept it", "merges/notes.txt": "mine"}
#: What a crashed or removing writer of cmtl leaves: the next writer deletes it.
LEFTOVERS = {"tasks/sentiment/v9/adapter.safetensors": "x", f"tasks/sentiment/.staging-v2-{HEX}/head.safetensors": "x",
             "tasks/ghost/v1/adapter.safetensors": "x", f"tasks/ghost/.staging-v2-{HEX}/adapter.safetensors": "x",
             "merges/old/adapter.safetensors": "x", "merges/old/heads.safetensors": "x",
             f"merges/.staging-new-{HEX}/adapter.safetensors": "x"}


def test_the_sweep_deletes_only_what_cmtl_may_have_left(reg_root):
    shutil.copytree(reg_root / "tasks" / "sentiment" / "v1", reg_root / "tasks" / "sentiment" / "v1.bak")
    plant(reg_root, THEIRS | LEFTOVERS)
    theirs = {rel: (reg_root / rel).read_bytes() for rel in THEIRS} | {
        f"tasks/sentiment/v1.bak/{k}": v for k, v in snapshot(reg_root / "tasks" / "sentiment" / "v1.bak").items()}
    add_second(reg_root)
    assert {rel: (reg_root / rel).read_bytes() for rel in theirs} == theirs
    assert [rel for rel in LEFTOVERS if os.path.lexists(reg_root / rel)] == []
    assert not os.path.lexists(reg_root / "tasks" / "ghost") and not os.path.lexists(reg_root / "merges" / "old")
    assert Registry.open(reg_root, device="cpu").predict("sentiment", ["a lovely film"])


def test_removing_a_task_keeps_a_hand_backup_beside_its_versions(reg_root):
    shutil.copytree(reg_root / "tasks" / "upper" / "v1", reg_root / "tasks" / "upper" / "v1.bak")
    backup = snapshot(reg_root / "tasks" / "upper" / "v1.bak")
    reg = Registry.open(reg_root, device="cpu")
    reg.remove_task("upper")
    assert [p.name for p in (reg_root / "tasks" / "upper").iterdir()] == ["v1.bak"]
    assert snapshot(reg_root / "tasks" / "upper" / "v1.bak") == backup
    reg.add_task(TaskSpec("upper", labels=["neg", "pos"]), train=toy_sentiment(16), training=STEPS)
    assert sorted(p.name for p in (reg_root / "tasks" / "upper").iterdir()) == ["v1", "v1.bak"]


def test_a_merged_entrys_folder_holding_a_users_file_is_kept_and_not_written_over(reg_root):
    (reg_root / "merges" / "both" / "notes.txt").write_text("why I kept it")
    reg = Registry.open(reg_root, device="cpu")
    reg.remove_merge("both")
    assert [p.name for p in (reg_root / "merges" / "both").iterdir()] == ["notes.txt"]  # the entry's files went
    assert (reg_root / "merges" / "both" / "notes.txt").read_text() == "why I kept it"
    before = snapshot(reg_root / "merges" / "both")
    with pytest.raises(RegistryError, match=r"'merges/both' in the registry .* holds what cmtl did not write "
                                            r"\('notes\.txt'\).*Move it out of the registry"):
        reg.merge(["sentiment", "topic"], "both", method="linear")
    assert snapshot(reg_root / "merges" / "both") == before and reg.merges() == []


def _replace_with_file(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.write_text("not a folder")


@pytest.mark.parametrize("where", ["tasks", "tasks/sentiment", "tasks/sentiment/v1"])
def test_a_file_where_a_folder_belongs_is_a_registry_error_for_readers(reg_root, where):
    _replace_with_file(reg_root / where)
    with pytest.raises(RegistryError, match=rf"'{where}' in the registry .* is a file, where cmtl keeps a folder"):
        Registry.open(reg_root, device="cpu").predict("sentiment", ["x"])


def test_a_file_where_a_merge_folder_belongs_is_a_registry_error_for_readers(reg_root):
    for where in ("merges/both", "merges"):
        _replace_with_file(reg_root / where)
        with pytest.raises(RegistryError, match=rf"'{where}' in the registry .* is a file, where cmtl keeps a folder"):
            Registry.open(reg_root, device="cpu").predict("sentiment", ["x"], merge="both")


def test_a_folder_where_a_file_belongs_is_a_registry_error_for_readers(reg_root):
    path = reg_root / "tasks" / "sentiment" / "v1" / "adapter.safetensors"
    path.unlink()
    path.mkdir()
    with pytest.raises(RegistryError, match=r"'tasks/sentiment/v1/adapter\.safetensors' in the registry .* is a "
                                            r"folder, where cmtl keeps a file"):
        Registry.open(reg_root, device="cpu").predict("sentiment", ["x"])


@pytest.mark.parametrize("where", ["tasks", "tasks/sentiment", "merges"])
def test_a_file_where_a_folder_belongs_is_a_registry_error_for_writers(reg_root, where):
    _replace_with_file(reg_root / where)
    manifest = (reg_root / MANIFEST).read_bytes()
    with pytest.raises(RegistryError, match=rf"'{where}' in the registry .* is a file, where cmtl keeps a folder"):
        add_second(reg_root)
    assert (reg_root / MANIFEST).read_bytes() == manifest
    assert (reg_root / where).read_text() == "not a folder"


def test_a_file_where_a_new_folder_goes_is_a_registry_error_for_writers(reg_root):
    (reg_root / "tasks").rename(reg_root / "tasks-moved")
    (reg_root / "tasks").write_text("not a folder")
    edit_manifest(reg_root, lambda m: (m.__setitem__("tasks", {}), m.__setitem__("merges", {})))
    with pytest.raises(RegistryError, match=r"'tasks' in the registry .* is a file, where cmtl keeps a folder"):
        add_second(reg_root)
    assert (reg_root / "tasks").read_text() == "not a folder"


def test_a_lock_that_is_a_folder_is_a_registry_error(reg_root):
    (reg_root / ".lock").unlink(missing_ok=True)
    (reg_root / ".lock").mkdir()
    manifest = (reg_root / MANIFEST).read_bytes()
    with pytest.raises(RegistryError, match=r"'\.lock' in the registry .* is a folder, where cmtl keeps a file"):
        Registry.open(reg_root, device="cpu").rollback("sentiment", 1)
    assert (reg_root / MANIFEST).read_bytes() == manifest


def test_a_failed_folder_write_leaves_no_staging_folder(reg_root, monkeypatch):
    from cmtl.registry import store
    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "fsync_dir", fail)
    with pytest.raises(OSError, match="No space left"):
        store.write_folder(reg_root, reg_root / "tasks" / "sentiment" / "v5", {"a.bin": b"x"})
    assert not list(reg_root.rglob(".staging-*"))


def test_paths_outside_the_root_are_refused(reg_root, tmp_path):
    from cmtl.registry import store
    with pytest.raises(RegistryError, match="outside the registry"):
        store.write_folder(reg_root, tmp_path / "elsewhere" / "v1", {"a.bin": b"x"})
    with pytest.raises(RegistryError, match="outside the registry"):
        store.delete(reg_root, reg_root / "tasks" / ".." / ".." / "outside")


# --- item 5: names and structure of the manifest ------------------------------------------------


def test_traversal_task_key_is_refused_before_anything_is_deleted(reg_root, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("precious")
    edit_manifest(reg_root, lambda m: m["tasks"].__setitem__("../../victim", copy.deepcopy(m["tasks"]["upper"])))
    with pytest.raises(ManifestError, match=r"task name '\.\./\.\./victim'.*letters, digits"):
        Registry.open(reg_root, device="cpu").remove_task("../../victim")
    assert (victim / "data.txt").read_text() == "precious"


def test_traversal_merge_key_is_refused_before_anything_is_deleted(reg_root, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("precious")

    def plant(m):
        m["merges"]["../../victim"] = {**m["merges"]["both"], "name": "../../victim"}

    edit_manifest(reg_root, plant)
    with pytest.raises(ManifestError, match=r"merge name '\.\./\.\./victim'"):
        Registry.open(reg_root, device="cpu").remove_merge("../../victim")
    assert (victim / "data.txt").read_text() == "precious"


def _set(path, value):
    """A change that sets manifest[path[0]][path[1]]... to ``value`` (or deletes it when value is DELETE)."""

    def change(m):
        target = m
        for key in path[:-1]:
            target = target[key]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return change


DELETE = object()
S = ("tasks", "sentiment")
V1 = (*S, "versions", 0)
BOTH = ("merges", "both")

STRUCTURE_DEFECTS = {
    "top-level list": (None, r"must hold a JSON object.*got a list"),
    "no tasks": (_set(("tasks",), DELETE), r"has no 'tasks'"),
    "tasks a list": (_set(("tasks",), []), r"'tasks' must be an object.*got a list"),
    "task entry a string": (_set(S, "x"), r"tasks\['sentiment'\] must be an object"),
    "no versions": (_set((*S, "versions"), DELETE), r"tasks\['sentiment'\] has no 'versions'"),
    "versions empty": (_set((*S, "versions"), []), r"tasks\['sentiment'\]\['versions'\] must be a non-empty list"),
    "version a string": (_set((*V1, "version"), "1"), r"\['version'\] must be a positive integer.*got '1'"),
    "version a bool": (_set((*V1, "version"), True), r"\['version'\] must be a positive integer.*got True"),
    "record a number": (_set(V1, 3), r"\['versions'\]\[0\] must be an object"),
    "current 99": (_set((*S, "current"), 99), r"\['current'\] is 99, which names no version.*versions: \[1\]"),
    "no current": (_set((*S, "current"), DELETE), r"tasks\['sentiment'\] has no 'current'"),
    "parent unknown": (_set((*V1, "parent"), 5), r"\['parent'\] is 5.*must be null or an earlier version"),
    "parent itself": (_set((*V1, "parent"), 1), r"\['parent'\] is 1.*must be null or an earlier version"),
    "no files": (_set((*V1, "files"), DELETE), r"\['versions'\]\[0\] has no 'files'"),
    "adapter file missing": (_set((*V1, "files", "adapter.safetensors"), DELETE),
                             r"\['files'\] lacks 'adapter.safetensors'"),
    "checksum not hex": (_set((*V1, "files", "head.safetensors"), 7), r"\['head.safetensors'\] must be a SHA-256"),
    "file name with a slash": (_set((*V1, "files", "../x"), "0" * 64), r"file name '\.\./x'"),
    "adapter not a dict": (_set((*V1, "adapter"), None), r"\['adapter'\] must be an object"),
    "spec missing": (_set((*S, "spec"), DELETE), r"tasks\['sentiment'\] has no 'spec'"),
    "spec of another task": (_set((*S, "spec", "name"), "other"), r"\['spec'\]\['name'\] is 'other'.*'sentiment'"),
    "spec of no problem type": (_set((*S, "spec", "problem_type"), "bogus"),
                                r"\['spec'\] is not a valid task spec.*problem_type"),
    "merges a list": (_set(("merges",), []), r"'merges' must be an object"),
    "merge record a list": (_set(BOTH, []), r"merges\['both'\] must be an object"),
    "merge named otherwise": (_set((*BOTH, "name"), "other"), r"merges\['both'\]\['name'\] is 'other'"),
    "merge tasks a string": (_set((*BOTH, "tasks"), "sentiment"), r"merges\['both'\]\['tasks'\] must be a non-empty"),
    "merge task bad name": (_set((*BOTH, "tasks"), ["../x"]),
                            r"task name '\.\./x' \(merges\['both'\]\['tasks'\]\[0\]\)"),
    "merge without heads": (_set((*BOTH, "files", "heads.safetensors"), DELETE), r"lacks 'heads.safetensors'"),
    "merge task_adapter bad": (_set((*BOTH, "task_adapter"), {"r": "4"}), r"\['task_adapter'\] must be null or"),
    "merge members bad": (_set((*BOTH, "members"), [{"task": "sentiment"}]), r"\['members'\]\[0\] must be"),
    "merge specs a list": (_set((*BOTH, "specs"), []), r"merges\['both'\]\['specs'\] must be an object"),
    "merge spec of no member": (_set((*BOTH, "specs", "other"), {"name": "other"}),
                                r"\['specs'\] has a spec for 'other', which is not one of"),
    "merge spec named otherwise": (_set((*BOTH, "specs", "sentiment", "name"), "x"),
                                   r"\['specs'\]\['sentiment'\]\['name'\] is 'x'"),
    "merge spec bad": (_set((*BOTH, "specs", "sentiment", "problem_type"), "bogus"),
                       r"\['specs'\]\['sentiment'\] is not a valid task spec"),
    "backbone missing": (_set(("backbone",), DELETE), r"has no 'backbone'"),
    "backbone sha not str": (_set(("backbone", "sha256"), None), r"backbone\['sha256'\] must be a string"),
    "generation a string": (_set(("generation",), "7"), r"'generation' must be a non-negative integer"),
    # Values that passed the check above but crashed loading or the CLI with a raw TypeError/ValueError/OSError:
    # every recorded config must be one its class accepts (and of the types it declares).
    "eval_batch_size null": (_set((*V1, "training", "eval_batch_size"), None),
                             r"\['training'\]\['eval_batch_size'\] must be an integer, got null"),
    "eval_batch_size -3": (_set((*V1, "training", "eval_batch_size"), -3),
                           r"\['training'\] is not a valid training config.*'eval_batch_size' parameter of TrainConfig "
                           r"must be a positive"),
    "eval_batch_size 0": (_set((*V1, "training", "eval_batch_size"), 0),
                          r"\['training'\] is not a valid training config.*eval_batch_size"),
    "eval_batch_size a string": (_set((*V1, "training", "eval_batch_size"), "x"),
                                 r"\['training'\]\['eval_batch_size'\] must be an integer, got 'x'"),
    "learning_rate a string": (_set((*V1, "training", "learning_rate"), "x"),
                               r"\['training'\]\['learning_rate'\] must be a number, got 'x'"),
    "training progress a string": (_set((*V1, "training", "progress"), "no"),
                                   r"\['training'\]\['progress'\] must be true or false, got 'no'"),
    "adapter alpha null": (_set((*V1, "adapter", "alpha"), None),
                           r"\['adapter'\]\['alpha'\] must be a number, got null"),
    "adapter alpha a string": (_set((*V1, "adapter", "alpha"), "16"), r"\['adapter'\]\['alpha'\] must be a number"),
    "adapter alpha NaN": (_set((*V1, "adapter", "alpha"), float("nan")),
                          r"\['adapter'\]\['alpha'\] must be a finite number, got nan"),
    "adapter r a string": (_set((*V1, "adapter", "r"), "8"), r"\['adapter'\]\['r'\] must be an integer, got '8'"),
    "adapter r a bool": (_set((*V1, "adapter", "r"), True), r"\['adapter'\]\['r'\] must be an integer, got True"),
    "adapter r 0": (_set((*V1, "adapter", "r"), 0), r"\['adapter'\] is not a valid adapter config.*'r' parameter"),
    "adapter dropout 5": (_set((*V1, "adapter", "dropout"), 5),
                          r"\['adapter'\] is not a valid adapter config.*dropout"),
    "adapter target_modules a string": (_set((*V1, "adapter", "target_modules"), "query"),
                                        r"\['adapter'\]\['target_modules'\] must be a list of strings or null"),
    "adapter layers of strings": (_set((*V1, "adapter", "layers"), ["1"]),
                                  r"\['adapter'\]\['layers'\] must be a list of integers or null"),
    "merge adapter r a string": (_set((*BOTH, "adapter", "r"), "32"),
                                 r"merges\['both'\]\['adapter'\]\['r'\] must be an integer, got '32'"),
    "spec labels null": (_set((*S, "spec", "labels"), None),
                         r"tasks\['sentiment'\]\['spec'\]\['labels'\] is null, but a stored single_label spec "
                         r"must list its labels"),
    "merge spec labels null": (_set((*BOTH, "specs", "topic", "labels"), None),
                               r"\['specs'\]\['topic'\]\['labels'\] is null"),
    "metrics a list": (_set((*V1, "metrics"), [1]), r"\['versions'\]\[0\]\['metrics'\] must be an object, got a list"),
    "metrics a string": (_set((*V1, "metrics"), "x"), r"\['metrics'\] must be an object, got 'x'"),
    "metric a string": (_set((*V1, "metrics", "validation_accuracy"), "high"),
                        r"\['metrics'\]\['validation_accuracy'\] must be a number or null, got 'high'"),
    "no created": (_set((*V1, "created"), DELETE), r"\['versions'\]\[0\] has no 'created'"),
    "created a number": (_set((*V1, "created"), 5), r"\['versions'\]\[0\]\['created'\] must be a string, got 5"),
    "no kind": (_set((*V1, "kind"), DELETE), r"\['versions'\]\[0\] has no 'kind'"),
    "kind a number": (_set((*V1, "kind"), 5), r"\['kind'\] must be a string, got 5"),
    "no parent": (_set((*V1, "parent"), DELETE), r"\['versions'\]\[0\] has no 'parent'"),
    "trainable_parameters a string": (_set((*V1, "trainable_parameters"), "many"),
                                      r"\['trainable_parameters'\] must be an integer, got 'many'"),
    "backbone max_length a string": (_set(("backbone", "max_length"), "64"),
                                     r"backbone\['max_length'\] must be an integer, got '64'"),
    "backbone max_length -1": (_set(("backbone", "max_length"), -1),
                               r"'backbone' is not a valid backbone config.*max_length"),
    "backbone pooling bogus": (_set(("backbone", "pooling"), "bogus"),
                               r"'backbone' is not a valid backbone config.*pooling"),
    "version absurd": (lambda m: (_set((*V1, "version"), 10**300)(m), _set((*S, "current"), 10**300)(m)),
                       r"\['version'\] must be a positive integer up to 1000000000, got 1000000000000"),
    "current 1.0": (_set((*S, "current"), 1.0), r"\['current'\] must be a positive integer, got 1\.0"),
    "memory budget a string": (_set((*S, "memory", "budget"), "x"),
                               r"tasks\['sentiment'\]\['memory'\]\['budget'\] must be an integer, got 'x'"),
    "memory buffer bogus": (_set((*S, "memory", "buffer"), "bogus"),
                            r"\['memory'\] is not a valid memory config.*buffer"),
}


@pytest.mark.parametrize("defect", list(STRUCTURE_DEFECTS))
def test_structural_defects_raise_manifest_error(reg_root, defect):
    change, match = STRUCTURE_DEFECTS[defect]
    if change is None:
        (reg_root / MANIFEST).write_text("[1, 2]")
    else:
        edit_manifest(reg_root, change)
    with pytest.raises(ManifestError, match=match) as info:
        read_manifest(reg_root)
    message = str(info.value)
    assert str(reg_root / MANIFEST) in message and "registry.json" in message
    assert "back" in message or "edit" in message  # says how to fix it


@pytest.mark.parametrize("where", [("backbone",), (*V1, "training"), (*V1, "adapter"), (*S, "memory"),
                                   (*BOTH, "adapter")])
def test_unknown_config_keys_from_a_newer_cmtl_are_accepted(reg_root, where):
    edit_manifest(reg_root, _set((*where, "from_a_newer_cmtl"), 1))
    read_manifest(reg_root)


@pytest.mark.parametrize("key,value", [("current", False), ("task", "other"), ("from_a_newer_cmtl", 5)])
def test_version_record_keys_from_a_newer_cmtl_do_not_break_listing(reg_root, key, value):
    edit_manifest(reg_root, _set((*V1, key), value))
    info = Registry.open(reg_root, device="cpu").versions("sentiment")[0]
    assert (info.task, info.version, info.current) == ("sentiment", 1, True)


def test_a_backbone_key_from_a_newer_cmtl_warns_and_is_ignored(reg_root):
    from cmtl.registry.manifest import backbone_config

    edit_manifest(reg_root, _set(("backbone", "from_a_newer_cmtl"), 1))
    recorded = read_manifest(reg_root)["backbone"]
    with pytest.warns(UserWarning, match=r"Ignoring unknown backbone keys \['from_a_newer_cmtl'\]"):
        config = backbone_config(recorded)
    assert config.max_length == recorded["max_length"]


def test_a_registry_with_a_backbone_key_from_a_newer_cmtl_opens(reg_root):
    edit_manifest(reg_root, _set(("backbone", "from_a_newer_cmtl"), 1))
    with pytest.warns(UserWarning, match="from_a_newer_cmtl"):
        Registry.open(reg_root, device="cpu")


def test_current_99_is_caught_on_open(reg_root):
    edit_manifest(reg_root, _set((*S, "current"), 99))
    with pytest.raises(ManifestError, match=r"\['current'\] is 99"):
        Registry.open(reg_root, device="cpu")


def test_an_unchanged_manifest_is_checked_once_and_a_changed_one_again(reg_root, monkeypatch):
    from cmtl.registry import manifest as rules
    checked = []
    check = rules.validate
    monkeypatch.setattr(rules, "validate", lambda m, path: (checked.append(path), check(m, path)))
    read_manifest(reg_root)
    read_manifest(reg_root)
    assert len(checked) == 1  # the server polls: an unchanged manifest is not checked again
    edit_manifest(reg_root, _set((*V1, "training", "eval_batch_size"), 0))
    with pytest.raises(ManifestError, match="eval_batch_size"):
        read_manifest(reg_root)
    with pytest.raises(ManifestError, match="eval_batch_size"):  # a bad manifest is never remembered as checked
        read_manifest(reg_root)
    assert len(checked) == 3


def test_the_served_manifest_is_valid(served):
    read_manifest(served)


# --- item 14: crash-left temp files, and the losing writer of a concurrent remove -------------


def test_crash_left_manifest_temp_files_are_cleaned_by_the_next_writer(reg_root, tmp_path):
    target = tmp_path / "target.txt"
    target.write_text("precious")
    left = reg_root / f".{MANIFEST}.{'a' * 32}.tmp"
    left.write_text('{"half": ')
    link = reg_root / f".{MANIFEST}.{'b' * 32}.tmp"
    link.symlink_to(target)
    other = reg_root / "notes.tmp"
    other.write_text("mine")
    Registry.open(reg_root, device="cpu").rollback("sentiment", 1)
    assert not left.exists()
    assert target.read_text() == "precious" and other.read_text() == "mine"


@pytest.mark.parametrize("write", ["remove", "update", "merge", "rollback"])
def test_the_losing_writer_of_a_concurrent_remove_says_it_was_removed(reg_root, write):
    first, second = Registry.open(reg_root, device="cpu"), Registry.open(reg_root, device="cpu")
    first.remove_task("upper")
    calls = {"remove": lambda: second.remove_task("upper"),
             "update": lambda: second.update_task("upper", toy_sentiment(24, 5), training=STEPS),
             "merge": lambda: second.merge(["upper", "sentiment"], "m2"),
             "rollback": lambda: second.rollback("upper", 1)}
    with pytest.raises(TaskNotFoundError, match=r"Task 'upper' was removed \(by another writer\?\)"):
        calls[write]()


def test_the_losing_writer_of_a_concurrent_merge_removal_says_it_was_removed(reg_root):
    first, second, reader = (Registry.open(reg_root, device="cpu") for _ in range(3))
    first.remove_merge("both")
    with pytest.raises(TaskNotFoundError, match=r"Merge 'both' was removed \(by another writer\?\)"):
        second.remove_merge("both")
    with pytest.raises(TaskNotFoundError, match=r"Merge 'both' was removed \(by another writer\?\)"):
        reader.predict("sentiment", ["x"], merge="both")


def test_a_file_really_missing_is_still_corrupt(reg_root):
    (reg_root / "tasks" / "sentiment" / "v1" / "adapter.safetensors").unlink()
    with pytest.raises(CorruptFileError, match="named in the manifest is missing"):
        Registry.open(reg_root, device="cpu").predict("sentiment", ["x"])


# --- crash safety of every write, with the clean-up above in the path ------------------------------


def named_folders(root: Path) -> tuple[set[str], set[str]]:
    """(folders the manifest names, entries present under tasks/ and merges/)."""
    manifest = read_manifest(root)
    named = {f"tasks/{t}/v{r['version']}" for t, e in manifest["tasks"].items() for r in e["versions"]}
    named |= {f"merges/{m}" for m in manifest.get("merges", {})}
    present = {str(p.relative_to(root)) for p in root.glob("tasks/*/*")} | {
        str(p.relative_to(root)) for p in root.glob("merges/*")}
    return named, present


@pytest.mark.parametrize("where", ["mid-manifest", "after-manifest"])
@pytest.mark.parametrize("op", ["update", "merge", "rollback", "remove_task", "remove_merge"])
def test_kill_during_every_write_keeps_a_consistent_registry(reg_root, op, where):
    import subprocess
    import sys

    import numpy as np

    texts = ["a great film", "an awful film"]
    reg = Registry.open(reg_root, device="cpu")
    expected = reg.predict_proba("sentiment", texts)
    expected_merge = reg.predict_proba("sentiment", texts, merge="both")
    before = (reg_root / MANIFEST).read_bytes()
    proc = subprocess.run([sys.executable, "-m", "tests.kill_during_write", str(reg_root), op, where],
                          capture_output=True, text=True, cwd=str(Path(__file__).parents[2]),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    if where == "mid-manifest":
        assert (reg_root / MANIFEST).read_bytes() == before
    else:
        assert (reg_root / MANIFEST).read_bytes() != before
    reg = Registry.open(reg_root, device="cpu")
    np.testing.assert_allclose(reg.predict_proba("sentiment", texts, version=1), expected, rtol=0, atol=1e-6)
    if "both" in reg.merges():
        np.testing.assert_allclose(reg.predict_proba("sentiment", texts, merge="both"), expected_merge, rtol=0,
                                   atol=1e-6)
    # The next writer removes every leftover: folders the manifest does not name, staging, temp files.
    reg.rollback("sentiment", 1)
    named, present = named_folders(reg_root)
    assert present == named
    assert not list(reg_root.rglob(".staging-*")) and not list(reg_root.glob(f".{MANIFEST}.*.tmp"))


def test_a_failed_folder_flush_after_the_manifest_landed_leaves_the_object_as_the_disk(reg_root, monkeypatch):
    # Before: remove_task raised though the manifest on disk no longer had the task, and the object still
    # answered for it. Now the write warns, and the object and the disk agree.
    import errno
    import stat

    reg = Registry.open(reg_root, device="cpu")
    real = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.warns(RuntimeWarning, match="could not be flushed"):
        reg.remove_task("upper")
    monkeypatch.undo()
    assert "upper" not in reg.tasks() and "upper" not in Registry.open(reg_root, device="cpu").tasks()
