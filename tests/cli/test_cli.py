"""The cmtl command line: help everywhere, and a full lifecycle on a tiny backbone."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import cmtl
from cmtl import Registry, TaskSpec, TrainConfig
from cmtl.cli.commands import app
from tests.conftest import TOPICS, toy_sentiment

runner = CliRunner()
COMMANDS = ["init", "add-task", "predict", "eval", "ls", "versions", "update", "monitor", "merge", "group", "export",
            "import", "rollback", "remove", "remove-merge", "serve", "demo", "bench"]


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.mark.parametrize("command", [None] + COMMANDS)
def test_help(command):
    result = invoke(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_console_script_and_public_api():
    script = Path(sys.executable).with_name("cmtl")  # installed next to this interpreter
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in COMMANDS)
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout == f"cmtl {cmtl.__version__}\n"
    doc = subprocess.run([sys.executable, "-c", "import cmtl; help(cmtl)"], capture_output=True, text=True,
                         env={"PAGER": "cat", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert doc.returncode == 0 and "Registry" in doc.stdout and "TaskSpec" in doc.stdout


def test_add_task_options_default_to_train_config():
    # The command's own defaults must be TrainConfig's, or a CLI user trains differently from a Python one.
    import typer.main

    params = {p.name: p.default for p in typer.main.get_command(app).commands["add-task"].params}
    config = TrainConfig()
    for option, field in [("epochs", "epochs"), ("batch_size", "batch_size"), ("lr", "learning_rate"),
                          ("head_lr", "head_learning_rate"), ("max_steps", "max_steps"),
                          ("validation_fraction", "validation_fraction"), ("probe_init", "probe_init"),
                          ("probe_margin", "probe_margin"), ("seed", "seed")]:
        assert params[option] == getattr(config, field), option


def test_lifecycle(tmp_path, tiny_backbone):
    reg = tmp_path / "reg"
    pd.DataFrame(toy_sentiment(96)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(toy_sentiment(32, 1)).to_csv(tmp_path / "val.csv", index=False)
    assert invoke("init", reg, "--backbone", tiny_backbone).exit_code == 0

    train = ["add-task", reg, "sentiment", "--train", tmp_path / "train.csv", "--validation", tmp_path / "val.csv",
             "--epochs", "8", "--batch-size", "8", "--lr", "0.02", "--target-modules", "query,value",
             "--probe-margin", "0.5", "--no-progress"]
    result = invoke(*train)
    assert result.exit_code == 0, result.output
    assert "added sentiment v1" in result.output and "validation_accuracy" in result.output
    assert "start: a fresh adapter" in result.output and "kept: the " in result.output
    assert "note:" not in result.output  # validation rows were given
    recorded = Registry.open(reg, device="cpu").current("sentiment").training
    assert recorded["probe_margin"] == 0.5 and isinstance(recorded["probe_gain"], float)
    probe = recorded["probe_metrics"]  # the step-0 probe's validation score, what training had to beat
    assert 0 <= probe["validation_accuracy"] <= 1 and probe["validation_n"] == 32

    result = invoke("predict", reg, "sentiment", "a great film", "an awful film")
    assert result.exit_code == 0 and result.output.split("\n")[0].startswith("pos")

    # A second task that starts from half the first one's adapter, recorded in its lineage.
    result = invoke("add-task", reg, "again", "--train", tmp_path / "train.csv", "--init", "sentiment",
                    "--init-scale", "0.5", "--max-steps", "1", "--lr", "1e-12", "--head-lr", "1e-11",
                    "--no-probe-init", "--validation-fraction", "0.25", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "start: task 'sentiment' v1 scaled by 0.5\n  kept: the trained state of step 1 of 1" in result.output
    assert "note: 24 rows of --train were held out to choose when to stop on;" in result.output  # 25 % of 96
    assert "probe" not in result.output.split("note:")[1]  # --no-probe-init: no probe to choose against
    opened = Registry.open(reg, device="cpu")
    assert opened.current("again").init == {"task": "sentiment", "version": 1, "chosen": "named", "scale": 0.5}
    recorded = opened.current("again").training
    assert (recorded["learning_rate"], recorded["head_learning_rate"]) == (1e-12, 1e-11)
    result = invoke("add-task", reg, "bad", "--train", tmp_path / "train.csv", "--init", "merge:", "--no-progress")
    assert result.exit_code == 1 and "'init' parameter of add_task must" in result.output
    assert invoke("remove", reg, "again", "--yes").exit_code == 0
    rows = [json.loads(line) for line in invoke("predict", reg, "sentiment", "a great film", "--json").output.splitlines()]
    assert rows[0]["prediction"] == "pos" and set(rows[0]["probabilities"]) == {"neg", "pos"}
    result = invoke("predict", reg, "sentiment", "--input", tmp_path / "val.csv")
    assert result.exit_code == 0 and len(result.output.splitlines()) == 32

    result = invoke("eval", reg, "sentiment", "--data", tmp_path / "val.csv")
    assert result.exit_code == 0 and "accuracy" in result.output

    result = invoke("ls", reg)
    assert result.exit_code == 0 and "sentiment" in result.output and "v1/1" in result.output
    result = invoke("versions", reg, "sentiment")
    assert result.exit_code == 0 and "v1 *" in result.output
    assert invoke("rollback", reg, "sentiment", "1").exit_code == 0

    # Update: the same data again cannot improve on the new validation data, so the gate keeps v1.
    result = invoke("update", reg, "sentiment", "--data", tmp_path / "train.csv", "--validation",
                    tmp_path / "val.csv", "--epochs", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "sentiment v2 (from v1, 96 new + 96 replayed examples" in result.output
    assert "current version: v" in result.output
    forced = invoke("update", reg, "sentiment", "--data", tmp_path / "train.csv", "--epochs", "1", "--promote",
                    "--no-progress")
    assert forced.exit_code == 0 and "promoted by the caller" in forced.output and "current version: v3" in forced.output
    result = invoke("versions", reg, "sentiment")
    assert "v3 *" in result.output and "new_acc" in result.output and "update" in result.output
    header, *rows = result.output.splitlines()
    column = header.index("probe_acc")  # the first version's probe, in its own column beside its own score
    v1 = next(row for row in rows if row.startswith("v1 "))
    assert v1[column:column + 6] == f"{probe['validation_accuracy']:.4f}"
    result = invoke("update", reg, "sentiment", "--data", tmp_path / "train.csv", "--penalty", "l2")
    assert result.exit_code == 1 and "'penalty' parameter of UpdateConfig must be" in result.output

    # Merge two versions of the task (a soup) and predict through it.
    result = invoke("merge", reg, "soup", "sentiment:1", "sentiment:3", "--method", "linear")
    assert result.exit_code == 0, result.output
    assert "merged sentiment v1, sentiment v3 into soup (linear, scale 0.5" in result.output and "normalised" in result.output
    assert "frozen" in result.output and "frozen backbone" in result.output  # the baseline every merge is held to
    searched = invoke("merge", reg, "soup-search", "sentiment:1", "sentiment:3", "--method", "linear", "--search",
                      "--require-gain")
    info = Registry.open(reg, device="cpu").merge_info("soup-search") if searched.exit_code == 0 else None
    if info is None:  # refused: the best merge does not beat the frozen backbone, and nothing was written
        assert searched.exit_code == 1 and "require_gain" in searched.output, searched.output
    else:
        assert "held-out rows the search did not choose on" in searched.output
        assert info["normalised"] > info["baseline_normalised"] and not info["below_baseline"]
    result = invoke("predict", reg, "sentiment", "a great film", "--merge", "soup")
    assert result.exit_code == 0 and result.output.split("\t")[0] in ("pos", "neg")
    result = invoke("merge", reg, "soup-refit", "sentiment:1", "sentiment:3", "--method", "linear", "--refit-heads")
    assert result.exit_code == 0, result.output
    assert Registry.open(reg, device="cpu").merge_info("soup-refit")["config"]["refit_heads"] is True
    result = invoke("merge", reg, "bad", "sentiment:1", "sentiment:1")
    assert result.exit_code == 1 and "merged with itself" in result.output

    # Monitor: the held-out sample of v3 is the reference; exit code 3 signals drift.
    pd.DataFrame({"text": [r["text"] for r in toy_sentiment(40, 5)]}).to_csv(tmp_path / "same.csv", index=False)
    pd.DataFrame({"text": [f"breaking news {i}: markets fall in {c}" for i, c in enumerate(["tokyo", "paris"] * 20)]}
                 ).to_csv(tmp_path / "news.csv", index=False)
    result = invoke("monitor", reg, "sentiment", "--data", tmp_path / "news.csv", "--json")
    report = json.loads(result.output)
    assert result.exit_code == 3 and report["drift"] and report["p_value"] < 0.01 and report["n_new"] == 40
    result = invoke("monitor", reg, "sentiment", "--data", tmp_path / "news.csv", "--reference", tmp_path / "news.csv")
    assert result.exit_code == 0 and "no drift detected" in result.output
    pd.DataFrame({"text": ["too few"] * 5}).to_csv(tmp_path / "few.csv", index=False)
    result = invoke("monitor", reg, "sentiment", "--data", tmp_path / "few.csv")
    assert result.exit_code == 1 and "needs at least 20 incoming texts; got 5" in result.output

    # Errors are one red line and exit code 1, not a traceback.
    result = invoke(*train)
    assert result.exit_code == 1 and "already exists" in result.output
    result = invoke("predict", reg, "nope", "x")
    assert result.exit_code == 1 and "Known tasks: ['sentiment']" in result.output
    result = invoke("ls", tmp_path / "missing")
    assert result.exit_code == 1 and "No registry at" in result.output

    assert invoke("remove", reg, "sentiment", "--yes").exit_code == 0
    assert "(no tasks)" in invoke("ls", reg).output


# --- errors are one line, never a traceback -------------------------------------------------


def clean_failure(result, *needles: str) -> None:
    """Exit code 1, an 'error: ' line holding every needle, and no exception escaped the CLI."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output.startswith("error: ") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.fixture
