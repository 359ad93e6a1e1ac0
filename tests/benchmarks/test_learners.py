"""Every strategy on toy streams with the tiny backbone: shapes, and the properties that hold exactly."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from transformers import AutoConfig

from cmtl import BackboneConfig, TaskSpec, TrainConfig
from cmtl.benchmarks.learners import STRATEGIES, StrategyConfig, run_stream
from cmtl.benchmarks.scenarios import Experience
from cmtl.data import read_examples
from tests.conftest import FILLER, QV

WORDS = {"red": ["apple", "cherry"], "blue": ["sky", "ocean"], "green": ["grass", "leaf"],
         "loud": ["drum", "siren"], "quiet": ["whisper", "library"], "sweet": ["honey", "candy"]}


def _rows(labels, n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(FILLER, 4) + [rng.choice(WORDS[label])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def _stream(kind: str) -> list[Experience]:
    groups = [("red", "blue"), ("green", "loud"), ("quiet", "sweet")]
    out = []
    for j, labels in enumerate(groups):
        name = f"e{j}"
        task = "shared" if kind == "domain-incremental" else name
        spec_labels = ("red", "blue") if kind == "domain-incremental" else labels
        if kind == "domain-incremental":
            labels = spec_labels
        spec = TaskSpec(task, labels=spec_labels)
        split = lambda n, s: read_examples(_rows(labels, n, s + 10 * j), spec)  # noqa: E731
        out.append(Experience(name=name, spec=spec, train=split(48, 0), validation=split(16, 1),
                              test=split(16, 2), corpus="toy"))
    return out


CONFIG = StrategyConfig(training=TrainConfig(epochs=4, batch_size=8, learning_rate=2e-2, progress=False,
                                             patience=None), adapter=QV, replay_budget=16, fisher_examples=16,
                        single_learning_rate=5e-3)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if not s.startswith("grow")])
def test_task_incremental(strategy, tiny_backbone):
    report = run_stream(strategy, _stream("task-incremental"), "task-incremental",
                        BackboneConfig(name_or_path=tiny_backbone, max_length=32), CONFIG, device="cpu")
    assert report.task_names == ("e0", "e1", "e2") and len(report.R) == 3
    assert all(0.0 <= v <= 1.0 for row in report.R for v in row)
    assert len(report.seconds_per_experience) == 3 and all(s > 0 for s in report.seconds_per_experience)
    assert all(p > 0 for p in report.trainable_parameters_per_task)
    if strategy in ("adapters", "single", "analytic"):
        # Independent parameters per task: learning task i cannot change task j < i ...
        assert report.bwt == 0.0 and report.mean_forgetting == 0.0
        for i in range(3):
            for j in range(i):
                assert report.R[i][j] == report.R[j][j]
    if strategy == "adapters":
        # ... and an untrained task is the plain backbone with its fresh head, exactly as before any training.
        assert report.fwt == 0.0
    assert report.acc >= 0.6, report.to_markdown()


@pytest.mark.parametrize("strategy", ["adapters", "adapters-routed", "seq-ft", "replay", "lwf", "analytic", "grow",
                                      "grow-analytic"])
def test_class_incremental_cannot_predict_unseen_classes(strategy, tiny_backbone):
    report = run_stream(strategy, _stream("class-incremental"), "class-incremental",
                        BackboneConfig(name_or_path=tiny_backbone, max_length=32), CONFIG, device="cpu")
    for i in range(3):
        for j in range(i + 1, 3):
            assert report.R[i][j] == 0.0


def test_analytic_class_incremental_ends_where_one_fit_on_everything_ends(tiny_backbone):
    """Its statistics are exact: after the last experience, the head is the one computed from all the
    training rows at once (with λ chosen on all the validation rows)."""
    import torch

    from cmtl.benchmarks.learners import make_learner
    from cmtl.continual.analytic import AnalyticHead
    from cmtl.core.backbone import load_backbone

    stream = _stream("class-incremental")
    backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    learner = make_learner("analytic", stream, "class-incremental", backbone, CONFIG, workdir=None)
    for i in range(3):
        learner.fit(i)
    labels = learner.labels[0]
    assert labels == ("red", "blue", "green", "loud", "quiet", "sweet")
    spec = TaskSpec("all", labels=list(labels))
    rows = lambda split: [(x, labels.index(y)) for e in stream for x, y in zip(  # noqa: E731
        learner._features(getattr(e, split), spec), getattr(e, split).labels)]
    train, val = rows("train"), rows("validation")
    once = AnalyticHead(backbone.hidden_size, len(labels), CONFIG.analytic)
    once.update(torch.stack([x for x, _ in train]), torch.tensor([y for _, y in train]))
    once.choose_ridge(torch.stack([x for x, _ in val]), torch.tensor([y for _, y in val]))
    assert once.ridge == learner.heads[0].ridge
    for j, e in enumerate(stream):
        features = learner._features(e.test, spec)
        torch.testing.assert_close(learner.heads[0](features), once(features), rtol=1e-5, atol=1e-5)
        assert learner.predict(j, 3) == [labels[k] for k in once(features).argmax(-1).tolist()]


def _grown(strategy: str, tiny_backbone: str, tmp_path) -> list:
    """Run a registry strategy through the class-incremental stream: one task, 2 then 4 then 6 labels,
    the last version current and the first step's classes still mostly right. Returns its versions."""
    from cmtl.benchmarks.learners import make_learner
    from cmtl.core.backbone import load_backbone

    stream = _stream("class-incremental")
    backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    learner = make_learner(strategy, stream, "class-incremental", backbone, CONFIG, tmp_path)
    for i in range(3):
        learner.fit(i)
    # Its buffer is its registry task's, not --replay-budget's (CONFIG's replay_budget sizes replay's): said so.
    assert "own class_balanced buffer of 1000 rows (seed 0), not --replay-budget's" in learner.notes[0]
    versions = learner.registry.versions("classes")
    assert [len(v.labels) for v in versions] == [2, 4, 6] and versions[-1].current
    assert sum(p == y for p, y in zip(learner.predict(0, 3), stream[0].test.labels)) / len(stream[0].test) >= 0.5
    return versions


