"""Shared fixtures: a tiny random backbone, a 2-layer MiniLM cut, toy data, registries in tmp_path."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
import random
from pathlib import Path

import pytest

from cmtl import AdapterConfig, BackboneConfig, Registry, TaskSpec, TrainConfig

POSITIVE = ["great", "lovely", "excellent", "superb", "wonderful", "fantastic"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "poor", "nasty"]
FILLER = ["the", "movie", "was", "really", "quite", "a", "plot", "and", "acting", "film", "story", "it"]


def toy_sentiment(n: int, seed: int = 0, positive: list[str] = POSITIVE, negative: list[str] = NEGATIVE) -> list[dict]:
    """Separable toy data: a positive or negative word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 5) + [rng.choice(positive if label == "pos" else negative)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


#: Train the toy tasks quickly on all their rows, for the whole cap: tests of other verbs need adapters that trained
#: (on a few toy rows the linear probe often ties or wins; tests/training/test_probe.py covers it).
FAST = TrainConfig(epochs=8, batch_size=8, learning_rate=2e-2, progress=False, patience=None,
                   validation_fraction=0.0, probe_init=False)

#: LoRA on query and value only. BERT's default adapts all four attention projections (the defaults study,
#: docs/results.md). The toy thresholds of the tests that name this were set with query/value at FAST's
#: learning rate of 2e-2, twenty times the default; with all four projections at that rate several of them
#: fail (sequential fine-tuning ends at chance on the third toy task).
QV = AdapterConfig(target_modules=("query", "value"))


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with the MiniLM tokenizer, saved to a folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from cmtl.core.backbone import DEFAULT_BACKBONE, resolve_path

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(DEFAULT_BACKBONE), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def other_tiny_backbone(tmp_path_factory, tiny_backbone) -> str:
    """Same architecture as ``tiny_backbone``, other random weights."""
    import torch
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("tiny-bert-other")
    torch.manual_seed(1)
    model = BertModel.from_pretrained(tiny_backbone)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_backbone).save_pretrained(path)
    return str(path)


#: The decoder families cmtl knows (cmtl.core.backbone._FAMILIES with causal=True), as tested.
DECODERS = ("llama", "qwen2", "mistral", "gpt2")


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer (the ``tokenizers`` package), trained on the toy words in a
    blink: an end-of-text token and no pad token, as decoders' tokenizers come."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = POSITIVE + NEGATIVE + FILLER + ["goal", "match", "team", "pasta", "bread", "soup", "song", "band", "drum",
                                            "day", "night", "quarterly", "earnings", "rose", "percent", "europe"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([" ".join(words)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def save_tiny_decoder(family: str, path: Path, seed: int = 0) -> str:
    """A 2-layer, 32-wide random decoder of ``family`` (one of :data:`DECODERS`) with
    :func:`byte_level_tokenizer`, saved to ``path``. Mistral's sliding window (4 tokens) is shorter
    than the toy texts, so its masks are exercised."""
    import torch
    import transformers as tf

    tokenizer = byte_level_tokenizer()
    small = dict(vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=0)
    llama_like = dict(small, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=128)
    config = {"llama": lambda: tf.LlamaConfig(**llama_like),
              "qwen2": lambda: tf.Qwen2Config(**llama_like),
              "mistral": lambda: tf.MistralConfig(**llama_like, sliding_window=4),
              "gpt2": lambda: tf.GPT2Config(**small, n_embd=32, n_layer=2, n_head=4, n_positions=128)}[family]()
    torch.manual_seed(seed)
    tf.AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return save_tiny_decoder("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_config(tiny_backbone) -> BackboneConfig:
    return BackboneConfig(name_or_path=tiny_backbone, max_length=64)


@pytest.fixture
def registry(tmp_path, tiny_config) -> Registry:
    return Registry.create(tmp_path / "reg", tiny_config, device="cpu")


@pytest.fixture(scope="session")
def sentiment_registry(tmp_path_factory, tiny_backbone) -> Path:
    """A registry holding one trained toy task, built once; copy it before writing to it."""
    root = tmp_path_factory.mktemp("shared") / "reg"
    reg = Registry.create(root, BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), train=toy_sentiment(96), validation=toy_sentiment(32, 1),
                 adapter=QV, training=FAST)
    return root


TOPICS = ["sport", "food", "music"]


def toy_topics(n: int, seed: int = 0) -> list[dict]:
    """Three toy topics, each with its own words."""
    rng = random.Random(seed)
    words = {"sport": ["goal", "match", "team"], "food": ["pasta", "bread", "soup"], "music": ["song", "band", "drum"]}
    rows = []
    for i in range(n):
        label = TOPICS[i % 3]
        rows.append({"text": f"a {rng.choice(words[label])} and the {rng.choice(['day', 'night'])}", "label": label})
    return rows


@pytest.fixture(scope="session")
def served(tmp_path_factory, tiny_backbone):
    """A registry with three tasks of different label counts, ranks and layers, and one merge."""
    root = tmp_path_factory.mktemp("served") / "reg"
    reg = Registry.create(root, BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    fast = dataclasses.replace(FAST, epochs=3)
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(48), validation=toy_sentiment(16, 1),
                 training=fast)
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), validation=toy_topics(15, 1),
                 adapter=AdapterConfig(r=4, alpha=8), training=fast)
    reg.add_task(TaskSpec("upper", labels=["neg", "pos"]), toy_sentiment(48, 2), validation=toy_sentiment(16, 3),
                 adapter=AdapterConfig(r=2, alpha=2, layers=(1,)), training=fast)
    reg.merge(["sentiment", "topic"], "both", method="linear")
    return root