def reg_copy(tmp_path, sentiment_registry):
    shutil.copytree(sentiment_registry, tmp_path / "reg")
    return tmp_path / "reg"


def test_bad_manifest_is_one_line_for_ls_and_serve(reg_copy):
    manifest = json.loads((reg_copy / "registry.json").read_text())
    manifest["tasks"]["sentiment"]["current"] = 99
    manifest["generation"] += 1
    (reg_copy / "registry.json").write_text(json.dumps(manifest))
    clean_failure(invoke("ls", reg_copy), "99")
    proc = subprocess.run([sys.executable, "-m", "cmtl.cli", "serve", str(reg_copy), "--device", "cpu", "--port", "0"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr and "99" in proc.stderr, proc.stderr


def test_add_task_refuses_label_names_that_differ_only_in_spaces_or_case(reg_copy, tmp_path):
    # Without --labels the names come from the data: 'pos' and 'pos ' became two classes, without a word.
    rows = [{"text": f"text {i}", "label": label} for i, label in enumerate(["pos", "neg", "pos ", "Neg"] * 4)]
    pd.DataFrame(rows).to_csv(tmp_path / "messy.csv", index=False)
    clean_failure(invoke("add-task", reg_copy, "new", "--train", tmp_path / "messy.csv"),
                  "'pos' / 'pos '", "'Neg' / 'neg'", "--labels")
    assert "new" not in Registry.open(reg_copy, device="cpu").tasks()


def test_add_task_refuses_label_names_that_differ_only_in_their_unicode_form(reg_copy, tmp_path):
    # 'café' typed as one code point (NFC) and as 'e' + a combining accent (NFD, as macOS file names and some
    # exports write it) print the same, but were two classes, each with part of the rows.
    rows = [{"text": f"text {i}", "label": label} for i, label in enumerate(["caf\u00e9", "tea", "cafe\u0301"] * 4)]
    pd.DataFrame(rows).to_csv(tmp_path / "forms.csv", index=False)
    clean_failure(invoke("add-task", reg_copy, "new", "--train", tmp_path / "forms.csv"), "Unicode",
                  "'cafe\\u0301' / 'caf\\xe9'", "--labels")
    assert "new" not in Registry.open(reg_copy, device="cpu").tasks()


@pytest.mark.parametrize("blank", ["", "  "])
def test_add_task_refuses_rows_without_a_label_when_the_labels_come_from_the_data(reg_copy, tmp_path, blank):
    # A CSV reads a missing label as '' (no NaN): without --labels, '' became a class of its own, the unlabelled
    # rows trained as that class and predict could answer ''.
    rows = [{"text": r["text"], "label": blank if i in (3, 7) else r["label"]} for i, r in enumerate(toy_sentiment(24))]
    pd.DataFrame(rows).to_csv(tmp_path / "gaps.csv", index=False)
    clean_failure(invoke("add-task", reg_copy, "new", "--train", tmp_path / "gaps.csv", "--max-steps", "2",
                         "--no-progress"), "'label'", "rows [3, 7]", "--labels")
    assert "new" not in Registry.open(reg_copy, device="cpu").tasks()


def test_add_task_label_encoding_index_reads_integers_as_positions_in_labels(reg_copy, tmp_path):
    # Labels 0/1 meaning positions in --labels could only be added from Python before: the CLI read them by value,
    # and "0" is not a label name.
    rows = [{"text": r["text"], "label": int(r["label"] == "pos")} for r in toy_sentiment(24)]
    pd.DataFrame(rows).to_csv(tmp_path / "ints.csv", index=False)
    run = ["add-task", reg_copy, "new", "--train", tmp_path / "ints.csv", "--max-steps", "2", "--no-progress"]
    clean_failure(invoke(*run, "--labels", "neg,pos"), "0")
    clean_failure(invoke(*run, "--label-encoding", "index"), "--label-encoding index", "--labels")
    clean_failure(invoke(*run, "--labels", "neg,pos", "--label-encoding", "position"), "label_encoding")
    result = invoke(*run, "--labels", "neg,pos", "--label-encoding", "index")
    assert result.exit_code == 0, result.output
    reg = Registry.open(reg_copy, device="cpu")
    assert reg.spec("new").label_encoding == "index" and reg.spec("new").labels == ("neg", "pos")
    from cmtl.data import read_examples  # later reads of the task's files (eval, update) take the stored encoding

    assert read_examples(tmp_path / "ints.csv", reg.spec("new")).labels == [r["label"] for r in toy_sentiment(24)]


def test_add_task_without_label_column_names_the_column(reg_copy, tmp_path):
    pd.DataFrame({"text": ["a", "b"]}).to_csv(tmp_path / "nolabel.csv", index=False)
    clean_failure(invoke("add-task", reg_copy, "new", "--train", tmp_path / "nolabel.csv"), "'label'", "not found")
    clean_failure(invoke("add-task", reg_copy, "new", "--train", tmp_path / "nolabel.csv", "--labels", "a,b"),
                  "'label'", "not found")
    assert "new" not in Registry.open(reg_copy, device="cpu").tasks()


def test_encoding_option_reads_latin1_files(reg_copy, tmp_path):
    latin, latin_val, latin_new = (tmp_path / f"{name}.csv" for name in ("latin", "latin-val", "latin-new"))
    for path, seed in ((latin, 0), (latin_val, 1), (latin_new, 2)):  # distinct rows: no overlap warning
        rows = [{"text": r["text"] + " café", "label": r["label"]} for r in toy_sentiment(24, seed)]
        pd.DataFrame(rows).to_csv(path, index=False, encoding="latin-1")
    clean_failure(invoke("add-task", reg_copy, "new", "--train", latin, "--max-steps", "2", "--no-progress"),
                  "latin.csv", "--encoding")
    ok = ["--encoding", "latin-1"]
    result = invoke("add-task", reg_copy, "new", "--train", latin, "--validation", latin_val, "--max-steps", "2",
                    "--no-progress", *ok)
    assert result.exit_code == 0, result.output
    assert Registry.open(reg_copy, device="cpu").spec("new").labels == ("neg", "pos")
    clean_failure(invoke("eval", reg_copy, "new", "--data", latin), "latin.csv", "--encoding")
    assert invoke("eval", reg_copy, "new", "--data", latin, *ok).exit_code == 0
    assert len(invoke("predict", reg_copy, "new", "--input", latin, *ok).output.splitlines()) == 24
    result = invoke("update", reg_copy, "new", "--data", latin_new, "--epochs", "1", "--no-progress", *ok)
    assert result.exit_code == 0, result.output
    result = invoke("monitor", reg_copy, "new", "--data", latin, "--reference", latin, *ok)
    assert result.exit_code == 0 and "no drift" in result.output, result.output
    clean_failure(invoke("eval", reg_copy, "new", "--data", latin, "--encoding", "klingon"), "klingon")


def test_merge_answers_after_member_removal_in_the_cli(tmp_path, served):
    reg = tmp_path / "reg"
    shutil.copytree(served, reg)
    before = invoke("predict", reg, "topic", "a song and the night", "--merge", "both").output
    rows = [{"text": t, "label": label} for t, label in [("a song and the night", TOPICS[0]), ("a goal", TOPICS[1])]]
    pd.DataFrame(rows).to_csv(tmp_path / "topics.csv", index=False)
    merged = Registry.open(reg, device="cpu").evaluate("topic", rows, merge="both")
    result = invoke("eval", reg, "topic", "--data", tmp_path / "topics.csv", "--merge", "both")
    assert result.exit_code == 0, result.output
    assert any(line.split() == ["accuracy", f"{merged['accuracy']:.4f}"] for line in result.output.splitlines())
    assert invoke("remove", reg, "topic", "--yes").exit_code == 0
    result = invoke("predict", reg, "topic", "a song and the night", "--merge", "both")
    assert result.exit_code == 0 and result.output == before, result.output
    clean_failure(invoke("predict", reg, "topic", "a song"), "Task 'topic' not found")
    # ls lists the merged entry; remove-merge deletes it (and only it).
    listing = invoke("ls", reg)
    assert listing.exit_code == 0 and "entry" in listing.output, listing.output
    line = next(row for row in listing.output.splitlines() if row.startswith("both "))
    assert "merge (" in line and "sentiment v1" in line and "topic v1" in line, line
    assert invoke("remove-merge", reg, "both").exit_code == 1  # no --yes and no stdin: not confirmed
    assert Registry.open(reg, device="cpu").merges() == ["both"]
    clean_failure(invoke("remove-merge", reg, "nope", "--yes"), "Merge 'nope' not found")
    result = invoke("remove-merge", reg, "both", "--yes")
    assert result.exit_code == 0 and "removed both" in result.output
    assert Registry.open(reg, device="cpu").merges() == [] and "entry" not in invoke("ls", reg).output
    clean_failure(invoke("predict", reg, "sentiment", "a song", "--merge", "both"), "'both'")


def test_serve_passes_its_limits_to_the_server(monkeypatch, tmp_path):
    import cmtl.serving.server

    seen = {}
    monkeypatch.setattr(cmtl.serving.server, "serve", lambda registry, **kwargs: seen.update(kwargs))
    result = invoke("serve", tmp_path, "--max-body-bytes", 4096, "--max-texts", 8)
    assert result.exit_code == 0, result.output
    assert seen["config"].max_body_bytes == 4096 and seen["config"].max_texts == 8
    result = invoke("serve", tmp_path, "--max-body-bytes", 0)
    assert result.exit_code == 1 and result.output.startswith("error:") and "max_body_bytes" in result.output


def test_encoding_that_is_not_a_text_encoding_is_one_line(reg_copy, tmp_path):
    pd.DataFrame(toy_sentiment(4)).to_csv(tmp_path / "d.csv", index=False)
    for codec in ("rot13", "hex", "base64"):
        clean_failure(invoke("eval", reg_copy, "sentiment", "--data", tmp_path / "d.csv", "--encoding", codec),
                      f"{codec!r} is not a text encoding")


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_refuses_a_port_out_of_range_in_one_line(monkeypatch, tmp_path, port):
    import cmtl.serving.server

    monkeypatch.setattr(cmtl.serving.server, "serve", lambda registry, **kwargs: pytest.fail("served on a bad port"))
    result = invoke("serve", tmp_path, "--port", port)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    bound = "greater than or equal to 0" if port == "-1" else "less than or equal to 65535"
    assert "Invalid value for '--port'" in result.output and bound in result.output, result.output


def test_export_and_import_a_task_through_peft_folders(reg_copy, tmp_path, tiny_backbone):
    out = tmp_path / "export"
    result = invoke("export", reg_copy, "sentiment", out)
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").is_file() and (out / "cmtl_head.safetensors").is_file()
    assert invoke("export", reg_copy, "sentiment", out).exit_code == 1  # not empty: refused, one line
    other = tmp_path / "other"
    assert invoke("init", other, "--backbone", tiny_backbone).exit_code == 0
    Registry.open(other, device="cpu")  # created on the same tiny weights (max_length differs: not hashed)
    result = invoke("import", other, out, "--name", "copy")
    assert result.exit_code == 0, result.output
    assert "imported copy v1" in result.output
    (out / "cmtl_task.json").unlink()
    result = invoke("import", other, out)
    assert result.exit_code == 1 and "pass --name, --labels and --train" in result.output
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in toy_sentiment(32)) + "\n")
    result = invoke("import", other, out, "--name", "fitted", "--labels", "neg,pos", "--train", rows)
    assert result.exit_code == 0, result.output
    assert Registry.open(other, device="cpu").tasks() == ["copy", "fitted"]


