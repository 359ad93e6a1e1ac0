"""The end-to-end demo behind ``cmtl demo``: real data, embedded backbone, two tasks.

Creates a registry on all-MiniLM-L6-v2, adds SMS spam detection and TREC-6
question classification (both read offline from PyPI packages), reopens the
registry as a later process would, predicts a few new texts and evaluates
each task on its held-out test split.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from cmtl.benchmarks.corpora import corpus_info, load_corpus
from cmtl.core.backbone import BackboneConfig
from cmtl.core.tasks import TaskSpec
from cmtl.registry.facade import Registry
from cmtl.training.loop import TrainConfig

DEMO_TASKS = {"spam": "sms_spam", "question": "trec6"}
DEMO_TEXTS = {
    "spam": ["WINNER!! You have been selected for a free cruise. Call 09061701461 now to claim",
             "Are we still on for lunch tomorrow?"],
    "question": ["Who wrote the Declaration of Independence?", "How far is the Moon from the Earth?"],
}
#: The file the demo writes into the registry it creates: a re-run replaces a folder that holds it, and no other.
MARKER = ".cmtl-demo"


def run_demo(
    out: str | Path,
    *,
    max_train: int = 2000,
    max_test: int = 1000,
    epochs: int = 2,
    layers: int | None = None,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = lambda _: None,
) -> dict:
    """Run the demo; return ``{"table": [...], "predictions": [...]}`` rows for printing.

    ``out`` may be new or an empty folder; a folder an earlier demo created (it holds :data:`MARKER`) is
    replaced. ``progress``: show the training progress bars.

    Raises:
        FileExistsError: ``out`` exists, is not empty and was not created by the demo.
    """
    out = Path(out)
    _clear(out)
    reg = Registry.create(out, BackboneConfig(num_hidden_layers=layers))
    (out / MARKER).write_text("Created by cmtl demo, which replaces this folder when it runs again.\n")
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
            training=TrainConfig(epochs=epochs, seed=seed, progress=progress),
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


def _clear(out: Path) -> None:
    """Delete ``out`` if an earlier demo created it; refuse any other folder that is not empty."""
    folder = out.is_dir() and not out.is_symlink()
    if not os.path.lexists(out) or (folder and not any(out.iterdir())):
        return
    if folder and (out / MARKER).is_file():
        shutil.rmtree(out)
        return
    raise FileExistsError(f"{str(out)!r} exists and was not created by cmtl demo (it has no {MARKER} file), so the "
                          "demo will not replace it. Pass another folder with --out, or delete this one yourself "
                          "and run the demo again.")