def test_grow_keeps_one_task_whose_labels_grow(tiny_backbone, tmp_path):
    versions = _grown("grow", tiny_backbone, tmp_path)
    assert [v.training.get("update", {}).get("replay_ratio") for v in versions] == [None, 1.0, 2.0]


def test_grow_analytic_adds_each_step_to_the_statistics_of_one_task(tiny_backbone, tmp_path):
    versions = _grown("grow-analytic", tiny_backbone, tmp_path)
    assert all(v.head["type"] == "analytic" and v.training["steps"] == 0 for v in versions)
    assert [v.training.get("replayed") for v in versions] == [None, 0, 0]


@pytest.mark.parametrize("strategy", ["adapters", "adapters-routed", "analytic"])
def test_domain_incremental_runs(strategy, tiny_backbone):
    report = run_stream(strategy, _stream("domain-incremental"), "domain-incremental",
                        BackboneConfig(name_or_path=tiny_backbone, max_length=32), CONFIG, device="cpu")
    assert report.acc >= 0.6


def test_bad_strategy_and_kind(tiny_backbone):
    config = BackboneConfig(name_or_path=tiny_backbone)
    with pytest.raises(ValueError, match=r"Unknown strategy 'gem'\. Known strategies"):
        run_stream("gem", _stream("task-incremental"), "task-incremental", config, CONFIG, device="cpu")
    with pytest.raises(ValueError, match="task-incremental scenarios only"):
        run_stream("single", _stream("class-incremental"), "class-incremental", config, CONFIG, device="cpu")
    with pytest.raises(ValueError, match="class-incremental scenarios only"):
        run_stream("grow", _stream("task-incremental"), "task-incremental", config, CONFIG, device="cpu")


@pytest.mark.parametrize("strategy", ["joint", "replay", "lwf"])
def test_shared_learners_cache_the_frozen_layers_without_changing_what_they_learn(strategy, tiny_backbone):
    """With an adapter on the top layer only, each split's frozen-layer prefix is computed once per stream
    (joint re-reads every earlier experience, every test set is read after each experience); the adapter
    and the answers are those of the full forward pass."""
    import dataclasses

    import torch

    from cmtl import AdapterConfig
    from cmtl.benchmarks.learners import make_learner
    from cmtl.core.backbone import load_backbone

    stream = _stream("task-incremental")
    runs = []
    for cache_mb in (0, 64):
        config = dataclasses.replace(CONFIG, adapter=AdapterConfig(layers=(1,), dropout=0.0),
                                     training=dataclasses.replace(CONFIG.training, cache_frozen_mb=cache_mb))
        backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
        learner = make_learner(strategy, stream, "task-incremental", backbone, config, workdir=None)
        for i in range(3):
            torch.manual_seed(i)
            learner.fit(i)
        answers = [learner.predict(j, 3) for j in range(3)]
        runs.append((learner.bank.state_dict("shared"), answers, dict(learner._splits)))
    (plain, plain_answers, plain_splits), (cached, cached_answers, cached_splits) = runs
    assert all(enc.prefix is None for enc in plain_splits.values())
    assert cached_splits and all(enc.prefix is not None for enc in cached_splits.values())
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], atol=1e-4, rtol=1e-3)
    assert cached_answers == plain_answers