@pytest.mark.parametrize("where", [".", "tasks/sentiment/v1", ".."])
def test_export_overwrite_onto_into_or_around_the_registry_is_refused_in_one_line(reg_copy, where):
    before = {str(p): p.read_bytes() for p in sorted(reg_copy.rglob("*")) if p.is_file()}
    result = invoke("export", reg_copy, "sentiment", reg_copy / where, "--overwrite")
    assert result.exit_code == 1 and "must lie outside the registry" in result.output, result.output
    assert {str(p): p.read_bytes() for p in sorted(reg_copy.rglob("*")) if p.is_file()} == before


def test_import_with_the_exported_labels_keeps_the_exported_task(reg_copy, tmp_path):
    """--labels on a folder cmtl exported built a fresh single-label spec; with the same labels the registry
    reused the multi-label head under it, answering by argmax."""
    reg = Registry.open(reg_copy, device="cpu")
    rows = [{"text": r["text"], "tags": [r["label"], "film"] if "film" in r["text"] else [r["label"]]}
            for r in toy_sentiment(32)]
    reg.add_task(TaskSpec("tags", labels=["neg", "pos", "film"], problem_type="multi_label", label_column="tags"),
                 rows, training=TrainConfig(max_steps=3, batch_size=8, progress=False))
    assert invoke("export", reg_copy, "tags", tmp_path / "export").exit_code == 0
    result = invoke("import", reg_copy, tmp_path / "export", "--name", "tags-b", "--labels", "neg,pos,film")
    assert result.exit_code == 0, result.output
    again = Registry.open(reg_copy, device="cpu")
    assert again.spec("tags-b").problem_type == "multi_label" and again.spec("tags-b").label_column == "tags"
    texts = [r["text"] for r in toy_sentiment(8, 9)]
    assert again.predict("tags-b", texts) == again.predict("tags", texts)


