"""cmtl.training.trainee: what the loops need of a model (forward, parameters, train/eval switch) and
the guarantee that its parameters are frozen again after a run, also when the run fails."""

from __future__ import annotations

import pytest
import torch

from cmtl.core.adapters import AdapterBank, AdapterConfig
from cmtl.core.backbone import BackboneConfig, load_backbone
from cmtl.core.heads import TaskHead
from cmtl.data import Encoded
from cmtl.training.trainee import Trainee


@pytest.fixture
def parts(tiny_backbone):
    backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone), device="cpu")
    bank = AdapterBank(backbone.encoder)
    bank.add("t", AdapterConfig(r=2, layers=(1,), dropout=0.5))
    head = TaskHead(backbone.hidden_size, 2, dropout=0.5)
    return backbone, bank, head


def lora_dropouts(bank: AdapterBank, name: str) -> list[torch.nn.Module]:
    return [m for n, m in bank.encoder.named_modules() if n.endswith(f"lora_dropout.{name}")]


def test_bank_and_key_come_together(parts):
    backbone, bank, head = parts
    with pytest.raises(ValueError, match="bank= and key= together"):
        Trainee(lambda inputs: inputs, [head], bank=bank)
    with pytest.raises(ValueError, match="bank= and key= together"):
        Trainee(lambda inputs: inputs, [head], key="t")


def test_parameters_are_the_adapters_then_the_modules_all_trainable(parts):
    backbone, bank, head = parts
    trainee = Trainee.adapter(backbone, bank, "t", head)
    params = trainee.parameters()
    lora = bank.parameters("t")
    assert len(params) == len(lora) + 2 and all(p.requires_grad for p in params)
    assert [id(p) for p in params] == [id(p) for p in lora] + [id(head.linear.weight), id(head.linear.bias)]
    frozen = [p for n, p in backbone.encoder.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)  # the backbone never trains
    assert Trainee(lambda inputs: inputs, [head]).parameters() == list(head.parameters())  # no adapter


def test_unfrozen_freezes_again_also_on_an_error(parts):
    backbone, bank, head = parts
    trainee = Trainee.adapter(backbone, bank, "t", head)
    with trainee.unfrozen() as params:
        assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for p in params)
    with pytest.raises(RuntimeError, match="boom"):
        with trainee.unfrozen() as params:
            raise RuntimeError("boom")
    assert not any(p.requires_grad for p in params)
    lora = [p for n, p in bank.encoder.named_parameters() if "lora_" in n and n.endswith(".t.weight")]
    assert lora and not any(p.requires_grad for p in lora + list(head.parameters()))


def test_set_training_switches_the_adapter_and_modules_not_the_backbone(parts):
    backbone, bank, head = parts
    trainee = Trainee.adapter(backbone, bank, "t", head)
    dropouts = lora_dropouts(bank, "t")
    assert dropouts
    trainee.set_training(True)
    assert head.training and all(m.training for m in dropouts)
    assert not backbone.encoder.training
    trainee.set_training(False)
    assert not head.training and not any(m.training for m in dropouts)


def test_logits_run_in_eval_mode_through_this_adapter(parts):
    backbone, bank, head = parts
    bank.add("other", AdapterConfig(r=2, layers=(1,)))
    with torch.no_grad():
        for p in bank.parameters("t"):
            p.add_(0.3)
    trainee = Trainee.adapter(backbone, bank, "t", head)
    trainee.set_training(True)
    bank.activate("other")  # logits() switches to the trainee's own adapter
    encoded = Encoded([[101, 2307, 102], [101, 102]], None, None)
    first = trainee.logits(encoded, pad_id=backbone.pad_id, device=torch.device("cpu"))
    second = trainee.logits(encoded, pad_id=backbone.pad_id, device=torch.device("cpu"))
    torch.testing.assert_close(first, second)  # no dropout: eval mode
    assert not head.training
    with torch.no_grad():
        ids = torch.tensor([[101, 2307, 102]])
        expected = head(backbone.embed(input_ids=ids, attention_mask=torch.ones_like(ids)))
    torch.testing.assert_close(first[0], expected[0])
    bank.activate("other")
    with torch.no_grad():
        other = head(backbone.embed(input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert not torch.allclose(other, expected)  # the adapter in use matters