def test_a_task_adapter_answers_the_same_after_later_tasks(tiny_backbone, tmp_path):
    """What lets the adapters strategy read each task's answers once: adding tasks leaves the earlier
    tasks' predictions unchanged (in the registry, not only in the learner's memo)."""
    from cmtl.benchmarks.learners import make_learner
    from cmtl.core.backbone import load_backbone

    stream = _stream("task-incremental")
    backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    learner = make_learner("adapters", stream, "task-incremental", backbone, CONFIG, tmp_path)
    learner.fit(0)
    first = learner.registry.predict_proba("e0", stream[0].test.texts)
    learner.fit(1)
    learner.fit(2)
    assert (learner.registry.predict_proba("e0", stream[0].test.texts) == first).all()


@pytest.mark.parametrize("kind", ["task-incremental", "domain-incremental", "class-incremental"])
def test_every_strategy_answers_the_same_before_training(kind, tiny_backbone, tmp_path):
    """b (each experience's accuracy before anything was trained) is FWT's baseline, so it must be one row for
    every strategy on a stream: on a domain-incremental stream the shared strategies answered with the stream's
    one fresh head (seed 0) and the per-task ones with experience j's (seed j)."""
    from cmtl.benchmarks.learners import make_learner
    from cmtl.core.backbone import load_backbone

    stream = _stream(kind)
    backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    learners = {s: make_learner(s, stream, kind, backbone, CONFIG, tmp_path / s)
                for s in ("seq-ft", "replay", "ewc", "lwf", "joint", "adapters", "analytic")
                + (("single",) if kind == "task-incremental" else ())}
    answers = {s: [learner.predict(j, 0) for j in range(len(stream))] for s, learner in learners.items()}
    assert all(a == answers["seq-ft"] for a in answers.values()), answers


@pytest.mark.parametrize("kind", ["domain-incremental", "task-incremental"])
def test_trained_parameters_leave_out_frozen_heads(kind, tiny_backbone):
    """params_per_exp counts what trains: the adapter and the experience's own head, not replayed rows' old
    heads (frozen); the one head of a domain-incremental stream trains in every experience."""
    quick = dataclasses.replace(CONFIG, training=dataclasses.replace(CONFIG.training, max_steps=1, epochs=1))
    report = run_stream("replay", _stream(kind), kind, BackboneConfig(name_or_path=tiny_backbone, max_length=32),
                        quick, device="cpu")
    first, *later = report.trainable_parameters_per_task
    hidden = AutoConfig.from_pretrained(tiny_backbone).hidden_size
    head = hidden * 2 + 2  # two labels per experience in this stream
    assert later == [first] * len(later) and first > head


@pytest.mark.parametrize("strategy", ["seq-ft", "replay", "ewc", "lwf"])
def test_the_one_head_of_a_class_incremental_stream_learns_every_experiences_classes(strategy, tiny_backbone):
    """The shared strategies' one head learnt on the first experience only: the rows of the classes that arrive
    later kept their random start, so the adapter alone had to fit them."""
    from cmtl.benchmarks.learners import make_learner
    from cmtl.core.backbone import load_backbone

    stream = _stream("class-incremental")
    backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    quick = dataclasses.replace(CONFIG, training=dataclasses.replace(CONFIG.training, max_steps=2, epochs=1))
    learner = make_learner(strategy, stream, "class-incremental", backbone, quick, workdir=None)
    learner.fit(0)
    before = learner.heads[0].linear.weight.detach().clone()  # rows: every class of the stream, in order
    learner.fit(1)
    changed = (learner.heads[0].linear.weight.detach() != before).any(-1).tolist()
    labels = learner.head_specs[0].labels
    assert all(changed[labels.index(label)] for label in stream[1].spec.labels), dict(zip(labels, changed))
    assert learner.trainable_parameters[1] == learner.trainable_parameters[0]


