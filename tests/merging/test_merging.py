"""Merging: each method against hand-computed examples, LoRA re-factorisation, and the registry round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmtl import Registry, TaskNotFoundError, TaskSpec
from cmtl.core.heads import TaskHead
from cmtl.errors import DataError
from cmtl.merging import (MergeConfig, dare, lora_deltas, merge_deltas, refactorise, refit_head, smallest_rank, ties,
                          to_lora_state, trim)
from cmtl.merging.methods import parse_rank
from cmtl.registry.store import MANIFEST
from tests.conftest import FAST, toy_sentiment

T = lambda *rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731


def test_lora_delta_is_scaled_b_times_a():
    a, b = torch.randn(2, 5), torch.randn(3, 2)
    deltas = lora_deltas({"m.lora_A.weight": a, "m.lora_B.weight": b}, scaling=2.0)
    torch.testing.assert_close(deltas["m"], 2.0 * (b.double() @ a.double()))
    with pytest.raises(ValueError, match="lack lora_A or lora_B"):
        lora_deltas({"m.lora_A.weight": a}, 1.0)
    with pytest.raises(ValueError, match="only lora_A / lora_B"):
        lora_deltas({"m.weight": a}, 1.0)


def test_trim_keeps_top_k_by_magnitude():
    assert torch.equal(trim(T([1.0, -4.0], [3.0, 0.5]), 0.5), T([0.0, -4.0], [3.0, 0.0]))
    assert torch.equal(trim(T([1.0, 2.0]), 0.01), T([0.0, 2.0]))  # at least one entry survives


def test_ties_elects_sign_by_mass_and_averages_agreeing_entries():
    d1 = T([3.0, -1.0, 2.0, 0.0])
    d2 = T([1.0, 4.0, -2.0, 0.0])
    d3 = T([-1.0, 1.0, -1.0, 0.0])
    # Column sums 3, 4, -1, 0 -> signs +, +, -, 0; agreeing non-zero entries are averaged.
    expected = T([(3.0 + 1.0) / 2, (4.0 + 1.0) / 2, (-2.0 - 1.0) / 2, 0.0])
    torch.testing.assert_close(ties([d1, d2, d3], density=1.0), expected)
    # Trimmed to the top half of each: d1 -> [3, 0, 2, 0], d2 -> [0, 4, -2, 0], d3 keeps all three |1|s (a tie at
    # the threshold) -> [-1, 1, -1, 0]; sums 2, 5, -1 -> means of the agreeing entries [3, (4+1)/2, (-2-1)/2, 0].
    torch.testing.assert_close(ties([d1, d2, d3], density=0.5), T([3.0, 2.5, -1.5, 0.0]))


def test_dare_rescales_to_keep_the_expectation():
    delta = torch.full((200, 200), 2.0, dtype=torch.float64)
    dropped = dare(delta, 0.9, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert abs(kept.double().mean().item() - 0.1) < 0.01
    assert torch.allclose(dropped[kept], torch.tensor(20.0, dtype=torch.float64))
    assert abs(dropped.mean().item() - 2.0) < 0.1
    assert torch.equal(dare(delta, 0.0, torch.Generator()), delta)


def test_merge_methods_on_a_small_example():
    a = {"m": T([1.0, -2.0], [0.0, 4.0])}
    b = {"m": T([3.0, 2.0], [-1.0, 0.0])}
    torch.testing.assert_close(merge_deltas([a, b], MergeConfig(method="linear"))["m"], T([2.0, 0.0], [-0.5, 2.0]))
    torch.testing.assert_close(merge_deltas([a, b], MergeConfig(method="linear", scale=1.0))["m"],
                               T([4.0, 0.0], [-1.0, 4.0]))
    # TIES, density 1: signs of sums (+, 0, -, +); a zero-sum entry elects no sign and stays 0.
    torch.testing.assert_close(merge_deltas([a, b], MergeConfig(method="ties", density=1.0))["m"],
                               T([2.0, 0.0], [-1.0, 4.0]))
    # DARE with drop 0 is the linear merge; seeded drops repeat.
    torch.testing.assert_close(merge_deltas([a, b], MergeConfig(method="dare", drop=0.0))["m"],
                               T([2.0, 0.0], [-0.5, 2.0]))
    one = merge_deltas([a, b], MergeConfig(method="dare_ties", drop=0.5, seed=3))
    assert torch.equal(one["m"], merge_deltas([a, b], MergeConfig(method="dare_ties", drop=0.5, seed=3))["m"])


def test_refactorise_error_matches_dropped_singular_values():
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    delta = u[:, :5] @ torch.diag(s) @ v.T
    a, b, error = refactorise(delta, 2)
    assert a.shape == (2, 5) and b.shape == (6, 2)
    assert error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-9)
    assert refactorise(delta, None)[2] < 1e-12
    state, r, errors = to_lora_state({"x": delta, "y": delta[:3, :3]}, rank=None)
    assert r == 5 and state["y.lora_A.weight"].shape == (5, 3) and max(errors.values()) < 1e-6  # zero-padded


def test_auto_rank_is_the_smallest_within_the_tolerance():
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    error = lambda k: float(s[k:].norm() / s.norm())  # noqa: E731  (relative error of the rank-k truncation)
    for tolerance, expected in ((0.6, 1), (0.2, 2), (0.1, 3), (0.02, 4), (1e-3, 5)):
        k = smallest_rank(s, tolerance)
        assert k == expected and error(k) <= tolerance < error(k - 1)
    assert smallest_rank(torch.zeros(3, dtype=torch.float64), 1e-3) == 0
    delta = u[:, :5] @ torch.diag(s) @ v.T
    small = delta[:3, :3]
    state, r, errors = to_lora_state({"x": delta, "y": small}, rank="auto", tolerance=0.05)
    assert r == max(smallest_rank(s, 0.05), smallest_rank(torch.linalg.svdvals(small), 0.05)) == 4
    assert max(errors.values()) <= 0.05 and state["x.lora_A.weight"].shape == (4, 5)
    b_a = state["x.lora_B.weight"].double() @ state["x.lora_A.weight"].double()
    assert float((delta - b_a).norm() / delta.norm()) == pytest.approx(errors["x"], abs=1e-6)
    # A zero delta (the frozen backbone chosen by a search) is stored at rank 1.
    assert to_lora_state({"x": torch.zeros(6, 5, dtype=torch.float64)}, "auto")[1] == 1


def test_parse_rank_reads_the_command_lines_rank():
    assert parse_rank("auto") == "auto" and parse_rank("exact") is None and parse_rank("16") == 16
    for bad in ("full", "-1", "1.5", ""):
        with pytest.raises(ValueError, match="write auto, exact or a positive number"):
            parse_rank(bad)


def test_default_merge_is_stored_at_the_rank_its_members_need(merge_reg):
    """Two rank-r members merged by task arithmetic span at most 2r directions: the default ("auto") stores
    that, within the tolerance, where rank=None stores every layer's full rank."""
    reg = merge_reg
    member_rank = reg.current("a").adapter["r"]
    auto = reg.merge(["a", "b"], "ab-auto", "linear")
    exact = reg.merge(["a", "b"], "ab-exact", "linear", config=MergeConfig(rank=None))
    assert auto["config"]["rank"] == "auto" and auto["config"]["rank_tolerance"] == 1e-3
    assert 1 <= auto["adapter"]["r"] <= 2 * member_rank < exact["adapter"]["r"]
    assert auto["reconstruction_error"]["max"] <= 1e-3
    size = lambda name: (reg.root / "merges" / name / "adapter.safetensors").stat().st_size  # noqa: E731
    assert size("ab-auto") < 0.6 * size("ab-exact")  # at most half the rank: about half the bytes, plus the header
    texts = ["a charming plot", "dull and slow", "fine acting"]
    np.testing.assert_allclose(reg.predict_proba("a", texts, merge="ab-auto"),
                               reg.predict_proba("a", texts, merge="ab-exact"), atol=1e-3)
    ties = reg.merge(["a", "b"], "ab-ties", "ties")
    assert ties["reconstruction_error"]["max"] <= 1e-3


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "svd"}, "'method' parameter of MergeConfig must be one of"), ({"scale": -0.5}, "scale"),
    ({"rank": "full"}, "'auto' or None"), ({"rank": True}, "rank"), ({"rank_tolerance": 1.0}, "rank_tolerance"),
    ({"selection_fraction": 1.0}, "selection_fraction"),
    ({"density": 0.0}, "density"),
    ({"drop": 1.0}, "drop"), ({"rank": 0}, "rank"),
])
def test_bad_merge_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MergeConfig(**kwargs)