def test_add_task_with_an_analytic_head_and_update_it(reg_copy, tmp_path):
    pd.DataFrame(toy_sentiment(40)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(toy_sentiment(16, 1)).to_csv(tmp_path / "val.csv", index=False)
    data = ["--train", tmp_path / "train.csv", "--validation", tmp_path / "val.csv", "--no-progress"]
    clean_failure(invoke("add-task", reg_copy, "new", *data, "--head", "lda"), "--head", "linear, ridge or slda")
    clean_failure(invoke("add-task", reg_copy, "new", *data, "--head", "slda", "--head-features", "probe"),
                  "features", "'backbone', 'adapter'")
    clean_failure(invoke("add-task", reg_copy, "new", *data, "--head-features", "adapter"),
                  "--head-features applies to --head ridge or slda only")
    assert "new" not in Registry.open(reg_copy, device="cpu").tasks()
    result = invoke("add-task", reg_copy, "new", *data, "--head", "slda")
    assert result.exit_code == 0, result.output
    result = invoke("update", reg_copy, "new", "--data", tmp_path / "train.csv", "--validation", tmp_path / "val.csv",
                    "--promote", "--no-progress")
    assert result.exit_code == 0, result.output
    versions = Registry.open(reg_copy, device="cpu").versions("new")
    assert [v.head["config"]["kind"] for v in versions] == ["slda", "slda"]
    table = invoke("versions", reg_copy, "new").output.splitlines()
    assert "head" in table[0].split() and all(" slda " in line for line in table[2:4]), table
    assert [v.training["steps"] for v in versions] == [0, 0]
    # Without --validation the held-out rows choose the head's ridge and scale; nothing trains, so no note
    # about stopping or the probe (before, it printed one).
    result = invoke("add-task", reg_copy, "held", "--train", tmp_path / "train.csv", "--head", "ridge", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output


def test_predict_prints_one_line_per_text_whatever_the_text_holds(reg_copy, tmp_path):
    # A text holding a line break printed as is ("pos\tline one\nline two") read as two rows, the second
    # without a label: every later prediction was one line off for whoever reads the output by lines.
    texts = ["line one\nline two", "a\r\nb", "tab\there", "para\u2028graph", "plain"]
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "odd.csv", index=False)
    expected = Registry.open(reg_copy, device="cpu").predict("sentiment", texts)
    for extra in ([], ["--proba"]):
        result = invoke("predict", reg_copy, "sentiment", "--input", tmp_path / "odd.csv", *extra)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert len(lines) == len(texts), lines
        assert [line.split("\t")[0] for line in lines] == expected
        assert lines[0].endswith("line one\\nline two") and lines[2].endswith("tab\\there"), lines


def test_eval_reads_the_data_with_the_labels_of_the_version_it_evaluates(reg_copy, tmp_path):
    # eval --version read the file with the current version's labels: after a rollback to v1, v2's own
    # label was refused as unknown ("not in its label set"), though v2 answers with it.
    rows = toy_sentiment(24, 4) + [{"text": f"a meh film {i}", "label": "meh"} for i in range(8)]
    pd.DataFrame(rows).to_csv(tmp_path / "grown.csv", index=False)
    reg = Registry.open(reg_copy, device="cpu")
    reg.update_task("sentiment", rows, validation=rows, labels=["neg", "pos", "meh"], promote=True,
                    training=TrainConfig(max_steps=2, progress=False))
    reg.rollback("sentiment", 1)
    expected = Registry.open(reg_copy, device="cpu").evaluate("sentiment", rows, version=2)
    result = invoke("eval", reg_copy, "sentiment", "--data", tmp_path / "grown.csv", "--version", "2")
    assert result.exit_code == 0, result.output
    assert f"{expected['accuracy']:.4f}" in result.output and "32" in result.output, result.output


def test_monitor_and_predict_read_the_text_pairs_of_a_pair_task(tmp_path, tiny_backbone):
    # cmtl monitor read only the text column, so a task on text pairs could not be monitored from the shell.
    from cmtl import BackboneConfig
    from tests.conftest import FAST

    reg = Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_backbone, max_length=32), device="cpu")
    rows = [{"a": r["text"], "b": "about the movie", "label": r["label"]} for r in toy_sentiment(40, 1)]
    reg.add_task(TaskSpec("pair", labels=["neg", "pos"], text_column="a", text_pair_column="b"), rows, rows,
                 training=dataclasses.replace(FAST, epochs=1))
    pd.DataFrame([{"a": r["a"], "b": "about the movie"} for r in rows]).to_csv(tmp_path / "same.csv", index=False)
    pd.DataFrame([{"a": r["a"], "b": f"quarterly earnings rose {i} percent in europe"} for i, r in enumerate(rows)]
                 ).to_csv(tmp_path / "shifted.csv", index=False)
    same = invoke("monitor", tmp_path / "reg", "pair", "--data", tmp_path / "same.csv")
    assert same.exit_code == 0, same.output
    shifted = invoke("monitor", tmp_path / "reg", "pair", "--data", tmp_path / "shifted.csv")
    assert shifted.exit_code == 3 and "DRIFT" in shifted.output, shifted.output
    # Texts given as arguments have no pairs: the message says how to give them from the shell.
    alone = invoke("predict", tmp_path / "reg", "pair", "a great film")
    assert alone.exit_code == 1 and "--input FILE with the columns 'a' and 'b'" in alone.output, alone.output
    assert invoke("predict", tmp_path / "reg", "pair", "--input", tmp_path / "same.csv").exit_code == 0


