"""A merge against the frozen backbone: the baseline in every record, λ = 0 as a search candidate, disjoint
selection and report rows, refusal with require_gain, successive halving and the frozen-layer cache."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from cmtl import AdapterConfig, MergeRefusedError, Registry, TaskSpec
from cmtl.merging import MergeConfig, pipeline
from cmtl.data import seeded_order
from cmtl.merging.scoring import rungs, split_holdout
from cmtl.registry import store
from cmtl.registry.store import MANIFEST
from tests.conftest import FAST, toy_sentiment


def test_rungs_keep_a_third_on_three_times_the_rows_down_to_one():
    assert rungs(12) == [(12, 1 / 27), (4, 1 / 9), (2, 1 / 3), (1, 1.0)]
    assert rungs(5) == [(5, 1 / 9), (2, 1 / 3), (1, 1.0)]
    assert rungs(24) == [(24, 1 / 27), (8, 1 / 9), (3, 1 / 3), (1, 1.0)]
    assert rungs(2) == [(2, 1 / 3), (1, 1.0)] and rungs(1) == [(1, 1.0)]


def test_selection_and_report_rows_are_disjoint_and_seeded():
    from cmtl.data import Encoded

    held = Encoded([[1, i] for i in range(20)], None, torch.zeros(20, dtype=torch.long))
    pick, report = split_holdout(held, 0.5, seed=3)
    assert len(pick) == 10 and sorted(pick + report) == list(range(20)) and not set(pick) & set(report)
    assert split_holdout(held, 0.5, seed=3) == (pick, report) and split_holdout(held, 0.5, seed=4) != (pick, report)
    assert [len(p) for p in split_holdout(held, 0.99, seed=0)] == [19, 1]  # both parts keep a row
    with pytest.raises(ValueError, match="at least 2 held-out rows"):
        split_holdout(held.select([0]), 0.5, seed=0)


def test_copies_of_one_input_stay_on_one_side_of_the_holdout_split():
    """split_holdout cut the held-out rows by position: a text held twice (a lineage's held-out samples
    repeat texts) could choose the knobs on one side and be reported on the other, so the reported score
    was partly on rows the search had seen."""
    from cmtl.data import Encoded

    ids = [[1, i % 7] for i in range(21)]  # 7 inputs, 3 copies each
    held = Encoded(ids, None, torch.zeros(21, dtype=torch.long))
    for seed in range(20):
        pick, report = split_holdout(held, 0.5, seed)
        assert sorted(pick + report) == list(range(21)) and pick and report
        assert not {tuple(ids[i]) for i in pick} & {tuple(ids[i]) for i in report}
        assert 9 <= len(pick) <= 12
    # Pairs are told apart by their second text (token type ids).
    pairs = Encoded([[1, 2]] * 4, [[0, 0], [0, 1], [0, 0], [0, 1]], torch.zeros(4, dtype=torch.long))
    pick, report = split_holdout(pairs, 0.5, 0)
    assert sorted(pick) in ([0, 2], [1, 3])
    # Distinct inputs: the plain seeded split, as before (the selection rows in their seeded order).
    distinct = Encoded([[1, i] for i in range(20)], None, torch.zeros(20, dtype=torch.long))
    order = seeded_order(20, 5)
    assert split_holdout(distinct, 0.3, 5) == (order[:6], order[6:])
    # One input in copies: no split can part them; both sides keep rows.
    same = Encoded([[1, 2]] * 6, None, torch.zeros(6, dtype=torch.long))
    assert [len(p) for p in split_holdout(same, 0.5, 0)] == [3, 3]


def frozen_scores(reg: Registry, task: str, rows) -> float:
    """Accuracy of ``task``'s own head on the bare backbone's features of ``rows`` (Examples)."""
    spec = reg.spec(task)
    head = torch.nn.Linear(reg.backbone.hidden_size, spec.num_outputs)
    state = load_file(store.version_dir(reg.root, task, 1) / "head.safetensors")
    head.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    with torch.no_grad():
        predicted = head(reg.embed(rows.texts)).argmax(-1)
    return float((predicted == spec.encode_labels(rows.labels)).float().mean())


def test_every_merge_records_the_frozen_baseline(merge_reg):
    reg = merge_reg
    record = reg.merge(["a", "b"], "ab", "linear")  # no search: every held-out row reports
    for t in ("a", "b"):
        held = reg.holdout(t)
        row = record["holdout"][t]
        assert row["rows"] == len(held) and row["selection_rows"] is None
        # The members' heads on the bare backbone's features, computed here independently.
        assert row["baseline"] == pytest.approx(frozen_scores(reg, t, held), abs=1e-9)
    assert record["baseline_normalised"] == pytest.approx(
        sum(record["holdout"][t]["baseline"] / record["holdout"][t]["individual"] for t in ("a", "b")) / 2)
    assert record["below_baseline"] == [t for t in ("a", "b")
                                        if record["holdout"][t]["merged"] < record["holdout"][t]["baseline"]]
    assert reg.merge_info("ab")["holdout"] == record["holdout"]


@pytest.mark.parametrize("refit", [False, True])
def test_no_delta_reproduces_the_baseline_exactly(merge_reg, refit):
    """λ = 0 through a stored (zero) LoRA adapter scores what the frozen backbone scores without one."""
    reg = merge_reg
    record = reg.merge(["a", "b"], "zero", "ties", config=MergeConfig(scale=0.0, refit_heads=refit))
    assert record["adapter"]["r"] == 1 and record["config"]["scale"] == 0.0
    for t in ("a", "b"):
        row = record["holdout"][t]
        assert row["merged"] == row["baseline"]
        assert reg.evaluate(t, reg.holdout(t), merge="zero")["accuracy"] == pytest.approx(row["baseline"], abs=1e-9)
    assert record["below_baseline"] == []


def test_search_chooses_on_selection_rows_and_reports_on_the_others(merge_reg):
    reg = merge_reg
    record = reg.merge(["a", "b"], "ab", "ties", search=True, config=MergeConfig(selection_fraction=0.25, seed=2))
    for t in ("a", "b"):
        held = reg.holdout(t)
        row = record["holdout"][t]
        assert row["selection_rows"] == 8 and row["rows"] == len(held) - 8
        _, report = split_holdout(reg._encode(held, reg.spec(t)), 0.25, seed=2)
        # The reported score is the stored merge's on exactly the rows the search never saw.
        assert row["merged"] == pytest.approx(reg.evaluate(t, held.select(report), merge="ab")["accuracy"], abs=1e-9)
        assert row["individual"] == pytest.approx(reg.evaluate(t, held.select(report))["accuracy"], abs=1e-9)
    # The search never returns something below no delta on the selection rows.
    assert record["selection"]["normalised"] >= record["search"][0]["normalised"]
    assert record["search"][0]["scale"] == 0.0


@pytest.fixture
def every_delta_hurts(monkeypatch):
    """Members whose deltas are large seeded noise: any merge of them wrecks the backbone's features.

    The noise is drawn in sorted module order, whatever order the state dict lists its modules in: drawn
    in safetensors' load order (a new one on each load, before the store sorted keys), it made the search's
    outcome a lottery."""
    real = pipeline.lora_deltas

    def noisy(state, scaling):
        exact, generator = real(state, scaling), torch.Generator().manual_seed(0)
        return {m: 50.0 * torch.randn(exact[m].shape, generator=generator, dtype=exact[m].dtype)
                for m in sorted(exact)}

    monkeypatch.setattr(pipeline, "lora_deltas", noisy)


def test_a_search_where_every_delta_hurts_returns_the_baseline(merge_reg, every_delta_hurts, caplog):
    reg = merge_reg
    with caplog.at_level(logging.WARNING, logger="cmtl.merging.pipeline"):
        record = reg.merge(["a", "b"], "none", "linear", search=True, config=MergeConfig(refit_heads=True))
    assert record["config"]["scale"] == 0.0 and record["adapter"]["r"] == 1
    # No trial beats the baseline; one may tie it (the search takes a delta only for a strict gain).
    assert all(tr["normalised"] <= record["search"][0]["normalised"] for tr in record["search"][1:])
    for t in ("a", "b"):
        assert record["holdout"][t]["merged"] == record["holdout"][t]["baseline"]
    assert "chose no delta" in caplog.text
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(MergeRefusedError, match="require_gain.*no delta"):
        reg.merge(["a", "b"], "refused", "linear", search=True,
                  config=MergeConfig(refit_heads=True, require_gain=True))
    assert (reg.root / MANIFEST).read_bytes() == before and not (reg.root / "merges" / "refused").exists()


def test_require_gain_lets_a_merge_that_beats_the_baseline_through(merge_reg):
    reg = merge_reg
    record = reg.merge(["a", "b"], "ab", "linear", config=MergeConfig(scale=1.0))
    if record["below_baseline"] or record["normalised"] <= record["baseline_normalised"]:
        with pytest.raises(MergeRefusedError, match="frozen backbone"):
            reg.merge(["a", "b"], "ab-gain", "linear", config=MergeConfig(scale=1.0, require_gain=True))
    else:
        assert reg.merge(["a", "b"], "ab-gain", "linear", config=MergeConfig(scale=1.0, require_gain=True))


def test_cached_and_uncached_searches_choose_the_same_candidate(tmp_path, tiny_config, caplog):
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    top = AdapterConfig(layers=(1,))  # the bottom layer is frozen in every member: it runs once per row
    reg.add_task(TaskSpec("a", labels=["neg", "pos"]), toy_sentiment(64), toy_sentiment(32, 1), training=FAST,
                 adapter=top)
    reg.add_task(TaskSpec("b", labels=["neg", "pos"]), toy_sentiment(64, 2), toy_sentiment(32, 3), training=FAST,
                 adapter=top)
    with caplog.at_level(logging.INFO, logger="cmtl.training.caching"):
        cached = reg.merge(["a", "b"], "cached", "ties", search=True, config=MergeConfig(refit_heads=True))
    assert "Caching the 1 frozen layers" in caplog.text
    plain = reg.merge(["a", "b"], "plain", "ties", search=True,
                      config=MergeConfig(refit_heads=True, cache_frozen_mb=0))
    assert (cached["config"]["scale"], cached["config"]["density"]) == (plain["config"]["scale"],
                                                                        plain["config"]["density"])
    for mine, theirs in zip(cached["search"], plain["search"]):
        assert mine["normalised"] == pytest.approx(theirs["normalised"], abs=1e-6)
    for t in ("a", "b"):
        for key in ("merged", "baseline", "individual"):
            assert cached["holdout"][t][key] == pytest.approx(plain["holdout"][t][key], abs=1e-6)


def test_a_delta_added_to_the_weights_matches_the_stored_adapter_and_is_undone(merge_reg):
    from cmtl.merging.methods import lora_deltas, to_lora_state

    reg = merge_reg
    rt, backbone = reg._runtime, reg.backbone
    key = rt.task(reg, "a", 1)
    delta = {m: 3 * d for m, d in lora_deltas(rt.bank.state_dict(key), rt.bank.scaling(key)).items()}
    before = {n: p.detach().clone() for n, p in backbone.encoder.named_parameters()}
    texts = ["a great film", "an awful film with a dull plot"]
    with rt.bank.added(delta):
        dense = reg._runtime.embed(texts, None)
    state, r, _ = to_lora_state(delta, None)
    rt.bank.load("_check", AdapterConfig.from_dict({**reg.versions("a")[0].adapter, "r": r, "alpha": float(r),
                                                    "dropout": 0.0}), state)
    lora = reg._runtime.embed(texts, "_check")
    rt.bank.remove("_check")
    torch.testing.assert_close(dense, lora, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, reg._runtime.embed(texts, None))  # the delta did something
    assert all(torch.equal(p, before[n]) for n, p in backbone.encoder.named_parameters() if n in before)


def test_normalised_and_below_baseline_read_mse_as_lower_is_better():
    """Regression tasks score by MSE: the merge code read every score as higher-is-better, so it flagged a
    merge whose MSE was below the frozen backbone's as 'below baseline' and ranked the worst MSE first."""
    own, merged, frozen = {"acc": 0.9, "mse": 0.02}, {"acc": 0.81, "mse": 0.04}, {"acc": 0.5, "mse": 0.2}
    lower = {"mse"}
    assert pipeline.normalised(merged, own, lower) == pytest.approx((0.81 / 0.9 + 0.02 / 0.04) / 2)
    assert pipeline.normalised(frozen, own, lower) == pytest.approx((0.5 / 0.9 + 0.02 / 0.2) / 2)
    record = pipeline.Merged(None, {}, 1, {}, {}, {"select": {}, "report": merged}, {"report": own},
                             {"report": frozen}, {}, [], lower=frozenset(lower))
    assert record.below_baseline() == []
    worse = pipeline.Merged(None, {}, 1, {}, {}, {"select": {}, "report": {"acc": 0.4, "mse": 0.3}},
                            {"report": own}, {"report": frozen}, {}, [], lower=frozenset(lower))
    assert worse.below_baseline() == ["acc", "mse"]


