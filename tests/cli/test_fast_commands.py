"""The CLI's read-only and lineage commands read the manifest alone (#23): no backbone is loaded and no
torch imported, so they answer in well under a second; ``-q`` silences progress bars and log lines."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time

import pytest

import cmtl
import cmtl.continual
import cmtl.core
import cmtl.registry
import cmtl.training
from cmtl import BackboneConfig, Registry, TaskSpec
from cmtl.registry import lineage
from tests.conftest import FAST, toy_sentiment

#: Runs the CLI in a fresh interpreter and reports, after it, whether torch was imported.
HARNESS = """
import sys
from cmtl.cli import app
try:
    app(sys.argv[1:], prog_name="cmtl")
    code = 0
except SystemExit as exit:
    code = exit.code or 0
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH")
sys.exit(code)
"""


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """The finished process, its wall time and its CPU time (user + system, which other jobs on a busy
    machine do not inflate)."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", HARNESS, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.fixture(scope="module")
def orphaned(tmp_path_factory, tiny_backbone):
    """A registry with two versions of one task whose backbone folder is gone: loading it would fail."""
    root = tmp_path_factory.mktemp("fast")
    shutil.copytree(tiny_backbone, root / "backbone")
    config = BackboneConfig(name_or_path=str(root / "backbone"), max_length=64)
    reg = Registry.create(root / "reg", config, device="cpu")
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), train=toy_sentiment(48), validation=toy_sentiment(16, 1),
                 training=FAST)
    reg.update_task("sentiment", toy_sentiment(48, 2), toy_sentiment(16, 3))
    shutil.rmtree(root / "backbone")
    return root / "reg"


@pytest.mark.parametrize("args", [["--help"], ["ls", "{reg}"], ["versions", "{reg}", "sentiment"],
                                  ["rollback", "{reg}", "sentiment", "1"]])
def test_manifest_only_commands_load_nothing_and_answer_within_a_second(orphaned, args):
    args = [a.format(reg=orphaned) for a in args]
    cpu = wall = float("inf")
    for _ in range(3):  # the best of three
        done, seconds, cpu_seconds = run_cli(*args)
        assert done.returncode == 0, done.stderr
        assert done.stdout.rstrip().endswith("NO-TORCH"), done.stdout
        wall, cpu = min(wall, seconds), min(cpu, cpu_seconds)
    # CPU time: a loaded CI machine stretches wall time, not the work done (importing torch alone is ~2 s).
    assert cpu < 1.0, f"cmtl {' '.join(args)} used {cpu:.2f} s of CPU at best ({wall:.2f} s wall)"
    if args[0] == "ls":
        assert "sentiment" in done.stdout and "v" in done.stdout and "backbone" in done.stdout
    if args[0] == "rollback":
        assert lineage.read(orphaned).current("sentiment").version == 1
        assert "current version is now v1" in done.stdout


def test_lineage_commands_report_bad_input_without_loading(orphaned):
    done, *_ = run_cli("rollback", str(orphaned), "sentiment", "7")
    assert done.returncode == 1 and "has no version 7" in done.stderr and "NO-TORCH" in done.stdout
    before = json.loads((orphaned / "registry.json").read_text())["tasks"]["sentiment"]["current"]
    done, *_ = run_cli("versions", str(orphaned), "nope")
    assert done.returncode == 1 and "not found" in done.stderr
    assert json.loads((orphaned / "registry.json").read_text())["tasks"]["sentiment"]["current"] == before


def test_import_cmtl_is_lazy():
    code = ("import sys, cmtl; "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
    assert cmtl.Registry.__name__ == "Registry" and "TaskSpec" in dir(cmtl)
    # Each lazy package lists its exports twice (the import map and the literal __all__ that static tools
    # read): they must name the same things, and every name must resolve.
    for package in (cmtl, cmtl.core, cmtl.training, cmtl.continual, cmtl.registry):
        assert set(package.__all__) - {"__version__"} == set(package._EXPORTS), package.__name__
        assert all(getattr(package, name) is not None for name in package.__all__)


def test_quiet_silences_progress_bars_and_logs(tmp_path, tiny_backbone):
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\n" + "\n".join(f"{r['text']},{r['label']}" for r in toy_sentiment(48)) + "\n")
    Registry.create(tmp_path / "reg", BackboneConfig(name_or_path=tiny_backbone, max_length=64), device="cpu")
    for flags, task in (([], "loud"), (["-q"], "quiet")):
        done, *_ = run_cli(*flags, "add-task", str(tmp_path / "reg"), task, "--train", str(rows), "--epochs", "2")
        assert done.returncode == 0, done.stderr
        if flags:
            assert "%|" not in done.stderr and "it/s" not in done.stderr, done.stderr
        else:
            assert "%|" in done.stderr  # the bar the quiet run leaves out
    done, *_ = run_cli("-q", "-v", "ls", str(tmp_path / "reg"))
    assert done.returncode == 2 and "choose one of --verbose and --quiet" in done.stderr
