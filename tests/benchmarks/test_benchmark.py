"""The benchmark runner end to end on shrunk real scenarios: files, tables, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cmtl import BackboneConfig, InvalidParameterError, Registry, TrainConfig
from cmtl.benchmarks.learners import StrategyConfig
from cmtl.benchmarks.runner import check_request, run_benchmark, summary_rows
from cmtl.benchmarks.scenarios import Scenario
from cmtl.cli.commands import app

SCENARIOS = Path(__file__).parents[2] / "scenarios"


def test_run_benchmark_writes_results(tmp_path, tiny_backbone):
    scenario = Scenario.from_yaml(SCENARIOS / "text5.yaml").shrink(24, 12)
    config = StrategyConfig(training=TrainConfig(epochs=1, batch_size=8, progress=False), replay_budget=12)
    lines = []
    results = run_benchmark(scenario, ["adapters", "replay"], tmp_path, orders=["stated", "random-1"],
                            backbone=BackboneConfig(name_or_path=tiny_backbone, max_length=32), config=config,
                            device="cpu", echo=lines.append)
    assert [(r["strategy"], r["order"]) for r in results["runs"]] == [
        ("adapters", "stated"), ("replay", "stated"), ("adapters", "random-1"), ("replay", "random-1")]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"][0]["task_names"] == ["bbc", "trec", "spam", "rotten", "foods"]
    assert on_disk["runs"][2]["task_names"] != on_disk["runs"][0]["task_names"]
    assert len(on_disk["runs"][0]["R"]) == 5 and on_disk["machine"] and on_disk["date"]
    for run in results["runs"]:
        assert (tmp_path / run["heatmap"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "results.md").read_text()
    assert "| strategy | order | ACC | BWT | FWT |" in md and "### replay (random-1)" in md
    rows = summary_rows(results)
    assert rows[0]["BWT"] == 0.0 and rows[0]["bytes_added"] > 0
    assert any("after bbc" in line for line in lines)


def test_bench_cli_refuses_an_init_scale_outside_0_1_before_loading_anything(tmp_path):
    result = CliRunner().invoke(app, ["bench", "text5", "--strategy", "adapters-auto", "--init-scale", "2",
                                      "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--init-scale" in result.output and "(0, 1]" in result.output
    assert not any(tmp_path.iterdir())


def test_init_scale_is_refused_where_it_would_do_nothing_or_nonsense(tmp_path):
    with pytest.raises(InvalidParameterError, match=r"init_scale.*StrategyConfig.*\(0, 1\]"):
        StrategyConfig(init_scale=1.5)
    scenario = Scenario.from_yaml(SCENARIOS / "text5.yaml")
    with pytest.raises(ValueError, match="adapters-auto only"):
        run_benchmark(scenario, ["adapters", "joint"], tmp_path, config=StrategyConfig(init_scale=0.5))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("knob", [{"max_steps": 40}, {"eval_every": 10}, {"ema_decay": 0.9}])
def test_avalanche_strategies_refuse_budget_knobs_their_loop_never_reads(tmp_path, knob):
    """Avalanche's loop trains whole epochs and checks validation once per epoch: a step cap, an evaluation
    cadence or a weight average set for the run left avl-* rows under another budget than cmtl's, silently."""
    scenario = Scenario.from_yaml(SCENARIOS / "text5.yaml")
    config = StrategyConfig(training=TrainConfig(**knob))
    with pytest.raises(ValueError, match=rf"{next(iter(knob))}.*avl-naive"):
        check_request(scenario, ["adapters", "avl-naive"], ["stated"], config)  # run_benchmark's first check
    check_request(scenario, ["adapters"], ["stated"], config)  # cmtl's strategies read them


def test_run_benchmark_rejects_unknown_names(tmp_path):
    scenario = Scenario.from_yaml(SCENARIOS / "text5.yaml")
    with pytest.raises(ValueError, match=r"Unknown strategies \['gem'\]"):
        run_benchmark(scenario, ["gem"], tmp_path)
    with pytest.raises(ValueError, match=r"Unknown orders \['random-9'\].*Available"):
        run_benchmark(scenario, ["adapters"], tmp_path, orders=["random-9"])


