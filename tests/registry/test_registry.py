"""Registry: create/open, add, predict, evaluate, lineage, persistence, and every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from cmtl import (
    AdapterConfig,
    BackboneConfig,
    BackboneMismatchError,
    CorruptFileError,
    DataError,
    Registry,
    RegistryError,
    TaskExistsError,
    TaskNotFoundError,
    TaskSpec,
    TrainConfig,
    TrainingDivergedError,
)
from cmtl.registry.store import MANIFEST
from tests.conftest import FAST, QV, toy_sentiment


@pytest.fixture
def reg_copy(tmp_path, sentiment_registry):
    shutil.copytree(sentiment_registry, tmp_path / "reg")
    return tmp_path / "reg"


def manifest_bytes(root) -> bytes:
    return (root / MANIFEST).read_bytes()


def test_add_predict_evaluate(registry):
    info = registry.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), train=toy_sentiment(96),
                             validation=toy_sentiment(32, 1), adapter=QV, training=FAST)
    assert (info.task, info.version, info.parent, info.current) == ("sentiment", 1, None, True)
    assert info.metrics["validation_accuracy"] >= 0.9
    assert info.trainable_parameters > 0 and info.bytes_on_disk > 0
    preds = registry.predict("sentiment", ["a great film", "an awful film"])
    assert preds == ["pos", "neg"]
    assert registry.predict("sentiment", "a superb story") == ["pos"]
    proba = registry.predict_proba("sentiment", ["a great film", "an awful film"])
    assert proba.shape == (2, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    metrics = registry.evaluate("sentiment", toy_sentiment(40, 2))
    assert metrics["n"] == 40 and metrics["accuracy"] >= 0.9 and 0 <= metrics["macro_f1"] <= 1


def test_add_task_trains_the_head_at_head_learning_rate(tmp_path, tiny_config):
    spec, texts = TaskSpec("s", labels=["neg", "pos"]), ["a great film", "an awful film"]
    heads, proba = {}, {}
    for name, lr, head_lr in [("a", 2e-2, 1e-9), ("b", 5e-3, 1e-9), ("c", 2e-2, None)]:
        reg = Registry.create(tmp_path / name, tiny_config, device="cpu")
        training = TrainConfig.from_dict({**FAST.to_dict(), "epochs": 1, "learning_rate": lr,
                                          "head_learning_rate": head_lr})
        reg.add_task(spec, train=toy_sentiment(32), adapter=QV, training=training)
        heads[name] = reg._runtime.heads[reg._runtime.task(reg, "s", 1)].linear.weight.detach().clone()
        proba[name] = reg.predict_proba("s", texts)
    torch.testing.assert_close(heads["a"], heads["b"], rtol=0, atol=1e-6)  # both the fresh head: barely moved
    assert not np.allclose(proba["a"], proba["b"], atol=1e-6)  # while the adapters trained at their own rates
    assert not torch.allclose(heads["a"], heads["c"], atol=1e-4)  # without it the head trains at learning_rate


def test_only_the_new_adapter_and_head_train(registry):
    before = {k: v.clone() for k, v in registry.backbone.encoder.state_dict().items() if "lora_" not in k}
    registry.add_task(TaskSpec("a", labels=["neg", "pos"]), train=toy_sentiment(32), training=FAST)
    a_state = registry.adapter_state("a")
    texts = ["a great film", "an awful film"]
    a_proba = registry.predict_proba("a", texts)
    lora_b = [v for k, v in a_state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have trained"
    registry.add_task(TaskSpec("b", labels=["neg", "pos"]), train=toy_sentiment(32, 3), training=FAST)
    after = {k.replace(".base_layer.", "."): v for k, v in registry.backbone.encoder.state_dict().items()}
    for k, v in before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)
    for k, v in registry.adapter_state("a").items():  # a's loaded adapter, not a copy read again
        torch.testing.assert_close(v, a_state[k], rtol=0, atol=0)
    np.testing.assert_array_equal(registry.predict_proba("a", texts), a_proba)
    assert not any(p.requires_grad for p in registry.backbone.encoder.parameters())
    assert not registry.backbone.encoder.training


@pytest.mark.parametrize("kind", ["dataset", "dataframe", "csv", "jsonl", "list"])
def test_data_sources(registry, tmp_path, kind):
    import datasets

    rows = [{"sentence": r["text"], "y": r["label"]} for r in toy_sentiment(24)]
    data = {
        "dataset": lambda: datasets.Dataset.from_list(rows),
        "dataframe": lambda: pd.DataFrame(rows),
        "csv": lambda: (pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False), tmp_path / "d.csv")[1],
        "jsonl": lambda: (pd.DataFrame(rows).to_json(tmp_path / "d.jsonl", orient="records", lines=True),
                          str(tmp_path / "d.jsonl"))[1],
        "list": lambda: rows,
    }[kind]()
    spec = TaskSpec("t", labels=["neg", "pos"], text_column="sentence", label_column="y")
    info = registry.add_task(spec, train=data, training=TrainConfig(max_steps=2, progress=False))
    # Without validation data, 20 % of the rows are held out to stop on (validation_fraction).
    assert info.training["examples"] == 19 and info.metrics["validation_n"] == 5
    assert registry.evaluate("t", data)["n"] == 24


def test_reopen_same_predictions_in_new_process(sentiment_registry):
    texts = ["a great film", "an awful film", "the plot and acting"]
    expected = Registry.open(sentiment_registry, device="cpu").predict_proba("sentiment", texts).tolist()
    code = textwrap.dedent(f"""
        import json, os
        os.environ["HF_HUB_OFFLINE"] = "1"
        from cmtl import Registry
        reg = Registry.open({str(sentiment_registry)!r}, device="cpu")
        print(json.dumps(reg.predict_proba("sentiment", {texts!r}).tolist()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_seeded_training_is_reproducible(tmp_path, tiny_config):
    states = []
    for i in range(2):
        reg = Registry.create(tmp_path / f"r{i}", tiny_config, device="cpu")
        reg.add_task(TaskSpec("s", labels=["neg", "pos"]), train=toy_sentiment(32), training=FAST)
        states.append(reg.adapter_state("s"))
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)


def test_versions_rollback_remove(reg_copy):
    reg = Registry.open(reg_copy, device="cpu")
    assert reg.tasks() == ["sentiment"]
    [v1] = reg.versions("sentiment")
    assert v1.current and v1.version == 1
    with pytest.raises(TaskNotFoundError, match=r"no version 7\. Versions: \[1\]"):
        reg.rollback("sentiment", 7)
    assert reg.rollback("sentiment", 1).version == 1
    reg.remove_task("sentiment")
    assert reg.tasks() == [] and not (reg_copy / "tasks" / "sentiment").exists()
    assert Registry.open(reg_copy, device="cpu").tasks() == []


def test_multi_label_regression_and_pairs(registry):
    rows = [{"text": r["text"], "tags": [r["label"], "film"] if "film" in r["text"] else [r["label"]]}
            for r in toy_sentiment(64)]
    spec = TaskSpec("tags", labels=["neg", "pos", "film"], problem_type="multi_label", label_column="tags")
    registry.add_task(spec, train=rows, training=FAST)
    out = registry.predict("tags", ["a great film"])
    assert isinstance(out[0], list) and set(out[0]) <= {"neg", "pos", "film"}
    assert registry.predict_proba("tags", ["x"]).shape == (1, 3)
    assert {"micro_f1", "macro_f1", "exact_match"} <= set(registry.evaluate("tags", rows))

    reg_rows = [{"text": r["text"], "label": 1.0 if r["label"] == "pos" else -1.0} for r in toy_sentiment(64)]
    registry.add_task(TaskSpec("score", problem_type="regression"), train=reg_rows, training=FAST)
    [value] = registry.predict("score", ["a great film"])
    assert isinstance(value, float)
    assert registry.evaluate("score", reg_rows)["mse"] < 1.0

    pair_rows = [{"a": r["text"], "b": "the movie", "label": r["label"]} for r in toy_sentiment(32)]
    spec = TaskSpec("pair", labels=["neg", "pos"], text_column="a", text_pair_column="b")
    registry.add_task(spec, train=pair_rows, training=FAST)
    assert registry.predict("pair", ["a great film"], ["the movie"])[0] in {"neg", "pos"}
    with pytest.raises(DataError, match="takes text pairs"):
        registry.predict("pair", ["a great film"])


def test_stores_no_pickles(sentiment_registry):
    suffixes = {p.suffix for p in sentiment_registry.rglob("*") if p.is_file() and p.name != ".lock"}
    assert suffixes == {".json", ".safetensors", ".parquet"}
    manifest = json.loads(manifest_bytes(sentiment_registry))
    record = manifest["tasks"]["sentiment"]["versions"][0]
    assert manifest["backbone"]["sha256"] and record["data_fingerprint"] and record["cmtl_version"]
    assert set(record["files"]) == {"adapter.safetensors", "head.safetensors", "replay.parquet", "holdout.parquet",
                                    "features.safetensors"}
    assert {"version", "parent", "created", "adapter", "training", "metrics"} <= set(record)


# --- bad input: a clear error, and nothing changes -----------------------------------------


@pytest.mark.parametrize(
    "train, spec_kwargs, error, match",
    [
        ([{"text": "hi", "label": "maybe"}], {}, DataError, r"Labels 'maybe' in the data.*not in its label set \['neg', 'pos'\]"),
        ([], {}, DataError, "empty"),
        ([{"body": "hi", "label": "pos"}], {}, DataError, r"Column\(s\) \['text'\] not found.*Columns present"),
        ([{"text": None, "label": "pos"}], {}, DataError, "must hold strings"),
        ([{"text": "hi", "label": 5}], {}, DataError, "indices 0..1"),
    ],
)
def test_bad_data_changes_nothing(reg_copy, train, spec_kwargs, error, match):
    reg = Registry.open(reg_copy, device="cpu")
    before = manifest_bytes(reg_copy)
    with pytest.raises(error, match=match):
        reg.add_task(TaskSpec("new", labels=["neg", "pos"], **spec_kwargs), train=train, training=FAST)
    assert manifest_bytes(reg_copy) == before and reg.tasks() == ["sentiment"]
    assert "new__v1" not in reg._runtime.bank  # no half-added adapter left loaded (internal: no public view)


def test_duplicate_and_unknown_task(reg_copy):
    reg = Registry.open(reg_copy, device="cpu")
    with pytest.raises(TaskExistsError, match="Task 'sentiment' already exists"):
        reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), train=toy_sentiment(8))
    with pytest.raises(TaskNotFoundError, match=r"Task 'ner' not found\. Known tasks: \['sentiment'\]"):
        reg.predict("ner", ["x"])
    with pytest.raises(KeyError):  # TaskNotFoundError is a KeyError too
        reg.evaluate("ner", toy_sentiment(4))


