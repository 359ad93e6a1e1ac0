"""Forward transfer: add_task(init=...) starts a new task's adapter from a task's or a merge's, or picks one
("auto": the best-probed candidates tried against a fresh start); the source is recorded, and a bad init is
refused before anything is written."""

from __future__ import annotations

import contextlib

import numpy
import pytest
import torch

from cmtl import (AdapterConfig, InvalidParameterError, Registry, TaskNotFoundError, TaskSpec, TrainConfig,
                  TrainingDivergedError)
from cmtl.registry.store import MANIFEST
from cmtl.training import transfer
from cmtl.training.transfer import parse_init, pick_trial, shortlist
from tests.conftest import FAST, TOPICS, toy_sentiment, toy_topics

#: One step at a learning rate that cannot move anything measurably: the adapter as it starts.
STILL = TrainConfig(max_steps=1, learning_rate=1e-12, weight_decay=0.0, probe_init=False, progress=False)
#: The same with the step-0 probe, which it cannot beat (its one step starts from a fresh head): a fresh
#: adapter keeps its probe, so init="auto" goes on to try the earlier adapters.
KEPT = TrainConfig(max_steps=1, learning_rate=1e-12, weight_decay=0.0, patience=None, progress=False)
TEXTS = ["a great film", "an awful meal", "the music was loud"]


@pytest.fixture
def reg(tmp_path, tiny_config) -> Registry:
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(64), toy_sentiment(16, 1), training=FAST)
    return reg


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-8, rtol=0)


def test_init_from_a_task_starts_from_its_adapter_and_is_recorded(reg):
    info = reg.add_task(TaskSpec("other", labels=["neg", "pos"]), toy_sentiment(32, 2), toy_sentiment(8, 3),
                        training=STILL, init="sentiment")
    assert info.init == {"task": "sentiment", "version": 1, "chosen": "named", "scale": 1.0}
    assert info.adapter == reg.current("sentiment").adapter  # the source's rank, modules and layers
    assert_same_adapter(reg.adapter_state("other"), reg.adapter_state("sentiment"))
    torch.testing.assert_close(reg.embed(TEXTS, "other"), reg.embed(TEXTS, "sentiment"), atol=1e-6, rtol=0)
    # The lineage survives a new process.
    assert Registry.open(reg.root, device="cpu").current("other").init == info.init


def test_init_scale_starts_from_that_share_of_the_sources_change_and_is_recorded(reg):
    info = reg.add_task(TaskSpec("half", labels=["neg", "pos"]), toy_sentiment(32, 2), toy_sentiment(8, 3),
                        training=STILL, init="sentiment", init_scale=0.5)
    assert info.init == {"task": "sentiment", "version": 1, "chosen": "named", "scale": 0.5}
    source, start = reg.adapter_state("sentiment"), reg.adapter_state("half")
    for key, value in source.items():  # B halved, A as it was: the change B·A halved
        torch.testing.assert_close(start[key], value * 0.5 if "lora_B" in key else value, atol=1e-8, rtol=0)
    assert any(v.abs().max() > 1e-4 for k, v in source.items() if "lora_B" in k)  # not a zero source
    # The start sits between the backbone and the source: each embedding moves half as far.
    bare, full, half = reg.embed(TEXTS), reg.embed(TEXTS, "sentiment"), reg.embed(TEXTS, "half")
    assert (full - bare).abs().max() > 1e-4
    assert 0.2 < float((half - bare).norm() / (full - bare).norm()) < 0.8


def test_init_scale_shrinks_a_merge_too(reg):
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(15, 1), training=FAST)
    reg.merge(["sentiment", "topic"], "both", "linear")
    info = reg.add_task(TaskSpec("new", labels=TOPICS), toy_topics(30, 2), toy_topics(9, 3), training=STILL,
                        init="merge:both", init_scale=0.25)
    assert info.init == {"merge": "both", "chosen": "named", "scale": 0.25}
    assert_same_adapter(reg.adapter_state("new"), transfer.scaled(reg.adapter_state("topic", merge="both"), 0.25))


def test_scaled_touches_only_the_b_factors():
    state = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    out = transfer.scaled(state, 0.25)
    assert torch.equal(out["m.lora_A.weight"], state["m.lora_A.weight"])
    assert torch.equal(out["m.lora_B.weight"], torch.full((3, 2), 0.25))
    assert torch.equal(state["m.lora_B.weight"], torch.ones(3, 2))  # a new dict; the input is left alone
    assert transfer.scaled(state, 1) is state


