"""Encoder families outside peft's target table get LoRA targets, from Python and from the shell."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cmtl.cli import app
from cmtl.core.adapters import AdapterBank, AdapterConfig, default_targets
from cmtl.errors import DataError, InvalidParameterError
from tests.conftest import toy_sentiment

SMALL = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _config(family: str):
    import transformers as tf

    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    if family == "mpnet":
        return tf.MPNetConfig(**SMALL)
    if family == "albert":
        return tf.AlbertConfig(embedding_size=16, **SMALL)
    return tf.ModernBertConfig(pad_token_id=0, bos_token_id=101, eos_token_id=102, cls_token_id=101,
                               sep_token_id=102, **SMALL)


@pytest.fixture(scope="module", params=["distilbert", "mpnet", "albert", "modernbert"])
def family(request, tmp_path_factory):
    """(family, folder) of a tiny random encoder of that family, with the MiniLM tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    from cmtl.core.backbone import DEFAULT_BACKBONE, resolve_path

    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    AutoModel.from_config(_config(request.param)).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_path(DEFAULT_BACKBONE), local_files_only=True).save_pretrained(path)
    return request.param, path


def test_each_family_adds_a_task_from_the_shell(family, tmp_path):
    name, path = family
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in toy_sentiment(32)) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["init", str(tmp_path / "reg"), "--backbone", str(path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["add-task", str(tmp_path / "reg"), "s", "--train", str(rows), "--epochs", "1",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    from cmtl import Registry

    reg = Registry.open(tmp_path / "reg", device="cpu")
    expected = {"distilbert": ["q_lin", "v_lin"], "mpnet": ["q", "v"], "albert": ["query", "value"],
                "modernbert": ["Wqkv"]}[name]
    assert reg.current("s").adapter["target_modules"] == expected
    assert set(reg.predict("s", ["a lovely film", "an awful film"])) <= {"neg", "pos"}


def test_target_modules_and_layers_from_the_shell(tmp_path, tiny_backbone):
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in toy_sentiment(32)) + "\n")
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(tmp_path / "reg"), "--backbone", tiny_backbone]).exit_code == 0
    result = runner.invoke(app, ["add-task", str(tmp_path / "reg"), "s", "--train", str(rows), "--epochs", "1",
                                 "--target-modules", "query,key,value", "--layers", "1", "--rank", "4",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    from cmtl import Registry

    adapter = Registry.open(tmp_path / "reg", device="cpu").current("s").adapter
    assert (adapter["target_modules"], adapter["layers"], adapter["r"]) == (["key", "query", "value"], [1], 4)
    result = runner.invoke(app, ["add-task", str(tmp_path / "reg"), "t", "--train", str(rows), "--epochs", "1",
                                 "--target-modules", "q_lin", "--no-progress"])
    assert result.exit_code == 1
    assert "Target modules ['q_lin'] are not linear layers" in result.output and "'query'" in result.output


def test_albert_refuses_a_subset_of_its_shared_layers(family):
    name, path = family
    if name != "albert":
        pytest.skip("ALBERT only")
    from transformers import AutoModel

    bank = AdapterBank(AutoModel.from_pretrained(path))
    with pytest.raises(InvalidParameterError, match="shares one set of weights across its layers"):
        bank.add("a", AdapterConfig(layers=(1,)))
    assert bank.names == []


class _Mystery(nn.Module):
    def __init__(self, names: tuple[str, ...], fused: bool = False):
        super().__init__()
        self.config = type("Config", (), {"model_type": "mystery"})()
        for n in names:
            self.add_module(n, nn.Linear(8, 24 if fused else 8))


def test_unknown_families_are_found_by_name_and_shape_or_refused_with_the_layers():
    assert default_targets(_Mystery(("q_proj", "k_proj", "v_proj", "o_proj"))) == ("q_proj", "v_proj")
    assert default_targets(_Mystery(("qkv",), fused=True)) == ("qkv",)
    with pytest.raises(DataError, match=r"--target-modules.*\['dense_a', 'dense_b'\]"):
        default_targets(_Mystery(("dense_a", "dense_b")))


def test_stored_factors_are_checked_against_dotted_targets(tiny_backbone, tmp_path):
    """A target named by its dotted suffix (BERT's ``attention.output.dense``, which the defaults study
    of #21 favours) accepts that module's factors after a save, and still refuses the feed-forward
    ``output.dense``, which shares its last name."""
    from transformers import AutoModel

    from cmtl.core.adapters import check_adapter_state
    from cmtl.errors import CorruptFileError

    encoder = AutoModel.from_pretrained(tiny_backbone)
    bank = AdapterBank(encoder)
    config = bank.add("x", AdapterConfig(r=2, target_modules=("query", "key", "value", "attention.output.dense")))
    state = bank.state_dict("x")
    assert any(".attention.output.dense.lora_A" in k for k in state)
    check_adapter_state(state, config, encoder, tmp_path / "adapter.safetensors")
    stray = {**state, "base_model.model.encoder.layer.0.output.dense.lora_A.weight": torch.zeros(2, 64)}
    with pytest.raises(CorruptFileError, match="output.dense.lora_A.*not a LoRA factor"):
        check_adapter_state(stray, config, encoder, tmp_path / "adapter.safetensors")


def test_a_task_on_a_dotted_target_reopens(tmp_path, tiny_backbone):
    """Before the fix, a version adapting ``attention.output.dense`` trained and saved, then failed to
    load ("not a LoRA factor of the adapted modules"): its own registry could not open it."""
    from cmtl import BackboneConfig, Registry, TaskSpec
    from tests.conftest import FAST

    reg = Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    adapter = AdapterConfig(r=2, target_modules=("query", "value", "attention.output.dense"))
    info = reg.add_task(TaskSpec("s", labels=["neg", "pos"]), train=toy_sentiment(32), training=FAST, adapter=adapter)
    assert info.adapter["target_modules"] == ["attention.output.dense", "query", "value"]
    texts = ["a lovely film", "an awful film"]
    again = Registry.open(tmp_path / "reg", device="cpu")
    assert again.predict_proba("s", texts).tolist() == reg.predict_proba("s", texts).tolist()
