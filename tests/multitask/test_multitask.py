"""Joint multi-task training: samplers, loss weights and MT2ST schedules against hand values, TAG's
lookahead and group selection, and a joint run on a tiny backbone."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import threading
from typing import Sequence

import numpy as np
import pytest
import torch

from cmtl import TaskSpec, TrainConfig
from cmtl.core.adapters import AdapterBank, AdapterConfig, TaskLoRA, stack_lora
from cmtl.core.backbone import load_backbone
from cmtl.core.heads import TaskHead
from cmtl.data import Encoded, encode, read_examples
from cmtl.errors import EntryExistsError, InvalidParameterError, TrainingDivergedError
from cmtl.multitask.affinity import _adamw_lookahead, group_score, select_groups
from cmtl.multitask.config import MultiTaskConfig
from cmtl.multitask.joint import grouped_forward, train_multitask
from cmtl.multitask.schedules import UncertaintyWeighting, diminish, sampling_probabilities, switch
from cmtl.registry.reader import merge_key
from tests.conftest import QV, TOPICS, toy_sentiment, toy_topics


def test_sampling_probabilities_by_hand():
    np.testing.assert_allclose(sampling_probabilities([100, 400], "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(sampling_probabilities([100, 400], "proportional"), [0.2, 0.8])
    np.testing.assert_allclose(sampling_probabilities([100, 400], "temperature", temperature=2), [1 / 3, 2 / 3])
    np.testing.assert_allclose(sampling_probabilities([100, 400], "proportional", cap=200), [1 / 3, 2 / 3])
    np.testing.assert_allclose(sampling_probabilities([100, 400], "temperature", temperature=1),
                               sampling_probabilities([100, 400], "proportional"))
    for bad in ([0, 3], []):
        with pytest.raises(ValueError, match="at least one example"):
            sampling_probabilities(bad)
    with pytest.raises(ValueError, match="Unknown sampler"):
        sampling_probabilities([1, 2], "zipf")
    with pytest.raises(ValueError, match="temperature"):
        sampling_probabilities([1, 2], "temperature", temperature=0)


def test_mt2st_weights_by_hand():
    assert diminish(0, 0.8, 0.1, 2.0) == pytest.approx(0.8)
    assert diminish(3, 0.8, 0.1, 2.0) == pytest.approx(0.8 * math.exp(-0.9))
    assert [switch(t, 0.5, 10) for t in (0, 9, 10, 11)] == [0.5, 0.5, 0.0, 0.0]
    config = MultiTaskConfig(primary="p", schedule="diminish", gamma0={"a": 0.5}, eta=0.1, nu=1.0,
                             weights={"p": 2.0})
    assert config.gamma("p", 50, False) == 2.0  # the primary keeps its static weight
    assert config.gamma("a", 10, False) == pytest.approx(0.5 * math.exp(-1.0))
    assert config.gamma("b", 0, False) == pytest.approx(1.0)  # gamma0 defaults to 1 for unnamed auxiliaries
    adaptive = MultiTaskConfig(primary="p", schedule="adaptive_switch", gamma0=0.7)
    assert (adaptive.gamma("a", 5, False), adaptive.gamma("a", 5, True)) == (0.7, 0.0)
    with pytest.raises(ValueError, match="primary"):
        MultiTaskConfig(schedule="diminish")
    with pytest.raises(ValueError, match="switch_step"):
        MultiTaskConfig(primary="p", schedule="switch")
    with pytest.raises(ValueError, match="Uncertainty"):
        MultiTaskConfig(primary="p", schedule="diminish", weighting="uncertainty")


def test_a_task_left_out_of_a_per_task_knob_gets_that_knobs_default():
    # eta={"a": ...} names one auxiliary; "b" must decay at eta's default (0.01), as with eta unset, not at 1.
    config = MultiTaskConfig(primary="p", schedule="diminish", eta={"a": 0.1})
    default = MultiTaskConfig(primary="p", schedule="diminish")
    assert config.gamma("b", 100, False) == pytest.approx(default.gamma("b", 100, False))
    assert config.gamma("b", 100, False) == pytest.approx(math.exp(-0.01 * 100))
    assert config.gamma("a", 10, False) == pytest.approx(math.exp(-1.0))
    partial = MultiTaskConfig(primary="p", schedule="diminish", gamma0={"a": 0.5}, nu={"a": 2.0})
    assert partial.gamma("b", 100, False) == pytest.approx(math.exp(-0.01 * 100))


def test_static_weights_a_schedule_or_uncertainty_would_ignore_are_refused():
    # Under an MT2ST schedule an auxiliary's weight is gamma0 · schedule: weights={"a": 0.3} trained "a" at 1.
    with pytest.raises(ValueError, match=r"weights.*\['a'\].*gamma0"):
        MultiTaskConfig(primary="p", schedule="switch", switch_step=10, weights={"p": 2.0, "a": 0.3})
    with pytest.raises(ValueError, match=r"weights.*uncertainty"):
        MultiTaskConfig(weighting="uncertainty", weights={"a": 0.3})
    config = MultiTaskConfig(primary="p", schedule="switch", switch_step=10, weights={"p": 2.0})
    assert (config.gamma("p", 0, False), config.gamma("a", 0, False)) == (2.0, 1.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "diminish", "eta": -0.01}, r"eta.*>= 0"),  # exp(+0.01 t): the auxiliaries' weights explode
    ({"schedule": "diminish", "eta": {"a": float("nan")}}, r"eta\['a'\].*finite number >= 0"),
    ({"schedule": "diminish", "nu": 0.0}, r"nu.*> 0"),  # 0 ** -1 at step 0
    ({"schedule": "diminish", "gamma0": -1.0}, r"gamma0.*>= 0"),
    ({"schedule": "diminish", "gamma0": {1: 0.5}}, r"gamma0.*task names"),
    ({"schedule": "switch", "switch_step": 0}, r"switch_step.*positive integer"),
    ({"schedule": "adaptive_switch", "switch_patience": 0}, r"switch_patience.*positive integer"),
])
def test_mt2st_knobs_out_of_range_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskConfig(primary="p", **kwargs)


@pytest.mark.parametrize("kwargs, knobs", [
    ({"schedule": "switch", "switch_step": 10, "eta": 0.1}, "eta"),  # Switch has no decay rate
    ({"schedule": "adaptive_switch", "nu": {"a": 2.0}}, "nu"),
    ({"schedule": "diminish", "switch_step": 10}, "switch_step"),
    ({"schedule": "diminish", "switch_patience": 5}, "switch_patience"),
    ({"schedule": "none", "gamma0": 0.5}, "gamma0"),
])
def test_mt2st_knobs_the_chosen_schedule_ignores_are_refused(kwargs, knobs):
    """A knob set away from its default that the schedule never reads trained as if it were unset, silently."""
    with pytest.raises(ValueError, match=rf"\['{knobs}'\].*schedule={kwargs['schedule']!r}"):
        MultiTaskConfig(primary="p", **kwargs)
    MultiTaskConfig(primary="p", schedule="diminish", gamma0=0.5, eta=0.1, nu=2.0)  # all three apply here
    MultiTaskConfig(primary="p", schedule="adaptive_switch", gamma0=0.5, switch_patience=3)


def test_uncertainty_weighting_value_and_optimum():
    w = UncertaintyWeighting(3)
    with torch.no_grad():
        w.log_var.copy_(torch.tensor([0.0, 1.0, -1.0]))
    losses = torch.tensor([2.0, 3.0, 5.0])
    present = torch.tensor([True, True, False])
    assert w(losses, present).item() == pytest.approx(2.0 + (math.exp(-1) * 3 + 1))
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    for _ in range(2000):  # d/ds (e^{-s} L + s) = 0 at s = log L
        opt.zero_grad()
        w(losses, torch.tensor([True, True, True])).backward()
        opt.step()
    np.testing.assert_allclose(w.log_var.detach().numpy(), np.log([2.0, 3.0, 5.0]), atol=1e-3)


def test_adamw_lookahead_equals_a_real_step():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=0.01, weight_decay=0.1)
    for _ in range(2):  # with and without optimiser state
        g = torch.randn(4, 3)
        predicted = _adamw_lookahead([p], [g], opt)[0]
        p.grad = g.clone()
        opt.step()
        torch.testing.assert_close(predicted, p.detach(), atol=1e-6, rtol=1e-6)


def test_group_selection_by_hand():
    # 0 and 1 help each other, 2 helps nobody and is hurt by both.
    Z = np.array([[0.0, 0.4, -0.3],
                  [0.5, 0.0, -0.2],
                  [-0.1, -0.1, 0.0]])
    assert group_score(Z, (0, 1), 0) == 0.5 and group_score(Z, (2,), 2) == 0.0
    assert group_score(Z, (0, 1, 2), 2) == pytest.approx(-0.25)
    groups, score = select_groups(Z, 2)
    assert sorted(groups) == [(0, 1), (2,)] and score == pytest.approx(0.9)
    groups, score = select_groups(Z, 1)
    assert groups == [(0, 1, 2)] and score == pytest.approx((0.5 - 0.1) / 2 + (0.4 - 0.1) / 2 - 0.25)
    greedy, greedy_score = select_groups(Z, 2, exact_limit=0)
    assert sorted(greedy) == [(0, 1), (2,)] and greedy_score == pytest.approx(0.9)


def test_exhaustive_selection_matches_brute_force():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(4, 4))
    subsets = [s for r in range(1, 5) for s in itertools.combinations(range(4), r)]
    brute = max(sum(max(group_score(Z, s, j) for s in combo if j in s) for j in range(4))
                for k in (1, 2) for combo in itertools.combinations(subsets, k)
                if set().union(*combo) == set(range(4)))
    assert select_groups(Z, 2)[1] == pytest.approx(brute)
    assert select_groups(Z, 2, exact_limit=0)[1] <= brute + 1e-12
    with pytest.raises(ValueError, match="square"):
        select_groups(np.zeros((2, 3)), 1)


def _joint(tiny_config, dropout: float = 0.1, long_topics: bool = False):
    """A shared adapter and two heads on the tiny backbone, with their forward; ``long_topics``
    pads every third topic text with 30 more words, so mixed batches hold very different lengths."""
    backbone = load_backbone(tiny_config, device="cpu")
    bank = AdapterBank(backbone.encoder)
    torch.manual_seed(0)
    bank.add("shared", dataclasses.replace(QV, dropout=dropout))
    bank.activate("shared")
    specs = [TaskSpec("sentiment", labels=["neg", "pos"]), TaskSpec("topic", labels=TOPICS)]
    heads = [TaskHead(backbone.hidden_size, s.num_outputs, 0.0) for s in specs]

    forward = grouped_forward(backbone.embed, heads)

    def set_training(flag):
        bank.set_training("shared", flag)
        for h in heads:
            h.train(flag)

    def topics(n, seed=0):
        rows = toy_topics(n, seed)
        if long_topics:
            rows = [{**r, "text": r["text"] + " and the day" * 10} if i % 3 == 0 else r for i, r in enumerate(rows)]
        return rows

    enc = lambda rows, spec: encode(read_examples(rows, spec), spec, backbone.tokenize)  # noqa: E731
    data = [enc(toy_sentiment(64), specs[0]), enc(topics(63), specs[1])]
    val = [enc(toy_sentiment(24, 1), specs[0]), enc(topics(24, 1), specs[1])]
    shared = bank.parameters("shared")
    head_params = [p for h in heads for p in h.parameters()]
    return forward, shared, head_params, set_training, specs, data, val, backbone


@pytest.fixture
def joint(tiny_config):
    return _joint(tiny_config)


def test_joint_training_learns_both_tasks_and_measures_affinity(joint):
    forward, shared, heads, set_training, specs, data, val, backbone = joint
    training = TrainConfig(batch_size=16, learning_rate=2e-2, progress=False)
    config = MultiTaskConfig(sampler="uniform", steps=80, eval_every=40, tag_every=10)
    result = train_multitask(forward, shared, heads, set_training, specs, data, val, config, training,
                             pad_id=backbone.pad_id, device=torch.device("cpu"))
    assert result.steps == 80 and [h["step"] for h in result.history] == [40, 80]
    # Chance is 0.5 and 0.33; the 32-wide random backbone makes sentiment the harder task.
    assert result.best_metrics["sentiment"] >= 0.7 and result.best_metrics["topic"] >= 0.9
    Z = np.array(result.affinity)
    assert Z.shape == (2, 2) and np.isfinite(Z).all()
    assert Z[0, 0] > 0 and Z[1, 1] > 0  # a step on a task's own loss lowers that loss


def test_head_learning_rate_drives_the_task_heads_only(joint):
    forward, shared, heads, set_training, specs, data, val, backbone = joint
    first_head = heads[:2]  # the sentiment head's weight and bias; the topic head's follow
    before = [p.detach().clone() for p in shared + heads]
    training = TrainConfig(batch_size=16, learning_rate=2e-2, head_learning_rate=1e-9, progress=False)
    train_multitask(forward, shared, heads, set_training, specs, data, [None, None], MultiTaskConfig(steps=5),
                    training, pad_id=backbone.pad_id, device=torch.device("cpu"), task_heads=first_head)
    moved = [not torch.allclose(p.detach(), b, atol=1e-6) for p, b in zip(shared + heads, before)]
    n = len(shared)
    assert any(moved[:n])  # the shared adapter trains at learning_rate
    assert moved[n:] == [False, False, True, True]  # the named head barely moves, the unnamed one trains


def test_adaptive_switch_and_uncertainty(joint):
    forward, shared, heads, set_training, specs, data, val, backbone = joint
    training = TrainConfig(batch_size=16, learning_rate=2e-2, progress=False)
    config = MultiTaskConfig(primary="sentiment", schedule="adaptive_switch", switch_patience=1, steps=60,
                             eval_every=5)
    result = train_multitask(forward, shared, heads, set_training, specs, data, val, config, training,
                             pad_id=backbone.pad_id, device=torch.device("cpu"))
    assert result.switched_at is not None and result.switched_at <= 60
    config = dataclasses.replace(MultiTaskConfig(weighting="uncertainty", steps=20))
    result = train_multitask(forward, shared, heads, set_training, specs, data, val, config, training,
                             pad_id=backbone.pad_id, device=torch.device("cpu"))
    assert set(result.task_weights) == {"sentiment", "topic"}
    with pytest.raises(ValueError, match="single-label"):
        train_multitask(forward, shared, heads, set_training,
                        [specs[0], TaskSpec("m", labels=["a", "b"], problem_type="multi_label")], data, val,
                        MultiTaskConfig(steps=1), training, pad_id=0, device=torch.device("cpu"))


def test_registry_group_is_stored_served_and_reopened(registry, tmp_path):
    from cmtl import Registry
    from cmtl.errors import TaskNotFoundError
    from cmtl.serving.engine import InferenceEngine
    from tests.conftest import FAST

    registry.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(32), training=FAST)
    registry.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(30), training=FAST)
    data = {"sentiment": (toy_sentiment(64), toy_sentiment(24, 1)), "topic": (toy_topics(63), toy_topics(24, 1))}
    training = TrainConfig(batch_size=16, learning_rate=2e-2, progress=False)
    record = registry.train_group("both", data, config=MultiTaskConfig(steps=60, eval_every=30, tag_every=10),
                                  training=training)
    assert record["kind"] == "joint" and record["tasks"] == ["sentiment", "topic"]
    assert np.array(record["affinity"]).shape == (2, 2) and len(record["history"]) == 2
    texts = [r["text"] for r in toy_topics(6, 3)]
    got = registry.predict_proba("topic", texts, merge="both")
    assert registry.evaluate("topic", toy_topics(24, 1), merge="both")["accuracy"] == \
        pytest.approx(record["validation_accuracy"]["topic"])
    reopened = Registry.open(registry.root, device="cpu")
    np.testing.assert_allclose(reopened.predict_proba("topic", texts, merge="both"), got, atol=1e-6)
    served = InferenceEngine(registry.root, device="cpu").logits(["topic"] * 6, texts, merges=["both"] * 6)
    np.testing.assert_allclose(torch.stack(served).softmax(-1).numpy(), got, atol=1e-5)
    before = registry._manifest
    for bad, match in [(("both", data), "exists already"), (("bad name", data), "not allowed"),
                       (("solo", {"sentiment": data["sentiment"]}), "at least two tasks")]:
        with pytest.raises(ValueError, match=match):
            registry.train_group(*bad, config=MultiTaskConfig(steps=2), training=training)
    with pytest.raises(TaskNotFoundError):
        registry.train_group("ghost", {"sentiment": data["sentiment"], "nope": data["topic"]},
                             config=MultiTaskConfig(steps=2), training=training)
    assert registry._manifest is before and registry.merges() == ["both"]
    assert sorted(p.name for p in (registry.root / "merges").iterdir()) == ["both"]


def test_group_cli(registry, tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from cmtl.cli.commands import app
    from tests.conftest import FAST

    registry.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(32), training=FAST)
    registry.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(30), training=FAST)
    files = {}
    # toy_topics writes 18 distinct texts: its validation rows get words of their own, or they are training rows.
    topic_validation = [{"text": f"{r['text']} again", "label": r["label"]} for r in toy_topics(16, 1)]
    for name, rows in [("s", toy_sentiment(48)), ("sv", toy_sentiment(16, 1)), ("t", toy_topics(48)),
                       ("tv", topic_validation)]:
        files[name] = tmp_path / f"{name}.csv"
        pd.DataFrame(rows).to_csv(files[name], index=False)
    run = CliRunner().invoke
    result = run(app, ["group", str(registry.root), "both", "--data", f"sentiment={files['s']},{files['sv']}",
                       "--data", f"topic={files['t']},{files['tv']}", "--steps", "12", "--tag-every", "4",
                       "--primary", "topic", "--schedule", "switch", "--switch-step", "6", "--task-rank", "2"])
    assert result.exit_code == 0, result.output
    assert "trained both on sentiment, topic: 12 steps" in result.output and "TAG affinity" in result.output
    from cmtl import Registry

    info = Registry.open(registry.root, device="cpu").merge_info("both")
    assert info["config"]["schedule"] == "switch" and info["config"]["switch_step"] == 6
    assert info["task_adapter"] == {"r": 2, "alpha": 4.0}
    result = run(app, ["predict", str(registry.root), "topic", "a match and a goal", "--merge", "both"])
    assert result.exit_code == 0, result.output
    for bad, message in [(["--data", f"sentiment={files['s']}"], "at least two tasks"),
                         (["--data", "sentiment", "--data", f"topic={files['t']}"], "TASK=TRAIN"),
                         (["--data", f"sentiment={files['s']}", "--data", f"topic={files['t']}", "--sampler", "zipf"],
                          "Unknown sampler")]:
        result = run(app, ["group", str(registry.root), "other", *bad])
        assert result.exit_code != 0 and message in result.output, result.output


def test_task_lora_adds_each_rows_own_delta():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    own = TaskLoRA({"layer": (4, 3)}, num_tasks=2, r=2, alpha=4.0)
    with torch.no_grad():
        for p in own.B:
            p.normal_()
    own.attach({"layer": layer})
    x = torch.randn(3, 5, 4)  # (batch, tokens, features)
    groups = torch.tensor([1, 0, 1])
    out = own.wrap(lambda inputs: layer(x))({"groups": groups})
    for b, t in enumerate(groups.tolist()):  # by hand: W x + (alpha / r) B_t A_t x, row by row
        delta = 2.0 * own.B[0][t] @ own.A[0][t]
        base = torch.nn.functional.linear(x[b], layer.weight, layer.bias)
        torch.testing.assert_close(out[b], base + x[b] @ delta.T)
    # Only the factors of the tasks in the batch receive gradient.
    out = own.wrap(lambda inputs: layer(x))({"groups": torch.tensor([1, 1, 1])})
    out.sum().backward()
    assert own.B[0].grad[0].abs().sum() == 0 and own.B[0].grad[1].abs().sum() > 0
    with pytest.raises(RuntimeError, match="wrap"):
        layer(x)
    own.detach()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    # Stacked with a shared adapter, one LoRA of rank r_s + r gives the sum of both deltas.
    shared = {"layer.lora_A.weight": torch.randn(3, 4), "layer.lora_B.weight": torch.randn(3, 3)}
    stacked = stack_lora([(shared, 0.5), (own.state(1), own.scaling)])
    assert stacked["layer.lora_A.weight"].shape == (5, 4)
    torch.testing.assert_close(stacked["layer.lora_B.weight"] @ stacked["layer.lora_A.weight"],
                               0.5 * shared["layer.lora_B.weight"] @ shared["layer.lora_A.weight"]
                               + 2.0 * (own.B[0][1] @ own.A[0][1]).detach())


def test_group_with_task_adapters_round_trip(registry):
    from cmtl import Registry
    from cmtl.serving.engine import InferenceEngine
    from tests.conftest import FAST

    registry.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(32), training=FAST)
    registry.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(30), training=FAST)
    data = {"sentiment": (toy_sentiment(64), toy_sentiment(24, 1)), "topic": (toy_topics(63), toy_topics(24, 1))}
    training = TrainConfig(batch_size=16, learning_rate=2e-2, progress=False)
    record = registry.train_group("both", data, config=MultiTaskConfig(steps=40, eval_every=20),
                                  task_adapter=AdapterConfig(r=2, alpha=4.0), training=training)
    assert record["task_adapter"] == {"r": 2, "alpha": 4.0} and "task_adapters.safetensors" in record["files"]
    # The stored score is what the stored, stacked adapters give, in this process and another.
    assert registry.evaluate("topic", toy_topics(24, 1), merge="both")["accuracy"] == \
        pytest.approx(record["validation_accuracy"]["topic"])
    texts = [r["text"] for r in toy_sentiment(6, 3)]
    got = registry.predict_proba("sentiment", texts, merge="both")
    reopened = Registry.open(registry.root, device="cpu")
    np.testing.assert_allclose(reopened.predict_proba("sentiment", texts, merge="both"), got, atol=1e-6)
    engine = InferenceEngine(registry.root, device="cpu")
    served = engine.logits(["sentiment"] * 3 + ["topic"] * 3, texts, merges=["both"] * 6)
    np.testing.assert_allclose(torch.stack(served[:3]).softmax(-1).numpy(), got[:3], atol=1e-5)
    # Each task trained factors of its own, and the task's route differs from the other's.
    own = registry.adapter_state("sentiment", merge="both")
    assert any(k.endswith("lora_B.weight") and v.shape[1] == 8 + 2 and v[:, 8:].abs().sum() > 0 for k, v in own.items())
    registry.remove_merge("both")
    assert not [n for n in registry._runtime.bank.names if n.startswith("both__merged")]  # internal: no public view


def test_length_passes_train_the_same_with_less_padding(tiny_config):
    """Mixed batches cut into length-sorted passes give the same history, affinities and weights
    as one pass per batch (dropout off), with fewer padded tokens."""
    runs = {}
    for overhead in (None, 0):
        forward, shared, heads, set_training, specs, data, val, backbone = _joint(tiny_config, 0.0, long_topics=True)
        padded = []

        def counted(inputs, forward=forward, padded=padded):
            padded.append(inputs["attention_mask"].numel())
            return forward(inputs)

        config = MultiTaskConfig(sampler="uniform", steps=12, eval_every=6, tag_every=4, pass_overhead=overhead)
        result = train_multitask(counted, shared, heads, set_training, specs, data, val, config,
                                 TrainConfig(batch_size=16, learning_rate=2e-2, progress=False),
                                 pad_id=backbone.pad_id, device=torch.device("cpu"))
        runs[overhead] = result, [p.detach().clone() for p in shared + heads], sum(padded), len(padded)
    (one, w_one, tokens_one, passes_one), (cut, w_cut, tokens_cut, passes_cut) = runs[None], runs[0]
    assert passes_cut > passes_one and tokens_cut < 0.8 * tokens_one
    assert [h["step"] for h in cut.history] == [h["step"] for h in one.history] == [6, 12]
    for a, b in zip(cut.history, one.history):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    np.testing.assert_allclose(cut.affinity, one.affinity, atol=1e-5)
    for a, b in zip(w_cut, w_one):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="pass_overhead"):
        MultiTaskConfig(pass_overhead=-1)


def test_per_task_sampler_takes_a_full_batch_of_each_active_task(joint):
    """MT2ST's L_primary + Σ γ L_aux: every step holds batch_size rows of each task, and once Switch
    drops the auxiliary its rows leave the batch (a single-task step)."""
    forward, shared, heads, set_training, specs, data, val, backbone = joint
    counts = []

    def counted(inputs):
        counts.append(torch.bincount(inputs["groups"], minlength=2).tolist())
        return forward(inputs)

    config = MultiTaskConfig(sampler="per_task", primary="topic", schedule="switch", switch_step=3, steps=6,
                             pass_overhead=None)
    train_multitask(counted, shared, heads, set_training, specs, data, [None, None], config,
                    TrainConfig(batch_size=4, learning_rate=1e-2, progress=False),
                    pad_id=backbone.pad_id, device=torch.device("cpu"))
    assert counts == [[4, 4]] * 3 + [[0, 4]] * 3
    np.testing.assert_allclose(sampling_probabilities([10, 30], "per_task"), [0.5, 0.5])


def _one_vector_tasks(labels: Sequence[int], sizes: Sequence[int] | None = None, seed: int = 0):
    """Tasks with no backbone: every row's logits are W·v + b for one shared vector v (the
    "adapter") and one fixed head (W, b) shared by all tasks; task t labels all its rows
    ``labels[t]``. Returns what :func:`train_multitask` needs before the configs."""
    g = torch.Generator().manual_seed(seed)
    v = torch.nn.Parameter(torch.randn(4, generator=g))
    W, b = torch.randn(2, 4, generator=g), torch.zeros(2)
    specs = [TaskSpec(f"t{t}", labels=["neg", "pos"]) for t in range(len(labels))]
    sizes = sizes or [32] * len(labels)
    data = [Encoded([[5, 6]] * n, None, torch.full((n,), y, dtype=torch.long)) for n, y in zip(sizes, labels)]

    def forward(inputs):
        return (W @ v + b).expand(len(inputs["input_ids"]), -1)

    return forward, [v], specs, data


def _train_toy(toy, config: MultiTaskConfig, lr: float = 1e-2):
    forward, shared, specs, data = toy
    return train_multitask(forward, shared, [], lambda flag: None, specs, data, [None] * len(specs), config,
                           TrainConfig(batch_size=16, learning_rate=lr, weight_decay=0.0, progress=False),
                           pad_id=0, device=torch.device("cpu"))


def test_samplers_draw_rows_at_their_formula_frequencies():
    """The rows training actually drew (8,000 per sampler) match p_t by hand within 0.02 (≈ 3 sd)."""
    sizes = [40, 160, 640]
    root = np.sqrt(sizes)
    expected = {("uniform", None): [1 / 3] * 3,
                ("proportional", None): [40 / 840, 160 / 840, 640 / 840],
                ("temperature", None): root / root.sum(),  # T = 2
                ("proportional", 200): [40 / 400, 160 / 400, 200 / 400]}
    for (kind, cap), p in expected.items():
        result = _train_toy(_one_vector_tasks([0, 1, 0], sizes), MultiTaskConfig(sampler=kind, temperature=2.0,
                                                                                  size_cap=cap, steps=500))
        drawn = np.array([result.rows_per_task[f"t{t}"] for t in range(3)])
        assert drawn.sum() == 500 * 16
        np.testing.assert_allclose(drawn / drawn.sum(), p, atol=0.02, err_msg=f"{kind}, cap {cap}")
    per_task = _train_toy(_one_vector_tasks([0, 1, 0], sizes), MultiTaskConfig(
        sampler="per_task", primary="t0", schedule="switch", switch_step=30, steps=50))
    assert per_task.rows_per_task == {"t0": 50 * 16, "t1": 30 * 16, "t2": 30 * 16}


def test_a_sampling_schedule_sets_each_steps_probabilities():
    def first_t0_then_the_others(step, total):
        return [1.0, 0.0, 0.0] if step < total // 2 else [0.0, 1.0, 1.0]

    config = MultiTaskConfig(sampler="uniform", sampling_schedule=first_t0_then_the_others, steps=400)
    result = _train_toy(_one_vector_tasks([0, 1, 0]), config)
    assert result.rows_per_task["t0"] == 200 * 16  # every row of the first half, none after
    assert abs(result.rows_per_task["t1"] - 100 * 16) < 0.05 * 200 * 16
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["sampling_schedule"].endswith("first_t0_then_the_others")
    for bad, match in (([1.0, 1.0], "3 finite weights"), ([1.0, -1.0, 0.0], ">= 0"), ([0.0, 0.0, 0.0], "positive sum")):
        with pytest.raises(ValueError, match=match):
            _train_toy(_one_vector_tasks([0, 1, 0]), MultiTaskConfig(sampler="uniform", steps=2,
                                                                     sampling_schedule=lambda s, n, bad=bad: bad))
    with pytest.raises(ValueError, match="per_task"):
        MultiTaskConfig(sampler="per_task", sampling_schedule=first_t0_then_the_others)
    with pytest.raises(ValueError, match="must be a function"):
        MultiTaskConfig(sampling_schedule=[0.5, 0.5])


def test_tag_affinity_signs_on_a_case_with_a_known_answer():
    """Tasks t0 and t1 label every row 1, t2 every row 0, through the same head: L_t0 = L_t1, and the
    logit margin Δ = (w_1 − w_0)·v is linear in v. A first AdamW step on L_t0 or L_t1 moves v by
    −lr·g/|g| with g ∝ −(w_1 − w_0), so Δ rises: L_t0 and L_t1 fall and L_t2 rises, exactly (and
    the reverse for a step on L_t2). So Z_{0→1} = Z_{0→0} > 0, Z_{0→2} < 0, Z_{2→0} < 0, Z_{2→2} > 0."""
    result = _train_toy(_one_vector_tasks([1, 1, 0]), MultiTaskConfig(sampler="per_task", steps=1, tag_every=1),
                        lr=0.1)
    Z = np.array(result.affinity)
    assert (np.diag(Z) > 0).all()
    assert Z[0, 1] > 0 and Z[1, 0] > 0 and Z[0, 1] == pytest.approx(Z[0, 0])
    assert (Z[[0, 1], 2] < 0).all() and (Z[2, [0, 1]] < 0).all()


def test_affinity_is_averaged_over_the_steps_that_measured_each_pair(monkeypatch):
    """TAG (METHODS.md) averages Z_i->j over the steps where it was measured; the sum was divided by every TAG
    step, so a task rarely in a batch (here 8 rows against 400 and 400) had its affinities shrunk toward 0."""
    from cmtl.multitask import joint as joint_module

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 8)

    def embed(input_ids, attention_mask, **_):
        mask = attention_mask.unsqueeze(-1).float()
        return (embedding(input_ids) * mask).sum(1) / mask.sum(1)

    def rows(n, seed):
        ids = torch.randint(1, 50, (n, 5), generator=torch.Generator().manual_seed(seed)).tolist()
        return Encoded(ids, None, torch.tensor([i[0] % 2 for i in ids]))

    specs = [TaskSpec(f"t{k}", labels=["a", "b"]) for k in range(3)]
    heads = [TaskHead(8, 2, 0.0) for _ in specs]
    seen: list[tuple[np.ndarray, list[int]]] = []
    real = joint_module.lookahead_affinity

    def spy(task_losses, shared, optimizer, task_grads, T):
        Z = real(task_losses, shared, optimizer, task_grads, T)
        seen.append((np.nan_to_num(Z), sorted(task_grads)))
        return Z

    monkeypatch.setattr(joint_module, "lookahead_affinity", spy)
    result = train_multitask(grouped_forward(embed, heads), list(embedding.parameters()),
                             [p for h in heads for p in h.parameters()], lambda flag: None, specs,
                             [rows(400, 1), rows(400, 2), rows(8, 3)], [None] * 3,
                             MultiTaskConfig(sampler="proportional", tag_every=1, steps=60),
                             TrainConfig(batch_size=4, learning_rate=0.2, progress=False), pad_id=0,
                             device=torch.device("cpu"))
    total, count = np.zeros((3, 3)), np.zeros((3, 3))
    for Z, present in seen:
        for i, j in itertools.product(present, present):
            total[i, j] += Z[i, j]
            count[i, j] += 1
    assert 0 < count[2, 2] < len(seen) / 4  # the small task was measured on few steps
    np.testing.assert_allclose(result.affinity, total / count, rtol=1e-6, atol=1e-9)


def test_a_group_reports_validation_rows_that_are_training_rows(registry):
    quick = TrainConfig(batch_size=8, progress=False)
    for task, rows in (("sentiment", toy_sentiment(16)), ("topic", toy_topics(15))):
        registry.add_task(TaskSpec(task, labels=["neg", "pos"] if task == "sentiment" else TOPICS), rows,
                          training=dataclasses.replace(quick, max_steps=2))
    train = toy_sentiment(24)
    data = {"sentiment": (train, train[:5] + toy_sentiment(5, 1)), "topic": (toy_topics(24), None)}
    with pytest.warns(UserWarning, match=r"Task 'sentiment': 5 of 10 validation rows \(50 %\) are also in the "
                                         "training data"):
        registry.train_group("g", data, config=MultiTaskConfig(steps=2), training=quick)


def test_group_knobs_that_would_be_ignored_are_refused_or_named(registry, caplog):
    """train_group accepted a misspelt task in MultiTaskConfig.weights (the task trained at weight 1), per-task
    adapter modules/layers it never used, and TrainConfig budget fields it never read, recording them as applied."""
    import logging

    quick = TrainConfig(batch_size=8, progress=False)
    registry.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(16),
                      training=dataclasses.replace(quick, max_steps=2))
    registry.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(15),
                      training=dataclasses.replace(quick, max_steps=2))
    data = {"sentiment": (toy_sentiment(24), None), "topic": (toy_topics(24), None)}
    with pytest.raises(ValueError, match=r"MultiTaskConfig.weights names \['Sentiment'\]"):
        registry.train_group("g", data, config=MultiTaskConfig(steps=2, weights={"Sentiment": 0.0}), training=quick)
    with pytest.raises(ValueError, match="gamma0 names"):
        registry.train_group("g", data, config=MultiTaskConfig(steps=2, primary="topic", schedule="diminish",
                                                               gamma0={"sentimnt": 0.5}), training=quick)
    with pytest.raises(ValueError, match="per-task factors take only r and alpha"):
        registry.train_group("g", data, config=MultiTaskConfig(steps=2), training=quick,
                             task_adapter=AdapterConfig(r=2, alpha=4, layers=(1,)))
    assert "g" not in registry.merges()
    with caplog.at_level(logging.WARNING, logger="cmtl.registry.facade"):
        record = registry.train_group("g", data, config=MultiTaskConfig(steps=2),
                                      training=dataclasses.replace(quick, max_steps=1, patience=5, ema_decay=0.9))
    assert record["steps"] == 2 and ("TrainConfig.max_steps=1, TrainConfig.patience=5, TrainConfig.ema_decay=0.9 do "
                                     "not apply") in caplog.text
    assert "ema_decay" not in record["training"]
    assert "max_steps" not in record["training"] and record["training"]["batch_size"] == 8


def test_adaptive_switch_needs_the_primarys_validation_data():
    """adaptive_switch stops the auxiliaries when the PRIMARY's validation accuracy stalls. Without validation rows
    for the primary it read the mean of the auxiliaries' accuracies instead, and dropped an auxiliary because that
    auxiliary's own score stalled (or, with no validation at all, never switched); both are refused now."""
    forward, shared, specs, data = _one_vector_tasks([0, 1])
    config = MultiTaskConfig(primary="t0", schedule="adaptive_switch", switch_patience=1, steps=40, eval_every=2)
    training = TrainConfig(batch_size=16, learning_rate=1e-2, weight_decay=0.0, progress=False)
    for validation in ([None, data[1]], [None, None]):
        with pytest.raises(ValueError, match=r"primary task 't0' has no validation data"):
            train_multitask(forward, shared, [], lambda flag: None, specs, data, validation, config, training,
                            pad_id=0, device=torch.device("cpu"))
    result = train_multitask(forward, shared, [], lambda flag: None, specs, data, [data[0], None], config, training,
                             pad_id=0, device=torch.device("cpu"))
    assert result.best_metrics.keys() == {"t0"}