def test_nan_loss_stops_and_keeps_old_state(reg_copy):
    reg = Registry.open(reg_copy, device="cpu")
    before = manifest_bytes(reg_copy)
    rows = [{"text": r["text"], "label": 3e38} for r in toy_sentiment(16)]  # squared error overflows to inf
    with pytest.raises(TrainingDivergedError, match="diverged at step 0.*Nothing was saved"):
        reg.add_task(TaskSpec("huge", problem_type="regression"), train=rows, training=FAST)
    assert manifest_bytes(reg_copy) == before and reg.tasks() == ["sentiment"]
    assert not (reg_copy / "tasks" / "huge").exists()
    assert reg.predict("sentiment", ["a great film"]) == ["pos"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_adapter_file_is_detected(reg_copy, damage):
    path = reg_copy / "tasks" / "sentiment" / "v1" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    reg = Registry.open(reg_copy, device="cpu")
    with pytest.raises(CorruptFileError, match="corrupt or truncated|missing"):
        reg.predict("sentiment", ["a great film"])


def test_backbone_mismatch(reg_copy, other_tiny_backbone):
    with pytest.raises(BackboneMismatchError, match="was built on weights hash"):
        Registry.open(reg_copy, backbone=other_tiny_backbone, device="cpu")


def test_opening_with_other_settings_on_the_same_weights_is_refused(tmp_path, tiny_backbone):
    """A registry pooled by CLS, opened with a BackboneConfig that pools by mean (or cuts texts shorter): the
    weights hash the same, but every head would read other features and answer wrongly, silently."""
    Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_backbone, pooling="cls", max_length=64),
                    device="cpu")
    for other in (BackboneConfig(name_or_path=tiny_backbone, pooling="mean", max_length=64),
                  BackboneConfig(name_or_path=tiny_backbone, pooling="cls", max_length=32)):
        with pytest.raises(BackboneMismatchError, match="settings than given"):
            Registry.open(tmp_path / "reg", other, device="cpu")
    same = BackboneConfig(name_or_path=tiny_backbone, pooling="cls", max_length=64)
    assert Registry.open(tmp_path / "reg", same, device="cpu").backbone.config.pooling == "cls"


