"""The frozen-layer cache is exact on every encoder and decoder family cmtl knows, or it is refused.

For each family a tiny random model (hidden 32, 3 layers) gets a LoRA adapter on its top layer;
the cached path (hidden states after the frozen layers, padded by :func:`cmtl.data.examples.batches`, then
:meth:`Backbone.embed` on the layers above) must give the pooled vectors of the full forward pass
within 1e-5, on batches that mix rows of different lengths. A family cmtl cannot split is refused
with a logged reason, and training still runs through the full forward pass.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from types import SimpleNamespace

import pytest
import torch

from cmtl import AdapterConfig, BackboneConfig, Registry, TaskSpec
from cmtl.core.adapters import AdapterBank
from cmtl.core.backbone import Backbone
from cmtl.data import Encoded, batches
from cmtl.training.caching import cache_prefix, maybe_cache
from tests.conftest import FAST, toy_sentiment

VOCAB = 120
LAYERS = 3
SMALL = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=128)


def _family(name: str):
    """(config, model class, pad id, LoRA target modules) of a tiny random encoder of one family."""
    import transformers as tf

    if name == "bert":
        return tf.BertConfig(vocab_size=VOCAB, **SMALL), tf.BertModel, 0, ("query", "value")
    if name == "roberta":
        return tf.RobertaConfig(vocab_size=VOCAB, pad_token_id=1, **SMALL), tf.RobertaModel, 1, ("query", "value")
    if name == "xlm-roberta":
        return (tf.XLMRobertaConfig(vocab_size=VOCAB, pad_token_id=1, **SMALL), tf.XLMRobertaModel, 1,
                ("query", "value"))
    if name == "electra":  # embedding_size != hidden_size: the embeddings are projected up
        return (tf.ElectraConfig(vocab_size=VOCAB, embedding_size=16, **SMALL), tf.ElectraModel, 0,
                ("query", "value"))
    if name == "deberta-v2":  # relative attention with buckets, a normed relative table and the layer-0 conv
        config = tf.DebertaV2Config(vocab_size=VOCAB, relative_attention=True, position_buckets=8,
                                    pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", position_biased_input=False,
                                    conv_kernel_size=3, max_relative_positions=-1, **SMALL)
        return config, tf.DebertaV2Model, 0, ("query_proj", "value_proj")
    if name == "mpnet":
        return tf.MPNetConfig(vocab_size=VOCAB, pad_token_id=1, **SMALL), tf.MPNetModel, 1, ("q", "v")
    if name == "distilbert":
        config = tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=LAYERS, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=128)
        return config, tf.DistilBertModel, 0, ("q_lin", "v_lin")
    if name == "albert":
        return tf.AlbertConfig(vocab_size=VOCAB, embedding_size=16, **SMALL), tf.AlbertModel, 0, ("query", "value")
    if name == "modernbert":  # a sliding window shorter than the rows, so local layers see the window
        config = tf.ModernBertConfig(vocab_size=VOCAB, local_attention=8, pad_token_id=0, bos_token_id=2,
                                     eos_token_id=3, cls_token_id=2, sep_token_id=3, **SMALL)
        return config, tf.ModernBertModel, 0, ("Wqkv",)
    llama_like = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=1)
    if name == "llama":
        return tf.LlamaConfig(**llama_like), tf.LlamaModel, 0, ("q_proj", "v_proj")
    if name == "mistral":  # every layer sees a sliding window shorter than the rows
        return tf.MistralConfig(sliding_window=8, **llama_like), tf.MistralModel, 0, ("q_proj", "v_proj")
    if name == "qwen2":  # the bottom layer full attention, the ones above a sliding window
        config = tf.Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **llama_like)
        return config, tf.Qwen2Model, 0, ("q_proj", "v_proj")
    if name == "qwen3":  # normed queries and keys inside attention
        return tf.Qwen3Config(head_dim=8, **llama_like), tf.Qwen3Model, 0, ("q_proj", "v_proj")
    if name == "gpt2":  # learned positions; Conv1D layers with a fused query/key/value projection
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=128, bos_token_id=1,
                               eos_token_id=1)
        return config, tf.GPT2Model, 0, ("c_attn",)
    raise ValueError(name)


DECODER_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]
FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "mpnet", "distilbert", "albert", "modernbert",
            *DECODER_FAMILIES]
#: Families whose layers share weights: an adapter on the top layer changes the layers below too.
REFUSED = {"albert"}
#: peft 0.21 finds no layer index in ALBERT's module names (``albert_layer_groups.0.albert_layers.0``), so
#: ``AdapterConfig(layers=...)`` attaches nothing; the cache is tested on the bare backbone for it. (Top-level
#: layer lists such as ModernBERT's and the decoders' ``layers.2`` are found: cmtl names peft's ``layers_pattern``.)
NO_LAYER_LORA = {"albert"}


def tiny_backbone(name: str, seed: int = 0) -> tuple[Backbone, tuple[str, ...]]:
    config, model_class, pad, targets = _family(name)
    torch.manual_seed(seed)
    encoder = model_class(config).eval().requires_grad_(False)
    pooling = "last" if name in DECODER_FAMILIES else "mean"
    backbone = Backbone(config=BackboneConfig(name_or_path=f"tiny-{name}", pooling=pooling), encoder=encoder,
                        tokenizer=SimpleNamespace(pad_token_id=pad), sha256="-")
    return backbone, targets


def rows(n: int, seed: int) -> Encoded:
    """Token ids of very different lengths (4 to 30), none of them a pad or special id."""
    rng = random.Random(seed)
    ids = [[rng.randrange(5, VOCAB) for _ in range(rng.randint(4, 30))] for _ in range(n)]
    return Encoded(ids, None, torch.zeros(n, dtype=torch.long))


def attach_adapter(backbone: Backbone, targets: tuple[str, ...]) -> AdapterConfig:
    """A LoRA adapter on the top layer with nonzero B (a fresh adapter would be the identity), active."""
    adapter = AdapterConfig(r=2, layers=(LAYERS - 1,), target_modules=targets, dropout=0.0)
    bank = AdapterBank(backbone.encoder)
    bank.add("task", adapter)
    for p in bank.parameters("task"):
        p.data.normal_(0, 0.5)
        p.requires_grad_(False)
    bank.activate("task")
    return adapter


def pooled_pairs(plain: Encoded, cached: Encoded, backbone: Backbone, order: list[int], batch_size: int):
    cpu = torch.device("cpu")
    with torch.no_grad():
        for (_, full, _), (_, fast, _) in zip(batches(plain, order, batch_size, backbone.pad_id, cpu),
                                              batches(cached, order, batch_size, backbone.pad_id, cpu)):
            assert "input_ids" not in fast and full["attention_mask"].min() == 0  # the cached path, padded rows
            yield backbone.embed(**full), backbone.embed(**fast)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_path_matches_the_full_forward_or_is_refused(family, caplog):
    backbone, targets = tiny_backbone(family)
    if family in NO_LAYER_LORA:
        adapter = AdapterConfig(r=2, layers=(LAYERS - 1,), target_modules=targets)
    else:
        adapter = attach_adapter(backbone, targets)
    enc = rows(24, seed=1)
    with caplog.at_level(logging.INFO, logger="cmtl.training.caching"):
        cached, none = maybe_cache([enc, None], backbone, adapter, 100, batch_size=5)
    assert none is None
    if family in REFUSED:
        assert cached is enc and cached.prefix is None
        assert "Not caching" in caplog.text and "share" in caplog.text
        return
    assert cached.prefix is not None and cached.prefix_layers == LAYERS - 1, caplog.text
    order = list(range(24))
    random.Random(2).shuffle(order)  # other batches than the cache was built with
    for full, fast in pooled_pairs(enc, cached, backbone, order, 8):
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - REFUSED))
def test_run_layers_resumes_at_every_layer(family):
    backbone, _ = tiny_backbone(family)
    _, inputs, _ = next(batches(rows(6, seed=3), list(range(6)), 6, backbone.pad_id, torch.device("cpu")))
    mask = inputs["attention_mask"]
    real = mask.bool()
    with torch.no_grad():
        whole = backbone.encoder(**inputs).last_hidden_state
        for split in range(1, LAYERS):
            low = backbone.run_layers(None, mask, stop=split, input_ids=inputs["input_ids"])
            high = backbone.run_layers(low, mask, start=split)
            torch.testing.assert_close(high[real], whole[real], atol=1e-5, rtol=1e-5)


def test_refused_families_say_why():
    backbone, _ = tiny_backbone("albert")
    assert not backbone.splittable
    assert "share" in backbone.split_refusal
    with pytest.raises(NotImplementedError, match="share"):
        backbone.run_layers(None, torch.ones(1, 4, dtype=torch.long), stop=1, input_ids=torch.ones(1, 4).long())


def skew_resumed_layers(backbone: Backbone, skew=lambda out: out + 1e-3) -> None:
    """Make this backbone's layers above a cached prefix off by ``skew`` (default 1e-3, as a family cmtl
    splits wrongly would)."""
    run_layers = backbone.run_layers

    def off_by_a_little(hidden, attention_mask, **kwargs):
        out = run_layers(hidden, attention_mask, **kwargs)
        return skew(out) if kwargs.get("start", 0) > 0 else out

    backbone.run_layers = off_by_a_little  # this instance only


def test_a_cache_that_disagrees_with_the_full_forward_is_dropped(caplog):
    backbone, targets = tiny_backbone("bert")
    adapter = attach_adapter(backbone, targets)
    skew_resumed_layers(backbone)
    enc = rows(12, seed=4)
    with caplog.at_level(logging.WARNING, logger="cmtl.training.caching"):
        (out,) = maybe_cache([enc], backbone, adapter, 100)
    assert out is enc and out.prefix is None
    assert "Not caching" in caplog.text and "differ" in caplog.text


@pytest.mark.parametrize("relative,kept", [(3e-6, True), (1e-3, False)])
def test_the_cache_allows_float_noise_relative_to_the_largest_component(relative, kept):
    """A deep model's float32 rounding is relative to the scale of its values: SmolLM2's 26 cached layers
    differ from the full forward by 2.9e-5 on pooled vectors whose largest component is 38. Such noise keeps
    the cache; an error of 1e-3 of the scale (a wrong mask or position does far worse) drops it."""
    backbone, targets = tiny_backbone("bert")
    adapter = attach_adapter(backbone, targets)
    pool = backbone.pool
    backbone.pool = lambda hidden, mask: pool(hidden, mask) * 50  # large components, both paths
    skew_resumed_layers(backbone, lambda out: out + relative * out.abs().max())  # the cached path only
    (out,) = maybe_cache([rows(12, seed=4)], backbone, adapter, 100)
    assert (out.prefix is not None) is kept


def test_cache_prefix_stores_each_row_unpadded(tmp_path):
    backbone, _ = tiny_backbone("deberta-v2")
    enc = rows(9, seed=5)
    cached = cache_prefix(enc, backbone, 2, batch_size=4)
    assert [len(p) for p in cached.prefix] == enc.lengths()


def _saved_backbone(family: str, folder) -> BackboneConfig:
    """A tiny random encoder of ``family`` saved with the MiniLM tokenizer (a registry loads both)."""
    from transformers import AutoTokenizer

    from cmtl.core.backbone import DEFAULT_BACKBONE, resolve_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_path(DEFAULT_BACKBONE), local_files_only=True)
    config, model_class, _, _ = _family(family)
    config.vocab_size = tokenizer.vocab_size
    config.pad_token_id = tokenizer.pad_token_id
    if family in ("distilbert", "mpnet", "modernbert", "deberta-v2"):
        config.type_vocab_size = 0
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    torch.manual_seed(0)
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return BackboneConfig(name_or_path=str(folder), max_length=64)


def _train_twice(config: BackboneConfig, adapter: AdapterConfig, folder, caplog, patch=None):
    """Train one task with the cache off, then on: (adapter state, probabilities) of each, in that order."""
    spec = TaskSpec("sentiment", labels=["neg", "pos"])
    outcomes = []
    for mb in (0, 64):
        reg = Registry.create(folder / f"reg{mb}", config, device="cpu")
        if patch is not None:
            patch(reg.backbone)
        with caplog.at_level(logging.INFO, logger="cmtl.training.caching"):
            reg.add_task(spec, toy_sentiment(24), validation=toy_sentiment(8, 1), adapter=adapter,
                         training=dataclasses.replace(FAST, epochs=2, cache_frozen_mb=mb))
        outcomes.append((reg.adapter_state("sentiment", 1), reg.predict_proba("sentiment", ["a lovely film", "awful"])))
    (a, pa), (b, pb) = outcomes
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(pa), torch.as_tensor(pb), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["electra", "deberta-v2", "mpnet"])
def test_training_on_the_cache_gives_the_same_adapter(family, tmp_path, caplog):
    """The three families the cache used to crash on or get wrong train on it, to the adapter the
    full forward pass gives."""
    _, _, _, targets = _family(family)
    adapter = AdapterConfig(r=2, layers=(LAYERS - 1,), target_modules=targets, dropout=0.0)
    _train_twice(_saved_backbone(family, tmp_path / "backbone"), adapter, tmp_path, caplog)
    assert "Caching the 2 frozen layers" in caplog.text and "Not caching" not in caplog.text


def test_training_falls_back_to_the_full_forward_when_the_check_fails(tmp_path, tiny_config, caplog):
    adapter = AdapterConfig(r=2, layers=(1,), target_modules=("query", "value"), dropout=0.0)
    _train_twice(tiny_config, adapter, tmp_path, caplog, patch=skew_resumed_layers)
    assert "Not caching the 1 frozen layers" in caplog.text and "Caching" not in caplog.text


def test_the_cache_is_built_under_the_adapter_being_trained(tmp_path, tiny_config):
    """A task trained after another task whose adapter covers the frozen layers gets the adapter the
    full forward pass gives (the prefix must not carry the other task's adapter)."""
    states = []
    for mb in (0, 64):
        reg = Registry.create(tmp_path / f"reg{mb}", tiny_config, device="cpu")
        reg.add_task(TaskSpec("first", labels=["neg", "pos"]), toy_sentiment(24), validation=toy_sentiment(8, 1),
                     training=dataclasses.replace(FAST, epochs=2, learning_rate=5e-2))
        reg.add_task(TaskSpec("upper", labels=["neg", "pos"]), toy_sentiment(24, 2), validation=toy_sentiment(8, 3),
                     adapter=AdapterConfig(r=2, layers=(1,), dropout=0.0),
                     training=dataclasses.replace(FAST, epochs=2, cache_frozen_mb=mb))
        states.append(reg.adapter_state("upper", 1))
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], atol=1e-4, rtol=1e-4)
