"""Data-parallel training: 2 CPU processes under torchrun (gloo) train the same adapter as one
process on the same global batches (one task, and a joint group with TAG and uncertainty
weighting, on an encoder; one task on a decoder), and only rank 0 writes the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "ddp_train.py"


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@pytest.mark.parametrize("mode,backbone", [("task", "tiny_backbone"), ("group", "tiny_backbone"),
                                           ("task", "tiny_llama")])
def test_two_process_training_matches_one_process(tmp_path, request, mode, backbone):
    tiny_backbone = request.getfixturevalue(backbone)  # an encoder, or a decoder
    _run([sys.executable, str(SCRIPT), mode, tiny_backbone, str(tmp_path / "single"), str(tmp_path / "single")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
          mode, tiny_backbone, str(tmp_path / "ddp"), str(tmp_path / "ddp")])
    single = torch.load(tmp_path / "single.rank0.pt")
    ranks = [torch.load(tmp_path / f"ddp.rank{r}.pt") for r in (0, 1)]
    assert single.keys() == ranks[0].keys() == ranks[1].keys()
    for key in single:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], atol=0, rtol=0)  # ranks stay identical
        torch.testing.assert_close(ranks[0][key], single[key], atol=1e-4, rtol=1e-3)
    assert any(not torch.allclose(v, torch.zeros_like(v)) for k, v in single.items() if "lora_B" in k)
    manifest = json.loads((tmp_path / "ddp" / "registry.json").read_text())
    assert [v["version"] for v in manifest["tasks"]["sentiment"]["versions"]] == [1]
    assert sorted(p.name for p in (tmp_path / "ddp" / "tasks" / "sentiment").iterdir()) == ["v1"]
    if mode == "task":
        assert manifest["generation"] == 2  # created, then one write
        assert manifest["tasks"]["sentiment"]["versions"][0]["training"]["steps"] == 24  # 3 × ceil(61 / 8)
    else:
        extra = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text())
                 for name, r in (("single", 0), ("ddp", 0), ("ddp", 1))]
        np.testing.assert_allclose(extra[1]["affinity"], extra[0]["affinity"], atol=1e-4)
        assert extra[1] == extra[2]  # rank 1 read the record rank 0 wrote
        assert list(manifest["merges"]) == ["both"] and manifest["generation"] == 4  # create, 2 tasks, group


def _reduce_on_two_ranks(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from cmtl.training.distributed import all_reduce_gradients

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    shared, rare, unused = (torch.nn.Parameter(torch.ones(3)) for _ in range(3))
    shared.grad = torch.full((3,), float(rank + 1))
    if rank == 0:  # a head whose task only rank 0's rows hold
        rare.grad = torch.full((3,), 5.0)
    all_reduce_gradients([shared, rare, unused])
    optimizer = torch.optim.AdamW([shared, rare, unused], lr=0.1, weight_decay=0.1)
    optimizer.step()
    torch.save({"grads": [None if p.grad is None else p.grad.clone() for p in (shared, rare, unused)],
                "unused": unused.detach().clone()}, f"{out}.rank{rank}.pt")
    dist.destroy_process_group()


def test_a_parameter_no_rank_has_a_gradient_for_keeps_none(tmp_path):
    """A missing gradient was all-reduced as zeros: AdamW then decayed and moved a parameter (the head of a task
    absent from the global batch) that the single-process step leaves alone."""
    import torch.multiprocessing as mp

    mp.spawn(_reduce_on_two_ranks, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"out.rank{rank}.pt")
        shared, rare, unused = saved["grads"]
        assert torch.equal(shared, torch.full((3,), 3.0)) and torch.equal(rare, torch.full((3,), 5.0))
        assert unused is None and torch.equal(saved["unused"], torch.ones(3))  # as one process: untouched