@pytest.mark.parametrize("kwargs, ignored", [
    ({"method": "linear", "density": 0.5}, "density"), ({"method": "dare", "density": 0.5}, "density"),
    ({"method": "peft_dare_ties", "density": 0.5}, "density"),  # peft's DARE-TIES keeps 1 - drop, no trim
    ({"method": "ties", "drop": 0.5}, "drop"), ({"method": "linear", "drop": 0.5}, "drop"),
    ({"method": "peft_ties_svd", "drop": 0.5}, "drop"),
])
def test_a_knob_the_method_never_reads_is_refused_not_ignored(kwargs, ignored):
    with pytest.raises(ValueError, match=rf"\['{ignored}'\] set, but method={kwargs['method']!r} does not read it"):
        MergeConfig(**kwargs)


def test_the_knobs_each_method_reads_are_accepted():
    for method in ("ties", "peft_ties", "peft_ties_svd"):
        assert MergeConfig(method=method, density=0.5).density == 0.5
    for method in ("dare", "peft_dare_ties"):
        assert MergeConfig(method=method, drop=0.5).drop == 0.5
    assert (MergeConfig(method="dare_ties", density=0.5, drop=0.5).density, 0.5) == (0.5, 0.5)
    assert MergeConfig(method="linear", scale=0.5).scale == 0.5