def test_sampler_knobs_the_sampler_never_reads_are_refused():
    """temperature is read by the temperature sampler only, size_cap by the samplers that weigh task sizes, and a
    sampling_schedule replaces both: set beside another sampler they trained as if unset and were recorded."""
    for kwargs, knobs in (({"sampler": "uniform", "temperature": 5.0}, "['temperature']"),
                          ({"sampler": "proportional", "temperature": 1.0}, "['temperature']"),
                          ({"sampler": "per_task", "size_cap": 100}, "['size_cap']"),
                          ({"sampler": "uniform", "size_cap": 100}, "['size_cap']")):
        with pytest.raises(ValueError, match=re.escape(f"{knobs} set, but sampler={kwargs['sampler']!r}")):
            MultiTaskConfig(**kwargs)
    with pytest.raises(ValueError, match="beside sampling_schedule, which replaces"):
        MultiTaskConfig(sampler="temperature", temperature=3.0, sampling_schedule=lambda s, n: [1.0, 1.0])
    MultiTaskConfig(sampler="temperature", temperature=3.0, size_cap=100)  # both read
    MultiTaskConfig(sampler="proportional", size_cap=100)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), "2", True])
def test_static_weights_must_be_finite_and_non_negative(weight):
    """A negative or NaN static weight was accepted: the task then left every batch (weights <= 0 drop a task, as
    Switch does) and never trained, while the record listed it among the group's tasks with that weight."""
    with pytest.raises(InvalidParameterError, match=r"weights\['t1'\]"):
        MultiTaskConfig(weights={"t1": weight})
    with pytest.raises(InvalidParameterError, match="map task names"):
        MultiTaskConfig(weights={1: 1.0})
    MultiTaskConfig(weights={"t1": 0.0, "t0": 2})  # 0 leaves a task out on purpose