def test_bench_cli_on_minilm_cut(tmp_path):
    result = CliRunner().invoke(app, ["bench", str(SCENARIOS / "trec-classes.yaml"), "--strategy", "adapters,lwf",
                                      "--max-train", "16", "--max-eval", "8", "--epochs", "1", "--layers", "1",
                                      "--lr-schedule", "constant", "--patience", "0",
                                      "--out", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "adapters" in result.output and "lwf" in result.output and "wrote" in result.output
    assert (tmp_path / "heatmap-lwf-stated.png").exists()
    training = json.loads((tmp_path / "results.json").read_text())["command_config"]["training"]
    assert training["lr_schedule"] == "constant" and training["patience"] is None
    md = (tmp_path / "results.md").read_text()  # class-incremental: no FWT anywhere (unseen classes score 0)
    assert "FWT –" in md and "FWT -" not in md and "FWT 0" not in md


def test_avalanche_strategy_in_the_same_table(tmp_path, tiny_backbone):
    from cmtl.benchmarks.metrics import avalanche_forgetting, forgetting

    scenario = Scenario.from_yaml(SCENARIOS / "text5.yaml").shrink(16, 8)
    config = StrategyConfig(training=TrainConfig(epochs=1, batch_size=8, progress=False), replay_budget=8)
    lines = []
    results = run_benchmark(scenario, ["avl-naive", "avl-replay"], tmp_path, config=config, device="cpu",
                            backbone=BackboneConfig(name_or_path=tiny_backbone, max_length=32), echo=lines.append)
    rows = summary_rows(results)
    assert [r["strategy"] for r in rows] == ["avl-naive", "avl-replay"]
    assert all(len(run["R"]) == 5 and run["b"] is not None for run in results["runs"])
    # One line per experience, as cmtl's strategies print them.
    steps = [line for line in lines if line.startswith("avl-naive: after ")]
    assert [line.split()[2] for line in steps] == ["bbc", "trec", "spam", "rotten", "foods"]
    assert all(line.count("=") == 5 for line in steps)
    # Both forgetting measures, named: Chaudhry's (cmtl's) and Avalanche's StreamForgetting.
    for run, row in zip(results["runs"], rows):
        assert row["forgetting"] == pytest.approx(forgetting(run["R"]).mean)
        assert row["StreamForgetting"] == pytest.approx(avalanche_forgetting(run["R"]).stream)
    md = (tmp_path / "results.md").read_text()
    assert "| forgetting | StreamForgetting |" in md and "Avalanche's StreamForgetting" in md


@pytest.mark.parametrize("flag", [[], ["--avl-reset-optimizer"]])
def test_bench_cli_passes_the_optimizer_state_rule_to_avalanche(tmp_path, tiny_backbone, monkeypatch, flag):
    from cmtl.benchmarks import runner

    seen = []

    class Stop(Exception):
        pass

    def stop(name, benchmark, model, *, progress, config):
        seen.append(config)
        raise Stop  # nothing to train: the test only reads the config

    monkeypatch.setattr(runner.avalanche, "run_strategy", stop)
    result = CliRunner().invoke(app, ["bench", str(SCENARIOS / "text5.yaml"), "--strategy", "avl-naive",
                                      "--max-train", "8", "--max-eval", "4", "--backbone", tiny_backbone,
                                      "--out", str(tmp_path), "--device", "cpu", *flag])
    assert isinstance(result.exception, Stop), result.output
    assert [c.reset_optimizer_state for c in seen] == [bool(flag)]


@pytest.mark.parametrize("patience", [None, 2])
def test_avalanche_keeps_the_best_epoch_as_cmtls_strategies_do_also_without_patience(tmp_path, tiny_backbone,
                                                                                       monkeypatch, patience):
    """cmtl's loop keeps the best validated state whether or not patience stops it; Avalanche's strategies
    must too, or `cmtl bench --patience 0` compares cmtl's best epoch with Avalanche's last one."""
    from cmtl.benchmarks import runner

    seen = []

    class Stop(Exception):
        pass

    def stop(name, benchmark, model, *, progress, config):
        seen.append((config, getattr(benchmark, "valid_stream", None)))
        raise Stop  # nothing to train: the test only reads the config

    monkeypatch.setattr(runner.avalanche, "run_strategy", stop)
    scenario = Scenario.from_yaml(SCENARIOS / "text5.yaml").shrink(8, 4)
    config = StrategyConfig(training=TrainConfig(epochs=3, batch_size=8, patience=patience, progress=False))
    with pytest.raises(Stop):
        run_benchmark(scenario, ["avl-naive"], tmp_path, config=config, device="cpu",
                      backbone=BackboneConfig(name_or_path=tiny_backbone, max_length=32))
    (avl, valid_stream), = seen
    assert valid_stream is not None and len(valid_stream) == 5  # validated after every epoch, best epoch kept
    assert avl.patience == (patience or 3)  # without patience: never stopped before the last epoch


@pytest.mark.parametrize(("name", "kind"), [("trec-classes", "class-incremental"),
                                            ("sentiment4", "domain-incremental")])
def test_avalanche_strategies_refuse_a_scenario_that_is_not_task_incremental(tmp_path, name, kind):
    scenario = Scenario.from_yaml(SCENARIOS / f"{name}.yaml")
    assert scenario.kind == kind
    with pytest.raises(ValueError, match=rf"\['avl-ewc'\] cannot run on scenario '{name}': it is {kind}.*"
                                         "task-incremental benchmark only"):
        run_benchmark(scenario, ["adapters", "avl-ewc"], tmp_path)
    assert not (tmp_path / "results.json").exists()  # refused before anything ran


def test_adapters_auto_measures_forward_transfer_against_fresh_adapters(tmp_path, tiny_backbone, monkeypatch):
    scenario = Scenario.from_yaml(SCENARIOS / "text5.yaml").shrink(16, 8)
    config = StrategyConfig(training=TrainConfig(epochs=1, batch_size=8, progress=False), init_scale=0.25)
    asked = []  # (init, init_scale) of every add_task the two strategies made
    add_task = Registry.add_task
    monkeypatch.setattr(Registry, "add_task", lambda self, *args, **kwargs: (
        asked.append((kwargs.get("init"), kwargs.get("init_scale"))), add_task(self, *args, **kwargs))[1])
    lines: list[str] = []
    results = run_benchmark(scenario, ["adapters", "adapters-auto"], tmp_path, config=config, device="cpu",
                            backbone=BackboneConfig(name_or_path=tiny_backbone, max_length=32), echo=lines.append)
    fresh, auto = results["runs"]
    assert "fwt_vs_fresh" not in fresh and len(auto["fwt_vs_fresh_per_task"]) == 4
    assert auto["fwt_vs_fresh_per_task"] == pytest.approx([auto["R"][i][i] - fresh["R"][i][i] for i in range(1, 5)])
    assert auto["fwt_vs_fresh"] == pytest.approx(sum(auto["fwt_vs_fresh_per_task"]) / 4)
    assert auto["bwt"] == 0  # each task keeps its own adapter: nothing is forgotten, whatever it started from
    assert sum("adapters-auto: after" in line and "started from" in line for line in lines) == 5
    # Every task after the first had earlier adapters. The line says whether the fresh adapter beat its probe
    # or kept one no start can beat (then nothing was tried, and the task is exactly the fresh strategy's),
    # else what each trial measured, or which were left out (an adapter whose training kept its step-0 probe
    # is the fresh start again).
    later = [line for line in lines if "adapters-auto: after" in line][1:]
    assert len(later) == 4
    assert all("fresh beat its probe: nothing tried" in line or "fresh kept a perfect probe: nothing tried" in line
               or "trial gain over fresh in SE: task:" in line or "left out: task:" in line for line in later)
    for i, line in enumerate(later, start=1):
        if "nothing tried" in line:
            assert auto["R"][i][i] == fresh["R"][i][i]
    assert asked == [(None, 1.0)] * 5 + [("auto", 0.25)] * 5
    assert all("scaled by 0.25" in line for line in later if "started from task" in line)
    assert json.loads((tmp_path / "results.json").read_text())["command_config"]["init_scale"] == 0.25
    assert "Forward transfer of adapters-auto against adapters (stated)" in (tmp_path / "results.md").read_text()


def load_script(name: str):
    """Import a runner script from scenarios/ (they are scripts, not package modules)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"scenario_{name}", SCENARIOS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shrunk(name: str) -> Scenario:
    return Scenario.from_yaml(SCENARIOS / f"{name}.yaml").shrink(24, 12)


def test_update_benchmark_script(tmp_path, tiny_backbone):
    updates, lines = load_script("updates"), []
    backbone = BackboneConfig(name_or_path=tiny_backbone, max_length=32)
    results = updates.run(shrunk("sentiment4"), tmp_path, backbone=backbone, device="cpu",
                          training=TrainConfig(epochs=2, batch_size=8, progress=False),
                          update_training=TrainConfig(epochs=1, batch_size=8, progress=False), penalty="lwf",
                          echo=lines.append)
    assert list(results["methods"]) == ["update-replay", "update-naive", "retrain"]
    assert results["training"]["epochs"] == 2 and results["update_training"]["epochs"] == 1
    assert results["penalty"] == "lwf"
    replay = results["methods"]["update-replay"]
    assert len(replay["report"]["R"]) == 4 and replay["gate"][0] is None and all(replay["gate"][1:])
    assert len(lines) == 12 and lines[-1].startswith("retrain: after nyt")
    md = (tmp_path / "results.md").read_text()
    assert "| update-replay |" in md and "time of update-replay / retrain per update" in md
    with pytest.raises(ValueError, match="needs a domain-incremental"):
        updates.run(Scenario.from_yaml(SCENARIOS / "text5.yaml"), tmp_path, backbone=BackboneConfig(),
                    training=TrainConfig())


def test_update_benchmark_can_leave_the_updates_to_hold_out_their_validation(tmp_path, tiny_backbone):
    updates = load_script("updates")
    backbone = BackboneConfig(name_or_path=tiny_backbone, max_length=32)
    results = updates.run(shrunk("sentiment4").shrink(40, 12), tmp_path, backbone=backbone, device="cpu",
                          training=TrainConfig(epochs=1, batch_size=8, progress=False), methods=("update-naive",),
                          validation_fraction=0.25, echo=lambda line: None)
    assert results["update_validation_fraction"] == 0.25
    reg = Registry.open(tmp_path / "registry-update-naive", device="cpu")
    first, *updated = reg.versions(reg.tasks()[0])
    assert first.training["examples"] == 40  # the first version gets the validation split
    for v in updated:  # an update holds out a quarter of its 40 new rows: 30 train (with no replay)
        assert v.training["update"]["validation_fraction"] == 0.25 and v.training["examples"] == 30


def test_update_benchmark_summary_over_seeds():
    updates = load_script("updates")

    def one(seed, replay_avg, retrain_avg, forgetting, replay_s, retrain_s):
        method = lambda avg, f, s: {"average_seen_accuracy": [0.7, avg], "report": {  # noqa: E731
            "mean_forgetting": f, "seconds_per_experience": [10.0, s]}}
        return {"training": {"seed": seed}, "methods": {"update-replay": method(replay_avg, forgetting, replay_s),
                                                        "retrain": method(retrain_avg, 0.0, retrain_s)}}

    summary = updates.summarise([one(0, 0.85, 0.87, 0.01, 40, 100), one(1, 0.86, 0.86, 0.03, 50, 100)])
    assert summary["seeds"] == [0, 1]
    replay = summary["methods"]["update-replay"]
    assert replay["final_average"]["mean"] == pytest.approx(0.855)
    assert replay["mean_forgetting"]["sd"] == pytest.approx(np.std([0.01, 0.03], ddof=1))
    assert summary["update_vs_retrain"]["final_average_gap"]["values"] == pytest.approx([0.02, 0.0])
    assert summary["update_vs_retrain"]["last_time_ratio"]["mean"] == pytest.approx(0.45)
    assert "0.855 ± 0.007" in updates.summary_markdown(summary)

def test_merge_benchmark_script(tmp_path, tiny_backbone):
    merging, lines = load_script("merging"), []
    backbone = BackboneConfig(name_or_path=tiny_backbone, max_length=32)
    results = merging.run(shrunk("text5"), tmp_path, backbone=backbone, device="cpu",
                          training=TrainConfig(epochs=1, batch_size=8, progress=False),
                          methods=("linear", "peft_ties"), rank=4, search=False, echo=lines.append)
    assert list(results["merges"]) == ["linear+refit", "linear", "peft_ties+refit", "peft_ties"]
    assert len(results["individual"]) == 5 and set(results["train_seconds"]) == set(results["individual"])
    linear = results["merges"]["linear"]
    assert results["merges"]["linear+refit"]["config"]["refit_heads"] and not linear["config"]["refit_heads"]
    assert linear["rank"] == 4 and 0 < linear["reconstruction_error"]["max"] < 1
    assert set(linear["normalised"]) == {"bbc", "trec", "spam", "rotten", "foods"}
    # The frozen backbone beside every merge: the tasks it beats and loses to split the tasks between them.
    assert set(linear["beats_frozen"]) | set(linear["below_frozen"]) <= set(linear["normalised"])
    assert not set(linear["beats_frozen"]) & set(linear["below_frozen"]) and linear["vs_training"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| individual adapters |" in md and "| peft_ties |" in md and "| peft_ties+refit |" in md
    assert "| frozen backbone, the tasks' own heads (λ = 0) |" in md and "beats it on" in md
    assert len(lines) == 11 and lines[5].startswith("frozen backbone, heads refitted on the buffers")
    for head in ("refit", "keep"):
        assert set(results["frozen"][head]) == set(results["individual"])
        assert all(0 <= a <= 1 for a in results["frozen"][head].values())
    searched = merging.run(shrunk("text5"), tmp_path / "search", backbone=backbone, device="cpu",
                           training=TrainConfig(epochs=1, batch_size=8, progress=False), methods=("ties",),
                           heads=("refit",), compare_full=("ties+refit",), echo=lines.append)
    assert list(searched["merges"]) == ["ties+refit", "ties+refit (full grid)"]
    assert [m["candidates_scored"] for m in searched["merges"].values()] == [20, 13]
    # --resume keeps the adapters and the recorded merges, and runs only the missing ones.
    resumed = merging.run(shrunk("text5"), tmp_path / "search", backbone=backbone, device="cpu",
                          training=TrainConfig(epochs=1, batch_size=8, progress=False), methods=("ties", "linear"),
                          heads=("refit",), resume=True, echo=lines.append)
    assert list(resumed["merges"]) == ["ties+refit", "ties+refit (full grid)", "linear+refit"]
    assert resumed["train_seconds"] == searched["train_seconds"]
    assert resumed["merges"]["ties+refit"] == json.loads(json.dumps(searched["merges"]["ties+refit"]))
    with pytest.raises(ValueError, match="other training"):
        merging.run(shrunk("text5"), tmp_path / "search", backbone=backbone, device="cpu",
                    training=TrainConfig(epochs=2, batch_size=8, progress=False), resume=True)
    with pytest.raises(FileNotFoundError, match="Run without --resume"):
        merging.run(shrunk("text5"), tmp_path / "none", backbone=backbone, device="cpu",
                    training=TrainConfig(epochs=1, batch_size=8, progress=False), resume=True)
    with pytest.raises(ValueError, match="task-incremental"):
        merging.run(Scenario.from_yaml(SCENARIOS / "sentiment4.yaml"), tmp_path, backbone=BackboneConfig(),
                    training=TrainConfig())


def test_speed_benchmark_script(tmp_path):
    speed = load_script("speed")
    lines = []
    args = ["--layers", "1", "--max-train", "16", "--max-eval", "8", "--epochs", "1", "--repeats", "1",
            "--adapt", "top-half", "--ways", "cmtl,cmtl-plain,hf-peft,avalanche", "--device", "cpu",
            "--out", str(tmp_path)]
    speed.main(args, echo=lines.append)
    results = json.loads((tmp_path / "results.json").read_text())
    train, evaluation = results["summary"]["train"], results["summary"]["eval"]
    assert list(train) == ["cmtl", "cmtl-plain", "hf-peft", "avalanche"]
    assert list(evaluation) == ["cmtl", "hf-peft", "avalanche"]
    for row in list(train.values()) + list(evaluation.values()):
        assert row["per_second"] > 0 and row["peak_mb"] > 0 and row["vs_hf-peft"] > 0 and row["vs_avalanche"] > 0
    assert all(0 <= row["accuracy"] <= 1 for row in train.values())
    assert train["hf-peft"]["vs_hf-peft"] == 1.0
    assert train["cmtl"]["vs_avalanche"] == pytest.approx(train["cmtl"]["per_second"] / train["avalanche"]["per_second"])
    assert results["device"] == "cpu" and results["machine"] and results["date"]
    assert "| hf-peft |" in (tmp_path / "results.md").read_text() and len(lines) == 8
    with pytest.raises(SystemExit):
        speed.main(["--ways", "cmtl,gem"])


def test_mt2st_benchmark_script(tmp_path, tiny_backbone):
    mt2st = load_script("mt2st")
    lines = []
    results = mt2st.main(["--backbone", tiny_backbone, "--max-train", "24", "--max-eval", "12", "--steps", "8",
                          "--batch-size", "8", "--max-length", "64", "--device", "cpu", "--out", str(tmp_path)],
                         echo=lines.append)
    assert list(results["ways"]) == ["stl", "mtl", "diminish", "switch", "adaptive-switch"]
    for row in results["ways"].values():
        assert 0 <= row["test_accuracy"] <= 1 and len(row["curve"]) == 8 and row["seconds"] > 0
    assert results["target"] == pytest.approx(0.99 * results["ways"]["stl"]["best_validation"])
    assert results["ways"]["stl"]["seconds_to_target"] is not None  # STL reaches its own best
    md = (tmp_path / "rotten" / "results.md").read_text()
    assert "| switch |" in md and "vader_amazon" in md and len(lines) == 6
    assert results["sampler"] == "per_task" and "steps of batch 8 (per task)" in md
    assert (tmp_path / "rotten" / "accuracy-vs-time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mt2st_ways_do_not_depend_on_the_ways_run_before_them(tmp_path, tiny_backbone):
    """Each way trains under the script's seed: its dropout draws do not continue the previous way's."""
    mt2st = load_script("mt2st")
    args = ["--backbone", tiny_backbone, "--max-train", "96", "--max-eval", "96", "--steps", "40", "--max-length", "32",
            "--device", "cpu", "--lr", "0.03"]
    alone = mt2st.main(args + ["--ways", "mtl", "--out", str(tmp_path / "alone")], echo=lambda *_: None)
    after = mt2st.main(args + ["--ways", "stl,mtl", "--out", str(tmp_path / "after")], echo=lambda *_: None)
    mine, theirs = alone["ways"]["mtl"], after["ways"]["mtl"]
    assert [a for _, a in mine["curve"]] == [a for _, a in theirs["curve"]]
    assert (mine["best_validation"], mine["test_accuracy"]) == (theirs["best_validation"], theirs["test_accuracy"])


def test_defaults_study_script_records_resumes_and_refuses_other_settings(tmp_path, capsys):
    """scenarios/defaults.py on a one-layer cut of the embedded backbone and a few real trec6 rows."""
    defaults = load_script("defaults")
    quick = ["--layers", "1", "--max-train", "32", "--max-eval", "16", "--corpora", "trec6", "--seeds", "0",
             "--device", "cpu"]
    assert defaults.main(quick + ["--variants", "default,probe", "--out", str(tmp_path / "a")]) == 0
    runs = json.loads((tmp_path / "a" / "results.json").read_text())["runs"]
    assert [(r["variant"], r["corpus"], r["seed"], r["n_train"]) for r in runs] == [
        ("default", "trec6", 0, 32), ("probe", "trec6", 0, 32)]
    trained, probe = runs
    assert 0 <= trained["accuracy"] <= 1 and trained["steps"] >= trained["best_step"] >= 0
    assert trained["validation_accuracy"] >= trained["probe_validation_accuracy"]  # the probe is the floor
    assert probe["trainable_parameters"] == 6 * 384 + 6  # a linear head on 384 features, six classes
    # The probe reference does not depend on what ran before it in the process.
    assert defaults.main(quick + ["--variants", "probe", "--out", str(tmp_path / "b")]) == 0
    alone = json.loads((tmp_path / "b" / "results.json").read_text())["runs"]
    assert alone[0]["accuracy"] == probe["accuracy"]
    # Rerun into the same folder: nothing is trained again.
    capsys.readouterr()
    assert defaults.main(quick + ["--variants", "default,probe", "--out", str(tmp_path / "a")]) == 0
    assert "seed 0: acc" not in capsys.readouterr().out
    assert len(json.loads((tmp_path / "a" / "results.json").read_text())["runs"]) == 2
    assert "| default |" in (tmp_path / "a" / "results.md").read_text()
    with pytest.raises(SystemExit):
        defaults.main(["--layers", "1", "--max-train", "64", "--max-eval", "16", "--corpora", "trec6", "--seeds", "0",
                       "--variants", "probe", "--out", str(tmp_path / "a")])
    assert "other settings" in capsys.readouterr().err
    # Without validation rows add_task holds out its own, and the study will not mix the two kinds of run.
    assert defaults.main(quick + ["--variants", "default,probe-kept-rows", "--validation", "held-out", "--out",
                                  str(tmp_path / "c")]) == 0
    held = json.loads((tmp_path / "c" / "results.json").read_text())
    kept_rows = held["runs"][1]  # the probe on the 26 rows add_task trained on (20 % held out), not on all 32
    assert kept_rows["variant"] == "probe-kept-rows" and kept_rows["examples_trained"] == 26
    assert probe["examples_trained"] == 32
    assert held["validation"] == "held-out" and held["runs"][0]["probe_validation_accuracy"] is not None
    assert trained["examples_trained"] == 32 and held["runs"][0]["examples_trained"] == 32 - 6  # 20 %, rounded
    for out, validation in (("a", "held-out"), ("c", "given")):
        with pytest.raises(SystemExit):
            defaults.main(quick + ["--variants", "probe", "--validation", validation, "--out", str(tmp_path / out)])
        assert "other settings" in capsys.readouterr().err


def test_tag_benchmark_script(tmp_path, tiny_backbone):
    tag = load_script("tag")
    lines = []
    results = tag.main(["--backbone", tiny_backbone, "--max-train", "24", "--max-eval", "12", "--steps", "6",
                        "--tag-every", "2", "--epochs", "1", "--batch-size", "8", "--max-length", "64",
                        "--device", "cpu", "--out", str(tmp_path)], echo=lines.append)
    names = ["bbc", "trec", "spam", "rotten", "foods"]
    assert results["tasks"] == names and np.array(results["affinity"]).shape == (5, 5)
    gain = np.array(results["pair_gain"])
    assert gain.shape == (5, 5) and np.all(np.diag(gain) == 0)
    pairs = [k for k in results["groups_trained"] if k.count("+") == 1]
    assert len(pairs) == 10  # every pair trained once
    for label in ("tag", "pairs"):
        chosen = results["selections"][label]
        assert 1 <= len(chosen["groups"]) <= 2 and set().union(*chosen["groups"]) == set(names)
        for t, entry in chosen["per_task"].items():  # a task's accuracy comes from the group it was put in
            assert t in entry["group"]
            expected = (results["groups_trained"]["+".join(entry["group"])][t] if len(entry["group"]) > 1
                        else results["individual"][t])
            assert entry["accuracy"] == expected
    cost = results["cost_seconds"]
    assert 0 < cost["tag measurements"] < cost["tag run"] and cost["pair search"] > 0
    assert json.loads((tmp_path / "affinity.json").read_text())["tasks"] == names
    for png in ("affinity.png", "pair_gain.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "results.md").read_text()
    assert "| Z (step on row i, onto column j) |" in md and "Pair-search groups" in md and "pair search" in md

def test_joint_final_gives_the_last_row_of_the_joint_benchmark(tmp_path):
    """scenarios/joint_final.py trains only the last experience, and ends where `cmtl bench --strategy joint` does."""
    options = ["--layers", "2", "--max-train", "24", "--max-eval", "12", "--epochs", "2", "--seed", "3"]
    bench = CliRunner().invoke(app, ["bench", str(SCENARIOS / "text5.yaml"), "--strategy", "joint",
                                     "--out", str(tmp_path / "bench"), "--device", "cpu", *options])
    assert bench.exit_code == 0, bench.output
    (full,) = json.loads((tmp_path / "bench" / "results.json").read_text())["runs"]
    joint_final, lines = load_script("joint_final"), []
    assert joint_final.main(["text5", "--out", str(tmp_path / "final"), "--device", "cpu", *options]) == 0
    final = json.loads((tmp_path / "final" / "results.json").read_text())
    assert final["task_names"] == full["task_names"]
    assert final["final_row"] == full["R"][-1] and final["acc"] == pytest.approx(full["acc"])
    assert final["command_config"]["training"] == json.loads(
        (tmp_path / "bench" / "results.json").read_text())["command_config"]["training"]
    assert final["trainable_parameters"] == full["trainable_parameters_per_task"][-1]
    assert "| ACC |" in (tmp_path / "final" / "results.md").read_text()
    with pytest.raises(ValueError, match="Unknown order 'sideways'"):
        joint_final.run(Scenario.from_yaml(SCENARIOS / "text5.yaml"), tmp_path / "x", order="sideways",
                        echo=lines.append)


def test_a_failed_write_keeps_the_runs_already_saved(tmp_path, tiny_backbone, monkeypatch):
    """run_benchmark saves results.json after every run so a long benchmark keeps what it measured; written in
    place, a write that failed part-way (a full disk, a kill) left a truncated file and lost every run."""
    import builtins
    import io

    real_open = io.open
    armed = []

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def failing_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        writing = "w" in mode or "x" in mode
        return HalfWriter(f) if armed and writing and "results.json" in str(file) else f

    monkeypatch.setattr(io, "open", failing_open)
    monkeypatch.setattr(builtins, "open", failing_open)
    scenario = Scenario.from_yaml(SCENARIOS / "text5.yaml").shrink(8, 4)
    config = StrategyConfig(training=TrainConfig(epochs=1, max_steps=1, batch_size=8, progress=False))

    def echo(line):
        if line.startswith("== ") and "joint" in line:
            armed.append(True)  # the second run's save fails

    with pytest.raises(OSError, match="No space left"):
        run_benchmark(scenario, ["seq-ft", "joint"], tmp_path, config=config, device="cpu", echo=echo,
                      backbone=BackboneConfig(name_or_path=tiny_backbone, max_length=32))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [run["strategy"] for run in saved["runs"]] == ["seq-ft"]


@pytest.mark.parametrize("change", [{"rank": 8}, {"search": True}])
def test_merge_benchmark_resume_refuses_another_rank_or_search(tmp_path, tiny_backbone, change):
    """--resume with another --rank or --no-search ran the missing merges under the new setting and recorded them
    beside the old ones, under the old run's 'rank' and 'search': one table, two settings, silently."""
    merging = load_script("merging")
    common = dict(backbone=BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu",
                  training=TrainConfig(epochs=1, max_steps=2, batch_size=8, progress=False), heads=("keep",),
                  echo=lambda line: None)
    merging.run(shrunk("text5"), tmp_path, methods=("linear",), rank=4, search=False, **common)
    with pytest.raises(ValueError, match=f"other {next(iter(change))}"):
        merging.run(shrunk("text5"), tmp_path, methods=("linear", "ties"), resume=True,
                    **{"rank": 4, "search": False, **change}, **common)
    assert list(json.loads((tmp_path / "results.json").read_text())["merges"]) == ["linear"]


def test_defaults_study_single_reference_holds_out_its_validation_like_add_task(monkeypatch):
    """With --validation held-out the `single` reference still trained and stopped on the corpus's validation rows
    (500 more labelled rows than add_task got) and was recorded as a held-out run: an unfair reference."""
    from types import SimpleNamespace

    from cmtl import TaskSpec
    from cmtl.benchmarks.scenarios import Experience
    from cmtl.continual import updates
    from cmtl.data import Examples

    defaults, seen = load_script("defaults"), []

    def fake_run_stream(strategy, experiences, kind, backbone, config, device):
        seen.append(experiences[0])
        return SimpleNamespace(R=[[0.5]], seconds_per_experience=[1.0], trainable_parameters_per_task=[10],
                               bytes_per_task=[40])

    monkeypatch.setattr(defaults, "run_stream", fake_run_stream)
    rows = lambda n, tag: Examples([f"{tag} text {i}" for i in range(n)], labels=["a", "b"] * (n // 2))  # noqa: E731
    exp = Experience(name="toy", spec=TaskSpec("toy", labels=["a", "b"]), train=rows(40, "train"),
                     validation=rows(10, "validation"), test=rows(6, "test"), corpus="trec6")
    given = defaults.run_variant("single", exp, BackboneConfig(), 3, "cpu", validation="given")
    assert seen[0].validation is exp.validation and given["examples_trained"] == 40
    held = defaults.run_variant("single", exp, BackboneConfig(), 3, "cpu", validation="held-out")
    kept, out = updates.split(exp.train, TrainConfig().validation_fraction, 3, "toy")  # what add_task holds out
    assert seen[1].train.texts == kept.texts and seen[1].validation.texts == out.texts
    assert seen[1].test is exp.test and held["examples_trained"] == 32


def test_defaults_study_counts_epochs_over_the_rows_trained_on():
    """'epochs run' divided the steps by the batches of all n_train rows; with --validation held-out add_task
    trains on 80 % of them, so every held-out run's epochs read 20 % low (5 epochs shown as 4.0)."""
    defaults = load_script("defaults")
    common = {"corpus": "trec6", "seed": 0, "time_s": 1.0, "trainable_parameters": 10, "n_train": 1000}
    runs = [{**common, "variant": "probe", "accuracy": 0.8, "bytes": None, "examples_trained": 1000},
            {**common, "variant": "default", "accuracy": 0.9, "bytes": 100, "steps": 250, "best_step": 200,
             "examples_trained": 800},
            {**common, "variant": "no-probe", "accuracy": 0.9, "bytes": 100, "steps": 252, "best_step": 200}]
    table = defaults.summarise({"runs": runs}).splitlines()
    row = lambda v: next(line for line in table if line.startswith(f"| {v} | 1 |")).split(" | ")  # noqa: E731
    assert row("default")[7] == "5.0"  # 250 steps / 50 batches of the 800 rows trained on
    assert row("no-probe")[7] == "4.0"  # a row stored before examples_trained: all n_train rows


def test_speed_benchmark_evaluates_the_lora_it_names(monkeypatch, tmp_path):
    """The evaluation part gave cmtl and Avalanche the default AdapterConfig (on BERT all four attention projections,
    every layer) while HF got query/value: under a table header saying query/value, ignoring --adapt top-half."""
    import argparse

    from cmtl import Registry
    from cmtl.integrations import avalanche as av

    speed, seen = load_script("speed"), {}

    class Stop(Exception):
        pass

    def record(way):
        def stop(*args, **kwargs):
            seen[way] = kwargs.get("adapter", args[2] if len(args) > 2 else None)
            raise Stop
        return stop

    monkeypatch.setattr(Registry, "add_task", record("cmtl"))
    monkeypatch.setattr(av, "build_model", record("avalanche"))
    monkeypatch.setattr(speed, "_hf_model", lambda args, n, layers: record("hf-peft")(None, None, layers))
    args = argparse.Namespace(layers=2, max_eval=4, adapt="top-half", device="cpu", seed=0, batch_size=8, epochs=1,
                              lr=1e-3)
    evaluate = {"cmtl": speed.eval_cmtl, "hf-peft": speed.eval_hf, "avalanche": speed.eval_avalanche}
    for way in speed.EVAL_WAYS:
        with pytest.raises(Stop):
            evaluate[way](args, tmp_path / way)
    assert seen["hf-peft"] == (1,)
    for way in ("cmtl", "avalanche"):
        assert seen[way].target_modules == speed.TARGET_MODULES and seen[way].layers == (1,)
        assert (seen[way].r, seen[way].alpha, seen[way].dropout) == (8, 16, 0.1)


def test_defaults_study_will_not_resume_under_other_library_defaults(tmp_path, capsys):
    """Resuming a study folder after TrainConfig's defaults changed (validation_fraction 0.1 -> 0.2 on 2026-12-07)
    trained the missing `default` runs under the new defaults beside the stored ones and summarised them as one
    variant; the stored 'defaults' record was overwritten with the new values, hiding it."""
    defaults = load_script("defaults")
    quick = ["--layers", "1", "--max-train", "32", "--max-eval", "16", "--corpora", "trec6", "--seeds", "0",
             "--device", "cpu", "--out", str(tmp_path)]
    assert defaults.main(quick + ["--variants", "probe"]) == 0
    path = tmp_path / "results.json"
    stored = json.loads(path.read_text())
    stored["defaults"]["training"]["validation_fraction"] = 0.1  # written before the default changed
    stored["defaults"]["training"].pop("ema_decay")  # a field added since is no change of default
    path.write_text(json.dumps(stored))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        defaults.main(quick + ["--variants", "probe,default"])
    assert "validation_fraction" in capsys.readouterr().err
    assert json.loads(path.read_text()) == stored  # nothing trained, nothing rewritten
    stored["defaults"]["training"]["validation_fraction"] = TrainConfig().validation_fraction
    stored["defaults"]["targets"]["bert"] = ["query", "value"]  # BERT's default modules until 2026-12-05
    path.write_text(json.dumps(stored))
    with pytest.raises(SystemExit):
        defaults.main(quick + ["--variants", "probe,default"])
    assert "targets.bert" in capsys.readouterr().err
    del stored["defaults"]["targets"]  # a study stored before the targets were recorded is not judged on them
    path.write_text(json.dumps(stored))
    assert defaults.main(quick + ["--variants", "probe"]) == 0  # same defaults: resumes


def test_joint_final_will_not_overwrite_another_runs_results(tmp_path, tiny_backbone):
    """The default --out is runs/bench/joint-final/<scenario> whatever the backbone, order or sizes: the docstring's
    quick look (--layers 2 --max-train 64) overwrote the results of the long SmolLM2 run before it."""
    joint_final = load_script("joint_final")
    config = StrategyConfig(training=TrainConfig(epochs=1, max_steps=1, batch_size=8, progress=False))
    backbone = BackboneConfig(name_or_path=tiny_backbone, max_length=32)
    scenario = Scenario.from_yaml(SCENARIOS / "text5.yaml").shrink(8, 4)
    first = joint_final.run(scenario, tmp_path, backbone=backbone, config=config, device="cpu", echo=lambda line: None)
    longer = StrategyConfig(training=TrainConfig(epochs=1, max_steps=2, batch_size=8, progress=False))
    for other in ({"scenario": scenario.shrink(6, 4)}, {"order": "random-1"}, {"config": longer}):
        with pytest.raises(FileExistsError, match="another --out"):
            joint_final.run(**{"scenario": scenario, "out": tmp_path, "backbone": backbone, "config": config,
                               "device": "cpu", "echo": lambda line: None, **other})
    assert json.loads((tmp_path / "results.json").read_text())["final_row"] == first["final_row"]
    again = joint_final.run(scenario, tmp_path, backbone=backbone, config=config, device="cpu", echo=lambda line: None)
    assert again["final_row"] == first["final_row"]  # the same run again may replace its own results


def test_update_benchmark_will_not_overwrite_an_earlier_runs_results(tmp_path, tiny_backbone):
    """A second run into the same --out with other --methods (update-replay first, retrain later) found no registry
    of its own in the way and replaced results.json and results.md with its methods alone: the first run's
    accuracy matrices and times were lost."""
    updates = load_script("updates")
    earlier = {"scenario": "sentiment4", "methods": {"update-replay": {"report": {}}}}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    with pytest.raises(FileExistsError, match="another --out"):
        updates.run(shrunk("sentiment4").shrink(8, 4), tmp_path, device="cpu", methods=("retrain",),
                    backbone=BackboneConfig(name_or_path=tiny_backbone, max_length=32),
                    training=TrainConfig(epochs=1, max_steps=1, batch_size=8, progress=False), echo=lambda line: None)
    assert json.loads((tmp_path / "results.json").read_text()) == earlier
    assert not (tmp_path / "registry-retrain").exists()


@pytest.mark.parametrize("script, args, where", [
    ("mt2st", ["--max-train", "24", "--steps", "8"], "rotten"),
    ("tag", ["--max-train", "24", "--no-pairs"], ""),
    ("speed", ["--max-train", "16", "--repeats", "1"], ""),
    ("serving", ["--requests", "500", "--adapters", "1,4"], ""),
])
def test_a_quick_look_does_not_replace_another_runs_results(tmp_path, monkeypatch, script, args, where):
    """Each script's docstring suggests a quick look with the default --out: it replaced the results of the full
    run made there before (results.json, results.md, the plots) without a word."""
    module = load_script(script)
    out = tmp_path / where
    out.mkdir(exist_ok=True)
    earlier = {"settings": {"max_train": 500}, "ways": {"stl": {}}}
    (out / "results.json").write_text(json.dumps(earlier))

    class WouldRun(Exception):
        pass

    def would_run(*args, **kwargs):
        raise WouldRun

    monkeypatch.setattr(module, "run" if script != "serving" else "throughput", would_run)
    with pytest.raises(FileExistsError, match="another --out"):
        module.main(args + ["--out", str(tmp_path), "--device", "cpu"], echo=lambda *a: None)
    assert json.loads((out / "results.json").read_text()) == earlier


def test_check_same_run_names_what_differs_and_lets_the_same_run_replace_its_results(tmp_path):
    from cmtl.benchmarks.results import check_same_run, write_results

    check_same_run(tmp_path, {"a": 1})  # nothing written yet
    write_results(tmp_path, {"settings": {"a": 1, "b": {"c": (1, 2), "d": 0}}, "ways": {}})
    check_same_run(tmp_path, {"a": 1, "b": {"c": (1, 2), "d": 0}})  # the same run again: tuples stored as lists
    with pytest.raises(FileExistsError, match=r"'b\.d': \(0, 1\).*another --out"):
        check_same_run(tmp_path, {"a": 1, "b": {"c": (1, 2), "d": 1}})
    with pytest.raises(FileExistsError, match=r"'e': \(None, 2\)"):
        check_same_run(tmp_path, {"a": 1, "b": {"c": (1, 2), "d": 0}, "e": 2})
    write_results(tmp_path, {"ways": {}})  # written before settings were recorded: not judged
    check_same_run(tmp_path, {"a": 2})


def test_defaults_study_errors_removed_leaves_out_runs_with_no_probe_errors():
    """(acc - probe) / (1 - probe) divided by 1e-9 where the probe scored 1.0: one run 0.01 below a perfect probe
    (one text in a quick look) made the study's mean 'errors removed' about -500,000,000 %."""
    defaults = load_script("defaults")
    common = {"seed": 0, "time_s": 1.0, "trainable_parameters": 10, "n_train": 32, "bytes": None}
    runs = [{**common, "variant": "probe", "corpus": "sms_spam", "accuracy": 1.0},
            {**common, "variant": "probe", "corpus": "trec6", "accuracy": 0.8},
            {**common, "variant": "default", "corpus": "sms_spam", "accuracy": 0.99},
            {**common, "variant": "default", "corpus": "trec6", "accuracy": 0.9}]
    table = defaults.summarise({"runs": runs}).splitlines()
    default = next(line for line in table if line.startswith("| default | 2 |")).split(" | ")
    assert default[4] == "50.0 %"  # trec6 alone: half the probe's errors; sms_spam's probe left none to remove
    assert default[5] == "1"  # still one run below the probe


@pytest.mark.parametrize("change, match", [
    ({"search": False}, "without the knob search"),
    ({"compare_full": ("ties",)}, r"\['ties'\].*ties\+refit"),  # --heads refit runs no 'ties' to compare
    ({"compare_full": ("dare+refit",)}, r"\['dare\+refit'\]"),  # not among --methods
])
def test_merge_benchmark_refuses_a_compare_full_it_would_not_run(tmp_path, tiny_backbone, change, match):
    """--compare-full names merges to run again on the full grid; under --no-search, or naming a merge that
    --methods and --heads do not run, it ran nothing more and said nothing."""
    merging = load_script("merging")
    kwargs = {"methods": ("ties",), "heads": ("refit",), "compare_full": ("ties+refit",), "search": True, **change}
    with pytest.raises(ValueError, match=match):
        merging.run(shrunk("text5"), tmp_path, backbone=BackboneConfig(name_or_path=tiny_backbone, max_length=32),
                    training=TrainConfig(epochs=1, batch_size=8, progress=False), device="cpu",
                    rank=4, echo=lambda line: None, **kwargs)
    assert not (tmp_path / "registry").exists()  # refused before anything trained


def test_the_merging_script_survives_a_task_whose_own_adapter_scores_zero():
    """merged / individual raised ZeroDivisionError after every adapter had trained and before results.json
    existed, so --resume refused (no results) and a new run refused (the registry exists): the training was
    lost. A ratio to a zero is NaN, shown as such."""
    import math

    merging = load_script("merging")
    ratios = merging.ratios({"a": 0.5, "b": 0.4}, {"a": 0.0, "b": 0.8})
    assert math.isnan(ratios["a"]) and ratios["b"] == 0.5