def test_merge_deltas_rejects_mismatches():
    a = {"m": T([1.0])}
    with pytest.raises(ValueError, match="at least two"):
        merge_deltas([a], MergeConfig())
    with pytest.raises(ValueError, match="other modules"):
        merge_deltas([a, {"n": T([1.0])}], MergeConfig())
    with pytest.raises(ValueError, match="other shapes.*different backbones"):
        merge_deltas([a, {"m": T([1.0, 2.0])}], MergeConfig())


# --- registry ------------------------------------------------------------------------------


def test_refit_head_learns_the_new_features_from_a_warm_start():
    torch.manual_seed(0)
    features = torch.randn(200, 8)
    targets = (features[:, 0] - features[:, 3] > 0).long()
    head = TaskHead(8, 2).eval()
    with torch.no_grad():  # a head trained on other features: it gets the new ones backwards
        head.linear.weight.copy_(torch.tensor([[1.0, 0, 0, -1, 0, 0, 0, 0], [-1.0, 0, 0, 1, 0, 0, 0, 0]]))
    before = head.state_dict()
    spec = TaskSpec("t", labels=["a", "b"])
    assert (head(features).argmax(-1) == targets).float().mean() == 0
    fitted = refit_head(head, features, targets, spec.loss)
    assert (fitted(features).argmax(-1) == targets).float().mean() >= 0.98
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # the member's head is untouched
    again = refit_head(head, features, targets, spec.loss)
    assert all(torch.equal(p, q) for p, q in zip(fitted.parameters(), again.parameters()))  # deterministic
    # The L2 term keeps separable data from sending the weights to infinity.
    assert fitted.linear.weight.norm() < refit_head(head, features, targets, spec.loss, l2=0.0).linear.weight.norm()


def test_registry_merge_round_trip(merge_reg):
    reg = merge_reg
    record = reg.merge(["a", "b"], "ab", "linear")
    assert record["members"] == [{"task": "a", "version": 1}, {"task": "b", "version": 1}]
    assert record["config"]["method"] == "linear" and record["config"]["scale"] == 0.5
    assert record["reconstruction_error"]["max"] <= record["config"]["rank_tolerance"] == 1e-3
    assert set(record["holdout"]) == {"a", "b"}
    assert 0 < record["normalised"] <= 1.5
    assert reg.merges() == ["ab"] and reg.merge_info("ab")["tasks"] == ["a", "b"]
    # The merged entry answers each task through its own head, and another process gets the same answers.
    texts = ["a great film", "an awful film", "a dull plot"]
    proba = reg.predict_proba("a", texts, merge="ab")
    again = Registry.open(reg.root, device="cpu")
    torch.testing.assert_close(torch.tensor(again.predict_proba("a", texts, merge="ab")), torch.tensor(proba))
    score = again.evaluate("b", toy_sentiment(8), merge="ab")["accuracy"]
    assert 0 <= score <= 1
    # The stored (re-factorised) adapter scores what the dense merged delta scored at merge time.
    assert record["holdout"]["a"]["merged"] == pytest.approx(
        again.evaluate("a", reg.holdout("a"), merge="ab")["accuracy"])
    reg.add_task(TaskSpec("c", labels=["neg", "pos"]), toy_sentiment(16), training=FAST)
    with pytest.raises(TaskNotFoundError, match=r"does not hold task 'c'. It holds \['a', 'b'\]"):
        reg.predict("c", texts, merge="ab")
    with pytest.raises(ValueError, match="not both"):
        reg.predict("a", texts, merge="ab", version=1)
    reg.remove_merge("ab")
    assert reg.merges() == [] and not (reg.root / "merges" / "ab").exists()