def test_add_task_and_update_show_the_overlap_warning_and_still_train(reg_copy, tmp_path):
    """Validation rows that are training rows (and update data holding old held-out rows) are a warning in the
    CLI too, not a failure."""
    pd.DataFrame(toy_sentiment(24)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(toy_sentiment(24)[:4] + toy_sentiment(6, 1)).to_csv(tmp_path / "val.csv", index=False)
    with pytest.warns(UserWarning, match=r"4 of 10 validation rows \(40 %\) are also in the training data"):
        result = invoke("add-task", reg_copy, "new", "--train", tmp_path / "train.csv", "--validation",
                        tmp_path / "val.csv", "--max-steps", "2", "--no-progress")
    assert result.exit_code == 0, result.output
    with pytest.warns(UserWarning, match=r"of \d+ old held-out rows .* are also in the training data"):
        result = invoke("update", reg_copy, "new", "--data", tmp_path / "val.csv", "--epochs", "1", "--no-progress")
    assert result.exit_code == 0, result.output


def test_a_warning_prints_one_line_and_python_s_form_comes_back_after_the_command():
    # A command's UserWarning is for the user: one "warning:" line, not the file, line and source of the call
    # in cmtl that Python's default form shows. Run apart: pytest records warnings instead of printing them.
    script = """
import warnings, typer
from cmtl.cli.commands import _Commands
app = typer.Typer(cls=_Commands)
@app.command()
def warn():
    warnings.warn("Task 'x': 4 of 10 validation rows are also in the training data", UserWarning)
    warnings.warn("an old call", DeprecationWarning)
@app.command()
def other():
    pass
try:
    app(["warn"])
except SystemExit:
    pass
warnings.warn("after the command", UserWarning)
"""
    proc = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert lines[0] == "warning: Task 'x': 4 of 10 validation rows are also in the training data", proc.stderr
    assert "DeprecationWarning: an old call" in lines[1]  # other kinds keep Python's form
    assert any("UserWarning: after the command" in line for line in lines[2:]), proc.stderr


def test_merge_table_normalises_a_regression_member_as_the_summary_does(monkeypatch, tmp_path):
    # A member's MSE is lower-is-better: the merge keeps individual / merged of its level (the summary's
    # normalised, cmtl.merging.pipeline.normalised), not merged / individual, which read 2.0 for an MSE twice the
    # member's, as if the merge were twice as good.
    import cmtl.cli.commands

    record = {"members": [{"task": "topic", "version": 1}, {"task": "score", "version": 1}],
              "specs": {"topic": TaskSpec("topic", labels=["a", "b"]).to_dict(),
                        "score": TaskSpec("score", problem_type="regression").to_dict()},
              "config": {"method": "ties", "scale": 1.0, "density": 0.2, "drop": 0.9}, "adapter": {"r": 8},
              "reconstruction_error": {"max": 1e-4},
              "holdout": {"topic": {"individual": 0.8, "merged": 0.6, "baseline": 0.5, "rows": 10},
                          "score": {"individual": 0.5, "merged": 1.0, "baseline": 2.0, "rows": 10}},
              "normalised": 0.625, "baseline_normalised": 0.4375, "below_baseline": [], "seconds": 1.0}
    fake = type("Fake", (), {"merge": lambda self, *args, **kwargs: record})()
    monkeypatch.setattr(cmtl.cli.commands, "_open", lambda registry: fake)
    result = invoke("merge", tmp_path, "both", "topic", "score")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.startswith(("topic", "score"))}
    assert rows["topic"][4] == "0.7500" and rows["score"][4] == "0.5000", result.output


