"""Continual-learning scenarios: an ordered stream of experiences over real corpora.

A scenario is declared in a small YAML file (see ``scenarios/*.yaml``, shipped in the package as
``cmtl.scenario_files``, so that :meth:`Scenario.from_yaml` also takes a shipped scenario's name) and
turned into :class:`Experience` objects with fixed, seeded, capped splits.

Three kinds (van de Ven & Tolias, 2019, "Three scenarios for continual learning"):

* ``task-incremental``: each experience is a new task with its own labels; the
  task identity is known at test time (one head per task).
* ``domain-incremental``: every experience is the same task (one label set)
  on a shifted input distribution; no task identity is needed.
* ``class-incremental``: new classes of one task arrive per experience; at
  test time the model picks among all classes seen so far, with no task id.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

from cmtl._config import check_seed, is_seed
from cmtl.benchmarks.corpora import corpus_info, load_corpus
from cmtl.core.tasks import TaskSpec
from cmtl.data import Examples, read_examples
from cmtl.errors import InvalidParameterError, bad_param

Kind = Literal["task-incremental", "domain-incremental", "class-incremental"]
KINDS = ("task-incremental", "domain-incremental", "class-incremental")


@dataclass(kw_only=True, frozen=True)
class ExperienceSpec:
    """One step of a stream, as declared.

    Args:
        name: Experience name (the task name in task-incremental scenarios).
        corpus: A name from :data:`cmtl.benchmarks.corpora.CORPORA`.
        labels: Class-incremental only: the classes of the corpus this experience brings.
    """

    name: str
    corpus: str
    labels: tuple[str, ...] | None = None


@dataclass(kw_only=True, frozen=True)
class Scenario:
    """A declared stream of experiences and its budget.

    Args:
        name: Scenario name.
        kind: ``"task-incremental"``, ``"domain-incremental"`` or ``"class-incremental"``.
        experiences: The stream, in its stated order.
        task: Domain- and class-incremental: the name of the one task.
        max_train: Training examples per experience (seeded sample of the train split).
        max_eval: Validation and test examples per experience.
        random_orders: Seeds of extra, shuffled orders of the stream to run.
        seed: Seeds the corpora's splits and the samples.
        description: Free text.
    """

    name: str
    kind: Kind
    experiences: tuple[ExperienceSpec, ...]
    task: str | None = None
    max_train: int = 1000
    max_eval: int = 500
    random_orders: tuple[int, ...] = ()
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        owner = f"Scenario {self.name!r}"
        check_seed(self.seed, owner)
        orders = list(self.random_orders)  # each seeds one shuffle, named random-<seed>: None would draw from the clock
        if len(set(orders)) != len(orders) or not all(is_seed(s) for s in orders):
            raise InvalidParameterError(bad_param("random_orders", owner, "hold distinct integer seeds in [0, 2**62)",
                                                  orders))
        if self.kind not in KINDS:
            raise InvalidParameterError(bad_param("kind", owner, f"be one of {list(KINDS)}", self.kind))
        names = [e.name for e in self.experiences]
        if len(self.experiences) < 2:
            raise InvalidParameterError(bad_param("experiences", owner, "hold at least 2 experiences", names))
        if len(set(names)) != len(names):
            raise InvalidParameterError(bad_param("experiences", owner, "not hold duplicate names", names))
        if self.kind != "task-incremental" and not self.task:
            raise InvalidParameterError(bad_param("task", owner, f"name the one task of a {self.kind} scenario",
                                                  self.task))
        if self.kind == "domain-incremental":
            label_sets = {e.name: tuple(e.labels or corpus_info(e.corpus).labels) for e in self.experiences}
            if len(set(label_sets.values())) > 1:
                raise ValueError(
                    f"Scenario {self.name!r} is domain-incremental: every experience is the one task "
                    f"{self.task!r}, so each must have the same labels, in the same order. Got "
                    + ", ".join(f"{name}: {list(labels)}" for name, labels in label_sets.items())
                    + ". Give the experiences the same 'labels' (or corpora with one label set), or make the "
                    "scenario task-incremental (one task per experience).")
        if self.kind == "class-incremental":
            if len({e.corpus for e in self.experiences}) != 1 or any(not e.labels for e in self.experiences):
                raise ValueError("A class-incremental scenario draws every experience from one corpus and "
                                 "names each experience's 'labels'.")
            seen = [label for e in self.experiences for label in e.labels]
            if len(set(seen)) != len(seen):
                raise InvalidParameterError(bad_param("experiences", owner, "bring each class only once", seen))
        for key in ("max_train", "max_eval"):
            if getattr(self, key) < 1:
                raise InvalidParameterError(bad_param(key, owner, "be >= 1", getattr(self, key)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scenario":
        d = dict(d)
        d["experiences"] = tuple(
            ExperienceSpec(**{**e, "labels": tuple(e["labels"]) if e.get("labels") else None})
            for e in d.get("experiences", [])
        )
        d["random_orders"] = tuple(d.get("random_orders", ()))
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Scenario":
        """The scenario in YAML file ``path``, or shipped with cmtl under that name (:func:`shipped`)."""
        import yaml

        return cls.from_dict(yaml.safe_load(scenario_file(path).read_text(encoding="utf-8")))

    def shrink(self, max_train: int, max_eval: int) -> "Scenario":
        """The same stream with smaller caps (for tests and quick looks)."""
        return replace(self, max_train=max_train, max_eval=max_eval)

    def orders(self) -> list[tuple[str, "Scenario"]]:
        """The stated order, then one shuffled copy per seed in ``random_orders``."""
        out = [("stated", self)]
        for seed in self.random_orders:
            exps = list(self.experiences)
            random.Random(seed).shuffle(exps)
            out.append((f"random-{seed}", replace(self, experiences=tuple(exps), random_orders=())))
        return out

    def all_labels(self) -> tuple[str, ...]:
        """Class-incremental: every class in arrival order; otherwise the shared label set."""
        if self.kind == "class-incremental":
            return tuple(label for e in self.experiences for label in e.labels)
        return corpus_info(self.experiences[0].corpus).labels

    def load(self, cache_dir: str | Path | None = None) -> list["Experience"]:
        """Materialise the stream: capped, seeded splits of each experience's corpus."""
        return [_load_experience(self, e, cache_dir) for e in self.experiences]


