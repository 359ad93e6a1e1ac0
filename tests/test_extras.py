"""The core install: what ``pip install cmtl`` brings runs the lifecycle, and a feature of an extra that
is not installed says which extra to install, before any work starts.

A subprocess sees this environment's packages minus the extras' (a folder of links to site-packages
without them, Python started with ``-S``), so a missing package is missing as it would be after a
core install: ``importlib.util.find_spec`` finds nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Top-level modules that only the extras bring (serve, bench, avalanche). pydantic is not one of
#: them: the serve extra names it, but typer (core) depends on it too.
EXTRA_MODULES = ("fastapi", "fastapi_offline", "uvicorn", "prometheus_client", "matplotlib", "avalanche",
                 "torchvision")


@pytest.fixture(scope="module")
def core_site(tmp_path_factory) -> Path:
    """site-packages without the extras' modules and their metadata."""
    site, out = Path(sysconfig.get_paths()["purelib"]), tmp_path_factory.mktemp("core-site")
    for entry in site.iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top in EXTRA_MODULES or entry.name.endswith(".pth"):
            continue
        (out / entry.name).symlink_to(entry)
    return out


def run_core(core_site: Path, code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(core_site)]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-S", "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_core_install_runs_the_lifecycle_without_the_extras(core_site, tiny_backbone, tmp_path):
    result = run_core(core_site, f"""
        import importlib.util, sys
        assert all(importlib.util.find_spec(m) is None for m in {EXTRA_MODULES!r}), "an extra is visible"
        from cmtl import BackboneConfig, MergeConfig, Registry, TaskSpec, TrainConfig
        from cmtl.cli import app
        from cmtl.serving import InferenceEngine

        rows = lambda k: [{{"text": f"{{w}} film number {{i}}", "label": lab}}
                          for i in range(24) for w, lab in (("great", "pos"), ("awful", "neg"))][k::2]
        training = TrainConfig(epochs=2, batch_size=8, progress=False, validation_fraction=0.0)
        reg = Registry.create("reg", BackboneConfig(name_or_path={str(tiny_backbone)!r}, max_length=32), device="cpu")
        for task in ("a", "b"):
            reg.add_task(TaskSpec(task, labels=["neg", "pos"]), rows(0), rows(1), training=training)
        reg.merge(["a", "b"], "ab", "ties", config=MergeConfig(refit_heads=True))
        engine = InferenceEngine("reg", device="cpu")
        got = engine.predict(["a", "b"], ["a great film", "an awful film"])
        assert [row["label"] for row in got] == [reg.predict("a", ["a great film"])[0],
                                                 reg.predict("b", ["an awful film"])[0]], got
        assert not [m for m in {EXTRA_MODULES!r} if m in sys.modules], "an extra was imported"
        print("core ok")
        """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core ok" in result.stdout


@pytest.mark.parametrize(("code", "extra"), [
    ("from cmtl.serving import create_app", "serve"),
    ("from cmtl.integrations.avalanche_model import import_avalanche; import_avalanche()", "avalanche"),
    ("from cmtl.benchmarks.metrics import plot_heatmap; plot_heatmap([[1.0]], ['a'], 'h.png')", "bench"),
])
def test_a_missing_extra_names_the_install_command(core_site, tmp_path, code, extra):
    result = run_core(core_site, f"""
        from cmtl.errors import MissingExtraError
        try:
            {code}
        except MissingExtraError as error:
            print(error)
        """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"pip install 'cmtl[{extra}]'" in result.stdout


@pytest.mark.parametrize(("args", "extra"), [
    (["serve", "reg"], "serve"),
    (["bench", str(ROOT / "scenarios" / "text5.yaml"), "--max-train", "4"], "bench"),
])
def test_the_cli_refuses_a_command_whose_extra_is_missing_before_working(core_site, tmp_path, args, extra):
    (tmp_path / "reg").mkdir()
    result = run_core(core_site, f"""
        import sys
        from cmtl.cli import app
        sys.argv = ["cmtl", *{args!r}]
        app()
        """, tmp_path)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert f"pip install 'cmtl[{extra}]'" in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()