@pytest.mark.parametrize("init, scale, match", [
    ("sentiment", 0, r"\(0, 1\]"),
    ("sentiment", 1.5, r"\(0, 1\]"),
    ("sentiment", float("nan"), r"\(0, 1\]"),
    ("sentiment", "half", r"\(0, 1\]"),
    ("auto", True, r"\(0, 1\]"),
    (None, 0.5, "be 1 without init"),
    ("sentiment", None, r"\(0, 1\]"),
])
def test_bad_init_scale_is_refused_and_writes_nothing(reg, init, scale, match):
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(InvalidParameterError, match=match):
        reg.add_task(TaskSpec("new", labels=["neg", "pos"]), toy_sentiment(16), training=STILL, init=init,
                     init_scale=scale)
    assert (reg.root / MANIFEST).read_bytes() == before and "new" not in reg.tasks()


def test_init_from_a_merge_starts_from_the_merged_adapter(reg):
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(15, 1), training=FAST)
    reg.merge(["sentiment", "topic"], "both", "linear")
    info = reg.add_task(TaskSpec("new", labels=TOPICS), toy_topics(30, 2), toy_topics(9, 3), training=STILL,
                        init="merge:both")
    assert info.init == {"merge": "both", "chosen": "named", "scale": 1.0}
    assert_same_adapter(reg.adapter_state("new"), reg.adapter_state("topic", merge="both"))


def test_fresh_start_is_the_default_and_differs_from_a_copy(reg):
    info = reg.add_task(TaskSpec("fresh", labels=["neg", "pos"]), toy_sentiment(32, 2), training=STILL)
    assert info.init is None
    assert all(v.abs().max() < 1e-9 for k, v in reg.adapter_state("fresh").items() if "lora_B" in k)  # B starts at 0


def test_auto_keeps_a_fresh_adapter_that_beats_its_probe_and_tries_nothing(reg, monkeypatch):
    """Where a fresh adapter learns the task (beats the step-0 probe), "auto" is that fresh adapter, trained as
    init=None trains it, and no earlier adapter is even probed. On toy rows the probe often ties with training,
    and which wins then depends on the CPU's rounding: the probe is made to answer at chance here (zero head),
    so that the fresh adapter beats it on any machine."""
    import cmtl.training.trainee as trainee

    real = trainee.probe_head

    def at_chance(head, *args, **kwargs):
        features = real(head, *args, **kwargs)
        with torch.no_grad():
            for p in head.parameters():
                p.zero_()
        return features

    monkeypatch.setattr(trainee, "probe_head", at_chance)
    learns = TrainConfig(epochs=4, batch_size=8, learning_rate=2e-2, progress=False, patience=None)
    plain = reg.add_task(TaskSpec("plain", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                         training=learns)
    assert plain.training["best_step"] > 0  # it beat its probe

    def probed(*args, **kwargs):
        raise AssertionError("init='auto' probed the earlier adapters although the fresh one learned")

    monkeypatch.setattr(transfer, "probe_losses", probed)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                        training=learns, init="auto")
    assert info.init == {"chosen": "auto", "fresh": "beat the probe"}
    assert_same_adapter(reg.adapter_state("again"), reg.adapter_state("plain"))
    assert info.metrics == plain.metrics and info.training["steps"] == plain.training["steps"]


def test_auto_tries_the_earlier_adapters_where_a_fresh_one_keeps_its_probe(reg):
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(15, 1), training=FAST)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                        training=KEPT, init="auto")
    record = info.init
    assert record["chosen"] == "auto" and record["fresh"] == "kept the probe"
    assert set(record["probe_losses"]) == {"backbone", "task:sentiment@1", "task:topic@1"}
    trial = record["trial"]
    assert trial["steps"] == transfer.TRIAL_STEPS and trial["z"] == transfer.TRIAL_Z
    assert trial["scale"] == 1.0  # the default: the trial tries full copies
    assert set(trial["losses"]) == {"fresh", "task:sentiment@1", "task:topic@1"}  # two sources: both tried
    assert set(trial["gain_z"]) == {"task:sentiment@1", "task:topic@1"}
    passed = [k for k, z in trial["gain_z"].items() if z is not None and z > transfer.TRIAL_Z]
    if not passed:  # nothing to train from: the fresh adapter stays, and nothing was judged on validation
        assert {"task", "scale", "validation", "rejected"}.isdisjoint(record)
        assert all(not v.any() for k, v in reg.adapter_state("again").items() if "lora_B" in k)
        return
    best = min(passed, key=trial["losses"].get)
    judged = record["validation"]
    if judged["source"] > judged["fresh"]:
        assert f"task:{record['task']}@{record['version']}" == best and record["scale"] == 1.0
    else:
        assert record["rejected"] == {"source": best} and "task" not in record


