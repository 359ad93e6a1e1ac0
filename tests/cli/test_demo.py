"""``cmtl demo``'s folder: a re-run replaces only a registry that an earlier demo created."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cmtl import Registry, TaskSpec
from cmtl.cli import demo
from tests.conftest import FAST, toy_sentiment


@pytest.fixture
def toy_demo(monkeypatch, tiny_config):
    """``run_demo`` on the tiny backbone and toy rows instead of MiniLM and the real corpora."""
    from datasets import Dataset

    def load_corpus(name, seed=0):
        return {split: Dataset.from_list(toy_sentiment(16, seed=i)) for i, split in
                enumerate(["train", "validation", "test"])}

    monkeypatch.setattr(demo, "load_corpus", load_corpus)
    monkeypatch.setattr(demo, "corpus_info", lambda name: SimpleNamespace(labels=["neg", "pos"], description="toy"))
    monkeypatch.setattr(demo, "BackboneConfig", lambda num_hidden_layers=None: tiny_config)
    return lambda out: demo.run_demo(out, max_train=16, max_test=8, epochs=1)


def snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_demo_runs_again_into_its_own_folder(toy_demo, tmp_path):
    out = tmp_path / "demo"
    first = toy_demo(out)
    assert (out / demo.MARKER).is_file() and [r["task"] for r in first["table"]] == ["question", "spam"]
    second = toy_demo(out)  # the folder an earlier demo created is replaced
    assert (out / demo.MARKER).is_file() and [r["task"] for r in second["table"]] == ["question", "spam"]
    assert Registry.open(out, device="cpu").tasks() == ["question", "spam"]


def test_the_demo_fills_an_empty_folder(toy_demo, tmp_path):
    (tmp_path / "demo").mkdir()
    toy_demo(tmp_path / "demo")
    assert (tmp_path / "demo" / demo.MARKER).is_file()


@pytest.mark.parametrize("content", ["empty-registry", "spam-registry", "files"])
def test_the_demo_refuses_a_folder_it_did_not_create_and_deletes_nothing(toy_demo, tmp_path, tiny_config, content):
    out = tmp_path / "mine"
    if content == "files":
        out.mkdir()
    else:  # a user's registry whose tasks are among the demo's
        reg = Registry.create(out, tiny_config, device="cpu")
        if content == "spam-registry":
            reg.add_task(TaskSpec("spam", labels=["neg", "pos"]), toy_sentiment(16), training=FAST)
    (out / "notes.txt").write_text("precious")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"'.*mine' exists and was not created by cmtl demo .*\.cmtl-demo.* "
                                              r"Pass another folder with --out, or delete this one yourself"):
        toy_demo(out)
    assert snapshot(out) == before


def test_quiet_turns_the_demos_progress_bars_off(toy_demo, tmp_path, monkeypatch):
    # `cmtl -q demo` trained with TrainConfig's progress=True: the loop's tqdm(disable=False) outranks the
    # TQDM_DISABLE that -q sets, so the bars -q promises to leave out were drawn.
    from typer.testing import CliRunner

    from cmtl.cli.commands import app

    for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)  # -q sets them for the process: put them back afterwards
    seen = []
    monkeypatch.setattr(demo, "TrainConfig", lambda **kwargs: seen.append(kwargs.get("progress", True)) or FAST)
    for flags, shown in (([], True), (["-q"], False)):
        seen.clear()
        result = CliRunner().invoke(app, [*flags, "demo", "--out", str(tmp_path / "demo"), "--max-train", "16",
                                          "--epochs", "1"])
        assert result.exit_code == 0, result.output
        assert seen == [shown, shown], flags