def test_merge_search_and_soup(merge_reg):
    from tests.continual.test_updates import UPDATE, shifted_sentiment

    reg = merge_reg
    searched = reg.merge(["a", "b"], "ab-ties", "ties", search=True)
    # Successive halving over the 12 TIES candidates: 12, 4, 2, then 1 on all selection rows; and no delta.
    assert [tr["share"] for tr in searched["search"]] == [1.0] + [1 / 27] * 12 + [1 / 9] * 4 + [1 / 3] * 2 + [1.0]
    final = [tr for tr in searched["search"] if tr["share"] == 1.0]
    best = max(final, key=lambda tr: tr["normalised"])
    assert searched["selection"]["normalised"] == pytest.approx(best["normalised"])
    assert searched["config"]["scale"] == best["scale"]
    if best["scale"]:
        assert searched["config"]["density"] == best["density"]
    full = reg.merge(["a", "b"], "ab-ties-full", "ties", search=True, config=MergeConfig(halving=False))
    assert [tr["share"] for tr in full["search"]] == [1.0] * 13
    reg.update_task("b", shifted_sentiment(64, 5), training=UPDATE, promote=True)
    soup = reg.merge([("b", 1), ("b", 2)], "b-soup", "linear", config=MergeConfig(rank=4))
    assert soup["tasks"] == ["b"] and soup["adapter"]["r"] == 4 and soup["reconstruction_error"]["max"] > 0
    assert reg.predict("b", ["a charming plot"], merge="b-soup")[0] in ("neg", "pos")


@pytest.mark.parametrize("method, knobs", [
    ("ties", {"scale": 1.0}), ("ties", {"density": 0.5}), ("dare", {"drop": 0.5}), ("linear", {"scale": 0.3}),
])
def test_a_search_refuses_knobs_it_would_overwrite_and_writes_nothing(merge_reg, method, knobs):
    before = (merge_reg.root / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match=rf"search=True chooses .*{next(iter(knobs))}.* search=False"):
        merge_reg.merge(["a", "b"], "x", method, search=True, config=MergeConfig(method=method, **knobs))
    assert (merge_reg.root / MANIFEST).read_bytes() == before and "x" not in merge_reg.merges()


def test_a_method_override_refuses_knobs_the_new_method_never_reads(merge_reg):
    with pytest.raises(ValueError, match="method='linear' does not read it"):
        merge_reg.merge(["a", "b"], "x", "linear", config=MergeConfig(density=0.5))


@pytest.mark.parametrize("members, name, match", [
    ([], "x", "at least two"), (["a"], "x", "at least two"), ([("a", 1), ("a", 1)], "x", "merged with itself"),
    (["a", "b"], "bad name!", "not allowed"),
])
def test_bad_merges_write_nothing(merge_reg, members, name, match):
    before = (merge_reg.root / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match=match):
        merge_reg.merge(members, name)
    assert (merge_reg.root / MANIFEST).read_bytes() == before and not (merge_reg.root / "merges").exists()


@pytest.mark.parametrize("version", [1.5, True, "1"])
def test_a_member_version_that_is_not_an_int_is_refused_not_truncated(merge_reg, version):
    """merge() read a (task, version) pair's version through int(): ("a", 1.5) merged a v1 and recorded it."""
    before = (merge_reg.root / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match="'version' parameter of task 'a' must be an int"):
        merge_reg.merge([("a", version), "b"], "x", "linear")
    assert (merge_reg.root / MANIFEST).read_bytes() == before
    assert merge_reg.merge([("a", np.int64(1)), "b"], "y", "linear")["members"][0] == {"task": "a", "version": 1}