def test_predict_prints_no_probabilities_for_a_regression_task(reg_copy):
    # A regression task's outputs are values: --json printed them again as "probabilities" ({"score": 3.2}), and
    # --proba as "score=3.200", a probability that is no probability.
    reg = Registry.open(reg_copy, device="cpu")
    rows = [{"text": r["text"], "label": float(r["label"] == "pos")} for r in toy_sentiment(16)]
    reg.add_task(TaskSpec("rating", problem_type="regression"), rows,
                 training=TrainConfig(max_steps=1, progress=False, validation_fraction=0.0, probe_init=False))
    expected = reg.predict("rating", ["a fine song"])
    result = invoke("predict", reg_copy, "rating", "a fine song", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"text": "a fine song", "prediction": pytest.approx(expected[0])}
    clean_failure(invoke("predict", reg_copy, "rating", "a fine song", "--proba"), "regression")


def test_ls_and_versions_show_each_tasks_own_validation_score(reg_copy):
    # Both printed validation_accuracy only: a regression (or multi-label) task showed an empty column although
    # its validation mse (micro_f1) was recorded.
    reg = Registry.open(reg_copy, device="cpu")
    rows = [{"text": r["text"], "label": float(r["label"] == "pos")} for r in toy_sentiment(24)]
    info = reg.add_task(TaskSpec("rating", problem_type="regression"), rows,
                        training=TrainConfig(max_steps=2, progress=False, probe_init=False))
    mse = f"{info.metrics['validation_mse']:.4f}"
    listing = invoke("ls", reg_copy).output.splitlines()
    header = next(line for line in listing if line.startswith("task"))
    rating = next(line for line in listing if line.startswith("rating"))
    assert rating[header.index("metric"):].split()[:2] == ["mse", mse], listing
    lineage = invoke("versions", reg_copy, "rating").output.splitlines()
    column = lineage[0].index("val_mse")
    assert lineage[2][column:column + len(mse)] == mse and "mse = mse" not in lineage[-1], lineage


