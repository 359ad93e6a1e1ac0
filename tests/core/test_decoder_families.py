"""Decoder (causal-LM) backbones: the whole lifecycle on a tiny random Llama, Qwen2, Mistral and GPT-2,
last-token pooling that ignores padding, a pad token for tokenizers without one, and clear errors for
folders that hold no usable backbone. (The frozen-layer cache per decoder family is tested beside the
encoders' in tests/training/test_layer_cache.py.)"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from cmtl import AdapterConfig, BackboneConfig, Registry, TaskSpec, TrainConfig, UpdateConfig

from cmtl.core.backbone import load_backbone
from cmtl.errors import BackboneMismatchError, BackboneNotFoundError, InvalidParameterError
from cmtl.serving.engine import InferenceEngine
from tests.conftest import DECODERS, FAST, TOPICS, byte_level_tokenizer, save_tiny_decoder, toy_sentiment, toy_topics

TEXTS = ["the movie was great", "a goal and the day", "an awful plot", "song and band tonight", "it was superb",
         "the film was really quite dreadful and the acting was poor and the story nasty"]


@pytest.fixture(scope="module", params=DECODERS)
def decoder(request, tmp_path_factory) -> tuple[str, str]:
    """(family, folder) of a tiny random decoder of that family."""
    return request.param, save_tiny_decoder(request.param, tmp_path_factory.mktemp(request.param))


def _config(path: str, **kwargs) -> BackboneConfig:
    return BackboneConfig(name_or_path=path, max_length=64, **kwargs)


def test_a_decoder_pools_its_last_token_and_pads_with_its_end_of_text_token(decoder):
    family, path = decoder
    backbone = load_backbone(_config(path), device="cpu")
    assert backbone.causal and backbone.config.pooling == "last"
    assert backbone.tokenizer.pad_token == "<|endoftext|>"
    assert len(backbone.tokenizer) == len(byte_level_tokenizer())  # no token added to the vocabulary
    assert backbone.pad_id == backbone.tokenizer.eos_token_id
    ids = backbone.tokenize(TEXTS)["input_ids"]
    width = max(map(len, ids))
    padded = torch.full((len(ids), width), backbone.pad_id)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, seq in enumerate(ids):
        padded[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
    with torch.no_grad():
        batch = backbone.embed(padded, mask)
        alone = torch.cat([backbone.embed(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
                           for seq in ids])
        last = backbone.encoder(input_ids=torch.tensor([ids[0]])).last_hidden_state[0, -1]
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)  # a padded batch pools as each text alone
    torch.testing.assert_close(batch[0], last, atol=1e-5, rtol=1e-5)


def test_last_pooling_finds_the_last_real_token_on_either_side():
    from cmtl.core.backbone import Backbone

    backbone = Backbone(config=BackboneConfig(pooling="last"), encoder=None, tokenizer=None, sha256="-")
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float).reshape(2, 4, 1)  # (B, T, H): value = position
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert backbone.pool(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert backbone.pool(hidden, left).flatten().tolist() == [3.0, 7.0]


def test_the_whole_lifecycle_runs_on_each_decoder_family(decoder, tmp_path, caplog):
    family, path = decoder
    reg = Registry.create(tmp_path / "reg", _config(path), device="cpu")
    assert reg.recorded_backbone["pooling"] == "last"
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(64), validation=toy_sentiment(32, 1),
                 training=FAST)
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), validation=toy_topics(15, 1),
                 adapter=AdapterConfig(r=4, alpha=8), training=FAST)
    with caplog.at_level(logging.INFO, logger="cmtl.training.caching"):
        reg.add_task(TaskSpec("upper", labels=["neg", "pos"]), toy_sentiment(48, 2), validation=toy_sentiment(16, 3),
                     adapter=AdapterConfig(r=2, alpha=2, layers=(1,)), training=FAST)
    assert "Caching the 1 frozen layers" in caplog.text  # the cached path agreed with the full forward
    expected = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    assert reg.current("sentiment").adapter["target_modules"] == expected
    upper_keys = reg.adapter_state("upper", 1)
    assert upper_keys and all(".1." in key for key in upper_keys)  # layer 1 only (peft's layers_pattern)
    # an update with replay and a penalty, then a merge of the two tasks
    update = reg.update_task("sentiment", toy_sentiment(48, 5), validation=toy_sentiment(32, 6),
                             config=UpdateConfig(penalty="ewc"), training=dataclasses.replace(FAST, epochs=2),
                             promote=True)
    assert update.version.version == 2 and update.version.current
    reg.merge(["sentiment", "topic"], "both", method="linear")
    # mixed-task batches in the engine equal one task at a time, merged entry included
    engine = InferenceEngine(tmp_path / "reg", device="cpu", max_batch_size=4)
    tasks = ["sentiment", "topic", "upper", "sentiment", "upper", "topic"]
    mixed = engine.logits(tasks, TEXTS)
    for task in ("sentiment", "topic", "upper"):
        rows = [i for i, t in enumerate(tasks) if t == task]
        alone = reg.predict_proba(task, [TEXTS[i] for i in rows])
        got = torch.stack([mixed[i] for i in rows]).softmax(-1).numpy()
        np.testing.assert_allclose(got, alone, atol=1e-5)
    merged = engine.logits(["topic", "sentiment"], TEXTS[:2], merges=["both", "both"])
    np.testing.assert_allclose(merged[0].softmax(-1).numpy(), reg.predict_proba("topic", TEXTS[:1], merge="both")[0],
                               atol=1e-5)
    # the HTTP service answers as the registry does
    from starlette.testclient import TestClient

    from cmtl.serving.server import ServeConfig, create_app

    with TestClient(create_app(engine, ServeConfig(poll_seconds=3600))) as client:
        body = client.post("/v1/predict", json={"task": "topic", "texts": TEXTS}).json()
    assert [p["label"] for p in body["predictions"]] == reg.predict("topic", TEXTS)
    # drift: the same kind of text passes, another kind is flagged
    assert reg.monitor("sentiment", [r["text"] for r in toy_sentiment(40, 9)]).drift is False
    assert reg.monitor("sentiment", [f"quarterly earnings rose {i} percent in europe" for i in range(40)]).drift
    # a new process reads the same answers
    reopened = Registry.open(tmp_path / "reg", device="cpu")
    np.testing.assert_allclose(reopened.predict_proba("topic", TEXTS), reg.predict_proba("topic", TEXTS), atol=1e-6)


def test_joint_training_and_lwf_run_on_a_decoder(tiny_llama, tmp_path):
    from cmtl.multitask.config import MultiTaskConfig

    reg = Registry.create(tmp_path / "reg", _config(tiny_llama), device="cpu")
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(48), validation=toy_sentiment(16, 1),
                 training=dataclasses.replace(FAST, epochs=2))
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(30), training=TrainConfig(max_steps=2, progress=False))
    reg.train_group("both", {"sentiment": (toy_sentiment(48), toy_sentiment(16, 1)),
                             "topic": (toy_topics(45), toy_topics(15, 1))},
                    config=MultiTaskConfig(steps=6, eval_every=3), training=FAST)
    assert set(reg.predict("topic", TEXTS, merge="both")) <= set(TOPICS)
    result = reg.update_task("sentiment", toy_sentiment(32, 7), validation=toy_sentiment(16, 8),
                             config=UpdateConfig(penalty="lwf"), training=dataclasses.replace(FAST, epochs=1),
                             promote=True)
    assert result.version.version == 2


def test_a_half_precision_backbone_trains_float32_adapters(tiny_llama, tmp_path, caplog):
    reg = Registry.create(tmp_path / "reg", _config(tiny_llama, dtype="bfloat16"), device="cpu")
    full = load_backbone(_config(tiny_llama), device="cpu")
    assert reg.backbone.encoder.embed_tokens.weight.dtype == torch.bfloat16
    assert reg.backbone.sha256 != full.sha256  # the precision is part of the weights' identity
    with caplog.at_level(logging.INFO, logger="cmtl.training.caching"):
        reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(48),
                     validation=toy_sentiment(16, 1), adapter=AdapterConfig(layers=(1,)),
                     training=dataclasses.replace(FAST, epochs=2))
    assert "Caching the 1 frozen layers" in caplog.text  # within 4 eps of bfloat16 of the full forward
    state = reg.adapter_state("sentiment", 1)
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert reg.predict_proba("sentiment", TEXTS[:2]).dtype == np.float32
    engine = InferenceEngine(tmp_path / "reg", device="cpu")  # per-row float32 factors on bfloat16 layers
    np.testing.assert_allclose(torch.stack(engine.logits(["sentiment"] * 3, TEXTS[:3])).softmax(-1).numpy(),
                               reg.predict_proba("sentiment", TEXTS[:3]), atol=1e-6)  # rounded once, as peft
    with pytest.raises(BackboneMismatchError):
        Registry.open(tmp_path / "reg", _config(tiny_llama), device="cpu")  # float32 weights hash otherwise
    with pytest.raises(InvalidParameterError, match="dtype"):
        BackboneConfig(dtype="int8")


def test_opening_with_another_pooling_is_refused(tiny_llama, tmp_path):
    """The same weights pooled otherwise give other features: the heads would answer wrongly."""
    Registry.create(tmp_path / "reg", _config(tiny_llama), device="cpu")
    with pytest.raises(BackboneMismatchError, match="pooling 'last' -> 'mean'|pooling 'mean' -> 'last'"):
        Registry.open(tmp_path / "reg", _config(tiny_llama, pooling="mean"), device="cpu")
    reopened = Registry.open(tmp_path / "reg", _config(tiny_llama), device="cpu")  # None resolves to 'last'
    assert reopened.backbone.config.pooling == "last"
    with pytest.raises(BackboneMismatchError, match="pooling 'last' -> 'mean'"):
        InferenceEngine(tmp_path / "reg", device="cpu", backbone=_config(tiny_llama, pooling="mean"))


def test_folders_without_a_usable_backbone_get_clear_errors(tmp_path, tiny_llama):
    import shutil

    import transformers as tf

    empty = tmp_path / "no-weights"
    shutil.copytree(tiny_llama, empty)
    for weights in empty.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(BackboneNotFoundError, match="cmtl never downloads models"):
        load_backbone(str(empty), device="cpu")
    seq2seq = tmp_path / "t5"
    tf.T5Config(vocab_size=400, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(seq2seq)
    byte_level_tokenizer().save_pretrained(seq2seq)
    with pytest.raises(BackboneNotFoundError, match="encoder-decoder"):
        load_backbone(str(seq2seq), device="cpu")
    vision = tmp_path / "vit"
    tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32).save_pretrained(vision)
    with pytest.raises(BackboneNotFoundError, match="text"):
        load_backbone(str(vision), device="cpu")
    assert not (tmp_path / "reg").exists()
    with pytest.raises(BackboneNotFoundError):
        Registry.create(tmp_path / "reg", str(vision), device="cpu")
    assert not (tmp_path / "reg" / "registry.json").exists()


def test_a_gguf_file_that_cannot_be_read_gets_a_clear_error(tmp_path, monkeypatch):
    import importlib.util

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    if importlib.util.find_spec("gguf") is not None:  # cmtl[test] brings it
        with pytest.raises(BackboneNotFoundError, match="Cannot load backbone .*model.gguf"):
            load_backbone(str(fake), device="cpu")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(BackboneNotFoundError, match=r"pip install 'cmtl\[gguf\]'"):
        load_backbone(str(fake), device="cpu")


def test_init_on_a_decoder_from_the_shell(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from cmtl.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["init", str(tmp_path / "reg"), "--backbone", tiny_llama, "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "reg" / "registry.json").read_text())["backbone"]
    assert (recorded["pooling"], recorded["dtype"]) == ("last", "bfloat16")


@pytest.mark.parametrize("backbone_fixture", ["tiny_llama", "tiny_backbone"])
def test_gradient_checkpointing_gives_the_same_gradients_and_training(backbone_fixture, request, tmp_path):
    from cmtl.core.adapters import AdapterBank

    path = request.getfixturevalue(backbone_fixture)
    backbone = load_backbone(_config(path), device="cpu")
    bank = AdapterBank(backbone.encoder)
    bank.add("task", AdapterConfig(dropout=0.0))
    bank.activate("task")
    params = bank.parameters("task")
    for p in params:
        p.data.normal_(0, 0.1)
    ids = backbone.tokenize(TEXTS[:3])["input_ids"]
    width = max(map(len, ids))
    padded = torch.tensor([seq + [backbone.pad_id] * (width - len(seq)) for seq in ids])
    mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in ids])
    grads = []
    for on in (False, True):
        with backbone.checkpointed(on):
            assert backbone.checkpointing is on
            backbone.embed(padded, mask).square().sum().backward()
        grads.append([p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    assert not backbone.checkpointing
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)
    # a whole add_task: the same adapter with and without
    states = []
    for on in (False, True):
        reg = Registry.create(tmp_path / f"reg-{on}", _config(path), device="cpu")
        reg.add_task(TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(32), validation=toy_sentiment(16, 1),
                     training=dataclasses.replace(FAST, epochs=2, gradient_checkpointing=on))
        states.append(reg.adapter_state("s", 1))
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], atol=1e-5, rtol=1e-4)


def test_a_decoder_adapter_exports_to_peft_with_its_layout(tmp_path):
    """GPT-2: Conv1D targets (fan_in_fan_out) and a top-level layer list ``h`` (layers_pattern); PeftModel
    reads the exported folder and gives the registry's pooled features."""
    from peft import PeftModel
    from transformers import AutoModel

    path = save_tiny_decoder("gpt2", tmp_path / "gpt2")
    reg = Registry.create(tmp_path / "reg", _config(path), device="cpu")
    reg.add_task(TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(32), validation=toy_sentiment(16, 1),
                 adapter=AdapterConfig(layers=(1,)), training=dataclasses.replace(FAST, epochs=2))
    out = reg.export_peft("s", tmp_path / "export")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["layers_pattern"], config["fan_in_fan_out"], config["layers_to_transform"]) == ("h", True, [1])
    model = PeftModel.from_pretrained(AutoModel.from_pretrained(path), str(out)).eval()
    batch = reg.backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    torch.testing.assert_close(reg.backbone.pool(hidden, batch["attention_mask"]), reg.embed(TEXTS, "s"),
                               atol=1e-5, rtol=1e-5)