def test_merge_rejects_unknown_members_taken_names_and_other_modules(merge_reg, tmp_path):
    from cmtl import AdapterConfig

    reg = merge_reg
    with pytest.raises(TaskNotFoundError, match="no version 9"):
        reg.merge([("a", 1), ("a", 9)], "x")
    reg.merge(["a", "b"], "ab")
    with pytest.raises(ValueError, match="exists already"):
        reg.merge(["a", "b"], "ab")
    reg.add_task(TaskSpec("c", labels=["neg", "pos"]), toy_sentiment(32), training=FAST,
                 adapter=AdapterConfig(target_modules=("query",)))
    before = json.loads((reg.root / MANIFEST).read_text())["merges"]
    with pytest.raises(ValueError, match="only adapters on the same modules merge. Train the odd one out as a task"):
        reg.merge(["a", "c"], "ac")
    assert json.loads((reg.root / MANIFEST).read_text())["merges"] == before


def test_adapters_on_the_same_modules_merge_whatever_their_configs_call_them(tmp_path, tiny_config):
    """check_mergeable compared the recorded configs: an adapter on every layer (layers=None) and one on layers
    (0, 1) of a 2-layer backbone adapt the same modules, yet the merge was refused as 'not the same modules'."""
    from cmtl import AdapterConfig

    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    reg.add_task(TaskSpec("a", labels=["neg", "pos"]), toy_sentiment(32), toy_sentiment(16, 1), training=FAST)
    reg.add_task(TaskSpec("b", labels=["neg", "pos"]), toy_sentiment(32, 2), toy_sentiment(16, 3), training=FAST,
                 adapter=AdapterConfig(layers=(0, 1)))
    assert sorted(reg.adapter_state("a")) == sorted(reg.adapter_state("b"))
    record = reg.merge(["a", "b"], "ab", "linear")
    assert sorted(reg.adapter_state("a", merge="ab")) == sorted(reg.adapter_state("a"))
    assert record["holdout"]["b"]["merged"] is not None
    reg.add_task(TaskSpec("c", labels=["neg", "pos"]), toy_sentiment(32), training=FAST,
                 adapter=AdapterConfig(layers=(1,)))
    with pytest.raises(ValueError, match="only adapters on the same modules merge"):
        reg.merge(["a", "c"], "ac")


@pytest.mark.parametrize("refit", [False, True])
def test_a_merge_of_members_without_held_out_rows_is_written_unscored(tmp_path, tiny_config, refit):
    """With no member holding held-out rows there is no baseline to compare with, and writing the record
    failed with KeyError: 'report' (Merged.below_baseline read the baseline's report part unconditionally)."""
    reg = Registry.create(tmp_path / "reg", tiny_config, device="cpu")
    for t, seed in (("a", 0), ("b", 2)):
        reg.add_task(TaskSpec(t, labels=["neg", "pos"]), toy_sentiment(32, seed), training=FAST)
        assert reg.holdout(t) is None
    record = reg.merge(["a", "b"], "ab", "linear", config=MergeConfig(refit_heads=refit))
    assert record["below_baseline"] == [] and record["normalised"] is None and record["baseline_normalised"] is None
    assert all(row["merged"] is None and row["baseline"] is None for row in record["holdout"].values())
    assert reg.predict("a", ["a great film"], merge="ab")[0] in ("neg", "pos")


def test_merge_with_refitted_heads(merge_reg):
    reg = merge_reg
    reg.merge(["a", "b"], "plain", "ties", config=MergeConfig(scale=1.0, density=0.5))
    refit = reg.merge(["a", "b"], "refit", "ties", config=MergeConfig(scale=1.0, density=0.5, refit_heads=True))
    assert refit["config"]["refit_heads"] is True
    texts = ["a great film", "an awful film", "a dull plot"]
    # Same adapter, other heads: the stored refitted heads answer, in this process and another.
    assert not torch.allclose(torch.tensor(reg.predict_proba("a", texts, merge="refit")),
                              torch.tensor(reg.predict_proba("a", texts, merge="plain")))
    again = Registry.open(reg.root, device="cpu")
    for t in ("a", "b"):
        assert refit["holdout"][t]["merged"] == pytest.approx(
            again.evaluate(t, reg.holdout(t), merge="refit")["accuracy"])
        # The heads learn the training data through the merged adapter: at least as well as the member heads.
        buffer = reg.buffer(t).to_examples()
        assert (again.evaluate(t, buffer, merge="refit")["accuracy"]
                >= again.evaluate(t, buffer, merge="plain")["accuracy"])
    searched = reg.merge(["a", "b"], "refit-search", "linear", config=MergeConfig(refit_heads=True), search=True)
    final = [tr["normalised"] for tr in searched["search"] if tr["share"] == 1.0]
    assert searched["selection"]["normalised"] == pytest.approx(max(final))