def test_lookahead_restores_the_shared_parameters_when_a_loss_fails():
    """lookahead_affinity moves the shared parameters to each task's lookahead point; an error there (out of memory
    in the forward pass, an interrupt) left them at that point, so a caller that caught it went on from weights no
    optimiser step produced."""
    from cmtl.multitask.affinity import lookahead_affinity

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.5)
    before = p.detach().clone()
    calls = []

    def losses():
        calls.append(p.detach().clone())
        if len(calls) == 2:  # the first lookahead point
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.stack([(p ** 2).sum(), (p - 1).abs().sum()])

    with pytest.raises(torch.OutOfMemoryError):
        lookahead_affinity(losses, [p], opt, {0: [torch.ones(3)], 1: [-torch.ones(3)]}, 2)
    assert not torch.equal(calls[1], before)  # the failure happened away from the start
    torch.testing.assert_close(p.detach(), before, atol=0, rtol=0)


def test_a_switch_step_past_the_last_step_is_refused():
    """Switch drops the auxiliaries from step switch_step on; at or past the run's last step it never fired, and
    the run trained (and was recorded) as Switch while it was plain joint training throughout."""
    toy = _one_vector_tasks([0, 1])
    for switch_step in (20, 25):
        with pytest.raises(ValueError, match=rf"switch_step={switch_step} .* 20 steps"):
            _train_toy(toy, MultiTaskConfig(primary="t0", schedule="switch", switch_step=switch_step, steps=20))
    result = _train_toy(toy, MultiTaskConfig(primary="t0", schedule="switch", switch_step=19, steps=20))
    assert result.rows_per_task["t1"] > 0 and result.steps == 20