def test_a_record_without_dtype_opens_in_the_checkpoints_own_precision(tmp_path, tiny_backbone):
    """Registries written before cmtl recorded a dtype loaded a checkpoint in its stored precision (transformers'
    default) and hashed those weights: they still open, and a BackboneConfig naming that precision fits."""
    import json

    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path / "bf16-bert"
    AutoModel.from_pretrained(tiny_backbone, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_backbone).save_pretrained(folder)
    reg = Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=str(folder), max_length=64, dtype="auto"),
                          device="cpu")
    assert reg.backbone.dtype == torch.bfloat16
    manifest = json.loads((tmp_path / "reg" / "registry.json").read_text())
    del manifest["backbone"]["dtype"]  # as an older cmtl wrote it
    (tmp_path / "reg" / "registry.json").write_text(json.dumps(manifest))
    assert Registry.open(tmp_path / "reg", device="cpu").backbone.dtype == torch.bfloat16
    given = BackboneConfig(name_or_path=str(folder), max_length=64, dtype="bfloat16")
    assert Registry.open(tmp_path / "reg", given, device="cpu").backbone.sha256 == reg.backbone.sha256
    with pytest.raises(BackboneMismatchError, match="weights hash"):  # float32 weights hash otherwise
        Registry.open(tmp_path / "reg", BackboneConfig(name_or_path=str(folder), max_length=64), device="cpu")