def score_second_run(monkeypatch, outcome: float | str) -> list:
    """Make the validation accuracy of add_task's second training run (init="auto" from the chosen source)
    ``outcome``, or make it diverge (``"diverge"``) or run out of memory (``"out of memory"``); returns the
    results of the runs, in order."""
    import cmtl.registry.facade as facade

    runs, real = [], facade.fit

    def fit(*args, **kwargs):
        if runs and outcome == "diverge":
            raise TrainingDivergedError("the loss became nan")
        if runs and outcome == "out of memory":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        result = real(*args, **kwargs)
        if runs:
            result.best_metrics = {**result.best_metrics, "accuracy": outcome}
        runs.append(result)
        return result

    monkeypatch.setattr(facade, "fit", fit)
    monkeypatch.setattr(transfer, "pick_trial", lambda losses: ("sentiment__v1", {}))
    return runs


def test_auto_keeps_the_source_when_it_scores_higher_on_validation_as_a_named_init_would(reg, monkeypatch):
    runs = score_second_run(monkeypatch, 1.0)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                        training=KEPT, init="auto")
    assert len(runs) == 2 and info.init["task"] == "sentiment" and info.init["scale"] == 1.0
    assert info.init["validation"] == {"metric": "accuracy", "fresh": runs[0].best_metrics["accuracy"], "source": 1.0}
    assert info.metrics["validation_accuracy"] == 1.0  # the record is the kept run's
    monkeypatch.undo()
    named = reg.add_task(TaskSpec("named", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                         training=KEPT, init="sentiment")
    assert_same_adapter(reg.adapter_state("again"), reg.adapter_state("named"))
    numpy.testing.assert_allclose(reg.predict_proba("again", TEXTS), reg.predict_proba("named", TEXTS), atol=1e-6)
    assert named.training["steps"] == info.training["steps"]


@pytest.mark.parametrize("outcome", [0.0, "diverge", "out of memory"])
def test_auto_keeps_the_fresh_adapter_when_the_source_scores_no_higher_or_fails(reg, monkeypatch, outcome):
    runs = score_second_run(monkeypatch, outcome)
    short = outcome == "out of memory"
    with pytest.warns(RuntimeWarning, match="out of memory") if short else contextlib.nullcontext():
        info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                            training=KEPT, init="auto")
    assert {"task", "version", "scale"}.isdisjoint(info.init)  # the record names the start kept: fresh
    assert info.init["rejected"]["source"] == "task:sentiment@1"
    assert ("error" in info.init["rejected"]) == (outcome != 0.0)
    if short:
        assert info.init["rejected"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert info.init["validation"]["source"] == (0.0 if outcome == 0.0 else None)
    assert info.metrics["validation_accuracy"] == runs[0].best_metrics["accuracy"]
    monkeypatch.undo()
    reg.add_task(TaskSpec("plain", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                         training=KEPT)
    assert_same_adapter(reg.adapter_state("again"), reg.adapter_state("plain"))  # restored exactly
    numpy.testing.assert_allclose(reg.predict_proba("again", TEXTS), reg.predict_proba("plain", TEXTS), atol=1e-6)
    assert sorted(Registry.open(reg.root, device="cpu").tasks()) == ["again", "plain", "sentiment"]


@pytest.mark.parametrize("stage", ["probe_losses", "trial_losses"])
def test_auto_keeps_the_fresh_adapter_when_the_search_runs_out_of_memory(reg, monkeypatch, stage):
    """"auto" only looks for a better start than the fresh adapter it has already trained: running out of
    memory while probing or trying the earlier adapters keeps that adapter, as init=None would store it,
    and says so in the record and a warning, instead of losing it with the call."""
    def short_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transfer, stage, short_of_memory)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                            training=KEPT, init="auto")
    assert info.init["fresh"] == "kept the probe" and {"task", "validation", "rejected"}.isdisjoint(info.init)
    assert info.init["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert sorted(reg.tasks()) == ["again", "sentiment"] and not [k for k in reg._runtime.bank.names if "trial" in k]
    monkeypatch.undo()
    reg.add_task(TaskSpec("plain", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                 training=KEPT)
    assert_same_adapter(reg.adapter_state("again"), reg.adapter_state("plain"))
    numpy.testing.assert_allclose(reg.predict_proba("again", TEXTS), reg.predict_proba("plain", TEXTS), atol=1e-6)


@pytest.mark.parametrize("where", ["candidate", "trial", "source"])
def test_auto_that_runs_out_of_memory_building_an_adapter_leaves_no_layers_behind(tmp_path, tiny_config,
                                                                                 monkeypatch, where):
    """Out of memory halfway through building an adapter's layers: loading a candidate to probe, a trial's
    adapter, or the chosen source for its run. "auto" keeps the fresh adapter as documented, and no layer of
    the failed adapter stays behind. Before, peft's half-built layers stayed in the encoder: the source's
    case lost the fresh adapter with a DataError, and after the trial's case every later version saved
    their tensors too and could not be read back."""
    from tests.core.test_adapter_bank import lora_modules, short_of_memory_at

    wide = AdapterConfig(target_modules=("query", "value", "intermediate.dense"))
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    reg.add_task(TaskSpec("wide", labels=["neg", "pos"]), toy_sentiment(64), toy_sentiment(16, 1), training=FAST,
                 adapter=wide)
    if where == "candidate":  # a new process: the search loads the candidate from its files
        reg = Registry.open(reg.root, device="cpu")
    monkeypatch.setattr(transfer, "pick_trial", lambda losses: ("wide__v1", {}))
    # The fourth layer of the wide adapter's 2 × 3 (the fresh adapter's 2 × 4 come first under "again__v1").
    name, call = {"candidate": ("wide__v1", 4), "trial": ("__cmtl_trial_1__", 4), "source": ("again__v1", 12)}[where]
    short_of_memory_at(monkeypatch, name, call)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                            training=KEPT, init="auto")
    error = info.init["rejected"]["error"] if where == "source" else info.init["error"]
    assert error.startswith("OutOfMemoryError: CUDA out of memory")
    if where != "source":
        assert lora_modules(reg._runtime.bank.encoder, name) == []
    monkeypatch.undo()
    reg.add_task(TaskSpec("plain", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5), training=KEPT)
    assert_same_adapter(reg.adapter_state("again"), reg.adapter_state("plain"))  # the fresh adapter, as stored
    reopened = Registry.open(reg.root, device="cpu")
    numpy.testing.assert_allclose(reopened.predict_proba("again", TEXTS), reopened.predict_proba("plain", TEXTS),
                                  atol=1e-6)


def test_auto_ranks_a_candidate_whose_features_overflow_last_instead_of_failing(reg, monkeypatch):
    """A candidate adapter whose pooled features are not finite cannot be probed: its probe loss is infinite
    (recorded as None), it is never tried, and add_task goes on with the others (before, L-BFGS raised a
    RuntimeError and the fresh adapter was lost)."""
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(16, 1), training=FAST)
    real, calls = transfer.pooled_features, []

    def overflowing(backbone, part, batch_size=64):
        calls.append(None)
        features = real(backbone, part, batch_size)
        return features * float("inf") if len(calls) in (3, 4) else features  # the first candidate's rows

    monkeypatch.setattr(transfer, "pooled_features", overflowing)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                        training=KEPT, init="auto")
    losses = info.init["probe_losses"]
    broken = [k for k, v in losses.items() if v is None]
    assert len(calls) == 6 and len(broken) == 1 and broken[0] != "backbone"
    assert broken[0] not in info.init["trial"]["losses"]