def test_epochs_beside_steps_are_refused():
    """steps fixes the run's length and epochs is read only without it: both set, epochs trained as if unset."""
    with pytest.raises(ValueError, match=r"epochs=5 .* steps=100"):
        MultiTaskConfig(steps=100, epochs=5)
    MultiTaskConfig(steps=100)
    MultiTaskConfig(epochs=5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InvalidParameterError, match="epochs"):
            MultiTaskConfig(epochs=bad)


def test_without_validation_the_kept_state_is_the_last_steps():
    """Without validation rows a joint run keeps its last state, but recorded best_step 0 (the untrained start), so
    a group's record named the wrong state; single-task training records the last step, as this does now."""
    result = _train_toy(_one_vector_tasks([0, 1]), MultiTaskConfig(sampler="uniform", steps=7))
    assert result.steps == 7 and result.best_step == 7


@pytest.mark.parametrize("kwargs", [{"size_cap": True}, {"size_cap": 0}, {"size_cap": 2.5}, {"temperature": 0.0},
                                    {"temperature": float("nan")}, {"temperature": "2"}])
def test_sampler_knobs_out_of_range_are_refused_when_configured(kwargs):
    """size_cap=True was taken as a cap of 1 (every task the same size: the temperature sampler silently turned
    uniform); the other values failed only once training had started."""
    (knob,) = kwargs
    with pytest.raises(InvalidParameterError, match=knob):
        MultiTaskConfig(sampler="temperature", **kwargs)