def test_refit_needs_a_buffer(merge_reg):
    reg = merge_reg
    reg.add_task(TaskSpec("c", labels=["neg", "pos"]), toy_sentiment(32), toy_sentiment(16, 1), training=FAST,
                 fill_buffer=False)
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(DataError, match="c v1 has none"):
        reg.merge(["a", "c"], "ac", config=MergeConfig(refit_heads=True))
    assert (reg.root / MANIFEST).read_bytes() == before and not (reg.root / "merges" / "ac").exists()


def test_peft_baselines_go_through_the_same_pipeline(merge_reg):
    reg = merge_reg
    record = reg.merge(["a", "b"], "peft-ties-svd", "peft_ties_svd")
    assert record["config"]["method"] == "peft_ties_svd" and record["reconstruction_error"]["max"] < 1e-5
    ours = reg.merge(["a", "b"], "ours-linear", "linear", config=MergeConfig(scale=1.0))
    theirs = reg.merge(["a", "b"], "peft-linear", "peft_linear", config=MergeConfig(scale=1.0))
    assert ours["holdout"]["a"]["merged"] is not None and theirs["holdout"]["a"]["merged"] is not None
    # peft's linear type sums A and B separately: its delta has cross terms B_a·A_b, so it differs from ours.
    texts = ["a great film", "an awful film", "a dull plot"]
    assert not torch.allclose(torch.tensor(reg.predict_proba("a", texts, merge="ours-linear")),
                              torch.tensor(reg.predict_proba("a", texts, merge="peft-linear")))


@pytest.mark.parametrize("method", ["peft_linear", "peft_ties", "peft_dare_ties"])
def test_peft_methods_that_need_equal_ranks_say_so_before_scoring(merge_reg, method):
    """peft's add_weighted_adapter raised its own error (naming its combination types, not cmtl's methods)
    in the middle of the merge, after the members and the frozen backbone were scored."""
    from cmtl import AdapterConfig

    reg = merge_reg
    reg.add_task(TaskSpec("c", labels=["neg", "pos"]), toy_sentiment(32), toy_sentiment(16, 1), training=FAST,
                 adapter=AdapterConfig(r=4, target_modules=tuple(reg.current("a").adapter["target_modules"])))
    before = (reg.root / MANIFEST).read_bytes()
    with pytest.raises(ValueError, match=rf"{method} .*same rank.*a v1 has rank 8, c v1 rank 4.*'peft_ties_svd'"):
        reg.merge(["a", "c"], "ac", method)
    assert (reg.root / MANIFEST).read_bytes() == before


def test_a_merge_reads_each_kept_row_of_a_multi_label_task_with_the_labels_it_was_kept_with(merge_reg, monkeypatch):
    """A multi-label task gained label 'new' in v2. Its v1 rows (held out, and in the buffer refit_heads fits on)
    were encoded with 'new' absent (0): the refitted head learnt 'new' absent on those texts, and every score of
    the merge, the members and the frozen backbone counted 'new' found there as wrong. Those cells hold no answer."""
    import dataclasses

    from cmtl.merging import pipeline

    rows = lambda n, seed, tags: [{"text": r["text"], "label": [r["label"], *tags]}  # noqa: E731
                                  for r in toy_sentiment(n, seed)]
    quick = dataclasses.replace(FAST, epochs=1)
    merge_reg.add_task(TaskSpec("tags", labels=["neg", "pos"], problem_type="multi_label"), rows(16, 0, []),
                       validation=rows(8, 1, []), training=quick)
    merge_reg.update_task("tags", rows(16, 2, ["new"]), validation=rows(8, 3, ["new"]), labels=["neg", "pos", "new"],
                          training=quick, promote=True)
    seen = {}
    real = pipeline.merge_members

    def merge_members(*args, **kwargs):
        seen["held"], seen["buffers"] = args[8]["tags"], args[10]["tags"]
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "merge_members", merge_members)
    merge_reg.merge(["tags", "a"], "m", method="linear", config=MergeConfig(refit_heads=True, progress=False))
    held = seen["held"].targets  # v1's 8 held-out rows, then v2's 8
    assert held[:8, 2].isnan().all() and held[8:].isfinite().all() and held[:8, :2].isfinite().all()
    sources = [item.source for item in merge_reg.buffer("tags", 2).items()]
    assert seen["buffers"].targets[:, 2].isnan().tolist() == [s == "v1" for s in sources] and "v1" in sources