@pytest.mark.parametrize("kind", ["class-incremental", "task-incremental"])
def test_ewc_anchors_the_one_head_a_stream_shares(kind, tiny_backbone):
    """Now that the shared head trains on every experience, EWC anchors it with the adapter (as Avalanche's
    EWC anchors every parameter); a task-incremental stream's heads are each their own experience's."""
    from cmtl.benchmarks.learners import make_learner
    from cmtl.core.backbone import load_backbone

    stream = _stream(kind)
    backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    quick = dataclasses.replace(CONFIG, training=dataclasses.replace(CONFIG.training, max_steps=2, epochs=1))
    learner = make_learner("ewc", stream, kind, backbone, quick, workdir=None)
    learner.fit(0)
    fisher, star = learner.ewc[0]
    adapter = learner.bank.parameters("shared")
    head = list(learner.heads[0].parameters()) if kind == "class-incremental" else []
    assert len(fisher) == len(star) == len(adapter) + len(head)
    assert all(torch.equal(s, p.detach()) for s, p in zip(star, adapter + head))
    if head:  # only the first experience's classes carry a Fisher in the head; unseen ones stay free
        rows = fisher[len(adapter)].abs().sum(-1)
        seen = [learner.head_specs[0].labels.index(label) for label in stream[0].spec.labels]
        assert all(rows[k] > 0 for k in seen) and rows.sum() == sum(rows[k] for k in seen)


def test_avalanche_strategies_start_from_the_heads_of_cmtls_shared_strategies(tiny_backbone, tmp_path, monkeypatch):
    """b (FWT's baseline) must be one row for every strategy of a bench table, avl-* included: Avalanche's model
    drew its heads in a row after the adapter under the training seed, cmtl's shared strategies each head from
    its own seed, so the two families' untrained answers (b, and R[i][j] for j > i) differed."""
    pytest.importorskip("avalanche")
    from cmtl.benchmarks import runner
    from cmtl.benchmarks.learners import make_learner
    from cmtl.core.backbone import load_backbone
    from cmtl.training.evaluation import predict_logits

    class Stop(Exception):
        pass

    seen = []

    def stop(name, benchmark, model, *, progress, config):
        seen.append(model)
        raise Stop  # the untrained model is all this test reads

    monkeypatch.setattr(runner.avalanche, "run_strategy", stop)
    stream, kind = _stream("task-incremental"), "task-incremental"
    config = dataclasses.replace(CONFIG, training=dataclasses.replace(CONFIG.training, seed=3))
    backbone = BackboneConfig(name_or_path=tiny_backbone, max_length=32)
    with pytest.raises(Stop):
        runner.run_avalanche_stream("naive", stream, kind, backbone, config, device="cpu")
    (model,) = seen
    model.eval()
    learner = make_learner("seq-ft", stream, kind, load_backbone(backbone, device="cpu"), config, tmp_path)
    for j, exp in enumerate(stream):
        enc = learner._encode(exp.test, exp.spec, j, with_targets=False)
        logits = predict_logits(model.forward_for(j), enc, batch_size=64, pad_id=learner.pad_id,
                                device=torch.device("cpu"))
        assert [exp.spec.labels[k] for k in logits.argmax(-1).tolist()] == learner.predict(j, 0), j
        assert torch.equal(model.heads[j].linear.weight, learner.heads[j].linear.weight.to(torch.float32)), j


@pytest.mark.parametrize("kind", ["task-incremental", "class-incremental"])
def test_the_adapters_strategy_scores_a_row_without_an_answer_as_wrong(kind, tiny_backbone, tmp_path, monkeypatch):
    """A row whose outputs are NaN (a half-precision backbone overflowing on one text) gives no answer: the other
    strategies score it as wrong (None); the registry strategies raised NonFiniteOutputError from
    Registry.predict and predict_proba, and the whole benchmark run stopped."""
    from cmtl.benchmarks.learners import make_learner
    from cmtl.core.backbone import load_backbone
    from cmtl.registry.runtime import Runtime

    stream = _stream(kind)
    backbone = load_backbone(BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    config = dataclasses.replace(CONFIG, training=dataclasses.replace(CONFIG.training, epochs=1))
    learner = make_learner("adapters", stream, kind, backbone, config, tmp_path)
    learner.fit(0)
    answered = learner.predict(0, 1)
    predict = Runtime.predict

    def first_row_nan(self, *args, **kwargs):
        logits = predict(self, *args, **kwargs).clone()
        logits[0] = float("nan")
        return logits

    monkeypatch.setattr(Runtime, "predict", first_row_nan)
    learner._answers.clear()
    got = learner.predict(0, 1)
    assert got[0] in (None, "") and got[1:] == answered[1:]
