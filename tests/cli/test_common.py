"""What ``cmtl add-task`` says about a new version: where its adapter started and which state was kept."""

from __future__ import annotations

from cmtl.cli.common import training_story
from cmtl.registry.reader import VersionInfo


def info(training: dict, init: dict | None = None, head: dict | None = None,
         metrics: dict | None = None) -> VersionInfo:
    return VersionInfo(task="t", version=1, parent=None, created="", kind="train", current=True,
                       training={"probe_init": True, "probe_margin": 0.0, **training}, init=init, head=head,
                       metrics=metrics or {})


def test_a_trained_state_is_named_with_its_step_and_its_gain_over_the_probe():
    lines = training_story(info({"steps": 310, "best_step": 120, "probe_gain": 3.42, "stopped_early": True}))
    assert lines == ["start: a fresh adapter",
                     "kept: the trained state of step 120 of 310, stopped early; +3.4 standard errors against the "
                     "step-0 probe on validation"]
    no_probe = training_story(info({"steps": 10, "best_step": 10, "probe_gain": None, "probe_init": False}))
    assert no_probe[1] == "kept: the trained state of step 10 of 10"
    averaged = training_story(info({"steps": 310, "best_step": 120, "probe_gain": 3.42, "stopped_early": True,
                                    "ema_decay": 0.98, "best_averaged": True}))
    assert averaged[1].startswith("kept: the running average of the trained states (ema_decay 0.98) at step 120 of "
                                  "310, stopped early; +3.4")


def test_a_trained_state_is_compared_with_the_probe_it_had_to_beat():
    record = {"steps": 310, "best_step": 120, "probe_gain": 3.42,
              "probe_metrics": {"validation_accuracy": 0.8, "validation_loss": 0.5, "validation_n": 500}}
    lines = training_story(info(record, metrics={"validation_accuracy": 0.9, "validation_loss": 0.3}))
    assert lines[2] == "against the probe: validation accuracy 0.9000, the probe's 0.8000 (50 % of its errors removed)"
    kept = training_story(info({**record, "best_step": 0, "probe_gain": -1.0}, metrics={"validation_accuracy": 0.8}))
    assert kept[1].startswith("kept: the step-0 linear probe, validation accuracy 0.8000 (no trained state")
    regression = {"validation_mse": 0.2}  # lower is better: no errors-removed fraction
    lines = training_story(info({**record, "probe_metrics": {"validation_mse": 0.4}}, metrics=regression))
    assert lines[2] == "against the probe: validation mse 0.2000, the probe's 0.4000"
    multi = training_story(info({**record, "probe_metrics": {"validation_micro_f1": 0.6}},
                                metrics={"validation_micro_f1": 0.7}))
    assert multi[2] == "against the probe: validation micro_f1 0.7000, the probe's 0.6000"  # 1 − F1 counts no errors
    old = training_story(info({"steps": 310, "best_step": 120, "probe_gain": 3.42},
                              metrics={"validation_accuracy": 0.9}))
    assert len(old) == 2  # versions recorded before the probe's metrics were


def test_the_probe_kept_says_why():
    lost = training_story(info({"steps": 64, "best_step": 0, "probe_gain": -1.6}))
    assert lost[1] == ("kept: the step-0 linear probe (no trained state scored higher on validation); the adapter "
                       "keeps its starting weights")
    margin = training_story(info({"steps": 64, "best_step": 0, "probe_gain": 0.8, "probe_margin": 1.0}))
    assert "0.8 standard errors ahead on validation, not more than probe_margin 1" in margin[1]


def test_the_start_names_the_source_and_how_it_was_chosen():
    named = training_story(info({}, {"task": "spam", "version": 2, "chosen": "named"}))
    assert named == ["start: task 'spam' v2"]  # recorded before init_scale: a full copy
    assert training_story(info({}, {"task": "spam", "version": 2, "chosen": "named", "scale": 1.0})) == named
    shrunk = training_story(info({}, {"task": "spam", "version": 2, "chosen": "named", "scale": 0.25}))
    assert shrunk == ["start: task 'spam' v2 scaled by 0.25"]
    merge = training_story(info({}, {"merge": "all", "chosen": "named"}))
    assert merge == ["start: merge 'all'"]
    auto = {"task": "spam", "version": 1, "chosen": "auto", "scale": 0.5, "trial": {"gain_z": {"task:spam@1": 3.31}}}
    assert training_story(info({}, auto)) == ["start: task 'spam' v1 scaled by 0.5, chosen by a short trial "
                                              "(init='auto', 3.3 standard errors ahead of a fresh start)"]
    fresh = training_story(info({}, {"chosen": "auto", "trial": {"gain_z": {"task:spam@1": -2.0}}}))
    assert fresh == ["start: a fresh adapter (init='auto': no earlier adapter beat a fresh start in the trial)"]
    alone = training_story(info({}, {"chosen": "auto", "probe_losses": {"backbone": 0.6}}))
    assert alone == ["start: a fresh adapter (init='auto': no earlier adapter to try)"]
    few = training_story(info({}, {"chosen": "auto", "note": "too few rows to probe; fresh start"}))
    assert few == ["start: a fresh adapter (init='auto': too few rows to probe; fresh start)"]