def test_two_groups_trained_at_once_under_one_name_keep_the_first(registry):
    # Both calls passed the name check before either wrote: the second then failed inside the adapter bank
    # ("already exists") and its clean-up unloaded the first call's adapter.
    quick = TrainConfig(batch_size=8, progress=False)
    for task, rows in (("sentiment", toy_sentiment(16)), ("topic", toy_topics(15))):
        registry.add_task(TaskSpec(task, labels=["neg", "pos"] if task == "sentiment" else TOPICS), rows,
                          training=dataclasses.replace(quick, max_steps=2))
    data = {"sentiment": (toy_sentiment(24), None), "topic": (toy_topics(24), None)}
    start, outcomes = threading.Barrier(2), []

    def call():
        start.wait()
        try:
            outcomes.append(registry.train_group("g", data, config=MultiTaskConfig(steps=20), training=quick))
        except Exception as exc:  # noqa: BLE001 - the outcome is what is checked
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(o, dict) for o in outcomes) == 1, outcomes
    refused = next(o for o in outcomes if not isinstance(o, dict))
    assert isinstance(refused, EntryExistsError), refused
    assert merge_key("g") in registry._runtime.bank.names  # the first call's adapter is still loaded
    assert len(registry.predict("sentiment", ["a film"], merge="g")) == 1