def test_a_regression_merge_is_judged_by_its_mse(tmp_path, tiny_config):
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    scored = lambda n, seed: [{"text": r["text"], "label": float(r["label"] == "pos")}  # noqa: E731
                              for r in toy_sentiment(n, seed)]
    for t, seed in (("a", 0), ("b", 2)):
        reg.add_task(TaskSpec(t, problem_type="regression"), scored(64, seed), scored(32, seed + 1), training=FAST)
    record = reg.merge(["a", "b"], "ab", "linear", config=MergeConfig(scale=0.8))
    held = record["holdout"]
    assert record["below_baseline"] == [t for t in ("a", "b") if held[t]["merged"] > held[t]["baseline"]]
    share = lambda part: sum(held[t]["individual"] / held[t][part] for t in "ab") / 2  # noqa: E731
    assert record["normalised"] == pytest.approx(share("merged"))
    assert record["baseline_normalised"] == pytest.approx(share("baseline"))
    searched = reg.merge(["a", "b"], "ab-search", "linear", search=True)
    last = [tr for tr in searched["search"] if tr["share"] == 1.0 and tr["scale"] > 0]
    best = max(last, key=lambda tr: tr["normalised"])
    own = searched["selection"]["individual"]
    assert best["normalised"] == pytest.approx(sum(own[t] / best["scores"][t] for t in "ab") / 2)