def test_update_epochs_are_not_capped_by_the_current_versions_max_steps(reg_copy, tmp_path):
    # update trains with the current version's settings: passing --epochs kept its max_steps, so a task added with
    # --max-steps 2 updated for 2 steps whatever --epochs said.
    reg = Registry.open(reg_copy, device="cpu")
    reg.add_task(TaskSpec("capped", labels=["neg", "pos"]), toy_sentiment(32, 6),
                 training=TrainConfig(max_steps=2, progress=False, validation_fraction=0.0, probe_init=False))
    pd.DataFrame(toy_sentiment(48, 7)).to_csv(tmp_path / "new.csv", index=False)
    result = invoke("update", reg_copy, "capped", "--data", tmp_path / "new.csv", "--epochs", "2", "--no-progress",
                    "--promote")
    assert result.exit_code == 0, result.output
    training = Registry.open(reg_copy, device="cpu").current("capped").training
    assert training["epochs"] == 2 and training["max_steps"] is None and training["steps"] > 2, training
    result = invoke("update", reg_copy, "capped", "--data", tmp_path / "new.csv", "--no-progress", "--promote")
    assert result.exit_code == 0, result.output  # without --epochs, the current version's settings as they are
    assert Registry.open(reg_copy, device="cpu").current("capped").training["epochs"] == 2


@pytest.mark.parametrize("option", ["--max-train", "--max-eval"])
def test_bench_refuses_a_cap_of_zero_rows(option):
    # A cap of 0 read as no override (`max_train or sc.max_train`): the benchmark ran on the scenario's own cap.
    result = invoke("bench", "text5", "--dry-run", option, "0")
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


@pytest.mark.parametrize(("args", "says"), [
    (["trec-classes", "--strategy", "adapters,avl-ewc"], "['avl-ewc'] cannot run on scenario 'trec-classes'"),
    (["text5", "--strategy", "adapters,nope"], "Unknown strategies ['nope']"),
    (["text5", "--orders", "random-99"], "Unknown orders ['random-99']"),
])
def test_bench_dry_run_refuses_what_the_run_would_refuse(args, says):
    # The dry run printed "would run ..." for a request the real run refuses before training anything.
    result = invoke("bench", *args, "--dry-run")
    assert result.exit_code == 1 and says in result.output, result.output
    assert "would run" not in result.output