def test_create_and_open_errors(tmp_path, tiny_config, sentiment_registry):
    with pytest.raises(RegistryError, match="No registry at"):
        Registry.open(tmp_path / "nothing")
    with pytest.raises(RegistryError, match="already holds a registry"):
        Registry.create(sentiment_registry, tiny_config)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(RegistryError, match="not empty"):
        Registry.create(tmp_path / "full", tiny_config)


def test_bad_configs():
    with pytest.raises(ValueError, match="Task name 'a b'"):
        TaskSpec("a b", labels=["x", "y"])
    with pytest.raises(ValueError, match="'problem_type' parameter of TaskSpec 't' must be one of"):
        TaskSpec("t", labels=["x", "y"], problem_type="ranking")
    with pytest.raises(ValueError, match="duplicate labels"):
        TaskSpec("t", labels=["x", "x"])
    for r in (0, True):
        with pytest.raises(ValueError, match="'r' parameter of AdapterConfig must be a positive integer"):
            AdapterConfig(r=r)
    with pytest.raises(ValueError, match="'epochs' parameter of TrainConfig must be a positive integer"):
        TrainConfig(epochs=0)
    for knob in ({"epochs": True}, {"batch_size": True}, {"patience": True}, {"cache_frozen_mb": False}):
        with pytest.raises(ValueError, match=f"'{next(iter(knob))}' parameter of TrainConfig must be"):
            TrainConfig(**knob)  # a bool is an int to Python: epochs=True trained one epoch
    from cmtl.serving.server import ServeConfig

    with pytest.raises(ValueError, match="'max_texts' parameter of ServeConfig must be a positive integer"):
        ServeConfig(max_texts=True)
    with pytest.raises(ValueError, match="'pooling' parameter of BackboneConfig must be one of"):
        BackboneConfig(pooling="max")


# --- crash safety ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["mid-manifest", "before-manifest"])
def test_kill_during_write_keeps_previous_state(reg_copy, where):
    texts = ["a great film", "an awful film"]
    expected = Registry.open(reg_copy, device="cpu").predict_proba("sentiment", texts)
    before = manifest_bytes(reg_copy)
    proc = subprocess.run([sys.executable, "-m", "tests.kill_during_write", str(reg_copy), "add", where],
                          capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert manifest_bytes(reg_copy) == before
    reg = Registry.open(reg_copy, device="cpu")
    assert reg.tasks() == ["sentiment"]
    np.testing.assert_allclose(reg.predict_proba("sentiment", texts), expected, rtol=0, atol=1e-6)
    # The next writer clears the leftovers and the same task can be added.
    reg.add_task(TaskSpec("second", labels=["neg", "pos"]), train=toy_sentiment(16),
                 training=TrainConfig(max_steps=2, progress=False))
    assert reg.tasks() == ["second", "sentiment"]
    assert not [p for p in (reg_copy / "tasks").rglob(".staging-*")]


def test_add_task_leaves_the_callers_rng_alone(registry):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    registry.add_task(TaskSpec("s", labels=["neg", "pos"]), train=toy_sentiment(16),
                      training=TrainConfig(max_steps=2, progress=False))
    torch.testing.assert_close(torch.rand(3), expected)


def test_two_creates_racing_on_one_folder_keep_the_first_registry(tmp_path, tiny_config, monkeypatch):
    """A second Registry.create on the same folder checked it was empty, then loaded its backbone while the first
    created the registry and added a task: its empty manifest must not replace the first's (the task's files would
    then be swept as unreferenced)."""
    from cmtl.registry import facade

    load, root = facade.load_backbone, tmp_path / "reg"

    def racing(config, device):
        monkeypatch.setattr(facade, "load_backbone", load)  # the first create runs unpatched
        first = Registry.create(root, tiny_config, device="cpu")
        first.add_task(TaskSpec("a", labels=["neg", "pos"]), toy_sentiment(16), training=FAST)
        return load(config, device=device)

    monkeypatch.setattr(facade, "load_backbone", racing)
    with pytest.raises(RegistryError, match="already holds a registry"):
        Registry.create(root, tiny_config, device="cpu")
    assert Registry.open(root, device="cpu").tasks() == ["a"]
