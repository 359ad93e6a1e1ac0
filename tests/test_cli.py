"""The cmtl command line: help everywhere, and a full lifecycle on a tiny backbone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cmtl.cli import app
from tests.conftest import toy_sentiment

runner = CliRunner()
COMMANDS = ["init", "add-task", "predict", "eval", "ls", "versions", "rollback", "remove", "demo", "bench"]


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

    # Errors are one red line and exit code 1, not a traceback.
    result = invoke(*train)
    assert result.exit_code == 1 and "already exists" in result.output
    result = invoke("predict", reg, "nope", "x")
    assert result.exit_code == 1 and "Known tasks: ['sentiment']" in result.output
    result = invoke("ls", tmp_path / "missing")
    assert result.exit_code == 1 and "No registry at" in result.output

    assert invoke("remove", reg, "sentiment", "--yes").exit_code == 0
    assert "(no tasks)" in invoke("ls", reg).output