def test_an_empty_text_and_a_text_pair_on_a_tokenizer_without_templates(tmp_path):
    """GPT-2's tokenizer adds no token: an empty text would give no row to pool, and a pair would lose its
    boundary; the end-of-text token stands in for both."""
    path = save_tiny_decoder("gpt2", tmp_path / "gpt2")
    backbone = load_backbone(_config(path), device="cpu")
    eos = backbone.tokenizer.eos_token_id
    assert backbone.tokenize(["", "a lovely film"])["input_ids"][0] == [eos]
    joined = backbone.tokenize(["the movie"], ["was great"])["input_ids"][0]
    alone = backbone.tokenize(["the movie", "was great"])["input_ids"]
    assert joined == alone[0] + [eos] + alone[1]
    reg = Registry.create(tmp_path / "reg", _config(path), device="cpu")
    reg.add_task(TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(32), validation=toy_sentiment(16, 1),
                 training=dataclasses.replace(FAST, epochs=1))
    np.testing.assert_allclose(reg.predict_proba("s", ["", "an awful plot"])[0], reg.predict_proba("s", [""])[0],
                               atol=1e-6)
    engine = InferenceEngine(tmp_path / "reg", device="cpu")
    np.testing.assert_allclose(engine.logits(["s"], [""])[0].softmax(-1).numpy(), reg.predict_proba("s", [""])[0],
                               atol=1e-6)


