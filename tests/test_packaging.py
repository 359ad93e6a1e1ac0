"""The package as pip builds it: every subpackage listed, the scenario files inside the wheel, and
``cmtl bench <name>`` working from the installed wheel alone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from cmtl.benchmarks.scenarios import Scenario, scenario_file, shipped

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_FILES = sorted(p.name for p in (ROOT / "scenarios").glob("*.yaml"))


def test_every_subpackage_is_listed_for_the_wheel():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cmtl").rglob("__init__.py")}
    assert set(listed) == found | {"cmtl.scenario_files"}


def test_shipped_scenarios_are_found_by_name():
    assert set(shipped()) == {name.removesuffix(".yaml") for name in SCENARIO_FILES} >= {"text5", "sentiment4",
                                                                                          "trec-classes"}
    assert Scenario.from_yaml("text5") == Scenario.from_yaml(ROOT / "scenarios" / "text5.yaml")
    assert Scenario.from_yaml("trec-classes.yaml").kind == "class-incremental"
    with pytest.raises(FileNotFoundError, match=r"no shipped scenario of that name.*'text5'"):
        scenario_file("text6")
    with pytest.raises(FileNotFoundError, match="No scenario file 'elsewhere/text5.yaml'") as error:
        scenario_file("elsewhere/text5.yaml")  # a path is never swapped for a shipped scenario
    assert "no shipped scenario" not in str(error.value)


def test_the_old_module_path_cmtl_scenarios_still_leads_to_the_scenario_code():
    # The package data has its own name: cmtl.scenarios is cmtl 0.1's path of cmtl.benchmarks.scenarios.
    import importlib

    import cmtl.benchmarks.scenarios

    sys.modules.pop("cmtl.scenarios", None)
    with pytest.warns(DeprecationWarning, match="cmtl.scenarios moved to cmtl.benchmarks.scenarios"):
        old = importlib.import_module("cmtl.scenarios")
    assert old is cmtl.benchmarks.scenarios


def test_bench_refuses_an_unknown_scenario_with_the_shipped_names():
    from typer.testing import CliRunner

    from cmtl.cli import app

    result = CliRunner().invoke(app, ["bench", "text6", "--dry-run"])
    assert result.exit_code == 2
    assert "text5" in result.output and "sentiment4" in result.output


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Built from a copy of what the wheel reads: setuptools writes build/ and *.egg-info beside its source.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("cmtl", "scenarios"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, cwd=out, timeout=300)
    built, = out.glob("cmtl-*.whl")
    return built


def test_the_wheel_ships_the_scenarios_and_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"cmtl/scenario_files/{name}" for name in SCENARIO_FILES} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "scenarios/", "notebooks/", "docs/"))]


def test_bench_runs_a_shipped_scenario_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import cmtl; print(cmtl.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(target)  # the wheel's cmtl, not this checkout's
    run = subprocess.run([sys.executable, "-m", "cmtl.cli", "bench", "text5", "--dry-run", "--max-train", "8",
                          "--max-eval", "4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "text5 (task-incremental): 5 experiences" in run.stdout
    for task in ("bbc", "trec", "spam", "rotten", "foods"):
        assert task in run.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
