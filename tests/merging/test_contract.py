"""One contract for every merge method (cmtl.merging.METHODS and PEFT_METHODS): on tensors, and through
Registry.merge: a stored, reloadable, deterministic entry whose adapter has the members' shape."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from cmtl import AdapterConfig, BackboneConfig, Registry, TaskSpec, TrainConfig
from cmtl.merging import METHODS, PEFT_METHODS, MergeConfig, merge_deltas
from cmtl.merging.methods import READS
from tests.conftest import toy_sentiment

TEXTS = ["a great film", "an awful film", "the plot and acting"]


def knobs(method: str, **kwargs) -> MergeConfig:
    """``method``'s config; the methods that read ``drop`` (DARE's) are given 0.5, the others no drop at all."""
    return MergeConfig(method=method, **({"drop": 0.5} if method in READS["drop"] else {}), **kwargs)


def deltas(seed: int, modules=("q", "v", "k")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(6, 5, generator=g, dtype=torch.float64) for m in modules}


# --- on tensors: cmtl's own methods -------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_merged_deltas_keep_modules_shapes_and_are_finite(method):
    merged = merge_deltas([deltas(0), deltas(1), deltas(2)], knobs(method))
    assert sorted(merged) == ["k", "q", "v"]
    for m, d in merged.items():
        assert d.shape == (6, 5) and d.dtype == torch.float64 and torch.isfinite(d).all(), m
        assert d.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_same_config_same_merge_whatever_the_module_order(method):
    config = knobs(method, seed=3)
    a, b = deltas(0), deltas(1)
    first = merge_deltas([a, b], config)
    shuffled = [dict(random.Random(i).sample(list(d.items()), len(d))) for i, d in enumerate((a, b))]
    for m, d in merge_deltas(shuffled, config).items():
        torch.testing.assert_close(d, first[m], rtol=0, atol=0)
    if method.startswith("dare"):  # the seed is what fixes DARE's drops
        other = merge_deltas([a, b], knobs(method, seed=4))
        assert not torch.equal(other["q"], first["q"])


@pytest.mark.parametrize("method", METHODS)
def test_scale_multiplies_the_merged_delta(method):
    a, b = deltas(0), deltas(1)
    one = merge_deltas([a, b], knobs(method, scale=1.0))
    three = merge_deltas([a, b], knobs(method, scale=3.0))
    for m in one:
        torch.testing.assert_close(three[m], 3.0 * one[m])


@pytest.mark.parametrize("method", METHODS)
def test_zero_deltas_merge_to_zero(method):
    zero = {m: torch.zeros_like(d) for m, d in deltas(0).items()}
    for d in merge_deltas([zero, zero], knobs(method)).values():
        assert torch.equal(d, torch.zeros_like(d))


@pytest.mark.parametrize("method", METHODS)
def test_merged_deltas_refuse_one_adapter_and_other_modules(method):
    config = MergeConfig(method=method)
    with pytest.raises(ValueError, match="at least two"):
        merge_deltas([deltas(0)], config)
    with pytest.raises(ValueError, match="other modules"):
        merge_deltas([deltas(0), deltas(1, modules=("q", "v"))], config)


# --- through the registry: every method, peft's included ------------------------------------------------


@pytest.fixture(scope="module")
def members(tmp_path_factory, tiny_backbone) -> Registry:
    """Two tasks with adapters on the same modules and rank; the merges are written into it (distinct names)."""
    root = tmp_path_factory.mktemp("contract") / "reg"
    reg = Registry.create(root, BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    quick = TrainConfig(max_steps=4, batch_size=8, learning_rate=2e-2, progress=False)
    adapter = AdapterConfig(r=4, alpha=8)
    reg.add_task(TaskSpec("a", labels=["neg", "pos"]), toy_sentiment(24), toy_sentiment(8, 1), training=quick,
                 adapter=adapter)
    reg.add_task(TaskSpec("b", labels=["pos", "neg"]), toy_sentiment(24, 2), toy_sentiment(8, 3), training=quick,
                 adapter=adapter)
    return reg


@pytest.mark.parametrize("method", METHODS + PEFT_METHODS)
def test_every_method_stores_a_deterministic_reloadable_entry(members, method):
    reg = members
    name = method.replace("_", "-")
    record = reg.merge(["a", "b"], name, method)
    assert record["config"]["method"] == method and record["tasks"] == ["a", "b"]
    assert record["members"] == [{"task": "a", "version": 1}, {"task": "b", "version": 1}]
    error = record["reconstruction_error"]
    assert math.isfinite(error["mean"]) and 0 <= error["mean"] <= error["max"]
    member = reg.adapter_state("a")
    merged = reg.adapter_state("a", merge=name)
    assert merged.keys() == member.keys()  # the members' modules, as LoRA factors
    for k, v in merged.items():
        assert torch.isfinite(v).all() and v.shape[1 if ".lora_A." in k else 0] == member[k].shape[
            1 if ".lora_A." in k else 0], k
    torch.testing.assert_close(reg.adapter_state("b", merge=name), merged, rtol=0, atol=0)  # one adapter for both
    probabilities = {t: reg.predict_proba(t, TEXTS, merge=name) for t in ("a", "b")}
    for p in probabilities.values():
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    again = reg.merge(["a", "b"], f"{name}-again", method)
    for k, v in reg.adapter_state("a", merge=f"{name}-again").items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=0)  # same members, same knobs: same adapter
    assert again["reconstruction_error"] == error
    reopened = Registry.open(reg.root, device="cpu")
    for t, p in probabilities.items():
        np.testing.assert_allclose(reopened.predict_proba(t, TEXTS, merge=name), p, rtol=0, atol=1e-6)
    assert reopened.spec("b", merge=name).labels == ("pos", "neg")  # each task keeps its own head and labels
