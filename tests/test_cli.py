"""The cmtl command line: help everywhere, and a full lifecycle on a tiny backbone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cmtl import Registry
from cmtl.cli import app
from tests.conftest import toy_sentiment

runner = CliRunner()
COMMANDS = ["init", "add-task", "predict", "eval", "ls", "versions", "update", "monitor", "merge", "group", "rollback",
            "remove", "serve", "demo", "bench"]


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
    doc = subprocess.run([sys.executable, "-c", "import cmtl; help(cmtl)"], capture_output=True, text=True,
                         env={"PAGER": "cat", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert doc.returncode == 0 and "Registry" in doc.stdout and "TaskSpec" in doc.stdout


def test_lifecycle(tmp_path, tiny_backbone):
    reg = tmp_path / "reg"
    pd.DataFrame(toy_sentiment(96)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(toy_sentiment(32, 1)).to_csv(tmp_path / "val.csv", index=False)
    assert invoke("init", reg, "--backbone", tiny_backbone).exit_code == 0

    train = ["add-task", reg, "sentiment", "--train", tmp_path / "train.csv", "--validation", tmp_path / "val.csv",
             "--epochs", "8", "--batch-size", "8", "--lr", "0.02", "--no-progress"]
    result = invoke(*train)
    assert result.exit_code == 0, result.output
    assert "added sentiment v1" in result.output and "validation_accuracy" in result.output

    result = invoke("predict", reg, "sentiment", "a great film", "an awful film")
    assert result.exit_code == 0 and result.output.split("\n")[0].startswith("pos")
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
    result = invoke("update", reg, "sentiment", "--data", tmp_path / "train.csv", "--penalty", "l2")
    assert result.exit_code == 1 and "penalty must be" in result.output

    # Merge two versions of the task (a soup) and predict through it.
    result = invoke("merge", reg, "soup", "sentiment:1", "sentiment:3", "--method", "linear")
    assert result.exit_code == 0, result.output
    assert "merged sentiment v1, sentiment v3 into soup (linear, scale 0.5" in result.output and "normalised" in result.output
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
