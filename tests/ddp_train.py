"""Trains a toy task (mode "task") or a joint group of two toy tasks (mode "group") into a new registry;
run plain or under torchrun (see test_distributed.py). Saves the trained tensors per rank."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmtl import AdapterConfig, BackboneConfig, Registry, TaskSpec, TrainConfig  # noqa: E402
from cmtl.multitask.config import MultiTaskConfig  # noqa: E402
from tests.conftest import TOPICS, toy_sentiment, toy_topics  # noqa: E402


def main(mode: str, backbone: str, registry: str, out: str) -> None:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    reg = Registry.create(registry, BackboneConfig(name_or_path=backbone, max_length=64), device="cpu")
    training = TrainConfig(epochs=3, batch_size=8, learning_rate=2e-2, head_dropout=0.0, patience=None,
                           probe_init=False, progress=False)  # the training itself is compared
    adapter = AdapterConfig(dropout=0.0)
    # 61 rows: the last global batch holds 5, split 3 / 2 over two ranks.
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(61), validation=toy_sentiment(16, 1),
                 adapter=adapter, training=training)
    if mode == "task":
        adapter_state, heads = reg.adapter_state("sentiment", 1), {"sentiment": reg.head_state("sentiment", 1)}
        extra = {}
    else:
        reg.add_task(TaskSpec("topic", labels=TOPICS), toy_topics(30), adapter=adapter,
                     training=TrainConfig(max_steps=2, progress=False))
        record = reg.train_group("both", {"sentiment": (toy_sentiment(61), toy_sentiment(16, 1)),
                                          "topic": (toy_topics(45), toy_topics(15, 1))},
                                 config=MultiTaskConfig(steps=12, eval_every=6, tag_every=3, weighting="uncertainty"),
                                 adapter=adapter, training=dataclass_replace(training, batch_size=7))
        adapter_state = reg.adapter_state("sentiment", merge="both")
        heads = {t: reg.head_state(t, merge="both") for t in ("sentiment", "topic")}
        extra = {"affinity": record["affinity"], "files": record["files"]}
    state = {f"adapter.{k}": v for k, v in adapter_state.items()}
    for task, head in heads.items():
        state.update({f"head.{task}.{k}": v for k, v in head.items()})
    torch.save(state, f"{out}.rank{rank}.pt")
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(extra, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


if __name__ == "__main__":
    main(*sys.argv[1:5])