@pytest.mark.parametrize("validated", [True, False])
def test_joint_training_that_diverges_raises_and_leaves_the_parameters_as_they_were(joint, validated):
    # The joint loop checked neither the loss nor the gradient: an infinite learning rate wrote NaN into the
    # shared adapter and heads and trained on; without validation the NaN state was returned (and stored).
    forward, shared, heads, set_training, specs, data, val, backbone = joint
    before = [p.detach().clone() for p in [*shared, *heads]]
    training = TrainConfig(batch_size=16, learning_rate=1e30, warmup_ratio=0.0, grad_clip=None, progress=False)
    with pytest.raises(TrainingDivergedError, match="Joint training diverged at step"):
        train_multitask(forward, shared, heads, set_training, specs, data, val if validated else [None, None],
                        MultiTaskConfig(sampler="uniform", steps=20, eval_every=5), training,
                        pad_id=backbone.pad_id, device=torch.device("cpu"))
    for p, b in zip([*shared, *heads], before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0)


def test_group_on_a_version_whose_stored_layers_a_cut_dropped_trains(tiny_backbone, tmp_path, monkeypatch):
    """A version that an earlier cmtl stored with layers the cut backbone lacks (peft dropped them, so its
    weights adapt the others) gives train_group its adapter settings: they are taken as that version ran."""
    from cmtl import BackboneConfig, Registry
    from tests.conftest import FAST

    reg = Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_backbone, num_hidden_layers=1,
                                                           max_length=64), device="cpu")
    with monkeypatch.context() as m:  # the add of an earlier cmtl: no check of the layers
        m.setattr(AdapterBank, "add", AdapterBank._add)
        reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(16),
                     adapter=AdapterConfig(r=2, layers=(0, 1)), training=FAST)
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(15), adapter=AdapterConfig(r=2, layers=(0,)),
                 training=FAST)
    assert reg.versions("sentiment")[0].adapter["layers"] == [0, 1]
    data = {"sentiment": (toy_sentiment(16), toy_sentiment(8, 1)), "topic": (toy_topics(15), toy_topics(9, 1))}
    record = reg.train_group("both", data, config=MultiTaskConfig(steps=2, eval_every=2),
                             training=TrainConfig(batch_size=8, progress=False))
    assert record["tasks"] == ["sentiment", "topic"]
