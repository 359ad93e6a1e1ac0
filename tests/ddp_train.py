"""Trains one toy task into a registry; run plain or under torchrun (see test_distributed.py)."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmtl import AdapterConfig, BackboneConfig, Registry, TaskSpec, TrainConfig  # noqa: E402
from tests.conftest import toy_sentiment  # noqa: E402


def main(backbone: str, registry: str, out: str) -> None:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    reg = Registry.create(registry, BackboneConfig(name_or_path=backbone, max_length=64), device="cpu")
    training = TrainConfig(epochs=3, batch_size=8, learning_rate=2e-2, head_dropout=0.0, patience=None,
                           progress=False)
    # 61 rows: the last global batch holds 5, split 3 / 2 over two ranks.
    reg.add_task(TaskSpec("sentiment", labels=["neg", "pos"]), toy_sentiment(61), validation=toy_sentiment(16, 1),
                 adapter=AdapterConfig(dropout=0.0), training=training)
    key = reg._ensure_loaded("sentiment", 1)
    state = {f"adapter.{k}": v for k, v in reg._bank.state_dict(key).items()}
    state.update({f"head.{k}": v for k, v in reg._heads[key].state_dict().items()})
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(state, f"{out}.rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