def test_auto_tries_nothing_where_the_kept_probe_is_already_perfect_on_validation(reg, monkeypatch):
    """A fresh adapter that keeps a probe scoring accuracy 1 on validation cannot be beaten by any start:
    "auto" spends no probe, trial or second run on it (the fresh run's score is set to 1 here)."""
    import cmtl.registry.facade as facade

    real = facade.fit

    def perfect(*args, **kwargs):
        result = real(*args, **kwargs)
        result.best_metrics = {**result.best_metrics, "accuracy": 1.0}
        return result

    def probed(*args, **kwargs):
        raise AssertionError("init='auto' probed the earlier adapters although no start could score higher")

    monkeypatch.setattr(facade, "fit", perfect)
    monkeypatch.setattr(transfer, "probe_losses", probed)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                        training=KEPT, init="auto")
    assert info.training["best_step"] == 0 and info.init == {"chosen": "auto", "fresh": "kept a perfect probe"}


@pytest.mark.parametrize("linear", [1.0, 0.0])
def test_auto_with_an_analytic_head_judges_both_starts_by_the_head_the_version_answers_with(reg, monkeypatch, linear):
    """With head=AnalyticConfig(features="adapter") the version answers through an analytic head computed on
    the trained adapter's features, so "auto" compares the two starts by that head's validation score, not
    by the linear head each run trained with (here forced to ``linear`` for the source's run)."""
    from cmtl.continual.config import AnalyticConfig

    analytic = AnalyticConfig(projection=64, features="adapter")
    data = (toy_sentiment(48, 4), toy_sentiment(16, 5))
    score_second_run(monkeypatch, linear)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), *data, training=KEPT, init="auto", head=analytic)
    monkeypatch.undo()
    plain = reg.add_task(TaskSpec("plain", labels=["neg", "pos"]), *data, training=KEPT, head=analytic)
    named = reg.add_task(TaskSpec("named", labels=["neg", "pos"]), *data, training=KEPT, init="sentiment",
                         head=analytic)
    judged = info.init["validation"]
    assert judged["fresh"] == plain.metrics["validation_accuracy"]
    assert judged["source"] == named.metrics["validation_accuracy"]
    kept = named if judged["source"] > judged["fresh"] else plain
    assert ("task" in info.init) == (kept is named)
    assert info.metrics["validation_accuracy"] == kept.metrics["validation_accuracy"]
    numpy.testing.assert_allclose(reg.predict_proba("again", TEXTS), reg.predict_proba(kept.task, TEXTS), atol=1e-6)


