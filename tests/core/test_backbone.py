"""cmtl.core.backbone: loading offline and frozen, pooling, layer cuts, the weights hash."""

from __future__ import annotations

import pytest
import torch

from cmtl.core.backbone import BackboneConfig, load_backbone, weights_sha256
from cmtl.errors import BackboneMismatchError, BackboneNotFoundError


def test_backbone_is_frozen_and_pools(tiny_backbone):
    bb = load_backbone(BackboneConfig(name_or_path=tiny_backbone, pooling="mean"), device="cpu")
    assert not bb.encoder.training and not any(p.requires_grad for p in bb.encoder.parameters())
    hidden = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(bb.pool(hidden, mask), hidden[:, :2].mean(1))
    cls = load_backbone(BackboneConfig(name_or_path=tiny_backbone, pooling="cls"), device="cpu")
    torch.testing.assert_close(cls.pool(hidden, mask), hidden[:, 0])
    assert bb.sha256 == cls.sha256  # pooling does not change the weights


def test_backbone_never_downloads(tmp_path):
    with pytest.raises(BackboneNotFoundError, match="never downloads"):
        load_backbone("some-org/some-model-that-is-not-local", device="cpu")
    with pytest.raises(ValueError, match="Unknown embedded backbone"):
        load_backbone("embedded:bert-large", device="cpu")


@pytest.mark.parametrize("kwargs, match", [
    ({"pooling": "max"}, r"pooling.*'max'"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers.*\b0\b"),
    ({"max_length": 4}, r"max_length.*\b4\b"),
])
def test_bad_backbone_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackboneConfig(**kwargs)


def test_layer_cut_keeps_the_first_layers_and_changes_the_hash(tiny_backbone):
    full = load_backbone(BackboneConfig(name_or_path=tiny_backbone), device="cpu")
    cut = load_backbone(BackboneConfig(name_or_path=tiny_backbone, num_hidden_layers=1), device="cpu")
    assert (full.num_layers, cut.num_layers) == (2, 1)
    assert cut.sha256 != full.sha256  # a registry built on the cut refuses the full model
    ids = {"input_ids": torch.tensor([[101, 2307, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with torch.no_grad():
        after_one = full.run_layers(None, ids["attention_mask"], stop=1, input_ids=ids["input_ids"])
        torch.testing.assert_close(full.run_layers(after_one, ids["attention_mask"], start=1),
                                   full.encoder(**ids).last_hidden_state)  # two slices are the whole pass
        torch.testing.assert_close(cut.encoder(**ids).last_hidden_state, after_one)


def test_weights_hash_sees_values_not_the_wrapping(tiny_backbone):
    bb = load_backbone(BackboneConfig(name_or_path=tiny_backbone), device="cpu")
    before = weights_sha256(bb.encoder)
    assert before == bb.sha256
    with torch.no_grad():
        p = next(bb.encoder.parameters())
        p.view(-1)[0] += 1e-3
    assert weights_sha256(bb.encoder) != before
    with torch.no_grad():
        p.view(-1)[0] -= 1e-3
    assert weights_sha256(bb.encoder) == before
    bb.check_matches(before, "here")
    with pytest.raises(BackboneMismatchError, match=r"weights hash .* but registry 'x' was built on weights hash "
                                                    r"0000000000"):
        bb.check_matches("0" * 64, "registry 'x'")


def test_tokenize_truncates_to_max_length_and_joins_pairs(tiny_backbone):
    bb = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=8), device="cpu")
    out = bb.tokenize(["word " * 50, "short"])
    assert [len(ids) for ids in out["input_ids"]][0] == 8 and len(out["input_ids"][1]) < 8
    paired = bb.tokenize(["a film"], ["a plot"])
    assert paired["input_ids"][0].count(bb.tokenizer.sep_token_id) == 2
    assert set(paired["token_type_ids"][0]) == {0, 1}
    assert bb.pad_id == bb.tokenizer.pad_token_id


def test_the_tokenizer_hash_sees_the_token_ids_not_the_length_cut_or_the_folder(tiny_backbone, tmp_path):
    import json
    import shutil

    hashes = {n: load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=n)).tokenizer_sha256
              for n in (8, 64)}
    assert hashes[8] == hashes[64]  # a registry on a shorter cut imports another's exports: the same tokenizer
    moved = shutil.copytree(tiny_backbone, tmp_path / "moved")
    assert load_backbone(BackboneConfig(name_or_path=str(moved), max_length=64)).tokenizer_sha256 == hashes[64]
    tokenizer = json.loads((moved / "tokenizer.json").read_text())
    tokenizer["normalizer"]["lowercase"] = False
    (moved / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((moved / "tokenizer_config.json").read_text())
    (moved / "tokenizer_config.json").write_text(json.dumps({**config, "do_lower_case": False}))  # keeps case
    assert load_backbone(BackboneConfig(name_or_path=str(moved), max_length=64)).tokenizer_sha256 != hashes[64]


@pytest.mark.parametrize("family", ["bert", "gpt2", "mpnet"])
def test_a_text_longer_than_the_position_table_is_cut_at_its_end(family, tiny_backbone, tmp_path):
    """max_length (256 by default) above the model's absolute position table (128 here; RoBERTa and MPNet lose
    two slots to their padding offset) tokenized long texts past its end, and every batch holding one raised
    IndexError (on a GPU a device-side assert, which ends the serving process's CUDA context). Texts are now cut
    where the table ends; shorter texts are cut where they were."""
    import transformers as tf
    from transformers import AutoTokenizer

    from tests.conftest import save_tiny_decoder

    if family == "bert":
        path, limit = tiny_backbone, 128
    elif family == "gpt2":
        path, limit = save_tiny_decoder("gpt2", tmp_path / "gpt2"), 128
    else:
        path, limit = tmp_path / "mpnet", 64
        tf.MPNetModel(tf.MPNetConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=66)).save_pretrained(path)
        AutoTokenizer.from_pretrained(tiny_backbone).save_pretrained(path)
    bb = load_backbone(BackboneConfig(name_or_path=str(path), max_length=256), device="cpu")
    ids = bb.tokenize(["the movie was great " * 100, "an awful plot"])["input_ids"]
    assert len(ids[0]) == limit and len(ids[1]) < limit
    pairs = bb.tokenize(["the movie was great " * 100], ["an awful plot " * 100])["input_ids"]
    assert len(pairs[0]) == limit
    padded = torch.tensor([ids[0], ids[1] + [bb.pad_id] * (limit - len(ids[1]))])
    mask = torch.tensor([[1] * limit, [1] * len(ids[1]) + [0] * (limit - len(ids[1]))])
    with torch.no_grad():
        assert torch.isfinite(bb.embed(padded, mask)).all()
    short = load_backbone(BackboneConfig(name_or_path=str(path), max_length=16), device="cpu")
    assert len(short.tokenize(["the movie was great " * 100])["input_ids"][0]) == 16


def test_a_key_only_one_model_config_has_is_no_change_inside_nested_settings_too():
    """A newer transformers that adds a key inside a nested setting (rope_parameters, a sub-config) computes the
    same features; a value that both sides set and that differs is still a change, named by its path."""
    from cmtl.core.backbone import config_changes

    recorded = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rms_norm_eps": 1e-6}
    newer = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
             "rms_norm_eps": 1e-6, "new_flag": True}
    assert config_changes(recorded, newer) == []
    edited = {**newer, "rope_parameters": {**newer["rope_parameters"], "rope_theta": 5e5}}
    assert config_changes(recorded, edited) == ["rope_parameters.rope_theta 10000.0 -> 500000.0"]
