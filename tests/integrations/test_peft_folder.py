"""A task version as a PEFT adapter folder: PeftModel.from_pretrained reads it, and a registry imports it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from cmtl import (BackboneConfig, BackboneMismatchError, DataError, InvalidParameterError, Registry, TaskExistsError,
                  TaskSpec, TrainConfig)
from cmtl.integrations.peft_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD, HEAD, TASK
from tests.conftest import FAST, toy_sentiment

TEXTS = ["a lovely film", "an awful plot and the acting", "it was really quite superb", "dreadful"]


@pytest.fixture
def reg(tmp_path, sentiment_registry):
    shutil.copytree(sentiment_registry, tmp_path / "reg")
    return Registry.open(tmp_path / "reg", device="cpu")


def test_export_loads_in_peft_with_the_same_pooled_features(reg, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    out = reg.export_peft("sentiment", tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD, TASK, CARD}
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and sorted(config["target_modules"]) == ["query", "value"]
    assert config["base_model_name_or_path"] == reg.backbone.config.name_or_path
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(config["base_model_name_or_path"]), str(out)).eval()
    batch = reg.backbone.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    pooled = reg.backbone.pool(hidden, batch["attention_mask"])
    torch.testing.assert_close(pooled, reg.embed(TEXTS, "sentiment"), rtol=1e-5, atol=1e-5)
    # ... and the exported head on those features gives the registry's probabilities.
    head = torch.nn.Linear(pooled.shape[1], 2)
    from safetensors.torch import load_file

    head.load_state_dict({k.removeprefix("linear."): v for k, v in load_file(out / HEAD).items()})
    torch.testing.assert_close(head(pooled).softmax(-1).detach(),
                               torch.from_numpy(reg.predict_proba("sentiment", TEXTS)), rtol=1e-5, atol=1e-5)
    card = (out / CARD).read_text()
    assert "library_name: peft" in card and "`neg`, `pos`" in card and reg.backbone.sha256 in card


def test_the_default_adapter_exports_its_dotted_target_and_peft_gives_the_same_features(reg, tmp_path):
    """BERT's default adapts ``attention.output.dense``, a dotted suffix: peft must find the same modules."""
    from peft import PeftModel
    from transformers import AutoModel

    reg.add_task(TaskSpec("plain", labels=["neg", "pos"]), toy_sentiment(32), training=FAST)
    out = reg.export_peft("plain", tmp_path / "export")
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert sorted(config["target_modules"]) == ["attention.output.dense", "key", "query", "value"]
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(config["base_model_name_or_path"]), str(out)).eval()
    adapted = {n.removesuffix(".lora_A.default") for n, _ in model.named_modules() if n.endswith(".lora_A.default")}
    assert len(adapted) == 4 * reg.backbone.encoder.config.num_hidden_layers
    assert not any("intermediate" in n or n.endswith("output.dense") and ".attention." not in n for n in adapted)
    batch = reg.backbone.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        pooled = reg.backbone.pool(model(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(pooled, reg.embed(TEXTS, "plain"), rtol=1e-5, atol=1e-5)


def test_an_exported_task_imports_into_another_registry_unchanged(reg, tmp_path, tiny_backbone):
    out = reg.export_peft("sentiment", tmp_path / "export")
    other = Registry.create(tmp_path / "other", BackboneConfig(name_or_path=tiny_backbone, max_length=64),
                            device="cpu")
    info = other.import_peft(out)
    assert (info.version, info.kind) == (1, "import") and info.init["task"] == "sentiment"
    assert other.spec("sentiment").labels == ("neg", "pos")
    torch.testing.assert_close(torch.from_numpy(other.predict_proba("sentiment", TEXTS)),
                               torch.from_numpy(reg.predict_proba("sentiment", TEXTS)), rtol=1e-5, atol=1e-5)
    with pytest.raises(TaskExistsError, match="already exists"):
        other.import_peft(out)
    renamed = other.import_peft(out, TaskSpec("sentiment2", labels=["neg", "pos"]))
    assert renamed.task == "sentiment2"
    # A new process reads what was imported (kind, init, files) like any other version.
    assert Registry.open(other.root, device="cpu").predict("sentiment2", TEXTS) == reg.predict("sentiment", TEXTS)


@pytest.mark.parametrize("adapter", ["default", "query-value"])
def test_a_folder_that_names_no_target_modules_imports_the_modules_its_weights_adapt(reg, tmp_path, adapter):
    """``target_modules: null`` (peft's own default for the model) must not become cmtl's default: the
    weights say which modules are adapted."""
    if adapter == "default":
        reg.add_task(TaskSpec("plain", labels=["neg", "pos"]), toy_sentiment(32), training=FAST)
    task = "plain" if adapter == "default" else "sentiment"
    out = reg.export_peft(task, tmp_path / "export")
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    config["target_modules"] = None
    (out / ADAPTER_CONFIG).write_text(json.dumps(config))
    info = reg.import_peft(out, name="again")
    assert info.adapter["target_modules"] == reg.current(task).adapter["target_modules"]
    torch.testing.assert_close(reg.embed(TEXTS, "again"), reg.embed(TEXTS, task), rtol=1e-5, atol=1e-5)


def test_a_plain_peft_folder_needs_a_spec_and_data_for_its_head(reg, tmp_path, tiny_backbone):
    out = reg.export_peft("sentiment", tmp_path / "export")
    for name in (HEAD, TASK, CARD):
        (out / name).unlink()  # as PeftModel.save_pretrained leaves it
    other = Registry.create(tmp_path / "other", BackboneConfig(name_or_path=tiny_backbone, max_length=64),
                            device="cpu")
    with pytest.raises(DataError, match="holds no cmtl task"):
        other.import_peft(out)
    with pytest.raises(DataError, match="pass labelled train data"):
        other.import_peft(out, TaskSpec("s", labels=["neg", "pos"]))
    info = other.import_peft(out, TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(64), toy_sentiment(32, 1))
    assert info.metrics["validation_accuracy"] >= 0.8
    assert other.buffer("s") is not None and len(other.holdout("s")) == 32
    # The adapter is the exported one, as it was: the same features as the source task's.
    torch.testing.assert_close(other.embed(TEXTS, "s"), reg.embed(TEXTS, "sentiment"), rtol=1e-5, atol=1e-5)
    # A head fitted on the train rows and scored on validation rows among them: optimistic, as in add_task.
    rows = toy_sentiment(16)
    with pytest.warns(UserWarning, match=r"'s2': 16 of 16 validation rows \(100 %\) are also in the training data"):
        other.import_peft(out, TaskSpec("s2", labels=["neg", "pos"]), rows, rows)


def test_refused_imports_write_nothing(reg, tmp_path):
    out = reg.export_peft("sentiment", tmp_path / "export")
    with pytest.raises(FileExistsError, match="overwrite"):
        reg.export_peft("sentiment", out)
    reg.export_peft("sentiment", out, overwrite=True)
    other = Registry.create(tmp_path / "other", device="cpu")  # the embedded MiniLM: other weights
    manifest = (other.root / "registry.json").read_bytes()
    with pytest.raises(BackboneMismatchError, match="same backbone"):
        other.import_peft(out)
    task = json.loads((out / TASK).read_text())
    task["backbone"].pop("sha256")
    (out / TASK).write_text(json.dumps(task))
    with pytest.raises(DataError, match="does not fit this registry's backbone"):
        other.import_peft(out)
    with pytest.raises(DataError, match="not a PEFT adapter folder"):
        other.import_peft(tmp_path)
    assert (other.root / "registry.json").read_bytes() == manifest and other.tasks() == []


def saved_peft_adapter(base: str, path, **lora) -> dict[str, torch.Tensor]:
    """A LoRA adapter that PEFT itself trains-and-saves (B drawn at random, so it changes the features);
    returns its mean-pooled features of TEXTS as PEFT computes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    lora = {"target_modules": ["query", "value"], **lora}
    model = get_peft_model(AutoModel.from_pretrained(base), LoraConfig(**lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval().save_pretrained(str(path))
    batch = AutoTokenizer.from_pretrained(base)(TEXTS, padding=True, truncation=True, max_length=64,
                                                return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_an_rslora_adapter_imports_with_its_own_scaling(reg, tmp_path):
    """rsLoRA scales by alpha/sqrt(r): it was read as plain LoRA (alpha/r), 2x here, and served so without a word."""
    features = saved_peft_adapter(reg.backbone.config.name_or_path, tmp_path / "rs", r=4, lora_alpha=8,
                                  use_rslora=True)
    info = reg.import_peft(tmp_path / "rs", TaskSpec("rs", labels=["neg", "pos"]), toy_sentiment(16))
    assert info.adapter["alpha"] == 16.0 and info.adapter["r"] == 4  # alpha·sqrt(r): the same scaling, plain LoRA
    torch.testing.assert_close(reg.embed(TEXTS, "rs"), features, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting", [
    {"use_dora": True}, {"bias": "all"}, {"lora_bias": True}, {"rank_pattern": {"query": 4}},
    {"alpha_pattern": {"value": 64}}, {"modules_to_save": ["classifier"]}, {"init_lora_weights": "pissa"},
    {"layer_replication": [[0, 1]]}, {"trainable_token_indices": [5, 6]}, {"exclude_modules": ["value"]}])
def test_lora_settings_plain_lora_cannot_reproduce_are_refused(reg, tmp_path, setting):
    """Each of these changes what PEFT computes; the import kept r, alpha and targets only and ran another adapter."""
    out = reg.export_peft("sentiment", tmp_path / "export")
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    (out / ADAPTER_CONFIG).write_text(json.dumps({**config, **setting}))
    manifest = (reg.root / "registry.json").read_bytes()
    (name,) = setting
    with pytest.raises(DataError, match=f"sets {name}=.*plain LoRA"):
        reg.import_peft(out, TaskSpec("copy", labels=["neg", "pos"]))
    assert (reg.root / "registry.json").read_bytes() == manifest and "copy" not in reg.tasks()


TAGS = TaskSpec("tags", labels=["neg", "pos", "film"], problem_type="multi_label", label_column="tags",
                threshold=0.4)


def tag_rows(n: int, seed: int = 0) -> list[dict]:
    return [{"text": r["text"], "tags": [r["label"], "film"] if "film" in r["text"] else [r["label"]]}
            for r in toy_sentiment(n, seed)]


def test_the_card_says_how_the_head_decides(reg, tmp_path):
    """The card named the head's outputs but not how they decide: a multi-label export read with softmax and
    argmax (as a classifier's logits usually are) answered one label per text, and ignored the threshold."""
    reg.add_task(TAGS, tag_rows(32), training=TrainConfig(max_steps=3, batch_size=8, progress=False))
    card = (reg.export_peft("tags", tmp_path / "tags") / CARD).read_text()
    assert "where sigmoid(logit) >= 0.4" in card and "softmax" not in card
    card = (reg.export_peft("sentiment", tmp_path / "sentiment") / CARD).read_text()
    assert "the label of the largest logit" in card and "sigmoid" not in card


def test_the_exported_head_answers_only_as_the_exported_task(reg, tmp_path):
    """A spec with the exported labels but another problem type reused the multi-label head as a single-label
    one (argmax instead of thresholds), silently; the documented rename call built exactly such a spec."""
    reg.add_task(TAGS, tag_rows(32), training=TrainConfig(max_steps=3, batch_size=8, progress=False))
    out = reg.export_peft("tags", tmp_path / "export")
    manifest = (reg.root / "registry.json").read_bytes()
    with pytest.raises(DataError, match=r"differs from it in .*problem_type: exported 'multi_label', spec "
                                        r"'single_label'.*pass name='tags-b' instead"):
        reg.import_peft(out, TaskSpec("tags-b", labels=["neg", "pos", "film"]))
    with pytest.raises(InvalidParameterError, match="name"):
        reg.import_peft(out, TAGS, name="tags-b")
    assert (reg.root / "registry.json").read_bytes() == manifest
    reg.import_peft(out, name="tags-b")  # the exported task, renamed: its head and all its settings
    assert reg.spec("tags-b").to_dict() == {**TAGS.to_dict(), "name": "tags-b"}
    texts = [r["text"] for r in tag_rows(8, 9)]
    assert reg.predict("tags-b", texts) == reg.predict("tags", texts)
    # Another spec with training data gets a head of its own, fitted for that spec.
    single = reg.import_peft(out, TaskSpec("one", labels=["neg", "pos"]), toy_sentiment(32))
    assert reg.spec("one").problem_type == "single_label" and single.metrics == {}
    assert all(label in ("neg", "pos") for label in reg.predict("one", texts))


def test_a_spec_that_reads_other_columns_keeps_the_exported_head(reg, tmp_path):
    """Column names and the description say where the data lives, not what the head answers: a spec that
    differed only there had the trained head dropped (refused without train data, refitted as a probe with it)."""
    reg.add_task(TAGS, tag_rows(32), training=TrainConfig(max_steps=3, batch_size=8, progress=False))
    out = reg.export_peft("tags", tmp_path / "export")
    other = TaskSpec("tags-b", labels=["neg", "pos", "film"], problem_type="multi_label", text_column="body",
                     label_column="labels", threshold=0.4, description="read from our own table")
    reg.import_peft(out, other)
    texts = [r["text"] for r in tag_rows(8, 9)]
    assert reg.predict("tags-b", texts) == reg.predict("tags", texts)
    assert reg.spec("tags-b").text_column == "body"
    # So does how integer labels in the data are read (positions or values): the head answers the same labels.
    indexed = TaskSpec("tags-i", labels=["neg", "pos", "film"], problem_type="multi_label", threshold=0.4,
                       label_column="tags", label_encoding="index")
    reg.import_peft(out, indexed)
    assert reg.predict("tags-i", texts) == reg.predict("tags", texts)
    with pytest.raises(DataError, match="text_pair_column"):  # a pair column changes what the head reads
        reg.import_peft(out, TaskSpec("tags-c", labels=["neg", "pos", "film"], problem_type="multi_label",
                                      label_column="tags", threshold=0.4, text_pair_column="second"))


# --- an export never deletes what is not an export ------------------------------------------------


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["root", "version", "new-inside", "parent"])
def test_an_export_onto_into_or_around_the_registry_is_refused_and_deletes_nothing(reg, where):
    target = {"root": reg.root, "version": reg.root / "tasks" / "sentiment" / "v1",
              "new-inside": reg.root / "exports" / "sentiment", "parent": reg.root.parent}[where]
    before = snapshot(reg.root)
    with pytest.raises(InvalidParameterError, match=r"'path' parameter of export_peft must lie outside the "
                                                    r"registry .*Export to a folder outside"):
        reg.export_peft("sentiment", target, overwrite=True)
    assert snapshot(reg.root) == before
    assert not (reg.root / "exports").exists()
    assert reg.predict("sentiment", TEXTS)  # still loads


def test_an_export_through_a_link_to_the_registry_is_refused(reg, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(reg.root, target_is_directory=True)
    before = snapshot(reg.root)
    with pytest.raises(InvalidParameterError, match="must lie outside the registry"):
        reg.export_peft("sentiment", link, overwrite=True)
    assert snapshot(reg.root) == before


@pytest.mark.parametrize("content", ["notes", "registry", "subfolder", "file"])
def test_overwrite_replaces_only_an_earlier_export(reg, tmp_path, content):
    target = tmp_path / "target"
    if content == "file":
        target.write_text("precious")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("precious")
        if content == "registry":  # looks like an export, but is a registry
            (target / ADAPTER_CONFIG).write_text("{}")
            (target / "registry.json").write_text("{}")
        if content == "subfolder":
            (target / ADAPTER_CONFIG).write_text("{}")
            (target / "data").mkdir()
            (target / "data" / "rows.csv").write_text("precious")
    before = snapshot(tmp_path / "target") if target.is_dir() else target.read_bytes()
    with pytest.raises(FileExistsError, match=r"overwrite replaces only a folder that an earlier export wrote"):
        reg.export_peft("sentiment", target, overwrite=True)
    assert (snapshot(target) if target.is_dir() else target.read_bytes()) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_keeps_the_old_export_when_the_new_one_cannot_be_put_in_place(reg, tmp_path, monkeypatch):
    import os

    out = reg.export_peft("sentiment", tmp_path / "export")
    before = snapshot(out)
    real_replace, calls = os.replace, []

    def fail_into_place(src, dst):  # the first move onto the export's path fails (a full disk, a crash)
        calls.append((src, dst))
        if str(dst) == str(out) and sum(str(d) == str(out) for _, d in calls) == 1:
            raise OSError("injected failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_into_place)
    with pytest.raises(OSError, match="injected failure"):
        reg.export_peft("sentiment", out, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    reg.export_peft("sentiment", out, overwrite=True)  # an export is replaced whole, and nothing is left beside it
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("setting", [{"pooling": "cls"}])
def test_an_exported_head_is_refused_on_a_backbone_that_pools_otherwise(reg, tmp_path, tiny_backbone, setting):
    """The same weights pooled another way make other features: the exported head was imported on them (only
    the weights' hash was compared) and answered other labels than the registry it came from."""
    out = reg.export_peft("sentiment", tmp_path / "export")
    other = Registry.create(tmp_path / "other", BackboneConfig(name_or_path=tiny_backbone, **{"max_length": 64,
                                                                                              **setting}),
                            device="cpu")
    manifest = (other.root / "registry.json").read_bytes()
    (name,) = setting
    with pytest.raises(BackboneMismatchError, match=f"{name} .*->.*pass a spec and labelled train data"):
        other.import_peft(out)
    assert (other.root / "registry.json").read_bytes() == manifest and other.tasks() == []
    # With training data the adapter is kept and a new head is fitted on this backbone's features.
    info = other.import_peft(out, TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(32))
    assert info.task == "s"


@pytest.mark.parametrize("pattern, layers", [(r".*\.(query|value)", None), (r".*\.1\.attention\.self\.(query|value)",
                                                                            [1])])
def test_a_folder_whose_target_modules_is_a_pattern_imports_the_modules_its_weights_adapt(reg, tmp_path, pattern,
                                                                                         layers):
    """peft matches a string ``target_modules`` as a regular expression against whole module paths; it was read
    as a list of its characters, and the import refused the folder as one for another backbone."""
    features = saved_peft_adapter(reg.backbone.config.name_or_path, tmp_path / "regex", r=4, lora_alpha=8,
                                  target_modules=pattern)
    info = reg.import_peft(tmp_path / "regex", TaskSpec("regex", labels=["neg", "pos"]), toy_sentiment(16))
    assert info.adapter["target_modules"] == ["query", "value"] and info.adapter["layers"] == layers
    torch.testing.assert_close(reg.embed(TEXTS, "regex"), features, rtol=1e-5, atol=1e-5)


def test_a_pattern_that_adapts_no_set_of_modules_in_a_set_of_layers_is_refused(reg, tmp_path):
    """query in layer 0 and value in layer 1 only: plain LoRA on target modules and layers cannot say that."""
    saved_peft_adapter(reg.backbone.config.name_or_path, tmp_path / "regex", r=4,
                       target_modules=r".*\.0\.attention\.self\.query|.*\.1\.attention\.self\.value")
    manifest = (reg.root / "registry.json").read_bytes()
    with pytest.raises(DataError, match="do not fit"):
        reg.import_peft(tmp_path / "regex", TaskSpec("regex", labels=["neg", "pos"]), toy_sentiment(16))
    assert (reg.root / "registry.json").read_bytes() == manifest and "regex" not in reg.tasks()


@pytest.mark.parametrize("extra", ["notes.txt", "optimizer.pt"])
def test_overwrite_refuses_a_folder_with_files_no_export_writes(reg, tmp_path, extra):
    """An earlier export with the user's notes beside it, or a Trainer checkpoint (adapter_config.json with
    optimizer.pt, trainer_state.json, ...): overwrite deleted the files an export never wrote."""
    out = reg.export_peft("sentiment", tmp_path / "export")
    (out / extra).write_text("precious")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=f"holds {extra!r}, which an export does not write"):
        reg.export_peft("sentiment", out, overwrite=True)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_card_of_a_cut_backbone_loads_the_layers_the_registry_runs(tmp_path, tiny_backbone):
    """A registry on the first layer of a 2-layer model: the card's snippet loaded all layers, and PEFT computed
    other features than the registry, without a word."""
    import re

    from peft import PeftModel
    from transformers import AutoModel

    reg = Registry.create(tmp_path / "cut", BackboneConfig(name_or_path=tiny_backbone, max_length=64,
                                                           num_hidden_layers=1), device="cpu")
    reg.add_task(TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(32), training=FAST)
    out = reg.export_peft("s", tmp_path / "export")
    call = re.search(r"AutoModel\.from_pretrained\((.*?)\), \"<this folder>\"", (out / CARD).read_text()).group(1)
    assert call == f'"{tiny_backbone}", num_hidden_layers=1, dtype=torch.float32'
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone, num_hidden_layers=1), str(out)).eval()
    batch = reg.backbone.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        pooled = reg.backbone.pool(model(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(pooled, reg.embed(TEXTS, "s"), rtol=1e-5, atol=1e-5)


def test_the_card_of_a_half_precision_registry_loads_the_backbone_in_its_dtype(tmp_path, tiny_backbone):
    """A registry on a bfloat16 backbone: the card's snippet loaded float32 weights, so PEFT computed features
    the registry never saw (and at twice the memory)."""
    import re

    from peft import PeftModel
    from transformers import AutoModel

    reg = Registry.create(tmp_path / "bf16", BackboneConfig(name_or_path=tiny_backbone, max_length=64,
                                                            dtype="bfloat16"), device="cpu")
    reg.add_task(TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(32), training=FAST)
    out = reg.export_peft("s", tmp_path / "export")
    card = (out / CARD).read_text()
    call = re.search(r"AutoModel\.from_pretrained\((.*?)\), \"<this folder>\"", card).group(1)
    assert call == f'"{tiny_backbone}", dtype=torch.bfloat16' and "import torch\n" in card
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_backbone, dtype=torch.bfloat16), str(out)).eval()
    batch = reg.backbone.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        pooled = reg.backbone.pool(model(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(pooled.float(), reg.embed(TEXTS, "s").float(), rtol=0, atol=0)


def test_a_head_that_does_not_fit_the_exported_labels_is_refused_in_words(reg, tmp_path):
    """A label added to cmtl_task.json by hand: the two-output head met a three-label spec and torch's
    'size mismatch' escaped from load_state_dict."""
    out = reg.export_peft("sentiment", tmp_path / "export")
    task = json.loads((out / TASK).read_text())
    task["spec"]["labels"].append("neutral")
    (out / TASK).write_text(json.dumps(task))
    manifest = (reg.root / "registry.json").read_bytes()
    with pytest.raises(DataError, match=r"cmtl_head.safetensors.*does not fit .*3 outputs.*data to fit a new head"):
        reg.import_peft(out, name="copy")
    assert (reg.root / "registry.json").read_bytes() == manifest and "copy" not in reg.tasks()


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, tiny_backbone) -> str:
    """``tiny_backbone`` saved in bfloat16, as many checkpoints on the Hub are."""
    from transformers import AutoModel, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-bert-bf16")
    AutoModel.from_pretrained(tiny_backbone, dtype=torch.float32).to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_backbone).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("dtype", ["float32", "auto", "bfloat16"])
def test_the_card_snippet_runs_and_loads_the_backbone_in_the_registry_dtype(tmp_path, bf16_checkpoint, dtype):
    """The snippet as written, run: "auto" wrote ``dtype=torch.auto`` (an AttributeError), and "float32" wrote no
    dtype, so transformers 5 (whose default is the checkpoint's own precision) loaded a bfloat16 checkpoint in
    bfloat16, features the float32 registry never computed."""
    import re

    reg = Registry.create(tmp_path / dtype, BackboneConfig(name_or_path=bf16_checkpoint, max_length=64, dtype=dtype),
                          device="cpu")
    reg.add_task(TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(32), training=FAST)
    out = reg.export_peft("s", tmp_path / "export")
    snippet = re.search(r"```python\n(.*?)```", (out / CARD).read_text(), re.S).group(1)
    scope: dict = {}
    exec(snippet.replace('"<this folder>"', repr(str(out))), scope)  # noqa: S102  (the card's own code)
    model = scope["model"].eval()
    assert next(model.base_model.model.parameters()).dtype == reg.backbone.dtype
    batch = reg.backbone.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        pooled = reg.backbone.pool(model(**batch).last_hidden_state, batch["attention_mask"])
    torch.testing.assert_close(pooled.float(), reg.embed(TEXTS, "s").float(), rtol=1e-5, atol=1e-5)


def test_the_card_of_a_registry_recorded_before_dtypes_loads_the_checkpoint_precision():
    """A backbone record without a dtype is a registry that loaded "auto" (cmtl.registry.manifest)."""
    from cmtl import AdapterConfig
    from cmtl.integrations.peft_folder import _card

    card = _card(TaskSpec("s", labels=["neg", "pos"]), "base", {"name_or_path": "base"}, AdapterConfig(), {})
    assert 'AutoModel.from_pretrained("base", dtype="auto")' in card and "import torch" not in card


def test_an_export_is_refused_by_a_registry_on_the_same_weights_with_another_tokenizer(reg, tmp_path, tiny_backbone):
    from tests.registry.test_registry_safety import uncased_copy

    out = reg.export_peft("sentiment", tmp_path / "export")
    cased = uncased_copy(tiny_backbone, tmp_path / "cased")
    other = Registry.create(tmp_path / "other", BackboneConfig(name_or_path=cased, max_length=64), device="cpu")
    with pytest.raises(BackboneMismatchError, match="another tokenizer"):
        other.import_peft(out)
    assert other.tasks() == []