def test_auto_needs_the_step_0_probe_and_writes_nothing_without_it(reg):
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(InvalidParameterError, match=r"init.*probe_init.*init='spam'"):
        reg.add_task(TaskSpec("new", labels=["neg", "pos"]), toy_sentiment(16), training=STILL, init="auto")
    assert (reg.root / MANIFEST).read_bytes() == before and "new" not in reg.tasks()


def test_auto_starts_from_an_adapter_that_already_does_the_task(reg):
    """A second sentiment task learns far faster from the sentiment adapter than from zero: the trial sees it.
    (A huge probe_margin makes the fresh adapter keep its probe, so "auto" goes on to the trial.)"""
    slow = TrainConfig(batch_size=8, learning_rate=2e-3, epochs=1, progress=False, probe_margin=1e9)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(64, 4), toy_sentiment(32, 5),
                        training=slow, init="auto")
    trial = info.init["trial"]
    assert trial["gain_z"]["task:sentiment@1"] > transfer.TRIAL_Z
    assert trial["losses"]["task:sentiment@1"] < trial["losses"]["fresh"]
    assert info.init["task"] == "sentiment" and info.init["version"] == 1
    assert info.init["validation"]["source"] > info.init["validation"]["fresh"]


@pytest.mark.parametrize("scale", [None, 0.3])
def test_auto_tries_and_starts_from_the_scaled_source(reg, monkeypatch, scale):
    """Whatever the trial decides, the starts it tried and the start the task gets are the source scaled by
    init_scale (default 1: a full copy); the trial is forced to pick here, and the source to win on validation,
    so the check never depends on them."""
    tried = {}

    def trial_losses(backbone, bank, starts, *args, **kwargs):
        tried.update({k: state for k, (_, state) in starts.items() if k is not None})
        return real(backbone, bank, starts, *args, **kwargs)

    real = transfer.trial_losses
    score_second_run(monkeypatch, 1.0)
    monkeypatch.setattr(transfer, "trial_losses", trial_losses)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                        training=KEPT, init="auto", **({} if scale is None else {"init_scale": scale}))
    expected = transfer.scaled(reg.adapter_state("sentiment"), 1.0 if scale is None else scale)
    (state,) = tried.values()
    assert_same_adapter(state, expected)
    assert_same_adapter(reg.adapter_state("again"), expected)  # KEPT training kept its step-0 state: the start
    assert info.init["task"] == "sentiment" and info.init["scale"] == info.init["trial"]["scale"]
    assert info.init["scale"] == (1.0 if scale is None else scale)


