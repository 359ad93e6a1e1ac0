"""cmtl.core.adapters' AdapterBank: named LoRA adapters in one frozen encoder, one active at a time.

(The LoRA-key parser and the per-row hook of the same module are tested in tests/core/test_adapters.py.)
"""

from __future__ import annotations

import pytest
import torch

from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import BackboneConfig, load_backbone


def test_adapter_bank(tiny_backbone):
    bb = load_backbone(BackboneConfig(name_or_path=tiny_backbone), device="cpu")
    ids = {"input_ids": torch.tensor([[101, 2307, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    plain = bb.embed(**ids)
    bank = AdapterBank(bb.encoder)
    resolved = bank.add("first", AdapterConfig(r=2, layers=(1,)))
    assert resolved.target_modules == ("attention.output.dense", "key", "query", "value")  # BERT's default
    params = bank.parameters("first")
    assert bank.num_parameters("first") == sum(p.numel() for p in params) == 4 * (2 * 32 * 2)  # 1 layer, 4 × (A+B)
    with torch.no_grad():
        for p in params:
            p.add_(0.5)
    bank.activate("first")
    assert not torch.allclose(bb.embed(**ids), plain)
    with bank.disabled():
        torch.testing.assert_close(bb.embed(**ids), plain)
    state = bank.state_dict("first")
    bank.load("second", resolved, state)
    bank.activate("second")
    out_b = bb.embed(**ids)
    bank.activate("first")
    torch.testing.assert_close(bb.embed(**ids), out_b)
    bank.remove("first")
    bank.remove("second")
    assert bank.names == []
    torch.testing.assert_close(bb.embed(**ids), plain)


def test_a_load_that_fails_while_copying_leaves_no_half_loaded_adapter(tiny_backbone, monkeypatch):
    """Running out of memory while the weights are copied in (or any other failure there) removes the adapter
    the load had just added, as a load whose keys do not fit already did."""
    import peft

    bb = load_backbone(BackboneConfig(name_or_path=tiny_backbone), device="cpu")
    bank = AdapterBank(bb.encoder)
    resolved = bank.add("first", AdapterConfig(r=2))
    state = bank.state_dict("first")

    def short_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(peft, "set_peft_model_state_dict", short_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        bank.load("second", resolved, state)
    assert bank.names == ["first"]


def short_of_memory_at(monkeypatch, adapter: str, call: int) -> None:
    """Make peft's ``call``-th layer update for ``adapter`` run out of memory: peft has then put the
    adapter's LoRA tensors into the layers before it, and (as of 0.21) takes only its name back."""
    from peft.tuners.lora.layer import LoraLayer

    real, calls = LoraLayer.update_layer, []

    def update_layer(self, adapter_name, *args, **kwargs):
        if adapter_name == adapter:
            calls.append(adapter_name)
            if len(calls) == call:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, adapter_name, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "update_layer", update_layer)


def lora_modules(encoder: torch.nn.Module, name: str) -> list[str]:
    return [path for path, _ in encoder.named_modules() if path.endswith(f"lora_A.{name}")]


@pytest.mark.parametrize("first", [True, False], ids=["first adapter", "next adapter"])
def test_an_add_that_fails_halfway_leaves_no_lora_layers_behind(tiny_backbone, monkeypatch, first):
    """An add that fails while peft builds the adapter's layers (out of memory on the fourth) takes back
    the layers already built: before, the bank no longer listed the name but the encoder kept them, and
    their tensors were saved with every later adapter's weights, which then failed to load."""
    bb = load_backbone(BackboneConfig(name_or_path=tiny_backbone), device="cpu")
    ids = {"input_ids": torch.tensor([[101, 2307, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    plain = bb.embed(**ids)
    bank = AdapterBank(bb.encoder)
    wide = AdapterConfig(r=2, target_modules=("query", "value", "intermediate.dense"))
    if not first:
        bank.add("first", AdapterConfig(r=2, target_modules=("query", "value")))
    short_of_memory_at(monkeypatch, "second", 4)  # layer 0's three modules built, layer 1's query fails
    with pytest.raises(torch.OutOfMemoryError):
        bank.add("second", wide)
    monkeypatch.undo()
    assert bank.names == ([] if first else ["first"])
    assert lora_modules(bank.encoder, "second") == []
    if first:  # the encoder is the plain one again, so it can take an adapter as if nothing had happened
        assert not [path for path, _ in bank.encoder.named_modules() if "base_layer" in path]
        torch.testing.assert_close(bb.embed(**ids), plain)
    narrow = bank.add("second", AdapterConfig(r=2, target_modules=("query", "value")))
    assert narrow.target_modules == ("query", "value")
    assert not [k for k in bank.state_dict("second") if "intermediate" in k]
    if not first:  # the same modules as the first adapter, so the same keys in its saved weights
        assert set(bank.state_dict("second")) == set(bank.state_dict("first"))


def test_layers_the_backbone_lacks_are_refused_not_dropped(tiny_llama, tmp_path):
    """peft adapts the listed layers that exist and drops the others without a word: layers=(1, 5) on a
    2-layer backbone (the top layers of a deeper or uncut model) adapted layer 1 only, while the version
    recorded layers [1, 5]. A new adapter now names only layers the backbone has; a stored one still loads."""
    from cmtl import Registry, TaskSpec
    from cmtl.errors import InvalidParameterError
    from tests.conftest import FAST, toy_sentiment

    bb = load_backbone(BackboneConfig(name_or_path=tiny_llama), device="cpu")
    bank = AdapterBank(bb.encoder)
    with pytest.raises(InvalidParameterError, match=r"layers.*0 to 1: it has 2 layers.*\(1, 5\).*\[5\]"):
        bank.add("deep", AdapterConfig(r=2, layers=(1, 5)))
    assert bank.names == [] and lora_modules(bank.encoder, "deep") == []
    state = bank.add("top", AdapterConfig(r=2, layers=(1,)))
    stored = AdapterConfig(r=2, layers=(1, 5), target_modules=state.target_modules)  # written before the check
    bank.load("old", stored, bank.state_dict("top"))
    assert set(bank.state_dict("old")) == set(bank.state_dict("top"))
    reg = Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_llama, max_length=64), device="cpu")
    with pytest.raises(InvalidParameterError, match="layers"):
        reg.add_task(TaskSpec("s", labels=["neg", "pos"]), toy_sentiment(16), adapter=AdapterConfig(layers=(1, 5)),
                     training=FAST)
    assert reg.tasks() == []
