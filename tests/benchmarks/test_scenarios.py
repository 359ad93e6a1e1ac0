"""Scenario files: they parse, validate, reorder deterministically, and load real capped splits."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmtl.benchmarks.scenarios import Scenario

SCENARIOS = Path(__file__).parents[2] / "scenarios"


@pytest.mark.parametrize("name, kind, n", [("text5", "task-incremental", 5), ("sentiment4", "domain-incremental", 4),
                                            ("trec-classes", "class-incremental", 3)])
def test_scenario_files(name, kind, n):
    scenario = Scenario.from_yaml(SCENARIOS / f"{name}.yaml")
    assert (scenario.name, scenario.kind, len(scenario.experiences)) == (name, kind, n)
    orders = scenario.orders()
    assert orders[0][0] == "stated" and len(orders) == 1 + len(scenario.random_orders)
    for _, other in orders[1:]:
        assert sorted(e.name for e in other.experiences) == sorted(e.name for e in scenario.experiences)
    assert [o.experiences for _, o in orders] == [o.experiences for _, o in scenario.orders()]


def test_text5_has_three_distinct_random_orders():
    orders = [tuple(e.name for e in s.experiences) for _, s in Scenario.from_yaml(SCENARIOS / "text5.yaml").orders()]
    assert len(orders) == 4 and len(set(orders)) == 4


def test_load_shrunk_class_incremental():
    scenario = Scenario.from_yaml(SCENARIOS / "trec-classes.yaml").shrink(40, 20)
    experiences = scenario.load()
    assert scenario.all_labels() == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    for exp, declared in zip(experiences, scenario.experiences):
        assert set(exp.train.labels) <= set(declared.labels) and len(exp.train) == 40 and len(exp.test) == 20
        assert not set(exp.train.texts) & set(exp.test.texts)


def test_load_domain_incremental_shares_one_task():
    experiences = Scenario.from_yaml(SCENARIOS / "sentiment4.yaml").shrink(10, 10).load()
    assert {e.spec.name for e in experiences} == {"sentiment"}
    assert {e.spec.labels for e in experiences} == {("neg", "pos")}


@pytest.mark.parametrize("change, match", [
    ({"kind": "online"}, "'kind' parameter of Scenario 's' must be one of"),
    ({"experiences": [{"name": "a", "corpus": "trec6"}]}, "at least 2 experiences"),
    ({"experiences": [{"name": "a", "corpus": "trec6"}, {"name": "a", "corpus": "sms_spam"}]}, "duplicate"),
    ({"kind": "domain-incremental"}, "'task' parameter of Scenario 's' must name the one task"),
    ({"kind": "class-incremental", "task": "t"}, "names each experience's 'labels'"),
    ({"max_train": 0}, "must be >= 1"),
])
def test_bad_scenarios(change, match):
    base = {"name": "s", "kind": "task-incremental",
            "experiences": [{"name": "a", "corpus": "trec6"}, {"name": "b", "corpus": "sms_spam"}]}
    with pytest.raises(ValueError, match=match):
        Scenario.from_dict({**base, **change})


@pytest.mark.parametrize("experiences", [
    [{"name": "movies", "corpus": "vader_movies"}, {"name": "rotten", "corpus": "rotten_tomatoes"}],
    [{"name": "a", "corpus": "trec6", "labels": ["ABBR", "DESC"]}, {"name": "b", "corpus": "trec6",
                                                                    "labels": ["DESC", "ABBR"]}],
])
def test_a_domain_incremental_scenario_needs_one_label_set(experiences):
    """Every experience of a domain-incremental stream is the one task: with other labels per experience the
    shared strategies' one head answered with the union (a movie review could be called 'fresh'), and each
    strategy's untrained answers (b) read the head's outputs in another label order."""
    with pytest.raises(ValueError, match=r"domain-incremental.*same labels.*\['neg', 'pos'\].*\['fresh', 'rotten'\]"
                       if experiences[0]["corpus"] == "vader_movies" else r"same labels.*in the same order"):
        Scenario.from_dict({"name": "s", "kind": "domain-incremental", "task": "t", "experiences": experiences})