def test_auto_is_deterministic_and_leaves_the_callers_random_state_alone(reg, tmp_path, tiny_config):
    data = (toy_sentiment(48, 4), toy_sentiment(16, 5))
    torch.manual_seed(123)
    first = reg.add_task(TaskSpec("a", labels=["neg", "pos"]), *data, training=KEPT, init="auto").init
    after = torch.rand(3)
    torch.manual_seed(123)
    second = reg.add_task(TaskSpec("b", labels=["neg", "pos"]), *data, training=KEPT, init="auto").init
    torch.testing.assert_close(torch.rand(3), after)
    # "b" sees "a" as one more candidate; the two candidates both saw are scored alike.
    for part in ("losses", "gain_z"):
        for key in ("fresh", "task:sentiment@1"):
            if key in first["trial"][part]:
                assert second["trial"][part][key] == pytest.approx(first["trial"][part][key], abs=1e-6)


def test_pick_trial_needs_a_gain_beyond_noise_over_the_fresh_start():
    fresh = torch.tensor([0.70, 0.60, 0.80, 0.65, 0.75, 0.70, 0.60, 0.80])
    noise = torch.tensor([0.01, -0.01, 0.02, -0.02, 0.01, -0.01, 0.02, -0.02])
    clear, small, worse = fresh - 0.2 + noise, fresh - 0.004 + noise, fresh + 0.1 + noise
    assert pick_trial({None: fresh, "clear": clear, "small": small, "worse": worse})[0] == "clear"
    assert pick_trial({None: fresh, "small": small, "worse": worse})[0] is None  # lower, but within its noise
    assert pick_trial({None: fresh})[0] is None
    best, scores = pick_trial({None: fresh, "clear": clear, "clearer": clear - 0.05})
    assert best == "clearer" and scores["clear"] > transfer.TRIAL_Z and scores["clearer"] > scores["clear"]
    # An identical start is no gain; a start whose trial diverged is never taken.
    assert pick_trial({None: fresh, "same": fresh.clone()}) == (None, {"same": 0.0})
    assert pick_trial({None: fresh, "diverged": torch.full_like(fresh, float("inf"))})[0] is None
    assert pick_trial({None: torch.full_like(fresh, float("inf")), "clear": clear})[0] == "clear"


def test_pick_trial_scores_a_uniform_difference_as_paired_gain_does():
    # Every row lower (or higher) by the same amount has no spread: the score is then +-sqrt(n), the sign
    # test's z, as for the probe's paired_gain, not an infinite or zero score.
    fresh = torch.tensor([0.75, 0.5, 1.0, 0.625, 0.75, 0.5, 1.0, 0.625])  # exact in binary: every difference 0.25
    best, scores = pick_trial({None: fresh, "better": fresh - 0.25, "worse": fresh + 0.25})
    assert best == "better"
    assert scores == {"better": pytest.approx(8 ** 0.5), "worse": pytest.approx(-8 ** 0.5)}
    assert pick_trial({None: fresh[:1], "one": fresh[:1] - 0.25}) == (None, {"one": 0.0})  # one row: no evidence


def test_shortlist_takes_the_lowest_probe_losses_and_never_the_backbone():
    assert shortlist({None: 0.1, "a": 0.5, "b": 0.3, "c": 0.4}, 2) == ["b", "c"]
    assert shortlist({None: 0.1}) == []
    assert shortlist({None: 0.1, "a": float("inf"), "b": 0.3}, 2) == ["b"]  # features that overflowed