@dataclass
class Experience:
    """One step of a loaded stream.

    ``spec`` is the head this experience trains: its own task (task-incremental),
    the shared task (domain-incremental), or its new classes (class-incremental).
    """

    name: str
    spec: TaskSpec
    train: Examples
    validation: Examples
    test: Examples
    corpus: str
    meta: dict[str, Any] = field(default_factory=dict)


def _load_experience(scenario: Scenario, e: ExperienceSpec, cache_dir) -> Experience:
    info = corpus_info(e.corpus)
    labels = e.labels or info.labels
    unknown = sorted(set(labels) - set(info.labels))
    if unknown:
        raise ValueError(f"Experience {e.name!r}: labels {unknown} are not in corpus {e.corpus!r} {list(info.labels)}.")
    splits = load_corpus(e.corpus, seed=scenario.seed, cache_dir=cache_dir)
    task = scenario.task if scenario.kind == "domain-incremental" else e.name
    spec = TaskSpec(task, labels=labels, description=info.description)

    def take(split: str, cap: int) -> Examples:
        ds = splits[split]
        if e.labels:
            wanted = set(e.labels)
            ds = ds.select([i for i, label in enumerate(ds["label"]) if label in wanted])
        ds = ds.shuffle(seed=scenario.seed).select(range(min(cap, len(ds))))
        return read_examples(ds, spec)

    return Experience(
        name=e.name,
        spec=spec,
        train=take("train", scenario.max_train),
        validation=take("validation", scenario.max_eval),
        test=take("test", scenario.max_eval),
        corpus=e.corpus,
    )


def shipped() -> dict[str, Traversable]:
    """The scenario files shipped with cmtl (package data ``cmtl.scenario_files``, the repository's
    ``scenarios/`` folder), by name: ``{"text5": <text5.yaml>, ...}``."""
    try:
        root = files("cmtl.scenario_files")
    except ModuleNotFoundError:  # a source tree on sys.path without an install: nothing is mapped
        return {}
    return {f.name.removesuffix(".yaml"): f for f in root.iterdir() if f.name.endswith(".yaml")}


def scenario_file(path: str | Path) -> Path | Traversable:
    """``path`` when it is a file; else, when it names no folder, the shipped scenario of that name
    (``"text5"`` or ``"text5.yaml"``)."""
    given = Path(path)
    if given.is_file():
        return given
    known = shipped()
    name = given.name.removesuffix(".yaml")
    if given.parent == Path(".") and name in known:
        return known[name]
    raise FileNotFoundError(f"No scenario file {str(path)!r}" + ("" if given.parent != Path(".") else
                            " and no shipped scenario of that name") + f". Shipped scenarios: {sorted(known)}; "
                            "pass one of these names or the path of a YAML file.")