def test_layers_on_a_decoder_cmtl_does_not_follow_layer_by_layer(tmp_path):
    """Gemma (embeddings scaled inside its forward) runs whole, but layers= still finds its layer list."""
    import transformers as tf

    path = tmp_path / "gemma"
    tokenizer = byte_level_tokenizer()
    tf.GemmaModel(tf.GemmaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8,
                                 bos_token_id=0, eos_token_id=0, pad_token_id=0)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    reg = Registry.create(tmp_path / "reg", _config(str(path)), device="cpu")
    assert not reg.backbone.splittable
    reg.add_task(TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(32), validation=toy_sentiment(16, 1),
                 adapter=AdapterConfig(layers=(1,)), training=dataclasses.replace(FAST, epochs=1))
    assert all(".layers.1." in key for key in reg.adapter_state("s", 1))


def test_a_checkpoint_missing_weights_or_layers_is_refused(tmp_path, tiny_llama):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = next(broken.glob("*.safetensors"))
    state = load_file(weights)
    dropped = next(k for k in state if "layers.1.mlp.down_proj" in k)
    save_file({k: v for k, v in state.items() if k != dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(BackboneNotFoundError, match="lacks 1 weights .*down_proj.*random"):
        load_backbone(str(broken), device="cpu")
    with pytest.raises(InvalidParameterError, match="at most the 2 layers"):
        load_backbone(_config(tiny_llama, num_hidden_layers=4), device="cpu")
    with pytest.raises(InvalidParameterError, match="at least one layer"):
        AdapterConfig(layers=())


def test_a_long_first_text_leaves_room_for_its_pair_on_a_tokenizer_without_templates(tmp_path):
    """The joined pair was cut from the end: a first text of max_length tokens dropped the boundary and the whole
    second text, so a pair task saw the premise alone (two hypotheses gave the same ids). Now the longer text is
    shortened first, as the tokenizers' own longest_first truncation does."""
    path = save_tiny_decoder("gpt2", tmp_path / "gpt2")
    backbone = load_backbone(dataclasses.replace(_config(path), max_length=16), device="cpu")
    eos = backbone.tokenizer.eos_token_id
    premise = "the movie was really quite a plot and the acting was a film story " * 3
    alone = backbone.tokenize([premise, "great", "awful"])["input_ids"]
    great, awful = backbone.tokenize([premise, premise], ["great", "awful"])["input_ids"]
    assert great != awful and len(great) == len(awful) == 16
    assert great == alone[0][: 15 - len(alone[1])] + [eos] + alone[1]  # the pair kept whole, the premise cut
    long_pair = backbone.tokenize([premise], [premise])["input_ids"][0]
    assert long_pair == alone[0][:8] + [eos] + alone[0][:7]  # both long: halves, the first text's the larger
    short = backbone.tokenize(["the movie"], ["was great"])["input_ids"][0]
    assert eos in short and len(short) < 16  # what fits is not cut


def test_the_same_weights_under_another_model_config_are_refused(tiny_llama, tmp_path):
    """Only the weights and the tokenizer were hashed: a folder with the same weights but another config.json (a
    RoPE base or scaling edited in, another norm epsilon) opened the registry, and every task answered from other
    features (probabilities moved by 0.2 on the toy task). The config the backbone was built with is recorded and
    compared; a copy of the folder still opens, and so does a registry recorded without it."""
    import shutil

    from cmtl.registry.store import MANIFEST

    reg = Registry.create(tmp_path / "reg", _config(tiny_llama), device="cpu")
    reg.add_task(TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(32), validation=toy_sentiment(16, 1),
                 training=dataclasses.replace(FAST, epochs=1))
    expected = reg.predict_proba("s", TEXTS)
    same = shutil.copytree(tiny_llama, tmp_path / "moved")
    np.testing.assert_allclose(Registry.open(tmp_path / "reg", _config(str(same)), device="cpu").predict_proba(
        "s", TEXTS), expected, atol=1e-6)
    edited = shutil.copytree(tiny_llama, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": 10.0}
    (edited / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    with pytest.raises(BackboneMismatchError, match="model config.*rms_norm_eps 1e-06 -> 0.5.*rope_parameters"):
        Registry.open(tmp_path / "reg", _config(str(edited)), device="cpu")
    with pytest.raises(BackboneMismatchError, match="rms_norm_eps"):
        InferenceEngine(tmp_path / "reg", device="cpu", backbone=_config(str(edited)))
    exported = reg.export_peft("s", tmp_path / "export")
    with pytest.raises(BackboneMismatchError, match="model config.*rms_norm_eps"):
        Registry.create(tmp_path / "other", _config(str(edited)), device="cpu").import_peft(exported)
    manifest = json.loads((tmp_path / "reg" / MANIFEST).read_text())
    manifest["backbone"].pop("model_config")  # as an older cmtl wrote it
    (tmp_path / "reg" / MANIFEST).write_text(json.dumps(manifest))
    assert Registry.open(tmp_path / "reg", _config(tiny_llama), device="cpu").predict("s", TEXTS[:1])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_peft_adapter_trained_on_the_causal_lm_imports(family, tmp_path):
    """Decoder adapters are trained on the causal-LM model (LlamaForCausalLM: 'model.layers.…', GPT-2's
    'transformer.h.…'), whose module paths carry the base model's prefix; the registry's backbone is the bare
    model. The import was refused as a damaged file; the prefix is now dropped, and the registry computes the
    causal LM's last hidden states."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = save_tiny_decoder(family, tmp_path / family)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=2, lora_alpha=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval().save_pretrained(str(tmp_path / "peft"))
    reg = Registry.create(tmp_path / "reg", _config(path), device="cpu")
    reg.import_peft(tmp_path / "peft", TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(16))
    assert reg.current("s").adapter["target_modules"] == (["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"])
    ids = reg.backbone.tokenize(TEXTS)["input_ids"]
    with torch.no_grad():
        expected = torch.cat([model(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][:, -1]
                              for seq in ids])
    torch.testing.assert_close(reg.embed(TEXTS, "s"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0},
                                  {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [4.0] * 4,
                                   "original_max_position_embeddings": 12}])
def test_a_rope_that_rescales_past_its_context_does_not_make_answers_depend_on_the_batch(tmp_path, rope):
    """Dynamic RoPE recomputes its frequencies once a batch's padded width passes the context, and keeps them for
    later calls; longrope switches to its long factors there. So a text's features depended on the texts beside
    it and on earlier calls. Texts are cut where such a rope would rescale."""
    import transformers as tf

    tokenizer = byte_level_tokenizer()
    config = tf.LlamaConfig(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                            max_position_embeddings=16, rope_parameters={"rope_theta": 10000.0, **rope})
    torch.manual_seed(0)
    tf.AutoModel.from_config(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    backbone = load_backbone(BackboneConfig(name_or_path=str(tmp_path / "m"), max_length=64), device="cpu")
    limit = 16 if rope["rope_type"] == "dynamic" else 12
    assert backbone.max_tokens == limit
    short, long = "abc", "a much longer text than the context holds"
    assert len(backbone.tokenize([long])["input_ids"][0]) == limit

    def embed(texts):
        enc = backbone.tokenize(texts)
        width = max(map(len, enc["input_ids"]))
        ids = torch.tensor([[backbone.pad_id] * (width - len(x)) + x for x in enc["input_ids"]])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in enc["input_ids"]])
        with torch.inference_mode():
            return backbone.embed(input_ids=ids, attention_mask=mask)

    alone = embed([short])[0]
    torch.testing.assert_close(embed([short, long])[0], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(embed([short])[0], alone, atol=1e-6, rtol=0)  # and after a long batch