def test_auto_without_candidates_starts_fresh(tmp_path, tiny_config):
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    info = reg.add_task(TaskSpec("first", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                        training=KEPT, init="auto")
    backbone = pytest.approx(info.init["probe_losses"]["backbone"])
    assert info.init == {"chosen": "auto", "fresh": "kept the probe",
                         "probe_losses": {"backbone": backbone}}  # no source, no scale


@pytest.mark.parametrize("init", ["", "merge:", "task:", "other:spam", "task:spam@0", "task:spam@x", 3, ["spam"]])
def test_malformed_init_is_refused(init):
    with pytest.raises(InvalidParameterError, match="init"):
        parse_init(init)


@pytest.mark.parametrize("init, error, match", [
    ("nope", TaskNotFoundError, "nope"),
    ("task:sentiment@7", TaskNotFoundError, "7"),
    ("merge:nope", TaskNotFoundError, "nope"),
    ("merge:", InvalidParameterError, "init"),
])
def test_bad_init_writes_nothing(reg, init, error, match):
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(error, match=match):
        reg.add_task(TaskSpec("new", labels=["neg", "pos"]), toy_sentiment(16), training=STILL, init=init)
    assert (reg.root / MANIFEST).read_bytes() == before
    assert not (reg.root / "tasks" / "new").exists() and "new" not in reg.tasks()


def test_init_whose_adapter_differs_from_adapter_is_refused(reg):
    source = AdapterConfig.from_dict(reg.current("sentiment").adapter)
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(InvalidParameterError, match=r"r=2 where the source has 8.*adapter=None"):
        reg.add_task(TaskSpec("new", labels=["neg", "pos"]), toy_sentiment(16), training=STILL, init="sentiment",
                     adapter=AdapterConfig(r=2))
    assert (reg.root / MANIFEST).read_bytes() == before and "new" not in reg.tasks()
    # Repeating the source's settings is fine.
    info = reg.add_task(TaskSpec("new", labels=["neg", "pos"]), toy_sentiment(16), training=STILL,
                        init="sentiment", adapter=source)
    assert info.init["task"] == "sentiment"


def test_a_copied_adapter_keeps_the_requested_dropout_not_the_sources(reg):
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(15, 1), training=FAST)
    reg.merge(["sentiment", "topic"], "both", "linear")  # merged adapters are stored with dropout 0
    assert reg.merge_info("both")["adapter"]["dropout"] == 0.0
    info = reg.add_task(TaskSpec("new", labels=TOPICS), toy_topics(30, 2), training=STILL, init="merge:both")
    assert info.adapter["dropout"] == AdapterConfig().dropout
    assert info.adapter["r"] == reg.merge_info("both")["adapter"]["r"]


def test_auto_skips_a_candidate_it_cannot_load_and_says_why(reg):
    reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(48), toy_topics(15, 1), training=FAST)
    (reg.root / "tasks" / "topic" / "v1" / "adapter.safetensors").write_bytes(b"damaged")
    fresh = Registry.open(reg.root, device="cpu")  # nothing loaded yet
    info = fresh.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                          training=KEPT, init="auto")
    assert "CorruptFileError" in info.init["skipped"]["task:topic"]
    assert set(info.init["probe_losses"]) == {"backbone", "task:sentiment@1"}
    assert fresh._runtime.bank.names == ["again__v1"]  # the probed candidates were unloaded again


def test_auto_without_validation_rows_starts_fresh_and_says_why(reg):
    info = reg.add_task(TaskSpec("one", labels=["neg", "pos"]), toy_sentiment(1), training=KEPT, init="auto")
    assert info.init == {"chosen": "auto", "note": "no validation rows to judge a fresh adapter by"}


def test_auto_leaves_out_an_adapter_that_never_moved_and_says_why(reg):
    """A version whose training kept its step-0 probe has B = 0: its adapter is the bare backbone, the same
    start as a fresh adapter, so probing and trying it would only spend a trial slot on the fresh start."""
    kept = TrainConfig(max_steps=1, learning_rate=1e-12, weight_decay=0.0, patience=None, progress=False)
    reg.add_task(TaskSpec("kept", labels=["neg", "pos"]), toy_sentiment(48, 6), toy_sentiment(16, 7), training=kept)
    assert reg.current("kept").training["best_step"] == 0  # the probe won: the adapter never moved
    assert all(not v.any() for k, v in reg.adapter_state("kept").items() if "lora_B" in k)
    info = reg.add_task(TaskSpec("again", labels=["neg", "pos"]), toy_sentiment(48, 4), toy_sentiment(16, 5),
                        training=kept, init="auto")
    assert "never moved" in info.init["skipped"]["task:kept@1"]
    assert set(info.init["probe_losses"]) == {"backbone", "task:sentiment@1"}
    assert set(info.init["trial"]["losses"]) == {"fresh", "task:sentiment@1"}
    assert reg.adapter_state("sentiment") and any(v.any() for k, v in reg.adapter_state("sentiment").items()
                                                  if "lora_B" in k)  # a trained one stays a candidate