def test_the_frozen_layer_cache_of_a_merge_ignores_the_adapter_used_last(tmp_path, tiny_config):
    """The merge's scorer cached the frozen bottom layers under whichever adapter was active: after a prediction
    of a task adapting every layer, the merge was scored on that task's features (other scores, other flags)."""
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    reg.add_task(TaskSpec("x", labels=["neg", "pos"]), toy_sentiment(32, 4), training=FAST)  # every layer
    top = AdapterConfig(layers=(1,))
    reg.add_task(TaskSpec("a", labels=["neg", "pos"]), toy_sentiment(64), toy_sentiment(32, 1), training=FAST,
                 adapter=top)
    reg.add_task(TaskSpec("b", labels=["neg", "pos"]), toy_sentiment(64, 2), toy_sentiment(32, 3), training=FAST,
                 adapter=top)
    fresh = Registry.open(reg.root, device="cpu").merge(["a", "b"], "fresh", "linear", config=MergeConfig(scale=1.0))
    reg.predict("x", ["a lovely film"])  # x's adapter is now the active one
    after = reg.merge(["a", "b"], "after", "linear", config=MergeConfig(scale=1.0))
    assert after["holdout"] == fresh["holdout"]


@pytest.mark.parametrize("knobs", [{"search": True}, {"config": MergeConfig(require_gain=True)}])
def test_a_search_or_gain_check_refuses_a_member_without_held_out_rows(merge_reg, knobs):
    """A member without a held-out sample was left out of the search's mean and of require_gain's check,
    silently: the knobs were chosen for the other members alone (λ could wreck the unscored task), and
    require_gain let through a merge never scored on it."""
    reg = merge_reg
    reg.add_task(TaskSpec("c", labels=["neg", "pos"]), toy_sentiment(32, 2), training=FAST)  # no validation
    assert reg.holdout("c") is None
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match=r"held-out.*\['c'\]"):
        reg.merge(["a", "c"], "ac", "linear", **knobs)
    assert (reg.root / MANIFEST).read_bytes() == before and "ac" not in reg.merges()
    assert reg.merge(["a", "c"], "ac", "linear")["holdout"]["c"]["merged"] is None  # a plain merge still works