def test_the_start_says_why_auto_tried_a_source_and_what_validation_said():
    """Records since "auto" trains a fresh adapter first: it beat its probe (nothing tried), or it kept the
    probe and a source was tried, then kept or rejected on validation."""
    learned = training_story(info({}, {"chosen": "auto", "fresh": "beat the probe"}))
    assert learned == ["start: a fresh adapter (init='auto': it beat the step-0 probe, so no earlier adapter was "
                       "tried)"]
    perfect = training_story(info({}, {"chosen": "auto", "fresh": "kept a perfect probe"}))
    assert perfect == ["start: a fresh adapter (init='auto': it kept a step-0 probe that scores perfectly on "
                       "validation, which no start can beat)"]
    judged = {"metric": "accuracy", "fresh": 0.74, "source": 0.8}
    kept = {"task": "trec", "version": 1, "chosen": "auto", "fresh": "kept the probe", "validation": judged,
            "trial": {"gain_z": {"task:trec@1": 2.6}}}
    assert training_story(info({}, kept)) == [
        "start: task 'trec' v1, chosen by a short trial (init='auto', 2.6 standard errors ahead of a fresh start)",
        "why: a fresh adapter could not beat the step-0 probe; from this source the task scored accuracy 0.8000 "
        "against the fresh adapter's 0.7400 on validation"]
    lower = {"chosen": "auto", "fresh": "kept the probe", "trial": {"gain_z": {"task:trec@1": 2.6}},
             "validation": {**judged, "source": 0.7}, "rejected": {"source": "task:trec@1"}}
    assert training_story(info({}, lower)) == [
        "start: a fresh adapter (init='auto': it kept the step-0 probe; the start from task:trec@1 scored accuracy "
        "0.7000 against the fresh adapter's 0.7400 on validation)"]
    diverged = {**lower, "validation": {**judged, "source": None}, "rejected": {"source": "task:trec@1", "error": "x"}}
    assert training_story(info({}, diverged)) == [
        "start: a fresh adapter (init='auto': it kept the step-0 probe; the start from task:trec@1 diverged)"]
    short = {**diverged, "rejected": {"source": "task:trec@1", "error": "OutOfMemoryError: CUDA out of memory"}}
    assert training_story(info({}, short)) == [
        "start: a fresh adapter (init='auto': it kept the step-0 probe; the start from task:trec@1 ran out of memory)"]
    overflowed = {"chosen": "auto", "fresh": "kept the probe", "probe_losses": {"backbone": 0.6, "task:trec@1": None}}
    assert training_story(info({}, overflowed)) == [
        "start: a fresh adapter (init='auto': it kept the step-0 probe; no earlier adapter could be probed (their "
        "features were not finite))"]
    search = {"chosen": "auto", "fresh": "kept the probe", "error": "OutOfMemoryError: CUDA out of memory"}
    assert training_story(info({}, search)) == [
        "start: a fresh adapter (init='auto': it kept the step-0 probe; trying earlier adapters failed: "
        "OutOfMemoryError: CUDA out of memory)"]


def test_an_analytic_head_has_no_kept_state():
    lines = training_story(info({"steps": 0, "best_step": 0}, head={"config": {"kind": "ridge"}}))
    assert lines == ["start: a fresh adapter"]


def test_the_story_ranks_by_the_metric_training_ranks_by():
    from cmtl import TaskSpec
    from cmtl.core.tasks import PRIMARY_METRIC
    from cmtl.training.evaluation import primary_metric

    specs = [TaskSpec("s", labels=["a", "b"]), TaskSpec("m", labels=["a", "b"], problem_type="multi_label"),
             TaskSpec("r", problem_type="regression")]
    assert [primary_metric(spec) for spec in specs] == list(PRIMARY_METRIC.values())

